// Seed files the fixtures do not have. Into the folder argv[1] (for the GGUF fuzzer): a
// byte-level vocabulary with merges, control tokens and a ChatML template, and small models as
// cotlab writes them with it (llama fp32, gpt2 Q8_0). Into argv[2] (for the adapter fuzzer):
// adapter files for fuzz_adapter_config's model, one of each kind.
#include "fuzz.h"

#include <stdio.h>
#include <string.h>

static int check(ctl_ctx *ctx, ctl_status st, const char *what) {
    if (st) fprintf(stderr, "make_seeds: %s: %s\n", what, ctl_last_error(ctx));
    return st != CTL_OK;
}

// The vocabulary: GPT-2's 256 byte symbols (printable bytes as themselves, the rest from
// U+0100 on), then merges of a few common pairs and the ChatML tokens.
static int add_tokenizer(ctl_ctx *ctx, ctl_gguf_writer *w) {
    static char store[300][16];
    const char *toks[300];
    size_t lens[300];
    int n = 0, extra = 0;
    for (int b = 0; b < 256; b++) {
        bool direct = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || b >= 174;
        unsigned cp = direct ? (unsigned)b : 256u + (unsigned)extra++;
        char *s = store[n];
        if (cp < 0x80) s[0] = (char)cp, s[1] = 0;
        else s[0] = (char)(0xc0 | (cp >> 6)), s[1] = (char)(0x80 | (cp & 0x3f)), s[2] = 0;
        toks[n] = s, lens[n] = strlen(s), n++;
    }
    static const char *const merged[] = {"th", "he", "the", "Ġt", "Ġthe", "12", "<|im_start|>", "<|im_end|>"};
    static const char *const merges[] = {"t h", "h e", "t he", "Ġ t", "Ġt he", "1 2"};
    for (int i = 0; i < 8; i++) toks[n] = merged[i], lens[n] = strlen(merged[i]), n++;
    size_t mlens[6];
    for (int i = 0; i < 6; i++) mlens[i] = strlen(merges[i]);
    int32_t types[300];
    for (int i = 0; i < n; i++) types[i] = i >= n - 2 ? 3 : 1;   // the last two are control tokens
    static const char tmpl[] = "{% for m in messages %}{{'<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n'}}{% endfor %}";
    return check(ctx, ctl_gguf_writer_set_str(w, "tokenizer.ggml.model", "gpt2", 4), "model") ||
           check(ctx, ctl_gguf_writer_set_str(w, "tokenizer.ggml.pre", "smollm", 6), "pre") ||
           check(ctx, ctl_gguf_writer_set_str_array(w, "tokenizer.ggml.tokens", toks, lens, (uint64_t)n), "tokens") ||
           check(ctx, ctl_gguf_writer_set_array(w, "tokenizer.ggml.token_type", CTL_GGUF_I32, types, (uint64_t)n), "types") ||
           check(ctx, ctl_gguf_writer_set_str_array(w, "tokenizer.ggml.merges", merges, mlens, 6), "merges") ||
           check(ctx, ctl_gguf_writer_set_u32(w, "tokenizer.ggml.bos_token_id", (uint32_t)n - 2), "bos") ||
           check(ctx, ctl_gguf_writer_set_u32(w, "tokenizer.ggml.eos_token_id", (uint32_t)n - 1), "eos") ||
           check(ctx, ctl_gguf_writer_set_str(w, "tokenizer.chat_template", tmpl, sizeof tmpl - 1), "template");
}

int main(int argc, char **argv) {
    if (argc < 2) return fprintf(stderr, "usage: make_seeds GGUF_DIR [ADAPTER_DIR]\n"), 2;
    ctl_ctx *ctx;
    if (ctl_ctx_init(&ctx, NULL)) return 1;
    char path[1024];
    ctl_gguf_writer *w;   // the vocabulary alone
    snprintf(path, sizeof path, "%s/vocab.gguf", argv[1]);
    if (check(ctx, ctl_gguf_writer_init(ctx, &w), "writer") || add_tokenizer(ctx, w) || check(ctx, ctl_gguf_writer_save(w, path), path)) return 1;
    ctl_gguf_writer_free(w);
    ctl_gguf *vocab;
    if (check(ctx, ctl_gguf_open(ctx, path, &vocab), path)) return 1;
    for (int k = 0; k < 2; k++) {   // llama (fp32) and gpt2 (Q8_0): the smallest shapes that are whole models
        ctl_model_config cfg;
        memset(&cfg, 0, sizeof cfg);
        cfg.arch = k ? CTL_ARCH_GPT2 : CTL_ARCH_LLAMA, cfg.vocab_size = 264, cfg.n_ctx = 32, cfg.n_embd = 32;
        cfg.n_layer = 1, cfg.n_head = 2, cfg.n_kv_head = k ? 2 : 1, cfg.n_ff = 32, cfg.tied_embeddings = k == 0;
        ctl_model *m;
        if (check(ctx, ctl_model_create(ctx, &cfg, &m), "create")) return 1;
        ctl_model_init_random(m, 7);
        snprintf(path, sizeof path, "%s/%s", argv[1], k ? "gpt2_q8_0.gguf" : "llama_f32.gguf");
        if (check(ctx, ctl_model_export_gguf(m, vocab, path, k ? CTL_GGML_Q8_0 : CTL_GGML_F32), path)) return 1;
        ctl_model_free(m);
    }
    ctl_gguf_close(vocab);
#define NO_LORA {0, 0.0f, 0.0f, 0, 0, 0, false, false, CTL_LORA_INIT_DEFAULT, 0}
#define NO_SPARSE {0.0f, 0, 0, 0, CTL_SPARSE_MAGNITUDE, 0}
    static const struct { const char *name; int kind; ctl_lora_desc lora; ctl_sparse_desc sparse; } adapters[] = {
        {"lora.gguf", 0, {2, 4.0f, 0.0f, CTL_LINEAR_ALL, 0, 0, false, false, CTL_LORA_INIT_GAUSSIAN, 3}, NO_SPARSE},
        {"rslora_dora_dropout.gguf", 0, {3, 2.0f, 0.1f, CTL_LINEAR_ATTN, 1, 2, true, true, CTL_LORA_INIT_GAUSSIAN, 4}, NO_SPARSE},
        {"head_embed.gguf", 0, {1, 1.0f, 0.0f, CTL_LINEAR_HEAD | CTL_LINEAR_EMBED | CTL_LINEAR_DOWN, 0, 0, false, false, CTL_LORA_INIT_GAUSSIAN, 5}, NO_SPARSE},
        {"sparse.gguf", 1, NO_LORA, {0.05f, CTL_LINEAR_ALL, 0, 0, CTL_SPARSE_RANDOM, 6}},
        {"sparse_and_lora.gguf", 2, {2, 2.0f, 0.0f, CTL_LINEAR_MLP, 0, 0, false, false, CTL_LORA_INIT_GAUSSIAN, 7}, {0.1f, CTL_LINEAR_ATTN, 0, 0, CTL_SPARSE_MAGNITUDE, 0}},
    };
    ctl_model_config cfg = fuzz_adapter_config();
    for (size_t k = 0; argc > 2 && k < sizeof adapters / sizeof adapters[0]; k++) {
        ctl_model *m;
        if (check(ctx, ctl_model_create(ctx, &cfg, &m), "create")) return 1;
        ctl_model_init_random(m, 1);
        if (adapters[k].kind != 1 && check(ctx, ctl_lora_attach(m, &adapters[k].lora), "lora")) return 1;
        if (adapters[k].kind != 0 && check(ctx, ctl_sparse_attach(m, &adapters[k].sparse), "sparse")) return 1;
        for (int64_t i = 0; i < ctl_model_param_count(m); i++) {   // B moved off zero, as after training
            ctl_param *p = ctl_model_param(m, i);
            for (int64_t e = 0; p->trainable && e < ctl_tensor_numel(&p->value); e++) ((float *)p->value.data)[e] += 0.01f * (float)(e % 7);
        }
        snprintf(path, sizeof path, "%s/%s", argv[2], adapters[k].name);
        if (check(ctx, ctl_adapter_save(m, path), path)) return 1;
        ctl_model_free(m);
    }
    ctl_ctx_free(ctx);
    return 0;
}
