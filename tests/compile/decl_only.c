// Includes the header without the implementation: declarations alone must compile and be usable.
#include "../../cotlab.h"

int decl_only_uses_api(void);
int decl_only_uses_api(void) {
    ctl_ctx_desc d = ctl_ctx_desc_default();
    ctl_model_config cfg;
    (void)cfg;
    (void)d;
    return (int)sizeof(ctl_tensor) + ctl_status_str(CTL_OK)[0];
}
