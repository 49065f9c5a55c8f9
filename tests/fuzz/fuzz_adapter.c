// cotlab's adapter files (ctl_adapter_load's reader) onto a small untied llama: LoRA, rsLoRA,
// DoRA, sparse deltas, head and embedding LoRA. A file that loads is then used: a forward with
// the adapters on, merged and unmerged. One that fails must leave no adapter attached.
//
// The model is made once (its random initialisation cost more than all the rest of an input)
// and every input gets it back as it was made: adapters removed, the arrays they grew given
// back at their first size, the base weights copied back after a merge (merge then unmerge
// leaves them off by rounding). Without a merge the base must come back untouched.
#include "fuzz.h"

static ctl_model *adapter_model;
static ctl_model adapter_model0;            // the struct as made: no adapters, nothing grown
static ctl_param *adapter_params0;          // its base parameters (names, shapes, flags)
static unsigned char *adapter_weights0;     // and their values

static ctl_model *adapter_model_get(void) {
    if (adapter_model) return adapter_model;
    ctl_model_config cfg = fuzz_adapter_config();
    ctl_model *m;
    if (ctl_model_create(fuzz_ctx(), &cfg, &m)) abort();
    ctl_model_init_random(m, 1);
    adapter_params0 = (ctl_param *)malloc((size_t)m->n_base * sizeof(ctl_param));
    adapter_weights0 = (unsigned char *)malloc(m->bytes);
    if (!adapter_params0 || !adapter_weights0) abort();
    memcpy(adapter_params0, m->params, (size_t)m->n_base * sizeof(ctl_param));
    memcpy(adapter_weights0, m->data, m->bytes);
    adapter_model0 = *m;
    return adapter_model = m;
}

// The model as adapter_model_get made it, after an input attached, merged or failed what it did.
static void adapter_model_restore(ctl_model *m, bool merged) {
    ctl_ctx *ctx = m->ctx;
    ctl__adapters_truncate(m, 0, m->n_base, 0);   // frees each adapter's indices, norms and value blocks
    ctl_free(ctx, m->adapters), ctl_free(ctx, m->blocks_extra);
    ctl_param *params = m->params;
    if (m->cap_params != m->n_base) {   // grown for the adapters' parameters: exactly n_base again, so ASan sees past it
        params = (ctl_param *)ctl_alloc(ctx, (size_t)m->n_base * sizeof(ctl_param));
        if (!params) abort();
        ctl_free(ctx, m->params);
    }
    memcpy(params, adapter_params0, (size_t)m->n_base * sizeof(ctl_param));   // trainable flags, among others
    if (merged) memcpy(m->data, adapter_weights0, m->bytes);
    else if (memcmp(m->data, adapter_weights0, m->bytes)) abort();   // loading and inference read the base, never write it
    *m = adapter_model0;   // counts, capacities, merged, lora, version
    m->params = params;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    ctl_ctx *ctx = fuzz_ctx();
    ctl_model *m = adapter_model_get();
    ctl_gguf *g;
    bool merged = false;
    if (ctl_gguf_open_memory(ctx, data, size, &g)) return 0;
    int64_t n_params = ctl_model_param_count(m);
    if (ctl__adapters_read(m, g, "input", "adapter_load")) {
        if (m->n_adapters || ctl_model_param_count(m) != n_params) abort();   // nothing attached half-way
    } else {
        ctl_infer *inf;
        float logits[FUZZ_VOCAB];
        static const int32_t prompt[3] = {1, 7, 30};
        if (!ctl_infer_init(m, NULL, &inf)) {
            if (!ctl_infer_feed(inf, 0, prompt, 3, logits)) fuzz_sink = logits[0];
            merged = true;
            if (!ctl_adapters_merge(m)) ctl_infer_reset(inf, -1), ctl_infer_feed(inf, 0, prompt, 3, logits), ctl_adapters_unmerge(m);
            ctl_infer_free(inf);
        }
    }
    ctl_gguf_close(g);
    adapter_model_restore(m, merged);
    return 0;
}
