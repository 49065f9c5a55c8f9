// Chat templates: recognising one from a GGUF's tokenizer.chat_template (the text comes from
// the input, in a GGUF built here with a small vocabulary and a BOS id from the input), then
// rendering conversations, and tokenizing them with SmolLM2's or Qwen2's vocabulary when
// models/ has one. Input: byte 0 (bit 0 add_generation_prompt, bit 1 the template from the
// input, else ChatML (bit 2 with a default system message) or Llama-3 (bit 3)), byte 1 the BOS
// id, then fields separated by 0x01: [template,] role, content, role, content...
#include "fuzz.h"

static ctl_tokenizer *tok;

static void put(uint8_t **p, const void *v, size_t n) { memcpy(*p, v, n), *p += n; }
static void put_u64(uint8_t **p, uint64_t v) { put(p, &v, 8); }
static void put_u32(uint8_t **p, uint32_t v) { put(p, &v, 4); }
static void put_str(uint8_t **p, const char *s, size_t n) { put_u64(p, n), put(p, s, n); }

// GGUF v3: tokenizer.chat_template, tokenizer.ggml.tokens ["<s>", "a", "b"], bos_token_id.
static size_t make_gguf(uint8_t *buf, const uint8_t *tmpl, size_t n, uint32_t bos) {
    uint8_t *p = buf;
    put(&p, "GGUF", 4), put_u32(&p, 3), put_u64(&p, 0), put_u64(&p, 3);
    put_str(&p, "tokenizer.chat_template", 23), put_u32(&p, CTL_GGUF_STR), put_str(&p, (const char *)tmpl, n);
    put_str(&p, "tokenizer.ggml.tokens", 21), put_u32(&p, CTL_GGUF_ARR), put_u32(&p, CTL_GGUF_STR), put_u64(&p, 3);
    put_str(&p, "<s>", 3), put_str(&p, "a", 1), put_str(&p, "b", 1);
    put_str(&p, "tokenizer.ggml.bos_token_id", 27), put_u32(&p, CTL_GGUF_U32), put_u32(&p, bos);
    return (size_t)(p - buf);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    static bool tried;
    if (!tried) {   // a real vocabulary for ctl_chat_tokenize, if there is one
        tried = true;
        const char *dir = getenv("FUZZ_MODELS") ? getenv("FUZZ_MODELS") : "models";
        static const char *const files[] = {"SmolLM2-135M-Instruct.Q4_1.gguf", "vocab/ggml-vocab-qwen2.gguf"};
        for (int i = 0; i < 2 && !tok; i++) {
            char path[1024];
            ctl_gguf *g;
            snprintf(path, sizeof path, "%s/%s", dir, files[i]);
            if (!ctl_gguf_open(fuzz_ctx(), path, &g)) {
                if (ctl_tokenizer_from_gguf(fuzz_ctx(), g, &tok)) tok = NULL;
                ctl_gguf_close(g);
            }
        }
    }
    if (size < 2 || size > 65536) return 0;
    ctl_chat_template t;
    memset(&t, 0, sizeof t);
    const uint8_t *p = data + 2, *end = data + size;
    if (data[0] & 2) {
        const uint8_t *sep = (const uint8_t *)memchr(p, 1, (size_t)(end - p));
        size_t n = (size_t)((sep ? sep : end) - p);
        uint8_t *g_bytes = (uint8_t *)malloc(n + 256);
        ctl_gguf *g;
        if (!g_bytes) return 0;
        ctl_status st = ctl_gguf_open_memory(fuzz_ctx(), g_bytes, make_gguf(g_bytes, p, n, data[1]), &g);
        if (!st) st = ctl_chat_template_from_gguf(fuzz_ctx(), g, &t), ctl_gguf_close(g);
        free(g_bytes);
        if (st) return 0;
        p = sep ? sep + 1 : end;
    } else {
        t.format = data[0] & 8 ? CTL_CHAT_LLAMA3 : CTL_CHAT_CHATML;
        if (data[0] & 4) strcpy(t.default_system, "You are a helpful assistant.");
        if (t.format == CTL_CHAT_LLAMA3) strcpy(t.bos, "<|begin_of_text|>");
    }
    // The fields as NUL-terminated strings, alternating role and content.
    char *copy = (char *)malloc((size_t)(end - p) + 1);
    ctl_chat_msg msgs[64];
    int64_t n = 0;
    memcpy(copy, p, (size_t)(end - p));
    copy[end - p] = 0;
    for (char *s = copy, *e = copy + (end - p); n < 64;) {
        char *r = s, *sep = (char *)memchr(s, 1, (size_t)(e - s));
        if (!sep) break;
        *sep = 0, s = sep + 1;
        char *c = s;
        sep = (char *)memchr(s, 1, (size_t)(e - s));
        if (sep) *sep = 0;
        msgs[n].role = r, msgs[n].content = c, n++;
        if (!sep) break;
        s = sep + 1;
    }
    bool gen = data[0] & 1;
    size_t len;
    static char out[1 << 17];
    ctl_chat_apply(&t, msgs, n, gen, out, sizeof out, &len);
    ctl_chat_apply(&t, msgs, n, gen, out, 5, &len);   // too small: truncated, the length still right
    if (tok) {
        static int32_t ids[1 << 15];
        static float mask[1 << 15];
        int64_t n_ids;
        if (!ctl_chat_tokenize(tok, &t, msgs, n, gen, ids, mask, 1 << 15, &n_ids))
            for (int64_t i = 0; i < n_ids; i++)
                if (ids[i] < 0 || ids[i] >= ctl_tokenizer_vocab(tok) || (mask[i] != 0.0f && mask[i] != 1.0f)) abort();
        ctl_chat_tokenize(tok, &t, msgs, n, gen, ids, NULL, 3, &n_ids);
    }
    free(copy);
    return 0;
}
