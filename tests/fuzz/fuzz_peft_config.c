// PEFT's adapter_config.json reader (ctl_lora_load_peft's first step).
#include "fuzz.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    ctl__peft_cfg c;
    if (!ctl__peft_config_parse(fuzz_ctx(), "fuzz", data, size, &c)) fuzz_sink = (float)(c.r + c.alpha + c.dropout + c.rslora + c.dora);
    return 0;
}
