// Adapters and quantised bases (included by tests/test.c, which holds the harness).
//
//   quantised GEMM   Q8_0, Q4_0 and Q4_1 weights in both products of a linear layer, and the
//                    few-rows path, against the whole matrix dequantised and the three loops.
//   quantised model  a tiny model kept quantised gives the log-probs and the LoRA gradients of
//                    the same file loaded as fp32; SmolLM2's Q4_1 file likewise, in a quarter of
//                    the memory.
//   gradients        directional finite differences of every adapter parameter: LoRA, rsLoRA,
//                    DoRA, with and without dropout, sparse deltas, head and embedding LoRA,
//                    fused gpt2 attention, a quantised base.
//   merging          merged forward == attached forward; unmerge gives the base back.

// ---- quantised blocks, made here ---------------------------------------------------------------

// Valid random blocks of `type` for n values (a multiple of 32; any for bf16): scales of about
// `scale` (bf16: values up to 8 scale, as the 4-bit types).
static void random_blocks(ctl_dtype type, unsigned char *out, int64_t n, float scale) {
    if (type == CTL_BF16) {
        for (int64_t i = 0; i < n; i++) {
            uint16_t h = ctl_f32_to_bf16(8.0f * scale * (2.0f * ctl_rng_uniform(&g_rng) - 1.0f));
            memcpy(out + 2 * i, &h, 2);
        }
        return;
    }
    size_t bs = ctl_dtype_bytes(type, 32);
    for (int64_t b = 0; b < n / 32; b++, out += bs) {
        uint16_t d = ctl_f32_to_f16(scale * (0.5f + ctl_rng_uniform(&g_rng))), mn = ctl_f32_to_f16(-8.0f * scale * ctl_rng_uniform(&g_rng));
        memcpy(out, &d, 2);
        size_t q0 = 2;
        if (type == CTL_Q4_1) memcpy(out + 2, &mn, 2), q0 = 4;
        for (size_t k = q0; k < bs; k++) out[k] = (unsigned char)(ctl_rng_next(&g_rng) & 255);
    }
}

// Quantises n values (a multiple of 32) as `type`, simply: round to nearest with the block's
// scale (not llama.cpp's exact rules; any valid block serves these tests).
static void quantize_blocks(ctl_dtype type, const float *x, unsigned char *out, int64_t n) {
    for (int64_t i = 0; i < n && type == CTL_BF16; i++) {   // bf16: each value rounded
        uint16_t h = ctl_f32_to_bf16(x[i]);
        memcpy(out + 2 * i, &h, 2);
    }
    if (type == CTL_BF16) return;
    size_t bs = ctl_dtype_bytes(type, 32);
    for (int64_t b = 0; b < n / 32; b++, out += bs, x += 32) {
        float lo = x[0], hi = x[0], amax = 0.0f;
        for (int k = 0; k < 32; k++) lo = fminf(lo, x[k]), hi = fmaxf(hi, x[k]), amax = fmaxf(amax, fabsf(x[k]));
        if (type == CTL_Q8_0) {
            float d = amax / 127.0f, id = d > 0 ? 1.0f / d : 0.0f;
            uint16_t h = ctl_f32_to_f16(d);
            memcpy(out, &h, 2);
            for (int k = 0; k < 32; k++) out[2 + k] = (unsigned char)(int8_t)lrintf(x[k] * id);
        } else if (type == CTL_Q4_0) {   // values (q - 8) * d, q in 0..15
            float d = amax / 7.0f, id = d > 0 ? 1.0f / d : 0.0f;
            uint16_t h = ctl_f32_to_f16(d);
            memcpy(out, &h, 2);
            for (int k = 0; k < 16; k++) {
                int a = (int)fminf(15.0f, fmaxf(0.0f, lrintf(x[k] * id) + 8.0f)), c = (int)fminf(15.0f, fmaxf(0.0f, lrintf(x[k + 16] * id) + 8.0f));
                out[2 + k] = (unsigned char)(a | c << 4);
            }
        } else {                         // values q * d + m
            float d = (hi - lo) / 15.0f, id = d > 0 ? 1.0f / d : 0.0f;
            uint16_t h = ctl_f32_to_f16(d), mn = ctl_f32_to_f16(lo);
            memcpy(out, &h, 2), memcpy(out + 2, &mn, 2);
            for (int k = 0; k < 16; k++) {
                int a = (int)fminf(15.0f, fmaxf(0.0f, lrintf((x[k] - lo) * id))), c = (int)fminf(15.0f, fmaxf(0.0f, lrintf((x[k + 16] - lo) * id)));
                out[4 + k] = (unsigned char)(a | c << 4);
            }
        }
    }
}

static void test_quant_gemm(void) {
    int same = 0;   // the kernels' fast half-to-float gives the reference conversion's bits
    for (uint32_t h = 0; h < 65536; h++) {
        unsigned char b[2] = {(unsigned char)h, (unsigned char)(h >> 8)};
        float x = ctl__f16(b), y = ctl_f16_to_f32((uint16_t)h);
        same += !memcmp(&x, &y, 4);
    }
    CHECK(same == 65536, "fast f16: %d of 65536 halves convert bit for bit", same);
    static const ctl_dtype types[] = {CTL_Q8_0, CTL_Q4_0, CTL_Q4_1, CTL_BF16};
    static const int64_t shapes[][3] = {{1, 1, 32}, {5, 17, 64}, {9, 300, 288}, {97, 40, 544}, {3, 3100, 96}, {7, 33, 32}};
    // bf16 rows have no blocks: any length, the ones that leave every vector loop a tail too
    static const int64_t shapes16[][3] = {{1, 1, 1}, {2, 3, 3}, {5, 17, 17}, {9, 300, 289}, {97, 40, 545}, {3, 70, 4097}, {1, 130, 95}, {6, 41, 100}, {8, 9, 4097}};
    ctl_ctx *ctx[3] = {make_ctx(2, CTL_SIMD_AUTO), make_ctx(3, CTL_SIMD_SCALAR), try_ctx(2, CTL_SIMD_AVX2)};   // every path
    int tried = 0, ok = 0;
    double worst = 0.0;
    for (int ti = 0; ti < 4; ti++)
        for (size_t s = 0; s < (types[ti] == CTL_BF16 ? sizeof shapes16 / sizeof shapes16[0] : sizeof shapes / sizeof shapes[0]); s++) {
            const int64_t *sh = types[ti] == CTL_BF16 ? shapes16[s] : shapes[s];
            int64_t M = sh[0], R = sh[1], K = sh[2];   // W is (R, K)
            unsigned char *q = (unsigned char *)malloc(ctl_dtype_bytes(types[ti], R * K));
            float *w = (float *)malloc((size_t)(R * K) * 4);
            random_blocks(types[ti], q, R * K, 0.01f);
            ctl_ggml_dequantize(ctl__ggml_of(types[ti]), q, w, R * K);
            for (int nk = 0; nk < 2; nk++)
                for (int acc = 0; acc < 2; acc++)
                    for (int c = 0; c < 3; c++) {
                        if (!ctx[c]) continue;
                        int64_t N = nk ? R : K, Kd = nk ? K : R;   // nk: x W^T; else x W
                        float *a = rand_f(M * Kd, 1.0f), *c0 = rand_f(M * N, 1.0f), *got = (float *)malloc((size_t)(M * N) * 4);
                        memcpy(got, c0, (size_t)(M * N) * 4);
                        if (nk) ctl__gemm_wt(ctx[c], M, N, Kd, a, Kd, types[ti], q, got, N, acc);
                        else ctl__gemm_wn(ctx[c], M, N, Kd, a, Kd, types[ti], q, got, N, acc);
                        // against the dequantised matrix in double; the error of each entry over
                        // the sum of |terms| it adds (what fp32 rounding is proportional to)
                        double e = 0.0;
                        for (int64_t i = 0; i < M; i++)
                            for (int64_t j = 0; j < N; j++) {
                                double want = acc ? c0[i * N + j] : 0.0, mag = fabs(want);
                                for (int64_t k = 0; k < Kd; k++) {
                                    double term = (double)a[i * Kd + k] * (nk ? w[j * K + k] : w[k * N + j]);
                                    want += term, mag += fabs(term);
                                }
                                e = fmax(e, fabs(got[i * N + j] - want) / (mag + 1e-30));
                            }
                        worst = fmax(worst, e), tried++, ok += e < 1e-6;
                        if (e >= 1e-6)
                            printf("    %s %s %lldx%lldx%lld acc %d %s: err %g\n", ctl_dtype_name(types[ti]), nk ? "x W^T" : "x W",
                                   (long long)M, (long long)N, (long long)Kd, acc, ctl_ctx_simd_name(ctx[c]), e);
                        free(a), free(c0), free(got);
                    }
            free(q), free(w);
        }
    CHECK(ok == tried, "%d of %d compressed products within 1e-6 of the dequantised reference", ok, tried);
    printf("    %d products (Q8_0, Q4_0, Q4_1, BF16; x W^T and x W; 1..97 rows): worst error %.1e of the sum of |terms|\n", tried, worst);
    // An infinite or NaN block scale gives what the reference gives, on every path (the vector
    // paths hand such rows to the reference loop): one row of A (all positive) times 3
    // quantised rows of 64 values. Row 1's block 1 has the bad scale and values 1 except a 0
    // first: an infinite scale makes that 0 * inf = NaN in the reference, where factoring the
    // scale out of the block would give +inf.
    for (int ti = 0; ti < 3; ti++)
        for (int bad = 0; bad < 2; bad++) {
            size_t rb = ctl_dtype_bytes(types[ti], 64), bs = ctl_dtype_bytes(types[ti], 32), q0 = types[ti] == CTL_Q4_1 ? 4 : 2;
            unsigned char *q = (unsigned char *)malloc(3 * rb), *blk = q + rb + bs;
            random_blocks(types[ti], q, 3 * 64, 0.01f);
            uint16_t h = bad ? 0x7e00 : 0x7c00;   // NaN, +inf
            memcpy(blk, &h, 2);
            for (size_t k = q0; k < bs; k++) blk[k] = types[ti] == CTL_Q8_0 ? 1 : types[ti] == CTL_Q4_0 ? 0x99 : 0x11;
            blk[q0] = types[ti] == CTL_Q8_0 ? 0 : types[ti] == CTL_Q4_0 ? 0x98 : 0x10;   // element 0 is 0
            float *a = rand_f(64, 1.0f), out[3][3];
            for (int k = 0; k < 64; k++) a[k] = fabsf(a[k]) + 0.01f;
            for (int dec = 0; dec < 2; dec++) {   // as a product, and as a decoding step's
                for (int c = 0; c < 3; c++) {
                    out[c][0] = out[c][1] = out[c][2] = 0.0f;
                    if (!ctx[c]) continue;
                    ctx[c]->decode = dec;
                    ctl__gemm_wt(ctx[c], 1, 3, 64, a, 64, types[ti], q, out[c], 3, false);
                    ctx[c]->decode = false;
                }
                for (int c = 0; c < 3; c++)
                    CHECK(!ctx[c] || (isfinite(out[c][0]) && !isfinite(out[c][1]) && isfinite(out[c][2]) &&
                                      isnan(out[c][1]) == isnan(out[1][1])),
                          "%s %s scale, %s%s: outputs %g %g %g (reference %g)", ctl_dtype_name(types[ti]), bad ? "NaN" : "inf",
                          ctx[c] ? ctl_ctx_simd_name(ctx[c]) : "-", dec ? ", decoding" : "", out[c][0], out[c][1], out[c][2], out[1][1]);
            }
            free(q), free(a);
        }
    // Decoding: a row's result does not depend on how many rows go with it (2..8 rows take
    // the 8-row kernel or the 4-column one, which sum in the same order; fp32 also with 1 row).
    static const ctl_dtype all[] = {CTL_F32, CTL_Q8_0, CTL_Q4_0, CTL_Q4_1, CTL_BF16};
    for (int ti = 0; ti < 5; ti++)
        for (int c = 0; c < 3; c++) {
            if (!ctx[c]) continue;
            int64_t R = 37, K = all[ti] == CTL_BF16 || all[ti] == CTL_F32 ? 100 : 96;
            unsigned char *q = (unsigned char *)malloc(all[ti] == CTL_F32 ? (size_t)(R * K) * 4 : ctl_dtype_bytes(all[ti], R * K));
            if (all[ti] == CTL_F32) {
                float *w = rand_f(R * K, 0.1f);
                memcpy(q, w, (size_t)(R * K) * 4), free(w);
            } else {
                random_blocks(all[ti], q, R * K, 0.01f);
            }
            float *a = rand_f(8 * K, 1.0f), c8[8 * 37], cm[8 * 37];
            ctl__gemm_wt(ctx[c], 8, R, K, a, K, all[ti], q, c8, R, false);
            bool same = true;
            for (int64_t M = all[ti] == CTL_F32 ? 1 : 2; M <= 7; M++) {
                ctl__gemm_wt(ctx[c], M, R, K, a + (8 - M) * K, K, all[ti], q, cm, R, false);
                same = same && !memcmp(cm, c8 + (8 - M) * R, (size_t)(M * R) * 4);
            }
            CHECK(same, "%s %s: decoding a row with others gives other bits than with fewer", ctl_dtype_name(all[ti]), ctl_ctx_simd_name(ctx[c]));
            free(q), free(a);
        }
    // A decoding step (ctx->decode) sums every row in one order whatever the row count, 1 to 70
    // (1 to 3 rows of quantised or bf16 weights take the one-row kernel, 4 to 8 the 8-row one,
    // more the 4 x 4 tiles), and on any thread count: each row of an M-row product has
    // the bits of the same row decoded alone, and is within 1e-6 of double.
    ctl_ctx *one = make_ctx(1, CTL_SIMD_AUTO);
    int composed = 0, composed_ok = 0;
    double dworst = 0.0;
    for (int ti = 0; ti < 5; ti++)
        for (int c = 0; c < 4; c++) {
            ctl_ctx *cx = c == 3 ? one : ctx[c];
            if (!cx) continue;
            int64_t R = 133, K = all[ti] == CTL_BF16 || all[ti] == CTL_F32 ? 100 : 160, Mmax = 70;
            unsigned char *q = (unsigned char *)malloc(all[ti] == CTL_F32 ? (size_t)(R * K) * 4 : ctl_dtype_bytes(all[ti], R * K));
            float *w = (float *)malloc((size_t)(R * K) * 4);
            if (all[ti] == CTL_F32) {
                float *r = rand_f(R * K, 0.1f);
                memcpy(q, r, (size_t)(R * K) * 4), memcpy(w, r, (size_t)(R * K) * 4), free(r);
            } else {
                random_blocks(all[ti], q, R * K, 0.01f);
                ctl_ggml_dequantize(ctl__ggml_of(all[ti]), q, w, R * K);
            }
            float *a = rand_f(Mmax * K, 1.0f), *alone = (float *)malloc((size_t)(Mmax * R) * 4), *cm = (float *)malloc((size_t)(Mmax * R) * 4);
            cx->decode = true;
            for (int64_t i = 0; i < Mmax; i++) ctl__gemm_wt(cx, 1, R, K, a + i * K, K, all[ti], q, alone + i * R, R, false);
            for (int64_t M = 2; M <= Mmax; M += M < 12 ? 1 : 29) {   // 2..11, 41, 70
                int64_t at = Mmax - M;   // the last M rows
                ctl__gemm_wt(cx, M, R, K, a + at * K, K, all[ti], q, cm, R, false);
                composed++, composed_ok += !memcmp(cm, alone + at * R, (size_t)(M * R) * 4);
            }
            cx->decode = false;
            for (int64_t i = 0; i < Mmax; i++)
                for (int64_t j = 0; j < R; j++) {
                    double want = 0.0, mag = 0.0;
                    for (int64_t k = 0; k < K; k++) want += (double)a[i * K + k] * w[j * K + k], mag += fabs((double)a[i * K + k] * w[j * K + k]);
                    dworst = fmax(dworst, fabs(alone[i * R + j] - want) / (mag + 1e-30));
                }
            free(q), free(w), free(a), free(alone), free(cm);
        }
    CHECK(composed_ok == composed, "decoding: %d of %d products give each row the bits it gets alone", composed_ok, composed);
    CHECK(dworst < 1e-6, "decoding: error %g of the sum of |terms| against double", dworst);
    printf("    decoding: %d products of 2..70 rows (every type and path, 1..3 threads) give each row its bits alone; "
           "worst error %.1e\n", composed, dworst);
    ctl_ctx_free(one);
    for (int c = 0; c < 3; c++)
        if (ctx[c]) ctl_ctx_free(ctx[c]);
}

// bf16 weights multiplied in bf16 (ctl_ctx_desc.bf16_dot): the packed products against double
// over A rounded to bf16 (the products of bf16 values are exact in fp32, so only the sums'
// rounding remains), and measurably apart from the fp32 product (so the bf16 path ran); the
// same bits on 1 and 3 threads; odd K leaves a half pair, N past NC and K past KC take
// several blocks.
static void test_bf16_dot(void) {
    ctl_ctx *ctx[2];
    for (int c = 0; c < 2; c++) {
        ctl_ctx_desc d = ctl_ctx_desc_default();
        d.n_threads = c ? 3 : 1, d.bf16_dot = true;
        CHECK(ctl_ctx_init(&ctx[c], &d) == CTL_OK, "context");
    }
    ctl_ctx *avx2 = NULL;
    ctl_ctx_desc d2 = ctl_ctx_desc_default();
    d2.simd = CTL_SIMD_AVX2, d2.bf16_dot = true;
    if (ctl_ctx_init(&avx2, &d2) == CTL_OK) {
        CHECK(!ctl_ctx_bf16_dot(avx2), "bf16 dot products in use without the AVX-512 paths");
        ctl_ctx_free(avx2);
    }
    if (!ctl_ctx_bf16_dot(ctx[0])) {
        printf("    skipped: this CPU has no AVX512_BF16 (or the build no AVX-512 paths)\n");
        ctl_ctx_free(ctx[0]), ctl_ctx_free(ctx[1]);
        return;
    }
    static const int64_t shapes[][3] = {{9, 33, 1}, {13, 40, 3}, {17, 100, 17}, {97, 70, 257}, {12, 33, 4097}, {30, 3100, 96}, {7, 48, 64}};
    int tried = 0, ok = 0, same = 0, apart = 0;
    double worst = 0.0, least_apart = 1.0;
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
        int64_t M = shapes[s][0], R = shapes[s][1], K = shapes[s][2];   // W is (R, K)
        unsigned char *q = (unsigned char *)malloc(ctl_dtype_bytes(CTL_BF16, R * K));
        float *w = (float *)malloc((size_t)(R * K) * 4);
        random_blocks(CTL_BF16, q, R * K, 0.01f);
        ctl_ggml_dequantize(CTL_GGML_BF16, q, w, R * K);
        for (int nk = 0; nk < 2; nk++) {
            int64_t N = nk ? R : K, Kd = nk ? K : R;
            if (nk && M <= 8) continue;   // a few rows go to the fp32 dot products
            float *a = rand_f(M * Kd, 1.0f), *c0 = rand_f(M * N, 1.0f), *got[2];
            for (int c = 0; c < 2; c++) {
                got[c] = (float *)malloc((size_t)(M * N) * 4);
                memcpy(got[c], c0, (size_t)(M * N) * 4);
                if (nk) ctl__gemm_wt(ctx[c], M, N, Kd, a, Kd, CTL_BF16, q, got[c], N, true);
                else ctl__gemm_wn(ctx[c], M, N, Kd, a, Kd, CTL_BF16, q, got[c], N, true);
            }
            double e = 0.0, e32 = 0.0;   // over |terms|: against bf16(A) W, against A W
            for (int64_t i = 0; i < M; i++)
                for (int64_t j = 0; j < N; j++) {
                    double want = c0[i * N + j], exact = want, mag = fabs(want);
                    for (int64_t k = 0; k < Kd; k++) {
                        double wv = nk ? w[j * K + k] : w[k * N + j], av = a[i * Kd + k];
                        want += (double)ctl_bf16_to_f32(ctl_f32_to_bf16((float)av)) * wv, exact += av * wv, mag += fabs(av * wv);
                    }
                    e = fmax(e, fabs(got[0][i * N + j] - want) / (mag + 1e-30));
                    e32 = fmax(e32, fabs(got[0][i * N + j] - exact) / (mag + 1e-30));
                }
            worst = fmax(worst, e), least_apart = fmin(least_apart, e32), tried++;
            ok += e < 1e-6, apart += e32 > 1e-5 && e32 < 4e-3, same += same_bits(got[0], got[1], M * N);
            if (e >= 1e-6 || !(e32 > 1e-5 && e32 < 4e-3))
                printf("    %s %lldx%lldx%lld: %g from bf16(A) W, %g from A W\n", nk ? "x W^T" : "x W", (long long)M, (long long)N,
                       (long long)Kd, e, e32);
            free(a), free(c0), free(got[0]), free(got[1]);
        }
        free(q), free(w);
    }
    CHECK(ok == tried, "%d of %d bf16 products within 1e-6 of bf16(A) W", ok, tried);
    CHECK(apart == tried, "%d of %d bf16 products between 1e-5 and 4e-3 from the fp32 product", apart, tried);
    CHECK(same == tried, "%d of %d bf16 products the same on 1 and 3 threads", same, tried);
    printf("    %d products (x W^T and x W, K 1..4097): worst %.1e from bf16(A) W; at least %.1e from A W (the rounding)\n", tried, worst,
           least_apart);
    ctl_ctx_free(ctx[0]), ctl_ctx_free(ctx[1]);
}

// ---- tiny models ------------------------------------------------------------------------------

static ctl_model_config tiny32_config(ctl_arch arch, bool tied) {   // widths a multiple of 32 (quantisable)
    ctl_model_config c;
    memset(&c, 0, sizeof c);
    c.arch = arch, c.vocab_size = 29, c.n_ctx = 12, c.n_embd = 32, c.n_layer = 2, c.n_head = 4;
    c.n_kv_head = arch == CTL_ARCH_LLAMA ? 2 : 0;
    c.n_ff = arch == CTL_ARCH_LLAMA ? 64 : 0;
    c.tied_embeddings = tied;
    return c;
}

// Writes model m as GGUF with every matrix quantised as `type` (the test's quantiser); NULL
// on failure.
static bool save_quantized(ctl_model *m, ctl_dtype type, const char *path) {
    ctl_ctx *ctx = ctl_model_ctx(m);
    if (ctl_model_save_gguf(m, path, CTL_GGML_F32) != CTL_OK) return false;
    ctl_gguf *g = NULL;
    ctl_gguf_writer *w = NULL;
    if (ctl_gguf_open(ctx, path, &g) != CTL_OK || ctl_gguf_writer_init(ctx, &w) != CTL_OK) return false;
    bool ok = true;
    for (int64_t i = 0; ok && i < ctl_gguf_kv_count(g); i++) ok = ctl_gguf_writer_copy_kv(w, g, ctl_gguf_kv_at(g, i)) == CTL_OK;
    for (int64_t i = 0; ok && i < ctl_gguf_tensor_count(g); i++) {
        const ctl_gguf_tensor *t = ctl_gguf_tensor_at(g, i);
        int64_t n = ctl_gguf_tensor_numel(t);
        if (t->n_dims == 2 && t->ne[0] % 32 == 0) {
            unsigned char *q = (unsigned char *)malloc(ctl_dtype_bytes(type, n));
            quantize_blocks(type, (const float *)t->data, q, n);
            ok = ctl_gguf_writer_add_raw(w, t->name, ctl__ggml_of(type), 2, t->ne, q) == CTL_OK;
            free(q);
        } else {
            ok = ctl_gguf_writer_add_tensor(w, t->name, CTL_GGML_F32, t->n_dims, t->ne, (const float *)t->data) == CTL_OK;
        }
    }
    ok = ok && ctl_gguf_writer_save(w, path) == CTL_OK;
    ctl_gguf_writer_free(w);
    ctl_gguf_close(g);
    return ok;
}

// Random nonzero values for every adapter parameter (B starts at 0, which hides A's gradient),
// and DoRA magnitudes away from the norms.
static void randomize_adapters(ctl_model *m, float scale) {
    for (int64_t i = 0; i < ctl_model_param_count(m); i++) {
        ctl_param *p = ctl_model_param(m, i);
        if (!strstr(p->name, ".lora_") && !strstr(p->name, ".sparse")) continue;
        float *x = (float *)p->value.data;
        for (int64_t j = 0; j < ctl_tensor_numel(&p->value); j++)
            x[j] = strstr(p->name, ".lora_m") ? x[j] * (0.7f + 0.6f * ctl_rng_uniform(&g_rng)) : x[j] + scale * ctl_rng_normal(&g_rng);
    }
}

typedef struct adapter_case {
    const char *label;
    ctl_arch arch;
    bool tied, separate_qkv;
    ctl_dtype base;            // CTL_F32 or a quantised type
    ctl_lora_desc lora;        // rank 0: none
    ctl_sparse_desc sparse;    // density 0: none
} adapter_case;

// A tiny model for case c with its adapters attached and randomised (NULL on failure).
static ctl_model *adapter_model(ctl_ctx *ctx, const adapter_case *c) {
    ctl_model_config cfg = tiny32_config(c->arch, c->tied);
    cfg.separate_qkv = c->separate_qkv;
    ctl_model *m = NULL;
    CHECK(ctl_model_create(ctx, &cfg, &m) == CTL_OK, "%s: create: %s", c->label, ctl_last_error(ctx));
    if (!m) return NULL;
    ctl_model_init_random(m, 7);
    scale_weights(m, 10.0f);
    if (c->base != CTL_F32) {
        ctl_model *q = NULL;
        ctl_model_desc md = {true, false};
        CHECK(save_quantized(m, c->base, "build/adapter_base.gguf") && ctl_model_load_gguf(ctx, "build/adapter_base.gguf", &md, &q) == CTL_OK,
              "%s: quantised base: %s", c->label, ctl_last_error(ctx));
        ctl_model_free(m);
        if (!(m = q)) return NULL;
    }
    if (c->lora.rank) CHECK(ctl_lora_attach(m, &c->lora) == CTL_OK, "%s: lora_attach: %s", c->label, ctl_last_error(ctx));
    if (c->sparse.density > 0) CHECK(ctl_sparse_attach(m, &c->sparse) == CTL_OK, "%s: sparse_attach: %s", c->label, ctl_last_error(ctx));
    randomize_adapters(m, 0.1f);
    return m;
}

static ctl_lora_desc lora_desc(int64_t rank, float dropout, uint32_t targets, bool rslora, bool dora, uint64_t seed) {
    ctl_lora_desc d;
    memset(&d, 0, sizeof d);
    d.rank = rank, d.alpha = 2.0f * (float)rank, d.dropout = dropout, d.targets = targets;
    d.rslora = rslora, d.dora = dora, d.seed = seed;
    return d;
}

static ctl_sparse_desc sparse_desc(float density, uint32_t targets, ctl_sparse_select select, uint64_t seed) {
    ctl_sparse_desc d;
    memset(&d, 0, sizeof d);
    d.density = density, d.targets = targets, d.select = select, d.seed = seed;
    return d;
}

static adapter_case adapter_case_of(const char *label, ctl_arch arch, bool tied, bool separate_qkv, ctl_dtype base,
                                    ctl_lora_desc lora, ctl_sparse_desc sparse) {
    adapter_case c;
    c.label = label, c.arch = arch, c.tied = tied, c.separate_qkv = separate_qkv, c.base = base, c.lora = lora, c.sparse = sparse;
    return c;
}

static void test_adapter_gradcheck(void) {
    const ctl_arch L = CTL_ARCH_LLAMA, G = CTL_ARCH_GPT2;
    ctl_lora_desc none = lora_desc(0, 0, 0, false, false, 0), rs = lora_desc(4, 0, 0, true, false, 2);
    ctl_sparse_desc nos = sparse_desc(0, 0, CTL_SPARSE_MAGNITUDE, 0);
    rs.layer_from = 1, rs.layer_to = 2, rs.init = CTL_LORA_INIT_GAUSSIAN;
    adapter_case cases[] = {
        adapter_case_of("lora", L, true, false, CTL_F32, lora_desc(4, 0, 0, false, false, 1), nos),
        adapter_case_of("rslora, gaussian, blocks [1, 2)", L, true, false, CTL_F32, rs, nos),
        adapter_case_of("lora + dropout", L, true, false, CTL_F32, lora_desc(4, 0.3f, 0, false, false, 3), nos),
        adapter_case_of("dora", L, true, false, CTL_F32, lora_desc(4, 0, 0, false, true, 4), nos),
        adapter_case_of("dora + dropout", L, true, false, CTL_F32, lora_desc(4, 0.3f, 0, false, true, 5), nos),
        adapter_case_of("head and embedding lora", L, false, false, CTL_F32,
                        lora_desc(3, 0.2f, CTL_LINEAR_HEAD | CTL_LINEAR_EMBED | CTL_LINEAR_V, false, false, 6), nos),
        adapter_case_of("sparse, magnitude", L, true, false, CTL_F32, none, sparse_desc(0.1f, 0, CTL_SPARSE_MAGNITUDE, 0)),
        adapter_case_of("sparse, random + lora", L, true, false, CTL_F32, lora_desc(2, 0, CTL_LINEAR_ATTN, false, false, 7),
                        sparse_desc(0.05f, CTL_LINEAR_MLP, CTL_SPARSE_RANDOM, 9)),
        adapter_case_of("gpt2 fused qkv, dora + dropout", G, true, false, CTL_F32, lora_desc(4, 0.3f, 0, false, true, 8), nos),
        adapter_case_of("gpt2 separate qkv, lora + dropout", G, true, true, CTL_F32, lora_desc(4, 0.1f, 0, false, false, 9), nos),
        adapter_case_of("q4_1 base, dora", L, true, false, CTL_Q4_1, lora_desc(4, 0, 0, false, true, 10), nos),
        adapter_case_of("q8_0 base, lora + sparse", L, true, false, CTL_Q8_0, lora_desc(4, 0.2f, CTL_LINEAR_ATTN, false, false, 11),
                        sparse_desc(0.1f, CTL_LINEAR_MLP, CTL_SPARSE_MAGNITUDE, 0)),
        adapter_case_of("q4_0 base, lora", L, true, false, CTL_Q4_0, lora_desc(4, 0, 0, false, false, 12), nos),
    };
    for (size_t ci = 0; ci < sizeof cases / sizeof cases[0]; ci++) {
        const adapter_case *c = &cases[ci];
        ctl_ctx *ctx = make_ctx(2, CTL_SIMD_AUTO);
        ctl_model *m = adapter_model(ctx, c);
        ctl_train *t = NULL;
        int32_t tok[2 * 9], tgt[2 * 9];
        float w[2 * 9];
        make_batch(2, 9, 29, tok, tgt, w, 5 + ci);
        ctl_batch b = {2, 9, tok, tgt, w};
        ctl_train_desc d;
        memset(&d, 0, sizeof d);
        d.batch = 2, d.seq_len = 9, d.lm_head_chunk = 4, d.seed = 77;
        CHECK(m && ctl_train_init(m, &d, &t) == CTL_OK, "%s: train_init: %s", c->label, ctl_last_error(ctx));
        if (!t) {
            ctl_model_free(m), ctl_ctx_free(ctx);
            continue;
        }
        fwd_loss_fixed(ctx, t, &b);
        ctl_train_backward(t);
        t->run.hold_norms = true;   // DoRA's gradient treats its norms as constants: so must the differences
        double worst = 0.0;
        int checked = 0, frozen_ok = 1;
        for (int64_t i = 0; i < ctl_model_param_count(m); i++) {
            ctl_param *p = ctl_model_param(m, i);
            if (!p->trainable) {
                frozen_ok &= ctl_train_grad(t, i) == NULL;
                continue;
            }
            worst = fmax(worst, directional_check(ctx, m, t, &b, i, 1e-2f, c->label));
            checked++;
        }
        CHECK(frozen_ok && checked > 0, "%s: frozen parameters have no gradient, %d adapter tensors checked", c->label, checked);
        printf("    %-34s %3d adapter tensors, worst rel err %.2e\n", c->label, checked, worst);
        ctl_train_free(t);
        ctl_model_free(m);
        ctl_ctx_free(ctx);
    }
}

// The log-probs of one batch through a fresh trainer (dropout off: these models have none).
static bool batch_logprobs(ctl_ctx *ctx, ctl_model *m, const ctl_batch *b, float *out) {
    ctl_train *t = NULL;
    ctl_train_desc d;
    memset(&d, 0, sizeof d);
    d.batch = b->B, d.seq_len = b->T;
    bool ok = ctl_train_init(m, &d, &t) == CTL_OK && ctl_train_forward(t, b) == CTL_OK;
    if (ok) memcpy(out, ctl_train_logprobs(t), (size_t)(b->B * b->T) * sizeof(float));
    else printf("    batch_logprobs: %s\n", ctl_last_error(ctx));
    ctl_train_free(t);
    return ok;
}

// Next-token logits after a prompt, through the KV-cache forward.
static bool infer_logits(ctl_model *m, const int32_t *prompt, int64_t n, float *logits) {
    ctl_infer *f = NULL;
    ctl_infer_desc id = {1, 12};
    bool ok = ctl_infer_init(m, &id, &f) == CTL_OK && ctl_infer_feed(f, 0, prompt, n, logits) == CTL_OK;
    ctl_infer_free(f);
    return ok;
}

// Quantised and bf16 bases: the same file loaded kept quantised and loaded as fp32
// (dequantised) gives the same log-probs, generation logits and LoRA gradients, in less memory.
// An fp32 file loaded with desc.bf16 holds the bits of the bf16 file.
static void test_quantized_model(void) {
    static const ctl_dtype types[] = {CTL_Q8_0, CTL_Q4_0, CTL_Q4_1, CTL_BF16};
    ctl_ctx *ctx = make_ctx(2, CTL_SIMD_AUTO);
    int32_t tok[2 * 9], tgt[2 * 9];
    make_batch(2, 9, 29, tok, tgt, NULL, 3);
    ctl_batch b = {2, 9, tok, tgt, NULL};
    for (int ti = 0; ti < 4; ti++)
        for (int tied = 0; tied < 2; tied++) {
            ctl_model_config cfg = tiny32_config(CTL_ARCH_LLAMA, tied);
            ctl_model *m0 = NULL, *q = NULL, *f = NULL, *h = NULL;
            ctl_model_create(ctx, &cfg, &m0);
            ctl_model_init_random(m0, 3);
            scale_weights(m0, 10.0f);
            ctl_model_desc keep = {true, false}, to_bf16 = {false, true};
            bool ok = save_quantized(m0, types[ti], "build/quant.gguf") && ctl_model_load_gguf(ctx, "build/quant.gguf", &keep, &q) == CTL_OK &&
                      ctl_model_load_gguf(ctx, "build/quant.gguf", NULL, &f) == CTL_OK;
            CHECK(ok, "%s: load: %s", ctl_dtype_name(types[ti]), ctl_last_error(ctx));
            if (ok && types[ti] == CTL_BF16) {
                bool same = ctl_model_save_gguf(m0, "build/quant_f32.gguf", CTL_GGML_F32) == CTL_OK &&
                            ctl_model_load_gguf(ctx, "build/quant_f32.gguf", &to_bf16, &h) == CTL_OK;
                for (int64_t i = 0; same && i < ctl_model_param_count(q); i++) {
                    const ctl_tensor *a = &ctl_model_param(q, i)->value, *c = &ctl_model_param(h, i)->value;
                    same = a->dtype == c->dtype && !memcmp(a->data, c->data, ctl_dtype_bytes(a->dtype, ctl_tensor_numel(a)));
                }
                CHECK(same, "bf16 %s: an fp32 file loaded as bf16 differs from the bf16 file: %s", tied ? "tied" : "untied", ctl_last_error(ctx));
                ctl_model_free(h);
            }
            ctl_model_free(m0);
            if (!ok) {
                ctl_model_free(q), ctl_model_free(f);
                continue;
            }
            int quantised = 0;
            for (int64_t i = 0; i < ctl_model_param_count(q); i++) quantised += ctl_model_param(q, i)->value.dtype == types[ti];
            float lq[18], lf[18], gq[29], gf[29];
            ok = batch_logprobs(ctx, q, &b, lq) && batch_logprobs(ctx, f, &b, lf) && infer_logits(q, tok, 5, gq) && infer_logits(f, tok, 5, gf);
            double e1 = rel_err_ff(lq, lf, 18), e2 = rel_err_ff(gq, gf, 29);
            // LoRA gradients on both bases, from the same adapter values
            ctl_lora_desc ld = lora_desc(4, 0, 0, false, true, 1);
            ok = ok && ctl_lora_attach(q, &ld) == CTL_OK && ctl_lora_attach(f, &ld) == CTL_OK;
            randomize_adapters(q, 0.1f);
            ctl_train *tq = NULL, *tf = NULL;
            ctl_train_desc d;
            memset(&d, 0, sizeof d);
            d.batch = 2, d.seq_len = 9;
            ok = ok && ctl_train_init(q, &d, &tq) == CTL_OK && ctl_train_init(f, &d, &tf) == CTL_OK;
            double eg = 0.0;
            if (ok) {
                for (int64_t i = ctl_model_param_count(f) - 1; i >= 0 && ctl_model_param(f, i)->trainable; i--)
                    memcpy(ctl_model_param(f, i)->value.data, ctl_model_param(q, i)->value.data,
                           (size_t)ctl_tensor_numel(&ctl_model_param(q, i)->value) * 4);
                fwd_loss(ctx, tq, &b), ctl_train_backward(tq), fwd_loss(ctx, tf, &b), ctl_train_backward(tf);
                for (int64_t i = 0; i < ctl_model_param_count(q); i++)
                    if (ctl_train_grad(tq, i))
                        eg = fmax(eg, rel_err_ff(ctl_train_grad(tq, i), ctl_train_grad(tf, i), ctl_tensor_numel(&ctl_model_param(q, i)->value)));
            }
            CHECK(ok && quantised == (tied ? 15 : 16), "%s: %d tensors quantised: %s", ctl_dtype_name(types[ti]), quantised, ctl_last_error(ctx));
            CHECK(ok && e1 < 1e-5 && e2 < 1e-5 && eg < 1e-4, "%s %s: log-probs %g, generation logits %g, DoRA gradients %g apart",
                  ctl_dtype_name(types[ti]), tied ? "tied" : "untied", e1, e2, eg);
            bool bf = types[ti] == CTL_BF16;   // half the matrices' bytes (the norms and the adapters stay fp32)
            CHECK(ctl_model_bytes(q) * (bf ? 3 : 2) < ctl_model_bytes(f) * (bf ? 2 : 1), "%s: %zu bytes kept, %zu as fp32", ctl_dtype_name(types[ti]),
                  ctl_model_bytes(q), ctl_model_bytes(f));
            printf("    %s %-6s %2d tensors kept, %6zu of %6zu bytes: log-probs %.1e, logits %.1e, DoRA gradients %.1e apart\n",
                   ctl_dtype_name(types[ti]), tied ? "tied" : "untied", quantised, ctl_model_bytes(q), ctl_model_bytes(f), e1, e2, eg);
            ctl_train_free(tq), ctl_train_free(tf);
            ctl_model_free(q), ctl_model_free(f);
        }
    // gpt2: its position embedding (a matrix in the file, added to the input) stays fp32.
    for (int ti = 0; ti < 4; ti++) {
        ctl_model_config cfg = tiny32_config(CTL_ARCH_GPT2, false);
        ctl_model *m0 = NULL, *q = NULL, *f = NULL;
        ctl_model_create(ctx, &cfg, &m0);
        ctl_model_init_random(m0, 5);
        ctl_model_desc keep = {true, false};
        bool ok = save_quantized(m0, types[ti], "build/quant.gguf") && ctl_model_load_gguf(ctx, "build/quant.gguf", &keep, &q) == CTL_OK &&
                  ctl_model_load_gguf(ctx, "build/quant.gguf", NULL, &f) == CTL_OK;
        float lq[18], lf[18], gq[29], gf[29];
        ok = ok && batch_logprobs(ctx, q, &b, lq) && batch_logprobs(ctx, f, &b, lf) && infer_logits(q, tok, 5, gq) && infer_logits(f, tok, 5, gf);
        const ctl_param *pe = ok ? ctl_model_find(q, "position_embd.weight") : NULL;
        double e1 = ok ? rel_err_ff(lq, lf, 18) : 1.0, e2 = ok ? rel_err_ff(gq, gf, 29) : 1.0;
        CHECK(ok && pe && pe->value.dtype == CTL_F32 && e1 < 1e-5 && e2 < 1e-5,
              "gpt2 %s kept: position embedding %s, log-probs %g, logits %g apart: %s", ctl_dtype_name(types[ti]),
              pe ? ctl_dtype_name(pe->value.dtype) : "missing", e1, e2, ctl_last_error(ctx));
        ctl_model_free(m0), ctl_model_free(q), ctl_model_free(f);
    }
    ctl_ctx_free(ctx);
}

// Generation and merging with adapters: the KV-cache forward gives the training forward's
// logits; adapters switched off give the base's; merged weights give the adapters' forward;
// unmerging gives the base back; a model saved with adapters attached is the merged model.
static void test_adapter_forwards(void) {
    const ctl_arch L = CTL_ARCH_LLAMA, G = CTL_ARCH_GPT2;
    ctl_sparse_desc nos = sparse_desc(0, 0, CTL_SPARSE_MAGNITUDE, 0);
    adapter_case cases[] = {
        adapter_case_of("lora", L, true, false, CTL_F32, lora_desc(4, 0, 0, false, false, 1), nos),
        adapter_case_of("dora", L, true, false, CTL_F32, lora_desc(4, 0, 0, false, true, 2), nos),
        adapter_case_of("head and embedding lora", L, false, false, CTL_F32, lora_desc(3, 0, CTL_LINEAR_ALL | CTL_LINEAR_HEAD | CTL_LINEAR_EMBED, true, false, 3), nos),
        adapter_case_of("lora + sparse", L, true, false, CTL_F32, lora_desc(2, 0, CTL_LINEAR_ATTN, false, false, 4), sparse_desc(0.1f, CTL_LINEAR_MLP, CTL_SPARSE_RANDOM, 5)),
        adapter_case_of("gpt2 dora", G, true, false, CTL_F32, lora_desc(4, 0, 0, false, true, 6), nos),
        adapter_case_of("gpt2 separate qkv, lora", G, true, true, CTL_F32, lora_desc(4, 0, 0, false, false, 7), nos),
        adapter_case_of("q4_1 base, dora", L, true, false, CTL_Q4_1, lora_desc(4, 0, 0, false, true, 8), nos),
    };
    int32_t tok[9] = {1, 5, 2, 8, 3, 7, 4, 6, 9}, tgt[9] = {0};
    ctl_batch b = {1, 9, tok, tgt, NULL};
    for (size_t ci = 0; ci < sizeof cases / sizeof cases[0]; ci++) {
        const adapter_case *c = &cases[ci];
        ctl_ctx *ctx = make_ctx(2, CTL_SIMD_AUTO);
        ctl_model *m = adapter_model(ctx, c), *plain = NULL;
        if (!m) continue;
        ctl_train *t = NULL;
        ctl_train_desc d;
        memset(&d, 0, sizeof d);
        d.batch = 1, d.seq_len = 9;
        float train[29], gen[29], base_on[29], base_off[29], merged[29], saved[29];
        bool ok = ctl_train_init(m, &d, &t) == CTL_OK && ctl_train_forward(t, &b) == CTL_OK && ctl_train_logits(t, 0, 8, train) == CTL_OK &&
                  infer_logits(m, tok, 9, gen);
        ctl_train_free(t);
        ctl_adapters_enable(m, false);
        ok = ok && infer_logits(m, tok, 9, base_off);
        ctl_adapters_enable(m, true);
        // the base alone, as a model without adapters: the same file saved before attaching
        ctl_model_config cfg = tiny32_config(c->arch, c->tied);
        cfg.separate_qkv = c->separate_qkv;
        ok = ok && ctl_model_create(ctx, &cfg, &plain) == CTL_OK;
        if (ok) {
            for (int64_t i = 0; i < ctl_model_param_count(plain); i++) {
                ctl_tensor *v = &ctl_model_param(m, i)->value;
                if (v->dtype == CTL_F32) memcpy(ctl_model_param(plain, i)->value.data, v->data, (size_t)ctl_tensor_numel(v) * 4);
                else ctl_ggml_dequantize(ctl__ggml_of(v->dtype), v->data, (float *)ctl_model_param(plain, i)->value.data, ctl_tensor_numel(v));
            }
            ok = infer_logits(plain, tok, 9, base_on);
        }
        ok = ok && ctl_model_save_gguf(m, "build/merged.gguf", CTL_GGML_F32) == CTL_OK;
        ctl_model *back = NULL;
        ok = ok && ctl_model_load_gguf(ctx, "build/merged.gguf", NULL, &back) == CTL_OK && infer_logits(back, tok, 9, saved);
        ctl_model_free(back);
        double e_gen = rel_err_ff(gen, train, 29), e_off = rel_err_ff(base_off, base_on, 29), e_saved = rel_err_ff(saved, gen, 29);
        double e_merge = 0.0, e_unmerge = 0.0;
        int64_t exact = 0, total = 0;
        if (c->base == CTL_F32) {   // merge in place, then unmerge
            ok = ok && ctl_adapters_merge(m) == CTL_OK && infer_logits(m, tok, 9, merged);
            e_merge = rel_err_ff(merged, gen, 29);
            ok = ok && ctl_adapters_merge(m) == CTL_ERR_INVALID && ctl_adapters_unmerge(m) == CTL_OK;
            for (int64_t i = 0; ok && i < ctl_model_param_count(plain); i++) {
                const float *x = (const float *)ctl_model_param(m, i)->value.data, *y = (const float *)ctl_model_param(plain, i)->value.data;
                int64_t n = ctl_tensor_numel(&ctl_model_param(plain, i)->value);
                for (int64_t k = 0; k < n; k++) exact += x[k] == y[k];
                total += n;
                e_unmerge = fmax(e_unmerge, rel_err_ff(x, y, n));
            }
        }
        CHECK(ok, "%s: %s", c->label, ctl_last_error(ctx));
        CHECK(e_gen < 1e-5 && e_off < 1e-5 && e_saved < 1e-5 && e_merge < 1e-5 && e_unmerge < 1e-5,
              "%s: generation %g, adapters off %g, saved merged %g, merged %g, unmerged %g", c->label, e_gen, e_off, e_saved, e_merge, e_unmerge);
        printf("    %-26s generation %.0e, off %.0e, merged %.0e, saved merged %.0e; unmerge: %.0e (%.1f%% of weights exact)\n", c->label,
               e_gen, e_off, e_merge, e_saved, e_unmerge, total ? 100.0 * (double)exact / (double)total : 100.0);
        ctl_model_free(plain);
        ctl_model_free(m);
        ctl_ctx_free(ctx);
    }
}

// The planner's bytes for an adapted (and quantised) model equal what the trainer allocates;
// freezing by kind, layer and name; sparse selection by magnitude, gradient and at random.
static void test_adapter_bookkeeping(void) {
    ctl_ctx *ctx = make_ctx(2, CTL_SIMD_AUTO);
    ctl_sparse_desc nos = sparse_desc(0, 0, CTL_SPARSE_MAGNITUDE, 0);
    adapter_case c = adapter_case_of("plan", CTL_ARCH_LLAMA, true, false, CTL_Q4_1, lora_desc(4, 0.1f, 0, false, true, 1), nos);
    ctl_model *m = adapter_model(ctx, &c);
    ctl_train_desc d;
    memset(&d, 0, sizeof d);
    d.batch = 3, d.seq_len = 7;
    ctl_memory_plan plan, got;
    ctl_train *t = NULL;
    CHECK(m && ctl_train_plan_model(m, &d, &plan) == CTL_OK && ctl_train_init(m, &d, &t) == CTL_OK, "plan: %s", ctl_last_error(ctx));
    if (t) {
        ctl_train_memory(t, &got);
        CHECK(!memcmp(&plan, &got, sizeof plan) && got.total == got.weights + t->arena.size && t->arena.used == t->arena.size,
              "plan %zu == allocated %zu", plan.total, got.total);
        int64_t lora_numel = 0;
        for (int64_t i = 0; i < ctl_model_param_count(m); i++)
            if (ctl_model_param(m, i)->trainable) lora_numel += ctl_tensor_numel(&ctl_model_param(m, i)->value);
        CHECK(got.grads == 0 || got.grads >= (size_t)lora_numel * 4, "gradients only for the adapters");
        // a trainer refuses to run once the model's adapters change
        int32_t tok[3 * 7] = {0}, tgt[3 * 7] = {0};
        ctl_batch b = {3, 7, tok, tgt, NULL};
        CHECK(ctl_lora_attach(m, NULL) == CTL_ERR_INVALID, "second LoRA on the same weights refused");
        CHECK(ctl_model_set_trainable_match(m, "blk.0.*.lora_m", false) == 7 && ctl_train_forward(t, &b) == CTL_ERR_INVALID &&
              strstr(ctl_last_error(ctx), "changed after ctl_train_init"), "stale trainer: %s", ctl_last_error(ctx));
    }
    ctl_train_free(t);
    ctl_model_free(m);

    // freezing
    ctl_model_config cfg = tiny32_config(CTL_ARCH_GPT2, true);
    ctl_model_create(ctx, &cfg, &m);
    int64_t all = ctl_model_set_trainable(m, CTL_KIND_ALL, 0, 0, false);
    int64_t last = ctl_model_set_trainable(m, CTL_KIND_ALL, 1, 2, true), norms = ctl_model_set_trainable(m, CTL_KIND_NORM, 0, 0, true);
    int64_t n_trainable = 0;
    for (int64_t i = 0; i < ctl_model_param_count(m); i++) n_trainable += ctl_model_param(m, i)->trainable;
    // gpt2 block: 2 norms x 2 + qkv w, b + o w, b + up w, b + down w, b = 12; 2 blocks; + wte, wpe, ln_f w, b.
    // Then the last block, then every norm (4 of them in block 0 and the final one's 2 more).
    CHECK(all == 28 && last == 12 && norms == 4 * 2 + 2 && n_trainable == 12 + 6, "freezing: %d %d %d, %d trainable",
          (int)all, (int)last, (int)norms, (int)n_trainable);
    CHECK(ctl_model_set_trainable_match(m, "blk.?.attn_*", false) == 12 && !ctl_model_find(m, "blk.1.attn_qkv.weight")->trainable &&
          ctl_model_find(m, "blk.1.ffn_up.weight")->trainable, "freezing by name");
    ctl_model_free(m);

    // sparse selection
    cfg = tiny32_config(CTL_ARCH_LLAMA, true);
    ctl_model_create(ctx, &cfg, &m);
    ctl_model_init_random(m, 5);
    int32_t tok[2 * 9], tgt[2 * 9];
    make_batch(2, 9, 29, tok, tgt, NULL, 8);
    ctl_batch batches[2] = {{2, 9, tok, tgt, NULL}, {1, 9, tok + 9, tgt + 9, NULL}};
    // the gradient scores by hand: a full fine-tuning trainer, |gradient| of each batch summed
    ctl_param *q = ctl_model_find(m, "blk.1.attn_q.weight");
    int64_t nq = ctl_tensor_numel(&q->value), qi = q - ctl_model_param(m, 0);
    float *want = zeros_f(nq);
    ctl_train *full = NULL;
    d.batch = 2, d.seq_len = 9;
    ctl_train_init(m, &d, &full);
    for (int k = 0; k < 2; k++) {
        fwd_loss(ctx, full, &batches[k]);
        ctl_train_backward(full);
        for (int64_t j = 0; j < nq; j++) want[j] += fabsf(ctl_train_grad(full, qi)[j]), ctl_train_grad(full, qi)[j] = 0.0f;
        full->n_micro = 0;
    }
    ctl_train_free(full);
    ctl_sparse_desc sd = sparse_desc(0.05f, CTL_LINEAR_Q | CTL_LINEAR_DOWN, CTL_SPARSE_GRADIENT, 0);
    CHECK(ctl_sparse_attach(m, &sd) == CTL_ERR_INVALID && strstr(ctl_last_error(ctx), "ctl_sparse_calibrate"), "gradient selection needs scores");
    CHECK(ctl_sparse_calibrate(m, &sd, batches, 2) == CTL_OK && ctl_sparse_attach(m, &sd) == CTL_OK, "calibrate: %s", ctl_last_error(ctx));
    const ctl__adapter *ad = &m->adapters[m->adapter_of[qi]];
    double e = rel_err_ff(m->scores[qi], want, nq);
    float kth = 0.0f, best_out = 0.0f;   // the chosen are the K best scores
    bool sorted = true;
    for (int64_t k = 0; k < ad->n_sparse; k++) kth = k ? fminf(kth, want[ad->sparse_idx[k]]) : want[ad->sparse_idx[0]];
    for (int64_t k = 1; k < ad->n_sparse; k++) sorted &= ad->sparse_idx[k] > ad->sparse_idx[k - 1];
    for (int64_t j = 0, k = 0; j < nq; j++) {
        if (k < ad->n_sparse && ad->sparse_idx[k] == j) {
            k++;
            continue;
        }
        best_out = fmaxf(best_out, want[j]);
    }
    CHECK(e < 1e-6 && ad->n_sparse == (int64_t)(0.05 * nq + 0.5) && sorted && best_out <= kth * (1 + 1e-5f),
          "gradient scores %g from the hand-made ones; %d entries, the best (outside max %g, inside min %g)", e, (int)ad->n_sparse,
          (double)best_out, (double)kth);
    CHECK(ctl_sparse_attach(m, &sd) == CTL_ERR_INVALID, "a second sparse delta on the same weight refused");
    sd = sparse_desc(0.2f, CTL_LINEAR_K, CTL_SPARSE_MAGNITUDE, 0);
    CHECK(ctl_sparse_attach(m, &sd) == CTL_OK, "magnitude: %s", ctl_last_error(ctx));
    ctl_param *k0 = ctl_model_find(m, "blk.0.attn_k.weight");
    ad = &m->adapters[m->adapter_of[k0 - ctl_model_param(m, 0)]];
    float in_min = INFINITY, out_max = 0.0f;
    for (int64_t j = 0, k = 0; j < ctl_tensor_numel(&k0->value); j++) {
        float a = fabsf(((const float *)k0->value.data)[j]);
        if (k < ad->n_sparse && ad->sparse_idx[k] == j) in_min = fminf(in_min, a), k++;
        else out_max = fmaxf(out_max, a);
    }
    CHECK(in_min >= out_max, "magnitude: the largest |W| (inside min %g, outside max %g)", (double)in_min, (double)out_max);
    printf("    plan == allocation; freezing by kind/layer/name; sparse: scores equal hand-made sums of |gradient| (%.0e), "
           "the best entries kept\n", e);
    free(want);
    ctl_model_free(m);
    ctl_ctx_free(ctx);
}

// PEFT: adapters saved by PEFT load (ctl_lora_load_peft) onto the base saved by transformers,
// and give PEFT's loss and adapter gradients (tools/make_adapter_fixtures.py); in the adjacent
// RoPE layout too (B's q/k rows reordered on the way in). Saved back by cotlab and loaded again,
// the adapters are the same.
static void test_peft_fixtures(void) {
    static const char *const variants[] = {"lora", "dora", "rslora_untied"};
    for (int v = 0; v < 3; v++) {
        char dir[256], path[300];
        snprintf(dir, sizeof dir, FIXTURE_DIR "peft/%s", variants[v]);
        snprintf(path, sizeof path, "peft/%s/ref.bin", variants[v]);
        fixture fx;
        if (!fx_load(path, &fx)) {
            CHECK(false, "cannot read %s", path);
            continue;
        }
        const int32_t *ci = (const int32_t *)fx_get(&fx, "config")->data;
        for (int layout = 0; layout < 2; layout++) {
            ctl_ctx *ctx = make_ctx(2, CTL_SIMD_AUTO);
            ctl_model_config cfg;
            memset(&cfg, 0, sizeof cfg);
            cfg.arch = CTL_ARCH_LLAMA, cfg.vocab_size = ci[0], cfg.n_ctx = ci[1], cfg.n_embd = ci[2], cfg.n_layer = ci[3];
            cfg.n_head = ci[4], cfg.n_kv_head = ci[5], cfg.n_ff = ci[6], cfg.tied_embeddings = ci[7] != 0;
            cfg.rope_layout = layout ? CTL_ROPE_ADJACENT : CTL_ROPE_HALVES;
            ctl_model *m = NULL;
            ctl_train *t = NULL;
            snprintf(path, sizeof path, "%s/model.safetensors", dir);
            bool ok = ctl_model_create(ctx, &cfg, &m) == CTL_OK && ctl_model_load_safetensors(m, path) == CTL_OK &&
                      ctl_lora_load_peft(m, dir) == CTL_OK;
            CHECK(ok, "%s: load: %s", variants[v], ctl_last_error(ctx));
            ctl_batch b = {2, 9, (const int32_t *)fx_get(&fx, "tokens")->data, (const int32_t *)fx_get(&fx, "targets")->data,
                           fx_f(&fx, "weights")};
            ctl_train_desc d;
            memset(&d, 0, sizeof d);
            d.batch = 2, d.seq_len = 9;
            ok = ok && ctl_train_init(m, &d, &t) == CTL_OK;
            float loss = ok ? fwd_loss(ctx, t, &b) : NAN, want = fx_f(&fx, "loss")[0];
            ok = ok && ctl_train_backward(t) == CTL_OK;
            double worst = 0.0;
            int n_grad = 0;
            for (int r = 0; ok && layout == 0 && r < fx.n; r++) {   // gradients in PEFT's own (halves) row order
                if (strncmp(fx.recs[r].name, "grad/", 5)) continue;
                ctl_param *p = ctl_model_find(m, fx.recs[r].name + 5);
                int64_t i = p ? p - ctl_model_param(m, 0) : -1;
                CHECK(p && p->trainable && ctl_tensor_numel(&p->value) == fx.recs[r].numel, "%s: %s", variants[v], fx.recs[r].name);
                if (!p || ctl_tensor_numel(&p->value) != fx.recs[r].numel) continue;
                double e = rel_err_ff(ctl_train_grad(t, i), (const float *)fx.recs[r].data, fx.recs[r].numel);
                worst = fmax(worst, e), n_grad++;
                CHECK(e <= 1e-4, "%s %s: gradient rel err %g", variants[v], p->name, e);
            }
            double el = fabs(loss - want) / fabs(want);
            CHECK(ok && el <= 1e-5, "%s %s: loss %.7f, PEFT %.7f: %s", variants[v], layout ? "adjacent" : "halves", (double)loss,
                  (double)want, ctl_last_error(ctx));
            // cotlab's own PEFT files, loaded again onto a fresh copy of the base
            ctl_model *again = NULL;
            snprintf(path, sizeof path, "build/peft_%s", variants[v]);
            bool same = ok && ctl_lora_save_peft(m, path) == CTL_OK && ctl_model_create(ctx, &cfg, &again) == CTL_OK &&
                        ctl_lora_load_peft(again, path) == CTL_OK && ctl_model_param_count(again) == ctl_model_param_count(m);
            for (int64_t i = ctl_model_param_count(m) - 1; same && ctl_model_param(m, i)->trainable; i--)
                same = !memcmp(ctl_model_param(m, i)->value.data, ctl_model_param(again, i)->value.data,
                               (size_t)ctl_tensor_numel(&ctl_model_param(m, i)->value) * 4);
            CHECK(same, "%s: save_peft then load_peft: %s", variants[v], ctl_last_error(ctx));
            if (layout == 0)
                printf("    %-14s loss %.7f (PEFT %.7f, rel %.0e); %d adapter gradients, worst rel err %.1e\n", variants[v],
                       (double)loss, (double)want, el, n_grad, worst);
            else
                printf("    %-14s adjacent layout: loss rel err %.0e; saved and reloaded exactly: %s\n", variants[v], el, same ? "yes" : "no");
            ctl_model_free(again);
            ctl_train_free(t);
            ctl_model_free(m);
            ctl_ctx_free(ctx);
        }
        fx_free(&fx);
    }
}

// Runs `steps` optimiser steps of two micro-batches each on batches made from `seed`, losses out.
static bool train_steps(ctl_ctx *ctx, ctl_train *t, int first, int steps, float *losses) {
    for (int s = first; s < first + steps; s++) {
        float sum = 0.0f;
        for (int mb = 0; mb < 2; mb++) {
            int32_t tok[2 * 9], tgt[2 * 9];
            float w[2 * 9];
            make_batch(2, 9, 29, tok, tgt, w, (uint64_t)(100 + 2 * s + mb));
            ctl_batch b = {2, 9, tok, tgt, w};
            float l = fwd_loss(ctx, t, &b);
            if (!(l == l) || ctl_train_backward(t) != CTL_OK) return false;
            sum += l;
        }
        if (ctl_train_step(t, NULL) != CTL_OK) return false;
        losses[s] = sum;
    }
    return true;
}

// cotlab's adapter files and checkpoints: saved and loaded adapters give the same forward; deltas
// compose into the base; a run stopped, saved and resumed continues bit for bit; bad files are
// refused with nothing attached.
// An allocator that fails once its budget of allocations is spent (a budget of -1 never).
static void *budget_alloc(size_t size, void *user) {
    int64_t *left = (int64_t *)user;
    if (*left == 0) return NULL;
    if (*left > 0) (*left)--;
    return malloc(size);
}
static void budget_free(void *p, void *user) { (void)user, free(p); }

static void test_adapter_files(void) {
    ctl_ctx *ctx = make_ctx(2, CTL_SIMD_AUTO);
    adapter_case c = adapter_case_of("files", CTL_ARCH_LLAMA, true, false, CTL_F32, lora_desc(3, 0.2f, CTL_LINEAR_ATTN, false, true, 1),
                                     sparse_desc(0.05f, CTL_LINEAR_MLP, CTL_SPARSE_RANDOM, 2));
    ctl_model *m = adapter_model(ctx, &c), *b = NULL;
    int32_t tok[9] = {3, 1, 4, 1, 5, 9, 2, 6, 5};
    float want[29], got[29];
    bool ok = m && infer_logits(m, tok, 9, want) && ctl_adapter_save(m, "build/adapters.gguf") == CTL_OK;
    ctl_model_config cfg = tiny32_config(CTL_ARCH_LLAMA, true);
    ok = ok && ctl_model_create(ctx, &cfg, &b) == CTL_OK;
    if (ok) {   // the same base, then the saved adapters
        for (int64_t i = 0; i < ctl_model_param_count(b); i++)
            memcpy(ctl_model_param(b, i)->value.data, ctl_model_param(m, i)->value.data, (size_t)ctl_tensor_numel(&ctl_model_param(b, i)->value) * 4);
        ok = ctl_adapter_load(b, "build/adapters.gguf") == CTL_OK && infer_logits(b, tok, 9, got);
    }
    CHECK(ok && !memcmp(want, got, sizeof want) && ctl_model_param_count(b) == ctl_model_param_count(m), "adapter save/load: %s", ctl_last_error(ctx));
    int64_t n_before = ctl_model_param_count(b);
    CHECK(ctl_adapter_load(b, "build/adapters.gguf") == CTL_ERR_INVALID && ctl_model_param_count(b) == n_before, "loading twice refused");
    ctl_model_free(b), ctl_model_free(m);
    // composing: a LoRA-and-sparse file added twice at 0.5 = the merged weights; a DoRA file once
    // at 1 = merged too (DoRA's delta depends on W, so its halves would not add up to the whole)
    adapter_case lin = c;
    lin.lora.dora = false;
    double worst[2] = {0.0, 0.0};
    for (int k = 0; k < 2; k++) {
        ctl_model *with = adapter_model(ctx, k ? &c : &lin), *base = NULL;
        ok = with && ctl_adapter_save(with, "build/compose.gguf") == CTL_OK && ctl_model_create(ctx, &cfg, &base) == CTL_OK;
        for (int64_t i = 0; ok && i < ctl_model_param_count(base); i++)
            memcpy(ctl_model_param(base, i)->value.data, ctl_model_param(with, i)->value.data, (size_t)ctl_tensor_numel(&ctl_model_param(base, i)->value) * 4);
        ok = ok && ctl_adapters_merge(with) == CTL_OK && ctl_adapter_compose(base, "build/compose.gguf", k ? 1.0f : 0.5f) == CTL_OK &&
             (k || ctl_adapter_compose(base, "build/compose.gguf", 0.5f) == CTL_OK);
        for (int64_t i = 0; ok && i < ctl_model_param_count(base); i++)
            worst[k] = fmax(worst[k], rel_err_ff((const float *)ctl_model_param(base, i)->value.data, (const float *)ctl_model_param(with, i)->value.data,
                                                 ctl_tensor_numel(&ctl_model_param(base, i)->value)));
        CHECK(ok && worst[k] < 1e-6 && ctl_model_param_count(base) == ctl_model_param_count(base) && !base->n_adapters,
              "compose %s: %g from merged: %s", k ? "DoRA" : "LoRA + sparse, twice at 0.5", worst[k], ctl_last_error(ctx));
        ctl_model_free(base), ctl_model_free(with);
    }
    printf("    adapter file saved and loaded: the same logits; composed deltas: %.0e, %.0e from merged\n", worst[0], worst[1]);

    // resuming: 6 steps straight, and 3 + save + a fresh model and trainer + load + 3
    for (int variant = 0; variant < 2; variant++) {   // adapters (LoRA with dropout, DoRA, sparse), or full fine-tuning
        float straight[6], resumed[6];
        ctl_model *runs[2] = {NULL, NULL};
        ctl_train *tr[2] = {NULL, NULL};
        ctl_train_desc d;
        memset(&d, 0, sizeof d);
        d.batch = 2, d.seq_len = 9, d.seed = 5, d.optim.lr = 1e-2f, d.optim.warmup = 2, d.optim.total_steps = 6, d.optim.clip = 1.0f;
        d.optim.weight_decay = 0.1f;
        adapter_case rc = c;
        if (variant) rc.lora.rank = 0, rc.sparse.density = 0;
        ctl_run_state rs = {{1, 2, 0xFFFFFFFFFFFFFFFFull, 4}, 3, -5, 1234567890123ll, NULL}, rs2;   // the program's own state, saved too
        ctl_rng start = g_rng;   // both runs begin from the same adapter values
        for (int r = 0; r < 2; r++) g_rng = start, runs[r] = adapter_model(ctx, &rc);
        ok = runs[0] && runs[1] && ctl_train_init(runs[0], &d, &tr[0]) == CTL_OK && train_steps(ctx, tr[0], 0, 6, straight) &&
             ctl_train_init(runs[1], &d, &tr[1]) == CTL_OK && train_steps(ctx, tr[1], 0, 3, resumed) &&
             ctl_train_save(tr[1], "build/ckpt.gguf", &rs) == CTL_OK;
        ctl_train_free(tr[1]), ctl_model_free(runs[1]);
        // a fresh model as the run began (the same base), its adapters from the checkpoint
        ctl_model *fresh = NULL;
        ctl_train *ft = NULL;
        cfg = tiny32_config(CTL_ARCH_LLAMA, true);
        ok = ok && ctl_model_create(ctx, &cfg, &fresh) == CTL_OK;
        if (ok) ctl_model_init_random(fresh, 7), scale_weights(fresh, 10.0f);
        ok = ok && (variant || ctl_adapter_load(fresh, "build/ckpt.gguf") == CTL_OK) && ctl_train_init(fresh, &d, &ft) == CTL_OK &&
             ctl_train_load(ft, "build/ckpt.gguf", &rs2) == CTL_OK && !memcmp(&rs, &rs2, sizeof rs) && train_steps(ctx, ft, 3, 3, resumed);
        bool same = ok && !memcmp(straight, resumed, sizeof straight) && ctl_model_param_count(fresh) == ctl_model_param_count(runs[0]);
        for (int64_t i = 0; same && i < ctl_model_param_count(fresh); i++)
            same = !memcmp(ctl_model_param(fresh, i)->value.data, ctl_model_param(runs[0], i)->value.data,
                           (size_t)ctl_tensor_numel(&ctl_model_param(fresh, i)->value) * 4);
        CHECK(same, "%s: resumed run differs from the straight one (%s)", variant ? "full" : "adapters", ctl_last_error(ctx));
        printf("    resume (%s): 3 steps, checkpoint, 3 more == 6 straight, losses and weights bit for bit: %s\n",
               variant ? "full fine-tuning" : "LoRA + dropout, DoRA, sparse", same ? "yes" : "no");
        ctl_train_free(ft), ctl_model_free(fresh), ctl_train_free(tr[0]), ctl_model_free(runs[0]);
    }

    // bad files: another architecture, other shapes, modules the model lacks; nothing attached
    ctl_model_config g2 = tiny32_config(CTL_ARCH_GPT2, true), big = tiny32_config(CTL_ARCH_LLAMA, true);
    big.n_embd = 64;
    ctl_model *gm = NULL, *bm = NULL, *small = NULL;
    ctl_model_create(ctx, &g2, &gm), ctl_model_create(ctx, &big, &bm), ctl_model_create(ctx, &cfg, &small);
    CHECK(ctl_adapter_load(gm, "build/adapters.gguf") == CTL_ERR_INVALID && strstr(ctl_last_error(ctx), "architecture") &&
          ctl_model_param_count(gm) == ctl_model_param_count(small) - (ctl_model_param_count(small) - ctl_model_param_count(gm)), "arch: %s", ctl_last_error(ctx));
    int64_t nb = ctl_model_param_count(bm);
    CHECK(ctl_adapter_load(bm, "build/adapters.gguf") == CTL_ERR_SHAPE && ctl_model_param_count(bm) == nb, "shape: %s", ctl_last_error(ctx));
    CHECK(ctl_lora_load_peft(bm, FIXTURE_DIR "peft/lora") == CTL_ERR_SHAPE && ctl_model_param_count(bm) == nb, "peft onto a wider model: %s",
          ctl_last_error(ctx));
    ctl_model_config one = tiny32_config(CTL_ARCH_LLAMA, true);
    one.n_layer = 1;
    ctl_model *om = NULL;
    ctl_model_create(ctx, &one, &om);
    int64_t no = ctl_model_param_count(om);
    CHECK(ctl_lora_load_peft(om, FIXTURE_DIR "peft/lora") == CTL_ERR_NOT_FOUND && strstr(ctl_last_error(ctx), "not layers of this model") &&
          ctl_model_param_count(om) == no, "peft naming absent modules: %s", ctl_last_error(ctx));
    CHECK(ctl_lora_save_llamacpp(small, "build/x.gguf") == CTL_ERR_INVALID, "no LoRA to save");
    ctl_lora_desc dl = lora_desc(2, 0, 0, false, true, 1);
    ctl_lora_attach(small, &dl);
    CHECK(ctl_lora_save_llamacpp(small, "build/x.gguf") == CTL_ERR_UNSUPPORTED && strstr(ctl_last_error(ctx), "DoRA"), "DoRA to llama.cpp refused");
    // two ranks at one scale: llama.cpp divides its one alpha by each tensor's rank, so no alpha fits both
    ctl_lora_desc r4 = lora_desc(4, 0, CTL_LINEAR_Q, false, false, 1), r2 = lora_desc(2, 0, CTL_LINEAR_V, false, false, 1);
    CHECK(ctl_lora_attach(om, &r4) == CTL_OK && ctl_lora_attach(om, &r2) == CTL_OK, "two attaches: %s", ctl_last_error(ctx));
    CHECK(ctl_lora_save_llamacpp(om, "build/x.gguf") == CTL_ERR_UNSUPPORTED && strstr(ctl_last_error(ctx), "ranks differ"),
          "ranks 4 and 2 to llama.cpp refused: %s", ctl_last_error(ctx));
    // cotlab's adapter file and PEFT's config hold one rank: the rank-4 LoRA would be written as rank 2 (the last attach's)
    CHECK(ctl_adapter_save(om, "build/mixed.gguf") == CTL_ERR_UNSUPPORTED && strstr(ctl_last_error(ctx), "differs from the last attach"),
          "ranks 4 and 2 to cotlab's file refused: %s", ctl_last_error(ctx));
    CHECK(ctl_lora_save_peft(om, "build/mixed_peft") == CTL_ERR_UNSUPPORTED && strstr(ctl_last_error(ctx), "differs from the last attach"),
          "ranks 4 and 2 to PEFT refused: %s", ctl_last_error(ctx));
    // a PEFT config cotlab cannot honour
    FILE *f = fopen("build/peft_bad/adapter_config.json", "wb");
    if (!f) {
        mkdir("build/peft_bad", 0755);
        f = fopen("build/peft_bad/adapter_config.json", "wb");
    }
    if (f) fputs("{\"peft_type\": \"LORA\", \"r\": 4, \"rank_pattern\": {\"q_proj\": 8}}", f), fclose(f);
    CHECK(ctl_lora_load_peft(om, "build/peft_bad") == CTL_ERR_UNSUPPORTED && strstr(ctl_last_error(ctx), "rank_pattern"), "rank_pattern: %s",
          ctl_last_error(ctx));
    // A directory whose config's path fits the reader's 1024 bytes but whose weights' path does not: refused, not a
    // success that loaded nothing.
    char deep[1100] = "build/peft_deep";
    mkdir(deep, 0755);
    while (strlen(deep) + 1 + 40 + strlen("/adapter_config.json") < 1024) {
        strcat(deep, "/dddddddddddddddddddddddddddddddddddddddd");
        mkdir(deep, 0755);
    }
    while (strlen(deep) + strlen("/adapter_config.json") < 1020) strcat(deep, "e");
    mkdir(deep, 0755);
    char cfg_path[1200];
    snprintf(cfg_path, sizeof cfg_path, "%s/adapter_config.json", deep);
    f = fopen(cfg_path, "wb");
    if (f) fputs("{\"peft_type\": \"LORA\", \"r\": 4, \"lora_alpha\": 8, \"target_modules\": [\"q_proj\"]}", f), fclose(f);
    int64_t before = ctl_model_param_count(om);
    CHECK(f && ctl_lora_load_peft(om, deep) == CTL_ERR_INVALID && strstr(ctl_last_error(ctx), "path too long") && ctl_model_param_count(om) == before,
          "a weights path past 1024 bytes: %s", ctl_last_error(ctx));
    ctl_model_free(gm), ctl_model_free(bm), ctl_model_free(small), ctl_model_free(om);

    // A file whose last LoRA has no B: refused, and the LoRAs before it are not left attached
    // (the file loads onto the same model once whole).
    ctl_gguf *src = NULL;
    ctl_gguf_writer *w = NULL;
    ctl_model *fm = NULL;
    CHECK(ctl_gguf_open(ctx, "build/adapters.gguf", &src) == CTL_OK && ctl_gguf_writer_init(ctx, &w) == CTL_OK &&
          ctl_model_create(ctx, &cfg, &fm) == CTL_OK, "open, writer, model");
    if (src && w && fm) {
        int64_t last_b = -1, n_fm = ctl_model_param_count(fm);
        for (int64_t i = 0; i < ctl_gguf_kv_count(src); i++) ctl_gguf_writer_copy_kv(w, src, ctl_gguf_kv_at(src, i));
        for (int64_t i = 0; i < ctl_gguf_tensor_count(src); i++)
            if (strstr(ctl_gguf_tensor_at(src, i)->name, ".lora_b")) last_b = i;
        for (int64_t i = 0; i < ctl_gguf_tensor_count(src); i++) {
            const ctl_gguf_tensor *t = ctl_gguf_tensor_at(src, i);
            if (i != last_b) ctl_gguf_writer_add_raw(w, t->name, t->type, t->n_dims, t->ne, t->data);
        }
        CHECK(last_b > 0 && ctl_gguf_writer_save(w, "build/adapters_no_b.gguf") == CTL_OK, "write the broken file");
        CHECK(ctl_adapter_load(fm, "build/adapters_no_b.gguf") == CTL_ERR_FORMAT && strstr(ctl_last_error(ctx), "lora_a' but no") &&
                  ctl_model_param_count(fm) == n_fm,
              "A without B: %s", ctl_last_error(ctx));
        CHECK(ctl_adapter_load(fm, "build/adapters.gguf") == CTL_OK, "the whole file afterwards: %s", ctl_last_error(ctx));
    }
    ctl_gguf_writer_free(w), ctl_gguf_close(src), ctl_model_free(fm);
    {   // a hand-made file with DoRA and a sparse delta on one weight, which ctl_lora_attach refuses: refused at load too
        ctl_model_config c1 = tiny32_config(CTL_ARCH_LLAMA, true);
        ctl_model *dm = NULL, *lm = NULL;
        ctl_lora_desc dq = lora_desc(2, 0, CTL_LINEAR_Q, false, true, 5);
        ctl_gguf *dg = NULL;
        ctl_gguf_writer *dw = NULL;
        bool made = !ctl_model_create(ctx, &c1, &dm) && !ctl_lora_attach(dm, &dq) && !ctl_adapter_save(dm, "build/dora_q.gguf") &&
                    !ctl_gguf_open(ctx, "build/dora_q.gguf", &dg) && !ctl_gguf_writer_init(ctx, &dw);
        char name[96], key[128];
        snprintf(name, sizeof name, "%s.sparse", dm ? dm->params[dm->adapters[0].base].name : "");
        snprintf(key, sizeof key, "cotlab.sparse.%s", dm ? dm->params[dm->adapters[0].base].name : "");
        for (int64_t k = 0; made && k < ctl_gguf_kv_count(dg); k++) made = !ctl_gguf_writer_copy_kv(dw, dg, ctl_gguf_kv_at(dg, k));
        for (int64_t k = 0; made && k < ctl_gguf_tensor_count(dg); k++) {
            const ctl_gguf_tensor *t = ctl_gguf_tensor_at(dg, k);
            made = !ctl_gguf_writer_add_raw(dw, t->name, t->type, t->n_dims, t->ne, t->data);
        }
        int64_t one = 1, idx = 0;
        float v = 0.5f;
        made = made && !ctl_gguf_writer_add_tensor(dw, name, CTL_GGML_F32, 1, &one, &v) && !ctl_gguf_writer_set_array(dw, key, CTL_GGUF_I64, &idx, 1) &&
               !ctl_gguf_writer_save(dw, "build/dora_sparse.gguf") && !ctl_model_create(ctx, &c1, &lm);
        int64_t n0 = lm ? ctl_model_param_count(lm) : 0;
        CHECK(made && ctl_adapter_load(lm, "build/dora_sparse.gguf") == CTL_ERR_UNSUPPORTED && strstr(ctl_last_error(ctx), "do not combine") &&
                  ctl_model_param_count(lm) == n0,
              "DoRA and a sparse delta on one weight, from a file: %s", ctl_last_error(ctx));
        if (dw) ctl_gguf_writer_free(dw);
        if (dg) ctl_gguf_close(dg);
        if (dm) ctl_model_free(dm);
        if (lm) ctl_model_free(lm);
    }
    ctl_ctx_free(ctx);

    // Out of memory at each allocation in turn of a load (cotlab's file, PEFT's directory) or an
    // attach (LoRA onto weights with sparse deltas, sparse deltas onto weights with LoRA): the
    // model keeps none of the new adapters, and the same call succeeds once memory is there.
    int64_t budget = -1;
    ctl_ctx_desc d = ctl_ctx_desc_default();
    d.n_threads = 1, d.allocator.alloc = budget_alloc, d.allocator.free = budget_free, d.allocator.user = &budget;
    ctl_ctx *bx = NULL;
    CHECK(ctl_ctx_init(&bx, &d) == CTL_OK, "a context with a failing allocator");
    static const char *const calls[] = {"adapter_load", "lora_load_peft", "lora_attach", "sparse_attach"};
    ctl_lora_desc all_lora = lora_desc(2, 0.0f, CTL_LINEAR_ALL, false, false, 3), mlp_lora = lora_desc(2, 0.0f, CTL_LINEAR_MLP, false, false, 4);
    ctl_sparse_desc attn_sparse = sparse_desc(0.05f, CTL_LINEAR_ATTN, CTL_SPARSE_RANDOM, 5);
    ctl_sparse_desc all_sparse = sparse_desc(0.05f, CTL_LINEAR_ALL, CTL_SPARSE_MAGNITUDE, 6);
    for (int k = 0; bx && k < 4; k++) {
        int failures = 0, clean = 0;
        for (int64_t n = 0; n < 1000; n++) {
            ctl_model *om2 = NULL;
            budget = -1;
            if (ctl_model_create(bx, &cfg, &om2)) break;
            ctl_model_init_random(om2, 9);
            if ((k == 2 && ctl_sparse_attach(om2, &attn_sparse)) || (k == 3 && ctl_lora_attach(om2, &mlp_lora))) break;
            int64_t n0 = ctl_model_param_count(om2);
            ctl_status st = CTL_OK;
            for (int unlimited = 0; unlimited < 2; unlimited++) {
                budget = unlimited ? -1 : n;
                st = k == 0 ? ctl_adapter_load(om2, "build/adapters.gguf") : k == 1 ? ctl_lora_load_peft(om2, FIXTURE_DIR "peft/lora")
                   : k == 2 ? ctl_lora_attach(om2, &all_lora) : ctl_sparse_attach(om2, &all_sparse);
                budget = -1;
                if (st == CTL_OK && !unlimited) break;      // enough memory from n on
                if (!unlimited) failures++, clean += ctl_model_param_count(om2) == n0;
                else if (st != CTL_OK) clean--;           // left half attached: the retry fails
            }
            ctl_model_free(om2);
            if (failures <= n) break;
        }
        CHECK(failures > 5 && clean == failures, "%s: out of memory at %d allocations: %d left the model as it was", calls[k], failures, clean);
        printf("    %s: out of memory at each of its %d allocations: the model as it was every time: %s\n", calls[k], failures,
               clean == failures ? "yes" : "no");
    }
    // Merging DoRA adapters (B moved off zero, so each delta counts): out of memory at each of merge's allocations
    // leaves every weight as it was and the model unmerged; with memory the merge succeeds.
    ctl_model *dm = NULL;
    ctl_lora_desc dora = lora_desc(2, 0.0f, CTL_LINEAR_ALL, false, true, 7);
    if (bx && !ctl_model_create(bx, &cfg, &dm) && !ctl_lora_attach(dm, &dora)) {
        ctl_model_init_random(dm, 9);
        ctl_rng rb;
        ctl_rng_seed(&rb, 8);
        for (int64_t a = 0; a < dm->n_adapters; a++) {
            ctl_tensor *B = &dm->params[dm->adapters[a].lora_b].value;
            for (int64_t i = 0; i < ctl_tensor_numel(B); i++) ((float *)B->data)[i] = 0.1f * ctl_rng_normal(&rb);
        }
        unsigned char *before = (unsigned char *)malloc(dm->bytes);
        memcpy(before, dm->data, dm->bytes);
        int failures = 0, clean = 0;
        ctl_status st = CTL_ERR_OUT_OF_MEMORY;
        for (int64_t n = 0; n < 100 && st; n++) {
            budget = n;
            st = ctl_adapters_merge(dm);
            budget = -1;
            if (st) failures++, clean += !dm->merged && !memcmp(before, dm->data, dm->bytes);
        }
        CHECK(failures >= 2 && clean == failures && st == CTL_OK && dm->merged && memcmp(before, dm->data, dm->bytes),
              "adapters_merge out of memory at %d allocations: %d left the weights as they were; then merged: %d", failures, clean, st);
        free(before);
    }
    if (dm) ctl_model_free(dm);
    ctl_ctx_free(bx);
}
