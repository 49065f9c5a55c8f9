// The GGUF reader and everything that reads an open GGUF: metadata (every typed accessor, every
// array element), the tensor table and its data (dequantised), the tokenizer, the chat
// template and the model built from the file, fp32 and kept quantised.
#include "fuzz.h"

static void walk_kv(const ctl_gguf *g, const ctl_gguf_kv *kv) {
    int64_t i64;
    uint64_t u64;
    double f;
    bool b;
    const char *s;
    size_t len;
    ctl_gguf_get_int(g, kv->key, &i64), ctl_gguf_get_uint(g, kv->key, &u64), ctl_gguf_get_float(g, kv->key, &f);
    ctl_gguf_get_bool(g, kv->key, &b), ctl_gguf_get_str(g, kv->key, &s, &len);
    if (kv->type != CTL_GGUF_ARR) return;
    for (uint64_t i = 0; i < kv->count && i < 4096; i++)
        ctl_gguf_arr_int(g, kv, i, &i64), ctl_gguf_arr_float(g, kv, i, &f), ctl_gguf_arr_str(g, kv, i, &s, &len);
    ctl_gguf_arr_int(g, kv, kv->count, &i64), ctl_gguf_arr_str(g, kv, UINT64_MAX, &s, &len);   // past the end: refused
}

// Every value read: uninitialised output would show under MSan or valgrind.
static FUZZ_NO_COVERAGE float gguf_sum(const float *x, int64_t n) {
    float sum = 0.0f;
    for (int64_t k = 0; k < n; k++) sum += x[k];
    return sum;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    ctl_ctx *ctx = fuzz_ctx();
    ctl_gguf *g;
    if (ctl_gguf_open_memory(ctx, data, size, &g)) return 0;
    ctl_gguf_version(g), ctl_gguf_alignment(g), ctl_gguf_data_offset(g);
    for (int64_t i = 0; i < ctl_gguf_kv_count(g); i++) walk_kv(g, ctl_gguf_kv_at(g, i));
    ctl_gguf_find_kv(g, "general.architecture");
    for (int64_t i = 0; i < ctl_gguf_tensor_count(g); i++) {
        const ctl_gguf_tensor *t = ctl_gguf_tensor_at(g, i);
        int64_t n = ctl_gguf_tensor_numel(t);
        ctl_gguf_find_tensor(g, t->name);
        if (n < 0 || n > (1 << 16)) continue;
        float *out = (float *)malloc((size_t)n * sizeof(float) + 1);
        if (out && !ctl_gguf_read_f32(g, t, out)) fuzz_sink = gguf_sum(out, n);
        free(out);
    }
    ctl_tokenizer *tk;
    if (!ctl_tokenizer_from_gguf(ctx, g, &tk)) {
        int32_t ids[64];
        int64_t n;
        char text[256];
        size_t len;
        static const char sample[] = "Hello <|im_start|>world 12345 ünïcode\n\t  x";
        if (!ctl_tokenize(tk, sample, sizeof sample - 1, true, ids, 64, &n) && n <= 64) ctl_detokenize(tk, ids, n, text, sizeof text, &len);
        ctl_tokenizer_free(tk);
    }
    ctl_chat_template tmpl;
    ctl_chat_template_from_gguf(ctx, g, &tmpl);
    for (int q = 0; q < 2; q++) {   // the model: fp32, then quantised matrices kept as they are
        ctl_model_desc md = {q == 1, false};
        ctl_model *m;
        if (!ctl_model_from_gguf(ctx, g, &md, &m)) ctl_model_free(m);
    }
    ctl_gguf_close(g);
    return 0;
}
