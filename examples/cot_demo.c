// The demo: chain-of-thought learned from scratch in minutes on a CPU, then fixed by GRPO and
// DPO. Everything runs on the modular chains of chains.h, generated here (nothing is read):
//
//   1. Three identical tiny llamas trained with the same steps on direct answers, on coarse
//      chain-of-thought (every second running value) and on full chain-of-thought (every
//      value). Only the full chain lets a 2-layer model compute a K-step answer.
//   2. A fourth model trained on an imperfect teacher's full chains (a sign slip in 80% of the
//      subtractions that go below zero) to its plateau, then the same SFT again for as much
//      compute as GRPO takes: the control, so that a gain of RL is not just more training.
//   3. From the plateau: GRPO with the answer reward (and a small format reward), DPO on pairs
//      of the model's own right and wrong samples, and rejection-sampling SFT (STaR).
//
// Accuracy is greedy decoding of held-out problems, checked exactly. The jobs (the teacher's
// waits for the full-chain model, the RL ones for the plateau) each have their own
// single-threaded context and run as many at a time as there are cores: tiny models keep one core busier than they keep two.
// Each job is seeded, so the results do not depend on how many run at once. At the end: one
// table, SVG charts of every stage and results.tsv in the output folder.
//
//   make demo   (about 90 seconds on 2 cores)      make demo-quick   (about 30 seconds)
//   ./build/cot_demo [--quick] [--out DIR] [--jobs N] [--seed S]
#define COTLAB_IMPLEMENTATION
#include "../cotlab.h"
#include "chains.h"

#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define K_MIN 2            // training problems have K_MIN..K_MAX steps
#define K_MAX 6
#define N_EVAL_K 4
static const int EVAL_K[N_EVAL_K] = {2, 4, 6, 8};   // 8: longer than any training chain
#define MAX_NEW 12         // sampled completions: 3 tokens more than a K = 6 chain needs
#define T_RL (2 * K_MAX + 2 + MAX_NEW)
#define N_CTX 32           // a K = 8 chain: 18 + 11 tokens
#define MAX_EVAL 500
#define MAX(a, b) ((a) > (b) ? (a) : (b))
#define MIN(a, b) ((a) < (b) ? (a) : (b))

typedef struct schedule {
    int sft_steps;         // each of the three format models
    int teacher_steps;     // the imperfect teacher's SFT from the full-chain model, to a plateau
    int rl_iters;          // GRPO, DPO and STaR iterations (each one batch of rollouts)
    int eval_every;        // SFT steps between the curves' evaluations
    int n_eval_curve;      // test problems per K for the curves
    int n_eval;            // test problems per K for the table
} schedule;

static const schedule FULL = {1600, 500, 100, 100, 100, 500};
static const schedule QUICK = {300, 400, 20, 50, 50, 200};

#define SFT_BATCH 128
#define SFT_LR 3e-3f
#define INIT_SCALE 8.0f    // see arm_make
// The RL stages (the prototype of methods.md §4c): 16 prompts x 8 samples at temperature 1.
#define RL_PROMPTS 16
#define RL_G 8
#define RL_ROWS (RL_PROMPTS * RL_G)
#define GRPO_LR 5e-4f
#define GRPO_EPOCHS 2      // optimiser steps on each batch of rollouts
#define GRPO_BETA 0.02f
#define FORMAT_WEIGHT 0.1f
#define DPO_LR 3e-4f
#define DPO_BETA 0.1f
#define STAR_LR 5e-4f

// ---- timing -------------------------------------------------------------------------------------

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static double cpu_now(void) {   // this thread's CPU time: a job's compute, whatever runs beside it
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

// ---- curves and their SVG charts ------------------------------------------------------------------

typedef struct series {
    char name[40];
    int n, cap;
    double *x, *y;
} series;

static void series_add(series *s, double x, double y) {
    if (s->n == s->cap) {
        s->cap = s->cap ? 2 * s->cap : 256;
        s->x = (double *)realloc(s->x, (size_t)s->cap * sizeof(double));
        s->y = (double *)realloc(s->y, (size_t)s->cap * sizeof(double));
    }
    s->x[s->n] = x, s->y[s->n] = y, s->n++;
}

static void series_free(series *s) { free(s->x), free(s->y); }

typedef struct panel {
    const char *title, *xlabel;
    const series *s[8];
    int n;
    bool log_y, percent;   // percent: the y axis is 0..100
} panel;

static const char *COLORS[8] = {"#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"};

static double plot_y(const panel *q, double y) { return q->log_y ? log10(y > 1e-6 ? y : 1e-6) : y; }

// A round axis around [lo, hi]: ticks a step of 1, 2 or 5 times a power of ten apart, the ends
// on whole steps, labels with the decimals the step needs (one format for the axis). Data that
// all lie in [0, 1] (fractions) keep the axis within it.
typedef struct axis { double lo, hi, step; int decimals; } axis;

static axis nice_axis(double lo, double hi, int ticks) {
    bool fraction = lo >= 0.0 && hi <= 1.0;
    double span = hi - lo > 1e-12 ? hi - lo : fmax(fabs(lo), 1.0);
    double mag = pow(10.0, floor(log10(span / ticks))), f = span / ticks / mag;
    axis a;
    a.step = (f <= 1 ? 1 : f <= 2 ? 2 : f <= 5 ? 5 : 10) * mag;
    a.lo = floor(lo / a.step + 1e-9) * a.step, a.hi = ceil(hi / a.step - 1e-9) * a.step;
    if (a.hi <= a.lo) a.hi = a.lo + a.step;
    if (fraction) a.lo = fmax(a.lo, 0.0), a.hi = fmin(a.hi, 1.0);
    a.decimals = (int)fmax(0.0, -floor(log10(a.step) + 1e-9));
    return a;
}

// Panels side by side in one SVG file: lines with axes, ticks and a legend each, and a dashed
// line at x = mark when mark > 0. A logarithmic y axis has a tick at each power of ten and says
// so in its title.
static bool svg_write(const char *path, const char *title, const panel *p, int n, double mark) {
    const int PW = 420, PH = 330, L = 64, R = 24, TOP = 40, BOT = 78;
    FILE *f = fopen(path, "w");
    if (!f) return false;
    fprintf(f, "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"%d\" height=\"%d\" font-family=\"sans-serif\" font-size=\"12\">\n",
            PW * n, PH + 24);
    fprintf(f, "<rect width=\"100%%\" height=\"100%%\" fill=\"white\"/>\n");
    fprintf(f, "<text x=\"8\" y=\"18\" font-size=\"15\" font-weight=\"bold\">%s</text>\n", title);
    for (int k = 0; k < n; k++) {
        const panel *q = p + k;
        double x0 = 1e300, x1 = -1e300, y0 = 1e300, y1 = -1e300;
        for (int j = 0; j < q->n; j++)
            for (int i = 0; i < q->s[j]->n; i++) {
                double y = plot_y(q, q->s[j]->y[i]);
                if (!isfinite(y)) continue;
                x0 = fmin(x0, q->s[j]->x[i]), x1 = fmax(x1, q->s[j]->x[i]), y0 = fmin(y0, y), y1 = fmax(y1, y);
            }
        if (x0 > x1) x0 = 0, x1 = 1, y0 = 0, y1 = 1;
        axis ax = nice_axis(x0, x1, 4), ay;
        if (ax.step < 1) ax = nice_axis(x0, x0 + 4, 4);   // steps and iterations: whole numbers
        if (q->percent) ay.lo = 0, ay.hi = 100, ay.step = 20, ay.decimals = 0;
        else if (q->log_y) ay.lo = floor(y0), ay.hi = fmax(ceil(y1), floor(y0) + 1), ay.step = 1, ay.decimals = 0;   // decades
        else ay = nice_axis(y0, y1, 4);
        x0 = ax.lo, x1 = ax.hi, y0 = ay.lo, y1 = ay.hi;
        int ox = k * PW + L, oy = 24 + TOP, w = PW - L - R, h = PH - TOP - BOT;
        fprintf(f, "<text x=\"%d\" y=\"%d\" font-size=\"13\">%s%s</text>\n", ox, oy - 22, q->title, q->log_y ? " (log scale)" : "");
        fprintf(f, "<rect x=\"%d\" y=\"%d\" width=\"%d\" height=\"%d\" fill=\"none\" stroke=\"#999\"/>\n", ox, oy, w, h);
        int ny = (int)lround((y1 - y0) / ay.step), nx = (int)lround((x1 - x0) / ax.step);
        for (int t = 0; t <= ny; t++) {
            double yv = y0 + ay.step * t;
            int py = oy + h - (int)lround(h * (double)t / ny);
            fprintf(f, "<line x1=\"%d\" y1=\"%d\" x2=\"%d\" y2=\"%d\" stroke=\"#eee\"/>\n", ox, py, ox + w, py);
            if (q->log_y) fprintf(f, "<text x=\"%d\" y=\"%d\" text-anchor=\"end\" fill=\"#444\">%g</text>\n", ox - 4, py + 4, pow(10, yv));
            else fprintf(f, "<text x=\"%d\" y=\"%d\" text-anchor=\"end\" fill=\"#444\">%.*f</text>\n", ox - 4, py + 4, ay.decimals,
                         fabs(yv) < ay.step * 1e-6 ? 0.0 : yv);
        }
        for (int t = 0; t <= nx; t++)   // (the margins hold half of any label: nothing cut at the edges)
            fprintf(f, "<text x=\"%d\" y=\"%d\" text-anchor=\"middle\" fill=\"#444\">%.*f</text>\n", ox + (int)lround(w * (double)t / nx),
                    oy + h + 16, ax.decimals, x0 + ax.step * t);
        fprintf(f, "<text x=\"%d\" y=\"%d\" text-anchor=\"middle\" fill=\"#444\">%s</text>\n", ox + w / 2, oy + h + 32, q->xlabel);
        if (mark > x0 && mark < x1) {
            double mx = ox + w * (mark - x0) / (x1 - x0);
            fprintf(f, "<line x1=\"%.1f\" y1=\"%d\" x2=\"%.1f\" y2=\"%d\" stroke=\"#555\" stroke-dasharray=\"4 3\"/>\n", mx, oy, mx, oy + h);
        }
        for (int j = 0; j < q->n; j++) {
            const series *s = q->s[j];
            fprintf(f, "<polyline fill=\"none\" stroke=\"%s\" stroke-width=\"1.5\" points=\"", COLORS[j % 8]);
            for (int i = 0; i < s->n; i++) {
                double y = plot_y(q, s->y[i]);
                if (isfinite(y)) fprintf(f, "%.1f,%.1f ", ox + w * (s->x[i] - x0) / (x1 - x0), oy + h - h * (y - y0) / (y1 - y0));
            }
            int lx = ox + (j % 2) * (w / 2), ly = oy + h + 48 + 14 * (j / 2);   // the legend, under the axis
            fprintf(f, "\"/>\n<line x1=\"%d\" y1=\"%d\" x2=\"%d\" y2=\"%d\" stroke=\"%s\" stroke-width=\"2\"/>", lx,
                    ly - 4, lx + 16, ly - 4, COLORS[j % 8]);
            fprintf(f, "<text x=\"%d\" y=\"%d\">%s</text>\n", lx + 20, ly, s->name);
        }
    }
    fprintf(f, "</svg>\n");
    return fclose(f) == 0;
}

// ---- jobs -----------------------------------------------------------------------------------------

typedef enum job_kind { J_DIRECT, J_COARSE, J_FULL, J_TEACHER, J_GRPO, J_DPO, J_STAR, N_JOBS } job_kind;

typedef struct scores {
    double acc[N_EVAL_K];
    double mean_len;   // completion tokens (the EOS included), over every K
} scores;

typedef struct job {
    job_kind kind;
    ctl_ctx *ctx;
    // results (the teacher's job has two: its plateau, then the control)
    scores s, s2;
    int steps, steps2;
    double cpu, cpu2, t0;   // CPU seconds (t0: when the job started)
    bool ok, started, finished;
    char err[600];
    // progress, under the demo's lock
    int at, total;
    char status[100];
    // curves
    series loss, acc[N_EVAL_K], reward, zero_std, kl, margin, chosen, rejected;
} job;

static const char *JOB_NAME[N_JOBS] = {"direct answer", "coarse chain-of-thought", "full chain-of-thought",
                                       "imperfect-teacher SFT", "GRPO", "DPO", "STaR"};

// The held-out problems, the same for every model: n per K.
typedef struct evalset {
    ch_problem p[N_EVAL_K][MAX_EVAL];
} evalset;

typedef struct demo {
    const schedule *sc;
    uint64_t seed;
    evalset e;
    int control_steps;
    job jobs[N_JOBS];
    float *chains;             // the full-chain model's weights (the teacher's job starts there)
    float *plateau;            // the teacher's weights at its plateau, every parameter in order
    bool abort;
    pthread_mutex_t mu;
    pthread_cond_t cv;
} demo;

static demo D;

static void set_status(job *j, int at, int total, const char *fmt, ...) {
    pthread_mutex_lock(&D.mu);
    j->at = at, j->total = total;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(j->status, sizeof j->status, fmt, ap);
    va_end(ap);
    pthread_mutex_unlock(&D.mu);
}

static bool job_fail(job *j, const char *what) {
    snprintf(j->err, sizeof j->err, "%s: %s", what, ctl_last_error(j->ctx));
    return false;
}

// ---- models -----------------------------------------------------------------------------------------

// One tiny llama with its trainer, its decoder (a KV cache for evaluation and rollouts) and
// buffers for evaluation.
typedef struct arm {
    ctl_model *m;
    ctl_train *t;
    ctl_infer *inf;
    int32_t *prompts, *out;
    const int32_t **pp;
    int64_t *plen, *olen;
} arm;

// The init: GPT-2's scale (0.02) times 8, roughly PyTorch's default for layers this narrow.
// At 0.02 the full chains took about 1500 steps to click; at this scale they take about 600.
static bool arm_make(job *j, arm *a, float lr, int64_t warmup, int64_t batch) {
    ctl_model_config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.arch = CTL_ARCH_LLAMA, cfg.vocab_size = CH_VOCAB, cfg.n_ctx = N_CTX;
    cfg.n_embd = 64, cfg.n_layer = 2, cfg.n_head = 4;
    ctl_train_desc td;
    memset(&td, 0, sizeof td);
    td.batch = batch, td.seq_len = T_RL, td.seed = D.seed;
    td.optim.lr = lr, td.optim.warmup = warmup, td.optim.clip = 1.0f;   // constant after warmup
    ctl_infer_desc id = {MAX_EVAL, N_CTX};
    memset(a, 0, sizeof *a);
    if (ctl_model_create(j->ctx, &cfg, &a->m)) return job_fail(j, "model");
    ctl_model_init_random(a->m, D.seed);
    for (int64_t i = 0; i < ctl_model_param_count(a->m); i++) {
        ctl_param *p = ctl_model_param(a->m, i);
        float *v = (float *)p->value.data;
        for (int64_t k = 0; p->value.ndim == 2 && k < ctl_tensor_numel(&p->value); k++) v[k] *= INIT_SCALE;
    }
    ctl_model_touch(a->m);   // written in place
    if (ctl_train_init(a->m, &td, &a->t) || ctl_infer_init(a->m, &id, &a->inf)) return job_fail(j, "trainer");
    a->prompts = (int32_t *)malloc(MAX_EVAL * (2 * CH_MAX_K + 2) * sizeof(int32_t));
    a->out = (int32_t *)malloc(MAX_EVAL * (CH_MAX_K + 6) * sizeof(int32_t));
    a->pp = (const int32_t **)malloc(MAX_EVAL * sizeof(int32_t *));
    a->plen = (int64_t *)malloc(MAX_EVAL * sizeof(int64_t)), a->olen = (int64_t *)malloc(MAX_EVAL * sizeof(int64_t));
    return true;
}

static void arm_free(arm *a) {
    ctl_infer_free(a->inf), ctl_train_free(a->t), ctl_model_free(a->m);
    free(a->prompts), free(a->out), free((void *)a->pp), free(a->plen), free(a->olen);
    memset(a, 0, sizeof *a);
}

static void weights_get(arm *a, float *dst) {
    for (int64_t i = 0; i < ctl_model_param_count(a->m); i++) {
        ctl_param *p = ctl_model_param(a->m, i);
        size_t n = (size_t)ctl_tensor_numel(&p->value);
        memcpy(dst, p->value.data, n * sizeof(float)), dst += n;
    }
}

static void weights_set(arm *a, const float *src) {
    for (int64_t i = 0; i < ctl_model_param_count(a->m); i++) {
        ctl_param *p = ctl_model_param(a->m, i);
        size_t n = (size_t)ctl_tensor_numel(&p->value);
        memcpy(p->value.data, src, n * sizeof(float)), src += n;
    }
    ctl_model_touch(a->m);
}

// ---- evaluation ---------------------------------------------------------------------------------------

// Greedy accuracy by K on the first n problems of the test set, decoded together per K.
static bool evaluate(job *j, arm *a, int n, scores *out) {
    int32_t stop = CH_EOS;
    ctl_sampler_desc sd;
    memset(&sd, 0, sizeof sd);
    sd.stop_tokens = &stop, sd.n_stop_tokens = 1;
    double len = 0;
    for (int k = 0; k < N_EVAL_K; k++) {
        int K = EVAL_K[k], max_new = K + 6, correct = 0;
        for (int i = 0; i < n; i++) {
            a->pp[i] = a->prompts + i * (2 * CH_MAX_K + 2);
            a->plen[i] = ch_prompt(&D.e.p[k][i], (int32_t *)a->pp[i]);
        }
        if (ctl_generate(a->inf, n, a->pp, a->plen, &sd, max_new, a->out, a->olen, NULL, NULL)) return job_fail(j, "evaluation");
        for (int i = 0; i < n; i++) {
            correct += ch_parse_answer(a->out + i * max_new, (int)a->olen[i]) == ch_value(&D.e.p[k][i], K);
            len += (double)a->olen[i] + (a->olen[i] < max_new);
        }
        out->acc[k] = (double)correct / n;
    }
    out->mean_len = len / (N_EVAL_K * n);
    return true;
}

static bool curve_point(job *j, arm *a, double x) {
    scores s;
    if (!evaluate(j, a, D.sc->n_eval_curve, &s)) return false;
    for (int k = 0; k < N_EVAL_K; k++) series_add(&j->acc[k], x, 100 * s.acc[k]);
    return true;
}

// ---- supervised fine-tuning ---------------------------------------------------------------------------

typedef struct sft_data {
    ch_format format;
    double slip;
    int T;             // positions per row: the longest sequence (K = K_MAX) less one
    ctl_rng rng;
    int32_t *tok, *tgt;
    float *w;
} sft_data;

static void sft_data_init(sft_data *d, ch_format f, double slip, uint64_t seed) {
    ch_problem p = {K_MAX, 0, {0}, {0}};
    int32_t ids[64];
    for (int i = 0; i < K_MAX; i++) p.op[i] = CH_PLUS;
    d->format = f, d->slip = slip;
    d->T = ch_prompt(&p, ids) + ch_completion(&p, f, 0.0, NULL, ids, NULL) - 1;
    ctl_rng_seed(&d->rng, seed);
    size_t n = (size_t)(SFT_BATCH * d->T);
    d->tok = (int32_t *)malloc(n * 4), d->tgt = (int32_t *)malloc(n * 4), d->w = (float *)malloc(n * 4);
}

static void sft_data_free(sft_data *d) { free(d->tok), free(d->tgt), free(d->w); }

// A batch of fresh training problems (K uniform in K_MIN..K_MAX), loss on the completion only.
static ctl_batch sft_batch(sft_data *d) {
    int32_t ids[64];
    float mask[64];
    for (int b = 0; b < SFT_BATCH; b++) {
        ch_problem p = ch_sample(&d->rng, K_MIN + (int)(ctl_rng_next(&d->rng) % (K_MAX - K_MIN + 1)), false);
        int n = ch_prompt(&p, ids), np = n;
        n += ch_completion(&p, d->format, d->slip, &d->rng, ids + n, NULL);
        for (int i = 0; i < n; i++) mask[i] = i >= np;
        ctl_batch_row(d->tok, d->tgt, d->w, d->T, b, ids, mask, n, CH_PAD);
    }
    ctl_batch b = {SFT_BATCH, d->T, d->tok, d->tgt, d->w};
    return b;
}

// One SFT step: the token mean over the batch's completions.
static bool sft_step(job *j, arm *a, const ctl_batch *b, double *loss) {
    ctl_objective_out out;
    ctl_sft_desc sd;
    memset(&sd, 0, sizeof sd);
    if (ctl_train_forward(a->t, b)) return job_fail(j, "SFT forward");
    ctl_logprobs in = {b->B, b->T, ctl_train_logprobs(a->t), b->weights, NULL, NULL, NULL};
    out.dlogp = ctl_train_dlogprobs(a->t);
    if (ctl_objective_sft(j->ctx, &in, &sd, &out) || ctl_train_backward(a->t) || ctl_train_step(a->t, NULL))
        return job_fail(j, "SFT step");
    *loss = out.loss;
    return true;
}

// `steps` SFT steps on fresh problems; the step numbers of the curves continue from `from`.
static bool sft_run(job *j, arm *a, sft_data *d, int from, int steps, const char *label) {
    double ema = 0;
    for (int i = 1; i <= steps && !D.abort; i++) {
        ctl_batch b = sft_batch(d);
        double loss;
        if (!sft_step(j, a, &b, &loss)) return false;
        ema = i == 1 ? loss : 0.95 * ema + 0.05 * loss;
        series_add(&j->loss, from + i, loss);
        if ((from + i) % D.sc->eval_every == 0 && !curve_point(j, a, from + i)) return false;
        set_status(j, i, steps, "%s loss %.3f", label, ema);
    }
    return !D.abort;
}

// A copy of a's weights for the jobs that start from them.
static void publish(arm *a, float **dst) {
    float *w = (float *)malloc((size_t)ctl_model_numel(a->m) * sizeof(float));
    weights_get(a, w);
    pthread_mutex_lock(&D.mu);
    *dst = w;
    pthread_cond_broadcast(&D.cv);
    pthread_mutex_unlock(&D.mu);
}

// Stage 1: one format from scratch.
static bool job_format(job *j, arm *a) {
    sft_data d;
    sft_data_init(&d, (ch_format)j->kind, 0.0, D.seed * 7 + 1);   // the same problems for each format
    bool ok = arm_make(j, a, SFT_LR, 50, SFT_BATCH) && sft_run(j, a, &d, 0, D.sc->sft_steps, "") &&
              evaluate(j, a, D.sc->n_eval, &j->s);
    j->steps = D.sc->sft_steps;
    if (ok && j->kind == J_FULL) publish(a, &D.chains);
    sft_data_free(&d);
    return ok;
}

// Stage 2: the full-chain model fine-tuned on the imperfect teacher's chains to a plateau
// (published for the RL jobs), then the control: the same SFT, same optimiser, fresh problems,
// for as much compute as GRPO's.
static bool job_teacher(job *j, arm *a) {
    sft_data d;
    sft_data_init(&d, CH_FULL, 0.8, D.seed * 7 + 2);
    bool ok = arm_make(j, a, SFT_LR, 50, SFT_BATCH);
    if (ok) weights_set(a, D.chains), ok = curve_point(j, a, 0);   // the curves start from the right chains
    ok = ok && sft_run(j, a, &d, 0, D.sc->teacher_steps, "") && evaluate(j, a, D.sc->n_eval, &j->s);
    j->steps = D.sc->teacher_steps, j->cpu = cpu_now() - j->t0;
    if (ok) publish(a, &D.plateau);
    ok = ok && sft_run(j, a, &d, D.sc->teacher_steps, D.control_steps, "control:") && evaluate(j, a, D.sc->n_eval, &j->s2);
    j->steps2 = D.control_steps, j->cpu2 = cpu_now() - j->t0 - j->cpu;
    sft_data_free(&d);
    return ok;
}

// ---- stage 3: reinforcement from the plateau ----------------------------------------------------------

// The answer reward: 1 when the completion ends in the right answer (ctl_reward_input.tokens;
// user: the step's true answers, by prompt).
static float reward_answer(const ctl_reward_input *in, void *user) {
    const int *truth = (const int *)user;
    return (float)(!in->truncated && ch_parse_answer(in->tokens, (int)in->n_tokens) == truth[in->prompt_index]);
}

// The format reward: a completion in full chain-of-thought form: '>', digits, '#', one digit, then the EOS.
static float reward_format(const ctl_reward_input *in, void *user) {
    const int32_t *c = in->tokens;
    int64_t n = in->n_tokens;
    (void)user;
    if (in->truncated || n < 3 || c[0] != CH_THINK || c[n - 2] != CH_ANS || c[n - 1] > 9) return 0.0f;
    for (int64_t i = 1; i < n - 2; i++)
        if (c[i] > 9) return 0.0f;
    return 1.0f;
}

// Stage 3: one method for rl_iters iterations from the plateau, each a library RL step
// (ctl_rl): 8 completions of 16 fresh training prompts at temperature 1, scored, then GRPO
// (two clipped steps, k3 KL to the plateau), DPO on the first right and first wrong sample of
// each prompt (the plateau as the reference), or SFT on the right samples (STaR).
static bool job_rl(job *j, arm *pol) {
    arm ref;
    float lr = j->kind == J_GRPO ? GRPO_LR : j->kind == J_DPO ? DPO_LR : STAR_LR;
    bool ok = arm_make(j, pol, lr, 0, RL_ROWS) && arm_make(j, &ref, 0.0f, 0, RL_ROWS);
    if (!ok) return false;
    weights_set(pol, D.plateau), weights_set(&ref, D.plateau);
    ok = curve_point(j, pol, 0);
    ctl_rng rng;
    ctl_rng_seed(&rng, D.seed * 13 + (uint64_t)j->kind);
    int32_t prompts[RL_PROMPTS][2 * K_MAX + 2], stop = CH_EOS;
    int truth[RL_PROMPTS];
    ctl_rl_prompt rp[RL_PROMPTS];
    ctl_reward_func rewards[2] = {{"answer", reward_answer, truth, 1.0f, NULL}, {"format", reward_format, NULL, FORMAT_WEIGHT, NULL}};
    ctl_rl_desc rd;
    memset(&rd, 0, sizeof rd);
    rd.method = j->kind == J_GRPO ? CTL_RL_GRPO : j->kind == J_DPO ? CTL_RL_DPO : CTL_RL_RFT;
    rd.prompts = RL_PROMPTS, rd.group = RL_G, rd.max_new = MAX_NEW, rd.iterations = GRPO_EPOCHS;
    rd.sampler.temperature = 1.0f, rd.sampler.stop_tokens = &stop, rd.sampler.n_stop_tokens = 1;
    rd.rewards = rewards, rd.n_rewards = 2;
    rd.grpo.loss = CTL_GRPO_GRPO, rd.grpo.beta = GRPO_BETA;
    rd.dpo.loss = CTL_DPO_SIGMOID, rd.dpo.beta = DPO_BETA;
    rd.reference = j->kind == J_STAR ? NULL : ref.t;
    ctl_rl *rl = NULL;
    if (ok && ctl_rl_init(pol->t, &rd, &rl)) ok = job_fail(j, "RL setup");
    int iters = D.sc->rl_iters;
    for (int it = 1; ok && it <= iters && !D.abort; it++) {
        for (int p = 0; p < RL_PROMPTS; p++) {
            ch_problem q = ch_sample(&rng, K_MIN + (int)(ctl_rng_next(&rng) % (K_MAX - K_MIN + 1)), false);
            rp[p].tokens = prompts[p], rp[p].n = ch_prompt(&q, prompts[p]), rp[p].example = NULL, truth[p] = ch_value(&q, q.K);
        }
        ctl_objective_out gen;
        if (ctl_rl_generate(rl, rp, RL_PROMPTS, ctl_rng_next(&rng), &gen)) {
            ok = job_fail(j, "rollouts");
            break;
        }
        double frac = ctl_metric_get(&gen, "correct"), zero_std = ctl_metric_get(&gen, "frac_reward_zero_std");
        series_add(&j->reward, it, frac), series_add(&j->zero_std, it, zero_std);
        for (int k = 0; ok && k < (j->kind == J_GRPO ? GRPO_EPOCHS : 1); k++) {
            ctl_step_out out;
            if (ctl_rl_update(rl, &out)) {
                ok = job_fail(j, "RL update");
                break;
            }
            j->steps += !out.skipped;
            if (j->kind == J_GRPO && k == 0) series_add(&j->kl, it, ctl_metric_get(&out.metrics, "kl"));
            if (j->kind == J_DPO && !out.skipped) {
                series_add(&j->margin, it, ctl_metric_get(&out.metrics, "rewards/margins"));
                series_add(&j->chosen, it, ctl_metric_get(&out.metrics, "logps/chosen"));
                series_add(&j->rejected, it, ctl_metric_get(&out.metrics, "logps/rejected"));
            }
        }
        if (j->kind == J_GRPO) set_status(j, it, iters, "right %.2f, zero-std groups %.2f, KL %.4f", frac, zero_std, j->kl.y[j->kl.n - 1]);
        else if (j->kind == J_DPO) set_status(j, it, iters, "right %.2f, margin %.3f", frac, j->margin.n ? j->margin.y[j->margin.n - 1] : 0.0);
        else set_status(j, it, iters, "right %.2f", frac);
        if (ok && it % MAX(1, iters / 10) == 0) ok = curve_point(j, pol, it);
    }
    ok = ok && !D.abort && evaluate(j, pol, D.sc->n_eval, &j->s);
    ctl_rl_free(rl);
    arm_free(&ref);
    return ok;
}

// ---- the workers and the display --------------------------------------------------------------------

// The order jobs start in: the full-chain model first (the teacher's job starts from it, and
// the RL jobs from the teacher's plateau). A worker takes the first job whose start is there.
static const job_kind ORDER[N_JOBS] = {J_FULL, J_COARSE, J_TEACHER, J_DIRECT, J_GRPO, J_DPO, J_STAR};

static bool can_start(job_kind k) {
    return k == J_TEACHER ? D.chains != NULL : k >= J_GRPO ? D.plateau != NULL : true;
}

static void *worker(void *arg) {
    (void)arg;
    for (;;) {
        job *j = NULL;
        pthread_mutex_lock(&D.mu);
        for (;;) {
            bool left = false;
            for (int k = 0; k < N_JOBS && !j; k++) {
                job *c = &D.jobs[ORDER[k]];
                if (c->started) continue;
                left = true;
                if (can_start(c->kind)) j = c;
            }
            if (j || !left || D.abort) break;
            pthread_cond_wait(&D.cv, &D.mu);
        }
        if (j && !D.abort) j->started = true;
        else j = NULL;
        pthread_mutex_unlock(&D.mu);
        if (!j) return NULL;
        arm a;
        memset(&a, 0, sizeof a);
        j->t0 = cpu_now();
        ctl_ctx_desc cd = ctl_ctx_desc_default();
        cd.n_threads = 1;
        j->ok = ctl_ctx_init(&j->ctx, &cd) == CTL_OK;
        if (!j->ok) snprintf(j->err, sizeof j->err, "no context");
        else j->ok = j->kind <= J_FULL ? job_format(j, &a) : j->kind == J_TEACHER ? job_teacher(j, &a) : job_rl(j, &a);
        arm_free(&a);
        ctl_ctx_free(j->ctx);
        pthread_mutex_lock(&D.mu);
        if (j->kind != J_TEACHER) j->cpu = cpu_now() - j->t0;
        j->finished = true;
        if (!j->ok) D.abort = true;
        pthread_cond_broadcast(&D.cv);
        pthread_mutex_unlock(&D.mu);
    }
}

static void print_scores(const char *name, const scores *s, int steps, double cpu) {
    printf("  %-28s", name);
    for (int k = 0; k < N_EVAL_K; k++) printf(" %5.1f%%", 100 * s->acc[k]);
    printf(" %6.1f %6d %6.1f\n", s->mean_len, steps, cpu);
}

// Each header cell right-aligned over its column of print_scores (7 characters each).
static void print_header(void) {
    printf("  %-28s", "stage");
    for (int k = 0; k < N_EVAL_K; k++) {
        char cell[16];
        snprintf(cell, sizeof cell, "K=%d%s", EVAL_K[k], EVAL_K[k] > K_MAX ? "*" : "");
        printf(" %6s", cell);
    }
    printf(" %6s %6s %6s\n", "len", "steps", "cpu s");
}

// The rows of the table, in order: name, scores, steps, CPU seconds.
typedef struct row {
    const char *name;
    const scores *s;
    int steps;
    double cpu;
} row;

static int table_rows(row *r) {
    int n = 0;
    static const char *STAGE[N_JOBS] = {"direct answer", "coarse chain-of-thought", "full chain-of-thought",
                                        "imperfect teacher: plateau", "+ GRPO", "+ DPO", "+ STaR (rejection SFT)"};
    for (int k = 0; k < N_JOBS; k++) {
        job *j = &D.jobs[k];
        r[n++] = (row){STAGE[k], &j->s, j->steps, j->cpu};
        if (k == J_TEACHER) r[n++] = (row){"+ SFT (control)", &j->s2, j->steps2, j->cpu2};
    }
    return n;
}

// While the jobs run: on a terminal one line with every running job, rewritten in place;
// elsewhere (logs, tests) a line per job at each quarter. A finished job prints its row.
static void display(bool tty) {
    int quarter[N_JOBS] = {0};
    bool shown[N_JOBS] = {false};
    double start = now();
    for (;;) {
        bool all = true;
        char line[512] = "";
        pthread_mutex_lock(&D.mu);
        for (int k = 0; k < N_JOBS; k++) {
            job *j = &D.jobs[ORDER[k]];
            all = all && (j->finished || (D.abort && !j->started));
            if (j->finished && !shown[ORDER[k]]) {
                shown[ORDER[k]] = true;
                if (tty) printf("\r\033[K");
                if (j->ok && j->kind == J_TEACHER) {
                    print_scores("imperfect teacher: plateau", &j->s, j->steps, j->cpu);
                    print_scores("+ SFT (control)", &j->s2, j->steps2, j->cpu2);
                } else if (j->ok) print_scores(JOB_NAME[j->kind], &j->s, j->steps, j->cpu);
                else if (j->err[0]) printf("  %s failed: %s\n", JOB_NAME[j->kind], j->err);
            }
            if (!j->started || j->finished || j->total == 0) continue;
            if (tty) {
                size_t l = strlen(line);
                snprintf(line + l, sizeof line - l, "%s%s %d/%d %s", l ? " | " : "", JOB_NAME[j->kind], j->at, j->total, j->status);
            } else if (4 * j->at / j->total > quarter[ORDER[k]]) {
                quarter[ORDER[k]] = 4 * j->at / j->total;
                printf("  [%5.1fs] %s %d/%d %s\n", now() - start, JOB_NAME[j->kind], j->at, j->total, j->status);
            }
        }
        pthread_mutex_unlock(&D.mu);
        if (tty && line[0]) printf("\r\033[K  [%5.1fs] %.*s", now() - start, 150, line);
        fflush(stdout);
        if (all) break;
        struct timespec ts = {0, 200 * 1000 * 1000};
        nanosleep(&ts, NULL);
    }
    if (tty) printf("\r\033[K");
}

// ---- the charts -------------------------------------------------------------------------------------

static bool save_chart(const char *dir, const char *file, const char *title, const panel *p, int n, double mark) {
    char path[512];
    snprintf(path, sizeof path, "%s/%s", dir, file);
    if (svg_write(path, title, p, n, mark)) return true;
    fprintf(stderr, "cot_demo: cannot write %s\n", path);
    return false;
}

static bool charts(const char *dir) {
    job *J = D.jobs;
    panel f[4] = {{"training loss (completion tokens)", "step", {&J[0].loss, &J[1].loss, &J[2].loss}, 3, true, false}};
    static char titles[3][64];
    static series acc[3][3];   // the formats' accuracy curves, renamed by format
    for (int k = 0; k < 3; k++) {
        snprintf(titles[k], sizeof titles[k], "greedy accuracy %%, K = %d", EVAL_K[k]);
        f[k + 1] = (panel){titles[k], "step", {NULL}, 3, false, true};
        for (int m = 0; m < 3; m++) {
            acc[k][m] = J[m].acc[k];
            snprintf(acc[k][m].name, sizeof acc[k][m].name, "%s", JOB_NAME[m]);
            f[k + 1].s[m] = &acc[k][m];
        }
    }
    panel t[2] = {{"training loss", "step", {&J[J_TEACHER].loss}, 1, true, false},
                  {"greedy accuracy %", "step", {&J[J_TEACHER].acc[0], &J[J_TEACHER].acc[1],
                                                                              &J[J_TEACHER].acc[2], &J[J_TEACHER].acc[3]}, 4, false, true}};
    job *g = &J[J_GRPO], *d = &J[J_DPO], *s = &J[J_STAR];
    panel gp[3] = {{"samples right; groups all alike", "iteration", {&g->reward, &g->zero_std}, 2, false, false},
                   {"KL to the plateau (k3)", "iteration", {&g->kl}, 1, false, false},
                   {"greedy accuracy %", "iteration", {&g->acc[0], &g->acc[1], &g->acc[2], &g->acc[3]}, 4, false, true}};
    panel dp[3] = {{"reward margin", "iteration", {&d->margin}, 1, false, false},
                   {"summed log-probs of the pair", "iteration", {&d->chosen, &d->rejected}, 2, false, false},
                   {"greedy accuracy %", "iteration", {&d->acc[0], &d->acc[1], &d->acc[2], &d->acc[3]}, 4, false, true}};
    panel sp[2] = {{"fraction of samples right", "iteration", {&s->reward}, 1, false, false},
                   {"greedy accuracy %", "iteration", {&s->acc[0], &s->acc[1], &s->acc[2], &s->acc[3]}, 4, false, true}};
    return save_chart(dir, "1_formats.svg", "1. SFT from scratch: direct answers vs coarse vs full chain-of-thought", f, 4, 0) &&
           save_chart(dir, "2_teacher.svg", "2. Imperfect teacher: SFT to a plateau (dashed), then the same SFT (control)", t, 2,
                      D.sc->teacher_steps) &&
           save_chart(dir, "3_grpo.svg", "3. GRPO from the plateau: answer + 0.1 x format reward, KL to the plateau", gp, 3, 0) &&
           save_chart(dir, "4_dpo.svg", "4. DPO from the plateau: the model's own right vs wrong samples", dp, 3, 0) &&
           save_chart(dir, "5_star.svg", "5. Rejection-sampling SFT (STaR) from the plateau", sp, 2, 0);
}

int main(int argc, char **argv) {
    const char *out_dir = "demo_out";
    int n_workers = 0;
    D.sc = &FULL, D.seed = 1;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--quick")) D.sc = &QUICK;
        else if (!strcmp(argv[i], "--out") && i + 1 < argc) out_dir = argv[++i];
        else if (!strcmp(argv[i], "--jobs") && i + 1 < argc) n_workers = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--seed") && i + 1 < argc) D.seed = strtoull(argv[++i], NULL, 10);
        else {
            fprintf(stderr, "usage: %s [--quick] [--out DIR] [--jobs N] [--seed S]\n", argv[0]);
            return 2;
        }
    }
    if (n_workers <= 0) n_workers = (int)sysconf(_SC_NPROCESSORS_ONLN);
    n_workers = MAX(1, MIN(n_workers, 4));
    struct stat st;
    if (mkdir(out_dir, 0777) != 0 && (stat(out_dir, &st) != 0 || !S_ISDIR(st.st_mode))) {
        fprintf(stderr, "cot_demo: cannot make the output folder %s\n", out_dir);
        return 1;
    }
    const schedule *sc = D.sc;
    for (int k = 0; k < N_EVAL_K; k++) {
        ctl_rng r;
        ctl_rng_seed(&r, D.seed * 31 + (uint64_t)EVAL_K[k]);
        for (int i = 0; i < sc->n_eval; i++) D.e.p[k][i] = ch_sample(&r, EVAL_K[k], true);
    }
    // The control gets GRPO's compute, counted generously in token positions through the model:
    // per iteration, rollouts (a forward over full-length rows), the reference's forward and two
    // steps (forward + backward: 3 forwards each) on 128 rows; an SFT step is 3 forwards.
    double grpo_cost = (double)sc->rl_iters * RL_ROWS * T_RL * (1 + 1 + 3 * GRPO_EPOCHS);
    D.control_steps = (int)ceil(grpo_cost / (3.0 * SFT_BATCH * (3 * K_MAX + 4)));
    for (int k = 0; k < N_JOBS; k++) {
        D.jobs[k].kind = (job_kind)k;
        snprintf(D.jobs[k].loss.name, sizeof D.jobs[k].loss.name, "%s", JOB_NAME[k]);
        for (int e = 0; e < N_EVAL_K; e++) snprintf(D.jobs[k].acc[e].name, sizeof D.jobs[k].acc[e].name, "K=%d", EVAL_K[e]);
        snprintf(D.jobs[k].reward.name, 40, "samples right"), snprintf(D.jobs[k].zero_std.name, 40, "groups all alike");
        snprintf(D.jobs[k].kl.name, 40, "KL"), snprintf(D.jobs[k].margin.name, 40, "margin");
        snprintf(D.jobs[k].chosen.name, 40, "chosen (right)"), snprintf(D.jobs[k].rejected.name, 40, "rejected (wrong)");
    }
    pthread_mutex_init(&D.mu, NULL);
    pthread_cond_init(&D.cv, NULL);

    printf("cotlab demo: chain-of-thought on modular chains (%s run, seed %llu)\n", sc == &QUICK ? "quick" : "full",
           (unsigned long long)D.seed);
    printf("  x0 op1 a1 ... opK aK, left to right mod 10 (+, -, x by 1/3/7/9): guessing scores 10%%\n");
    printf("  tiny llama (2 layers, 64 wide, 4 heads, RoPE); training problems have K = %d..%d steps;\n", K_MIN, K_MAX);
    printf("  accuracy: greedy, %d held-out problems per K (K = 8* is longer than any training chain)\n", sc->n_eval);
    printf("  1. direct vs coarse vs full chain-of-thought, %d SFT steps each (batch %d)\n", sc->sft_steps, SFT_BATCH);
    printf("  2. the full-chain model on an imperfect teacher's chains (a sign slip in 80%% of subtractions below\n"
           "     zero): %d SFT steps to a plateau, then %d more steps of the same SFT as the control (as much\n"
           "     compute as GRPO)\n", sc->teacher_steps, D.control_steps);
    printf("  3. from the plateau, %d iterations of 16 prompts x 8 samples each: GRPO, DPO, STaR\n", sc->rl_iters);
    printf("  %d jobs at a time, one core each\n\n", n_workers);
    double start = now();
    pthread_t th[4];
    for (int i = 0; i < n_workers; i++) pthread_create(&th[i], NULL, worker, NULL);
    print_header();
    display(isatty(1));
    for (int i = 0; i < n_workers; i++) pthread_join(th[i], NULL);
    double wall = now() - start;

    bool ok = !D.abort;
    char path[600];
    snprintf(path, sizeof path, "%s/results.tsv", out_dir);
    if (ok) {
        row r[N_JOBS + 1];
        int n = table_rows(r);
        printf("\nResults: greedy accuracy on held-out problems (K = 8* is longer than any training chain),\n"
               "mean completion length, optimiser steps and CPU seconds of each stage\n");
        print_header();
        for (int i = 0; i < n; i++) print_scores(r[i].name, r[i].s, r[i].steps, r[i].cpu);
        FILE *f = fopen(path, "w");
        ok = f != NULL;
        if (!f) fprintf(stderr, "cot_demo: cannot write %s\n", path);
        if (f) {
            fprintf(f, "stage");
            for (int k = 0; k < N_EVAL_K; k++) fprintf(f, "\tK=%d", EVAL_K[k]);
            fprintf(f, "\tmean_len\tsteps\tcpu_s\n");
            for (int i = 0; i < n; i++) {
                fprintf(f, "%s", r[i].name);
                for (int k = 0; k < N_EVAL_K; k++) fprintf(f, "\t%.4f", r[i].s->acc[k]);
                fprintf(f, "\t%.2f\t%d\t%.1f\n", r[i].s->mean_len, r[i].steps, r[i].cpu);
            }
            ok = fclose(f) == 0;
        }
        ok = ok && charts(out_dir);
        printf("\n  charts: %s/{1_formats,2_teacher,3_grpo,4_dpo,5_star}.svg   table: %s\n", out_dir, path);
        printf("  %.1f s in all (%d jobs at a time)\n", wall, n_workers);
    }
    for (int k = 0; k < N_JOBS; k++) {
        job *j = &D.jobs[k];
        series *all[] = {&j->loss, &j->reward, &j->zero_std, &j->kl, &j->margin, &j->chosen, &j->rejected,
                         &j->acc[0], &j->acc[1], &j->acc[2], &j->acc[3]};
        for (size_t i = 0; i < sizeof all / sizeof all[0]; i++) series_free(all[i]);
    }
    free(D.chains), free(D.plateau);
    return ok ? 0 : 1;
}
