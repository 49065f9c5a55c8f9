// Train a tiny character-level llama-family model from scratch on text it writes itself: the
// single-digit addition table in shuffled order ("7+5=12"). It prints the falling loss, then
// asks the model every sum greedily and samples a few lines with a temperature. The loss cannot
// fall below about 0.71 nats per character: a and b are random digits (2 ln 10 per ~6.45 chars).
//
//   make build/train_tiny && ./build/train_tiny
#define COTLAB_IMPLEMENTATION
#include "../cotlab.h"

#include <stdio.h>
#include <string.h>

#define B 16          // sequences per batch
#define T 48          // characters per sequence
#define STEPS 600
#define TEXT_LEN 60000

static const char VOCAB[] = "0123456789+=\n";   // token id = position in this string

static int32_t encode(char ch) { return (int32_t)(strchr(VOCAB, ch) - VOCAB); }

// The training text: random lines "a+b=c\n" with a, b in 0..9.
static void write_text(int32_t *text, ctl_rng *rng) {
    int n = 0;
    while (n < TEXT_LEN - 8) {
        int a = (int)(ctl_rng_next(rng) % 10), b = (int)(ctl_rng_next(rng) % 10);
        char line[16];
        int len = snprintf(line, sizeof line, "%d+%d=%d\n", a, b, a + b);
        for (int i = 0; i < len; i++) text[n++] = encode(line[i]);
    }
    while (n < TEXT_LEN) text[n++] = encode('\n');
}

// Continues `len` tokens in seq (one row of B) until a newline or the row is full; temperature
// 0 is greedy. There is no KV cache here: each new token re-runs the whole prefix.
static int complete(ctl_train *t, int32_t *seq, int len, float temperature, ctl_rng *rng) {
    float logits[sizeof VOCAB - 1];
    while (len < T) {
        ctl_batch b = {1, len, seq, seq, NULL};   // targets are not used for sampling
        if (ctl_train_forward(t, &b) || ctl_train_logits(t, 0, len - 1, logits)) return len;
        seq[len] = ctl_sample_token(logits, sizeof VOCAB - 1, temperature, rng);
        if (seq[len++] == encode('\n')) break;
    }
    return len;
}

int main(void) {
    ctl_ctx *ctx;
    ctl_model *m;
    ctl_train *t;
    ctl_rng rng;
    ctl_rng_seed(&rng, 42);

    ctl_ctx_desc cd = ctl_ctx_desc_default();
    if (ctl_ctx_init(&ctx, &cd) != CTL_OK) return 1;
    ctl_model_config cfg = {0};
    cfg.arch = CTL_ARCH_LLAMA;
    cfg.vocab_size = sizeof VOCAB - 1;
    cfg.n_ctx = T;
    cfg.n_embd = 64;
    cfg.n_layer = 2;
    cfg.n_head = 4;
    ctl_train_desc td = {0};
    td.batch = B;
    td.seq_len = T;
    td.optim.lr = 3e-3f;
    td.optim.warmup = 30;
    td.optim.total_steps = STEPS;
    td.optim.min_lr_ratio = 0.1f;
    td.optim.weight_decay = 0.01f;
    td.optim.clip = 1.0f;
    if (ctl_model_create(ctx, &cfg, &m) || ctl_train_init(m, &td, &t)) {
        fprintf(stderr, "%s\n", ctl_last_error(ctx));
        return 1;
    }
    ctl_model_init_random(m, 1);
    ctl_memory_plan plan;
    ctl_train_memory(t, &plan);
    printf("llama-style model: %lld weights, %d threads, %s kernels, %.1f MB in all\n",
           (long long)ctl_model_numel(m), ctl_ctx_threads(ctx), ctl_ctx_simd_name(ctx), plan.total / 1e6);

    static int32_t text[TEXT_LEN], tokens[B * T], targets[B * T];
    write_text(text, &rng);
    for (int step = 1; step <= STEPS; step++) {
        for (int b = 0; b < B; b++) {   // B random windows of the text
            int start = (int)(ctl_rng_next(&rng) % (TEXT_LEN - T - 1));
            memcpy(tokens + b * T, text + start, T * sizeof(int32_t));
            memcpy(targets + b * T, text + start + 1, T * sizeof(int32_t));
        }
        ctl_batch batch = {B, T, tokens, targets, NULL};
        float loss;
        ctl_step_stats st;
        if (ctl_train_forward(t, &batch) ||
            ctl_cross_entropy(ctx, B * T, ctl_train_logprobs(t), NULL, ctl_train_dlogprobs(t), &loss) ||
            ctl_train_backward(t) || ctl_train_step(t, &st)) {
            fprintf(stderr, "step %d: %s\n", step, ctl_last_error(ctx));
            return 1;
        }
        if (step == 1 || step % 50 == 0)
            printf("step %4d  loss %.4f  lr %.2e  grad norm %.3f\n", step, loss, st.lr, st.grad_norm);
    }

    // Every sum, greedily: the model sees "\na+b=" and writes the rest of the line.
    int correct = 0;
    for (int a = 0; a < 10; a++)
        for (int b = 0; b < 10; b++) {
            char prompt[16], want[8], got[T + 1] = {0};
            int32_t seq[T];
            int len = snprintf(prompt, sizeof prompt, "\n%d+%d=", a, b), n;
            snprintf(want, sizeof want, "%d\n", a + b);
            for (int i = 0; i < len; i++) seq[i] = encode(prompt[i]);
            n = complete(t, seq, len, 0.0f, &rng);
            for (int i = len; i < n; i++) got[i - len] = VOCAB[seq[i]];
            correct += !strcmp(got, want);
            if (a == b) printf("  %d+%d=%s", a, b, got[0] ? got : "?\n");
        }
    printf("greedy: %d of 100 sums right\n", correct);

    printf("sampled at temperature 0.8:\n");
    for (int i = 0; i < 4; i++) {
        int32_t seq[T] = {encode('\n')};
        int n = complete(t, seq, 1, 0.8f, &rng);
        printf("  ");
        for (int j = 1; j < n; j++) putchar(VOCAB[seq[j]]);
    }
    ctl_train_free(t);
    ctl_model_free(m);
    ctl_ctx_free(ctx);
    return 0;
}
