// The tokenizer, on the real vocabularies: llama.cpp's GPT-2, Llama-3 and Qwen2 files and
// SmolLM2's (whichever of them models/ holds; FUZZ_MODELS names another folder). The first
// byte picks the vocabulary (mod their count) and the mode: bit 2 set, the rest is ids (int32,
// little-endian, any value) to detokenize; else bytes to tokenize, parse_special from bit 3,
// and the ids decoded again.
#include "fuzz.h"

static ctl_tokenizer *toks[4];
static int n_toks;

static void load_vocabs(void) {
    static const char *const files[] = {"vocab/ggml-vocab-gpt-2.gguf", "vocab/ggml-vocab-llama-bpe.gguf",
                                        "vocab/ggml-vocab-qwen2.gguf", "SmolLM2-135M-Instruct.Q4_1.gguf"};
    const char *dir = getenv("FUZZ_MODELS") ? getenv("FUZZ_MODELS") : "models";
    for (int i = 0; i < 4; i++) {
        char path[1024];
        ctl_gguf *g;
        snprintf(path, sizeof path, "%s/%s", dir, files[i]);
        if (ctl_gguf_open(fuzz_ctx(), path, &g)) continue;
        if (!ctl_tokenizer_from_gguf(fuzz_ctx(), g, &toks[n_toks])) n_toks++;
        ctl_gguf_close(g);   // the tokenizer keeps its own copy
    }
    if (!n_toks) fprintf(stderr, "fuzz_tokenizer: no vocabulary under %s/ (make models)\n", dir), abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (!n_toks) load_vocabs();
    if (size < 1) return 0;
    const ctl_tokenizer *tk = toks[data[0] % 4 % n_toks];
    static int32_t ids[8192];
    static char text[65536];
    int64_t n = 0;
    size_t len;
    if (data[0] & 4) {   // ids, any values: out-of-range ones must be refused, not read
        n = (int64_t)((size - 1) / 4);
        if (n > 8192) n = 8192;
        memcpy(ids, data + 1, (size_t)n * 4);
        ctl_detokenize(tk, ids, n, text, sizeof text, &len);
        ctl_detokenize(tk, ids, n, text, 3, &len);   // a buffer too small
        return 0;
    }
    ctl_status st = ctl_tokenize(tk, (const char *)data + 1, size - 1, (data[0] & 8) != 0, ids, 8192, &n);
    if (st == CTL_ERR_CAPACITY) return 0;
    if (st) abort();   // any bytes tokenize
    for (int64_t i = 0; i < n; i++)
        if (ids[i] < 0 || ids[i] >= ctl_tokenizer_vocab(tk)) abort();
    if (ctl_detokenize(tk, ids, n, text, sizeof text, &len)) abort();
    // Byte-level BPE is lossless: without special tokens, the text comes back as it went in,
    // less the bytes the vocabulary has no token for.
    if (!(data[0] & 8) && len < sizeof text) {
        size_t k = 0;
        for (size_t i = 1; i < size; i++)
            if (tk->byte_token[data[i]] >= 0 && (k >= len || text[k++] != (char)data[i])) abort();
        if (k != len) abort();
    }
    return 0;
}
