// The CUDA backend's table of kernels against the CPU's kernels: every entry on fresh random inputs (a new seed each run,
// printed; CTL_TEST_SEED=n repeats one), device outputs poisoned with NaN before each call
// (accumulated ones start from the same random values as the CPU's), and the largest
// difference over the largest CPU value held to the kernel's bound.
//
// Built two ways: against cotlab_cuda.cu compiled by nvcc (make test-cuda, on a GPU; it skips,
// saying why, where there is none), and against the same file compiled for the CPU emulator of
// tests/cuda_emu.h (make test-cuda-emu, anywhere), which checks the kernels' logic.
#define COTLAB_IMPLEMENTATION
#include "../cotlab.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static int n_pass, n_fail;
static ctl_ctx *cpu, *gpu;
static ctl_rng rng;
static const char *filter;
static double tol_f32 = 1e-5;
static const ctl__kernels *K = &ctl__cuda_kernels;   // what cotlab_cuda.cu exports

// Why a ctl_ctx_init failed: it has no context to keep the reason in, so it tells the desc's
// logger, which keeps the last error here.
static char init_why[512];
static void keep_why(ctl_log_level level, const char *msg, void *user) {
    (void)user;
    if (level == CTL_LOG_ERROR) snprintf(init_why, sizeof init_why, "%s", msg);
}

static ctl_ctx_desc cuda_desc(void) {
    ctl_ctx_desc d = ctl_ctx_desc_default();
    d.device = CTL_DEVICE_CUDA, d.logger.func = keep_why;
    return d;
}

#define CHECK(cond, ...)                                         \
    do {                                                         \
        if (cond) n_pass++;                                      \
        else {                                                   \
            n_fail++;                                            \
            printf("  FAIL %s:%d: ", __FILE__, __LINE__);        \
            printf(__VA_ARGS__);                                 \
            printf("\n");                                        \
        }                                                        \
    } while (0)

// ---- buffers ---------------------------------------------------------------------------------

static float *rnd(int64_t n, float scale) {
    float *x = (float *)malloc((size_t)(n ? n : 1) * sizeof(float));
    for (int64_t i = 0; i < n; i++) x[i] = scale * ctl_rng_normal(&rng);
    return x;
}

static float *copy_of(const float *x, int64_t n) {
    float *y = (float *)malloc((size_t)(n ? n : 1) * sizeof(float));
    memcpy(y, x, (size_t)n * sizeof(float));
    return y;
}

static void *dev_bytes(size_t n) {
    void *p = ctl_device_alloc(gpu, n);
    if (!p) {
        printf("  device alloc: %s\n", ctl_last_error(gpu));
        abort();
    }
    return p;
}

static void *up_bytes(const void *h, size_t n) {
    void *d = dev_bytes(n);
    ctl_copy_to_device(gpu, d, h, n);
    return d;
}

static float *up(const float *h, int64_t n) { return (float *)up_bytes(h, (size_t)n * sizeof(float)); }

// A device output that the kernel must overwrite: every byte 0xFF (a NaN).
static float *poisoned(int64_t n) {
    size_t b = (size_t)(n ? n : 1) * sizeof(float);
    unsigned char *h = (unsigned char *)malloc(b);
    memset(h, 0xFF, b);
    float *d = (float *)up_bytes(h, b);
    free(h);
    return d;
}

static float *down(const float *d, int64_t n) {
    float *h = (float *)malloc((size_t)(n ? n : 1) * sizeof(float));
    ctl_status st = ctl_device_sync(gpu);
    if (st) printf("  device: %s\n", ctl_last_error(gpu));
    ctl_copy_to_host(gpu, h, d, (size_t)n * sizeof(float));
    return h;
}

// max |got - want| / max |want| (0/0 = 0); a NaN or infinity on either side counts as an
// infinite error (the references here are finite: a non-finite one is a failure too).
static double rel_err(const float *got, const float *want, int64_t n) {
    double diff = 0.0, scale = 0.0;
    for (int64_t i = 0; i < n; i++) {
        if (!isfinite(got[i]) || !isfinite(want[i])) return INFINITY;
        diff = fmax(diff, fabs((double)got[i] - want[i]));
        scale = fmax(scale, fabs((double)want[i]));
    }
    return scale > 0.0 ? diff / scale : diff;
}

// Compares device array d with host array want and frees the download.
static void expect(const char *what, const float *d, const float *want, int64_t n, double tol) {
    float *got = down(d, n);
    double e = rel_err(got, want, n);
    CHECK(e <= tol, "%s: relative error %.3g > %.3g", what, e, tol);
    free(got);
}

static bool wanted(const char *name) { return !filter || strstr(name, filter); }

// ---- products --------------------------------------------------------------------------------

static void test_gemm(void) {
    const int64_t shapes[][3] = {{1, 1, 1}, {7, 13, 5}, {33, 17, 64}, {64, 1, 300}, {1, 50, 7}, {20, 9, 0}};
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++)
        for (int layout = 0; layout < 6; layout++)
            for (int acc = 0; acc < 2; acc++) {
                int64_t M = shapes[s][0], N = shapes[s][1], K = shapes[s][2], pad = layout == 4 ? 3 : 0;
                // layouts: 0 A B, 1 A B^T, 2 A^T B, 3 A^T B^T, 4 every stride 2 (the plain kernel), padded C,
                // 5 overlapping rows (every stride 1: the plain kernel, cuBLAS cannot take it)
                int64_t a_rs = K, a_cs = 1, b_rs = N, b_cs = 1;
                if (layout == 2 || layout == 3) a_rs = 1, a_cs = M;
                if (layout == 1 || layout == 3) b_rs = 1, b_cs = K;
                if (layout == 4) a_rs = 2 * K, a_cs = 2, b_rs = 2 * N, b_cs = 2;
                if (layout == 5) a_rs = a_cs = b_rs = b_cs = 1;
                int64_t na = 2 * M * K + 1, nb = 2 * K * N + 1, ldc = N + pad, nc = M * ldc;
                float *a = rnd(na, 1.0f), *b = rnd(nb, 1.0f), *c = rnd(nc, 1.0f), *want = copy_of(c, nc);
                ctl_gemm_ref(M, N, K, a, a_rs, a_cs, b, b_rs, b_cs, want, ldc, acc);
                float *da = up(a, na), *db = up(b, nb), *dc = acc ? up(c, nc) : poisoned(nc);
                if (!acc && pad) {   // the padding is not the kernel's to write: give it the CPU's values
                    for (int64_t m = 0; m < M; m++) ctl_copy_to_device(gpu, dc + m * ldc + N, c + m * ldc + N, (size_t)pad * 4);
                    for (int64_t m = 0; m < M; m++) memcpy(want + m * ldc + N, c + m * ldc + N, (size_t)pad * 4);
                }
                size_t mark = ctl_device_mark(gpu);
                ctl__cuda_kernels.gemm(gpu, M, N, K, da, a_rs, a_cs, db, b_rs, b_cs, dc, ldc, acc);
                char what[96];
                snprintf(what, sizeof what, "gemm %lldx%lldx%lld layout %d%s", (long long)M, (long long)N, (long long)K, layout,
                         acc ? " +=" : "");
                expect(what, dc, want, nc, tol_f32);
                ctl_device_release(gpu, mark);
                free(a), free(b), free(c), free(want);
            }
}

static void test_matmul(void) {
    int64_t N = 37, C = 45, OC = 29;
    float *x = rnd(N * C, 1.0f), *w = rnd(OC * C, 0.3f), *bias = rnd(OC, 1.0f), *dout = rnd(N * OC, 1.0f);
    float *out = rnd(N * OC, 1.0f), *dx = rnd(N * C, 1.0f), *dw = rnd(OC * C, 1.0f), *db = rnd(OC, 1.0f);
    float *ddx = up(dx, N * C), *ddw = up(dw, OC * C), *ddb = up(db, OC), *dout_d = poisoned(N * OC);
    float *dxd = up(x, N * C), *dwd = up(w, OC * C), *dbias = up(bias, OC), *ddo = up(dout, N * OC);
    ctl_matmul_forward(cpu, out, x, w, bias, N, C, OC);
    ctl_matmul_backward(cpu, dx, dw, db, dout, x, w, N, C, OC);
    K->linear_forward(gpu, dout_d, dxd, CTL_F32, dwd, dbias, N, C, OC);
    K->linear_backward(gpu, ddx, ddo, CTL_F32, dwd, N, C, OC);
    K->linear_dw(gpu, ddw, ddb, ddo, OC, dxd, N, C, OC);
    expect("matmul forward", dout_d, out, N * OC, tol_f32);
    expect("matmul backward dinp", ddx, dx, N * C, tol_f32);
    expect("matmul backward dw", ddw, dw, OC * C, tol_f32);
    expect("matmul backward dbias", ddb, db, OC, tol_f32);
    free(x), free(w), free(bias), free(dout), free(out), free(dx), free(dw), free(db);
}

// A weight (OC, C) stored as `type`: random blocks with scales spread over many binades.
static void *typed_weight(ctl_dtype type, int64_t OC, int64_t C) {
    size_t bytes = ctl_dtype_bytes(type, OC * C);
    unsigned char *w = (unsigned char *)malloc(bytes);
    if (type == CTL_F32 || type == CTL_BF16) {
        float *f = rnd(OC * C, 0.3f);
        for (int64_t i = 0; i < OC * C; i++)
            if (type == CTL_F32) memcpy(w + 4 * i, &f[i], 4);
            else {
                uint16_t h = ctl_f32_to_bf16(f[i]);
                memcpy(w + 2 * i, &h, 2);
            }
        free(f);
        return w;
    }
    size_t bs = ctl_dtype_bytes(type, 32);
    for (size_t b = 0; b < bytes / bs; b++) {
        unsigned char *p = w + b * bs;
        for (size_t i = 0; i < bs; i++) p[i] = (unsigned char)(ctl_rng_next(&rng) >> 56);
        uint16_t d = ctl_f32_to_f16(ldexpf(ctl_rng_uniform(&rng) + 0.5f, -(int)(ctl_rng_next(&rng) % 12)));
        memcpy(p, &d, 2);
        if (type == CTL_Q4_1) {
            uint16_t m = ctl_f32_to_f16(-0.1f * ctl_rng_uniform(&rng));
            memcpy(p + 2, &m, 2);
        }
    }
    return w;
}

static void test_matmul_typed(void) {
    const ctl_dtype types[] = {CTL_F32, CTL_BF16, CTL_Q8_0, CTL_Q4_0, CTL_Q4_1};
    int64_t N = 11, C = 96, OC = 19;
    for (size_t t = 0; t < 5; t++) {
        ctl_dtype type = types[t];
        void *w = typed_weight(type, OC, C);
        float *x = rnd(N * C, 1.0f), *bias = rnd(OC, 1.0f), *dout = rnd(N * OC, 1.0f), *dx = rnd(N * C, 1.0f);
        float *out = (float *)malloc((size_t)(N * OC) * 4);
        for (int64_t n = 0; n < N; n++) memcpy(out + n * OC, bias, (size_t)OC * 4);
        ctl__gemm_wt(cpu, N, OC, C, x, C, type, w, out, OC, true);
        float *ddx = up(dx, N * C);
        ctl__gemm_wn(cpu, N, C, OC, dout, OC, type, w, dx, C, true);
        void *dw = up_bytes(w, ctl_dtype_bytes(type, OC * C));
        float *dxin = up(x, N * C), *dbias = up(bias, OC), *dout_d = up(dout, N * OC), *dy = poisoned(N * OC);
        K->linear_forward(gpu, dy, dxin, type, dw, dbias, N, C, OC);
        K->linear_backward(gpu, ddx, dout_d, type, dw, N, C, OC);
        char what[64];
        snprintf(what, sizeof what, "typed matmul %s forward", ctl_dtype_name(type));
        expect(what, dy, out, N * OC, tol_f32);
        snprintf(what, sizeof what, "typed matmul %s backward", ctl_dtype_name(type));
        expect(what, ddx, dx, N * C, tol_f32);
        free(w), free(x), free(bias), free(dout), free(dx), free(out);
    }
}

// bf16 x bf16 on tensor cores (bf16_dot): against the fp32 product, within 1e-2.
static void test_matmul_bf16_dot(void) {
    ctl_ctx *g2;
    ctl_ctx_desc d = cuda_desc();
    d.device_memory = 64 << 20, d.bf16_dot = true;
    if (ctl_ctx_init(&g2, &d)) {
        CHECK(false, "a second CUDA context: %s", init_why);
        return;
    }
    int64_t N = 9, C = 70, OC = 33;
    void *w = typed_weight(CTL_BF16, OC, C);
    float *x = rnd(N * C, 1.0f), *out = (float *)malloc((size_t)(N * OC) * 4);
    ctl__gemm_wt(cpu, N, OC, C, x, C, CTL_BF16, w, out, OC, false);
    void *dw = ctl_device_alloc(g2, ctl_dtype_bytes(CTL_BF16, OC * C));
    float *dx = (float *)ctl_device_alloc(g2, (size_t)(N * C) * 4), *dy = (float *)ctl_device_alloc(g2, (size_t)(N * OC) * 4);
    ctl_copy_to_device(g2, dw, w, ctl_dtype_bytes(CTL_BF16, OC * C));
    ctl_copy_to_device(g2, dx, x, (size_t)(N * C) * 4);
    K->linear_forward(g2, dy, dx, CTL_BF16, dw, NULL, N, C, OC);
    float *got = (float *)malloc((size_t)(N * OC) * 4);
    CHECK(!ctl_device_sync(g2), "bf16 product: %s", ctl_last_error(g2));
    ctl_copy_to_host(g2, got, dy, (size_t)(N * OC) * 4);
    double e = rel_err(got, out, N * OC);
    CHECK(e <= 1e-2, "bf16 x bf16 product: relative error %.3g > 1e-2", e);
    free(w), free(x), free(out), free(got);
    ctl_ctx_free(g2);
}

// ---- rows and elements -----------------------------------------------------------------------

static void test_embedding(void) {
    int64_t B = 3, T = 7, C = 45, V = 11;
    int32_t tok[21], at[21];   // token, position
    for (int i = 0; i < B * T; i++) tok[i] = (int32_t)(ctl_rng_next(&rng) % (uint64_t)V), at[i] = (int32_t)(i % T);
    for (int pos = 0; pos < 2; pos++) {
        float *wte = rnd(V * C, 1.0f), *wpe = pos ? rnd(T * C, 1.0f) : NULL, *out = (float *)malloc((size_t)(B * T * C) * 4);
        float *dout = rnd(B * T * C, 1.0f), *dwte = rnd(V * C, 1.0f), *dwpe = pos ? rnd(T * C, 1.0f) : NULL;
        float *ddwte = up(dwte, V * C), *ddwpe = pos ? up(dwpe, T * C) : NULL;
        ctl_embedding_forward(out, tok, wte, wpe, B, T, C);
        ctl_embedding_backward(dwte, dwpe, dout, tok, B, T, C);
        int32_t *dtok = (int32_t *)up_bytes(tok, sizeof tok), *dat = (int32_t *)up_bytes(at, sizeof at);
        float *dy = poisoned(B * T * C);
        K->embedding_forward(gpu, dy, dtok, dat, CTL_F32, up(wte, V * C), pos ? up(wpe, T * C) : NULL, B * T, C);
        K->embedding_backward(gpu, ddwte, ddwpe, up(dout, B * T * C), dtok, dat, B * T, C);
        expect(pos ? "embedding forward (with positions)" : "embedding forward", dy, out, B * T * C, tol_f32);
        expect("embedding backward dwte", ddwte, dwte, V * C, tol_f32);
        if (pos) expect("embedding backward dwpe", ddwpe, dwpe, T * C, tol_f32);
        free(wte), free(wpe), free(out), free(dout), free(dwte), free(dwpe);
    }
}

static void test_norms(void) {
    const int64_t Cs[] = {1, 77, 300};
    for (int ci = 0; ci < 3; ci++) {
        int64_t N = 19, C = Cs[ci];
        float *x = rnd(N * C, 2.0f), *w = rnd(C, 1.0f), *b = rnd(C, 1.0f), *dout = rnd(N * C, 1.0f);
        float *out = (float *)malloc((size_t)(N * C) * 4), *mean = (float *)malloc((size_t)N * 4), *rstd = (float *)malloc((size_t)N * 4);
        float *dx = rnd(N * C, 1.0f), *dw = rnd(C, 1.0f), *db = rnd(C, 1.0f);
        float *ddx = up(dx, N * C), *ddw = up(dw, C), *ddb = up(db, C);
        float *dxin = up(x, N * C), *dwt = up(w, C), *dbt = up(b, C), *ddo = up(dout, N * C);
        float *dy = poisoned(N * C), *dmean = poisoned(N), *drstd = poisoned(N);
        ctl_layernorm_forward(cpu, out, mean, rstd, x, w, b, N, C, 1e-5f);
        ctl_layernorm_backward(cpu, dx, dw, db, dout, x, w, mean, rstd, N, C);
        K->layernorm_forward(gpu, dy, dmean, drstd, dxin, dwt, dbt, N, C, 1e-5f);
        K->layernorm_backward(gpu, ddx, ddw, ddb, ddo, dxin, dwt, dmean, drstd, N, C);
        expect("layernorm forward", dy, out, N * C, tol_f32);
        expect("layernorm mean", dmean, mean, N, tol_f32);
        expect("layernorm rstd", drstd, rstd, N, tol_f32);
        expect("layernorm backward dinp", ddx, dx, N * C, tol_f32);
        expect("layernorm backward dw", ddw, dw, C, tol_f32);
        expect("layernorm backward db", ddb, db, C, tol_f32);
        float *dx2 = rnd(N * C, 1.0f), *dw2 = rnd(C, 1.0f);
        float *ddx2 = up(dx2, N * C), *ddw2 = up(dw2, C), *dy2 = poisoned(N * C), *drs2 = poisoned(N);
        ctl_rmsnorm_forward(cpu, out, rstd, x, w, N, C, 1e-6f);
        ctl_rmsnorm_backward(cpu, dx2, dw2, dout, x, w, rstd, N, C);
        K->rmsnorm_forward(gpu, dy2, drs2, dxin, dwt, N, C, 1e-6f);
        K->rmsnorm_backward(gpu, ddx2, ddw2, ddo, dxin, dwt, drs2, N, C);
        expect("rmsnorm forward", dy2, out, N * C, tol_f32);
        expect("rmsnorm rstd", drs2, rstd, N, tol_f32);
        expect("rmsnorm backward dinp", ddx2, dx2, N * C, tol_f32);
        expect("rmsnorm backward dw", ddw2, dw2, C, tol_f32);
        free(x), free(w), free(b), free(dout), free(out), free(mean), free(rstd), free(dx), free(dw), free(db), free(dx2), free(dw2);
    }
}

static void test_rope(void) {
    int64_t B = 2, T = 9, H = 3, HS = 8, stride = H * HS + 5, n = B * T * stride;
    float cs[9 * 4], sn[9 * 4];
    ctl_rope_table(cs, sn, T, HS, 10000.0f);
    float *dcs = up(cs, T * HS / 2), *dsn = up(sn, T * HS / 2);
    for (int layout = 0; layout < 2; layout++)
        for (int back = 0; back < 2; back++) {
            float *x = rnd(n, 1.0f), *dx = up(x, n);
            ctl_rope_layout l = layout ? CTL_ROPE_HALVES : CTL_ROPE_ADJACENT;
            int32_t pos[2 * 9];   // rows 0..T-1 of each batch row, then packed documents
            for (int64_t i = 0; i < B * T; i++) pos[i] = (int32_t)(i % T);
            const int32_t *dp = (const int32_t *)up_bytes(pos, sizeof pos);
            if (back) ctl_rope_backward(x, cs, sn, B, T, H, HS, stride, l), K->rope_backward(gpu, dx, dcs, dsn, dp, B * T, H, HS, stride, l);
            else ctl_rope_forward(x, cs, sn, B, T, H, HS, stride, l), K->rope_forward(gpu, dx, dcs, dsn, dp, B * T, H, HS, stride, l);
            expect(back ? "rope backward" : "rope forward", dx, x, n, tol_f32);
            free(x);
            // rows at their own positions (packed documents), against the CPU's packed rotation
            for (int64_t i = 0; i < B * T; i++) pos[i] = i % T == 0 || ctl_rng_next(&rng) % 3 == 0 ? 0 : pos[i - 1] + 1;
            dp = (const int32_t *)up_bytes(pos, sizeof pos);
            x = rnd(n, 1.0f), dx = up(x, n);
            ctl__rope(x, cs, sn, B, T, H, HS, stride, l, back ? -1.0f : 1.0f, pos);
            if (back) K->rope_backward(gpu, dx, dcs, dsn, dp, B * T, H, HS, stride, l);
            else K->rope_forward(gpu, dx, dcs, dsn, dp, B * T, H, HS, stride, l);
            expect(back ? "rope rows backward (packed)" : "rope rows (packed)", dx, x, n, tol_f32);
            free(x);
        }
}

// Causal attention, and packed: documents of random lengths in each row (pos restarting at 0;
// short ones, about 4 rows, and long ones, about 40, which span the kernels' 32-row tiles),
// against the CPU's masking. The shapes cross tiles (T = 33, 70, 100), run each of the
// kernels' dims-per-lane variants (HS up to 64, 128, 256; 256 needs more than 48 KiB of
// shared memory) and group query heads (NH / NKV = 1 to 4).
static void test_attention(void) {
    const int64_t cfg[][5] = {{2, 37, 4, 2, 24}, {1, 70, 3, 1, 72}, {1, 1, 2, 2, 8}, {1, 33, 2, 1, 256}, {2, 5, 6, 3, 1},
                              {1, 100, 4, 1, 64}, {2, 65, 2, 2, 128}};
    for (int packed = 0; packed < 3; packed++)
        for (size_t k = 0; k < sizeof cfg / sizeof cfg[0]; k++) {
            int64_t B = cfg[k][0], T = cfg[k][1], NH = cfg[k][2], NKV = cfg[k][3], HS = cfg[k][4];
            int64_t nq = B * T * (NH + 2 * NKV) * HS, no = B * T * NH * HS, nl = B * NH * T;
            float *qkv = rnd(nq, 1.0f), *out = (float *)malloc((size_t)no * 4), *lse = (float *)malloc((size_t)nl * 4);
            float *dout = rnd(no, 1.0f), *dqkv = rnd(nq, 1.0f), *ddqkv = up(dqkv, nq);
            int32_t *pos = (int32_t *)malloc((size_t)(B * T) * sizeof(int32_t)), *P = packed ? pos : NULL;
            for (int64_t i = 0; i < B * T; i++)
                pos[i] = i % T == 0 || ctl_rng_next(&rng) % (packed == 2 ? 40 : 4) == 0 ? 0 : pos[i - 1] + 1;
            ctl__attention_forward(cpu, out, lse, qkv, P, B, T, NH, NKV, HS);
            ctl__attention_backward(cpu, dqkv, dout, qkv, out, lse, P, B, T, NH, NKV, HS);
            float *dq = up(qkv, nq), *dy = poisoned(no), *dl = poisoned(nl), *ddo = up(dout, no);
            const int32_t *dp = packed ? (const int32_t *)up_bytes(pos, (size_t)(B * T) * sizeof(int32_t)) : NULL;
            K->attention_forward(gpu, dy, dl, dq, dp, B, T, NH, NKV, HS);
            K->attention_backward(gpu, ddqkv, ddo, dq, dy, dl, dp, B, T, NH, NKV, HS);
            char what[96];
            const char *kind = packed == 2 ? " packed, long documents" : packed ? " packed" : "";
            snprintf(what, sizeof what, "attention%s B%lld T%lld NH%lld NKV%lld HS%lld", kind, (long long)B,
                     (long long)T, (long long)NH, (long long)NKV, (long long)HS);
            expect(what, dy, out, no, tol_f32);
            expect("  its lse", dl, lse, nl, tol_f32);
            expect("  its backward", ddqkv, dqkv, nq, tol_f32);
            free(qkv), free(out), free(lse), free(dout), free(dqkv), free(pos);
        }
}

static void test_elementwise(void) {
    int64_t N = 13, FF = 301, n = N * FF;
    float *x = rnd(2 * n, 2.0f), *y = rnd(n, 1.0f), *dout = rnd(n, 1.0f), *out = (float *)malloc((size_t)n * 4);
    float *dx = rnd(2 * n, 1.0f), *ddx = up(dx, 2 * n), *dxin = up(x, 2 * n), *ddo = up(dout, n), *dyv = up(y, n);
    float *dy = poisoned(n);
    ctl_gelu_forward(cpu, out, x, n), ctl_gelu_backward(cpu, dx, dout, x, n);
    K->gelu_forward(gpu, dy, dxin, n), K->gelu_backward(gpu, ddx, ddo, dxin, n);
    expect("gelu forward", dy, out, n, tol_f32);
    expect("gelu backward", ddx, dx, n, tol_f32);
    float *dx2 = rnd(2 * n, 1.0f), *ddx2 = up(dx2, 2 * n), *dy2 = poisoned(n);
    ctl_swiglu_forward(cpu, out, x, N, FF), ctl_swiglu_backward(cpu, dx2, dout, x, N, FF);
    K->swiglu_forward(gpu, dy2, dxin, N, FF), K->swiglu_backward(gpu, ddx2, ddo, dxin, N, FF);
    expect("swiglu forward", dy2, out, n, tol_f32);
    expect("swiglu backward", ddx2, dx2, 2 * n, tol_f32);
    float *dy3 = poisoned(n);
    ctl_residual_forward(out, x, y, n);
    K->residual_forward(gpu, dy3, dxin, dyv, n);
    expect("residual forward", dy3, out, n, tol_f32);
    float *s = copy_of(y, n);
    for (int64_t i = 0; i < n; i++) s[i] *= 0.37f;
    K->scale(gpu, dyv, n, 0.37f);
    expect("scale", dyv, s, n, 0.0);
    // Work over nothing launches nothing (a grid of 0 blocks is not a configuration CUDA accepts).
    K->zero(gpu, dyv, 0), K->scale(gpu, dyv, 0, 2.0f), K->gelu_forward(gpu, dy, dxin, 0), K->residual_forward(gpu, dy3, dxin, dyv, 0);
    K->swiglu_forward(gpu, dy2, dxin, 0, FF), K->dropout(gpu, dy, dxin, 0, 0.1f, 7, false);
    K->linear_forward(gpu, dy, dxin, CTL_F32, dxin, NULL, 0, 4, 4);
    CHECK(ctl_device_sync(gpu) == CTL_OK, "zero-size work: %s", ctl_last_error(gpu));
    free(x), free(y), free(dout), free(out), free(dx), free(dx2), free(s);
}

static void test_lmhead(void) {
    int64_t N = 13, C = 40, V = 517, chunk = 5;
    float inv_temp = 0.7f;
    float *x = rnd(N * C, 1.0f), *w = rnd(V * C, 0.5f), *dlogp = rnd(N, 1.0f);
    int32_t tgt[13];
    for (int i = 0; i < N; i++) tgt[i] = (int32_t)(ctl_rng_next(&rng) % (uint64_t)V);
    dlogp[3] = dlogp[4] = 0.0f;   // the CPU skips such rows; the device computes them as zeros
    float *logp = (float *)malloc((size_t)N * 4), *lse = (float *)malloc((size_t)N * 4), *dx = rnd(N * C, 1.0f), *dw = rnd(V * C, 1.0f);
    float *scratch = (float *)malloc((size_t)(chunk * (V + 2 * C + 2)) * 4);
    float *ddx = up(dx, N * C), *ddw = up(dw, V * C);
    ctl_lmhead_forward(cpu, logp, lse, x, w, tgt, N, C, V, inv_temp, scratch, chunk);
    ctl_lmhead_backward(cpu, dx, dw, dlogp, x, w, tgt, lse, N, C, V, inv_temp, scratch, chunk);
    float *dxin = up(x, N * C), *dwt = up(w, V * C), *dlp = poisoned(N), *dls = poisoned(N);
    int32_t *dtgt = (int32_t *)up_bytes(tgt, sizeof tgt);
    ctl__head hd;
    memset(&hd, 0, sizeof hd);
    hd.type = CTL_F32, hd.w = dwt;
    K->lmhead_forward(gpu, dlp, dls, NULL, dxin, &hd, dtgt, N, C, V, inv_temp, NULL, chunk);
    K->lmhead_backward(gpu, ddx, ddw, up(dlogp, N), dxin, &hd, dtgt, dls, N, C, V, inv_temp, NULL, chunk);
    expect("lm head logp", dlp, logp, N, tol_f32);
    expect("lm head lse", dls, lse, N, tol_f32);
    expect("lm head backward dx", ddx, dx, N * C, tol_f32);
    expect("lm head backward dw", ddw, dw, V * C, tol_f32);
    free(x), free(w), free(dlogp), free(logp), free(lse), free(dx), free(dw), free(scratch);
}

// LoRA against the same products on the CPU, in the layout the model uses (out rows of stride ldo).
static void test_lora(void) {
    int64_t N = 21, C = 37, OC = 23, R = 5, ldo = OC + 4;
    float scale = 1.7f;
    float *x = rnd(N * C, 1.0f), *A = rnd(R * C, 0.4f), *Bm = rnd(OC * R, 0.4f), *out = rnd(N * ldo, 1.0f), *dy = rnd(N * ldo, 1.0f);
    float *h = (float *)malloc((size_t)(N * R) * 4), *dh = (float *)malloc((size_t)(N * R) * 4);
    float *dx = rnd(N * C, 1.0f), *dA = rnd(R * C, 1.0f), *dB = rnd(OC * R, 1.0f);
    float *dout = up(out, N * ldo), *ddx = up(dx, N * C), *ddA = up(dA, R * C), *ddB = up(dB, OC * R);
    ctl_gemm_ref(N, R, C, x, C, 1, A, 1, C, h, R, false);
    for (int64_t i = 0; i < N * R; i++) h[i] *= scale;
    ctl_gemm_ref(N, OC, R, h, R, 1, Bm, 1, R, out, ldo, true);
    ctl_gemm_ref(OC, R, N, dy, 1, ldo, h, R, 1, dB, R, true);
    ctl_gemm_ref(N, R, OC, dy, ldo, 1, Bm, R, 1, dh, R, false);
    for (int64_t i = 0; i < N * R; i++) dh[i] *= scale;
    ctl_gemm_ref(R, C, N, dh, 1, R, x, C, 1, dA, C, true);
    ctl_gemm_ref(N, C, R, dh, R, 1, A, C, 1, dx, C, true);
    float *dxin = up(x, N * C), *dAw = up(A, R * C), *dBw = up(Bm, OC * R), *dh_d = poisoned(N * R), *ddh = poisoned(N * R);
    K->lora_forward(gpu, dout, ldo, dh_d, dxin, dAw, dBw, N, C, OC, R, scale);
    K->lora_backward(gpu, ddx, ddA, ddB, ddh, up(dy, N * ldo), ldo, dxin, dh_d, dAw, dBw, N, C, OC, R, scale);
    expect("lora forward h", dh_d, h, N * R, tol_f32);
    expect("lora forward out", dout, out, N * ldo, tol_f32);
    expect("lora backward dh", ddh, dh, N * R, tol_f32);
    expect("lora backward dA", ddA, dA, R * C, tol_f32);
    expect("lora backward dB", ddB, dB, OC * R, tol_f32);
    expect("lora backward dx", ddx, dx, N * C, tol_f32);
    free(x), free(A), free(Bm), free(out), free(dy), free(h), free(dh), free(dx), free(dA), free(dB);
}

// Sparse deltas against float64 loops over the entries.
static void test_sparse(void) {
    int64_t N = 17, C = 29, OC = 13, ld = OC + 3, n = 40;
    int32_t rows[40], cols[40];
    for (int k = 0; k < n; k++) rows[k] = (int32_t)(ctl_rng_next(&rng) % (uint64_t)OC), cols[k] = (int32_t)(ctl_rng_next(&rng) % (uint64_t)C);
    float *x = rnd(N * C, 1.0f), *v = rnd(n, 1.0f), *y = rnd(N * ld, 1.0f), *dy = rnd(N * ld, 1.0f), *dx = rnd(N * C, 1.0f), *dv = rnd(n, 1.0f);
    float *dyd = up(y, N * ld), *ddx = up(dx, N * C), *ddv = up(dv, n);
    for (int64_t r = 0; r < N; r++) {
        double acc[64] = {0}, accx[64] = {0};
        for (int k = 0; k < n; k++) acc[rows[k]] += (double)v[k] * x[r * C + cols[k]], accx[cols[k]] += (double)v[k] * dy[r * ld + rows[k]];
        for (int64_t o = 0; o < OC; o++) y[r * ld + o] = (float)(y[r * ld + o] + acc[o]);
        for (int64_t c = 0; c < C; c++) dx[r * C + c] = (float)(dx[r * C + c] + accx[c]);
    }
    for (int k = 0; k < n; k++) {
        double s = 0.0;
        for (int64_t r = 0; r < N; r++) s += (double)dy[r * ld + rows[k]] * x[r * C + cols[k]];
        dv[k] = (float)(dv[k] + s);
    }
    int32_t *drows = (int32_t *)up_bytes(rows, sizeof rows), *dcols = (int32_t *)up_bytes(cols, sizeof cols);
    float *dxin = up(x, N * C), *dvw = up(v, n);
    K->sparse_forward(gpu, dyd, ld, dxin, dvw, drows, dcols, n, N, C);
    K->sparse_backward(gpu, ddx, ddv, up(dy, N * ld), ld, dxin, dvw, drows, dcols, n, N, C);
    expect("sparse forward", dyd, y, N * ld, tol_f32);
    expect("sparse backward dx", ddx, dx, N * C, tol_f32);
    expect("sparse backward dv", ddv, dv, n, tol_f32);
    free(x), free(v), free(y), free(dy), free(dx), free(dv);
}

// AdamW and the sum of squares over a trainer's parameters as the optimiser's entries see them:
// two arrays (one with weight decay, one without, of awkward lengths), against the CPU's
// ctl_adamw_update over three steps; each step leaves the device's gradients at zero.
static void test_optimiser(void) {
    int64_t len[2] = {1000, 77};
    bool decay[2] = {true, false};
    float *p[2], *g[2], *m[2], *v[2], *dp[2], *dg[2], *dm[2], *dv[2];
    for (int i = 0; i < 2; i++) {
        int64_t n = len[i];
        p[i] = rnd(n, 1.0f), g[i] = rnd(n, 1.0f), m[i] = rnd(n, 0.1f), v[i] = rnd(n, 0.1f);
        for (int64_t j = 0; j < n; j++) v[i][j] = fabsf(v[i][j]);
        dp[i] = up(p[i], n), dg[i] = up(g[i], n), dm[i] = up(m[i], n), dv[i] = up(v[i], n);
    }
    ctl__params ps;
    memset(&ps, 0, sizeof ps);
    ps.n = 2, ps.w = dp, ps.g = dg, ps.m = dm, ps.v = dv, ps.len = len, ps.decay = decay;
    double want = 0.0, got = 0.0;
    for (int i = 0; i < 2; i++)
        for (int64_t j = 0; j < len[i]; j++) want += (double)g[i][j] * g[i][j];
    CHECK(!K->grad_sumsq(gpu, &ps, &got) && fabs(got - want) <= 1e-12 * want, "sumsq %.17g, want %.17g", got, want);
    ctl_optim_desc o;
    memset(&o, 0, sizeof o);
    o.beta1 = 0.9f, o.beta2 = 0.999f, o.eps = 1e-8f, o.weight_decay = 0.1f;
    for (int64_t t = 1; t <= 3; t++) {
        for (int i = 0; i < 2; i++) {
            ctl_adamw_update(p[i], g[i], m[i], v[i], len[i], 0.5f, 1e-3f, 0.9f, 0.999f, 1e-8f, decay[i] ? 0.1f : 0.0f, t);
            if (t > 1) ctl_copy_to_device(gpu, dg[i], g[i], (size_t)len[i] * sizeof(float));   // (the last step zeroed it)
        }
        K->adamw(gpu, &ps, &o, 0.5f, 1e-3f, t);
    }
    for (int i = 0; i < 2; i++) {
        expect(i ? "adamw p (no decay)" : "adamw p", dp[i], p[i], len[i], tol_f32);
        expect("adamw m", dm[i], m[i], len[i], tol_f32);
        expect("adamw v", dv[i], v[i], len[i], tol_f32);
        float *zero = (float *)calloc((size_t)len[i], sizeof(float));
        expect("adamw leaves the gradients at zero", dg[i], zero, len[i], 0.0);
        free(zero), free(p[i]), free(g[i]), free(m[i]), free(v[i]);
    }
    CHECK(!K->grad_sumsq(gpu, &ps, &got) && got == 0.0, "sumsq of zeros: %g", got);
    ps.n = 0;
    CHECK(!K->grad_sumsq(gpu, &ps, &got) && got == 0.0, "sumsq of nothing: %g", got);
}

// Tokens from the device sampler equal ctl_sample's, row by row, with the random numbers drawn
// in the same order.
static void test_sample(void) {
    int64_t n = 3, V = 300, L = 6;
    ctl_sampler_desc cfgs[8];
    memset(cfgs, 0, sizeof cfgs);
    cfgs[1].temperature = 1.0f;
    cfgs[2].temperature = 0.8f, cfgs[2].top_k = 7;
    cfgs[3].temperature = 1.2f, cfgs[3].top_p = 0.9f;
    cfgs[4].temperature = 1.0f, cfgs[4].min_p = 0.05f;
    cfgs[5].temperature = 0.7f, cfgs[5].top_k = 40, cfgs[5].top_p = 0.8f, cfgs[5].min_p = 0.02f, cfgs[5].repetition_penalty = 1.3f;
    cfgs[6].repetition_penalty = 1.5f;   // greedy with a penalty
    cfgs[7].temperature = 1.0f, cfgs[7].top_k = 1;
    int32_t hist[3 * 6];
    int64_t n_hist[3] = {6, 0, 3};
    for (int i = 0; i < n * L; i++) hist[i] = (int32_t)(ctl_rng_next(&rng) % 20);   // low ids, often the best ones
    int32_t *dhist = (int32_t *)up_bytes(hist, sizeof hist);
    float *scratch = (float *)malloc((size_t)(2 * V) * 4);
    for (int c = 0; c < 8; c++)
        for (int round = 0; round < 2; round++) {
            float *logits = rnd(n * V, 3.0f);
            for (int64_t v = 0; v < 20; v++) logits[v] += 4.0f;   // a few strong candidates
            logits[5] = logits[6];                                // a tie
            float *dl = up(logits, n * V);
            ctl_rng r1, r2;
            ctl_rng_seed(&r1, 1000 + (uint64_t)c), ctl_rng_seed(&r2, 1000 + (uint64_t)c);
            int32_t want[3], got[3] = {-1, -1, -1};
            for (int64_t i = 0; i < n; i++) want[i] = ctl_sample(logits + i * V, V, &cfgs[c], hist + i * L, n_hist[i], &r1, scratch);
            ctl_status st = K->sample(gpu, got, dl, n, V, &cfgs[c], dhist, L, n_hist, &r2);
            CHECK(!st, "sample: %s", ctl_last_error(gpu));
            for (int64_t i = 0; i < n; i++)
                CHECK(got[i] == want[i], "sampler config %d row %lld: token %d, the CPU's %d", c, (long long)i, got[i], want[i]);
            CHECK(ctl_rng_next(&r1) == ctl_rng_next(&r2), "sampler config %d: random streams diverged", c);
            free(logits);
        }
    // Edge cases: the best logits are -0 and +0 (equal: the lower id wins), and a draw of
    // exactly 0 (xoshiro256** gives 0 when its second word is 0), with and without filters.
    float *logits = rnd(V, 1.0f);
    for (int64_t v = 0; v < V; v++) logits[v] = -5.0f - fabsf(logits[v]);
    logits[10] = -0.0f, logits[12] = 0.0f;
    ctl_sampler_desc edge[3];
    memset(edge, 0, sizeof edge);
    edge[0].temperature = 1.0f, edge[0].top_k = 1;
    edge[1].temperature = 1.0f, edge[1].top_k = 5;
    edge[2].temperature = 1.0f;
    for (int c = 0; c < 3; c++) {
        ctl_rng r1 = {{1, 0, 2, 3}}, r2 = r1;
        float *l1 = copy_of(logits, V), *dl = up(logits, V);
        int32_t want = ctl_sample(l1, V, &edge[c], NULL, 0, &r1, scratch), got = -1;
        CHECK(!K->sample(gpu, &got, dl, 1, V, &edge[c], NULL, 0, NULL, &r2) && got == want,
              "sampler edge case %d (signed zeros, a draw of 0): token %d, the CPU's %d", c, got, want);
        free(l1);
    }
    free(logits);
    free(scratch);
}

// ---- generation ----------------------------------------------------------------------------------

// The largest relative difference between the next-token logits of the same model on the CPU
// and on the device, feeding three prompts and then stepping them together teacher-forced;
// and whether greedy generation gives the same tokens.
static void compare_generation(const char *what, ctl_model *mc, ctl_model *mg, int64_t steps, double tol) {
    ctl_infer *fc, *fg;
    ctl_infer_desc id = {3, 48};
    int64_t V = mc->cfg.vocab_size;
    if (ctl_infer_init(mc, &id, &fc) || ctl_infer_init(mg, &id, &fg)) {
        CHECK(false, "%s: infer_init: %s / %s", what, ctl_last_error(cpu), ctl_last_error(gpu));
        return;
    }
    float *lc = (float *)malloc((size_t)(3 * V) * 4), *lg = (float *)malloc((size_t)(3 * V) * 4);
    int32_t prompts[3][9];
    int64_t lens[3] = {5, 1, 9}, seqs[3] = {2, 0, 1};
    for (int i = 0; i < 3; i++)
        for (int j = 0; j < 9; j++) prompts[i][j] = (int32_t)(ctl_rng_next(&rng) % (uint64_t)V);
    double worst = 0.0;
    for (int i = 0; i < 3; i++) {
        CHECK(!ctl_infer_feed(fc, i, prompts[i], lens[i], lc) && !ctl_infer_feed(fg, i, prompts[i], lens[i], lg), "%s: feed: %s",
              what, ctl_last_error(gpu));
        worst = fmax(worst, rel_err(lg, lc, V));
    }
    for (int64_t s = 0; s < steps; s++) {
        int32_t tok[3];
        for (int i = 0; i < 3; i++) tok[i] = (int32_t)(ctl_rng_next(&rng) % (uint64_t)V);
        CHECK(!ctl_infer_step(fc, 3, seqs, tok, lc) && !ctl_infer_step(fg, 3, seqs, tok, lg), "%s: step: %s", what, ctl_last_error(gpu));
        worst = fmax(worst, rel_err(lg, lc, 3 * V));
    }
    CHECK(worst <= tol, "%s: logits differ by %.3g (> %.3g)", what, worst, tol);
    ctl_sampler_desc greedy;
    memset(&greedy, 0, sizeof greedy);
    const int32_t *pp[3] = {prompts[0], prompts[1], prompts[2]};
    int32_t oc[3 * 12], og[3 * 12];
    int64_t nc[3], ng[3];
    CHECK(!ctl_generate(fc, 3, pp, lens, &greedy, 12, oc, nc, NULL, NULL) && !ctl_generate(fg, 3, pp, lens, &greedy, 12, og, ng, NULL, NULL),
          "%s: generate: %s", what, ctl_last_error(gpu));
    CHECK(!memcmp(nc, ng, sizeof nc) && !memcmp(oc, og, sizeof oc), "%s: greedy generation differs from the CPU's", what);
    bool greedy_same = !memcmp(oc, og, sizeof oc);
    // Sampled, with every filter and a stop token: the device samples its own logits with the
    // same draws, row for sequence. (Its logits differ from the CPU's in the last bits, so a draw landing within
    // ~1e-7 of a boundary could pick a neighbour: far rarer than once in these 36 tokens.)
    ctl_sampler_desc sd;
    memset(&sd, 0, sizeof sd);
    int32_t stop = (int32_t)(V - 1);
    sd.temperature = 0.9f, sd.top_k = 40, sd.top_p = 0.95f, sd.min_p = 0.01f, sd.repetition_penalty = 1.3f, sd.seed = 17;
    sd.stop_tokens = &stop, sd.n_stop_tokens = 1;
    memset(oc, 0, sizeof oc), memset(og, 0, sizeof og);
    CHECK(!ctl_generate(fc, 3, pp, lens, &sd, 12, oc, nc, NULL, NULL) && !ctl_generate(fg, 3, pp, lens, &sd, 12, og, ng, NULL, NULL),
          "%s: sampled generate: %s", what, ctl_last_error(gpu));
    bool sampled_same = !memcmp(nc, ng, sizeof nc) && !memcmp(oc, og, sizeof oc);
    CHECK(sampled_same, "%s: sampled generation differs from the CPU's", what);
    printf("  %-34s logits within %.2g of the CPU's, greedy tokens %s, sampled %s\n", what, worst,
           greedy_same ? "identical" : "DIFFERENT", sampled_same ? "identical" : "DIFFERENT");
    free(lc), free(lg);
    ctl_infer_free(fc), ctl_infer_free(fg);
}

static void test_generation(void) {
    for (int arch = 0; arch < 2; arch++) {
        ctl_model_config cfg;
        memset(&cfg, 0, sizeof cfg);
        cfg.arch = arch ? CTL_ARCH_LLAMA : CTL_ARCH_GPT2;
        cfg.vocab_size = 97, cfg.n_ctx = 64, cfg.n_embd = 64, cfg.n_layer = 2, cfg.n_head = 4, cfg.n_kv_head = arch ? 2 : 4;
        cfg.head_dim = 16, cfg.n_ff = 96, cfg.tied_embeddings = arch == 1;
        ctl_model *mc, *mg;
        if (ctl_model_create(cpu, &cfg, &mc) || ctl_model_create(gpu, &cfg, &mg)) {
            CHECK(false, "model_create: %s", ctl_last_error(cpu));
            return;
        }
        ctl_model_init_random(mc, 7), ctl_model_init_random(mg, 7);
        compare_generation(arch ? "llama, f32" : "gpt2, f32", mc, mg, 6, 1e-4);
        // Q8_0 frozen weights, read as they are stored.
        const char *path = "build/test_cuda_q8.gguf";
        ctl_model *qc, *qg;
        ctl_model_desc md = {true, false};
        if (ctl_model_save_gguf(mc, path, CTL_GGML_Q8_0) || ctl_model_load_gguf(cpu, path, &md, &qc) ||
            ctl_model_load_gguf(gpu, path, &md, &qg)) {
            CHECK(false, "a Q8_0 model: %s", ctl_last_error(cpu));
        } else {
            compare_generation(arch ? "llama, q8_0 weights" : "gpt2, q8_0 weights", qc, qg, 4, 1e-4);
            ctl_model_free(qc), ctl_model_free(qg);
        }
        remove(path);
        // Adapters on the device: LoRA on every block layer (llama) or a sparse delta (gpt2),
        // their values random (B = 0 would hide them), written in place on both sides.
        ctl_lora_desc ld;
        memset(&ld, 0, sizeof ld);
        ld.rank = 2, ld.alpha = 4, ld.targets = CTL_LINEAR_ALL;
        ctl_sparse_desc sp;
        memset(&sp, 0, sizeof sp);
        sp.density = 0.05f, sp.select = CTL_SPARSE_RANDOM, sp.seed = 3;
        bool attached = arch ? !ctl_lora_attach(mc, &ld) && !ctl_lora_attach(mg, &ld) : !ctl_sparse_attach(mc, &sp) && !ctl_sparse_attach(mg, &sp);
        CHECK(attached, "adapters: %s / %s", ctl_last_error(cpu), ctl_last_error(gpu));
        if (attached) {
            for (int64_t i = mc->n_base; i < mc->n_params; i++) {
                float *vc = (float *)mc->params[i].value.data, *vg = (float *)mg->params[i].value.data;
                for (int64_t j = 0; j < ctl_tensor_numel(&mc->params[i].value); j++) vc[j] = vg[j] = 0.05f * ctl_rng_normal(&rng);
            }
            ctl_model_touch(mc), ctl_model_touch(mg);
            compare_generation(arch ? "llama, LoRA r2 on every layer" : "gpt2, sparse delta 5%", mc, mg, 4, 1e-4);
            CHECK(!ctl_adapters_merge(mc) && !ctl_adapters_merge(mg), "merge: %s", ctl_last_error(gpu));
            compare_generation(arch ? "llama, that LoRA merged" : "gpt2, that delta merged", mc, mg, 2, 1e-4);
        }
        ctl_model_free(mc), ctl_model_free(mg);
        // DoRA (gpt2) and LoRA on the LM head and the embeddings too (llama, untied here), A and
        // B random as above (DoRA's magnitudes as initialised: the rows' norms).
        cfg.tied_embeddings = false;
        if (ctl_model_create(cpu, &cfg, &mc) || ctl_model_create(gpu, &cfg, &mg)) {
            CHECK(false, "model_create: %s", ctl_last_error(gpu));
            return;
        }
        ctl_model_init_random(mc, 7), ctl_model_init_random(mg, 7);
        ld.dora = arch == 0, ld.targets = arch ? CTL_LINEAR_ALL | CTL_LINEAR_HEAD | CTL_LINEAR_EMBED : CTL_LINEAR_ALL;
        attached = !ctl_lora_attach(mc, &ld) && !ctl_lora_attach(mg, &ld);
        CHECK(attached, "adapters: %s / %s", ctl_last_error(cpu), ctl_last_error(gpu));
        if (attached) {
            for (int64_t i = mc->n_base; i < mc->n_params; i++) {
                float *vc = (float *)mc->params[i].value.data, *vg = (float *)mg->params[i].value.data;
                for (int64_t j = 0; !strstr(mc->params[i].name, ".lora_m") && j < ctl_tensor_numel(&mc->params[i].value); j++)
                    vc[j] = vg[j] = 0.05f * ctl_rng_normal(&rng);
            }
            ctl_model_touch(mc), ctl_model_touch(mg);
            compare_generation(arch ? "llama, LoRA r2 on every layer, head, embeddings" : "gpt2, DoRA r2 on every layer", mc, mg, 4, 1e-4);
        }
        ctl_model_free(mc);
        ctl_model_free(mg);
    }
}

// SmolLM2-135M-Instruct (Q4_1, fetched by tools/get_smollm2.sh): greedy generation on the
// device token for token the CPU's. On the emulator only with CTL_TEST_SMOLLM2=1 (slow).
static void test_smollm2(void) {
    const char *path = "models/SmolLM2-135M-Instruct.Q4_1.gguf";
    FILE *fp = fopen(path, "rb");
    if (!fp) {
        printf("  skipped: %s is missing (tools/get_smollm2.sh fetches it)\n", path);
        return;
    }
    fclose(fp);
    if (strstr(ctl_ctx_device_name(gpu), "emulator") && !getenv("CTL_TEST_SMOLLM2")) {
        printf("  skipped on the emulator (CTL_TEST_SMOLLM2=1 runs it)\n");
        return;
    }
    ctl_model_desc md = {true, false};
    ctl_model *mc, *mg;
    if (ctl_model_load_gguf(cpu, path, &md, &mc) || ctl_model_load_gguf(gpu, path, &md, &mg)) {
        CHECK(false, "load %s: %s", path, ctl_last_error(cpu));
        return;
    }
    // A GSM8K-style question in the model's chat template, tokenized by the model's tokenizer.
    ctl_gguf *g = NULL;
    ctl_tokenizer *tk = NULL;
    ctl_chat_template ct;
    ctl_chat_msg msg = {"user", "Tom has 3 boxes of 12 pencils. He gives away 7 pencils. How many are left?"};
    int32_t prompt[128];
    int64_t len = 0;
    bool ok = !ctl_gguf_open(cpu, path, &g) && !ctl_tokenizer_from_gguf(cpu, g, &tk) && !ctl_chat_template_from_gguf(cpu, g, &ct) &&
              !ctl_chat_tokenize(tk, &ct, &msg, 1, true, prompt, NULL, 128, &len);
    CHECK(ok, "the prompt: %s", ctl_last_error(cpu));
    ctl_tokenizer_free(tk);
    ctl_gguf_close(g);
    if (!ok) return;
    const int32_t *pp[1] = {prompt};
    ctl_infer *fc, *fg;
    ctl_infer_desc id = {1, 128};
    ctl_sampler_desc greedy;
    memset(&greedy, 0, sizeof greedy);
    int32_t oc[32], og[32];
    int64_t nc = 0, ng = 0;
    if (ctl_infer_init(mc, &id, &fc) || ctl_infer_init(mg, &id, &fg)) {
        CHECK(false, "infer_init: %s", ctl_last_error(gpu));
    } else {
        CHECK(!ctl_generate(fc, 1, pp, &len, &greedy, 32, oc, &nc, NULL, NULL) && !ctl_generate(fg, 1, pp, &len, &greedy, 32, og, &ng, NULL, NULL),
              "generate: %s", ctl_last_error(gpu));
        CHECK(nc == ng && !memcmp(oc, og, (size_t)nc * sizeof(int32_t)), "SmolLM2 greedy: %lld tokens on the device, %lld on the CPU, or they differ",
              (long long)ng, (long long)nc);
        printf("  SmolLM2-135M Q4_1: %lld greedy tokens, %s\n", (long long)nc, nc == ng && !memcmp(oc, og, (size_t)nc * 4) ? "identical" : "DIFFERENT");
        ctl_infer_free(fc), ctl_infer_free(fg);
    }
    ctl_model_free(mc), ctl_model_free(mg);
}

// ---- training ----------------------------------------------------------------------------------

// The same training run on the CPU (tc) and the device (tg), over models mc and mg that start
// equal: three updates (the first of two micro-batches), each compared for the log-probs, every
// trainable gradient, the gradient norm and the weights after AdamW (clipping and weight decay
// on). After the first, the CPU trainer loads the device's checkpoint; after the second, the
// device takes an update of its own, then loads the CPU's checkpoint: weights, moments and
// step count must cross both ways for the later updates to agree. objective 0 is
// the weighted cross-entropy, 1 GRPO (clipped ratio against old log-probs, k3 KL to reference
// ones from ctl_train_reference, the adapters switched off). packed: rows of several documents.
static void compare_training(const char *what, ctl_model *mc, ctl_model *mg, int objective, bool packed) {
    enum { B = 3, T = 7 };
    ctl_train_desc td;
    memset(&td, 0, sizeof td);
    td.batch = B, td.seq_len = T, td.lm_head_chunk = 5, td.entropy = true, td.seed = 11;
    // eps 1e-2: AdamW's m / (sqrt(v) + eps) turns last-bit differences of a gradient near 0 into
    // differences of up to lr; a larger eps keeps the update smooth in the gradient, so the
    // weights can be held to 1e-5 as well.
    td.optim.lr = 1e-2f, td.optim.eps = 1e-2f, td.optim.weight_decay = 0.1f, td.optim.clip = 0.5f;
    ctl_train *tc, *tg;
    if (ctl_train_init(mc, &td, &tc) || ctl_train_init(mg, &td, &tg)) {
        CHECK(false, "%s: train_init: %s / %s", what, ctl_last_error(cpu), ctl_last_error(gpu));
        return;
    }
    CHECK(tg->dev != NULL && tc->dev == NULL, "%s: the CUDA context's trainer runs on the device", what);
    int64_t V = mc->cfg.vocab_size, N = B * T;
    int32_t tok[B * T], tgt[B * T], pos[B * T];
    float w[B * T], adv[B], old[B * T], ref[2][B * T];
    double worst_lp = 0.0, worst_g = 0.0, worst_w = 0.0, worst_h = 0.0;
    const char *ckpt = "build/test_cuda_ckpt.gguf";
    for (int step = 0; step < 3; step++) {
        for (int micro = 0; micro < (step == 0 ? 2 : 1); micro++) {
            for (int64_t i = 0; i < N; i++) {
                tok[i] = (int32_t)(ctl_rng_next(&rng) % (uint64_t)V), tgt[i] = (int32_t)(ctl_rng_next(&rng) % (uint64_t)V);
                w[i] = i % T < 2 ? 0.0f : 1.0f;   // a prompt, then the completion
                // packed: a new document starts at t = 0 and then with probability 1/3
                pos[i] = i % T == 0 || (packed && ctl_rng_next(&rng) % 3 == 0) ? 0 : pos[i - 1] + 1;
            }
            for (int b = 0; b < B; b++) adv[b] = ctl_rng_normal(&rng);
            ctl_batch bt = {B, T, tok, tgt, w};
            ctl_status sc, sg;
            if (objective == 1) {
                sc = ctl_train_reference(tc, &bt, ref[0]), sg = ctl_train_reference(tg, &bt, ref[1]);
                CHECK(!sc && !sg, "%s: reference: %s / %s", what, ctl_last_error(cpu), ctl_last_error(gpu));
                worst_lp = fmax(worst_lp, rel_err(ref[1], ref[0], N));
            }
            sc = ctl_train_forward_packed(tc, &bt, packed ? pos : NULL), sg = ctl_train_forward_packed(tg, &bt, packed ? pos : NULL);
            CHECK(!sc && !sg, "%s: forward: %s / %s", what, ctl_last_error(cpu), ctl_last_error(gpu));
            if (sc || sg) goto done;
            worst_lp = fmax(worst_lp, rel_err(ctl_train_logprobs(tg), ctl_train_logprobs(tc), N));
            worst_h = fmax(worst_h, rel_err(ctl_train_entropy(tg), ctl_train_entropy(tc), N));
            float lc[128], lg[128];   // one row's logits (V < 128 here)
            CHECK(!ctl_train_logits(tc, 2, 4, lc) && !ctl_train_logits(tg, 2, 4, lg), "%s: train_logits: %s", what, ctl_last_error(gpu));
            worst_lp = fmax(worst_lp, rel_err(lg, lc, V));
            for (int k = 0; k < 2; k++) {   // the objective, on each side's own log-probs
                ctl_train *t = k ? tg : tc;
                ctl_ctx *x = k ? gpu : cpu;
                float loss;
                if (objective == 0) {
                    sc = ctl_cross_entropy(x, N, ctl_train_logprobs(t), w, ctl_train_dlogprobs(t), &loss);
                    for (int64_t i = 0; i < N; i++) ctl_train_dlogprobs(t)[i] *= 0.5f;   // two micro-batches
                } else {
                    if (k == 0)
                        for (int64_t i = 0; i < N; i++) old[i] = ctl_train_logprobs(tc)[i] + 0.1f * ctl_rng_normal(&rng);
                    ctl_logprobs in = {B, T, ctl_train_logprobs(t), w, old, ref[k], NULL};
                    ctl_grpo_desc gd;
                    memset(&gd, 0, sizeof gd);
                    gd.advantages = adv, gd.beta = 0.04f, gd.accum = step == 0 ? 2 : 1;
                    ctl_objective_out out;
                    memset(&out, 0, sizeof out);
                    out.dlogp = ctl_train_dlogprobs(t);
                    sc = ctl_objective_grpo(x, &in, &gd, &out);
                }
                CHECK(!sc, "%s: objective: %s", what, ctl_last_error(x));
            }
            sc = ctl_train_backward(tc), sg = ctl_train_backward(tg);
            CHECK(!sc && !sg, "%s: backward: %s / %s", what, ctl_last_error(cpu), ctl_last_error(gpu));
        }
        for (int64_t i = 0; i < mc->n_params; i++) {
            float *gc = ctl_train_grad(tc, i), *gg = ctl_train_grad(tg, i);
            CHECK(!gc == !gg, "%s: %s trainable on one side only", what, mc->params[i].name);
            if (gc && gg) worst_g = fmax(worst_g, rel_err(gg, gc, ctl_tensor_numel(&mc->params[i].value)));
        }
        ctl_step_stats stc, stg;
        ctl_status sc = ctl_train_step(tc, &stc), sg = ctl_train_step(tg, &stg);
        CHECK(!sc && !sg, "%s: step: %s / %s", what, ctl_last_error(cpu), ctl_last_error(gpu));
        CHECK(fabs(stc.grad_norm - stg.grad_norm) <= 1e-5 * stc.grad_norm && stc.clipped == stg.clipped, "%s: gradient norm %g vs %g",
              what, (double)stg.grad_norm, (double)stc.grad_norm);
        for (int64_t i = 0; i < mc->n_params; i++)
            if (mc->params[i].trainable)
                worst_w = fmax(worst_w, rel_err((const float *)mg->params[i].value.data, (const float *)mc->params[i].value.data,
                                                ctl_tensor_numel(&mc->params[i].value)));
        if (step < 2) {   // device -> CPU, then CPU -> device
            ctl_train *from = step ? tc : tg, *to = step ? tg : tc;
            CHECK(!ctl_train_save(from, ckpt, NULL), "%s: save: %s", what, ctl_last_error(step ? cpu : gpu));
            if (step) {   // the device strays first
                ctl_batch bt = {B, T, tok, tok, NULL};
                float loss;
                CHECK(!ctl_train_forward(tg, &bt) && !ctl_cross_entropy(gpu, N, ctl_train_logprobs(tg), NULL, ctl_train_dlogprobs(tg), &loss) &&
                          !ctl_train_backward(tg) && !ctl_train_step(tg, NULL),
                      "%s: a stray update: %s", what, ctl_last_error(gpu));
            }
            CHECK(!ctl_train_load(to, ckpt, NULL), "%s: load: %s", what, ctl_last_error(step ? gpu : cpu));
        }
    }
    CHECK(worst_lp <= 1e-5 && worst_h <= 1e-5, "%s: log-probs (or a row's logits) differ by %.3g, entropies by %.3g", what, worst_lp,
          worst_h);
    CHECK(worst_g <= 1e-4, "%s: gradients differ by %.3g", what, worst_g);
    CHECK(worst_w <= 1e-5, "%s: weights after the steps differ by %.3g", what, worst_w);
    printf("  %-34s log-probs %.2g, gradients %.2g, weights %.2g\n", what, worst_lp, worst_g, worst_w);
done:
    remove(ckpt);
    ctl_train_free(tc), ctl_train_free(tg);
}

static ctl_model_config tiny_config(bool llama) {
    ctl_model_config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.arch = llama ? CTL_ARCH_LLAMA : CTL_ARCH_GPT2;
    cfg.vocab_size = 97, cfg.n_ctx = 64, cfg.n_embd = 64, cfg.n_layer = 2, cfg.n_head = 4, cfg.n_kv_head = llama ? 2 : 4;
    cfg.head_dim = 16, cfg.n_ff = 96, cfg.tied_embeddings = llama;
    return cfg;
}

static bool tiny_pair(bool llama, ctl_model **mc, ctl_model **mg) {
    ctl_model_config cfg = tiny_config(llama);
    if (ctl_model_create(cpu, &cfg, mc) || ctl_model_create(gpu, &cfg, mg)) {
        CHECK(false, "model_create: %s", ctl_last_error(cpu));
        return false;
    }
    ctl_model_init_random(*mc, 5), ctl_model_init_random(*mg, 5);
    return true;
}

static void test_training(void) {
    ctl_model *mc, *mg;
    ctl_lora_desc ld;
    memset(&ld, 0, sizeof ld);
    ld.rank = 4, ld.alpha = 8, ld.dropout = 0.1f, ld.init = CTL_LORA_INIT_GAUSSIAN;
    for (int arch = 0; arch < 2; arch++) {   // full fine-tuning: every parameter trains
        if (!tiny_pair(arch, &mc, &mg)) return;
        compare_training(arch ? "llama (tied, GQA), full" : "gpt2, full", mc, mg, 0, false);
        compare_training(arch ? "llama, full, packed rows" : "gpt2, full, packed rows", mc, mg, 0, true);
        if (arch) {   // LoRA with dropout on every block layer, then GRPO on it
            CHECK(!ctl_lora_attach(mc, &ld) && !ctl_lora_attach(mg, &ld), "lora_attach: %s", ctl_last_error(cpu));
            compare_training("llama, LoRA r4 with dropout", mc, mg, 0, false);
            compare_training("llama, LoRA, a GRPO step", mc, mg, 1, false);
        } else {   // a sparse delta
            ctl_sparse_desc sd;
            memset(&sd, 0, sizeof sd);
            sd.density = 0.05f, sd.select = CTL_SPARSE_RANDOM, sd.seed = 3;
            CHECK(!ctl_sparse_attach(mc, &sd) && !ctl_sparse_attach(mg, &sd), "sparse_attach: %s", ctl_last_error(cpu));
            compare_training("gpt2, sparse delta 5%", mc, mg, 0, false);
        }
        ctl_model_free(mc), ctl_model_free(mg);
    }
    // A quantised base: Q8_0 frozen matrices read as stored, LoRA on top.
    const char *path = "build/test_cuda_train_q8.gguf";
    ctl_model_desc md = {true, false};
    ctl_model *qc, *qg;
    ld.dropout = 0.0f;
    if (!tiny_pair(true, &mc, &mg)) return;
    if (ctl_model_save_gguf(mc, path, CTL_GGML_Q8_0) || ctl_model_load_gguf(cpu, path, &md, &qc) || ctl_model_load_gguf(gpu, path, &md, &qg)) {
        CHECK(false, "a Q8_0 model: %s", ctl_last_error(cpu));
    } else {
        CHECK(!ctl_lora_attach(qc, &ld) && !ctl_lora_attach(qg, &ld), "lora on Q8_0: %s", ctl_last_error(cpu));
        compare_training("llama, Q8_0 base + LoRA", qc, qg, 0, false);
        ctl_model_free(qc), ctl_model_free(qg);
    }
    remove(path);
    ctl_model_free(mc), ctl_model_free(mg);
    // DoRA: on gpt2 without dropout (biases: y = b + g (.) z), on llama with it.
    for (int arch = 0; arch < 2; arch++) {
        ctl_lora_desc dd = ld;
        dd.dora = true, dd.dropout = arch ? 0.1f : 0.0f;
        if (!tiny_pair(arch, &mc, &mg)) return;
        CHECK(!ctl_lora_attach(mc, &dd) && !ctl_lora_attach(mg, &dd), "DoRA attach: %s", ctl_last_error(cpu));
        compare_training(arch ? "llama, DoRA r4 with dropout" : "gpt2, DoRA r4", mc, mg, 0, false);
        ctl_model_free(mc), ctl_model_free(mg);
    }
    // A non-finite weight: the device's forward names the layer, as the CPU's does.
    if (!tiny_pair(false, &mc, &mg)) return;
    ctl_train *t;
    ctl_train_desc td;
    memset(&td, 0, sizeof td);
    td.batch = 2, td.seq_len = 5;
    if (!ctl_train_init(mg, &td, &t)) {
        int32_t tok[10] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10};
        ctl_batch bt = {2, 5, tok, tok, NULL};
        float *wg = (float *)mg->params[mg->blocks[1].o_w].value.data, keep = wg[7];
        wg[7] = INFINITY;   // layer 1's attention output, written in place
        ctl_model_touch(mg);
        ctl_status st = ctl_train_forward(t, &bt);
        CHECK(st == CTL_ERR_NONFINITE && strstr(ctl_last_error(gpu), "after layer 1") && strstr(ctl_last_error(gpu), "attn_output"),
              "a non-finite weight on the device: %d %s", st, ctl_last_error(gpu));
        // Written back and touched: the device takes the weights again, and gives the CPU's log-probs.
        wg[7] = keep;
        ctl_model_touch(mg);
        ctl_train *tc;
        st = ctl_train_init(mc, &td, &tc);
        CHECK(!st && !ctl_train_forward(tc, &bt) && !ctl_train_forward(t, &bt), "after ctl_model_touch: %s / %s", ctl_last_error(cpu),
              ctl_last_error(gpu));
        if (!st) {
            double e = rel_err(ctl_train_logprobs(t), ctl_train_logprobs(tc), 10);
            CHECK(e <= tol_f32, "after ctl_model_touch the device's log-probs differ from the CPU's by %.3g", e);
            ctl_train_free(tc);
        }
        ctl_train_free(t);
    } else {
        CHECK(false, "train_init: %s", ctl_last_error(gpu));
    }
    ctl_model_free(mc), ctl_model_free(mg);
    // LoRA on every layer, the LM head and the embedding of an untied llama, with dropout.
    ctl_model_config ut = tiny_config(true);
    ut.tied_embeddings = false;
    ctl_lora_desc hd = ld;
    hd.targets = CTL_LINEAR_ALL | CTL_LINEAR_HEAD | CTL_LINEAR_EMBED, hd.dropout = 0.1f;
    if (ctl_model_create(cpu, &ut, &mc) || ctl_model_create(gpu, &ut, &mg)) {
        CHECK(false, "model_create: %s", ctl_last_error(gpu));
        return;
    }
    ctl_model_init_random(mc, 9), ctl_model_init_random(mg, 9);
    CHECK(!ctl_lora_attach(mc, &hd) && !ctl_lora_attach(mg, &hd), "LoRA on head and embedding: %s", ctl_last_error(cpu));
    compare_training("llama, LoRA + head + embedding", mc, mg, 0, false);
    ctl_model_free(mc);
    ctl_model_free(mg);
}

// ---- the device API ----------------------------------------------------------------------------

static void test_device_api(void) {
    size_t mark = ctl_device_mark(gpu);
    CHECK(ctl_device_alloc(gpu, (size_t)1 << 40) == NULL && strstr(ctl_last_error(gpu), "device alloc"),
          "an allocation past the block: %s", ctl_last_error(gpu));
    void *a = ctl_device_alloc(gpu, 3), *b = ctl_device_alloc(gpu, 1);
    CHECK(a && b && ((uintptr_t)a % 256) == 0 && ((uintptr_t)b % 256) == 0 && (char *)b - (char *)a == 256, "alignment of pieces");
    ctl_device_release(gpu, mark);
    CHECK(ctl_device_mark(gpu) == mark && ctl_device_alloc(gpu, 3) == a, "release gives the space back");
    ctl_device_release(gpu, mark);
    // Spans given back out of order: the lower one waits for the one above it.
    size_t m1 = ctl_device_mark(gpu);
    ctl_device_alloc(gpu, 1000);
    size_t m2 = ctl_device_mark(gpu);
    ctl_device_alloc(gpu, 10);
    size_t m3 = ctl_device_mark(gpu);
    ctl_device_release_span(gpu, m1, m2);
    CHECK(ctl_device_mark(gpu) == m3, "a span below one in use stays taken");
    ctl_device_release_span(gpu, m2, m3);
    CHECK(ctl_device_mark(gpu) == m1, "giving back the top one frees both (mark %zu, want %zu)", ctl_device_mark(gpu), m1);
    // A trainer freed before a generator made after it: the generator's part stays its own.
    ctl_model *mg;
    ctl_model_config tc = tiny_config(false);
    if (!ctl_model_create(gpu, &tc, &mg)) {
        ctl_model_init_random(mg, 3);
        ctl_train_desc td;
        memset(&td, 0, sizeof td);
        td.batch = 2, td.seq_len = 5;
        ctl_infer_desc id = {2, 16};
        ctl_train *t;
        ctl_infer *f;
        size_t m0 = ctl_device_mark(gpu);
        if (!ctl_train_init(mg, &td, &t) && !ctl_infer_init(mg, &id, &f)) {
            size_t top = ctl_device_mark(gpu);
            ctl_train_free(t);
            CHECK(ctl_device_mark(gpu) == top, "freeing a trainer below a live generator keeps the generator's part");
            ctl_infer_free(f);
            CHECK(ctl_device_mark(gpu) == m0, "then freeing the generator gives back both");
        } else {
            CHECK(false, "trainer and generator: %s", ctl_last_error(gpu));
        }
        // A trainer page-locks its model's weights while it lives.
        if (!ctl_train_init(mg, &td, &t)) {
            CHECK(!K->pin(gpu, mg->data, mg->bytes), "a trainer pins its model's weights");
            ctl_train_free(t);
            bool again = K->pin(gpu, mg->data, mg->bytes);
            CHECK(again, "freeing the trainer unpins them");
            if (again) K->unpin(gpu, mg->data);
            CHECK(!ctl_device_sync(gpu), "a refused pin is no failure of the work: %s", ctl_last_error(gpu));
        }
        ctl_model_free(mg);
    }
    CHECK(ctl_ctx_device(gpu) == CTL_DEVICE_CUDA && ctl_ctx_device(cpu) == CTL_DEVICE_CPU, "devices");
    CHECK(ctl_device_alloc(cpu, 16) == NULL && ctl_copy_to_host(cpu, &mark, &mark, 1) == CTL_ERR_UNSUPPORTED &&
              ctl_device_sync(cpu) == CTL_ERR_UNSUPPORTED,
          "device calls on a CPU context fail");
    // Work that does not fit the block's scratch: a status and a message at the next sync.
    ctl_ctx *small;
    ctl_ctx_desc d = cuda_desc();
    d.device_memory = 1 << 16;
    if (ctl_ctx_init(&small, &d)) {
        CHECK(false, "a small CUDA context: %s", init_why);
        return;
    }
    float *x = (float *)ctl_device_alloc(small, 4 * 64), *lp = (float *)ctl_device_alloc(small, 16);
    ctl__head hd;
    memset(&hd, 0, sizeof hd);
    hd.type = CTL_F32, hd.w = x;
    K->lmhead_forward(small, lp, lp, NULL, x, &hd, (const int32_t *)x, 2, 4, 100000, 1.0f, NULL, 2);
    ctl_status st = ctl_device_sync(small);
    CHECK(st == CTL_ERR_CAPACITY && strstr(ctl_last_error(small), "lm head"), "scratch overflow: %d %s", st, ctl_last_error(small));
    CHECK(ctl_device_sync(small) == CTL_OK, "a sync reports a failure once");
    ctl_model_config cfg = tiny_config(true);   // a trainer that does not fit the block
    ctl_model *m;
    ctl_train *t = NULL;
    ctl_train_desc td;
    memset(&td, 0, sizeof td);
    td.batch = 4, td.seq_len = 32;
    if (!ctl_model_create(small, &cfg, &m)) {
        st = ctl_train_init(m, &td, &t);
        CHECK(st == CTL_ERR_OUT_OF_MEMORY && !t && strstr(ctl_last_error(small), "device_memory"), "a trainer too large for the block: %d %s",
              st, ctl_last_error(small));
        ctl_model_free(m);
    }
    K->attention_forward(small, x, x, x, NULL, 1, 1, 1, 1, 300);
    st = ctl_device_sync(small);
    CHECK(st == CTL_ERR_UNSUPPORTED && strstr(ctl_last_error(small), "head size 300"), "head size limit: %s", ctl_last_error(small));
    ctl_ctx_free(small);
    d.device_memory = (size_t)1 << 62;
    CHECK(ctl_ctx_init(&small, &d) == CTL_ERR_OUT_OF_MEMORY && strstr(init_why, "device memory"),
          "a block larger than the GPU: %s", init_why);
    d.device_memory = 0, d.cuda_index = 99;
    CHECK(ctl_ctx_init(&small, &d) == CTL_ERR_RANGE && strstr(init_why, "device 99"), "a GPU that is not there: %s",
          init_why);
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0);   // a line at a time, also into a pipe or a log
    const char *why, *env = getenv("CTL_TEST_SEED");
    filter = argc > 1 ? argv[1] : NULL;
    if (!ctl_cuda_available(&why)) {
        printf("test-cuda: SKIPPED, no GPU here (%s)\n", why);
        return 0;
    }
    uint64_t seed = env ? strtoull(env, NULL, 10) : (uint64_t)time(NULL);
    ctl_rng_seed(&rng, seed);
    ctl_ctx_desc d = ctl_ctx_desc_default();
    d.n_threads = 2;
    if (ctl_ctx_init(&cpu, &d)) return printf("CPU context failed\n"), 1;
    d.device = CTL_DEVICE_CUDA, d.device_memory = 256 << 20, d.logger.func = keep_why;
    if (ctl_ctx_init(&gpu, &d)) return printf("CUDA context failed: %s\n", init_why), 1;
    printf("device: %s, seed %llu (CTL_TEST_SEED=%llu repeats it)\n", ctl_ctx_device_name(gpu), (unsigned long long)seed,
           (unsigned long long)seed);
    struct { const char *name; void (*fn)(void); } tests[] = {
        {"gemm", test_gemm}, {"matmul", test_matmul}, {"typed matmul", test_matmul_typed}, {"bf16 dot", test_matmul_bf16_dot},
        {"embedding", test_embedding}, {"norms", test_norms}, {"rope", test_rope}, {"attention", test_attention},
        {"elementwise", test_elementwise}, {"lm head", test_lmhead}, {"lora", test_lora}, {"sparse", test_sparse},
        {"optimiser", test_optimiser}, {"sample", test_sample}, {"generation", test_generation}, {"training", test_training},
        {"smollm2", test_smollm2},
        {"device api", test_device_api},
    };
    for (size_t i = 0; i < sizeof tests / sizeof tests[0]; i++) {
        if (!wanted(tests[i].name)) continue;
        int before = n_fail;
        size_t mark = ctl_device_mark(gpu);
        clock_t t0 = clock();
        tests[i].fn();
        ctl_device_release(gpu, mark);
        printf("%-14s %s (%.1f s)\n", tests[i].name, n_fail == before ? "ok" : "FAILED", (double)(clock() - t0) / CLOCKS_PER_SEC);
    }
    ctl_ctx_free(gpu);
    ctl_ctx_free(cpu);
    printf("%d passed, %d failed\n", n_pass, n_fail);
    return n_fail ? 1 : 0;
}
