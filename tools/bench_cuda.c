// make bench-cuda: whole training steps (ctl_train forward, cross-entropy, backward, AdamW) of
// a GPT-2-124M (full fine-tuning, B=8, T=1024) and of a SmolLM2-135M with LoRA r=16 on every
// block layer (B=8, T=512); the CUDA kernels at the GPT-2 step's shapes, one by one; and
// batched generation (64 sequences) on a SmolLM2-135M-shaped model. Each sits next to PyTorch
// doing the same work on the same GPU in the same run (tools/bench_cuda_torch.py, when torch
// with CUDA is installed: transformers models, PEFT for the LoRA), with the ratio. The weights
// are random: speed does not depend on their values, and nothing has to be downloaded.
//
//   build/bench_cuda [--quick] [--no-torch] [--reps N]
//
// Times are medians of N repetitions after a warm-up, between device syncs.
#define COTLAB_IMPLEMENTATION
#include "cotlab.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static int reps = 5;

static void log_error(ctl_log_level level, const char *msg, void *user) {
    (void)user;
    if (level == CTL_LOG_ERROR) printf("CUDA context: %s\n", msg);
}
static const ctl__kernels *K = &ctl__cuda_kernels;   // cotlab_cuda.cu's table of kernels

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

typedef void (*bench_fn)(ctl_ctx *ctx, void *arg);

// The median seconds of one call of fn, after one warm-up call.
static double timed(ctl_ctx *ctx, bench_fn fn, void *arg) {
    double t[64];
    fn(ctx, arg);
    if (ctl_device_sync(ctx)) {
        printf("  failed: %s\n", ctl_last_error(ctx));
        return NAN;
    }
    for (int r = 0; r < reps; r++) {
        double t0 = now();
        fn(ctx, arg);
        ctl_device_sync(ctx);
        t[r] = now() - t0;
    }
    qsort(t, (size_t)reps, sizeof t[0], cmp_double);
    return t[reps / 2];
}

static float *dev_random(ctl_ctx *ctx, int64_t n, float scale, ctl_rng *rng) {
    float *h = (float *)malloc((size_t)n * sizeof(float)), *d = (float *)ctl_device_alloc(ctx, (size_t)n * sizeof(float));
    for (int64_t i = 0; i < n; i++) h[i] = scale * (2.0f * ctl_rng_uniform(rng) - 1.0f);
    if (d) ctl_copy_to_device(ctx, d, h, (size_t)n * sizeof(float));
    free(h);
    return d;
}

// ---- the kernels of a training step ------------------------------------------------------------

typedef struct shapes {
    int64_t B, T, C, NH, HS, FF, V, L, n_params;
} shapes;

typedef struct step_bufs {
    shapes s;
    float *x, *w, *y, *dx, *dw, *dy, *qkv, *dqkv, *att, *datt, *lse, *mean, *rstd, *lnw, *lnb;
    float *head_w, *head_dw, *logp, *hlse, *dlogp, *p, *g, *m, *v;
    int32_t *targets;
    int64_t in, out;   // the linear layer being timed
} step_bufs;

static void run_linear(ctl_ctx *ctx, void *arg) {
    step_bufs *b = (step_bufs *)arg;
    int64_t N = b->s.B * b->s.T;
    K->linear_forward(ctx, b->y, b->x, CTL_F32, b->w, NULL, N, b->in, b->out);
    K->linear_backward(ctx, b->dx, b->dy, CTL_F32, b->w, N, b->in, b->out);
    K->linear_dw(ctx, b->dw, NULL, b->dy, b->out, b->x, N, b->in, b->out);
}

static void run_attention(ctl_ctx *ctx, void *arg) {
    step_bufs *b = (step_bufs *)arg;
    const shapes *s = &b->s;
    K->attention_forward(ctx, b->att, b->lse, b->qkv, NULL, s->B, s->T, s->NH, s->NH, s->HS);
    K->attention_backward(ctx, b->dqkv, b->datt, b->qkv, b->att, b->lse, NULL, s->B, s->T, s->NH, s->NH, s->HS);
}

static void run_layernorm(ctl_ctx *ctx, void *arg) {
    step_bufs *b = (step_bufs *)arg;
    int64_t N = b->s.B * b->s.T;
    K->layernorm_forward(ctx, b->y, b->mean, b->rstd, b->x, b->lnw, b->lnb, N, b->s.C, 1e-5f);
    K->layernorm_backward(ctx, b->dx, b->dw, b->dw + b->s.C, b->dy, b->x, b->lnw, b->mean, b->rstd, N, b->s.C);
}

static void run_gelu(ctl_ctx *ctx, void *arg) {
    step_bufs *b = (step_bufs *)arg;
    int64_t n = b->s.B * b->s.T * b->s.FF;
    K->gelu_forward(ctx, b->y, b->x, n);
    K->gelu_backward(ctx, b->dx, b->dy, b->x, n);
}

static void run_head(ctl_ctx *ctx, void *arg) {
    step_bufs *b = (step_bufs *)arg;
    const shapes *s = &b->s;
    int64_t N = s->B * s->T;
    ctl__head hd;
    memset(&hd, 0, sizeof hd);
    hd.type = CTL_F32, hd.w = b->head_w;
    K->lmhead_forward(ctx, b->logp, b->hlse, NULL, b->x, &hd, b->targets, N, s->C, s->V, 1.0f, NULL, 1024);
    K->lmhead_backward(ctx, b->dx, b->head_dw, b->dlogp, b->x, &hd, b->targets, b->hlse, N, s->C, s->V, 1.0f, NULL, 1024);
}

static void run_adamw(ctl_ctx *ctx, void *arg) {
    step_bufs *b = (step_bufs *)arg;
    int64_t len = b->s.n_params;   // (one array: a whole model's parameters back to back)
    bool decay = true;
    ctl__params p;
    memset(&p, 0, sizeof p);
    p.n = 1, p.w = &b->p, p.g = &b->g, p.m = &b->m, p.v = &b->v, p.len = &len, p.decay = &decay;
    ctl_optim_desc o;
    memset(&o, 0, sizeof o);
    o.beta1 = 0.9f, o.beta2 = 0.95f, o.eps = 1e-8f, o.weight_decay = 0.1f;
    K->adamw(ctx, &p, &o, 1.0f, 1e-4f, 1);
}

// PyTorch's times for the same kernels: "name seconds" lines from tools/bench_cuda_torch.py.
typedef struct torch_times {
    char name[16][32];
    double sec[16];
    int n;
    char version[64];
} torch_times;

static double torch_time(const torch_times *tt, const char *name) {
    for (int i = 0; i < tt->n; i++)
        if (!strcmp(tt->name[i], name)) return tt->sec[i];
    return NAN;
}

static void run_torch(const char *args, torch_times *tt) {
    char cmd[512];
    snprintf(cmd, sizeof cmd, "python3 tools/bench_cuda_torch.py %s --reps %d 2>&1", args, reps);
    FILE *p = popen(cmd, "r");
    char line[512];
    while (p && fgets(line, sizeof line, p)) {
        if (!strncmp(line, "TIME ", 5) && tt->n < 16 && sscanf(line + 5, "%31s %lf", tt->name[tt->n], &tt->sec[tt->n]) == 2) tt->n++;
        else if (!strncmp(line, "TORCH ", 6)) sscanf(line + 6, "%63s", tt->version);
        else if (!strncmp(line, "UNAVAILABLE", 11)) printf("  PyTorch: %s", line + 12);
    }
    if (p) pclose(p);
}

static void row(const char *what, const char *key, double sec, double flops, double tokens, const torch_times *tt) {
    double ts = torch_time(tt, key);
    printf("  %-30s %9.3f ms", what, 1e3 * sec);
    if (flops > 0) printf(" %7.1f TFLOP/s", flops / sec / 1e12);
    else if (tokens > 0) printf(" %9.0f tok/s   ", tokens / sec);
    else printf("                ");
    if (ts == ts) printf("   torch %9.3f ms   %5.2fx", 1e3 * ts, ts / sec);
    printf("\n");
}

static void bench_training(ctl_ctx *ctx, const shapes *s, bool torch) {
    ctl_rng rng;
    ctl_rng_seed(&rng, 1);
    int64_t N = s->B * s->T, C = s->C, big = N * (s->FF > 3 * C ? s->FF : 3 * C);
    size_t mark = ctl_device_mark(ctx);
    step_bufs b;
    memset(&b, 0, sizeof b);
    b.s = *s;
    b.x = dev_random(ctx, big, 1.0f, &rng), b.dx = dev_random(ctx, big, 0.0f, &rng);
    b.y = dev_random(ctx, big, 0.0f, &rng), b.dy = dev_random(ctx, big, 1.0f, &rng);
    b.w = dev_random(ctx, C * s->FF, 0.02f, &rng), b.dw = dev_random(ctx, C * s->FF, 0.0f, &rng);
    b.qkv = dev_random(ctx, N * 3 * C, 1.0f, &rng), b.dqkv = dev_random(ctx, N * 3 * C, 0.0f, &rng);
    b.att = dev_random(ctx, N * C, 0.0f, &rng), b.datt = dev_random(ctx, N * C, 1.0f, &rng);
    b.lse = dev_random(ctx, s->B * s->NH * s->T, 0.0f, &rng), b.mean = dev_random(ctx, N, 0.0f, &rng);
    b.rstd = dev_random(ctx, N, 0.0f, &rng), b.lnw = dev_random(ctx, C, 1.0f, &rng), b.lnb = dev_random(ctx, C, 0.1f, &rng);
    b.head_w = dev_random(ctx, s->V * C, 0.02f, &rng), b.head_dw = dev_random(ctx, s->V * C, 0.0f, &rng);
    b.logp = dev_random(ctx, N, 0.0f, &rng), b.hlse = dev_random(ctx, N, 0.0f, &rng), b.dlogp = dev_random(ctx, N, 1.0f / (float)N, &rng);
    b.p = dev_random(ctx, s->n_params, 0.02f, &rng), b.g = dev_random(ctx, s->n_params, 1e-3f, &rng);
    b.m = dev_random(ctx, s->n_params, 0.0f, &rng), b.v = dev_random(ctx, s->n_params, 0.0f, &rng);
    int32_t *tg = (int32_t *)malloc((size_t)N * sizeof(int32_t));
    for (int64_t i = 0; i < N; i++) tg[i] = (int32_t)(ctl_rng_next(&rng) % (uint64_t)s->V);
    b.targets = (int32_t *)ctl_device_alloc(ctx, (size_t)N * sizeof(int32_t));
    if (!b.targets || !b.v) {
        printf("  not enough device memory: %s\n", ctl_last_error(ctx));
        free(tg);
        ctl_device_release(ctx, mark);
        return;
    }
    ctl_copy_to_device(ctx, b.targets, tg, (size_t)N * sizeof(int32_t));
    free(tg);
    torch_times tt;
    memset(&tt, 0, sizeof tt);
    if (torch) {
        char args[256];
        snprintf(args, sizeof args, "train --B %lld --T %lld --C %lld --NH %lld --FF %lld --V %lld --params %lld", (long long)s->B,
                 (long long)s->T, (long long)C, (long long)s->NH, (long long)s->FF, (long long)s->V, (long long)s->n_params);
        run_torch(args, &tt);
    }
    printf("GPT-2-shaped training kernels, B=%lld T=%lld C=%lld heads=%lld V=%lld (forward + backward each)%s%s\n", (long long)s->B,
           (long long)s->T, (long long)C, (long long)s->NH, (long long)s->V, tt.n ? ", torch " : "", tt.version);
    double lin[3], f[3] = {0};
    const int64_t io[3][2] = {{C, 3 * C}, {C, s->FF}, {s->FF, C}};
    const char *names[3] = {"linear qkv", "linear fc", "linear proj"}, *keys[3] = {"qkv", "fc", "proj"};
    for (int i = 0; i < 3; i++) {
        b.in = io[i][0], b.out = io[i][1];
        lin[i] = timed(ctx, run_linear, &b);
        f[i] = 6.0 * (double)N * (double)b.in * (double)b.out;
        row(names[i], keys[i], lin[i], f[i], 0, &tt);
    }
    double att = timed(ctx, run_attention, &b), ln = timed(ctx, run_layernorm, &b), ge = timed(ctx, run_gelu, &b);
    double hd = timed(ctx, run_head, &b), ad = timed(ctx, run_adamw, &b);
    row("attention", "attention", att, 0, 0, &tt);
    row("layernorm", "layernorm", ln, 0, 0, &tt);
    row("gelu", "gelu", ge, 0, 0, &tt);
    row("lm head + log-softmax", "head", hd, 6.0 * (double)N * (double)C * (double)s->V, 0, &tt);
    row("adamw (all parameters)", "adamw", ad, 0, 0, &tt);
    // The step these kernels make up: per layer 4 linears (proj twice: attention and MLP
    // output), attention, two layernorms, gelu; then the head and the optimiser.
    double layer = lin[0] + lin[1] + 2.0 * lin[2] + att + 2.0 * ln + ge, step = (double)s->L * layer + hd + ad;
    double tl = torch_time(&tt, "qkv") + torch_time(&tt, "fc") + 2.0 * torch_time(&tt, "proj") + torch_time(&tt, "attention") +
                2.0 * torch_time(&tt, "layernorm") + torch_time(&tt, "gelu");
    double tstep = (double)s->L * tl + torch_time(&tt, "head") + torch_time(&tt, "adamw");
    printf("  %-30s %9.3f ms %9.0f tok/s", "sum: one step of these kernels", 1e3 * step, (double)N / step);
    if (tstep == tstep) printf("   torch %9.3f ms   %5.2fx", 1e3 * tstep, tstep / step);
    printf("\n  (a sum of kernel times; the ctl_train rows above time whole steps)\n");
    ctl_device_release(ctx, mark);
}

// ---- whole training steps ----------------------------------------------------------------------

typedef struct step_run {
    ctl_train *t;
    ctl_batch b;
    ctl_status st;
} step_run;

static void run_step(ctl_ctx *ctx, void *arg) {
    step_run *r = (step_run *)arg;
    float loss;
    if (r->st) return;
    r->st = ctl_train_forward(r->t, &r->b);
    if (!r->st) r->st = ctl_cross_entropy(ctx, r->b.B * r->b.T, ctl_train_logprobs(r->t), NULL, ctl_train_dlogprobs(r->t), &loss);
    if (!r->st) r->st = ctl_train_backward(r->t);
    if (!r->st) r->st = ctl_train_step(r->t, NULL);
}

// lora: SmolLM2-135M's shape with LoRA r=16 (alpha 32) on every block layer; else GPT-2-124M,
// every parameter training.
static void bench_step(ctl_ctx *ctx, bool quick, bool torch, bool lora) {
    ctl_model_config cfg;
    memset(&cfg, 0, sizeof cfg);
    if (lora) {
        cfg.arch = CTL_ARCH_LLAMA, cfg.vocab_size = quick ? 512 : 49152, cfg.n_ctx = 2048, cfg.n_embd = quick ? 64 : 576;
        cfg.n_layer = quick ? 2 : 30, cfg.n_head = quick ? 4 : 9, cfg.n_kv_head = quick ? 2 : 3, cfg.head_dim = quick ? 16 : 64;
        cfg.n_ff = quick ? 96 : 1536, cfg.tied_embeddings = true, cfg.rope_theta = 100000.0f, cfg.norm_eps = 1e-5f;
    } else {
        cfg.arch = CTL_ARCH_GPT2, cfg.vocab_size = quick ? 300 : 50257, cfg.n_ctx = 1024, cfg.n_embd = quick ? 64 : 768;
        cfg.n_layer = quick ? 2 : 12, cfg.n_head = quick ? 4 : 12, cfg.n_ff = quick ? 256 : 3072, cfg.tied_embeddings = true;
        cfg.norm_eps = 1e-5f;
    }
    int64_t B = quick ? 2 : 8, T = quick ? 32 : lora ? 512 : 1024, N = B * T;
    const char *what = lora ? (quick ? "tiny llama LoRA r=16" : "SmolLM2-135M LoRA r=16") : quick ? "tiny GPT-2 full" : "GPT-2-124M full";
    ctl_model *m;
    ctl_train *t = NULL;
    ctl_lora_desc ld;
    memset(&ld, 0, sizeof ld);
    ld.rank = 16, ld.alpha = 32;
    ctl_train_desc td;
    memset(&td, 0, sizeof td);
    td.batch = B, td.seq_len = T, td.optim.lr = 1e-4f, td.optim.weight_decay = 0.1f, td.optim.clip = 1.0f;
    if (ctl_model_create(ctx, &cfg, &m)) {
        printf("%s: %s\n", what, ctl_last_error(ctx));
        return;
    }
    ctl_model_init_random(m, 1);
    if ((lora && ctl_lora_attach(m, &ld)) || ctl_train_init(m, &td, &t)) {
        printf("%s: %s\n", what, ctl_last_error(ctx));
        ctl_model_free(m);
        return;
    }
    int32_t *tok = (int32_t *)malloc((size_t)N * sizeof(int32_t)), *tgt = (int32_t *)malloc((size_t)N * sizeof(int32_t));
    for (int64_t i = 0; i < N; i++) tok[i] = (int32_t)((i * 7919) % cfg.vocab_size), tgt[i] = (int32_t)((i * 104729 + 1) % cfg.vocab_size);
    step_run r = {t, {B, T, tok, tgt, NULL}, CTL_OK};
    double sec = timed(ctx, run_step, &r);
    torch_times tt;
    memset(&tt, 0, sizeof tt);
    if (torch) {
        char args[256];
        snprintf(args, sizeof args, "step --model %s --B %lld --T %lld%s", lora ? "smollm2-lora" : "gpt2", (long long)B, (long long)T,
                 quick ? " --quick" : "");
        run_torch(args, &tt);
    }
    printf("%s training step, B=%lld T=%lld, fp32, %s%s%s\n", what, (long long)B, (long long)T,
           t->dev ? "on the device" : "ON THE CPU", tt.n ? ", torch " : "", tt.version);
    if (r.st) printf("  failed: %s\n", ctl_last_error(ctx));
    else row("ctl_train step", "step", sec, 0, (double)N, &tt);
    free(tok), free(tgt);
    ctl_train_free(t);
    ctl_model_free(m);
}

// ---- batched generation ---------------------------------------------------------------------

static void bench_generation(ctl_ctx *ctx, bool quick, bool torch) {
    ctl_model_config cfg;   // SmolLM2-135M's shape
    memset(&cfg, 0, sizeof cfg);
    cfg.arch = CTL_ARCH_LLAMA, cfg.vocab_size = quick ? 512 : 49152, cfg.n_ctx = 2048, cfg.n_embd = quick ? 64 : 576;
    cfg.n_layer = quick ? 2 : 30, cfg.n_head = quick ? 4 : 9, cfg.n_kv_head = quick ? 2 : 3, cfg.head_dim = quick ? 16 : 64;
    cfg.n_ff = quick ? 96 : 1536, cfg.tied_embeddings = true, cfg.rope_theta = 100000.0f, cfg.norm_eps = 1e-5f;
    int64_t S = quick ? 4 : 64, P = quick ? 8 : 32, NEW = quick ? 8 : 64;
    ctl_model *m;
    ctl_infer *f;
    ctl_infer_desc id = {S, P + NEW};
    if (ctl_model_create(ctx, &cfg, &m) || (ctl_model_init_random(m, 3), ctl_infer_init(m, &id, &f))) {
        printf("  generation: %s\n", ctl_last_error(ctx));
        return;
    }
    int32_t *prompts = (int32_t *)malloc((size_t)(S * P) * sizeof(int32_t)), *out = (int32_t *)malloc((size_t)(S * NEW) * sizeof(int32_t));
    const int32_t **pp = (const int32_t **)malloc((size_t)S * sizeof(int32_t *));
    int64_t *lens = (int64_t *)malloc((size_t)S * sizeof(int64_t)), *out_lens = (int64_t *)malloc((size_t)S * sizeof(int64_t));
    for (int64_t i = 0; i < S * P; i++) prompts[i] = (int32_t)((i * 7919) % cfg.vocab_size);
    for (int64_t i = 0; i < S; i++) pp[i] = prompts + i * P, lens[i] = P;
    ctl_sampler_desc greedy;
    memset(&greedy, 0, sizeof greedy);
    double t[64];
    for (int r = 0; r <= reps; r++) {   // the first is the warm-up
        double t0 = now();
        ctl_status st = ctl_generate(f, S, pp, lens, &greedy, NEW, out, out_lens, NULL, NULL);
        if (st) {
            printf("  generation: %s\n", ctl_last_error(ctx));
            break;
        }
        if (r) t[r - 1] = now() - t0;
    }
    qsort(t, (size_t)reps, sizeof t[0], cmp_double);
    torch_times tt;
    memset(&tt, 0, sizeof tt);
    if (torch) {
        char args[256];
        snprintf(args, sizeof args, "generate --batch %lld --prompt %lld --new %lld%s", (long long)S, (long long)P, (long long)NEW,
                 quick ? " --quick" : "");
        run_torch(args, &tt);
    }
    printf("Batched generation, %s-shaped (random weights, fp32), %lld sequences, %lld-token prompts, %lld new tokens, greedy%s%s\n",
           quick ? "tiny" : "SmolLM2-135M", (long long)S, (long long)P, (long long)NEW, tt.n ? ", transformers " : "", tt.version);
    row("ctl_generate", "generate", t[reps / 2], 0, (double)(S * NEW), &tt);
    free(prompts), free(out), free(pp), free(lens), free(out_lens);
    ctl_infer_free(f);
    ctl_model_free(m);
}

int main(int argc, char **argv) {
    bool quick = false, torch = true;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--quick")) quick = true;
        else if (!strcmp(argv[i], "--no-torch")) torch = false;
        else if (!strcmp(argv[i], "--reps") && i + 1 < argc) reps = atoi(argv[++i]);
        else return fprintf(stderr, "usage: %s [--quick] [--no-torch] [--reps N]\n", argv[0]), 2;
    }
    reps = reps < 1 ? 1 : reps > 64 ? 64 : reps;
    const char *why;
    if (!ctl_cuda_available(&why)) {
        printf("bench-cuda: SKIPPED, no GPU here (%s)\n", why);
        return 0;
    }
    ctl_ctx *ctx;
    ctl_ctx_desc d = ctl_ctx_desc_default();
    d.device = CTL_DEVICE_CUDA, d.device_memory = quick ? (size_t)256 << 20 : (size_t)24 << 30;
    d.logger.func = log_error;   // (ctl_ctx_init tells its reasons to the logger)
    if (ctl_ctx_init(&ctx, &d)) return 1;
    printf("device: %s, median of %d\n", ctl_ctx_device_name(ctx), reps);
    shapes gpt2 = {8, 1024, 768, 12, 64, 3072, 50257, 12, 124439808};
    shapes tiny = {2, 64, 64, 4, 16, 256, 300, 2, 100000};
    bench_step(ctx, quick, torch, false);
    bench_step(ctx, quick, torch, true);
    bench_training(ctx, quick ? &tiny : &gpt2, torch);
    bench_generation(ctx, quick, torch);
    ctl_ctx_free(ctx);
    return 0;
}
