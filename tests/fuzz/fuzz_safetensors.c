// The safetensors reader: the 8-byte length, the JSON header (names, dtypes, shapes, offsets,
// __metadata__), and every small tensor read as fp32.
#include "fuzz.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    ctl_ctx *ctx = fuzz_ctx();
    ctl_safetensors *st;
    if (ctl_safetensors_open_memory(ctx, data, size, &st)) return 0;
    for (int64_t i = 0; i < ctl_safetensors_meta_count(st); i++) {
        const char *k, *v;
        if (ctl_safetensors_meta_at(st, i, &k, &v)) ctl_safetensors_find_meta(st, k), fuzz_sink = (float)(strlen(k) + strlen(v));
    }
    ctl_safetensors_meta_at(st, -1, NULL, NULL), ctl_safetensors_meta_at(st, ctl_safetensors_meta_count(st), NULL, NULL);
    for (int64_t i = 0; i < ctl_safetensors_tensor_count(st); i++) {
        const ctl_safetensors_tensor *t = ctl_safetensors_tensor_at(st, i);
        ctl_safetensors_find_tensor(st, t->name);
        int64_t n = 1;
        for (int d = 0; d < t->ndim && n <= (1 << 16); d++) n *= t->shape[d];
        if (n < 0 || n > (1 << 16)) continue;
        float *out = (float *)malloc((size_t)n * sizeof(float) + 1);
        if (out && !ctl_safetensors_read_f32(st, t, out)) {
            float sum = 0.0f;
            for (int64_t k = 0; k < n; k++) sum += out[k];
            fuzz_sink = sum;
        }
        free(out);
    }
    ctl_safetensors_close(st);
    return 0;
}
