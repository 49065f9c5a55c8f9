// Writes what tools/check_adapters.py compares against llama.cpp and PEFT: SmolLM2 with a LoRA
// (rank 8, every linear layer, B set to random values so the adapter changes the logits), as
//   <dir>/base-f32.gguf        the base alone, F32 (llama.cpp then computes in fp32 too)
//   <dir>/lora.gguf            the adapter for llama.cpp (--lora)
//   <dir>/peft/                the adapter for PEFT
//   <dir>/merged-f32.gguf      base + adapter, merged
//   <dir>/parity.bin           prompts and cotlab's next-token logits: with and without the
//                              adapter on the fp32 base, and with it on the Q4_1 base kept
//                              quantised (CTLFIX01: "prompt/i", "lora/i", "base/i", "q4_lora/i",
//                              "q4_base/i")
//
//   make build/adapter_parity && ./build/adapter_parity models/SmolLM2-135M-Instruct.Q4_1.gguf build/parity
#define COTLAB_IMPLEMENTATION
#include "cotlab.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

static const char *const PROMPTS[] = {
    "The capital of France is",
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.",
    "<|im_start|>user\nWhat is 12 times 7?<|im_end|>\n<|im_start|>assistant\n",
    "def fibonacci(n):\n    ",
};
enum { N_PROMPTS = 4, MAX_TOKENS = 64 };

typedef struct rec { char name[32]; int dtype; int64_t n; const void *data; } rec;

static int write_fixture(const char *path, const rec *r, int n) {
    FILE *f = fopen(path, "wb");
    if (!f) return 1;
    uint32_t count = (uint32_t)n;
    fwrite("CTLFIX01", 1, 8, f), fwrite(&count, 4, 1, f);
    for (int i = 0; i < n; i++) {
        uint32_t len = (uint32_t)strlen(r[i].name), dt = (uint32_t)r[i].dtype, nd = 1;
        fwrite(&len, 4, 1, f), fwrite(r[i].name, 1, len, f), fwrite(&dt, 4, 1, f), fwrite(&nd, 4, 1, f);
        fwrite(&r[i].n, 8, 1, f), fwrite(r[i].data, 4, (size_t)r[i].n, f);
    }
    return fclose(f) != 0;
}

static void die(const char *what, ctl_ctx *ctx) {
    fprintf(stderr, "adapter_parity: %s: %s\n", what, ctx ? ctl_last_error(ctx) : "");
    exit(1);
}

// Next-token logits after each prompt.
static void logits_of(ctl_model *m, int32_t (*ids)[MAX_TOKENS], const int64_t *n, float *out) {
    ctl_infer *f;
    ctl_infer_desc d = {1, MAX_TOKENS};
    if (ctl_infer_init(m, &d, &f)) die("infer_init", ctl_model_ctx(m));
    for (int i = 0; i < N_PROMPTS; i++) {
        ctl_infer_reset(f, 0);
        if (ctl_infer_feed(f, 0, ids[i], n[i], out + i * ctl_model_cfg(m)->vocab_size)) die("infer_feed", ctl_model_ctx(m));
    }
    ctl_infer_free(f);
}

int main(int argc, char **argv) {
    if (argc != 3) return fprintf(stderr, "usage: %s model.gguf out_dir\n", argv[0]), 2;
    char path[1024];
    ctl_ctx *ctx;
    ctl_gguf *g;
    ctl_tokenizer *tk;
    ctl_model *m, *q;
    ctl_model_desc keep = {true, false};
    if (ctl_ctx_init(&ctx, NULL)) return 1;
    mkdir(argv[2], 0755);
    if (ctl_gguf_open(ctx, argv[1], &g) || ctl_model_from_gguf(ctx, g, NULL, &m) || ctl_model_from_gguf(ctx, g, &keep, &q) ||
        ctl_tokenizer_from_gguf(ctx, g, &tk))
        die(argv[1], ctx);
    static int32_t ids[N_PROMPTS][MAX_TOKENS];
    int64_t n[N_PROMPTS];
    for (int i = 0; i < N_PROMPTS; i++)
        if (ctl_tokenize(tk, PROMPTS[i], strlen(PROMPTS[i]), true, ids[i], MAX_TOKENS, &n[i])) die("tokenize", ctx);
    int64_t V = ctl_model_cfg(m)->vocab_size;
    float *lora = malloc(sizeof(float) * N_PROMPTS * V), *base = malloc(sizeof(float) * N_PROMPTS * V);
    float *q4_lora = malloc(sizeof(float) * N_PROMPTS * V), *q4_base = malloc(sizeof(float) * N_PROMPTS * V);
    logits_of(m, ids, n, base);
    logits_of(q, ids, n, q4_base);
    ctl_lora_desc ld = {0};
    ld.rank = 8, ld.alpha = 16.0f, ld.seed = 1;
    if (ctl_lora_attach(m, &ld) || ctl_lora_attach(q, &ld)) die("lora_attach", ctx);
    ctl_rng rng;
    ctl_rng_seed(&rng, 2);
    for (int64_t i = 0; i < ctl_model_param_count(m); i++) {   // B away from 0, the same on both models
        ctl_param *p = ctl_model_param(m, i);
        if (!strstr(p->name, ".lora_b")) continue;
        for (int64_t j = 0; j < ctl_tensor_numel(&p->value); j++) ((float *)p->value.data)[j] = 0.05f * ctl_rng_normal(&rng);
        memcpy(ctl_model_param(q, i)->value.data, p->value.data, (size_t)ctl_tensor_numel(&p->value) * sizeof(float));
    }
    for (int64_t i = 0; i < ctl_model_param_count(m); i++)
        if (strstr(ctl_model_param(m, i)->name, ".lora_a"))
            memcpy(ctl_model_param(q, i)->value.data, ctl_model_param(m, i)->value.data,
                   (size_t)ctl_tensor_numel(&ctl_model_param(m, i)->value) * sizeof(float));
    logits_of(m, ids, n, lora);
    logits_of(q, ids, n, q4_lora);
    snprintf(path, sizeof path, "%s/lora.gguf", argv[2]);
    if (ctl_lora_save_llamacpp(m, path)) die(path, ctx);
    snprintf(path, sizeof path, "%s/peft", argv[2]);
    if (ctl_lora_save_peft(m, path)) die(path, ctx);
    snprintf(path, sizeof path, "%s/merged-f32.gguf", argv[2]);
    if (ctl_model_export_gguf(m, g, path, CTL_GGML_F32)) die(path, ctx);
    ctl_adapters_enable(m, false);   // the base alone
    snprintf(path, sizeof path, "%s/base-f32.gguf", argv[2]);
    if (ctl_model_export_gguf(m, g, path, CTL_GGML_F32)) die(path, ctx);
    rec r[5 * N_PROMPTS];
    int k = 0;
    for (int i = 0; i < N_PROMPTS; i++) {
        const void *data[5] = {ids[i], lora + i * V, base + i * V, q4_lora + i * V, q4_base + i * V};
        static const char *const names[5] = {"prompt", "lora", "base", "q4_lora", "q4_base"};
        for (int j = 0; j < 5; j++, k++) {
            snprintf(r[k].name, sizeof r[k].name, "%s/%d", names[j], i);
            r[k].dtype = j ? 0 : 1, r[k].n = j ? V : n[i], r[k].data = data[j];
        }
    }
    snprintf(path, sizeof path, "%s/parity.bin", argv[2]);
    if (write_fixture(path, r, k)) die(path, NULL);
    printf("wrote %s/{base-f32.gguf, lora.gguf, peft/, merged-f32.gguf, parity.bin}\n", argv[2]);
    ctl_tokenizer_free(tk), ctl_model_free(m), ctl_model_free(q), ctl_gguf_close(g), ctl_ctx_free(ctx);
    free(lora), free(base), free(q4_lora), free(q4_base);
    return 0;
}
