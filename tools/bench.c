// cotlab benchmark: the FMA peak; fp32 GEMM on GPT-2-124M and SmolLM2-135M shapes next to
// OpenBLAS; a whole GPT-2 training step next to PyTorch; generation next to llama.cpp; a LoRA
// step next to PyTorch + PEFT. Every reference is found at run time and skipped visibly when
// missing (OpenBLAS: apt-get install libopenblas-dev; pip install torch transformers peft
// llama-cpp-python).
//
//   cc -std=c99 -O2 -Wall -Wextra -Wpedantic -Werror -I. tools/bench.c -o build/bench -lm -pthread -ldl
//   build/bench [--threads N[,M...]] [--quick] [--no-torch] [--steps K] [--only peak|gemm|train|gen|lora|rl]
//
// Every time is the median of several runs (the machines this runs on are often shared).
// --threads: the thread counts to run; default 1,2 for the peak and GEMM sections and 2 for
// training. --steps: timed training steps after one warm-up (default 5, --quick 1). --quick: a
// smoke test (under a minute on 2 cores): fewer repeats, B*T 256 GEMMs only (else 256, 1024
// and 2048), training T 64 only, torch sdpa only.
#define _POSIX_C_SOURCE 200809L
#define COTLAB_IMPLEMENTATION
#include "cotlab.h"

#include <dlfcn.h>
#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define BENCH_X86 1
#include <immintrin.h>
#endif

#define MAX_THREADS 8

typedef struct options {
    int threads[MAX_THREADS], n_threads;   // n_threads 0: the defaults
    bool quick, no_torch;
    int steps;                             // 0: default
    const char *only;                      // NULL: every section
    const char *argv0;
} options;

// ---- small utilities -------------------------------------------------------------------------

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static double median(const double *x, int n) {
    double tmp[64];
    if (n <= 0) return 0.0;
    if (n > 64) n = 64;
    memcpy(tmp, x, (size_t)n * sizeof(double));
    qsort(tmp, (size_t)n, sizeof(double), cmp_double);
    return n % 2 ? tmp[n / 2] : 0.5 * (tmp[n / 2 - 1] + tmp[n / 2]);
}

static double maxrss_mb(void) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return (double)ru.ru_maxrss / 1024.0;   // Linux: KiB
}

static void die(const char *what, ctl_ctx *ctx, ctl_status st) {
    fprintf(stderr, "bench: %s failed: %s (%s)\n", what, ctl_status_str(st), ctx ? ctl_last_error(ctx) : "");
    exit(1);
}

static ctl_ctx *make_ctx_bf16(int n_threads, bool bf16_dot) {
    ctl_ctx *ctx;
    ctl_ctx_desc d = ctl_ctx_desc_default();
    d.n_threads = n_threads, d.bf16_dot = bf16_dot;
    ctl_status st = ctl_ctx_init(&ctx, &d);
    if (st) die("ctl_ctx_init", NULL, st);
    return ctx;
}

static ctl_ctx *make_ctx(int n_threads) { return make_ctx_bf16(n_threads, false); }

static float *random_floats(int64_t n, ctl_rng *rng) {
    float *x = (float *)malloc((size_t)n * sizeof(float));
    if (!x) {
        fprintf(stderr, "bench: out of memory\n");
        exit(1);
    }
    for (int64_t i = 0; i < n; i++) x[i] = 2.0f * ctl_rng_uniform(rng) - 1.0f;
    return x;
}

// ---- 1. FMA peak -----------------------------------------------------------------------------
// Twelve independent accumulators x = x * a + b hide the FMA latency (4 cycles, 2 pipes on
// current x86 cores need 8 in flight). a < 1 keeps the values bounded and normal.

#define PEAK_ACC 12

#ifdef BENCH_X86
__attribute__((target("avx2,fma"))) static float fma_probe_avx2(int64_t iters) {
    __m256 a = _mm256_set1_ps(0.9999999f), b = _mm256_set1_ps(1e-7f);
    __m256 x0 = _mm256_set1_ps(0.50f), x1 = _mm256_set1_ps(0.51f), x2 = _mm256_set1_ps(0.52f);
    __m256 x3 = _mm256_set1_ps(0.53f), x4 = _mm256_set1_ps(0.54f), x5 = _mm256_set1_ps(0.55f);
    __m256 x6 = _mm256_set1_ps(0.56f), x7 = _mm256_set1_ps(0.57f), x8 = _mm256_set1_ps(0.58f);
    __m256 x9 = _mm256_set1_ps(0.59f), x10 = _mm256_set1_ps(0.60f), x11 = _mm256_set1_ps(0.61f);
    for (int64_t i = 0; i < iters; i++) {
        x0 = _mm256_fmadd_ps(x0, a, b), x1 = _mm256_fmadd_ps(x1, a, b), x2 = _mm256_fmadd_ps(x2, a, b);
        x3 = _mm256_fmadd_ps(x3, a, b), x4 = _mm256_fmadd_ps(x4, a, b), x5 = _mm256_fmadd_ps(x5, a, b);
        x6 = _mm256_fmadd_ps(x6, a, b), x7 = _mm256_fmadd_ps(x7, a, b), x8 = _mm256_fmadd_ps(x8, a, b);
        x9 = _mm256_fmadd_ps(x9, a, b), x10 = _mm256_fmadd_ps(x10, a, b), x11 = _mm256_fmadd_ps(x11, a, b);
    }
    __m256 s = _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(x0, x1), _mm256_add_ps(x2, x3)),
                             _mm256_add_ps(_mm256_add_ps(x4, x5), _mm256_add_ps(x6, x7)));
    s = _mm256_add_ps(s, _mm256_add_ps(_mm256_add_ps(x8, x9), _mm256_add_ps(x10, x11)));
    float out[8];
    _mm256_storeu_ps(out, s);
    return out[0] + out[1] + out[2] + out[3] + out[4] + out[5] + out[6] + out[7];
}

__attribute__((target("avx512f"))) static float fma_probe_avx512(int64_t iters) {
    __m512 a = _mm512_set1_ps(0.9999999f), b = _mm512_set1_ps(1e-7f);
    __m512 x0 = _mm512_set1_ps(0.50f), x1 = _mm512_set1_ps(0.51f), x2 = _mm512_set1_ps(0.52f);
    __m512 x3 = _mm512_set1_ps(0.53f), x4 = _mm512_set1_ps(0.54f), x5 = _mm512_set1_ps(0.55f);
    __m512 x6 = _mm512_set1_ps(0.56f), x7 = _mm512_set1_ps(0.57f), x8 = _mm512_set1_ps(0.58f);
    __m512 x9 = _mm512_set1_ps(0.59f), x10 = _mm512_set1_ps(0.60f), x11 = _mm512_set1_ps(0.61f);
    for (int64_t i = 0; i < iters; i++) {
        x0 = _mm512_fmadd_ps(x0, a, b), x1 = _mm512_fmadd_ps(x1, a, b), x2 = _mm512_fmadd_ps(x2, a, b);
        x3 = _mm512_fmadd_ps(x3, a, b), x4 = _mm512_fmadd_ps(x4, a, b), x5 = _mm512_fmadd_ps(x5, a, b);
        x6 = _mm512_fmadd_ps(x6, a, b), x7 = _mm512_fmadd_ps(x7, a, b), x8 = _mm512_fmadd_ps(x8, a, b);
        x9 = _mm512_fmadd_ps(x9, a, b), x10 = _mm512_fmadd_ps(x10, a, b), x11 = _mm512_fmadd_ps(x11, a, b);
    }
    __m512 s = _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(x0, x1), _mm512_add_ps(x2, x3)),
                             _mm512_add_ps(_mm512_add_ps(x4, x5), _mm512_add_ps(x6, x7)));
    s = _mm512_add_ps(s, _mm512_add_ps(_mm512_add_ps(x8, x9), _mm512_add_ps(x10, x11)));
    return _mm512_reduce_add_ps(s);
}
#endif

static float fma_probe_scalar(int64_t iters) {
    float x[PEAK_ACC], a = 0.9999999f, b = 1e-7f, s = 0.0f;
    for (int j = 0; j < PEAK_ACC; j++) x[j] = 0.5f + 0.01f * (float)j;
    for (int64_t i = 0; i < iters; i++)
        for (int j = 0; j < PEAK_ACC; j++) x[j] = fmaf(x[j], a, b);
    for (int j = 0; j < PEAK_ACC; j++) s += x[j];
    return s;
}

// The probe's instruction set: 0 scalar, 1 AVX2+FMA (8 lanes), 2 AVX-512F (16 lanes). The
// peak quoted for GEMM is that of the widest one, the one cotlab's kernel uses.
static int g_probe_isa;
static const char *const k_isa_name[] = {"portable scalar fmaf", "AVX2+FMA (8-wide ymm)", "AVX-512F (16-wide zmm)"};

static int cpu_widest_isa(void) {
#ifdef BENCH_X86
    __builtin_cpu_init();
    if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma")) return 0;
    return __builtin_cpu_supports("avx512f") ? 2 : 1;
#else
    return 0;
#endif
}

static double probe_flops_per_iter(void) { return PEAK_ACC * 2.0 * (g_probe_isa == 2 ? 16 : g_probe_isa == 1 ? 8 : 1); }

static float fma_probe(int64_t iters) {
#ifdef BENCH_X86
    if (g_probe_isa == 2) return fma_probe_avx512(iters);
    if (g_probe_isa == 1) return fma_probe_avx2(iters);
#endif
    return fma_probe_scalar(iters);
}

typedef struct probe_arg {
    int64_t iters;
    float sink;
} probe_arg;

static void *probe_thread(void *p) {
    probe_arg *a = (probe_arg *)p;
    a->sink = fma_probe(a->iters);
    return NULL;
}

static volatile float g_sink;

// GFLOP/s of n_threads probes running at once (wall time from start to the last join).
static double peak_once(int n_threads, int64_t iters) {
    pthread_t th[MAX_THREADS];
    probe_arg arg[MAX_THREADS];
    double t0 = now_s();
    for (int i = 0; i < n_threads; i++) {
        arg[i].iters = iters;
        if (i > 0 && pthread_create(&th[i], NULL, probe_thread, &arg[i])) {
            fprintf(stderr, "bench: pthread_create failed\n");
            exit(1);
        }
    }
    probe_thread(&arg[0]);
    for (int i = 1; i < n_threads; i++) pthread_join(th[i], NULL);
    double dt = now_s() - t0;
    for (int i = 0; i < n_threads; i++) g_sink += arg[i].sink;
    return (double)n_threads * (double)iters * probe_flops_per_iter() / dt / 1e9;
}

static void peak_isa(const options *o, const int *th, int n_th, double *peak) {
    int runs = o->quick ? 3 : 7;
    double target = o->quick ? 0.05 : 0.2;   // seconds per probe
    int64_t iters = 1 << 20;
    double t0 = now_s();
    g_sink += fma_probe(iters);
    double dt = now_s() - t0;
    iters = (int64_t)((double)iters * target / (dt > 1e-6 ? dt : 1e-6));
    if (iters < 1000) iters = 1000;
    double g[MAX_THREADS][64];
    for (int r = 0; r < runs; r++)   // interleaved, so drift on a shared machine hits all alike
        for (int i = 0; i < n_th; i++) g[i][r] = peak_once(th[i], iters);
    for (int i = 0; i < n_th; i++) peak[i] = median(g[i], runs);
}

// Fills peak[] (per thread count) for the widest instruction set; prints every one the CPU has.
static void section_peak(const options *o, const int *th, int n_th, double *peak) {
    int widest = cpu_widest_isa();
    double p[3][MAX_THREADS];
    for (int isa = widest; isa >= (widest ? 1 : 0); isa--) {
        g_probe_isa = isa;
        peak_isa(o, th, n_th, p[isa]);
    }
    g_probe_isa = widest;
    printf("\n== 1. FMA peak: %d independent accumulators, median of %d ==\n", PEAK_ACC, o->quick ? 3 : 7);
    printf("%-24s", "instructions");
    for (int i = 0; i < n_th; i++) printf("  %2d thr GFLOP/s", th[i]);
    printf("\n");
    for (int isa = widest; isa >= (widest ? 1 : 0); isa--) {
        printf("%-24s", k_isa_name[isa]);
        for (int i = 0; i < n_th; i++) printf("  %15.1f", p[isa][i]);
        printf("%s\n", isa == widest ? "   <- the peak below" : "");
    }
    for (int i = 0; i < n_th; i++) peak[i] = p[widest][i];
}

// ---- 2. GEMM ---------------------------------------------------------------------------------
// The three products of a linear layer out = inp W^T, with the strides ctl_matmul_forward and
// ctl_matmul_backward pass to ctl_gemm:
//   fwd   out (N,OC)  = inp (N,C) W^T           M=N  N=OC K=C
//   dinp  dinp (N,C) += dout (N,OC) W           M=N  N=C  K=OC
//   dW    dW (OC,C)  += dout^T inp              M=OC N=C  K=N

typedef struct layer_shape {
    const char *model, *name;
    int64_t C, OC;
} layer_shape;
// The linear layers as cotlab runs them (q,k,v fused; SmolLM2's gate and up fused).
static const layer_shape k_layers[] = {
    {"gpt2", "qkv", 768, 2304},      {"gpt2", "attn.proj", 768, 768}, {"gpt2", "fc", 768, 3072},
    {"gpt2", "fc.proj", 3072, 768},  {"smol", "qkv", 576, 960},       {"smol", "o", 576, 576},
    {"smol", "gate.up", 576, 3072},  {"smol", "down", 1536, 576}};
static const char *const k_products[] = {"fwd", "dinp", "dW"};

typedef struct gemm_bufs {
    float *inp, *w, *out, *dout, *dinp, *dw;
} gemm_bufs;

// OpenBLAS, found at run time (dlopen), so the benchmark builds and runs without it.
typedef void (*sgemm_fn)(int order, int ta, int tb, int M, int N, int K, float alpha, const float *A, int lda,
                         const float *B, int ldb, float beta, float *C, int ldc);
static struct {
    sgemm_fn sgemm;
    void (*set_threads)(int);
    char *(*config)(void);
    const char *path;
} g_blas;

static bool load_openblas(void) {
    static const char *const names[] = {"libopenblas.so.0", "libopenblas.so", "libopenblasp.so.0"};
    const char *env = getenv("BENCH_OPENBLAS");
    for (int i = -1; i < 3; i++) {
        const char *name = i < 0 ? env : names[i];
        void *h = name ? dlopen(name, RTLD_NOW | RTLD_LOCAL) : NULL;
        if (!h) continue;
        // POSIX guarantees a data pointer from dlsym converts to a function pointer.
        void *f = dlsym(h, "cblas_sgemm"), *t = dlsym(h, "openblas_set_num_threads"), *c = dlsym(h, "openblas_get_config");
        if (!f || !t) continue;
        memcpy(&g_blas.sgemm, &f, sizeof f);
        memcpy(&g_blas.set_threads, &t, sizeof t);
        if (c) memcpy(&g_blas.config, &c, sizeof c);
        g_blas.path = name;
        return true;
    }
    return false;
}

enum { CBLAS_ROW = 101, CBLAS_N = 111, CBLAS_T = 112 };

// The three products of a linear layer; impl 0 cotlab, 1 OpenBLAS (same operands, same strides).
static void gemm_product(ctl_ctx *ctx, int impl, int prod, int64_t N, int64_t C, int64_t OC, gemm_bufs *b) {
    int n = (int)N, c = (int)C, oc = (int)OC;
    switch (prod * 2 + impl) {
    case 0: ctl_gemm(ctx, N, OC, C, b->inp, C, 1, b->w, 1, C, b->out, OC, false); break;
    case 1: g_blas.sgemm(CBLAS_ROW, CBLAS_N, CBLAS_T, n, oc, c, 1.0f, b->inp, c, b->w, c, 0.0f, b->out, oc); break;
    case 2: ctl_gemm(ctx, N, C, OC, b->dout, OC, 1, b->w, C, 1, b->dinp, C, true); break;
    case 3: g_blas.sgemm(CBLAS_ROW, CBLAS_N, CBLAS_N, n, c, oc, 1.0f, b->dout, oc, b->w, c, 1.0f, b->dinp, c); break;
    case 4: ctl_gemm(ctx, OC, C, N, b->dout, 1, OC, b->inp, C, 1, b->dw, C, true); break;
    default: g_blas.sgemm(CBLAS_ROW, CBLAS_T, CBLAS_N, oc, c, n, 1.0f, b->dout, oc, b->inp, c, 1.0f, b->dw, c); break;
    }
}

// Median seconds of one product: one warm-up call, then at least min_reps timed calls and
// enough to fill `target` seconds (at most 31).
static double time_gemm(ctl_ctx *ctx, int impl, int prod, int64_t N, int64_t C, int64_t OC, gemm_bufs *b,
                        int min_reps, double target) {
    double t[32], t0 = now_s();
    gemm_product(ctx, impl, prod, N, C, OC, b);
    double first = now_s() - t0;
    int reps = (int)(target / (first > 1e-6 ? first : 1e-6));
    reps = reps < min_reps ? min_reps : reps > 31 ? 31 : reps;
    for (int r = 0; r < reps; r++) {
        t0 = now_s();
        gemm_product(ctx, impl, prod, N, C, OC, b);
        t[r] = now_s() - t0;
    }
    return median(t, reps);
}

// Before timing: OpenBLAS and cotlab must compute the same products (a wrong transpose flag
// would time a different GEMM). Largest relative difference over the three products.
static double blas_agreement(ctl_ctx *ctx, gemm_bufs *b) {
    int64_t N = 37, C = 96, OC = 50;
    double worst = 0.0;
    float *keep[3] = {b->out, b->dinp, b->dw};
    int64_t len[3] = {N * OC, N * C, OC * C};
    for (int p = 0; p < 3; p++) {
        float *x = (float *)calloc((size_t)len[p], sizeof(float)), *y = (float *)calloc((size_t)len[p], sizeof(float));
        for (int impl = 0; impl < 2; impl++) {
            float *dst = impl ? y : x;
            if (p == 0) b->out = dst; else if (p == 1) b->dinp = dst; else b->dw = dst;
            gemm_product(ctx, impl, p, N, C, OC, b);
        }
        double d = 0.0, m = 0.0;
        for (int64_t i = 0; i < len[p]; i++) d = fmax(d, fabs((double)x[i] - y[i])), m = fmax(m, fabs((double)y[i]));
        worst = fmax(worst, d / (m > 0 ? m : 1));
        free(x), free(y);
    }
    b->out = keep[0], b->dinp = keep[1], b->dw = keep[2];
    return worst;
}

static void section_gemm(const options *o, const int *th, int n_th, const double *peak) {
    static const int64_t k_rows[] = {256, 1024, 2048};
    int min_reps = o->quick ? 2 : 5;
    double target = o->quick ? 0.02 : 0.15;
    ctl_ctx *ctx[MAX_THREADS];
    for (int i = 0; i < n_th; i++) ctx[i] = make_ctx(th[i]);
    bool blas = load_openblas();

    ctl_rng rng;
    ctl_rng_seed(&rng, 7);
    int64_t maxN = o->quick ? 256 : 2048, maxC = 3072, maxOC = 3072;
    gemm_bufs b;
    b.inp = random_floats(maxN * maxC, &rng);
    b.w = random_floats(maxOC * maxC, &rng);
    b.dout = random_floats(maxN * maxOC, &rng);
    b.out = random_floats(maxN * maxOC, &rng);
    b.dinp = random_floats(maxN * maxC, &rng);
    b.dw = random_floats(maxOC * maxC, &rng);

    printf("\n== 2. fp32 GEMM: GPT-2-124M (C=768) and SmolLM2-135M (C=576) linear layers, median of >=%d ==\n", min_reps);
    if (blas) {
        double agree = blas_agreement(ctx[0], &b);
        printf("OpenBLAS: %s (%s); its results agree with cotlab's within %.1e\n", g_blas.path,
               g_blas.config ? g_blas.config() : "?", agree);
        if (agree > 1e-4) {
            fprintf(stderr, "bench: OpenBLAS and cotlab disagree (%g): not timing\n", agree);
            blas = false;
        }
    } else {
        printf("OpenBLAS: not found, its columns are skipped (apt-get install libopenblas-dev, or BENCH_OPENBLAS=path)\n");
    }
    printf("%%pk: of the FMA peak above; xBLAS: cotlab's speed / OpenBLAS's, same threads\n");
    printf("%-34s", "");
    for (int i = 0; i < n_th; i++) {
        char head[40];
        snprintf(head, sizeof head, " %d %s ", th[i], th[i] == 1 ? "thread" : "threads");
        int pad = 27 - (int)strlen(head);
        printf("  %.*s%s%.*s", pad / 2, "--------------", head, pad - pad / 2, "--------------");
    }
    printf("\n%5s %-4s %-9s %-4s %5s %5s %5s", "B*T", "", "layer", "prod", "M", "N", "K");
    for (int i = 0; i < n_th; i++) printf("  %7s %4s %7s %5s", "GFLOP/s", "%pk", "OpenBLAS", "xBLAS");
    printf("\n");
    // All of cotlab's timings first, then OpenBLAS's: OpenBLAS's threads keep spinning for a
    // while after each call, which would slow whatever ran next on the same cores.
    enum { MAX_ROWS = 3 * 8 * 3 };
    size_t n_rows = o->quick ? 1 : sizeof k_rows / sizeof k_rows[0];
    int n_prod = (int)(n_rows * (sizeof k_layers / sizeof k_layers[0]) * 3);
    static double sec[2][MAX_ROWS][MAX_THREADS];
    for (int impl = 0; impl < (blas ? 2 : 1); impl++) {
        fprintf(stderr, "  timing %s ...\r", impl ? "OpenBLAS" : "cotlab");
        for (int q = 0; q < n_prod; q++) {
            const layer_shape *L = &k_layers[(q / 3) % (sizeof k_layers / sizeof k_layers[0])];
            int64_t N = k_rows[q / (3 * (int)(sizeof k_layers / sizeof k_layers[0]))];
            for (int i = 0; i < n_th; i++) {
                if (impl) g_blas.set_threads(th[i]);
                sec[impl][q][i] = time_gemm(ctx[i], impl, q % 3, N, L->C, L->OC, &b, min_reps, target);
            }
        }
    }
    double flops_sum = 0.0, wpct[MAX_THREADS] = {0}, tsum[MAX_THREADS] = {0}, bsum[MAX_THREADS] = {0};
    double logr[MAX_THREADS] = {0}, rmin[MAX_THREADS], rmax[MAX_THREADS];
    int nr = n_prod;
    for (int i = 0; i < n_th; i++) rmin[i] = 1e9, rmax[i] = 0;
    for (int q = 0; q < n_prod; q++) {
        const layer_shape *L = &k_layers[(q / 3) % (sizeof k_layers / sizeof k_layers[0])];
        int64_t N = k_rows[q / (3 * (int)(sizeof k_layers / sizeof k_layers[0]))], C = L->C, OC = L->OC;
        int p = q % 3;
        int64_t M = p == 2 ? OC : N, NN = p == 0 ? OC : C, K = p == 0 ? C : p == 1 ? OC : N;
        double flops = 2.0 * (double)M * (double)NN * (double)K;
        printf("%5lld %-4s %-9s %-4s %5lld %5lld %5lld", (long long)N, L->model, L->name, k_products[p], (long long)M,
               (long long)NN, (long long)K);
        for (int i = 0; i < n_th; i++) {
            double s = sec[0][q][i], gf = flops / s / 1e9, pct = 100.0 * gf / peak[i];
            printf("  %7.1f %4.0f", gf, pct);
            if (blas) {
                double sb = sec[1][q][i];
                printf(" %8.1f %5.2f", flops / sb / 1e9, sb / s);
                bsum[i] += sb, logr[i] += log(sb / s);
                rmin[i] = fmin(rmin[i], sb / s), rmax[i] = fmax(rmax[i], sb / s);
            } else {
                printf(" %8s %5s", "-", "-");
            }
            wpct[i] += flops * pct;
            tsum[i] += s;
        }
        flops_sum += flops;
        printf("\n");
    }
    printf("FLOP-weighted mean %% of peak:");
    for (int i = 0; i < n_th; i++) printf("  %d %s %.1f%%", th[i], th[i] == 1 ? "thread" : "threads", wpct[i] / flops_sum);
    printf("\nall products back to back, total FLOP / total time:");
    for (int i = 0; i < n_th; i++) {
        printf("\n  %d %s: cotlab %.1f GFLOP/s (%.1f%% of peak)", th[i], th[i] == 1 ? "thread " : "threads",
               flops_sum / tsum[i] / 1e9, 100.0 * flops_sum / tsum[i] / 1e9 / peak[i]);
        if (blas)
            printf(", OpenBLAS %.1f GFLOP/s: %.2fx (per shape: geometric mean %.2fx, range %.2f-%.2fx)", flops_sum / bsum[i] / 1e9,
                   bsum[i] / tsum[i], exp(logr[i] / nr), rmin[i], rmax[i]);
    }
    printf("\n");
    free(b.inp), free(b.w), free(b.dout), free(b.out), free(b.dinp), free(b.dw);
    for (int i = 0; i < n_th; i++) ctl_ctx_free(ctx[i]);
}

// ---- 3. training step ------------------------------------------------------------------------
// GPT-2 124M: 12 layers, 12 heads, 768 channels, vocab 50257, 1024 positions.
//
// Model FLOPs of one step (forward + backward; AdamW and the elementwise work not counted):
//   6 * P * B*T                    P = every weight but the position embedding, the tied
//                                  token embedding counted once (as the LM-head matmul):
//                                  2 FLOP per weight per token forward, 4 backward ("6ND")
// + 3 * L * 2*2*B*NH*T^2*HS / 2    attention scores q.k and the value sum p.v, causal (half
//                                  the T^2), forward once and backward twice over
//                                  = 6 * L * B * T^2 * C   (NH*HS = C)
// The recomputation cotlab does (attention probabilities and LM-head logits in backward) is
// work it chooses to do, so it is not counted.

#define GPT2_V 50257
#define GPT2_CTX 1024
#define GPT2_C 768
#define GPT2_L 12
#define GPT2_NH 12

typedef struct train_result {
    int ok;
    double ms, fwd_ms, bwd_ms, opt_ms, loss, plan_mb, rss_mb;
    int64_t params, flop_params;
    char err[256];
} train_result;

static double step_flops(int64_t P, int64_t B, int64_t T) {
    return 6.0 * (double)P * (double)(B * T) + 6.0 * GPT2_L * (double)B * (double)T * (double)T * GPT2_C;
}

static void train_run(int n_threads, int64_t B, int64_t T, int steps, train_result *res) {
    memset(res, 0, sizeof *res);
    ctl_ctx *ctx = make_ctx(n_threads);
    ctl_model_config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.arch = CTL_ARCH_GPT2;
    cfg.vocab_size = GPT2_V, cfg.n_ctx = GPT2_CTX, cfg.n_embd = GPT2_C;
    cfg.n_layer = GPT2_L, cfg.n_head = GPT2_NH;
    ctl_model *m;
    ctl_status st = ctl_model_create(ctx, &cfg, &m);
    if (st) die("ctl_model_create", ctx, st);
    ctl_model_init_random(m, 1234);
    ctl_train_desc td;
    memset(&td, 0, sizeof td);
    td.batch = B, td.seq_len = T, td.optim.lr = 1e-4f;
    ctl_train *t;
    if ((st = ctl_train_init(m, &td, &t))) die("ctl_train_init", ctx, st);
    ctl_memory_plan plan;
    ctl_train_memory(t, &plan);

    int64_t N = B * T;
    int32_t *tokens = (int32_t *)malloc((size_t)N * sizeof(int32_t));
    int32_t *targets = (int32_t *)malloc((size_t)N * sizeof(int32_t));
    ctl_rng rng;
    ctl_rng_seed(&rng, 42);
    for (int64_t i = 0; i < N; i++) tokens[i] = (int32_t)(ctl_rng_next(&rng) % GPT2_V);
    for (int64_t i = 0; i < N; i++) targets[i] = (int32_t)(ctl_rng_next(&rng) % GPT2_V);
    ctl_batch batch = {B, T, tokens, targets, NULL};

    double tot[64], fwd[64], bwd[64], opt[64];
    float loss = 0.0f;
    for (int s = 0; s <= steps && s < 64; s++) {   // step 0 is the warm-up
        double t0 = now_s();
        if ((st = ctl_train_forward(t, &batch))) die("ctl_train_forward", ctx, st);
        if ((st = ctl_cross_entropy(ctx, N, ctl_train_logprobs(t), NULL, ctl_train_dlogprobs(t), &loss)))
            die("ctl_cross_entropy", ctx, st);
        double t1 = now_s();
        if ((st = ctl_train_backward(t))) die("ctl_train_backward", ctx, st);
        double t2 = now_s();
        if ((st = ctl_train_step(t, NULL))) die("ctl_train_step", ctx, st);
        double t3 = now_s();
        if (s > 0) tot[s - 1] = t3 - t0, fwd[s - 1] = t1 - t0, bwd[s - 1] = t2 - t1, opt[s - 1] = t3 - t2;
    }
    res->ok = 1;
    res->ms = 1e3 * median(tot, steps);
    res->fwd_ms = 1e3 * median(fwd, steps);
    res->bwd_ms = 1e3 * median(bwd, steps);
    res->opt_ms = 1e3 * median(opt, steps);
    res->loss = loss;
    res->plan_mb = (double)plan.total / 1048576.0;
    res->params = ctl_model_numel(m);
    ctl_param *wpe = ctl_model_find(m, "position_embd.weight");
    res->flop_params = res->params - (wpe ? ctl_tensor_numel(&wpe->value) : 0);
    free(tokens), free(targets);
    ctl_train_free(t);
    ctl_model_free(m);
    ctl_ctx_free(ctx);
    res->rss_mb = maxrss_mb();
}

// Runs fn(arg, res) in its own process, so that its peak RSS is its own; res (size bytes) comes
// back through a pipe. Without fork or pipe it runs here (the RSS is then cumulative).
static void forked(void (*fn)(const void *arg, void *res), const void *arg, void *res, size_t size, char *err, size_t err_cap) {
    int fd[2];
    memset(res, 0, size);
    fflush(stdout);
    pid_t pid = -1;
    if (pipe(fd) == 0 && (pid = fork()) < 0) close(fd[0]), close(fd[1]);
    if (pid < 0) {
        fn(arg, res);
        return;
    }
    if (pid == 0) {
        close(fd[0]);
        char *buf = (char *)malloc(size);
        fn(arg, buf);
        const char *p = buf;
        size_t left = size;
        while (left > 0) {
            ssize_t w = write(fd[1], p, left);
            if (w <= 0) _exit(1);
            p += w, left -= (size_t)w;
        }
        _exit(0);
    }
    close(fd[1]);
    char *p = (char *)res;
    size_t got = 0;
    while (got < size) {
        ssize_t r = read(fd[0], p + got, size - got);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) break;
        got += (size_t)r;
    }
    close(fd[0]);
    int status = 0;
    waitpid(pid, &status, 0);
    if (got != size) {
        memset(res, 0, size);
        snprintf(err, err_cap, "benchmark process failed (status %d)", status);
    }
}

typedef struct train_args { int n_threads; int64_t B, T; int steps; } train_args;

static void train_child(const void *arg, void *res) {
    const train_args *a = (const train_args *)arg;
    train_run(a->n_threads, a->B, a->T, a->steps, (train_result *)res);
}

static void train_forked(int n_threads, int64_t B, int64_t T, int steps, train_result *res) {
    train_args a = {n_threads, B, T, steps};
    forked(train_child, &a, res, sizeof *res, res->err, sizeof res->err);
}

// ---- 4. PyTorch ------------------------------------------------------------------------------

typedef struct torch_result {
    int ok, unavailable;
    double eager_ms, sdpa_ms, ms, tok_s, rss_mb;
    char best[16];
} torch_result;

static const char *torch_script(const options *o) {
    static char path[1024];
    if (access("tools/bench_torch.py", R_OK) == 0) return "tools/bench_torch.py";
    const char *slash = strrchr(o->argv0, '/');   // build/bench -> build/../tools/bench_torch.py
    if (slash && (size_t)(slash - o->argv0) < sizeof path - 64) {
        snprintf(path, sizeof path, "%.*s/../tools/bench_torch.py", (int)(slash - o->argv0), o->argv0);
        if (access(path, R_OK) == 0) return path;
    }
    return NULL;
}

static double field(const char *line, const char *key) {
    const char *p = strstr(line, key);
    return p ? atof(p + strlen(key)) : NAN;
}

static void torch_run(const options *o, int n_threads, int64_t B, int64_t T, int steps, const char *attn,
                      torch_result *res) {
    char cmd[1400], line[1024], last[4][1024];
    int n_last = 0;
    memset(res, 0, sizeof *res);
    res->eager_ms = res->sdpa_ms = NAN;
    snprintf(cmd, sizeof cmd, "python3 '%s' --threads %d --batch %lld --seq %lld --steps %d --attn %s 2>&1",
             torch_script(o), n_threads, (long long)B, (long long)T, steps, attn);
    fflush(stdout);
    FILE *f = popen(cmd, "r");
    if (!f) return;
    while (fgets(line, sizeof line, f)) {
        if (!strncmp(line, "UNAVAILABLE", 11)) {
            res->unavailable = 1;
            memcpy(last[n_last % 4], line, sizeof line);
            n_last++;
        } else if (!strncmp(line, "RESULT ", 7)) {
            res->ok = 1;
            res->eager_ms = field(line, " eager_ms=");
            res->sdpa_ms = field(line, " sdpa_ms=");
            res->ms = field(line, " ms_per_step=");
            res->tok_s = field(line, " tokens_per_s=");
            res->rss_mb = field(line, " maxrss_mb=");
            const char *b = strstr(line, " best=");
            if (b) sscanf(b + 6, "%15s", res->best);
        } else {
            memcpy(last[n_last % 4], line, sizeof line);
            n_last++;
        }
    }
    int rc = pclose(f);
    if (!res->ok && (res->unavailable || (WIFEXITED(rc) && WEXITSTATUS(rc) == 127))) {
        res->unavailable = 1;   // no python3, torch or transformers: not an error
        return;
    }
    if (!res->ok) {
        fprintf(stderr, "bench: '%s' gave no RESULT line (status %d); its last output:\n", cmd, rc);
        for (int i = n_last > 4 ? n_last - 4 : 0; i < n_last; i++) fprintf(stderr, "  %s", last[i % 4]);
    }
}

// llm.c's CPU trainer on the same step (B, T, threads), through build/bench_llmc (make
// build/bench_llmc after tools/get_llmc.sh): its tokens/s, or NAN with *why set.
static double llmc_run(int n_threads, int64_t B, int64_t T, int steps, const char **why) {
    char cmd[256], line[512];
    double rate = NAN;
    if (access("build/bench_llmc", X_OK) != 0) {
        *why = "build/bench_llmc not built (tools/get_llmc.sh && make build/bench_llmc)";
        return NAN;
    }
    snprintf(cmd, sizeof cmd, "build/bench_llmc --B %lld --T %lld --steps %d --threads %d 2>/dev/null", (long long)B, (long long)T, steps,
             n_threads);
    fflush(stdout);
    FILE *f = popen(cmd, "r");
    while (f && fgets(line, sizeof line, f))
        if (!strncmp(line, "RESULT", 6)) rate = field(line, "tokens_per_s=");
    if (f) pclose(f);
    if (rate != rate) *why = "build/bench_llmc failed";
    return rate;
}

static void section_train(const options *o, const int *th, int n_th, const int *peak_th, int n_peak,
                          const double *peak) {
    static const int64_t k_T[] = {64, 256};
    const int64_t B = 4;
    int n_T = o->quick ? 1 : 2;
    int steps = o->steps > 0 ? o->steps : o->quick ? 1 : 5;
    const char *script = o->no_torch ? NULL : torch_script(o);
    bool torch = script != NULL;
    const char *attn = o->quick ? "sdpa" : "eager,sdpa";
    train_result cres[MAX_THREADS][2];
    torch_result tres[MAX_THREADS][2];

    printf("\n== 3. Training step: GPT-2 124M (12 layers, 12 heads, C 768, V 50257, n_ctx 1024) ==\n");
    printf("step = ctl_train_forward + ctl_cross_entropy + ctl_train_backward + ctl_train_step (AdamW\n"
           "lr 1e-4); random tokens and targets (seed 42); 1 warm-up step, then the median of %d.\n", steps);
    printf("model FLOP/step = 6*P*B*T + 6*L*B*T^2*C: P = 123,653,376 weights (all but the position\n"
           "embedding; tied LM head once), plus causal attention q.k and p.v (fwd 1x, bwd 2x).\n");
    printf("%3s %2s %4s %7s %9s %8s %8s %7s %7s %8s %5s %7s %7s\n", "thr", "B", "T", "GFLOP", "ms/step",
           "fwd+CE", "bwd", "AdamW", "tok/s", "GFLOP/s", "%pk", "plan MB", "RSS MB");
    for (int i = 0; i < n_th; i++)
        for (int s = 0; s < n_T; s++) {
            int64_t T = k_T[s];
            train_result *r = &cres[i][s];
            train_forked(th[i], B, T, steps, r);
            if (!r->ok) {
                printf("%3d %2lld %4lld  failed: %s\n", th[i], (long long)B, (long long)T, r->err);
                continue;
            }
            if (r->flop_params != 123653376) printf("(note: P = %lld)\n", (long long)r->flop_params);
            double fl = step_flops(r->flop_params, B, T), gfs = fl / (r->ms / 1e3) / 1e9, pk = NAN;
            for (int j = 0; j < n_peak; j++)
                if (peak_th[j] == th[i]) pk = 100.0 * gfs / peak[j];
            printf("%3d %2lld %4lld %7.1f %9.1f %8.1f %8.1f %7.1f %7.1f %8.1f %5.1f %7.0f %7.0f\n", th[i],
                   (long long)B, (long long)T, fl / 1e9, r->ms, r->fwd_ms, r->bwd_ms, r->opt_ms,
                   (double)(B * T) / (r->ms / 1e3), gfs, pk, r->plan_mb, r->rss_mb);
            fflush(stdout);
            memset(&tres[i][s], 0, sizeof tres[i][s]);
            if (torch) {
                torch_run(o, th[i], B, T, steps, attn, &tres[i][s]);
                if (tres[i][s].unavailable) torch = false;   // do not try again
            }
        }
    if (n_peak == 0) printf("(%%pk: no peak measured in this run)\n");

    // llm.c at B 4, T 64 (its own default step), each thread count; the PyTorch table follows.
    const char *why = NULL;
    int llmc_steps = steps < 3 ? steps : 3;
    printf("\n== 3b. llm.c side by side: train_gpt2.c (its CPU trainer, built with its Makefile's -Ofast\n"
           "-march=native -fopenmp), B 4, T 64, random weights, 1 warm-up step then the median of %d ==\n", llmc_steps);
    for (int i = 0; i < n_th; i++) {
        double rate = why ? NAN : llmc_run(th[i], B, 64, llmc_steps, &why);
        if (why) {
            printf("skipped (%s)\n", why);
            break;
        }
        double mine = cres[i][0].ok ? (double)(B * 64) / (cres[i][0].ms / 1e3) : NAN;
        printf("%3d threads: cotlab %7.1f tok/s, llm.c %7.1f tok/s, ratio %5.2f\n", th[i], mine, rate, mine / rate);
    }

    printf("\n== 4. PyTorch side by side: transformers GPT2LMHeadModel, fp32, same step ==\n");
    if (!torch) {
        printf("skipped (%s)\n", o->no_torch ? "--no-torch"
                                 : !script ? "tools/bench_torch.py not found"
                                           : "python3 cannot import torch and transformers");
        return;
    }
    printf("torch: loss = mean cross-entropy of the logits, torch.optim.AdamW (foreach), zero_grad;\n"
           "reference = the faster of attn_implementation eager and sdpa. ratio = torch ms / cotlab ms\n"
           "(> 1: cotlab faster).\n");
    printf("%3s %2s %4s %9s %9s %9s %5s %6s %9s %9s %7s %7s\n", "thr", "B", "T", "cotlab ms", "eager ms",
           "sdpa ms", "ref", "ratio", "ctl tok/s", "pt tok/s", "ctl RSS", "pt RSS");
    for (int i = 0; i < n_th; i++)
        for (int s = 0; s < n_T; s++) {
            train_result *c = &cres[i][s];
            torch_result *p = &tres[i][s];
            if (!c->ok || !p->ok) {
                printf("%3d %2lld %4lld  %s\n", th[i], (long long)B, (long long)k_T[s],
                       !c->ok ? "cotlab run failed" : "torch run failed (see stderr)");
                continue;
            }
            double tok = (double)(B * k_T[s]);
            printf("%3d %2lld %4lld %9.1f %9.1f %9.1f %5s %6.2f %9.1f %9.1f %7.0f %7.0f\n", th[i], (long long)B,
                   (long long)k_T[s], c->ms, p->eager_ms, p->sdpa_ms, p->best, p->ms / c->ms, tok / (c->ms / 1e3),
                   p->tok_s, c->rss_mb, p->rss_mb);
        }
    printf("(RSS: peak resident MB of each process, getrusage; nan: implementation not run)\n");
}

// ---- main ------------------------------------------------------------------------------------

// ---- 5. Generation: SmolLM2-135M-Instruct, cotlab and llama.cpp ---------------------------------

#define GEN_MODEL "models/SmolLM2-135M-Instruct.Q4_1.gguf"
#define GEN_F32 "build/SmolLM2-135M-Instruct.f32.gguf"
#define GEN_BF16 "build/SmolLM2-135M-Instruct.bf16.gguf"

// The same model with every tensor dequantised, the matrices stored as `type` (F32 or BF16)
// and the vectors as F32 (metadata copied), for llama.cpp.
static bool export_as(ctl_ctx *ctx, ctl_ggml_type type, const char *path) {
    ctl_gguf *g;
    ctl_gguf_writer *w;
    if (ctl_gguf_open(ctx, GEN_MODEL, &g) || ctl_gguf_writer_init(ctx, &w)) return false;
    bool ok = true;
    uint32_t ftype = type == CTL_GGML_BF16 ? 32 : 0;   // llama.cpp's MOSTLY_BF16, ALL_F32
    for (int64_t i = 0; ok && i < ctl_gguf_kv_count(g); i++) {
        const ctl_gguf_kv *kv = ctl_gguf_kv_at(g, i);
        ok = !strcmp(kv->key, "general.file_type") ? ctl_gguf_writer_set_u32(w, kv->key, ftype) == CTL_OK
                                                    : ctl_gguf_writer_copy_kv(w, g, kv) == CTL_OK;
    }
    for (int64_t i = 0; ok && i < ctl_gguf_tensor_count(g); i++) {
        const ctl_gguf_tensor *t = ctl_gguf_tensor_at(g, i);
        float *x = (float *)malloc((size_t)ctl_gguf_tensor_numel(t) * sizeof(float));
        ok = x && ctl_gguf_read_f32(g, t, x) == CTL_OK &&
             ctl_gguf_writer_add_tensor(w, t->name, t->n_dims == 2 ? type : CTL_GGML_F32, t->n_dims, t->ne, x) == CTL_OK;
        free(x);
    }
    ok = ok && ctl_gguf_writer_save(w, path) == CTL_OK;
    ctl_gguf_writer_free(w);
    ctl_gguf_close(g);
    return ok;
}

static double cotlab_gen(int n_threads, int streams, int tokens, ctl_model_desc md) {
    ctl_ctx *ctx = make_ctx(n_threads);
    ctl_model *m;
    ctl_infer *f;
    ctl_infer_desc d = {8, 256};
    if (ctl_model_load_gguf(ctx, GEN_MODEL, &md, &m) || ctl_infer_init(m, &d, &f)) die("generation setup", ctx, CTL_ERR_IO);
    int32_t prompt[10] = {1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 2}, out[8 * 64];
    const int32_t *pp[8];
    int64_t lens[8], out_lens[8];
    for (int i = 0; i < 8; i++) pp[i] = prompt, lens[i] = 10;
    ctl_sampler_desc sd;
    memset(&sd, 0, sizeof sd);
    double r[3];
    for (int k = 0; k < 3; k++) {
        double t = now_s();
        ctl_generate(f, streams, pp, lens, &sd, tokens, out, out_lens, NULL, NULL);
        r[k] = streams * tokens / (now_s() - t);
    }
    ctl_infer_free(f);
    ctl_model_free(m);
    ctl_ctx_free(ctx);
    return median(r, 3);
}

static double llamacpp_gen(const options *o, const char *model, int n_threads, int tokens) {
    char cmd[512], line[512];
    double rate = NAN;
    if (o->no_torch) return NAN;   // --no-torch: no Python references at all
    snprintf(cmd, sizeof cmd, "python3 tools/bench_gen.py %s --threads %d --tokens %d 2>/dev/null", model, n_threads, tokens);
    FILE *f = popen(cmd, "r");
    while (f && fgets(line, sizeof line, f))
        if (!strncmp(line, "RESULT", 6)) rate = field(line, "tok_per_s=");
    if (f) pclose(f);
    return rate;
}

static void section_gen(const options *o, int n_threads) {
    FILE *probe = fopen(GEN_MODEL, "rb");
    printf("\n== 5. Generation: SmolLM2-135M-Instruct, greedy, 64 new tokens, %d threads, median of 3 ==\n", n_threads);
    if (!probe) {
        printf("skipped (%s is missing; tools/get_smollm2.sh fetches it)\n", GEN_MODEL);
        return;
    }
    fclose(probe);
    int tokens = o->quick ? 16 : 64;
    // Each weight format in cotlab (loaded from the Q4_1 file: dequantised to fp32, kept as
    // Q4_1, rounded to bf16) next to llama.cpp on a file of the same format.
    static const char *const names[3] = {"f32", "Q4_1", "bf16"};
    static const char *const files[3] = {GEN_F32, GEN_MODEL, GEN_BF16};
    ctl_ctx *ctx = make_ctx(1);
    bool have[3] = {!o->no_torch && export_as(ctx, CTL_GGML_F32, GEN_F32), true, !o->no_torch && export_as(ctx, CTL_GGML_BF16, GEN_BF16)};
    ctl_ctx_free(ctx);
    printf("weights   cotlab 1 stream   llama.cpp 1 stream   ratio   cotlab 8 streams (aggregate)   8 vs 1\n");
    for (int k = 0; k < 3; k++) {
        ctl_model_desc md = {k == 1, k == 2};
        double one = cotlab_gen(n_threads, 1, tokens, md), eight = cotlab_gen(n_threads, 8, tokens, md);
        double ref = have[k] ? llamacpp_gen(o, files[k], n_threads, tokens) : NAN;
        printf("%-7s %17.1f %20.1f %7.2f %30.1f %8.2f\n", names[k], one, ref, one / ref, eight, eight / one);
    }
    printf("(tok/s; nan: llama-cpp-python not installed, or --no-torch)\n");
}

// ---- 6. LoRA fine-tuning: SmolLM2-135M on an fp32, a kept-Q4_1 and a bf16 base -------------------

typedef struct lora_result {
    int ok;
    double ms, plan_mb, rss_mb, trainable;
    char err[256];
} lora_result;

typedef struct lora_args { int n_threads, steps, base; int64_t T; } lora_args;   // base: 0 fp32, 1 Q4_1, 2 bf16, 3 bf16 dot

// One process: the model (fp32 from SmolLM2's shape with random weights, as the PyTorch side
// does; or the Q4_1 file kept quantised, or rounded to bf16), LoRA r 16 alpha 32 on every
// linear layer, B = 1.
static void lora_child(const void *arg, void *out) {
    const lora_args *a = (const lora_args *)arg;
    lora_result *res = (lora_result *)out;
    memset(res, 0, sizeof *res);
    ctl_ctx *ctx = make_ctx_bf16(a->n_threads, a->base == 3);
    ctl_model *m;
    ctl_status st;
    if (a->base == 3 && !ctl_ctx_bf16_dot(ctx)) {
        snprintf(res->err, sizeof res->err, "this CPU has no AVX512_BF16");
        ctl_ctx_free(ctx);
        return;
    }
    if (a->base) {
        ctl_model_desc md = {a->base == 1, a->base >= 2};
        if ((st = ctl_model_load_gguf(ctx, GEN_MODEL, &md, &m))) die("load", ctx, st);
    } else {
        ctl_model_config cfg;
        memset(&cfg, 0, sizeof cfg);
        cfg.arch = CTL_ARCH_LLAMA, cfg.vocab_size = 49152, cfg.n_ctx = 2048, cfg.n_embd = 576, cfg.n_layer = 30;
        cfg.n_head = 9, cfg.n_kv_head = 3, cfg.n_ff = 1536, cfg.tied_embeddings = true;
        if ((st = ctl_model_create(ctx, &cfg, &m))) die("create", ctx, st);
        ctl_model_init_random(m, 1234);
    }
    ctl_lora_desc ld;
    memset(&ld, 0, sizeof ld);
    ld.rank = 16, ld.alpha = 32.0f;
    if ((st = ctl_lora_attach(m, &ld))) die("lora_attach", ctx, st);
    ctl_train_desc td;
    memset(&td, 0, sizeof td);
    td.batch = 1, td.seq_len = a->T, td.optim.lr = 1e-4f;
    ctl_memory_plan plan;
    if ((st = ctl_train_plan_model(m, &td, &plan))) die("train_plan_model", ctx, st);
    ctl_train *t;
    if ((st = ctl_train_init(m, &td, &t))) die("train_init", ctx, st);
    int32_t *tok = (int32_t *)malloc((size_t)a->T * sizeof(int32_t));
    ctl_rng rng;
    ctl_rng_seed(&rng, 42);
    for (int64_t i = 0; i < a->T; i++) tok[i] = (int32_t)(ctl_rng_next(&rng) % 49152);
    ctl_batch b = {1, a->T, tok, tok, NULL};
    double times[64];
    for (int s = 0; s <= a->steps && s < 64; s++) {
        float loss;
        double t0 = now_s();
        if ((st = ctl_train_forward(t, &b)) || (st = ctl_cross_entropy(ctx, a->T, ctl_train_logprobs(t), NULL, ctl_train_dlogprobs(t), &loss)) ||
            (st = ctl_train_backward(t)) || (st = ctl_train_step(t, NULL)))
            die("lora step", ctx, st);
        if (s) times[s - 1] = now_s() - t0;
    }
    for (int64_t i = 0; i < ctl_model_param_count(m); i++)
        if (ctl_model_param(m, i)->trainable) res->trainable += (double)ctl_tensor_numel(&ctl_model_param(m, i)->value);
    res->ok = 1, res->ms = 1e3 * median(times, a->steps), res->plan_mb = (double)plan.total / 1048576.0;
    free(tok);
    ctl_train_free(t), ctl_model_free(m), ctl_ctx_free(ctx);
    res->rss_mb = maxrss_mb();
}

static void section_lora(const options *o, int n_threads) {
    int steps = o->steps > 0 ? o->steps : o->quick ? 1 : 3;
    int64_t T = o->quick ? 128 : 512;
    printf("\n== 6. LoRA SFT step: SmolLM2-135M shape, r 16 on every linear layer, B 1, T %lld, %d threads, median of %d ==\n",
           (long long)T, n_threads, steps);
    lora_result r[4];
    for (int q = 0; q < 4; q++) {
        lora_args a = {n_threads, steps, q, T};
        FILE *probe = q ? fopen(GEN_MODEL, "rb") : NULL;
        if (q && !probe) {
            memset(&r[q], 0, sizeof r[q]);
            snprintf(r[q].err, sizeof r[q].err, "%s is missing", GEN_MODEL);
            continue;
        }
        if (probe) fclose(probe);
        forked(lora_child, &a, &r[q], sizeof r[q], r[q].err, sizeof r[q].err);
    }
    double ms = NAN, tok_s = NAN, rss = NAN;
    if (!o->no_torch) {
        char cmd[256], line[512];
        snprintf(cmd, sizeof cmd, "python3 tools/bench_peft.py --threads %d --seq %lld --steps %d 2>/dev/null", n_threads, (long long)T, steps);
        fflush(stdout);
        FILE *f = popen(cmd, "r");
        while (f && fgets(line, sizeof line, f))
            if (!strncmp(line, "RESULT", 6)) ms = field(line, " ms_per_step="), tok_s = field(line, " tokens_per_s="), rss = field(line, " maxrss_mb=");
        if (f) pclose(f);
    }
    printf("what                                   ms/step   tok/s   planned MB   peak RSS MB   speed vs torch   memory vs torch\n");
    static const char *const names[4] = {"cotlab, fp32 base", "cotlab, Q4_1 base kept quantised", "cotlab, bf16 base",
                                         "cotlab, bf16 base, bf16 dot products"};
    for (int q = 0; q < 4; q++) {
        if (!r[q].ok) {
            printf("%-36s skipped: %s\n", names[q], r[q].err);
            continue;
        }
        double tps = (double)T / r[q].ms * 1e3;
        printf("%-36s %9.0f %7.1f %12.0f %13.0f %15.2fx %16.2fx\n", names[q], r[q].ms, tps, r[q].plan_mb, r[q].rss_mb, tps / tok_s,
               r[q].rss_mb / rss);
    }
    printf("%-36s %9.0f %7.1f %12s %13.0f\n", "PyTorch + PEFT, fp32 base", ms, tok_s, "-", rss);
    printf("(%.2fM trainable adapter weights; planned: weights + the trainer's arena, before allocating; nan: PyTorch/PEFT "
           "not run. The Q4_1 and bf16 processes also held the 98 MB file while loading.)\n", r[0].ok ? r[0].trainable / 1e6 : NAN);
}

// ---- 7. Online RL: rollouts and a whole GRPO step on SmolLM2-135M --------------------------------

#define RL_DATA "examples/gsm8k/dev.jsonl"

typedef struct rl_args {
    int n_threads, P, G, max_new, steps;
    bool greedy, stop;   // stop: completions end at EOS (a GRPO step); else exactly max_new tokens
} rl_args;

typedef struct rl_result {
    int ok;
    double gen_s, update_s, tokens, rss_mb, reward;
    int prompt_min, prompt_max;
    char err[200];
} rl_result;

// The first P GSM8K dev questions as chat prompts (SmolLM2's template with its default system
// line, as TRL applies it to conversational prompts); *ds holds them.
static bool rl_prompts(ctl_ctx *ctx, const ctl_tokenizer *tk, const ctl_chat_template *tmpl, int P, ctl_dataset **ds, int32_t *ids,
                       int64_t cap, ctl_rl_prompt *out) {
    if (ctl_dataset_open(ctx, RL_DATA, NULL, ds)) return false;
    ctl_encoding enc = {tk, tmpl, true, NULL};
    for (int p = 0; p < P; p++) {
        int64_t n;
        if (ctl_example_tokens(ctl_dataset_get(*ds, p), NULL, &enc, ids + p * cap, NULL, cap, &n)) return false;
        out[p].tokens = ids + p * cap, out[p].n = n, out[p].example = ctl_dataset_get(*ds, p);
    }
    return true;
}

// Rollouts only (steps 0) or whole GRPO steps: LoRA r 16 on every linear layer of the Q4_1 base
// kept quantised, P prompts x G samples at temperature 1, the math reward, DAPO's loss,
// micro-batches of 8 rows.
static void rl_child(const void *arg, void *out) {
    const rl_args *a = (const rl_args *)arg;
    rl_result *res = (rl_result *)out;
    memset(res, 0, sizeof *res);
    ctl_ctx *ctx = make_ctx(a->n_threads);
    ctl_gguf *g;
    ctl_model *m;
    ctl_tokenizer *tk;
    ctl_chat_template tmpl;
    ctl_model_desc md = {true, false};
    ctl_status st;
    if ((st = ctl_gguf_open(ctx, GEN_MODEL, &g)) || (st = ctl_model_from_gguf(ctx, g, &md, &m)) || (st = ctl_tokenizer_from_gguf(ctx, g, &tk)) ||
        (st = ctl_chat_template_from_gguf(ctx, g, &tmpl)))
        die("load", ctx, st);
    enum { CAP = 512 };
    int32_t *ids = (int32_t *)malloc((size_t)a->P * CAP * sizeof(int32_t)), eos = ctl_tokenizer_eos(tk);
    ctl_rl_prompt prompts[64];
    ctl_dataset *ds = NULL;
    if (!rl_prompts(ctx, tk, &tmpl, a->P, &ds, ids, CAP, prompts)) {
        snprintf(res->err, sizeof res->err, "%.60s: %.130s", RL_DATA, ctl_last_error(ctx));
        return;
    }
    int64_t longest = 0;
    for (int p = 0; p < a->P; p++) longest = prompts[p].n > longest ? prompts[p].n : longest;
    ctl_lora_desc ld;
    memset(&ld, 0, sizeof ld);
    ld.rank = 16, ld.alpha = 32.0f, ld.seed = 1;
    if ((st = ctl_lora_attach(m, &ld))) die("lora_attach", ctx, st);
    ctl_train_desc td;
    memset(&td, 0, sizeof td);
    td.batch = 8, td.seq_len = longest + a->max_new, td.optim.lr = 1e-5f, td.optim.clip = 1.0f, td.entropy = true;
    ctl_train *t;
    if ((st = ctl_train_init(m, &td, &t))) die("train_init", ctx, st);
    ctl_reward_func math = {"math", ctl_reward_fn_math, NULL, 1.0f, NULL};
    ctl_rl_desc rd;
    memset(&rd, 0, sizeof rd);
    rd.method = a->steps ? CTL_RL_GRPO : CTL_RL_RFT, rd.prompts = a->P, rd.group = a->G, rd.max_new = a->max_new, rd.batch = 8;   // (RFT: rollouts alone)
    rd.sampler.temperature = a->greedy ? 0.0f : 1.0f, rd.sampler.stop_tokens = &eos, rd.sampler.n_stop_tokens = a->stop ? 1 : 0;
    rd.tokenizer = tk, rd.rewards = &math, rd.n_rewards = 1, rd.grpo.loss = CTL_GRPO_DAPO;
    ctl_rl *rl;
    if ((st = ctl_rl_init(t, &rd, &rl))) die("rl_init", ctx, st);
    double gen[64], upd[64], tok[64], rew[64];
    int runs = a->steps ? a->steps + 1 : 3;   // GRPO: a warm-up step first; rollouts: median of 3
    for (int s = 0; s < runs && s < 64; s++) {
        ctl_objective_out gm;
        ctl_step_out so;
        double t0 = now_s();
        if ((st = ctl_rl_generate(rl, prompts, a->P, 1000 + (uint64_t)s, &gm))) die("rl_generate", ctx, st);
        double t1 = now_s();
        if (a->steps && (st = ctl_rl_update(rl, &so))) die("rl_update", ctx, st);
        gen[s] = t1 - t0, upd[s] = now_s() - t1, rew[s] = ctl_metric_get(&gm, "reward");
        tok[s] = ctl_metric_get(&gm, "completions/mean_length") * a->P * a->G;
    }
    int skip = a->steps ? 1 : 0, n = runs - skip;
    res->gen_s = median(gen + skip, n), res->update_s = median(upd + skip, n), res->tokens = median(tok + skip, n), res->reward = rew[runs - 1];
    res->ok = 1, res->prompt_min = 1 << 30;
    for (int p = 0; p < a->P; p++)
        res->prompt_min = prompts[p].n < res->prompt_min ? (int)prompts[p].n : res->prompt_min, res->prompt_max = prompts[p].n > res->prompt_max ? (int)prompts[p].n : res->prompt_max;
    ctl_rl_free(rl), ctl_train_free(t), ctl_dataset_close(ds), ctl_tokenizer_free(tk), ctl_model_free(m), ctl_gguf_close(g), ctl_ctx_free(ctx);
    free(ids);
    res->rss_mb = maxrss_mb();
}

static void section_rl(const options *o, int n_threads, const double *peak_in) {
    printf("\n== 7. Online RL, SmolLM2-135M-Instruct Q4_1, %d threads: rollouts, then a whole GRPO step ==\n", n_threads);
    FILE *probe = fopen(GEN_MODEL, "rb");
    if (!probe) {
        printf("skipped (%s is missing; tools/get_smollm2.sh fetches it)\n", GEN_MODEL);
        return;
    }
    fclose(probe);
    if (!peak_in) g_probe_isa = cpu_widest_isa();
    double peak = peak_in ? *peak_in : peak_once(n_threads, 100000000);   // GFLOP/s
    int new_tokens = o->quick ? 16 : 256;
    // Rollouts: the first 8 GSM8K dev questions, each the same number of new tokens (no EOS
    // stop: fixed work), at temperature 1; every stream's tokens depend only on its prompt.
    printf("rollouts: the first GSM8K dev questions as chat prompts, %d new tokens each (no EOS stop: fixed work), temperature 1, median of 3\n",
           new_tokens);
    static const int shapes[4][2] = {{1, 1}, {8, 1}, {8, 8}, {64, 1}};
    double rates[4] = {NAN, NAN, NAN, NAN};
    for (int k = o->quick ? 2 : 0; k < (o->quick ? 3 : 4); k++) {   // --quick: 8 x 8 only
        rl_args a = {n_threads, shapes[k][0], shapes[k][1], new_tokens, 0, false, false};
        rl_result r;
        forked(rl_child, &a, &r, sizeof r, r.err, sizeof r.err);
        rates[k] = r.ok ? r.tokens / r.gen_s : NAN;
        if (!r.ok) printf("  %d x %d: failed: %s\n", a.P, a.G, r.err);
        else printf("  cotlab %2d prompts x %d samples (%2d streams, prompts of %d..%d tokens): %7.1f tok/s aggregate, %5.1f%% of the compute bound, "
                    "peak RSS %.0f MB\n", a.P, a.G, a.P * a.G, r.prompt_min, r.prompt_max, rates[k], 100.0 * rates[k] * 2.0 * 134.5e6 / (peak * 1e9), r.rss_mb);
    }
    double lc = NAN;
    if (!o->no_torch) {
        char cmd[512], line[512];
        snprintf(cmd, sizeof cmd, "python3 tools/bench_gen_batch.py %s --threads %d --streams 64 --tokens %d --prompt-len 100 --shared 2>/dev/null",
                 GEN_MODEL, n_threads, new_tokens);
        fflush(stdout);
        FILE *f = popen(cmd, "r");
        while (f && fgets(line, sizeof line, f))
            if (!strncmp(line, "RESULT", 6)) lc = field(line, "decode_tok_per_s=");
        if (f) pclose(f);
    }
    printf("  llama.cpp 8 prompts x 8 samples (64 streams, the prompt copied with seq_cp), decode only: %.1f tok/s -> cotlab %.2fx\n", lc,
           rates[2] / lc);
    printf("  (compute bound: 2 x 134.5M parameters FLOPs a token against the measured FMA peak of %.0f GFLOP/s; llama.cpp's prompts are "
           "100 random ids; nan: llama-cpp-python not installed, or --no-torch)\n", peak);
    // A whole GRPO step next to TRL's GRPOTrainer with PEFT.
    int steps = o->steps > 0 ? o->steps : 1;
    rl_args a = {n_threads, 8, 8, o->quick ? 16 : 256, steps, false, true};
    rl_result r;
    forked(rl_child, &a, &r, sizeof r, r.err, sizeof r.err);
    double trl_s = NAN, trl_tok = NAN, trl_rss = NAN;
    if (!o->no_torch && !o->quick) {
        char cmd[512], line[512];
        snprintf(cmd, sizeof cmd, "python3 tools/bench_trl_grpo.py --threads %d --steps %d --max-new %d 2>/dev/null", n_threads, steps, a.max_new);
        fflush(stdout);
        FILE *f = popen(cmd, "r");
        while (f && fgets(line, sizeof line, f))
            if (!strncmp(line, "RESULT", 6)) trl_s = field(line, "step_s="), trl_tok = field(line, "completion_tokens="), trl_rss = field(line, "peak_rss_mb=");
        if (f) pclose(f);
    }
    printf("GRPO step: 8 prompts x 8 samples, up to %d new tokens (EOS ends a completion), LoRA r 16 on every linear layer, median of %d\n",
           a.max_new, steps);
    printf("what                       step s   rollouts s   update s   completion tokens   tok/s   peak RSS MB\n");
    if (r.ok)
        printf("cotlab (Q4_1 base)       %8.1f %12.1f %10.1f %19.0f %7.1f %13.0f\n", r.gen_s + r.update_s, r.gen_s, r.update_s, r.tokens,
               r.tokens / (r.gen_s + r.update_s), r.rss_mb);
    else printf("cotlab: failed: %s\n", r.err);
    printf("TRL GRPOTrainer + PEFT   %8.1f %12s %10s %19.0f %7.1f %13.0f\n", trl_s, "-", "-", trl_tok, trl_tok / trl_s, trl_rss);
    printf("(cotlab vs TRL: %.2fx the completion tokens a second, %.2fx the peak memory; TRL dequantises the file to fp32, generates "
           "with transformers' generate and keeps its default gradient checkpointing off; nan: TRL not installed, --no-torch or --quick)\n",
           (r.tokens / (r.gen_s + r.update_s)) / (trl_tok / trl_s), r.rss_mb / trl_rss);
}

static void usage(const char *argv0) {
    fprintf(stderr,
            "usage: %s [--threads N[,M...]] [--quick] [--no-torch] [--steps K] [--only peak|gemm|train|gen|lora|rl]\n"
            "  --threads  thread counts to run (default: 1,2 for peak and GEMM, 2 for training)\n"
            "  --quick    fewer repeats, B*T 256 GEMMs, training T 64 only, torch sdpa only\n"
            "  --no-torch skip the PyTorch comparison\n"
            "  --steps    timed training steps after one warm-up (default 5; --quick 1)\n"
            "  --only     run one section (train needs peak for its %%pk column)\n",
            argv0);
}

static void parse(int argc, char **argv, options *o) {
    memset(o, 0, sizeof *o);
    o->argv0 = argv[0];
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--quick")) o->quick = true;
        else if (!strcmp(a, "--no-torch")) o->no_torch = true;
        else if (!strcmp(a, "--threads") && i + 1 < argc) {
            char *s = argv[++i], *end;
            o->n_threads = 0;
            while (*s && o->n_threads < MAX_THREADS) {
                long v = strtol(s, &end, 10);
                if (end == s || v < 1 || v > MAX_THREADS) {
                    fprintf(stderr, "bench: --threads wants numbers in 1..%d, comma separated\n", MAX_THREADS);
                    exit(2);
                }
                o->threads[o->n_threads++] = (int)v;
                s = *end == ',' ? end + 1 : end;
                if (*end && *end != ',') {
                    fprintf(stderr, "bench: bad --threads list\n");
                    exit(2);
                }
            }
        } else if (!strcmp(a, "--steps") && i + 1 < argc) {
            o->steps = atoi(argv[++i]);
            if (o->steps < 1 || o->steps > 63) {
                fprintf(stderr, "bench: --steps wants 1..63\n");
                exit(2);
            }
        } else if (!strcmp(a, "--only") && i + 1 < argc) {
            o->only = argv[++i];
        } else {
            usage(argv[0]);
            exit(!strcmp(a, "--help") || !strcmp(a, "-h") ? 0 : 2);
        }
    }
}

int main(int argc, char **argv) {
    options o;
    parse(argc, argv, &o);
    double t_start = now_s();
    int def_all[2] = {1, 2}, def_train[1] = {2};
    const int *th_all = o.n_threads ? o.threads : def_all, *th_train = o.n_threads ? o.threads : def_train;
    int n_all = o.n_threads ? o.n_threads : 2, n_train = o.n_threads ? o.n_threads : 1;

    ctl_ctx *probe = make_ctx(1);
    long online = sysconf(_SC_NPROCESSORS_ONLN);
    printf("cotlab bench: %ld online cores, GEMM kernel \"%s\" (ctl_ctx_simd_name), threads",
           online, ctl_ctx_simd_name(probe));
    for (int i = 0; i < n_all; i++) printf("%s%d", i ? "," : " ", th_all[i]);
    if (!o.n_threads) printf(" (training: 2)");
    printf("%s\n", o.quick ? ", --quick" : "");
    ctl_ctx_free(probe);

    bool all = !o.only;
    double peak[MAX_THREADS];
    int n_peak = 0;
    if (all || !strcmp(o.only, "peak") || !strcmp(o.only, "gemm") || !strcmp(o.only, "train")) {
        section_peak(&o, th_all, n_all, peak);
        n_peak = n_all;
    }
    if (all || !strcmp(o.only, "gemm")) section_gemm(&o, th_all, n_all, peak);
    if (all || !strcmp(o.only, "train")) section_train(&o, th_train, n_train, th_all, n_peak, peak);
    if (all || !strcmp(o.only, "gen")) section_gen(&o, th_train[n_train - 1]);
    if (all || !strcmp(o.only, "lora")) section_lora(&o, th_train[n_train - 1]);
    if (all || !strcmp(o.only, "rl")) section_rl(&o, th_train[n_train - 1], n_peak ? &peak[n_peak - 1] : NULL);
    printf("\ntotal %.0f s; this process peak RSS %.0f MB\n", now_s() - t_start, maxrss_mb());
    return 0;
}
