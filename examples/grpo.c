// GRPO on a real model: a GGUF model, a JSONL file of problems with answers, the math reward.
//
//   make build/grpo && ./build/grpo models/SmolLM2-135M-Instruct.Q4_1.gguf examples/gsm8k/train.jsonl [steps]
//
// The base stays quantised as loaded; a rank-16 LoRA trains. Each step samples 8 completions
// of each of 4 problems (the prompt fed once for its 8 samples, all 32 decoding together),
// scores them (1 when the final answer is right), turns the rewards into group advantages and
// takes one optimiser step on DAPO's clipped surrogate: ctl_rl does all of it. Problems come
// from the file in a seeded order as chat prompts (ctl_batcher). At the end, the adapter is
// written for llama.cpp (--lora). Any JSONL whose examples have a prompt or question and an
// answer works: GSM8K's format, or {"prompt": ..., "answer": ...}.
#define COTLAB_IMPLEMENTATION
#include "../cotlab.h"

#include <stdio.h>
#include <stdlib.h>

enum { PROMPTS = 4, GROUP = 8, MAX_NEW = 192, SEQ_LEN = 448 };

#define CHECK(call)                                                                      \
    do {                                                                                 \
        if ((call) != CTL_OK) return fprintf(stderr, "%s\n", ctl_last_error(ctx)), 1;    \
    } while (0)

int main(int argc, char **argv) {
    if (argc < 3) return fprintf(stderr, "usage: %s model.gguf problems.jsonl [steps]\n", argv[0]), 2;
    int steps = argc > 3 ? atoi(argv[3]) : 10;
    ctl_ctx *ctx;
    ctl_gguf *g;
    ctl_model *m;
    ctl_tokenizer *tk;
    ctl_chat_template tmpl;
    ctl_dataset *ds;
    if (ctl_ctx_init(&ctx, NULL)) return 1;
    ctl_model_desc md = {true, false};   // frozen base: keep Q4_1 / Q8_0 weights as they are
    CHECK(ctl_gguf_open(ctx, argv[1], &g));
    CHECK(ctl_model_from_gguf(ctx, g, &md, &m));
    CHECK(ctl_tokenizer_from_gguf(ctx, g, &tk));
    bool chat = ctl_chat_template_from_gguf(ctx, g, &tmpl) == CTL_OK;
    CHECK(ctl_dataset_open(ctx, argv[2], NULL, &ds));

    // The policy: LoRA on every linear layer. The trainer holds micro-batches of 8 rows.
    ctl_lora_desc ld = {0};
    ld.rank = 16, ld.alpha = 32.0f;
    CHECK(ctl_lora_attach(m, &ld));
    ctl_train_desc td = {0};
    td.batch = 8, td.seq_len = SEQ_LEN, td.optim.lr = 2e-5f, td.optim.clip = 1.0f;
    ctl_train *t;
    CHECK(ctl_train_init(m, &td, &t));

    // Prompts: the problems' questions, asked as user turns of the model's chat template.
    ctl_batcher_desc bd = {0};
    bd.kind = CTL_ROWS_PROMPTS, bd.batch = PROMPTS, bd.seq_len = SEQ_LEN, bd.max_new = MAX_NEW, bd.seed = 1;
    bd.encoding.tokenizer = tk, bd.encoding.chat = chat ? &tmpl : NULL, bd.encoding.text_as_chat = true;
    ctl_batcher *prompts;
    CHECK(ctl_batcher_init(ds, &bd, &prompts));

    // The RL step: sampling at temperature 1 until the end-of-turn token, the math reward against
    // each example's answer, DAPO's loss (TRL's default) in micro-batches of 8 rows.
    int32_t eos = ctl_tokenizer_eos(tk);
    ctl_reward_func math = {"math", ctl_reward_fn_math, NULL, 1.0f, NULL};
    ctl_rl_desc rd = ctl_rl_desc_default();   // GRPO, DAPO's loss, temperature 1
    rd.prompts = PROMPTS, rd.group = GROUP, rd.max_new = MAX_NEW, rd.batch = 8;
    rd.sampler.stop_tokens = &eos, rd.sampler.n_stop_tokens = 1;
    rd.tokenizer = tk, rd.rewards = &math, rd.n_rewards = 1;
    ctl_rl *rl;
    CHECK(ctl_rl_init(t, &rd, &rl));

    for (int s = 1; s <= steps; s++) {
        ctl_rows rows;
        ctl_step_out out;
        CHECK(ctl_batcher_next(prompts, &rows));
        CHECK(ctl_rl_step(rl, rows.prompts, rows.n_prompts, 1000 + (uint64_t)s, &out));
        printf("step %2d  reward %.3f  zero-std groups %.2f  loss %+.4f  grad norm %.3f  length %.0f\n", s,
               ctl_metric_get(&out.metrics, "reward"), ctl_metric_get(&out.metrics, "frac_reward_zero_std"), out.loss,
               out.stats.grad_norm, ctl_metric_get(&out.metrics, "completions/mean_length"));
        fflush(stdout);
    }
    // One of the last step's completions, and the adapter for llama.cpp.
    const ctl_rollout *ro = ctl_rl_rollout(rl);
    printf("\na completion of the last step (reward %.0f):\n%s\n", ctl_rl_rewards(rl)[0], ro->text[0]);
    CHECK(ctl_lora_save_llamacpp(m, "build/grpo-lora.gguf"));
    printf("adapter written: build/grpo-lora.gguf (llama-cli -m %s --lora build/grpo-lora.gguf)\n", argv[1]);
    ctl_rl_free(rl), ctl_batcher_free(prompts), ctl_train_free(t), ctl_dataset_close(ds);
    ctl_tokenizer_free(tk), ctl_model_free(m), ctl_gguf_close(g), ctl_ctx_free(ctx);
    return 0;
}
