#define COTLAB_STATIC
#define COTLAB_IMPLEMENTATION
#include "../../cotlab.h"

int static_b_threads(void);
int static_b_threads(void) {
    ctl_ctx *ctx;
    ctl_ctx_desc d = ctl_ctx_desc_default();
    d.n_threads = 1;
    if (ctl_ctx_init(&ctx, &d) != CTL_OK) return -1;
    int n = ctl_ctx_threads(ctx);
    ctl_ctx_free(ctx);
    return n;
}
