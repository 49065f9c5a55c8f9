// The cotlab test suite: one runner, ends with "N passed, N failed".
//
// How each part is checked:
//   kernels   forward against plain double-precision loops written here; backward against central
//             finite differences of those double loops (so the check is not limited by fp32).
//   GEMM      the packed kernels (AVX2 and portable) against ctl_gemm_ref on awkward shapes.
//   models    logits, loss, every gradient and the weights after two AdamW steps against fixtures
//             written by tools/make_fixtures.py from Hugging Face transformers + torch.optim.AdamW;
//             a directional finite-difference check of the whole model; both RoPE layouts.
//   training  bit-identical results for 1, 2 and 3 threads; memory plan == allocation; frozen
//             parameters; gradient accumulation; bad input gives a status and a message.
#define _POSIX_C_SOURCE 200809L   // system() and its exit status, for the command-line tests
#define COTLAB_IMPLEMENTATION
#include "../cotlab.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>

#ifndef FIXTURE_DIR
#define FIXTURE_DIR "tests/fixtures/"
#endif

// ---- harness ---------------------------------------------------------------------------------

static int g_fail;   // failures in the current test

#define CHECK(cond, ...)                                                       \
    do {                                                                       \
        if (!(cond)) {                                                         \
            g_fail++;                                                          \
            printf("    %s:%d: ", __FILE__, __LINE__);                         \
            printf(__VA_ARGS__);                                               \
            printf("\n");                                                      \
        }                                                                      \
    } while (0)

static double max_abs(const double *x, int64_t n) {
    double m = 0.0;
    for (int64_t i = 0; i < n; i++) m = fmax(m, fabs(x[i]));
    return m;
}

// Norm-wise relative error: max |got - want| / max |want| (elementwise relative error is
// meaningless for entries near zero).
static double rel_err_fd(const float *got, const double *want, int64_t n) {
    double d = 0.0;
    for (int64_t i = 0; i < n; i++) d = fmax(d, fabs((double)got[i] - want[i]));
    double m = max_abs(want, n);
    return m > 0.0 ? d / m : d;
}

static double rel_err_ff(const float *got, const float *want, int64_t n) {
    double d = 0.0, m = 0.0;
    for (int64_t i = 0; i < n; i++) {
        d = fmax(d, fabs((double)got[i] - (double)want[i]));
        m = fmax(m, fabs((double)want[i]));
    }
    return m > 0.0 ? d / m : d;
}

static ctl_rng g_rng;

static float *rand_f(int64_t n, float scale) {
    float *x = (float *)malloc(n > 0 ? (size_t)n * sizeof(float) : 1);
    for (int64_t i = 0; i < n; i++) x[i] = scale * ctl_rng_normal(&g_rng);
    return x;
}

static double *to_d(const float *x, int64_t n) {
    double *d = (double *)malloc(n > 0 ? (size_t)n * sizeof(double) : 1);
    for (int64_t i = 0; i < n; i++) d[i] = x[i];
    return d;
}

static float *zeros_f(int64_t n) { return (float *)calloc(n > 0 ? (size_t)n : 1, sizeof(float)); }

static ctl_ctx *make_ctx(int threads, ctl_simd simd) {
    ctl_ctx *ctx;
    ctl_ctx_desc d = ctl_ctx_desc_default();
    d.n_threads = threads;
    d.simd = simd;
    if (ctl_ctx_init(&ctx, &d) != CTL_OK) {
        printf("cannot create a context\n");
        exit(1);
    }
    return ctx;
}

// Central differences of a double-precision scalar function f(x) for every element of x.
typedef double (*scalar_fn)(void *arg);
static void finite_diff(double *x, int64_t n, scalar_fn f, void *arg, double *grad) {
    const double h = 1e-6;
    for (int64_t i = 0; i < n; i++) {
        double keep = x[i];
        x[i] = keep + h;
        double fp = f(arg);
        x[i] = keep - h;
        double fm = f(arg);
        x[i] = keep;
        grad[i] = (fp - fm) / (2.0 * h);
    }
}

// ---- basics ----------------------------------------------------------------------------------

static void test_status_and_rng(void) {
    CHECK(!strcmp(ctl_status_str(CTL_OK), "ok"), "status text");
    CHECK(!strcmp(ctl_status_str(CTL_ERR_SHAPE), "shape mismatch"), "status text");
    CHECK(!strcmp(ctl_status_str((ctl_status)999), "unknown status"), "unknown status");
    ctl_rng a, b;
    ctl_rng_seed(&a, 7);
    ctl_rng_seed(&b, 7);
    for (int i = 0; i < 100; i++) CHECK(ctl_rng_next(&a) == ctl_rng_next(&b), "same seed, same stream");
    ctl_rng_seed(&b, 8);
    CHECK(ctl_rng_next(&a) != ctl_rng_next(&b), "different seeds differ");
    double s = 0.0, s2 = 0.0, umin = 1.0, umax = 0.0;
    for (int i = 0; i < 100000; i++) {
        double z = ctl_rng_normal(&a), u = ctl_rng_uniform(&a);
        s += z, s2 += z * z, umin = fmin(umin, u), umax = fmax(umax, u);
    }
    CHECK(fabs(s / 1e5) < 0.02 && fabs(s2 / 1e5 - 1.0) < 0.02, "normal moments %g %g", s / 1e5, s2 / 1e5);
    CHECK(umin >= 0.0 && umax < 1.0 && umax > 0.999, "uniform range [%g, %g]", umin, umax);
}

// ctl_ctx_init's reasons go to the desc's logger (there is no context yet to keep them).
static char init_why[256];
static void keep_init_why(ctl_log_level level, const char *msg, void *user) {
    (void)user;
    if (level == CTL_LOG_ERROR) snprintf(init_why, sizeof init_why, "%s", msg);
}

static void *test_alloc_fail(size_t size, void *user) {
    (void)size, (void)user;
    return NULL;
}

static void test_ctx_init_errors(void) {
    struct { int threads, device, simd, half_allocator; const char *why; } bad[] = {
        {-1, CTL_DEVICE_CPU, CTL_SIMD_AUTO, 0, "n_threads -1"}, {5000, CTL_DEVICE_CPU, CTL_SIMD_AUTO, 0, "n_threads 5000"},
        {1, 7, CTL_SIMD_AUTO, 0, "device 7"}, {1, CTL_DEVICE_CPU, 99, 0, "simd 99"}, {1, CTL_DEVICE_CPU, CTL_SIMD_AUTO, 1, "allocator"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        ctl_ctx_desc d = ctl_ctx_desc_default();
        d.n_threads = bad[i].threads, d.device = (ctl_device)bad[i].device, d.simd = (ctl_simd)bad[i].simd;
        d.logger.func = keep_init_why;
        if (bad[i].half_allocator) d.allocator.alloc = test_alloc_fail;
        ctl_ctx *ctx = (ctl_ctx *)&d;   // (must come back NULL)
        init_why[0] = 0;
        ctl_status st = ctl_ctx_init(&ctx, &d);
        CHECK(st == CTL_ERR_INVALID && !ctx && strstr(init_why, bad[i].why), "ctx_init with %s: status %d, message '%s'", bad[i].why, st,
              init_why);
    }
    CHECK(strstr(ctl_last_error(NULL), "no context") != NULL, "ctl_last_error(NULL) is a fixed text: '%s'", ctl_last_error(NULL));
    CHECK(ctl_train_step(NULL, NULL) == CTL_ERR_INVALID && strstr(ctl_last_error(NULL), "no context"),
          "a NULL handle: the status alone (no global buffer): '%s'", ctl_last_error(NULL));
}

// The descriptors whose zero value is not the default have a _default(): TRL's DPOConfig
// (beta 0.1), CPOConfig (simpo_gamma 0.5) and GRPOConfig (num_generations 8,
// max_completion_length 256, temperature 1.0, loss_type "dapo", epsilon 0.2, beta 0).
static void test_desc_defaults(void) {
    ctl_dpo_desc dd = ctl_dpo_desc_default();
    CHECK(dd.loss == CTL_DPO_SIGMOID && dd.beta == 0.1f && dd.simpo_gamma == 0.5f && dd.label_smoothing == 0.0f && dd.rpo_alpha == 0.0f,
          "dpo defaults: loss %d beta %g gamma %g", (int)dd.loss, dd.beta, dd.simpo_gamma);
    ctl_rl_desc rd = ctl_rl_desc_default();
    CHECK(rd.method == CTL_RL_GRPO && rd.group == 8 && rd.max_new == 256 && rd.prompts == 1 && rd.sampler.temperature == 1.0f,
          "rl defaults: group %lld max_new %lld temperature %g", (long long)rd.group, (long long)rd.max_new, rd.sampler.temperature);
    CHECK(rd.grpo.loss == CTL_GRPO_DAPO && rd.grpo.epsilon == 0.0f && rd.grpo.beta == 0.0f && rd.dpo.beta == 0.1f,
          "rl defaults: the GRPO fields' zeros are TRL's defaults");
}

// The public attention kernels keep a row's accumulator on the stack: a head size above 256
// is refused with a message, not a stack overflow.
static void test_attention_head_limit(void) {
    ctl_ctx *ctx = make_ctx(1, CTL_SIMD_AUTO);
    int64_t HS = 1024, n = 3 * HS;
    float *qkv = (float *)calloc((size_t)n, 4), *out = (float *)calloc((size_t)HS, 4), lse = 0.0f;
    ctl_attention_forward(ctx, out, &lse, qkv, 1, 1, 1, 1, HS);
    CHECK(strstr(ctl_last_error(ctx), "head size 1024") != NULL, "forward: '%s'", ctl_last_error(ctx));
    ctl_fail(ctx, CTL_OK, "%s", "");
    ctl_attention_backward(ctx, qkv, out, qkv, out, &lse, 1, 1, 1, 1, HS);
    CHECK(strstr(ctl_last_error(ctx), "head size 1024") != NULL, "backward: '%s'", ctl_last_error(ctx));
    free(qkv), free(out);
    ctl_ctx_free(ctx);
}

// Sparse selection sorts scores with ctl__score_cmp: a consistent order even with NaN scores
// (NaN gradients), so that qsort's result is defined: finite scores high to low, NaNs last.
static void test_score_order(void) {
    ctl__score sc[9] = {{1.0f, 0}, {NAN, 1}, {3.0f, 2}, {-INFINITY, 3}, {NAN, 4}, {3.0f, 5}, {INFINITY, 6}, {0.5f, 7}, {NAN, 8}};
    bool consistent = true;
    for (int a = 0; a < 9; a++)
        for (int b = 0; b < 9; b++) {
            int ab = ctl__score_cmp(&sc[a], &sc[b]), ba = ctl__score_cmp(&sc[b], &sc[a]);
            consistent = consistent && (ab > 0) == (ba < 0) && (ab == 0) == (a == b);
        }
    qsort(sc, 9, sizeof sc[0], ctl__score_cmp);
    static const int64_t want[9] = {6, 2, 5, 0, 7, 3, 1, 4, 8};
    bool order = true;
    for (int k = 0; k < 9; k++) order = order && sc[k].i == want[k];
    CHECK(consistent && order, "score order: consistent %d, sorted %d", consistent, order);
}

// A hand-made byte-level vocabulary whose tokens hold characters outside GPT-2's byte alphabet
// (a raw space, a DEL): detokenized as their own bytes, where the alphabet's would be 0.
static void test_detokenize_outside_alphabet(void) {
    ctl_ctx *ctx = make_ctx(1, CTL_SIMD_AUTO);
    ctl_gguf_writer *w;
    const char *toks[3] = {"a", "b c\x7f", "\xc4\xa0x"}, *merges[1] = {"a a"};   // U+0120 is the alphabet's space
    size_t lens[3] = {1, 4, 3}, ml[1] = {3};
    ctl_gguf_writer_init(ctx, &w);
    ctl_gguf_writer_set_str(w, "tokenizer.ggml.model", "gpt2", 4);
    ctl_gguf_writer_set_str_array(w, "tokenizer.ggml.tokens", toks, lens, 3);
    ctl_gguf_writer_set_str_array(w, "tokenizer.ggml.merges", merges, ml, 1);
    ctl_status st = ctl_gguf_writer_save(w, "build/raw_space_vocab.gguf");
    ctl_gguf_writer_free(w);
    ctl_gguf *g = NULL;
    ctl_tokenizer *tk = NULL;
    if (!st) st = ctl_gguf_open(ctx, "build/raw_space_vocab.gguf", &g);
    if (!st) st = ctl_tokenizer_from_gguf(ctx, g, &tk);
    int32_t ids[3] = {0, 1, 2};
    char out[16];
    size_t len = 0;
    if (!st) st = ctl_detokenize(tk, ids, 3, out, sizeof out, &len);
    CHECK(!st && len == 7 && !memcmp(out, "ab c\x7f x", 7), "detokenized: status %d, %zu bytes", st, len);
    ctl_tokenizer_free(tk);
    if (g) ctl_gguf_close(g);
    // BOS and EOS ids outside the vocabulary (a hostile file) are taken as absent, not used as indices.
    ctl_gguf_writer_init(ctx, &w);
    ctl_gguf_writer_set_str(w, "tokenizer.ggml.model", "gpt2", 4);
    ctl_gguf_writer_set_str_array(w, "tokenizer.ggml.tokens", toks, lens, 3);
    ctl_gguf_writer_set_str_array(w, "tokenizer.ggml.merges", merges, ml, 1);
    ctl_gguf_writer_set_u32(w, "tokenizer.ggml.bos_token_id", 1000000000u);
    ctl_gguf_writer_set_u32(w, "tokenizer.ggml.eos_token_id", 3);
    st = ctl_gguf_writer_save(w, "build/bad_bos_vocab.gguf");
    ctl_gguf_writer_free(w);
    g = NULL, tk = NULL;
    if (!st) st = ctl_gguf_open(ctx, "build/bad_bos_vocab.gguf", &g);
    if (!st) st = ctl_tokenizer_from_gguf(ctx, g, &tk);
    CHECK(!st && ctl_tokenizer_bos(tk) == -1 && ctl_tokenizer_eos(tk) == -1, "BOS 10^9 and EOS 3 of 3 tokens: %d %d (status %d)",
          tk ? ctl_tokenizer_bos(tk) : 0, tk ? ctl_tokenizer_eos(tk) : 0, st);
    ctl_tokenizer_free(tk);
    if (g) ctl_gguf_close(g);
    ctl_ctx_free(ctx);
}

static void test_arena(void) {
    ctl_ctx *ctx = make_ctx(1, CTL_SIMD_AUTO);
    ctl_arena a;
    CHECK(ctl_arena_init(ctx, &a, 256) == CTL_OK, "arena init");
    void *p = ctl_arena_push(&a, 10), *q = ctl_arena_push(&a, 100);
    CHECK(p && q && ((uintptr_t)p % 64) == 0 && ((uintptr_t)q % 64) == 0, "aligned pieces");
    CHECK((unsigned char *)q - (unsigned char *)p == 64, "pieces are packed");
    CHECK(ctl_arena_push(&a, 100) == NULL, "a full arena says no");
    CHECK(ctl_arena_push(&a, SIZE_MAX) == NULL, "a huge request says no");
    ctl_arena_free(ctx, &a);
    ctl_ctx_free(ctx);
}

static void count_task(void *arg, int64_t task, int thread) {
    int *hits = (int *)arg;
    (void)thread;
    hits[task]++;
}

static void test_parallel_for(void) {
    for (int th = 1; th <= 4; th++) {
        ctl_ctx *ctx = make_ctx(th, CTL_SIMD_AUTO);
#ifdef COTLAB_NO_THREADS
        CHECK(ctl_ctx_threads(ctx) == 1, "COTLAB_NO_THREADS: one thread");
#else
        CHECK(ctl_ctx_threads(ctx) == th, "thread count");
#endif
        for (int rep = 0; rep < 50; rep++) {
            int hits[37] = {0};
            ctl_parallel_for(ctx, 37, count_task, hits);
            for (int i = 0; i < 37; i++) CHECK(hits[i] == 1, "task %d ran %d times (threads %d)", i, hits[i], th);
        }
        ctl_ctx_free(ctx);
    }
}

// ---- GEMM ------------------------------------------------------------------------------------

// A context on `simd`, or NULL where this CPU (or build) lacks it.
static ctl_ctx *try_ctx(int threads, ctl_simd simd) {
    ctl_ctx *ctx;
    ctl_ctx_desc d = ctl_ctx_desc_default();
    d.n_threads = threads, d.simd = simd;
    return ctl_ctx_init(&ctx, &d) == CTL_OK ? ctx : NULL;
}

static bool same_bits(const float *x, const float *y, int64_t n) { return !memcmp(x, y, (size_t)n * sizeof(float)); }

static void test_gemm(void) {
    // Shapes around the blocking sizes (tiles 6x16 or 12x32, KC 256, MC 96, NC 3072), awkward
    // ones (1, 3, 17, 4097) and degenerate ones. Thin ones (a side up to 32, or M up to 8) take
    // the unpacked paths: dot products or sums of B's rows.
    static const int64_t shapes[][3] = {{1, 1, 1}, {7, 13, 5}, {6, 16, 256}, {97, 257, 300}, {1, 300, 17},
                                        {200, 1, 33}, {13, 40, 0}, {96, 256, 513}, {5, 600, 3},
                                        {40, 50, 70}, {33, 33, 31}, {512, 16, 96}, {16, 130, 300},
                                        {17, 4097, 3}, {4097, 17, 3}, {3, 17, 4097}, {37, 3100, 17},
                                        {13, 49, 260}, {103, 33, 1}};
    // Every path the dispatcher can choose, each on 1 and 3 threads (results must not differ).
    // AUTO too: on Zen 4 it runs the AVX2 GEMM kernel inside the AVX-512 paths.
    static const ctl_simd paths[] = {CTL_SIMD_SCALAR, CTL_SIMD_AVX2, CTL_SIMD_AVX512, CTL_SIMD_NEON, CTL_SIMD_AUTO};
    static const char *const names[] = {"scalar", "avx2", "avx512", "neon", "auto"};
    enum { NP = 5 };
    ctl_ctx *ctx[NP][2];
    for (int p = 0; p < NP; p++) {
        ctx[p][0] = try_ctx(1, paths[p]), ctx[p][1] = try_ctx(3, paths[p]);
        if (!ctx[p][0]) printf("    skipped: path %s (not on this CPU or build)\n", names[p]);
    }
    CHECK(ctx[0][0] && ctx[0][1], "the scalar path is always there");
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++)
        for (int layout = 0; layout < 4; layout++)
            for (int acc = 0; acc < 2; acc++) {
                int64_t M = shapes[s][0], N = shapes[s][1], K = shapes[s][2];
                bool at = layout & 1, bt = layout & 2;   // A stored (K,M) / B stored (N,K)
                float *a = rand_f(M * K + 1, 1.0f), *b = rand_f(K * N + 1, 1.0f), *c0 = rand_f(M * N, 1.0f);
                int64_t a_rs = at ? 1 : K, a_cs = at ? M : 1, b_rs = bt ? 1 : N, b_cs = bt ? K : 1;
                float *ref = (float *)malloc(M * N * sizeof(float)), *c[NP][2];
                double *want = (double *)malloc((M * N + 1) * sizeof(double));
                memcpy(ref, c0, M * N * sizeof(float));
                ctl_gemm_ref(M, N, K, a, a_rs, a_cs, b, b_rs, b_cs, ref, N, acc);
                for (int64_t m = 0; m < M; m++)   // and in double, to bound the fp32 reference too
                    for (int64_t n = 0; n < N; n++) {
                        double x = acc ? c0[m * N + n] : 0.0;
                        for (int64_t k = 0; k < K; k++) x += (double)a[m * a_rs + k * a_cs] * b[k * b_rs + n * b_cs];
                        want[m * N + n] = x;
                    }
                CHECK(rel_err_fd(ref, want, M * N) < 1e-5, "gemm_ref %lldx%lldx%lld", (long long)M, (long long)N, (long long)K);
                for (int p = 0; p < NP; p++)
                    for (int t = 0; t < 2; t++) {
                        c[p][t] = NULL;
                        if (!ctx[p][t]) continue;
                        c[p][t] = (float *)malloc(M * N * sizeof(float));
                        memcpy(c[p][t], c0, M * N * sizeof(float));
                        ctl_gemm(ctx[p][t], M, N, K, a, a_rs, a_cs, b, b_rs, b_cs, c[p][t], N, acc);
                        double e = rel_err_fd(c[p][t], want, M * N);
                        CHECK(e < 1e-5, "gemm %s %lldx%lldx%lld layout %d acc %d threads %d: err %g", ctl_ctx_simd_name(ctx[p][t]),
                              (long long)M, (long long)N, (long long)K, layout, acc, ctl_ctx_threads(ctx[p][t]), e);
                    }
                for (int p = 0; p < NP; p++)
                    CHECK(!c[p][0] || same_bits(c[p][0], c[p][1], M * N), "gemm %s %lldx%lldx%lld layout %d: 1 and 3 threads differ",
                          ctl_ctx_simd_name(ctx[p][0]), (long long)M, (long long)N, (long long)K, layout);
                // The packed kernels do the same FMAs in the same order; the dot-product path for
                // thin products (contiguous A rows and B columns) sums 8 or 16 lanes apart.
                bool dots = a_cs == 1 && b_rs == 1 && (M <= 8 || N <= 32);
                CHECK(dots || !c[1][0] || !c[2][0] || same_bits(c[1][0], c[2][0], M * N),
                      "gemm %lldx%lldx%lld layout %d: avx2 and avx512 differ", (long long)M, (long long)N, (long long)K, layout);
                CHECK(!c[2][0] || same_bits(c[2][0], c[4][0], M * N), "gemm %lldx%lldx%lld layout %d: auto and avx512 differ", (long long)M,
                      (long long)N, (long long)K, layout);
                for (int p = 0; p < NP; p++) free(c[p][0]), free(c[p][1]);
                free(a), free(b), free(c0), free(ref), free(want);
            }
    ctl_ctx *ctx_simd = ctx[2][1] ? ctx[2][1] : ctx[1][1] ? ctx[1][1] : ctx[3][1] ? ctx[3][1] : ctx[0][1];
    // A strided C (ldc > N) must leave the gap alone.
    float *a = rand_f(8 * 9, 1.0f), *b = rand_f(9 * 20, 1.0f), c[8 * 24];
    for (int i = 0; i < 8 * 24; i++) c[i] = 7.0f;
    ctl_gemm(ctx_simd, 8, 20, 9, a, 9, 1, b, 20, 1, c, 24, false);
    bool gap_ok = true;
    for (int m = 0; m < 8; m++)
        for (int n = 20; n < 24; n++) gap_ok &= c[m * 24 + n] == 7.0f;
    CHECK(gap_ok, "gemm wrote outside its columns");
    free(a), free(b);
    for (int p = 0; p < NP; p++)
        for (int t = 0; t < 2; t++)
            if (ctx[p][t]) ctl_ctx_free(ctx[p][t]);
}

// ---- kernels: double references and finite differences -----------------------------------------
// Each check: run the fp32 forward and compare with the double loop; run the fp32 backward with a
// random output gradient dy and compare every input gradient with finite differences of
// L = sum(dy * f(inputs)) evaluated in double.

typedef struct op_case {
    int64_t N, C, OC, B, T, NH, NKV, HS, V, stride;
    double *x, *w, *bias, *dy;   // double copies of the inputs; dy the output gradient
    double *out;                 // scratch for the double forward
    const int32_t *ids;
    int kind;
    float s;
    void (*fwd)(struct op_case *c);
    int64_t n_out;
} op_case;

static double op_objective(void *arg) {
    op_case *c = (op_case *)arg;
    c->fwd(c);
    double L = 0.0;
    for (int64_t i = 0; i < c->n_out; i++) L += c->dy[i] * c->out[i];
    return L;
}

static void check_grad(const char *what, op_case *c, double *input, int64_t n, const float *got, double tol) {
    double *fd = (double *)malloc((size_t)n * sizeof(double));
    finite_diff(input, n, op_objective, c, fd);
    double e = rel_err_fd(got, fd, n);
    CHECK(e < tol, "%s: backward vs finite differences: rel err %g", what, e);
    free(fd);
}

static void check_fwd(const char *what, op_case *c, const float *got, double tol) {
    c->fwd(c);
    double e = rel_err_fd(got, c->out, c->n_out);
    CHECK(e < tol, "%s: forward vs double loop: rel err %g", what, e);
}

static void matmul_d(op_case *c) {
    for (int64_t n = 0; n < c->N; n++)
        for (int64_t o = 0; o < c->OC; o++) {
            double s = c->bias ? c->bias[o] : 0.0;
            for (int64_t k = 0; k < c->C; k++) s += c->x[n * c->C + k] * c->w[o * c->C + k];
            c->out[n * c->OC + o] = s;
        }
}

static void test_matmul(ctl_ctx *ctx) {
    op_case c;
    memset(&c, 0, sizeof c);
    c.N = 7, c.C = 19, c.OC = 23, c.n_out = c.N * c.OC, c.fwd = matmul_d;
    float *x = rand_f(c.N * c.C, 1.0f), *w = rand_f(c.OC * c.C, 0.5f), *b = rand_f(c.OC, 1.0f), *dy = rand_f(c.n_out, 1.0f);
    float *y = zeros_f(c.n_out), *dx = zeros_f(c.N * c.C), *dw = zeros_f(c.OC * c.C), *db = zeros_f(c.OC);
    c.x = to_d(x, c.N * c.C), c.w = to_d(w, c.OC * c.C), c.bias = to_d(b, c.OC), c.dy = to_d(dy, c.n_out);
    c.out = (double *)malloc(c.n_out * sizeof(double));
    ctl_matmul_forward(ctx, y, x, w, b, c.N, c.C, c.OC);
    check_fwd("matmul", &c, y, 1e-6);
    ctl_matmul_backward(ctx, dx, dw, db, dy, x, w, c.N, c.C, c.OC);
    check_grad("matmul dx", &c, c.x, c.N * c.C, dx, 1e-5);
    check_grad("matmul dw", &c, c.w, c.OC * c.C, dw, 1e-5);
    check_grad("matmul db", &c, c.bias, c.OC, db, 1e-5);
    free(x), free(w), free(b), free(dy), free(y), free(dx), free(dw), free(db);
    free(c.x), free(c.w), free(c.bias), free(c.dy), free(c.out);
}

static void embedding_d(op_case *c) {   // x: wte (V,C); w: wpe (T,C)
    for (int64_t i = 0; i < c->B * c->T; i++)
        for (int64_t k = 0; k < c->C; k++)
            c->out[i * c->C + k] = c->x[c->ids[i] * c->C + k] + c->w[(i % c->T) * c->C + k];
}

static void test_embedding(void) {
    op_case c;
    memset(&c, 0, sizeof c);
    c.B = 2, c.T = 5, c.C = 6, c.V = 11, c.n_out = c.B * c.T * c.C, c.fwd = embedding_d;
    int32_t ids[10] = {3, 0, 10, 3, 3, 7, 1, 10, 0, 5};   // repeats: gradients must add up
    c.ids = ids;
    float *wte = rand_f(c.V * c.C, 1.0f), *wpe = rand_f(c.T * c.C, 1.0f), *dy = rand_f(c.n_out, 1.0f);
    float *y = zeros_f(c.n_out), *dwte = zeros_f(c.V * c.C), *dwpe = zeros_f(c.T * c.C);
    c.x = to_d(wte, c.V * c.C), c.w = to_d(wpe, c.T * c.C), c.dy = to_d(dy, c.n_out);
    c.out = (double *)malloc(c.n_out * sizeof(double));
    ctl_embedding_forward(y, ids, wte, wpe, c.B, c.T, c.C);
    check_fwd("embedding", &c, y, 1e-7);
    ctl_embedding_backward(dwte, dwpe, dy, ids, c.B, c.T, c.C);
    check_grad("embedding dwte", &c, c.x, c.V * c.C, dwte, 1e-6);
    check_grad("embedding dwpe", &c, c.w, c.T * c.C, dwpe, 1e-6);
    free(wte), free(wpe), free(dy), free(y), free(dwte), free(dwpe), free(c.x), free(c.w), free(c.dy), free(c.out);
}

static void norm_d(op_case *c) {   // kind 0: LayerNorm (w, bias); 1: RMSNorm (w)
    for (int64_t n = 0; n < c->N; n++) {
        const double *x = c->x + n * c->C;
        double mean = 0.0, var = 0.0;
        if (c->kind == 0) {
            for (int64_t k = 0; k < c->C; k++) mean += x[k] / c->C;
            for (int64_t k = 0; k < c->C; k++) var += (x[k] - mean) * (x[k] - mean) / c->C;
        } else {
            for (int64_t k = 0; k < c->C; k++) var += x[k] * x[k] / c->C;
        }
        double rstd = 1.0 / sqrt(var + 1e-5);
        for (int64_t k = 0; k < c->C; k++)
            c->out[n * c->C + k] = (x[k] - mean) * rstd * c->w[k] + (c->kind == 0 ? c->bias[k] : 0.0);
    }
}

static void test_norms(ctl_ctx *ctx) {
    for (int kind = 0; kind < 2; kind++) {
        op_case c;
        memset(&c, 0, sizeof c);
        c.N = 37, c.C = 13, c.n_out = c.N * c.C, c.fwd = norm_d, c.kind = kind;
        float *x = rand_f(c.n_out, 2.0f), *w = rand_f(c.C, 1.0f), *b = rand_f(c.C, 1.0f), *dy = rand_f(c.n_out, 1.0f);
        for (int64_t i = 0; i < c.n_out; i++) x[i] += 0.5f;   // a non-zero mean
        float *y = zeros_f(c.n_out), *mean = zeros_f(c.N), *rstd = zeros_f(c.N);
        float *dx = zeros_f(c.n_out), *dw = zeros_f(c.C), *db = zeros_f(c.C);
        c.x = to_d(x, c.n_out), c.w = to_d(w, c.C), c.bias = to_d(b, c.C), c.dy = to_d(dy, c.n_out);
        c.out = (double *)malloc(c.n_out * sizeof(double));
        const char *name = kind ? "rmsnorm" : "layernorm";
        if (kind == 0) {
            ctl_layernorm_forward(ctx, y, mean, rstd, x, w, b, c.N, c.C, 1e-5f);
            ctl_layernorm_backward(ctx, dx, dw, db, dy, x, w, mean, rstd, c.N, c.C);
        } else {
            ctl_rmsnorm_forward(ctx, y, rstd, x, w, c.N, c.C, 1e-5f);
            ctl_rmsnorm_backward(ctx, dx, dw, dy, x, w, rstd, c.N, c.C);
        }
        check_fwd(name, &c, y, 1e-6);
        check_grad(kind ? "rmsnorm dx" : "layernorm dx", &c, c.x, c.n_out, dx, 1e-5);
        check_grad(kind ? "rmsnorm dw" : "layernorm dw", &c, c.w, c.C, dw, 1e-5);
        if (kind == 0) check_grad("layernorm db", &c, c.bias, c.C, db, 1e-5);
        free(x), free(w), free(b), free(dy), free(y), free(mean), free(rstd), free(dx), free(dw), free(db);
        free(c.x), free(c.w), free(c.bias), free(c.dy), free(c.out);
    }
}

// RoPE written from its definition: the pair (i0, i1) rotated by pos * theta^(-2i/HS).
static void rope_d(op_case *c) {
    int64_t half = c->HS / 2;
    memcpy(c->out, c->x, c->n_out * sizeof(double));
    for (int64_t b = 0; b < c->B; b++)
        for (int64_t t = 0; t < c->T; t++)
            for (int64_t h = 0; h < c->NH; h++)
                for (int64_t i = 0; i < half; i++) {
                    double ang = t * pow(10000.0, -2.0 * i / c->HS), co = cos(ang), si = sin(ang);
                    int64_t base = (b * c->T + t) * c->stride + h * c->HS;
                    int64_t i0 = base + (c->kind == 0 ? 2 * i : i), i1 = base + (c->kind == 0 ? 2 * i + 1 : i + half);
                    c->out[i0] = c->x[i0] * co - c->x[i1] * si;
                    c->out[i1] = c->x[i0] * si + c->x[i1] * co;
                }
}

static void test_rope(void) {
    for (int kind = 0; kind < 2; kind++) {
        op_case c;
        memset(&c, 0, sizeof c);
        c.B = 2, c.T = 9, c.NH = 3, c.HS = 6, c.stride = 4 * 6 + 2, c.kind = kind, c.fwd = rope_d;
        c.n_out = c.B * c.T * c.stride;   // the 4th head and the 2 extra values must stay untouched
        float *x = rand_f(c.n_out, 1.0f), *dy = rand_f(c.n_out, 1.0f), *cs = zeros_f(c.T * 3), *sn = zeros_f(c.T * 3);
        float *y = (float *)malloc(c.n_out * sizeof(float)), *dx = (float *)malloc(c.n_out * sizeof(float));
        ctl_rope_table(cs, sn, c.T, c.HS, 10000.0f);
        memcpy(y, x, c.n_out * sizeof(float));
        memcpy(dx, dy, c.n_out * sizeof(float));
        ctl_rope_layout layout = kind ? CTL_ROPE_HALVES : CTL_ROPE_ADJACENT;
        ctl_rope_forward(y, cs, sn, c.B, c.T, c.NH, c.HS, c.stride, layout);
        ctl_rope_backward(dx, cs, sn, c.B, c.T, c.NH, c.HS, c.stride, layout);   // in place: dx = R^T dy
        c.x = to_d(x, c.n_out), c.dy = to_d(dy, c.n_out), c.out = (double *)malloc(c.n_out * sizeof(double));
        check_fwd(kind ? "rope halves" : "rope adjacent", &c, y, 1e-6);
        check_grad(kind ? "rope halves dx" : "rope adjacent dx", &c, c.x, c.n_out, dx, 1e-6);
        free(x), free(dy), free(cs), free(sn), free(y), free(dx), free(c.x), free(c.dy), free(c.out);
    }
}

// Attention written the textbook way: full score matrix, causal mask, softmax, weighted sum.
static void attention_d(op_case *c) {
    int64_t T = c->T, NH = c->NH, NKV = c->NKV, HS = c->HS, QKV = (NH + 2 * NKV) * HS;
    double *p = (double *)malloc(T * sizeof(double));
    for (int64_t b = 0; b < c->B; b++)
        for (int64_t h = 0; h < NH; h++)
            for (int64_t t = 0; t < T; t++) {
                int64_t kvh = h / (NH / NKV);
                const double *q = c->x + (b * T + t) * QKV + h * HS;
                double mx = -1e300, sum = 0.0;
                for (int64_t j = 0; j <= t; j++) {
                    const double *k = c->x + (b * T + j) * QKV + (NH + kvh) * HS;
                    double s = 0.0;
                    for (int64_t i = 0; i < HS; i++) s += q[i] * k[i];
                    p[j] = s / sqrt((double)HS);
                    mx = fmax(mx, p[j]);
                }
                for (int64_t j = 0; j <= t; j++) sum += (p[j] = exp(p[j] - mx));
                for (int64_t i = 0; i < HS; i++) {
                    double o = 0.0;
                    for (int64_t j = 0; j <= t; j++) o += p[j] / sum * c->x[(b * T + j) * QKV + (NH + NKV + kvh) * HS + i];
                    c->out[(b * T + t) * NH * HS + h * HS + i] = o;
                }
            }
    free(p);
}

static void test_attention(ctl_ctx *ctx) {
    // GQA, MHA, MQA; head sizes through each vector path (32-, 8-channel chunks, the tail), and
    // more rows than one block of keys
    static const int64_t heads[][4] = {{4, 2, 5, 7}, {3, 3, 5, 7}, {4, 1, 5, 7}, {2, 1, 16, 37}, {2, 1, 44, 9}};
    for (int v = 0; v < 5; v++) {
        op_case c;
        memset(&c, 0, sizeof c);
        c.B = 2, c.T = heads[v][3], c.NH = heads[v][0], c.NKV = heads[v][1], c.HS = heads[v][2], c.fwd = attention_d;
        int64_t QKV = (c.NH + 2 * c.NKV) * c.HS, nin = c.B * c.T * QKV;
        c.n_out = c.B * c.T * c.NH * c.HS;
        float *qkv = rand_f(nin, 1.5f), *dy = rand_f(c.n_out, 1.0f), *y = zeros_f(c.n_out);
        float *lse = zeros_f(c.B * c.NH * c.T), *dqkv = zeros_f(nin);
        c.x = to_d(qkv, nin), c.dy = to_d(dy, c.n_out), c.out = (double *)malloc(c.n_out * sizeof(double));
        ctl_attention_forward(ctx, y, lse, qkv, c.B, c.T, c.NH, c.NKV, c.HS);
        ctl_attention_backward(ctx, dqkv, dy, qkv, y, lse, c.B, c.T, c.NH, c.NKV, c.HS);
        char name[64];
        snprintf(name, sizeof name, "attention NH %d NKV %d HS %d T %d", (int)c.NH, (int)c.NKV, (int)c.HS, (int)c.T);
        check_fwd(name, &c, y, 1e-6);
        check_grad(name, &c, c.x, nin, dqkv, 1e-5);
        free(qkv), free(dy), free(y), free(lse), free(dqkv), free(c.x), free(c.dy), free(c.out);
    }
}

static void act_d(op_case *c) {   // kind 0: GELU (tanh); 1: SwiGLU over (N, 2*C); 2: residual
    if (c->kind == 0)
        for (int64_t i = 0; i < c->n_out; i++) {
            double x = c->x[i];
            c->out[i] = 0.5 * x * (1.0 + tanh(sqrt(2.0 / 3.141592653589793) * (x + 0.044715 * x * x * x)));
        }
    else if (c->kind == 1)
        for (int64_t n = 0; n < c->N; n++)
            for (int64_t i = 0; i < c->C; i++) {
                double g = c->x[n * 2 * c->C + i], u = c->x[n * 2 * c->C + c->C + i];
                c->out[n * c->C + i] = g / (1.0 + exp(-g)) * u;
            }
    else
        for (int64_t i = 0; i < c->n_out; i++) c->out[i] = c->x[i] + c->w[i];
}

static void test_activations(ctl_ctx *ctx) {
    for (int kind = 0; kind < 3; kind++) {
        op_case c;
        memset(&c, 0, sizeof c);
        c.N = 5, c.C = 4099, c.kind = kind, c.fwd = act_d;   // C past one 4096-value task
        c.n_out = c.N * c.C;
        int64_t nin = kind == 1 ? 2 * c.n_out : c.n_out;
        float *x = rand_f(nin, 2.0f), *x2 = rand_f(c.n_out, 1.0f), *dy = rand_f(c.n_out, 1.0f);
        float *y = zeros_f(c.n_out), *dx = zeros_f(nin), *dx2 = zeros_f(c.n_out);
        c.x = to_d(x, nin), c.w = to_d(x2, c.n_out), c.dy = to_d(dy, c.n_out), c.out = (double *)malloc(c.n_out * sizeof(double));
        const char *name = kind == 0 ? "gelu" : kind == 1 ? "swiglu" : "residual";
        if (kind == 0) {
            ctl_gelu_forward(ctx, y, x, c.n_out);
            ctl_gelu_backward(ctx, dx, dy, x, c.n_out);
        } else if (kind == 1) {
            ctl_swiglu_forward(ctx, y, x, c.N, c.C);
            ctl_swiglu_backward(ctx, dx, dy, x, c.N, c.C);
        } else {
            ctl_residual_forward(y, x, x2, c.n_out);
            ctl_residual_backward(dx, dx2, dy, c.n_out);
        }
        check_fwd(name, &c, y, 1e-6);
        // finite differences on a slice of the inputs keep this quick; the slice crosses tasks.
        int64_t lo = 4000, n = 200;
        double *fd = (double *)malloc(n * sizeof(double)), *dd = c.x + lo;
        finite_diff(dd, n, op_objective, &c, fd);
        double e = rel_err_fd(dx + lo, fd, n);
        CHECK(e < 1e-5, "%s: backward vs finite differences: rel err %g", name, e);
        if (kind == 2) {
            finite_diff(c.w + lo, n, op_objective, &c, fd);
            e = rel_err_fd(dx2 + lo, fd, n);
            CHECK(e < 1e-6, "residual db: rel err %g", e);
        }
        free(fd), free(x), free(x2), free(dy), free(y), free(dx), free(dx2), free(c.x), free(c.w), free(c.dy), free(c.out);
    }
}

static void lmhead_d(op_case *c) {
    for (int64_t n = 0; n < c->N; n++) {
        double *z = (double *)malloc(c->V * sizeof(double)), mx = -1e300, sum = 0.0;
        for (int64_t v = 0; v < c->V; v++) {
            double s = 0.0;
            for (int64_t k = 0; k < c->C; k++) s += c->x[n * c->C + k] * c->w[v * c->C + k];
            z[v] = s * c->s;
            mx = fmax(mx, z[v]);
        }
        for (int64_t v = 0; v < c->V; v++) sum += exp(z[v] - mx);
        c->out[n] = z[c->ids[n]] - mx - log(sum);
        free(z);
    }
}

static void test_lmhead(ctl_ctx *ctx) {
    // chunk sizes: 1 row, a chunk that does not divide N, and all rows at once.
    static const int64_t chunks[] = {1, 4, 11};
    for (int ci = 0; ci < 3; ci++) {
        op_case c;
        memset(&c, 0, sizeof c);
        c.N = 11, c.C = 9, c.V = 37, c.s = 1.0f / 0.7f, c.fwd = lmhead_d, c.n_out = c.N;
        int32_t ids[11];
        for (int i = 0; i < 11; i++) ids[i] = (int32_t)((i * 7 + 3) % 37);
        c.ids = ids;
        float *x = rand_f(c.N * c.C, 1.0f), *w = rand_f(c.V * c.C, 1.0f), *dy = rand_f(c.N, 1.0f);
        dy[2] = dy[7] = 0.0f;   // rows without gradient are skipped: their dx must stay 0
        float *logp = zeros_f(c.N), *lse = zeros_f(c.N), *dx = zeros_f(c.N * c.C), *dw = zeros_f(c.V * c.C);
        float *scratch = zeros_f(chunks[ci] * (c.V + 2 * c.C + 1));
        c.x = to_d(x, c.N * c.C), c.w = to_d(w, c.V * c.C), c.dy = to_d(dy, c.N), c.out = (double *)malloc(c.N * sizeof(double));
        ctl_lmhead_forward(ctx, logp, lse, x, w, ids, c.N, c.C, c.V, c.s, scratch, chunks[ci]);
        ctl_lmhead_backward(ctx, dx, dw, dy, x, w, ids, lse, c.N, c.C, c.V, c.s, scratch, chunks[ci]);
        check_fwd("lmhead logp", &c, logp, 1e-6);
        check_grad("lmhead dx", &c, c.x, c.N * c.C, dx, 1e-5);
        check_grad("lmhead dw", &c, c.w, c.V * c.C, dw, 1e-5);
        bool quiet = true;
        for (int k = 0; k < c.C; k++) quiet &= dx[2 * c.C + k] == 0.0f && dx[7 * c.C + k] == 0.0f;
        CHECK(quiet, "lmhead: rows with zero dlogp got a gradient");
        free(x), free(w), free(dy), free(logp), free(lse), free(dx), free(dw), free(scratch);
        free(c.x), free(c.w), free(c.dy), free(c.out);
    }
}

// Each kernel through the fastest path on 1 and 2 threads, through AVX2 where the fastest is
// AVX-512, and through the portable reference path.
static void test_kernels(void) {
    for (int pass = 0; pass < 4; pass++) {
        ctl_ctx *ctx = pass == 2 ? try_ctx(2, CTL_SIMD_AVX2) : make_ctx(pass == 0 ? 1 : 2, pass == 3 ? CTL_SIMD_SCALAR : CTL_SIMD_AUTO);
        if (!ctx) continue;   // no AVX2 here
        if (pass == 2 && strcmp(ctl_ctx_simd_name(ctx), "avx2") == 0) {
            ctl_ctx *fast = make_ctx(1, CTL_SIMD_AUTO);
            bool same = strcmp(ctl_ctx_simd_name(fast), "avx2") == 0;
            ctl_ctx_free(fast);
            if (same) {   // passes 0 and 1 ran it already
                ctl_ctx_free(ctx);
                continue;
            }
        }
        test_matmul(ctx);
        test_norms(ctx);
        test_attention(ctx);
        test_activations(ctx);
        test_lmhead(ctx);
        ctl_ctx_free(ctx);
    }
    test_embedding();
    test_rope();
}

#ifdef CTL__AVX2
__attribute__((target("avx2,fma"))) static void exp8_span(const float *x, float *y, int n) {
    for (int i = 0; i < n; i += 8) _mm256_storeu_ps(y + i, ctl__exp8(_mm256_loadu_ps(x + i)));
}
#endif

// The AVX2 exp against exp() in double: relative error within 2 ulp over the whole clamped
// range, and the edges: NaN stays NaN, -inf gives (almost) 0, large x saturates.
static void test_exp8(void) {
#ifdef CTL__AVX2
    if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma")) {
        printf("    skipped: this CPU has no AVX2\n");
        return;
    }
    enum { n = 1 << 16 };
    static float x[n], y[n];
    double worst = 0.0;
    for (int i = 0; i < n; i++) x[i] = -87.0f + 175.5f * (float)i / n;
    exp8_span(x, y, n);
    for (int i = 0; i < n; i++) worst = fmax(worst, fabs(y[i] - exp((double)x[i])) / exp((double)x[i]));
    CHECK(worst < 2 * 5.97e-8, "exp8: worst relative error %g", worst);
    float edge[8] = {NAN, -INFINITY, INFINITY, 100.0f, -100.0f, 0.0f, 1.0f, -1.0f}, out[8];
    exp8_span(edge, out, 8);
    CHECK(out[0] != out[0] && out[1] < 1e-37f && out[2] > 3e38f && out[3] > 3e38f && out[4] < 1e-37f &&
          out[5] == 1.0f && fabsf(out[6] - 2.7182818f) < 3e-7f && fabsf(out[7] - 0.36787944f) < 1e-7f,
          "exp8 edges: %g %g %g %g %g %g %g %g", out[0], out[1], out[2], out[3], out[4], out[5], out[6], out[7]);
#else
    printf("    skipped: built without the AVX2 paths\n");
#endif
}

// The AVX2 AdamW against the portable one, on a length that leaves a tail.
static void test_adamw_paths(void) {
#ifdef CTL__AVX2
    if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma")) return;
    int64_t n = 1003;
    float *p1 = rand_f(n, 1.0f), *g = rand_f(n, 1e-3f), *p2 = (float *)malloc(n * 4);
    float *m1 = zeros_f(n), *v1 = zeros_f(n), *m2 = zeros_f(n), *v2 = zeros_f(n);
    memcpy(p2, p1, n * 4);
    for (int t = 1; t <= 3; t++) {
        ctl_adamw_update(p1, g, m1, v1, n, 0.5f, 1e-2f, 0.9f, 0.999f, 1e-8f, 0.1f, t);
        ctl__adam_k k = ctl__adam_consts(0.5f, 1e-2f, 0.9f, 0.999f, 1e-8f, 0.1f, t);
        ctl__adamw_avx2(p2, g, m2, v2, n, &k);
    }
    double e = rel_err_ff(p2, p1, n);
    CHECK(e < 1e-6, "AVX2 AdamW vs portable: rel err %g", e);
    free(p1), free(g), free(p2), free(m1), free(v1), free(m2), free(v2);
#endif
}

// ---- fixtures --------------------------------------------------------------------------------

// A whole file, NUL-terminated (malloc'd; NULL if it cannot be read).
static char *read_file(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *buf = n >= 0 ? (char *)malloc((size_t)n + 1) : NULL;
    if (buf && fread(buf, 1, (size_t)n, f) != (size_t)n) free(buf), buf = NULL;
    fclose(f);
    if (buf) buf[n] = 0, *len = (size_t)n;
    return buf;
}

typedef struct fx_rec {
    char name[96];
    int dtype, ndim;
    int64_t shape[4], numel;
    void *data;
} fx_rec;

typedef struct fixture {
    fx_rec *recs;
    int n;
} fixture;

static bool fx_load(const char *file, fixture *fx) {
    char path[512];
    snprintf(path, sizeof path, "%s%s", FIXTURE_DIR, file);
    FILE *f = fopen(path, "rb");
    memset(fx, 0, sizeof *fx);
    if (!f) return false;
    char magic[8];
    uint32_t count;
    bool ok = fread(magic, 1, 8, f) == 8 && !memcmp(magic, "CTLFIX01", 8) && fread(&count, 4, 1, f) == 1 && count < 10000;
    if (ok) fx->recs = (fx_rec *)calloc(count, sizeof(fx_rec));
    for (uint32_t i = 0; ok && i < count; i++) {
        fx_rec *r = &fx->recs[i];
        uint32_t len = 0, dtype = 0, ndim = 0;
        ok = fread(&len, 4, 1, f) == 1 && len < sizeof r->name && fread(r->name, 1, len, f) == len &&
             fread(&dtype, 4, 1, f) == 1 && fread(&ndim, 4, 1, f) == 1 && ndim <= 4 &&
             fread(r->shape, 8, ndim, f) == ndim;
        r->dtype = (int)dtype, r->ndim = (int)ndim, r->numel = 1;
        for (uint32_t d = 0; ok && d < ndim; d++) r->numel *= r->shape[d];
        size_t esize = dtype == 2 ? 1 : 4;   // 0 float32, 1 int32, 2 uint8
        if (ok) {
            r->data = malloc(r->numel * esize + 1);
            ok = dtype <= 2 && fread(r->data, esize, r->numel, f) == (size_t)r->numel;
        }
        fx->n = (int)i + 1;
    }
    fclose(f);
    return ok;
}

static fx_rec *fx_get(fixture *fx, const char *name) {
    for (int i = 0; i < fx->n; i++)
        if (!strcmp(fx->recs[i].name, name)) return &fx->recs[i];
    return NULL;
}

static void fx_free(fixture *fx) {
    for (int i = 0; i < fx->n; i++) free(fx->recs[i].data);
    free(fx->recs);
}

static const float *fx_f(fixture *fx, const char *name) {
    fx_rec *r = fx_get(fx, name);
    return r ? (const float *)r->data : NULL;
}

// A model built from a fixture's config with its parameters copied in.
static ctl_model *fx_model(ctl_ctx *ctx, fixture *fx, ctl_rope_layout layout) {
    const int32_t *ci = (const int32_t *)fx_get(fx, "config")->data;
    const float *cf = fx_f(fx, "config_f");
    ctl_model_config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.arch = ci[0] ? CTL_ARCH_LLAMA : CTL_ARCH_GPT2;
    cfg.vocab_size = ci[1], cfg.n_ctx = ci[2], cfg.n_embd = ci[3], cfg.n_layer = ci[4], cfg.n_head = ci[5];
    cfg.n_kv_head = ci[6], cfg.head_dim = ci[7], cfg.n_ff = ci[8], cfg.tied_embeddings = ci[9] != 0;
    cfg.norm_eps = cf[0], cfg.rope_theta = cf[1], cfg.rope_layout = layout;
    ctl_model *m;
    if (ctl_model_create(ctx, &cfg, &m) != CTL_OK) return NULL;
    int n_fx = 0;
    for (int i = 0; i < fx->n; i++) n_fx += !strncmp(fx->recs[i].name, "param/", 6);
    CHECK(n_fx == ctl_model_param_count(m), "fixture has %d parameters, the model %d", n_fx, (int)ctl_model_param_count(m));
    for (int64_t i = 0; i < ctl_model_param_count(m); i++) {
        ctl_param *p = ctl_model_param(m, i);
        char key[128];
        snprintf(key, sizeof key, "param/%s", p->name);
        fx_rec *r = fx_get(fx, key);
        CHECK(r && r->numel == ctl_tensor_numel(&p->value), "parameter %s missing or of another size", p->name);
        if (r && r->numel == ctl_tensor_numel(&p->value)) memcpy(p->value.data, r->data, r->numel * 4);
    }
    return m;
}

static ctl_batch fx_batch(fixture *fx) {
    fx_rec *tok = fx_get(fx, "tokens");
    ctl_batch b;
    b.B = tok->shape[0], b.T = tok->shape[1];
    b.tokens = (const int32_t *)tok->data;
    b.targets = (const int32_t *)fx_get(fx, "targets")->data;
    b.weights = fx_f(fx, "weights");
    return b;
}

static ctl_train_desc fx_desc(fixture *fx, ctl_batch *b) {
    const float *o = fx_f(fx, "optim");
    ctl_train_desc d;
    memset(&d, 0, sizeof d);
    d.batch = b->B, d.seq_len = b->T, d.lm_head_chunk = 5;   // 5 does not divide B*T = 14
    d.optim.lr = o[0], d.optim.beta1 = o[1], d.optim.beta2 = o[2], d.optim.eps = o[3];
    d.optim.weight_decay = o[4], d.optim.clip = o[5], d.optim.warmup = (int64_t)o[6], d.optim.total_steps = (int64_t)o[7];
    return d;
}

static float fwd_loss(ctl_ctx *ctx, ctl_train *t, const ctl_batch *b) {
    float loss = NAN;
    if (ctl_train_forward(t, b) != CTL_OK) return NAN;
    if (ctl_cross_entropy(ctx, b->B * b->T, ctl_train_logprobs(t), b->weights, ctl_train_dlogprobs(t), &loss))
        return NAN;
    return loss;
}

// Tolerances (fp32 against fp32 torch): loss and log-probs 1e-5 relative; gradients 1e-4
// norm-wise relative per tensor; weights after two AdamW steps 1e-4 absolute (an update moves a
// weight by about lr = 1e-2, so this is 1% of one step: entries whose gradient is ~1e-7 make
// torch's and our Adam steps differ by that much).
static void check_fixture_model(const char *file, ctl_simd simd) {
    fixture fx;
    if (!fx_load(file, &fx)) {
        CHECK(false, "cannot read fixture %s%s", FIXTURE_DIR, file);
        return;
    }
    ctl_ctx *ctx = make_ctx(2, simd);
    ctl_model *m = fx_model(ctx, &fx, CTL_ROPE_HALVES);
    ctl_batch b = fx_batch(&fx);
    ctl_train_desc d = fx_desc(&fx, &b);
    ctl_train *t = NULL;
    if (!m || ctl_train_init(m, &d, &t) != CTL_OK) {
        CHECK(false, "%s: model or trainer: %s", file, ctl_last_error(ctx));
        ctl_model_free(m);
        ctl_ctx_free(ctx);
        fx_free(&fx);
        return;
    }
    float loss = fwd_loss(ctx, t, &b), want = fx_f(&fx, "loss")[0];
    CHECK(fabsf(loss - want) <= 1e-5f * fabsf(want), "%s: loss %.8g, torch %.8g", file, loss, want);
    double e = rel_err_ff(ctl_train_logprobs(t), fx_f(&fx, "logp"), b.B * b.T);
    CHECK(e < 1e-5, "%s: log-probs rel err %g", file, e);
    float *logits = zeros_f(ctl_model_cfg(m)->vocab_size);
    ctl_train_logits(t, 1, 3, logits);
    e = rel_err_ff(logits, fx_f(&fx, "logits") + (1 * b.T + 3) * ctl_model_cfg(m)->vocab_size, ctl_model_cfg(m)->vocab_size);
    CHECK(e < 1e-5, "%s: logits of row (1,3) rel err %g", file, e);
    free(logits);
    CHECK(ctl_train_backward(t) == CTL_OK, "backward");
    double worst = 0.0;
    for (int64_t i = 0; i < ctl_model_param_count(m); i++) {
        ctl_param *p = ctl_model_param(m, i);
        char key[128];
        snprintf(key, sizeof key, "grad/%s", p->name);
        const float *g = fx_f(&fx, key);
        if (!g) continue;
        e = rel_err_ff(ctl_train_grad(t, i), g, ctl_tensor_numel(&p->value));
        worst = fmax(worst, e);
        CHECK(e < 1e-4, "%s: gradient of %s rel err %g", file, p->name, e);
    }
    printf("    %-20s %-6s loss %.7f (torch %.7f), worst gradient rel err %.2e\n", file, ctl_ctx_simd_name(ctx), loss,
           want, worst);
    ctl_step_stats st;
    CHECK(ctl_train_step(t, &st) == CTL_OK, "step 1");
    const float *gn = fx_f(&fx, "grad_norm"), *ls = fx_f(&fx, "loss_steps");
    CHECK(fabsf(st.grad_norm - gn[0]) <= 1e-5f * gn[0] && st.clipped, "%s: grad norm %g (torch %g), clipped %d", file,
          st.grad_norm, gn[0], st.clipped);
    loss = fwd_loss(ctx, t, &b);
    CHECK(fabsf(loss - ls[1]) <= 2e-5f * fabsf(ls[1]), "%s: loss after one step %.8g, torch %.8g", file, loss, ls[1]);
    ctl_train_backward(t);
    CHECK(ctl_train_step(t, &st) == CTL_OK, "step 2");
    CHECK(fabsf(st.grad_norm - gn[1]) <= 1e-4f * gn[1], "%s: grad norm at step 2 %g (torch %g)", file, st.grad_norm, gn[1]);
    double worst_w = 0.0;
    for (int64_t i = 0; i < ctl_model_param_count(m); i++) {
        ctl_param *p = ctl_model_param(m, i);
        char key[128];
        snprintf(key, sizeof key, "after2/%s", p->name);
        const float *w = fx_f(&fx, key), *x = (const float *)p->value.data;
        int64_t n = ctl_tensor_numel(&p->value), C = ctl_model_cfg(m)->n_embd;
        bool qkv_bias = strstr(p->name, "attn_qkv.bias") != NULL;
        for (int64_t j = 0; w && j < n; j++) {
            // The key bias cannot change attention (softmax ignores a constant per row), so its
            // true gradient is exactly 0 and both sides hold rounding noise that Adam magnifies.
            if (qkv_bias && j >= C && j < 2 * C) continue;
            worst_w = fmax(worst_w, fabs((double)x[j] - w[j]));
        }
    }
    CHECK(worst_w < 1e-4, "%s: weights after two AdamW steps differ by %g", file, worst_w);
    printf("    %-20s %-6s after two AdamW steps: max weight difference %.2e\n", file, ctl_ctx_simd_name(ctx), worst_w);
    ctl_train_free(t);
    ctl_model_free(m);
    ctl_ctx_free(ctx);
    fx_free(&fx);
}

// Through the fast paths and through the portable reference paths.
// AVX2 too where the fastest path is AVX-512.
static bool avx2_below_auto(void) {
    ctl_ctx *a = try_ctx(1, CTL_SIMD_AVX2), *b = try_ctx(1, CTL_SIMD_AUTO);
    bool r = a && b && strcmp(ctl_ctx_simd_name(b), "avx2") != 0;
    if (a) ctl_ctx_free(a);
    if (b) ctl_ctx_free(b);
    return r;
}
static void test_fixture_gpt2(void) {
    check_fixture_model("gpt2_tiny.bin", CTL_SIMD_AUTO);
    if (avx2_below_auto()) check_fixture_model("gpt2_tiny.bin", CTL_SIMD_AVX2);
    check_fixture_model("gpt2_tiny.bin", CTL_SIMD_SCALAR);
}
static void test_fixture_llama(void) {
    check_fixture_model("llama_tiny.bin", CTL_SIMD_AUTO);
    if (avx2_below_auto()) check_fixture_model("llama_tiny.bin", CTL_SIMD_AVX2);
    check_fixture_model("llama_tiny.bin", CTL_SIMD_SCALAR);
}
static void test_fixture_llama_tied(void) { check_fixture_model("llama_tied_tiny.bin", CTL_SIMD_AUTO); }

static void test_lr_schedule(void) {
    fixture fx;
    CHECK(fx_load("lr_schedule.bin", &fx), "cannot read lr_schedule.bin");
    static const struct { const char *name; int64_t warmup, total; float min_ratio; } cases[] = {
        {"cosine_w3_t10", 3, 10, 0.0f}, {"cosine_w0_t7", 0, 7, 0.0f}, {"cosine_minlr_w2_t8", 2, 8, 0.1f}};
    for (int c = 0; c < 3; c++) {
        fx_rec *r = fx_get(&fx, cases[c].name);
        CHECK(r != NULL, "missing %s", cases[c].name);
        ctl_optim_desc o;
        memset(&o, 0, sizeof o);
        o.warmup = cases[c].warmup, o.total_steps = cases[c].total, o.min_lr_ratio = cases[c].min_ratio;
        for (int64_t s = 0; r && s < r->numel; s++) {
            float got = ctl_lr_schedule(&o, s), want = ((const float *)r->data)[s];
            if (s <= cases[c].total)   // past the end Hugging Face's cosine rises again; ours stays down
                CHECK(fabsf(got - want) < 1e-6f, "%s step %d: %g, transformers %g", cases[c].name, (int)s, got, want);
            else
                CHECK(fabsf(got - cases[c].min_ratio) < 1e-6f, "%s past the end: %g", cases[c].name, got);
        }
    }
    fx_free(&fx);
}

// The adjacent and halves RoPE layouts are one rotation on permuted coordinates: reorder each
// head's rows of the q and k weights (halves i -> adjacent 2i, i + HS/2 -> 2i+1) and the model
// computes the same function.
static void test_rope_layouts(void) {
    fixture fx;
    CHECK(fx_load("llama_tiny.bin", &fx), "cannot read llama_tiny.bin");
    ctl_ctx *ctx = make_ctx(2, CTL_SIMD_AUTO);
    ctl_model *mh = fx_model(ctx, &fx, CTL_ROPE_HALVES), *ma = fx_model(ctx, &fx, CTL_ROPE_ADJACENT);
    int64_t HS = ctl_model_cfg(mh)->head_dim, C = ctl_model_cfg(mh)->n_embd;
    for (int64_t i = 0; i < ctl_model_param_count(ma); i++) {
        ctl_param *pa = ctl_model_param(ma, i), *ph = ctl_model_param(mh, i);
        if (!strstr(pa->name, "attn_q.weight") && !strstr(pa->name, "attn_k.weight")) continue;
        const float *src = (const float *)ph->value.data;
        float *dst = (float *)pa->value.data;
        for (int64_t h = 0; h < pa->value.shape[0] / HS; h++)
            for (int64_t j = 0; j < HS / 2; j++) {
                memcpy(dst + (h * HS + 2 * j) * C, src + (h * HS + j) * C, C * sizeof(float));
                memcpy(dst + (h * HS + 2 * j + 1) * C, src + (h * HS + j + HS / 2) * C, C * sizeof(float));
            }
    }
    ctl_batch b = fx_batch(&fx);
    ctl_train_desc d = fx_desc(&fx, &b);
    ctl_train *th, *ta;
    ctl_train_init(mh, &d, &th);
    ctl_train_init(ma, &d, &ta);
    fwd_loss(ctx, th, &b);
    fwd_loss(ctx, ta, &b);
    double e = rel_err_ff(ctl_train_logprobs(ta), ctl_train_logprobs(th), b.B * b.T);
    CHECK(e < 1e-5, "adjacent layout with permuted weights: log-probs differ, rel err %g", e);
    e = rel_err_ff(ctl_train_logprobs(ta), fx_f(&fx, "logp"), b.B * b.T);
    CHECK(e < 1e-5, "adjacent layout vs transformers: rel err %g", e);
    ctl_train_free(th), ctl_train_free(ta);
    ctl_model_free(mh), ctl_model_free(ma);
    ctl_ctx_free(ctx);
    fx_free(&fx);
}

// ---- GGUF ------------------------------------------------------------------------------------
// A small GGUF written byte by byte here (independently of the library), then broken in every
// way the reader must notice. The fixtures from tools/make_gguf_fixtures.py (written by the
// `gguf` Python package) check values and dequantisation.

typedef struct bytes { unsigned char b[4096]; size_t n; } bytes;
static void put(bytes *o, const void *p, size_t n) { memcpy(o->b + o->n, p, n), o->n += n; }
static void put_u32(bytes *o, uint32_t v) { put(o, &v, 4); }   // the test machine is little-endian
static void put_u64(bytes *o, uint64_t v) { put(o, &v, 8); }
static void put_str(bytes *o, const char *s) { put_u64(o, strlen(s)), put(o, s, strlen(s)); }

// Header, 3 metadata entries, 2 tensors (f32 (2,3) and q8_0 (1,32)), aligned data.
// Offsets of interesting fields are returned for the breakage tests.
typedef struct gguf_layout { size_t version, n_tensors, n_kv, arr_count, t0_name, t0_type, t0_ne0, t1_offset, data; } gguf_layout;
static bytes tiny_gguf(gguf_layout *at) {
    bytes o;
    memset(&o, 0, sizeof o);
    put(&o, "GGUF", 4);
    at->version = o.n, put_u32(&o, 3);
    at->n_tensors = o.n, put_u64(&o, 2);
    at->n_kv = o.n, put_u64(&o, 3);
    put_str(&o, "general.name"), put_u32(&o, 8), put_str(&o, "tiny");
    put_str(&o, "tiny.count"), put_u32(&o, 4), put_u32(&o, 7);
    put_str(&o, "tiny.list"), put_u32(&o, 9), put_u32(&o, 5);
    at->arr_count = o.n, put_u64(&o, 3);
    put_u32(&o, 1), put_u32(&o, (uint32_t)-2), put_u32(&o, 3);
    at->t0_name = o.n + 8, put_str(&o, "w"), put_u32(&o, 2), at->t0_ne0 = o.n, put_u64(&o, 3), put_u64(&o, 2);
    at->t0_type = o.n, put_u32(&o, 0), put_u64(&o, 0);
    put_str(&o, "q"), put_u32(&o, 2), put_u64(&o, 32), put_u64(&o, 1), put_u32(&o, 8);
    at->t1_offset = o.n, put_u64(&o, 32);   // 24 bytes of f32, padded to 32
    while (o.n % 32) o.b[o.n++] = 0;
    at->data = o.n;
    for (int i = 0; i < 6; i++) {
        float v = (float)i - 2.5f;
        put(&o, &v, 4);
    }
    while (o.n % 32) o.b[o.n++] = 0;
    uint16_t d = ctl_f32_to_f16(0.5f);
    put(&o, &d, 2);
    for (int i = 0; i < 32; i++) o.b[o.n++] = (unsigned char)(int8_t)(i - 16);
    return o;
}

static void test_gguf_tiny(void) {
    ctl_ctx *ctx = make_ctx(1, CTL_SIMD_AUTO);
    gguf_layout at;
    bytes f = tiny_gguf(&at);
    ctl_gguf *g = NULL;
    CHECK(ctl_gguf_open_memory(ctx, f.b, f.n, &g) == CTL_OK, "open: %s", ctl_last_error(ctx));
    if (!g) return;
    const char *str;
    size_t len;
    int64_t v;
    CHECK(ctl_gguf_version(g) == 3 && ctl_gguf_alignment(g) == 32 && ctl_gguf_data_offset(g) == at.data, "header");
    CHECK(ctl_gguf_get_str(g, "general.name", &str, &len) == CTL_OK && len == 4 && !memcmp(str, "tiny", 4), "string");
    CHECK(ctl_gguf_get_int(g, "tiny.count", &v) == CTL_OK && v == 7, "u32 as int");
    const ctl_gguf_kv *kv = ctl_gguf_find_kv(g, "tiny.list");
    CHECK(kv && kv->count == 3 && ctl_gguf_arr_int(g, kv, 1, &v) == CTL_OK && v == -2, "i32 array");
    CHECK(ctl_gguf_arr_int(g, kv, 3, &v) == CTL_ERR_RANGE, "array index past the end");
    CHECK(ctl_gguf_get_int(g, "general.name", &v) == CTL_ERR_FORMAT && strstr(ctl_last_error(ctx), "'general.name' is str"),
          "wrong type: %s", ctl_last_error(ctx));
    CHECK(ctl_gguf_get_int(g, "no.such.key", &v) == CTL_ERR_NOT_FOUND && strstr(ctl_last_error(ctx), "no.such.key"),
          "missing key: %s", ctl_last_error(ctx));
    const ctl_gguf_tensor *w = ctl_gguf_find_tensor(g, "w"), *q = ctl_gguf_find_tensor(g, "q");
    CHECK(w && q && w->ne[0] == 3 && w->ne[1] == 2 && w->type == CTL_GGML_F32 && q->type == CTL_GGML_Q8_0, "tensor infos");
    float out[32];
    if (w && q) {
        ctl_gguf_read_f32(g, w, out);
        CHECK(out[0] == -2.5f && out[5] == 2.5f, "f32 values %g %g", out[0], out[5]);
        ctl_gguf_read_f32(g, q, out);
        CHECK(out[0] == -8.0f && out[16] == 0.0f && out[31] == 7.5f, "q8_0 values %g %g %g", out[0], out[16], out[31]);
    }
    ctl_gguf_close(g);

    // Every truncation fails cleanly (and never reads past the buffer: see the sanitizer build).
    int clean = 0;
    for (size_t n = 0; n < f.n; n++) {
        unsigned char *cut = (unsigned char *)malloc(n ? n : 1);
        memcpy(cut, f.b, n);
        ctl_status st = ctl_gguf_open_memory(ctx, cut, n, &g);
        clean += st != CTL_OK && g == NULL && ctl_last_error(ctx)[0];
        free(cut);
    }
    CHECK(clean == (int)f.n, "only %d of %zu truncations were refused with a message", clean, f.n);

    // Each breakage, with the words its message must contain.
    struct { size_t at; int width; uint64_t value; ctl_status st; const char *says; } bad[] = {
        {0, 4, 0x46554746u, CTL_ERR_FORMAT, "not a GGUF file"},
        {at.version, 4, 1, CTL_ERR_UNSUPPORTED, "version 1"},
        {at.version, 4, 4, CTL_ERR_UNSUPPORTED, "version 4"},
        {at.version, 4, 0x03000000u, CTL_ERR_UNSUPPORTED, "big-endian"},
        {at.n_tensors, 8, (uint64_t)1 << 60, CTL_ERR_FORMAT, "1152921504606846976 tensors"},
        {at.n_kv, 8, 0xFFFFFFFFFFull, CTL_ERR_FORMAT, "metadata entries"},
        {at.arr_count, 8, (uint64_t)1 << 61, CTL_ERR_FORMAT, "'tiny.list'"},
        {at.t0_type, 4, 21, CTL_ERR_UNSUPPORTED, "type 21"},
        {at.t0_type, 4, 8, CTL_ERR_FORMAT, "not a multiple of q8_0's block"},
        {at.t0_ne0, 8, (uint64_t)1 << 62, CTL_ERR_FORMAT, "'w'"},
        {at.t1_offset, 8, 64, CTL_ERR_FORMAT, "past the end of the file"},
        {at.t1_offset, 8, 33, CTL_ERR_FORMAT, "not a multiple of the alignment"},
        {at.t1_offset, 8, UINT64_MAX - 31, CTL_ERR_FORMAT, "past the end"},
        {at.t1_offset, 8, 0, CTL_ERR_FORMAT, "overlaps the data of another"},
        {at.t0_name, 1, 'q', CTL_ERR_FORMAT, "tensor 'q' appears twice"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        bytes b = f;
        memcpy(b.b + bad[i].at, &bad[i].value, (size_t)bad[i].width);
        ctl_status st = ctl_gguf_open_memory(ctx, b.b, b.n, &g);
        CHECK(st == bad[i].st && g == NULL && strstr(ctl_last_error(ctx), bad[i].says),
              "breakage %zu: status %d, message: %s", i, (int)st, ctl_last_error(ctx));
    }
    CHECK(ctl_gguf_open(ctx, "no/such/file.gguf", &g) == CTL_ERR_IO && strstr(ctl_last_error(ctx), "no/such/file.gguf"),
          "missing file: %s", ctl_last_error(ctx));

    // A model's sizes come from the metadata, but nothing is allocated from them before the
    // tensors bear them out: absurd sizes in a small file fail with a message, not an attempt
    // to allocate terabytes (or an overflow).
    struct { uint64_t layers, embd, ff, heads; ctl_status st; const char *says; } model[] = {
        {1000000, 8, 16, 2, CTL_ERR_RANGE, "n_layer 1000000 (at most 65536)"},
        {1, (uint64_t)1 << 40, (uint64_t)1 << 40, (uint64_t)1 << 33, CTL_ERR_RANGE, "n_embd 1099511627776, n_head 8589934592"},
        {1, (uint64_t)1 << 20, (uint64_t)1 << 20, (uint64_t)1 << 13, CTL_ERR_RANGE, "6.6e+12 weights (at most 2^40)"},
        {3000, 8, 16, 2, CTL_ERR_FORMAT, "block_count 3000 but only 10 tensors"},
    };
    for (size_t i = 0; i < sizeof model / sizeof model[0]; i++) {
        ctl_gguf_writer *wr;
        float zeros[32] = {0};
        int64_t ne_emb[2] = {8, 4}, ne1[1] = {8};
        CHECK(ctl_gguf_writer_init(ctx, &wr) == CTL_OK, "writer");
        ctl_gguf_writer_set_str(wr, "general.architecture", "llama", 5);
        ctl_gguf_writer_set(wr, "llama.block_count", CTL_GGUF_U64, &model[i].layers);
        ctl_gguf_writer_set(wr, "llama.embedding_length", CTL_GGUF_U64, &model[i].embd);
        ctl_gguf_writer_set(wr, "llama.feed_forward_length", CTL_GGUF_U64, &model[i].ff);
        ctl_gguf_writer_set(wr, "llama.attention.head_count", CTL_GGUF_U64, &model[i].heads);
        ctl_gguf_writer_set_u32(wr, "llama.context_length", 16);
        ctl_gguf_writer_set_f32(wr, "llama.attention.layer_norm_rms_epsilon", 1e-5f);
        ctl_gguf_writer_add_tensor(wr, "token_embd.weight", CTL_GGML_F32, 2, ne_emb, zeros);
        for (int k = 0; k < 9; k++) {
            char name[32];
            snprintf(name, sizeof name, "blk.0.t%d", k);
            ctl_gguf_writer_add_tensor(wr, name, CTL_GGML_F32, 1, ne1, zeros);
        }
        CHECK(ctl_gguf_writer_save(wr, "build/absurd.gguf") == CTL_OK, "save: %s", ctl_last_error(ctx));
        ctl_gguf_writer_free(wr);
        ctl_model *m = NULL;
        ctl_status st = ctl_gguf_open(ctx, "build/absurd.gguf", &g);
        if (!st) st = ctl_model_from_gguf(ctx, g, NULL, &m), ctl_gguf_close(g);
        CHECK(st == model[i].st && !m && strstr(ctl_last_error(ctx), model[i].says), "absurd sizes %zu: status %d, %s", i, (int)st,
              ctl_last_error(ctx));
        if (m) ctl_model_free(m);
    }
    ctl_ctx_free(ctx);
}

// Half and bfloat16 conversions against their definitions, on every 16-bit pattern.
static void test_f16_bf16(void) {
    int bad16 = 0, badbf = 0, round16 = 0;
    for (uint32_t h = 0; h < 65536; h++) {
        int e = (int)(h >> 10 & 31), m = (int)(h & 1023);
        double want = e == 0 ? ldexp(m, -24) : e == 31 ? (m ? NAN : INFINITY) : ldexp(1024 + m, e - 25);
        if (h & 0x8000) want = -want;
        float got = ctl_f16_to_f32((uint16_t)h);
        bad16 += m && e == 31 ? got == got : got != (float)want;
        if (e < 31) round16 += ctl_f32_to_f16(got) != h;   // exact values convert back exactly
        float b = ctl_bf16_to_f32((uint16_t)h);
        if (!(b != b)) badbf += ctl_f32_to_bf16(b) != h;
    }
    CHECK(bad16 == 0 && round16 == 0 && badbf == 0, "f16 decode %d, f16 round trip %d, bf16 round trip %d wrong", bad16,
          round16, badbf);
    // Round to nearest even at the halfway points; overflow to inf.
    CHECK(ctl_f32_to_f16(1.0f + 1.0f / 2048) == 0x3c00 && ctl_f32_to_f16(1.0f + 3.0f / 2048) == 0x3c02, "f16 ties to even");
    CHECK(ctl_f32_to_f16(65520.0f) == 0x7c00 && ctl_f32_to_f16(65519.0f) == 0x7bff, "f16 overflow");
    CHECK(ctl_f32_to_bf16(1.0f + 1.0f / 256) == 0x3f80 && ctl_f32_to_bf16(1.0f + 3.0f / 256) == 0x3f82, "bf16 ties to even");
}

// The files written by the `gguf` Python package: metadata of every type, one tensor of every
// type cotlab reads, dequantised by gguf-py's own code (gguf.quants.dequantize).
static void check_gguf_fixture(const char *gguf_file, const char *ref_file) {
    ctl_ctx *ctx = make_ctx(1, CTL_SIMD_AUTO);
    char path[512];
    snprintf(path, sizeof path, "%sgguf/%s", FIXTURE_DIR, gguf_file);
    fixture fx;
    ctl_gguf *g = NULL;
    snprintf(path + 400, 100, "gguf/%s", ref_file);
    if (!fx_load(path + 400, &fx) || ctl_gguf_open(ctx, path, &g) != CTL_OK) {
        CHECK(false, "cannot read %s or %s: %s", gguf_file, ref_file, ctl_last_error(ctx));
        ctl_ctx_free(ctx);
        return;
    }
    const int32_t *hdr = (const int32_t *)fx_get(&fx, "meta/header")->data;
    CHECK((int)ctl_gguf_version(g) == hdr[0] && ctl_gguf_tensor_count(g) == hdr[1] && ctl_gguf_kv_count(g) == hdr[2] &&
          (int)ctl_gguf_alignment(g) == hdr[3], "%s: header", gguf_file);
    CHECK((int64_t)ctl_gguf_data_offset(g) == *(const int32_t *)fx_get(&fx, "meta/data_offset")->data, "%s: data offset",
          gguf_file);
    double worst = 0.0;
    for (int64_t i = 0; i < ctl_gguf_tensor_count(g); i++) {
        const ctl_gguf_tensor *t = ctl_gguf_tensor_at(g, i);
        char key[128];
        snprintf(key, sizeof key, "meta/ne/%s", t->name);
        fx_rec *ne = fx_get(&fx, key);
        snprintf(key, sizeof key, "meta/type/%s", t->name);
        fx_rec *ty = fx_get(&fx, key);
        snprintf(key, sizeof key, "meta/offset/%s", t->name);
        fx_rec *off = fx_get(&fx, key);
        snprintf(key, sizeof key, "deq/%s", t->name);
        fx_rec *deq = fx_get(&fx, key);
        CHECK(ne && ty && off && deq, "%s: no reference for tensor %s", gguf_file, t->name);
        if (!ne || !ty || !off || !deq) continue;
        const int32_t *n = (const int32_t *)ne->data;
        CHECK(t->ne[0] == n[0] && t->ne[1] == n[1] && t->ne[2] == n[2] && t->ne[3] == n[3] &&
              (int)t->type == *(const int32_t *)ty->data && (int64_t)t->offset == *(const int32_t *)off->data,
              "%s: tensor %s info", gguf_file, t->name);
        float *out = zeros_f(ctl_gguf_tensor_numel(t));
        CHECK(ctl_gguf_read_f32(g, t, out) == CTL_OK && deq->numel == ctl_gguf_tensor_numel(t), "dequantize %s", t->name);
        double e = rel_err_ff(out, (const float *)deq->data, deq->numel);
        worst = fmax(worst, e);
        CHECK(e <= 1e-6, "%s: %s (%s) dequantised differs from gguf-py: rel err %g", gguf_file, t->name,
              ctl_ggml_type_name(t->type), e);
        free(out);
    }
    printf("    %-18s %d tensors, worst difference from gguf-py %.1e\n", gguf_file, (int)ctl_gguf_tensor_count(g), worst);
    fx_free(&fx);
    ctl_gguf_close(g);
    ctl_ctx_free(ctx);
}

static void test_gguf_fixtures(void) {
    check_gguf_fixture("types_v3.gguf", "types_ref.bin");
    check_gguf_fixture("aligned64_v2.gguf", "aligned64_ref.bin");
    // The metadata values the script wrote, read back through the typed accessors.
    ctl_ctx *ctx = make_ctx(1, CTL_SIMD_AUTO);
    ctl_gguf *g;
    if (ctl_gguf_open(ctx, FIXTURE_DIR "gguf/types_v3.gguf", &g) != CTL_OK) {
        CHECK(false, "%s", ctl_last_error(ctx));
        ctl_ctx_free(ctx);
        return;
    }
    static const struct { const char *key; int64_t want; } ints[] = {
        {"test.u8", 200}, {"test.i8", -100}, {"test.u16", 60000}, {"test.i16", -30000}, {"test.u32", 4000000000LL},
        {"test.i32", -2000000000LL}, {"test.u64", (1LL << 40) + 5}, {"test.i64", -(1LL << 40)}};
    for (size_t i = 0; i < sizeof ints / sizeof ints[0]; i++) {
        int64_t v = 0;
        CHECK(ctl_gguf_get_int(g, ints[i].key, &v) == CTL_OK && v == ints[i].want, "%s = %lld", ints[i].key, (long long)v);
    }
    double f = 0.0;
    bool b = false;
    const char *str;
    size_t len;
    uint64_t u;
    int64_t v;
    CHECK(ctl_gguf_get_float(g, "test.f32", &f) == CTL_OK && f == 3.25, "f32 %g", f);
    CHECK(ctl_gguf_get_float(g, "test.f64", &f) == CTL_OK && f == -1.0e100, "f64 %g", f);
    CHECK(ctl_gguf_get_bool(g, "test.bool", &b) == CTL_OK && b, "bool");
    CHECK(ctl_gguf_get_str(g, "test.str", &str, &len) == CTL_OK && len == strlen("h\xc3\xa9llo w\xc3\xb6rld \xe2\x9c\x93") &&
          !memcmp(str, "h\xc3\xa9llo w\xc3\xb6rld \xe2\x9c\x93", len), "utf-8 string");
    CHECK(ctl_gguf_get_uint(g, "test.i8", &u) == CTL_ERR_RANGE, "negative into unsigned");
    CHECK(ctl_gguf_get_int(g, "test.bool", &v) == CTL_ERR_FORMAT, "bool is not an integer");
    const ctl_gguf_kv *kv = ctl_gguf_find_kv(g, "test.arr_str");
    static const char *const strs[] = {"a", "", "bc", "\xe2\x9c\x93\xe2\x9c\x93"};
    for (int i = 0; kv && i < 4; i++)
        CHECK(ctl_gguf_arr_str(g, kv, (uint64_t)i, &str, &len) == CTL_OK && len == strlen(strs[i]) && !memcmp(str, strs[i], len),
              "arr_str[%d]", i);
    kv = ctl_gguf_find_kv(g, "test.arr_u8");
    CHECK(kv && ctl_gguf_arr_int(g, kv, 1, &v) == CTL_OK && v == 255, "arr_u8[1]");
    kv = ctl_gguf_find_kv(g, "test.arr_f32");
    CHECK(kv && ctl_gguf_arr_float(g, kv, 1, &f) == CTL_OK && f == -1.5, "arr_f32[1]");
    ctl_gguf_close(g);
    ctl_ctx_free(ctx);
}

// Read gguf-py's file, write every entry and tensor back with the writer, read that: the same
// metadata bytes and the same tensor bytes, at offsets a reader (ours) accepts.
static void test_gguf_roundtrip(void) {
    ctl_ctx *ctx = make_ctx(1, CTL_SIMD_AUTO);
    ctl_gguf *a = NULL, *b = NULL;
    ctl_gguf_writer *w = NULL;
    CHECK(ctl_gguf_open(ctx, FIXTURE_DIR "gguf/types_v3.gguf", &a) == CTL_OK, "%s", ctl_last_error(ctx));
    if (!a) return;
    ctl_gguf_writer_init(ctx, &w);
    for (int64_t i = 0; i < ctl_gguf_kv_count(a); i++)
        CHECK(ctl_gguf_writer_copy_kv(w, a, ctl_gguf_kv_at(a, i)) == CTL_OK, "copy kv: %s", ctl_last_error(ctx));
    for (int64_t i = 0; i < ctl_gguf_tensor_count(a); i++) {
        const ctl_gguf_tensor *t = ctl_gguf_tensor_at(a, i);
        CHECK(ctl_gguf_writer_add_raw(w, t->name, t->type, t->n_dims, t->ne, t->data) == CTL_OK, "add raw %s", t->name);
    }
    CHECK(ctl_gguf_writer_copy_kv(w, a, ctl_gguf_kv_at(a, 0)) == CTL_ERR_INVALID, "a key set twice is refused");
    uint32_t a64 = 64, a32 = 32;   // the writer aligns to 32: a file that says otherwise would be read wrongly
    CHECK(ctl_gguf_writer_set(w, "general.alignment", CTL_GGUF_U32, &a64) == CTL_ERR_UNSUPPORTED && strstr(ctl_last_error(ctx), "aligns to 32"),
          "general.alignment 64 refused: %s", ctl_last_error(ctx));
    CHECK(ctl_gguf_writer_set(w, "general.alignment", CTL_GGUF_U32, &a32) == CTL_OK, "general.alignment 32 (the default: no key written)");
    CHECK(ctl_gguf_writer_save(w, "build/roundtrip.gguf") == CTL_OK, "save: %s", ctl_last_error(ctx));
    CHECK(ctl_gguf_open(ctx, "build/roundtrip.gguf", &b) == CTL_OK, "reopen: %s", ctl_last_error(ctx));
    if (b) {
        CHECK(ctl_gguf_kv_count(a) == ctl_gguf_kv_count(b) && ctl_gguf_tensor_count(a) == ctl_gguf_tensor_count(b), "counts");
        for (int64_t i = 0; i < ctl_gguf_kv_count(a) && i < ctl_gguf_kv_count(b); i++) {
            const ctl_gguf_kv *x = ctl_gguf_kv_at(a, i), *y = ctl_gguf_kv_at(b, i);
            const ctl_gguf_kv *nx = i + 1 < ctl_gguf_kv_count(a) ? ctl_gguf_kv_at(a, i + 1) : NULL;
            size_t n = nx ? (size_t)(nx->data - x->data) : 0;   // up to the next entry's value: covers the whole value
            CHECK(!strcmp(x->key, y->key) && x->type == y->type && x->elem_type == y->elem_type && x->count == y->count,
                  "kv %s", x->key);
            if (nx && ctl_gguf_kv_at(b, i + 1))
                CHECK((size_t)(ctl_gguf_kv_at(b, i + 1)->data - y->data) == n && !memcmp(x->data, y->data, n), "kv %s bytes", x->key);
        }
        for (int64_t i = 0; i < ctl_gguf_tensor_count(a) && i < ctl_gguf_tensor_count(b); i++) {
            const ctl_gguf_tensor *x = ctl_gguf_tensor_at(a, i), *y = ctl_gguf_tensor_at(b, i);
            CHECK(!strcmp(x->name, y->name) && x->type == y->type && !memcmp(x->ne, y->ne, sizeof x->ne) &&
                  x->offset == y->offset && x->nbytes == y->nbytes && !memcmp(x->data, y->data, (size_t)x->nbytes),
                  "tensor %s", x->name);
        }
    }
    ctl_gguf_close(a), ctl_gguf_close(b), ctl_gguf_writer_free(w);

    // Encoding from fp32: F16 and BF16 round to nearest (half an ulp), Q8_0 to half a step d/2
    // (plus what rounding d to f16 costs: up to 127 q-steps of d/2048).
    ctl_gguf_writer_init(ctx, &w);
    int64_t ne[2] = {64, 3};
    float *x = rand_f(192, 1.0f);
    x[5] = 0.0f, x[70] = 1e-6f;
    ctl_ggml_type types[4] = {CTL_GGML_F32, CTL_GGML_F16, CTL_GGML_BF16, CTL_GGML_Q8_0};
    const char *names[4] = {"f32", "f16", "bf16", "q8_0"};
    for (int i = 0; i < 4; i++) CHECK(ctl_gguf_writer_add_tensor(w, names[i], types[i], 2, ne, x) == CTL_OK, "add %s", names[i]);
    CHECK(ctl_gguf_writer_add_tensor(w, "q4", CTL_GGML_Q4_0, 2, ne, x) == CTL_ERR_UNSUPPORTED, "q4_0 is not written");
    int64_t bad_ne[2] = {30, 2};
    CHECK(ctl_gguf_writer_add_tensor(w, "odd", CTL_GGML_Q8_0, 2, bad_ne, x) == CTL_ERR_INVALID, "q8_0 rows of 30");
    CHECK(ctl_gguf_writer_save(w, "build/encode.gguf") == CTL_OK, "save: %s", ctl_last_error(ctx));
    ctl_gguf_writer_free(w);
    if (ctl_gguf_open(ctx, "build/encode.gguf", &b) == CTL_OK) {
        float y[192];
        for (int i = 0; i < 4; i++) {
            ctl_gguf_read_f32(b, ctl_gguf_find_tensor(b, names[i]), y);
            int bad = 0;
            for (int j = 0; j < 192; j++) {
                float amax = 0.0f;
                for (int k = j / 32 * 32; k < j / 32 * 32 + 32; k++) amax = fmaxf(amax, fabsf(x[k]));
                double tol = i == 0 ? 0.0 : i == 1 ? fabs(x[j]) / 2048 + 3e-8 : i == 2 ? fabs(x[j]) / 256 : amax / 127 * (0.5 + 127.0 / 2048 + 1e-3);   // d itself is rounded to f16
                bad += fabs((double)y[j] - x[j]) > tol;
            }
            CHECK(bad == 0, "%s: %d values off by more than the format's rounding", names[i], bad);
        }
        ctl_gguf_close(b);
    }
    free(x);
    ctl_ctx_free(ctx);
}

// Encodings against gguf-py (numpy's float16, gguf.quants.quantize for BF16 and Q8_0), bit for
// bit, on halfway points, subnormals, overflow and an all-zero block.
static void test_encode_vs_gguf_py(void) {
    fixture fx;
    if (!fx_load("gguf/encode_ref.bin", &fx)) {
        CHECK(false, "cannot read gguf/encode_ref.bin");
        return;
    }
    const float *x = fx_f(&fx, "input");
    const int32_t *f16 = (const int32_t *)fx_get(&fx, "f16_bits")->data, *bf16 = (const int32_t *)fx_get(&fx, "bf16_bits")->data;
    const int32_t *q8 = (const int32_t *)fx_get(&fx, "q8_0_bytes")->data;
    int bad16 = 0, badbf = 0, badq = 0;
    for (int i = 0; i < 256; i++) bad16 += ctl_f32_to_f16(x[i]) != f16[i], badbf += ctl_f32_to_bf16(x[i]) != bf16[i];
    unsigned char q[272];
    ctl__quantize_q8_0(x, q, 256);
    for (int i = 0; i < 272; i++) badq += q[i] != q8[i];
    CHECK(bad16 == 0 && badbf == 0 && badq == 0, "differences from gguf-py: f16 %d, bf16 %d, q8_0 bytes %d", bad16, badbf, badq);
    fx_free(&fx);
}

// A model built from the transformers fixtures (Hugging Face layout), saved as GGUF (q/k rows
// reordered for llama's adjacent RoPE, gpt2's q/k/v fused), loaded back: the same log-probs as
// transformers.
static void test_model_gguf(void) {
    static const char *const files[] = {"gpt2_tiny.bin", "llama_tiny.bin", "llama_tied_tiny.bin"};
    for (int f = 0; f < 3; f++) {
        fixture fx;
        if (!fx_load(files[f], &fx)) {
            CHECK(false, "cannot read %s", files[f]);
            continue;
        }
        ctl_ctx *ctx = make_ctx(2, CTL_SIMD_AUTO);
        ctl_model *m = fx_model(ctx, &fx, CTL_ROPE_HALVES), *back = NULL;
        if (f == 0) {   // the separate-q/k/v variant of gpt2 must save fused
            ctl_model_config c = *ctl_model_cfg(m);
            ctl_model *sep;
            c.separate_qkv = true;
            ctl_model_create(ctx, &c, &sep);
            memcpy(ctl_model_param(sep, 0)->value.data, ctl_model_param(m, 0)->value.data, ctl_model_numel(m) * sizeof(float));
            ctl_model_free(m);
            m = sep;
        }
        CHECK(ctl_model_save_gguf(m, "build/model.gguf", CTL_GGML_F32) == CTL_OK, "%s: save: %s", files[f], ctl_last_error(ctx));
        CHECK(ctl_model_load_gguf(ctx, "build/model.gguf", NULL, &back) == CTL_OK, "%s: load: %s", files[f], ctl_last_error(ctx));
        if (back) {
            const ctl_model_config *c = ctl_model_cfg(back), *o = ctl_model_cfg(m);
            CHECK(c->arch == o->arch && c->n_embd == o->n_embd && c->n_head == o->n_head && c->n_kv_head == o->n_kv_head &&
                  c->n_ff == o->n_ff && c->vocab_size == o->vocab_size && c->tied_embeddings == o->tied_embeddings &&
                  c->norm_eps == o->norm_eps && (c->arch == CTL_ARCH_GPT2 || c->rope_layout == CTL_ROPE_ADJACENT),
                  "%s: config read back", files[f]);
            ctl_batch b = fx_batch(&fx);
            ctl_train_desc d = fx_desc(&fx, &b);
            ctl_train *t;
            ctl_train_init(back, &d, &t);
            fwd_loss(ctx, t, &b);
            double e = rel_err_ff(ctl_train_logprobs(t), fx_f(&fx, "logp"), b.B * b.T);
            CHECK(e < 1e-5, "%s: through GGUF, log-probs vs transformers: rel err %g", files[f], e);
            printf("    %-20s saved, loaded: log-probs vs transformers rel err %.1e\n", files[f], e);
            ctl_train_free(t);
        }
        // Missing tensors and keys are named.
        ctl_gguf *g;
        if (ctl_gguf_open(ctx, "build/model.gguf", &g) == CTL_OK) {
            ctl_model *none = NULL;
            ctl_gguf_tensor *t0 = (ctl_gguf_tensor *)ctl_gguf_find_tensor(g, "output_norm.weight");
            t0->name[0] = 'X';
            CHECK(ctl_model_from_gguf(ctx, g, NULL, &none) == CTL_ERR_NOT_FOUND && !none && strstr(ctl_last_error(ctx), "'output_norm.weight'"),
                  "missing tensor: %s", ctl_last_error(ctx));
            t0->name[0] = 'o';
            ctl_gguf_kv *kv = (ctl_gguf_kv *)ctl_gguf_find_kv(g, f ? "llama.block_count" : "gpt2.block_count");
            ((char *)kv->key)[0] = 'X';
            CHECK(ctl_model_from_gguf(ctx, g, NULL, &none) == CTL_ERR_NOT_FOUND && strstr(ctl_last_error(ctx), "block_count"),
                  "missing key: %s", ctl_last_error(ctx));
            ctl_gguf_close(g);
        }
        ctl_model_free(m), ctl_model_free(back);
        ctl_ctx_free(ctx);
        fx_free(&fx);
    }
}

// ---- safetensors -------------------------------------------------------------------------------

// A file from safetensors.torch.save_file (every float dtype, a scalar, an empty tensor, a dtype
// cotlab does not convert, escaped metadata), and broken headers made here.
static void test_safetensors_files(void) {
    ctl_ctx *ctx = make_ctx(1, CTL_SIMD_AUTO);
    ctl_safetensors *st = NULL;
    fixture fx;
    CHECK(fx_load("st/sample_ref.bin", &fx), "cannot read st/sample_ref.bin");
    CHECK(ctl_safetensors_open(ctx, FIXTURE_DIR "st/sample.safetensors", &st) == CTL_OK, "open: %s", ctl_last_error(ctx));
    if (st) {
        CHECK(ctl_safetensors_tensor_count(st) == 6, "6 tensors, not %d", (int)ctl_safetensors_tensor_count(st));
        const char *note = ctl_safetensors_find_meta(st, "note");
        CHECK(note && !strcmp(note, "say \"hi\" \xe2\x9c\x93") && !strcmp(ctl_safetensors_find_meta(st, "format"), "pt"), "metadata");
        for (const char *n = "abcef"; *n; n++) {
            char name[2] = {*n, 0}, key[16];
            snprintf(key, sizeof key, "val/%c", *n);
            const ctl_safetensors_tensor *t = ctl_safetensors_find_tensor(st, name);
            fx_rec *want = fx_get(&fx, key);
            float out[8] = {0};
            CHECK(t && want && ctl_safetensors_read_f32(st, t, out) == CTL_OK && !memcmp(out, want->data, (size_t)want->numel * 4),
                  "tensor %s", name);
        }
        const ctl_safetensors_tensor *d = ctl_safetensors_find_tensor(st, "d"), *e = ctl_safetensors_find_tensor(st, "e");
        float out[2];
        CHECK(d && !strcmp(d->dtype_name, "I64") && ctl_safetensors_read_f32(st, d, out) == CTL_ERR_UNSUPPORTED, "I64 is listed, not read");
        CHECK(e && e->ndim == 0, "scalar has rank 0");
        // read -> write (every dtype, bytes as they are) -> read: the same tensors and metadata
        ctl_safetensors_writer *w = NULL;
        ctl_safetensors *back = NULL;
        const char *key, *value, *out_path = "build/roundtrip.safetensors";
        ctl_status res = ctl_safetensors_writer_init(ctx, &w);
        for (int64_t i = 0; !res && i < ctl_safetensors_meta_count(st); i++)
            ctl_safetensors_meta_at(st, i, &key, &value), res = ctl_safetensors_writer_set_str(w, key, value);
        for (int64_t i = 0; !res && i < ctl_safetensors_tensor_count(st); i++) {
            const ctl_safetensors_tensor *t = ctl_safetensors_tensor_at(st, i);
            res = ctl_safetensors_writer_add_raw(w, t->name, t->dtype_name, t->ndim, t->shape, t->data);
        }
        if (!res) res = ctl_safetensors_writer_save(w, out_path);
        ctl_safetensors_writer_free(w);
        CHECK(!res && ctl_safetensors_open(ctx, out_path, &back) == CTL_OK, "round trip: %s", ctl_last_error(ctx));
        int same = 0;
        for (int64_t i = 0; back && i < ctl_safetensors_tensor_count(st); i++) {
            const ctl_safetensors_tensor *a = ctl_safetensors_tensor_at(st, i), *b = ctl_safetensors_find_tensor(back, a->name);
            same += b && !strcmp(a->dtype_name, b->dtype_name) && a->ndim == b->ndim && !memcmp(a->shape, b->shape, sizeof a->shape) &&
                    a->end - a->begin == b->end - b->begin && !memcmp(a->data, b->data, (size_t)(a->end - a->begin));
        }
        bool meta_same = back && ctl_safetensors_meta_count(back) == ctl_safetensors_meta_count(st);
        for (int64_t i = 0; meta_same && i < ctl_safetensors_meta_count(st); i++) {
            ctl_safetensors_meta_at(st, i, &key, &value);
            meta_same = ctl_safetensors_find_meta(back, key) && !strcmp(ctl_safetensors_find_meta(back, key), value);
        }
        CHECK(back && ctl_safetensors_tensor_count(back) == ctl_safetensors_tensor_count(st) && same == ctl_safetensors_tensor_count(st) && meta_same,
              "round trip: %d of %d tensors identical (F32, F16, BF16, I64 ...), metadata %s", same, (int)ctl_safetensors_tensor_count(st),
              meta_same ? "identical" : "differs");
        const int64_t four = 4, three = 3;
        CHECK(ctl_safetensors_writer_init(ctx, &w) == CTL_OK && ctl_safetensors_writer_add_raw(w, "x", "Q4", 1, &four, "abcd") == CTL_ERR_INVALID &&
              ctl_safetensors_writer_add_raw(w, "y", "F4", 1, &three, "ab") == CTL_ERR_INVALID, "unknown dtype, half a byte refused");
        const int64_t huge[2] = {(int64_t)1 << 30, (int64_t)1 << 30};   // 2^60 F64 values: 2^66 bits, past size_t
        CHECK(ctl_safetensors_writer_add_raw(w, "z", "F64", 2, huge, "") == CTL_ERR_INVALID && strstr(ctl_last_error(ctx), "bad shape"),
              "a size past size_t refused: %s", ctl_last_error(ctx));
        ctl_safetensors_writer_free(w);
        ctl_safetensors_close(back);
        ctl_safetensors_close(st);
    }
    fx_free(&fx);

    static const struct { const char *json; const char *says; } bad[] = {
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,4]}}", "do not fit its shape"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,8]}}", "expected 0"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,8]}}", "appears twice"},
        {"{\"a\":{\"dtype\":\"Q4\",\"shape\":[1],\"data_offsets\":[0,4]}}", "unknown dtype"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4],\"x\":1}}", "unknown field"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[99999999999999999999],\"data_offsets\":[0,4]}}", "too large"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}", "expected '}'"},
        {"[]", "expected '{'"},
        {"{\"a\\q\":1}", "bad escape"},
        {"{}", "cover 0 of the 8 data bytes"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        unsigned char buf[512];
        uint64_t n = strlen(bad[i].json);
        memcpy(buf, &n, 8);
        memcpy(buf + 8, bad[i].json, n);
        memset(buf + 8 + n, 0, 8);   // 8 data bytes
        CHECK(ctl_safetensors_open_memory(ctx, buf, 8 + n + 8, &st) == CTL_ERR_FORMAT && !st && strstr(ctl_last_error(ctx), bad[i].says),
              "bad header %zu: %s", i, ctl_last_error(ctx));
    }
    unsigned char tiny[12] = {200, 0, 0, 0, 0, 0, 0, 0, '{', '}', ' ', ' '};
    CHECK(ctl_safetensors_open_memory(ctx, tiny, 12, &st) == CTL_ERR_FORMAT && strstr(ctl_last_error(ctx), "header length 200"),
          "header past the end: %s", ctl_last_error(ctx));
    ctl_ctx_free(ctx);
}

// Hugging Face's own files (save_pretrained) load into models of both RoPE layouts and give
// the transformers log-probs; our writer's files load back to the same weights.
static void test_model_safetensors(void) {
    static const char *const kinds[] = {"gpt2", "llama", "llama_tied"};
    for (int k = 0; k < 3; k++) {
        char file[64], st_path[256];
        snprintf(file, sizeof file, "%s_tiny.bin", kinds[k]);
        snprintf(st_path, sizeof st_path, "%sst/%s_hf/model.safetensors", FIXTURE_DIR, kinds[k]);
        fixture fx;
        if (!fx_load(file, &fx)) continue;
        for (int layout = 0; layout < (k ? 2 : 1); layout++) {
            ctl_ctx *ctx = make_ctx(2, CTL_SIMD_AUTO);
            ctl_model *m = fx_model(ctx, &fx, layout ? CTL_ROPE_ADJACENT : CTL_ROPE_HALVES), *again;
            memset(ctl_model_param(m, 0)->value.data, 0, ctl_model_numel(m) * sizeof(float));
            CHECK(ctl_model_load_safetensors(m, st_path) == CTL_OK, "%s: load: %s", st_path, ctl_last_error(ctx));
            ctl_batch b = fx_batch(&fx);
            ctl_train_desc d = fx_desc(&fx, &b);
            ctl_train *t;
            ctl_train_init(m, &d, &t);
            fwd_loss(ctx, t, &b);
            double e = rel_err_ff(ctl_train_logprobs(t), fx_f(&fx, "logp"), b.B * b.T);
            CHECK(e < 1e-5, "%s (%s layout): log-probs vs transformers: rel err %g", kinds[k], layout ? "adjacent" : "halves", e);
            printf("    %-10s %-8s HF file loaded: log-probs vs transformers rel err %.1e\n", kinds[k], layout ? "adjacent" : "halves", e);
            ctl_train_free(t);
            CHECK(ctl_model_save_safetensors(m, "build/model.safetensors", CTL_SAFETENSORS_F32) == CTL_OK, "save: %s", ctl_last_error(ctx));
            ctl_model_create(ctx, ctl_model_cfg(m), &again);
            CHECK(ctl_model_load_safetensors(again, "build/model.safetensors") == CTL_OK, "reload: %s", ctl_last_error(ctx));
            CHECK(!memcmp(ctl_model_param(again, 0)->value.data, ctl_model_param(m, 0)->value.data, ctl_model_numel(m) * 4),
                  "%s: weights after save and load", kinds[k]);
            ctl_model_free(again);
            ctl_model_free(m);
            ctl_ctx_free(ctx);
        }
        fx_free(&fx);
    }
}

// ---- whole model -----------------------------------------------------------------------------

static ctl_model_config tiny_config(ctl_arch arch) {
    ctl_model_config c;
    memset(&c, 0, sizeof c);
    c.arch = arch, c.vocab_size = 23, c.n_ctx = 12, c.n_embd = 16, c.n_layer = 2, c.n_head = 4;
    c.n_kv_head = arch == CTL_ARCH_LLAMA ? 2 : 0;
    c.n_ff = arch == CTL_ARCH_LLAMA ? 24 : 0;
    return c;
}

static void make_batch(int64_t B, int64_t T, int64_t V, int32_t *tok, int32_t *tgt, float *w, uint64_t seed) {
    ctl_rng r;
    ctl_rng_seed(&r, seed);
    for (int64_t i = 0; i < B * T; i++) {
        tok[i] = (int32_t)(ctl_rng_next(&r) % (uint64_t)V);
        tgt[i] = (int32_t)(ctl_rng_next(&r) % (uint64_t)V);
        if (w) w[i] = i % T < 2 ? 0.0f : 1.0f;
    }
}

static void scale_weights(ctl_model *m, float s) {   // larger weights: larger, clearer gradients
    for (int64_t i = 0; i < ctl_model_param_count(m); i++) {
        ctl_param *p = ctl_model_param(m, i);
        if (strstr(p->name, "norm")) continue;
        for (int64_t j = 0; j < ctl_tensor_numel(&p->value); j++) ((float *)p->value.data)[j] *= s;
    }
}

// Directional derivatives, one tensor at a time: along d (a unit vector inside one tensor,
// half along its gradient and half random), (L(theta + h d) - L(theta - h d)) / 2h must equal
// g . d. In fp32 this is limited by rounding in L, so the bound is looser than the fixtures'
// (which check every gradient against torch at 1e-4).
// The loss of a forward at the trainer's current step and micro-batch 0, so that dropout masks
// are those the gradient was taken with.
static float fwd_loss_fixed(ctl_ctx *ctx, ctl_train *t, const ctl_batch *b) {
    t->n_micro = 0;
    return fwd_loss(ctx, t, b);
}

// The check for parameter i, whose gradient the trainer holds (from a forward and backward at
// micro-batch 0). Returns the relative error, or -1 where the derivative is below what fp32
// differences resolve (then only the absolute bound is checked).
static double directional_check(ctl_ctx *ctx, ctl_model *m, ctl_train *t, const ctl_batch *b, int64_t i, float h,
                                const char *label) {
    ctl_param *p = ctl_model_param(m, i);
    int64_t n = ctl_tensor_numel(&p->value);
    float *x = (float *)p->value.data, *g = ctl_train_grad(t, i), *dir = rand_f(n, 1.0f), *keep = (float *)malloc(n * 4);
    double gn = 0.0, rn = 0.0, dn = 0.0, gd = 0.0, L[4];
    for (int64_t j = 0; j < n; j++) gn += (double)g[j] * g[j], rn += (double)dir[j] * dir[j];
    for (int64_t j = 0; j < n; j++) dir[j] = (float)((gn > 0 ? g[j] / sqrt(gn) : 0.0) + dir[j] / sqrt(rn)), dn += (double)dir[j] * dir[j];
    for (int64_t j = 0; j < n; j++) dir[j] = (float)(dir[j] / sqrt(dn)), gd += (double)g[j] * dir[j];
    memcpy(keep, x, n * 4);
    for (int side = 0; side < 4; side++) {   // +h, -h, +h/2, -h/2
        float step = (side & 1 ? -h : h) / (side < 2 ? 1.0f : 2.0f);
        for (int64_t j = 0; j < n; j++) x[j] = keep[j] + step * dir[j];
        L[side] = fwd_loss_fixed(ctx, t, b);
    }
    memcpy(x, keep, n * 4);
    // Central differences at h and h/2, extrapolated (Richardson) so the h^2 curvature term
    // cancels. fp32 rounding of L (a few ulp) divided by the steps bounds what the differences
    // can resolve: the key bias, whose true gradient is 0 (softmax ignores it), sits there.
    double fd1 = (L[0] - L[1]) / (2.0 * h), fd2 = (L[2] - L[3]) / h, fd = (4.0 * fd2 - fd1) / 3.0;
    double noise = 4.0 * 1.2e-7 * fabs(L[0]) / h * 3.0;
    double e = fabs(fd - gd) / fabs(gd);
    CHECK(fabs(fd - gd) <= 2e-3 * fabs(gd) + noise, "%s %s: directional derivative %g, finite differences %g (rel err %g)",
          label, p->name, gd, fd, e);
    free(dir), free(keep);
    return fabs(gd) > 10.0 * noise ? e : -1.0;
}

static void test_model_gradcheck(void) {
    for (int arch = 0; arch < 2; arch++) {
        ctl_ctx *ctx = make_ctx(2, CTL_SIMD_AUTO);
        ctl_model_config cfg = tiny_config(arch ? CTL_ARCH_LLAMA : CTL_ARCH_GPT2);
        cfg.separate_qkv = true;   // the gpt2 variant with attn_q/k/v tensors
        ctl_model *m;
        ctl_train *t;
        CHECK(ctl_model_create(ctx, &cfg, &m) == CTL_OK, "create: %s", ctl_last_error(ctx));
        ctl_model_init_random(m, 11);
        scale_weights(m, 10.0f);
        int32_t tok[2 * 9], tgt[2 * 9];
        float w[2 * 9];
        make_batch(2, 9, cfg.vocab_size, tok, tgt, w, 5);
        ctl_batch b = {2, 9, tok, tgt, w};
        ctl_train_desc d;
        memset(&d, 0, sizeof d);
        d.batch = 2, d.seq_len = 9, d.lm_head_chunk = 4;
        CHECK(ctl_train_init(m, &d, &t) == CTL_OK, "train_init: %s", ctl_last_error(ctx));
        fwd_loss(ctx, t, &b);
        ctl_train_backward(t);
        double worst = 0.0;
        for (int64_t i = 0; i < ctl_model_param_count(m); i++)
            worst = fmax(worst, directional_check(ctx, m, t, &b, i, 1e-2f, arch ? "llama" : "gpt2"));
        printf("    %s: worst rel err over %d tensors %.2e\n", arch ? "llama" : "gpt2", (int)ctl_model_param_count(m), worst);
        ctl_train_free(t);
        ctl_model_free(m);
        ctl_ctx_free(ctx);
    }
}

// Three steps of training; returns the losses and leaves the weights in the model.
static void run_steps(ctl_ctx *ctx, ctl_model *m, int steps, int micro, float *losses) {
    ctl_train_desc d;
    ctl_train *t;
    memset(&d, 0, sizeof d);
    d.batch = 3, d.seq_len = 11, d.lm_head_chunk = 7;
    d.optim.lr = 1e-2f, d.optim.weight_decay = 0.1f, d.optim.clip = 0.5f, d.optim.warmup = 1, d.optim.total_steps = 5;
    if (ctl_train_init(m, &d, &t) != CTL_OK) {
        CHECK(false, "train_init: %s", ctl_last_error(ctx));
        return;
    }
    int32_t tok[3 * 11], tgt[3 * 11];
    float w[3 * 11];
    for (int s = 0; s < steps; s++) {
        losses[s] = 0.0f;
        for (int k = 0; k < micro; k++) {
            make_batch(3, 11, ctl_model_cfg(m)->vocab_size, tok, tgt, w, 100 + k);   // the same data each step
            ctl_batch b = {3, 11, tok, tgt, w};
            losses[s] += fwd_loss(ctx, t, &b) / micro;
            ctl_train_backward(t);
        }
        ctl_train_step(t, NULL);
    }
    ctl_train_free(t);
}

static void test_determinism(void) {
    for (int arch = 0; arch < 2; arch++) {
        ctl_model_config cfg = tiny_config(arch ? CTL_ARCH_LLAMA : CTL_ARCH_GPT2);
        cfg.n_embd = 48, cfg.n_ff = 200, cfg.vocab_size = 300;   // wide enough for several GEMM tiles
        float losses[3][4];
        float *weights[3] = {NULL, NULL, NULL};
        int64_t numel = 0;
        for (int th = 1; th <= 3; th++) {
            ctl_ctx *ctx = make_ctx(th, CTL_SIMD_AUTO);
            ctl_model *m;
            ctl_model_create(ctx, &cfg, &m);
            ctl_model_init_random(m, 3);
            run_steps(ctx, m, 4, 2, losses[th - 1]);
            numel = ctl_model_numel(m);
            weights[th - 1] = (float *)malloc(numel * sizeof(float));
            memcpy(weights[th - 1], ctl_model_param(m, 0)->value.data, numel * sizeof(float));
            ctl_model_free(m);
            ctl_ctx_free(ctx);
        }
        for (int th = 2; th <= 3; th++) {
            CHECK(!memcmp(losses[0], losses[th - 1], sizeof losses[0]), "%s: losses differ between 1 and %d threads",
                  arch ? "llama" : "gpt2", th);
            CHECK(!memcmp(weights[0], weights[th - 1], numel * sizeof(float)), "%s: weights differ between 1 and %d threads",
                  arch ? "llama" : "gpt2", th);
        }
        CHECK(losses[0][3] < losses[0][0], "training lowers the loss: %g -> %g", losses[0][0], losses[0][3]);
        for (int i = 0; i < 3; i++) free(weights[i]);
    }
}

static void test_memory_plan(void) {
    ctl_ctx *ctx = make_ctx(1, CTL_SIMD_AUTO);
    for (int arch = 0; arch < 2; arch++) {
        ctl_model_config cfg = tiny_config(arch ? CTL_ARCH_LLAMA : CTL_ARCH_GPT2);
        ctl_train_desc d;
        memset(&d, 0, sizeof d);
        d.batch = 4, d.seq_len = 10;
        ctl_memory_plan plan, got;
        CHECK(ctl_train_plan(ctx, &cfg, &d, &plan) == CTL_OK, "plan: %s", ctl_last_error(ctx));
        ctl_model *m;
        ctl_train *t;
        ctl_model_create(ctx, &cfg, &m);
        ctl_train_init(m, &d, &t);
        ctl_train_memory(t, &got);
        CHECK(!memcmp(&plan, &got, sizeof plan), "plan and trainer disagree");
        CHECK(plan.weights == (size_t)ctl_model_numel(m) * 4, "weights bytes");
        CHECK(plan.grads >= plan.weights && plan.grads < plan.weights + 64 * 64, "one gradient per weight");
        CHECK(plan.optim == 2 * plan.grads, "two AdamW moments per gradient");
        CHECK(plan.total == plan.weights + plan.grads + plan.optim + plan.activations + plan.scratch, "total");
        CHECK(t->arena.used == plan.total - plan.weights && t->arena.used == t->arena.size, "arena holds exactly the plan");
        ctl_train_free(t);
        // Freezing halves of the model: no gradient or optimiser memory for them.
        for (int64_t i = 0; i < ctl_model_param_count(m); i++)
            ctl_model_param(m, i)->trainable = strstr(ctl_model_param(m, i)->name, "blk.1.") != NULL;
        ctl_train_init(m, &d, &t);
        ctl_train_memory(t, &got);
        CHECK(got.grads < plan.grads / 2 && got.optim == 2 * got.grads, "frozen parameters take no gradient memory");
        ctl_train_free(t);
        ctl_model_free(m);
    }
    ctl_ctx_free(ctx);
}

static void test_frozen(void) {
    ctl_ctx *ctx = make_ctx(2, CTL_SIMD_AUTO);
    ctl_model_config cfg = tiny_config(CTL_ARCH_LLAMA);
    ctl_model *m, *ref;
    ctl_model_create(ctx, &cfg, &m);
    ctl_model_create(ctx, &cfg, &ref);
    ctl_model_init_random(m, 9);
    ctl_model_init_random(ref, 9);
    int64_t np = ctl_model_param_count(m);
    for (int64_t i = 0; i < np; i++) {   // freeze all attention and the first block's MLP
        const char *nm = ctl_model_param(m, i)->name;
        ctl_model_param(m, i)->trainable = !strstr(nm, "attn_") && !strstr(nm, "blk.0.ffn");
        ctl_model_param(ref, i)->trainable = true;
    }
    float l1[3], l2[3];
    run_steps(ctx, m, 3, 1, l1);
    run_steps(ctx, ref, 3, 1, l2);
    for (int64_t i = 0; i < np; i++) {
        ctl_param *p = ctl_model_param(m, i), *q = ctl_model_param(ref, i);
        ctl_model *fresh;
        ctl_model_create(ctx, &cfg, &fresh);
        ctl_model_init_random(fresh, 9);
        bool same = !memcmp(p->value.data, ctl_model_param(fresh, i)->value.data, ctl_tensor_numel(&p->value) * 4);
        CHECK(same == !p->trainable, "%s: %s", p->name, p->trainable ? "trainable but unchanged" : "frozen but changed");
        CHECK(memcmp(q->value.data, ctl_model_param(fresh, i)->value.data, ctl_tensor_numel(&p->value) * 4), "%s unchanged",
              q->name);
        ctl_model_free(fresh);
    }
    CHECK(l1[0] == l2[0], "freezing must not change the first forward");
    ctl_model_free(m);
    ctl_model_free(ref);
    ctl_ctx_free(ctx);
}

// Two micro-batches with different token counts, each with the SFT objective told the step's
// token count, sum to the gradient of the batch that holds both (TRL's token mean over the
// optimiser step); their losses sum to its loss.
static void test_grad_accumulation(void) {
    ctl_ctx *ctx = make_ctx(2, CTL_SIMD_AUTO);
    ctl_model_config cfg = tiny_config(CTL_ARCH_GPT2);
    ctl_model *m;
    ctl_model_create(ctx, &cfg, &m);
    ctl_model_init_random(m, 4);
    int32_t tok[4 * 8], tgt[4 * 8];
    float w[4 * 8];
    make_batch(4, 8, cfg.vocab_size, tok, tgt, w, 77);
    for (int i = 16; i < 24; i++) w[i] = i < 21 ? 0.0f : 1.0f;   // the second half has fewer tokens
    double n_all = 0.0;
    for (int i = 0; i < 32; i++) n_all += w[i];
    ctl_train_desc d;
    memset(&d, 0, sizeof d);
    d.batch = 4, d.seq_len = 8;
    ctl_train *big, *small;
    ctl_train_init(m, &d, &big);
    d.batch = 2;
    ctl_train_init(m, &d, &small);
    ctl_batch all = {4, 8, tok, tgt, w}, h[2] = {{2, 8, tok, tgt, w}, {2, 8, tok + 16, tgt + 16, w + 16}};
    ctl_objective_out out;
    ctl_sft_desc sd;
    memset(&sd, 0, sizeof sd);
    ctl_logprobs in = {4, 8, NULL, w, NULL, NULL, NULL};
    ctl_train_forward(big, &all);
    in.logp = ctl_train_logprobs(big), out.dlogp = ctl_train_dlogprobs(big);
    CHECK(ctl_objective_sft(ctx, &in, &sd, &out) == CTL_OK, "sft: %s", ctl_last_error(ctx));
    double big_loss = out.loss, sum_loss = 0.0;
    ctl_train_backward(big);
    sd.accum = 2, sd.step_tokens = n_all;
    for (int k = 0; k < 2; k++) {
        ctl_train_forward(small, &h[k]);
        ctl_logprobs hi = {2, 8, ctl_train_logprobs(small), h[k].weights, NULL, NULL, NULL};
        out.dlogp = ctl_train_dlogprobs(small);
        CHECK(ctl_objective_sft(ctx, &hi, &sd, &out) == CTL_OK, "sft: %s", ctl_last_error(ctx));
        sum_loss += out.loss;
        ctl_train_backward(small);
    }
    CHECK(fabs(sum_loss - big_loss) < 1e-6 * fabs(big_loss), "losses: %g + ... = %g vs %g", sum_loss, sum_loss, big_loss);
    double worst = 0.0;
    for (int64_t i = 0; i < ctl_model_param_count(m); i++)
        worst = fmax(worst, rel_err_ff(ctl_train_grad(small, i), ctl_train_grad(big, i), ctl_tensor_numel(&ctl_model_param(m, i)->value)));
    CHECK(worst < 1e-5, "accumulated half batches vs one batch: rel err %g", worst);
    ctl_step_stats s1, s2;
    ctl_train_step(big, &s1);
    ctl_train_step(small, &s2);
    CHECK(fabsf(s1.grad_norm - s2.grad_norm) < 1e-5f * s1.grad_norm, "grad norms %g vs %g", s1.grad_norm, s2.grad_norm);
    ctl_train_free(big), ctl_train_free(small);
    ctl_model_free(m);
    ctl_ctx_free(ctx);
}

// ---- generation ------------------------------------------------------------------------------

// The KV-cache forward against the training forward: the logits after every prefix agree, for
// a prompt fed at once and tokens stepped one by one; a batched step equals separate ones bit
// for bit (every row is computed independently).
static void test_infer_consistency(void) {
    for (int arch = 0; arch < 2; arch++) {
        ctl_ctx *ctx = make_ctx(2, CTL_SIMD_AUTO);
        ctl_model_config cfg = tiny_config(arch ? CTL_ARCH_LLAMA : CTL_ARCH_GPT2);
        ctl_model *m;
        ctl_model_create(ctx, &cfg, &m);
        ctl_model_init_random(m, 21);
        scale_weights(m, 10.0f);
        enum { T = 11 };
        int32_t tok[T], tgt[T];
        make_batch(1, T, cfg.vocab_size, tok, tgt, NULL, 8);
        ctl_train_desc d;
        memset(&d, 0, sizeof d);
        d.batch = 1, d.seq_len = T;
        ctl_train *t;
        ctl_train_init(m, &d, &t);
        ctl_batch b = {1, T, tok, tgt, NULL};
        ctl_train_forward(t, &b);
        ctl_infer *f;
        ctl_infer_desc id = {3, 12};
        CHECK(ctl_infer_init(m, &id, &f) == CTL_OK, "infer_init: %s", ctl_last_error(ctx));
        int64_t V = cfg.vocab_size;
        float *want = zeros_f(V), *got = zeros_f(3 * V), *one = zeros_f(V);
        double worst = 0.0;
        CHECK(ctl_infer_feed(f, 0, tok, 4, got) == CTL_OK, "feed");
        ctl_train_logits(t, 0, 3, want);
        worst = fmax(worst, rel_err_ff(got, want, V));
        for (int p = 4; p < T; p++) {
            CHECK(ctl_infer_feed(f, 0, tok + p, 1, got) == CTL_OK, "feed one");
            ctl_train_logits(t, 0, p, want);
            worst = fmax(worst, rel_err_ff(got, want, V));
        }
        CHECK(worst < 1e-5, "%s: KV-cache logits vs full forward: rel err %g", arch ? "llama" : "gpt2", worst);
        printf("    %s: KV-cache logits vs the training forward, 11 positions: worst rel err %.1e\n", arch ? "llama" : "gpt2", worst);
        // Sequences 1 and 2 (different lengths), stepped together, against sequence 0 alone.
        ctl_infer_reset(f, -1);
        ctl_infer_feed(f, 1, tok, 5, NULL);
        ctl_infer_feed(f, 2, tok + 2, 2, NULL);
        int64_t seqs[2] = {1, 2};
        int32_t next[2] = {tok[5], tok[4]};
        CHECK(ctl_infer_step(f, 2, seqs, next, got) == CTL_OK, "step: %s", ctl_last_error(ctx));
        ctl_infer_feed(f, 0, tok, 6, one);
        CHECK(!memcmp(one, got, V * sizeof(float)), "batched step differs from a lone sequence (row 0)");
        ctl_infer_reset(f, 0);
        ctl_infer_feed(f, 0, tok + 2, 3, one);
        CHECK(!memcmp(one, got + V, V * sizeof(float)), "batched step differs from a lone sequence (row 1)");
        // Bad input.
        CHECK(ctl_infer_feed(f, 3, tok, 1, NULL) == CTL_ERR_INVALID, "sequence 3 of 3");
        CHECK(ctl_infer_feed(f, 0, tok, 10, NULL) == CTL_ERR_CAPACITY && strstr(ctl_last_error(ctx), "max_len 12"), "cache full: %s",
              ctl_last_error(ctx));
        int32_t badtok = (int32_t)V;
        CHECK(ctl_infer_feed(f, 0, &badtok, 1, NULL) == CTL_ERR_RANGE, "token out of range");
        int64_t twice[2] = {1, 1};
        CHECK(ctl_infer_step(f, 2, twice, next, NULL) == CTL_ERR_INVALID, "a sequence twice in one step");
        free(want), free(got), free(one);
        ctl_infer_free(f);
        ctl_train_free(t);
        ctl_model_free(m);
        ctl_ctx_free(ctx);
    }
}

// The generation engine: G samples of each prompt sharing its prompt's keys and values give the
// tokens of ctl_generate with the prompt repeated G times (sampled, with every filter and a
// repetition penalty), on 1 and 3 threads and for every vector path; a step's rows have the
// logits they have stepped alone; with fewer sequences than streams (continuous batching),
// greedy streams give the tokens each prompt gives alone.
static void test_generate_engine(void) {
    static const ctl_simd paths[3] = {CTL_SIMD_AUTO, CTL_SIMD_AVX2, CTL_SIMD_SCALAR};
    enum { P = 7, G = 3, NEW = 14, CTX = 32 };
    int32_t prompts[P][12];
    int64_t lens[P];
    const int32_t *pp[P], *rep[P * G];
    int64_t rl[P * G];
    for (int p = 0; p < P; p++) {
        lens[p] = 3 + (p * 5) % 10, pp[p] = prompts[p];
        for (int k = 0; k < lens[p]; k++) prompts[p][k] = (int32_t)((p * 7 + k * 3) % 23);
        for (int g = 0; g < G; g++) rep[p * G + g] = prompts[p], rl[p * G + g] = lens[p];
    }
    int32_t stop = 5;
    int checked = 0;
    for (int arch = 0; arch < 2; arch++)
        for (int path = 0; path < 3; path++) {
            ctl_ctx *ctx = path == 1 ? try_ctx(2, paths[path]) : make_ctx(path == 2 ? 1 : 3, paths[path]);
            if (!ctx) continue;
            ctl_model_config cfg = tiny_config(arch ? CTL_ARCH_LLAMA : CTL_ARCH_GPT2);
            cfg.n_ctx = CTX;
            ctl_model *m;
            ctl_model_create(ctx, &cfg, &m);
            ctl_model_init_random(m, 5);
            scale_weights(m, 6.0f);
            ctl_infer *big, *small;
            ctl_infer_desc bd = {P * G, CTX}, sdsc = {4, CTX};
            CHECK(ctl_infer_init(m, &bd, &big) == CTL_OK && ctl_infer_init(m, &sdsc, &small) == CTL_OK, "infer_init");
            ctl_sampler_desc sd;
            memset(&sd, 0, sizeof sd);
            sd.temperature = 0.9f, sd.top_k = 12, sd.top_p = 0.95f, sd.min_p = 0.02f, sd.repetition_penalty = 1.2f, sd.seed = 31;
            sd.stop_tokens = &stop, sd.n_stop_tokens = 1;
            int32_t a[P * G * NEW], b[P * G * NEW];
            int64_t al[P * G], bl[P * G];
            CHECK(ctl_generate(big, P * G, rep, rl, &sd, NEW, a, al, NULL, NULL) == CTL_OK, "generate: %s", ctl_last_error(ctx));
            CHECK(ctl_generate_groups(big, P, pp, lens, G, &sd, NEW, b, bl, NULL, NULL) == CTL_OK, "groups: %s", ctl_last_error(ctx));
            bool same = !memcmp(al, bl, sizeof al), stopped = false;
            for (int i = 0; same && i < P * G; i++) same = !memcmp(a + i * NEW, b + i * NEW, (size_t)al[i] * 4), stopped |= al[i] < NEW;
            CHECK(same && stopped, "%s %s: shared prompts sample other tokens than repeated ones", arch ? "llama" : "gpt2", ctl_ctx_simd_name(ctx));
            // Greedy: 4 sequences for 7 prompts x 2 samples (started as sequences free up) against each prompt alone.
            sd.temperature = 0.0f;
            int32_t one[NEW];
            int64_t ol;
            CHECK(ctl_generate_groups(small, P, pp, lens, 2, &sd, NEW, b, bl, NULL, NULL) == CTL_OK, "groups on 4: %s", ctl_last_error(ctx));
            for (int p = 0; p < P; p++) {
                ctl_generate(big, 1, pp + p, lens + p, &sd, NEW, one, &ol, NULL, NULL);
                for (int g = 0; g < 2; g++) same = same && bl[p * 2 + g] == ol && !memcmp(b + (p * 2 + g) * NEW, one, (size_t)ol * 4);
            }
            CHECK(same, "%s %s: greedy tokens depend on the streams decoded alongside", arch ? "llama" : "gpt2", ctl_ctx_simd_name(ctx));
            // One step of 13 sequences against each stepped alone: the same logits, bit for bit.
            int64_t V = cfg.vocab_size, seqs[13];
            int32_t toks[13];
            float *together = zeros_f(13 * V), *alone = zeros_f(V);
            ctl_infer_reset(big, -1);
            for (int i = 0; i < 13; i++) {
                seqs[i] = i, toks[i] = (int32_t)(i % V);
                ctl_infer_feed(big, i, prompts[i % P], lens[i % P], NULL);
            }
            CHECK(ctl_infer_step(big, 13, seqs, toks, together) == CTL_OK, "step of 13");
            for (int i = 0; i < 13; i++) {
                ctl_infer_reset(big, i);
                ctl_infer_feed(big, i, prompts[i % P], lens[i % P], NULL);
                ctl_infer_step(big, 1, seqs + i, toks + i, alone);
                same = same && !memcmp(alone, together + i * V, (size_t)V * 4);
            }
            CHECK(same, "%s %s: a row stepped with 12 others has other logits than alone", arch ? "llama" : "gpt2", ctl_ctx_simd_name(ctx));
            checked++;
            free(together), free(alone);
            ctl_infer_free(big), ctl_infer_free(small);
            ctl_model_free(m);
            ctl_ctx_free(ctx);
        }
    // The same samples on 1 and 3 threads.
    int32_t out[2][P * G * NEW];
    int64_t ol[2][P * G];
    for (int c = 0; c < 2; c++) {
        ctl_ctx *ctx = make_ctx(c ? 3 : 1, CTL_SIMD_AUTO);
        ctl_model_config cfg = tiny_config(CTL_ARCH_LLAMA);
        cfg.n_ctx = CTX;
        ctl_model *m;
        ctl_model_create(ctx, &cfg, &m);
        ctl_model_init_random(m, 5);
        ctl_infer *f;
        ctl_infer_desc d = {8, CTX};
        ctl_infer_init(m, &d, &f);
        ctl_sampler_desc sd;
        memset(&sd, 0, sizeof sd);
        sd.temperature = 1.0f, sd.seed = 3;
        memset(out[c], 0, sizeof out[c]);
        CHECK(ctl_generate_groups(f, P, pp, lens, G, &sd, NEW, out[c], ol[c], NULL, NULL) == CTL_OK, "groups: %s", ctl_last_error(ctx));
        ctl_infer_free(f), ctl_model_free(m), ctl_ctx_free(ctx);
    }
    CHECK(!memcmp(out[0], out[1], sizeof out[0]) && !memcmp(ol[0], ol[1], sizeof ol[0]), "1 and 3 threads sample differently");
    printf("    %d models and paths: shared prompts == repeated prompts; greedy with 4 sequences for 14 streams == alone; "
           "13-row steps == single steps, bit for bit\n", checked);
}

// Greedy generation from the Hugging Face files equals transformers' generate, token for token,
// for two prompts of different lengths decoded together.
static void test_generate_vs_transformers(void) {
    static const char *const kinds[] = {"gpt2", "llama", "llama_tied"};
    for (int k = 0; k < 3; k++) {
        char file[64], path[256];
        fixture fx, gen;
        snprintf(file, sizeof file, "%s_tiny.bin", kinds[k]);
        snprintf(path, sizeof path, "st/%s_gen.bin", kinds[k]);
        if (!fx_load(file, &fx) || !fx_load(path, &gen)) {
            CHECK(false, "cannot read %s or %s", file, path);
            continue;
        }
        ctl_ctx *ctx = make_ctx(2, CTL_SIMD_AUTO);
        ctl_model *m = fx_model(ctx, &fx, CTL_ROPE_HALVES);
        ctl_infer *f;
        ctl_infer_desc id = {2, 16};
        ctl_infer_init(m, &id, &f);
        fx_rec *p0 = fx_get(&gen, "prompt/0"), *p1 = fx_get(&gen, "prompt/1"), *g0 = fx_get(&gen, "greedy/0"), *g1 = fx_get(&gen, "greedy/1");
        const int32_t *prompts[2] = {(const int32_t *)p0->data, (const int32_t *)p1->data};
        int64_t lens[2] = {p0->numel, p1->numel}, out_lens[2];
        int32_t out[2 * 10];
        ctl_sampler_desc sd;
        memset(&sd, 0, sizeof sd);
        CHECK(ctl_generate(f, 2, prompts, lens, &sd, 10, out, out_lens, NULL, NULL) == CTL_OK, "generate: %s", ctl_last_error(ctx));
        CHECK(out_lens[0] == 10 && out_lens[1] == 10 && !memcmp(out, g0->data, 40) && !memcmp(out + 10, g1->data, 40),
              "%s: greedy continuation differs from transformers", kinds[k]);
        ctl_infer_free(f);
        ctl_model_free(m);
        ctl_ctx_free(ctx);
        fx_free(&fx), fx_free(&gen);
    }
}

static bool stop_after_three(int64_t seq, int32_t token, void *user) {
    int *count = (int *)user;
    (void)token;
    return ++count[seq] < 3;
}

// The sampler's rules, each against what it must do.
static void test_sampler(void) {
    enum { V = 6 };
    float base[V] = {1.0f, 3.0f, 2.5f, -1.0f, 2.9f, 0.0f}, z[V], scratch[2 * V];
    ctl_rng rng;
    ctl_rng_seed(&rng, 5);
    ctl_sampler_desc sd;
    memset(&sd, 0, sizeof sd);
    memcpy(z, base, sizeof z);
    CHECK(ctl_sample(z, V, &sd, NULL, 0, &rng, scratch) == 1, "temperature 0 is greedy");
    int32_t hist[2] = {1, 1};
    sd.repetition_penalty = 2.0f;
    memcpy(z, base, sizeof z);
    CHECK(ctl_sample(z, V, &sd, hist, 2, &rng, scratch) == 4 && z[1] == 1.5f, "penalty: 3/2 = 1.5 once, so token 4 wins");
    sd.repetition_penalty = 0.0f, sd.temperature = 1.0f, sd.top_k = 1;
    int ok = 0;
    for (int i = 0; i < 50; i++) memcpy(z, base, sizeof z), ok += ctl_sample(z, V, &sd, NULL, 0, &rng, scratch) == 1;
    CHECK(ok == 50, "top_k 1 is greedy");
    sd.top_k = 0, sd.top_p = 0.01f;
    ok = 0;
    for (int i = 0; i < 50; i++) memcpy(z, base, sizeof z), ok += ctl_sample(z, V, &sd, NULL, 0, &rng, scratch) == 1;
    CHECK(ok == 50, "top_p 0.01 keeps only the top token");
    sd.top_p = 0.0f, sd.min_p = 0.85f;   // exp(2.9-3) = 0.905 stays, exp(-0.5) = 0.61 goes
    int seen[V] = {0};
    for (int i = 0; i < 400; i++) memcpy(z, base, sizeof z), seen[ctl_sample(z, V, &sd, NULL, 0, &rng, scratch)]++;
    CHECK(seen[1] > 150 && seen[4] > 150 && seen[1] + seen[4] == 400, "min_p keeps tokens 1 and 4: %d %d", seen[1], seen[4]);
    sd.min_p = 0.0f, sd.top_k = 3;   // tokens 1, 4, 2 in proportion exp(3), exp(2.9), exp(2.5)
    memset(seen, 0, sizeof seen);
    for (int i = 0; i < 6000; i++) memcpy(z, base, sizeof z), seen[ctl_sample(z, V, &sd, NULL, 0, &rng, scratch)]++;
    double zs = exp(3.0) + exp(2.9) + exp(2.5), w1 = 6000 * exp(3.0) / zs, w2 = 6000 * exp(2.5) / zs;
    CHECK(seen[0] + seen[3] + seen[5] == 0 && fabs(seen[1] - w1) < 5 * sqrt(w1) && fabs(seen[2] - w2) < 5 * sqrt(w2),
          "top_k 3 proportions: %d %d %d", seen[1], seen[4], seen[2]);

    // The partial sort gives the tokens of the whole sort: many vocabularies (some with ties and
    // NaN), every filter combination, the same random state for both.
    static float big[50000], zf[50000], zr[50000], sf[100000], sr[100000];
    static const int64_t sizes[] = {1, 2, 7, 64, 65, 1000, 50000};
    static const float ks[] = {0, 1, 3, 64, 100, 70000}, ps[] = {0, 0.3f, 0.9f, 0.999f}, mps[] = {0, 0.05f, 0.5f};
    int cases = 0, agree = 0;
    for (size_t si = 0; si < sizeof sizes / sizeof sizes[0]; si++) {
        int64_t n = sizes[si];
        for (int64_t v = 0; v < n; v++) big[v] = 3.0f * ctl_rng_normal(&g_rng);
        if (n > 10) big[3] = big[5] = big[7], big[n - 1] = NAN;   // ties, and a NaN
        for (size_t a = 0; a < 6; a++)
            for (size_t b = 0; b < 4; b++)
                for (size_t c = 0; c < 3; c++) {
                    memset(&sd, 0, sizeof sd);
                    sd.temperature = 0.7f, sd.top_k = (int64_t)ks[a], sd.top_p = ps[b], sd.min_p = mps[c];
                    for (int rep = 0; rep < 2; rep++) {
                        ctl_rng r1 = g_rng, r2 = g_rng;
                        ctl_rng_next(&g_rng);
                        memcpy(zf, big, (size_t)n * 4), memcpy(zr, big, (size_t)n * 4);
                        int32_t fast = ctl__sample(zf, n, &sd, NULL, 0, &r1, sf, false);
                        int32_t ref = ctl__sample(zr, n, &sd, NULL, 0, &r2, sr, true);
                        agree += fast == ref && !memcmp(&r1, &r2, sizeof r1), cases++;
                    }
                }
    }
    CHECK(agree == cases, "partial sort == full sort on %d of %d draws", agree, cases);

    // Seeded generation repeats exactly; the callback and stop tokens end sequences.
    ctl_ctx *ctx = make_ctx(1, CTL_SIMD_AUTO);
    ctl_model_config cfg = tiny_config(CTL_ARCH_LLAMA);
    ctl_model *m;
    ctl_model_create(ctx, &cfg, &m);
    ctl_model_init_random(m, 2);
    ctl_infer *f;
    ctl_infer_desc id = {2, 12};
    ctl_infer_init(m, &id, &f);
    int32_t p0[3] = {1, 2, 3}, p1[1] = {4}, a[32], b[32];   // (n, max_new) outputs
    const int32_t *prompts[2] = {p0, p1};
    int64_t lens[2] = {3, 1}, la[2], lb[2];
    memset(&sd, 0, sizeof sd);
    sd.temperature = 1.5f, sd.seed = 99;
    ctl_generate(f, 2, prompts, lens, &sd, 8, a, la, NULL, NULL);
    ctl_generate(f, 2, prompts, lens, &sd, 8, b, lb, NULL, NULL);
    CHECK(la[0] == 8 && la[1] == 8 && !memcmp(a, b, sizeof a[0] * 16), "the same seed, the same samples");
    int count[2] = {0, 0};
    ctl_generate(f, 2, prompts, lens, &sd, 8, b, lb, stop_after_three, count);
    CHECK(lb[0] == 3 && lb[1] == 3, "callback stops at 3: %d %d", (int)lb[0], (int)lb[1]);
    sd.stop_tokens = &a[2], sd.n_stop_tokens = 1;   // the third sampled token of sequence 0 is a stop token
    ctl_generate(f, 2, prompts, lens, &sd, 8, b, lb, NULL, NULL);
    CHECK(lb[0] <= 2, "stop token ends sequence 0 (got %d tokens)", (int)lb[0]);
    sd.n_stop_tokens = 0, sd.max_new_tokens = 100;
    ctl_generate(f, 2, prompts, lens, &sd, 16, a, la, NULL, NULL);
    CHECK(la[0] == 10 && la[1] == 12, "the cache (12 tokens, plus one sampled from the last logits) bounds the output: %d %d",
          (int)la[0], (int)la[1]);
    ctl_infer_free(f);
    ctl_model_free(m);
    ctl_ctx_free(ctx);
}

// The real model for the tests below; tools/get_smollm2.sh fetches it (CI does).
#define SMOLLM2 "models/SmolLM2-135M-Instruct.Q4_1.gguf"

static bool have_smollm2(void) {
    FILE *f = fopen(SMOLLM2, "rb");
    if (!f) printf("    skipped: %s is missing (tools/get_smollm2.sh fetches it)\n", SMOLLM2);
    else fclose(f);
    return f != NULL;
}

// SmolLM2-135M-Instruct (Q4_1 GGUF, fetched by tools/get_smollm2.sh): next-token logits and
// 32-token greedy continuations of 8 prompts (4 in the chat template) against Hugging Face
// transformers running the same GGUF dequantised to fp32. All 8 are decoded together. Loaded as
// bf16, against transformers with every matrix rounded to bf16 (logits of 4 prompts).
static void test_smollm2(void) {
    const char *path = SMOLLM2;
    if (!have_smollm2()) return;
    fixture fx;
    if (!fx_load("smollm2/ref.bin", &fx)) {
        CHECK(false, "cannot read smollm2/ref.bin");
        return;
    }
    ctl_ctx *ctx = make_ctx(0, CTL_SIMD_AUTO);
    for (int keep = 0; keep < 3; keep++) {   // dequantised to fp32, kept as Q4_1 / Q8_0, as bf16
        ctl_model *m = NULL;
        ctl_model_desc md = {keep == 1, keep == 2};
        const char *ref = keep == 2 ? "bf16_" : "";
        CHECK(ctl_model_load_gguf(ctx, path, &md, &m) == CTL_OK, "load: %s", ctl_last_error(ctx));
        if (!m) continue;
        int64_t V = ctl_model_cfg(m)->vocab_size;
        ctl_infer *f;
        ctl_infer_desc id = {8, 96};
        CHECK(ctl_infer_init(m, &id, &f) == CTL_OK, "infer_init: %s", ctl_last_error(ctx));
        float *logits = zeros_f(V);
        const int32_t *prompts[8];
        int64_t lens[8], out_lens[8];
        int32_t out[8 * 32];
        double worst = 0.0;
        int argmax_ok = 0, compared = 0;
        for (int i = 0; i < 8; i++) {
            char key[32];
            snprintf(key, sizeof key, "prompt/%d", i);
            fx_rec *p = fx_get(&fx, key);
            prompts[i] = (const int32_t *)p->data, lens[i] = p->numel;
            if (keep == 2 && i % 2) continue;
            snprintf(key, sizeof key, "%slogits/%d", ref, i);
            const float *want = fx_f(&fx, key);
            compared++;
            ctl_infer_reset(f, 0);
            ctl_infer_feed(f, 0, prompts[i], lens[i], logits);
            worst = fmax(worst, rel_err_ff(logits, want, V));
            int a = 0, b = 0;
            for (int v = 1; v < V; v++) a = logits[v] > logits[a] ? v : a, b = want[v] > want[b] ? v : b;
            argmax_ok += a == b;
        }
        CHECK(worst <= 1e-3 && argmax_ok == compared, "%slogits vs transformers: max|d|/max|ref| %g, argmax agrees on %d of %d", ref, worst,
              argmax_ok, compared);
        ctl_sampler_desc sd;
        memset(&sd, 0, sizeof sd);
        CHECK(ctl_generate(f, 8, prompts, lens, &sd, 32, out, out_lens, NULL, NULL) == CTL_OK, "generate: %s", ctl_last_error(ctx));
        int same = 0;
        for (int i = 0; i < 8; i++) {
            char key[32];
            snprintf(key, sizeof key, "%sgreedy/%d", ref, i);
            same += out_lens[i] == 32 && !memcmp(out + 32 * i, fx_get(&fx, key)->data, 32 * sizeof(int32_t));
        }
        CHECK(same == 8, "greedy continuations identical to transformers for %d of 8 prompts", same);
        printf("    %s (%5.1f MB): logits max|d|/max|ref| %.1e, argmax %d/%d; greedy 32 tokens identical %d/8\n",
               keep == 1 ? "kept quantised" : keep ? "as bf16       " : "as fp32       ", (double)ctl_model_bytes(m) / 1e6, worst, argmax_ok,
               compared, same);
        free(logits);
        ctl_infer_free(f);
        ctl_model_free(m);
    }
    ctl_ctx_free(ctx);
    fx_free(&fx);
}

// One tokenizer on n strings against reference ids: the same ids, and decode(encode(s)) == s.
// Prints up to five differences; returns how many strings agree (*round: round trips exact).
static int tokenizer_agreement(ctl_tokenizer *tk, int n_str, const char *const *texts, const size_t *lens,
                               const int32_t *const *want, const int64_t *n_want, int *round) {
    static int32_t ids[8192];
    static char back[16384];
    int same = 0, shown = 0;
    *round = 0;
    for (int i = 0; i < n_str; i++) {
        int64_t n = 0;
        size_t blen = 0;
        ctl_tokenize(tk, texts[i], lens[i], true, ids, 8192, &n);
        bool ok = n == n_want[i] && !memcmp(ids, want[i], (size_t)n * 4);
        same += ok;
        ctl_detokenize(tk, ids, n, back, sizeof back, &blen);
        *round += blen == lens[i] && !memcmp(back, texts[i], blen);
        if (!ok && shown++ < 5) {
            printf("    differs on \"%.*s\": got", (int)CTL__MIN(lens[i], (size_t)50), texts[i]);
            for (int64_t k = 0; k < n && k < 10; k++) printf(" %d", ids[k]);
            printf(", want");
            for (int64_t k = 0; k < n_want[i] && k < 10; k++) printf(" %d", want[i][k]);
            printf("\n");
        }
    }
    return same;
}

// The tokenizer of `gguf` against the ids "<name>/i" that llama.cpp gave for the strings
// "text/i" of tokens.bin (tools/make_tokenizer_fixtures.py).
static void check_tokenizer_fixture(const char *gguf, const char *name) {
    fixture fx;
    if (!fx_load("tokens.bin", &fx)) {
        CHECK(false, "cannot read tokens.bin");
        return;
    }
    ctl_ctx *ctx = make_ctx(1, CTL_SIMD_AUTO);
    ctl_gguf *g = NULL;
    ctl_tokenizer *tk = NULL;
    CHECK(ctl_gguf_open(ctx, gguf, &g) == CTL_OK && ctl_tokenizer_from_gguf(ctx, g, &tk) == CTL_OK, "%s: %s", gguf, ctl_last_error(ctx));
    static const char *texts[4096];
    static const int32_t *want[4096];
    static size_t lens[4096];
    static int64_t n_want[4096];
    int n_str = 0, round = 0;
    for (char key[64];; n_str++) {
        snprintf(key, sizeof key, "text/%d", n_str);
        fx_rec *t = fx_get(&fx, key);
        snprintf(key, sizeof key, "%s/%d", name, n_str);
        fx_rec *w = fx_get(&fx, key);
        if (!t || !w || n_str == 4096) break;
        texts[n_str] = (const char *)t->data, lens[n_str] = (size_t)t->numel;
        want[n_str] = (const int32_t *)w->data, n_want[n_str] = w->numel;
    }
    int same = tk ? tokenizer_agreement(tk, n_str, texts, lens, want, n_want, &round) : 0;
    CHECK(n_str > 1000 && same == n_str && round == n_str, "%s: ids identical on %d of %d strings; decode(encode(s)) == s on %d",
          name, same, n_str, round);
    printf("    %-9s %d strings: ids identical to llama.cpp on %d, round trip exact on %d\n", name, n_str, same, round);
    ctl_tokenizer_free(tk);
    ctl_gguf_close(g);
    ctl_ctx_free(ctx);
    fx_free(&fx);
}

// SmolLM2's tokenizer (the "smollm" pre-tokenizer) against llama.cpp on GSM8K and hard cases.
static void test_smollm2_tokenizer(void) {
    if (!have_smollm2()) return;
    check_tokenizer_fixture(SMOLLM2, "smollm2");
    ctl_ctx *ctx = make_ctx(1, CTL_SIMD_AUTO);
    ctl_gguf *g = NULL;
    ctl_tokenizer *tk = NULL;
    int32_t ids[4];
    int64_t n = 0;
    CHECK(ctl_gguf_open(ctx, SMOLLM2, &g) == CTL_OK && ctl_tokenizer_from_gguf(ctx, g, &tk) == CTL_OK, "%s", ctl_last_error(ctx));
    CHECK(tk && ctl_tokenize(tk, "hello world", 11, false, ids, 1, &n) == CTL_ERR_CAPACITY && n == 2, "capacity: %d", (int)n);
    CHECK(tk && !ctl_tokenizer_add_bos(tk), "SmolLM2 asks for no BOS");
    // Bytes its vocabulary has no token for are dropped (llama.cpp does the same), never -1.
    char back[16];
    size_t len = 0;
    CHECK(tk && ctl_tokenize(tk, "\x04" "a\xff\xfe" "b", 5, false, ids, 4, &n) == CTL_OK && n >= 1 &&
              ctl_detokenize(tk, ids, n, back, sizeof back, &len) == CTL_OK && len == 2 && !memcmp(back, "ab", 2),
          "bytes without a token: %d ids, %zu bytes back", (int)n, len);
    ctl_tokenizer_free(tk);
    ctl_gguf_close(g);
    ctl_ctx_free(ctx);
}

// The pre-tokenizers' class table (U+0000..U+FFFF) against the reference binary search, on
// every code point UTF-8 can name and a few past it.
static void test_class_table(void) {
    ctl_tokenizer *tk = (ctl_tokenizer *)calloc(1, sizeof *tk);
    CHECK(tk != NULL, "calloc");
    if (!tk) return;
    ctl__class_fill(tk->bmp_class);
    int64_t differ = 0, counts[4] = {0};
    for (uint32_t cp = 0; cp < 0x200000; cp++) {
        int c = ctl__class(tk, cp);
        differ += c != ctl__class_slow(cp);
        counts[c + 1]++;
    }
    differ += ctl__class(tk, 0xFFFFFFFFu) != ctl__class_slow(0xFFFFFFFFu);
    CHECK(differ == 0, "%" PRId64 " code points classed unlike the reference", differ);
    CHECK(ctl__class(tk, ' ') == -1 && ctl__class(tk, 'a') == 1 && ctl__class(tk, '7') == 2 && ctl__class(tk, '+') == 0 &&
              ctl__class(tk, 0x3000) == -1 && ctl__class(tk, 0x4E00) == 1 && ctl__class(tk, 0x0663) == 2 && ctl__class(tk, 0x1D7CE) == 2,
          "known code points");
    printf("    2^21 code points: %" PRId64 " whitespace, %" PRId64 " letters, %" PRId64 " numbers, the table agrees on all\n",
           counts[0], counts[2], counts[3]);
    free(tk);
}

#define VOCAB_DIR "models/vocab/"

// BPE merges: the heap (long pieces) against the scan (the reference) on pieces of awkward
// lengths, from alphabets that merge a lot (repeats, digits, letters) and bytes that merge little.
static void test_bpe_heap(void) {
    const char *path = VOCAB_DIR "ggml-vocab-gpt-2.gguf";
    ctl_ctx *ctx = make_ctx(1, CTL_SIMD_AUTO);
    ctl_gguf *g = NULL;
    ctl_tokenizer *tk = NULL;
    if (ctl_gguf_open(ctx, path, &g)) {
        printf("    skipped: %s is missing (tools/get_vocabs.sh fetches it)\n", path);
        ctl_ctx_free(ctx);
        return;
    }
    CHECK(ctl_tokenizer_from_gguf(ctx, g, &tk) == CTL_OK, "%s", ctl_last_error(ctx));
    static const char *const alpha[] = {"a", "ab", "0123456789", "etaoin shrdlu", "the", "\xc3\xa9\xe2\x82\xac"};
    static const int64_t lens[] = {1, 2, 3, 17, 64, 65, 200, 1000, 4097};
    static int32_t x[4097], y[4097];
    ctl_rng rng;
    ctl_rng_seed(&rng, 5);
    int cases = 0, same = 0;
    for (int a = 0; a < 7 && tk; a++)
        for (int l = 0; l < 9; l++, cases++) {
            int64_t m = lens[l];
            for (int64_t i = 0; i < m; i++) {
                unsigned b = a < 6 ? (unsigned char)alpha[a][ctl_rng_next(&rng) % strlen(alpha[a])] : (unsigned)(ctl_rng_next(&rng) % 256);
                x[i] = y[i] = tk->byte_token[b];
            }
            int64_t mx = ctl__bpe_scan(tk, x, m), my = ctl__bpe_heap(tk, y, m);
            same += mx == my && !memcmp(x, y, (size_t)mx * sizeof(int32_t));
        }
    CHECK(tk && same == cases, "heap merges equal the scan's on %d of %d pieces", same, cases);
    printf("    %d pieces (1..4097 symbols): heap and scan merge alike on %d\n", cases, same);
    ctl_tokenizer_free(tk);
    ctl_gguf_close(g);
    ctl_ctx_free(ctx);
}

// llama.cpp's vocabulary files for GPT-2, Llama-3 and Qwen2 (tools/get_vocabs.sh), each against
// two references: llama.cpp's ids on the strings of tokens.bin, and the Hugging Face tokenizer's
// ids for llama.cpp's own test strings (.inp/.out, shipped with the files).
static void test_vocab_tokenizers(void) {
    static const char *const names[3][2] = {{"gpt-2", "gpt2"}, {"llama-bpe", "llama3"}, {"qwen2", "qwen2"}};
    for (int v = 0; v < 3; v++) {
        char path[256], inp_path[300], out_path[300];
        snprintf(path, sizeof path, VOCAB_DIR "ggml-vocab-%s.gguf", names[v][0]);
        snprintf(inp_path, sizeof inp_path, "%s.inp", path);
        snprintf(out_path, sizeof out_path, "%s.out", path);
        size_t inp_len = 0, out_len = 0;
        char *inp = read_file(inp_path, &inp_len), *out = read_file(out_path, &out_len);
        if (!inp || !out) {
            printf("    skipped: %s is missing (tools/get_vocabs.sh fetches it)\n", out_path);
            free(inp), free(out);
            continue;
        }
        check_tokenizer_fixture(path, names[v][1]);
        // .inp: strings, each followed by "\n__ggml_vocab_test__\n"; .out: one line of ids each.
        static const char *texts[256];
        static size_t lens[256];
        static int32_t ids[256][256];
        static const int32_t *want[256];
        static int64_t n_want[256];
        const char *sep = "\n__ggml_vocab_test__\n", *at = inp, *line = out;
        int n_str = 0, round = 0;
        for (const char *e; n_str < 256 && (e = strstr(at, sep)); at = e + strlen(sep), n_str++) {
            texts[n_str] = at, lens[n_str] = (size_t)(e - at), want[n_str] = ids[n_str], n_want[n_str] = 0;
            const char *eol = strchr(line, '\n');
            for (char *p = (char *)line; eol && p < eol && n_want[n_str] < 256;) {
                long id = strtol(p, &p, 10);
                if (p <= eol) ids[n_str][n_want[n_str]++] = (int32_t)id;
                while (p < eol && *p == ' ') p++;
            }
            line = eol ? eol + 1 : line + strlen(line);
        }
        ctl_ctx *ctx = make_ctx(1, CTL_SIMD_AUTO);
        ctl_gguf *g = NULL;
        ctl_tokenizer *tk = NULL;
        CHECK(ctl_gguf_open(ctx, path, &g) == CTL_OK && ctl_tokenizer_from_gguf(ctx, g, &tk) == CTL_OK, "%s: %s", path, ctl_last_error(ctx));
        int same = tk ? tokenizer_agreement(tk, n_str, texts, lens, want, n_want, &round) : 0;
        CHECK(n_str > 30 && same == n_str && round == n_str, "%s: ids identical to Hugging Face on %d of %d test strings, round trips %d",
              names[v][0], same, n_str, round);
        printf("    %-9s %d llama.cpp test strings: ids identical to Hugging Face on %d, round trip exact on %d\n",
               names[v][1], n_str, same, round);
        CHECK(tk && ctl_tokenizer_add_bos(tk) == (v == 1), "%s: add_bos %d", names[v][0], tk ? (int)ctl_tokenizer_add_bos(tk) : -1);
        ctl_tokenizer_free(tk);
        ctl_gguf_close(g);
        ctl_ctx_free(ctx);
        free(inp), free(out);
    }
}

// Chat templates: SmolLM2's (ChatML with a default system line) recognised from the real GGUF,
// Qwen2's (ChatML with another default system line) from llama.cpp's Qwen2 vocabulary file, and
// Llama-3's from a small GGUF holding Meta's template; each rendered conversation equals what the
// Jinja template gives (transformers / jinja2), with and without the generation prompt.
static void test_chat_templates(void) {
    static const char *const conv[3][3][2] = {
        {{"user", "What is 7 times 8?"}},
        {{"system", "You are terse."}, {"user", "Name a colour."}},
        {{"user", "Hi"}, {"assistant", "Hello! How can I help?"}, {"user", "  Tell me a joke.  "}}};
    static const int n_msgs[3] = {1, 2, 3};
    static const char *const names[3] = {"chatml", "llama3", "qwen2"};
    fixture fx;
    if (!fx_load("chat.bin", &fx)) {
        CHECK(false, "cannot read chat.bin");
        return;
    }
    ctl_ctx *ctx = make_ctx(1, CTL_SIMD_AUTO);
    ctl_chat_template t[3];
    bool have[3] = {false, false, false};
    const char *files[3] = {SMOLLM2, "build/llama3_template.gguf", VOCAB_DIR "ggml-vocab-qwen2.gguf"};
    // A GGUF with Meta's Llama-3 template and a BOS token.
    fx_rec *tpl = fx_get(&fx, "llama3_template");
    ctl_gguf_writer *w;
    ctl_gguf_writer_init(ctx, &w);
    const char *toks[2] = {"x", "<|begin_of_text|>"};
    size_t lens[2] = {1, 17};
    ctl_gguf_writer_set_str(w, "tokenizer.chat_template", (const char *)tpl->data, (size_t)tpl->numel);
    ctl_gguf_writer_set_str_array(w, "tokenizer.ggml.tokens", toks, lens, 2);
    ctl_gguf_writer_set_u32(w, "tokenizer.ggml.bos_token_id", 1);
    ctl_gguf_writer_save(w, files[1]);
    ctl_gguf_writer_free(w);
    for (int f = 0; f < 3; f++) {
        ctl_gguf *g = NULL;
        if (ctl_gguf_open(ctx, files[f], &g) != CTL_OK) {
            printf("    %s part skipped: %s is missing\n", names[f], files[f]);
            continue;
        }
        have[f] = ctl_chat_template_from_gguf(ctx, g, &t[f]) == CTL_OK;
        ctl_gguf_close(g);
    }
    CHECK(!have[0] || (t[0].format == CTL_CHAT_CHATML && strstr(t[0].default_system, "SmolLM")), "SmolLM2 template");
    CHECK(have[1] && t[1].format == CTL_CHAT_LLAMA3 && !strcmp(t[1].bos, "<|begin_of_text|>"), "Llama-3 template recognised");
    CHECK(!have[2] || (t[2].format == CTL_CHAT_CHATML && !strcmp(t[2].default_system, "You are a helpful assistant")), "Qwen2 template");
    int ok = 0, tried = 0;
    for (int f = 0; f < 3; f++)
        for (int i = 0; i < 3 && have[f]; i++)
            for (int gen = 0; gen < 2; gen++) {
                ctl_chat_msg msgs[3];
                for (int j = 0; j < n_msgs[i]; j++) msgs[j].role = conv[i][j][0], msgs[j].content = conv[i][j][1];
                char key[32], got[1024];
                size_t len;
                snprintf(key, sizeof key, "%s/%d/%d", names[f], i, gen);
                fx_rec *r = fx_get(&fx, key);
                ctl_chat_apply(&t[f], msgs, n_msgs[i], gen != 0, got, sizeof got, &len);
                tried++;
                bool same = len == (size_t)r->numel && !memcmp(got, r->data, len);
                ok += same;
                if (!same) printf("    %s: got \"%.*s\"\n", key, (int)len, got);
            }
    CHECK(ok == tried && tried >= 6, "%d of %d rendered conversations equal the Jinja rendering", ok, tried);
    printf("    %d of %d conversations equal the Jinja rendering\n", ok, tried);
    ctl_ctx_free(ctx);
    fx_free(&fx);
}

// keeps the text up to and including it, and nothing after.
static void test_stop_strings(void) {
    if (!have_smollm2()) return;
    ctl_ctx *ctx = make_ctx(0, CTL_SIMD_AUTO);
    ctl_gguf *g = NULL;
    CHECK(ctl_gguf_open(ctx, SMOLLM2, &g) == CTL_OK, "open: %s", ctl_last_error(ctx));
    if (!g) {
        ctl_ctx_free(ctx);
        return;
    }
    ctl_model *m = NULL;
    ctl_tokenizer *tk = NULL;
    ctl_infer *f = NULL;
    ctl_infer_desc id = {1, 64};
    CHECK(ctl_model_from_gguf(ctx, g, NULL, &m) == CTL_OK && ctl_tokenizer_from_gguf(ctx, g, &tk) == CTL_OK &&
          ctl_infer_init(m, &id, &f) == CTL_OK, "setup: %s", ctl_last_error(ctx));
    if (f) {
        int32_t prompt[32], out[32];
        int64_t n_prompt = 0, n_out = 0;
        ctl_tokenize(tk, "1, 2, 3, 4,", 11, false, prompt, 32, &n_prompt);
        const int32_t *pp = prompt;
        const char *stops[2] = {"never", "7,"};
        ctl_sampler_desc sd;
        memset(&sd, 0, sizeof sd);
        sd.tokenizer = tk, sd.stop_strings = stops, sd.n_stop_strings = 2;
        CHECK(ctl_generate(f, 1, &pp, &n_prompt, &sd, 32, out, &n_out, NULL, NULL) == CTL_OK, "generate");
        char text[512];
        size_t len;
        ctl_detokenize(tk, out, n_out, text, sizeof text, &len);
        CHECK(n_out < 32 && len >= 2 && !memcmp(text + len - 2, "7,", 2) && strstr(text, " 5, 6,"),
              "stopped after \"%.*s\" (%d tokens)", (int)len, text, (int)n_out);
    }
    ctl_infer_free(f);
    ctl_tokenizer_free(tk);
    ctl_model_free(m);
    ctl_gguf_close(g);
    ctl_ctx_free(ctx);
}

// ---- bad input -------------------------------------------------------------------------------

static void test_errors(void) {
    ctl_ctx *ctx = make_ctx(1, CTL_SIMD_AUTO);
    ctl_model_config cfg = tiny_config(CTL_ARCH_LLAMA), bad = cfg;
    ctl_model *m = NULL;
    bad.n_kv_head = 3;
    CHECK(ctl_model_create(ctx, &bad, &m) == CTL_ERR_INVALID && m == NULL, "n_kv_head 3 with 4 heads");
    CHECK(strstr(ctl_last_error(ctx), "n_kv_head 3") != NULL, "message: %s", ctl_last_error(ctx));
    bad = cfg, bad.n_embd = 18, bad.n_head = 4;
    CHECK(ctl_model_create(ctx, &bad, &m) == CTL_ERR_INVALID, "n_head not dividing n_embd");
    bad = cfg, bad.vocab_size = 0;
    CHECK(ctl_model_create(ctx, &bad, &m) == CTL_ERR_INVALID, "empty vocabulary");
    bad = cfg, bad.head_dim = 5;
    CHECK(ctl_model_create(ctx, &bad, &m) == CTL_ERR_INVALID, "odd head_dim with RoPE");
    bad = tiny_config(CTL_ARCH_GPT2), bad.n_kv_head = 2;
    CHECK(ctl_model_create(ctx, &bad, &m) == CTL_ERR_INVALID, "gpt2 with grouped heads");

    CHECK(ctl_model_create(ctx, &cfg, &m) == CTL_OK, "create");
    ctl_model_init_random(m, 1);
    ctl_train_desc d;
    ctl_train *t = NULL;
    memset(&d, 0, sizeof d);
    d.batch = 2, d.seq_len = 13;
    CHECK(ctl_train_init(m, &d, &t) == CTL_ERR_INVALID && t == NULL, "seq_len past n_ctx");
    CHECK(strstr(ctl_last_error(ctx), "n_ctx 12") != NULL, "message: %s", ctl_last_error(ctx));
    d.seq_len = 8, d.optim.beta2 = 1.5f;
    CHECK(ctl_train_init(m, &d, &t) == CTL_ERR_INVALID, "beta2 1.5");
    d.optim.beta2 = 0.0f;
    CHECK(ctl_train_init(m, &d, &t) == CTL_OK, "train_init");
    CHECK(ctl_train_backward(t) == CTL_ERR_INVALID, "backward before forward");
    CHECK(ctl_train_step(t, NULL) == CTL_ERR_INVALID, "step before backward");

    int32_t tok[3 * 8], tgt[3 * 8];
    make_batch(3, 8, cfg.vocab_size, tok, tgt, NULL, 2);
    ctl_batch b = {3, 8, tok, tgt, NULL};
    CHECK(ctl_train_forward(t, &b) == CTL_ERR_CAPACITY, "batch 3 > planned 2");
    CHECK(strstr(ctl_last_error(ctx), "3x8") && strstr(ctl_last_error(ctx), "2x8"), "message: %s", ctl_last_error(ctx));
    b.B = 2, tok[9] = 23;
    CHECK(ctl_train_forward(t, &b) == CTL_ERR_RANGE, "token id 23 with vocab 23");
    CHECK(strstr(ctl_last_error(ctx), "token 23 at (b=1, t=1)") != NULL, "message: %s", ctl_last_error(ctx));
    tok[9] = 0, tgt[4] = -1;
    CHECK(ctl_train_forward(t, &b) == CTL_ERR_RANGE, "negative target");
    tgt[4] = 0;
    b.tokens = NULL;
    CHECK(ctl_train_forward(t, &b) == CTL_ERR_INVALID, "no tokens");
    b.tokens = tok;
    CHECK(ctl_train_forward(t, &b) == CTL_OK, "forward");
    float *row_logits = zeros_f(cfg.vocab_size);
    CHECK(ctl_train_logits(t, 2, 0, row_logits) == CTL_ERR_RANGE, "logits of a row that is not there");
    CHECK(ctl_train_logits(t, 0, 0, NULL) == CTL_ERR_INVALID && strstr(ctl_last_error(ctx), "train_logits: invalid arguments"),
          "logits into NULL: %s", ctl_last_error(ctx));
    free(row_logits);

    // Non-finite values: a NaN log-prob, a NaN gradient, a zero-weight batch.
    float logp[4] = {-1.0f, NAN, -2.0f, -3.0f}, dlogp[4], loss, w0[4] = {0, 0, 0, 0}, wneg[4] = {1, -1, 1, 1};
    CHECK(ctl_cross_entropy(ctx, 4, logp, NULL, dlogp, &loss) == CTL_ERR_NONFINITE, "NaN log-prob");
    CHECK(strstr(ctl_last_error(ctx), "token 1") != NULL, "message: %s", ctl_last_error(ctx));
    CHECK(ctl_cross_entropy(ctx, 4, logp, w0, dlogp, &loss) == CTL_ERR_INVALID, "all weights 0");
    CHECK(ctl_cross_entropy(ctx, 4, logp, wneg, dlogp, &loss) == CTL_ERR_RANGE, "negative weight");
    float *dl = ctl_train_dlogprobs(t);
    for (int i = 0; i < 16; i++) dl[i] = -1.0f / 16;
    dl[5] = INFINITY;
    CHECK(ctl_train_backward(t) == CTL_ERR_NONFINITE, "infinite dlogp");
    ctl_train_free(t);
    ctl_model_free(m);
    ctl_ctx_free(ctx);
}

// Hostile values the library meets before anything is sized or written: model shapes past the
// bounds, caches past any machine, ranks above a matrix's side, sampler settings out of range
// (NaN among them), non-finite weights at generation, checkpoints of other adapters, a UTF-8
// byte-order mark, and files written under a name of their own, nothing left behind.
static void test_hardening(void) {
    ctl_ctx *ctx = make_ctx(1, CTL_SIMD_AUTO);
    ctl_model_config cfg = tiny_config(CTL_ARCH_LLAMA), bad = cfg;
    ctl_model *m = NULL, *m2 = NULL;
    bad.n_layer = 70000;
    CHECK(ctl_model_create(ctx, &bad, &m) == CTL_ERR_RANGE && !m && strstr(ctl_last_error(ctx), "n_layer 70000"), "70000 layers: %s", ctl_last_error(ctx));
    bad = cfg, bad.n_embd = (int64_t)1 << 30, bad.n_head = 1 << 23;
    CHECK(ctl_model_create(ctx, &bad, &m) == CTL_ERR_RANGE && !m && strstr(ctl_last_error(ctx), "n_embd 1073741824"), "n_embd 2^30: %s",
          ctl_last_error(ctx));
    CHECK(ctl_model_create(ctx, &cfg, &m) == CTL_OK, "create");
    if (!m) return;
    ctl_model_init_random(m, 3);

    // The cache: planned without allocating, as much as init allocates; past any machine refused.
    ctl_infer_desc id = {3, 10};
    size_t plan = 0;
    ctl_infer *inf = NULL;
    CHECK(ctl_infer_plan(m, &id, &plan) == CTL_OK && ctl_infer_init(m, &id, &inf) == CTL_OK && plan == ctl_infer_memory(inf),
          "infer plan %zu, init %zu", plan, inf ? ctl_infer_memory(inf) : 0);
    ctl_infer_desc huge = {(int64_t)1 << 24, 12}, many = {((int64_t)1 << 24) + 1, 12};
    CHECK(ctl_infer_plan(m, &many, &plan) == CTL_ERR_INVALID && plan == 0, "2^24 + 1 sequences: %s", ctl_last_error(ctx));
    CHECK(ctl_infer_plan(m, &huge, &plan) == CTL_OK && plan > ((size_t)1 << 32), "2^24 sequences planned: %zu bytes", plan);

    // The sampler: every setting out of range refused before a token is drawn.
    int32_t prompt[3] = {1, 2, 3}, out[3 * 4];
    const int32_t *pp[1] = {prompt};
    int64_t plen = 3, olen[3];
    struct { float temperature, top_p, min_p, penalty; int64_t top_k; } sampler_bad[] = {
        {NAN, 0, 0, 0, 0}, {1e-30f, 0, 0, 0, 0}, {-1, 0, 0, 0, 0}, {INFINITY, 0, 0, 0, 0}, {1, 1.5f, 0, 0, 0}, {1, NAN, 0, 0, 0},
        {1, 0, -0.1f, 0, 0}, {1, 0, 0, NAN, 0}, {1, 0, 0, -2, 0}, {1, 0, 0, 0, -1}};
    for (size_t k = 0; k < sizeof sampler_bad / sizeof *sampler_bad; k++) {
        ctl_sampler_desc sd;
        memset(&sd, 0, sizeof sd);
        sd.temperature = sampler_bad[k].temperature, sd.top_p = sampler_bad[k].top_p, sd.min_p = sampler_bad[k].min_p;
        sd.repetition_penalty = sampler_bad[k].penalty, sd.top_k = sampler_bad[k].top_k;
        CHECK(ctl_generate_groups(inf, 1, pp, &plen, 3, &sd, 4, out, olen, NULL, NULL) == CTL_ERR_RANGE && strstr(ctl_last_error(ctx), "sampler"),
              "sampler %zu: %s", k, ctl_last_error(ctx));
    }
    ctl_sampler_desc sd;
    memset(&sd, 0, sizeof sd);
    sd.n_stop_tokens = 2;
    CHECK(ctl_generate_groups(inf, 1, pp, &plen, 3, &sd, 4, out, olen, NULL, NULL) == CTL_ERR_INVALID, "2 stop tokens, no array");
    sd.n_stop_tokens = 0, sd.temperature = 0.7f, sd.top_p = 0.9f, sd.seed = 1;
    CHECK(ctl_generate_groups(inf, 1, pp, &plen, 3, &sd, 4, out, olen, NULL, NULL) == CTL_OK, "a good sampler: %s", ctl_last_error(ctx));

    // Non-finite weights: generation stops at the first layer whose output holds one, and names
    // the weight; an infinity in the final norm stops it there.
    ctl_param *up = ctl_model_find(m, "blk.1.ffn_up.weight");
    ((float *)up->value.data)[5] = NAN;
    CHECK(ctl_generate_groups(inf, 1, pp, &plen, 3, &sd, 4, out, olen, NULL, NULL) == CTL_ERR_NONFINITE &&
              strstr(ctl_last_error(ctx), "layer 1's output") && strstr(ctl_last_error(ctx), "'blk.1.ffn_up.weight' (layer 1) holds nan at element 5"),
          "NaN weight in layer 1: %s", ctl_last_error(ctx));
    ((float *)up->value.data)[5] = 0.0f;
    ctl_param *norm = ctl_model_find(m, "output_norm.weight");
    ((float *)norm->value.data)[0] = INFINITY;
    float logits[23];
    CHECK(ctl_infer_feed(inf, 0, prompt, 3, logits) == CTL_ERR_NONFINITE && strstr(ctl_last_error(ctx), "final norm"),
          "inf in the final norm: %s", ctl_last_error(ctx));
    ((float *)norm->value.data)[0] = 1.0f;
    ctl_infer_reset(inf, -1);
    CHECK(ctl_infer_feed(inf, 0, prompt, 3, logits) == CTL_OK, "finite again: %s", ctl_last_error(ctx));
    ctl_infer_free(inf);

    // A LoRA rank above a matrix's smaller side (16 here) adds nothing: refused, naming the weight.
    ctl_lora_desc ld;
    memset(&ld, 0, sizeof ld);
    ld.rank = 17, ld.alpha = 16;
    CHECK(ctl_lora_attach(m, &ld) == CTL_ERR_RANGE && strstr(ctl_last_error(ctx), "rank 17 exceeds 'blk.0.attn_q.weight'"), "rank 17: %s",
          ctl_last_error(ctx));

    // Checkpoints: one of a LoRA with alpha 16 on every block matrix, with the run's config text.
    ld.rank = 4;
    CHECK(ctl_lora_attach(m, &ld) == CTL_OK, "lora: %s", ctl_last_error(ctx));
    ctl_train_desc td;
    memset(&td, 0, sizeof td);
    td.batch = 1, td.seq_len = 8;
    ctl_train *t = NULL, *t2 = NULL;
    CHECK(ctl_train_init(m, &td, &t) == CTL_OK, "train_init");
    ctl_run_state rs;
    memset(&rs, 0, sizeof rs);
    rs.counter = 5, rs.config = "lr=0.001\nsteps=10\n";
    system("rm -f build/hardening.ckpt*");
    CHECK(t && ctl_train_save(t, "build/hardening.ckpt", &rs) == CTL_OK, "save: %s", ctl_last_error(ctx));
    CHECK(system("ls build/hardening.ckpt.tmp* > /dev/null 2>&1") != 0, "a temporary file was left beside the checkpoint");
    ctl_gguf *g = NULL;
    const char *text = NULL;
    size_t len = 0;
    CHECK(ctl_gguf_open(ctx, "build/hardening.ckpt", &g) == CTL_OK && ctl_gguf_get_str(g, "cotlab.run.config", &text, &len) == CTL_OK &&
              len == strlen(rs.config) && !memcmp(text, rs.config, len), "the run's config in the checkpoint");
    if (g) ctl_gguf_close(g);
    struct { int64_t rank; float alpha; uint32_t targets; const char *says; } others[] = {
        {4, 8, CTL_LINEAR_ALL, "alpha 16"}, {8, 16, CTL_LINEAR_ALL, "rank 4"}, {4, 16, CTL_LINEAR_ATTN, "trains 'blk.0.ffn_gate.weight.lora_a'"}};
    for (size_t k = 0; k < sizeof others / sizeof *others; k++) {
        ld.rank = others[k].rank, ld.alpha = others[k].alpha, ld.targets = others[k].targets;
        m2 = NULL, t2 = NULL;
        bool made = ctl_model_create(ctx, &cfg, &m2) == CTL_OK && ctl_lora_attach(m2, &ld) == CTL_OK && ctl_train_init(m2, &td, &t2) == CTL_OK;
        ctl_run_state before = rs;   // a refused checkpoint leaves the caller's run state as it was
        CHECK(made && ctl_train_load(t2, "build/hardening.ckpt", &rs) == CTL_ERR_INVALID && strstr(ctl_last_error(ctx), others[k].says) &&
                  !memcmp(&before, &rs, sizeof rs),
              "a checkpoint of other adapters (%zu): %s", k, ctl_last_error(ctx));
        if (t2) ctl_train_free(t2);
        if (m2) ctl_model_free(m2);
    }
    ld.rank = 4, ld.alpha = 16, ld.targets = CTL_LINEAR_ALL;
    m2 = NULL, t2 = NULL;
    CHECK(ctl_model_create(ctx, &cfg, &m2) == CTL_OK && ctl_lora_attach(m2, &ld) == CTL_OK && ctl_train_init(m2, &td, &t2) == CTL_OK &&
              ctl_train_load(t2, "build/hardening.ckpt", &rs) == CTL_OK && rs.counter == 5 && rs.config == NULL,
          "the same adapters load: %s", ctl_last_error(ctx));
    if (t2) ctl_train_free(t2);
    if (m2) ctl_model_free(m2);
    CHECK(ctl_train_save(t, "build/no/such/dir/x.ckpt", &rs) == CTL_ERR_IO && strstr(ctl_last_error(ctx), "cannot create"),
          "a write that cannot start: %s", ctl_last_error(ctx));
    if (t) ctl_train_free(t);
    ctl_model_free(m);

    // A byte-order mark before the first line of a dataset.
    static const char bom[] = "\xef\xbb\xbf{\"prompt\": \"a\", \"completion\": \"b\"}\n{\"prompt\": \"c\", \"completion\": \"d\"}\n";
    ctl_dataset *ds = NULL;
    CHECK(ctl_dataset_open_memory(ctx, bom, sizeof bom - 1, NULL, &ds) == CTL_OK && ctl_dataset_size(ds) == 2 &&
              !strcmp(ctl_dataset_get(ds, 0)->prompt.text, "a"), "a byte-order mark: %s", ctl_last_error(ctx));
    ctl_dataset_close(ds);
    ctl_ctx_free(ctx);
}

// Non-finite guards: a NaN or infinity in the hidden state, a gradient or a trainable parameter
// is caught in the step it appears, named with its step, tensor, layer and element; the step
// is skipped without a trace (the run then goes on exactly as if it had never been tried), and
// no checkpoint is written with such a value in it.
static void test_nonfinite(void) {
    ctl_ctx *ctx = make_ctx(2, CTL_SIMD_AUTO);
    ctl_model_config cfg = tiny_config(CTL_ARCH_LLAMA);
    cfg.tied_embeddings = false;   // token_embd rows that a batch does not look up have no effect
    ctl_model *ref = NULL, *m = NULL;
    ctl_train *tr = NULL, *t = NULL;
    ctl_train_desc d;
    memset(&d, 0, sizeof d);
    d.batch = 2, d.seq_len = 8, d.optim.lr = 1e-2f, d.optim.warmup = 2, d.optim.total_steps = 10;
    CHECK(ctl_model_create(ctx, &cfg, &ref) == CTL_OK && ctl_model_create(ctx, &cfg, &m) == CTL_OK, "create");
    if (!ref || !m) return;
    ctl_model_init_random(ref, 5), ctl_model_init_random(m, 5);
    CHECK(ctl_train_init(ref, &d, &tr) == CTL_OK && ctl_train_init(m, &d, &t) == CTL_OK, "train_init");
    int32_t tok[2][16], tgt[2][16];
    make_batch(2, 8, cfg.vocab_size, tok[0], tgt[0], NULL, 11);
    make_batch(2, 8, cfg.vocab_size, tok[1], tgt[1], NULL, 12);
    ctl_batch b0 = {2, 8, tok[0], tgt[0], NULL}, b1 = {2, 8, tok[1], tgt[1], NULL};
    float loss;
#define NF_STEP(tr_, b_) (ctl_train_forward(tr_, &(b_)) == CTL_OK && \
    ctl_cross_entropy(ctx, 16, ctl_train_logprobs(tr_), NULL, ctl_train_dlogprobs(tr_), &loss) == CTL_OK && ctl_train_backward(tr_) == CTL_OK)
    // The reference: two steps, b0 then b1.
    CHECK(NF_STEP(tr, b0) && ctl_train_step(tr, NULL) == CTL_OK && NF_STEP(tr, b1) && ctl_train_step(tr, NULL) == CTL_OK, "reference run");
    CHECK(NF_STEP(t, b0) && ctl_train_step(t, NULL) == CTL_OK, "step 1");
    remove("build/nonfinite.ckpt"), remove("build/nonfinite.ckpt.tmp");
    CHECK(ctl_train_save(t, "build/nonfinite.ckpt", NULL) == CTL_OK, "a good checkpoint");
    size_t good_len = 0;
    char *good = read_file("build/nonfinite.ckpt", &good_len);
    size_t nbytes = (size_t)ctl_model_numel(m) * sizeof(float);
    float *before = (float *)malloc(nbytes);
    memcpy(before, ctl_model_param(m, 0)->value.data, nbytes);

    // 1. A NaN weight of layer 1: the forward stops at layer 1's output and names the weight.
    ctl_param *up = ctl_model_find(m, "blk.1.ffn_up.weight");
    float saved = ((float *)up->value.data)[3];
    ((float *)up->value.data)[3] = NAN;
    CHECK(ctl_train_forward(t, &b1) == CTL_ERR_NONFINITE, "NaN weight: the forward fails");
    const char *e = ctl_last_error(ctx);
    CHECK(strstr(e, "train_forward (update 2)") && strstr(e, "after layer 1") && strstr(e, "'blk.1.ffn_up.weight' (layer 1) holds nan at element 3"),
          "message: %s", e);
    CHECK(ctl_train_backward(t) == CTL_ERR_INVALID, "no backward through a failed forward");
    ((float *)up->value.data)[3] = saved;

    // 2. An infinite gradient of layer 0 (as an overflowing backward would leave it).
    CHECK(NF_STEP(t, b1), "forward and backward");
    int64_t ik = -1;
    for (int64_t i = 0; i < ctl_model_param_count(m); i++)
        if (!strcmp(ctl_model_param(m, i)->name, "blk.0.attn_k.weight")) ik = i;
    CHECK(ik >= 0 && ctl_train_grad(t, ik), "the gradient of blk.0.attn_k.weight");
    if (ik < 0) return;
    ctl_train_grad(t, ik)[5] = -INFINITY;
    CHECK(ctl_train_step(t, NULL) == CTL_ERR_NONFINITE, "infinite gradient: the step fails");
    e = ctl_last_error(ctx);
    CHECK(strstr(e, "train_step (update 2)") && strstr(e, "gradient of 'blk.0.attn_k.weight' (layer 0) is -inf at element 5") &&
          strstr(e, "skipped"), "message: %s", e);
    CHECK(!memcmp(before, ctl_model_param(m, 0)->value.data, nbytes), "weights untouched");
    CHECK(ctl_train_step(t, NULL) == CTL_ERR_INVALID, "the gradients were dropped with the step");

    // 3. A NaN in a trainable weight no forward reads (an embedding row not in the batch): the
    //    step names it, and no checkpoint is written over the good one.
    int32_t unused = -1;
    for (int32_t v = 0; v < cfg.vocab_size && unused < 0; v++) {
        bool seen = false;
        for (int i = 0; i < 16; i++) seen |= tok[1][i] == v;
        if (!seen) unused = v;
    }
    CHECK(unused >= 0, "a token b1 does not use");
    ctl_param *emb = ctl_model_find(m, "token_embd.weight");
    float *row = (float *)emb->value.data + (int64_t)unused * cfg.n_embd;
    row[2] = INFINITY;
    CHECK(NF_STEP(t, b1), "forward and backward ignore the row");
    CHECK(ctl_train_step(t, NULL) == CTL_ERR_NONFINITE, "infinite weight: the step fails");
    char want[96];
    snprintf(want, sizeof want, "'token_embd.weight' holds inf at element %d", unused * (int)cfg.n_embd + 2);
    CHECK(strstr(ctl_last_error(ctx), want) != NULL, "message: %s (want %s)", ctl_last_error(ctx), want);
    CHECK(ctl_train_save(t, "build/nonfinite.ckpt", NULL) == CTL_ERR_NONFINITE && strstr(ctl_last_error(ctx), "nothing written"),
          "no checkpoint with an infinite weight: %s", ctl_last_error(ctx));
    size_t now_len = 0;
    char *now = read_file("build/nonfinite.ckpt", &now_len);
    FILE *tmp = fopen("build/nonfinite.ckpt.tmp", "rb");
    CHECK(good && now && now_len == good_len && !memcmp(good, now, good_len) && !tmp, "the good checkpoint is intact, no temporary file");
    if (tmp) fclose(tmp);
    free(now);
    row[2] = before[(size_t)(row + 2 - (float *)ctl_model_param(m, 0)->value.data)];
    CHECK(!memcmp(before, ctl_model_param(m, 0)->value.data, nbytes), "weights untouched");

    // 4. A step dropped by the caller (ctl_train_discard), then b1: the same weights as the
    //    reference's two steps, bit for bit; the skipped steps left nothing behind.
    CHECK(NF_STEP(t, b0), "forward and backward of a step to drop");
    ctl_train_discard(t);
    ctl_step_stats st;
    CHECK(NF_STEP(t, b1) && ctl_train_step(t, &st) == CTL_OK && st.step == 2, "step 2 after three skipped attempts");
    CHECK(!memcmp(ctl_model_param(ref, 0)->value.data, ctl_model_param(m, 0)->value.data, nbytes), "weights equal the reference's");
    CHECK(ctl_train_save(t, "build/nonfinite.ckpt", NULL) == CTL_OK, "and save again");
#undef NF_STEP
    free(good), free(before);
    ctl_train_free(t), ctl_train_free(tr);
    ctl_model_free(m), ctl_model_free(ref);
    ctl_ctx_free(ctx);
}

static void test_sampling(void) {
    float logits[5] = {0.1f, 2.0f, -1.0f, 2.0f, 0.5f};
    ctl_rng r;
    ctl_rng_seed(&r, 1);
    CHECK(ctl_sample_token(logits, 5, 0.0f, &r) == 1, "greedy takes the first maximum");
    int counts[5] = {0};
    for (int i = 0; i < 20000; i++) counts[ctl_sample_token(logits, 5, 1.0f, &r)]++;
    double z = exp(0.1) + 2 * exp(2.0) + exp(-1.0) + exp(0.5);
    for (int v = 0; v < 5; v++) {
        double want = exp(logits[v]) / z * 20000;
        CHECK(fabs(counts[v] - want) < 5 * sqrt(want) + 5, "token %d drawn %d times, expected %.0f", v, counts[v], want);
    }
}

#include "test_adapters.c"
#include "test_objectives.c"
#include "test_rewards.c"
#include "test_data.c"
#include "test_cli.c"
#include "test_chains.c"
#include "test_loops.c"

// ---- runner ----------------------------------------------------------------------------------

typedef struct test_entry {
    const char *name;
    void (*fn)(void);
} test_entry;

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0);   // a line at a time, also into a pipe or a log
    static const test_entry tests[] = {
        {"status and rng", test_status_and_rng},
        {"context: failures of ctl_ctx_init, to the logger", test_ctx_init_errors},
        {"descriptors: the _default() of those whose zero is not the default", test_desc_defaults},
        {"attention: a head size above 256 is refused", test_attention_head_limit},
        {"sparse selection: scores in a total order, NaN included", test_score_order},
        {"tokenizer: characters outside the byte alphabet detokenize as themselves; BOS and EOS in range", test_detokenize_outside_alphabet},
        {"arena", test_arena},
        {"parallel_for", test_parallel_for},
        {"gemm: packed kernels vs reference", test_gemm},
        {"exp8 (AVX2) vs exp", test_exp8},
        {"adamw: AVX2 vs portable", test_adamw_paths},
        {"kernels: forward vs double, backward vs finite differences", test_kernels},
        {"f16 and bf16 conversions", test_f16_bf16},
        {"gguf: a hand-made file, and every way to break it", test_gguf_tiny},
        {"gguf: files written by gguf-py, every tensor type", test_gguf_fixtures},
        {"gguf: writer round trip and encodings", test_gguf_roundtrip},
        {"f16, bf16 and q8_0 encodings vs gguf-py", test_encode_vs_gguf_py},
        {"gguf: models saved and loaded, vs transformers", test_model_gguf},
        {"safetensors: a file from the safetensors package, broken headers", test_safetensors_files},
        {"safetensors: Hugging Face model files, both RoPE layouts", test_model_safetensors},
        {"generation: KV cache vs the training forward, batched steps", test_infer_consistency},
        {"generation: shared prompts, continuous batching, batch-independent rows", test_generate_engine},
        {"generation: greedy continuations vs transformers", test_generate_vs_transformers},
        {"sampler: penalty, top-k, top-p, min-p, seeds, stops", test_sampler},
        {"SmolLM2-135M-Instruct (GGUF Q4_1, as fp32, kept quantised, as bf16) vs transformers", test_smollm2},
        {"tokenizer: SmolLM2 vs llama.cpp", test_smollm2_tokenizer},
        {"tokenizer: GPT-2, Llama-3 and Qwen2 vocabularies vs llama.cpp and Hugging Face", test_vocab_tokenizers},
        {"tokenizer: the class table equals the reference on every code point", test_class_table},
        {"tokenizer: BPE merges by heap (long pieces) equal the reference scan", test_bpe_heap},
        {"chat templates: SmolLM2, Qwen2 (ChatML) and Llama-3 vs Jinja", test_chat_templates},
        {"stop strings", test_stop_strings},
        {"fixture: gpt2 vs transformers", test_fixture_gpt2},
        {"fixture: llama (GQA) vs transformers", test_fixture_llama},
        {"fixture: llama (tied) vs transformers", test_fixture_llama_tied},
        {"lr schedule vs transformers", test_lr_schedule},
        {"rope: adjacent == halves with permuted weights", test_rope_layouts},
        {"model: directional finite differences", test_model_gradcheck},
        {"determinism: 1, 2, 3 threads", test_determinism},
        {"memory plan", test_memory_plan},
        {"frozen parameters", test_frozen},
        {"gradient accumulation", test_grad_accumulation},
        {"gemm: quantised and bf16 weights vs dequantised reference", test_quant_gemm},
        {"gemm: bf16 weights with bf16 dot products (AVX512_BF16)", test_bf16_dot},
        {"adapters: directional finite differences", test_adapter_gradcheck},
        {"quantised and bf16 bases: the same model as its fp32 load", test_quantized_model},
        {"adapters: generation, switched off, merged, unmerged, saved merged", test_adapter_forwards},
        {"adapters: memory plan, freezing, sparse selection", test_adapter_bookkeeping},
        {"adapters: PEFT files, loss and gradients vs PEFT", test_peft_fixtures},
        {"adapters: cotlab files, composing, resuming, bad files", test_adapter_files},
        {"objectives: SFT, DPO family, GRPO family vs TRL", test_objectives_vs_trl},
        {"objectives: temperature and entropy in the LM head", test_temperature_entropy},
        {"objectives: a GRPO and a DPO step, finite differences through the model", test_objectives_end_to_end},
        {"objectives: bad input", test_objective_errors},
        {"objectives: assistant-only masks for chat data", test_chat_masks},
        {"rewards: answers extracted from 65 completions, format, length", test_reward_extract},
        {"rewards: callbacks, pass@k, majority vote", test_eval_helpers},
        {"rollouts: groups of completions as training rows", test_rollout},
        {"loops: batches from a dataset, an SFT step", test_batcher},
        {"loops: a GRPO step through ctl_rl equals the command line's old loop", test_rl_vs_old_loop},
        {"loops: bad input to the RL step", test_rl_bad_input},
        {"datasets: every format, GSM8K, malformed lines, shuffling", test_datasets},
        {"datasets: encoding examples, batch rows", test_example_encode},
        {"packing: documents in one row train as they would alone", test_packing},
        {"demo task: modular chains, the imperfect teacher, the split", test_chains},
        {"demo: the quick run end to end (chain-of-thought beats direct, GRPO does not lower accuracy)", test_demo_quick},
        {"command line: every subcommand end to end, resume, exports, bad input", test_cli},
        {"bad input", test_errors},
        {"hardening: sizes, samplers, non-finite inference, checkpoints of other runs", test_hardening},
        {"non-finite guards: named, the step skipped, no checkpoint", test_nonfinite},
        {"sampling", test_sampling},
    };
    int passed = 0, failed = 0;
    ctl_rng_seed(&g_rng, 20261125);
    for (size_t i = 0; i < sizeof tests / sizeof tests[0]; i++) {
        bool wanted = argc == 1;   // with arguments: the tests whose name contains one of them
        for (int a = 1; a < argc; a++) wanted = wanted || strstr(tests[i].name, argv[a]);
        if (!wanted) continue;
        g_fail = 0;
        printf("%s\n", tests[i].name);
        tests[i].fn();
        printf("  %s\n", g_fail ? "FAIL" : "ok");
        if (g_fail) failed++;
        else passed++;
    }
    printf("%d passed, %d failed\n", passed, failed);
    return failed ? 1 : 0;
}
