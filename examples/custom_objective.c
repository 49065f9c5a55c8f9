// A new RL objective written outside the library and plugged into the library's RL step
// (ctl_rl) in place of GRPO's loss: a group advantage plus a momentum term kept across steps,
// in the spirit of AAPO (Advantage Momentum): when every completion of a prompt scores the
// same, the group term is zero, and the momentum term (how far this group's mean reward is
// above the running mean of earlier groups) still says whether the policy is moving the right
// way. The loss is REINFORCE on the policy's own samples: -sum_i A_i sum_t logp_it / (tokens).
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
//
// ctl_rl calls it for each micro-batch with the rows' log-probs and completion mask, and in d
// their summed rewards (d->rewards) and our own state (d->user); it writes the loss and
// d loss / d log-prob, as every objective does.

typedef struct momentum_state {
    float eta;              // weight of the momentum term
    float decay;            // the running mean's decay per group
    double running;         // kept across steps: the running mean of group rewards
} momentum_state;

static ctl_status momentum_objective(ctl_ctx *ctx, const ctl_logprobs *in, const ctl_grpo_desc *d, ctl_objective_out *out) {
    momentum_state *st = (momentum_state *)d->user;
    int64_t B = in->B, Tn = in->T;
    double tokens = 0.0, loss = 0.0, adv_sum = 0.0;
    if (B % G) return ctl_fail(ctx, CTL_ERR_SHAPE, "momentum objective: %lld rows are not whole groups of %d", (long long)B, G);
    for (int64_t i = 0; i < B * Tn; i++) tokens += in->mask[i];
    memset(out->dlogp, 0, (size_t)(B * Tn) * sizeof(float));
    out->n_metrics = 0;
    for (int64_t g0 = 0; g0 < B; g0 += G) {
        double mean = 0.0, var = 0.0;
        for (int64_t i = g0; i < g0 + G; i++) mean += d->rewards[i] / G;
        for (int64_t i = g0; i < g0 + G; i++) var += (d->rewards[i] - mean) * (d->rewards[i] - mean) / (G - 1);
        double momentum = mean - st->running;
        st->running = st->decay * st->running + (1.0 - st->decay) * mean;
        for (int64_t i = g0; i < g0 + G; i++) {
            double A = (d->rewards[i] - mean) / (sqrt(var) + 1e-4) + st->eta * momentum;
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
    ctl_metric_set(out, "running_reward", st->running);
    return CTL_OK;
}

// ---- the reward and the training loop ----------------------------------------------------------

// The fraction of the completion's tokens that are '7'.
static float reward_sevens(const ctl_reward_input *in, void *user) {
    (void)user;
    int sevens = 0;
    for (int64_t i = 0; i < in->n_tokens; i++) sevens += in->tokens[i] == 7;
    return (float)sevens / NEW;
}

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

    // The RL step with our objective in place of GRPO's: P prompts x G samples of NEW tokens at
    // temperature 1, the reward above, then one optimiser step on momentum_objective.
    momentum_state ms = {0.5f, 0.9f, 1.0 / 13.0};
    ctl_reward_func sevens = {"sevens", reward_sevens, NULL, 1.0f, NULL};
    ctl_rl_desc rd = {0};
    rd.method = CTL_RL_GRPO, rd.prompts = P, rd.group = G, rd.max_new = NEW;
    rd.sampler.temperature = 1.0f, rd.rewards = &sevens, rd.n_rewards = 1;
    rd.objective = momentum_objective, rd.grpo.user = &ms;
    ctl_rl *rl;
    CHECK(ctl_rl_init(t, &rd, &rl));

    int32_t prompts[P][PROMPT];
    ctl_rl_prompt rp[P];
    ctl_rng rng;
    ctl_rng_seed(&rng, 1);
    for (int step = 0; step < STEPS; step++) {
        for (int p = 0; p < P; p++) {   // "a+b="
            prompts[p][0] = (int32_t)(ctl_rng_next(&rng) % 10), prompts[p][1] = 10;
            prompts[p][2] = (int32_t)(ctl_rng_next(&rng) % 10), prompts[p][3] = 11;
            rp[p].tokens = prompts[p], rp[p].n = PROMPT, rp[p].example = NULL;
        }
        ctl_step_out out;
        CHECK(ctl_rl_step(rl, rp, P, 1000 + (uint64_t)step, &out));
        if (step % 5 == 0 || step == STEPS - 1)
            printf("step %2d  reward %.3f  loss %+.4f  advantage mean %+.3f  running reward %.3f\n", step,
                   ctl_metric_get(&out.metrics, "reward"), out.loss, ctl_metric_get(&out.metrics, "advantage_mean"),
                   ctl_metric_get(&out.metrics, "running_reward"));
    }
    ctl_rl_free(rl);
    ctl_train_free(t);
    ctl_model_free(m);
    ctl_ctx_free(ctx);
    return 0;
}
