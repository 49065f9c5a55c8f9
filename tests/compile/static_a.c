// Two files that each compile the implementation with COTLAB_STATIC link into one program.
#define COTLAB_STATIC
#define COTLAB_IMPLEMENTATION
#include "../../cotlab.h"

int static_b_threads(void);

int main(void) {
    ctl_ctx *ctx;
    if (ctl_ctx_init(&ctx, NULL) != CTL_OK) return 1;
    int ok = ctl_ctx_threads(ctx) >= 1 && static_b_threads() == 1;
    ctl_ctx_free(ctx);
    return ok ? 0 : 1;
}
