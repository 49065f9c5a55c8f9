// cotlab: the command line. A thin program over cotlab.h: every subcommand is a loop of the
// header's calls (datasets, tokenizer, trainer, objectives, sampler, adapters, checkpoints).
//
//   cotlab sft | dpo | grpo | rft | generate | eval | export | merge | info | plot  [options]
//   cotlab <command> --help
#define COTLAB_IMPLEMENTATION
#include "../cotlab.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

// ---- options ----------------------------------------------------------------------------------

typedef enum { O_STR, O_INT, O_FLOAT, O_FLAG } opt_kind;

typedef struct opt {
    const char *name;   // without the leading "--"
    opt_kind kind;
    void *ptr;
    const char *help;
    double lo, hi;      // numbers: the accepted range, both ends included
} opt;

#define BIG 1099511627776.0   // 2^40: more steps, lines or problems than any run has

typedef struct options {      // every subcommand's options, with their defaults
    const char *model, *data, *out, *adapter, *init_adapter, *format, *prompt, *to, *adapters, *reward, *reward_cmd;
    const char *loss, *scale, *targets, *system, *base, *on_nonfinite, *details;
    int64_t threads, rank, batch, accum, seq_len, steps, epochs, warmup, save_every, keep, seed, group, prompts, max_new;
    int64_t top_k, iterations, samples, k, rounds, limit, log_every, length_budget, stop_at, streams;
    double alpha, dropout, density, lr, weight_decay, clip, min_lr, beta, eps, eps_high, delta, label_smoothing;
    double rpo_alpha, simpo_gamma, temperature, top_p, min_p, rep_penalty;
    int rslora, no_quantized, bf16, bf16_dot, resume, skip_bad, drop_long, per_sequence, mask_truncated, sequence_level, packing;
    int greedy, help, raw;
    const char *allow_change;
} options;

static void defaults(options *o) {
    memset(o, 0, sizeof *o);
    o->out = "runs/out", o->adapter = "lora", o->targets = "all", o->loss = "", o->scale = "group", o->reward = "math";
    o->to = "llamacpp", o->format = "auto", o->on_nonfinite = "stop";
    o->threads = 0, o->rank = 16, o->alpha = 32, o->batch = 4, o->accum = 1, o->seq_len = 256, o->steps = 0, o->epochs = 1;
    o->save_every = 50, o->keep = 3, o->seed = 42, o->group = 4, o->prompts = 2, o->max_new = 128, o->iterations = 1;
    o->samples = 4, o->k = 1, o->rounds = 1, o->log_every = 1, o->length_budget = 0, o->streams = 64;
    o->density = 0.01, o->lr = 2e-4, o->clip = 1.0, o->beta = -1, o->eps = 0.2, o->temperature = 1.0, o->top_p = 0;
    o->simpo_gamma = ctl_dpo_desc_default().simpo_gamma;   // TRL's
}

#define OPT_MODEL {"model", O_STR, &o->model, "PATH   the model: a GGUF file, or Hugging Face safetensors with --base (required)", 0, 0}, \
    {"base", O_STR, &o->base, "PATH   for safetensors weights: a GGUF of the same model (its shape and tokenizer)", 0, 0}, \
    {"threads", O_INT, &o->threads, "N      threads (0: every core)", 0, 1024}
#define OPT_ADAPTER {"adapter", O_STR, &o->adapter, "KIND   full | lora | dora | sparse (default lora)", 0, 0}, \
    {"rank", O_INT, &o->rank, "R      LoRA rank (16)", 1, 65536}, {"alpha", O_FLOAT, &o->alpha, "A      LoRA alpha (32)", 1e-06, 1e+06}, \
    {"dropout", O_FLOAT, &o->dropout, "P      LoRA dropout (0)", 0, 0.999}, {"rslora", O_FLAG, &o->rslora, "       alpha / sqrt(rank) scaling", 0, 0}, \
    {"targets", O_STR, &o->targets, "LIST   all | attn | mlp | q,k,v,o,gate,up,down (all)", 0, 0}, \
    {"density", O_FLOAT, &o->density, "D      sparse: the fraction of entries that train (0.01)", 1e-09, 1}, \
    {"no-quantized", O_FLAG, &o->no_quantized, "       dequantise a quantised base to fp32 (adapters keep it quantised)", 0, 0}, \
    {"bf16", O_FLAG, &o->bf16, "       hold the matrices not kept quantised as bf16 (half the memory)", 0, 0}, \
    {"bf16-dot", O_FLAG, &o->bf16_dot, "       with --bf16: multiply them in bf16 where the CPU can (AVX512_BF16)", 0, 0}, \
    {"init-adapter", O_STR, &o->init_adapter, "PATH   start from this cotlab adapter file", 0, 0}
#define OPT_TRAIN {"lr", O_FLOAT, &o->lr, "LR     peak learning rate (2e-4)", 0, 10}, {"warmup", O_INT, &o->warmup, "N      warmup steps (0)", 0, BIG}, \
    {"steps", O_INT, &o->steps, "N      optimiser steps (0: --epochs over the data)", 0, BIG}, {"epochs", O_INT, &o->epochs, "N      passes (1)", 1, 1e+06}, \
    {"weight-decay", O_FLOAT, &o->weight_decay, "W      AdamW weight decay (0)", 0, 1000}, {"clip", O_FLOAT, &o->clip, "C      gradient norm clip (1)", 0, 1e+09}, \
    {"min-lr-ratio", O_FLOAT, &o->min_lr, "R      the cosine ends at lr * R (0)", 0, 1}, \
    {"batch", O_INT, &o->batch, "B      sequences per micro-batch (4)", 1, 65536}, {"accum", O_INT, &o->accum, "N      micro-batches per step (1)", 1, 65536}, \
    {"seq-len", O_INT, &o->seq_len, "T      tokens per sequence (256)", 2, 16777216}, {"seed", O_INT, &o->seed, "S      seed of everything random (42)", -9.3e+18, 9.3e+18}, \
    {"out", O_STR, &o->out, "DIR    checkpoints, metrics.jsonl, adapter.gguf (runs/out)", 0, 0}, \
    {"save-every", O_INT, &o->save_every, "N      checkpoint every N steps (50)", 1, BIG}, {"keep", O_INT, &o->keep, "N      checkpoints kept (3)", 0, BIG}, \
    {"resume", O_FLAG, &o->resume, "       continue from the newest checkpoint in --out (of the same run)", 0, 0}, \
    {"allow-change", O_STR, &o->allow_change, "LIST   settings a resume may change: lr, steps", 0, 0}, \
    {"log-every", O_INT, &o->log_every, "N      metrics line every N steps (1)", 1, BIG}, \
    {"stop-at", O_INT, &o->stop_at, "N      stop after step N with a checkpoint, as if interrupted (for --resume)", 0, BIG}, \
    {"on-nonfinite", O_STR, &o->on_nonfinite, "WHAT   a NaN or infinity in a step: stop (the run ends) | skip (the step is dropped)", 0, 0}, \
    {"drop-long", O_FLAG, &o->drop_long, "       drop examples longer than --seq-len (default: keep their start)", 0, 0}
#define OPT_DATA {"data", O_STR, &o->data, "PATH   JSONL data (required)", 0, 0}, \
    {"format", O_STR, &o->format, "F      auto | text | prompt-completion | messages | preference | prompt | gsm8k", 0, 0}, \
    {"skip-bad", O_FLAG, &o->skip_bad, "       skip malformed lines (counted) instead of stopping", 0, 0}
#define OPT_SAMPLE {"max-new", O_INT, &o->max_new, "N      new tokens per completion (128)", 1, 16777216}, \
    {"temperature", O_FLOAT, &o->temperature, "T      sampling temperature (1; 0 greedy)", 0, 100}, {"top-k", O_INT, &o->top_k, "K      (off)", 0, 2147483648}, \
    {"top-p", O_FLOAT, &o->top_p, "P      (off)", 0, 1}, {"min-p", O_FLOAT, &o->min_p, "P      (off)", 0, 1}, \
    {"repetition-penalty", O_FLOAT, &o->rep_penalty, "R      (off)", 0, 100}, \
    {"system", O_STR, &o->system, "TEXT   a system message for chat prompts", 0, 0}
#define OPT_HELP {"help", O_FLAG, &o->help, "       this text", 0, 0}, {NULL, O_FLAG, NULL, NULL, 0, 0}
#define OPT_END {"raw", O_FLAG, &o->raw, "       text prompts as plain text, not as chat turns of the model's template", 0, 0}, OPT_HELP

static void usage(const char *cmd, const char *what, const opt *opts) {
    printf("cotlab %s: %s\n\noptions:\n", cmd, what);
    for (const opt *p = opts; p->name; p++) printf("  --%-20s %s\n", p->name, p->help);
}

// Parses argv into the table; positional arguments (for plot and compare, up to two) go to
// pos. Returns false with a message on an unknown option or a bad value.
static bool parse(int argc, char **argv, const opt *opts, const char **pos) {
    for (int i = 0; i < argc; i++) {
        const char *a = !strcmp(argv[i], "-o") ? "--out" : argv[i];
        if (strncmp(a, "--", 2)) {
            if (pos && !pos[0]) { pos[0] = a; continue; }
            if (pos && !pos[1]) { pos[1] = a; continue; }
            fprintf(stderr, "cotlab: unexpected argument '%s'\n", a);
            return false;
        }
        const opt *p = opts;
        while (p->name && strcmp(p->name, a + 2)) p++;
        if (!p->name) {
            fprintf(stderr, "cotlab: unknown option '%s' (see --help)\n", a);
            return false;
        }
        if (p->kind == O_FLAG) { *(int *)p->ptr = 1; continue; }
        if (i + 1 >= argc) {
            fprintf(stderr, "cotlab: %s needs a value\n", a);
            return false;
        }
        const char *v = argv[++i];
        if (p->kind == O_STR) {
            *(const char **)p->ptr = v;
            continue;
        }
        // A number: the whole value read (no trailing text, no overflow), finite, in range.
        char *end = NULL;
        errno = 0;
        long long iv = p->kind == O_INT ? strtoll(v, &end, 10) : 0;
        double dv = p->kind == O_INT ? (double)iv : strtod(v, &end);
        if (errno || !end || *end || end == v || !isfinite(dv)) {
            fprintf(stderr, "cotlab: %s: '%s' is not a%s number%s\n", a, v, p->kind == O_INT ? " whole" : " finite",
                    errno == ERANGE ? " this program can hold" : "");
            return false;
        }
        if (dv < p->lo || dv > p->hi) {
            fprintf(stderr, "cotlab: %s %s is outside [%.15g, %.15g]\n", a, v, p->lo, p->hi);
            return false;
        }
        if (p->kind == O_INT) *(int64_t *)p->ptr = iv;
        else *(double *)p->ptr = dv;
    }
    return true;
}

// A failure while running (exit status 1), said on stderr; false, for `return fail(...)`.
static bool fail(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "cotlab: ");
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, "\n");
    va_end(ap);
    return false;
}

// A usage error: the command line asks for something that cannot be (exit status 2).
static bool usage_error;
#define bad(...) (usage_error = true, fail(__VA_ARGS__))

#define TRY(call) do { ctl_status st_ = (call); if (st_) return fail("%s", ctl_last_error(ctx)); } while (0)

// Whether `bytes` fit in this machine's memory (and the process's address-space limit);
// refused with a message saying what asked for them.
static bool affordable(double bytes, const char *what) {
    long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGESIZE);
    double have = pages > 0 && page > 0 ? (double)pages * (double)page : INFINITY;
    struct rlimit rl;
    if (!getrlimit(RLIMIT_AS, &rl) && rl.rlim_cur != RLIM_INFINITY) have = fmin(have, (double)rl.rlim_cur);
    return bytes <= have || bad("%s need %.0f MB; this machine (or ulimit -v) allows %.0f MB", what, bytes / 1e6, have / 1e6);
}

// Text outputs written whole: into "<path>.tmp.<pid>", flushed to the disk, then renamed over
// path, so a failure (a full disk) leaves the file that was there.
typedef struct out_file {
    FILE *f;
    const char *path;
    char tmp[4200];
} out_file;

static bool out_open(out_file *of, const char *path, const char *what) {
    of->path = path, of->f = NULL;
    if (strlen(path) > 4096) return bad("%s: the path is longer than 4096 characters", what);
    snprintf(of->tmp, sizeof of->tmp, "%s.tmp.%ld", path, (long)getpid());
    return (of->f = fopen(of->tmp, "w")) != NULL || fail("%s: cannot write '%s': %s", what, of->tmp, strerror(errno));
}

static bool out_close(out_file *of, bool ok) {
    if (!of->f) return false;
    ok = !ferror(of->f) && fflush(of->f) == 0 && fsync(fileno(of->f)) == 0 && ok;
    int err = errno;
    ok = fclose(of->f) == 0 && ok;
    of->f = NULL;
    if (ok && rename(of->tmp, of->path) == 0) return true;
    remove(of->tmp);
    return fail("cannot write '%s' (%s); it is as it was", of->path, strerror(err ? err : errno));
}

// ---- the model and its adapters ---------------------------------------------------------------

typedef struct session {
    ctl_ctx *ctx;
    ctl_gguf *gguf;
    ctl_model *m;
    ctl_tokenizer *tk;
    ctl_chat_template tmpl;
    bool have_tmpl;
} session;

static bool open_model(session *s, const options *o, bool quantized) {
    ctl_ctx_desc cd = ctl_ctx_desc_default();
    if (o->threads > 0) cd.n_threads = (int)o->threads;
    cd.bf16_dot = o->bf16_dot != 0;
    if (o->bf16_dot && !o->bf16) return bad("--bf16-dot multiplies bf16 weights: it needs --bf16");
    if (ctl_ctx_init(&s->ctx, &cd)) return fail("cannot make a context");
    ctl_ctx *ctx = s->ctx;
    if (!o->model) return bad("--model is required");
    size_t ml = strlen(o->model);
    bool st_file = ml > 12 && !strcmp(o->model + ml - 12, ".safetensors");
    if (st_file && !o->base) return bad("--model %s: a safetensors file needs --base, a GGUF of the same model for its shape and tokenizer", o->model);
    TRY(ctl_gguf_open(ctx, st_file ? o->base : o->model, &s->gguf));
    if (st_file && o->bf16) return bad("--bf16: a safetensors model loads as fp32; --bf16 needs a GGUF --model");
    ctl_model_desc md = {quantized && !st_file, o->bf16 != 0};
    TRY(ctl_model_from_gguf(ctx, s->gguf, &md, &s->m));
    if (st_file) TRY(ctl_model_load_safetensors(s->m, o->model));   // Hugging Face names and layout
    TRY(ctl_tokenizer_from_gguf(ctx, s->gguf, &s->tk));
    s->have_tmpl = ctl_chat_template_from_gguf(ctx, s->gguf, &s->tmpl) == CTL_OK;
    return true;
}

static void close_session(session *s) {
    if (s->tk) ctl_tokenizer_free(s->tk);
    if (s->m) ctl_model_free(s->m);
    if (s->gguf) ctl_gguf_close(s->gguf);
    if (s->ctx) ctl_ctx_free(s->ctx);
}

static bool parse_targets(const char *list, uint32_t *out) {
    static const struct { const char *name; uint32_t bits; } t[] = {
        {"all", CTL_LINEAR_ALL}, {"attn", CTL_LINEAR_ATTN}, {"mlp", CTL_LINEAR_MLP}, {"q", CTL_LINEAR_Q}, {"k", CTL_LINEAR_K},
        {"v", CTL_LINEAR_V}, {"o", CTL_LINEAR_O}, {"gate", CTL_LINEAR_GATE}, {"up", CTL_LINEAR_UP}, {"down", CTL_LINEAR_DOWN},
        {"head", CTL_LINEAR_HEAD}, {"embed", CTL_LINEAR_EMBED}};
    *out = 0;
    for (const char *p = list; *p;) {
        size_t n = strcspn(p, ","), k = 0;
        while (k < sizeof t / sizeof *t && (strlen(t[k].name) != n || strncmp(t[k].name, p, n))) k++;
        if (k == sizeof t / sizeof *t) return bad("--targets: unknown '%.*s' (all, attn, mlp, q, k, v, o, gate, up, down, head, embed)", (int)n, p);
        *out |= t[k].bits;
        p += n + (p[n] == ',');
    }
    return *out != 0 || bad("--targets is empty");
}

// Loads the model (quantised base kept for adapters unless --no-quantized) and attaches the
// adapter the options ask for.
static bool setup_model(session *s, const options *o) {
    bool full = !strcmp(o->adapter, "full");
    if (!full && strcmp(o->adapter, "lora") && strcmp(o->adapter, "dora") && strcmp(o->adapter, "sparse"))
        return bad("--adapter: '%s' is not full, lora, dora or sparse", o->adapter);
    if (full && o->bf16) return bad("--bf16: a bf16 base is frozen; full fine-tuning needs fp32 (drop --bf16)");
    if (!open_model(s, o, !full && !o->no_quantized)) return false;
    ctl_ctx *ctx = s->ctx;
    uint32_t targets;
    if (!parse_targets(o->targets, &targets)) return false;
    if (o->init_adapter) {
        TRY(ctl_adapter_load(s->m, o->init_adapter));
    } else if (!strcmp(o->adapter, "lora") || !strcmp(o->adapter, "dora")) {
        ctl_lora_desc ld;
        memset(&ld, 0, sizeof ld);
        ld.rank = o->rank, ld.alpha = (float)o->alpha, ld.dropout = (float)o->dropout, ld.targets = targets;
        ld.rslora = o->rslora, ld.dora = !strcmp(o->adapter, "dora"), ld.seed = (uint64_t)o->seed;
        TRY(ctl_lora_attach(s->m, &ld));
    } else if (!strcmp(o->adapter, "sparse")) {
        ctl_sparse_desc sd;
        memset(&sd, 0, sizeof sd);
        sd.density = (float)o->density, sd.targets = targets, sd.seed = (uint64_t)o->seed;
        TRY(ctl_sparse_attach(s->m, &sd));
    }
    return true;
}

// ---- progress, metrics, checkpoints -----------------------------------------------------------

typedef struct run {
    const options *o;
    session *s;
    ctl_train *t;
    FILE *metrics;
    double start, last;
    int64_t total_steps, tokens, first_step, skipped, skipped_examples;
    bool tty;
} run;

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static void json_str(FILE *f, const char *s) {
    fputc('"', f);
    for (; *s; s++) {
        unsigned char c = (unsigned char)*s;
        if (c == '"' || c == '\\') fprintf(f, "\\%c", c);
        else if (c == '\n') fputs("\\n", f);
        else if (c == '\t') fputs("\\t", f);
        else if (c < 0x20) fprintf(f, "\\u%04x", c);
        else fputc(c, f);
    }
    fputc('"', f);
}

// One metrics line (and the terminal's progress line) after optimiser step st.
static void log_step(run *r, const ctl_step_stats *st, double loss, const ctl_objective_out *obj) {
    double t = now(), rate = (double)r->tokens / (t - r->start + 1e-9);
    if (r->metrics && (st->step % r->o->log_every == 0 || st->step == r->total_steps)) {
        fprintf(r->metrics, "{\"step\": %lld, \"loss\": %.17g, \"lr\": %.6g, \"grad_norm\": %.9g, \"tokens_per_s\": %.1f",
                (long long)st->step, loss, st->lr, st->grad_norm, rate);
        for (int i = 0; obj && i < obj->n_metrics; i++)
            if (isfinite(obj->metrics[i].value)) fprintf(r->metrics, ", \"%s\": %.9g", obj->metrics[i].name, obj->metrics[i].value);
        if (r->skipped) fprintf(r->metrics, ", \"skipped_steps\": %lld", (long long)r->skipped);
        if (r->skipped_examples) fprintf(r->metrics, ", \"skipped_examples\": %lld", (long long)r->skipped_examples);
        fprintf(r->metrics, "}\n");
        fflush(r->metrics);
    }
    // The progress line: on a terminal rewritten in place; elsewhere (a log, CI) a line every 30 s.
    if (t - r->last > (r->tty ? 0.2 : 30.0) || st->step == r->total_steps) {
        double eta = (t - r->start) / (double)CTL__MAX(st->step - r->first_step, 1) * (double)(r->total_steps - st->step);
        fprintf(stderr, "%sstep %lld/%lld  loss %.4f  lr %.2e  %.0f tok/s  ETA %dm%02ds", r->tty ? "\r\033[K" : "", (long long)st->step,
                (long long)r->total_steps, loss, st->lr, rate, (int)(eta / 60), (int)eta % 60);
        double rw = obj ? ctl_metric_get(obj, "reward") : NAN, kl = obj ? ctl_metric_get(obj, "kl") : NAN;
        if (isfinite(rw)) fprintf(stderr, "  reward %.3f", rw);
        if (isfinite(kl)) fprintf(stderr, "  kl %.4f", kl);
        if (st->step == r->total_steps || !r->tty) fputc('\n', stderr);
        r->last = t;
    }
}

// Paths under --out: PATH_CAP bytes always hold them (--out is checked to leave room), so no
// name is ever cut short.
#define PATH_CAP 4096

static bool join(char *out, const char *dir, const char *fmt, ...) {
    va_list ap;
    int n = snprintf(out, PATH_CAP, "%s/", dir);
    va_start(ap, fmt);
    n = n < 0 || n >= PATH_CAP ? -1 : vsnprintf(out + n, (size_t)(PATH_CAP - n), fmt, ap);
    va_end(ap);
    return (n >= 0 && strlen(out) < PATH_CAP - 1) || fail("the path under '%.64s...' is too long", dir);
}

static void ckpt_path(const options *o, int64_t step, char *out) { join(out, o->out, "ckpt-%08lld.gguf", (long long)step); }

static int cmp_step_desc(const void *a, const void *b) {
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return (x < y) - (x > y);
}

// The steps of the checkpoints in --out, newest first (malloc'd; *n of them).
static int64_t *list_ckpts(const options *o, int64_t *n) {
    DIR *d = opendir(o->out);
    struct dirent *de;
    int64_t cap = 0, *steps = NULL;
    long long step;
    char tail[8];
    *n = 0;
    while (d && (de = readdir(d))) {
        if (sscanf(de->d_name, "ckpt-%lld.gguf%1s", &step, tail) != 1 || step <= 0) continue;
        if (*n == cap) {
            int64_t *grown = (int64_t *)realloc(steps, (size_t)(cap = 2 * cap + 16) * sizeof *steps);
            if (!grown) break;
            steps = grown;
        }
        steps[(*n)++] = step;
    }
    if (d) closedir(d);
    if (*n) qsort(steps, (size_t)*n, sizeof *steps, cmp_step_desc);
    return steps;
}

// The newest checkpoint in --out: its step, or 0 when there is none.
static int64_t newest_ckpt(const options *o, char *path) {
    int64_t n, *steps = list_ckpts(o, &n), step = n ? steps[0] : 0;
    if (step) ckpt_path(o, step, path);
    free(steps);
    return step;
}

// Saves a checkpoint (the trainer's, with the run's own state) after making the metrics so far
// durable, then removes those beyond the newest --keep.
static bool save_ckpt(run *r, const ctl_run_state *rs) {
    ctl_ctx *ctx = r->s->ctx;
    char path[PATH_CAP];
    if (fflush(r->metrics) || fsync(fileno(r->metrics))) return fail("cannot write %s/metrics.jsonl: %s", r->o->out, strerror(errno));
    ckpt_path(r->o, rs->counter, path);
    TRY(ctl_train_save(r->t, path, rs));
    int64_t n = 0, *steps = r->o->keep > 0 ? list_ckpts(r->o, &n) : NULL;
    for (int64_t k = r->o->keep; k < n; k++) ckpt_path(r->o, steps[k], path), remove(path);
    free(steps);
    return true;
}

// A call in training step `step` failed with st. A NaN or infinity under --on-nonfinite skip
// drops the step (its gradients; the data it read stays read) and the run goes on; anything
// else stops the run, its checkpoints as they were.
static bool step_failed(run *r, ctl_status st, int64_t step, bool *skipped) {
    ctl_ctx *ctx = r->s->ctx;
    char path[PATH_CAP];
    if (st != CTL_ERR_NONFINITE) return fail("%s", ctl_last_error(ctx));
    if (!strcmp(r->o->on_nonfinite, "skip")) {
        ctl_train_discard(r->t);
        r->skipped++, *skipped = true;
        fprintf(stderr, "%sstep %lld skipped: %s\n", r->tty ? "\r\033[K" : "", (long long)step, ctl_last_error(ctx));
        return true;
    }
    int64_t newest = newest_ckpt(r->o, path);
    fail("step %lld: %s", (long long)step, ctl_last_error(ctx));
    if (newest) return fail("the run stops (--on-nonfinite skip would drop the step); the newest checkpoint is %s (step %lld)", path, (long long)newest);
    return fail("the run stops (--on-nonfinite skip would drop the step); no checkpoint was written");
}

// Opens metrics.jsonl, which is only ever appended to. A resumed run first ends a line torn by
// a crash, then marks where it resumed: its lines repeat the steps after that checkpoint (a
// reader keeps the last line of each step; plot does).
static bool open_metrics(run *r, int64_t resume_step) {
    char path[PATH_CAP];
    if (!join(path, r->o->out, "metrics.jsonl")) return false;
    r->metrics = fopen(path, resume_step > 0 ? "a+" : "w");
    if (!r->metrics) return fail("cannot write %s: %s", path, strerror(errno));
    if (resume_step > 0) {
        bool torn = fseek(r->metrics, -1, SEEK_END) == 0 && fgetc(r->metrics) != '\n';
        fseek(r->metrics, 0, SEEK_END);
        fprintf(r->metrics, "%s{\"resumed_from_step\": %lld}\n", torn ? "\n" : "", (long long)resume_step);
    }
    return true;
}

static bool make_dir(const char *dir) {
    if (strlen(dir) > PATH_CAP - 100) return bad("--out '%.64s...' is longer than %d characters", dir, PATH_CAP - 100);
    char buf[PATH_CAP];
    snprintf(buf, sizeof buf, "%s", dir);
    for (char *p = buf + 1; *p; p++)
        if (*p == '/') *p = 0, mkdir(buf, 0777), *p = '/';
    if (mkdir(buf, 0777) && errno != EEXIST) return fail("cannot make the directory '%s': %s", dir, strerror(errno));
    struct stat st;
    if (stat(buf, &st) || !S_ISDIR(st.st_mode)) return bad("--out '%s' is not a directory", dir);
    return true;
}

// One run at a time in a directory: a lock on <dir>/lock (released when the process ends,
// however it ends), which holds the pid of the run that has it.
static bool lock_dir(const char *dir) {
    char path[PATH_CAP];
    if (!join(path, dir, "lock")) return false;
    int fd = open(path, O_RDWR | O_CREAT, 0644);
    if (fd < 0) return fail("cannot open %s: %s", path, strerror(errno));
    struct flock fl;
    memset(&fl, 0, sizeof fl);
    fl.l_type = F_WRLCK, fl.l_whence = SEEK_SET;
    if (fcntl(fd, F_SETLK, &fl) != 0) {
        char pid[32] = "";
        ssize_t n = read(fd, pid, sizeof pid - 1);
        pid[n > 0 ? n : 0] = 0, pid[strcspn(pid, "\n")] = 0;
        close(fd);
        return fail("'%s' is in use by another run (pid %s); wait for it to end, or give another --out", dir, pid[0] ? pid : "unknown");
    }
    char pid[32];
    int n = snprintf(pid, sizeof pid, "%ld\n", (long)getpid());
    if (ftruncate(fd, 0) || write(fd, pid, (size_t)n) != n) return close(fd), fail("cannot write %s", path);
    DIR *d = opendir(dir);   // what writers killed mid-file left ("ckpt-00000004.gguf.tmp.1234"): nobody else writes here
    for (struct dirent *de; d && (de = readdir(d));)
        if (strstr(de->d_name, ".tmp.") && join(path, dir, "%s", de->d_name)) remove(path);
    if (d) closedir(d);
    return true;   // fd stays open: closing it would drop the lock
}

// Refuses to write `out` (what: which option names it) over one of the run's inputs.
static bool not_an_input(const options *o, const char *out, const char *what) {
    const char *in[] = {o->model, o->base, o->data, o->init_adapter};
    struct stat a, b;
    if (!out || stat(out, &a)) return true;   // (a file that does not exist yet is no input)
    for (size_t i = 0; i < sizeof in / sizeof *in; i++)
        if (in[i] && !stat(in[i], &b) && a.st_dev == b.st_dev && a.st_ino == b.st_ino)
            return bad("%s '%s' is the input '%s': it would be written over", what, out, in[i]);
    for (const char *p = o->adapters; p && *p;) {   // merge's list: a.gguf:0.5,b.gguf
        size_t n = strcspn(p, ","), k = n;
        while (k > 0 && p[k - 1] != ':') k--;
        char name[PATH_CAP];
        snprintf(name, sizeof name, "%.*s", (int)(k ? k - 1 : n), p);
        if (!stat(name, &b) && a.st_dev == b.st_dev && a.st_ino == b.st_ino) return bad("%s '%s' is the input '%s': it would be written over", what, out, name);
        p += n + (p[n] == ',');
    }
    return true;
}

// A file's content as 64 bits (the identity of a run's model and data); 0 when unreadable.
static uint64_t hash_file(const char *path) {
    FILE *f = path ? fopen(path, "rb") : NULL;
    if (!f) return 0;
    static unsigned char buf[1 << 20];
    uint64_t h = 0x243f6a8885a308d3ull;
    size_t n;
    while ((n = fread(buf, 1, sizeof buf, f)) > 0)
        for (size_t i = 0; i < n; i += 8) {
            uint64_t w = 0;
            memcpy(&w, buf + i, CTL__MIN(8, n - i));
            h = (h ^ w) * 0x9e3779b97f4a7c15ull, h ^= h >> 29;
        }
    fclose(f);
    return h;
}

// What the run is, as "key=value" lines: everything that shapes its results (the adapter, the
// model's and data's content, the hyper-parameters), not how it is watched (threads, logging,
// checkpoint spacing). A checkpoint carries it; a resume must match it.
static char *run_config(const options *o, const char *cmd, int64_t steps) {
    static char text[8192];
    char *w = text, *e = text + sizeof text;
#define KV(fmt, ...) (w += snprintf(w, (size_t)(e - w), fmt "\n", __VA_ARGS__), w = w < e ? w : e - 1)
    KV("command=%s", cmd);
    KV("adapter=%s", o->adapter), KV("rank=%lld", (long long)o->rank), KV("alpha=%.9g", o->alpha), KV("dropout=%.9g", o->dropout);
    KV("rslora=%d", o->rslora), KV("targets=%s", o->targets), KV("density=%.9g", o->density);
    KV("no_quantized=%d", o->no_quantized), KV("bf16=%d", o->bf16), KV("bf16_dot=%d", o->bf16_dot);
    KV("model=%016llx", (unsigned long long)hash_file(o->model)), KV("base=%016llx", (unsigned long long)hash_file(o->base));
    KV("init_adapter=%016llx", (unsigned long long)hash_file(o->init_adapter)), KV("data=%016llx", (unsigned long long)hash_file(o->data));
    KV("format=%s", o->format), KV("skip_bad=%d", o->skip_bad), KV("drop_long=%d", o->drop_long), KV("packing=%d", o->packing);
    KV("raw=%d", o->raw), KV("system=%s", o->system ? o->system : ""), KV("per_sequence=%d", o->per_sequence);
    KV("seq_len=%lld", (long long)o->seq_len), KV("batch=%lld", (long long)o->batch), KV("accum=%lld", (long long)o->accum);
    KV("seed=%lld", (long long)o->seed), KV("lr=%.9g", o->lr), KV("steps=%lld", (long long)steps), KV("warmup=%lld", (long long)o->warmup);
    KV("weight_decay=%.9g", o->weight_decay), KV("clip=%.9g", o->clip), KV("min_lr_ratio=%.9g", o->min_lr), KV("on_nonfinite=%s", o->on_nonfinite);
    KV("loss=%s", o->loss), KV("beta=%.9g", o->beta), KV("label_smoothing=%.9g", o->label_smoothing), KV("rpo_alpha=%.9g", o->rpo_alpha);
    KV("simpo_gamma=%.9g", o->simpo_gamma), KV("group=%lld", (long long)o->group), KV("prompts=%lld", (long long)o->prompts);
    KV("max_new=%lld", (long long)o->max_new), KV("temperature=%.9g", o->temperature), KV("top_k=%lld", (long long)o->top_k);
    KV("top_p=%.9g", o->top_p), KV("min_p=%.9g", o->min_p), KV("repetition_penalty=%.9g", o->rep_penalty), KV("reward=%s", o->reward);
    KV("reward_cmd=%s", o->reward_cmd ? o->reward_cmd : ""), KV("length_budget=%lld", (long long)o->length_budget);
    KV("epsilon=%.9g", o->eps), KV("epsilon_high=%.9g", o->eps_high), KV("delta=%.9g", o->delta), KV("scale=%s", o->scale);
    KV("iterations=%lld", (long long)o->iterations), KV("sequence_level=%d", o->sequence_level), KV("mask_truncated=%d", o->mask_truncated);
#undef KV
    return text;
}

// Whether a checkpoint's run (its config text) is this one: each of its keys has the same value
// here, but for those --allow-change names. Refuses naming the first that differs.
static bool same_run(const options *o, const char *path, const char *saved, size_t len, const char *now_cfg) {
    for (const char *p = saved, *end = saved + len; p < end;) {
        const char *nl = memchr(p, '\n', (size_t)(end - p)), *eq = memchr(p, '=', (size_t)(end - p));
        nl = nl ? nl : end;
        if (eq && eq < nl) {
            size_t kl = (size_t)(eq - p), vl = (size_t)(nl - eq - 1);
            const char *q = now_cfg;   // the line of the same key in this run's text
            while (q && strncmp(q, p, kl + 1)) q = strchr(q, '\n'), q = q && q[1] ? q + 1 : NULL;
            size_t ql = q ? strcspn(q + kl + 1, "\n") : 0;
            bool same = q && ql == vl && !strncmp(q + kl + 1, eq + 1, vl);
            char key[64];
            snprintf(key, sizeof key, "%.*s", (int)CTL__MIN(kl, sizeof key - 1), p);
            bool allowed = false;
            for (const char *a = o->allow_change; a && *a;) {
                size_t n = strcspn(a, ",");
                allowed |= n == strlen(key) && !strncmp(a, key, n);
                a += n + (a[n] == ',');
            }
            if (!same && !allowed)
                return bad("--resume: %s was made by a run with %.*s, this one has %s=%.*s; resume with the same settings%s", path,
                           (int)(nl - p), p, key, (int)ql, q ? q + kl + 1 : "", !strcmp(key, "lr") || !strcmp(key, "steps")
                           ? " (or --allow-change lr,steps if that is meant)" : " (or another --out for a new run)");
        }
        p = nl + 1;
    }
    return true;
}

// SIGINT and SIGTERM during training: the current step finishes, a checkpoint is written, and
// the program exits with 128 + the signal; a second signal ends it at once.
static volatile sig_atomic_t stop_signal;

static void on_signal(int sig) {
    if (stop_signal) signal(sig, SIG_DFL), raise(sig);
    stop_signal = sig;
}

static void catch_signals(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, NULL), sigaction(SIGTERM, &sa, NULL);
}

// Makes the trainer and, with --resume, restores the newest checkpoint of this run that loads
// (saying which it skipped and why); without --resume, --out must not hold one.
static bool start_run(run *r, session *s, const options *o, const char *cmd, int64_t rows, ctl_run_state *rs, int64_t steps) {
    ctl_ctx *ctx = s->ctx;
    memset(r, 0, sizeof *r);
    r->o = o, r->s = s, r->total_steps = steps, r->tty = isatty(2);
    char path[PATH_CAP];
    bool full = !strcmp(o->adapter, "full");
    if (!make_dir(o->out) || !lock_dir(o->out)) return false;
    if (!join(path, o->out, full ? "model.gguf" : "adapter.gguf") || !not_an_input(o, path, "--out's final file")) return false;
    if (!join(path, o->out, "metrics.jsonl") || !not_an_input(o, path, "--out's metrics")) return false;
    ctl_train_desc td;
    memset(&td, 0, sizeof td);
    td.batch = rows, td.seq_len = o->seq_len, td.seed = (uint64_t)o->seed, td.entropy = true;
    td.optim.lr = (float)o->lr, td.optim.warmup = o->warmup, td.optim.total_steps = steps, td.optim.clip = (float)o->clip;
    td.optim.weight_decay = (float)o->weight_decay, td.optim.min_lr_ratio = (float)o->min_lr;
    if (o->seq_len > ctl_model_cfg(s->m)->n_ctx) return bad("--seq-len %lld exceeds the model's context of %lld", (long long)o->seq_len, (long long)ctl_model_cfg(s->m)->n_ctx);
    ctl_memory_plan plan;
    TRY(ctl_train_plan_model(s->m, &td, &plan));
    if (!affordable((double)plan.total, "training (--batch x --seq-len, the adapter)")) return false;
    memset(rs, 0, sizeof *rs);
    ctl_rng rng;
    ctl_rng_seed(&rng, (uint64_t)o->seed);
    memcpy(rs->rng, rng.s, sizeof rs->rng);
    const char *cfg = run_config(o, cmd, steps);
    int64_t resume_step = 0, n_ckpt = 0, *ckpts = list_ckpts(o, &n_ckpt);
    if (n_ckpt && !o->resume) {
        long long newest = (long long)ckpts[0];
        free(ckpts);
        return bad("'%s' holds checkpoints of a run (the newest: step %lld): --resume continues it; another --out starts anew", o->out, newest);
    }
    // The adapters are attached as at the start; the checkpoint restores their values.
    TRY(ctl_train_init(s->m, &td, &r->t));
    bool ok = true;
    for (int64_t k = 0; ok && k < n_ckpt && !resume_step; k++) {
        ckpt_path(o, ckpts[k], path);
        ctl_gguf *g = NULL;
        const char *saved = NULL;
        size_t len = 0;
        ctl_status st = ctl_gguf_open(ctx, path, &g);
        if (!st && !ctl_gguf_get_str(g, "cotlab.run.config", &saved, &len)) ok = same_run(o, path, saved, len, cfg);
        if (g) ctl_gguf_close(g);
        if (ok && !st && (st = ctl_train_load(r->t, path, rs)) == CTL_ERR_INVALID) ok = fail("--resume: %s", ctl_last_error(ctx));
        if (ok && st) fprintf(stderr, "skipped %s: %s\n", path, ctl_last_error(ctx));
        if (ok && !st) resume_step = ckpts[k], fprintf(stderr, "resumed from %s (step %lld)\n", path, (long long)resume_step);
    }
    free(ckpts);
    if (!ok) return false;
    if (o->resume && !resume_step) fprintf(stderr, "%s in %s: starting afresh\n", n_ckpt ? "no checkpoint loads" : "no checkpoint", o->out);
    rs->config = cfg;
    ctl_train_memory(r->t, &plan);
    int64_t trainable = 0;
    for (int64_t i = 0; i < ctl_model_param_count(s->m); i++)
        if (ctl_model_param(s->m, i)->trainable) trainable += ctl_tensor_numel(&ctl_model_param(s->m, i)->value);
    fprintf(stderr, "%s: %lld trainable weights of %lld, %.0f MB planned, %lld steps, %d threads\n", o->adapter,
            (long long)trainable, (long long)ctl_model_numel(s->m), (double)plan.total / 1e6, (long long)steps, ctl_ctx_threads(ctx));
    r->first_step = resume_step;
    if (!open_metrics(r, resume_step)) return false;
    catch_signals();
    r->start = r->last = now();
    return true;
}

// After a step: on SIGINT or SIGTERM, a checkpoint of where the run is, and the run ends.
static bool interrupted(run *r, const ctl_run_state *rs) {
    if (!stop_signal) return false;
    bool saved = rs->counter % r->o->save_every == 0 || (rs->counter > r->first_step && save_ckpt(r, rs));
    fprintf(stderr, "%s%s: stopped after step %lld%s\n", r->tty ? "\r\033[K" : "", stop_signal == SIGINT ? "interrupted" : "terminated",
            (long long)rs->counter, saved && rs->counter > 0 ? " with a checkpoint; --resume continues" : rs->counter > r->first_step
            ? ", but its checkpoint could not be written" : "");
    return true;
}

static double peak_mb(void) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return (double)ru.ru_maxrss / 1024.0;   // kilobytes on Linux
}

static bool finish_run(run *r, const ctl_run_state *rs) {
    ctl_ctx *ctx = r->s->ctx;
    char path[PATH_CAP];
    if (rs->counter % r->o->save_every != 0 && !save_ckpt(r, rs)) return false;
    bool full = !strcmp(r->o->adapter, "full");
    if (!join(path, r->o->out, full ? "model.gguf" : "adapter.gguf")) return false;
    if (!full) {
        TRY(ctl_adapter_save(r->s->m, path));
    } else {
        TRY(ctl_model_export_gguf(r->s->m, r->s->gguf, path, CTL_GGML_F32));
    }
    if (fsync(fileno(r->metrics))) return fail("cannot write %s/metrics.jsonl: %s", r->o->out, strerror(errno));
    fprintf(stderr, "wrote %s and %s/metrics.jsonl (%.1f s)\n", path, r->o->out, now() - r->start);
    printf("{\"steps\": %lld, \"seconds\": %.1f, \"tokens_per_s\": %.1f, \"peak_mb\": %.0f}\n", (long long)(rs->counter - r->first_step),
           now() - r->start, (double)r->tokens / (now() - r->start + 1e-9), peak_mb());
    if (r->skipped) fprintf(stderr, "%lld steps skipped for non-finite values (--on-nonfinite skip)\n", (long long)r->skipped);
    if (r->metrics) fclose(r->metrics);
    ctl_train_free(r->t);
    return true;
}

// ---- data to batches --------------------------------------------------------------------------

static bool open_data(session *s, const options *o, ctl_dataset **ds) {
    static const char *const names[7] = {"auto", "text", "prompt-completion", "messages", "preference", "prompt", "gsm8k"};
    ctl_dataset_desc dd;
    memset(&dd, 0, sizeof dd);
    int f = 0;
    while (f < 7 && strcmp(names[f], o->format)) f++;
    if (f == 7) return bad("--format: unknown '%s'", o->format);
    dd.format = (ctl_data_format)f, dd.skip_bad = o->skip_bad;
    if (!o->data) return bad("--data is required");
    ctl_ctx *ctx = s->ctx;
    TRY(ctl_dataset_open(ctx, o->data, &dd, ds));
    if (ctl_dataset_skipped(*ds)) fprintf(stderr, "%s: skipped %lld malformed lines\n", o->data, (long long)ctl_dataset_skipped(*ds));
    return true;
}

// How the examples become tokens: text prompts asked as user turns of the model's chat
// template (unless --raw), conversations through it.
static ctl_encoding encoding_of(const session *s, const options *o) {
    ctl_encoding e;
    memset(&e, 0, sizeof e);
    e.tokenizer = s->tk, e.chat = s->have_tmpl ? &s->tmpl : NULL, e.text_as_chat = !o->raw, e.system = o->system;
    return e;
}

// ---- sft and dpo ------------------------------------------------------------------------------

static int64_t planned_steps(const options *o, int64_t n_examples, int64_t per_step) {
    return o->steps > 0 ? o->steps : CTL__MAX(1, o->epochs * n_examples / per_step);
}

// Both supervised loops: each step is ctl_train_batches over a batcher of SFT rows (one per
// example, or packed) or preference rows (a chosen and a rejected row per example).
static bool cmd_train(const options *o, bool dpo) {
    session s;
    memset(&s, 0, sizeof s);
    ctl_dataset *ds = NULL;
    bool ok = setup_model(&s, o) && open_data(&s, o, &ds);
    if (!ok) return close_session(&s), false;
    ctl_ctx *ctx = s.ctx;
    if (dpo && ctl_dataset_format(ds) != CTL_DATA_PREFERENCE) return bad("dpo needs preference data (prompt, chosen, rejected)");
    if (o->packing && dpo) return bad("--packing is for sft");
    int64_t B = o->batch, A = o->accum, rows = dpo ? 2 * B : B;
    int64_t steps = planned_steps(o, ctl_dataset_size(ds), B * A);
    bool lora = strcmp(o->adapter, "full") != 0;
    if (dpo && !lora) return bad("dpo with --adapter full needs a reference model; use an adapter (the base is the reference)");
    ctl_dpo_desc dd;
    memset(&dd, 0, sizeof dd);
    if (dpo) {
        static const char *const names[13] = {"sigmoid", "ipo", "hinge", "robust", "exo_pair", "nca_pair", "bco_pair", "sppo_hard",
                                              "apo_zero", "apo_down", "sigmoid_norm", "simpo", "orpo"};
        int k = 0;
        const char *want = o->loss[0] ? o->loss : "sigmoid";
        while (k < 13 && strcmp(names[k], want)) k++;
        if (k == 13) return bad("--loss: '%s' is not a DPO loss (sigmoid, ipo, hinge, robust, exo_pair, nca_pair, bco_pair, sppo_hard, apo_zero, apo_down, sigmoid_norm, simpo, orpo)", want);
        dd.loss = (ctl_dpo_loss)k, dd.beta = o->beta >= 0 ? (float)o->beta : 0.1f, dd.label_smoothing = (float)o->label_smoothing;
        dd.rpo_alpha = (float)o->rpo_alpha, dd.simpo_gamma = (float)o->simpo_gamma;
    }
    ctl_batcher_desc bd;
    memset(&bd, 0, sizeof bd);
    bd.kind = dpo ? CTL_ROWS_PREFERENCE : CTL_ROWS_SFT, bd.batch = B, bd.accum = A, bd.seq_len = o->seq_len;
    bd.packing = o->packing, bd.drop_long = o->drop_long, bd.seed = (uint64_t)o->seed, bd.encoding = encoding_of(&s, o);
    ctl_batcher *bt = NULL;
    run r;
    ctl_run_state rs;
    if (!start_run(&r, &s, o, dpo ? "dpo" : "sft", rows, &rs, steps)) return false;
    TRY(ctl_batcher_init(ds, &bd, &bt));
    TRY(ctl_batcher_seek(bt, rs.epoch, rs.position));
    ctl_sft_desc sft = {o->per_sequence ? CTL_SFT_SEQUENCES : CTL_SFT_TOKENS, 0, 0.0};
    ctl_step_desc sd = {&sft, dpo ? &dd : NULL, NULL};
    for (int64_t step = rs.counter; ok && step < steps; step++) {
        ctl_step_out out;
        bool skipped = false;
        ctl_status st = ctl_train_batches(r.t, bt, &sd, &out);
        if (st && !(ok = step_failed(&r, st, step + 1, &skipped))) break;
        ctl_batcher_tell(bt, &rs.epoch, &rs.position);
        r.tokens += (int64_t)out.tokens, r.skipped_examples = ctl_batcher_skipped(bt);
        rs.counter = step + 1;
        if (!skipped) log_step(&r, &out.stats, out.loss, &out.metrics);
        if (rs.counter % o->save_every == 0 && !save_ckpt(&r, &rs)) ok = false;
        if (o->stop_at && rs.counter == o->stop_at) break;
        if (ok && interrupted(&r, &rs)) ok = false;
    }
    if (ctl_batcher_skipped(bt))
        fprintf(stderr, "%lld examples skipped: longer than --seq-len%s (see ctl_batcher_desc)\n", (long long)ctl_batcher_skipped(bt),
                o->drop_long ? " (--drop-long)" : ", or their completion cut off");
    ok = ok && finish_run(&r, &rs);
    ctl_batcher_free(bt);
    ctl_dataset_close(ds);
    close_session(&s);
    return ok;
}

// ---- generation helpers -----------------------------------------------------------------------

// The sampler the options describe; stops at EOS (and the chat template's end-of-turn token).
static ctl_sampler_desc sampler_of(const options *o, const session *s, int32_t *stops, uint64_t seed) {
    ctl_sampler_desc sd;
    memset(&sd, 0, sizeof sd);
    sd.temperature = o->greedy ? 0.0f : (float)o->temperature, sd.top_k = o->top_k, sd.top_p = (float)o->top_p;
    sd.min_p = (float)o->min_p, sd.repetition_penalty = (float)o->rep_penalty, sd.seed = seed;
    stops[0] = ctl_tokenizer_eos(s->tk);
    sd.stop_tokens = stops, sd.n_stop_tokens = 1;
    return sd;
}

// The prompt of an example as ids, ready for generation. Returns the count, or -1 when it does
// not fit in cap.
static int64_t prompt_ids(session *s, const options *o, const ctl_example *e, int32_t *ids, int64_t cap) {
    int64_t n = 0;
    ctl_encoding enc = encoding_of(s, o);
    return ctl_example_tokens(e, NULL, &enc, ids, NULL, cap, &n) ? -1 : n;
}

// The text of n ids (malloc'd), or NULL when out of memory.
static char *decode(session *s, const int32_t *ids, int64_t n) {
    size_t len = 0;
    ctl_detokenize(s->tk, ids, n, NULL, 0, &len);
    char *text = (char *)malloc(len + 1);
    if (text) ctl_detokenize(s->tk, ids, n, text, len + 1, &len), text[len] = 0;
    return text;
}


// A progress line while generating: on a terminal rewritten in place, elsewhere (logs, CI) a line
// every 30 s; the token callback counts.
typedef struct progress {
    const char *what;
    int64_t tokens, total;   // tokens so far; completions asked for
    double start, last;
    bool tty;
} progress;

static void progress_show(progress *p, bool final) {
    double t = now(), rate = (double)p->tokens / (t - p->start + 1e-9);
    if (!final && t - p->last < (p->tty ? 0.5 : 30.0)) return;
    p->last = t;
    fprintf(stderr, "%s%s, %lld completions: %lld tokens, %.0f tok/s, %.0f s%s%s", p->tty ? "\r\033[K" : "", p->what, (long long)p->total,
            (long long)p->tokens, rate, t - p->start, final ? ", done" : "", p->tty && !final ? "" : "\n");
}

static bool progress_token(int64_t seq, int32_t token, void *user) {
    (void)seq, (void)token;
    progress *p = (progress *)user;
    p->tokens++;
    progress_show(p, false);
    return true;
}

// The same during a GRPO step's rollouts (ctl_sampler_desc.progress: the tokens so far).
static void rollout_progress(int64_t tokens, void *user) {
    progress *p = (progress *)user;
    p->tokens = tokens;
    progress_show(p, false);
}

// ---- grpo -------------------------------------------------------------------------------------

// A weight in a list ("math:0.5"): the whole text a finite number.
static bool weight_of(const char *text, double *out) {
    char *end;
    errno = 0;
    *out = strtod(text, &end);
    return !errno && end != text && !*end && isfinite(*out);
}

typedef struct reward_spec {
    int n, n_funcs;            // every column; the built-in callbacks (the external program's comes last)
    const char *names[8];
    float weights[8];
    ctl_reward_func funcs[8];
    int64_t budget;
} reward_spec;

static bool parse_rewards(const options *o, reward_spec *rw) {
    memset(rw, 0, sizeof *rw);
    static char *buf;   // (the names point into it)
    free(buf);
    if (!(buf = strdup(o->reward))) return fail("out of memory");
    for (char *p = strtok(buf, ","); p; p = strtok(NULL, ",")) {
        if (rw->n == 7) return bad("--reward: more than 7 rewards");
        char *c = strchr(p, ':');
        double wgt = 1.0;
        if (c && !weight_of(c + 1, &wgt)) return bad("--reward: the weight of '%.*s' is '%s', not a finite number", (int)(c - p), p, c + 1);
        rw->weights[rw->n] = (float)wgt;
        if (c) *c = 0;
        if (strcmp(p, "math") && strcmp(p, "format") && strcmp(p, "answer_line") && strcmp(p, "length") && strcmp(p, "none"))
            return bad("--reward: '%s' is not math, format, answer_line or length (weights as math:1,format:0.5)", p);
        if (!strcmp(p, "none")) continue;
        ctl_reward_func *f = &rw->funcs[rw->n];
        f->name = p, f->weight = rw->weights[rw->n], f->user = NULL;
        f->fn = !strcmp(p, "math") ? ctl_reward_fn_math : !strcmp(p, "format") ? ctl_reward_fn_format
              : !strcmp(p, "answer_line") ? ctl_reward_fn_answer_line : ctl_reward_fn_length;
        if (f->fn == ctl_reward_fn_length) rw->budget = o->length_budget > 0 ? o->length_budget : o->max_new / 2, f->user = &rw->budget;
        rw->names[rw->n++] = p;
    }
    rw->n_funcs = rw->n;
    if (o->reward_cmd) rw->names[rw->n] = "cmd", rw->weights[rw->n++] = 1.0f;
    return rw->n > 0 || bad("no reward: give --reward or --reward-cmd");
}

// Rewards from an external program (a batch reward function): the completions as JSONL on its
// stdin, one number per line back ("nan", "null" or nothing: no score). --reward-cmd is split
// at spaces into the program and its arguments and run directly (posix_spawnp): no shell reads
// it, and nothing of the run's paths or texts is pasted into a command line.
extern char **environ;

typedef struct cmd_reward {
    const options *o;
    char *argv_buf, *argv[32];
} cmd_reward;

// Words at spaces; '...' or "..." make one word of what they enclose (nothing else is special:
// no variables, no globs, no escapes).
static bool split_cmd(cmd_reward *cr) {
    const char *p = cr->o->reward_cmd;
    char *w = cr->argv_buf = (char *)malloc(strlen(p) + 1);
    int k = 0;
    if (!w) return fail("out of memory");
    while (*p) {
        while (*p == ' ' || *p == '\t') p++;
        if (!*p) break;
        if (k == 31) return bad("--reward-cmd: more than 30 arguments");
        cr->argv[k++] = w;
        for (char quote = 0; *p && (quote || (*p != ' ' && *p != '\t')); p++) {
            if (!quote && (*p == '\'' || *p == '"')) quote = *p;
            else if (quote && *p == quote) quote = 0;
            else *w++ = *p;
            if (quote && !p[1]) return bad("--reward-cmd: a quote (%c) is not closed", quote);
        }
        *w++ = 0;
    }
    cr->argv[k] = NULL;
    return k > 0 || bad("--reward-cmd is empty");
}

static ctl_status rewards_from_cmd(ctl_ctx *ctx, const ctl_reward_input *in, int64_t n, float *out, int64_t stride, void *user) {
    cmd_reward *cr = (cmd_reward *)user;
    FILE *f = tmpfile();   // the input, unnamed (gone when closed)
    if (!f) return ctl_fail(ctx, CTL_ERR_IO, "--reward-cmd: cannot make a temporary file: %s", strerror(errno));
    for (int64_t i = 0; i < n; i++) {
        fprintf(f, "{\"prompt\": "), json_str(f, in[i].prompt ? in[i].prompt : "");
        fprintf(f, ", \"completion\": "), json_str(f, in[i].completion);
        if (in[i].example && in[i].example->answer) fprintf(f, ", \"answer\": "), json_str(f, in[i].example->answer);
        fprintf(f, "}\n");
    }
    int p[2] = {-1, -1};
    pid_t pid = -1;
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    bool ok = fflush(f) == 0 && fseek(f, 0, SEEK_SET) == 0 && pipe(p) == 0;
    if (ok) {
        posix_spawn_file_actions_adddup2(&fa, fileno(f), 0), posix_spawn_file_actions_adddup2(&fa, p[1], 1);
        posix_spawn_file_actions_addclose(&fa, p[0]);
        int err = posix_spawnp(&pid, cr->argv[0], &fa, NULL, cr->argv, environ);
        if (err) ok = false, errno = err;
    }
    int err = errno;
    posix_spawn_file_actions_destroy(&fa);
    fclose(f);
    if (p[1] >= 0) close(p[1]);
    if (!ok) {
        if (p[0] >= 0) close(p[0]);
        return ctl_fail(ctx, CTL_ERR_IO, "--reward-cmd: cannot run '%s': %s", cr->argv[0], strerror(err));
    }
    FILE *r = fdopen(p[0], "r");
    char *line = NULL;
    size_t cap = 0;
    int64_t got = 0;
    while (r && getline(&line, &cap, r) > 0)   // read to the end (so the program never blocks on a full pipe)
        if (got < n) {
            char *end;
            double v = strtod(line, &end);
            out[got++ * stride] = end == line ? NAN : (float)v;   // "null", "nan" or nothing: unscored
        }
    free(line);
    if (r) fclose(r);
    else close(p[0]);
    int status = 0;
    while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {}
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0)
        return ctl_fail(ctx, CTL_ERR_IO, "--reward-cmd '%s' %s %d", cr->o->reward_cmd, WIFEXITED(status) ? "exited with" : "was killed by signal",
                        WIFEXITED(status) ? WEXITSTATUS(status) : WTERMSIG(status));
    return got == n ? CTL_OK : ctl_fail(ctx, CTL_ERR_IO, "--reward-cmd gave %lld rewards for %lld completions", (long long)got, (long long)n);
}

// GRPO: each generation is ctl_rl_generate over the batcher's next prompts, each optimiser step
// ctl_rl_update (--iterations of them per generation), with a checkpoint between any two.
static bool cmd_grpo(const options *o) {
    session s;
    memset(&s, 0, sizeof s);
    ctl_dataset *ds = NULL;
    reward_spec rw;
    if (!parse_rewards(o, &rw) || !setup_model(&s, o) || !open_data(&s, o, &ds)) return close_session(&s), false;
    ctl_ctx *ctx = s.ctx;
    int64_t G = o->group, P = o->prompts, R = P * G, B = o->batch, T = o->seq_len, mu = CTL__MAX(o->iterations, 1);
    if (R % B) return bad("--prompts x --group (%lld) must be a multiple of --batch (%lld)", (long long)R, (long long)B);
    if (o->max_new >= T) return bad("--max-new %lld leaves no room for a prompt in --seq-len %lld", (long long)o->max_new, (long long)T);
    int64_t steps = o->steps > 0 ? o->steps : mu * CTL__MAX(1, ctl_dataset_size(ds) / P);
    ctl_rl_desc rd;
    memset(&rd, 0, sizeof rd);
    static const char *const losses[4] = {"dapo", "grpo", "bnpo", "dr_grpo"};
    int lt = 0;
    while (lt < 4 && strcmp(losses[lt], o->loss[0] ? o->loss : "dapo")) lt++;
    if (lt == 4) return bad("--loss: '%s' is not dapo, grpo, bnpo or dr_grpo", o->loss);
    rd.grpo.loss = (ctl_grpo_loss)lt, rd.grpo.epsilon = (float)o->eps, rd.grpo.epsilon_high = (float)o->eps_high, rd.grpo.delta = (float)o->delta;
    rd.grpo.beta = o->beta > 0 ? (float)o->beta : 0.0f, rd.grpo.sequence_level = o->sequence_level;
    if (rd.grpo.beta > 0 && !strcmp(o->adapter, "full")) return bad("--beta with --adapter full needs a reference model; use an adapter");
    rd.advantages.kind = !strcmp(o->scale, "rloo") ? CTL_ADV_RLOO : CTL_ADV_GRPO;
    rd.advantages.scale = !strcmp(o->scale, "batch") ? CTL_SCALE_BATCH : !strcmp(o->scale, "none") || rd.advantages.kind == CTL_ADV_RLOO ? CTL_SCALE_NONE
                          : !strcmp(o->scale, "group") ? CTL_SCALE_GROUP : CTL_SCALE_DEFAULT;
    if (rd.advantages.scale == CTL_SCALE_DEFAULT) return bad("--scale: '%s' is not group, batch, none or rloo", o->scale);
    cmd_reward cr;
    memset(&cr, 0, sizeof cr);
    cr.o = o;
    if (o->reward_cmd && !split_cmd(&cr)) return free(cr.argv_buf), false;
    if (o->reward_cmd) {
        ctl_reward_func *f = &rw.funcs[rw.n_funcs];
        memset(f, 0, sizeof *f);
        f->name = "cmd", f->weight = 1.0f, f->batch = rewards_from_cmd, f->user = &cr;
    }
    int32_t stops[1];
    rd.method = CTL_RL_GRPO, rd.prompts = P, rd.group = G, rd.max_new = o->max_new, rd.batch = B, rd.iterations = mu;
    rd.sampler = sampler_of(o, &s, stops, 0), rd.tokenizer = s.tk, rd.rewards = rw.funcs, rd.n_rewards = rw.n;
    rd.mask_truncated = o->mask_truncated;
    progress pr = {"sampling", 0, P * G, 0.0, 0.0, isatty(2) != 0};
    rd.sampler.progress = rollout_progress, rd.sampler.progress_user = &pr;
    ctl_batcher_desc bd;
    memset(&bd, 0, sizeof bd);
    bd.kind = CTL_ROWS_PROMPTS, bd.batch = P, bd.seq_len = T, bd.max_new = o->max_new, bd.seed = (uint64_t)o->seed, bd.encoding = encoding_of(&s, o);
    run r;
    ctl_run_state rs;
    ctl_batcher *bt = NULL;
    ctl_rl *rl = NULL;
    ctl_model *ref_m = NULL;
    ctl_train *ref_t = NULL;
    ctl_infer_desc rollouts = {R, T};   // the rollouts' cache (ctl_rl_init's), and their rows
    size_t kv = 0;
    if (ctl_infer_plan(s.m, &rollouts, &kv)) return fail("%s", ctl_last_error(ctx));
    if (!affordable((double)kv + (double)R * (double)T * 40, "the rollouts (--prompts x --group x --seq-len)")) return false;
    if (!start_run(&r, &s, o, "grpo", B, &rs, steps)) return false;
    TRY(ctl_batcher_init(ds, &bd, &bt));
    TRY(ctl_batcher_seek(bt, rs.epoch, rs.position));
    if (rd.grpo.beta > 0 && o->init_adapter) {
        // The KL's reference is the policy GRPO starts from: a frozen copy of the model with the
        // initial adapter (switching the adapters off would give the base, before that SFT).
        ctl_model_desc md = {!o->no_quantized, o->bf16 != 0};
        ctl_train_desc td;
        memset(&td, 0, sizeof td);
        td.batch = B, td.seq_len = T;
        size_t ml = strlen(o->model);
        bool st_file = ml > 12 && !strcmp(o->model + ml - 12, ".safetensors");
        if (st_file) md.keep_quantized = false;
        TRY(ctl_model_from_gguf(ctx, s.gguf, &md, &ref_m));
        if (st_file) TRY(ctl_model_load_safetensors(ref_m, o->model));
        TRY(ctl_adapter_load(ref_m, o->init_adapter));
        TRY(ctl_train_init(ref_m, &td, &ref_t));
        rd.reference = ref_t;
        fprintf(stderr, "the KL's reference: %s on the base (a frozen copy)\n", o->init_adapter);
    }
    TRY(ctl_rl_init(r.t, &rd, &rl));
    bool ok = true;
    for (int64_t step = rs.counter; ok && step < steps;) {
        ctl_rows rows;
        pr.start = pr.last = now(), pr.tokens = 0;
        if (ctl_batcher_next(bt, &rows) || ctl_rl_generate(rl, rows.prompts, rows.n_prompts, (uint64_t)o->seed * 7919u + (uint64_t)step, NULL)) {
            ok = fail("%s", ctl_last_error(ctx));
            break;
        }
        ctl_batcher_tell(bt, &rs.epoch, &rs.position);
        r.tokens += (int64_t)ctl_rl_rollout(rl)->n_tokens, r.skipped_examples = ctl_batcher_skipped(bt);
        // mu optimiser steps on this generation; after the first, its log-probs are the old policy's.
        for (int64_t it = 0; ok && it < mu && step < steps; it++, step++) {
            ctl_step_out out;
            bool skipped = false;
            ctl_status st = ctl_rl_update(rl, &out);
            if (st && !(ok = step_failed(&r, st, step + 1, &skipped))) break;
            rs.counter = step + 1;
            if (!skipped) log_step(&r, &out.stats, out.loss, &out.metrics);
            if (rs.counter % o->save_every == 0 && !save_ckpt(&r, &rs)) ok = false;
            if (o->stop_at && rs.counter == o->stop_at) step = steps;
            if (ok && interrupted(&r, &rs)) ok = false;
            if (skipped && it == 0) { step++; break; }   // no old log-probs for the next iterations: generate afresh
        }
    }
    ok = ok && finish_run(&r, &rs);
    ctl_rl_free(rl);
    free(cr.argv_buf);
    if (ref_t) ctl_train_free(ref_t);
    if (ref_m) ctl_model_free(ref_m);
    ctl_batcher_free(bt);
    ctl_dataset_close(ds);
    close_session(&s);
    return ok;
}

// ---- generate, eval, rft ----------------------------------------------------------------------

static bool load_for_inference(session *s, const options *o) {
    if (!open_model(s, o, !o->no_quantized)) return false;
    ctl_ctx *ctx = s->ctx;
    if (o->init_adapter) TRY(ctl_adapter_load(s->m, o->init_adapter));
    return true;
}

static bool cmd_generate(const options *o) {
    session s;
    memset(&s, 0, sizeof s);
    if (!o->prompt) return bad("--prompt is required");
    if (!load_for_inference(&s, o)) return close_session(&s), false;
    ctl_ctx *ctx = s.ctx;
    ctl_example e;
    memset(&e, 0, sizeof e);
    e.prompt.text = o->prompt;
    int64_t cap = ctl_model_cfg(s.m)->n_ctx, n = 0, n_out = o->samples, *olen = NULL;
    int32_t *ids = (int32_t *)malloc((size_t)cap * 4), *out = NULL, stops[1];
    const int32_t *pp[1] = {ids};
    bool ok = ids || fail("out of memory");
    if (ok && (n = prompt_ids(&s, o, &e, ids, cap)) < 0) ok = bad("the prompt does not fit the model's context of %lld tokens", (long long)cap);
    if (ok && n + o->max_new > cap)
        ok = bad("--max-new %lld after a prompt of %lld tokens exceeds the model's context of %lld", (long long)o->max_new, (long long)n, (long long)cap);
    // The memory first, before anything is touched: the cache for every sample, their tokens.
    ctl_infer *inf = NULL;
    ctl_infer_desc id = {n_out, n + o->max_new};
    size_t need = 0;
    if (ok && ctl_infer_plan(s.m, &id, &need)) ok = fail("%s", ctl_last_error(ctx));
    ok = ok && affordable((double)need + (double)n_out * (double)o->max_new * 4 + (double)n_out * 8, "--samples x --max-new");
    if (ok && (!(out = (int32_t *)malloc((size_t)(n_out * o->max_new) * 4)) || !(olen = (int64_t *)malloc((size_t)n_out * 8))))
        ok = fail("out of memory for %lld samples", (long long)n_out);
    if (ok && ctl_infer_init(s.m, &id, &inf)) ok = fail("%s", ctl_last_error(ctx));
    ctl_sampler_desc sd = sampler_of(o, &s, stops, (uint64_t)o->seed);
    if (ok && ctl_generate_groups(inf, 1, pp, &n, n_out, &sd, o->max_new, out, olen, NULL, NULL)) ok = fail("%s", ctl_last_error(ctx));
    for (int64_t i = 0; ok && i < n_out; i++) {
        char *text = decode(&s, out + i * o->max_new, olen[i]);
        ok = text || fail("out of memory");
        if (text) printf("%s%s\n", n_out > 1 ? "---\n" : "", text);
        free(text);
    }
    if (inf) ctl_infer_free(inf);
    free(ids), free(out), free(olen);
    close_session(&s);
    return ok;
}

// A conversation on the terminal: each line read is a user turn; the reply is sampled from the
// whole conversation so far. An empty line or the end of input stops.
static bool cmd_chat(const options *o) {
    session s;
    memset(&s, 0, sizeof s);
    if (!load_for_inference(&s, o)) return close_session(&s), false;
    ctl_ctx *ctx = s.ctx;
    if (!s.have_tmpl) return close_session(&s), fail("chat: the model has no chat template this program knows");
    int64_t cap = ctl_model_cfg(s.m)->n_ctx, n = 0, olen;
    ctl_chat_msg msgs[64];
    char *owned[64];
    int nm = 0, no = 0;
    if (o->system) msgs[nm].role = "system", msgs[nm++].content = o->system;
    int32_t *ids = (int32_t *)malloc((size_t)cap * 4), *out = (int32_t *)malloc((size_t)o->max_new * 4), stops[1];
    ctl_infer *inf = NULL;
    ctl_infer_desc id = {1, cap};
    bool ok = (ids && out) || fail("out of memory");
    if (ok && ctl_infer_init(s.m, &id, &inf)) ok = fail("%s", ctl_last_error(ctx));
    char *line = NULL;
    size_t line_cap = 0;
    for (int turn = 0; ok; turn++) {
        if (nm >= 62) { fprintf(stderr, "chat: 31 turns is as long as a conversation goes here\n"); break; }
        if (isatty(0)) fprintf(stderr, "> ");
        if (getline(&line, &line_cap, stdin) <= 0 || line[0] == '\n') break;
        line[strcspn(line, "\n")] = 0;
        if (!(owned[no] = strdup(line))) { ok = fail("out of memory"); break; }
        msgs[nm].role = "user", msgs[nm++].content = owned[no++];
        if (ctl_chat_tokenize(s.tk, &s.tmpl, msgs, nm, true, ids, NULL, cap - o->max_new, &n)) { ok = fail("the conversation no longer fits the context"); break; }
        const int32_t *pp = ids;
        ctl_sampler_desc sd = sampler_of(o, &s, stops, (uint64_t)o->seed + (uint64_t)turn);
        if (ctl_generate(inf, 1, &pp, &n, &sd, o->max_new, out, &olen, NULL, NULL)) { ok = fail("%s", ctl_last_error(ctx)); break; }
        if (!(owned[no] = decode(&s, out, olen))) { ok = fail("out of memory"); break; }
        printf("%s\n", owned[no]);
        fflush(stdout);
        msgs[nm].role = "assistant", msgs[nm++].content = owned[no++];
    }
    for (int i = 0; i < no; i++) free(owned[i]);
    free(line);
    if (inf) ctl_infer_free(inf);
    free(ids), free(out);
    close_session(&s);
    return ok;
}

// Samples `n_samples` completions (greedy when temperature is 0) of every problem, --streams of
// them decoding together (each problem's prompt fed once); returns the per-problem counts of
// correct ones, the texts, and the mean length. Used by eval and rft.
typedef struct solved {
    int64_t n_problems, n_samples;
    int32_t *correct;     // (problems)
    char **texts;         // (problems, samples)
    int32_t **prompts, *ids;   // (problems) the prompts' ids; (problems, samples, max_new) the completions'
    int64_t *prompt_lens, *lens;
    double mean_len, tokens_per_s;
} solved;

static bool solve(session *s, const options *o, const ctl_dataset *ds, int64_t n_samples, solved *out) {
    ctl_ctx *ctx = s->ctx;
    int64_t n = ctl_dataset_size(ds), S = n_samples, cap = ctl_model_cfg(s->m)->n_ctx - o->max_new, longest = 1;
    if (o->limit > 0 && o->limit < n) n = o->limit;
    if (cap < 1) return bad("--max-new %lld leaves no room for a prompt in the model's context of %lld", (long long)o->max_new, (long long)ctl_model_cfg(s->m)->n_ctx);
    size_t kv = 0;   // the memory before anything is touched: the cache at its largest, the completions
    ctl_infer_desc most = {CTL__MAX(S, o->streams / S * S), ctl_model_cfg(s->m)->n_ctx};
    if (ctl_infer_plan(s->m, &most, &kv)) return fail("%s", ctl_last_error(ctx));
    if (!affordable((double)kv + (double)n * (double)S * ((double)o->max_new * 4 + 24), "the problems' completions (--limit x --samples x --max-new)"))
        return false;
    memset(out, 0, sizeof *out);
    out->n_problems = n, out->n_samples = S;
    out->correct = (int32_t *)calloc((size_t)n, 4);
    out->texts = (char **)calloc((size_t)(n * S), sizeof(char *));
    int32_t **prompts = (int32_t **)calloc((size_t)n, sizeof(int32_t *)), *gen = (int32_t *)malloc((size_t)(n * S * o->max_new) * 4);
    int64_t *plen = (int64_t *)malloc((size_t)n * 8), *olen = (int64_t *)malloc((size_t)(n * S) * 8);
    int32_t *ids = (int32_t *)malloc((size_t)cap * 4), stops[1];
    bool ok = out->correct && out->texts && prompts && gen && plen && olen && ids;
    if (!ok) fail("out of memory for %lld problems", (long long)n);
    for (int64_t p = 0; ok && p < n; p++) {
        if ((plen[p] = prompt_ids(s, o, ctl_dataset_get(ds, p), ids, cap)) < 0) {
            ok = fail("%s line %lld: the prompt does not fit the context with --max-new %lld", o->data, (long long)ctl_dataset_get(ds, p)->line,
                      (long long)o->max_new);
            break;
        }
        if (!(prompts[p] = (int32_t *)malloc((size_t)plen[p] * 4))) {
            ok = fail("out of memory for %lld problems", (long long)n);
            break;
        }
        memcpy(prompts[p], ids, (size_t)plen[p] * 4), longest = CTL__MAX(longest, plen[p]);
    }
    // KV memory for what the streams need: the longest prompt and max_new tokens each.
    ctl_infer *inf = NULL;
    ctl_infer_desc id = {CTL__MAX(S, o->streams / S * S), longest + o->max_new};
    if (ok && ctl_infer_init(s->m, &id, &inf)) ok = fail("%s", ctl_last_error(ctx));
    ctl_sampler_desc sd = sampler_of(o, s, stops, (uint64_t)o->seed);
    progress pr = {S > 1 ? "sampling" : "greedy", 0, n * S, now(), 0.0, isatty(2) != 0};
    pr.last = pr.start;
    if (ok && ctl_generate_groups(inf, n, (const int32_t *const *)prompts, plen, S, &sd, o->max_new, gen, olen, progress_token, &pr))
        ok = fail("%s", ctl_last_error(ctx));
    if (ok) progress_show(&pr, true);
    out->tokens_per_s = (double)pr.tokens / (now() - pr.start + 1e-9);
    for (int64_t i = 0; ok && i < n * S; i++) {
        int64_t p = i / S;
        char *text = decode(s, gen + i * o->max_new, olen[i]);
        const ctl_example *e = ctl_dataset_get(ds, p);
        if (!(out->texts[i] = text)) {
            ok = fail("out of memory");
            break;
        }
        out->correct[p] += ctl_reward_math(text, strlen(text), e->answer) == 1.0f;
        out->mean_len += (double)olen[i] / (double)(n * S);
    }
    if (inf) ctl_infer_free(inf);
    out->prompts = prompts, out->ids = gen, out->prompt_lens = plen, out->lens = olen;
    free(ids);
    return ok;
}

static void free_solved(solved *sv) {
    for (int64_t i = 0; i < sv->n_problems * sv->n_samples; i++) free(sv->texts[i]);
    for (int64_t p = 0; sv->prompts && p < sv->n_problems; p++) free(sv->prompts[p]);
    free(sv->texts), free(sv->correct), free(sv->prompts), free(sv->ids), free(sv->prompt_lens), free(sv->lens);
}

static bool cmd_eval(const options *o) {
    session s;
    memset(&s, 0, sizeof s);
    ctl_dataset *ds = NULL;
    double t0 = now();
    if (!load_for_inference(&s, o) || !open_data(&s, o, &ds)) return close_session(&s), false;
    options g = *o;
    g.greedy = 1;
    solved gs, ss;
    bool ok = solve(&s, &g, ds, 1, &gs);
    double greedy = 0.0, pass = 0.0, vote = 0.0;
    for (int64_t p = 0; ok && p < gs.n_problems; p++) greedy += gs.correct[p] / (double)gs.n_problems;
    out_file of;
    FILE *det = ok && o->details && not_an_input(o, o->details, "--details") && out_open(&of, o->details, "--details") ? of.f : NULL;
    if (ok && o->details && !det) ok = false;
    for (int64_t p = 0; det && p < gs.n_problems; p++) {   // one line per problem, for paired comparisons
        const ctl_example *e = ctl_dataset_get(ds, p);
        fprintf(det, "{\"line\": %lld, \"correct\": %d, \"answer\": ", (long long)e->line, gs.correct[p]);
        json_str(det, e->answer ? e->answer : ""), fprintf(det, ", \"completion\": "), json_str(det, gs.texts[p]);
        fprintf(det, ", \"prompt_ids\": [");
        for (int64_t i = 0; i < gs.prompt_lens[p]; i++) fprintf(det, "%s%d", i ? ", " : "", gs.prompts[p][i]);
        fprintf(det, "], \"completion_ids\": [");
        for (int64_t i = 0; i < gs.lens[p]; i++) fprintf(det, "%s%d", i ? ", " : "", gs.ids[p * o->max_new + i]);
        fprintf(det, "]}\n");
    }
    if (det && !out_close(&of, true)) ok = false;
    int64_t S = o->samples, K = CTL__MIN(o->k, S);
    bool sampled = ok && S > 1;
    if (sampled) ok = solve(&s, o, ds, S, &ss);
    for (int64_t p = 0; sampled && ok && p < ss.n_problems; p++) {
        pass += ctl_pass_at_k(S, ss.correct[p], K) / (double)ss.n_problems;
        int64_t best = ctl_majority_vote((const char *const *)ss.texts + p * S, S, NULL);
        if (best >= 0) vote += ctl_reward_math(ss.texts[p * S + best], strlen(ss.texts[p * S + best]), ctl_dataset_get(ds, p)->answer) / (double)ss.n_problems;
    }
    if (ok) {
        printf("{\"problems\": %lld, \"greedy_accuracy\": %.4f, \"mean_length\": %.1f, \"tokens_per_s\": %.1f", (long long)gs.n_problems, greedy,
               gs.mean_len, gs.tokens_per_s);
        if (sampled) printf(", \"samples\": %lld, \"pass@%lld\": %.4f, \"majority_vote\": %.4f", (long long)S, (long long)K, pass, vote);
        printf(", \"seconds\": %.1f, \"peak_mb\": %.0f}\n", now() - t0, peak_mb());
    }
    if (ok) free_solved(&gs);
    if (ok && sampled) free_solved(&ss);
    ctl_dataset_close(ds);
    close_session(&s);
    return ok;
}

// Rejection-sampling self-training: each round samples --samples solutions per problem, keeps
// the distinct correct ones, and fine-tunes on them (starting from the last round's adapter).
static bool cmd_rft(const options *o) {
    static char prev[PATH_CAP], data[PATH_CAP], dir[PATH_CAP];
    if (!make_dir(o->out) || !lock_dir(o->out)) return false;
    prev[0] = 0;
    for (int64_t round = 1; round <= o->rounds; round++) {
        session s;
        memset(&s, 0, sizeof s);
        ctl_dataset *ds = NULL;
        options so = *o;
        so.init_adapter = prev[0] ? prev : o->init_adapter;
        if (!load_for_inference(&s, &so) || !open_data(&s, o, &ds)) return close_session(&s), false;
        solved sv;
        bool ok = solve(&s, &so, ds, CTL__MAX(o->samples, 1), &sv);
        out_file of;
        FILE *f = ok && join(data, o->out, "round-%lld.jsonl", (long long)round) && out_open(&of, data, "rft") ? of.f : NULL;
        if (!f) ok = false;
        int64_t kept = 0, solved_problems = 0;
        for (int64_t p = 0; f && p < sv.n_problems; p++) {
            solved_problems += sv.correct[p] > 0;
            for (int64_t i = 0; i < sv.n_samples; i++) {
                const char *t = sv.texts[p * sv.n_samples + i];
                bool dup = false;
                for (int64_t j = 0; j < i; j++) dup = dup || !strcmp(t, sv.texts[p * sv.n_samples + j]);
                if (dup || ctl_reward_math(t, strlen(t), ctl_dataset_get(ds, p)->answer) != 1.0f) continue;
                fprintf(f, "{\"prompt\": "), json_str(f, ctl_dataset_get(ds, p)->prompt.text ? ctl_dataset_get(ds, p)->prompt.text : "");
                fprintf(f, ", \"completion\": "), json_str(f, t), fprintf(f, "}\n");
                kept++;
            }
        }
        if (f && !out_close(&of, true)) ok = false;
        fprintf(stderr, "round %lld: %lld of %lld problems solved, %lld distinct correct solutions kept\n", (long long)round,
                (long long)solved_problems, (long long)sv.n_problems, (long long)kept);
        if (ok) free_solved(&sv);
        ctl_dataset_close(ds);
        close_session(&s);
        if (!ok) return false;
        if (!kept) return fail("round %lld: no correct solution to learn from", (long long)round);
        options to = *o;
        if (!join(dir, o->out, "round-%lld", (long long)round)) return false;
        to.data = data, to.out = dir, to.format = "prompt-completion", to.init_adapter = so.init_adapter, to.resume = 0;
        if (!cmd_train(&to, false) || !join(prev, dir, "adapter.gguf")) return false;
    }
    return true;
}

// ---- export, merge, info ----------------------------------------------------------------------

static bool cmd_export(const options *o) {
    session s;
    memset(&s, 0, sizeof s);
    bool merged = !strcmp(o->to, "merged");
    if (!o->init_adapter && !merged) return bad("--load is required (the adapter to export)");
    options lo = *o;
    lo.no_quantized = merged ? 1 : o->no_quantized, lo.bf16 = 0;
    if (!not_an_input(o, o->out, "--out")) return false;
    if (!load_for_inference(&s, &lo)) return close_session(&s), false;
    ctl_ctx *ctx = s.ctx;
    bool ok = true;
    if (!strcmp(o->to, "llamacpp")) ok = !ctl_lora_save_llamacpp(s.m, o->out);
    else if (!strcmp(o->to, "peft")) ok = !ctl_lora_save_peft(s.m, o->out);
    else if (merged) ok = !ctl_model_export_gguf(s.m, s.gguf, o->out, CTL_GGML_F32);
    else ok = bad("--to: '%s' is not llamacpp, peft or merged", o->to);
    if (!ok && ctl_last_error(ctx)[0]) fail("%s", ctl_last_error(ctx));
    if (ok) fprintf(stderr, "wrote %s\n", o->out);
    close_session(&s);
    return ok;
}

// Adds weight * each adapter's delta to the base and writes the merged model: an average
// (weights 1/n) or task arithmetic (any weights, negative ones subtract).
static bool cmd_merge(const options *o) {
    session s;
    memset(&s, 0, sizeof s);
    if (!o->adapters) return bad("--adapters is required: a.gguf:0.5,b.gguf:0.5");
    options lo = *o;
    lo.no_quantized = 1, lo.bf16 = 0;
    if (!open_model(&s, &lo, false)) return close_session(&s), false;
    ctl_ctx *ctx = s.ctx;
    char *buf = strdup(o->adapters);
    bool ok = (buf || fail("out of memory")) && not_an_input(o, o->out, "--out");
    for (char *p = buf ? strtok(buf, ",") : NULL; ok && p; p = strtok(NULL, ",")) {
        char *c = strrchr(p, ':');
        double wgt = 1.0;
        if (c && !weight_of(c + 1, &wgt)) ok = bad("--adapters: the weight of '%.*s' is '%s', not a finite number", (int)(c - p), p, c + 1);
        if (c) *c = 0;
        if (ok && ctl_adapter_compose(s.m, p, (float)wgt)) ok = fail("%s", ctl_last_error(ctx));
        else if (ok) fprintf(stderr, "added %s x %g\n", p, wgt);
    }
    free(buf);
    if (ok && ctl_model_export_gguf(s.m, s.gguf, o->out, CTL_GGML_F32)) ok = fail("%s", ctl_last_error(ctx));
    if (ok) fprintf(stderr, "wrote %s\n", o->out);
    close_session(&s);
    return ok;
}

static bool cmd_info(const options *o) {
    session s;
    memset(&s, 0, sizeof s);
    if (!setup_model(&s, o)) return close_session(&s), false;
    ctl_ctx *ctx = s.ctx;
    const ctl_model_config *c = ctl_model_cfg(s.m);
    printf("%s: %s, vocab %lld, context %lld, %lld layers, width %lld, heads %lld (kv %lld), ffn %lld, %s embeddings\n", o->model,
           c->arch == CTL_ARCH_LLAMA ? "llama" : "gpt2", (long long)c->vocab_size, (long long)c->n_ctx, (long long)c->n_layer,
           (long long)c->n_embd, (long long)c->n_head, (long long)c->n_kv_head, (long long)c->n_ff, c->tied_embeddings ? "tied" : "untied");
    int64_t trainable = 0;
    for (int64_t i = 0; i < ctl_model_param_count(s.m); i++) {
        const ctl_param *p = ctl_model_param(s.m, i);
        if (p->trainable) trainable += ctl_tensor_numel(&p->value);
        if (i < 12 || strstr(p->name, "blk.") == NULL || !strncmp(p->name, "blk.0.", 6))
            printf("  %-40s %6s  %lld x %lld%s\n", p->name, ctl_dtype_name(p->value.dtype), (long long)p->value.shape[0],
                   (long long)(p->value.ndim > 1 ? p->value.shape[1] : 1), p->trainable ? "  trains" : "");
    }
    ctl_train_desc td;
    memset(&td, 0, sizeof td);
    td.batch = o->batch, td.seq_len = CTL__MIN(o->seq_len, c->n_ctx);
    ctl_memory_plan mp;
    TRY(ctl_train_plan_model(s.m, &td, &mp));
    printf("%lld weights, %lld train (--adapter %s); training at batch %lld x %lld tokens needs %.1f MB:\n"
           "  weights %.1f, gradients %.1f, optimiser %.1f, activations %.1f, scratch %.1f\n",
           (long long)ctl_model_numel(s.m), (long long)trainable, o->adapter, (long long)td.batch, (long long)td.seq_len,
           (double)mp.total / 1e6, (double)mp.weights / 1e6, (double)mp.grads / 1e6, (double)mp.optim / 1e6,
           (double)mp.activations / 1e6, (double)mp.scratch / 1e6);
    close_session(&s);
    return true;
}

// ---- plot -------------------------------------------------------------------------------------

// The number after "key": in a metrics line, or NAN.
static double field(const char *line, const char *key) {
    char pat[96];
    snprintf(pat, sizeof pat, "\"%s\": ", key);
    const char *p = strstr(line, pat);
    return p ? strtod(p + strlen(pat), NULL) : NAN;
}

static bool cmd_plot(const options *o, const char *in) {
    if (!in) return bad("plot: give the metrics file: cotlab plot runs/out/metrics.jsonl -o out.svg");
    const char *out = o->out && strcmp(o->out, "runs/out") ? o->out : "metrics.svg";
    struct stat si, so;
    if (!stat(in, &si) && !stat(out, &so) && si.st_dev == so.st_dev && si.st_ino == so.st_ino)
        return bad("plot: --out '%s' is the metrics file itself", out);
    FILE *f = fopen(in, "r");
    if (!f) return fail("plot: cannot open '%s': %s", in, strerror(errno));
    static const char *const dflt[] = {"loss", "reward", "kl", "rewards/accuracies", "rewards/margins", "lr"};
    const char *keys[16];
    int nk = 0;
    static char kbuf[1024];
    if (o->targets && strcmp(o->targets, "all")) {   // --keys arrives in targets
        if (strlen(o->targets) >= sizeof kbuf) return fclose(f), bad("plot: --keys is longer than %d characters", (int)sizeof kbuf - 1);
        snprintf(kbuf, sizeof kbuf, "%s", o->targets);
        for (char *p = strtok(kbuf, ","); p; p = strtok(NULL, ",")) {
            if (nk == 16) return fclose(f), bad("plot: more than 16 --keys");
            keys[nk++] = p;
        }
    } else {
        for (size_t i = 0; i < sizeof dflt / sizeof *dflt; i++) keys[nk++] = dflt[i];
    }
    int64_t cap = 1024, n = 0;
    double *step = (double *)malloc((size_t)cap * 8), *val = (double *)malloc((size_t)(cap * 16) * 8);
    char *line = NULL;
    size_t line_cap = 0;
    bool oom = !step || !val;
    while (!oom && getline(&line, &line_cap, f) > 0) {
        double s = field(line, "step");
        if (!isfinite(s) || !strchr(line, '}')) continue;   // not a metrics line, or one torn by a crash
        while (n > 0 && step[n - 1] >= s) n--;   // a resumed run repeats steps: the later lines win
        if (n == cap) {
            double *s2 = (double *)realloc(step, (size_t)cap * 2 * 8), *v2 = s2 ? (double *)realloc(val, (size_t)cap * 2 * 16 * 8) : NULL;
            if (s2) step = s2;
            if (v2) val = v2, cap *= 2;
            if (!v2) { oom = true; break; }
        }
        step[n] = s;
        for (int k = 0; k < nk; k++) val[n * 16 + k] = field(line, keys[k]);
        n++;
    }
    free(line);
    fclose(f);
    if (oom) return free(step), free(val), fail("plot: out of memory");
    if (n == 0) return free(step), free(val), fail("plot: no metrics lines in '%s'", in);
    int shown[16], ns = 0;
    for (int k = 0; k < nk; k++) {
        bool any = false;
        for (int64_t i = 0; i < n && !any; i++) any = isfinite(val[i * 16 + k]);
        if (any) shown[ns++] = k;
    }
    out_file of;
    if (!out_open(&of, out, "plot")) return free(step), free(val), false;
    FILE *g = of.f;
    const int W = 720, H = 200, L = 80, Rm = 24, Tm = 30, Bm = 30;
    fprintf(g, "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"%d\" height=\"%d\" font-family=\"sans-serif\" font-size=\"12\">\n", W, H * ns);
    fprintf(g, "<rect width=\"100%%\" height=\"100%%\" fill=\"white\"/>\n");
    double x0 = step[0], x1 = step[n - 1] > x0 ? step[n - 1] : x0 + 1;
    for (int si = 0; si < ns; si++) {
        int k = shown[si], top = si * H;
        double lo = INFINITY, hi = -INFINITY;
        for (int64_t i = 0; i < n; i++)
            if (isfinite(val[i * 16 + k])) lo = fmin(lo, val[i * 16 + k]), hi = fmax(hi, val[i * 16 + k]);
        // Round ticks: a step of 1, 2 or 5 times a power of ten, the axis widened to whole steps
        // around the data (a flat line gets a step of its own size), every label with the
        // decimals the step needs.
        // Data that all lie in [0, 1] (fractions) keep the axis within it.
        bool fraction = lo >= 0.0 && hi <= 1.0;
        double span = hi - lo > 1e-12 * fmax(1.0, fabs(hi)) ? hi - lo : fmax(fabs(lo), 1e-3);
        double mag = pow(10.0, floor(log10(span / 4.0))), f = span / 4.0 / mag, tick = (f <= 1 ? 1 : f <= 2 ? 2 : f <= 5 ? 5 : 10) * mag;
        lo = floor(lo / tick + 1e-9) * tick, hi = ceil(hi / tick - 1e-9) * tick;
        if (hi <= lo) hi = lo + tick;
        if (fraction) lo = fmax(lo, 0.0), hi = fmin(hi, 1.0);
        int decimals = (int)CTL__MAX(0.0, -floor(log10(tick) + 1e-9)), nt = (int)lround((hi - lo) / tick);
        int pw = W - L - Rm, ph = H - Tm - Bm;
        fprintf(g, "<text x=\"%d\" y=\"%d\" font-weight=\"bold\">%s</text>\n", L, top + 18, keys[k]);
        fprintf(g, "<rect x=\"%d\" y=\"%d\" width=\"%d\" height=\"%d\" fill=\"none\" stroke=\"#999\"/>\n", L, top + Tm, pw, ph);
        for (int t = 0; t <= nt; t++) {   // y grid and labels
            double v = lo + tick * t;
            int y = top + Tm + ph - (int)lround(ph * (double)t / nt);
            fprintf(g, "<line x1=\"%d\" y1=\"%d\" x2=\"%d\" y2=\"%d\" stroke=\"#eee\"/>\n", L, y, L + pw, y);
            fprintf(g, "<text x=\"%d\" y=\"%d\" text-anchor=\"end\">%.*f</text>\n", L - 5, y + 4, decimals, fabs(v) < tick * 1e-6 ? 0.0 : v);
        }
        int xt = (int)CTL__MIN(4.0, x1 - x0);   // x labels: whole steps
        for (int t = 0; t <= xt; t++) {
            double v = x0 + (x1 - x0) * t / xt;
            fprintf(g, "<text x=\"%d\" y=\"%d\" text-anchor=\"%s\">%.0f</text>\n", L + (int)(pw * t / xt), top + Tm + ph + 16,
                    t == 0 ? "start" : t == xt ? "end" : "middle", v);
        }
        fprintf(g, "<polyline fill=\"none\" stroke=\"#1f77b4\" stroke-width=\"1.5\" points=\"");
        for (int64_t i = 0; i < n; i++) {
            double v = val[i * 16 + k];
            if (!isfinite(v)) continue;
            fprintf(g, "%.1f,%.1f ", L + pw * (step[i] - x0) / (x1 - x0), top + Tm + ph - ph * (v - lo) / (hi - lo));
        }
        fprintf(g, "\"/>\n");
    }
    fprintf(g, "<text x=\"%d\" y=\"%d\" text-anchor=\"middle\" fill=\"#666\">step</text>\n</svg>\n", L + (W - L - Rm) / 2, H * ns - 2);
    free(step), free(val);
    if (!out_close(&of, true)) return false;
    fprintf(stderr, "wrote %s: %d charts, %lld steps\n", out, ns, (long long)n);
    return true;
}

// ---- compare ----------------------------------------------------------------------------------

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

// Reads eval --details: the problems' lines and whether each was solved.
static int64_t read_details(const char *path, int64_t **lines, int8_t **correct) {
    FILE *f = fopen(path, "r");
    if (!f) return fail("compare: cannot open '%s'", path), -1;
    int64_t n = 0, cap = 0;
    *lines = NULL, *correct = NULL;
    char *line = NULL;
    size_t line_cap = 0;
    while (getline(&line, &line_cap, f) > 0) {
        double l = field(line, "line"), c = field(line, "correct");
        if (!isfinite(l) || !isfinite(c)) continue;
        if (n == cap) {
            int64_t *l2 = (int64_t *)realloc(*lines, (size_t)(2 * cap + 1024) * 8);
            int8_t *c2 = l2 ? (int8_t *)realloc(*correct, (size_t)(2 * cap + 1024)) : NULL;
            if (l2) *lines = l2;
            if (!c2) return free(line), fclose(f), fail("compare: out of memory"), -1;
            *correct = c2, cap = 2 * cap + 1024;
        }
        (*lines)[n] = (int64_t)l, (*correct)[n++] = c > 0;
    }
    free(line);
    fclose(f);
    return n;
}

// Wilson's 95% interval for k successes in n.
static void wilson(int64_t k, int64_t n, double *lo, double *hi) {
    double z = 1.959964, p = (double)k / (double)n, d = 1.0 + z * z / (double)n;
    double c = (p + z * z / (2.0 * (double)n)) / d, h = z * sqrt(p * (1.0 - p) / (double)n + z * z / (4.0 * (double)n * (double)n)) / d;
    *lo = c - h, *hi = c + h;
}

// Two evaluations of the same problems (eval --details): each accuracy with Wilson's 95%
// interval, and the paired difference b - a with a 95% paired-bootstrap interval (10000
// resamples of the problems, seeded) and McNemar's exact two-sided p-value on the problems
// where they disagree.
static bool cmd_compare(const options *o, const char *const *pos) {
    if (!pos[0] || !pos[1]) return bad("compare: give two eval --details files: cotlab compare before.jsonl after.jsonl");
    int64_t *la = NULL, *lb = NULL;
    int8_t *ca = NULL, *cb = NULL;
    int64_t na = read_details(pos[0], &la, &ca), nb = na < 0 ? -1 : read_details(pos[1], &lb, &cb);
    bool ok = na > 0 && nb > 0;
    if (na == 0 || nb == 0) fail("compare: no problems in '%s'", na == 0 ? pos[0] : pos[1]);
    if (ok && na != nb) ok = fail("compare: %lld problems in '%s', %lld in '%s'", (long long)na, pos[0], (long long)nb, pos[1]);
    for (int64_t i = 0; ok && i < na; i++)
        if (la[i] != lb[i]) ok = fail("compare: problem %lld is line %lld in one file and %lld in the other", (long long)i, (long long)la[i], (long long)lb[i]);
    if (ok) {
        int64_t ka = 0, kb = 0, only_a = 0, only_b = 0;
        for (int64_t i = 0; i < na; i++) ka += ca[i], kb += cb[i], only_a += ca[i] && !cb[i], only_b += cb[i] && !ca[i];
        double alo, ahi, blo, bhi, diffs[10000];
        wilson(ka, na, &alo, &ahi), wilson(kb, na, &blo, &bhi);
        ctl_rng rng;
        ctl_rng_seed(&rng, (uint64_t)o->seed);
        for (int r = 0; r < 10000; r++) {
            int64_t d = 0;
            for (int64_t i = 0; i < na; i++) {
                int64_t j = (int64_t)(ctl_rng_next(&rng) % (uint64_t)na);
                d += cb[j] - ca[j];
            }
            diffs[r] = (double)d / (double)na;
        }
        qsort(diffs, 10000, sizeof(double), cmp_double);
        int64_t m = only_a + only_b, lo = CTL__MIN(only_a, only_b);   // McNemar: the smaller count under Binomial(m, 1/2)
        double p = 0.0;
        for (int64_t k = 0; k <= lo; k++) {
            double lc = lgamma((double)m + 1) - lgamma((double)k + 1) - lgamma((double)(m - k) + 1);
            p += exp(lc - (double)m * log(2.0));
        }
        p = m ? CTL__MIN(1.0, 2.0 * p) : 1.0;
        printf("{\"problems\": %lld, \"a\": %.4f, \"a_lo\": %.4f, \"a_hi\": %.4f, \"b\": %.4f, \"b_lo\": %.4f, \"b_hi\": %.4f, "
               "\"diff\": %.4f, \"diff_lo\": %.4f, \"diff_hi\": %.4f, \"only_a\": %lld, \"only_b\": %lld, \"mcnemar_p\": %.3g}\n",
               (long long)na, (double)ka / na, alo, ahi, (double)kb / na, blo, bhi, (double)(kb - ka) / na, diffs[249], diffs[9749],
               (long long)only_a, (long long)only_b, p);
    }
    free(la), free(lb), free(ca), free(cb);
    return ok;
}

// ---- main -------------------------------------------------------------------------------------

// The whole command line. run false: parse and check the options (and the lists inside them)
// without opening a file or running the command; the fuzzer calls it so.
static int cli(int argc, char **argv, bool run) {
    options opts, *o = &opts;
    defaults(o);
    const char *cmd = argc > 1 ? argv[1] : "", *pos[2] = {NULL, NULL};
    const opt train_opts[] = {OPT_MODEL, OPT_ADAPTER, OPT_TRAIN, OPT_DATA,
                              {"per-sequence", O_FLAG, &o->per_sequence, "       SFT: mean of per-sequence means (TRL: tokens over the step)", 0, 0},
                              {"packing", O_FLAG, &o->packing, "       several examples per row, attention reset at each (first fit in data order)", 0, 0},
                              OPT_END};
    const opt dpo_opts[] = {OPT_MODEL, OPT_ADAPTER, OPT_TRAIN, OPT_DATA,
                            {"loss", O_STR, &o->loss, "L      sigmoid | ipo | hinge | robust | exo_pair | nca_pair | bco_pair | sppo_hard | apo_zero | apo_down | sigmoid_norm | simpo | orpo", 0, 0},
                            {"beta", O_FLOAT, &o->beta, "B      (0.1)", 0, 10000}, {"label-smoothing", O_FLOAT, &o->label_smoothing, "E      robust, exo_pair, cDPO (0)", 0, 0.5},
                            {"rpo-alpha", O_FLOAT, &o->rpo_alpha, "A      weight of the chosen NLL (0)", 0, 1e+06}, {"simpo-gamma", O_FLOAT, &o->simpo_gamma, "G      SimPO margin (0.5, TRL's)", -1e+06, 1e+06},
                            OPT_END};
    const opt grpo_opts[] = {OPT_MODEL, OPT_ADAPTER, OPT_TRAIN, OPT_DATA, OPT_SAMPLE,
                             {"group", O_INT, &o->group, "G      completions per prompt (4)", 2, 65536}, {"prompts", O_INT, &o->prompts, "P      prompts per generation (2)", 1, 65536},
                             {"reward", O_STR, &o->reward, "LIST   math, format (<think>), answer_line (#### n), length, with weights: math:1,format:0.2 (math)", 0, 0},
                             {"reward-cmd", O_STR, &o->reward_cmd, "PROG   a program and its arguments (run directly, no shell; quotes group words): completions as JSONL on stdin, a reward per line out", 0, 0},
                             {"length-budget", O_INT, &o->length_budget, "N      the length reward's budget (max-new / 2)", 0, 16777216},
                             {"loss", O_STR, &o->loss, "L      dapo | grpo | bnpo | dr_grpo (dapo)", 0, 0}, {"beta", O_FLOAT, &o->beta, "B      k3 KL weight (0); the reference: --init-adapter's model, else the base", 0, 10000},
                             {"epsilon", O_FLOAT, &o->eps, "E      clip (0.2)", 0, 100}, {"epsilon-high", O_FLOAT, &o->eps_high, "E      clip-higher (epsilon)", 0, 100},
                             {"delta", O_FLOAT, &o->delta, "D      cap of the unclipped ratio (off)", 0, 1e+06},
                             {"scale", O_STR, &o->scale, "S      group | batch | none | rloo (group)", 0, 0},
                             {"iterations", O_INT, &o->iterations, "N      optimiser steps per generation (1)", 1, 1e+06},
                             {"sequence-level", O_FLAG, &o->sequence_level, "       GSPO's sequence ratio", 0, 0},
                             {"mask-truncated", O_FLAG, &o->mask_truncated, "       completions without EOS do not count", 0, 0}, OPT_END};
    const opt gen_opts[] = {OPT_MODEL, OPT_SAMPLE, {"prompt", O_STR, &o->prompt, "TEXT   the prompt (a user turn when the model has a chat template)", 0, 0},
                            {"load", O_STR, &o->init_adapter, "PATH   an adapter file", 0, 0}, {"samples", O_INT, &o->samples, "N      completions (1)", 1, 1048576},
                            {"seed", O_INT, &o->seed, "S      (42)", -9.3e+18, 9.3e+18}, {"greedy", O_FLAG, &o->greedy, "       temperature 0", 0, 0},
                            {"no-quantized", O_FLAG, &o->no_quantized, "       dequantise the weights", 0, 0},
                            {"bf16", O_FLAG, &o->bf16, "       hold the matrices not kept quantised as bf16", 0, 0}, OPT_END};
    const opt eval_opts[] = {OPT_MODEL, OPT_SAMPLE, OPT_DATA, {"load", O_STR, &o->init_adapter, "PATH   an adapter file", 0, 0},
                             {"samples", O_INT, &o->samples, "N      sampled completions per problem for pass@k and the vote (1: greedy only)", 1, 1048576},
                             {"k", O_INT, &o->k, "K      pass@k (1)", 1, 1048576}, {"limit", O_INT, &o->limit, "N      the first N problems (all)", 0, BIG},
                             {"streams", O_INT, &o->streams, "N      sequences decoded together (64)", 1, 65536}, {"seed", O_INT, &o->seed, "S      (42)", -9.3e+18, 9.3e+18},
                             {"details", O_STR, &o->details, "PATH   one JSONL line per problem (greedy): correct, answer, completion (for compare)", 0, 0},
                             {"no-quantized", O_FLAG, &o->no_quantized, "       dequantise the weights", 0, 0},
                             {"bf16", O_FLAG, &o->bf16, "       hold the matrices not kept quantised as bf16", 0, 0}, OPT_END};
    const opt rft_opts[] = {OPT_MODEL, OPT_ADAPTER, OPT_TRAIN, OPT_DATA, OPT_SAMPLE,
                            {"rounds", O_INT, &o->rounds, "N      sample, filter, fine-tune rounds (1)", 1, 1e+06},
                            {"samples", O_INT, &o->samples, "K      solutions sampled per problem (4)", 1, 1048576}, {"limit", O_INT, &o->limit, "N      problems per round (all)", 0, BIG},
                            {"streams", O_INT, &o->streams, "N      sequences decoded together (64)", 1, 65536},
                            {"load", O_STR, &o->init_adapter, "PATH   start from this adapter", 0, 0}, OPT_END};
    const opt export_opts[] = {OPT_MODEL, {"load", O_STR, &o->init_adapter, "PATH   the cotlab adapter file (required)", 0, 0},
                               {"to", O_STR, &o->to, "F      llamacpp | peft | merged (llamacpp; merged without --load: the base as F32)", 0, 0}, {"out", O_STR, &o->out, "PATH   the file (a directory for peft)", 0, 0}, OPT_HELP};
    const opt merge_opts[] = {OPT_MODEL, {"adapters", O_STR, &o->adapters, "LIST   a.gguf:0.5,b.gguf:0.5 (weights: average or task arithmetic)", 0, 0},
                              {"out", O_STR, &o->out, "PATH   the merged GGUF", 0, 0}, OPT_HELP};
    const opt info_opts[] = {OPT_MODEL, OPT_ADAPTER, {"batch", O_INT, &o->batch, "B      (4)", 1, 65536}, {"seq-len", O_INT, &o->seq_len, "T      (256)", 2, 16777216}, OPT_HELP};
    const opt plot_opts[] = {{"out", O_STR, &o->out, "PATH   the SVG, also -o (metrics.svg)", 0, 0}, {"keys", O_STR, &o->targets, "LIST   metrics to chart (loss, reward, kl, rewards/accuracies, rewards/margins, lr)", 0, 0}, OPT_HELP};
    const opt compare_opts[] = {{"seed", O_INT, &o->seed, "S      the bootstrap's seed (42)", -9.3e+18, 9.3e+18}, OPT_HELP};
    static const struct { const char *name, *what; } cmds[] = {
        {"sft", "supervised fine-tuning on prompt/completion, messages, text or GSM8K data"},
        {"dpo", "preference optimisation (the DPO family, SimPO, ORPO) on prompt/chosen/rejected data"},
        {"grpo", "reinforcement with verifiable rewards: sample groups, score them, GRPO-family loss"},
        {"rft", "rejection-sampling self-training (STaR / RFT) on problems with answers"},
        {"generate", "sample completions of a prompt"},
        {"chat", "a conversation on the terminal (one line per user turn)"},
        {"eval", "accuracy on problems with answers: greedy, pass@k, majority vote, mean length"},
        {"export", "an adapter as llama.cpp LoRA GGUF or a PEFT directory, or merged into the model"},
        {"merge", "adapters' deltas added into the base with weights, as one GGUF"},
        {"info", "a model's shape, tensors and training memory plan"},
        {"plot", "SVG charts of a metrics.jsonl"},
        {"compare", "two evaluations of the same problems (eval --details): accuracies, the paired difference, McNemar"}};
    const opt *tables[] = {train_opts, dpo_opts, grpo_opts, rft_opts, gen_opts, gen_opts, eval_opts, export_opts, merge_opts, info_opts, plot_opts,
                           compare_opts};
    size_t c = 0;
    while (c < sizeof cmds / sizeof *cmds && strcmp(cmds[c].name, cmd)) c++;
    if (c == sizeof cmds / sizeof *cmds) {
        bool asked = !strcmp(cmd, "--help") || !strcmp(cmd, "help");
        if (cmd[0] && !asked) fprintf(stderr, "cotlab: unknown command '%s'\n\n", cmd);
        printf("cotlab: chain-of-thought fine-tuning on the command line\n\nusage: cotlab <command> [options]\n\n");
        for (size_t i = 0; i < sizeof cmds / sizeof *cmds; i++) printf("  %-9s %s\n", cmds[i].name, cmds[i].what);
        printf("\ncotlab <command> --help lists its options.\n");
        return asked ? 0 : 2;
    }
    if (c == 4 || c == 6) o->samples = 1;   // generate and eval: one completion (greedy for eval) unless asked
    if (!parse(argc - 2, argv + 2, tables[c], c >= 10 ? pos : NULL)) return 2;
    if (o->help) return usage(cmds[c].name, cmds[c].what, tables[c]), 0;
    if (strcmp(o->on_nonfinite, "stop") && strcmp(o->on_nonfinite, "skip"))
        return bad("--on-nonfinite is stop or skip, not '%s'", o->on_nonfinite), 2;
    if (!run) {
        uint32_t targets;
        reward_spec rw;
        return c < 4 && (!parse_targets(o->targets, &targets) || (c == 2 && !parse_rewards(o, &rw))) ? 2 : 0;
    }
    bool ok;
    switch (c) {
    case 0: ok = cmd_train(o, false); break;
    case 1: ok = cmd_train(o, true); break;
    case 2: ok = cmd_grpo(o); break;
    case 3: ok = cmd_rft(o); break;
    case 4: ok = cmd_generate(o); break;
    case 5: ok = cmd_chat(o); break;
    case 6: ok = cmd_eval(o); break;
    case 7: ok = cmd_export(o); break;
    case 8: ok = cmd_merge(o); break;
    case 9: ok = cmd_info(o); break;
    case 10: ok = cmd_plot(o, pos[0]); break;
    default: ok = cmd_compare(o, pos); break;
    }
    return ok ? 0 : stop_signal ? 128 + stop_signal : usage_error ? 2 : 1;
}

#ifndef COTLAB_CLI_NO_MAIN
int main(int argc, char **argv) { return cli(argc, argv, true); }
#endif
