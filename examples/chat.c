// Chat with a GGUF model in the terminal: its own tokenizer and chat template, the reply
// streamed token by token as it is sampled.
//
//   tools/get_smollm2.sh && make build/chat && ./build/chat models/SmolLM2-135M-Instruct.Q4_1.gguf
//   echo "What is 7 times 8?" | ./build/chat models/SmolLM2-135M-Instruct.Q4_1.gguf   (one turn per line)
#define COTLAB_IMPLEMENTATION
#include "../cotlab.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_LEN 2048   // tokens of conversation kept in the KV cache
#define MAX_TURNS 64

typedef struct stream {
    const ctl_tokenizer *tk;
    int32_t eos;
} stream;

// Prints each new token as soon as it is sampled.
static bool print_token(int64_t seq, int32_t token, void *user) {
    const stream *s = (const stream *)user;
    char text[256];
    size_t len;
    (void)seq;
    if (token == s->eos) return false;
    if (ctl_detokenize(s->tk, &token, 1, text, sizeof text, &len) == CTL_OK) fwrite(text, 1, len < sizeof text ? len : sizeof text - 1, stdout);
    fflush(stdout);
    return true;
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: %s model.gguf [temperature]\n", argv[0]);
        return 2;
    }
    ctl_ctx *ctx;
    ctl_gguf *g;
    ctl_model *m;
    ctl_tokenizer *tk;
    ctl_chat_template tpl;
    ctl_infer *inf;
    if (ctl_ctx_init(&ctx, NULL) != CTL_OK) return 1;
    ctl_infer_desc id = {1, MAX_LEN};
    if (ctl_gguf_open(ctx, argv[1], &g) || ctl_model_from_gguf(ctx, g, NULL, &m) || ctl_tokenizer_from_gguf(ctx, g, &tk) ||
        ctl_chat_template_from_gguf(ctx, g, &tpl) || ctl_infer_init(m, &id, &inf)) {
        fprintf(stderr, "%s\n", ctl_last_error(ctx));
        return 1;
    }
    stream s = {tk, ctl_tokenizer_eos(tk)};
    ctl_sampler_desc sd = {0};
    sd.temperature = argc > 2 ? (float)atof(argv[2]) : 0.7f;
    sd.top_p = 0.9f;
    sd.repetition_penalty = 1.1f;
    sd.stop_tokens = &s.eos;
    sd.n_stop_tokens = 1;
    sd.seed = 42;
    fprintf(stderr, "%lld weights; temperature %.2f; type a message, an empty line to quit\n",
            (long long)ctl_model_numel(m), sd.temperature);

    static char lines[MAX_TURNS][1024], answers[MAX_TURNS][4096], text[65536];
    static int32_t ids[MAX_LEN], reply[512];
    ctl_chat_msg msgs[2 * MAX_TURNS];
    int64_t n_msgs = 0;
    for (int turn = 0; turn < MAX_TURNS; turn++) {
        fprintf(stderr, "> ");
        if (!fgets(lines[turn], sizeof lines[turn], stdin) || lines[turn][0] == '\n') break;
        lines[turn][strcspn(lines[turn], "\n")] = 0;
        msgs[n_msgs].role = "user", msgs[n_msgs++].content = lines[turn];
        // The whole conversation is rendered and re-read each turn: simple, and the cache is
        // rebuilt from the template's exact tokens.
        size_t len;
        int64_t n_ids, n_out;
        ctl_chat_apply(&tpl, msgs, n_msgs, true, text, sizeof text, &len);
        if (ctl_tokenize(tk, text, len, true, ids, MAX_LEN, &n_ids) || n_ids + 512 > MAX_LEN) {
            fprintf(stderr, "the conversation no longer fits in %d tokens\n", MAX_LEN);
            break;
        }
        const int32_t *prompt = ids;
        if (ctl_generate(inf, 1, &prompt, &n_ids, &sd, 512, reply, &n_out, print_token, &s)) {
            fprintf(stderr, "%s\n", ctl_last_error(ctx));
            break;
        }
        printf("\n");
        ctl_detokenize(tk, reply, n_out, answers[turn], sizeof answers[turn] - 1, &len);
        answers[turn][len < sizeof answers[turn] - 1 ? len : sizeof answers[turn] - 1] = 0;
        msgs[n_msgs].role = "assistant", msgs[n_msgs++].content = answers[turn];
    }
    ctl_infer_free(inf);
    ctl_tokenizer_free(tk);
    ctl_model_free(m);
    ctl_gguf_close(g);
    ctl_ctx_free(ctx);
    return 0;
}
