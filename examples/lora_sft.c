// LoRA fine-tuning of a real model on a few chat examples, then the adapter handed to llama.cpp.
//
//   tools/get_smollm2.sh && make build/lora_sft && ./build/lora_sft models/SmolLM2-135M-Instruct.Q4_1.gguf [steps]
//
// The base stays Q4_1 as loaded (frozen; products dequantise on the fly); a rank-16 LoRA on every
// linear layer trains on the assistant's answers only (the prompt tokens weigh 0). Afterwards:
//   llama-cli -m models/SmolLM2-135M-Instruct.Q4_1.gguf --lora build/lora_sft.gguf
// and build/lora_sft_peft/ loads in Hugging Face PEFT.
#define COTLAB_IMPLEMENTATION
#include "../cotlab.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char *const QA[][2] = {   // the behaviour to teach: answer, then "#### n"
    {"What is 17 plus 25?", "17 + 25 = 42.\n#### 42"},
    {"What is 9 times 8?", "9 * 8 = 72.\n#### 72"},
    {"What is 100 minus 37?", "100 - 37 = 63.\n#### 63"},
    {"What is 144 divided by 12?", "144 / 12 = 12.\n#### 12"},
};
enum { N_QA = 4, T = 64 };

#define CHECK(call)                                                                      \
    do {                                                                                 \
        if ((call) != CTL_OK) return fprintf(stderr, "%s\n", ctl_last_error(ctx)), 1;    \
    } while (0)

int main(int argc, char **argv) {
    if (argc < 2) return fprintf(stderr, "usage: %s model.gguf [steps]\n", argv[0]), 2;
    int steps = argc > 2 ? atoi(argv[2]) : 30;
    ctl_ctx *ctx;
    ctl_gguf *g;
    ctl_model *m;
    ctl_tokenizer *tk;
    ctl_chat_template tpl;
    if (ctl_ctx_init(&ctx, NULL)) return 1;
    ctl_model_desc md = {true, false};   // keep Q4_1 / Q8_0 weights as they are
    CHECK(ctl_gguf_open(ctx, argv[1], &g));
    CHECK(ctl_model_from_gguf(ctx, g, &md, &m));
    CHECK(ctl_tokenizer_from_gguf(ctx, g, &tk));
    CHECK(ctl_chat_template_from_gguf(ctx, g, &tpl));

    // One row per example: the conversation's tokens, targets shifted by one, weight 1 on the answer.
    static int32_t tokens[N_QA * T], targets[N_QA * T];
    static float weights[N_QA * T];
    for (int i = 0; i < N_QA; i++) {
        ctl_chat_msg msgs[2] = {{"user", QA[i][0]}, {"assistant", QA[i][1]}};
        char prompt[1024], full[1024];
        size_t pl, fl;
        int64_t np, nf;
        int32_t ids[T + 1];
        ctl_chat_apply(&tpl, msgs, 1, true, prompt, sizeof prompt, &pl);
        ctl_chat_apply(&tpl, msgs, 2, false, full, sizeof full, &fl);
        CHECK(ctl_tokenize(tk, prompt, pl, true, ids, T + 1, &np));
        CHECK(ctl_tokenize(tk, full, fl, true, ids, T + 1, &nf));
        for (int64_t t = 0; t < T; t++) {   // padding past the end repeats the last token, weight 0
            int64_t a = t < nf - 1 ? t : nf - 2;
            tokens[i * T + t] = ids[a], targets[i * T + t] = ids[a + 1];
            weights[i * T + t] = t >= np - 1 && t < nf - 1 ? 1.0f : 0.0f;
        }
    }

    ctl_lora_desc ld = {0};
    ld.rank = 16, ld.alpha = 32.0f;   // every linear layer (targets 0)
    CHECK(ctl_lora_attach(m, &ld));
    ctl_train_desc td = {0};
    td.batch = N_QA, td.seq_len = T;
    td.optim.lr = 2e-3f, td.optim.warmup = 3, td.optim.total_steps = steps, td.optim.clip = 1.0f;
    ctl_memory_plan plan;
    CHECK(ctl_train_plan_model(m, &td, &plan));
    ctl_train *t;
    CHECK(ctl_train_init(m, &td, &t));
    int64_t trainable = 0;
    for (int64_t i = 0; i < ctl_model_param_count(m); i++)
        if (ctl_model_param(m, i)->trainable) trainable += ctl_tensor_numel(&ctl_model_param(m, i)->value);
    printf("%lld adapter weights train on a frozen %s base of %lld; %.0f MB in all\n", (long long)trainable,
           ctl_dtype_name(ctl_model_find(m, "blk.0.attn_q.weight")->value.dtype), (long long)ctl_model_numel(m), plan.total / 1e6);

    ctl_batch b = {N_QA, T, tokens, targets, weights};
    for (int s = 1; s <= steps; s++) {
        float loss;
        ctl_step_stats st;
        CHECK(ctl_train_forward(t, &b));
        CHECK(ctl_cross_entropy(ctx, N_QA * T, ctl_train_logprobs(t), weights, ctl_train_dlogprobs(t), &loss));
        CHECK(ctl_train_backward(t));
        CHECK(ctl_train_step(t, &st));
        if (s == 1 || s % 5 == 0 || s == steps) printf("step %3d  loss %.4f  lr %.2e\n", s, loss, st.lr);
    }

    // Ask a new question with the adapter on, greedily.
    ctl_chat_msg q = {"user", "What is 23 plus 19?"};
    char text[512];
    size_t len;
    int32_t prompt[128], out[32];
    int64_t n, out_len;
    ctl_chat_apply(&tpl, &q, 1, true, text, sizeof text, &len);
    CHECK(ctl_tokenize(tk, text, len, true, prompt, 128, &n));
    ctl_infer *f;
    ctl_infer_desc id = {1, 256};
    int32_t stop = ctl_tokenizer_eos(tk);
    ctl_sampler_desc sd = {0};
    sd.stop_tokens = &stop, sd.n_stop_tokens = 1;
    const int32_t *prompts[1] = {prompt};
    CHECK(ctl_infer_init(m, &id, &f));
    CHECK(ctl_generate(f, 1, prompts, &n, &sd, 32, out, &out_len, NULL, NULL));
    CHECK(ctl_detokenize(tk, out, out_len, text, sizeof text, &len));
    printf("Q: %s\nA: %.*s\n", q.content, (int)len, text);

    CHECK(ctl_lora_save_llamacpp(m, "build/lora_sft.gguf"));
    CHECK(ctl_lora_save_peft(m, "build/lora_sft_peft"));
    printf("adapter written: build/lora_sft.gguf (llama.cpp --lora), build/lora_sft_peft/ (PEFT)\n");
    ctl_infer_free(f), ctl_train_free(t), ctl_tokenizer_free(tk), ctl_model_free(m), ctl_gguf_close(g), ctl_ctx_free(ctx);
    return 0;
}
