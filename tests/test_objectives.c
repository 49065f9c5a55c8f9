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
