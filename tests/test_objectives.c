// Objectives (included by tests/test.c, which holds the harness).
//
//   vs TRL         every case of tests/fixtures/objectives.bin (tools/make_objective_fixtures.py,
//                  TRL 1.16.0's own loss code in float64): loss and d loss / d log-prob within
//                  1e-6 relative, every metric TRL logs equal (to 1e-6)
//   end to end     one GRPO step and one DPO step on a tiny model: parameter gradients by
//                  directional finite differences through objective -> LM head -> transformer,
//                  at a sampling temperature, with reference log-probs from the adapters off
//   bad input      empty completions, all-masked rows, groups of one, equal rewards, NaN
//                  rewards, chosen == rejected, NaN log-probs

static char *dup_str(const char *s) {
    char *d = (char *)malloc(strlen(s) + 1);
    return strcpy(d, s);
}

// "key=value" words of a case's opts; NAN (or "") when absent.
static double opt_num(const char *opts, const char *key) {
    char pat[40];
    snprintf(pat, sizeof pat, "%s=", key);
    for (const char *p = opts; (p = strstr(p, pat)); p++)
        if (p == opts || p[-1] == ' ') return atof(p + strlen(pat));
    return NAN;
}

static void opt_str(const char *opts, const char *key, char *out, size_t cap) {
    char pat[40];
    snprintf(pat, sizeof pat, "%s=", key);
    out[0] = 0;
    for (const char *p = opts; (p = strstr(p, pat)); p++)
        if (p == opts || p[-1] == ' ') {
            p += strlen(pat);
            size_t n = strcspn(p, " ");
            snprintf(out, cap, "%.*s", (int)CTL__MIN(n, cap - 1), p);
            return;
        }
}

// A case's record as text (NUL-terminated by fx_load's extra byte).
static const char *fx_text(fixture *fx, const char *name) {
    fx_rec *r = fx_get(fx, name);
    if (!r) return "";
    ((char *)r->data)[r->numel] = 0;
    return (const char *)r->data;
}

// Compares loss, gradient and metrics of one case; returns the worst relative error.
static double check_objective_case(fixture *fx, const char *pre, const ctl_objective_out *out, int64_t n) {
    char name[128];
    snprintf(name, sizeof name, "%sloss", pre);
    double want = fx_f(fx, name)[0], worst = fabs(out->loss - want) / fmax(fabs(want), 1e-2);
    snprintf(name, sizeof name, "%sdlogp", pre);
    if (fx_get(fx, name)) {
        const float *g = fx_f(fx, name);
        double num = 0.0, den = 0.0;
        for (int64_t i = 0; i < n; i++) num += pow(out->dlogp[i] - (double)g[i], 2), den += (double)g[i] * g[i];
        worst = fmax(worst, sqrt(num) / fmax(sqrt(den), 1e-12));
    }
    snprintf(name, sizeof name, "%smetric_names", pre);
    char *names = dup_str(fx_text(fx, name));
    snprintf(name, sizeof name, "%smetric_values", pre);
    const float *vals = fx_f(fx, name);
    int k = 0;
    for (char *s = names, *e; s && *s; s = e ? e + 1 : NULL, k++) {
        e = strchr(s, '\n');
        if (e) *e = 0;
        double got = ctl_metric_get(out, s), v = vals[k];
        bool ok = (isnan(got) && isnan(v)) || fabs(got - v) <= 1e-6 * fmax(1.0, fabs(v));
        CHECK(ok, "%s metric %s: %.9g, TRL %.9g", pre, s, got, v);
    }
    free(names);
    return worst;
}

static void test_objectives_vs_trl(void) {
    fixture fx;
    if (!fx_load("objectives.bin", &fx)) {
        CHECK(false, "objectives.bin missing (make fixtures)");
        return;
    }
    ctl_ctx *ctx = make_ctx(1, CTL_SIMD_AUTO);
    static const char *const fams[4] = {"grpo", "dpo", "sft", "adv"};
    for (int f = 0; f < 4; f++) {
        char name[128], pre[64], s[32];
        snprintf(name, sizeof name, "%s.count", fams[f]);
        int count = fx_get(&fx, name) ? *(const int32_t *)fx_get(&fx, name)->data : 0;
        double worst = 0.0;
        for (int c = 0; c < count; c++) {
            snprintf(pre, sizeof pre, "%s.%d.", fams[f], c);
#define FX(field) (snprintf(name, sizeof name, "%s%s", pre, field), fx_get(&fx, name) ? fx_f(&fx, name) : NULL)
            const char *opts = (snprintf(name, sizeof name, "%sopts", pre), dup_str(fx_text(&fx, name)));
            ctl_objective_out out;
            memset(&out, 0, sizeof out);
            ctl_status st;
            int64_t n = 0;
            if (f == 3) {   // advantages
                fx_rec *r = (snprintf(name, sizeof name, "%srewards", pre), fx_get(&fx, name));
                int64_t K = (int64_t)opt_num(opts, "K"), rows = r->shape[0];
                const char *fnames[3] = {"f0", "f1", "f2"};
                ctl_advantage_desc d;
                memset(&d, 0, sizeof d);
                opt_str(opts, "kind", s, sizeof s);
                d.kind = !strcmp(s, "rloo") ? CTL_ADV_RLOO : CTL_ADV_GRPO;
                opt_str(opts, "scale", s, sizeof s);
                d.scale = !strcmp(s, "batch") ? CTL_SCALE_BATCH : !strcmp(s, "none") ? CTL_SCALE_NONE : CTL_SCALE_GROUP;
                d.group_size = (int64_t)opt_num(opts, "G"), d.n_funcs = K, d.weights = FX("weights"), d.names = fnames;
                float *adv = (float *)malloc(rows * sizeof(float));
                st = ctl_advantages(ctx, &d, rows, (const float *)r->data, adv, &out);
                CHECK(st == CTL_OK, "%s: %s", pre, ctl_last_error(ctx));
                const float *want = FX("advantages");
                double e = 0.0;
                for (int64_t i = 0; i < rows; i++) e = fmax(e, fabs(adv[i] - want[i]) / fmax(1.0, fabs(want[i])));
                CHECK(e <= 1e-6, "%s (%s): advantages rel err %.3g", pre, opts, e);
                worst = fmax(worst, e);
                int k = 0;
                char *names = dup_str((snprintf(name, sizeof name, "%smetric_names", pre), fx_text(&fx, name)));
                const float *vals = FX("metric_values");
                for (char *p = names, *e2; p && *p; p = e2 ? e2 + 1 : NULL, k++) {
                    e2 = strchr(p, '\n');
                    if (e2) *e2 = 0;
                    double got = ctl_metric_get(&out, p);
                    CHECK((isnan(got) && isnan(vals[k])) || fabs(got - vals[k]) <= 1e-6 * fmax(1.0, fabs(vals[k])),
                          "%s metric %s: %.9g, TRL %.9g", pre, p, got, (double)vals[k]);
                }
                free(names), free(adv), free((void *)opts);
                continue;
            }
            fx_rec *lr = (snprintf(name, sizeof name, "%slogp", pre), fx_get(&fx, name));
            ctl_logprobs in;
            memset(&in, 0, sizeof in);
            in.B = lr->shape[0], in.T = lr->shape[1], n = in.B * in.T;
            in.logp = (const float *)lr->data, in.mask = FX("mask"), in.entropy = FX("entropy");
            out.dlogp = (float *)malloc(n * sizeof(float));
            // Masked-out log-probs are never read: make them NaN to prove it.
            float *lp = (float *)malloc(n * sizeof(float));
            for (int64_t i = 0; i < n; i++) lp[i] = in.mask[i] == 0.0f ? NAN : in.logp[i];
            in.logp = lp;
            if (f == 0) {
                ctl_grpo_desc d;
                memset(&d, 0, sizeof d);
                opt_str(opts, "loss", s, sizeof s);
                d.loss = !strcmp(s, "grpo") ? CTL_GRPO_GRPO : !strcmp(s, "bnpo") ? CTL_GRPO_BNPO
                         : !strcmp(s, "dr_grpo") ? CTL_GRPO_DR_GRPO : CTL_GRPO_DAPO;
                opt_str(opts, "level", s, sizeof s);
                d.sequence_level = !strcmp(s, "sequence");
                d.beta = (float)opt_num(opts, "beta"), d.epsilon = (float)opt_num(opts, "eps");
                d.epsilon_high = (float)opt_num(opts, "eps_high"), d.delta = (float)opt_num(opts, "delta");
                d.accum = (int64_t)opt_num(opts, "accum"), d.steps_per_generation = (int64_t)opt_num(opts, "spg");
                d.gen_tokens = opt_num(opts, "gen_tokens"), d.max_completion_length = (int64_t)opt_num(opts, "max_len");
                d.advantages = FX("adv");
                const float *tr = FX("trunc");
                uint8_t trunc[16];
                for (int64_t b = 0; b < in.B; b++) trunc[b] = tr[b] != 0.0f;
                d.truncated = trunc;
                in.old_logp = FX("old");
                in.ref_logp = d.beta != 0.0f ? FX("ref") : NULL;
                st = ctl_objective_grpo(ctx, &in, &d, &out);
            } else if (f == 1) {
                ctl_dpo_desc d;
                memset(&d, 0, sizeof d);
                opt_str(opts, "loss", s, sizeof s);
                static const char *const kinds[] = {"sigmoid", "ipo", "hinge", "robust", "exo_pair", "nca_pair", "bco_pair",
                                                    "sppo_hard", "apo_zero", "apo_down", "sigmoid_norm", "simpo", "orpo"};
                d.loss = CTL_DPO_SIGMOID;
                for (int k = 0; k < 13; k++)
                    if (!strcmp(s, kinds[k])) d.loss = (ctl_dpo_loss)k;
                d.beta = (float)opt_num(opts, "beta"), d.label_smoothing = (float)opt_num(opts, "eps");
                d.rpo_alpha = (float)opt_num(opts, "rpo"), d.accum = (int64_t)opt_num(opts, "accum");
                if (d.loss == CTL_DPO_SIMPO) d.simpo_gamma = (float)opt_num(opts, "gamma");
                if (opt_num(opts, "ref_seq") == 1.0) d.ref_seq = FX("ref_seq");
                else in.ref_logp = FX("ref");
                st = ctl_objective_dpo(ctx, &in, &d, &out);
            } else {
                ctl_sft_desc d;
                memset(&d, 0, sizeof d);
                opt_str(opts, "norm", s, sizeof s);
                d.norm = !strcmp(s, "sequences") ? CTL_SFT_SEQUENCES : CTL_SFT_TOKENS;
                d.accum = (int64_t)opt_num(opts, "accum"), d.step_tokens = opt_num(opts, "step_tokens");
                st = ctl_objective_sft(ctx, &in, &d, &out);
            }
#undef FX
            CHECK(st == CTL_OK, "%s (%s): %s", pre, opts, ctl_last_error(ctx));
            double e = st == CTL_OK ? check_objective_case(&fx, pre, &out, n) : 1.0;
            CHECK(e <= 1e-6, "%s (%s): loss/gradient rel err %.3g", pre, opts, e);
            worst = fmax(worst, e);
            free(out.dlogp), free(lp), free((void *)opts);
        }
        CHECK(count > 0, "%s: no cases in the fixture", fams[f]);
        printf("    %-4s %2d cases vs TRL: worst rel err %.2e\n", fams[f], count, worst);
    }
    ctl_ctx_free(ctx);
    fx_free(&fx);
}

// ---- end to end: objective -> LM head -> transformer ------------------------------------------

// What one evaluation of an objective on the model needs, for finite differences.
typedef struct e2e {
    ctl_ctx *ctx;
    ctl_model *m;
    ctl_train *t;
    ctl_batch b;
    const float *mask, *old, *adv;
    float ref[4 * 10];
    bool dpo;
} e2e;

// The objective's loss at the model's current weights (its dlogp left in the trainer). The
// reference log-probs come from the same model with its adapters off.
static double e2e_loss(e2e *e) {
    ctl_train *t = e->t;
    int64_t n = e->b.B * e->b.T;
    t->n_micro = 0;
    (void)n;
    if (ctl_train_reference(t, &e->b, e->ref) || ctl_train_forward(t, &e->b)) return NAN;
    ctl_logprobs in = {e->b.B, e->b.T, ctl_train_logprobs(t), e->mask, e->old, e->ref, ctl_train_entropy(t)};
    ctl_objective_out out;
    out.dlogp = ctl_train_dlogprobs(t);
    ctl_status st;
    if (e->dpo) {
        ctl_dpo_desc d;
        memset(&d, 0, sizeof d);
        d.beta = 0.5f, d.rpo_alpha = 0.5f;
        st = ctl_objective_dpo(e->ctx, &in, &d, &out);
    } else {
        ctl_grpo_desc d;
        memset(&d, 0, sizeof d);
        d.advantages = e->adv, d.beta = 0.04f, d.epsilon_high = 0.28f;
        st = ctl_objective_grpo(e->ctx, &in, &d, &out);
    }
    return st ? NAN : out.loss;
}

static void test_objectives_end_to_end(void) {
    for (int kind = 0; kind < 2; kind++) {
        const char *label = kind ? "DPO" : "GRPO";
        ctl_ctx *ctx = make_ctx(2, CTL_SIMD_AUTO);
        ctl_model_config cfg = tiny_config(CTL_ARCH_LLAMA);
        ctl_model *m;
        ctl_model_create(ctx, &cfg, &m);
        ctl_model_init_random(m, 21);
        scale_weights(m, 2.0f);
        ctl_lora_desc ld;
        memset(&ld, 0, sizeof ld);
        ld.rank = 3, ld.alpha = 6.0f, ld.seed = 5;
        CHECK(ctl_lora_attach(m, &ld) == CTL_OK, "lora: %s", ctl_last_error(ctx));
        randomize_adapters(m, 0.05f);
        int32_t tok[4 * 10], tgt[4 * 10];
        float mask[4 * 10], old[4 * 10], adv[4] = {1.2f, -0.7f, 0.4f, -1.1f};
        make_batch(4, 10, cfg.vocab_size, tok, tgt, mask, 31 + kind);
        for (int i = 0; i < 40; i++) mask[i] = i % 10 >= 2 + i / 10 && i % 10 < 9 ? 1.0f : 0.0f;   // ragged completions
        ctl_train_desc td;
        memset(&td, 0, sizeof td);
        td.batch = 4, td.seq_len = 10, td.entropy = true;
        ctl_train *t;
        CHECK(ctl_train_init(m, &td, &t) == CTL_OK, "train_init: %s", ctl_last_error(ctx));
        e2e e;
        memset(&e, 0, sizeof e);
        e.ctx = ctx, e.m = m, e.t = t, e.mask = mask, e.adv = adv, e.dpo = kind == 1;
        e.b.B = 4, e.b.T = 10, e.b.tokens = tok, e.b.targets = tgt, e.b.weights = NULL;
        if (!kind) {   // GRPO at the sampling temperature, slightly off-policy (inside the clip range)
            ctl_train_set_temperature(t, 0.7f);
            ctl_train_forward(t, &e.b);
            for (int i = 0; i < 40; i++) old[i] = ctl_train_logprobs(t)[i] + 0.1f * (ctl_rng_uniform(&g_rng) - 0.5f);
            e.old = old;
        }
        double L = e2e_loss(&e);
        if (!kind) {   // the reference is the base: equal to a forward of the model with its adapters off
            float base[40];
            ctl_adapters_enable(m, false);
            ctl_train_forward(t, &e.b);
            memcpy(base, ctl_train_logprobs(t), sizeof base);
            ctl_adapters_enable(m, true);
            L = e2e_loss(&e);
            CHECK(!memcmp(base, e.ref, sizeof base) && memcmp(base, ctl_train_logprobs(t), sizeof base),
                  "ctl_train_reference: the adapters-off log-probs, and not the policy's");
        }
        CHECK(isfinite(L) && ctl_train_backward(t) == CTL_OK, "%s: loss %g: %s", label, L, ctl_last_error(ctx));
        // The backward's gradients against central differences along a direction per tensor.
        double worst = 0.0;
        int checked = 0;
        for (int64_t i = 0; i < ctl_model_param_count(m); i++) {
            ctl_param *p = ctl_model_param(m, i);
            if (!p->trainable) continue;
            int64_t n = ctl_tensor_numel(&p->value);
            float *x = (float *)p->value.data, *g = ctl_train_grad(t, i), *dir = rand_f(n, 1.0f), *keep = (float *)malloc(n * 4);
            double gd = 0.0, Ls[4], h = 2e-3, gn = 0.0, rn = 0.0, dn = 0.0;
            memcpy(keep, x, n * 4);
            for (int64_t j = 0; j < n; j++) gn += (double)g[j] * g[j], rn += (double)dir[j] * dir[j];
            for (int64_t j = 0; j < n; j++) dir[j] = (float)((gn > 0 ? g[j] / sqrt(gn) : 0.0) + dir[j] / sqrt(rn)), dn += (double)dir[j] * dir[j];
            for (int64_t j = 0; j < n; j++) dir[j] = (float)(dir[j] / sqrt(dn)), gd += (double)g[j] * dir[j];   // unit length
            for (int side = 0; side < 4; side++) {
                double step = (side & 1 ? -h : h) / (side < 2 ? 1.0 : 2.0);
                for (int64_t j = 0; j < n; j++) x[j] = keep[j] + (float)(step * dir[j]);
                Ls[side] = e2e_loss(&e);
            }
            memcpy(x, keep, n * 4);
            double fd1 = (Ls[0] - Ls[1]) / (2.0 * h), fd2 = (Ls[2] - Ls[3]) / h, fd = (4.0 * fd2 - fd1) / 3.0;
            double noise = 12.0 * 1.2e-7 * fmax(fabs(L), 1.0) / h, err = fabs(fd - gd);
            CHECK(err <= 3e-3 * fabs(gd) + noise, "%s %s: directional derivative %g, finite differences %g", label, p->name, gd, fd);
            if (fabs(gd) > 10.0 * noise) worst = fmax(worst, err / fabs(gd)), checked++;
            free(dir), free(keep);
        }
        CHECK(checked >= 8, "%s: only %d tensors had a resolvable derivative", label, checked);
        printf("    %s step: %d adapter tensors, worst rel err %.2e\n", label, checked, worst);
        ctl_train_free(t);
        ctl_model_free(m);
        ctl_ctx_free(ctx);
    }
}

// The forward at a temperature: log-probs and entropies against a double log-softmax of the
// logits / temperature; the backward uses the same temperature (checked end to end above).
static void test_temperature_entropy(void) {
    ctl_simd paths[2] = {CTL_SIMD_AUTO, CTL_SIMD_SCALAR};
    for (int s = 0; s < 2; s++) {
        ctl_ctx *ctx = make_ctx(1, paths[s]);
        ctl_model_config cfg = tiny_config(CTL_ARCH_GPT2);
        cfg.vocab_size = 37;   // not a multiple of 8
        ctl_model *m;
        ctl_model_create(ctx, &cfg, &m);
        ctl_model_init_random(m, 8);
        scale_weights(m, 6.0f);
        int32_t tok[2 * 7], tgt[2 * 7];
        make_batch(2, 7, cfg.vocab_size, tok, tgt, NULL, 3);
        ctl_train_desc td;
        memset(&td, 0, sizeof td);
        td.batch = 2, td.seq_len = 7, td.entropy = true;
        ctl_train *t;
        ctl_train_init(m, &td, &t);
        ctl_batch b = {2, 7, tok, tgt, NULL};
        double worst = 0.0;
        float temps[3] = {1.0f, 0.7f, 1.6f}, z[37];
        for (int k = 0; k < 3; k++) {
            CHECK(ctl_train_set_temperature(t, temps[k]) == CTL_OK && ctl_train_forward(t, &b) == CTL_OK, "forward");
            for (int64_t r = 0; r < 14; r++) {
                ctl_train_logits(t, r / 7, r % 7, z);
                double mx = -INFINITY, sum = 0.0, h = 0.0;
                for (int v = 0; v < 37; v++) mx = fmax(mx, z[v] / (double)temps[k]);
                for (int v = 0; v < 37; v++) sum += exp(z[v] / (double)temps[k] - mx);
                double lse = mx + log(sum);
                for (int v = 0; v < 37; v++) {
                    double lp = z[v] / (double)temps[k] - lse;
                    h -= exp(lp) * lp;
                }
                double lp = z[tgt[r]] / (double)temps[k] - lse;
                worst = fmax(worst, fabs(ctl_train_logprobs(t)[r] - lp) / fmax(1.0, fabs(lp)));
                worst = fmax(worst, fabs(ctl_train_entropy(t)[r] - h) / fmax(1.0, h));
            }
        }
        CHECK(worst < 2e-6, "%s: log-probs and entropies at a temperature vs double: %g", ctl_ctx_simd_name(ctx), worst);
        float ref[14];
        CHECK(ctl_train_reference(t, &b, ref) == CTL_ERR_INVALID, "no adapters: no reference to switch to");
        CHECK(ctl_train_set_temperature(t, 0.0f) == CTL_ERR_RANGE && ctl_train_set_temperature(t, NAN) == CTL_ERR_RANGE,
              "temperature 0 and NaN refused");
        ctl_train_free(t);
        ctl_model_free(m);
        ctl_ctx_free(ctx);
    }
}

// ---- bad input: defined behaviour ---------------------------------------------------------------

static bool all_zero(const float *x, int64_t n) {
    for (int64_t i = 0; i < n; i++)
        if (x[i] != 0.0f) return false;
    return true;
}

static void test_objective_errors(void) {
    ctl_ctx *ctx = make_ctx(1, CTL_SIMD_AUTO);
    float lp[4 * 5], mask[4 * 5], dl[4 * 5], adv[4] = {1.0f, -1.0f, 0.5f, 0.0f};
    int32_t tgt[4 * 5];
    for (int i = 0; i < 20; i++) lp[i] = -0.1f - 0.05f * (float)i, mask[i] = i % 5 >= 1 ? 1.0f : 0.0f, tgt[i] = i;
    ctl_logprobs in = {4, 5, lp, mask, NULL, NULL, NULL};
    ctl_objective_out out;
    out.dlogp = dl;

    // Empty completions and all-masked batches: zero loss and gradient, never NaN.
    for (int i = 5; i < 10; i++) mask[i] = 0.0f;   // row 1 empty
    ctl_grpo_desc gd;
    memset(&gd, 0, sizeof gd);
    gd.advantages = adv;
    for (int lt = 0; lt < 4; lt++) {
        gd.loss = (ctl_grpo_loss)lt, gd.max_completion_length = 5;
        CHECK(ctl_objective_grpo(ctx, &in, &gd, &out) == CTL_OK && isfinite(out.loss) && all_zero(dl + 5, 5) && !all_zero(dl, 5),
              "grpo loss %d with an empty row: %s", lt, ctl_last_error(ctx));
    }
    float none[20] = {0};
    ctl_logprobs empty = {4, 5, lp, none, NULL, NULL, NULL};
    ctl_sft_desc sd;
    memset(&sd, 0, sizeof sd);
    CHECK(ctl_objective_grpo(ctx, &empty, &gd, &out) == CTL_OK && out.loss == 0.0 && all_zero(dl, 20), "grpo, all masked");
    CHECK(ctl_objective_sft(ctx, &empty, &sd, &out) == CTL_OK && out.loss == 0.0 && all_zero(dl, 20), "sft, all masked");
    sd.norm = CTL_SFT_SEQUENCES;
    CHECK(ctl_objective_sft(ctx, &empty, &sd, &out) == CTL_OK && out.loss == 0.0 && all_zero(dl, 20), "sft per sequence, all masked");

    // A NaN log-prob where the mask counts it is refused, naming the place; where it does not, ignored.
    lp[7] = NAN;
    CHECK(ctl_objective_grpo(ctx, &in, &gd, &out) == CTL_OK, "NaN under mask 0 is never read");
    lp[12] = NAN;
    CHECK(ctl_objective_sft(ctx, &in, &sd, &out) == CTL_ERR_NONFINITE && strstr(ctl_last_error(ctx), "(b=2, t=2)"),
          "NaN log-prob: %s", ctl_last_error(ctx));
    lp[7] = lp[12] = -0.3f;
    adv[2] = NAN;
    CHECK(ctl_objective_grpo(ctx, &in, &gd, &out) == CTL_ERR_NONFINITE, "NaN advantage refused");
    adv[2] = 0.5f;
    gd.loss = CTL_GRPO_DR_GRPO, gd.max_completion_length = 0;
    CHECK(ctl_objective_grpo(ctx, &in, &gd, &out) == CTL_ERR_RANGE, "dr_grpo needs max_completion_length");
    gd.loss = CTL_GRPO_DAPO, gd.beta = 0.04f;
    CHECK(ctl_objective_grpo(ctx, &in, &gd, &out) == CTL_ERR_INVALID, "beta without reference log-probs");
    gd.beta = 0.0f;
    mask[0] = -1.0f;
    CHECK(ctl_objective_grpo(ctx, &in, &gd, &out) == CTL_ERR_RANGE, "negative mask refused");
    mask[0] = 0.0f;

    // Advantages: groups of one refused; equal rewards give 0; NaN rewards are unscored, not poison.
    ctl_advantage_desc ad;
    memset(&ad, 0, sizeof ad);
    float r[8] = {1.0f, 1.0f, 1.0f, 1.0f, NAN, 2.0f, NAN, 0.0f}, a[8];
    ad.group_size = 1;
    CHECK(ctl_advantages(ctx, &ad, 8, r, a, NULL) == CTL_ERR_INVALID && strstr(ctl_last_error(ctx), "at least 2"), "group of 1");
    ad.group_size = 3;
    CHECK(ctl_advantages(ctx, &ad, 8, r, a, NULL) == CTL_ERR_SHAPE, "rows not whole groups");
    ad.group_size = 4;
    ctl_objective_out m;
    CHECK(ctl_advantages(ctx, &ad, 8, r, a, &m) == CTL_OK, "advantages: %s", ctl_last_error(ctx));
    CHECK(all_zero(a, 4) && a[4] == 0.0f && a[6] == 0.0f && a[5] > 0.0f && a[7] < 0.0f,
          "equal rewards -> 0, unscored rows -> 0, others signed: %g %g %g %g", a[4], a[5], a[6], a[7]);
    CHECK(ctl_metric_get(&m, "frac_reward_zero_std") == 0.5, "zero-std fraction %g", ctl_metric_get(&m, "frac_reward_zero_std"));
    ad.kind = CTL_ADV_RLOO;
    CHECK(ctl_advantages(ctx, &ad, 8, r, a, NULL) == CTL_OK && a[4] == 0.0f && fabsf(a[5] - 2.0f) < 1e-6f, "RLOO with NaN: %g", a[5]);
    r[2] = INFINITY;
    CHECK(ctl_advantages(ctx, &ad, 8, r, a, NULL) == CTL_ERR_NONFINITE, "infinite reward refused");

    // DPO: chosen == rejected is skipped; odd rows, bad smoothing and empty ORPO completions refused.
    for (int i = 0; i < 20; i++) mask[i] = i % 5 >= 1 ? 1.0f : 0.0f;
    ctl_logprobs pin = {4, 5, lp, mask, NULL, lp, NULL};   // pairs (0, 2) and (1, 3)
    for (int t = 0; t < 5; t++) tgt[3 * 5 + t] = tgt[1 * 5 + t];   // pair 1 compares a completion with itself
    ctl_dpo_desc dd;
    memset(&dd, 0, sizeof dd);
    dd.targets = tgt, dd.rpo_alpha = 1.0f;
    CHECK(ctl_objective_dpo(ctx, &pin, &dd, &out) == CTL_OK && ctl_metric_get(&out, "pairs_skipped") == 1.0 &&
          all_zero(dl + 5, 5) && all_zero(dl + 15, 5) && !all_zero(dl, 5), "identical pair skipped: %s", ctl_last_error(ctx));
    for (int t = 0; t < 5; t++) tgt[2 * 5 + t] = tgt[t];
    CHECK(ctl_objective_dpo(ctx, &pin, &dd, &out) == CTL_OK && out.loss == 0.0 && all_zero(dl, 20), "every pair identical: nothing learnt");
    ctl_logprobs odd = {3, 5, lp, mask, NULL, lp, NULL};
    CHECK(ctl_objective_dpo(ctx, &odd, &dd, &out) == CTL_ERR_SHAPE, "odd rows refused");
    dd.targets = NULL, dd.loss = CTL_DPO_EXO_PAIR;
    CHECK(ctl_objective_dpo(ctx, &pin, &dd, &out) == CTL_ERR_RANGE, "exo_pair needs label smoothing");
    dd.loss = CTL_DPO_ORPO;
    for (int t = 0; t < 5; t++) mask[2 * 5 + t] = 0.0f;
    CHECK(ctl_objective_dpo(ctx, &pin, &dd, &out) == CTL_ERR_RANGE && strstr(ctl_last_error(ctx), "ORPO pair 0"),
          "ORPO with an empty completion: %s", ctl_last_error(ctx));
    ctl_ctx_free(ctx);
}

// Assistant-only masks for SFT on chat data: the ids are the whole conversation's, and the
// masked tokens decode to exactly each assistant turn's content and end-of-turn token.
static void test_chat_masks(void) {
    static const char *const files[2] = {VOCAB_DIR "ggml-vocab-qwen2.gguf", VOCAB_DIR "ggml-vocab-llama-bpe.gguf"};
    ctl_chat_msg msgs[5] = {{"system", "Solve it."}, {"user", "What is 12 + 30?"}, {"assistant", " 12 + 30 = 42.\n#### 42"},
                            {"user", "And 7 * 6?"}, {"assistant", "7 * 6 = 42, again"}};
    ctl_ctx *ctx = make_ctx(1, CTL_SIMD_AUTO);
    for (int f = 0; f < 2; f++) {
        ctl_gguf *g;
        ctl_tokenizer *tk;
        if (ctl_gguf_open(ctx, files[f], &g) != CTL_OK) {
            printf("    skipped: %s is missing (make models)\n", files[f]);
            continue;
        }
        CHECK(ctl_tokenizer_from_gguf(ctx, g, &tk) == CTL_OK, "tokenizer: %s", ctl_last_error(ctx));
        ctl_chat_template t;
        memset(&t, 0, sizeof t);
        if (f == 0) CHECK(ctl_chat_template_from_gguf(ctx, g, &t) == CTL_OK, "qwen2 template");
        else t.format = CTL_CHAT_LLAMA3, strcpy(t.bos, "<|begin_of_text|>");
        int32_t ids[256], ref[256];
        float mask[256];
        int64_t n = 0, n_ref = 0;
        char text[1024], dec[1024], want[256];
        size_t len, dl;
        CHECK(ctl_chat_tokenize(tk, &t, msgs, 5, false, ids, mask, 256, &n) == CTL_OK, "chat_tokenize: %s", ctl_last_error(ctx));
        ctl_chat_apply(&t, msgs, 5, false, text, sizeof text, &len);
        ctl_tokenize(tk, text, len, true, ref, 256, &n_ref);
        CHECK(n == n_ref && !memcmp(ids, ref, (size_t)n * 4), "%s: ids equal the rendered text's", files[f]);
        int turn = 0;
        for (int64_t i = 0; i < n;) {   // each run of masked tokens is one assistant turn
            if (mask[i] == 0.0f) { i++; continue; }
            int64_t j = i;
            while (j < n && mask[j] != 0.0f) j++;
            ctl_detokenize(tk, ids + i, j - i, dec, sizeof dec, &dl);
            const char *c = msgs[turn ? 4 : 2].content;
            if (f == 1) c += *c == ' ';   // Llama-3 trims the content
            snprintf(want, sizeof want, "%s%s", c, f ? "<|eot_id|>" : "<|im_end|>");
            CHECK(dl == strlen(want) && !memcmp(dec, want, dl), "%s: turn %d masks '%.*s'", files[f], turn, (int)dl, dec);
            turn++, i = j;
        }
        CHECK(turn == 2, "%s: %d assistant turns masked", files[f], turn);
        CHECK(ctl_chat_tokenize(tk, &t, msgs, 5, false, ids, mask, 4, &n) == CTL_ERR_CAPACITY && n == n_ref, "too small a buffer");
        ctl_tokenizer_free(tk);
        ctl_gguf_close(g);
    }
    ctl_ctx_free(ctx);
}
