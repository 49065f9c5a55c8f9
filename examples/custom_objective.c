// A new RL objective written outside the library and plugged into a training step: a group
// advantage plus a momentum term kept across steps, in the spirit of AAPO (Advantage
// Momentum): when every completion of a prompt scores the same, the group term is zero, and
// the momentum term (how far this group's mean reward is above the running mean of earlier
// groups) still says whether the policy is moving the right way. The loss is REINFORCE on the
// policy's own samples: -sum_i A_i sum_t logp_it / (tokens).
//
// The task is deliberately trivial so the run takes seconds: a tiny random model continues
// "a+b=" prompts with 6 characters, and the reward is the fraction of them that are '7'. The
// reward climbs from chance (1/13) as the policy learns.
//
//   make build/custom_objective && ./build/custom_objective
#define COTLAB_IMPLEMENTATION
#include "../cotlab.h"

#include <stdio.h>
#include <string.h>

#define P 4          // prompts per step
#define G 4          // completions per prompt
#define NEW 6        // new tokens per completion
#define PROMPT 4     // "a+b="
#define LEN (PROMPT + NEW)
#define STEPS 40

static const char VOCAB[] = "0123456789+=\n";

// ---- the objective: ~50 lines, the same shape as ctl_objective_grpo ----------------------------

typedef struct momentum_desc {
    const float *rewards;   // (B) one per completion; groups of G consecutive rows
    float eta;              // weight of the momentum term
    float decay;            // the running mean's decay per group
    double *running;        // state kept across steps: the running mean of group rewards
} momentum_desc;

static ctl_status momentum_objective(ctl_ctx *ctx, const ctl_logprobs *in, const momentum_desc *d,
                                     ctl_objective_out *out) {
    int64_t B = in->B, Tn = in->T;
    double tokens = 0.0, loss = 0.0, adv_sum = 0.0;
    if (B % G) return CTL_ERR_SHAPE;
    (void)ctx;
    for (int64_t i = 0; i < B * Tn; i++) tokens += in->mask[i];
    memset(out->dlogp, 0, (size_t)(B * Tn) * sizeof(float));
    out->n_metrics = 0;
    for (int64_t g0 = 0; g0 < B; g0 += G) {
        double mean = 0.0, var = 0.0;
        for (int64_t i = g0; i < g0 + G; i++) mean += d->rewards[i] / G;
        for (int64_t i = g0; i < g0 + G; i++) var += (d->rewards[i] - mean) * (d->rewards[i] - mean) / (G - 1);
        double momentum = mean - *d->running;
        *d->running = d->decay * *d->running + (1.0 - d->decay) * mean;
        for (int64_t i = g0; i < g0 + G; i++) {
            double A = (d->rewards[i] - mean) / (sqrt(var) + 1e-4) + d->eta * momentum;
            adv_sum += A;
            for (int64_t t = 0; t < Tn; t++) {
                float m = in->mask[i * Tn + t];
                if (m == 0.0f) continue;
                loss -= A * m * in->logp[i * Tn + t] / tokens;
                out->dlogp[i * Tn + t] = (float)(-A * m / tokens);
            }
        }
    }
    out->loss = loss;
    ctl_metric_set(out, "advantage_mean", adv_sum / B);
    ctl_metric_set(out, "running_reward", *d->running);
    return CTL_OK;
}

// ---- the training loop ------------------------------------------------------------------------

#define CHECK(call)                                                      \
    do {                                                                 \
        ctl_status st_ = (call);                                         \
        if (st_) {                                                       \
            fprintf(stderr, "%s: %s\n", #call, ctl_last_error(ctx));     \
            return 1;                                                    \
        }                                                                \
    } while (0)

int main(void) {
    ctl_ctx *ctx;
    ctl_model *m;
    ctl_train *t;
    ctl_infer *inf;
    ctl_ctx_desc cd = ctl_ctx_desc_default();
    if (ctl_ctx_init(&ctx, &cd) != CTL_OK) return 1;
    ctl_model_config cfg = {0};
    cfg.arch = CTL_ARCH_LLAMA, cfg.vocab_size = sizeof VOCAB - 1, cfg.n_ctx = LEN;
    cfg.n_embd = 32, cfg.n_layer = 2, cfg.n_head = 4;
    CHECK(ctl_model_create(ctx, &cfg, &m));
    ctl_model_init_random(m, 7);
    ctl_train_desc td = {0};
    td.batch = P * G, td.seq_len = LEN, td.optim.lr = 3e-3f, td.optim.clip = 1.0f;
    CHECK(ctl_train_init(m, &td, &t));
    ctl_infer_desc id = {P * G, LEN};
    CHECK(ctl_infer_init(m, &id, &inf));

    int32_t prompts[P * G][PROMPT], out[P * G * NEW], tokens[P * G * LEN], targets[P * G * LEN];
    const int32_t *pp[P * G];
    int64_t plens[P * G], olens[P * G];
    float mask[P * G * LEN], rewards[P * G];
    double running = 1.0 / 13.0;
    ctl_rng rng;
    ctl_rng_seed(&rng, 1);
    momentum_desc md = {rewards, 0.5f, 0.9f, &running};
    for (int step = 0; step < STEPS; step++) {
        for (int p = 0; p < P; p++) {   // P prompts, each G times in a row
            int a = (int)(ctl_rng_next(&rng) % 10), b = (int)(ctl_rng_next(&rng) % 10);
            for (int g = 0; g < G; g++) {
                int32_t *q = prompts[p * G + g];
                q[0] = a, q[1] = 10, q[2] = b, q[3] = 11;   // "a+b="
                pp[p * G + g] = q, plens[p * G + g] = PROMPT;
            }
        }
        ctl_sampler_desc sd = {0};
        sd.temperature = 1.0f, sd.seed = 1000 + (uint64_t)step;
        CHECK(ctl_generate(inf, P * G, pp, plens, &sd, NEW, out, olens, NULL, NULL));
        double mean_reward = 0.0;
        for (int i = 0; i < P * G; i++) {   // row i: prompt + completion; the mask covers the completion
            int sevens = 0;
            for (int k = 0; k < LEN; k++) {
                tokens[i * LEN + k] = k < PROMPT ? prompts[i][k] : k - PROMPT < olens[i] ? out[i * NEW + k - PROMPT] : 12;
                sevens += k >= PROMPT && k - PROMPT < olens[i] && tokens[i * LEN + k] == 7;
            }
            for (int k = 0; k < LEN; k++) {   // targets[k] = tokens[k + 1]: position k predicts the next token
                targets[i * LEN + k] = k + 1 < LEN ? tokens[i * LEN + k + 1] : 12;
                mask[i * LEN + k] = k + 1 >= PROMPT && k + 1 < PROMPT + olens[i] ? 1.0f : 0.0f;
            }
            rewards[i] = (float)sevens / NEW;
            mean_reward += rewards[i] / (P * G);
        }
        ctl_batch batch = {P * G, LEN, tokens, targets, NULL};
        ctl_objective_out o;
        o.dlogp = ctl_train_dlogprobs(t);
        CHECK(ctl_train_forward(t, &batch));
        ctl_logprobs in = {P * G, LEN, ctl_train_logprobs(t), mask, NULL, NULL, NULL};
        CHECK(momentum_objective(ctx, &in, &md, &o));
        CHECK(ctl_train_backward(t));
        CHECK(ctl_train_step(t, NULL));
        if (step % 5 == 0 || step == STEPS - 1)
            printf("step %2d  reward %.3f  loss %+.4f  advantage mean %+.3f  running reward %.3f\n", step, mean_reward,
                   o.loss, ctl_metric_get(&o, "advantage_mean"), ctl_metric_get(&o, "running_reward"));
    }
    ctl_infer_free(inf);
    ctl_train_free(t);
    ctl_model_free(m);
    ctl_ctx_free(ctx);
    return 0;
}
