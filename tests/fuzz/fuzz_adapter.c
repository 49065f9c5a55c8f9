// cotlab's adapter files (ctl_adapter_load's reader) onto a small untied llama: LoRA, rsLoRA,
// DoRA, sparse deltas, head and embedding LoRA. A file that loads is then used: a forward with
// the adapters on, merged and unmerged. One that fails must leave no adapter attached.
#include "fuzz.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    ctl_ctx *ctx = fuzz_ctx();
    ctl_model_config cfg = fuzz_adapter_config();
    ctl_model *m;
    ctl_gguf *g;
    if (ctl_model_create(ctx, &cfg, &m)) abort();
    ctl_model_init_random(m, 1);
    if (ctl_gguf_open_memory(ctx, data, size, &g)) return ctl_model_free(m), 0;
    int64_t n_params = ctl_model_param_count(m);
    if (ctl__adapters_read(m, g, "input", "adapter_load")) {
        if (m->n_adapters || ctl_model_param_count(m) != n_params) abort();   // nothing attached half-way
    } else {
        ctl_infer *inf;
        float logits[FUZZ_VOCAB];
        static const int32_t prompt[3] = {1, 7, 30};
        if (!ctl_infer_init(m, NULL, &inf)) {
            if (!ctl_infer_feed(inf, 0, prompt, 3, logits)) fuzz_sink = logits[0];
            if (!ctl_adapters_merge(m)) ctl_infer_reset(inf, -1), ctl_infer_feed(inf, 0, prompt, 3, logits), ctl_adapters_unmerge(m);
            ctl_infer_free(inf);
        }
    }
    ctl_gguf_close(g);
    ctl_model_free(m);
    return 0;
}
