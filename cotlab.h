/* cotlab.h 0.1.0 - teach small transformers to reason, in one C header. MIT license at the end.

   QUICK START

       #define COTLAB_IMPLEMENTATION        // in exactly one .c file
       #include "cotlab.h"

       ctl_ctx *ctx;  ctl_model *m;  ctl_train *t;
       ctl_ctx_desc cd = {0};  cd.n_threads = 2;
       ctl_ctx_init(&ctx, &cd);
       ctl_model_config cfg = {0};
       cfg.arch = CTL_ARCH_LLAMA; cfg.vocab_size = 64; cfg.n_ctx = 128;
       cfg.n_embd = 64; cfg.n_layer = 2; cfg.n_head = 4;
       ctl_model_create(ctx, &cfg, &m);  ctl_model_init_random(m, 42);
       ctl_train_desc td = {0};  td.batch = 8; td.seq_len = 64; td.optim.lr = 1e-3f;
       ctl_train_init(m, &td, &t);
       ctl_batch b = { 8, 64, tokens, targets, NULL };   // weights NULL: every token counts
       float loss;
       ctl_train_forward(t, &b);                                  // per-token log-probs
       ctl_cross_entropy(ctx, 8 * 64, ctl_train_logprobs(t), NULL,
                         ctl_train_dlogprobs(t), &loss);           // loss, d loss / d log-prob
       ctl_train_backward(t);  ctl_train_step(t, NULL);           // gradients, AdamW

   Every fallible call returns a ctl_status; on failure ctl_last_error(ctx) says what and where.
   examples/train_tiny.c is the same thing as a whole program; examples/grpo.c is GRPO on a
   real model and a JSONL of problems through the loops (>>loops: ctl_batcher, ctl_rl_step).

   TABLE OF CONTENTS (grep for the anchor; declarations and implementation share the order)

       >>basics      status codes, errors, allocator, arenas, RNG, thread pool
       >>tensors     the tensor value type
       >>kernels     GEMM and every operation as a _forward/_backward pair
       >>formats     GGUF (read, write, dequantise) and safetensors (read, write)
       >>tokenizer   byte-level BPE from GGUF metadata, hand-written pre-tokenizers, chat templates
       >>model       gpt2 and llama configs, parameters, init, loading from GGUF and HF files
       >>adapters    LoRA, DoRA, sparse deltas, freezing, merging; the linear layer they change
       >>objectives  per-token log-probs -> loss, metrics, d loss / d log-prob: SFT, DPO family, GRPO family
       >>sampling    samplers, KV-cache inference, batched generation, rewards, rollouts, pass@k
       >>optimiser   AdamW, learning-rate schedule, gradient clipping
       >>training    memory plan, forward, backward, step
       >>data        JSONL datasets (TRL's formats, GSM8K), encoding, batch rows
       >>loops       batches from a dataset, an SFT or DPO step, an online RL step (GRPO, DPO, RFT)

   COMPILE-TIME OPTIONS

       COTLAB_IMPLEMENTATION  (one file)  compile the implementation, not just the declarations
       COTLAB_STATIC          (global)    every public function is static to the including file
       COTLAB_NO_THREADS      (global)    no pthreads; everything runs on the calling thread
       COTLAB_NO_SIMD         (impl only) no hand-written AVX2/FMA paths; portable C only
       COTLAB_ALLOW_FAST_MATH (impl only) build under -ffast-math anyway: NaN/Inf go unnoticed

   CONCEPTS

       Shape letters follow the papers: B batch, T time (sequence), C channels (n_embd),
       V vocabulary, L layers, NH query heads, NKV key/value heads, HS head size, FF MLP width,
       N = B*T rows. Everything is row-major; a shape is written outermost first, like PyTorch:
       x (B,T,C) means x[(b*T + t)*C + c]. A linear weight is (OC, C) = (out, in), as torch and GGUF.
       Floats are fp32; token ids int32. Frozen matrices may stay in GGUF's Q8_0, Q4_0 or Q4_1
       blocks or in bf16 (ctl_model_desc.keep_quantized, .bf16); R is a LoRA's rank.

   MEMORY

       Nothing hides an allocation. The context owns per-thread GEMM packing buffers; a model owns
       one block for its base weights (fp32 or quantised as stored) and one more per attach of
       adapters; a trainer owns one arena for gradients, AdamW state, activations and scratch,
       sized for the largest batch it will see (ctl_train_plan and ctl_train_plan_model tell the
       bytes before anything is allocated). The training step itself allocates nothing.
       Allocation goes through ctl_ctx_desc.allocator (malloc/free by default).

   ERRORS

       Fallible functions return ctl_status (CTL_OK == 0). The context keeps the last message:
       "train_forward: token 99 at (b=1, t=5) is outside the vocabulary [0, 64)". The library never
       prints to stdout, never calls exit() or abort(); messages also go to ctl_ctx_desc.logger.
       Every public function checks its arguments before it touches them: a NULL pointer where
       its comment does not allow one ("may be NULL", "or NULL", a backward's gradient output,
       which is skipped), or a negative size, fails with CTL_ERR_INVALID and a message naming
       the function and what it needs ("gguf_get_int: invalid arguments: needs g && key && out").
       The message goes to the ctx argument, else to the context of the handle passed (model,
       trainer, file ...); when there is none, the status alone tells (cotlab keeps no mutable
       global state: ctl_last_error(NULL) is a fixed text, and ctl_ctx_init, which has no
       context yet, sends its reasons to ctl_ctx_desc.logger). Functions that return a value return a neutral one (0, -1 for an index, NULL,
       false, NaN for a reward), kernels return having done nothing, and freeing NULL does
       nothing. make test-null calls every function of a CPU build with each of its pointers
       NULL in turn (tools/gen_null_test.c); the backends' kernels (the table cotlab_cuda.cu
       exports) do not check theirs.

   THREADS AND DETERMINISM

       A context runs a small pthread pool (n_threads, default: all online cores); between jobs
       its workers spin for some microseconds before they sleep. Each output
       value is written by exactly one task, with the same operations in the same order whatever
       the thread count (sums over rows run in a fixed order, never per thread), so results are
       bit-identical for any number of threads. A context, and what was made from it, is used by
       one thread at a time. Dropout masks follow (seed, step, micro-batch), so a run resumed from
       a checkpoint continues bit for bit.
       Randomness only comes from an explicit seed (ctl_rng); never rand() or time().

   WHAT COTLAB DOES NOT DO (yet)

       No general autograd: each operation has a hand-written backward. No mixed precision: bf16
       is a storage format for frozen weights, multiplied in fp32 unless ctl_ctx_desc.bf16_dot
       asks for bf16 dot products. POSIX threads only (no Win32 threads). On x86-64 the GEMM
       (and its packing), attention, GELU, SwiGLU, the LM-head softmax and AdamW have AVX2+FMA
       paths, and the GEMM AVX-512F kernels (and decoding's dot products), chosen at run time
       (ctl_ctx_desc.simd); on AArch64 the GEMM has a NEON kernel. Every one keeps its portable C path, which the tests
       compare against. The rest has no NEON path yet. CUDA (cotlab_cuda.cu, COTLAB_CUDA):
       training and generation run on the GPU, with every adapter.
       Files are read into memory whole (no mmap). Chat templates are recognised (ChatML,
       Llama-3), not interpreted. Byte-level BPE only (no SentencePiece). Quantised weights
       cannot train (they are frozen) and only fp32 bases merge adapters in place.
*/
#ifndef COTLAB_H
#define COTLAB_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef COTLAB_STATIC
#if defined(__GNUC__) || defined(__clang__)
#define CTL_API static __attribute__((unused))
#else
#define CTL_API static
#endif
#else
#ifdef __cplusplus
#define CTL_API extern "C"
#else
#define CTL_API extern
#endif
#endif

// >>basics ======================================================================================

// One X-macro lists the status codes with their descriptions.
#define CTL_STATUS_LIST(X)                                              \
    X(CTL_OK, "ok")                                                     \
    X(CTL_ERR_INVALID, "invalid argument")                              \
    X(CTL_ERR_OUT_OF_MEMORY, "out of memory")                           \
    X(CTL_ERR_SHAPE, "shape mismatch")                                  \
    X(CTL_ERR_RANGE, "value out of range")                              \
    X(CTL_ERR_CAPACITY, "larger than planned")                          \
    X(CTL_ERR_NONFINITE, "non-finite value")                            \
    X(CTL_ERR_THREAD, "thread error")                                   \
    X(CTL_ERR_IO, "i/o error")                                          \
    X(CTL_ERR_FORMAT, "malformed file")                                 \
    X(CTL_ERR_NOT_FOUND, "not found")                                   \
    X(CTL_ERR_UNSUPPORTED, "not supported")

typedef enum ctl_status {
#define CTL__STATUS_ENUM(name, text) name,
    CTL_STATUS_LIST(CTL__STATUS_ENUM)
#undef CTL__STATUS_ENUM
    CTL_STATUS_COUNT
} ctl_status;

typedef struct ctl_ctx ctl_ctx;
typedef struct ctl_model ctl_model;
typedef struct ctl_train ctl_train;
struct ctl_batch;

// A static description of a status code ("shape mismatch"); never NULL.
CTL_API const char *ctl_status_str(ctl_status s);

// Allocation hooks. Both NULL: malloc/free. Memory must be aligned to at least 16 bytes.
typedef struct ctl_allocator {
    void *(*alloc)(size_t size, void *user);
    void (*free)(void *ptr, void *user);
    void *user;
} ctl_allocator;

typedef enum ctl_log_level { CTL_LOG_ERROR, CTL_LOG_WARN, CTL_LOG_INFO } ctl_log_level;

// Log sink. NULL func: nothing is logged (errors are still kept for ctl_last_error).
typedef struct ctl_logger {
    void (*func)(ctl_log_level level, const char *msg, void *user);
    void *user;
} ctl_logger;

// Which vector paths to use (GEMM micro-kernel, attention, activations, softmax, AdamW).
// AUTO picks the widest the CPU (and the build) has; SCALAR forces the portable C. AVX512 is
// AVX2's paths with AVX-512F GEMM and decoding kernels. NEON (AArch64) is the GEMM micro-kernel
// only, the rest portable. The packed GEMM kernels do the same FMAs in the same order, so
// AVX2, AVX512 and NEON give equal results there; AUTO on Zen 4 (whose AVX-512 is half width)
// takes AVX512 with the AVX2 GEMM kernel, which measured faster there.
typedef enum ctl_simd { CTL_SIMD_AUTO, CTL_SIMD_SCALAR, CTL_SIMD_AVX2, CTL_SIMD_AVX512, CTL_SIMD_NEON } ctl_simd;

// Where the kernels run. CUDA needs a build with COTLAB_CUDA defined and cotlab_cuda.cu linked
// (nvcc, cuBLAS); a build without them fails to open a CUDA context, and says so.
typedef enum ctl_device { CTL_DEVICE_CPU, CTL_DEVICE_CUDA } ctl_device;

// Context description; zero means default.
//   n_threads  0: all online cores (1 with COTLAB_NO_THREADS)
//   simd       CTL_SIMD_AUTO
// bf16_dot: products with bf16 weights (ctl_model_desc.bf16) round their other operand to bf16
// too and multiply with the CPU's bf16 dot-product instruction (AVX512_BF16's VDPBF16PS:
// twice the values per instruction of an fp32 FMA, sums in fp32), where the CPU has it and the
// AVX-512 paths are in use; elsewhere, and by default, they compute in fp32 on the widened
// weights. The rounding adds a relative error of up to 2^-9 per activation, as bf16 autocast
// does. Products of a few rows (decoding) stay fp32: they are bound by reading the weights.
// On a CUDA context bf16_dot makes products with bf16 weights bf16 x bf16 on tensor cores
// (fp32 sums); without it the weights are widened to fp32 first.
//   device         CTL_DEVICE_CPU. CTL_DEVICE_CUDA: GPU number cuda_index, with one block of
//                  device_memory bytes (0: 1 GiB) allocated when the context opens
//   tf32           CUDA fp32 products on tensor cores in TF32 (inputs rounded to 10 mantissa
//                  bits, fp32 sums): several times faster, relative error near 1e-3
typedef struct ctl_ctx_desc {
    int n_threads;
    ctl_simd simd;
    ctl_allocator allocator;
    ctl_logger logger;
    bool bf16_dot;
    ctl_device device;
    int cuda_index;
    size_t device_memory;
    bool tf32;
} ctl_ctx_desc;

CTL_API ctl_ctx_desc ctl_ctx_desc_default(void);
// Creates a context: thread pool and per-thread GEMM buffers. desc may be NULL. On failure
// *out is NULL and the reason goes to desc's logger (there is no context to keep it in).
CTL_API ctl_status ctl_ctx_init(ctl_ctx **out, const ctl_ctx_desc *desc);
CTL_API void ctl_ctx_free(ctl_ctx *ctx);
// The message of the last failure in this context ("" when none). Valid until the next failure.
// ctx NULL: a fixed text (failures without a context are told by their status alone).
CTL_API const char *ctl_last_error(const ctl_ctx *ctx);
CTL_API int ctl_ctx_threads(const ctl_ctx *ctx);
// The vector paths in use: "avx512", "avx2", "neon" or "scalar".
CTL_API const char *ctl_ctx_simd_name(const ctl_ctx *ctx);
// Whether bf16 weights are multiplied with bf16 dot products (asked for, and the CPU has them).
CTL_API bool ctl_ctx_bf16_dot(const ctl_ctx *ctx);
// Allocation through the context's hooks (64-byte aligned). ctl_free(ctx, NULL) is a no-op.
CTL_API void *ctl_alloc(ctl_ctx *ctx, size_t size);
CTL_API void ctl_free(ctl_ctx *ctx, void *ptr);
// Records a failure (the message ctl_last_error returns, also sent to the log) and returns s:
// for code outside the library that reports through the context (objectives, backends).
CTL_API ctl_status ctl_fail(ctl_ctx *ctx, ctl_status s, const char *fmt, ...);

// An arena hands out 64-byte aligned pieces of one block and frees them all at once.
typedef struct ctl_arena {
    unsigned char *base;
    size_t size, used;
} ctl_arena;

CTL_API ctl_status ctl_arena_init(ctl_ctx *ctx, ctl_arena *a, size_t size);
// NULL when the arena is full (it never grows).
CTL_API void *ctl_arena_push(ctl_arena *a, size_t size);
CTL_API void ctl_arena_free(ctl_ctx *ctx, ctl_arena *a);

// Device memory of a CUDA context. The context's block (ctl_ctx_desc.device_memory) is handed
// out in 256-byte aligned pieces: ctl_device_alloc gives NULL (and a message) when it is full;
// ctl_device_release(ctx, mark) takes back everything handed out since ctl_device_mark.
// ctl_device_release_span(ctx, from, to) gives back one owner's part, marks from and to taken
// before and after its allocations: at once if nothing above it is in use, else once all above
// it has been given back too (trainers and generators free theirs so, in any order). The
// kernels' own scratch comes from the top of the same block. Copies and kernels run in order
// on one stream; ctl_device_sync waits for them and returns the first failure since the last
// sync (a CUDA or cuBLAS error, or a kernel's scratch not fitting) with its message. On a CPU
// context these fail with CTL_ERR_UNSUPPORTED.
CTL_API ctl_device ctl_ctx_device(const ctl_ctx *ctx);
// "cpu", or the GPU's name and compute capability ("NVIDIA H100 80GB HBM3 (sm_90)").
CTL_API const char *ctl_ctx_device_name(const ctl_ctx *ctx);
CTL_API void *ctl_device_alloc(ctl_ctx *ctx, size_t size);
CTL_API size_t ctl_device_mark(const ctl_ctx *ctx);
CTL_API void ctl_device_release(ctl_ctx *ctx, size_t mark);
CTL_API void ctl_device_release_span(ctl_ctx *ctx, size_t from, size_t to);
CTL_API ctl_status ctl_copy_to_device(ctl_ctx *ctx, void *dst, const void *src, size_t size);
CTL_API ctl_status ctl_copy_to_host(ctl_ctx *ctx, void *dst, const void *src, size_t size);
CTL_API ctl_status ctl_device_sync(ctl_ctx *ctx);

// xoshiro256** seeded through splitmix64: small, fast, and the same stream on every platform.
typedef struct ctl_rng { uint64_t s[4]; } ctl_rng;

CTL_API void ctl_rng_seed(ctl_rng *r, uint64_t seed);
CTL_API uint64_t ctl_rng_next(ctl_rng *r);
CTL_API float ctl_rng_uniform(ctl_rng *r);   // [0, 1)
CTL_API float ctl_rng_normal(ctl_rng *r);    // N(0, 1), Box-Muller in double

// Runs fn(arg, task, thread) for task = 0 .. n_tasks-1 on the pool; returns when all are done.
// `thread` (0 .. n_threads-1) indexes per-thread scratch. Tasks must write disjoint outputs.
typedef void (*ctl_task_fn)(void *arg, int64_t task, int thread);
CTL_API void ctl_parallel_for(ctl_ctx *ctx, int64_t n_tasks, ctl_task_fn fn, void *arg);

// >>tensors =====================================================================================

// Element types. The three quantised ones are GGUF's blocks of 32 values (ggml Q8_0, Q4_0,
// Q4_1): frozen weights kept as they were loaded, dequantised on the fly by the products that
// read them. A quantised matrix's rows hold a multiple of 32 values.
typedef enum ctl_dtype { CTL_F32, CTL_I32, CTL_Q8_0, CTL_Q4_0, CTL_Q4_1, CTL_BF16 } ctl_dtype;

// A view: it does not own `data`. Shape outermost first; unused dims are 1.
typedef struct ctl_tensor {
    ctl_dtype dtype;
    int ndim;
    int64_t shape[4];
    void *data;
    ctl_device device;
} ctl_tensor;

CTL_API int64_t ctl_tensor_numel(const ctl_tensor *t);
// A view of ndim (0..4) dims; data may be NULL (a view laid out before its memory).
CTL_API ctl_tensor ctl_tensor_f32(float *data, int ndim, const int64_t *shape);
// Bytes of n values of `type` (n a multiple of 32 for the quantised types); "f32", "q4_1" ...
CTL_API size_t ctl_dtype_bytes(ctl_dtype type, int64_t n);
CTL_API const char *ctl_dtype_name(ctl_dtype type);

// >>kernels =====================================================================================
//
// Leaf operations over raw fp32 pointers. Every backward ACCUMULATES (+=) into its gradient
// outputs, so gradients from several uses (tied embeddings, residual branches, micro-batches)
// add up; clear a buffer before its first use. A NULL gradient output is skipped.

// C (M,N), row stride ldc  =  A B  (+ C when accumulate), where A(m,k) = a[m*a_rs + k*a_cs]
// and B(k,n) = b[k*b_rs + n*b_cs]. Any layout, transposed or not, through the strides.
// Packed, cache-blocked and threaded; every C value is summed in the same order (k blocks of
// 256 in turn) whichever thread computes it.
CTL_API void ctl_gemm(ctl_ctx *ctx, int64_t M, int64_t N, int64_t K,
                      const float *a, int64_t a_rs, int64_t a_cs,
                      const float *b, int64_t b_rs, int64_t b_cs,
                      float *c, int64_t ldc, bool accumulate);
// The same product as three plain loops: the reference the fast path is tested against.
CTL_API void ctl_gemm_ref(int64_t M, int64_t N, int64_t K,
                          const float *a, int64_t a_rs, int64_t a_cs,
                          const float *b, int64_t b_rs, int64_t b_cs,
                          float *c, int64_t ldc, bool accumulate);

// Linear layer. inp (N,C), w (OC,C), bias (OC) or NULL, out (N,OC):  out = inp w^T + bias.
CTL_API void ctl_matmul_forward(ctl_ctx *ctx, float *out, const float *inp, const float *w,
                                const float *bias, int64_t N, int64_t C, int64_t OC);
// dinp (N,C) += dout w;  dw (OC,C) += dout^T inp;  dbias (OC) += column sums of dout.
CTL_API void ctl_matmul_backward(ctl_ctx *ctx, float *dinp, float *dw, float *dbias,
                                 const float *dout, const float *inp, const float *w,
                                 int64_t N, int64_t C, int64_t OC);

// Token embedding plus optional learned position embedding. tokens (B,T), wte (V,C),
// wpe (n_ctx,C) or NULL, out (B,T,C). Token ids must already be checked to lie in [0, V).
CTL_API void ctl_embedding_forward(float *out, const int32_t *tokens, const float *wte,
                                   const float *wpe, int64_t B, int64_t T, int64_t C);
CTL_API void ctl_embedding_backward(float *dwte, float *dwpe, const float *dout,
                                    const int32_t *tokens, int64_t B, int64_t T, int64_t C);

// LayerNorm over the last dim: out = (x - mean) * rstd * w + b. inp, out (N,C);
// mean, rstd (N) are saved for backward.
CTL_API void ctl_layernorm_forward(ctl_ctx *ctx, float *out, float *mean, float *rstd,
                                   const float *inp, const float *w, const float *b,
                                   int64_t N, int64_t C, float eps);
CTL_API void ctl_layernorm_backward(ctl_ctx *ctx, float *dinp, float *dw, float *db,
                                    const float *dout, const float *inp, const float *w,
                                    const float *mean, const float *rstd, int64_t N, int64_t C);

// RMSNorm: out = x * rstd * w, rstd = 1/sqrt(mean(x^2) + eps). inp, out (N,C); rstd (N).
CTL_API void ctl_rmsnorm_forward(ctl_ctx *ctx, float *out, float *rstd, const float *inp,
                                 const float *w, int64_t N, int64_t C, float eps);
CTL_API void ctl_rmsnorm_backward(ctl_ctx *ctx, float *dinp, float *dw, const float *dout,
                                  const float *inp, const float *w, const float *rstd,
                                  int64_t N, int64_t C);

// Rotary position embedding, in place. The pair rotated by angle pos * theta^(-2i/HS) is
// (2i, 2i+1) in the ADJACENT layout (GGUF llama weights) and (i, i + HS/2) in the HALVES
// layout (Hugging Face weights). Two layouts of the same maths: permuting the rows of the
// q and k weights turns one into the other.
typedef enum ctl_rope_layout { CTL_ROPE_ADJACENT, CTL_ROPE_HALVES } ctl_rope_layout;

// cos_t, sin_t (n_pos, HS/2): the angle tables, computed in double and rounded once.
CTL_API void ctl_rope_table(float *cos_t, float *sin_t, int64_t n_pos, int64_t HS, float theta);
// x (B,T,row_stride): the first n_heads heads of HS values of every row are rotated by the
// angle of position t.
CTL_API void ctl_rope_forward(float *x, const float *cos_t, const float *sin_t, int64_t B,
                              int64_t T, int64_t n_heads, int64_t HS, int64_t row_stride,
                              ctl_rope_layout layout);
// The inverse rotation applied to the gradient, in place.
CTL_API void ctl_rope_backward(float *dx, const float *cos_t, const float *sin_t, int64_t B,
                               int64_t T, int64_t n_heads, int64_t HS, int64_t row_stride,
                               ctl_rope_layout layout);

// Causal self-attention with grouped-query heads (query head h reads key/value head
// h / (NH/NKV)). qkv (B,T,(NH+2*NKV)*HS) holds each row's NH query heads, then NKV key heads,
// then NKV value heads. out (B,T,NH*HS); lse (B,NH,T) keeps each row's log-sum-exp of scores,
// so backward recomputes the probabilities instead of storing the (T,T) matrices.
// Scores are scaled by 1/sqrt(HS). One pass over keys with an online softmax.
CTL_API void ctl_attention_forward(ctl_ctx *ctx, float *out, float *lse, const float *qkv,
                                   int64_t B, int64_t T, int64_t NH, int64_t NKV, int64_t HS);
CTL_API void ctl_attention_backward(ctl_ctx *ctx, float *dqkv, const float *dout,
                                    const float *qkv, const float *out, const float *lse,
                                    int64_t B, int64_t T, int64_t NH, int64_t NKV, int64_t HS);

// GELU, tanh approximation (GPT-2's "gelu_new"), elementwise over n values.
CTL_API void ctl_gelu_forward(ctl_ctx *ctx, float *out, const float *inp, int64_t n);
CTL_API void ctl_gelu_backward(ctl_ctx *ctx, float *dinp, const float *dout, const float *inp,
                               int64_t n);

// SwiGLU: inp (N, 2*FF) holds [gate | up] per row; out (N,FF) = silu(gate) * up,
// silu(x) = x * sigmoid(x).
CTL_API void ctl_swiglu_forward(ctl_ctx *ctx, float *out, const float *inp, int64_t N,
                                int64_t FF);
CTL_API void ctl_swiglu_backward(ctl_ctx *ctx, float *dinp, const float *dout, const float *inp,
                                 int64_t N, int64_t FF);

// Residual add: out = a + b over n values; backward passes dout to both.
CTL_API void ctl_residual_forward(float *out, const float *a, const float *b, int64_t n);
CTL_API void ctl_residual_backward(float *da, float *db, const float *dout, int64_t n);

// Fused LM head + log-softmax. x (N,C) final hidden states, w (V,C), targets (N) in [0,V).
// logp (N) = log softmax(x w^T * inv_temp)[target]; lse (N) the log-sum-exp, saved for
// backward. Rows go through in chunks of `chunk` rows using scratch (chunk, V): the (N,V)
// logits never exist at once. Backward recomputes a chunk's logits and turns dlogp (N) into
// dx (N,C) += ... and dw (V,C) += ...; rows whose dlogp is exactly 0 are skipped.
// Backward needs scratch of chunk*(V + 2*C + 1) floats; N must be below 2^31.
CTL_API void ctl_lmhead_forward(ctl_ctx *ctx, float *logp, float *lse, const float *x,
                                const float *w, const int32_t *targets, int64_t N, int64_t C,
                                int64_t V, float inv_temp, float *scratch, int64_t chunk);
CTL_API void ctl_lmhead_backward(ctl_ctx *ctx, float *dx, float *dw, const float *dlogp,
                                 const float *x, const float *w, const int32_t *targets,
                                 const float *lse, int64_t N, int64_t C, int64_t V,
                                 float inv_temp, float *scratch, int64_t chunk);

// ---- the same kernels on an NVIDIA GPU (cotlab_cuda.cu, with COTLAB_CUDA) ------------------
//
// A program needs none of them: a context made with ctl_ctx_desc.device = CTL_DEVICE_CUDA runs
// training and generation on the GPU by itself, through the table of kernels cotlab_cuda.cu
// exports ("the backend interface", after the API). Its kernels mean what the CPU's mean, and
// backwards accumulate the same way.

// Whether a GPU can be used here; *why (when not) says what is missing (in a build without
// COTLAB_CUDA: that).
CTL_API bool ctl_cuda_available(const char **why);

#if defined(COTLAB_CUDA) && defined(COTLAB_STATIC)
#error "COTLAB_CUDA links cotlab_cuda.cu, which needs cotlab's functions with external linkage: drop COTLAB_STATIC"
#endif

// >>formats =====================================================================================
//
// GGUF, the native container. ctl_gguf_open reads a file into memory once (ctl_gguf_open_memory
// borrows the caller's bytes instead) and parses the header: metadata key/values and tensor
// infos, checked against the file's length before anything is allocated or dereferenced.
// Values and tensor data are read in place; ctl_gguf_read_f32 turns any supported tensor
// type into fp32. Little-endian files of versions 2 and 3.

// Metadata value types, as numbered in the file.
typedef enum ctl_gguf_type {
    CTL_GGUF_U8, CTL_GGUF_I8, CTL_GGUF_U16, CTL_GGUF_I16, CTL_GGUF_U32, CTL_GGUF_I32, CTL_GGUF_F32,
    CTL_GGUF_BOOL, CTL_GGUF_STR, CTL_GGUF_ARR, CTL_GGUF_U64, CTL_GGUF_I64, CTL_GGUF_F64
} ctl_gguf_type;

// Tensor element types, as numbered in the file (ggml_type); these are the ones cotlab reads.
typedef enum ctl_ggml_type {
    CTL_GGML_F32 = 0, CTL_GGML_F16 = 1, CTL_GGML_Q4_0 = 2, CTL_GGML_Q4_1 = 3, CTL_GGML_Q5_0 = 6,
    CTL_GGML_Q5_1 = 7, CTL_GGML_Q8_0 = 8, CTL_GGML_Q4_K = 12, CTL_GGML_Q5_K = 13,
    CTL_GGML_Q6_K = 14, CTL_GGML_BF16 = 30
} ctl_ggml_type;

typedef struct ctl_gguf ctl_gguf;

// One metadata entry. `data` points at the value's bytes in the file: a scalar, a string's
// bytes (not NUL-terminated; `count` is its length), or an array's payload (`count` elements
// of `elem_type`). Read values through the accessors below.
typedef struct ctl_gguf_kv {
    const char *key;            // NUL-terminated
    ctl_gguf_type type;
    ctl_gguf_type elem_type;    // arrays only
    uint64_t count;             // strings: bytes; arrays: elements; scalars: 1
    const unsigned char *data;
    const uint64_t *str_offsets;   // arrays of strings: where element i's length prefix is in data
} ctl_gguf_kv;

// One tensor. ne[0] is the contiguous dimension (GGUF order): a (out, in) linear weight has
// ne = {in, out, 1, 1}. `data` points into the file.
typedef struct ctl_gguf_tensor {
    char name[64];
    ctl_ggml_type type;
    int n_dims;
    int64_t ne[4];
    uint64_t offset;   // from the start of the data section
    uint64_t nbytes;
    const void *data;
} ctl_gguf_tensor;

CTL_API ctl_status ctl_gguf_open(ctl_ctx *ctx, const char *path, ctl_gguf **out);
// Parses `size` bytes at `data`, which must stay valid (and unchanged) until ctl_gguf_close.
CTL_API ctl_status ctl_gguf_open_memory(ctl_ctx *ctx, const void *data, size_t size, ctl_gguf **out);
CTL_API void ctl_gguf_close(ctl_gguf *g);
CTL_API uint32_t ctl_gguf_version(const ctl_gguf *g);
CTL_API uint32_t ctl_gguf_alignment(const ctl_gguf *g);
CTL_API uint64_t ctl_gguf_data_offset(const ctl_gguf *g);   // where the tensor data starts

CTL_API int64_t ctl_gguf_kv_count(const ctl_gguf *g);
CTL_API const ctl_gguf_kv *ctl_gguf_kv_at(const ctl_gguf *g, int64_t i);
CTL_API const ctl_gguf_kv *ctl_gguf_find_kv(const ctl_gguf *g, const char *key);   // NULL if absent
// Typed reads by key. Lenient: any integer type for get_int (range-checked), f32 or f64 for
// get_float. A missing key or another type fails with a message naming the key and the type.
CTL_API ctl_status ctl_gguf_get_int(const ctl_gguf *g, const char *key, int64_t *out);
CTL_API ctl_status ctl_gguf_get_uint(const ctl_gguf *g, const char *key, uint64_t *out);
CTL_API ctl_status ctl_gguf_get_float(const ctl_gguf *g, const char *key, double *out);
CTL_API ctl_status ctl_gguf_get_bool(const ctl_gguf *g, const char *key, bool *out);
CTL_API ctl_status ctl_gguf_get_str(const ctl_gguf *g, const char *key, const char **s, size_t *len);
// Element i of an array value, with the same rules.
CTL_API ctl_status ctl_gguf_arr_int(const ctl_gguf *g, const ctl_gguf_kv *kv, uint64_t i, int64_t *out);
CTL_API ctl_status ctl_gguf_arr_float(const ctl_gguf *g, const ctl_gguf_kv *kv, uint64_t i, double *out);
CTL_API ctl_status ctl_gguf_arr_str(const ctl_gguf *g, const ctl_gguf_kv *kv, uint64_t i,
                                    const char **s, size_t *len);

CTL_API int64_t ctl_gguf_tensor_count(const ctl_gguf *g);
CTL_API const ctl_gguf_tensor *ctl_gguf_tensor_at(const ctl_gguf *g, int64_t i);
CTL_API const ctl_gguf_tensor *ctl_gguf_find_tensor(const ctl_gguf *g, const char *name);
CTL_API int64_t ctl_gguf_tensor_numel(const ctl_gguf_tensor *t);
// The tensor's values as fp32 (numel floats at out), whatever its type.
CTL_API ctl_status ctl_gguf_read_f32(const ctl_gguf *g, const ctl_gguf_tensor *t, float *out);

// Elements per block and bytes per block of a tensor type (0 for types cotlab does not read),
// its name ("q4_k"), and n values (a multiple of the block size) of it turned into fp32.
CTL_API int64_t ctl_ggml_block_size(ctl_ggml_type type);
CTL_API size_t ctl_ggml_type_size(ctl_ggml_type type);
CTL_API const char *ctl_ggml_type_name(ctl_ggml_type type);
CTL_API void ctl_ggml_dequantize(ctl_ggml_type type, const void *src, float *dst, int64_t n);
// IEEE half and bfloat16 to and from fp32 (round to nearest even).
CTL_API float ctl_f16_to_f32(uint16_t h);
CTL_API uint16_t ctl_f32_to_f16(float f);
CTL_API float ctl_bf16_to_f32(uint16_t h);
CTL_API uint16_t ctl_f32_to_bf16(float f);

// Writing GGUF. Metadata and tensors are gathered in memory, then ctl_gguf_writer_save writes
// "<path>.tmp.<pid>" and renames it over <path>, so a failed write never leaves a half-written file
// where a good one was. Tensors are written in the order they were added, each aligned to 32.
typedef struct ctl_gguf_writer ctl_gguf_writer;

CTL_API ctl_status ctl_gguf_writer_init(ctl_ctx *ctx, ctl_gguf_writer **out);
CTL_API void ctl_gguf_writer_free(ctl_gguf_writer *w);
// A scalar metadata value; `value` points at the matching C type (uint8_t ... double, bool as
// uint8_t). Strings and arrays have their own setters. A key may be set once.
CTL_API ctl_status ctl_gguf_writer_set(ctl_gguf_writer *w, const char *key, ctl_gguf_type type, const void *value);
CTL_API ctl_status ctl_gguf_writer_set_u32(ctl_gguf_writer *w, const char *key, uint32_t v);
CTL_API ctl_status ctl_gguf_writer_set_f32(ctl_gguf_writer *w, const char *key, float v);
CTL_API ctl_status ctl_gguf_writer_set_str(ctl_gguf_writer *w, const char *key, const char *s, size_t len);
// An array of `count` fixed-size values of elem_type (little-endian, as in memory here).
CTL_API ctl_status ctl_gguf_writer_set_array(ctl_gguf_writer *w, const char *key, ctl_gguf_type elem_type,
                                             const void *values, uint64_t count);
CTL_API ctl_status ctl_gguf_writer_set_str_array(ctl_gguf_writer *w, const char *key, const char *const *strs,
                                                 const size_t *lens, uint64_t count);
// A metadata entry of an open file, copied as it is.
CTL_API ctl_status ctl_gguf_writer_copy_kv(ctl_gguf_writer *w, const ctl_gguf *g, const ctl_gguf_kv *kv);
// A tensor from fp32 values, stored as F32, F16, BF16 or Q8_0 (ne as in ctl_gguf_tensor).
CTL_API ctl_status ctl_gguf_writer_add_tensor(ctl_gguf_writer *w, const char *name, ctl_ggml_type type, int n_dims,
                                              const int64_t *ne, const float *values);
// A tensor already encoded in `type` (ctl_ggml_type_size(type) bytes per block).
CTL_API ctl_status ctl_gguf_writer_add_raw(ctl_gguf_writer *w, const char *name, ctl_ggml_type type, int n_dims,
                                           const int64_t *ne, const void *bytes);
CTL_API ctl_status ctl_gguf_writer_save(ctl_gguf_writer *w, const char *path);


// safetensors (Hugging Face): an 8-byte header length, a JSON header, then the tensor bytes.
// The reader checks the header against the rules of the reference implementation (offsets
// tile the buffer exactly, sizes match dtype and shape) and reads F32, F16 and BF16 tensors as
// fp32; other dtypes are listed but not converted.
typedef enum ctl_safetensors_dtype {
    CTL_SAFETENSORS_F32, CTL_SAFETENSORS_F16, CTL_SAFETENSORS_BF16, CTL_SAFETENSORS_OTHER
} ctl_safetensors_dtype;

typedef struct ctl_safetensors_tensor {
    char name[128];
    char dtype_name[16];   // as in the file: "F32", "BF16", "I64", ...
    ctl_safetensors_dtype dtype;
    int ndim;
    int64_t shape[8];      // outermost first, as in PyTorch
    uint64_t begin, end;   // byte range in the data buffer
    const void *data;
} ctl_safetensors_tensor;

typedef struct ctl_safetensors ctl_safetensors;

CTL_API ctl_status ctl_safetensors_open(ctl_ctx *ctx, const char *path, ctl_safetensors **out);
CTL_API ctl_status ctl_safetensors_open_memory(ctl_ctx *ctx, const void *data, size_t size, ctl_safetensors **out);
CTL_API void ctl_safetensors_close(ctl_safetensors *st);
CTL_API int64_t ctl_safetensors_tensor_count(const ctl_safetensors *st);
CTL_API const ctl_safetensors_tensor *ctl_safetensors_tensor_at(const ctl_safetensors *st, int64_t i);
CTL_API const ctl_safetensors_tensor *ctl_safetensors_find_tensor(const ctl_safetensors *st, const char *name);
// The "__metadata__" value of `key`, NUL-terminated, or NULL.
CTL_API const char *ctl_safetensors_find_meta(const ctl_safetensors *st, const char *key);
// Metadata entry i (0 .. ctl_safetensors_meta_count - 1) as key and value, or false.
CTL_API int64_t ctl_safetensors_meta_count(const ctl_safetensors *st);
CTL_API bool ctl_safetensors_meta_at(const ctl_safetensors *st, int64_t i, const char **key, const char **value);
CTL_API ctl_status ctl_safetensors_read_f32(const ctl_safetensors *st, const ctl_safetensors_tensor *t, float *out);

// Writing: tensors from fp32 stored as F32, F16 or BF16 (or already encoded, any dtype), string
// metadata; saved through a temporary file and a rename. Tensors are laid out widest dtype first,
// then by name; the header is padded to 8 bytes.
typedef struct ctl_safetensors_writer ctl_safetensors_writer;
CTL_API ctl_status ctl_safetensors_writer_init(ctl_ctx *ctx, ctl_safetensors_writer **out);
CTL_API void ctl_safetensors_writer_free(ctl_safetensors_writer *w);
CTL_API ctl_status ctl_safetensors_writer_set_str(ctl_safetensors_writer *w, const char *key, const char *value);
CTL_API ctl_status ctl_safetensors_writer_add_tensor(ctl_safetensors_writer *w, const char *name, ctl_safetensors_dtype dtype,
                                                   int ndim, const int64_t *shape, const float *values);
// A tensor already encoded in the safetensors dtype `dtype` ("I64", "U8", "F64", "BF16", ...:
// any the reader knows), as in a file (little-endian); e.g. a tensor of an open file, copied as is.
CTL_API ctl_status ctl_safetensors_writer_add_raw(ctl_safetensors_writer *w, const char *name, const char *dtype, int ndim,
                                                  const int64_t *shape, const void *bytes);
CTL_API ctl_status ctl_safetensors_writer_save(ctl_safetensors_writer *w, const char *path);


// >>tokenizer ===================================================================================
//
// Byte-level BPE (GGUF tokenizer.ggml.model = "gpt2") from a GGUF file's vocabulary and merges,
// with the pre-tokenizers of GPT-2, SmolLM (digits split one by one first), Llama-3 (digit runs
// of up to three, a piece that is a whole token kept whole) and Qwen2 (single digits), written out
// by hand over a Unicode letter/number table: no regex library. They follow llama.cpp's own
// hand-written matchers. Special tokens (control and user-defined) are cut out of the text before
// pre-tokenizing, the longest first.

typedef struct ctl_tokenizer ctl_tokenizer;

CTL_API ctl_status ctl_tokenizer_from_gguf(ctl_ctx *ctx, const ctl_gguf *g, ctl_tokenizer **out);
CTL_API void ctl_tokenizer_free(ctl_tokenizer *tk);
CTL_API int64_t ctl_tokenizer_vocab(const ctl_tokenizer *tk);
CTL_API int32_t ctl_tokenizer_bos(const ctl_tokenizer *tk);   // -1 when the file names none (or one outside the vocabulary)
CTL_API int32_t ctl_tokenizer_eos(const ctl_tokenizer *tk);
// Whether the model expects its BOS id before a prompt (tokenizer.ggml.add_bos_token; without
// the key, llama.cpp's default: true for Llama-3). ctl_tokenize never adds it itself.
CTL_API bool ctl_tokenizer_add_bos(const ctl_tokenizer *tk);
// text (len bytes) into at most cap ids, *n the count. parse_special: control tokens written in
// the text (<|im_start|>) become their ids; otherwise they are plain text. Any bytes tokenize;
// a byte the vocabulary has no token for is dropped, as llama.cpp does (SmolLM2's lacks 21 of
// the 256: 0x04, 0x06, 0x13, 0x14, 0x16, 0x1d, 0xc0, 0xc1, 0xf1, 0xf2, 0xf5..0xff). If cap is too small,
// fails with CTL_ERR_CAPACITY and *n says how many ids are needed; ids NULL: only the count.
CTL_API ctl_status ctl_tokenize(const ctl_tokenizer *tk, const char *text, size_t len, bool parse_special,
                                int32_t *ids, int64_t cap, int64_t *n);
// ids back to bytes (special tokens as their text); out gets at most cap bytes plus a NUL when
// there is room, *len the full length (out may be NULL when cap is 0: the length alone).
CTL_API ctl_status ctl_detokenize(const ctl_tokenizer *tk, const int32_t *ids, int64_t n, char *out, size_t cap,
                                  size_t *len);

// Chat templates. A GGUF's tokenizer.chat_template (Jinja) is recognised, not interpreted:
// ChatML (SmolLM2, Qwen), with the default system message some models add when the
// conversation has none, and Llama-3's header format.
typedef enum ctl_chat_format { CTL_CHAT_CHATML, CTL_CHAT_LLAMA3 } ctl_chat_format;

typedef struct ctl_chat_template {
    ctl_chat_format format;
    char default_system[512];   // "" when the template adds none
    char bos[64];               // Llama-3 starts with the BOS text
} ctl_chat_template;

typedef struct ctl_chat_msg {
    const char *role;           // "system", "user", "assistant", ...
    const char *content;
} ctl_chat_msg;

CTL_API ctl_status ctl_chat_template_from_gguf(ctl_ctx *ctx, const ctl_gguf *g, ctl_chat_template *out);
// The conversation as text (tokenize it with parse_special = true), ending with the assistant's
// header when add_generation_prompt. Writes at most cap bytes plus a NUL; *len the full length
// (out may be NULL when cap is 0).
CTL_API ctl_status ctl_chat_apply(const ctl_chat_template *t, const ctl_chat_msg *msgs, int64_t n,
                                  bool add_generation_prompt, char *out, size_t cap, size_t *len);
// The conversation rendered and tokenized (parse_special) into at most cap ids, *n_ids the count,
// with mask[i] = 1 on the tokens of assistant turns (their content and end-of-turn token, the
// span TRL's {% generation %} marks for assistant_only_loss) and 0 elsewhere: the weights of
// SFT on chat data. mask may be NULL. A token is the assistant's when its first byte is.
CTL_API ctl_status ctl_chat_tokenize(const ctl_tokenizer *tk, const ctl_chat_template *t, const ctl_chat_msg *msgs,
                                     int64_t n, bool add_generation_prompt, int32_t *ids, float *mask, int64_t cap,
                                     int64_t *n_ids);


// >>model =======================================================================================

typedef enum ctl_arch {
    CTL_ARCH_GPT2,   // LayerNorm, GELU, learned positions, biases, tied LM head
    CTL_ARCH_LLAMA   // RMSNorm, RoPE, SwiGLU, grouped-query attention, no biases
} ctl_arch;

// Model shape. Zero means default:
//   n_kv_head   n_head (no grouping)            head_dim   n_embd / n_head
//   n_ff        gpt2: 4*n_embd; llama: 8*n_embd/3 rounded up to a multiple of 32
//   norm_eps    1e-5                            rope_theta 10000 (llama)
//   rope_layout CTL_ROPE_ADJACENT (llama)
//   tied_embeddings (llama) false: a separate output.weight; gpt2 is always tied.
//   separate_qkv    (gpt2) false: one attn_qkv tensor; true: attn_q, attn_k, attn_v.
// Parameters are named as in GGUF: token_embd.weight, blk.3.attn_q.weight, output_norm.weight...
typedef struct ctl_model_config {
    ctl_arch arch;
    int64_t vocab_size;  // V
    int64_t n_ctx;       // longest sequence (positions)
    int64_t n_embd;      // C
    int64_t n_layer;     // L
    int64_t n_head;      // NH
    int64_t n_kv_head;   // NKV
    int64_t head_dim;    // HS
    int64_t n_ff;        // FF
    float norm_eps;
    float rope_theta;
    ctl_rope_layout rope_layout;
    bool tied_embeddings;
    bool separate_qkv;
} ctl_model_config;

// One named parameter tensor: a view into the model's weight block. Set `trainable` before
// ctl_train_init; frozen tensors get no gradient, no optimiser state and no weight-gradient
// matmul. `decay` (default: 2-D tensors) says whether AdamW's weight decay applies.
typedef struct ctl_param {
    char name[64];
    ctl_tensor value;
    bool trainable;
    bool decay;
} ctl_param;

// Checks a config and fills in its defaults; the message names the offending field.
CTL_API ctl_status ctl_model_config_resolve(ctl_ctx *ctx, const ctl_model_config *cfg,
                                            ctl_model_config *out);
// Allocates a model with zeroed weights (see ctl_model_init_random).
CTL_API ctl_status ctl_model_create(ctl_ctx *ctx, const ctl_model_config *cfg, ctl_model **out);
CTL_API void ctl_model_free(ctl_model *m);
// GPT-2 style initialisation: matrices and embeddings N(0, 0.02), output projections
// (attn_output, ffn_down) N(0, 0.02/sqrt(2L)), norm weights 1, biases 0.
CTL_API void ctl_model_init_random(ctl_model *m, uint64_t seed);
CTL_API const ctl_model_config *ctl_model_cfg(const ctl_model *m);   // resolved config
CTL_API ctl_ctx *ctl_model_ctx(const ctl_model *m);
CTL_API int64_t ctl_model_param_count(const ctl_model *m);
CTL_API ctl_param *ctl_model_param(ctl_model *m, int64_t i);
CTL_API ctl_param *ctl_model_find(ctl_model *m, const char *name);    // NULL if absent
// After writing weights in place (through ctl_model_param or ctl_model_find), call
// ctl_model_touch: what holds a copy of them or values derived from them (a trainer or a
// generator on a CUDA context, a generator's DoRA norms) takes them again before its next use.
// The library's own writes (training steps, loads, attach, merge) need no call.
CTL_API void ctl_model_touch(ctl_model *m);
CTL_API int64_t ctl_model_numel(const ctl_model *m);                  // base weights
CTL_API size_t ctl_model_bytes(const ctl_model *m);                   // their storage, adapters included
// How a model is loaded; zero means default:
//   keep_quantized  false: every tensor dequantised to fp32. true: matrices stored as Q8_0,
//                   Q4_0, Q4_1 or BF16 stay so, frozen (a fused layer's parts only if they
//                   share a type; gpt2's position embedding never); the products that read
//                   them dequantise on the fly.
//   bf16            the matrices that would be fp32 are stored as bf16 (rounded to nearest
//                   even), frozen: half the memory of fp32, read as fp32 by the products
//                   (widening is exact, so they compute in fp32). For adapters and decoding.
typedef struct ctl_model_desc {
    bool keep_quantized;
    bool bf16;
} ctl_model_desc;

// A model from a GGUF file's metadata and tensors (architectures llama and gpt2). GGUF llama
// weights use the adjacent-pairs RoPE layout; a missing output.weight means tied embeddings.
// A missing tensor or key fails, naming it. desc may be NULL.
CTL_API ctl_status ctl_model_from_gguf(ctl_ctx *ctx, const ctl_gguf *g, const ctl_model_desc *desc, ctl_model **out);
CTL_API ctl_status ctl_model_load_gguf(ctl_ctx *ctx, const char *path, const ctl_model_desc *desc, ctl_model **out);
// Writes the model as GGUF with the metadata llama.cpp reads: matrices as `type` (F32, F16,
// BF16 or Q8_0; F32 where a row is not a multiple of 32 for Q8_0), vectors as F32; matrices
// kept quantised travel as they are. With adapters attached (and on), each adapted matrix is
// written merged, W + delta: the merged model for llama.cpp. A llama
// model in the halves layout has its q/k rows reordered to GGUF's adjacent layout on the way
// out; gpt2's q/k/v are written fused (attn_qkv), as llama.cpp expects.
CTL_API ctl_status ctl_model_save_gguf(const ctl_model *m, const char *path, ctl_ggml_type type);
// The same, with the tokenizer.* and general.* metadata of `from` (the file the model came
// from) copied, so llama.cpp runs the result as it ran the original. from NULL: as save_gguf.
CTL_API ctl_status ctl_model_export_gguf(const ctl_model *m, const ctl_gguf *from, const char *path, ctl_ggml_type type);
// Weights from a safetensors file with Hugging Face names (model.layers.3.self_attn.q_proj.weight,
// transformer.h.3.attn.c_attn.weight ...) into a model made for them: HF llama q/k rows are in the
// halves RoPE layout and are reordered if the model uses the adjacent one; GPT-2's Conv1D
// weights are stored (in, out) and are transposed. Missing tensors and shape mismatches fail,
// naming the tensor; tensors the model does not use are ignored.
CTL_API ctl_status ctl_model_load_safetensors(ctl_model *m, const char *path);
// The model's weights as safetensors in Hugging Face naming and layout (dtype F32, F16 or BF16),
// quantised ones dequantised, adapters merged in as ctl_model_save_gguf does.
CTL_API ctl_status ctl_model_save_safetensors(const ctl_model *m, const char *path, ctl_safetensors_dtype dtype);

// >>adapters ====================================================================================
//
// Adapters train a few parameters on top of a frozen base. They are parameters of the model
// like any other, listed after the base (ctl_model_param) and named after the weight they
// adapt ("blk.3.attn_q.weight.lora_a"), so ctl_train_init gives them gradients and AdamW state
// and freezes nothing else by itself: attaching one freezes the whole base. Attach adapters
// before ctl_train_init; attaching invalidates earlier ctl_param pointers, and a trainer or
// inference cache made before it refuses to run.

// Linear layers, as bits of a mask. gpt2's fused attn_qkv counts as Q, K and V (any of them
// selects it); its ffn_up is UP. HEAD (output.weight) and EMBED (token_embd) only on models
// with untied embeddings.
enum {
    CTL_LINEAR_Q = 1 << 0, CTL_LINEAR_K = 1 << 1, CTL_LINEAR_V = 1 << 2, CTL_LINEAR_O = 1 << 3,
    CTL_LINEAR_GATE = 1 << 4, CTL_LINEAR_UP = 1 << 5, CTL_LINEAR_DOWN = 1 << 6,
    CTL_LINEAR_ATTN = 0xf, CTL_LINEAR_MLP = 0x70, CTL_LINEAR_ALL = 0x7f,
    CTL_LINEAR_HEAD = 1 << 7, CTL_LINEAR_EMBED = 1 << 8
};

typedef enum ctl_lora_init {
    CTL_LORA_INIT_DEFAULT,    // PEFT's default: A ~ U(-1/sqrt(in), 1/sqrt(in)), B = 0
    CTL_LORA_INIT_GAUSSIAN    // PEFT's "gaussian": A ~ N(0, (1/rank)^2), B = 0
} ctl_lora_init;              // (an embedding's LoRA: A = 0, B ~ N(0, 1), as PEFT)

// LoRA (Hu et al. 2021): y = W x + b + scale * B A dropout(x), A (rank, in), B (out, rank),
// so it adds nothing until B moves. Zero means default:
//   rank 8, alpha = rank     scale = alpha / rank, or alpha / sqrt(rank) with rslora
//                            (Kalajdzievski 2023)
//   targets CTL_LINEAR_ALL (every linear layer of every block; PEFT's "all-linear")
//   layer_from, layer_to     the blocks [layer_from, layer_to); 0, 0: all
//   dropout  p on the adapter's input only, in training forwards (not in generation)
//   dora     DoRA (Liu et al. 2024): y = b + m / n (.) (W x + scale B A x) with one magnitude
//            m per output row, initialised to n = ||W + scale B A|| of each row; n is treated
//            as a constant in backward, as PEFT does. The base weight must stay frozen.
//   init, seed   how A (and B) start; seed 0 is a seed like any other
typedef struct ctl_lora_desc {
    int64_t rank;
    float alpha, dropout;
    uint32_t targets;
    int64_t layer_from, layer_to;
    bool rslora, dora;
    ctl_lora_init init;
    uint64_t seed;
} ctl_lora_desc;

// Attaches one LoRA (or DoRA) per targeted weight; the base becomes frozen. A weight takes one
// LoRA: attaching again to it fails. Quantised bases work as fp32 ones. desc NULL: the defaults
// (as for ctl_sparse_attach and ctl_sparse_calibrate).
CTL_API ctl_status ctl_lora_attach(ctl_model *m, const ctl_lora_desc *desc);

// Sparse adapters: a fixed set of entries of each targeted matrix trains, as a sparse delta S
// added to the frozen weight (y = (W + S) x + b); only those entries get gradients and AdamW
// state. The set is chosen per matrix, the same fraction (density) of each:
//   MAGNITUDE  the largest |W| (ties: the lower index)
//   GRADIENT   the largest sum over calibration batches of |d loss / d W| (ctl_sparse_calibrate
//              first; the loss is the batches' weighted cross-entropy)
//   RANDOM     uniformly at random from the seed
// Zero means default: density 0.01, targets CTL_LINEAR_ALL, all layers, MAGNITUDE.
typedef enum ctl_sparse_select { CTL_SPARSE_MAGNITUDE, CTL_SPARSE_GRADIENT, CTL_SPARSE_RANDOM } ctl_sparse_select;

typedef struct ctl_sparse_desc {
    float density;
    uint32_t targets;
    int64_t layer_from, layer_to;
    ctl_sparse_select select;
    uint64_t seed;
} ctl_sparse_desc;

// (CTL_SPARSE_GRADIENT's scores come from ctl_sparse_calibrate, in >>training: it drives a trainer.)
CTL_API ctl_status ctl_sparse_attach(ctl_model *m, const ctl_sparse_desc *desc);

// Trainable or frozen by tensor kind and layer: the base parameters whose kind is in `kinds`
// and whose block lies in [layer_from, layer_to) are set to `trainable`; with 0, 0 every
// parameter of those kinds, in blocks or not (embeddings, final norm, head). Returns how many
// were set. Quantised tensors stay frozen. "Only the last 4 blocks": everything frozen with
// (CTL_KIND_ALL, 0, 0, false), then (CTL_KIND_ALL, L-4, L, true).
enum {
    CTL_KIND_ATTN = 1 << 0,     // q, k, v, o weights and biases
    CTL_KIND_MLP = 1 << 1,      // gate, up, down weights and biases
    CTL_KIND_NORM = 1 << 2,     // every norm's weight and bias
    CTL_KIND_EMBED = 1 << 3,    // token and position embeddings
    CTL_KIND_HEAD = 1 << 4,     // output.weight (untied models)
    CTL_KIND_ALL = 0x1f
};
CTL_API int64_t ctl_model_set_trainable(ctl_model *m, uint32_t kinds, int64_t layer_from, int64_t layer_to, bool trainable);
// The same by name: `pattern` is matched against every parameter's name (adapters included),
// '*' standing for any run of characters ("blk.*.attn_*", "*.lora_?").
CTL_API int64_t ctl_model_set_trainable_match(ctl_model *m, const char *pattern, bool trainable);

// Adapters switched off (false) leave the base alone in every forward: the reference model of
// DPO/GRPO without a second copy of the weights. On by default.
CTL_API void ctl_adapters_enable(ctl_model *m, bool on);
// Merging adds each adapter's delta into its fp32 base weight (DoRA: W' = m / n (.) (W + scale B A)),
// after which forwards skip the adapters; unmerging subtracts it again (exact up to rounding:
// |W'' - W| is within an ulp or so of the delta). Quantised bases cannot merge in place (but
// ctl_model_save_gguf writes merged weights of any model).
CTL_API ctl_status ctl_adapters_merge(ctl_model *m);
CTL_API ctl_status ctl_adapters_unmerge(ctl_model *m);

// Adapter files:
//   ctl_lora_save_llamacpp  a llama.cpp LoRA GGUF (llama-cli -m base.gguf --lora it.gguf):
//                           general.type "adapter", adapter.lora.alpha = scale * rank (llama.cpp
//                           scales by alpha / rank), "<weight>.lora_a" / ".lora_b" in GGUF layout.
//                           LoRA only, one scale for all; DoRA and sparse deltas need the merged
//                           model instead (ctl_model_save_gguf).
//   ctl_lora_save_peft      PEFT's directory: adapter_model.safetensors (Hugging Face names and
//                           RoPE layout) and adapter_config.json; LoRA and DoRA.
//   ctl_lora_load_peft      the same back, onto a model of the same architecture and size;
//                           every tensor is checked against the model before anything is attached.
//   ctl_adapter_save/load   cotlab's own GGUF: every adapter kind (LoRA, DoRA, sparse deltas)
//                           with what attaching it again takes; load attaches them, with their
//                           values, onto a model with no adapter on those weights.
//   ctl_adapter_compose     adds weight * the file's deltas into the fp32 base (several files
//                           compose: task arithmetic, merged sparse deltas), before any adapter
//                           is attached; the model keeps no adapters from it.
CTL_API ctl_status ctl_lora_save_llamacpp(const ctl_model *m, const char *path);
CTL_API ctl_status ctl_lora_save_peft(const ctl_model *m, const char *dir);
CTL_API ctl_status ctl_lora_load_peft(ctl_model *m, const char *dir);
CTL_API ctl_status ctl_adapter_save(const ctl_model *m, const char *path);
CTL_API ctl_status ctl_adapter_load(ctl_model *m, const char *path);
CTL_API ctl_status ctl_adapter_compose(ctl_model *m, const char *path, float weight);

// >>objectives ==================================================================================
//
// An objective reads per-token log-probs of the targets (and whatever else it needs) and writes
// the loss, named metrics and d loss / d log-prob for every token; ctl_train_backward does the
// rest. The built-in ones are TRL's (version 1.16.0) definitions, term for term:
//
//   SFT              cross-entropy over the masked (completion / assistant) tokens
//   DPO family       sigmoid, ipo, hinge, robust, exo_pair, nca_pair, bco_pair, sppo_hard,
//                    apo_zero, apo_down, sigmoid_norm, + an SFT term (RPO); SimPO and ORPO
//   GRPO family      advantages from several rewards (GRPO group / batch / no scaling, RLOO),
//                    then the clipped surrogate with loss types grpo, bnpo, dr_grpo, dapo,
//                    token or sequence (GSPO) ratios, clip-higher, delta cap and k3 KL
//
// Arrays are (B,T) row-major, laid out like ctl_train_logprobs: row b is one sequence and
// mask (B,T) is 1 on its completion tokens, 0 on prompt and padding (weights >= 0 work too).
// A masked-out token's log-prob is never read, so it may be anything, NaN included.
//
// Gradient accumulation. ctl_train_step applies the SUM of its micro-batches' gradients, and
// each objective's loss is this micro-batch's share of the step's loss, with TRL's normaliser
// for it: so an objective is told the step's shape (`accum` micro-batches, and for token means
// the token count of the whole step). With one micro-batch per step nothing needs saying.

typedef struct ctl_logprobs {
    int64_t B, T;
    const float *logp;       // (B,T) the policy's log-probs (ctl_train_logprobs)
    const float *mask;       // (B,T) completion mask; NULL: every token
    const float *old_logp;   // (B,T) GRPO: the log-probs at generation time; NULL: on-policy
    const float *ref_logp;   // (B,T) the reference model's (DPO, GRPO's KL); NULL when unused
    const float *entropy;    // (B,T) per-token entropies (ctl_train_entropy), for metrics; may be NULL
} ctl_logprobs;

// Named values an objective reports ("rewards/margins", "clip_ratio/high_mean", ...).
#define CTL_MAX_METRICS 40
typedef struct ctl_metric {
    char name[48];
    double value;
} ctl_metric;

typedef struct ctl_objective_out {
    float *dlogp;            // (B,T), the caller's buffer (ctl_train_dlogprobs): every entry written
    double loss;
    int n_metrics;
    ctl_metric metrics[CTL_MAX_METRICS];
} ctl_objective_out;

// A metric's value by name; NAN when the objective did not report it.
CTL_API double ctl_metric_get(const ctl_objective_out *out, const char *name);
// Adds (or replaces) a metric: for objectives written outside the library.
CTL_API void ctl_metric_set(ctl_objective_out *out, const char *name, double value);

// Weighted mean cross-entropy: loss = -sum(w * logp) / sum(w) over n tokens; weights NULL means
// all 1, a 0 weight excludes a token (prompt tokens, padding). Writes dlogp (n).
// Fails with CTL_ERR_NONFINITE (naming the token) on a non-finite log-prob.
CTL_API ctl_status ctl_cross_entropy(ctl_ctx *ctx, int64_t n, const float *logp,
                                     const float *weights, float *dlogp, float *loss);

// SFT (TRL SFTTrainer): -sum(mask * logp) / N. TOKENS (TRL's): N is the masked token count of
// the whole optimiser step (`step_tokens`; 0: this micro-batch's count times accum), so every
// token of the step weighs the same. SEQUENCES: the mean over the B rows of each row's token
// mean (a row with no tokens counts as 0), divided by accum. Metrics: num_tokens, entropy.
typedef enum ctl_sft_norm { CTL_SFT_TOKENS, CTL_SFT_SEQUENCES } ctl_sft_norm;

typedef struct ctl_sft_desc {
    ctl_sft_norm norm;
    int64_t accum;           // micro-batches per optimiser step; 0: 1
    double step_tokens;      // TOKENS: masked tokens over the whole step; 0: see above
} ctl_sft_desc;

// d may be NULL: the defaults.
CTL_API ctl_status ctl_objective_sft(ctl_ctx *ctx, const ctl_logprobs *in, const ctl_sft_desc *d,
                                     ctl_objective_out *out);

// The DPO family on summed completion log-probs. Rows 0..P-1 are the chosen completions and
// rows P..2P-1 the rejected ones, pair i = (i, P + i), as TRL batches them (B = 2P). With
// Δc = logπ(yc) - logπref(yc), Δr likewise, h = Δc - Δr (TRL's reverse-KL scores):
//   SIGMOID      -logσ(βh); with label_smoothing ε: cDPO -(1-ε)logσ(βh) - ε logσ(-βh) (TRL <= 0.28)
//   IPO          (h' - 1/(2β))², h' on per-token averages Δ/|y|
//   HINGE        relu(1 - βh)
//   ROBUST       (-(1-ε)logσ(βh) + ε logσ(-βh)) / (1 - 2ε)
//   EXO_PAIR     σ(βh)(logσ(βh) - log(1-ε)) + σ(-βh)(logσ(-βh) - log ε), ε > 0 required
//   NCA_PAIR     -logσ(βΔc) - ½logσ(-βΔc) - ½logσ(-βΔr)
//   BCO_PAIR     -logσ(βΔc) - logσ(-βΔr)
//   SPPO_HARD    (Δc - 1/(2β))² + (Δr + 1/(2β))²
//   APO_ZERO     1 - σ(βΔc) + σ(βΔr)
//   APO_DOWN     σ(βΔc) + 1 - σ(β(Δc - Δr))
//   SIGMOID_NORM -logσ(β(Δc/|yc| - Δr/|yr|))
//   SIMPO        reference-free, on average log-probs a: -(1-ε)logσ(β(ac - ar) - γ) - ε logσ(γ - β(ac - ar))
//   ORPO         reference-free: NLL(chosen) - β logσ(log odds), log odds on average log-probs
//                (an empty completion, or one of probability 1, has no odds: CTL_ERR_RANGE)
// loss = mean over pairs + rpo_alpha * NLL, NLL the token-mean cross-entropy of the chosen
// completions (TRL's "sft" term: RPO, or CPO's cpo_alpha for SIMPO), all divided by accum.
// The reference comes from ref_seq (2P summed log-probs, precomputed over the dataset) or, when
// that is NULL, from in->ref_logp (the same model with ctl_adapters_enable(m, false)).
// Metrics as TRL logs them: rewards/chosen, rewards/rejected, rewards/accuracies,
// rewards/margins, logps/chosen, logps/rejected (and nll_loss, log_odds_ratio, log_odds_chosen
// for ORPO; nll_loss for SIMPO), pairs, pairs_skipped.
// Pairs whose chosen and rejected completions are the same tokens (given `targets`) teach
// nothing: they are skipped (no loss, no gradient, left out of the means and metrics).
typedef enum ctl_dpo_loss {
    CTL_DPO_SIGMOID, CTL_DPO_IPO, CTL_DPO_HINGE, CTL_DPO_ROBUST, CTL_DPO_EXO_PAIR, CTL_DPO_NCA_PAIR,
    CTL_DPO_BCO_PAIR, CTL_DPO_SPPO_HARD, CTL_DPO_APO_ZERO, CTL_DPO_APO_DOWN, CTL_DPO_SIGMOID_NORM,
    CTL_DPO_SIMPO, CTL_DPO_ORPO
} ctl_dpo_loss;

typedef struct ctl_dpo_desc {
    ctl_dpo_loss loss;
    float beta;              // 0: 0.1
    float label_smoothing;   // ε of SIGMOID, ROBUST (< 0.5), EXO_PAIR (> 0), SIMPO
    float simpo_gamma;       // γ of SIMPO (TRL's default is 0.5)
    float rpo_alpha;         // weight of the chosen completions' NLL; 0: none
    int64_t accum;           // micro-batches per optimiser step; 0: 1
    const float *ref_seq;    // (2P) summed reference log-probs, or NULL: from in->ref_logp
    const int32_t *targets;  // (B,T) the batch's targets, to skip identical pairs; may be NULL
} ctl_dpo_desc;

// TRL's defaults where a zero field would mean something else: beta 0.1 and SimPO's γ 0.5
// (CPOConfig's simpo_gamma; zero is a γ like any other). The rest zero: the sigmoid loss.
CTL_API ctl_dpo_desc ctl_dpo_desc_default(void);

CTL_API ctl_status ctl_objective_dpo(ctl_ctx *ctx, const ctl_logprobs *in, const ctl_dpo_desc *d,
                                     ctl_objective_out *out);

// Sequence log-probs: sum (or mean, `average`) of mask * logp per row, into seq (B). For
// precomputing reference log-probs once over a dataset.
CTL_API void ctl_sequence_logprobs(const ctl_logprobs *in, bool average, float *seq);

// Advantages from rewards (TRL GRPOTrainer / RLOOTrainer). rewards (n, n_funcs): one column per
// reward function, NaN where a function gives no score. Groups are group_size consecutive rows
// (the completions of one prompt). The row reward is r = sum_k w_k R_k over the scored entries;
// a row no function scored is unscorable: left out of every mean and given advantage 0.
//   GRPO   A = r - mean_group(r), divided by (std + 1e-4) with std the unbiased std of the group
//          (SCALE_GROUP, the default), of the whole batch (SCALE_BATCH), or not divided (SCALE_NONE:
//          Dr. GRPO, and REINFORCE with the group mean as baseline)
//   RLOO   A = r - mean of the other scored rows of the group; SCALE_BATCH then standardises A
//          over the batch (TRL's normalize_advantages); SCALE_NONE (the default) leaves it
// Equal rewards in a group give advantage 0. group_size < 2, or n not a multiple of it, fails.
// Metrics: reward, reward_std, frac_reward_zero_std, rewards/<name>/mean, rewards/<name>/std.
typedef enum ctl_adv_kind { CTL_ADV_GRPO, CTL_ADV_RLOO } ctl_adv_kind;
typedef enum ctl_reward_scale { CTL_SCALE_DEFAULT, CTL_SCALE_GROUP, CTL_SCALE_BATCH, CTL_SCALE_NONE } ctl_reward_scale;

typedef struct ctl_advantage_desc {
    ctl_adv_kind kind;
    ctl_reward_scale scale;
    int64_t group_size;      // completions per prompt (TRL num_generations), >= 2
    int64_t n_funcs;         // reward functions; 0: 1
    const float *weights;    // (n_funcs) or NULL: all 1
    const char *const *names;   // (n_funcs) names for the metrics, or NULL: "0", "1", ...
} ctl_advantage_desc;

// adv (n) receives the advantages; metrics may be NULL.
CTL_API ctl_status ctl_advantages(ctl_ctx *ctx, const ctl_advantage_desc *d, int64_t n, const float *rewards,
                                  float *adv, ctl_objective_out *metrics);

// The GRPO family's loss (TRL GRPOTrainer._compute_loss). Per token, with the log-ratio
// lw = logp - old_logp (0 on-policy, whose gradient is still that of logp) or, sequence_level
// (GSPO), its masked mean over the row; r = exp(lw), rc = clamp(r, 1 - eps, 1 + eps_high),
// r capped at delta when set; l = -min(r A, rc A) + beta k3, k3 = exp(ref - logp) - (ref - logp) - 1.
// L_i = sum_t mask l, n_i = sum_t mask; the micro-batch's loss by `loss`:
//   GRPO     mean_i L_i / max(1, n_i) / accum
//   BNPO     sum_i L_i / max(1, sum_i n_i) / accum
//   DR_GRPO  sum_i L_i / (B max_completion_length) / accum
//   DAPO     sum_i L_i / (gen_tokens accum / steps_per_generation): the token mean of the
//            generation batch (gen_tokens: its completion tokens, TRL's num_items_in_batch;
//            0: this micro-batch's tokens times accum). TRL's default.
// Rows flagged in `truncated` get mask 0 (TRL's mask_truncated_completions). Metrics: kl (beta
// > 0), entropy, clip_ratio/low_mean, high_mean, region_mean, low_min, high_max.
typedef enum ctl_grpo_loss { CTL_GRPO_DAPO, CTL_GRPO_GRPO, CTL_GRPO_BNPO, CTL_GRPO_DR_GRPO } ctl_grpo_loss;

typedef struct ctl_grpo_desc {
    ctl_grpo_loss loss;
    const float *advantages; // (B) required (ctl_advantages)
    float epsilon;           // 0: 0.2
    float epsilon_high;      // 0: epsilon (DAPO's clip-higher: 0.28)
    float delta;             // 0: no cap; else > 1 + epsilon_high (INTELLECT-2)
    float beta;              // k3 KL weight; needs in->ref_logp. 0: no KL (TRL's default)
    bool sequence_level;     // GSPO's sequence ratio (TRL importance_sampling_level "sequence")
    int64_t accum;           // micro-batches per optimiser step; 0: 1
    int64_t max_completion_length;   // DR_GRPO's normaliser (required for it)
    double gen_tokens;       // DAPO: completion tokens of the generation batch; 0: see above
    int64_t steps_per_generation;    // DAPO: 0: accum
    const uint8_t *truncated;        // (B) or NULL
    const float *rewards;            // (B) the rows' summed rewards, for objectives written outside the library
    void *user;                      // for them too (ctl_rl hands both over)
} ctl_grpo_desc;

CTL_API ctl_status ctl_objective_grpo(ctl_ctx *ctx, const ctl_logprobs *in, const ctl_grpo_desc *d,
                                      ctl_objective_out *out);

// >>sampling ====================================================================================

// A token from logits (V): the argmax when temperature <= 0 (lowest id on ties), else a draw
// from softmax(logits / temperature); rng may be NULL for the argmax.
CTL_API int32_t ctl_sample_token(const float *logits, int64_t V, float temperature, ctl_rng *rng);

// Generation with a KV cache. A ctl_infer holds, for up to max_seqs sequences of up to max_len
// tokens, every layer's keys and values, and scratch for one forward over up to max_len new
// tokens; all allocated at init (ctl_infer_memory says how much): size max_len to the longest
// prompt plus the new tokens, not the model's context. Tokens are appended to a sequence with
// ctl_infer_feed (a prompt, or one token); ctl_infer_step appends one token to each of several
// sequences in a single batched forward, each row's logits the bits it gets stepped alone.
typedef struct ctl_infer ctl_infer;

typedef struct ctl_infer_desc {
    int64_t max_seqs;   // 0 -> 1
    int64_t max_len;    // 0 -> the model's n_ctx
} ctl_infer_desc;

CTL_API ctl_status ctl_infer_init(ctl_model *m, const ctl_infer_desc *desc, ctl_infer **out);   // desc may be NULL
// The bytes ctl_infer_init would allocate for desc (may be NULL), or why it would refuse; allocates nothing.
CTL_API ctl_status ctl_infer_plan(const ctl_model *m, const ctl_infer_desc *desc, size_t *bytes);
CTL_API void ctl_infer_free(ctl_infer *inf);
CTL_API size_t ctl_infer_memory(const ctl_infer *inf);
CTL_API void ctl_infer_reset(ctl_infer *inf, int64_t seq);   // seq < 0: every sequence
CTL_API int64_t ctl_infer_len(const ctl_infer *inf, int64_t seq);
// Appends n tokens to sequence seq; logits (V) receives the next-token logits after the last
// (logits NULL: none are computed, as for a prompt whose next token is known; so for _step).
CTL_API ctl_status ctl_infer_feed(ctl_infer *inf, int64_t seq, const int32_t *tokens, int64_t n, float *logits);
// Appends tokens[i] to sequence seqs[i] for i < n (distinct sequences); logits is (n, V).
CTL_API ctl_status ctl_infer_step(ctl_infer *inf, int64_t n, const int64_t *seqs, const int32_t *tokens,
                                  float *logits);

// How the next token is chosen; zero means off (and temperature 0 means greedy):
//   repetition_penalty  > 1: logits of tokens already in the sequence are divided by it if
//                       positive, multiplied if negative (the CTRL rule, as llama.cpp and HF)
//   then temperature, then top_k, top_p (nucleus: of the top_k's mass when top_k is set), and
//   min_p (relative to the top probability). Only as many candidates are sorted as the
//   filters need; with no filter the draw walks the vocabulary in id order.
//   max_new_tokens      0 -> until a stop token or the cache is full
//   stop_strings        (with tokenizer) a sequence ends once the text of its last 32 new
//                       tokens contains one; the token completing it is kept
//   progress            (may be NULL) called after each round of batched decoding with the
//                       tokens made so far, for a progress line (rollouts inside ctl_rl too)
typedef struct ctl_sampler_desc {
    float temperature;
    int64_t top_k;
    float top_p, min_p, repetition_penalty;
    int64_t max_new_tokens;
    const int32_t *stop_tokens;
    int64_t n_stop_tokens;
    const ctl_tokenizer *tokenizer;
    const char *const *stop_strings;
    int64_t n_stop_strings;
    uint64_t seed;
    void (*progress)(int64_t tokens, void *user);
    void *progress_user;
} ctl_sampler_desc;

// One token from logits (V, modified in place) under the sampler's rules; history holds the
// sequence so far (for the repetition penalty; NULL when n_history is 0); scratch holds 2*V
// values; rng may be NULL when sd->temperature <= 0.
CTL_API int32_t ctl_sample(float *logits, int64_t V, const ctl_sampler_desc *sd, const int32_t *history,
                           int64_t n_history, ctl_rng *rng, float *scratch);

// Called for each new token; return false to stop that sequence.
typedef bool (*ctl_token_fn)(int64_t seq, int32_t token, void *user);

// Generates continuations of n prompts (of any lengths) with the cache's sequences, which it
// resets. out is (n, max_new) tokens, out_lens[i] how many were produced; a stop token ends a
// sequence and is not emitted. All streams decode as one batch, one token each per round (a
// step reads each weight once for all of them), and a stream that stops leaves the batch; with
// more prompts than max_seqs, the next prompt starts as soon as a sequence is free. Each round
// samples its streams in the order of their outputs from one ctl_rng seeded from sd->seed, so
// a seed reproduces the samples exactly; a stream's logits do not depend on which others are
// decoded with it, nor on the thread count. fn may be NULL.
CTL_API ctl_status ctl_generate(ctl_infer *inf, int64_t n, const int32_t *const *prompts, const int64_t *prompt_lens,
                                const ctl_sampler_desc *sd, int64_t max_new, int32_t *out, int64_t *out_lens,
                                ctl_token_fn fn, void *user);
// The same for G samples of each of n_prompts prompts (output i is sample i % G of prompt
// i / G; out is (n_prompts * G, max_new)): each prompt is fed once, and its G streams read its
// keys and values instead of copies (on a CUDA context each stream is fed the prompt, and all
// n_prompts * G must fit in max_seqs). The tokens equal ctl_generate's with each prompt
// repeated G times.
CTL_API ctl_status ctl_generate_groups(ctl_infer *inf, int64_t n_prompts, const int32_t *const *prompts,
                                       const int64_t *prompt_lens, int64_t G, const ctl_sampler_desc *sd, int64_t max_new,
                                       int32_t *out, int64_t *out_lens, ctl_token_fn fn, void *user);

// Rewards for verifiable answers (GRPO's reward functions, rejection sampling, evaluation).
// The final answer of a completion, by the first rule that finds one: the number after the
// last "####" (GSM8K's last line), the inside of the last \boxed{...}, the number after the
// last "answer is" / "answer:" (any case), or else the last number in the text. *start and
// *alen give the answer's text; false when the completion states none.
CTL_API bool ctl_extract_answer(const char *text, size_t len, const char **start, size_t *alen);
// The first number in s (len bytes) as a value: thousands separators ("1,234,567"), a sign,
// decimals, "$18", "75%" (as 75), fractions "3/4" and "\frac{3}{4}" (and \dfrac); words
// around it are ignored. False when there is none.
CTL_API bool ctl_parse_number(const char *s, size_t len, double *out);
// 1 when the completion's final answer equals the reference answer (a number in text, such as
// GSM8K's "#### 72" or "72") within 1e-6 relative, 0 when it differs or the completion states
// none; NaN when the reference holds no number (unscorable, as ctl_advantages reads it).
CTL_API float ctl_reward_math(const char *completion, size_t len, const char *reference);
// 1 when the completion is "<think>" reasoning "</think>" and then a non-empty answer (space
// around allowed, no second <think>), else 0.
CTL_API float ctl_reward_format(const char *completion, size_t len);
// 1 when the completion ends with an answer line as GSM8K's solutions do: "####", a number
// (ctl_parse_number's forms) and nothing else on the last non-empty line; else 0.
CTL_API float ctl_reward_answer_line(const char *completion, size_t len);
// 0 up to `budget` tokens, then falling linearly to -1 at twice the budget, and -1 beyond.
CTL_API float ctl_reward_length(int64_t n_tokens, int64_t budget);

// Reward functions in one shape, for GRPO and rejection sampling: a callback scores one
// completion; NaN means "no score" (ctl_advantages leaves it out of the means).
typedef struct ctl_reward_input {
    const char *prompt;                // the prompt's text, or NULL
    const char *completion;            // NUL-terminated
    size_t completion_len;
    int64_t n_tokens;                  // the completion's tokens
    bool truncated;                    // it ended without EOS
    const struct ctl_example *example; // the dataset example it answers (answer, fields), or NULL
    const int32_t *tokens;             // the completion's n_tokens tokens, or NULL
    int64_t prompt_index;              // ctl_rl: the prompt's index in the step
} ctl_reward_input;

typedef float (*ctl_reward_fn)(const ctl_reward_input *in, void *user);
// All n completions at once (an external program, a model): rewards[i * stride], NaN where
// there is no score. A status other than CTL_OK (its message set with ctl_fail) fails the step.
typedef ctl_status (*ctl_reward_batch_fn)(ctl_ctx *ctx, const ctl_reward_input *in, int64_t n, float *rewards,
                                          int64_t stride, void *user);

typedef struct ctl_reward_func {
    const char *name;   // for the metrics: rewards/<name>/mean
    ctl_reward_fn fn;
    void *user;
    float weight;       // in ctl_advantages' sum
    ctl_reward_batch_fn batch;   // instead of fn (ctl_rl; ctl_rewards_score calls it with ctx NULL)
} ctl_reward_func;

// The built-in rewards as callbacks: math (against example->answer; NaN without one), format,
// answer_line, and length (user points at an int64_t budget in tokens).
CTL_API float ctl_reward_fn_math(const ctl_reward_input *in, void *user);
CTL_API float ctl_reward_fn_format(const ctl_reward_input *in, void *user);
CTL_API float ctl_reward_fn_answer_line(const ctl_reward_input *in, void *user);
CTL_API float ctl_reward_fn_length(const ctl_reward_input *in, void *user);
// rewards (n, k): funcs[j] on in[i]. weights (k) and names (k), when not NULL, receive each
// function's weight and name for ctl_advantage_desc.
CTL_API void ctl_rewards_score(const ctl_reward_func *funcs, int64_t k, const ctl_reward_input *in, int64_t n,
                               float *rewards, float *weights, const char **names);

// GRPO rollouts: G completions of each of n_prompts prompts (group i is rows i*G .. i*G+G-1),
// decoded together by ctl_generate_groups and laid out as training rows of length T: the prompt, the
// completion and, when it stopped at a stop token, that token (TRL keeps the EOS in the loss);
// weights 1 on the completion's tokens. Allocated here; ctl_rollout_free releases it. tk may be
// NULL (no text).
typedef struct ctl_rollout {
    int64_t n, T, max_new;
    int32_t *tokens, *targets;   // (n, T), for ctl_batch
    float *weights;              // (n, T): the completion mask
    int32_t *completion;         // (n, max_new) the new tokens
    int64_t *completion_len;     // (n)
    uint8_t *truncated;          // (n) no stop token within max_new
    char **text;                 // (n) the completions decoded (when a tokenizer was given)
    double n_tokens;             // weighted tokens over all rows (DAPO's gen_tokens)
} ctl_rollout;

CTL_API ctl_status ctl_rollout_run(ctl_infer *inf, const ctl_tokenizer *tk, const int32_t *const *prompts,
                                   const int64_t *prompt_lens, int64_t n_prompts, int64_t G, const ctl_sampler_desc *sd,
                                   int64_t max_new, int64_t T, ctl_rollout *out);
CTL_API void ctl_rollout_free(ctl_ctx *ctx, ctl_rollout *r);

// Evaluation: the unbiased pass@k estimate from n samples of which c are correct (Chen et al.
// 2021: 1 - C(n-c, k) / C(n, k)), and the majority vote (self-consistency) over n completions:
// the index of one stating the most common final answer (by value; ties: the earliest), -1
// when none states an answer; *value gets that answer.
CTL_API double ctl_pass_at_k(int64_t n, int64_t c, int64_t k);
CTL_API int64_t ctl_majority_vote(const char *const *completions, int64_t n, double *value);

// >>optimiser ===================================================================================

// Optimiser and schedule; zero means default:
//   lr 1e-3, beta1 0.9, beta2 0.999, eps 1e-8 (torch.optim.AdamW's defaults but lr)
//   weight_decay 0 (none), clip 0 (no clipping), warmup 0 steps,
//   total_steps 0 (constant lr after warmup), min_lr_ratio 0
typedef struct ctl_optim_desc {
    float lr, beta1, beta2, eps, weight_decay;
    float clip;            // max global gradient norm
    int64_t warmup;        // linear warmup steps
    int64_t total_steps;   // cosine decay ends here
    float min_lr_ratio;    // the cosine decays to lr * min_lr_ratio
} ctl_optim_desc;

// The learning-rate multiplier before update number `step` (0-based), exactly as Hugging
// Face's get_cosine_schedule_with_warmup (min_lr_ratio: ..._with_min_lr): step/warmup during
// warmup (so the very first update has lr 0 when warmup > 0), then a half cosine to
// min_lr_ratio at total_steps.
CTL_API float ctl_lr_schedule(const ctl_optim_desc *o, int64_t step);

// One AdamW update of n values, as torch.optim.AdamW: p -= lr*wd*p; m, v moments;
// p -= lr/(1-beta1^t) * m / (sqrt(v)/sqrt(1-beta2^t) + eps). `t` counts from 1. Each g is
// multiplied by grad_scale first (micro-batch averaging and clipping).
CTL_API void ctl_adamw_update(float *p, const float *g, float *m, float *v, int64_t n,
                              float grad_scale, float lr, float beta1, float beta2, float eps,
                              float weight_decay, int64_t t);

// >>training ====================================================================================

// One batch: tokens and targets (B,T) int32, weights (B,T) or NULL (all 1).
// targets[b,t] is the token to predict after tokens[0..t] of row b.
typedef struct ctl_batch {
    int64_t B, T;
    const int32_t *tokens;
    const int32_t *targets;
    const float *weights;
} ctl_batch;

// Trainer description; zero means default:
//   batch, seq_len   required: the largest B and T a batch will have
//   lm_head_chunk    rows of logits held at once: as many as fit in 64 MiB, in equal chunks
//   seed             the adapters' dropout masks: one per (seed, step, micro-batch, adapter)
//   entropy          also compute each token's entropy (ctl_train_entropy), from the same logits
typedef struct ctl_train_desc {
    int64_t batch;
    int64_t seq_len;
    int64_t lm_head_chunk;
    ctl_optim_desc optim;
    uint64_t seed;
    bool entropy;
} ctl_train_desc;

// Bytes a trainer needs, by kind. `weights` is the model itself (already allocated by
// ctl_model_create); the rest is the trainer's arena.
typedef struct ctl_memory_plan {
    size_t weights, grads, optim, activations, scratch;
    size_t total;   // all of the above
} ctl_memory_plan;

typedef struct ctl_step_stats {
    int64_t step;      // updates done, this one included
    float lr;          // learning rate used
    float grad_norm;   // global norm before clipping
    bool clipped;
} ctl_step_stats;

// What a trainer for this config and batch shape will allocate, with every parameter
// trainable; nothing is allocated.
CTL_API ctl_status ctl_train_plan(ctl_ctx *ctx, const ctl_model_config *cfg,
                                  const ctl_train_desc *desc, ctl_memory_plan *out);
// The same for an existing model as it stands: its storage (quantised tensors count as
// stored), its adapters and its frozen set. Nothing is allocated.
CTL_API ctl_status ctl_train_plan_model(const ctl_model *m, const ctl_train_desc *desc, ctl_memory_plan *out);
// Allocates everything a training step needs, once. The model must outlive the trainer.
// On a CUDA context the trainer runs on the device (see >>impl:training, "training on a CUDA
// context"): the activations, gradients and moments go into the context's device block, and
// the host model gets the trained weights back after every step.
CTL_API ctl_status ctl_train_init(ctl_model *m, const ctl_train_desc *desc, ctl_train **out);
CTL_API void ctl_train_free(ctl_train *t);
// What this trainer holds (its frozen parameters need no gradient or optimiser state).
CTL_API void ctl_train_memory(const ctl_train *t, ctl_memory_plan *out);
// Forward pass: checks the batch, then fills the per-token log-probs of the targets.
CTL_API ctl_status ctl_train_forward(ctl_train *t, const ctl_batch *b);
// Reference log-probs without a second model in memory: a forward of the same batch with the
// model's adapters switched off (its base is the reference, as TRL uses a PEFT model's), into
// ref (B,T); the adapters are then on again. Run it before the policy's forward, which it
// replaces. A model without adapters has no reference here: precompute one instead.
CTL_API ctl_status ctl_train_reference(ctl_train *t, const ctl_batch *b, float *ref);
// Packing: several documents in one row, pos (B,T) each token's position within its document
// (0 where one starts, then 1, 2, ...). Attention stays within a document and positions
// restart (RoPE, gpt2's position embeddings), so a packed row trains as its documents would
// one by one. The backward pass follows. pos NULL: unpacked rows (ctl_train_forward).
CTL_API ctl_status ctl_train_forward_packed(ctl_train *t, const ctl_batch *b, const int32_t *pos);
// The temperature of the forwards (and their backwards) that follow: logits are divided by it
// before the log-softmax, as TRL's GRPO does with the sampling temperature. 1 at first; > 0.
CTL_API ctl_status ctl_train_set_temperature(ctl_train *t, float temperature);
// (B,T) log-probs of the last forward's targets; (B,T) gradient for the objective to write.
CTL_API const float *ctl_train_logprobs(const ctl_train *t);
CTL_API float *ctl_train_dlogprobs(ctl_train *t);
// (B,T) entropies -sum_v p_v log p_v of the last forward's next-token distributions (at the
// batch's temperature); NULL unless the trainer was made with desc.entropy.
CTL_API const float *ctl_train_entropy(const ctl_train *t);
// The V logits of row (b, t) of the last forward (for sampling and inspection).
CTL_API ctl_status ctl_train_logits(ctl_train *t, int64_t b, int64_t pos, float *logits);
// Backward pass from ctl_train_dlogprobs: adds this micro-batch's gradients.
CTL_API ctl_status ctl_train_backward(ctl_train *t);
// Sums the gradients of the micro-batches since the last step (each objective's loss is its
// micro-batch's share of the step's: see >>objectives), clips, applies AdamW with the
// schedule, clears the gradients. stats may be NULL.
// Non-finite guards: a NaN or infinity fails with CTL_ERR_NONFINITE, the message naming the
// update (the trainer's step count + 1), the tensor, its layer and the element. When a log-prob
// comes out non-finite, ctl_train_forward names the first hidden state (after the embedding,
// then after each layer) that holds one, and the first non-finite fp32 parameter, if any; the
// objectives check the log-probs; ctl_train_backward d loss / d log-prob;
// ctl_train_step every trainable parameter and gradient before it changes anything. A failed
// step is skipped: weights, AdamW moments and the step count stay as they were, and the
// gradients are dropped. Whether to go on or stop is the caller's choice (the CLI's
// --on-nonfinite); ctl_train_save refuses non-finite values, so no checkpoint holds them.
CTL_API ctl_status ctl_train_step(ctl_train *t, ctl_step_stats *stats);
// Drops the gradients of the micro-batches since the last step, as a skipped step does (for a
// caller that skips a step after its forward or backward failed).
CTL_API void ctl_train_discard(ctl_train *t);
// Gradient of parameter i (same shape as its value), NULL when frozen. On the device: a copy
// taken now (NULL if the copy fails; ctl_last_error says why).
CTL_API float *ctl_train_grad(ctl_train *t, int64_t i);
// A checkpoint (GGUF, written through a temporary file): the model's adapters as
// ctl_adapter_save writes them, every trainable parameter's values, its AdamW moments and the
// step. To resume: load the base, ctl_adapter_load the checkpoint (when it has adapters), make
// the trainer as before, then ctl_train_load: the run continues bit for bit. Saving needs the
// gradients applied (no micro-batch waiting for ctl_train_step), and finite values: a NaN or
// infinity in a parameter or moment fails with CTL_ERR_NONFINITE and writes nothing. A
// process killed while saving leaves the older checkpoints whole (the temporary file is
// renamed over the path only once complete).
// `run` (may be NULL) is what the program around the trainer needs to continue exactly: its
// random state (sampling, shuffling), where it is in the data, and a counter of its own. A
// checkpoint saved without one loads with it zeroed.
// `config` is the program's own description of the run (its settings, the identity of its
// model and data), saved as the text "cotlab.run.config"; ctl_train_load leaves it NULL (read it
// with ctl_gguf_get_str to compare before resuming). ctl_train_load refuses a checkpoint whose
// adapters differ from the trainer's model (other targets, rank, alpha, kind, sparse entries):
// it names the first difference.
typedef struct ctl_run_state {
    uint64_t rng[4];
    int64_t epoch, position, counter;
    const char *config;
} ctl_run_state;

CTL_API ctl_status ctl_train_save(const ctl_train *t, const char *path, const ctl_run_state *run);
CTL_API ctl_status ctl_train_load(ctl_train *t, const char *path, ctl_run_state *run);

// Accumulates the gradient scores CTL_SPARSE_GRADIENT (>>adapters) ranks by, over n batches,
// for the matrices desc targets (which must be fp32). Uses a temporary trainer sized for the
// largest batch; the scores stay with the model until ctl_sparse_attach uses them.
CTL_API ctl_status ctl_sparse_calibrate(ctl_model *m, const ctl_sparse_desc *desc, const ctl_batch *batches, int64_t n);

// >>data ========================================================================================
//
// JSONL datasets in TRL's formats, and GSM8K's. ctl_dataset_open reads the file, checks every
// line and keeps each example's parts; a malformed line fails naming the file and line (or,
// with skip_bad, is skipped and counted). Formats, by their keys:
//   TEXT               {"text": ...}                                  language modelling
//   PROMPT_COMPLETION  {"prompt": ..., "completion": ...}             SFT on the completion
//   MESSAGES           {"messages": [{"role": ..., "content": ...}, ...]}   SFT on assistant turns
//   PREFERENCE         {"prompt": ..., "chosen": ..., "rejected": ...} DPO; without "prompt" the
//                      common start of chosen and rejected is the prompt (TRL's extract_prompt)
//   PROMPT             {"prompt": ...}                                GRPO; the other fields go to rewards
//   GSM8K              {"question": ..., "answer": "... #### 72"}     prompt, completion, answer "72"
// A prompt, completion, chosen or rejected is a string or a list of messages (conversational).
typedef enum ctl_data_format {
    CTL_DATA_AUTO, CTL_DATA_TEXT, CTL_DATA_PROMPT_COMPLETION, CTL_DATA_MESSAGES, CTL_DATA_PREFERENCE,
    CTL_DATA_PROMPT, CTL_DATA_GSM8K
} ctl_data_format;

typedef struct ctl_dataset_desc {
    ctl_data_format format;   // AUTO: from the first valid line's keys
    bool skip_bad;            // skip malformed lines (ctl_dataset_skipped counts them) instead of failing
} ctl_dataset_desc;

// A part of an example: text (n_msgs 0) or a conversation.
typedef struct ctl_part {
    const char *text;
    const ctl_chat_msg *msgs;
    int64_t n_msgs;
} ctl_part;

typedef struct ctl_example {
    int64_t line;                                  // 1-based line in the file
    ctl_part prompt, completion, chosen, rejected; // as the format has them (TEXT: completion)
    const char *answer;                            // GSM8K: the final answer; else an "answer" field or NULL
    int64_t n_fields;                              // every top-level field, as text: strings decoded,
    const char *const *keys, *const *values;       // other values as written in the file
} ctl_example;

typedef struct ctl_dataset ctl_dataset;

// Reads a JSONL file whole (a UTF-8 byte-order mark before the first line is skipped); desc
// may be NULL: the defaults.
CTL_API ctl_status ctl_dataset_open(ctl_ctx *ctx, const char *path, const ctl_dataset_desc *desc, ctl_dataset **out);
// The same from size bytes in memory (copied: data may go once it returns).
CTL_API ctl_status ctl_dataset_open_memory(ctl_ctx *ctx, const void *data, size_t size, const ctl_dataset_desc *desc, ctl_dataset **out);
CTL_API void ctl_dataset_close(ctl_dataset *ds);
CTL_API int64_t ctl_dataset_size(const ctl_dataset *ds);
CTL_API int64_t ctl_dataset_skipped(const ctl_dataset *ds);
CTL_API ctl_data_format ctl_dataset_format(const ctl_dataset *ds);
CTL_API const ctl_example *ctl_dataset_get(const ctl_dataset *ds, int64_t i);
// A top-level field's text, or NULL.
CTL_API const char *ctl_example_field(const ctl_example *e, const char *key);
// A seeded order of the n examples (Fisher-Yates driven by ctl_rng): order (n).
CTL_API void ctl_dataset_shuffle(const ctl_dataset *ds, uint64_t seed, int64_t *order);

// One sequence for training: the prompt followed by `part` (the completion, chosen or rejected
// one), tokenized, with mask 1 on the part's tokens. Text parts: BOS first when the model wants
// it, EOS appended to the part (as TRL does). Conversations: the chat template, the prompt with
// its generation prompt, mask on the assistant turns (ctl_chat_tokenize); MESSAGES examples
// have no prompt and mask every assistant turn. A prompt alone (PROMPT, for generation):
// part NULL, mask all 0. Fails with CTL_ERR_CAPACITY, *n the length needed, when cap is small.
// mask may be NULL; tmpl too, for text examples.
CTL_API ctl_status ctl_example_encode(const ctl_example *e, const ctl_part *part, const ctl_tokenizer *tk,
                                      const ctl_chat_template *tmpl, int32_t *ids, float *mask, int64_t cap,
                                      int64_t *n);
// Row b of a (B,T) batch from one encoded sequence: tokens ids[0..n-2], targets ids[1..n-1],
// weights mask[1..n-1] (each position predicts the next token); the rest padded with `pad` and
// weight 0. A sequence longer than T + 1 keeps its start. Returns the tokens that count.
// mask NULL: every token counts (here and in ctl_batch_pack).
CTL_API int64_t ctl_batch_row(int32_t *tokens, int32_t *targets, float *weights, int64_t T, int64_t b,
                              const int32_t *ids, const float *mask, int64_t n, int32_t pad);
// Packing (for ctl_train_forward_packed): appends a sequence to row b at *offset as
// ctl_batch_row lays it out (n - 1 positions), with pos its positions 0, 1, ...; the rest of
// the row stays padding (weight 0, a document of its own). *offset 0 starts the row afresh.
// False, with nothing written, when the sequence does not fit in what is left of the row.
CTL_API bool ctl_batch_pack(int32_t *tokens, int32_t *targets, float *weights, int32_t *pos, int64_t T, int64_t b,
                            int64_t *offset, const int32_t *ids, const float *mask, int64_t n, int32_t pad);

// >>loops =======================================================================================
//
// The loops every training program would write, as calls: examples into batches
// (ctl_batcher), an SFT or DPO optimiser step over them (ctl_train_batches), and an online RL
// step (ctl_rl: rollouts, rewards, advantages, reference and old log-probs, the policy-gradient
// micro-steps and the optimiser step) for the GRPO family, online DPO and rejection-sampling
// SFT (STaR / RFT). The command line, the demo and the examples are thin programs over them.

// How examples become tokens, as the command line does it: conversations through the chat
// template; with `chat` and text_as_chat, a text prompt is asked as a user turn (after
// `system`, when set) and a text part answered as the assistant's turn; otherwise text stays
// text (ctl_example_encode: BOS, prompt, part, EOS, as TRL does for text datasets).
typedef struct ctl_encoding {
    const ctl_tokenizer *tokenizer;   // required
    const ctl_chat_template *chat;    // the model's template, or NULL
    bool text_as_chat;
    const char *system;
} ctl_encoding;

// An example as tokens: its prompt and `part` (the completion, chosen or rejected one), mask 1
// on the part's tokens; part NULL: the prompt alone, ready for generation (the template's
// generation prompt; mask all 0). CTL_ERR_CAPACITY, with *n the length needed, when cap is short.
// mask may be NULL.
CTL_API ctl_status ctl_example_tokens(const ctl_example *e, const ctl_part *part, const ctl_encoding *enc, int32_t *ids,
                                      float *mask, int64_t cap, int64_t *n);

// A prompt for online RL: its tokens (ready for generation) and the example it comes from,
// which the reward functions see (its answer and fields), or NULL.
typedef struct ctl_rl_prompt {
    const int32_t *tokens;
    int64_t n;
    const ctl_example *example;
} ctl_rl_prompt;

typedef enum ctl_rows_kind {
    CTL_ROWS_SFT,          // a row per example: prompt then completion, weight 1 on the completion
    CTL_ROWS_PREFERENCE,   // two rows per example: chosen in rows 0..B-1, rejected in B..2B-1
    CTL_ROWS_PROMPTS       // prompts for generation (ctl_rows.prompts)
} ctl_rows_kind;

// Batches from a dataset, in a seeded order per pass (pass e: ctl_dataset_shuffle with seed *
// 1000003 + e), passing over the data again and again. Rows are laid out by ctl_batch_row
// (packing: ctl_batch_pack, first fit in data order). The rule for examples that do not fit:
// one longer than seq_len + 1 tokens keeps its start (drop_long: is skipped); one that needs
// more than 4 seq_len + 64 tokens, or whose kept start holds no completion token, is skipped;
// PROMPTS skips prompts longer than seq_len - max_new. ctl_batcher_skipped counts them, and a
// call that meets nothing usable in a whole pass over the data fails (CTL_ERR_INVALID).
typedef struct ctl_batcher_desc {
    ctl_rows_kind kind;
    int64_t batch;          // examples per micro-batch (B; PREFERENCE rows are 2B); PROMPTS: prompts per call
    int64_t accum;          // micro-batches per call (one optimiser step); 0: 1
    int64_t seq_len;        // T
    int64_t max_new;        // PROMPTS: room kept for the completion
    bool packing;           // SFT: as many examples in a row as fit (ctl_rows.pos)
    bool drop_long;
    uint64_t seed;
    ctl_encoding encoding;
} ctl_batcher_desc;

// One call's rows: accum micro-batches of `rows` rows each, back to back (batch.B = accum * rows),
// or PROMPTS' prompts. Owned by the batcher: valid until its next call.
typedef struct ctl_rows {
    ctl_batch batch;
    int64_t rows;                    // rows per micro-batch
    const int32_t *pos;              // packing: (batch.B, T) positions in each document; else NULL
    double tokens;                   // the sum of the weights: tokens that count (SFT's step_tokens)
    int64_t examples;                // examples read
    const ctl_rl_prompt *prompts;    // PROMPTS: n_prompts of them
    int64_t n_prompts;
} ctl_rows;

typedef struct ctl_batcher ctl_batcher;

CTL_API ctl_status ctl_batcher_init(const ctl_dataset *ds, const ctl_batcher_desc *desc, ctl_batcher **out);
CTL_API void ctl_batcher_free(ctl_batcher *b);
CTL_API ctl_status ctl_batcher_next(ctl_batcher *b, ctl_rows *out);
// Where the batcher is (for checkpoints: ctl_run_state's epoch and position), and going back there.
CTL_API void ctl_batcher_tell(const ctl_batcher *b, int64_t *epoch, int64_t *position);
CTL_API ctl_status ctl_batcher_seek(ctl_batcher *b, int64_t epoch, int64_t position);
CTL_API int64_t ctl_batcher_skipped(const ctl_batcher *b);

// One optimiser step of SFT (CTL_ROWS_SFT rows, packed or not) or DPO (PREFERENCE rows): the
// batcher's next accum micro-batches, each through ctl_train_forward, the objective (SFT's
// token mean over the whole step, as TRL's; DPO against its reference) and ctl_train_backward,
// then ctl_train_step. On failure the gradients gathered are dropped (the rows stay read) and
// the status says why: CTL_ERR_NONFINITE leaves it to the caller to go on or stop. The desc may
// be NULL: SFT with the token mean.
typedef struct ctl_step_desc {
    const ctl_sft_desc *sft;   // SFT's normaliser (NULL: the token mean); accum and step_tokens are filled in
    const ctl_dpo_desc *dpo;   // not NULL: DPO (accum and targets are filled in)
    ctl_train *reference;      // DPO's reference log-probs from this trainer's forward; NULL: the model
                               // with its adapters off (none for SimPO and ORPO)
} ctl_step_desc;

typedef struct ctl_step_out {
    double loss;               // the step's loss: the sum of its micro-batches' shares
    ctl_step_stats stats;
    ctl_objective_out metrics; // the objective's (its last micro-batch's), and the generation's for ctl_rl
    double tokens;             // tokens that counted
    bool skipped;              // ctl_rl_update: nothing to learn from (no pair, no correct completion): no step
} ctl_step_out;

CTL_API ctl_status ctl_train_batches(ctl_train *t, ctl_batcher *b, const ctl_step_desc *d, ctl_step_out *out);

// Online RL. Each step samples `group` completions of each prompt together (ctl_rollout_run:
// a prompt is fed once), scores them with the reward functions, and computes advantages
// (ctl_advantages); then, by method:
//   GRPO   the GRPO family's loss (ctl_objective_grpo, or `objective`, a function of the same
//          shape: a researcher's own loss plugs in here), in micro-batches of `batch` rows,
//          `iterations` optimiser steps on each generation (the first one's log-probs are kept
//          as the old policy's), with the k3 KL to the reference when grpo.beta > 0
//   DPO    online DPO: per prompt, its first correct and first wrong completion as a pair
//   RFT    rejection-sampling SFT (STaR, RFT): SFT on the correct completions
// A completion is correct when its summed reward is at least `accept`. Training rows are cut
// to the longest prompt + completion of the generation. The trainer's temperature (and the
// reference trainer's) is set to the sampler's (GRPO, DPO) or 1 (RFT), as TRL computes
// log-probs. The reference is `reference`'s forward, or the policy's model with its adapters off.
typedef enum ctl_rl_method { CTL_RL_GRPO, CTL_RL_DPO, CTL_RL_RFT } ctl_rl_method;

// An objective of the GRPO family's shape (ctl_objective_grpo is one): d->advantages,
// d->rewards (the rows' summed rewards) and d->user are the micro-batch's.
typedef ctl_status (*ctl_objective_fn)(ctl_ctx *ctx, const ctl_logprobs *in, const ctl_grpo_desc *d, ctl_objective_out *out);

typedef struct ctl_rl_desc {
    ctl_rl_method method;
    int64_t prompts;                  // the most prompts a step takes (P)
    int64_t group;                    // completions per prompt (G; >= 2 for advantages)
    int64_t max_new;                  // new tokens per completion; prompt + max_new <= the trainer's seq_len
    int64_t batch;                    // rows per micro-batch of the update; 0: all P * G (DPO: pairs * 2) in one
    int64_t iterations;               // GRPO: optimiser steps per generation (TRL's num_iterations); 0: 1
    ctl_sampler_desc sampler;         // temperature, filters, stop tokens (the first ends a completion in the rows); seed per step
    const ctl_tokenizer *tokenizer;   // decodes completions for the rewards (NULL: ctl_reward_input.completion is "")
    const ctl_reward_func *rewards;   // n_rewards functions, summed with their weights (ctl_advantages)
    int64_t n_rewards;
    ctl_advantage_desc advantages;    // kind and scale (group_size, n_funcs, weights and names are filled in)
    ctl_grpo_desc grpo;               // GRPO: loss type, epsilon, beta, ... (advantages, accum, gen_tokens, truncated filled in)
    ctl_objective_fn objective;       // GRPO: NULL: ctl_objective_grpo
    bool mask_truncated;              // completions cut off at max_new count for nothing (TRL's mask_truncated_completions)
    ctl_dpo_desc dpo;                 // DPO: loss and beta (accum and targets filled in)
    float accept;                     // DPO, RFT: the summed reward of a correct completion; 0: 1
    ctl_train *reference;             // reference log-probs (grpo.beta > 0, DPO): this trainer's forward; NULL: adapters off
} ctl_rl_desc;

// GRPOTrainer's defaults where a zero field would mean something else: 8 completions (group)
// of at most 256 new tokens for 1 prompt per step, sampled at temperature 1 (zero would be
// greedy: every completion of a group the same, and no advantage to learn from); dpo as
// ctl_dpo_desc_default. The rest zero: GRPO with DAPO's loss, epsilon 0.2, no KL.
CTL_API ctl_rl_desc ctl_rl_desc_default(void);

typedef struct ctl_rl ctl_rl;

CTL_API ctl_status ctl_rl_init(ctl_train *t, const ctl_rl_desc *desc, ctl_rl **out);
CTL_API void ctl_rl_free(ctl_rl *rl);
// Samples, scores and computes the advantages of n (<= desc.prompts) prompts' completions,
// sampled with `seed`. metrics (may be NULL): TRL's reward, reward_std, frac_reward_zero_std,
// rewards/<name>/mean and /std, completions/mean_length, min_length, max_length, clipped_ratio,
// mean_terminated_length, and correct (the fraction at or above accept). A prompt that leaves
// less than max_new tokens of room fails with CTL_ERR_CAPACITY; a reward that is infinite, or a
// batch reward function that fails, fails the call.
CTL_API ctl_status ctl_rl_generate(ctl_rl *rl, const ctl_rl_prompt *prompts, int64_t n, uint64_t seed, ctl_objective_out *metrics);
// One optimiser step on the last generation. out->metrics: the objective's, then the
// generation's. With nothing to learn from (DPO without a pair, RFT without a correct
// completion) no step is taken: out->skipped. A failed update drops its gradients; after a
// failed first GRPO iteration the generation holds no old log-probs, so the next call must
// generate again.
CTL_API ctl_status ctl_rl_update(ctl_rl *rl, ctl_step_out *out);
// ctl_rl_generate, then desc.iterations updates (out: the last one's).
CTL_API ctl_status ctl_rl_step(ctl_rl *rl, const ctl_rl_prompt *prompts, int64_t n, uint64_t seed, ctl_step_out *out);
// The last generation: its rollouts (P * G rows) and rewards (P * G, n_rewards).
CTL_API const ctl_rollout *ctl_rl_rollout(const ctl_rl *rl);
CTL_API const float *ctl_rl_rewards(const ctl_rl *rl);

#endif // COTLAB_H

// ===============================================================================================
//                     THE BACKEND INTERFACE (the implementation and its backends)
// ===============================================================================================
// A program needs none of this: a context made with ctl_ctx_desc.device = CTL_DEVICE_CUDA runs
// training and generation on the GPU by itself. This is the contract between the model code
// (written once, in the implementation) and a backend: a table of kernels. The CPU fills it
// from the kernels of >>impl:kernels; cotlab_cuda.cu fills it from its own and exports nothing
// else but the table (and the public ctl_device_* functions). Code that tests a backend kernel
// by kernel defines COTLAB_CUDA_BACKEND to see it.
#if (defined(COTLAB_IMPLEMENTATION) || defined(COTLAB_CUDA_BACKEND)) && !defined(COTLAB_BACKEND_DECLARED)
#define COTLAB_BACKEND_DECLARED

// A backend's own state, made and closed with the context (the CUDA backend's: its device, stream,
// cuBLAS handle and memory block), and how a backend finds it: NULL for a CPU context.
typedef struct ctl_cuda ctl_cuda;
CTL_API ctl_cuda *ctl_ctx_cuda(const ctl_ctx *ctx);

// The LM head as the kernels see it: W (V,C) stored as `type`, and optionally a low-rank term
// (a LoRA on the head) that adds h lora_b^T to the logits, h (N,r) computed by the caller
// (scale included), lora_b (V,r). Backward then also writes dh (N,r) = dlogits lora_b and adds
// dlora_b (V,r) += dlogits^T h (either may be NULL).
typedef struct ctl__head {
    ctl_dtype type;
    const void *w;
    int64_t r;
    const float *h, *lora_b;
    float *dh, *dlora_b;
} ctl__head;

// One piece of optimiser work: len values of array `param` of a ctl__params, from offset.
typedef struct ctl__segment { int64_t param, offset, len; } ctl__segment;

// A trainer's trainable parameters as its backend holds them, for the optimiser's entries:
// n arrays, array i of len[i] values, with its weights w[i], gradients g[i] and AdamW moments
// m[i], v[i]; decay[i] says whether weight decay applies to it. seg (n_seg) cuts the arrays
// into pieces of at most CTL__SEGMENT values, in array order, for the CPU's threads, with one
// double per piece in seg_sq (a backend that needs no such split ignores the three).
typedef struct ctl__params {
    int64_t n;
    float **w, **g, **m, **v;
    const int64_t *len;
    const bool *decay;
    const ctl__segment *seg;
    int64_t n_seg;
    double *seg_sq;
} ctl__params;

// Every entry means the same on every backend. ctx is the context the backend belongs to and
// every array is the backend's memory (the host's on the CPU; ctl_device_alloc's on a GPU).
// "backward" entries add into their gradients (dinp +=, dw +=) unless they say "written", and
// NULL for a gradient skips it. Work may be queued: `sync` waits for it and returns the first
// failure since the last sync. A GPU's results match the CPU's within (largest difference over
// the largest CPU value) fp32 1e-5, TF32 1e-3, bf16 products 1e-2, and token ids exactly; rows
// are reduced in a fixed order (no atomics), so the same inputs give the same bits every run.
typedef struct ctl__kernels {
    const char *name;
    bool host_memory;   // the backend's arrays are the host's: results can be read in place
    // The backend's state, made and closed with the context (NULL where there is none).
    ctl_status (*open)(ctl_ctx *ctx, const ctl_ctx_desc *desc, ctl_cuda **out);
    void (*close)(ctl_cuda *state);
    // Memory: copies between the host and the backend (the CPU's: memcpy, or nothing when the
    // two are the same), waiting for the work queued so far, and x = 0 / x *= s / dst = src.
    ctl_status (*to_backend)(ctl_ctx *ctx, void *dst, const void *src, size_t bytes);
    ctl_status (*to_host)(ctl_ctx *ctx, void *dst, const void *src, size_t bytes);
    ctl_status (*sync)(ctl_ctx *ctx);
    // Page-locks n bytes of host memory at p so that copies run at the bus's full speed; false,
    // with nothing changed, where that fails, p is pinned already or the backend has no bus.
    bool (*pin)(ctl_ctx *ctx, void *p, size_t n);
    void (*unpin)(ctl_ctx *ctx, void *p);
    void (*zero)(ctl_ctx *ctx, float *x, int64_t n);
    void (*scale)(ctl_ctx *ctx, float *x, int64_t n, float s);
    void (*copy_rows)(ctl_ctx *ctx, float *dst, const float *src, int64_t N, int64_t C);
    // c (M,N) (+)= a (M,K) b (K,N), each operand through its row and column strides.
    void (*gemm)(ctl_ctx *ctx, int64_t M, int64_t N, int64_t K, const float *a, int64_t a_rs, int64_t a_cs, const float *b,
                 int64_t b_rs, int64_t b_cs, float *c, int64_t ldc, bool accumulate);
    // A frozen or trainable weight w (OC,C) stored as `type` (F32, BF16, Q8_0, Q4_0, Q4_1):
    // out = inp w^T + bias; dinp += dout w; dw += dout^T inp and dbias += dout's column sums
    // (dout's rows ld apart; fp32 w only).
    void (*linear_forward)(ctl_ctx *ctx, float *out, const float *inp, ctl_dtype type, const void *w, const float *bias, int64_t N,
                           int64_t C, int64_t OC);
    void (*linear_backward)(ctl_ctx *ctx, float *dinp, const float *dout, ctl_dtype type, const void *w, int64_t N, int64_t C,
                            int64_t OC);
    void (*linear_dw)(ctl_ctx *ctx, float *dw, float *dbias, const float *dout, int64_t ld, const float *inp, int64_t N, int64_t C,
                      int64_t OC);
    void (*layernorm_forward)(ctl_ctx *ctx, float *out, float *mean, float *rstd, const float *inp, const float *w, const float *b,
                              int64_t N, int64_t C, float eps);
    void (*layernorm_backward)(ctl_ctx *ctx, float *dinp, float *dw, float *db, const float *dout, const float *inp, const float *w,
                               const float *mean, const float *rstd, int64_t N, int64_t C);
    void (*rmsnorm_forward)(ctl_ctx *ctx, float *out, float *rstd, const float *inp, const float *w, int64_t N, int64_t C, float eps);
    void (*rmsnorm_backward)(ctl_ctx *ctx, float *dinp, float *dw, const float *dout, const float *inp, const float *w,
                             const float *rstd, int64_t N, int64_t C);
    // Rows r = 0..N-1: token tokens[r] at position pos[r] (wte stored as `type`, wpe or NULL).
    void (*embedding_forward)(ctl_ctx *ctx, float *out, const int32_t *tokens, const int32_t *pos, ctl_dtype type, const void *wte,
                              const float *wpe, int64_t N, int64_t C);
    void (*embedding_backward)(ctl_ctx *ctx, float *dwte, float *dwpe, const float *dout, const int32_t *tokens, const int32_t *pos,
                               int64_t N, int64_t C);
    // RoPE on N rows at positions pos, n_heads heads of HS each, rows row_stride apart; cos_t
    // and sin_t are ctl_rope_table's (in the backend's memory). Backward rotates back.
    void (*rope_forward)(ctl_ctx *ctx, float *x, const float *cos_t, const float *sin_t, const int32_t *pos, int64_t N,
                         int64_t n_heads, int64_t HS, int64_t row_stride, ctl_rope_layout layout);
    void (*rope_backward)(ctl_ctx *ctx, float *dx, const float *cos_t, const float *sin_t, const int32_t *pos, int64_t N,
                          int64_t n_heads, int64_t HS, int64_t row_stride, ctl_rope_layout layout);
    // Causal attention over B rows of T tokens; pos (B,T) or NULL: packed documents, each seeing
    // only its own keys.
    void (*attention_forward)(ctl_ctx *ctx, float *out, float *lse, const float *qkv, const int32_t *pos, int64_t B, int64_t T,
                              int64_t NH, int64_t NKV, int64_t HS);
    void (*attention_backward)(ctl_ctx *ctx, float *dqkv, const float *dout, const float *qkv, const float *out, const float *lse,
                               const int32_t *pos, int64_t B, int64_t T, int64_t NH, int64_t NKV, int64_t HS);
    void (*gelu_forward)(ctl_ctx *ctx, float *out, const float *inp, int64_t n);
    void (*gelu_backward)(ctl_ctx *ctx, float *dinp, const float *dout, const float *inp, int64_t n);
    void (*swiglu_forward)(ctl_ctx *ctx, float *out, const float *inp, int64_t N, int64_t FF);
    void (*swiglu_backward)(ctl_ctx *ctx, float *dinp, const float *dout, const float *inp, int64_t N, int64_t FF);
    void (*residual_forward)(ctl_ctx *ctx, float *out, const float *a, const float *b, int64_t n);
    // Generation's attention over a KV cache (L, S, max_len, NKV*HS): row r of R is at position
    // pos[r] of sequence seq[r]; kv_store puts its keys and values at (layer, seq, pos), and
    // attention_cached reads its sequence's keys 0..pos[r]. A sequence whose parent is not -1
    // reads its first shared[s] positions from its parent's cache (a backend that shares no
    // prefixes is never given one).
    void (*kv_store)(ctl_ctx *ctx, float *kcache, float *vcache, const float *qkv, const int64_t *seq, const int32_t *pos, int64_t R,
                     int64_t layer, int64_t S, int64_t max_len, int64_t NH, int64_t NKV, int64_t HS);
    void (*attention_cached)(ctl_ctx *ctx, float *out, const float *qkv, const float *kcache, const float *vcache, const int64_t *seq,
                             const int32_t *pos, const int64_t *parent, const int64_t *shared, int64_t R, int64_t layer, int64_t S,
                             int64_t max_len, int64_t NH, int64_t NKV, int64_t HS);
    // The fused LM head and log-softmax (ctl_lmhead_forward), with the head's storage type and
    // LoRA in hd, and each row's entropy of softmax(z inv_temp) when entropy is not NULL;
    // scratch is the CPU's (a GPU takes its own).
    void (*lmhead_forward)(ctl_ctx *ctx, float *logp, float *lse, float *entropy, const float *x, const ctl__head *hd,
                           const int32_t *targets, int64_t N, int64_t C, int64_t V, float inv_temp, float *scratch, int64_t chunk);
    void (*lmhead_backward)(ctl_ctx *ctx, float *dx, float *dw, const float *dlogp, const float *x, const ctl__head *hd,
                            const int32_t *targets, const float *lse, int64_t N, int64_t C, int64_t V, float inv_temp,
                            float *scratch, int64_t chunk);
    // Adapter dropout: dst (+)= mask (.) src / (1 - p), the same mask for the same seed on
    // every backend.
    void (*dropout)(ctl_ctx *ctx, float *dst, const float *src, int64_t n, float p, uint64_t seed, bool accumulate);
    // LoRA on a linear layer: h (N,R) = scale x A^T, then out (N,OC; row stride ldo) += h B^T.
    // Backward: dB (OC,R) += dy^T h; dh (N,R) = scale dy B (written: the caller's scratch);
    // dA (R,C) += dh^T x; dx (N,C) += dh A. Any gradient may be NULL but dh.
    void (*lora_forward)(ctl_ctx *ctx, float *out, int64_t ldo, float *h, const float *x, const float *A, const float *B, int64_t N,
                         int64_t C, int64_t OC, int64_t R, float scale);
    void (*lora_backward)(ctl_ctx *ctx, float *dx, float *dA, float *dB, float *dh, const float *dy, int64_t ldy, const float *x,
                          const float *h, const float *A, const float *B, int64_t N, int64_t C, int64_t OC, int64_t R, float scale);
    // DoRA (see "the linear layer, with its adapters"): nrm (OC) = the row norms of W + scale B A
    // (W stored as `type`; hold keeps nrm as it is), g = mag / nrm; rowbuf is the CPU's
    // scratch. cols_scale: dst (N,OC) = (g - sub) (.) src; cols_sub: dst = src - bias (bias
    // may be NULL), src's rows ld apart. dora_out: y = g (.) z + bias, or with u (dropout)
    // y += g (.) z - u. dora_backward: dm += column sums of dy (.) z / nrm, db += those of dy,
    // and with scale_dy dy = g (.) dy in place.
    void (*dora_norms)(ctl_ctx *ctx, float *nrm, float *g, ctl_dtype type, const void *w, const float *A, const float *B,
                       const float *mag, int64_t OC, int64_t C, int64_t R, float scale, bool hold, float *rowbuf);
    void (*cols_scale)(ctl_ctx *ctx, float *dst, const float *src, int64_t ld, const float *g, float sub, int64_t N, int64_t OC);
    void (*cols_sub)(ctl_ctx *ctx, float *dst, const float *src, int64_t ld, const float *bias, int64_t N, int64_t OC);
    void (*dora_out)(ctl_ctx *ctx, float *y, int64_t ld, const float *z, const float *u, const float *bias, const float *g, int64_t N,
                     int64_t OC);
    void (*dora_backward)(ctl_ctx *ctx, float *dm, float *db, float *dy, int64_t ld, const float *z, const float *nrm, const float *g,
                          bool scale_dy, int64_t N, int64_t OC);
    // A sparse delta of n entries v at (rows[k], cols[k]): y (N, ld) += x (N,C) S^T. Backward:
    // dv[k] += sum_n dy[n, rows[k]] x[n, cols[k]], dx += dy S (either may be NULL).
    void (*sparse_forward)(ctl_ctx *ctx, float *y, int64_t ld, const float *x, const float *v, const int32_t *rows,
                           const int32_t *cols, int64_t n, int64_t N, int64_t C);
    void (*sparse_backward)(ctl_ctx *ctx, float *dx, float *dv, const float *dy, int64_t ld, const float *x, const float *v,
                            const int32_t *rows, const int32_t *cols, int64_t n, int64_t N, int64_t C);
    // The optimiser over a trainer's parameters: the sum of the squares of every gradient, in a
    // fixed order, for clipping (NaN when a weight is not finite, where the weights can be read
    // in place; elsewhere the forward's checks find it); AdamW (torch.optim.AdamW's update)
    // with the gradients scaled by grad_scale at update `step` (from 1), which then start again
    // at zero; and the gradients set to zero.
    ctl_status (*grad_sumsq)(ctl_ctx *ctx, const ctl__params *p, double *sq);
    void (*adamw)(ctl_ctx *ctx, const ctl__params *p, const ctl_optim_desc *o, float grad_scale, float lr, int64_t step);
    void (*grad_zero)(ctl_ctx *ctx, const ctl__params *p);
    // Sampling (ctl_sample's rules) of n rows of logits (n,V) at once, the rows' random numbers
    // drawn from rng in row order as ctl_generate does; logits change in place (the repetition
    // penalty); history (n, hist_stride) in the backend's memory or NULL, n_history (n) and out
    // (n) on the host. Waits for the tokens. NULL where the host samples (the CPU: ctl_generate
    // samples its rows in parallel where they lie).
    ctl_status (*sample)(ctl_ctx *ctx, int32_t *out, float *logits, int64_t n, int64_t V, const ctl_sampler_desc *sd,
                         const int32_t *history, int64_t hist_stride, const int64_t *n_history, ctl_rng *rng);
} ctl__kernels;

#ifdef COTLAB_CUDA
CTL_API const ctl__kernels ctl__cuda_kernels;   // cotlab_cuda.cu's
#endif
#endif // COTLAB_BACKEND_DECLARED

// ===============================================================================================
//                                       IMPLEMENTATION
// ===============================================================================================
#if defined(COTLAB_IMPLEMENTATION) && !defined(COTLAB_IMPLEMENTATION_DONE)
#define COTLAB_IMPLEMENTATION_DONE

#if defined(__FAST_MATH__) && !defined(COTLAB_ALLOW_FAST_MATH)
#error "cotlab: -ffast-math assumes no NaN or Inf, which turns off the non-finite checks; compile this file without it (or define COTLAB_ALLOW_FAST_MATH)"
#endif

#include <inttypes.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <errno.h>
#include <sys/stat.h>   // mkdir, for PEFT's adapter directories
#ifndef COTLAB_NO_THREADS
#include <pthread.h>
#endif
#if defined(__unix__) || defined(__APPLE__)
#define CTL__POSIX 1
#include <fcntl.h>    // open, for fsync
#include <unistd.h>
#endif
#if !defined(COTLAB_NO_SIMD) && defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define CTL__AVX2 1
#include <immintrin.h>
#include <cpuid.h>
#endif
#if !defined(COTLAB_NO_SIMD) && defined(__aarch64__) && defined(__ARM_NEON)
#define CTL__NEON 1   // Advanced SIMD is part of every AArch64 CPU
#include <arm_neon.h>
#endif

#ifdef CTL__AVX2
#define CTL__AVX2_FN(f) f   // an AVX2 build of a function, or NULL where there is none
#else
#define CTL__AVX2_FN(f) NULL
#endif

#if defined(__GNUC__) || defined(__clang__)
#define CTL__PRINTF(f, a) __attribute__((format(printf, f, a)))
#define CTL__INLINE static inline __attribute__((always_inline))   // so AVX2 wrappers recompile it
#define CTL__RESTRICT __restrict
#else
#define CTL__RESTRICT
#define CTL__PRINTF(f, a)
#define CTL__INLINE static inline
#endif

#define CTL__MIN(a, b) ((a) < (b) ? (a) : (b))
#define CTL__MAX(a, b) ((a) > (b) ? (a) : (b))
#define CTL__MAX_HEAD_DIM 256   // attention keeps one head's accumulator on the stack

// GEMM blocking: A packed in strips of 6 rows, B in strips of 16 columns, k blocks of 256. The
// AVX2 kernel multiplies one strip pair into a 6x16 tile (12 ymm accumulators), the AVX-512
// one two strips of each into a 12x32 tile (24 zmm). A block of B (256 x up to 3072, 3 MiB) is
// packed once and shared by all threads; each thread packs its own rows of A 96 at a time
// (96 KiB, for L2).
#define CTL__MR 6
#define CTL__NR 16
#define CTL__KC 256
#define CTL__MC 96
#define CTL__NC 3072

// >>impl:basics =================================================================================

// A context: the allocator and logger from its desc, the CPU features resolved once, the GEMM's
// packing buffers (made here so that no product allocates), the thread pool, and the CUDA state.
// One thread uses a context at a time; the pool's workers only ever run tasks handed to them.
struct ctl_ctx {
    ctl_allocator allocator;
    ctl_logger logger;
    int n_threads;
    ctl_simd simd;          // resolved: never AUTO
    bool bf16_dot;          // resolved: asked for and available
    bool gemm_ymm;          // the packed GEMM runs the AVX2 kernel under AVX-512 (Zen 4)
    bool decode;            // set by a decoding step: its products take the dot-product kernels
                            // whatever their row count, so a row's bits do not depend on its batch
    float **pack_a;         // per thread: CTL__MC * CTL__KC floats; also the thin products' scratch
    float *pack_b;          // shared: CTL__KC * CTL__NC floats
    char err[512];
    ctl_cuda *cuda;         // the CUDA backend's state (cotlab_cuda.cu), or NULL: a CPU context
#ifndef COTLAB_NO_THREADS
    struct ctl__worker *workers;   // n_threads - 1 of them: the calling thread is thread 0
    pthread_mutex_t mu;     // guards the job's fields and both conditions
    pthread_cond_t wake, done;   // workers sleep on wake, the caller on done
    ctl_task_fn fn;         // the job: fn(arg, task, thread) for each task
    void *arg;
    int64_t n_tasks, next_task;   // its task count, and the next index to hand out
    int64_t busy;           // workers that have not finished the current generation
    uint64_t generation;    // bumped once per job: a worker waits for it to change
    bool stop;              // set once, by ctl_ctx_free: workers return
#endif
};

CTL_API const char *ctl_status_str(ctl_status s) {
    // The X-macro list gives the strings in enum order; a value outside it (an int cast to
    // ctl_status) gets a fixed string, never a read past the array.
    static const char *const text[] = {
#define CTL__STATUS_TEXT(name, str) str,
        CTL_STATUS_LIST(CTL__STATUS_TEXT)
#undef CTL__STATUS_TEXT
    };
    return (unsigned)s < (unsigned)CTL_STATUS_COUNT ? text[s] : "unknown status";
}

// A failure is kept in the context it happened in, for ctl_last_error(ctx), and sent to its
// logger. Without a context (a NULL one, or a function whose handle argument is NULL) there is
// nowhere to keep it, by design: the library holds no mutable state of its own, so the status
// is all the caller gets (ctl_ctx_init sends its reasons to the desc's logger).
static ctl_status ctl__vfail(ctl_ctx *ctx, ctl_status s, const char *fmt, va_list ap) {
    if (!ctx) return s;
    vsnprintf(ctx->err, sizeof ctx->err, fmt, ap);
    if (ctx->logger.func) ctx->logger.func(CTL_LOG_ERROR, ctx->err, ctx->logger.user);
    return s;
}

static CTL__PRINTF(3, 4) ctl_status ctl__fail(ctl_ctx *ctx, ctl_status s, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    s = ctl__vfail(ctx, s, fmt, ap);
    va_end(ap);
    return s;
}

// A NULL fmt is itself a caller's mistake: it is recorded as one, never handed to vsnprintf.
CTL_API ctl_status ctl_fail(ctl_ctx *ctx, ctl_status s, const char *fmt, ...) {
    if (!fmt) return ctl__fail(ctx, s ? s : CTL_ERR_INVALID, "ctl_fail: no message (fmt is NULL)");
    va_list ap;
    va_start(ap, fmt);
    s = ctl__vfail(ctx, s, fmt, ap);
    va_end(ap);
    return s;
}

// Argument checks, at the top of public functions: `ok` is what the arguments must satisfy
// (pointers that are not NULL, sizes that are not negative). When they do not, the failure is
// recorded on ctx (when there is one), naming the function and the condition, and
// the function returns its neutral value (a status, 0, NULL, NaN; a kernel nothing):
//     if (!CTL__ARGS(ctx, out && inp && n >= 0)) return;
#define CTL__ARGS(ctx, ok) ((ok) || ctl__bad_args((ctx), __func__, #ok))

// The message drops the public prefix ("ctl_gemm" becomes "gemm"), in the "who: what" form of the
// library's other messages; a private helper keeps its whole name.
static bool ctl__bad_args(ctl_ctx *ctx, const char *fn, const char *ok) {
    ctl__fail(ctx, CTL_ERR_INVALID, "%s: invalid arguments: needs %s", strncmp(fn, "ctl_", 4) ? fn : fn + 4, ok);
    return false;
}

CTL_API const char *ctl_last_error(const ctl_ctx *ctx) {
    return ctx ? ctx->err : "no context: a failure without one is told by its status alone";
}
CTL_API ctl_device ctl_ctx_device(const ctl_ctx *ctx) {
    if (!CTL__ARGS(NULL, ctx)) return CTL_DEVICE_CPU;
    return ctx->cuda ? CTL_DEVICE_CUDA : CTL_DEVICE_CPU;
}
CTL_API ctl_cuda *ctl_ctx_cuda(const ctl_ctx *ctx) { return CTL__ARGS(NULL, ctx) ? ctx->cuda : NULL; }

#ifndef COTLAB_CUDA
// A build without the CUDA backend: every device call says so.
#define CTL__NO_CUDA "this build has no CUDA backend (compile with -DCOTLAB_CUDA and link cotlab_cuda.cu)"
CTL_API bool ctl_cuda_available(const char **why) {
    if (why) *why = CTL__NO_CUDA;
    return false;
}
CTL_API const char *ctl_ctx_device_name(const ctl_ctx *ctx) { return (void)ctx, "cpu"; }
CTL_API void *ctl_device_alloc(ctl_ctx *ctx, size_t size) {
    ctl_fail(ctx, CTL_ERR_UNSUPPORTED, "device alloc of %zu bytes: not a CUDA context; %s", size, CTL__NO_CUDA);
    return NULL;
}
CTL_API size_t ctl_device_mark(const ctl_ctx *ctx) { return (void)ctx, 0; }
CTL_API void ctl_device_release(ctl_ctx *ctx, size_t mark) { (void)ctx, (void)mark; }
CTL_API void ctl_device_release_span(ctl_ctx *ctx, size_t from, size_t to) { (void)ctx, (void)from, (void)to; }
CTL_API ctl_status ctl_copy_to_device(ctl_ctx *ctx, void *dst, const void *src, size_t size) {
    (void)dst, (void)src, (void)size;
    return ctl_fail(ctx, CTL_ERR_UNSUPPORTED, "copy to device: not a CUDA context; %s", CTL__NO_CUDA);
}
CTL_API ctl_status ctl_copy_to_host(ctl_ctx *ctx, void *dst, const void *src, size_t size) {
    (void)dst, (void)src, (void)size;
    return ctl_fail(ctx, CTL_ERR_UNSUPPORTED, "copy to host: not a CUDA context; %s", CTL__NO_CUDA);
}
CTL_API ctl_status ctl_device_sync(ctl_ctx *ctx) {
    return ctl_fail(ctx, CTL_ERR_UNSUPPORTED, "device sync: not a CUDA context; %s", CTL__NO_CUDA);
}
#endif
CTL_API int ctl_ctx_threads(const ctl_ctx *ctx) { return CTL__ARGS(NULL, ctx) ? ctx->n_threads : 0; }
CTL_API const char *ctl_ctx_simd_name(const ctl_ctx *ctx) {
    if (!CTL__ARGS(NULL, ctx)) return "";
    return ctx->simd == CTL_SIMD_AVX512 ? "avx512" : ctx->simd == CTL_SIMD_AVX2 ? "avx2" : ctx->simd == CTL_SIMD_NEON ? "neon" : "scalar";
}
CTL_API bool ctl_ctx_bf16_dot(const ctl_ctx *ctx) { return CTL__ARGS(NULL, ctx) && ctx->bf16_dot; }

// The hooks when ctl_ctx_desc leaves them NULL. malloc's 16-byte alignment on 64-bit platforms is
// what ctl__alloc_with counts on.
static void *ctl__default_alloc(size_t size, void *user) { (void)user; return malloc(size); }
static void ctl__default_free(void *ptr, void *user) { (void)user; free(ptr); }

// The hooks promise 16-byte alignment; the library wants 64 (cache lines, and the packed GEMM's
// aligned zmm loads). So 64 extra bytes are asked for, the block starts at the first 64-byte
// boundary at least 16 bytes in (at most 64 in, given the promise), and the raw pointer is kept
// in the 8 bytes just below it. A hook that breaks the promise can have the block overrun its
// allocation by up to 15 bytes.
static void *ctl__alloc_with(const ctl_allocator *al, size_t size) {
    if (size > SIZE_MAX - 64) return NULL;
    unsigned char *raw = (unsigned char *)al->alloc(size + 64, al->user);
    if (!raw) return NULL;
    unsigned char *p = (unsigned char *)(((uintptr_t)raw + 16 + 63) & ~(uintptr_t)63);
    memcpy(p - sizeof(void *), &raw, sizeof(void *));
    return p;
}

// A NULL context has no hooks to allocate with: NULL.
CTL_API void *ctl_alloc(ctl_ctx *ctx, size_t size) {
    return CTL__ARGS(NULL, ctx) ? ctl__alloc_with(&ctx->allocator, size) : NULL;
}

CTL_API void ctl_free(ctl_ctx *ctx, void *ptr) {
    if (!ptr || !CTL__ARGS(NULL, ctx)) return;   // without the context's allocator it cannot be freed
    // The raw pointer ctl__alloc_with stored just below the block goes back to the hook that gave it.
    void *raw;
    memcpy(&raw, (unsigned char *)ptr - sizeof(void *), sizeof(void *));
    ctx->allocator.free(raw, ctx->allocator.user);
}

// An arena is one block handed out front to back by ctl_arena_push; nothing in it is freed alone.
// A size of 0 still allocates a byte, so that a live arena's base is never NULL.
CTL_API ctl_status ctl_arena_init(ctl_ctx *ctx, ctl_arena *a, size_t size) {
    if (!CTL__ARGS(ctx, ctx && a)) return CTL_ERR_INVALID;
    a->used = 0;
    a->size = size;
    a->base = (unsigned char *)ctl_alloc(ctx, size ? size : 1);
    if (!a->base) {
        a->size = 0;
        return ctl__fail(ctx, CTL_ERR_OUT_OF_MEMORY, "arena: cannot allocate %zu bytes", size);
    }
    return CTL_OK;
}

static size_t ctl__align64(size_t n) { return (n + 63) & ~(size_t)63; }

// Lays out a block piece by piece, the same code run twice: first with base == NULL, which only
// counts (*used, and *kind, the piece's share in a memory plan), then over the block allocated
// for that count, which gives each piece its address. Pieces are rounded up to 64 bytes. A size
// that would wrap saturates at SIZE_MAX, so the block's allocation fails instead of a short
// block being carved up.
static void *ctl__take(unsigned char *base, size_t *used, size_t *kind, size_t bytes) {
    size_t n = ctl__align64(bytes);
    void *p = base ? base + *used : NULL;
    n = n < bytes ? SIZE_MAX : n;
    *used = *used > SIZE_MAX - n ? SIZE_MAX : *used + n;
    *kind = *kind > SIZE_MAX - n ? SIZE_MAX : *kind + n;
    return p;
}

// NULL when the arena is full. `a->size - a->used` cannot wrap (used never passes size), and
// n < size catches the rounding of a size near SIZE_MAX.
CTL_API void *ctl_arena_push(ctl_arena *a, size_t size) {
    if (!CTL__ARGS(NULL, a)) return NULL;
    size_t n = ctl__align64(size);
    if (n < size || n > a->size - a->used) return NULL;
    void *p = a->base + a->used;
    a->used += n;
    return p;
}

CTL_API void ctl_arena_free(ctl_ctx *ctx, ctl_arena *a) {
    if (!a || !CTL__ARGS(NULL, ctx)) return;
    ctl_free(ctx, a->base);
    a->base = NULL;
    a->size = a->used = 0;
}

// SplitMix64 (Steele, Lea & Flood 2014): a bijection of a counter, used to spread one 64-bit seed
// over xoshiro's 256 bits of state. Four consecutive outputs are never all zero (at most one of
// them can be), and xoshiro's state must not be.
static uint64_t ctl__splitmix64(uint64_t *x) {
    uint64_t z = (*x += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

CTL_API void ctl_rng_seed(ctl_rng *r, uint64_t seed) {
    if (!CTL__ARGS(NULL, r)) return;
    for (int i = 0; i < 4; i++) r->s[i] = ctl__splitmix64(&seed);
}

// k is 1..63 at every call: a shift by 64 would be undefined.
static uint64_t ctl__rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

// xoshiro256** (Blackman & Vigna 2018): period 2^256 - 1; the ** scrambler rotl(s1 * 5, 7) * 9
// makes all 64 output bits usable, so the helpers below may take the top ones.
CTL_API uint64_t ctl_rng_next(ctl_rng *r) {
    if (!CTL__ARGS(NULL, r)) return 0;
    uint64_t *s = r->s, out = ctl__rotl(s[1] * 5, 7) * 9, t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = ctl__rotl(s[3], 45);
    return out;
}

// The top 24 bits over 2^24: uniform in [0, 1), every value exact in a float and never 1.0 (a
// 64-bit fraction rounded to float could round up to 1).
CTL_API float ctl_rng_uniform(ctl_rng *r) {
    if (!CTL__ARGS(NULL, r)) return NAN;
    return (float)(ctl_rng_next(r) >> 40) * (1.0f / 16777216.0f);
}

// Box-Muller (1958), the cosine half only: the sine half is dropped so that the generator keeps no
// state between calls. 53-bit fractions in double; u1 excludes 0, so log(u1) is finite.
CTL_API float ctl_rng_normal(ctl_rng *r) {
    if (!CTL__ARGS(NULL, r)) return NAN;
    double u1 = ((double)(ctl_rng_next(r) >> 11) + 1.0) * (1.0 / 9007199254740992.0);  // (0, 1]
    double u2 = (double)(ctl_rng_next(r) >> 11) * (1.0 / 9007199254740992.0);
    return (float)(sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2));
}

// The pool: a job is published by bumping `generation` (under mu); workers take task indices
// from a shared counter, and the last one out signals `done`. Between jobs a worker spins on
// the generation for a few microseconds before it sleeps on `wake`, and the caller spins on
// `busy` before it sleeps on `done`: a training step runs hundreds of short jobs back to back,
// and a sleep and wake-up costs about as much as a small job.
#ifndef COTLAB_NO_THREADS
// A worker's index is the `thread` its tasks get (1..n_threads-1): it picks per-thread scratch
// such as ctx->pack_a[thread].
typedef struct ctl__worker {
    ctl_ctx *ctx;
    int index;
    pthread_t thread;
} ctl__worker;

// The counters the spinning reads without the mutex, as acquire/release atomics: a worker that
// sees the new generation also sees fn, arg and n_tasks, stored before it.
#if defined(__GNUC__) || defined(__clang__)
#define CTL__LOAD(x) __atomic_load_n(&(x), __ATOMIC_ACQUIRE)
#define CTL__STORE(x, v) __atomic_store_n(&(x), (v), __ATOMIC_RELEASE)
#define CTL__FETCH_ADD(x, v) __atomic_fetch_add(&(x), (v), __ATOMIC_ACQ_REL)
#if defined(__x86_64__) || defined(__i386__)
#define CTL__PAUSE() __builtin_ia32_pause()
#else
#define CTL__PAUSE() __asm__ __volatile__("" ::: "memory")
#endif
#define CTL__SPINS 4096   // pauses before sleeping: tens of microseconds
#else                     // no atomics: the counters are touched under mu only, nobody spins
#define CTL__LOAD(x) (x)
#define CTL__STORE(x, v) ((x) = (v))
#define CTL__PAUSE() ((void)0)
#define CTL__SPINS 0
#endif

// ctx->counter += add, returning the value before.
static int64_t ctl__fetch_add(ctl_ctx *ctx, int64_t *counter, int64_t add) {
#if CTL__SPINS
    (void)ctx;
    return CTL__FETCH_ADD(*counter, add);
#else
    pthread_mutex_lock(&ctx->mu);
    int64_t v = *counter;
    *counter += add;
    pthread_mutex_unlock(&ctx->mu);
    return v;
#endif
}

// Takes task indices from the shared counter until none is left. Which thread runs which task
// changes from run to run, so a task writes only its own outputs and uses `thread` only to pick
// scratch: that is what makes every kernel's result independent of the thread count.
static void ctl__run_tasks(ctl_ctx *ctx, int thread) {
    for (;;) {
        int64_t task = ctl__fetch_add(ctx, &ctx->next_task, 1);
        if (task >= ctx->n_tasks) return;
        ctx->fn(ctx->arg, task, thread);
    }
}

// A worker's life: wait for a new generation (spinning first, then sleeping), run tasks until
// none is left, report done; until ctl_ctx_free sets stop.
static void *ctl__worker_main(void *p) {
    ctl__worker *w = (ctl__worker *)p;
    ctl_ctx *ctx = w->ctx;
    uint64_t seen = 0;
    for (;;) {
        for (int i = 0; i < CTL__SPINS && CTL__LOAD(ctx->generation) == seen && !CTL__LOAD(ctx->stop); i++) CTL__PAUSE();
        pthread_mutex_lock(&ctx->mu);
        while (ctx->generation == seen && !ctx->stop) pthread_cond_wait(&ctx->wake, &ctx->mu);
        bool stop = ctx->stop;
        // Read under mu: the job's fields stay as they are until this worker has counted itself out.
        seen = ctx->generation;
        pthread_mutex_unlock(&ctx->mu);
        if (stop) break;
        ctl__run_tasks(ctx, w->index);
        // The last one out signals under mu, so the caller cannot miss it between its test of busy and
        // its wait.
        if (ctl__fetch_add(ctx, &ctx->busy, -1) == 1) {   // the last one out
            pthread_mutex_lock(&ctx->mu);
            pthread_cond_signal(&ctx->done);
            pthread_mutex_unlock(&ctx->mu);
        }
    }
    return NULL;
}
#endif

// fn(arg, task, thread) for task 0..n_tasks-1, returning when all are done; the caller runs tasks
// too, as thread 0. Not reentrant: fn must not call ctl_parallel_for on the same context, since
// one job's fields are shared by the whole pool. With one thread or one task: a plain loop.
CTL_API void ctl_parallel_for(ctl_ctx *ctx, int64_t n_tasks, ctl_task_fn fn, void *arg) {
    if (!CTL__ARGS(ctx, ctx && fn && n_tasks >= 0)) return;
#ifndef COTLAB_NO_THREADS
    if (ctx->n_threads > 1 && n_tasks > 1) {
        pthread_mutex_lock(&ctx->mu);
        ctx->fn = fn;
        ctx->arg = arg;
        ctx->n_tasks = n_tasks;
        CTL__STORE(ctx->next_task, (int64_t)0);
        // busy counts workers, not tasks: each counts itself out once per job, even one that found no
        // task left, so a job cannot end while a worker still reads its fields.
        CTL__STORE(ctx->busy, ctx->n_threads - 1);
        CTL__STORE(ctx->generation, ctx->generation + 1);   // publishes the fields above
        pthread_cond_broadcast(&ctx->wake);
        pthread_mutex_unlock(&ctx->mu);
        // The caller's share, then a wait for the workers (spinning first, as they do).
        ctl__run_tasks(ctx, 0);
        for (int i = 0; i < CTL__SPINS && CTL__LOAD(ctx->busy) > 0; i++) CTL__PAUSE();
        pthread_mutex_lock(&ctx->mu);
        while (CTL__LOAD(ctx->busy) > 0) pthread_cond_wait(&ctx->done, &ctx->mu);
        pthread_mutex_unlock(&ctx->mu);
        return;
    }
#endif
    (void)ctx;
    for (int64_t i = 0; i < n_tasks; i++) fn(arg, i, 0);
}

CTL_API ctl_ctx_desc ctl_ctx_desc_default(void) {
    ctl_ctx_desc d;
    memset(&d, 0, sizeof d);
    return d;
}

// What the CPU has (x86-64 builds with the vector paths; elsewhere nothing).
#ifdef CTL__AVX2
// __builtin_cpu_init first: GCC requires it when the check may run before constructors have.
#define CTL__CPU_HAS(feature) (__builtin_cpu_init(), __builtin_cpu_supports(feature) != 0)
#else
#define CTL__CPU_HAS(feature) false
#endif

// AMD family 0x19 with AVX-512 is Zen 4, which executes a 512-bit FMA as two 256-bit halves:
// there the AVX2 GEMM kernel (the same FMAs in the same order, so the same results) measured
// 5-9% faster than the 12x32 zmm one on transformer shapes.
static bool ctl__cpu_is_zen4(void) {
#ifdef CTL__AVX2
    unsigned a, b, c, d;
    if (!__get_cpuid(0, &a, &b, &c, &d) || b != 0x68747541u || d != 0x69746e65u || c != 0x444d4163u) return false;   // "AuthenticAMD"
    if (!__get_cpuid(1, &a, &b, &c, &d)) return false;
    // CPUID leaf 1: the extended family (bits 20-27) is added only when the base family is 0xf.
    unsigned family = (a >> 8) & 0xf;
    return (family == 0xf ? family + ((a >> 20) & 0xff) : family) == 0x19;
#else
    return false;
#endif
}

// Undoes ctl_ctx_init from any point it reached: started_workers threads are stopped and joined
// before the buffers they read are freed, and NULL buffers are skipped. The context itself came
// from ctl__alloc_with, so it goes back through the raw pointer stored below it.
static void ctl__ctx_destroy(ctl_ctx *ctx, int started_workers) {
#ifndef COTLAB_NO_THREADS
    if (ctx->workers) {
        pthread_mutex_lock(&ctx->mu);
        CTL__STORE(ctx->stop, true);
        pthread_cond_broadcast(&ctx->wake);
        pthread_mutex_unlock(&ctx->mu);
        for (int i = 0; i < started_workers; i++) pthread_join(ctx->workers[i].thread, NULL);
        pthread_mutex_destroy(&ctx->mu);
        pthread_cond_destroy(&ctx->wake);
        pthread_cond_destroy(&ctx->done);
    }
    ctl_free(ctx, ctx->workers);
#else
    (void)started_workers;
#endif
#ifdef COTLAB_CUDA
    if (ctx->cuda) ctl__cuda_kernels.close(ctx->cuda);
#endif
    for (int i = 0; ctx->pack_a && i < ctx->n_threads; i++) ctl_free(ctx, ctx->pack_a[i]);
    ctl_free(ctx, ctx->pack_a);
    ctl_free(ctx, ctx->pack_b);
    ctl_allocator al = ctx->allocator;   // a copy: ctx is freed by its own hook
    void *raw;
    memcpy(&raw, (unsigned char *)ctx - sizeof(void *), sizeof(void *));
    al.free(raw, al.user);
}

// The CUDA backend's state for a context that asks for the GPU (cotlab_cuda.cu), or why there is none.
static ctl_status ctl__device_open(ctl_ctx *ctx, const ctl_ctx_desc *d) {
#ifdef COTLAB_CUDA
    return ctl__cuda_kernels.open(ctx, d, &ctx->cuda);
#else
    (void)d;
    return ctl_fail(ctx, CTL_ERR_UNSUPPORTED, "CUDA context: %s", CTL__NO_CUDA);
#endif
}

// ctl_ctx_init's failures before there is a context to keep them: to the desc's logger.
static CTL__PRINTF(3, 4) ctl_status ctl__init_fail(const ctl_ctx_desc *d, ctl_status s, const char *fmt, ...) {
    char msg[256];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    if (d->logger.func) d->logger.func(CTL_LOG_ERROR, msg, d->logger.user);
    return s;
}

// The vector path: AUTO takes the widest the CPU and the build have. An explicit choice the CPU lacks is refused
// (false) rather than quietly downgraded, so a test that asks for a kernel runs that kernel. bf16_dot needs AVX-512
// with the BF16 extension; without them the request is dropped, not refused (ctl_ctx_bf16_dot tells which).
static bool ctl__ctx_simd(ctl_ctx *ctx, const ctl_ctx_desc *d) {
    bool avx2 = CTL__CPU_HAS("avx2") && CTL__CPU_HAS("fma"), avx512 = avx2 && CTL__CPU_HAS("avx512f"), neon = false;
#ifdef CTL__NEON
    neon = true;
#endif
    if ((unsigned)d->simd > (unsigned)CTL_SIMD_NEON || (d->simd == CTL_SIMD_AVX2 && !avx2) || (d->simd == CTL_SIMD_AVX512 && !avx512) ||
        (d->simd == CTL_SIMD_NEON && !neon))
        return false;
    ctx->simd = d->simd != CTL_SIMD_AUTO ? d->simd : avx512 ? CTL_SIMD_AVX512 : avx2 ? CTL_SIMD_AVX2 : neon ? CTL_SIMD_NEON : CTL_SIMD_SCALAR;
    ctx->bf16_dot = d->bf16_dot && ctx->simd == CTL_SIMD_AVX512 && CTL__CPU_HAS("avx512bf16");
    ctx->gemm_ymm = d->simd == CTL_SIMD_AUTO && ctx->simd == CTL_SIMD_AVX512 && ctl__cpu_is_zen4();   // forced AVX512 keeps zmm
    return true;
}

// The GEMM's packing buffers, once for the context's life: one panel of B (KC x NC floats, 3 MiB) shared by the
// threads, and a panel of A (MC x KC floats, 96 KiB) for each thread. false when out of memory (what was made is
// freed with the context).
static bool ctl__ctx_buffers(ctl_ctx *ctx) {
    int n = ctx->n_threads;
    ctx->pack_b = (float *)ctl_alloc(ctx, sizeof(float) * CTL__KC * CTL__NC);
    ctx->pack_a = (float **)ctl_alloc(ctx, n * sizeof(float *));
    if (!ctx->pack_a || !ctx->pack_b) {
        ctl_free(ctx, ctx->pack_a);
        ctx->pack_a = NULL;
        return false;
    }
    // NULL first, so that a failure half way frees only what was allocated.
    for (int i = 0; i < n; i++) ctx->pack_a[i] = NULL;
    for (int i = 0; i < n; i++)
        if (!(ctx->pack_a[i] = (float *)ctl_alloc(ctx, sizeof(float) * CTL__MC * CTL__KC))) return false;
    return true;
}

// The thread pool: n - 1 workers, the calling thread being the n-th. *started counts those running, so that a
// failure (out of memory, a failed pthread_create) stops and joins just those.
static ctl_status ctl__ctx_pool(ctl_ctx *ctx, const ctl_ctx_desc *d, int *started) {
    *started = 0;
#ifndef COTLAB_NO_THREADS
    int n = ctx->n_threads;
    if (n < 2) return CTL_OK;
    ctx->workers = (ctl__worker *)ctl_alloc(ctx, (size_t)(n - 1) * sizeof(ctl__worker));
    if (!ctx->workers) return ctl__init_fail(d, CTL_ERR_OUT_OF_MEMORY, "ctx_init: out of memory for %d workers", n - 1);
    pthread_mutex_init(&ctx->mu, NULL);
    pthread_cond_init(&ctx->wake, NULL);
    pthread_cond_init(&ctx->done, NULL);
    for (int i = 0; i < n - 1; i++, (*started)++) {
        ctx->workers[i].ctx = ctx;
        ctx->workers[i].index = i + 1;
        if (pthread_create(&ctx->workers[i].thread, NULL, ctl__worker_main, &ctx->workers[i]))
            return ctl__init_fail(d, CTL_ERR_THREAD, "ctx_init: cannot start worker thread %d of %d", i + 1, n - 1);
    }
#else
    (void)ctx, (void)d;
#endif
    return CTL_OK;
}

CTL_API ctl_status ctl_ctx_init(ctl_ctx **out, const ctl_ctx_desc *desc) {
    if (!CTL__ARGS(NULL, out)) return CTL_ERR_INVALID;
    ctl_ctx_desc d = desc ? *desc : ctl_ctx_desc_default();
    *out = NULL;
    // The desc is checked before anything is allocated; with no context yet, a refusal's reason
    // goes to the desc's logger.
    if (!d.allocator.alloc != !d.allocator.free)
        return ctl__init_fail(&d, CTL_ERR_INVALID, "ctx_init: the allocator needs both alloc and free, or neither");
    if (!d.allocator.alloc) {
        d.allocator.alloc = ctl__default_alloc;
        d.allocator.free = ctl__default_free;
    }
    if (d.n_threads < 0 || d.n_threads > 1024)
        return ctl__init_fail(&d, CTL_ERR_INVALID, "ctx_init: n_threads %d is outside [0, 1024] (0: one per core)", d.n_threads);
    if (d.device != CTL_DEVICE_CPU && d.device != CTL_DEVICE_CUDA)
        return ctl__init_fail(&d, CTL_ERR_INVALID, "ctx_init: device %d is neither CTL_DEVICE_CPU nor CTL_DEVICE_CUDA", (int)d.device);
    ctl_ctx *ctx = (ctl_ctx *)ctl__alloc_with(&d.allocator, sizeof(ctl_ctx));
    if (!ctx) return ctl__init_fail(&d, CTL_ERR_OUT_OF_MEMORY, "ctx_init: out of memory (%zu bytes)", sizeof(ctl_ctx));
    // All zero first, so that ctl__ctx_destroy can undo a failure from any later step.
    memset(ctx, 0, sizeof *ctx);
    ctx->allocator = d.allocator;
    ctx->logger = d.logger;
#ifdef COTLAB_NO_THREADS
    ctx->n_threads = 1;
#else
    // 0 threads: one per online CPU, at most 64.
    long online = sysconf(_SC_NPROCESSORS_ONLN);
    ctx->n_threads = d.n_threads ? d.n_threads : (int)CTL__MAX(1, CTL__MIN(online, 64));
#endif
    if (!ctl__ctx_simd(ctx, &d)) {
        ctl__ctx_destroy(ctx, 0);
        return ctl__init_fail(&d, CTL_ERR_INVALID, "ctx_init: simd %d is not available on this CPU or in this build", (int)d.simd);
    }
    if (!ctl__ctx_buffers(ctx)) {
        ctl__ctx_destroy(ctx, 0);
        return ctl__init_fail(&d, CTL_ERR_OUT_OF_MEMORY, "ctx_init: out of memory for the product buffers");
    }
    int started;
    ctl_status st = ctl__ctx_pool(ctx, &d, &started);
    // The device after the pool: its failure message needs the context (ctl_fail sends it to the logger).
    if (!st && d.device == CTL_DEVICE_CUDA && (st = ctl__device_open(ctx, &d))) ctx->cuda = NULL;
    if (st) {
        ctl__ctx_destroy(ctx, started);
        return st;
    }
    *out = ctx;
    return CTL_OK;
}

CTL_API void ctl_ctx_free(ctl_ctx *ctx) {
    if (ctx) ctl__ctx_destroy(ctx, ctx->n_threads - 1);
}

// >>impl:tensors ================================================================================

// A 0-dim tensor is a scalar: one element.
CTL_API int64_t ctl_tensor_numel(const ctl_tensor *t) {
    if (!CTL__ARGS(NULL, t)) return 0;
    int64_t n = 1;
    for (int i = 0; i < t->ndim; i++) n *= t->shape[i];
    return n;
}

// Bytes of n values stored as `type`. The block types are ggml's block_q8_0, block_q4_0 and
// block_q4_1 (32 values a block); for them n must be a multiple of 32: a remainder is dropped,
// not rounded up.
CTL_API size_t ctl_dtype_bytes(ctl_dtype type, int64_t n) {
    switch (type) {
    case CTL_Q8_0: return (size_t)(n / 32) * 34;   // f16 scale + 32 int8
    case CTL_Q4_0: return (size_t)(n / 32) * 18;   // f16 scale + 32 nibbles
    case CTL_Q4_1: return (size_t)(n / 32) * 20;   // f16 scale and min + 32 nibbles
    case CTL_BF16: return (size_t)n * 2;           // the top half of each float
    default: return (size_t)n * 4;
    }
}

CTL_API const char *ctl_dtype_name(ctl_dtype type) {
    // In ctl_dtype's order: the enum value is the index.
    static const char *const names[] = {"f32", "i32", "q8_0", "q4_0", "q4_1", "bf16"};
    return (unsigned)type <= (unsigned)CTL_BF16 ? names[type] : "?";
}

// The GGUF type of a compressed dtype, and back (CTL_F32 when it is not one of the four).
static ctl_ggml_type ctl__ggml_of(ctl_dtype type) {
    return type == CTL_Q8_0 ? CTL_GGML_Q8_0 : type == CTL_Q4_0 ? CTL_GGML_Q4_0 : type == CTL_Q4_1 ? CTL_GGML_Q4_1
           : type == CTL_BF16 ? CTL_GGML_BF16 : CTL_GGML_F32;
}
static ctl_dtype ctl__dtype_of(ctl_ggml_type type) {
    return type == CTL_GGML_Q8_0 ? CTL_Q8_0 : type == CTL_GGML_Q4_0 ? CTL_Q4_0 : type == CTL_GGML_Q4_1 ? CTL_Q4_1
           : type == CTL_GGML_BF16 ? CTL_BF16 : CTL_F32;
}

// The products read compressed weights through these two, written for the four kept types
// with each block's scale read once (the same values as ctl_ggml_dequantize, which is general).
// A bf16 value is the top half of a float's bits, so widening it is exact.
CTL__INLINE float ctl__bf16(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

// A block's half-precision scale. A half's exponent and mantissa moved into a float's fields read
// as the value times 2^-112 (the biases differ by 112; half subnormals land on float subnormals),
// so one exact multiply by 2^112 gives the value; inf and NaN get the float's all-ones exponent.
CTL__INLINE float ctl__f16(const unsigned char *p) {
    uint32_t h = (uint32_t)(p[0] | p[1] << 8), bits = (h & 0x7fffu) << 13;
    float f, scale = 5.192296858534828e33f;   // 2^112
    if ((h & 0x7c00u) == 0x7c00u) bits |= 0x7f800000u;
    memcpy(&f, &bits, 4);
    if ((h & 0x7c00u) != 0x7c00u) f *= scale;
    return (h & 0x8000u) ? -f : f;
}

// n values of a compressed row, starting at value k0 (for the block types both multiples of 32;
// any for bf16).
CTL__INLINE void ctl__dequant_span(ctl_dtype type, const unsigned char *row, int64_t k0, int64_t n, float *out) {
    // Block layouts (ggml): Q8_0 is an f16 scale d and 32 int8 q, value q d. Q4_0 is d and 16 bytes
    // of nibbles, value (q - 8) d, the low nibbles being values 0-15 and the high ones 16-31. Q4_1 is
    // d, an f16 min m and the nibbles, value q d + m.
    if (type == CTL_BF16) {
        const uint16_t *h = (const uint16_t *)row + k0;
        for (int64_t j = 0; j < n; j++) out[j] = ctl__bf16(h[j]);
        return;
    }
    // Block types: k0 and n are multiples of 32, so the span starts and ends on whole blocks.
    const unsigned char *b = row + ctl_dtype_bytes(type, k0);
    size_t bs = ctl_dtype_bytes(type, 32);
    for (int64_t j = 0; j < n; j += 32, b += bs, out += 32) {
        float d = ctl__f16(b), m = type == CTL_Q4_1 ? ctl__f16(b + 2) : 0.0f;
        if (type == CTL_Q8_0)
            for (int k = 0; k < 32; k++) out[k] = (float)(int8_t)b[2 + k] * d;
        else if (type == CTL_Q4_0)
            for (int k = 0; k < 16; k++) out[k] = (float)((b[2 + k] & 0xF) - 8) * d, out[k + 16] = (float)((b[2 + k] >> 4) - 8) * d;
        else
            for (int k = 0; k < 16; k++) out[k] = (float)(b[4 + k] & 0xF) * d + m, out[k + 16] = (float)(b[4 + k] >> 4) * d + m;
    }
}

// x . (a compressed row of n values): the same lanes and order as ctl__dot over the dequantised
// row, so the result is the same bit for bit, without writing the row out.
CTL__INLINE float ctl__dot_q(ctl_dtype type, const unsigned char *row, const float *x, int64_t n) {
    // Eight partial sums, lane k taking values 8i + k, combined by ctl__dot's tree. The block types
    // have no tail loop: n is a multiple of 32, as ctl__dequant_span requires.
    float s[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f}, v[32];
    switch (type) {   // one loop per type, so each vectorises
    case CTL_BF16: {
        const uint16_t *h = (const uint16_t *)row;
        float r = 0.0f;
        int64_t i = 0;
        for (; i + 8 <= n; i += 8)
            for (int k = 0; k < 8; k++) s[k] += ctl__bf16(h[i + k]) * x[i + k];
        for (; i < n; i++) r += ctl__bf16(h[i]) * x[i];
        return ((s[0] + s[4]) + (s[1] + s[5])) + ((s[2] + s[6]) + (s[3] + s[7])) + r;
    }
    case CTL_Q8_0:
        for (int64_t j = 0; j < n; j += 32, row += 34, x += 32) {
            float d = ctl__f16(row);
            for (int k = 0; k < 32; k++) v[k] = (float)(int8_t)row[2 + k] * d;
            for (int i = 0; i < 32; i += 8)
                for (int k = 0; k < 8; k++) s[k] += v[i + k] * x[i + k];
        }
        break;
    case CTL_Q4_0:
        for (int64_t j = 0; j < n; j += 32, row += 18, x += 32) {
            float d = ctl__f16(row);
            for (int k = 0; k < 16; k++) v[k] = (float)((row[2 + k] & 0xF) - 8) * d, v[k + 16] = (float)((row[2 + k] >> 4) - 8) * d;
            for (int i = 0; i < 32; i += 8)
                for (int k = 0; k < 8; k++) s[k] += v[i + k] * x[i + k];
        }
        break;
    default:
        for (int64_t j = 0; j < n; j += 32, row += 20, x += 32) {
            float d = ctl__f16(row), m = ctl__f16(row + 2);
            for (int k = 0; k < 16; k++) v[k] = (float)(row[4 + k] & 0xF) * d + m, v[k + 16] = (float)(row[4 + k] >> 4) * d + m;
            for (int i = 0; i < 32; i += 8)
                for (int k = 0; k < 8; k++) s[k] += v[i + k] * x[i + k];
        }
    }
    return ((s[0] + s[4]) + (s[1] + s[5])) + ((s[2] + s[6]) + (s[3] + s[7]));
}

// Unused dimensions are 1, so a shape's product is its element count without a special case.
CTL_API ctl_tensor ctl_tensor_f32(float *data, int ndim, const int64_t *shape) {
    ctl_tensor t;
    memset(&t, 0, sizeof t);
    if (!CTL__ARGS(NULL, shape && ndim >= 0 && ndim <= 4)) return t;   // data may be NULL: a view laid out before its block
    t.dtype = CTL_F32;
    t.ndim = ndim;
    for (int i = 0; i < 4; i++) t.shape[i] = i < ndim ? shape[i] : 1;
    t.data = data;
    t.device = CTL_DEVICE_CPU;
    return t;
}

// >>impl:kernels ================================================================================

// ---- GEMM ----------------------------------------------------------------------------------
// A packed GEMM in the GotoBLAS order. For each block of B (k block x up to NC columns): the
// threads pack it once into NR-column strips, then each thread takes a range of rows of A,
// packs them MC at a time into MR-row strips, and a micro-kernel multiplies strip pairs into
// MR x NR register tiles. Every C value is the same sum in the same order (k blocks in turn,
// k in order inside the kernel) whichever thread computes it, so results do not depend on the
// thread count.

// The reference: C(m,n) (+)= sum_k A(m,k) B(k,n), with A(m,k) = a[m*a_rs + k*a_cs] and B(k,n) =
// b[k*b_rs + n*b_cs] (a transpose is a swap of strides), one float sum per value in k order. The
// tests hold ctl_gemm to it.
CTL_API void ctl_gemm_ref(int64_t M, int64_t N, int64_t K, const float *a, int64_t a_rs,
                          int64_t a_cs, const float *b, int64_t b_rs, int64_t b_cs, float *c,
                          int64_t ldc, bool accumulate) {
    if (!CTL__ARGS(NULL, a && b && c && M >= 0 && N >= 0 && K >= 0)) return;
    for (int64_t m = 0; m < M; m++)
        for (int64_t n = 0; n < N; n++) {
            float sum = 0.0f;
            for (int64_t k = 0; k < K; k++) sum += a[m * a_rs + k * a_cs] * b[k * b_rs + n * b_cs];
            c[m * ldc + n] = accumulate ? c[m * ldc + n] + sum : sum;
        }
}

// Writes an MR x NR accumulator tile into C: only its mr x nr live corner.
// first: the first k block of a product that does not accumulate, so C is written, not added to.
static void ctl__tile_store(float *c, int64_t ldc, const float *acc, int mr, int nr, bool first) {
    for (int i = 0; i < mr; i++)
        for (int j = 0; j < nr; j++)
            c[i * ldc + j] = first ? acc[i * CTL__NR + j] : c[i * ldc + j] + acc[i * CTL__NR + j];
}

// The portable micro-kernel; compilers vectorise the inner loop.
// a and b are packed strips: for each k, MR values of A then NR of B, contiguous, so both are read
// straight through. The full tile is computed even at an edge (the packing zero-pads it); only
// its mr x nr corner is stored.
static void ctl__kernel_scalar(int64_t kc, const float *a, const float *b, float *c, int64_t ldc,
                               int mr, int nr, bool first) {
    float acc[CTL__MR * CTL__NR];
    memset(acc, 0, sizeof acc);
    for (int64_t k = 0; k < kc; k++, a += CTL__MR, b += CTL__NR)
        for (int i = 0; i < CTL__MR; i++)
            for (int j = 0; j < CTL__NR; j++) acc[i * CTL__NR + j] += a[i] * b[j];
    ctl__tile_store(c, ldc, acc, mr, nr, first);
}

#ifdef CTL__AVX2
// 6 rows x 16 columns: 12 ymm accumulators, two B loads and six broadcasts per k.
__attribute__((target("avx2,fma"))) static void
ctl__kernel_avx2(int64_t kc, const float *a, const float *b, float *c, int64_t ldc, int mr,
                 int nr, bool first) {
    __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00;
    __m256 c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
    for (int i = 0; i < mr; i++) {   // C is touched only at the end: fetch it meanwhile
        _mm_prefetch((const char *)(c + i * ldc), _MM_HINT_T0);
        _mm_prefetch((const char *)(c + i * ldc + CTL__NR - 1), _MM_HINT_T0);
    }
    for (int64_t k = 0; k < kc; k++, a += CTL__MR, b += CTL__NR) {
        __m256 b0 = _mm256_load_ps(b), b1 = _mm256_load_ps(b + 8), x;
        x = _mm256_broadcast_ss(a + 0), c00 = _mm256_fmadd_ps(x, b0, c00), c01 = _mm256_fmadd_ps(x, b1, c01);
        x = _mm256_broadcast_ss(a + 1), c10 = _mm256_fmadd_ps(x, b0, c10), c11 = _mm256_fmadd_ps(x, b1, c11);
        x = _mm256_broadcast_ss(a + 2), c20 = _mm256_fmadd_ps(x, b0, c20), c21 = _mm256_fmadd_ps(x, b1, c21);
        x = _mm256_broadcast_ss(a + 3), c30 = _mm256_fmadd_ps(x, b0, c30), c31 = _mm256_fmadd_ps(x, b1, c31);
        x = _mm256_broadcast_ss(a + 4), c40 = _mm256_fmadd_ps(x, b0, c40), c41 = _mm256_fmadd_ps(x, b1, c41);
        x = _mm256_broadcast_ss(a + 5), c50 = _mm256_fmadd_ps(x, b0, c50), c51 = _mm256_fmadd_ps(x, b1, c51);
    }
    // A whole tile goes from registers to C; an edge tile through a buffer and the scalar store.
    __m256 acc[12] = {c00, c01, c10, c11, c20, c21, c30, c31, c40, c41, c50, c51};
    if (mr == CTL__MR && nr == CTL__NR) {
        for (int i = 0; i < CTL__MR; i++)
            for (int h = 0; h < 2; h++) {
                float *p = c + i * ldc + 8 * h;
                __m256 v = first ? acc[2 * i + h] : _mm256_add_ps(_mm256_loadu_ps(p), acc[2 * i + h]);
                _mm256_storeu_ps(p, v);
            }
    } else {
        float tile[CTL__MR * CTL__NR];
        for (int i = 0; i < 12; i++) _mm256_storeu_ps(tile + 8 * i, acc[i]);
        ctl__tile_store(c, ldc, tile, mr, nr, first);
    }
}

// C (+)= the live corner (mr x nr) of a 12 x 32 tile held as acc[2*i] (columns 0-15 of row i)
// and acc[2*i+1] (16-31), through masks: m0 covers columns 0-15 and m1 16-31, so neither the
// loads nor the stores touch C past column nr, and an edge tile needs no copy through memory.
__attribute__((target("avx512f"), always_inline)) static inline void ctl__tile_store_avx512(float *c, int64_t ldc, const __m512 *acc, int mr, int nr,
                                                                                         bool first) {
    __mmask16 m0 = nr >= 16 ? 0xFFFF : (__mmask16)((1u << nr) - 1);
    __mmask16 m1 = nr <= 16 ? 0 : nr >= 32 ? 0xFFFF : (__mmask16)((1u << (nr - 16)) - 1);
    for (int i = 0; i < mr; i++) {
        float *p = c + i * ldc;
        __m512 v0 = acc[2 * i], v1 = acc[2 * i + 1];
        if (!first) v0 = _mm512_add_ps(_mm512_maskz_loadu_ps(m0, p), v0), v1 = _mm512_add_ps(_mm512_maskz_loadu_ps(m1, p + 16), v1);
        _mm512_mask_storeu_ps(p, m0, v0);
        _mm512_mask_storeu_ps(p + 16, m1, v1);
    }
}

// Up to 12 rows x 32 columns: two packed strips of A (a, and a + kc*MR) times two of B (b, and
// b + kc*NR), 24 zmm accumulators, per k two B loads and twelve broadcasts. Narrower tiles
// (mr <= 6, nr <= 16) run the same loop on fewer registers. Each C value is the same chain of
// FMAs as in the AVX2 kernel, so the two give equal results.
// CTL__FMA2 is one k step of row i: A(i,k) broadcast, times both 16-column halves of B's row k.
#define CTL__FMA2(i, r0, r1) x = _mm512_set1_ps(a[i]), r0 = _mm512_fmadd_ps(x, b0, r0), r1 = _mm512_fmadd_ps(x, b1, r1)
#define CTL__FMA1(i, r0) r0 = _mm512_fmadd_ps(_mm512_set1_ps(a[i]), b0, r0)
__attribute__((target("avx512f"))) static void
ctl__kernel_avx512(int64_t kc, const float *a, const float *b, float *c, int64_t ldc, int mr,
                   int nr, bool first) {
    // The strips of a tile are adjacent in the packed buffers: the second strip of A (rows 6-11) and
    // of B (columns 16-31) start kc strip-rows after the first. Past mr or nr they are padding or
    // belong to the next tile, which the loops below do not read.
    const float *b2 = b + kc * CTL__NR, *a2 = a + kc * CTL__MR;
    __m512 c00 = _mm512_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00;
    __m512 c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
    __m512 c60 = c00, c61 = c00, c70 = c00, c71 = c00, c80 = c00, c81 = c00;
    __m512 c90 = c00, c91 = c00, ca0 = c00, ca1 = c00, cb0 = c00, cb1 = c00;
    for (int i = 0; i < mr; i++) {   // into L2: A's and B's strips fill L1 meanwhile
        _mm_prefetch((const char *)(c + i * ldc), _MM_HINT_T1);
        _mm_prefetch((const char *)(c + i * ldc + nr - 1), _MM_HINT_T1);
    }
    // The whole 12 x 32 tile. CTL__FMA2 reads a[i], so a points at the second strip for rows 6-11.
    if (mr > CTL__MR && nr > CTL__NR) {
        for (int64_t k = 0; k < kc; k++, a += CTL__MR, a2 += CTL__MR, b += CTL__NR, b2 += CTL__NR) {
            __m512 b0 = _mm512_load_ps(b), b1 = _mm512_load_ps(b2), x;
            CTL__FMA2(0, c00, c01), CTL__FMA2(1, c10, c11), CTL__FMA2(2, c20, c21);
            CTL__FMA2(3, c30, c31), CTL__FMA2(4, c40, c41), CTL__FMA2(5, c50, c51);
            const float *t = a;
            a = a2;
            CTL__FMA2(0, c60, c61), CTL__FMA2(1, c70, c71), CTL__FMA2(2, c80, c81);
            CTL__FMA2(3, c90, c91), CTL__FMA2(4, ca0, ca1), CTL__FMA2(5, cb0, cb1);
            a = t;
        }
    } else if (nr > CTL__NR) {   // 6 rows x 32 columns
        for (int64_t k = 0; k < kc; k++, a += CTL__MR, b += CTL__NR, b2 += CTL__NR) {
            __m512 b0 = _mm512_load_ps(b), b1 = _mm512_load_ps(b2), x;
            CTL__FMA2(0, c00, c01), CTL__FMA2(1, c10, c11), CTL__FMA2(2, c20, c21);
            CTL__FMA2(3, c30, c31), CTL__FMA2(4, c40, c41), CTL__FMA2(5, c50, c51);
        }
    } else if (mr > CTL__MR) {   // 12 rows x 16 columns
        for (int64_t k = 0; k < kc; k++, a += CTL__MR, a2 += CTL__MR, b += CTL__NR) {
            __m512 b0 = _mm512_load_ps(b);
            CTL__FMA1(0, c00), CTL__FMA1(1, c10), CTL__FMA1(2, c20), CTL__FMA1(3, c30), CTL__FMA1(4, c40), CTL__FMA1(5, c50);
            const float *t = a;
            a = a2;
            CTL__FMA1(0, c60), CTL__FMA1(1, c70), CTL__FMA1(2, c80), CTL__FMA1(3, c90), CTL__FMA1(4, ca0), CTL__FMA1(5, cb0);
            a = t;
        }
    } else {   // 6 x 16: the AVX2 kernel's tile, in zmm
        for (int64_t k = 0; k < kc; k++, a += CTL__MR, b += CTL__NR) {
            __m512 b0 = _mm512_load_ps(b);
            CTL__FMA1(0, c00), CTL__FMA1(1, c10), CTL__FMA1(2, c20), CTL__FMA1(3, c30), CTL__FMA1(4, c40), CTL__FMA1(5, c50);
        }
    }
    __m512 acc[24] = {c00, c01, c10, c11, c20, c21, c30, c31, c40, c41, c50, c51,
                      c60, c61, c70, c71, c80, c81, c90, c91, ca0, ca1, cb0, cb1};
    ctl__tile_store_avx512(c, ldc, acc, mr, nr, first);
}
#undef CTL__FMA1
#undef CTL__FMA2

// ---- bf16 dot products (ctl_ctx_desc.bf16_dot) ----
// The packed product of fp32 A and bf16 B in bf16: both operands packed as pairs of
// consecutive k in one 32-bit lane (the even k in the low half, a zero past an odd kc), A's
// values rounded to nearest even. VDPBF16PS adds a lane pair's two products to an fp32 lane.
// ctl__kernel_avx512's tile over kp pairs: per pair two B loads, twelve broadcasts, and 24
// VDPBF16PS.
// CTL__DP2: a[i] is row i's pair (A(i,2q), A(i,2q+1)) as one 32-bit lane, broadcast and dotted
// with B's pairs of both 16-column halves. CTL__DP1 does one half.
#define CTL__DP2(i, r0, r1) x = (__m512bh)_mm512_set1_epi32((int)a[i]), r0 = _mm512_dpbf16_ps(r0, x, b0), r1 = _mm512_dpbf16_ps(r1, x, b1)
#define CTL__DP1(i, r0) r0 = _mm512_dpbf16_ps(r0, (__m512bh)_mm512_set1_epi32((int)a[i]), b0)
// Not the fp32 kernels' results: A is rounded to bf16 on packing, and VDPBF16PS treats denormal
// inputs as zero and rounds as it sees fit (it ignores MXCSR). Only with ctl_ctx_desc.bf16_dot.
__attribute__((target("avx512f,avx512bf16"))) static void
ctl__kernel_bf16(int64_t kp, const uint32_t *a, const uint32_t *b, float *c, int64_t ldc, int mr, int nr, bool first) {
    // The same four tile shapes as ctl__kernel_avx512, over kp pairs of k instead of kc values.
    const uint32_t *b2 = b + kp * CTL__NR, *a2 = a + kp * CTL__MR;
    __m512 c00 = _mm512_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00;
    __m512 c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
    __m512 c60 = c00, c61 = c00, c70 = c00, c71 = c00, c80 = c00, c81 = c00;
    __m512 c90 = c00, c91 = c00, ca0 = c00, ca1 = c00, cb0 = c00, cb1 = c00;
    if (mr > CTL__MR && nr > CTL__NR) {
        for (int64_t k = 0; k < kp; k++, a += CTL__MR, a2 += CTL__MR, b += CTL__NR, b2 += CTL__NR) {
            __m512bh b0 = (__m512bh)_mm512_load_si512(b), b1 = (__m512bh)_mm512_load_si512(b2), x;
            CTL__DP2(0, c00, c01), CTL__DP2(1, c10, c11), CTL__DP2(2, c20, c21);
            CTL__DP2(3, c30, c31), CTL__DP2(4, c40, c41), CTL__DP2(5, c50, c51);
            const uint32_t *t = a;
            a = a2;
            CTL__DP2(0, c60, c61), CTL__DP2(1, c70, c71), CTL__DP2(2, c80, c81);
            CTL__DP2(3, c90, c91), CTL__DP2(4, ca0, ca1), CTL__DP2(5, cb0, cb1);
            a = t;
        }
    } else if (nr > CTL__NR) {
        for (int64_t k = 0; k < kp; k++, a += CTL__MR, b += CTL__NR, b2 += CTL__NR) {
            __m512bh b0 = (__m512bh)_mm512_load_si512(b), b1 = (__m512bh)_mm512_load_si512(b2), x;
            CTL__DP2(0, c00, c01), CTL__DP2(1, c10, c11), CTL__DP2(2, c20, c21);
            CTL__DP2(3, c30, c31), CTL__DP2(4, c40, c41), CTL__DP2(5, c50, c51);
        }
    } else if (mr > CTL__MR) {
        for (int64_t k = 0; k < kp; k++, a += CTL__MR, a2 += CTL__MR, b += CTL__NR) {
            __m512bh b0 = (__m512bh)_mm512_load_si512(b);
            CTL__DP1(0, c00), CTL__DP1(1, c10), CTL__DP1(2, c20), CTL__DP1(3, c30), CTL__DP1(4, c40), CTL__DP1(5, c50);
            const uint32_t *t = a;
            a = a2;
            CTL__DP1(0, c60), CTL__DP1(1, c70), CTL__DP1(2, c80), CTL__DP1(3, c90), CTL__DP1(4, ca0), CTL__DP1(5, cb0);
            a = t;
        }
    } else {
        for (int64_t k = 0; k < kp; k++, a += CTL__MR, b += CTL__NR) {
            __m512bh b0 = (__m512bh)_mm512_load_si512(b);
            CTL__DP1(0, c00), CTL__DP1(1, c10), CTL__DP1(2, c20), CTL__DP1(3, c30), CTL__DP1(4, c40), CTL__DP1(5, c50);
        }
    }
    __m512 acc[24] = {c00, c01, c10, c11, c20, c21, c30, c31, c40, c41, c50, c51,
                      c60, c61, c70, c71, c80, c81, c90, c91, ca0, ca1, cb0, cb1};
    ctl__tile_store_avx512(c, ldc, acc, mr, nr, first);
}
#undef CTL__DP1
#undef CTL__DP2
#endif

#ifdef CTL__NEON
// 6 rows x 16 columns in 24 q registers: per k four B loads, the six A values in two, and 24
// FMAs by lane. Each C value is the same chain of FMAs as in the x86 kernels.
static void ctl__kernel_neon(int64_t kc, const float *a, const float *b, float *c, int64_t ldc, int mr, int nr, bool first) {
    // acc[i][j]: row i, columns 4j..4j+3.
    float32x4_t acc[6][4];
    for (int i = 0; i < 6; i++)
        for (int j = 0; j < 4; j++) acc[i][j] = vdupq_n_f32(0.0f);
    for (int64_t k = 0; k < kc; k++, a += CTL__MR, b += CTL__NR) {
        float32x4_t b0 = vld1q_f32(b), b1 = vld1q_f32(b + 4), b2 = vld1q_f32(b + 8), b3 = vld1q_f32(b + 12);
        float32x4_t a03 = vld1q_f32(a);
        float32x2_t a45 = vld1_f32(a + 4);
// CTL__ROW: row i's value of A times B's 16 columns, into the row's four accumulators.
#define CTL__ROW(i, ai) acc[i][0] = vfmaq_n_f32(acc[i][0], b0, ai), acc[i][1] = vfmaq_n_f32(acc[i][1], b1, ai), \
                        acc[i][2] = vfmaq_n_f32(acc[i][2], b2, ai), acc[i][3] = vfmaq_n_f32(acc[i][3], b3, ai)
        CTL__ROW(0, vgetq_lane_f32(a03, 0)), CTL__ROW(1, vgetq_lane_f32(a03, 1)), CTL__ROW(2, vgetq_lane_f32(a03, 2));
        CTL__ROW(3, vgetq_lane_f32(a03, 3)), CTL__ROW(4, vget_lane_f32(a45, 0)), CTL__ROW(5, vget_lane_f32(a45, 1));
#undef CTL__ROW
    }
    float tile[CTL__MR * CTL__NR];
    for (int i = 0; i < 6; i++)
        for (int j = 0; j < 4; j++) vst1q_f32(tile + i * CTL__NR + 4 * j, acc[i][j]);
    ctl__tile_store(c, ldc, tile, mr, nr, first);
}
#endif

// The B operand: fp32 through strides, B(k,n) = f[k*rs + n*cs]; or a weight matrix W of
// quantised rows (row_bytes apart), read as B(k,n) = W[n][k] when nk (the forward product
// x W^T) and as W[k][n] otherwise (the input gradient dy W).
typedef struct ctl__bop {
    ctl_dtype type;   // CTL_F32: f, rs and cs; otherwise q, row_bytes and nk
    const float *f;
    int64_t rs, cs;
    const unsigned char *q;
    size_t row_bytes;
    bool nk;
} ctl__bop;

// One packed product's arguments, read by all its tasks. n0, nc, k0, kc name the block of B that
// the current pair of parallel_for calls (pack B, then compute) works on; ctl__gemm sets them.
typedef struct ctl__gemm_args {
    ctl_ctx *ctx;
    int64_t M, N, K, a_rs, a_cs, ldc;
    const float *a;
    ctl__bop b;
    float *c;
    bool accumulate;
    bool bf16;                        // bf16 B multiplied in bf16 (ctl_ctx_bf16_dot)
    int64_t n0, nc, k0, kc;           // the current block of B
    int64_t m_tasks, n_tasks;         // the grid of compute tasks over it
} ctl__gemm_args;

// dst[s*kc*R + k*R + r] = src(r0 + s*R + r, k0 + k): strips of R rows (for B, "rows" are its
// columns: the caller swaps the strides), zero past `rows`. Reads follow the unit stride.
static void ctl__pack(float *dst, const float *src, int64_t rs, int64_t cs, int64_t r0,
                      int64_t rows, int64_t k0, int64_t kc, int R) {
    // Rows past `rows` are zero, so the micro-kernel always runs whole strips; the store then keeps
    // only the live corner.
    int64_t strips = (rows + R - 1) / R;
    if (cs == 1 && R == CTL__MR) {   // A's rows, contiguous in k: six read streams, one write stream
        for (int64_t s = 0; s < strips; s++) {
            float *d = dst + s * kc * R;
            int64_t live = CTL__MIN((int64_t)R, rows - s * R);
            const float *p[CTL__MR];
            // A dead row points at the strip's first row: a valid address, its values never stored.
            for (int r = 0; r < CTL__MR; r++) p[r] = src + (r0 + s * R + (r < live ? r : 0)) * rs + k0;
            if (live == CTL__MR)
                for (int64_t k = 0; k < kc; k++, d += CTL__MR)
                    d[0] = p[0][k], d[1] = p[1][k], d[2] = p[2][k], d[3] = p[3][k], d[4] = p[4][k], d[5] = p[5][k];
            else
                for (int64_t k = 0; k < kc; k++, d += CTL__MR)
                    for (int r = 0; r < CTL__MR; r++) d[r] = r < live ? p[r][k] : 0.0f;
        }
    } else if (cs == 1) {   // each row is contiguous in k: one row at a time
        for (int64_t r = 0; r < strips * R; r++) {
            float *d = dst + (r / R) * kc * R + r % R;
            const float *sp = src + (r0 + r) * rs + k0;
            if (r < rows) for (int64_t k = 0; k < kc; k++) d[k * R] = sp[k];
            else for (int64_t k = 0; k < kc; k++) d[k * R] = 0.0f;
        }
    } else {         // rows are contiguous across r (rs == 1 in practice): one k at a time
        for (int64_t k = 0; k < kc; k++) {
            const float *sp = src + (k0 + k) * cs + r0 * rs;
            for (int64_t s = 0; s < strips; s++) {
                float *d = dst + s * kc * R + k * R;
                int64_t live = CTL__MIN((int64_t)R, rows - s * R);
                for (int64_t r = 0; r < live; r++) d[r] = sp[(s * R + r) * rs];
                for (int64_t r = live; r < R; r++) d[r] = 0.0f;
            }
        }
    }
}

// A row dequantiser: n values of a compressed row from value k0 into out (ctl__dequant_span, or
// its AVX-512 build, which gives the same values).
typedef void (*ctl__dequant_fn)(ctl_dtype type, const unsigned char *row, int64_t k0, int64_t n, float *out);

// ctl__dequant_span is CTL__INLINE; this gives it an address for ctl__dequant_fn.
static void ctl__dequant_portable(ctl_dtype type, const unsigned char *row, int64_t k0, int64_t n, float *out) {
    ctl__dequant_span(type, row, k0, n, out);
}

// ctl__pack's layout for columns n0 .. n0+cols of a compressed B over k0 .. k0+kc (for the
// block types k0, kc, n0 and cols multiples of 32; cols at most 8*NR): each row of W is
// dequantised once, into span (kc values of a row of W, or cols values: both fit).
static void ctl__pack_q(float *dst, const ctl__bop *b, int64_t n0, int64_t cols, int64_t k0, int64_t kc, int R, ctl__dequant_fn dequant) {
    float span[CTL__KC > 8 * CTL__NR ? CTL__KC : 8 * CTL__NR];
    int64_t strips = (cols + R - 1) / R;
    if (b->nk) {   // column n of B is row n of W
        for (int64_t r = 0; r < strips * R; r++) {
            float *d = dst + (r / R) * kc * R + r % R;
            if (r < cols) dequant(b->type, b->q + (size_t)(n0 + r) * b->row_bytes, k0, kc, span);
            for (int64_t k = 0; k < kc; k++) d[k * R] = r < cols ? span[k] : 0.0f;
        }
    } else {       // row k of B is row k of W
        for (int64_t k = 0; k < kc; k++) {
            dequant(b->type, b->q + (size_t)(k0 + k) * b->row_bytes, n0, cols, span);
            for (int64_t s = 0; s < strips; s++) {
                float *d = dst + s * kc * R + k * R;
                int64_t live = CTL__MIN((int64_t)R, cols - s * R);
                for (int64_t r = 0; r < R; r++) d[r] = r < live ? span[s * R + r] : 0.0f;
            }
        }
    }
}

#ifdef CTL__AVX2
// Packing for ctl__kernel_bf16 (ctl_ctx_desc.bf16_dot): A's values rounded to bf16 on the way.
// Two floats rounded to bf16 (ctl_f32_to_bf16, to nearest even) in one 32-bit lane, lo in the low half.
static uint32_t ctl__bf16_pair(float lo, float hi) { return ctl_f32_to_bf16(lo) | (uint32_t)ctl_f32_to_bf16(hi) << 16; }

// ctl__pack's layout in pairs: dst[s*kp*MR + q*MR + r] = A(r0 + s*MR + r, k0 + 2q and 2q+1),
// kp = (kc + 1) / 2, zero past `rows`.
static void ctl__pack_a_bf16(uint32_t *dst, const float *src, int64_t rs, int64_t cs, int64_t r0, int64_t rows, int64_t k0, int64_t kc) {
    // A row past `rows` packs zeros; an odd kc's last pair has a zero high half, which adds nothing.
    int64_t kp = (kc + 1) / 2, strips = (rows + CTL__MR - 1) / CTL__MR;
    for (int64_t r = 0; r < strips * CTL__MR; r++) {
        uint32_t *d = dst + (r / CTL__MR) * kp * CTL__MR + r % CTL__MR;
        const float *p = src + (r0 + r) * rs + k0 * cs;
        for (int64_t q = 0; q < kp; q++)
            d[q * CTL__MR] = r >= rows ? 0 : ctl__bf16_pair(p[2 * q * cs], 2 * q + 1 < kc ? p[(2 * q + 1) * cs] : 0.0f);
    }
}

// The same for columns n0 .. n0+cols of a bf16 B over k0 .. k0+kc, strips of NR.
static void ctl__pack_b_bf16(uint32_t *dst, const ctl__bop *b, int64_t n0, int64_t cols, int64_t k0, int64_t kc) {
    int64_t kp = (kc + 1) / 2, strips = (cols + CTL__NR - 1) / CTL__NR;
    if (b->nk) {   // column n of B is row n of W: its pairs are adjacent
        for (int64_t j = 0; j < strips * CTL__NR; j++) {
            uint32_t *d = dst + (j / CTL__NR) * kp * CTL__NR + j % CTL__NR;
            // A column past `cols` points at the last live one (a valid row) and packs zeros.
            const uint16_t *w = (const uint16_t *)(b->q + (size_t)(n0 + CTL__MIN(j, cols - 1)) * b->row_bytes) + k0;
            for (int64_t q = 0; q < kp; q++)
                d[q * CTL__NR] = j >= cols ? 0 : (uint32_t)w[2 * q] | (2 * q + 1 < kc ? (uint32_t)w[2 * q + 1] << 16 : 0);
        }
    } else {       // row k of B is row k of W: two rows interleave
        for (int64_t q = 0; q < kp; q++) {
            const uint16_t *w0 = (const uint16_t *)(b->q + (size_t)(k0 + 2 * q) * b->row_bytes) + n0;
            const uint16_t *w1 = 2 * q + 1 < kc ? (const uint16_t *)((const unsigned char *)w0 + b->row_bytes) : NULL;
            for (int64_t j = 0; j < strips * CTL__NR; j++)
                dst[(j / CTL__NR) * kp * CTL__NR + q * CTL__NR + j % CTL__NR] =
                    j >= cols ? 0 : (uint32_t)w0[j] | (w1 ? (uint32_t)w1[j] << 16 : 0);
        }
    }
}

#endif

#ifdef CTL__AVX2
// ctl__pack for strips of NR (16) rows that are each contiguous in k: 8 x 8 blocks transposed
// in registers, so every store is a whole vector (the scalar loop's stores land 64 bytes apart).
__attribute__((target("avx2,fma"))) static void ctl__pack16_avx2(float *dst, const float *src, int64_t rs, int64_t r0, int64_t rows,
                                                                int64_t k0, int64_t kc) {
    int64_t strips = (rows + CTL__NR - 1) / CTL__NR;
    for (int64_t s = 0; s < strips; s++) {
        float *d = dst + s * kc * CTL__NR;
        int64_t live = CTL__MIN((int64_t)CTL__NR, rows - s * CTL__NR);
        if (live < CTL__NR) {   // a partial strip: the plain loop
            ctl__pack(d, src, rs, 1, r0 + s * CTL__NR, live, k0, kc, CTL__NR);
            continue;
        }
        int64_t k = 0;
        for (; k + 8 <= kc; k += 8)
            for (int half = 0; half < 2; half++) {
                const float *p = src + (r0 + s * CTL__NR + 8 * half) * rs + k0 + k;
                __m256 r[8], t[8];
                for (int i = 0; i < 8; i++) r[i] = _mm256_loadu_ps(p + i * rs);
                // The standard 8 x 8 transpose: unpack interleaves pairs of rows, the shuffles pairs of pairs,
                // and permute2f128 (below) swaps the 128-bit halves.
                for (int i = 0; i < 8; i += 2) t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]), t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
                for (int i = 0; i < 8; i += 4) {
                    r[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44), r[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
                    r[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44), r[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
                }
                // r[i] now holds k+i of rows 0-3 (low half) and k+i+4 (high half); r[i+4] the same of rows 4-7
                for (int i = 0; i < 4; i++) {
                    __m256 lo = _mm256_permute2f128_ps(r[i], r[i + 4], 0x20), hi = _mm256_permute2f128_ps(r[i], r[i + 4], 0x31);
                    _mm256_storeu_ps(d + (k + i) * CTL__NR + 8 * half, lo);
                    _mm256_storeu_ps(d + (k + i + 4) * CTL__NR + 8 * half, hi);
                }
            }
        for (; k < kc; k++)
            for (int64_t i = 0; i < CTL__NR; i++) d[k * CTL__NR + i] = src[(r0 + s * CTL__NR + i) * rs + k0 + k];
    }
}
#endif

#ifdef CTL__AVX2
// A block's 32 values (Q4_0's already less 8) as floats: elements 0..15 in *q0, 16..31 in *q1.
// Its 16 bytes of nibbles widen to one zmm of int32: each lane's low and high nibble are
// elements k and k + 16.
__attribute__((target("avx512f"), always_inline)) static inline void ctl__q_values_avx512(ctl_dtype type, const unsigned char *blk, __m512 *q0, __m512 *q1) {
    if (type == CTL_Q8_0) {
        *q0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(blk + 2))));
        *q1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(blk + 18))));
        return;
    }
    __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(blk + (type == CTL_Q4_1 ? 4 : 2))));
    __m512i lo = _mm512_and_si512(v, _mm512_set1_epi32(0x0F)), hi = _mm512_srli_epi32(v, 4);
    if (type == CTL_Q4_0) lo = _mm512_sub_epi32(lo, _mm512_set1_epi32(8)), hi = _mm512_sub_epi32(hi, _mm512_set1_epi32(8));
    *q0 = _mm512_cvtepi32_ps(lo), *q1 = _mm512_cvtepi32_ps(hi);
}

// The scales d (and, with mins, Q4_1's m; else m = 0) of nb (1..16) blocks `bytes` apart,
// gathered from each block's first 4 bytes and converted together; returns whether one is
// infinite or NaN.
__attribute__((target("avx512f"), always_inline)) static inline bool ctl__q_scales16(const unsigned char *row, int bytes, int nb, bool mins, float *d, float *m) {
    // Lane b gathers block b's first 4 bytes: d in the low half, Q4_1's m in the high one. Lanes past
    // nb are masked off, so no load goes past the row.
    const __m512i offsets = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0), _mm512_set1_epi32(bytes));
    __m512i g = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), nb == 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << nb) - 1), offsets, row, 1);
    __m512 dv = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(g));
    __m512 mv = mins ? _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32(g, 16))) : _mm512_setzero_ps();
    _mm512_storeu_ps(d, dv), _mm512_storeu_ps(m, mv);
    return _mm512_cmp_ps_mask(_mm512_max_ps(_mm512_abs_ps(dv), _mm512_abs_ps(mv)), _mm512_set1_ps(INFINITY), _CMP_NLT_UQ) != 0;
}

// ctl__dequant_span in 16 lanes, value for value the same (a multiply, then Q4_1's add), the
// scales of 16 blocks gathered and converted together. VCVTPH2PS converts every finite half
// exactly and keeps inf and NaN, so no scale needs the scalar path here (the flag ctl__q_scales16
// returns goes unused). n is a multiple of 32.
__attribute__((target("avx512f"), always_inline)) static inline void ctl__dequant16(ctl_dtype type, const unsigned char *row, int64_t k0, int64_t n, float *out) {
    const unsigned char *b = row + ctl_dtype_bytes(type, k0);
    const int bs = (int)ctl_dtype_bytes(type, 32);
    for (int64_t j = 0; j < n; j += 16 * 32, b += 16 * bs) {
        int nb = (int)CTL__MIN((int64_t)16, (n - j) / 32);
        float d[16], m[16];
        ctl__q_scales16(b, bs, nb, type == CTL_Q4_1, d, m);
        for (int k = 0; k < nb; k++) {
            float *o = out + j + 32 * k;
            __m512 q0, q1, dk = _mm512_set1_ps(d[k]);
            ctl__q_values_avx512(type, b + k * bs, &q0, &q1);
            q0 = _mm512_mul_ps(q0, dk), q1 = _mm512_mul_ps(q1, dk);
            if (type == CTL_Q4_1) q0 = _mm512_add_ps(q0, _mm512_set1_ps(m[k])), q1 = _mm512_add_ps(q1, _mm512_set1_ps(m[k]));
            _mm512_storeu_ps(o, q0), _mm512_storeu_ps(o + 16, q1);
        }
    }
}

// 16 bf16 values widened to floats: zero-extended to 32 bits, shifted to the top half.
__attribute__((target("avx512f"), always_inline)) static inline __m512 ctl__bf16x16(const uint16_t *h) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)h)), 16));
}

// ctl__dequant_span with 16 lanes: bf16 widened 16 at a time, the block types through ctl__dequant16.
__attribute__((target("avx512f"))) static void ctl__dequant_span_avx512(ctl_dtype type, const unsigned char *row, int64_t k0, int64_t n, float *out) {
    if (type == CTL_BF16) {
        const uint16_t *h = (const uint16_t *)row + k0;
        int64_t j = 0;
        for (; j + 16 <= n; j += 16) _mm512_storeu_ps(out + j, ctl__bf16x16(h + j));
        for (; j < n; j++) out[j] = ctl__bf16(h[j]);
    } else if (type == CTL_Q8_0) ctl__dequant16(CTL_Q8_0, row, k0, n, out);   // one loop per type
    else if (type == CTL_Q4_0) ctl__dequant16(CTL_Q4_0, row, k0, n, out);
    else ctl__dequant16(CTL_Q4_1, row, k0, n, out);
}
#endif

// A task packs 8 strips (128 columns) of the current block of B into the shared pack_b, at its
// own offset; tasks write disjoint strips, so their order does not matter. The packer is the
// first that fits: bf16 pairs, the AVX2 transpose for fp32 B stored by columns, the plain loop,
// or a dequantising one.
static void ctl__pack_b_task(void *arg, int64_t task, int thread) {   // 8 strips per task
    const ctl__gemm_args *g = (const ctl__gemm_args *)arg;
    int64_t j0 = task * 8 * CTL__NR, cols = CTL__MIN((int64_t)8 * CTL__NR, g->nc - j0);
    (void)thread;
#ifdef CTL__AVX2
    if (g->bf16) {
        ctl__pack_b_bf16((uint32_t *)g->ctx->pack_b + j0 * ((g->kc + 1) / 2), &g->b, g->n0 + j0, cols, g->k0, g->kc);
        return;
    }
    // fp32 B whose columns are contiguous (rs == 1: x W^T's W) packs by 8 x 8 register transposes.
    if (g->b.type == CTL_F32 && g->b.rs == 1 && g->ctx->simd >= CTL_SIMD_AVX2) {
        ctl__pack16_avx2(g->ctx->pack_b + j0 * g->kc, g->b.f, g->b.cs, g->n0 + j0, cols, g->k0, g->kc);
        return;
    }
#endif
    if (g->b.type == CTL_F32) ctl__pack(g->ctx->pack_b + j0 * g->kc, g->b.f, g->b.cs, g->b.rs, g->n0 + j0, cols, g->k0, g->kc, CTL__NR);
    else {
        ctl__dequant_fn dequant = ctl__dequant_portable;
#ifdef CTL__AVX2
        if (g->ctx->simd == CTL_SIMD_AVX512) dequant = ctl__dequant_span_avx512;
#endif
        ctl__pack_q(g->ctx->pack_b + j0 * g->kc, &g->b, g->n0 + j0, cols, g->k0, g->kc, CTL__NR, dequant);
    }
}

// Splits `strips` strips into `parts` contiguous ranges; range i is [*lo, *hi) in strips.
static void ctl__split(int64_t strips, int64_t parts, int64_t i, int64_t *lo, int64_t *hi) {
    *lo = strips * i / parts;
    *hi = strips * (i + 1) / parts;
}

// A task of the packed product: a range of whole MR-row strips of A times a range of whole
// NR-column strips of the current block of B. It packs its rows MC at a time into its own pack_a,
// then runs the micro-kernel over every tile. Ranges in whole strips keep each tile in one task.
static void ctl__gemm_task(void *arg, int64_t task, int thread) {
    const ctl__gemm_args *g = (const ctl__gemm_args *)arg;
    int64_t ms0, ms1, ns0, ns1, kc = g->kc;
    // Task = (row part, column part) of an m_tasks x n_tasks grid, in strips.
    ctl__split((g->M + CTL__MR - 1) / CTL__MR, g->m_tasks, task / g->n_tasks, &ms0, &ms1);
    ctl__split((g->nc + CTL__NR - 1) / CTL__NR, g->n_tasks, task % g->n_tasks, &ns0, &ns1);
    float *pa = g->ctx->pack_a[thread];
    // The first k block writes C; later ones add to it, k blocks in order, so the sum is fixed.
    bool first = g->k0 == 0 && !g->accumulate;
    // AVX-512 tiles (and bf16 ones) take two strips of A and two of B at a time.
    bool z = (g->ctx->simd == CTL_SIMD_AVX512 && !g->ctx->gemm_ymm) || g->bf16;
    // jend: the end of the task's columns in this block; wide x tall: the kernel's whole tile.
    int64_t jend = CTL__MIN(ns1 * CTL__NR, g->nc), wide = z ? 2 * CTL__NR : CTL__NR, tall = z ? 2 * CTL__MR : CTL__MR;
    // MC rows of A at a time: packed, they (MC x KC floats, 96 KiB) stay in L2 while every strip of
    // B passes by.
    for (int64_t m0 = ms0 * CTL__MR; m0 < CTL__MIN(ms1 * CTL__MR, g->M); m0 += CTL__MC) {
        int64_t mc = CTL__MIN((int64_t)CTL__MC, CTL__MIN(ms1 * CTL__MR, g->M) - m0);
#ifdef CTL__AVX2
        if (g->bf16) ctl__pack_a_bf16((uint32_t *)pa, g->a, g->a_rs, g->a_cs, m0, mc, g->k0, kc);
        else
#endif
            ctl__pack(pa, g->a, g->a_rs, g->a_cs, m0, mc, g->k0, kc, CTL__MR);
        // Columns outer, rows inner: one strip of B (kc x NR, L1-sized) is reused by every row tile.
        for (int64_t j = ns0 * CTL__NR; j < jend; j += wide)
            for (int64_t i = 0; i < mc; i += tall) {
                // The widest kernel the context allows: bf16 pairs, then zmm, ymm, NEON, and the portable one.
                const float *sa = pa + (i / CTL__MR) * kc * CTL__MR, *sb = g->ctx->pack_b + j * kc;
                float *ct = g->c + (m0 + i) * g->ldc + g->n0 + j;
                int mr = (int)CTL__MIN(tall, mc - i), nr = (int)CTL__MIN(wide, jend - j);
#ifdef CTL__AVX2
                if (g->bf16) {   // pairs: half the strides
                    int64_t kp = (kc + 1) / 2;
                    ctl__kernel_bf16(kp, (const uint32_t *)pa + (i / CTL__MR) * kp * CTL__MR, (const uint32_t *)g->ctx->pack_b + j * kp, ct,
                                     g->ldc, mr, nr, first);
                    continue;
                }
                if (z) {
                    ctl__kernel_avx512(kc, sa, sb, ct, g->ldc, mr, nr, first);
                    continue;
                }
                if (g->ctx->simd == CTL_SIMD_AVX2 || g->ctx->simd == CTL_SIMD_AVX512) {
                    ctl__kernel_avx2(kc, sa, sb, ct, g->ldc, mr, nr, first);
                    continue;
                }
#endif
#ifdef CTL__NEON
                if (g->ctx->simd == CTL_SIMD_NEON) {
                    ctl__kernel_neon(kc, sa, sb, ct, g->ldc, mr, nr, first);
                    continue;
                }
#endif
                ctl__kernel_scalar(kc, sa, sb, ct, g->ldc, mr, nr, first);
            }
    }
}

// A few rows (up to 8) times a B whose columns are contiguous (a linear layer's weight, as in
// decoding one token): packing B would cost more than the product, so each output is a dot
// product of contiguous vectors (quantised rows block by block, ctl__dot_q). Tasks own blocks
// of 64 columns.
// out[c] = x . w[c*ws ..] for nc (1..4) contiguous rows of w, n values each.
typedef void (*ctl__dot4_fn)(const float *x, const float *w, int64_t ws, int64_t n, int nc, float *out);

// The thin product's arguments, read by all its tasks. The kernel pointers are NULL where the
// context has no vector build of them; ctl__gemv_cols then takes a portable path that fits.
typedef struct ctl__gemv_args {
    ctl_ctx *ctx;
    int64_t M, N, K, a_rs, a_cs, ldc;
    const float *a;
    ctl__bop b;
    float *c;
    bool accumulate, by_rows;   // by_rows: tasks own 16 rows of C, else 64 columns
    bool decode;                // a decoding step's product: every row in one order (see ctl__gemm)
    int64_t row_blocks;         // decode with M > 8: tasks own 64 rows x col_block columns, this many row blocks
    int64_t col_block;          // 8, or 32 where there are enough columns: whole cache lines of C a task
    bool axpy;                  // C rows as sums of B's (contiguous) rows, not dot products
    ctl__dot4_fn dot4;          // a vector kernel for four columns at once, or NULL: ctl__dot
    float (*dot_q)(ctl_dtype type, const unsigned char *row, const float *x, int64_t n);   // or NULL: ctl__dot_q
    ctl__dequant_fn dequant;    // ctl__dequant_span, or a vector build of it (the same values)
    // 4 rows of A times 4 columns of fp32 into C (ctl__dot4x4_avx512), for decoding many rows, or NULL
    void (*dot4x4)(const float *x, int64_t xs, const float *w, int64_t ws, int64_t n, float *c, int64_t ldc, bool accumulate);
    // 4 to 8 rows of A times two columns, each weight read once (ctl__dots8_avx512), or NULL
    bool (*dots8)(ctl_dtype type, const float *const *x, const unsigned char *r0, const unsigned char *r1, int64_t K, float *out);
    // 1 row of A times 4 columns stored quantised or bf16, dequantised in registers (ctl__dot1x4_avx512), or NULL
    bool (*dot1x4)(ctl_dtype type, const float *x, const unsigned char *w, size_t row_bytes, int64_t K, int nc, float *out);
} ctl__gemv_args;

#ifdef CTL__AVX2
// The sum of a zmm's 16 lanes by one fixed tree: lanes i + 8, then i + 4, i + 2, i + 1 (the
// order GCC's _mm512_reduce_add_ps takes, written out so that every compiler keeps it). Every
// decoding kernel ends its dot products with it, so that a row's sums do not depend on which
// kernel its batch size picks.
__attribute__((target("avx512f"), always_inline)) static inline float ctl__hsum16(__m512 a) {
    __m256 s8 = _mm256_add_ps(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a), 1)), _mm512_castps512_ps256(a));
    __m128 s4 = _mm_add_ps(_mm256_extractf128_ps(s8, 1), _mm256_castps256_ps128(s8));
    __m128 s2 = _mm_add_ps(s4, _mm_shuffle_ps(s4, s4, _MM_SHUFFLE(1, 0, 3, 2)));
    return _mm_cvtss_f32(s2) + _mm_cvtss_f32(_mm_shuffle_ps(s2, s2, 1));
}

// ctl__hsum16 of 16 vectors at once, the same tree for each, by shuffles that pair them up:
// lane 4a + b of the result holds the sum of v[a + 4b] (v's 4 x 4 arrangement, transposed).
// About two instructions per sum instead of eight.
__attribute__((target("avx512f"), always_inline)) static inline __m512 ctl__hsum16x16(const __m512 *v) {
    __m512 w[8], x[4], y[2];
    for (int i = 0; i < 8; i++)   // lanes i + 8: each of w holds two vectors' 8 sums
        w[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)),
                             _mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)));
    for (int i = 0; i < 4; i++)   // lanes i + 4: quad k of x[i] holds v[4i + k]'s 4 sums
        x[i] = _mm512_add_ps(_mm512_shuffle_f32x4(w[2 * i], w[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1)),
                             _mm512_shuffle_f32x4(w[2 * i], w[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0)));
    for (int i = 0; i < 2; i++)   // lanes i + 2, within each quad
        y[i] = _mm512_add_ps(_mm512_shuffle_ps(x[2 * i], x[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm512_shuffle_ps(x[2 * i], x[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
    return _mm512_add_ps(_mm512_shuffle_ps(y[0], y[1], _MM_SHUFFLE(2, 0, 2, 0)), _mm512_shuffle_ps(y[0], y[1], _MM_SHUFFLE(3, 1, 3, 1)));
}

// out[c] = x . w[c*ws ..] for the nc (1..4) rows of w, n values each: one accumulator per row,
// two FMAs into it per 32 values, the rest 16 at a time through a mask, then one horizontal sum.
// ctl__dots8x2 keeps the same order for 4 to 8 rows, so a row's result does not depend on how
// many rows are decoded with it. Rows past nc repeat row 0, so every load stays inside w.
__attribute__((target("avx512f"))) static void ctl__dot4_avx512(const float *x, const float *w, int64_t ws, int64_t n, int nc, float *out) {
    const float *w0 = w, *w1 = nc > 1 ? w + ws : w, *w2 = nc > 2 ? w + 2 * ws : w, *w3 = nc > 3 ? w + 3 * ws : w;
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    int64_t k = 0;
    for (; k + 32 <= n; k += 32) {
        __m512 x0 = _mm512_loadu_ps(x + k), x1 = _mm512_loadu_ps(x + k + 16);
        a0 = _mm512_fmadd_ps(x1, _mm512_loadu_ps(w0 + k + 16), _mm512_fmadd_ps(x0, _mm512_loadu_ps(w0 + k), a0));
        a1 = _mm512_fmadd_ps(x1, _mm512_loadu_ps(w1 + k + 16), _mm512_fmadd_ps(x0, _mm512_loadu_ps(w1 + k), a1));
        a2 = _mm512_fmadd_ps(x1, _mm512_loadu_ps(w2 + k + 16), _mm512_fmadd_ps(x0, _mm512_loadu_ps(w2 + k), a2));
        a3 = _mm512_fmadd_ps(x1, _mm512_loadu_ps(w3 + k + 16), _mm512_fmadd_ps(x0, _mm512_loadu_ps(w3 + k), a3));
    }
    for (; k < n; k += 16) {   // the rest, 16 at a time through a mask
        __mmask16 m = n - k >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - k)) - 1);
        __m512 x0 = _mm512_maskz_loadu_ps(m, x + k);
        a0 = _mm512_fmadd_ps(x0, _mm512_maskz_loadu_ps(m, w0 + k), a0), a1 = _mm512_fmadd_ps(x0, _mm512_maskz_loadu_ps(m, w1 + k), a1);
        a2 = _mm512_fmadd_ps(x0, _mm512_maskz_loadu_ps(m, w2 + k), a2), a3 = _mm512_fmadd_ps(x0, _mm512_maskz_loadu_ps(m, w3 + k), a3);
    }
    float r[4] = {ctl__hsum16(a0), ctl__hsum16(a1), ctl__hsum16(a2), ctl__hsum16(a3)};
    for (int c = 0; c < nc; c++) out[c] = r[c];
}

// c[i * ldc + j] (+)= x_i . w_j for 4 rows of x (xs apart) and 4 rows of w (ws apart), n values each:
// ctl__dot4_avx512's order for every pair (16 lanes, k then k + 16, a masked tail, then
// ctl__hsum16's tree), with 16 accumulators, so each x and w vector loaded serves four FMAs.
// Decoding many streams runs on it over weights dequantised once per step.
__attribute__((target("avx512f"))) static void ctl__dot4x4_avx512(const float *x, int64_t xs, const float *w, int64_t ws, int64_t n, float *c,
                                                                 int64_t ldc, bool accumulate) {
    // Named accumulators (an array indexed in a loop stays in memory at -O2).
    __m512 c00 = _mm512_setzero_ps(), c01 = c00, c02 = c00, c03 = c00, c10 = c00, c11 = c00, c12 = c00, c13 = c00;
    __m512 c20 = c00, c21 = c00, c22 = c00, c23 = c00, c30 = c00, c31 = c00, c32 = c00, c33 = c00;
    const float *x0 = x, *x1 = x + xs, *x2 = x + 2 * xs, *x3 = x + 3 * xs, *w0 = w, *w1 = w + ws, *w2 = w + 2 * ws, *w3 = w + 3 * ws;
    // The mask loads zero past n, so the tail adds zeros, as dot4's masked loop does.
    __mmask16 m = 0xFFFF;
    for (int64_t k = 0; k < n; k += 16) {
        if (n - k < 16) m = (__mmask16)((1u << (n - k)) - 1);   // the tail, zero past n (dot4's mask)
        __m512 a0 = _mm512_maskz_loadu_ps(m, x0 + k), a1 = _mm512_maskz_loadu_ps(m, x1 + k);
        __m512 a2 = _mm512_maskz_loadu_ps(m, x2 + k), a3 = _mm512_maskz_loadu_ps(m, x3 + k), b;
        b = _mm512_maskz_loadu_ps(m, w0 + k);
        c00 = _mm512_fmadd_ps(a0, b, c00), c10 = _mm512_fmadd_ps(a1, b, c10), c20 = _mm512_fmadd_ps(a2, b, c20), c30 = _mm512_fmadd_ps(a3, b, c30);
        b = _mm512_maskz_loadu_ps(m, w1 + k);
        c01 = _mm512_fmadd_ps(a0, b, c01), c11 = _mm512_fmadd_ps(a1, b, c11), c21 = _mm512_fmadd_ps(a2, b, c21), c31 = _mm512_fmadd_ps(a3, b, c31);
        b = _mm512_maskz_loadu_ps(m, w2 + k);
        c02 = _mm512_fmadd_ps(a0, b, c02), c12 = _mm512_fmadd_ps(a1, b, c12), c22 = _mm512_fmadd_ps(a2, b, c22), c32 = _mm512_fmadd_ps(a3, b, c32);
        b = _mm512_maskz_loadu_ps(m, w3 + k);
        c03 = _mm512_fmadd_ps(a0, b, c03), c13 = _mm512_fmadd_ps(a1, b, c13), c23 = _mm512_fmadd_ps(a2, b, c23), c33 = _mm512_fmadd_ps(a3, b, c33);
    }
    __m512 acc[16] = {c00, c10, c20, c30, c01, c11, c21, c31, c02, c12, c22, c32, c03, c13, c23, c33};   // v[i + 4j]: x_i . w_j
    // Lane 4i + j of the sums is x_i . w_j: quarter i is row i's four values of C, stored as a vector
    // (scalar loads of a vector just stored would wait for it to leave the store buffer).
    __m512 d = ctl__hsum16x16(acc);
    __m128 q[4] = {_mm512_extractf32x4_ps(d, 0), _mm512_extractf32x4_ps(d, 1), _mm512_extractf32x4_ps(d, 2), _mm512_extractf32x4_ps(d, 3)};
    for (int i = 0; i < 4; i++) _mm_storeu_ps(c + i * ldc, accumulate ? _mm_add_ps(_mm_loadu_ps(c + i * ldc), q[i]) : q[i]);
}

// The sum of a ymm's 8 lanes: the two halves, then lanes i + 2, then the last pair.
__attribute__((target("avx2,fma"))) static float ctl__hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)));
}

// The AVX2 counterpart of ctl__dot4_avx512 (8 lanes, so not the same sums): two accumulators per
// row (values k and k + 8 of each 16), then the rest 8 at a time, one horizontal sum, and the
// last n % 8 singly. ctl__dot1x4_ymm keeps this order, so on an AVX2 context a decoded row's sums
// do not depend on which of the two kernels its batch takes.
__attribute__((target("avx2,fma"))) static void ctl__dot4_avx2(const float *x, const float *w, int64_t ws, int64_t n, int nc, float *out) {
    const float *w0 = w, *w1 = nc > 1 ? w + ws : w, *w2 = nc > 2 ? w + 2 * ws : w, *w3 = nc > 3 ? w + 3 * ws : w;
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
    int64_t k = 0;
    for (; k + 16 <= n; k += 16) {
        __m256 x0 = _mm256_loadu_ps(x + k), x1 = _mm256_loadu_ps(x + k + 8);
        a0 = _mm256_fmadd_ps(x0, _mm256_loadu_ps(w0 + k), a0), b0 = _mm256_fmadd_ps(x1, _mm256_loadu_ps(w0 + k + 8), b0);
        a1 = _mm256_fmadd_ps(x0, _mm256_loadu_ps(w1 + k), a1), b1 = _mm256_fmadd_ps(x1, _mm256_loadu_ps(w1 + k + 8), b1);
        a2 = _mm256_fmadd_ps(x0, _mm256_loadu_ps(w2 + k), a2), b2 = _mm256_fmadd_ps(x1, _mm256_loadu_ps(w2 + k + 8), b2);
        a3 = _mm256_fmadd_ps(x0, _mm256_loadu_ps(w3 + k), a3), b3 = _mm256_fmadd_ps(x1, _mm256_loadu_ps(w3 + k + 8), b3);
    }
    for (; k + 8 <= n; k += 8) {
        __m256 x0 = _mm256_loadu_ps(x + k);
        a0 = _mm256_fmadd_ps(x0, _mm256_loadu_ps(w0 + k), a0), a1 = _mm256_fmadd_ps(x0, _mm256_loadu_ps(w1 + k), a1);
        a2 = _mm256_fmadd_ps(x0, _mm256_loadu_ps(w2 + k), a2), a3 = _mm256_fmadd_ps(x0, _mm256_loadu_ps(w3 + k), a3);
    }
    float r[4] = {ctl__hsum8(_mm256_add_ps(a0, b0)), ctl__hsum8(_mm256_add_ps(a1, b1)), ctl__hsum8(_mm256_add_ps(a2, b2)),
                  ctl__hsum8(_mm256_add_ps(a3, b3))};
    for (; k < n; k++) r[0] += x[k] * w0[k], r[1] += x[k] * w1[k], r[2] += x[k] * w2[k], r[3] += x[k] * w3[k];
    for (int c = 0; c < nc; c++) out[c] = r[c];
}

// A block's 32 quantised values as 4 x 8 int8 in the low halves of q[0..3] (Q4_0's already less 8).
__attribute__((target("avx2,fma"), always_inline)) static inline void ctl__q_bytes_avx2(ctl_dtype type, const unsigned char *row, __m128i *q) {
    if (type == CTL_Q8_0) {
        __m128i v0 = _mm_loadu_si128((const __m128i *)(row + 2)), v1 = _mm_loadu_si128((const __m128i *)(row + 18));
        q[0] = v0, q[1] = _mm_srli_si128(v0, 8), q[2] = v1, q[3] = _mm_srli_si128(v1, 8);
    } else {   // low nibbles are elements 0..15, high nibbles 16..31
        const __m128i low = _mm_set1_epi8(0x0F);
        __m128i v = _mm_loadu_si128((const __m128i *)(row + (type == CTL_Q4_1 ? 4 : 2)));
        __m128i lo = _mm_and_si128(v, low), hi = _mm_and_si128(_mm_srli_epi16(v, 4), low);
        if (type == CTL_Q4_0) lo = _mm_sub_epi8(lo, _mm_set1_epi8(8)), hi = _mm_sub_epi8(hi, _mm_set1_epi8(8));
        q[0] = lo, q[1] = _mm_srli_si128(lo, 8), q[2] = hi, q[3] = _mm_srli_si128(hi, 8);
    }
}

// One block of 32 quantised values times x (32 floats): the partial products q . x in 8 lanes
// (Q4_0's values already less 8). The block's scales stay outside.
__attribute__((target("avx2,fma"), always_inline)) static inline __m256 ctl__q_block_avx2(ctl_dtype type, const unsigned char *row, const float *x) {
    __m128i q[4];
    ctl__q_bytes_avx2(type, row, q);
    __m256 p = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q[0])), _mm256_loadu_ps(x));
    p = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q[1])), _mm256_loadu_ps(x + 8), p);
    p = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q[2])), _mm256_loadu_ps(x + 16), p);
    return _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q[3])), _mm256_loadu_ps(x + 24), p);
}

// A half's value when it is finite (no branches); *special collects inf/NaN exponents.
CTL__INLINE float ctl__f16_finite(const unsigned char *p, uint32_t *special) {
    uint32_t h = (uint32_t)(p[0] | p[1] << 8), bits = (h & 0x7fffu) << 13 | (h & 0x8000u) << 16;
    float f;
    memcpy(&f, &bits, 4);
    *special |= (h & 0x7c00u) == 0x7c00u;
    return f * 5.192296858534828e33f;   // 2^112: exact, for normal and subnormal halves alike
}

// x . (a bf16 row of n values), 32 values at a time into four accumulators.
__attribute__((target("avx2,fma"))) static float ctl__dot_bf16_avx2(const uint16_t *h, const float *x, int64_t n) {
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    int64_t k = 0;
    for (; k + 32 <= n; k += 32)
        for (int i = 0; i < 4; i++) {
            __m256i w = _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(h + k + 8 * i))), 16);
            acc[i] = _mm256_fmadd_ps(_mm256_castsi256_ps(w), _mm256_loadu_ps(x + k + 8 * i), acc[i]);
        }
    for (; k + 8 <= n; k += 8) {
        __m256i w = _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(h + k))), 16);
        acc[0] = _mm256_fmadd_ps(_mm256_castsi256_ps(w), _mm256_loadu_ps(x + k), acc[0]);
    }
    float r = ctl__hsum8(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])));
    for (; k < n; k++) r += ctl__bf16(h[k]) * x[k];
    return r;
}

// ctl__dot_q with each block dequantised in registers: the sum over blocks of d * (q . x),
// plus (Q4_1) m * sum(x), two blocks at a time into separate accumulators. A row with an
// infinite or NaN scale goes to the reference loop, which carries them through.
__attribute__((target("avx2,fma"))) static float ctl__dot_q_avx2(ctl_dtype type, const unsigned char *row, const float *x, int64_t n) {
    if (type == CTL_BF16) return ctl__dot_bf16_avx2((const uint16_t *)row, x, n);
    // Two accumulators for alternate blocks, so consecutive FMAs do not wait on each other; accm
    // collects Q4_1's m * sum(x) terms.
    __m256 acc0 = _mm256_setzero_ps(), acc1 = acc0, accm = acc0;
    const unsigned char *start = row, *r0 = row;
    // n is a multiple of 32. The scale multiplies a block's partial sum, not each value, so the sums
    // round differently from ctl__dot_q's: a decoding step, whose rows must match a batch's, does not
    // use it (ctl__gemv_cols dequantises there).
    int64_t bytes = type == CTL_Q8_0 ? 34 : type == CTL_Q4_0 ? 18 : 20, j = 0;
    uint32_t special = 0;
    for (; j + 64 <= n; j += 64, row += 2 * bytes) {
        acc0 = _mm256_fmadd_ps(_mm256_set1_ps(ctl__f16_finite(row, &special)), ctl__q_block_avx2(type, row, x + j), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_set1_ps(ctl__f16_finite(row + bytes, &special)), ctl__q_block_avx2(type, row + bytes, x + j + 32), acc1);
    }
    if (j < n) acc0 = _mm256_fmadd_ps(_mm256_set1_ps(ctl__f16_finite(row, &special)), ctl__q_block_avx2(type, row, x + j), acc0);
    if (type == CTL_Q4_1)
        for (int64_t k = 0; k < n; k += 32, r0 += bytes) {
            const float *xk = x + k;
            __m256 sx = _mm256_add_ps(_mm256_add_ps(_mm256_loadu_ps(xk), _mm256_loadu_ps(xk + 8)),
                                      _mm256_add_ps(_mm256_loadu_ps(xk + 16), _mm256_loadu_ps(xk + 24)));
            accm = _mm256_fmadd_ps(_mm256_set1_ps(ctl__f16_finite(r0 + 2, &special)), sx, accm);
        }
    // An inf or NaN scale: the branch-free reads above gave a finite wrong value, so start over.
    if (special) return ctl__dot_q(type, start, x, n);
    return ctl__hsum8(_mm256_add_ps(_mm256_add_ps(acc0, acc1), accm));
}

// The same with 16 lanes: a block is two converts and two FMAs (ctl__q_values_avx512), and the
// scales of 16 blocks are converted together (ctl__q_scales16).
__attribute__((target("avx512f"), always_inline)) static inline __m512 ctl__q_block_avx512(ctl_dtype type, const unsigned char *row, __m512 x0, __m512 x1) {
    __m512 q0, q1;
    ctl__q_values_avx512(type, row, &q0, &q1);
    return _mm512_fmadd_ps(q0, x0, _mm512_mul_ps(q1, x1));
}

// ctl__dot_q_avx2's sum in 16 lanes, 16 blocks' scales at a time. The final reduction is the
// compiler's tree: no other path has to match these bits.
__attribute__((target("avx512f"), always_inline)) static inline float ctl__dot_q16(ctl_dtype type, const unsigned char *row, const float *x, int64_t n, bool *special) {
    const int64_t bytes = type == CTL_Q8_0 ? 34 : type == CTL_Q4_0 ? 18 : 20;
    __m512 acc0 = _mm512_setzero_ps(), acc1 = acc0, accm = acc0;
    for (int64_t j = 0; j < n; j += 16 * 32, row += 16 * bytes, x += 16 * 32) {
        int nb = (int)CTL__MIN((int64_t)16, (n - j) / 32);
        float d[16], m[16];
        *special |= ctl__q_scales16(row, (int)bytes, nb, type == CTL_Q4_1, d, m);
        int b = 0;
        for (; b + 2 <= nb; b += 2) {
            __m512 x0 = _mm512_loadu_ps(x + 32 * b), x1 = _mm512_loadu_ps(x + 32 * b + 16);
            __m512 x2 = _mm512_loadu_ps(x + 32 * b + 32), x3 = _mm512_loadu_ps(x + 32 * b + 48);
            acc0 = _mm512_fmadd_ps(_mm512_set1_ps(d[b]), ctl__q_block_avx512(type, row + b * bytes, x0, x1), acc0);
            acc1 = _mm512_fmadd_ps(_mm512_set1_ps(d[b + 1]), ctl__q_block_avx512(type, row + (b + 1) * bytes, x2, x3), acc1);
            if (type == CTL_Q4_1) {
                accm = _mm512_fmadd_ps(_mm512_set1_ps(m[b]), _mm512_add_ps(x0, x1), accm);
                accm = _mm512_fmadd_ps(_mm512_set1_ps(m[b + 1]), _mm512_add_ps(x2, x3), accm);
            }
        }
        if (b < nb) {
            __m512 x0 = _mm512_loadu_ps(x + 32 * b), x1 = _mm512_loadu_ps(x + 32 * b + 16);
            acc0 = _mm512_fmadd_ps(_mm512_set1_ps(d[b]), ctl__q_block_avx512(type, row + b * bytes, x0, x1), acc0);
            if (type == CTL_Q4_1) accm = _mm512_fmadd_ps(_mm512_set1_ps(m[b]), _mm512_add_ps(x0, x1), accm);
        }
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc0, acc1), accm));
}

// One loop per type (the type is a constant inside each); a row with an infinite or NaN scale
// goes to the reference loop, which carries them through.
__attribute__((target("avx512f"))) static float ctl__dot_q_avx512(ctl_dtype type, const unsigned char *row, const float *x, int64_t n) {
    if (type == CTL_BF16) {   // 64 values at a time into four accumulators, then 16, then singly
        const uint16_t *h = (const uint16_t *)row;
        __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
        int64_t k = 0;
        for (; k + 64 <= n; k += 64)
            for (int i = 0; i < 4; i++) acc[i] = _mm512_fmadd_ps(ctl__bf16x16(h + k + 16 * i), _mm512_loadu_ps(x + k + 16 * i), acc[i]);
        for (; k + 16 <= n; k += 16) acc[0] = _mm512_fmadd_ps(ctl__bf16x16(h + k), _mm512_loadu_ps(x + k), acc[0]);
        float r = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3])));
        for (; k < n; k++) r += ctl__bf16(h[k]) * x[k];
        return r;
    }
    bool special = false;
    float r = type == CTL_Q8_0 ? ctl__dot_q16(CTL_Q8_0, row, x, n, &special)
              : type == CTL_Q4_0 ? ctl__dot_q16(CTL_Q4_0, row, x, n, &special)
                                 : ctl__dot_q16(CTL_Q4_1, row, x, n, &special);
    return special ? ctl__dot_q(type, row, x, n) : r;
}

// 32 weights of a row from value k (for the block types a multiple of 32) as two zmm: the values
// of ctl__dequant_span. *special collects an infinite or NaN block scale.
__attribute__((target("avx512f"), always_inline)) static inline void ctl__w32_avx512(ctl_dtype type, const unsigned char *row, int64_t k, __m512 *lo, __m512 *hi,
                                                                                  uint32_t *special) {
    // fp32 rows reach here from dots8 (the weights of a full-precision model).
    if (type == CTL_F32) {
        *lo = _mm512_loadu_ps((const float *)row + k), *hi = _mm512_loadu_ps((const float *)row + k + 16);
    } else if (type == CTL_BF16) {
        *lo = ctl__bf16x16((const uint16_t *)row + k), *hi = ctl__bf16x16((const uint16_t *)row + k + 16);
    } else {
        const unsigned char *b = row + ctl_dtype_bytes(type, k);
        __m512 d = _mm512_set1_ps(ctl__f16_finite(b, special));
        ctl__q_values_avx512(type, b, lo, hi);
        *lo = _mm512_mul_ps(*lo, d), *hi = _mm512_mul_ps(*hi, d);
        if (type == CTL_Q4_1) {
            __m512 m = _mm512_set1_ps(ctl__f16_finite(b + 2, special));
            *lo = _mm512_add_ps(*lo, m), *hi = _mm512_add_ps(*hi, m);
        }
    }
}

// out[2m + j] = x[m] . (row j of W), for 8 rows x[m] of A (K values each) and 2 rows of W (r0,
// r1) stored as `type`: each 32 weights are loaded (or dequantised) once for all 8 rows, into
// 16 accumulators, so decoding 8 streams reads and widens each weight once instead of 8 times.
// Each row's sum runs in ctl__dot4_avx512's order over the same values (the last K % 32, fp32
// and bf16 only, 16 at a time through a mask). Returns false on an infinite or NaN block
// scale: the caller then uses the reference loop, which carries them through.
#define CTL__R8(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7)
__attribute__((target("avx512f"), always_inline)) static inline bool ctl__dots8x2(ctl_dtype type, const float *const *x, const unsigned char *r0,
                                                                                const unsigned char *r1, int64_t K, float *out) {
// Per row m of A: its pointer and two accumulators (against W's rows r0 and r1), as named
// variables so that all 16 stay in registers.
#define CTL__ACC(m) const float *x##m = x[m]; __m512 s##m##a = _mm512_setzero_ps(), s##m##b = s##m##a;
    CTL__R8(CTL__ACC)
    uint32_t special = 0;
    int64_t k = 0;
    const size_t row = ctl_dtype_bytes(type, K), blk = ctl_dtype_bytes(type, 32);
    for (; k + 32 <= K; k += 32) {
        __m512 w0l, w0h, w1l, w1h;
        // the next two rows (the caller's next pair, when W's rows are adjacent), as this pair
        // is read: the short rows end before the hardware prefetcher gets going
        const unsigned char *p0 = r0 + 2 * row + ctl_dtype_bytes(type, k), *p1 = r1 + 2 * row + ctl_dtype_bytes(type, k);
        _mm_prefetch((const char *)p0, _MM_HINT_T0), _mm_prefetch((const char *)p1, _MM_HINT_T0);
        if (blk > 64) _mm_prefetch((const char *)p0 + 64, _MM_HINT_T0), _mm_prefetch((const char *)p1 + 64, _MM_HINT_T0);
        ctl__w32_avx512(type, r0, k, &w0l, &w0h, &special);
        ctl__w32_avx512(type, r1, k, &w1l, &w1h, &special);
// Row m's step: its 32 values against both W rows, k then k + 16 in one FMA chain (dot4's order).
#define CTL__STEP(m) {                                                                                    \
        __m512 xl = _mm512_loadu_ps(x##m + k), xh = _mm512_loadu_ps(x##m + k + 16);                       \
        s##m##a = _mm512_fmadd_ps(xh, w0h, _mm512_fmadd_ps(xl, w0l, s##m##a));                            \
        s##m##b = _mm512_fmadd_ps(xh, w1h, _mm512_fmadd_ps(xl, w1l, s##m##b)); }
        CTL__R8(CTL__STEP)
    }
    if (k < K) {   // the tail as floats, zero past K, then as ctl__dot4_avx512 takes it
        // Only fp32 and bf16 rows have a tail: the block types' K is a multiple of 32.
        float wt[2][32] = {{0.0f}};
        for (int64_t i = k; i < K; i++)
            for (int j = 0; j < 2; j++) {
                const unsigned char *r = j ? r1 : r0;
                wt[j][i - k] = type == CTL_BF16 ? ctl__bf16(((const uint16_t *)r)[i]) : ((const float *)r)[i];
            }
        for (int c = 0; k + c < K; c += 16) {
            __mmask16 mk = K - k - c >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (K - k - c)) - 1);
            __m512 wa = _mm512_loadu_ps(wt[0] + c), wb = _mm512_loadu_ps(wt[1] + c);
#define CTL__TAIL(m) {                                                                                    \
            __m512 xv = _mm512_maskz_loadu_ps(mk, x##m + k + c);                                          \
            s##m##a = _mm512_fmadd_ps(xv, wa, s##m##a), s##m##b = _mm512_fmadd_ps(xv, wb, s##m##b); }
            CTL__R8(CTL__TAIL)
        }
    }
// out[2m + j]: row m of A against W's row j, each reduced by ctl__hsum16's tree.
#define CTL__OUT(m) out[2 * m] = ctl__hsum16(s##m##a), out[2 * m + 1] = ctl__hsum16(s##m##b);
    CTL__R8(CTL__OUT)
    return !special;
}
#undef CTL__OUT
#undef CTL__TAIL
#undef CTL__STEP
#undef CTL__ACC
#undef CTL__R8

// One instance per type, so the type is a constant inside each.
__attribute__((target("avx512f"))) static bool ctl__dots8_avx512(ctl_dtype type, const float *const *x, const unsigned char *r0, const unsigned char *r1,
                                                                int64_t K, float *out) {
    switch (type) {
    case CTL_F32: return ctl__dots8x2(CTL_F32, x, r0, r1, K, out);
    case CTL_BF16: return ctl__dots8x2(CTL_BF16, x, r0, r1, K, out);
    case CTL_Q8_0: return ctl__dots8x2(CTL_Q8_0, x, r0, r1, K, out);
    case CTL_Q4_0: return ctl__dots8x2(CTL_Q4_0, x, r0, r1, K, out);
    default: return ctl__dots8x2(CTL_Q4_1, x, r0, r1, K, out);
    }
}

// The one-row kernels fetch the next four rows (the caller's next call) while they sum these:
// with four short rows read at once, 32 values at a time, the hardware prefetcher falls behind.
// (Up to 16 KB; a prefetch past the matrix's end is harmless.)
CTL__INLINE void ctl__prefetch_rows4(const unsigned char *p, size_t row_bytes) {
    for (size_t at = 0; at < 4 * row_bytes && at < 16384; at += 64) _mm_prefetch((const char *)p + at, _MM_HINT_T0);
}

// out[j] = x . (row j of W) for one row x of A and nc (1..4) rows of W stored as `type` (not
// fp32), row_bytes apart: each 32 weights dequantised in registers (ctl__w32_avx512) and summed
// in ctl__dot4_avx512's order, so one stream decoded alone reads its weights once, in their
// stored form, and still gets the sums a batch would. Rows past nc repeat row 0. Returns false
// on an infinite or NaN block scale (the caller then takes the reference loop).
__attribute__((target("avx512f"), always_inline)) static inline bool ctl__dot1x4_zmm(ctl_dtype type, const float *x, const unsigned char *w, size_t row_bytes,
                                                                                   int64_t K, int nc, float *out) {
    const unsigned char *r[4] = {w, nc > 1 ? w + row_bytes : w, nc > 2 ? w + 2 * row_bytes : w, nc > 3 ? w + 3 * row_bytes : w};
    __m512 s0 = _mm512_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
    uint32_t special = 0;
    int64_t k = 0;
    ctl__prefetch_rows4(w + 4 * row_bytes, row_bytes);
    for (; k + 32 <= K; k += 32) {
        __m512 xl = _mm512_loadu_ps(x + k), xh = _mm512_loadu_ps(x + k + 16), lo, hi;
        ctl__w32_avx512(type, r[0], k, &lo, &hi, &special), s0 = _mm512_fmadd_ps(xh, hi, _mm512_fmadd_ps(xl, lo, s0));
        ctl__w32_avx512(type, r[1], k, &lo, &hi, &special), s1 = _mm512_fmadd_ps(xh, hi, _mm512_fmadd_ps(xl, lo, s1));
        ctl__w32_avx512(type, r[2], k, &lo, &hi, &special), s2 = _mm512_fmadd_ps(xh, hi, _mm512_fmadd_ps(xl, lo, s2));
        ctl__w32_avx512(type, r[3], k, &lo, &hi, &special), s3 = _mm512_fmadd_ps(xh, hi, _mm512_fmadd_ps(xl, lo, s3));
    }
    if (k < K) {   // bf16's last K % 32 as floats, zero past K, then as ctl__dot4_avx512 takes it
        float wt[4][32] = {{0.0f}};
        for (int j = 0; j < 4; j++)
            for (int64_t i = k; i < K; i++) wt[j][i - k] = ctl__bf16(((const uint16_t *)r[j])[i]);
        for (int c = 0; k + c < K; c += 16) {
            __mmask16 mk = K - k - c >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (K - k - c)) - 1);
            __m512 xv = _mm512_maskz_loadu_ps(mk, x + k + c);
            s0 = _mm512_fmadd_ps(xv, _mm512_loadu_ps(wt[0] + c), s0), s1 = _mm512_fmadd_ps(xv, _mm512_loadu_ps(wt[1] + c), s1);
            s2 = _mm512_fmadd_ps(xv, _mm512_loadu_ps(wt[2] + c), s2), s3 = _mm512_fmadd_ps(xv, _mm512_loadu_ps(wt[3] + c), s3);
        }
    }
    float o[4] = {ctl__hsum16(s0), ctl__hsum16(s1), ctl__hsum16(s2), ctl__hsum16(s3)};
    for (int j = 0; j < nc; j++) out[j] = o[j];
    return !special;
}

__attribute__((target("avx512f"))) static bool ctl__dot1x4_avx512(ctl_dtype type, const float *x, const unsigned char *w, size_t row_bytes, int64_t K,
                                                                 int nc, float *out) {
    switch (type) {   // one instance per type
    case CTL_BF16: return ctl__dot1x4_zmm(CTL_BF16, x, w, row_bytes, K, nc, out);
    case CTL_Q8_0: return ctl__dot1x4_zmm(CTL_Q8_0, x, w, row_bytes, K, nc, out);
    case CTL_Q4_0: return ctl__dot1x4_zmm(CTL_Q4_0, x, w, row_bytes, K, nc, out);
    default: return ctl__dot1x4_zmm(CTL_Q4_1, x, w, row_bytes, K, nc, out);
    }
}

// 32 weights of a row from value k as four ymm (8 each), the values of ctl__dequant_span;
// *special collects an infinite or NaN block scale. bf16 at any k, the block types at
// multiples of 32.
__attribute__((target("avx2,fma"), always_inline)) static inline void ctl__w32_avx2(ctl_dtype type, const unsigned char *row, int64_t k, __m256 *v,
                                                                                 uint32_t *special) {
    if (type == CTL_BF16) {
        for (int i = 0; i < 4; i++)
            v[i] = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)((const uint16_t *)row + k + 8 * i))), 16));
        return;
    }
    const unsigned char *b = row + ctl_dtype_bytes(type, k);
    __m128i q[4];
    ctl__q_bytes_avx2(type, b, q);
    __m256 d = _mm256_set1_ps(ctl__f16_finite(b, special)), m = _mm256_set1_ps(type == CTL_Q4_1 ? ctl__f16_finite(b + 2, special) : 0.0f);
    for (int i = 0; i < 4; i++) {
        v[i] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q[i])), d);
        if (type == CTL_Q4_1) v[i] = _mm256_add_ps(v[i], m);
    }
}

// ctl__dot1x4_zmm for AVX2: ctl__dot4_avx2's order over the same values (16 at a time into two
// accumulators per row, then 8, then singly after the horizontal sum), without writing the
// dequantised rows out. Returns false on an infinite or NaN block scale.
__attribute__((target("avx2,fma"), always_inline)) static inline bool ctl__dot1x4_ymm(ctl_dtype type, const float *x, const unsigned char *w, size_t row_bytes,
                                                                                   int64_t K, int nc, float *out) {
    const unsigned char *r[4] = {w, nc > 1 ? w + row_bytes : w, nc > 2 ? w + 2 * row_bytes : w, nc > 3 ? w + 3 * row_bytes : w};
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0, v[4];
    uint32_t special = 0;
    int64_t k = 0;
    ctl__prefetch_rows4(w + 4 * row_bytes, row_bytes);
    for (; k + 32 <= K; k += 32) {   // two of dot4's 16-value steps
        __m256 x0 = _mm256_loadu_ps(x + k), x1 = _mm256_loadu_ps(x + k + 8), x2 = _mm256_loadu_ps(x + k + 16), x3 = _mm256_loadu_ps(x + k + 24);
#define CTL__ROW(j)                                                                                        \
        ctl__w32_avx2(type, r[j], k, v, &special);                                                         \
        a##j = _mm256_fmadd_ps(x0, v[0], a##j), b##j = _mm256_fmadd_ps(x1, v[1], b##j);                    \
        a##j = _mm256_fmadd_ps(x2, v[2], a##j), b##j = _mm256_fmadd_ps(x3, v[3], b##j);
        CTL__ROW(0) CTL__ROW(1) CTL__ROW(2) CTL__ROW(3)
#undef CTL__ROW
    }
    float wt[4][32];   // bf16's last K % 32 as floats
    for (int j = 0; j < 4 && k < K; j++)
        for (int64_t i = k; i < K; i++) wt[j][i - k] = ctl__bf16(((const uint16_t *)r[j])[i]);
    // Then dot4_avx2's own tail over those floats: 16 at a time, 8, and singly after the sum.
    int64_t k0 = k;
    for (; k + 16 <= K; k += 16) {
        __m256 x0 = _mm256_loadu_ps(x + k), x1 = _mm256_loadu_ps(x + k + 8);
        const float *t0 = wt[0] + (k - k0), *t1 = wt[1] + (k - k0), *t2 = wt[2] + (k - k0), *t3 = wt[3] + (k - k0);
        a0 = _mm256_fmadd_ps(x0, _mm256_loadu_ps(t0), a0), b0 = _mm256_fmadd_ps(x1, _mm256_loadu_ps(t0 + 8), b0);
        a1 = _mm256_fmadd_ps(x0, _mm256_loadu_ps(t1), a1), b1 = _mm256_fmadd_ps(x1, _mm256_loadu_ps(t1 + 8), b1);
        a2 = _mm256_fmadd_ps(x0, _mm256_loadu_ps(t2), a2), b2 = _mm256_fmadd_ps(x1, _mm256_loadu_ps(t2 + 8), b2);
        a3 = _mm256_fmadd_ps(x0, _mm256_loadu_ps(t3), a3), b3 = _mm256_fmadd_ps(x1, _mm256_loadu_ps(t3 + 8), b3);
    }
    for (; k + 8 <= K; k += 8) {
        __m256 x0 = _mm256_loadu_ps(x + k);
        a0 = _mm256_fmadd_ps(x0, _mm256_loadu_ps(wt[0] + (k - k0)), a0), a1 = _mm256_fmadd_ps(x0, _mm256_loadu_ps(wt[1] + (k - k0)), a1);
        a2 = _mm256_fmadd_ps(x0, _mm256_loadu_ps(wt[2] + (k - k0)), a2), a3 = _mm256_fmadd_ps(x0, _mm256_loadu_ps(wt[3] + (k - k0)), a3);
    }
    float o[4] = {ctl__hsum8(_mm256_add_ps(a0, b0)), ctl__hsum8(_mm256_add_ps(a1, b1)), ctl__hsum8(_mm256_add_ps(a2, b2)),
                  ctl__hsum8(_mm256_add_ps(a3, b3))};
    for (; k < K; k++)
        for (int j = 0; j < 4; j++) o[j] += x[k] * wt[j][k - k0];
    for (int j = 0; j < nc; j++) out[j] = o[j];
    return !special;
}

__attribute__((target("avx2,fma"))) static bool ctl__dot1x4_avx2(ctl_dtype type, const float *x, const unsigned char *w, size_t row_bytes, int64_t K,
                                                                int nc, float *out) {
    switch (type) {   // one instance per type
    case CTL_BF16: return ctl__dot1x4_ymm(CTL_BF16, x, w, row_bytes, K, nc, out);
    case CTL_Q8_0: return ctl__dot1x4_ymm(CTL_Q8_0, x, w, row_bytes, K, nc, out);
    case CTL_Q4_0: return ctl__dot1x4_ymm(CTL_Q4_0, x, w, row_bytes, K, nc, out);
    default: return ctl__dot1x4_ymm(CTL_Q4_1, x, w, row_bytes, K, nc, out);
    }
}
#endif

// Defined with the attention kernels below; the thin products use them too.
CTL__INLINE float ctl__dot(const float *a, const float *b, int64_t n);
CTL__INLINE void ctl__axpy(float *CTL__RESTRICT y, float a, const float *CTL__RESTRICT x, int64_t n);

// acc[0:w] = sum over k of a[k*as] b[k*bs + 0:w], w a constant at each call (16 or 32).
CTL__INLINE void ctl__thin_row(float *CTL__RESTRICT acc, const float *a, int64_t as, const float *b, int64_t bs, int64_t K, int w) {
    for (int64_t k = 0; k < K; k++) {
        float x = a[k * as];
        for (int j = 0; j < w; j++) acc[j] += x * b[k * bs + j];
    }
}

// ctl__thin_row for four rows of A (ars apart) at once, acc holding their w sums each: every sum in
// the same order, with four independent chains instead of one, and each row of B read once for four.
CTL__INLINE void ctl__thin_rows4(float *CTL__RESTRICT acc, const float *a, int64_t ars, int64_t as, const float *b, int64_t bs, int64_t K, int w) {
    for (int64_t k = 0; k < K; k++) {
        float x0 = a[k * as], x1 = a[ars + k * as], x2 = a[2 * ars + k * as], x3 = a[3 * ars + k * as];
        for (int j = 0; j < w; j++) {
            float bj = b[k * bs + j];
            acc[j] += x0 * bj, acc[w + j] += x1 * bj, acc[2 * w + j] += x2 * bj, acc[3 * w + j] += x3 * bj;
        }
    }
}

// Decoding many rows: C's rows [m0, m1) x columns [n0, n1) (at most eight) by ctl__dot4x4 tiles
// over the columns dequantised once into the thread's scratch, and dot4 for what is left over.
CTL__INLINE void ctl__gemv_tiles(const ctl__gemv_args *g, int64_t m0, int64_t m1, int64_t n0, int64_t n1, int thread) {
    const float *w = g->b.f + n0 * g->b.cs;
    int64_t ws = g->b.cs, nn = n1 - n0, m = m0;
    if (g->b.type != CTL_F32) {
        float *row = g->ctx->pack_a[thread];
        for (int64_t j = 0; j < nn; j++) g->dequant(g->b.type, g->b.q + (size_t)(n0 + j) * g->b.row_bytes, 0, g->K, row + j * g->K);
        w = row, ws = g->K;
    }
    for (; m + 4 <= m1; m += 4)
        for (int64_t n = 0; n + 4 <= nn; n += 4) g->dot4x4(g->a + m * g->a_rs, g->a_rs, w + n * ws, ws, g->K, g->c + m * g->ldc + n0 + n, g->ldc, g->accumulate);
    for (int64_t r = m0; r < m1; r++)   // the rows past the last four, and every row's last columns
        for (int64_t n = r < m ? nn / 4 * 4 : 0; n < nn; n += 4) {
            int nc = (int)CTL__MIN((int64_t)4, nn - n);
            float d[4], *c = g->c + r * g->ldc + n0 + n;
            g->dot4(g->a + r * g->a_rs, w + n * ws, ws, g->K, nc, d);
            for (int j = 0; j < nc; j++) c[j] = g->accumulate ? c[j] + d[j] : d[j];
        }
}

// A task of the thin product. Its block of C: 16 rows (by_rows), or 64 columns, or when decoding
// many rows 64 rows x col_block columns. Then the first path that fits: 4 x 4 tiles over dequantised
// columns (decoding many rows; training's many rows against few columns); C's rows as sums of B's rows (axpy); 4-8 rows against each
// weight once (dots8); 1-3 decoded rows against weights in their stored form (dot1x4); dot4 over
// up to four (dequantised) columns; and one column at a time. The path depends on the shapes and
// the context only, and each fixes every C value's summation order.
CTL__INLINE void ctl__gemv_cols(const ctl__gemv_args *g, int64_t task, int thread) {
    // [m0, m1) x [n0, n1): the block of C this task writes.
    int64_t m0 = g->by_rows ? task * 16 : 0, m1 = g->by_rows ? CTL__MIN(g->M, m0 + 16) : g->M;
    int64_t n0 = g->by_rows ? 0 : task * 64, n1 = g->by_rows ? g->N : CTL__MIN(g->N, n0 + 64);
    if (g->row_blocks) {   // decoding many rows: 64 rows x col_block columns per task
        int64_t rb = task % g->row_blocks, cb = task / g->row_blocks;
        m0 = rb * 64, m1 = CTL__MIN(g->M, m0 + 64), n0 = cb * g->col_block, n1 = CTL__MIN(g->N, n0 + g->col_block);
    }
    // Decoding many rows, and training's thin products (16 rows a task against a LoRA's few
    // columns): eight columns at a time, dequantised once into scratch (fp32 ones read in place),
    // then 4x4 tiles, four rows at a time against all eight columns (both stay in L1); the rows
    // and columns left over go through dot4. Every path sums in dot4's order, so which one a
    // product takes does not change its bits.
    bool tiles = g->row_blocks || (g->by_rows && !g->axpy && m1 - m0 >= 4);
    if (tiles && g->dot4x4 && (g->b.type == CTL_F32 || 8 * g->K <= CTL__MC * CTL__KC)) {
        for (int64_t c0 = n0; c0 < n1; c0 += 8) ctl__gemv_tiles(g, m0, m1, c0, CTL__MIN(n1, c0 + 8), thread);
        return;
    }
    if (g->axpy) {   // c[m, n0:n1] (+)= sum over k of a(m, k) b[k, n0:n1], k in order
        const float *a = g->a;
        int64_t a_rs = g->a_rs, a_cs = g->a_cs, nn = n1 - n0;
        if (a_rs == 1 && a_cs != 1 && (m1 - m0) * g->K <= CTL__MC * CTL__KC) {   // A stored transposed: its rows
            float *t = g->ctx->pack_a[thread];                                      // first, into scratch
            for (int64_t k = 0; k < g->K; k++)
                for (int64_t m = m0; m < m1; m++) t[(m - m0) * g->K + k] = a[m + k * a_cs];
            a = t - m0 * g->K, a_rs = g->K, a_cs = 1;
        }
        int64_t m = m0;
        for (; (nn == 16 || nn == 32) && m + 4 <= m1; m += 4) {   // a LoRA's rank, four rows at a time
            float acc[128] = {0};
            if (nn == 16) ctl__thin_rows4(acc, a + m * a_rs, a_rs, a_cs, g->b.f + n0, g->b.rs, g->K, 16);
            else ctl__thin_rows4(acc, a + m * a_rs, a_rs, a_cs, g->b.f + n0, g->b.rs, g->K, 32);
            for (int64_t i = 0; i < 4; i++) {
                float *c = g->c + (m + i) * g->ldc + n0;
                for (int64_t j = 0; j < nn; j++) c[j] = g->accumulate ? c[j] + acc[i * nn + j] : acc[i * nn + j];
            }
        }
        for (; m < m1; m++) {
            float *c = g->c + m * g->ldc + n0;
            if (nn == 16 || nn == 32) {   // a LoRA's rank: the row's sums stay in registers
                float acc[32] = {0};
                if (nn == 16) ctl__thin_row(acc, a + m * a_rs, a_cs, g->b.f + n0, g->b.rs, g->K, 16);
                else ctl__thin_row(acc, a + m * a_rs, a_cs, g->b.f + n0, g->b.rs, g->K, 32);
                for (int64_t j = 0; j < nn; j++) c[j] = g->accumulate ? c[j] + acc[j] : acc[j];
                continue;
            }
            // Other widths: C's row as a sum of B's rows scaled by A(m,k), k in order.
            if (!g->accumulate) memset(c, 0, (size_t)nn * sizeof(float));
            for (int64_t k = 0; k < g->K; k++) ctl__axpy(c, a[m * a_rs + k * a_cs], g->b.f + k * g->b.rs + n0, nn);
        }
        return;
    }
    if (g->dots8 && m1 - m0 >= 4 && m1 - m0 <= 8) {   // rows past m1 repeat the last one
        const float *x[8];
        // The rows past m1 repeat the last one: dots8 always runs eight, and their sums are discarded.
        for (int i = 0; i < 8; i++) x[i] = g->a + (m0 + CTL__MIN((int64_t)i, m1 - m0 - 1)) * g->a_rs;
        for (int64_t n = n0; n < n1; n += 2) {
            int nc = (int)CTL__MIN((int64_t)2, n1 - n);
            const unsigned char *r[2];
            for (int j = 0; j < 2; j++) {
                int64_t col = n + CTL__MIN(j, nc - 1);
                r[j] = g->b.type == CTL_F32 ? (const unsigned char *)(g->b.f + col * g->b.cs) : g->b.q + (size_t)col * g->b.row_bytes;
            }
            float d[16];
            // fine is false on an inf or NaN block scale: those two columns go through the reference loops.
            bool fine = g->dots8(g->b.type, x, r[0], r[1], g->K, d);
            for (int64_t m = m0; m < m1; m++)
                for (int j = 0; j < nc; j++) {
                    const float *xm = g->a + m * g->a_rs;
                    float v = fine ? d[2 * (m - m0) + j] : g->b.type == CTL_F32 ? ctl__dot(xm, (const float *)r[j], g->K) : ctl__dot_q(g->b.type, r[j], xm, g->K);
                    float *c = g->c + m * g->ldc + n + j;
                    *c = g->accumulate ? *c + v : v;
                }
        }
        return;
    }
    if (g->dot1x4 && g->decode && g->b.type != CTL_F32 && m1 - m0 < 4) {   // decoding 1 to 3 rows: each weight
        for (int64_t n = n0; n < n1; n += 4) {                              // read once per row, in its stored form
            int nc = (int)CTL__MIN((int64_t)4, n1 - n);
            const unsigned char *w = g->b.q + (size_t)n * g->b.row_bytes;
            for (int64_t m = m0; m < m1; m++) {
                const float *x = g->a + m * g->a_rs;
                float d[4], *c = g->c + m * g->ldc + n;
                if (!g->dot1x4(g->b.type, x, w, g->b.row_bytes, g->K, nc, d))
                    for (int j = 0; j < nc; j++) d[j] = ctl__dot_q(g->b.type, w + (size_t)j * g->b.row_bytes, x, g->K);
                for (int j = 0; j < nc; j++) c[j] = g->accumulate ? c[j] + d[j] : d[j];
            }
        }
        return;
    }
    // A quantised row is read block by block for one row of A, dequantised once (into the
    // thread's scratch, when it fits) for several: the same values either way. Decoding
    // dequantises for one row too, so that a row is summed in dot4's order (as dots8 sums it)
    // whether it is decoded alone or with others.
    bool unpack = g->b.type != CTL_F32 && (m1 - m0 > 1 || g->decode) && g->K <= CTL__MC * CTL__KC;
    // The thread's pack_a (MC x KC floats) is the scratch; `per` columns of K values fit in it.
    float *row = g->ctx->pack_a[thread];
    int64_t per = g->b.type == CTL_F32 ? 4 : CTL__MIN((int64_t)4, (int64_t)(CTL__MC * CTL__KC) / g->K);   // columns per unpack
    if (g->dot4 && (g->b.type == CTL_F32 || (unpack && (per == 4 || g->decode)))) {   // up to four columns at a time
        for (int64_t n = n0; n < n1; n += per) {
            int nc = (int)CTL__MIN(per, n1 - n);
            const float *w = g->b.f + n * g->b.cs;
            int64_t ws = g->b.cs;
            if (g->b.type != CTL_F32) {
                for (int c = 0; c < nc; c++) g->dequant(g->b.type, g->b.q + (size_t)(n + c) * g->b.row_bytes, 0, g->K, row + c * g->K);
                w = row, ws = g->K;
            }
            for (int64_t m = m0; m < m1; m++) {
                float d[4], *c = g->c + m * g->ldc + n;
                g->dot4(g->a + m * g->a_rs, w, ws, g->K, nc, d);
                for (int j = 0; j < nc; j++) c[j] = g->accumulate ? c[j] + d[j] : d[j];
            }
        }
        return;
    }
    // The fallback, one column at a time: ctl__dot over fp32 or the dequantised row, else the block
    // by block dot product (a vector build when the context has one).
    for (int64_t n = n0; n < n1; n++) {
        if (unpack) g->dequant(g->b.type, g->b.q + (size_t)n * g->b.row_bytes, 0, g->K, row);
        for (int64_t m = m0; m < m1; m++) {
            const float *x = g->a + m * g->a_rs;
            float d = g->b.type == CTL_F32 ? ctl__dot(x, g->b.f + n * g->b.cs, g->K)
                      : unpack             ? ctl__dot(x, row, g->K)
                      : g->dot_q           ? g->dot_q(g->b.type, g->b.q + (size_t)n * g->b.row_bytes, x, g->K)
                                           : ctl__dot_q(g->b.type, g->b.q + (size_t)n * g->b.row_bytes, x, g->K);
            float *c = g->c + m * g->ldc + n;
            *c = g->accumulate ? *c + d : d;
        }
    }
}

// The task compiled twice: portable, and for AVX2, where the inlined loops (ctl__dot, ctl__axpy,
// ctl__thin_row) vectorise in ymm.
static void ctl__gemv_task(void *arg, int64_t task, int thread) {
    ctl__gemv_cols((const ctl__gemv_args *)arg, task, thread);
}

#ifdef CTL__AVX2
__attribute__((target("avx2,fma"))) static void ctl__gemv_task_avx2(void *arg, int64_t task, int thread) {
    ctl__gemv_cols((const ctl__gemv_args *)arg, task, thread);
}
#endif

// C (M,N) (+)= A (M,K) B (K,N), A through strides and B as a ctl__bop: the one product behind
// every matrix multiply of the CPU backend. Thin shapes take the dot-product kernels, the rest
// the packed GEMM.
static void ctl__gemm(ctl_ctx *ctx, int64_t M, int64_t N, int64_t K, const float *a, int64_t a_rs, int64_t a_cs,
                      const ctl__bop *b, float *c, int64_t ldc, bool accumulate) {
    if (M <= 0 || N <= 0) return;
    // Products too thin for packing to pay (decoding; a LoRA's rank-sized side): dot products
    // of contiguous vectors, or C's rows as sums of B's contiguous rows. Which path runs
    // depends on the shapes only, so results still do not depend on the thread count.
    // A decoding step's products (W's rows contiguous, as a linear layer's are) take these
    // kernels for any number of rows, 64 rows x 8 or 32 columns a task beyond 8 rows: every row is then
    // summed in the same order (dot4's, which dots8 keeps), so a stream's tokens do not depend on
    // which others are decoded with it.
    // cols_contiguous: B's column n is a contiguous run of K values (W's row n, for x W^T);
    // rows_contiguous: B's row k is (the LoRA factors, dy W).
    bool cols_contiguous = b->type == CTL_F32 ? b->rs == 1 : b->nk, rows_contiguous = b->type == CTL_F32 && b->cs == 1;
    bool decode = ctx->decode && a_cs == 1 && cols_contiguous;
    bool dots = a_cs == 1 && cols_contiguous && (M <= 8 || N <= 32 || decode), axpy = !dots && rows_contiguous && (M <= 32 || N <= 32);
    if ((dots || axpy) && K > 0) {
        ctl__gemv_args v;
        v.ctx = ctx, v.M = M, v.N = N, v.K = K, v.a_rs = a_rs, v.a_cs = a_cs, v.ldc = ldc, v.a = a, v.b = *b, v.c = c;
        v.accumulate = accumulate, v.axpy = axpy, v.by_rows = axpy ? N <= 32 : M > 8, v.dot4 = NULL, v.dot_q = NULL, v.dots8 = NULL, v.dot1x4 = NULL;
        // Tasks: 64 x col_block blocks when decoding many rows, else 16 rows (by_rows) or 64 columns each.
        v.decode = decode, v.row_blocks = decode && M > 8 ? (M + 63) / 64 : 0, v.dot4x4 = NULL;
        // Columns 32 a task when there are at least 8 such tasks a thread: two threads writing halves of one cache line
        // of C would pass it back and forth on every store.
        v.col_block = N >= (int64_t)32 * 8 * ctx->n_threads ? 32 : 8;
        if (v.row_blocks) v.by_rows = false;
        v.dequant = ctl__dequant_portable;
        // The widest kernels the context has; NULL ones leave ctl__gemv_cols to its portable paths.
        ctl_task_fn fn = ctl__gemv_task;
#ifdef CTL__AVX2
        if (ctx->simd >= CTL_SIMD_AVX2) fn = ctl__gemv_task_avx2, v.dot4 = ctl__dot4_avx2, v.dot_q = ctl__dot_q_avx2, v.dot1x4 = ctl__dot1x4_avx2;
        if (ctx->simd == CTL_SIMD_AVX512)
            v.dot4 = ctl__dot4_avx512, v.dot_q = ctl__dot_q_avx512, v.dequant = ctl__dequant_span_avx512, v.dots8 = ctl__dots8_avx512, v.dot1x4 = ctl__dot1x4_avx512,
            v.dot4x4 = ctl__dot4x4_avx512;
#endif
        ctl_parallel_for(ctx, v.row_blocks ? v.row_blocks * ((N + v.col_block - 1) / v.col_block) : v.by_rows ? (M + 15) / 16 : (N + 63) / 64, fn, &v);
        return;
    }
    // An empty sum: C = 0, or C left as it is when accumulating.
    if (K <= 0) {
        for (int64_t m = 0; m < M && !accumulate; m++) memset(c + m * ldc, 0, N * sizeof(float));
        return;
    }
    ctl__gemm_args g;
    g.ctx = ctx, g.M = M, g.N = N, g.K = K;
    g.a = a, g.a_rs = a_rs, g.a_cs = a_cs, g.b = *b;
    g.c = c, g.ldc = ldc, g.accumulate = accumulate, g.bf16 = ctx->bf16_dot && b->type == CTL_BF16;
    // The packed path: for each NC x KC block of B, pack it (tasks of 8 strips), then compute (tasks
    // over rows and columns of C). Each block's two parallel_for calls end before the next block
    // reuses pack_b.
    for (g.n0 = 0; g.n0 < N; g.n0 += CTL__NC)
        for (g.k0 = 0; g.k0 < K; g.k0 += CTL__KC) {
            g.nc = CTL__MIN((int64_t)CTL__NC, N - g.n0), g.kc = CTL__MIN((int64_t)CTL__KC, K - g.k0);
            int64_t n_strips = (g.nc + CTL__NR - 1) / CTL__NR, m_strips = (M + CTL__MR - 1) / CTL__MR;
            ctl_parallel_for(ctx, (n_strips + 7) / 8, ctl__pack_b_task, &g);
            // About four tasks per thread over the rows; columns too when there are few rows.
            int64_t want = 4 * (int64_t)ctx->n_threads;
            g.m_tasks = CTL__MIN(m_strips, want);
            g.n_tasks = CTL__MAX((int64_t)1, CTL__MIN(n_strips, want / g.m_tasks));
            ctl_parallel_for(ctx, g.m_tasks * g.n_tasks, ctl__gemm_task, &g);
        }
}

// The public product: ctl_gemm_ref's contract with fp32 B through strides, on the context's threads.
CTL_API void ctl_gemm(ctl_ctx *ctx, int64_t M, int64_t N, int64_t K, const float *a, int64_t a_rs,
                      int64_t a_cs, const float *b, int64_t b_rs, int64_t b_cs, float *c,
                      int64_t ldc, bool accumulate) {
    if (!CTL__ARGS(ctx, ctx && a && b && c && M >= 0 && N >= 0 && K >= 0)) return;
    ctl__bop op;
    memset(&op, 0, sizeof op);
    op.type = CTL_F32, op.f = b, op.rs = b_rs, op.cs = b_cs;
    ctl__gemm(ctx, M, N, K, a, a_rs, a_cs, &op, c, ldc, accumulate);
}

// Products with a weight matrix W stored as `type` (fp32 or quantised), A's rows lda apart:
//   ctl__gemm_wt:  c (M,N) (+)= a (M,K) W^T,  W (N,K)       (a linear layer's forward)
//   ctl__gemm_wn:  c (M,N) (+)= a (M,K) W,    W (K,N)       (its input gradient)
static void ctl__gemm_w(ctl_ctx *ctx, int64_t M, int64_t N, int64_t K, const float *a, int64_t lda, ctl_dtype type,
                        const void *w, bool nk, float *c, int64_t ldc, bool accumulate) {
    ctl__bop op;
    memset(&op, 0, sizeof op);
    op.type = type, op.nk = nk;
    // fp32 W goes through strides: B(k,n) = W[n][k] is w[n*K + k] (nk), W[k][n] is w[k*N + n].
    if (type == CTL_F32) op.f = (const float *)w, op.rs = nk ? 1 : N, op.cs = nk ? K : 1;
    else op.q = (const unsigned char *)w, op.row_bytes = ctl_dtype_bytes(type, nk ? K : N);
    ctl__gemm(ctx, M, N, K, a, lda, 1, &op, c, ldc, accumulate);
}

static void ctl__gemm_wt(ctl_ctx *ctx, int64_t M, int64_t N, int64_t K, const float *a, int64_t lda, ctl_dtype type,
                         const void *w, float *c, int64_t ldc, bool accumulate) {
    ctl__gemm_w(ctx, M, N, K, a, lda, type, w, true, c, ldc, accumulate);
}

static void ctl__gemm_wn(ctl_ctx *ctx, int64_t M, int64_t N, int64_t K, const float *a, int64_t lda, ctl_dtype type,
                         const void *w, float *c, int64_t ldc, bool accumulate) {
    ctl__gemm_w(ctx, M, N, K, a, lda, type, w, false, c, ldc, accumulate);
}

// ---- rows in parallel ------------------------------------------------------------------------
// Row-wise operations split N rows into fixed blocks of CTL__ROWS rows; each block is one task.
#define CTL__ROWS 16

// One row operation's arguments; each row function says which fields it reads: outputs out..out3,
// inputs in..in5, index arrays ids and ids2, sizes C (a row's length) and V (a vocabulary), and
// one scalar f (eps, or 1/temperature). Blocks of rows depend on N alone and a row is one
// thread's, so the results do not depend on the thread count.
typedef struct ctl__rows_args {
    void (*row_fn)(const struct ctl__rows_args *r, int64_t row);
    int64_t n_rows;
    float *out, *out2, *out3;
    const float *in, *in2, *in3, *in4, *in5;
    const int32_t *ids, *ids2;
    int64_t C, V;
    float scalar;   // the kernel's one constant: the norms' eps, the LM head's 1 / temperature
} ctl__rows_args;

// Task: rows [16 task, 16 task + 16), in order.
static void ctl__rows_task(void *arg, int64_t task, int thread) {
    const ctl__rows_args *r = (const ctl__rows_args *)arg;
    (void)thread;
    int64_t end = CTL__MIN(r->n_rows, (task + 1) * CTL__ROWS);
    for (int64_t row = task * CTL__ROWS; row < end; row++) r->row_fn(r, row);
}

static void ctl__rows_parallel(ctl_ctx *ctx, ctl__rows_args *r) {
    ctl_parallel_for(ctx, (r->n_rows + CTL__ROWS - 1) / CTL__ROWS, ctl__rows_task, r);
}

typedef void (*ctl__row_fn)(const ctl__rows_args *r, int64_t row);

// Row arguments for `generic`, or for `avx2` (when not NULL) if the context uses AVX2.
static ctl__rows_args ctl__rows(const ctl_ctx *ctx, ctl__row_fn generic, ctl__row_fn avx2, int64_t n_rows) {
    ctl__rows_args r;
    memset(&r, 0, sizeof r);
    r.row_fn = ctx->simd >= CTL_SIMD_AVX2 && avx2 ? avx2 : generic;
    r.n_rows = n_rows;
    return r;
}

// ---- linear ----------------------------------------------------------------------------------

// out (N,OC) = inp (N,C) w^T + bias, w (OC,C) as PyTorch's Linear stores it. The bias is copied
// into out first and the product accumulates onto it.
CTL_API void ctl_matmul_forward(ctl_ctx *ctx, float *out, const float *inp, const float *w,
                                const float *bias, int64_t N, int64_t C, int64_t OC) {
    if (!CTL__ARGS(ctx, ctx && out && inp && w && N >= 0 && C >= 0 && OC >= 0)) return;
    if (bias)
        for (int64_t n = 0; n < N; n++) memcpy(out + n * OC, bias, OC * sizeof(float));
    ctl_gemm(ctx, N, OC, C, inp, C, 1, w, 1, C, out, OC, bias != NULL);
}

// Weight and bias gradients of a linear layer whose output gradient has row stride ld: used
// directly for the parts (q, k, v; gate, up) of a fused layer.
static void ctl__matmul_dw(ctl_ctx *ctx, float *dw, float *dbias, const float *dout, int64_t ld,
                           const float *inp, int64_t N, int64_t C, int64_t OC) {
    // dw (OC,C) += dout^T inp: a product over the N rows, dout read transposed through its strides.
    // dbias on one thread, rows in order: a fixed sum.
    if (dw) ctl_gemm(ctx, OC, C, N, dout, 1, ld, inp, C, 1, dw, C, true);
    if (dbias)
        for (int64_t n = 0; n < N; n++)
            for (int64_t o = 0; o < OC; o++) dbias[o] += dout[n * ld + o];
}

// dinp (N,C) += dout (N,OC) w (OC,C); dw and dbias as ctl__matmul_dw.
CTL_API void ctl_matmul_backward(ctl_ctx *ctx, float *dinp, float *dw, float *dbias,
                                 const float *dout, const float *inp, const float *w, int64_t N,
                                 int64_t C, int64_t OC) {
    if (!CTL__ARGS(ctx, ctx && dout && inp && w && N >= 0 && C >= 0 && OC >= 0)) return;
    if (dinp) ctl_gemm(ctx, N, C, OC, dout, OC, 1, w, C, 1, dinp, C, true);
    ctl__matmul_dw(ctx, dw, dbias, dout, OC, inp, N, C, OC);
}

// ---- embedding -------------------------------------------------------------------------------

// The forward with wte stored as `type` (a quantised row is dequantised into the output).
// out (B,T,C) = wte[token] + wpe[t] (wpe NULL: positions come later, from RoPE). Token ids must be
// in [0, V): they are not checked here.
static void ctl__embedding_forward(float *out, const int32_t *tokens, ctl_dtype type, const void *wte,
                                   const float *wpe, int64_t B, int64_t T, int64_t C) {
    for (int64_t b = 0; b < B; b++)
        for (int64_t t = 0; t < T; t++) {
            float *o = out + (b * T + t) * C;
            int64_t tok = tokens[b * T + t];
            if (type == CTL_F32) memcpy(o, (const float *)wte + tok * C, (size_t)C * sizeof(float));
            else ctl__dequant_span(type, (const unsigned char *)wte + (size_t)tok * ctl_dtype_bytes(type, C), 0, C, o);
            for (int64_t c = 0; wpe && c < C; c++) o[c] += wpe[t * C + c];
        }
}

CTL_API void ctl_embedding_forward(float *out, const int32_t *tokens, const float *wte,
                                   const float *wpe, int64_t B, int64_t T, int64_t C) {
    if (!CTL__ARGS(NULL, out && tokens && wte && B >= 0 && T >= 0 && C >= 0)) return;
    ctl__embedding_forward(out, tokens, CTL_F32, wte, wpe, B, T, C);
}

// pos (B,T): each token's position (packed documents), or NULL: its index in the row.
// One thread on purpose: two rows with the same token add into the same row of dwte, so rows in
// parallel would race, and atomics would lose the fixed summation order.
static void ctl__embedding_backward(float *dwte, float *dwpe, const float *dout, const int32_t *tokens, const int32_t *pos,
                               int64_t B, int64_t T, int64_t C) {
    for (int64_t b = 0; b < B; b++)
        for (int64_t t = 0; t < T; t++) {
            const float *d = dout + (b * T + t) * C;
            float *de = dwte ? dwte + (int64_t)tokens[b * T + t] * C : NULL;
            float *dp = dwpe ? dwpe + (pos ? (int64_t)pos[b * T + t] : t) * C : NULL;
            for (int64_t c = 0; c < C; c++) {
                if (de) de[c] += d[c];
                if (dp) dp[c] += d[c];
            }
        }
}

CTL_API void ctl_embedding_backward(float *dwte, float *dwpe, const float *dout,
                                    const int32_t *tokens, int64_t B, int64_t T, int64_t C) {
    if (!CTL__ARGS(NULL, dout && tokens && B >= 0 && T >= 0 && C >= 0)) return;
    ctl__embedding_backward(dwte, dwpe, dout, tokens, NULL, B, T, C);
}

// ---- LayerNorm -------------------------------------------------------------------------------

// LayerNorm (Ba et al. 2016) of row n: in = x (N,C), in2 = w, in3 = b or NULL, scalar = eps; out = y,
// out2 = mean and out3 = rstd, kept for the backward. Two passes, the variance about the mean
// (biased, over C, as PyTorch's): steadier than E[x^2] - mean^2 when the mean is large.
static void ctl__layernorm_row(const ctl__rows_args *r, int64_t n) {
    int64_t C = r->C;
    const float *x = r->in + n * C, *w = r->in2, *b = r->in3;
    float mean = 0.0f, var = 0.0f;
    for (int64_t c = 0; c < C; c++) mean += x[c];
    mean /= (float)C;
    for (int64_t c = 0; c < C; c++) var += (x[c] - mean) * (x[c] - mean);
    float rstd = 1.0f / sqrtf(var / (float)C + r->scalar);
    float *o = r->out + n * C;
    for (int64_t c = 0; c < C; c++) o[c] = (x[c] - mean) * rstd * w[c] + (b ? b[c] : 0.0f);
    r->out2[n] = mean;
    r->out3[n] = rstd;
}

CTL_API void ctl_layernorm_forward(ctl_ctx *ctx, float *out, float *mean, float *rstd,
                                   const float *inp, const float *w, const float *b, int64_t N,
                                   int64_t C, float eps) {
    if (!CTL__ARGS(ctx, ctx && out && mean && rstd && inp && w && N >= 0 && C >= 0)) return;
    ctl__rows_args r = ctl__rows(ctx, ctl__layernorm_row, NULL, N);
    r.out = out, r.out2 = mean, r.out3 = rstd, r.in = inp, r.in2 = w, r.in3 = b, r.C = C, r.scalar = eps;
    ctl__rows_parallel(ctx, &r);
}

// dx = rstd * (dn - mean(dn) - n * mean(dn * n)) with n the normalised x and dn = dout * w.
// in = x, in2 = dout, in3 = w, in4 = mean, in5 = rstd; out = dinp, added into.
static void ctl__layernorm_back_row(const ctl__rows_args *r, int64_t n) {
    int64_t C = r->C;
    const float *x = r->in + n * C, *dout = r->in2 + n * C, *w = r->in3;
    float mean = r->in4[n], rstd = r->in5[n], dn_mean = 0.0f, dn_n_mean = 0.0f;
    for (int64_t c = 0; c < C; c++) {
        float dn = dout[c] * w[c];
        dn_mean += dn;
        dn_n_mean += dn * (x[c] - mean) * rstd;
    }
    dn_mean /= (float)C;
    dn_n_mean /= (float)C;
    float *dx = r->out + n * C;
    for (int64_t c = 0; c < C; c++)
        dx[c] += (dout[c] * w[c] - dn_mean - (x[c] - mean) * rstd * dn_n_mean) * rstd;
}

CTL_API void ctl_layernorm_backward(ctl_ctx *ctx, float *dinp, float *dw, float *db,
                                    const float *dout, const float *inp, const float *w,
                                    const float *mean, const float *rstd, int64_t N, int64_t C) {
    if (!CTL__ARGS(ctx, ctx && dout && inp && w && mean && rstd && N >= 0 && C >= 0)) return;
    if (dinp) {
        ctl__rows_args r = ctl__rows(ctx, ctl__layernorm_back_row, NULL, N);
        r.out = dinp, r.in = inp, r.in2 = dout, r.in3 = w, r.in4 = mean, r.in5 = rstd, r.C = C;
        ctl__rows_parallel(ctx, &r);
    }
    for (int64_t n = 0; n < N; n++)   // sums over rows: one pass in row order
        for (int64_t c = 0; c < C; c++) {
            // dw += dout * the normalised x; db += dout.
            if (dw) dw[c] += dout[n * C + c] * (inp[n * C + c] - mean[n]) * rstd[n];
            if (db) db[c] += dout[n * C + c];
        }
}

// ---- RMSNorm ---------------------------------------------------------------------------------

// sum_c a[c] * b[c] * s[c] (s NULL: 1) in eight interleaved partial sums, so the loop vectorises
// without reassociation; the same order on every path.
static float ctl__dot8(const float *CTL__RESTRICT a, const float *CTL__RESTRICT b, const float *CTL__RESTRICT s, int64_t C) {
    float acc[8] = {0};
    int64_t c = 0, C8 = C / 8 * 8;
    if (s)
        for (; c < C8; c += 8)
            for (int i = 0; i < 8; i++) acc[i] += a[c + i] * b[c + i] * s[c + i];
    else
        for (; c < C8; c += 8)
            for (int i = 0; i < 8; i++) acc[i] += a[c + i] * b[c + i];
    for (; c < C; c++) acc[c % 8] += a[c] * b[c] * (s ? s[c] : 1.0f);
    return ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
}

// RMSNorm (Zhang & Sennrich 2019): y = x w / sqrt(mean(x^2) + eps). in = x, in2 = w, scalar = eps;
// out = y, out2 = rstd for the backward.
static void ctl__rmsnorm_row(const ctl__rows_args *r, int64_t n) {
    int64_t C = r->C;
    const float *x = r->in + n * C, *w = r->in2;
    // The sum of squares through ctl__dot8, the order the backward's sums use too.
    float ms = ctl__dot8(x, x, NULL, C);
    float rstd = 1.0f / sqrtf(ms / (float)C + r->scalar);
    float *o = r->out + n * C;
    for (int64_t c = 0; c < C; c++) o[c] = x[c] * rstd * w[c];
    r->out2[n] = rstd;
}

CTL_API void ctl_rmsnorm_forward(ctl_ctx *ctx, float *out, float *rstd, const float *inp,
                                 const float *w, int64_t N, int64_t C, float eps) {
    if (!CTL__ARGS(ctx, ctx && out && rstd && inp && w && N >= 0 && C >= 0)) return;
    ctl__rows_args r = ctl__rows(ctx, ctl__rmsnorm_row, NULL, N);
    r.out = out, r.out2 = rstd, r.in = inp, r.in2 = w, r.C = C, r.scalar = eps;
    ctl__rows_parallel(ctx, &r);
}

// With y = x * rstd and dy = dout * w:  dx = rstd * (dy - y * mean(dy * y)).
// in = x, in2 = dout, in3 = w, in4 = rstd; out = dinp, added into.
static void ctl__rmsnorm_back_row(const ctl__rows_args *r, int64_t n) {
    int64_t C = r->C;
    const float *x = r->in + n * C, *dout = r->in2 + n * C, *w = r->in3;
    float rstd = r->in4[n], dot = ctl__dot8(dout, w, x, C) * rstd / (float)C;
    float *dx = r->out + n * C;
    for (int64_t c = 0; c < C; c++) dx[c] += (dout[c] * w[c] - x[c] * rstd * dot) * rstd;
}

CTL_API void ctl_rmsnorm_backward(ctl_ctx *ctx, float *dinp, float *dw, const float *dout,
                                  const float *inp, const float *w, const float *rstd, int64_t N,
                                  int64_t C) {
    if (!CTL__ARGS(ctx, ctx && dout && inp && w && rstd && N >= 0 && C >= 0)) return;
    if (dinp) {
        ctl__rows_args r = ctl__rows(ctx, ctl__rmsnorm_back_row, NULL, N);
        r.out = dinp, r.in = inp, r.in2 = dout, r.in3 = w, r.in4 = rstd, r.C = C;
        ctl__rows_parallel(ctx, &r);
    }
    if (dw)
        for (int64_t n = 0; n < N; n++)
            for (int64_t c = 0; c < C; c++) dw[c] += dout[n * C + c] * inp[n * C + c] * rstd[n];
}

// ---- RoPE ------------------------------------------------------------------------------------

// RoPE (Su et al. 2021): pair i of position p turns by p * theta^(-2i/HS). The angle is computed
// in double, so a late position's angle is still right to the float it is rounded to.
CTL_API void ctl_rope_table(float *cos_t, float *sin_t, int64_t n_pos, int64_t HS, float theta) {
    if (!CTL__ARGS(NULL, cos_t && sin_t && n_pos >= 0 && HS >= 0)) return;
    int64_t half = HS / 2;
    for (int64_t p = 0; p < n_pos; p++)
        for (int64_t i = 0; i < half; i++) {
            double angle = (double)p * pow((double)theta, -2.0 * (double)i / (double)HS);
            cos_t[p * half + i] = (float)cos(angle);
            sin_t[p * half + i] = (float)sin(angle);
        }
}

// One routine for both directions: backward rotates by -angle (sign = -1).
// pos (B*T) gives each row's position; NULL means row t of each sequence is at position t.
static void ctl__rope(float *x, const float *cos_t, const float *sin_t, int64_t B, int64_t T,
                      int64_t n_heads, int64_t HS, int64_t row_stride, ctl_rope_layout layout,
                      float sign, const int32_t *pos) {
    int64_t half = HS / 2;
    for (int64_t b = 0; b < B; b++)
        for (int64_t t = 0; t < T; t++) {
            // pos: the position within its packed document, so each document's rotation starts again at 0.
            int64_t p = pos ? pos[b * T + t] : t;
            const float *cs = cos_t + p * half, *sn = sin_t + p * half;
            for (int64_t h = 0; h < n_heads; h++) {
                float *v = x + (b * T + t) * row_stride + h * HS;
                for (int64_t i = 0; i < half; i++) {
                    // ADJACENT rotates (2i, 2i+1), GGUF llama's order; HALVES (i, i + HS/2), Hugging Face's.
                    int64_t i0 = layout == CTL_ROPE_ADJACENT ? 2 * i : i;
                    int64_t i1 = layout == CTL_ROPE_ADJACENT ? 2 * i + 1 : i + half;
                    // A 2-D rotation of the pair (x0, x1); the transpose of a rotation is its inverse, hence the
                    // backward's -angle.
                    float x0 = v[i0], x1 = v[i1], c = cs[i], s = sign * sn[i];
                    v[i0] = x0 * c - x1 * s;
                    v[i1] = x0 * s + x1 * c;
                }
            }
        }
}

CTL_API void ctl_rope_forward(float *x, const float *cos_t, const float *sin_t, int64_t B,
                              int64_t T, int64_t n_heads, int64_t HS, int64_t row_stride,
                              ctl_rope_layout layout) {
    if (!CTL__ARGS(NULL, x && cos_t && sin_t && B >= 0 && T >= 0 && n_heads >= 0 && HS >= 0)) return;
    ctl__rope(x, cos_t, sin_t, B, T, n_heads, HS, row_stride, layout, 1.0f, NULL);
}

CTL_API void ctl_rope_backward(float *dx, const float *cos_t, const float *sin_t, int64_t B,
                               int64_t T, int64_t n_heads, int64_t HS, int64_t row_stride,
                               ctl_rope_layout layout) {
    if (!CTL__ARGS(NULL, dx && cos_t && sin_t && B >= 0 && T >= 0 && n_heads >= 0 && HS >= 0)) return;
    ctl__rope(dx, cos_t, sin_t, B, T, n_heads, HS, row_stride, layout, -1.0f, NULL);
}

#ifdef CTL__AVX2
// e^x for 8 floats: x = n ln2 + r with |r| <= ln2/2, e^r by a degree-6 polynomial (Cephes'
// coefficients), 2^n built in the exponent bits (in two halves, so n = 128 stays finite).
// Within 2 ulp of expf for x in [-87.3, 88.7]; outside, x is clamped (e^-inf gives ~1e-38).
// NaN stays NaN.
__attribute__((target("avx2,fma"))) static inline __m256 ctl__exp8(__m256 x) {
    __m256 nan = _mm256_cmp_ps(x, x, _CMP_UNORD_Q);
    // n = round(x / ln2), r = x - n ln2 with ln2 split in two (Cody & Waite) so r keeps its low bits.
    __m256 xc = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.7f));
    __m256 fn = _mm256_round_ps(_mm256_mul_ps(xc, _mm256_set1_ps(1.44269504088896341f)),
                                _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(fn, _mm256_set1_ps(0.693359375f), xc);   // ln2 in two parts
    r = _mm256_fnmadd_ps(fn, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    // 2^n as 2^h 2^(n-h): n reaches 128 after the clamp, one past the largest float exponent.
    __m256i n = _mm256_cvtps_epi32(fn), h = _mm256_srai_epi32(n, 1), bias = _mm256_set1_epi32(127);
    __m256 s1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(h, bias), 23));
    __m256 s2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_sub_epi32(n, h), bias), 23));
    return _mm256_blendv_ps(_mm256_mul_ps(_mm256_mul_ps(p, s1), s2), x, nan);
}
#endif

// x[0, n) = e^x in place, with the vector exp where the context uses AVX2.
static void ctl__exp_span(float *x, int64_t n) {
    for (int64_t i = 0; i < n; i++) x[i] = expf(x[i]);
}

#ifdef CTL__AVX2
__attribute__((target("avx2,fma"))) static void ctl__exp_span_avx2(float *x, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(x + i, ctl__exp8(_mm256_loadu_ps(x + i)));
    for (; i < n; i++) x[i] = expf(x[i]);
}
#endif

// The exp the context's vector path asks for: the AVX2 build when it has one.
typedef void (*ctl__exp_fn)(float *x, int64_t n);
static ctl__exp_fn ctl__exp_pick(const ctl_ctx *ctx) {
#ifdef CTL__AVX2
    if (ctx->simd >= CTL_SIMD_AVX2) return ctl__exp_span_avx2;
#endif
    (void)ctx;
    return ctl__exp_span;
}

// ---- attention -------------------------------------------------------------------------------

// One attention call's arguments, read by all its tasks. qkv (B,T,(NH+2*NKV)*HS): each token's NH
// query heads, then NKV key heads, then NKV value heads; out and dout (B,T,NH*HS); lse (B,NH,T),
// the log of each query row's softmax sum, which the backward uses to rebuild p.
typedef struct ctl__attn_args {
    float *out, *lse, *dqkv;
    const float *qkv, *dout, *o, *lse_in;
    const int32_t *pos;    // (B,T) positions within packed documents, or NULL: one document a row
    int64_t B, T, NH, NKV, HS;
    void (*exp_span)(float *x, int64_t n);
    void (*scores)(float *s, const float *q, const float *kt, int64_t HS, float scale);
    void (*accum)(float *dst, const float *w, const float *rows, int64_t stride, int64_t n, int64_t HS);
} ctl__attn_args;

// Eight partial sums so the compiler can keep them in one vector register (a plain float
// reduction may not be reordered, so it would stay scalar).
CTL__INLINE float ctl__dot(const float *a, const float *b, int64_t n) {
    float s[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f}, r = 0.0f;
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int k = 0; k < 8; k++) s[k] += a[i + k] * b[i + k];
    for (; i < n; i++) r += a[i] * b[i];
    return ((s[0] + s[4]) + (s[1] + s[5])) + ((s[2] + s[6]) + (s[3] + s[7])) + r;
}

// y += a x. Blocks of eight with no aliasing, the shape compilers vectorise even at -O2.
CTL__INLINE void ctl__axpy(float *CTL__RESTRICT y, float a, const float *CTL__RESTRICT x, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int k = 0; k < 8; k++) y[i + k] += a * x[i + k];
    for (; i < n; i++) y[i] += a * x[i];
}

// Attention works in blocks of CTL__ATT_BLOCK query rows (forward, dq) or keys (dk, dv), so
// that there are tasks enough for every thread even with one sequence and few heads.
#define CTL__ATT_BLOCK 32

static int64_t ctl__att_blocks(int64_t T) { return (T + CTL__ATT_BLOCK - 1) / CTL__ATT_BLOCK; }

// Rows j0 .. j0+n of one head of the keys (or values), transposed: kt[c * CTL__ATT_BLOCK + j].
// A query's scores against the block are then one vector loop per channel, no reductions.
// Columns past n are zero, so that the scores below can always run the whole block.
CTL__INLINE void ctl__att_transpose(float *CTL__RESTRICT kt, const float *CTL__RESTRICT x, int64_t stride, int64_t n, int64_t HS) {
    for (int64_t c = 0; c < HS; c++)
        for (int64_t j = 0; j < CTL__ATT_BLOCK; j++) kt[c * CTL__ATT_BLOCK + j] = j < n ? x[j * stride + c] : 0.0f;
}

// s[0, CTL__ATT_BLOCK) = (q . column j of kt) * scale.
static void ctl__att_scores(float *CTL__RESTRICT s, const float *CTL__RESTRICT q, const float *CTL__RESTRICT kt, int64_t HS,
                            float scale) {
    float acc[CTL__ATT_BLOCK];
    for (int j = 0; j < CTL__ATT_BLOCK; j++) acc[j] = 0.0f;
    for (int64_t c = 0; c < HS; c++)
        for (int j = 0; j < CTL__ATT_BLOCK; j++) acc[j] += q[c] * kt[c * CTL__ATT_BLOCK + j];
    for (int j = 0; j < CTL__ATT_BLOCK; j++) s[j] = acc[j] * scale;
}

// dst[0, HS) += sum over j < n of w[j] * rows[j * stride + c].
static void ctl__att_accum(float *CTL__RESTRICT dst, const float *CTL__RESTRICT w, const float *CTL__RESTRICT rows, int64_t stride,
                           int64_t n, int64_t HS) {
    for (int64_t j = 0; j < n; j++) ctl__axpy(dst, w[j], rows + j * stride, HS);
}

#ifdef CTL__AVX2
// The same two with the block's 32 scores, or 32 channels of dst, in four registers throughout.
__attribute__((target("avx2,fma"))) static void ctl__att_scores_avx2(float *s, const float *q, const float *kt, int64_t HS, float scale) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t c = 0; c < HS; c++, kt += CTL__ATT_BLOCK) {
        __m256 qc = _mm256_broadcast_ss(q + c);
        a0 = _mm256_fmadd_ps(qc, _mm256_loadu_ps(kt), a0), a1 = _mm256_fmadd_ps(qc, _mm256_loadu_ps(kt + 8), a1);
        a2 = _mm256_fmadd_ps(qc, _mm256_loadu_ps(kt + 16), a2), a3 = _mm256_fmadd_ps(qc, _mm256_loadu_ps(kt + 24), a3);
    }
    __m256 sc = _mm256_set1_ps(scale);
    _mm256_storeu_ps(s, _mm256_mul_ps(a0, sc)), _mm256_storeu_ps(s + 8, _mm256_mul_ps(a1, sc));
    _mm256_storeu_ps(s + 16, _mm256_mul_ps(a2, sc)), _mm256_storeu_ps(s + 24, _mm256_mul_ps(a3, sc));
}

__attribute__((target("avx2,fma"))) static void ctl__att_accum_avx2(float *dst, const float *w, const float *rows, int64_t stride,
                                                                    int64_t n, int64_t HS) {
    int64_t c0 = 0;
    for (; c0 + 32 <= HS; c0 += 32) {
        __m256 a0 = _mm256_loadu_ps(dst + c0), a1 = _mm256_loadu_ps(dst + c0 + 8), a2 = _mm256_loadu_ps(dst + c0 + 16);
        __m256 a3 = _mm256_loadu_ps(dst + c0 + 24);
        for (int64_t j = 0; j < n; j++) {
            const float *r = rows + j * stride + c0;
            __m256 wj = _mm256_broadcast_ss(w + j);
            a0 = _mm256_fmadd_ps(wj, _mm256_loadu_ps(r), a0), a1 = _mm256_fmadd_ps(wj, _mm256_loadu_ps(r + 8), a1);
            a2 = _mm256_fmadd_ps(wj, _mm256_loadu_ps(r + 16), a2), a3 = _mm256_fmadd_ps(wj, _mm256_loadu_ps(r + 24), a3);
        }
        _mm256_storeu_ps(dst + c0, a0), _mm256_storeu_ps(dst + c0 + 8, a1);
        _mm256_storeu_ps(dst + c0 + 16, a2), _mm256_storeu_ps(dst + c0 + 24, a3);
    }
    for (; c0 + 8 <= HS; c0 += 8) {   // heads of 8, 16 or 24 channels
        __m256 a = _mm256_loadu_ps(dst + c0);
        for (int64_t j = 0; j < n; j++) a = _mm256_fmadd_ps(_mm256_broadcast_ss(w + j), _mm256_loadu_ps(rows + j * stride + c0), a);
        _mm256_storeu_ps(dst + c0, a);
    }
    for (; c0 < HS; c0++)
        for (int64_t j = 0; j < n; j++) dst[c0] += w[j] * rows[j * stride + c0];
}

// AVX-512: the 32 scores in two zmm, channels alternating between two sets of accumulators
// (four FMA chains); dst's channels 64 at a time in four zmm, keys alternating likewise.
__attribute__((target("avx512f"))) static void ctl__att_scores_avx512(float *s, const float *q, const float *kt, int64_t HS, float scale) {
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, b0 = a0, b1 = a0;
    int64_t c = 0;
    for (; c + 2 <= HS; c += 2, kt += 2 * CTL__ATT_BLOCK) {
        __m512 q0 = _mm512_set1_ps(q[c]), q1 = _mm512_set1_ps(q[c + 1]);
        a0 = _mm512_fmadd_ps(q0, _mm512_loadu_ps(kt), a0), a1 = _mm512_fmadd_ps(q0, _mm512_loadu_ps(kt + 16), a1);
        b0 = _mm512_fmadd_ps(q1, _mm512_loadu_ps(kt + 32), b0), b1 = _mm512_fmadd_ps(q1, _mm512_loadu_ps(kt + 48), b1);
    }
    if (c < HS) {
        __m512 q0 = _mm512_set1_ps(q[c]);
        a0 = _mm512_fmadd_ps(q0, _mm512_loadu_ps(kt), a0), a1 = _mm512_fmadd_ps(q0, _mm512_loadu_ps(kt + 16), a1);
    }
    __m512 sc = _mm512_set1_ps(scale);
    _mm512_storeu_ps(s, _mm512_mul_ps(_mm512_add_ps(a0, b0), sc)), _mm512_storeu_ps(s + 16, _mm512_mul_ps(_mm512_add_ps(a1, b1), sc));
}

__attribute__((target("avx512f"))) static void ctl__att_accum_avx512(float *dst, const float *w, const float *rows, int64_t stride,
                                                                    int64_t n, int64_t HS) {
    int64_t c0 = 0;
    for (; c0 + 64 <= HS; c0 += 64) {
        __m512 a0 = _mm512_loadu_ps(dst + c0), a1 = _mm512_loadu_ps(dst + c0 + 16), a2 = _mm512_loadu_ps(dst + c0 + 32);
        __m512 a3 = _mm512_loadu_ps(dst + c0 + 48), b0 = _mm512_setzero_ps(), b1 = b0, b2 = b0, b3 = b0;
        int64_t j = 0;
        for (; j + 2 <= n; j += 2) {
            const float *r = rows + j * stride + c0, *r2 = r + stride;
            __m512 w0 = _mm512_set1_ps(w[j]), w1 = _mm512_set1_ps(w[j + 1]);
            a0 = _mm512_fmadd_ps(w0, _mm512_loadu_ps(r), a0), a1 = _mm512_fmadd_ps(w0, _mm512_loadu_ps(r + 16), a1);
            a2 = _mm512_fmadd_ps(w0, _mm512_loadu_ps(r + 32), a2), a3 = _mm512_fmadd_ps(w0, _mm512_loadu_ps(r + 48), a3);
            b0 = _mm512_fmadd_ps(w1, _mm512_loadu_ps(r2), b0), b1 = _mm512_fmadd_ps(w1, _mm512_loadu_ps(r2 + 16), b1);
            b2 = _mm512_fmadd_ps(w1, _mm512_loadu_ps(r2 + 32), b2), b3 = _mm512_fmadd_ps(w1, _mm512_loadu_ps(r2 + 48), b3);
        }
        if (j < n) {
            const float *r = rows + j * stride + c0;
            __m512 w0 = _mm512_set1_ps(w[j]);
            a0 = _mm512_fmadd_ps(w0, _mm512_loadu_ps(r), a0), a1 = _mm512_fmadd_ps(w0, _mm512_loadu_ps(r + 16), a1);
            a2 = _mm512_fmadd_ps(w0, _mm512_loadu_ps(r + 32), a2), a3 = _mm512_fmadd_ps(w0, _mm512_loadu_ps(r + 48), a3);
        }
        _mm512_storeu_ps(dst + c0, _mm512_add_ps(a0, b0)), _mm512_storeu_ps(dst + c0 + 16, _mm512_add_ps(a1, b1));
        _mm512_storeu_ps(dst + c0 + 32, _mm512_add_ps(a2, b2)), _mm512_storeu_ps(dst + c0 + 48, _mm512_add_ps(a3, b3));
    }
    if (c0 < HS) ctl__att_accum_avx2(dst + c0, w, rows + c0, stride, n, HS - c0);   // heads of other widths: the rest
}
#endif

// The attention helpers the context's vector paths ask for.
static void ctl__att_pick(const ctl_ctx *ctx, ctl__attn_args *A) {
    A->exp_span = ctl__exp_pick(ctx), A->scores = ctl__att_scores, A->accum = ctl__att_accum;
#ifdef CTL__AVX2
    if (ctx->simd >= CTL_SIMD_AVX2) A->scores = ctl__att_scores_avx2, A->accum = ctl__att_accum_avx2;
    if (ctx->simd == CTL_SIMD_AVX512) A->scores = ctl__att_scores_avx512, A->accum = ctl__att_accum_avx512;
#endif
}

// Decoding's scores: s[j] = (q . keys[j * stride]) * scale for n keys stored by rows (the KV
// cache), each a dot product; one query row has no block of queries to share a transpose with.
static void ctl__key_scores(float *s, const float *q, const float *keys, int64_t stride, int64_t n, int64_t HS, float scale) {
    for (int64_t j = 0; j < n; j++) s[j] = ctl__dot(q, keys + j * stride, HS) * scale;
}

#ifdef CTL__AVX2
// The portable loop compiled for AVX2.
__attribute__((target("avx2,fma"))) static void ctl__key_scores_avx2(float *s, const float *q, const float *keys, int64_t stride, int64_t n,
                                                                     int64_t HS, float scale) {
    for (int64_t j = 0; j < n; j++) s[j] = ctl__dot(q, keys + j * stride, HS) * scale;
}

// One key's dot product, un-summed: HS 32 at a time in two FMA chains, a masked tail, then the
// chains added; ctl__hsum16 of it is the score.
__attribute__((target("avx512f"), always_inline)) static inline __m512 ctl__key_dot16(const float *q, const float *k, int64_t HS) {
    __m512 a = _mm512_setzero_ps(), b = a;
    int64_t c = 0;
    for (; c + 32 <= HS; c += 32)
        a = _mm512_fmadd_ps(_mm512_loadu_ps(q + c), _mm512_loadu_ps(k + c), a), b = _mm512_fmadd_ps(_mm512_loadu_ps(q + c + 16), _mm512_loadu_ps(k + c + 16), b);
    for (; c < HS; c += 16) {
        __mmask16 m = HS - c >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (HS - c)) - 1);
        a = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, q + c), _mm512_maskz_loadu_ps(m, k + c), a);
    }
    return _mm512_add_ps(a, b);
}

// Keys 16 at a time, their 16 horizontal sums at once by ctl__hsum16x16 (the same tree as
// ctl__hsum16, so a score does not depend on the keys around it), the rest one by one.
__attribute__((target("avx512f"))) static void ctl__key_scores_avx512(float *s, const float *q, const float *keys, int64_t stride, int64_t n,
                                                                       int64_t HS, float scale) {
    int64_t j = 0;
    for (; j + 16 <= n; j += 16) {
        __m512 v[16];
        for (int i = 0; i < 16; i++) v[(i % 4) * 4 + i / 4] = ctl__key_dot16(q, keys + (j + i) * stride, HS);   // lane 4a + b: v[a + 4b]
        _mm512_storeu_ps(s + j, _mm512_mul_ps(ctl__hsum16x16(v), _mm512_set1_ps(scale)));
    }
    for (; j < n; j++) s[j] = ctl__hsum16(ctl__key_dot16(q, keys + j * stride, HS)) * scale;
}
#endif

// The first key of block j0 that query t of row b may see: its document's start (keys before
// it belong to another packed document), relative to j0.
CTL__INLINE int64_t ctl__att_lo(const ctl__attn_args *A, int64_t b, int64_t t, int64_t j0) {
    return A->pos ? CTL__MAX((int64_t)0, t - A->pos[b * A->T + t] - j0) : 0;
}

// Task (b, h, block of query rows), tiled over blocks of keys: for each row t, keys 0..t, an
// online softmax (running max m and sum l; the output accumulator is rescaled when m grows).
CTL__INLINE void ctl__attention_rows(const ctl__attn_args *A, int64_t task) {
    int64_t T = A->T, NH = A->NH, NKV = A->NKV, HS = A->HS, QKV = (NH + 2 * NKV) * HS, nb = ctl__att_blocks(T);
    // Grouped-query attention (Ainslie et al. 2023): query head h reads kv head h / (NH/NKV). The
    // row state (acc, m, l) lives on the stack, so HS <= CTL__MAX_HEAD_DIM; a model's loader checks
    // that, the public wrappers do not.
    int64_t b = task / nb / NH, h = task / nb % NH, kvh = h / (NH / NKV), t0 = task % nb * CTL__ATT_BLOCK;
    int64_t t1 = CTL__MIN(T, t0 + CTL__ATT_BLOCK);
    float scale = 1.0f / sqrtf((float)HS), kt[CTL__MAX_HEAD_DIM * CTL__ATT_BLOCK], p[CTL__ATT_BLOCK];
    float acc[CTL__ATT_BLOCK][CTL__MAX_HEAD_DIM], m[CTL__ATT_BLOCK], l[CTL__ATT_BLOCK];
    for (int64_t i = 0; i < t1 - t0; i++) {
        m[i] = -INFINITY, l[i] = 0.0f;
        for (int64_t c = 0; c < HS; c++) acc[i][c] = 0.0f;
    }
    const float *keys = A->qkv + b * T * QKV + (NH + kvh) * HS, *vals = keys + NKV * HS;
    // Key blocks up to the last query of this block; each is transposed once for all its queries.
    for (int64_t j0 = 0; j0 < t1; j0 += CTL__ATT_BLOCK) {
        ctl__att_transpose(kt, keys + j0 * QKV, QKV, CTL__MIN((int64_t)CTL__ATT_BLOCK, t1 - j0), HS);
        // Queries before j0 see none of these keys. lo >= n: every key of the block belongs to an
        // earlier document.
        for (int64_t t = CTL__MAX(t0, j0), i = t - t0; t < t1; t++, i++) {
            int64_t n = CTL__MIN((int64_t)CTL__ATT_BLOCK, t + 1 - j0);   // causal: keys up to t
            int64_t lo = ctl__att_lo(A, b, t, j0);                       // and from its document's start
            if (lo >= n) continue;
            A->scores(p, A->qkv + (b * T + t) * QKV + h * HS, kt, HS, scale);
            // The max over this row's visible keys only; the others become -inf.
            float mx = m[i];
            for (int64_t j = 0; j < lo; j++) p[j] = -INFINITY;
            for (int64_t j = lo; j < n; j++) mx = CTL__MAX(mx, p[j]);
            // A new running max: what was summed under the old one is rescaled by e^(old - new).
            if (mx > m[i]) {
                float corr = expf(m[i] - mx);
                l[i] *= corr;
                for (int64_t c = 0; c < HS; c++) acc[i][c] *= corr;
                m[i] = mx;
            }
            for (int64_t j = 0; j < n; j++) p[j] -= mx;
            // The keys of other documents are zeroed after the exp, not left to it: ctl__exp8 clamps, so
            // e^-inf comes out near 1e-38 rather than 0.
            A->exp_span(p, n);
            for (int64_t j = 0; j < lo; j++) p[j] = 0.0f;
            for (int64_t j = 0; j < n; j++) l[i] += p[j];
            // acc += sum_j p_j v_j, the unnormalised output; divided by l once, at the end.
            A->accum(acc[i], p, vals + j0 * QKV, QKV, n, HS);
        }
    }
    // O = acc / l; lse = m + log l, from which the backward gets p = e^(s - lse) without the sums.
    for (int64_t t = t0, i = 0; t < t1; t++, i++) {
        float *o = A->out + (b * T + t) * NH * HS + h * HS;
        for (int64_t c = 0; c < HS; c++) o[c] = acc[i][c] / l[i];
        A->lse[(b * NH + h) * T + t] = m[i] + logf(l[i]);
    }
}

// Backward in two passes that each own what they write. With p = exp(s - lse), dp = dO.v and
// D = dO.O:  ds = p (dp - D);  dq += ds k / sqrt(HS);  dk += ds q / sqrt(HS);  dv += p dO.
// Pass 1, task (b, h, block of query rows): dq. Pass 2, task (b, kv head, block of keys): dk and
// dv over the query heads of its group. Both recompute p and ds, a block of keys at a time.
// ds of one query row against keys j0 .. j0+n (kt, vt their transposed keys and values).
CTL__INLINE void ctl__att_ds(const ctl__attn_args *A, float *p, float *ds, const float *q, const float *dO, const float *kt,
                             const float *vt, int64_t n, float lse, float D, float scale) {
    // p = e^(s - lse) is the forward's softmax without its sums, given the forward's lse. ds carries
    // the 1/sqrt(HS), so dq += ds k and dk += ds q need no further scale.
    A->scores(p, q, kt, A->HS, scale);
    for (int64_t j = 0; j < n; j++) p[j] -= lse;
    A->exp_span(p, n);
    A->scores(ds, dO, vt, A->HS, 1.0f);
    for (int64_t j = 0; j < n; j++) ds[j] = p[j] * (ds[j] - D) * scale;
}

// Pass 1. Task (b, h, block of query rows): D = dO . O for each row, then over the key blocks up
// to the row, ds and dq += ds k. It writes only its rows' query heads in dqkv.
CTL__INLINE void ctl__attention_back_q(const ctl__attn_args *A, int64_t task) {
    int64_t T = A->T, NH = A->NH, NKV = A->NKV, HS = A->HS, QKV = (NH + 2 * NKV) * HS, nb = ctl__att_blocks(T);
    int64_t b = task / nb / NH, h = task / nb % NH, kvh = h / (NH / NKV), t0 = task % nb * CTL__ATT_BLOCK;
    int64_t t1 = CTL__MIN(T, t0 + CTL__ATT_BLOCK);
    float scale = 1.0f / sqrtf((float)HS), kt[CTL__MAX_HEAD_DIM * CTL__ATT_BLOCK], vt[CTL__MAX_HEAD_DIM * CTL__ATT_BLOCK];
    float p[CTL__ATT_BLOCK], ds[CTL__ATT_BLOCK], D[CTL__ATT_BLOCK];
    const float *keys = A->qkv + b * T * QKV + (NH + kvh) * HS, *vals = keys + NKV * HS;
    // D = dO . O per row, the softmax backward's sum_j p_j dp_j without a pass over the keys.
    for (int64_t t = t0; t < t1; t++)
        D[t - t0] = ctl__dot(A->dout + (b * T + t) * NH * HS + h * HS, A->o + (b * T + t) * NH * HS + h * HS, HS);
    for (int64_t j0 = 0; j0 < t1; j0 += CTL__ATT_BLOCK) {
        int64_t nk = CTL__MIN((int64_t)CTL__ATT_BLOCK, t1 - j0);
        // Keys for the scores, values for dp = dO . v: both as columns, one vector loop per channel.
        ctl__att_transpose(kt, keys + j0 * QKV, QKV, nk, HS), ctl__att_transpose(vt, vals + j0 * QKV, QKV, nk, HS);
        for (int64_t t = CTL__MAX(t0, j0); t < t1; t++) {
            int64_t n = CTL__MIN((int64_t)CTL__ATT_BLOCK, t + 1 - j0), lo = ctl__att_lo(A, b, t, j0);
            if (lo >= n) continue;
            ctl__att_ds(A, p, ds, A->qkv + (b * T + t) * QKV + h * HS, A->dout + (b * T + t) * NH * HS + h * HS, kt, vt, n,
                        A->lse_in[(b * NH + h) * T + t], D[t - t0], scale);
            // Keys of an earlier document: no gradient (their p is not exactly 0 after ctl__exp8).
            for (int64_t j = 0; j < lo; j++) ds[j] = 0.0f;
            // dq += sum_j ds_j k_j, into this row's query head of dqkv.
            A->accum(A->dqkv + (b * T + t) * QKV + h * HS, ds, keys + j0 * QKV, QKV, n, HS);
        }
    }
}

// Pass 2. Task (b, kv head, block of keys): over every query head of the group and every query
// block from j0 on, p and ds as 32 x 32 tiles, then each key's dk and dv summed over the tile's
// queries. It writes only its keys' heads, so no two tasks write one value: no atomics, and a
// fixed order. The price: p and ds are computed twice (once per pass), and with packed documents
// every later query block is still visited, its p zeroed.
CTL__INLINE void ctl__attention_back_kv(const ctl__attn_args *A, int64_t task) {
    int64_t T = A->T, NH = A->NH, NKV = A->NKV, HS = A->HS, QKV = (NH + 2 * NKV) * HS, nb = ctl__att_blocks(T);
    int64_t b = task / nb / NKV, kvh = task / nb % NKV, group = NH / NKV, j0 = task % nb * CTL__ATT_BLOCK;
    int64_t nk = CTL__MIN((int64_t)CTL__ATT_BLOCK, T - j0);
    float scale = 1.0f / sqrtf((float)HS), kt[CTL__MAX_HEAD_DIM * CTL__ATT_BLOCK], vt[CTL__MAX_HEAD_DIM * CTL__ATT_BLOCK];
    float p[CTL__ATT_BLOCK][CTL__ATT_BLOCK], ds[CTL__ATT_BLOCK][CTL__ATT_BLOCK], pt[CTL__ATT_BLOCK], dst[CTL__ATT_BLOCK];
    int64_t kofs = (b * T + j0) * QKV + (NH + kvh) * HS, vofs = kofs + NKV * HS;
    // The block's keys and values, transposed once for every query head of the group.
    ctl__att_transpose(kt, A->qkv + kofs, QKV, nk, HS), ctl__att_transpose(vt, A->qkv + vofs, QKV, nk, HS);
    // Query heads h of the group in order, then query blocks in order: dk and dv sum in a fixed order.
    for (int64_t h = kvh * group; h < (kvh + 1) * group; h++)
        for (int64_t t0 = j0; t0 < T; t0 += CTL__ATT_BLOCK) {   // the queries that see this block's keys, a block at a time
            int64_t nt = CTL__MIN((int64_t)CTL__ATT_BLOCK, T - t0);
            const float *q0 = A->qkv + (b * T + t0) * QKV + h * HS, *dO0 = A->dout + (b * T + t0) * NH * HS + h * HS;
            for (int64_t i = 0; i < nt; i++) {   // rows of p and ds; keys past the query are 0
                int64_t t = t0 + i, n = CTL__MIN(nk, t + 1 - j0);
                const float *dO = dO0 + i * NH * HS;
                // n = the keys of this block the query sees (causally); the rest of the tile row is zeroed below,
                // and so are the keys of earlier documents.
                ctl__att_ds(A, p[i], ds[i], q0 + i * QKV, dO, kt, vt, n, A->lse_in[(b * NH + h) * T + t],
                            ctl__dot(dO, A->o + (b * T + t) * NH * HS + h * HS, HS), scale);
                for (int64_t j = n; j < CTL__ATT_BLOCK; j++) p[i][j] = ds[i][j] = 0.0f;
                for (int64_t j = 0, lo = CTL__MIN(ctl__att_lo(A, b, t, j0), (int64_t)CTL__ATT_BLOCK); j < lo; j++) p[i][j] = ds[i][j] = 0.0f;
            }
            for (int64_t j = 0; j < nk; j++) {   // dk_j += sum_t ds_tj q_t, dv_j += sum_t p_tj dO_t
                // A column of the tiles, copied so that accum reads its weights contiguously.
                for (int64_t i = 0; i < nt; i++) pt[i] = p[i][j], dst[i] = ds[i][j];
                // dk_j += sum_t ds_tj q_t and dv_j += sum_t p_tj dO_t, the queries in order.
                A->accum(A->dqkv + kofs + j * QKV, dst, q0, QKV, nt, HS);
                A->accum(A->dqkv + vofs + j * QKV, pt, dO0, NH * HS, nt, HS);
            }
        }
}

// The loops above are written so that compilers vectorise them; these wrappers compile them a
// second time for AVX2 (the same operations in wider registers) for CPUs that have it.
static void ctl__attention_task(void *arg, int64_t task, int thread) {
    (void)thread;
    ctl__attention_rows((const ctl__attn_args *)arg, task);
}

static void ctl__attention_back_q_task(void *arg, int64_t task, int thread) {
    (void)thread;
    ctl__attention_back_q((const ctl__attn_args *)arg, task);
}

static void ctl__attention_back_kv_task(void *arg, int64_t task, int thread) {
    (void)thread;
    ctl__attention_back_kv((const ctl__attn_args *)arg, task);
}

#ifdef CTL__AVX2
__attribute__((target("avx2,fma"))) static void ctl__attention_task_avx2(void *arg, int64_t task, int thread) {
    (void)thread;
    ctl__attention_rows((const ctl__attn_args *)arg, task);
}

__attribute__((target("avx2,fma"))) static void ctl__attention_back_q_task_avx2(void *arg, int64_t task, int thread) {
    (void)thread;
    ctl__attention_back_q((const ctl__attn_args *)arg, task);
}

__attribute__((target("avx2,fma"))) static void ctl__attention_back_kv_task_avx2(void *arg, int64_t task, int thread) {
    (void)thread;
    ctl__attention_back_kv((const ctl__attn_args *)arg, task);
}
#endif

// The AVX2 build of a task when the context uses AVX2, else the portable one.
static ctl_task_fn ctl__pick(const ctl_ctx *ctx, ctl_task_fn generic, ctl_task_fn avx2) {
    return ctx->simd >= CTL_SIMD_AVX2 && avx2 ? avx2 : generic;
}

// Tasks: B * NH * ceil(T/32), each writing its own rows of out and lse.
static void ctl__attention_forward(ctl_ctx *ctx, float *out, float *lse, const float *qkv, const int32_t *pos,
                               int64_t B, int64_t T, int64_t NH, int64_t NKV, int64_t HS) {
    ctl__attn_args A;
    memset(&A, 0, sizeof A);
    A.out = out, A.lse = lse, A.qkv = qkv, A.pos = pos, A.B = B, A.T = T, A.NH = NH, A.NKV = NKV, A.HS = HS;
    ctl__att_pick(ctx, &A);
    ctl_parallel_for(ctx, B * NH * ctl__att_blocks(T), ctl__pick(ctx, ctl__attention_task, CTL__AVX2_FN(ctl__attention_task_avx2)), &A);
}

// The two passes in turn, both adding into dqkv: dq, then dk and dv.
static void ctl__attention_backward(ctl_ctx *ctx, float *dqkv, const float *dout, const float *qkv, const float *out,
                               const float *lse, const int32_t *pos, int64_t B, int64_t T, int64_t NH, int64_t NKV, int64_t HS) {
    ctl__attn_args A;
    memset(&A, 0, sizeof A);
    A.dqkv = dqkv, A.dout = dout, A.qkv = qkv, A.o = out, A.lse_in = lse, A.pos = pos;
    A.B = B, A.T = T, A.NH = NH, A.NKV = NKV, A.HS = HS;
    ctl__att_pick(ctx, &A);
    ctl_parallel_for(ctx, B * NH * ctl__att_blocks(T), ctl__pick(ctx, ctl__attention_back_q_task, CTL__AVX2_FN(ctl__attention_back_q_task_avx2)), &A);
    ctl_parallel_for(ctx, B * NKV * ctl__att_blocks(T), ctl__pick(ctx, ctl__attention_back_kv_task, CTL__AVX2_FN(ctl__attention_back_kv_task_avx2)), &A);
}

// pos NULL: each row of T tokens is one document.
CTL_API void ctl_attention_forward(ctl_ctx *ctx, float *out, float *lse, const float *qkv,
                                   int64_t B, int64_t T, int64_t NH, int64_t NKV, int64_t HS) {
    if (!CTL__ARGS(ctx, ctx && out && lse && qkv && B >= 0 && T >= 0 && HS >= 0 && NKV >= 1 && NH % NKV == 0)) return;
    if (HS > CTL__MAX_HEAD_DIM) {   // (a row's accumulator lives on the stack)
        ctl__fail(ctx, CTL_ERR_UNSUPPORTED, "attention_forward: head size %" PRId64 " is above %d", HS, CTL__MAX_HEAD_DIM);
        return;
    }
    ctl__attention_forward(ctx, out, lse, qkv, NULL, B, T, NH, NKV, HS);
}

CTL_API void ctl_attention_backward(ctl_ctx *ctx, float *dqkv, const float *dout,
                                    const float *qkv, const float *out, const float *lse,
                                    int64_t B, int64_t T, int64_t NH, int64_t NKV, int64_t HS) {
    if (!CTL__ARGS(ctx, ctx && dout && qkv && out && lse && B >= 0 && T >= 0 && HS >= 0 && NKV >= 1 && NH % NKV == 0)) return;
    if (!dqkv) return;   // a NULL gradient output is skipped
    if (HS > CTL__MAX_HEAD_DIM) {
        ctl__fail(ctx, CTL_ERR_UNSUPPORTED, "attention_backward: head size %" PRId64 " is above %d", HS, CTL__MAX_HEAD_DIM);
        return;
    }
    ctl__attention_backward(ctx, dqkv, dout, qkv, out, lse, NULL, B, T, NH, NKV, HS);
}

// ---- attention over a KV cache (generation) --------------------------------------------------
//
// R query rows, row r of sequence seq[r] at position pos[r]: its keys and values go into the
// cache (L, S, max_len, NKV*HS) at (layer, seq, pos) first, then its query reads the cached
// keys 0..pos of its sequence. Keys below shared[s] are read from sequence parent[s] (a prompt
// fed once for several samples); parent and shared may be NULL (nothing shared).
typedef struct ctl__icache_args {
    float *out;
    const float *qkv, *kcache, *vcache;
    const int64_t *seq, *parent, *shared;
    const int32_t *pos;
    int64_t layer, S, max_len, NH, NKV, HS;
    void (*exp_span)(float *x, int64_t n);
    void (*scores)(float *s, const float *q, const float *keys, int64_t stride, int64_t n, int64_t HS, float scale);
    void (*accum)(float *dst, const float *w, const float *rows, int64_t stride, int64_t n, int64_t HS);
} ctl__icache_args;

// Row r's key and value heads (NKV*HS each, out of its qkv row) into the cache at (layer, seq[r],
// pos[r]). pos[r] < max_len is the caller's to ensure.
static void ctl__kv_store_cpu(ctl_ctx *ctx, float *kcache, float *vcache, const float *qkv, const int64_t *seq, const int32_t *pos,
                              int64_t R, int64_t layer, int64_t S, int64_t max_len, int64_t NH, int64_t NKV, int64_t HS) {
    int64_t KVD = NKV * HS, QKV = (NH + 2 * NKV) * HS;
    (void)ctx;
    for (int64_t r = 0; r < R; r++) {
        size_t at = (size_t)(((layer * S + seq[r]) * max_len + pos[r]) * KVD);
        memcpy(kcache + at, qkv + r * QKV + NH * HS, (size_t)KVD * sizeof(float));
        memcpy(vcache + at, qkv + r * QKV + (NH + NKV) * HS, (size_t)KVD * sizeof(float));
    }
}

// Task (row, head): the row's query against its sequence's cached keys, in blocks of up to 32
// keys with an online softmax (as the training forward's rows): the block's scores, its max,
// the running sum and accumulator rescaled when the max grows, e^(s - max) as a vector, and the
// values added in. A block never straddles the parent's keys and the sequence's own.
CTL__INLINE void ctl__attention_cached_rows(const ctl__icache_args *A, int64_t task) {
    int64_t NH = A->NH, HS = A->HS, KVD = A->NKV * HS, QKV = (NH + 2 * A->NKV) * HS;
    // n_all = pos + 1: the keys 0..pos, the row's own included (stored just before by kv_store).
    int64_t r = task / NH, h = task % NH, kvh = h / (NH / A->NKV), s = A->seq[r], sh = A->shared ? A->shared[s] : 0, n_all = A->pos[r] + 1;
    const float *q = A->qkv + r * QKV + h * HS;
    // The cache is (L, S, max_len, NKV*HS): own is this sequence's first key of head kvh, from its
    // parent's when the first sh keys are shared.
    size_t own = (size_t)((A->layer * A->S + s) * A->max_len * KVD + kvh * HS);
    size_t from = sh ? (size_t)((A->layer * A->S + A->parent[s]) * A->max_len * KVD + kvh * HS) : own;
    float scale = 1.0f / sqrtf((float)HS), m = -INFINITY, l = 0.0f, acc[CTL__MAX_HEAD_DIM], p[CTL__ATT_BLOCK];
    for (int64_t i = 0; i < HS; i++) acc[i] = 0.0f;
    for (int64_t j0 = 0; j0 < n_all;) {
        // A block ends at shared[s], so that it reads one sequence's rows: the parent's below, its own above.
        int64_t n = CTL__MIN((int64_t)CTL__ATT_BLOCK, (j0 < sh ? CTL__MIN(sh, n_all) : n_all) - j0);
        size_t at = (j0 < sh ? from : own) + (size_t)(j0 * KVD);
        A->scores(p, q, A->kcache + at, KVD, n, HS, scale);
        float mx = m;
        for (int64_t j = 0; j < n; j++) mx = CTL__MAX(mx, p[j]);
        if (mx > m) {
            // The running max grew: rescale what was summed under the old one.
            float corr = expf(m - mx);
            l *= corr;
            for (int64_t i = 0; i < HS; i++) acc[i] *= corr;
            m = mx;
        }
        for (int64_t j = 0; j < n; j++) p[j] -= mx;
        A->exp_span(p, n);
        for (int64_t j = 0; j < n; j++) l += p[j];
        A->accum(acc, p, A->vcache + at, KVD, n, HS);
        j0 += n;
    }
    float *o = A->out + r * NH * HS + h * HS;
    for (int64_t i = 0; i < HS; i++) o[i] = acc[i] / l;
}

static void ctl__attention_cached_task(void *arg, int64_t task, int thread) {
    (void)thread;
    ctl__attention_cached_rows((const ctl__icache_args *)arg, task);
}

#ifdef CTL__AVX2
__attribute__((target("avx2,fma"))) static void ctl__attention_cached_task_avx2(void *arg, int64_t task, int thread) {
    (void)thread;
    ctl__attention_cached_rows((const ctl__icache_args *)arg, task);
}
#endif

// Tasks: R * NH, each one row's head. The keys stored by rows take the dot-product scores
// (ctl__key_scores); the exp and value sums are the training forward's.
static void ctl__attention_cached_cpu(ctl_ctx *ctx, float *out, const float *qkv, const float *kcache, const float *vcache,
                                      const int64_t *seq, const int32_t *pos, const int64_t *parent, const int64_t *shared, int64_t R,
                                      int64_t layer, int64_t S, int64_t max_len, int64_t NH, int64_t NKV, int64_t HS) {
    ctl__icache_args A;
    ctl__attn_args pick;
    ctl__att_pick(ctx, &pick);
    A.out = out, A.qkv = qkv, A.kcache = kcache, A.vcache = vcache, A.seq = seq, A.parent = parent, A.shared = shared, A.pos = pos;
    A.layer = layer, A.S = S, A.max_len = max_len, A.NH = NH, A.NKV = NKV, A.HS = HS;
    A.exp_span = pick.exp_span, A.accum = pick.accum, A.scores = ctl__key_scores;
#ifdef CTL__AVX2
    if (ctx->simd >= CTL_SIMD_AVX2) A.scores = ctl__key_scores_avx2;
    if (ctx->simd == CTL_SIMD_AVX512) A.scores = ctl__key_scores_avx512;
#endif
    ctl_parallel_for(ctx, R * NH, ctl__pick(ctx, ctl__attention_cached_task, CTL__AVX2_FN(ctl__attention_cached_task_avx2)), &A);
}

// ---- activations -----------------------------------------------------------------------------
// Elementwise operations run as "rows" of 4096 values (C = 4096 per row; the last row short).
#define CTL__ELEMS 4096
#define CTL__GELU_K 0.7978845608028654f   // sqrt(2/pi)

// The scalar loops work on a span [i, end) so that the AVX2 rows can hand them their tails.
// GELU, tanh approximation (Hendrycks & Gimpel 2016), as GPT-2 uses.
static void ctl__gelu_span(float *out, const float *in, int64_t i, int64_t end) {
    for (; i < end; i++) {
        float x = in[i];
        out[i] = 0.5f * x * (1.0f + tanhf(CTL__GELU_K * (x + 0.044715f * x * x * x)));
    }
}

// d/dx 0.5 x (1 + tanh u) = 0.5 (1 + tanh u) + 0.5 x (1 - tanh^2 u) du/dx, du/dx = K (1 + 3 * 0.044715 x^2).
static void ctl__gelu_back_span(float *dinp, const float *dout, const float *in, int64_t i, int64_t end) {
    for (; i < end; i++) {
        float x = in[i], th = tanhf(CTL__GELU_K * (x + 0.044715f * x * x * x));
        float sech2 = 1.0f - th * th;
        float grad = 0.5f * (1.0f + th) + 0.5f * x * sech2 * CTL__GELU_K * (1.0f + 3.0f * 0.044715f * x * x);
        dinp[i] += grad * dout[i];
    }
}

// SwiGLU (Shazeer 2020): silu(gate) * up, silu(g) = g sigmoid(g).
static void ctl__swiglu_span(float *out, const float *gate, const float *up, int64_t i, int64_t end) {
    for (; i < end; i++) out[i] = gate[i] / (1.0f + expf(-gate[i])) * up[i];
}

// d silu(g)/dg = sig(g) (1 + g (1 - sig(g))).
static void ctl__swiglu_back_span(float *dgate, float *dup, const float *gate, const float *up,
                                  const float *dout, int64_t i, int64_t end) {
    for (; i < end; i++) {
        float g = gate[i], sig = 1.0f / (1.0f + expf(-g));
        dgate[i] += dout[i] * up[i] * sig * (1.0f + g * (1.0f - sig));
        dup[i] += dout[i] * g * sig;
    }
}

// The row functions. GELU: in = x, in2 = dout, out = y or dinp, C = the count of all values, and
// a "row" is CTL__ELEMS of them. SwiGLU: a row of in (N, 2*FF) is the gate's FF values then up's,
// C = FF; out is (N,FF) forward and (N, 2*FF) backward, in2 = dout (N,FF).
static void ctl__gelu_row(const ctl__rows_args *r, int64_t row) {
    ctl__gelu_span(r->out, r->in, row * CTL__ELEMS, CTL__MIN(r->C, (row + 1) * CTL__ELEMS));
}

static void ctl__gelu_back_row(const ctl__rows_args *r, int64_t row) {
    ctl__gelu_back_span(r->out, r->in2, r->in, row * CTL__ELEMS, CTL__MIN(r->C, (row + 1) * CTL__ELEMS));
}

static void ctl__swiglu_row(const ctl__rows_args *r, int64_t n) {
    const float *gate = r->in + n * 2 * r->C;
    ctl__swiglu_span(r->out + n * r->C, gate, gate + r->C, 0, r->C);
}

static void ctl__swiglu_back_row(const ctl__rows_args *r, int64_t n) {
    const float *gate = r->in + n * 2 * r->C;
    // dinp is (N, 2*FF) like inp: the gate's gradient, then up's.
    float *dgate = r->out + n * 2 * r->C;
    ctl__swiglu_back_span(dgate, dgate + r->C, gate, gate + r->C, r->in2 + n * r->C, 0, r->C);
}

#ifdef CTL__AVX2

// The AVX2 rows use ctl__exp8 (within 2 ulp) where the loops above use expf and tanhf, so an AVX2
// context's activations differ from a portable one's in the last bits. A context keeps its choice
// for its life, so its own runs agree.

// tanh u = 1 - 2 / (e^(2u) + 1): exact at both ends, about 1e-7 absolute near 0.
__attribute__((target("avx2,fma"))) static inline __m256 ctl__tanh8(__m256 u) {
    __m256 one = _mm256_set1_ps(1.0f), e = ctl__exp8(_mm256_add_ps(u, u));
    return _mm256_sub_ps(one, _mm256_div_ps(_mm256_set1_ps(2.0f), _mm256_add_ps(e, one)));
}

// 1 / (1 + e^-x), with ctl__exp8's clamp: a very negative x gives about 3e-39 where expf gives 0.
__attribute__((target("avx2,fma"))) static inline __m256 ctl__sigmoid8(__m256 x) {
    __m256 one = _mm256_set1_ps(1.0f);
    return _mm256_div_ps(one, _mm256_add_ps(one, ctl__exp8(_mm256_sub_ps(_mm256_setzero_ps(), x))));
}

// u = sqrt(2/pi) (x + 0.044715 x^3)
__attribute__((target("avx2,fma"))) static inline __m256 ctl__gelu_u8(__m256 x) {
    __m256 x3 = _mm256_mul_ps(_mm256_mul_ps(x, x), x);
    return _mm256_mul_ps(_mm256_set1_ps(CTL__GELU_K), _mm256_fmadd_ps(_mm256_set1_ps(0.044715f), x3, x));
}

__attribute__((target("avx2,fma"))) static void ctl__gelu_row_avx2(const ctl__rows_args *r, int64_t row) {
    int64_t i = row * CTL__ELEMS, end = CTL__MIN(r->C, (row + 1) * CTL__ELEMS);
    __m256 half = _mm256_set1_ps(0.5f), one = _mm256_set1_ps(1.0f);
    for (; i + 8 <= end; i += 8) {
        __m256 x = _mm256_loadu_ps(r->in + i), th = ctl__tanh8(ctl__gelu_u8(x));
        _mm256_storeu_ps(r->out + i, _mm256_mul_ps(_mm256_mul_ps(half, x), _mm256_add_ps(one, th)));
    }
    ctl__gelu_span(r->out, r->in, i, end);
}

__attribute__((target("avx2,fma"))) static void ctl__gelu_back_row_avx2(const ctl__rows_args *r, int64_t row) {
    int64_t i = row * CTL__ELEMS, end = CTL__MIN(r->C, (row + 1) * CTL__ELEMS);
    __m256 half = _mm256_set1_ps(0.5f), one = _mm256_set1_ps(1.0f), k3 = _mm256_set1_ps(3.0f * 0.044715f);
    for (; i + 8 <= end; i += 8) {
        __m256 x = _mm256_loadu_ps(r->in + i), th = ctl__tanh8(ctl__gelu_u8(x));
        __m256 sech2 = _mm256_fnmadd_ps(th, th, one);
        __m256 du = _mm256_mul_ps(_mm256_set1_ps(CTL__GELU_K), _mm256_fmadd_ps(k3, _mm256_mul_ps(x, x), one));
        __m256 grad = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_mul_ps(half, x), sech2), du,
                                      _mm256_mul_ps(half, _mm256_add_ps(one, th)));
        __m256 d = _mm256_loadu_ps(r->out + i);
        _mm256_storeu_ps(r->out + i, _mm256_fmadd_ps(grad, _mm256_loadu_ps(r->in2 + i), d));
    }
    ctl__gelu_back_span(r->out, r->in2, r->in, i, end);
}

__attribute__((target("avx2,fma"))) static void ctl__swiglu_row_avx2(const ctl__rows_args *r, int64_t n) {
    int64_t FF = r->C, i = 0;
    const float *gate = r->in + n * 2 * FF, *up = gate + FF;
    float *out = r->out + n * FF;
    for (; i + 8 <= FF; i += 8) {
        __m256 g = _mm256_loadu_ps(gate + i);
        _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_mul_ps(g, ctl__sigmoid8(g)), _mm256_loadu_ps(up + i)));
    }
    ctl__swiglu_span(out, gate, up, i, FF);
}

__attribute__((target("avx2,fma"))) static void ctl__swiglu_back_row_avx2(const ctl__rows_args *r, int64_t n) {
    int64_t FF = r->C, i = 0;
    const float *gate = r->in + n * 2 * FF, *up = gate + FF, *dout = r->in2 + n * FF;
    float *dgate = r->out + n * 2 * FF, *dup = dgate + FF;
    __m256 one = _mm256_set1_ps(1.0f);
    for (; i + 8 <= FF; i += 8) {
        __m256 g = _mm256_loadu_ps(gate + i), sig = ctl__sigmoid8(g), d = _mm256_loadu_ps(dout + i);
        __m256 dsilu = _mm256_mul_ps(sig, _mm256_fmadd_ps(g, _mm256_sub_ps(one, sig), one));
        __m256 du = _mm256_mul_ps(d, _mm256_loadu_ps(up + i));
        _mm256_storeu_ps(dgate + i, _mm256_fmadd_ps(du, dsilu, _mm256_loadu_ps(dgate + i)));
        _mm256_storeu_ps(dup + i, _mm256_fmadd_ps(_mm256_mul_ps(d, g), sig, _mm256_loadu_ps(dup + i)));
    }
    ctl__swiglu_back_span(dgate, dup, gate, up, dout, i, FF);
}
#endif

CTL_API void ctl_gelu_forward(ctl_ctx *ctx, float *out, const float *inp, int64_t n) {
    if (!CTL__ARGS(ctx, ctx && out && inp && n >= 0)) return;
    // n values as rows of CTL__ELEMS, so that a long vector still splits over the threads.
    ctl__rows_args r = ctl__rows(ctx, ctl__gelu_row, CTL__AVX2_FN(ctl__gelu_row_avx2), (n + CTL__ELEMS - 1) / CTL__ELEMS);
    r.out = out, r.in = inp, r.C = n;
    ctl__rows_parallel(ctx, &r);
}

CTL_API void ctl_gelu_backward(ctl_ctx *ctx, float *dinp, const float *dout, const float *inp,
                               int64_t n) {
    if (!CTL__ARGS(ctx, ctx && dout && inp && n >= 0) || !dinp) return;
    ctl__rows_args r = ctl__rows(ctx, ctl__gelu_back_row, CTL__AVX2_FN(ctl__gelu_back_row_avx2), (n + CTL__ELEMS - 1) / CTL__ELEMS);
    r.out = dinp, r.in = inp, r.in2 = dout, r.C = n;
    ctl__rows_parallel(ctx, &r);
}

CTL_API void ctl_swiglu_forward(ctl_ctx *ctx, float *out, const float *inp, int64_t N, int64_t FF) {
    if (!CTL__ARGS(ctx, ctx && out && inp && N >= 0 && FF >= 0)) return;
    ctl__rows_args r = ctl__rows(ctx, ctl__swiglu_row, CTL__AVX2_FN(ctl__swiglu_row_avx2), N);
    r.out = out, r.in = inp, r.C = FF;
    ctl__rows_parallel(ctx, &r);
}

CTL_API void ctl_swiglu_backward(ctl_ctx *ctx, float *dinp, const float *dout, const float *inp,
                                 int64_t N, int64_t FF) {
    if (!CTL__ARGS(ctx, ctx && dout && inp && N >= 0 && FF >= 0) || !dinp) return;
    ctl__rows_args r = ctl__rows(ctx, ctl__swiglu_back_row, CTL__AVX2_FN(ctl__swiglu_back_row_avx2), N);
    r.out = dinp, r.in = inp, r.in2 = dout, r.C = FF;
    ctl__rows_parallel(ctx, &r);
}

// out = a + b over n values (out may be a or b). It takes no context, so it runs on the calling
// thread; the backward adds dout into each gradient that is not NULL.
CTL_API void ctl_residual_forward(float *out, const float *a, const float *b, int64_t n) {
    if (!CTL__ARGS(NULL, out && a && b && n >= 0)) return;
    for (int64_t i = 0; i < n; i++) out[i] = a[i] + b[i];
}

CTL_API void ctl_residual_backward(float *da, float *db, const float *dout, int64_t n) {
    if (!CTL__ARGS(NULL, dout && n >= 0)) return;
    for (int64_t i = 0; i < n; i++) {
        if (da) da[i] += dout[i];
        if (db) db[i] += dout[i];
    }
}

// ---- fused LM head + log-softmax -------------------------------------------------------------

// Row n of a chunk of logits z (V): lse = log sum exp(z * inv_temp), summed in double. With
// out3, also the entropy -sum p log p = log S - sum e^u u / S, u = z s - max, S = sum e^u.
// in = the chunk's logits, scalar = inv_temp, ids = targets; out = lse, out2 = the target's log-prob,
// out3 = the entropy or NULL. The max is taken first so that no e^u overflows.
static void ctl__lse_row(const ctl__rows_args *r, int64_t n) {
    const float *z = r->in + n * r->V;
    float s = r->scalar, mx = -INFINITY;
    for (int64_t v = 0; v < r->V; v++) mx = CTL__MAX(mx, z[v] * s);
    // The sums in double: V terms (tens of thousands) of very different sizes.
    double sum = 0.0, su = 0.0;
    for (int64_t v = 0; v < r->V; v++) {
        float u = z[v] * s - mx, e = expf(u);
        sum += e, su += (double)e * u;
    }
    float lse = mx + (float)log(sum);
    r->out[n] = lse;                                  // lse of this row
    r->out2[n] = z[r->ids[n]] * s - lse;              // log-prob of its target
    if (r->out3) r->out3[n] = (float)(log(sum) - su / sum);
}

// d logp / d z_v = inv_temp * (1[v = target] - softmax_v): a chunk's logits become their
// gradient in place. Chunk row n is batch row ids[n] (rows with zero dlogp were left out).
static void ctl__dlogits_span(float *z, float inv_temp, float g, float lse, int64_t v, int64_t V) {
    for (; v < V; v++) z[v] = -g * expf(z[v] * inv_temp - lse);
}

// out = the chunk's logits, made their gradient; in = dlogp (N), in2 = lse (N), ids = the chunk's
// batch rows, ids2 = targets (N), scalar = inv_temp.
static void ctl__dlogits_row(const ctl__rows_args *r, int64_t n) {
    float *z = r->out + n * r->V;
    int64_t row = r->ids[n];
    ctl__dlogits_span(z, r->scalar, r->in[row] * r->scalar, r->in2[row], 0, r->V);
    z[r->ids2[row]] += r->in[row] * r->scalar;
}

#ifdef CTL__AVX2
// The max in eight lanes, then e^(z s - max) summed in eight float lanes that are flushed into
// a double every 512 values (so no float sum grows past 64 terms per lane).
__attribute__((target("avx2,fma"))) static void ctl__lse_row_avx2(const ctl__rows_args *r, int64_t n) {
    const float *z = r->in + n * r->V;
    int64_t V = r->V, v = 0;
    float s = r->scalar, mx = -INFINITY, lanes[8];
    __m256 vs = _mm256_set1_ps(s), vmx = _mm256_set1_ps(-INFINITY);
    // Pass 1: the max of z * inv_temp, eight lanes then the tail.
    for (; v + 8 <= V; v += 8) vmx = _mm256_max_ps(vmx, _mm256_mul_ps(_mm256_loadu_ps(z + v), vs));
    _mm256_storeu_ps(lanes, vmx);
    for (int k = 0; k < 8; k++) mx = CTL__MAX(mx, lanes[k]);
    for (; v < V; v++) mx = CTL__MAX(mx, z[v] * s);
    double sum = 0.0, su = 0.0;
    __m256 neg = _mm256_set1_ps(-mx);
    float lanes2[8];
    // Pass 2: e^(z s - max) and, for the entropy, e^u u, in float lanes flushed to double per 512.
    for (v = 0; v + 8 <= V;) {
        __m256 acc = _mm256_setzero_ps(), acc2 = _mm256_setzero_ps();
        for (int64_t end = CTL__MIN(V - V % 8, v + 512); v < end; v += 8) {
            __m256 u = _mm256_fmadd_ps(_mm256_loadu_ps(z + v), vs, neg), e = ctl__exp8(u);
            acc = _mm256_add_ps(acc, e);
            if (r->out3) acc2 = _mm256_fmadd_ps(e, u, acc2);
        }
        _mm256_storeu_ps(lanes, acc);
        _mm256_storeu_ps(lanes2, acc2);
        for (int k = 0; k < 8; k++) sum += lanes[k], su += lanes2[k];
    }
    // The last V % 8 values singly, as the portable row takes them all.
    for (; v < V; v++) {
        float u = z[v] * s - mx, e = expf(u);
        sum += e, su += (double)e * u;
    }
    float lse = mx + (float)log(sum);
    r->out[n] = lse;
    r->out2[n] = z[r->ids[n]] * s - lse;
    if (r->out3) r->out3[n] = (float)(log(sum) - su / sum);
}

// ctl__dlogits_row with ctl__exp8.
__attribute__((target("avx2,fma"))) static void ctl__dlogits_row_avx2(const ctl__rows_args *r, int64_t n) {
    float *z = r->out + n * r->V;
    int64_t row = r->ids[n], v = 0;
    float g = r->in[row] * r->scalar;
    __m256 vs = _mm256_set1_ps(r->scalar), nl = _mm256_set1_ps(-r->in2[row]), ng = _mm256_set1_ps(-g);
    for (; v + 8 <= r->V; v += 8)
        _mm256_storeu_ps(z + v, _mm256_mul_ps(ng, ctl__exp8(_mm256_fmadd_ps(_mm256_loadu_ps(z + v), vs, nl))));
    ctl__dlogits_span(z, r->scalar, g, r->in2[row], v, r->V);
    z[r->ids2[row]] += g;
}
#endif

// Scratch: chunk * (V + 2*C + 2*r + 1) floats.
// x (N,C); logp (N) the targets' log-probabilities under softmax(x W^T inv_temp), lse (N), entropy
// (N) or NULL. Logits are made `chunk` rows at a time into scratch and reduced at once, so a batch
// never holds N x V of them; chunk trades that memory for larger products. The forward uses
// chunk * V floats of scratch; the size above is the backward's.
static void ctl__lmhead_forward(ctl_ctx *ctx, float *logp, float *lse, float *entropy, const float *x, const ctl__head *hd,
                                const int32_t *targets, int64_t N, int64_t C, int64_t V, float inv_temp,
                                float *scratch, int64_t chunk) {
    for (int64_t r0 = 0; r0 < N; r0 += chunk) {
        int64_t rows = CTL__MIN(chunk, N - r0);
        // logits (rows,V) = x W^T (+ h lora_b^T), then each row reduced on its own.
        ctl__gemm_wt(ctx, rows, V, C, x + r0 * C, C, hd->type, hd->w, scratch, V, false);
        if (hd->r) ctl_gemm(ctx, rows, V, hd->r, hd->h + r0 * hd->r, hd->r, 1, hd->lora_b, 1, hd->r, scratch, V, true);
        ctl__rows_args r = ctl__rows(ctx, ctl__lse_row, CTL__AVX2_FN(ctl__lse_row_avx2), rows);
        r.in = scratch, r.out = lse + r0, r.out2 = logp + r0, r.out3 = entropy ? entropy + r0 : NULL;
        r.ids = targets + r0, r.V = V, r.scalar = inv_temp;
        ctl__rows_parallel(ctx, &r);
    }
}

// The backward keeps nothing from the forward but lse: each chunk's logits are made again, for
// the rows whose dlogp is not zero only (prompt tokens under a loss mask carry none). Then: the
// logits become d logits in place, dx (N,C) += dz W, dw (V,C) += dz^T x, and the head's LoRA
// pieces. dh is written for the gathered rows only: the caller zeroes it first.
static void ctl__lmhead_backward(ctl_ctx *ctx, float *dx, float *dw, const float *dlogp, const float *x,
                                 const ctl__head *hd, const int32_t *targets, const float *lse, int64_t N,
                                 int64_t C, int64_t V, float inv_temp, float *scratch, int64_t chunk) {
    int64_t R = hd->r;
    // Scratch: z (chunk,V), the gathered xs and their dxs (chunk,C), hs and dhs (chunk,R), row ids.
    float *z = scratch, *xs = z + chunk * V, *dxs = xs + chunk * C, *hs = dxs + chunk * C, *dhs = hs + chunk * R;
    int32_t *rows = (int32_t *)(dhs + chunk * R);
    for (int64_t next = 0; next < N;) {
        int64_t n = 0;   // gather the next `chunk` rows that carry gradient
        for (; next < N && n < chunk; next++)
            if (dlogp[next] != 0.0f) {
                rows[n] = (int32_t)next;
                memcpy(xs + n * C, x + next * C, C * sizeof(float));
                if (R) memcpy(hs + n * R, hd->h + next * R, R * sizeof(float));
                n++;
            }
        if (n == 0) break;
        ctl__gemm_wt(ctx, n, V, C, xs, C, hd->type, hd->w, z, V, false);
        if (R) ctl_gemm(ctx, n, V, R, hs, R, 1, hd->lora_b, 1, R, z, V, true);
        ctl__rows_args r = ctl__rows(ctx, ctl__dlogits_row, CTL__AVX2_FN(ctl__dlogits_row_avx2), n);
        r.out = z, r.in = dlogp, r.in2 = lse, r.ids = rows, r.ids2 = targets, r.V = V, r.scalar = inv_temp;
        ctl__rows_parallel(ctx, &r);
        if (dx) {
            // Into a buffer, then scattered back to the gathered rows.
            ctl__gemm_wn(ctx, n, C, V, z, V, hd->type, hd->w, dxs, C, false);
            for (int64_t i = 0; i < n; i++)
                for (int64_t c = 0; c < C; c++) dx[(int64_t)rows[i] * C + c] += dxs[i * C + c];
        }
        // Chunks in row order, each adding into dw: a fixed sum.
        if (dw) ctl_gemm(ctx, V, C, n, z, 1, V, xs, C, 1, dw, C, true);
        // dh (N,R) = dz lora_b, written into the gathered rows; dlora_b (V,R) += dz^T h.
        if (R && hd->dh) {
            ctl_gemm(ctx, n, R, V, z, V, 1, hd->lora_b, R, 1, dhs, R, false);
            for (int64_t i = 0; i < n; i++) memcpy(hd->dh + (int64_t)rows[i] * R, dhs + i * R, R * sizeof(float));
        }
        if (R && hd->dlora_b) ctl_gemm(ctx, V, R, n, z, 1, V, hs, R, 1, hd->dlora_b, R, true);
    }
}

// The public pair: an fp32 head without LoRA.
CTL_API void ctl_lmhead_forward(ctl_ctx *ctx, float *logp, float *lse, const float *x,
                                const float *w, const int32_t *targets, int64_t N, int64_t C,
                                int64_t V, float inv_temp, float *scratch, int64_t chunk) {
    if (!CTL__ARGS(ctx, ctx && logp && lse && x && w && targets && scratch && N >= 0 && C >= 0 && V >= 1 && chunk >= 1)) return;
    ctl__head hd;
    memset(&hd, 0, sizeof hd);
    hd.type = CTL_F32, hd.w = w;
    ctl__lmhead_forward(ctx, logp, lse, NULL, x, &hd, targets, N, C, V, inv_temp, scratch, chunk);
}

CTL_API void ctl_lmhead_backward(ctl_ctx *ctx, float *dx, float *dw, const float *dlogp,
                                 const float *x, const float *w, const int32_t *targets,
                                 const float *lse, int64_t N, int64_t C, int64_t V,
                                 float inv_temp, float *scratch, int64_t chunk) {
    if (!CTL__ARGS(ctx, ctx && dlogp && x && w && targets && lse && scratch && N >= 0 && C >= 0 && V >= 1 && chunk >= 1)) return;
    ctl__head hd;
    memset(&hd, 0, sizeof hd);
    hd.type = CTL_F32, hd.w = w;
    ctl__lmhead_backward(ctx, dx, dw, dlogp, x, &hd, targets, lse, N, C, V, inv_temp, scratch, chunk);
}

// ---- adapter kernels -------------------------------------------------------------------------
//
// The pieces the adapters of "the linear layer, with its adapters" (>>impl:adapters) are made
// of, on the CPU; cotlab_cuda.cu has each under the same name with ctl__cuda_ in front.

// Row o of a (rows, cols) matrix stored as `type`, as fp32: in place when it is fp32, else
// dequantised into buf.
static const float *ctl__row_f32(ctl_dtype type, const void *w, int64_t cols, int64_t o, float *buf) {
    if (type == CTL_F32) return (const float *)w + o * cols;
    ctl__dequant_span(type, (const unsigned char *)w + (size_t)o * ctl_dtype_bytes(type, cols), 0, cols, buf);
    return buf;
}

// The dropout mask of element i (seeded per forward and adapter): kept when hash >= p.
// SplitMix64's finaliser over seed + i * 2^64/phi: a hash of (seed, i) alone, so the backward
// recomputes the mask instead of storing it, and any thread order gives the same mask.
static bool ctl__keep(uint64_t seed, int64_t i, float p) {
    uint64_t x = seed + (uint64_t)i * 0x9E3779B97F4A7C15ull;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    return (double)((x ^ (x >> 31)) >> 40) * (1.0 / 16777216.0) >= p;
}

// dst (+)= mask (.) src / (1 - p) over n values.
// Inverted dropout (Srivastava et al. 2014): kept values are scaled at training time, so
// inference needs nothing. p < 1.
static void ctl__dropout(float *dst, const float *src, int64_t n, float p, uint64_t seed, bool accumulate) {
    float inv = 1.0f / (1.0f - p);
    for (int64_t i = 0; i < n; i++) {
        float v = ctl__keep(seed, i, p) ? src[i] * inv : 0.0f;
        dst[i] = accumulate ? dst[i] + v : v;
    }
}

// The backend table's signature (a context, unused on the CPU).
static void ctl__dropout_cpu(ctl_ctx *ctx, float *dst, const float *src, int64_t n, float p, uint64_t seed, bool accumulate) {
    (void)ctx;
    ctl__dropout(dst, src, n, p, seed, accumulate);
}

// LoRA on a linear layer: h (N,R) = scale x A^T, then out (N,OC; row stride ldo) += h B^T.
// LoRA (Hu et al. 2021) with scale = alpha / rank. h is kept: the backward needs it for dB. Two
// thin products (R is small) instead of forming B A, which would cost OC x C.
static void ctl__lora_forward_cpu(ctl_ctx *ctx, float *out, int64_t ldo, float *h, const float *x, const float *A, const float *B,
                                  int64_t N, int64_t C, int64_t OC, int64_t R, float scale) {
    ctl_gemm(ctx, N, R, C, x, C, 1, A, 1, C, h, R, false);
    // The scale goes on h (N x R values) rather than on A or B, which are the trained parameters.
    for (int64_t i = 0; i < N * R; i++) h[i] *= scale;
    ctl_gemm(ctx, N, OC, R, h, R, 1, B, 1, R, out, ldo, true);
}

// Its backward, dy's rows ldy apart: dB (OC,R) += dy^T h; dh (N,R) = scale dy B (written);
// dA (R,C) += dh^T x; dx (N,C) += dh A. Any gradient may be NULL but dh.
static void ctl__lora_backward_cpu(ctl_ctx *ctx, float *dx, float *dA, float *dB, float *dh, const float *dy, int64_t ldy,
                                   const float *x, const float *h, const float *A, const float *B, int64_t N, int64_t C, int64_t OC,
                                   int64_t R, float scale) {
    // dh is written, not added: it is this call's scratch, needed before dA and dx.
    if (dB) ctl_gemm(ctx, OC, R, N, dy, 1, ldy, h, R, 1, dB, R, true);
    ctl_gemm(ctx, N, R, OC, dy, ldy, 1, B, R, 1, dh, R, false);
    for (int64_t i = 0; i < N * R; i++) dh[i] *= scale;
    if (dA) ctl_gemm(ctx, R, C, N, dh, 1, R, x, C, 1, dA, C, true);
    if (dx) ctl_gemm(ctx, N, C, R, dh, R, 1, A, C, 1, dx, C, true);
}

// DoRA's row norms nrm (OC) = ||W + scale B A|| of W (OC,C) stored as `type`, and g = mag / nrm
// (g may be NULL); hold keeps nrm as it is and only recomputes g. rowbuf: 2 C floats per thread.
typedef struct ctl__dora_args {
    ctl_dtype type;
    const void *w;
    const float *A, *B, *mag;
    float *nrm, *g, *rowbuf;
    int64_t rows, cols, rank;
    float scale;
} ctl__dora_args;

// 16 rows a task. Row o of W + scale B A is built in the thread's rowbuf (the first C floats
// receive a dequantised row of W), and its norm summed in double.
static void ctl__dora_task(void *arg, int64_t task, int thread) {
    const ctl__dora_args *d = (const ctl__dora_args *)arg;
    float *buf = d->rowbuf + (int64_t)thread * 2 * d->cols, *row = buf + d->cols;
    for (int64_t o = task * 16; o < CTL__MIN(d->rows, (task + 1) * 16); o++) {
        memcpy(row, ctl__row_f32(d->type, d->w, d->cols, o, buf), (size_t)d->cols * sizeof(float));
        // row += scale * sum_j B[o][j] A[j]: W's row o plus the LoRA's, one rank at a time.
        for (int64_t j = 0; j < d->rank; j++) ctl__axpy(row, d->scale * d->B[o * d->rank + j], d->A + j * d->cols, d->cols);
        double sq = 0.0;
        for (int64_t c = 0; c < d->cols; c++) sq += (double)row[c] * row[c];
        // A zero row (W + BA) gives nrm = 0 and g = inf: nothing guards it here.
        d->nrm[o] = (float)sqrt(sq);
        if (d->g) d->g[o] = d->mag[o] / d->nrm[o];
    }
}

// DoRA (Liu et al. 2024). With hold, g is required; without it, g may be NULL.
static void ctl__dora_norms_cpu(ctl_ctx *ctx, float *nrm, float *g, ctl_dtype type, const void *w, const float *A, const float *B,
                                const float *mag, int64_t OC, int64_t C, int64_t R, float scale, bool hold, float *rowbuf) {
    // hold: the norms of the last computation stay (the tests' finite differences treat them as
    // constants, as DoRA's gradient does); only g follows the magnitudes.
    if (hold) {
        for (int64_t o = 0; o < OC; o++) g[o] = mag[o] / nrm[o];
        return;
    }
    ctl__dora_args d;
    d.type = type, d.w = w, d.A = A, d.B = B, d.mag = mag, d.nrm = nrm, d.g = g, d.rowbuf = rowbuf;
    d.rows = OC, d.cols = C, d.rank = R, d.scale = scale;
    // 16 rows a task; the thread's share of rowbuf is its scratch.
    ctl_parallel_for(ctx, (OC + 15) / 16, ctl__dora_task, &d);
}

// dst (N,OC) = (g - sub) (.) src, src's rows ld apart.
static void ctl__cols_scale_cpu(ctl_ctx *ctx, float *dst, const float *src, int64_t ld, const float *g, float sub, int64_t N, int64_t OC) {
    (void)ctx;
    for (int64_t n = 0; n < N; n++)
        for (int64_t o = 0; o < OC; o++) dst[n * OC + o] = (g[o] - sub) * src[n * ld + o];
}

// dst (N,OC) = src - bias (bias may be NULL), src's rows ld apart.
static void ctl__cols_sub_cpu(ctl_ctx *ctx, float *dst, const float *src, int64_t ld, const float *bias, int64_t N, int64_t OC) {
    (void)ctx;
    for (int64_t n = 0; n < N; n++)
        for (int64_t o = 0; o < OC; o++) dst[n * OC + o] = src[n * ld + o] - (bias ? bias[o] : 0.0f);
}

// DoRA's output (rows ld apart): y = g (.) z + bias, or with u (its dropout path) y += g (.) z - u.
static void ctl__dora_out_cpu(ctl_ctx *ctx, float *y, int64_t ld, const float *z, const float *u, const float *bias, const float *g,
                              int64_t N, int64_t OC) {
    (void)ctx;
    for (int64_t n = 0; n < N; n++)
        for (int64_t o = 0; o < OC; o++) {
            float *yo = &y[n * ld + o], gz = g[o] * z[n * OC + o];
            *yo = u ? *yo + gz - u[n * OC + o] : gz + (bias ? bias[o] : 0.0f);
        }
}

// DoRA's backward from dy (rows ld apart): dm += column sums of dy (.) z / nrm, db += those of
// dy (either may be NULL), and with scale_dy dy = g (.) dy in place.
static void ctl__dora_backward_cpu(ctl_ctx *ctx, float *dm, float *db, float *dy, int64_t ld, const float *z, const float *nrm,
                                   const float *g, bool scale_dy, int64_t N, int64_t OC) {
    (void)ctx;
    for (int64_t n = 0; n < N; n++)
        for (int64_t o = 0; o < OC; o++) {
            float d = dy[n * ld + o];
            if (dm) dm[o] += d * z[n * OC + o] / nrm[o];
            if (db) db[o] += d;
            if (scale_dy) dy[n * ld + o] = d * g[o];
        }
}

// A sparse delta of n entries v at (rows[k], cols[k]): y (N, ld) += x (N,C) S^T, parallel over
// rows of x; backward: dv[k] += sum_n dy[n, rows[k]] x[n, cols[k]] (over entries) and
// dx += dy S (over rows).
typedef struct ctl__sparse_args {
    const int32_t *rows, *cols;
    int64_t n;
    const float *v, *x, *dy;
    float *y, *dx, *dv;
    int64_t N, C, ld;
} ctl__sparse_args;

// The forward (y set) or the dx half of the backward (y NULL): 16 rows of x a task, the entries
// in stored order within a row, so every output value has one fixed summation order.
static void ctl__sparse_rows_task(void *arg, int64_t task, int thread) {
    const ctl__sparse_args *s = (const ctl__sparse_args *)arg;
    const int32_t *r = s->rows, *c = s->cols;
    (void)thread;
    for (int64_t n = task * 16; n < CTL__MIN(s->N, (task + 1) * 16); n++)
        for (int64_t k = 0; k < s->n; k++) {
            if (s->y) s->y[n * s->ld + r[k]] += s->v[k] * s->x[n * s->C + c[k]];
            else s->dx[n * s->C + c[k]] += s->v[k] * s->dy[n * s->ld + r[k]];
        }
}

// 256 entries a task, each a sum over the N rows in order.
static void ctl__sparse_dv_task(void *arg, int64_t task, int thread) {
    const ctl__sparse_args *s = (const ctl__sparse_args *)arg;
    const int32_t *r = s->rows, *c = s->cols;
    (void)thread;
    for (int64_t k = task * 256; k < CTL__MIN(s->n, (task + 1) * 256); k++) {
        float acc = 0.0f;
        for (int64_t n = 0; n < s->N; n++) acc += s->dy[n * s->ld + r[k]] * s->x[n * s->C + c[k]];
        s->dv[k] += acc;
    }
}

// The forward: 16 rows of x a task, each task writing only its rows of y.
static void ctl__sparse_forward_cpu(ctl_ctx *ctx, float *y, int64_t ld, const float *x, const float *v, const int32_t *rows,
                                    const int32_t *cols, int64_t n, int64_t N, int64_t C) {
    ctl__sparse_args s;
    memset(&s, 0, sizeof s);
    s.rows = rows, s.cols = cols, s.n = n, s.v = v, s.x = x, s.y = y, s.N = N, s.C = C, s.ld = ld;
    ctl_parallel_for(ctx, (N + 15) / 16, ctl__sparse_rows_task, &s);
}

static void ctl__sparse_backward_cpu(ctl_ctx *ctx, float *dx, float *dv, const float *dy, int64_t ld, const float *x, const float *v,
                                     const int32_t *rows, const int32_t *cols, int64_t n, int64_t N, int64_t C) {
    ctl__sparse_args s;
    memset(&s, 0, sizeof s);
    s.rows = rows, s.cols = cols, s.n = n, s.v = v, s.x = x, s.dy = dy, s.dx = dx, s.dv = dv, s.N = N, s.C = C, s.ld = ld;
    // dv over entries and dx over rows: each task owns what it writes, so neither needs atomics.
    if (dv) ctl_parallel_for(ctx, (n + 255) / 256, ctl__sparse_dv_task, &s);
    if (dx) ctl_parallel_for(ctx, (N + 15) / 16, ctl__sparse_rows_task, &s);
}

// ---- the backend: the CPU's table of kernels ---------------------------------------------------
//
// The training forward and backward and the inference forward are written once (>>impl:adapters,
// >>impl:sampling, >>impl:training), as lists of calls through a table of kernels (ctl__kernels,
// "the backend interface" above the implementation). The CPU fills it from the kernels above;
// a CUDA context uses cotlab_cuda.cu's, which take and return device memory.

// The optimiser's entries (>>impl:optimiser).
static ctl_status ctl__grad_sumsq_cpu(ctl_ctx *ctx, const ctl__params *p, double *sq);
static void ctl__adamw_cpu(ctl_ctx *ctx, const ctl__params *p, const ctl_optim_desc *o, float grad_scale, float lr, int64_t step);
static void ctl__grad_zero_cpu(ctl_ctx *ctx, const ctl__params *p);

// The CPU's entries that are not the kernels themselves.
static ctl_status ctl__copy_cpu(ctl_ctx *ctx, void *dst, const void *src, size_t bytes) {
    (void)ctx;
    if (dst != src) memcpy(dst, src, bytes);
    return CTL_OK;
}
static ctl_status ctl__sync_cpu(ctl_ctx *ctx) { return (void)ctx, CTL_OK; }
static bool ctl__pin_cpu(ctl_ctx *ctx, void *p, size_t n) { return (void)ctx, (void)p, (void)n, false; }   // (no bus)
static void ctl__unpin_cpu(ctl_ctx *ctx, void *p) { (void)ctx, (void)p; }
static void ctl__zero_cpu(ctl_ctx *ctx, float *x, int64_t n) { (void)ctx, memset(x, 0, (size_t)n * sizeof(float)); }
static void ctl__scale_cpu(ctl_ctx *ctx, float *x, int64_t n, float s) {
    (void)ctx;
    for (int64_t i = 0; i < n; i++) x[i] *= s;
}
static void ctl__copy_rows_cpu(ctl_ctx *ctx, float *dst, const float *src, int64_t N, int64_t C) {
    (void)ctx, memcpy(dst, src, (size_t)(N * C) * sizeof(float));
}
static void ctl__linear_forward_cpu(ctl_ctx *ctx, float *out, const float *inp, ctl_dtype type, const void *w, const float *bias,
                                    int64_t N, int64_t C, int64_t OC) {
    for (int64_t n = 0; bias && n < N; n++) memcpy(out + n * OC, bias, OC * sizeof(float));
    ctl__gemm_wt(ctx, N, OC, C, inp, C, type, w, out, OC, bias != NULL);
}
static void ctl__linear_backward_cpu(ctl_ctx *ctx, float *dinp, const float *dout, ctl_dtype type, const void *w, int64_t N,
                                     int64_t C, int64_t OC) {
    if (dinp) ctl__gemm_wn(ctx, N, C, OC, dout, OC, type, w, dinp, C, true);
}
static void ctl__embedding_forward_cpu(ctl_ctx *ctx, float *out, const int32_t *tokens, const int32_t *pos, ctl_dtype type,
                                       const void *wte, const float *wpe, int64_t N, int64_t C) {
    (void)ctx;
    for (int64_t r = 0; r < N; r++) {
        ctl__embedding_forward(out + r * C, tokens + r, type, wte, NULL, 1, 1, C);
        for (int64_t c = 0; wpe && c < C; c++) out[r * C + c] += wpe[(int64_t)pos[r] * C + c];
    }
}
static void ctl__embedding_backward_cpu(ctl_ctx *ctx, float *dwte, float *dwpe, const float *dout, const int32_t *tokens,
                                        const int32_t *pos, int64_t N, int64_t C) {
    (void)ctx;
    ctl__embedding_backward(dwte, dwpe, dout, tokens, pos, 1, N, C);
}
static void ctl__rope_forward_cpu(ctl_ctx *ctx, float *x, const float *cos_t, const float *sin_t, const int32_t *pos, int64_t N,
                                  int64_t n_heads, int64_t HS, int64_t row_stride, ctl_rope_layout layout) {
    (void)ctx;
    ctl__rope(x, cos_t, sin_t, 1, N, n_heads, HS, row_stride, layout, 1.0f, pos);
}
static void ctl__rope_backward_cpu(ctl_ctx *ctx, float *dx, const float *cos_t, const float *sin_t, const int32_t *pos, int64_t N,
                                   int64_t n_heads, int64_t HS, int64_t row_stride, ctl_rope_layout layout) {
    (void)ctx;
    ctl__rope(dx, cos_t, sin_t, 1, N, n_heads, HS, row_stride, layout, -1.0f, pos);
}
static void ctl__residual_forward_cpu(ctl_ctx *ctx, float *out, const float *a, const float *b, int64_t n) {
    (void)ctx;
    ctl_residual_forward(out, a, b, n);
}

static const ctl__kernels ctl__cpu_kernels = {
    "cpu", true, NULL, NULL, ctl__copy_cpu, ctl__copy_cpu, ctl__sync_cpu, ctl__pin_cpu, ctl__unpin_cpu,
    ctl__zero_cpu, ctl__scale_cpu, ctl__copy_rows_cpu, ctl_gemm,
    ctl__linear_forward_cpu, ctl__linear_backward_cpu, ctl__matmul_dw,
    ctl_layernorm_forward, ctl_layernorm_backward, ctl_rmsnorm_forward, ctl_rmsnorm_backward,
    ctl__embedding_forward_cpu, ctl__embedding_backward_cpu, ctl__rope_forward_cpu, ctl__rope_backward_cpu,
    ctl__attention_forward, ctl__attention_backward, ctl_gelu_forward, ctl_gelu_backward, ctl_swiglu_forward, ctl_swiglu_backward,
    ctl__residual_forward_cpu, ctl__kv_store_cpu, ctl__attention_cached_cpu, ctl__lmhead_forward, ctl__lmhead_backward,
    ctl__dropout_cpu, ctl__lora_forward_cpu, ctl__lora_backward_cpu, ctl__dora_norms_cpu, ctl__cols_scale_cpu, ctl__cols_sub_cpu,
    ctl__dora_out_cpu, ctl__dora_backward_cpu, ctl__sparse_forward_cpu, ctl__sparse_backward_cpu,
    ctl__grad_sumsq_cpu, ctl__adamw_cpu, ctl__grad_zero_cpu, NULL,
};

// The context's backend, fixed when the context is made (ctl_ctx_desc.device).
static const ctl__kernels *ctl__backend(const ctl_ctx *ctx) {
#ifdef COTLAB_CUDA
    if (ctx->cuda) return &ctl__cuda_kernels;
#endif
    return (void)ctx, &ctl__cpu_kernels;
}

// >>impl:formats ================================================================================
// The readers below parse a whole file held in memory and check every count, length and offset against the bytes that
// remain before they use it: the files may be hostile, and the readers are fuzzed. The writers build the file in memory
// and write it whole through ctl__wfile (a temporary file renamed over the target). Every multi-byte field of every
// format here is little-endian; the readers load it byte by byte, so they work on any host.

// The whole file in memory, through the context's allocator (shared by the readers).
// The buffer has one spare byte, so an empty file still allocates; nothing is stored in it. The size comes from
// ftell, a long: where long is 32 bits (Windows), a file of 2 GiB or more cannot be measured and is refused.
// There is no mmap: an open file costs its size in memory.
static ctl_status ctl__read_file(ctl_ctx *ctx, const char *what, const char *path, void **data, size_t *size) {
    FILE *f = fopen(path, "rb");
    long n = -1;
    *data = NULL;
    if (f && !fseek(f, 0, SEEK_END)) n = ftell(f);
    if (!f || n < 0 || fseek(f, 0, SEEK_SET)) {
        if (f) fclose(f);
        return ctl__fail(ctx, CTL_ERR_IO, "%s '%s': cannot open or measure the file", what, path);
    }
    *data = ctl_alloc(ctx, (size_t)n + 1);
    size_t got = *data ? fread(*data, 1, (size_t)n, f) : 0;
    fclose(f);
    if (!*data) return ctl__fail(ctx, CTL_ERR_OUT_OF_MEMORY, "%s '%s': cannot hold %ld bytes in memory", what, path, n);
    if (got != (size_t)n) {
        ctl_free(ctx, *data);
        *data = NULL;
        return ctl__fail(ctx, CTL_ERR_IO, "%s '%s': read %zu of %ld bytes", what, path, got, n);
    }
    *size = (size_t)n;
    return CTL_OK;
}


// IEEE binary16 to binary32, exact for every input. A normal half keeps its mantissa (shifted into the top 10 of 23
// bits) and has its exponent rebiased by 127 - 15 = 112. A subnormal half (exponent 0) is shifted left until its
// leading bit reaches the implicit-bit position 0x400, lowering the exponent by one per shift.
CTL_API float ctl_f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
    if (exp == 0x1f) bits = sign | 0x7f800000u | (man << 13);   // inf, nan
    else if (exp) bits = sign | ((exp + 112) << 23) | (man << 13);
    else if (!man) bits = sign;                                  // +-0
    else {                                                       // subnormal: normalise
        int e = -1;
        do man <<= 1, e++; while (!(man & 0x400));
        bits = sign | ((uint32_t)(112 - e) << 23) | ((man & 0x3ff) << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

// binary32 to binary16, rounded to nearest with ties to even (as numpy and the F16C instructions do). Too large gives
// inf; below 2^-25 (half the smallest subnormal) gives a signed zero; a NaN stays a NaN (quiet).
CTL_API uint16_t ctl_f32_to_f16(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    uint32_t sign = (x >> 16) & 0x8000, exp = (x >> 23) & 0xff, man = x & 0x7fffff;
    if (exp == 0xff) return (uint16_t)(sign | 0x7c00 | (man ? 0x200 : 0));   // inf, quiet nan
    int e = (int)exp - 127 + 15;
    if (e >= 0x1f) return (uint16_t)(sign | 0x7c00);                         // overflow: inf
    if (e <= 0) {                                                           // subnormal or zero
        if (e < -10) return (uint16_t)sign;
        // The implicit bit restored, a right shift by 14 - e leaves the subnormal's mantissa; the bits shifted out round it.
        // A carry out of the mantissa gives the smallest normal half, which is the right answer.
        man |= 0x800000;
        uint32_t shift = (uint32_t)(14 - e), half = man >> shift, rest = man & ((1u << shift) - 1);
        uint32_t mid = 1u << (shift - 1);
        if (rest > mid || (rest == mid && (half & 1))) half++;
        return (uint16_t)(sign | half);
    }
    uint32_t half = ((uint32_t)e << 10) | (man >> 13), rest = man & 0x1fff;
    if (rest > 0x1000 || (rest == 0x1000 && (half & 1))) half++;   // may carry into inf: right
    return (uint16_t)(sign | half);
}

// bf16 is the top half of a binary32: widening is a shift.
CTL_API float ctl_bf16_to_f32(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

// Round to nearest even: add 0x7fff plus the lowest bit that is kept, then truncate (gguf.md 2.1). A NaN is handled
// first and kept quiet (bit 6 of the half set), since the rounding add could carry its payload into inf.
CTL_API uint16_t ctl_f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffff) > 0x7f800000) return (uint16_t)((u >> 16) | 64);   // quiet nan
    return (uint16_t)((u + 0x7fff + ((u >> 16) & 1)) >> 16);
}

// Little-endian loads, byte by byte: the files' byte order on any host, and no unaligned access (a GGUF string
// leaves whatever follows it at any offset).
static uint16_t ctl__le16(const unsigned char *p) { return (uint16_t)(p[0] | p[1] << 8); }
static uint32_t ctl__le32(const unsigned char *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}
static uint64_t ctl__le64(const unsigned char *p) { return ctl__le32(p) | (uint64_t)ctl__le32(p + 4) << 32; }
static float ctl__h(const unsigned char *p) { return ctl_f16_to_f32(ctl__le16(p)); }

// The ggml types cotlab reads (enum ggml_type, gguf.md 2.1): `block` elements are stored in `bytes` bytes, so a row of
// ne[0] elements takes ne[0] / block * bytes. A file holding any other type is refused when it is opened.
static const struct { ctl_ggml_type type; const char *name; int block; int bytes; } ctl__ggml_types[] = {
    {CTL_GGML_F32, "f32", 1, 4},       {CTL_GGML_F16, "f16", 1, 2},       {CTL_GGML_Q4_0, "q4_0", 32, 18},
    {CTL_GGML_Q4_1, "q4_1", 32, 20},   {CTL_GGML_Q5_0, "q5_0", 32, 22},   {CTL_GGML_Q5_1, "q5_1", 32, 24},
    {CTL_GGML_Q8_0, "q8_0", 32, 34},   {CTL_GGML_Q4_K, "q4_k", 256, 144}, {CTL_GGML_Q5_K, "q5_k", 256, 176},
    {CTL_GGML_Q6_K, "q6_k", 256, 210}, {CTL_GGML_BF16, "bf16", 1, 2},
};

// The row of `type` in the table above, or -1 when cotlab does not read it.
static int ctl__ggml_index(ctl_ggml_type type) {
    for (int i = 0; i < (int)(sizeof ctl__ggml_types / sizeof ctl__ggml_types[0]); i++)
        if (ctl__ggml_types[i].type == type) return i;
    return -1;
}

// For a type cotlab does not read: block 0, size 0 and the name "unknown", never a failure.
CTL_API int64_t ctl_ggml_block_size(ctl_ggml_type type) {
    int i = ctl__ggml_index(type);
    return i < 0 ? 0 : ctl__ggml_types[i].block;
}
CTL_API size_t ctl_ggml_type_size(ctl_ggml_type type) {
    int i = ctl__ggml_index(type);
    return i < 0 ? 0 : (size_t)ctl__ggml_types[i].bytes;
}
CTL_API const char *ctl_ggml_type_name(ctl_ggml_type type) {
    int i = ctl__ggml_index(type);
    return i < 0 ? "unknown" : ctl__ggml_types[i].name;
}

// The 6-bit scale and min of sub-block j of a Q4_K/Q5_K super-block, packed in 12 bytes.
// Sub-blocks 0-3 keep theirs in the low 6 bits of bytes 0-3 (scale) and 4-7 (min). Sub-blocks 4-7 take their low four
// bits from the nibbles of bytes 8-11 (scale low, min high) and their top two from the spare high bits of bytes 0-3
// (scale) and 4-7 (min). This is ggml's get_scale_min_k4.
static void ctl__scale_min_k4(int j, const unsigned char *q, int *sc, int *m) {
    if (j < 4) {
        *sc = q[j] & 63, *m = q[j + 4] & 63;
    } else {
        *sc = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
        *m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
    }
}

// One block of `type` at b into y. Layouts and formulas: ggml's ggml-common.h / ggml-quants.c.
// y receives the block's `block` values (one for the float types). Every multi-byte field is little-endian and every
// d, m and dmin is an f16. In the 32-element types, byte j of qs holds element j in its low nibble and element j + 16
// in its high nibble: the two halves are not interleaved (gguf.md 2.2).
static void ctl__dequant_block(ctl_ggml_type type, const unsigned char *b, float *y) {
    switch (type) {
    case CTL_GGML_F32: memcpy(y, b, 4); break;   // a plain copy: assumes a little-endian host
    case CTL_GGML_F16: y[0] = ctl__h(b); break;
    case CTL_GGML_BF16: y[0] = ctl_bf16_to_f32(ctl__le16(b)); break;
    case CTL_GGML_Q8_0:   // half d; int8 qs[32]
        for (int j = 0; j < 32; j++) y[j] = (float)(int8_t)b[2 + j] * ctl__h(b);
        break;
    // Q4_0 is symmetric, (q - 8) * d; Q4_1 below is affine, q * d + m.
    case CTL_GGML_Q4_0:   // half d; u8 qs[16]: low nibbles are elements 0..15, high 16..31
        for (int j = 0; j < 16; j++) {
            y[j] = (float)((b[2 + j] & 0xF) - 8) * ctl__h(b);
            y[j + 16] = (float)((b[2 + j] >> 4) - 8) * ctl__h(b);
        }
        break;
    case CTL_GGML_Q4_1:   // half d; half m; u8 qs[16]
        for (int j = 0; j < 16; j++) {
            y[j] = (float)(b[4 + j] & 0xF) * ctl__h(b) + ctl__h(b + 2);
            y[j + 16] = (float)(b[4 + j] >> 4) * ctl__h(b) + ctl__h(b + 2);
        }
        break;
    case CTL_GGML_Q5_0:   // half d; u8 qh[4]; u8 qs[16]: the fifth bits in qh
    case CTL_GGML_Q5_1: { // half d; half m; u8 qh[4]; u8 qs[16]
        bool one = type == CTL_GGML_Q5_1;
        // qh, read as one LE u32, holds the fifth bit of every element: bit j for element j, bit j + 16 for element j + 16.
        // Q5_0 is symmetric, (q - 16) * d; Q5_1 is affine, q * d + m.
        const unsigned char *qh = b + (one ? 4 : 2), *qs = qh + 4;
        uint32_t h = ctl__le32(qh);
        float d = ctl__h(b), m = one ? ctl__h(b + 2) : 0.0f;
        int off = one ? 0 : 16;
        for (int j = 0; j < 16; j++) {
            int q0 = (qs[j] & 0xF) | (int)((h >> j) & 1) << 4, q1 = (qs[j] >> 4) | (int)((h >> (j + 16)) & 1) << 4;
            y[j] = (float)(q0 - off) * d + m;
            y[j + 16] = (float)(q1 - off) * d + m;
        }
        break;
    }
    case CTL_GGML_Q4_K:   // half d; half dmin; u8 scales[12]; (Q5_K: u8 qh[32];) u8 qs[128]
    case CTL_GGML_Q5_K: {
        bool five = type == CTL_GGML_Q5_K;
        // 256 elements in 8 sub-blocks of 32, each with its own 6-bit scale and min: y = d * scale * q - dmin * min.
        // In Q5_K, qh[l] holds the fifth bit of element l of each sub-block: bit 2c for the low nibbles of chunk c, bit
        // 2c + 1 for its high nibbles.
        float d = ctl__h(b), dmin = ctl__h(b + 2);
        const unsigned char *sc = b + 4, *qh = b + 16, *qs = b + (five ? 48 : 16);
        // Chunk c reads qs[32c .. 32c + 31]: low nibbles give sub-block 2c, high nibbles sub-block 2c + 1.
        for (int c = 0; c < 4; c++) {   // four 64-value chunks, each two sub-blocks of 32
            int s0, m0, s1, m1;
            ctl__scale_min_k4(2 * c, sc, &s0, &m0);
            ctl__scale_min_k4(2 * c + 1, sc, &s1, &m1);
            for (int l = 0; l < 32; l++) {
                int lo = qs[32 * c + l] & 0xF, hi = qs[32 * c + l] >> 4;
                if (five) lo += (qh[l] >> (2 * c) & 1) << 4, hi += (qh[l] >> (2 * c + 1) & 1) << 4;
                y[64 * c + l] = d * (float)s0 * (float)lo - dmin * (float)m0;
                y[64 * c + 32 + l] = d * (float)s1 * (float)hi - dmin * (float)m1;
            }
        }
        break;
    }
    case CTL_GGML_Q6_K: { // u8 ql[128]; u8 qh[64]; int8 scales[16]; half d (last)
        // q is 6 bits, centred by -32: 4 low bits from a nibble of ql, 2 high bits from qh (one qh byte serves four elements,
        // 32 apart). Each int8 scale covers 16 elements.
        float d = ctl__h(b + 208);
        for (int n = 0; n < 2; n++) {   // two halves of 128
            const unsigned char *ql = b + 64 * n, *qh = b + 128 + 32 * n;
            const int8_t *sc = (const int8_t *)(b + 192 + 8 * n);
            float *yy = y + 128 * n;
            for (int l = 0; l < 32; l++) {
                // is = l / 16: elements 0-15 and 16-31 of each 32-run have their own scales, two apart per run.
                int is = l / 16;
                int q1 = ((ql[l] & 0xF) | ((qh[l] >> 0 & 3) << 4)) - 32;
                int q2 = ((ql[l + 32] & 0xF) | ((qh[l] >> 2 & 3) << 4)) - 32;
                int q3 = ((ql[l] >> 4) | ((qh[l] >> 4 & 3) << 4)) - 32;
                int q4 = ((ql[l + 32] >> 4) | ((qh[l] >> 6 & 3) << 4)) - 32;
                yy[l] = d * (float)sc[is] * (float)q1;
                yy[l + 32] = d * (float)sc[is + 2] * (float)q2;
                yy[l + 64] = d * (float)sc[is + 4] * (float)q3;
                yy[l + 96] = d * (float)sc[is + 6] * (float)q4;
            }
        }
        break;
    }
    }
}

// Only whole blocks are converted: a tail of n that is not a multiple of the block is left unwritten, and an unknown
// type writes nothing. Callers pass whole rows; the reader guarantees that ne[0] is a multiple of the block.
CTL_API void ctl_ggml_dequantize(ctl_ggml_type type, const void *src, float *dst, int64_t n) {
    if (!CTL__ARGS(NULL, src && dst && n >= 0)) return;
    int i = ctl__ggml_index(type);
    if (i < 0) return;
    const unsigned char *b = (const unsigned char *)src;
    for (int64_t j = 0; j + ctl__ggml_types[i].block <= n; j += ctl__ggml_types[i].block, b += ctl__ggml_types[i].bytes)
        ctl__dequant_block(type, b, dst + j);
}

// An open GGUF file. The keys are copies (NUL-terminated); the values, the strings and the tensor data point into
// `bytes`, so they live as long as the ctl_gguf and no longer.
struct ctl_gguf {
    ctl_ctx *ctx;
    char file[128];                 // for messages: the path, or "<memory>"
    const unsigned char *bytes;   // the whole file
    size_t size;
    void *owned;                    // the bytes, when read from a file
    uint32_t version, alignment;   // alignment: general.alignment, 32 when absent
    uint64_t data_offset;   // where the tensor data starts; tensor offsets count from here
    int64_t n_kv, n_tensors;   // entries parsed whole so far: what ctl_gguf_close frees
    ctl_gguf_kv *kv;   // n_kv + 1 allocated, so a count of 0 still allocates
    ctl_gguf_tensor *tensors;
};

// A bounds-checked cursor over the file: every read first checks that the bytes are there;
// the first failure is kept, and every later read fails quietly.
typedef struct ctl__rd {
    ctl_gguf *g;
    size_t pos;
    ctl_status st;
} ctl__rd;

static bool ctl__rd_need(ctl__rd *r, uint64_t n, const char *what) {
    if (r->st) return false;
    // pos <= size always holds, so size - pos cannot wrap, and n is never added to pos before this test.
    if (n > r->g->size - r->pos) {
        r->st = ctl__fail(r->g->ctx, CTL_ERR_FORMAT, "gguf %s: %s at offset %zu needs %" PRIu64 " bytes, only %zu remain",
                          r->g->file, what, r->pos, n, r->g->size - r->pos);
        return false;
    }
    return true;
}

// A failed read returns 0 and leaves pos where it was, so a parser may make several reads and test r.st once after
// them; nothing read after the first failure is used.
static uint32_t ctl__rd_u32(ctl__rd *r, const char *what) {
    if (!ctl__rd_need(r, 4, what)) return 0;
    r->pos += 4;
    return ctl__le32(r->g->bytes + r->pos - 4);
}

static uint64_t ctl__rd_u64(ctl__rd *r, const char *what) {
    if (!ctl__rd_need(r, 8, what)) return 0;
    r->pos += 8;
    return ctl__le64(r->g->bytes + r->pos - 8);
}

// A string: u64 length, then the bytes. Returns the bytes (in place) and the length.
// The length is checked against the bytes left before it is used: a hostile length near 2^64 fails here instead of
// wrapping pos. The bytes are not NUL-terminated.
static const char *ctl__rd_str(ctl__rd *r, uint64_t *len, const char *what) {
    *len = ctl__rd_u64(r, what);
    if (!ctl__rd_need(r, *len, what)) return NULL;
    r->pos += *len;
    return (const char *)r->g->bytes + r->pos - *len;
}

// Bytes of one value of GGUF type t (ids 0..12, gguf.md 1.2). 0 for STRING and ARRAY, whose size is not fixed, and for
// an unknown id: callers treat 0 as "not a scalar".
static size_t ctl__gguf_scalar_size(ctl_gguf_type t) {
    static const unsigned char sizes[] = {1, 1, 2, 2, 4, 4, 4, 1, 0, 0, 8, 8, 8};
    return (unsigned)t < sizeof sizes ? sizes[t] : 0;
}

// For messages; an id from a hostile file may be anything, hence the bound.
static const char *ctl__gguf_type_name(ctl_gguf_type t) {
    static const char *const names[] = {"u8", "i8", "u16", "i16", "u32", "i32", "f32", "bool", "str", "array", "u64", "i64", "f64"};
    return (unsigned)t < sizeof names / sizeof names[0] ? names[t] : "unknown";
}

// Names and byte ranges of a file's entries, for the checks that sort them.
typedef struct ctl__named { const char *name; uint64_t begin, end; } ctl__named;
static int ctl__named_by_name(const void *a, const void *b) {
    return strcmp(((const ctl__named *)a)->name, ((const ctl__named *)b)->name);
}
static int ctl__named_by_begin(const void *a, const void *b) {
    const ctl__named *x = (const ctl__named *)a, *y = (const ctl__named *)b;
    return x->begin < y->begin ? -1 : x->begin > y->begin ? 1 : (x->end > y->end) - (x->end < y->end);
}
// A name that appears twice among ix[0..n), or NULL (ix is sorted by name).
static const char *ctl__duplicate(ctl__named *ix, int64_t n) {
    qsort(ix, (size_t)n, sizeof *ix, ctl__named_by_name);
    for (int64_t i = 1; i < n; i++)
        if (!strcmp(ix[i - 1].name, ix[i].name)) return ix[i].name;
    return NULL;
}
// An entry whose non-empty range overlaps another's, or NULL (ix is sorted by range).
// Empty ranges (a tensor with a zero dimension) take no bytes and may sit anywhere. Sorted by begin, an overlap shows
// as a begin below the furthest end seen so far.
static const char *ctl__overlap(ctl__named *ix, int64_t n) {
    qsort(ix, (size_t)n, sizeof *ix, ctl__named_by_begin);
    uint64_t end = 0;
    for (int64_t i = 0; i < n; i++) {
        if (ix[i].begin == ix[i].end) continue;
        if (ix[i].begin < end) return ix[i].name;
        end = ix[i].end;
    }
    return NULL;
}

// The header of g->bytes (gguf.md 1.1): magic "GGUF", u32 version, u64 tensor_count, u64 kv_count, checked and the
// counts bounded by the file's size. Then the kv and tensor arrays, allocated for those counts; the kv array is zeroed.
// Returns the first failure; g->kv or g->tensors may then be allocated, which ctl_gguf_close frees.
static ctl_status ctl__gguf_header_read(ctl_gguf *g, ctl__rd *r, uint64_t *n_kv_out, uint64_t *n_tensors_out) {
    ctl_ctx *ctx = g->ctx;
    if (g->size < 4 || memcmp(g->bytes, "GGUF", 4))
        return ctl__fail(ctx, CTL_ERR_FORMAT, "gguf %s: not a GGUF file (no 'GGUF' magic at offset 0)", g->file);
    // Header: magic "GGUF", u32 version, u64 tensor_count, u64 kv_count.
    r->pos = 4;
    g->version = ctl__rd_u32(r, "version");
    uint64_t n_tensors = ctl__rd_u64(r, "tensor count"), n_kv = ctl__rd_u64(r, "metadata count");
    if (r->st) return r->st;
    // Nothing in a file marks it big-endian; as ggml does, a version with an empty low half is taken as a small version
    // number written in the other byte order.
    if ((g->version & 0xFFFF) == 0)
        return ctl__fail(ctx, CTL_ERR_UNSUPPORTED, "gguf %s: version field 0x%x looks big-endian; only little-endian files are read",
                         g->file, g->version);
    // Version 1 had u32 lengths and counts; versions 2 and 3 share one layout (version 3 only added big-endian files).
    if (g->version < 2 || g->version > 3)
        return ctl__fail(ctx, CTL_ERR_UNSUPPORTED, "gguf %s: version %u (cotlab reads versions 2 and 3)", g->file, g->version);
    // Each entry takes some minimum number of bytes, so the counts are bounded by the file: a metadata entry at least 13
    // (u64 key length, a 1-byte key, u32 type), a tensor info at least 32. So a hostile count cannot overflow the two
    // allocation sizes below or ask for more memory than a small multiple of the file.
    size_t left = g->size - r->pos;
    if (n_kv > left / 13 || n_tensors > left / 32)
        return ctl__fail(ctx, CTL_ERR_FORMAT, "gguf %s: header claims %" PRIu64 " metadata entries and %" PRIu64
                         " tensors; %zu bytes cannot hold that many", g->file, n_kv, n_tensors, left);
    g->kv = (ctl_gguf_kv *)ctl_alloc(ctx, (size_t)(n_kv + 1) * sizeof(ctl_gguf_kv));
    g->tensors = (ctl_gguf_tensor *)ctl_alloc(ctx, (size_t)(n_tensors + 1) * sizeof(ctl_gguf_tensor));
    if (!g->kv || !g->tensors) return ctl__fail(ctx, CTL_ERR_OUT_OF_MEMORY, "gguf %s: out of memory", g->file);
    // Zeroed so that ctl_gguf_close can free str_offsets of an entry that failed halfway; a tensor entry is zeroed once its
    // name has passed, and only counted when whole.
    memset(g->kv, 0, (size_t)(n_kv + 1) * sizeof(ctl_gguf_kv));
    *n_kv_out = n_kv, *n_tensors_out = n_tensors;
    return CTL_OK;
}

// The value of metadata entry kv, whose key and type have been read and whose stored type et is a known non-array
// type: kv->data and kv->count are set and r moved past the value; `at` is the entry's offset, for messages. Returns
// the first failure; a string array's offsets, once allocated, hang on kv for ctl_gguf_close.
static ctl_status ctl__gguf_kv_value_read(ctl_gguf *g, ctl__rd *r, ctl_gguf_kv *kv, ctl_gguf_type et, size_t at) {
    ctl_ctx *ctx = g->ctx;
    const char *copy = kv->key;
    // data points at the value: a scalar, the first array element, a string's bytes (past its length), or, for a string
    // array, the first element's length prefix.
    kv->data = g->bytes + r->pos;
    if (et == CTL_GGUF_STR) {
        // A single string: count becomes its length in bytes, data its first byte.
        if (kv->type == CTL_GGUF_STR) {
            const char *s = ctl__rd_str(r, &kv->count, copy);
            kv->data = (const unsigned char *)s;
        } else {
            // A string array has no fixed stride, so the offset of each element's length prefix (from data) is recorded now
            // and element i is found in O(1) later. Each element takes at least its 8-byte length, so count is first
            // bounded by the bytes left: the offsets array cannot be oversized by a hostile count.
            if (kv->count > (g->size - r->pos) / 8)
                return ctl__fail(ctx, CTL_ERR_FORMAT, "gguf %s: '%s' claims %" PRIu64 " strings, more than the file holds",
                                 g->file, copy, kv->count);
            uint64_t *offs = (uint64_t *)ctl_alloc(ctx, (size_t)(kv->count + 1) * sizeof(uint64_t));
            if (!offs) return ctl__fail(ctx, CTL_ERR_OUT_OF_MEMORY, "gguf %s: out of memory", g->file);
            kv->str_offsets = offs;
            for (uint64_t j = 0; j < kv->count && !r->st; j++) {
                uint64_t len;
                offs[j] = r->pos - (size_t)(kv->data - g->bytes);
                ctl__rd_str(r, &len, copy);
            }
        }
    } else {
        // es is not 0 here: et is a known scalar type. n <= bytes left / es, so n * es cannot overflow.
        uint64_t n = kv->count, es = ctl__gguf_scalar_size(et);
        if (n > (g->size - r->pos) / es)
            return ctl__fail(ctx, CTL_ERR_FORMAT, "gguf %s: '%s' at offset %zu claims %" PRIu64 " values of %s; only %zu bytes remain",
                             g->file, copy, at, n, ctl__gguf_type_name(et), g->size - r->pos);
        r->pos += (size_t)(n * es);
    }
    return r->st;
}

// Metadata entry i: kv := string key; u32 value_type; value. The key is copied so that it can be NUL-terminated; the
// value stays in the file. g->n_kv counts the entry as soon as its key is copied. Returns the first failure.
static ctl_status ctl__gguf_kv_read(ctl_gguf *g, ctl__rd *r, uint64_t i) {
    ctl_ctx *ctx = g->ctx;
    ctl_gguf_kv *kv = &g->kv[i];
    uint64_t klen;
    size_t at = r->pos;
    const char *key = ctl__rd_str(r, &klen, "metadata key");
    if (r->st) return r->st;
    // ggml refuses an empty key; 65535 bytes is the spec's longest.
    if (klen == 0 || klen > 65535)
        return ctl__fail(ctx, CTL_ERR_FORMAT, "gguf %s: metadata key %" PRIu64 " at offset %zu has length %" PRIu64,
                         g->file, i, at, klen);
    // The key is copied and NUL-terminated, so that callers can compare it with strcmp.
    char *copy = (char *)ctl_alloc(ctx, (size_t)klen + 1);
    if (!copy) return ctl__fail(ctx, CTL_ERR_OUT_OF_MEMORY, "gguf %s: out of memory", g->file);
    memcpy(copy, key, (size_t)klen);
    copy[klen] = 0;
    kv->key = copy;
    g->n_kv = (int64_t)i + 1;   // from here on ctl_gguf_close frees this entry
    kv->type = (ctl_gguf_type)ctl__rd_u32(r, "metadata type");
    kv->count = 1;
    // An ARRAY value is u32 elem_type, u64 count, then count elements. Nested arrays are refused below, as ggml does
    // (the spec allows them; no real file has them).
    if (kv->type == CTL_GGUF_ARR) {
        kv->elem_type = (ctl_gguf_type)ctl__rd_u32(r, "array element type");
        kv->count = ctl__rd_u64(r, "array length");
    }
    if (r->st) return r->st;
    // et: the type of each value stored, the element type for an array.
    ctl_gguf_type et = kv->type == CTL_GGUF_ARR ? kv->elem_type : kv->type;
    if ((unsigned)et > CTL_GGUF_F64 || et == CTL_GGUF_ARR)
        return ctl__fail(ctx, CTL_ERR_FORMAT, "gguf %s: metadata '%s' at offset %zu has unknown or nested type %u",
                         g->file, copy, at, (unsigned)et);
    ctl_status st = ctl__gguf_kv_value_read(g, r, kv, et, at);
    if (st) return st;
    // Read as soon as it is met: the tensor offsets below are checked against it. ggml refuses a general.alignment not
    // stored as u32 and so does this reader. A second general.alignment fails later as a duplicate key.
    if (!strcmp(copy, "general.alignment")) {
        uint32_t a = kv->type == CTL_GGUF_U32 ? ctl__le32(kv->data) : 0;
        if (!a || (a & (a - 1)))
            return ctl__fail(ctx, CTL_ERR_FORMAT, "gguf %s: general.alignment must be a power of two stored as u32 (%s)",
                             g->file, ctl__gguf_type_name(kv->type));
        g->alignment = a;
    }
    return CTL_OK;
}

// Tensor info i: string name; u32 n_dims; u64 ne[n_dims]; u32 ggml_type; u64 offset (gguf.md 1.3). ne[0] is the
// contiguous dimension. Checks the name, shape, type and the offset's alignment (g->alignment is final by now);
// the caller counts the entry in g->n_tensors once this returns CTL_OK. Returns the first failure.
static ctl_status ctl__gguf_info_read(ctl_gguf *g, ctl__rd *r, uint64_t i) {
    ctl_ctx *ctx = g->ctx;
    ctl_gguf_tensor *t = &g->tensors[i];
    uint64_t nlen;
    size_t at = r->pos;
    const char *name = ctl__rd_str(r, &nlen, "tensor name");
    if (r->st) return r->st;
    // At most 63 bytes, ggml's GGML_MAX_NAME less the NUL; ctl_gguf_tensor.name holds exactly that.
    if (nlen == 0 || nlen >= sizeof t->name)
        return ctl__fail(ctx, CTL_ERR_FORMAT, "gguf %s: tensor %" PRIu64 " at offset %zu has a name of %" PRIu64 " bytes (1..63)",
                         g->file, i, at, nlen);
    memset(t, 0, sizeof *t);
    memcpy(t->name, name, (size_t)nlen);
    // The name fits: copied, NUL-terminated by the zeroing.
    uint32_t nd = ctl__rd_u32(r, "tensor dims");
    if (!r->st && (nd < 1 || nd > 4))
        return ctl__fail(ctx, CTL_ERR_FORMAT, "gguf %s: tensor '%s' has %u dimensions (1..4)", g->file, t->name, nd);
    // The missing dimensions are 1. The running product of the dimensions stays <= INT64_MAX, so the element count, and
    // every byte size derived from it, fits int64 (a dimension of 0 makes an empty tensor).
    t->n_dims = (int)nd;
    uint64_t numel = 1;
    for (int d = 0; d < 4; d++) {
        uint64_t ne = d < (int)nd ? ctl__rd_u64(r, "tensor shape") : 1;
        if (r->st) return r->st;
        if (ne > (uint64_t)INT64_MAX || (ne && numel > (uint64_t)INT64_MAX / ne))
            return ctl__fail(ctx, CTL_ERR_FORMAT, "gguf %s: tensor '%s' has an absurd shape (dim %d = %" PRIu64 ")",
                             g->file, t->name, d, ne);
        t->ne[d] = (int64_t)ne;
        numel *= ne;
    }
    uint32_t type = ctl__rd_u32(r, "tensor type");
    t->offset = ctl__rd_u64(r, "tensor offset");
    if (r->st) return r->st;
    // An unknown or unsupported ggml type is refused here: its block size, and so the tensor's size, would be unknown.
    t->type = (ctl_ggml_type)type;
    int ti = ctl__ggml_index(t->type);
    if (ti < 0)
        return ctl__fail(ctx, CTL_ERR_UNSUPPORTED, "gguf %s: tensor '%s' has type %u, which cotlab does not read",
                         g->file, t->name, type);
    // ne[0] must be a multiple of the block, or rows would end inside a block (gguf.md 1.3).
    uint64_t blk = (uint64_t)ctl__ggml_types[ti].block;
    if (t->ne[0] % (int64_t)blk)
        return ctl__fail(ctx, CTL_ERR_FORMAT, "gguf %s: tensor '%s': ne[0] = %" PRId64 " is not a multiple of %s's block of %"
                         PRIu64, g->file, t->name, t->ne[0], ctl__ggml_types[ti].name, blk);
    t->nbytes = numel / blk * (uint64_t)ctl__ggml_types[ti].bytes;   // numel/blk < 2^63/blk: no overflow
    // ggml also wants each offset to follow the previous tensor exactly (padded to the alignment, in info order); this
    // reader accepts any aligned layout that stays in the file and does not overlap, checked below.
    if (t->offset % g->alignment)
        return ctl__fail(ctx, CTL_ERR_FORMAT, "gguf %s: tensor '%s' offset %" PRIu64 " is not a multiple of the alignment %u",
                         g->file, t->name, t->offset, g->alignment);
    return CTL_OK;
}

// Places the data section after the infos, which end at infos_end, and points each counted tensor at its data.
// Fails, naming the tensor, when some tensor's data lies past the end of the file.
static ctl_status ctl__gguf_data_place(ctl_gguf *g, size_t infos_end) {
    // The data section starts at the end of the infos rounded up to the alignment; offsets count from there.
    g->data_offset = (infos_end + g->alignment - 1) / g->alignment * g->alignment;
    for (int64_t i = 0; i < g->n_tensors; i++) {
        ctl_gguf_tensor *t = &g->tensors[i];
        // offset and nbytes are compared with the room one at a time, so offset + nbytes is never formed before it is known
        // to fit: no wrap-around can pass a tensor that ends past the file.
        uint64_t room = g->size > g->data_offset ? g->size - g->data_offset : 0;
        if (t->offset > room || t->nbytes > room - t->offset)
            return ctl__fail(g->ctx, CTL_ERR_FORMAT, "gguf %s: tensor '%s' data [%" PRIu64 ", +%" PRIu64 ") lies past the end of the file (%zu bytes)",
                             g->file, t->name, g->data_offset + t->offset, t->nbytes, g->size);
        t->data = g->bytes + g->data_offset + t->offset;
    }
    return CTL_OK;
}

// Names are unique and the tensors' data do not overlap (so what they hold, and anything
// sized from them, is bounded by the file), checked in sorted order: O(n log n).
// Needs every entry parsed whole; returns the first failure, having freed its index array.
static ctl_status ctl__gguf_names_check(ctl_gguf *g) {
    ctl_ctx *ctx = g->ctx;
    // One index array serves both checks, sized for the longer list.
    int64_t n = CTL__MAX(g->n_kv, g->n_tensors);
    ctl__named *ix = (ctl__named *)ctl_alloc(ctx, (size_t)(n + 1) * sizeof(ctl__named));
    if (!ix) return ctl__fail(ctx, CTL_ERR_OUT_OF_MEMORY, "gguf %s: out of memory", g->file);
    ctl_status st = CTL_OK;
    for (int64_t i = 0; i < g->n_kv; i++) ix[i].name = g->kv[i].key, ix[i].begin = ix[i].end = 0;
    const char *dup = ctl__duplicate(ix, g->n_kv);
    if (dup) st = ctl__fail(ctx, CTL_ERR_FORMAT, "gguf %s: metadata key '%s' appears twice", g->file, dup);
    for (int64_t i = 0; i < g->n_tensors; i++)
        ix[i].name = g->tensors[i].name, ix[i].begin = g->tensors[i].offset, ix[i].end = g->tensors[i].offset + g->tensors[i].nbytes;
    if (!st && (dup = ctl__duplicate(ix, g->n_tensors)))
        st = ctl__fail(ctx, CTL_ERR_FORMAT, "gguf %s: tensor '%s' appears twice", g->file, dup);
    if (!st && (dup = ctl__overlap(ix, g->n_tensors)))
        st = ctl__fail(ctx, CTL_ERR_FORMAT, "gguf %s: tensor '%s' overlaps the data of another", g->file, dup);
    ctl_free(ctx, ix);
    return st;
}

// Parses the header, the metadata and the tensor infos of g->bytes (gguf.md 1.1-1.3) and checks every size against the
// file before it is used. On failure the partly filled g is left to ctl_gguf_close, which frees only the entries that
// n_kv and n_tensors count; nothing points past the file on success.
static ctl_status ctl__gguf_parse(ctl_gguf *g) {
    ctl__rd r;
    r.g = g, r.pos = 0, r.st = CTL_OK;
    uint64_t n_kv = 0, n_tensors = 0;
    ctl_status st = ctl__gguf_header_read(g, &r, &n_kv, &n_tensors);
    if (st) return st;
    // The default of gguf.md 1.1, replaced when general.alignment is met among the metadata.
    g->alignment = 32;
    for (uint64_t i = 0; i < n_kv; i++)
        if ((st = ctl__gguf_kv_read(g, &r, i))) return st;
    // n_tensors counts an entry only once the whole of it has passed.
    for (uint64_t i = 0; i < n_tensors; i++, g->n_tensors++)
        if ((st = ctl__gguf_info_read(g, &r, i))) return st;
    if ((st = ctl__gguf_data_place(g, r.pos))) return st;
    return ctl__gguf_names_check(g);
}

// Frees what the parser counted (the keys and string offsets of the first n_kv entries), the arrays, and the file's
// bytes when they were read from a path; bytes given to ctl_gguf_open_memory remain the caller's.
CTL_API void ctl_gguf_close(ctl_gguf *g) {
    if (!g) return;
    ctl_ctx *ctx = g->ctx;
    for (int64_t i = 0; g->kv && i < g->n_kv; i++) {
        ctl_free(ctx, (void *)(uintptr_t)g->kv[i].key);
        ctl_free(ctx, (void *)(uintptr_t)g->kv[i].str_offsets);
    }
    ctl_free(ctx, g->kv);
    ctl_free(ctx, g->tensors);
    ctl_free(ctx, g->owned);
    ctl_free(ctx, g);
}

// An empty ctl_gguf whose messages name `file`, quoted (truncated to fit file[128]).
static ctl_status ctl__gguf_new(ctl_ctx *ctx, const char *file, ctl_gguf **out) {
    ctl_gguf *g = (ctl_gguf *)ctl_alloc(ctx, sizeof(ctl_gguf));
    *out = g;
    if (!g) return ctl__fail(ctx, CTL_ERR_OUT_OF_MEMORY, "gguf %s: out of memory", file);
    memset(g, 0, sizeof *g);
    g->ctx = ctx;
    snprintf(g->file, sizeof g->file, "'%s'", file);
    return CTL_OK;
}

// Parses g; on failure g is freed and *out is NULL, so no caller ever sees a half-read file.
static ctl_status ctl__gguf_finish(ctl_gguf *g, ctl_gguf **out) {
    ctl_status st = ctl__gguf_parse(g);
    if (st) {
        ctl_gguf_close(g);
        g = NULL;
    }
    *out = g;
    return st;
}

// The bytes are borrowed, not copied.
CTL_API ctl_status ctl_gguf_open_memory(ctl_ctx *ctx, const void *data, size_t size, ctl_gguf **out) {
    if (out) *out = NULL;
    if (!CTL__ARGS(ctx, ctx && (data || size == 0) && out)) return CTL_ERR_INVALID;
    ctl_gguf *g;
    ctl_status st = ctl__gguf_new(ctx, "<memory>", &g);
    if (st) return *out = NULL, st;
    g->bytes = (const unsigned char *)data, g->size = data ? size : 0;
    return ctl__gguf_finish(g, out);
}

CTL_API ctl_status ctl_gguf_open(ctl_ctx *ctx, const char *path, ctl_gguf **out) {
    if (out) *out = NULL;
    if (!CTL__ARGS(ctx, ctx && path && out)) return CTL_ERR_INVALID;
    ctl_gguf *g;
    void *data;
    size_t size = 0;
    // The file's bytes pass to the ctl_gguf (owned), and go with it at ctl_gguf_close.
    ctl_status st = ctl__read_file(ctx, "gguf", path, &data, &size);
    if (st) return st;
    if ((st = ctl__gguf_new(ctx, path, &g))) return ctl_free(ctx, data), st;
    g->owned = data, g->bytes = (const unsigned char *)data, g->size = size;
    return ctl__gguf_finish(g, out);
}

CTL_API uint32_t ctl_gguf_version(const ctl_gguf *g) { return CTL__ARGS(NULL, g) ? g->version : 0; }
CTL_API uint32_t ctl_gguf_alignment(const ctl_gguf *g) { return CTL__ARGS(NULL, g) ? g->alignment : 0; }
CTL_API uint64_t ctl_gguf_data_offset(const ctl_gguf *g) { return CTL__ARGS(NULL, g) ? g->data_offset : 0; }
CTL_API int64_t ctl_gguf_kv_count(const ctl_gguf *g) { return CTL__ARGS(NULL, g) ? g->n_kv : 0; }
CTL_API int64_t ctl_gguf_tensor_count(const ctl_gguf *g) { return CTL__ARGS(NULL, g) ? g->n_tensors : 0; }
// By position, in file order; NULL when i is out of range.
CTL_API const ctl_gguf_kv *ctl_gguf_kv_at(const ctl_gguf *g, int64_t i) {
    return CTL__ARGS(NULL, g) && i >= 0 && i < g->n_kv ? &g->kv[i] : NULL;
}
CTL_API const ctl_gguf_tensor *ctl_gguf_tensor_at(const ctl_gguf *g, int64_t i) {
    return CTL__ARGS(NULL, g) && i >= 0 && i < g->n_tensors ? &g->tensors[i] : NULL;
}

// Linear searches by name: files hold tens of keys and hundreds of tensors.
CTL_API const ctl_gguf_kv *ctl_gguf_find_kv(const ctl_gguf *g, const char *key) {
    if (!CTL__ARGS(g ? g->ctx : NULL, g && key)) return NULL;
    for (int64_t i = 0; i < g->n_kv; i++)
        if (!strcmp(g->kv[i].key, key)) return &g->kv[i];
    return NULL;
}

CTL_API const ctl_gguf_tensor *ctl_gguf_find_tensor(const ctl_gguf *g, const char *name) {
    if (!CTL__ARGS(g ? g->ctx : NULL, g && name)) return NULL;
    for (int64_t i = 0; i < g->n_tensors; i++)
        if (!strcmp(g->tensors[i].name, name)) return &g->tensors[i];
    return NULL;
}

CTL_API int64_t ctl_gguf_tensor_numel(const ctl_gguf_tensor *t) {
    return CTL__ARGS(NULL, t) ? t->ne[0] * t->ne[1] * t->ne[2] * t->ne[3] : 0;   // the parser bounded it
}

// A number of scalar type `type` at p, as an integer (is_int) or as a double.
// For an integer type (bool counts as u8) it fills all three views and returns true: *i is -1 for a u64 above
// INT64_MAX and *u is UINT64_MAX for a negative value, so the range checks of the callers can tell. For f32 and f64
// it fills only *f and returns false, as it does for a type that is not a number.
static bool ctl__gguf_number(ctl_gguf_type type, const unsigned char *p, int64_t *i, uint64_t *u, double *f) {
    int64_t v = 0;
    switch (type) {
    case CTL_GGUF_U8: case CTL_GGUF_BOOL: *u = p[0]; break;
    case CTL_GGUF_I8: v = (int8_t)p[0]; break;
    case CTL_GGUF_U16: *u = ctl__le16(p); break;
    case CTL_GGUF_I16: v = (int16_t)ctl__le16(p); break;
    case CTL_GGUF_U32: *u = ctl__le32(p); break;
    case CTL_GGUF_I32: v = (int32_t)ctl__le32(p); break;
    case CTL_GGUF_U64: *u = ctl__le64(p); break;
    case CTL_GGUF_I64: v = (int64_t)ctl__le64(p); break;
    case CTL_GGUF_F32: { uint32_t b = ctl__le32(p); float x; memcpy(&x, &b, 4); *f = x; return false; }
    case CTL_GGUF_F64: { uint64_t b = ctl__le64(p); memcpy(f, &b, 8); return false; }
    default: return false;
    }
    bool is_unsigned = type == CTL_GGUF_U8 || type == CTL_GGUF_BOOL || type == CTL_GGUF_U16 || type == CTL_GGUF_U32 ||
                       type == CTL_GGUF_U64;
    if (is_unsigned) *i = *u > (uint64_t)INT64_MAX ? -1 : (int64_t)*u, *f = (double)*u;
    else *i = v, *u = v < 0 ? UINT64_MAX : (uint64_t)v, *f = (double)v;
    return true;
}

// The entry for `key`, or NULL with *st set to CTL_ERR_NOT_FOUND and a message naming the key.
static const ctl_gguf_kv *ctl__gguf_want(const ctl_gguf *g, const char *key, ctl_status *st) {
    const ctl_gguf_kv *kv = ctl_gguf_find_kv(g, key);
    *st = kv ? CTL_OK : ctl__fail(g->ctx, CTL_ERR_NOT_FOUND, "gguf %s: no metadata key '%s'", g->file, key);
    return kv;
}

// A type mismatch, named with the key, the type found and the type wanted.
static ctl_status ctl__gguf_wrong(const ctl_gguf *g, const char *key, ctl_gguf_type type, const char *want) {
    return ctl__fail(g->ctx, CTL_ERR_FORMAT, "gguf %s: '%s' is %s, not %s", g->file, key, ctl__gguf_type_name(type), want);
}

// The integer at p into *out (int64) and/or *uout (uint64). Any integer width is accepted: llama.cpp insists on the
// exact type of each key, but a reader gains nothing from that (gguf.md 1.2). A value that does not fit the view
// asked for is CTL_ERR_RANGE; a bool or a float is not an integer.
static ctl_status ctl__gguf_int_at(const ctl_gguf *g, const char *key, ctl_gguf_type type, const unsigned char *p,
                                   int64_t *out, uint64_t *uout) {
    int64_t i;
    uint64_t u;
    double f;
    if (type == CTL_GGUF_BOOL || !ctl__gguf_number(type, p, &i, &u, &f)) return ctl__gguf_wrong(g, key, type, "an integer");
    if (out && (type == CTL_GGUF_U64 && u > (uint64_t)INT64_MAX))
        return ctl__fail(g->ctx, CTL_ERR_RANGE, "gguf %s: '%s' = %" PRIu64 " does not fit int64", g->file, key, u);
    if (uout && i < 0 && type != CTL_GGUF_U64)
        return ctl__fail(g->ctx, CTL_ERR_RANGE, "gguf %s: '%s' = %" PRId64 " is negative", g->file, key, i);
    if (out) *out = i;
    if (uout) *uout = u;
    return CTL_OK;
}

CTL_API ctl_status ctl_gguf_get_int(const ctl_gguf *g, const char *key, int64_t *out) {
    if (!CTL__ARGS(g ? g->ctx : NULL, g && key && out)) return CTL_ERR_INVALID;
    ctl_status st;
    const ctl_gguf_kv *kv = ctl__gguf_want(g, key, &st);
    return kv ? ctl__gguf_int_at(g, key, kv->type, kv->data, out, NULL) : st;
}

CTL_API ctl_status ctl_gguf_get_uint(const ctl_gguf *g, const char *key, uint64_t *out) {
    if (!CTL__ARGS(g ? g->ctx : NULL, g && key && out)) return CTL_ERR_INVALID;
    ctl_status st;
    const ctl_gguf_kv *kv = ctl__gguf_want(g, key, &st);
    return kv ? ctl__gguf_int_at(g, key, kv->type, kv->data, NULL, out) : st;
}

// f32 or f64 only: a float key stored as an integer is refused rather than converted.
static ctl_status ctl__gguf_float_at(const ctl_gguf *g, const char *key, ctl_gguf_type type, const unsigned char *p,
                                     double *out) {
    int64_t i;
    uint64_t u;
    if (type != CTL_GGUF_F32 && type != CTL_GGUF_F64) return ctl__gguf_wrong(g, key, type, "f32 or f64");
    ctl__gguf_number(type, p, &i, &u, out);
    return CTL_OK;
}

CTL_API ctl_status ctl_gguf_get_float(const ctl_gguf *g, const char *key, double *out) {
    if (!CTL__ARGS(g ? g->ctx : NULL, g && key && out)) return CTL_ERR_INVALID;
    ctl_status st;
    const ctl_gguf_kv *kv = ctl__gguf_want(g, key, &st);
    return kv ? ctl__gguf_float_at(g, key, kv->type, kv->data, out) : st;
}

CTL_API ctl_status ctl_gguf_get_bool(const ctl_gguf *g, const char *key, bool *out) {
    if (!CTL__ARGS(g ? g->ctx : NULL, g && key && out)) return CTL_ERR_INVALID;
    ctl_status st;
    const ctl_gguf_kv *kv = ctl__gguf_want(g, key, &st);
    if (!kv) return st;
    if (kv->type != CTL_GGUF_BOOL) return ctl__gguf_wrong(g, key, kv->type, "bool");
    *out = kv->data[0] != 0;   // any non-zero byte is true, as in ggml
    return CTL_OK;
}

CTL_API ctl_status ctl_gguf_get_str(const ctl_gguf *g, const char *key, const char **s, size_t *len) {
    if (!CTL__ARGS(g ? g->ctx : NULL, g && key && s && len)) return CTL_ERR_INVALID;
    ctl_status st;
    const ctl_gguf_kv *kv = ctl__gguf_want(g, key, &st);
    if (!kv) return st;
    if (kv->type != CTL_GGUF_STR) return ctl__gguf_wrong(g, key, kv->type, "a string");
    *s = (const char *)kv->data, *len = (size_t)kv->count;   // not NUL-terminated: in the file
    return CTL_OK;
}

// Checks that kv is an array and i lies inside it, before any element is addressed.
static ctl_status ctl__gguf_elem(const ctl_gguf *g, const ctl_gguf_kv *kv, uint64_t i) {
    if (kv->type != CTL_GGUF_ARR) return ctl__gguf_wrong(g, kv->key, kv->type, "an array");
    if (i >= kv->count)
        return ctl__fail(g->ctx, CTL_ERR_RANGE, "gguf %s: '%s' has %" PRIu64 " elements, asked for %" PRIu64, g->file,
                         kv->key, kv->count, i);
    return CTL_OK;
}

CTL_API ctl_status ctl_gguf_arr_int(const ctl_gguf *g, const ctl_gguf_kv *kv, uint64_t i, int64_t *out) {
    if (!CTL__ARGS(g ? g->ctx : NULL, g && kv && out)) return CTL_ERR_INVALID;
    ctl_status st = ctl__gguf_elem(g, kv, i);
    if (st) return st;
    // Element i sits at data + i * element size, inside the array (checked by ctl__gguf_elem and, against the file, by
    // the parser). A string array has element size 0 and fails as "not an integer".
    return ctl__gguf_int_at(g, kv->key, kv->elem_type, kv->data + i * ctl__gguf_scalar_size(kv->elem_type), out, NULL);
}

CTL_API ctl_status ctl_gguf_arr_float(const ctl_gguf *g, const ctl_gguf_kv *kv, uint64_t i, double *out) {
    if (!CTL__ARGS(g ? g->ctx : NULL, g && kv && out)) return CTL_ERR_INVALID;
    ctl_status st = ctl__gguf_elem(g, kv, i);
    if (st) return st;
    return ctl__gguf_float_at(g, kv->key, kv->elem_type, kv->data + i * ctl__gguf_scalar_size(kv->elem_type), out);
}

CTL_API ctl_status ctl_gguf_arr_str(const ctl_gguf *g, const ctl_gguf_kv *kv, uint64_t i, const char **s,
                                    size_t *len) {
    if (!CTL__ARGS(g ? g->ctx : NULL, g && kv && s && len)) return CTL_ERR_INVALID;
    ctl_status st = ctl__gguf_elem(g, kv, i);
    if (st) return st;
    if (kv->elem_type != CTL_GGUF_STR) return ctl__gguf_wrong(g, kv->key, kv->elem_type, "a string array");
    // The offset was recorded and bounds-checked by the parser: an 8-byte length, then that many bytes.
    const unsigned char *p = kv->data + kv->str_offsets[i];
    *len = (size_t)ctl__le64(p), *s = (const char *)p + 8;
    return CTL_OK;
}

// out holds ctl_gguf_tensor_numel(t) floats; the type is checked again because t may be a caller's own struct.
CTL_API ctl_status ctl_gguf_read_f32(const ctl_gguf *g, const ctl_gguf_tensor *t, float *out) {
    if (!CTL__ARGS(g ? g->ctx : NULL, g && t && out)) return CTL_ERR_INVALID;
    if (ctl__ggml_index(t->type) < 0)
        return ctl__fail(g->ctx, CTL_ERR_UNSUPPORTED, "gguf %s: tensor '%s' has type %d", g->file, t->name, (int)t->type);
    ctl_ggml_dequantize(t->type, t->data, out, ctl_gguf_tensor_numel(t));
    return CTL_OK;
}

// ---- writing a file whole ------------------------------------------------------------------
//
// Every file the library writes goes to a temporary name of its own ("<path>.tmp.<pid>", so
// two processes never share one), is flushed to the disk, renamed over <path>, and the
// directory flushed after the rename: a crash, a full disk or a second writer leaves the old
// file or the new one, never a torn one.
// Without CTL__POSIX there is no fsync, the temporary name has no pid, and rename() may refuse to replace an existing
// file (Windows' does): the save then fails and <path> is kept. On macOS, fsync does not flush the drive's own cache
// (F_FULLFSYNC would), so the guarantee holds against a crash of the program or the kernel, not a power cut.
typedef struct ctl__wfile {
    FILE *f;
    char *tmp;   // the temporary name (owned); at close, reused for the directory's name
    const char *path, *who;   // who: the writer, for messages
} ctl__wfile;

// Opens "<path>.tmp.<pid>" for writing; w must then be passed to ctl__wfile_close exactly once.
static ctl_status ctl__wfile_open(ctl_ctx *ctx, ctl__wfile *w, const char *path, const char *who) {
    memset(w, 0, sizeof *w);
    w->path = path, w->who = who;
    size_t n = strlen(path) + 32;   // room for ".tmp." and any pid
    if (!(w->tmp = (char *)ctl_alloc(ctx, n))) return ctl__fail(ctx, CTL_ERR_OUT_OF_MEMORY, "%s: out of memory", who);
#ifdef CTL__POSIX
    snprintf(w->tmp, n, "%s.tmp.%ld", path, (long)getpid());
#else
    snprintf(w->tmp, n, "%s.tmp", path);
#endif
    // This fails when the directory is missing or not writable; <path> is then untouched.
    if (!(w->f = fopen(w->tmp, "wb"))) {
        ctl_status st = ctl__fail(ctx, CTL_ERR_IO, "%s: cannot create '%s': %s", who, w->tmp, strerror(errno));
        ctl_free(ctx, w->tmp);
        return st;
    }
    return CTL_OK;
}

#ifdef CTL__POSIX
// fsync through a read-only descriptor, which works for a file and for a directory alike.
static bool ctl__fsync_path(const char *path) {
    int fd = open(path, O_RDONLY);
    bool ok = fd >= 0 && fsync(fd) == 0;
    if (fd >= 0) close(fd);
    return ok;
}
#endif

// Ends the write: with ok (every byte written), the file replaces <path>; otherwise, or when
// flushing or renaming fails, the temporary file goes and <path> is as it was.
static ctl_status ctl__wfile_close(ctl_ctx *ctx, ctl__wfile *w, bool ok) {
    int err = ok ? 0 : errno;   // a failed write's reason, kept before the flush and close can change errno
    if (fflush(w->f) != 0 && ok) ok = false, err = errno;   // the file is closed even after a failed write
    if (fclose(w->f) != 0 && ok) ok = false, err = errno;
#ifdef CTL__POSIX
    if (ok && !ctl__fsync_path(w->tmp)) ok = false, err = errno;
#endif
    // On POSIX, rename within one file system replaces <path> atomically: a reader opens the old file or the new one.
    if (ok && rename(w->tmp, w->path) != 0) ok = false, err = errno;
    ctl_status st = CTL_OK;
    if (!ok) {
        remove(w->tmp);
        st = ctl__fail(ctx, CTL_ERR_IO, "%s: writing '%s' failed (%s); '%s' is as it was", w->who, w->tmp, err ? strerror(err) : "an error",
                       w->path);
    }
#ifdef CTL__POSIX
    if (ok) {   // the rename made durable: the directory flushed (its name written over tmp's)
        // The directory of <path>: what precedes the last '/', "/" for a file in the root, "." for a bare name.
        const char *slash = strrchr(w->path, '/');
        size_t n = !slash ? 0 : slash == w->path ? 1 : (size_t)(slash - w->path);
        if (n) memcpy(w->tmp, w->path, n), w->tmp[n] = 0;
        else strcpy(w->tmp, ".");
        ctl__fsync_path(w->tmp);
    }
#endif
    ctl_free(ctx, w->tmp);
    return st;
}

// ---- GGUF writer -----------------------------------------------------------------------------

// A tensor held by the writer: its bytes are copied in (and owned) when it is added, so the caller's buffer may go.
typedef struct ctl__wtensor {
    char name[64];
    ctl_ggml_type type;
    int n_dims;
    int64_t ne[4];
    uint64_t nbytes;
    unsigned char *bytes;   // nbytes bytes, as they will sit in the file
} ctl__wtensor;

struct ctl_gguf_writer {
    ctl_ctx *ctx;
    unsigned char *kv;          // the serialised metadata section
    size_t kv_size, kv_cap;
    int64_t n_kv, n_tensors, cap_tensors;   // entries so far, and the tensors' capacity
    char **keys;                // for the duplicate check
    int64_t cap_keys;
    ctl__wtensor *tensors;
};

// Makes room in *p for `need` elements of `elem` bytes, at least doubling, so n appends cost O(n) copying in all.
// On failure *p and *cap are left as they were and still valid. Used for the growing arrays across the library.
static bool ctl__grow(ctl_ctx *ctx, void **p, size_t elem, int64_t *cap, int64_t need) {
    if (need <= *cap) return true;
    int64_t n = CTL__MAX(need, *cap * 2 + 8);
    void *q = ctl_alloc(ctx, (size_t)n * elem);
    if (!q) return false;
    if (*p) memcpy(q, *p, (size_t)*cap * elem);
    ctl_free(ctx, *p);
    *p = q, *cap = n;
    return true;
}

// Appends n bytes to the metadata buffer.
static ctl_status ctl__wput(ctl_gguf_writer *w, const void *p, size_t n) {
    int64_t cap = (int64_t)w->kv_cap;
    void *buf = w->kv;
    if (!ctl__grow(w->ctx, &buf, 1, &cap, (int64_t)(w->kv_size + n)))
        return ctl__fail(w->ctx, CTL_ERR_OUT_OF_MEMORY, "gguf writer: out of memory");
    w->kv = (unsigned char *)buf, w->kv_cap = (size_t)cap;
    memcpy(w->kv + w->kv_size, p, n);
    w->kv_size += n;
    return CTL_OK;
}

// Little-endian whatever the host, as the header's numbers must be.
static ctl_status ctl__wput_u32(ctl_gguf_writer *w, uint32_t v) {
    unsigned char b[4] = {(unsigned char)v, (unsigned char)(v >> 8), (unsigned char)(v >> 16), (unsigned char)(v >> 24)};
    return ctl__wput(w, b, 4);
}

static ctl_status ctl__wput_u64(ctl_gguf_writer *w, uint64_t v) {
    ctl_status st = ctl__wput_u32(w, (uint32_t)v);
    return st ? st : ctl__wput_u32(w, (uint32_t)(v >> 32));
}

// Starts an entry: the key (refused if empty, too long or already set) and its type.
// The duplicate check is a linear scan: files have tens of keys, and ggml refuses a file that repeats one.
static ctl_status ctl__wkey(ctl_gguf_writer *w, const char *key, ctl_gguf_type type) {
    size_t len = strlen(key);
    if (!len || len > 65535) return ctl__fail(w->ctx, CTL_ERR_INVALID, "gguf writer: key of %zu bytes", len);
    for (int64_t i = 0; i < w->n_kv; i++)
        if (!strcmp(w->keys[i], key)) return ctl__fail(w->ctx, CTL_ERR_INVALID, "gguf writer: key '%s' set twice", key);
    void *keys = w->keys;
    char *copy = (char *)ctl_alloc(w->ctx, len + 1);
    if (!copy || !ctl__grow(w->ctx, &keys, sizeof(char *), &w->cap_keys, w->n_kv + 1)) {
        ctl_free(w->ctx, copy);
        return ctl__fail(w->ctx, CTL_ERR_OUT_OF_MEMORY, "gguf writer: out of memory");
    }
    w->keys = (char **)keys;
    memcpy(copy, key, len + 1);
    w->keys[w->n_kv++] = copy;
    // The record so far: u64 key length, the key's bytes, u32 type; the value follows from the caller.
    ctl_status st = ctl__wput_u64(w, len);
    if (!st) st = ctl__wput(w, key, len);
    if (!st) st = ctl__wput_u32(w, (uint32_t)type);
    return st;
}

// An empty writer. Every set and add copies what it is given, so the caller's buffers may go at once.
CTL_API ctl_status ctl_gguf_writer_init(ctl_ctx *ctx, ctl_gguf_writer **out) {
    if (out) *out = NULL;
    if (!CTL__ARGS(ctx, ctx && out)) return CTL_ERR_INVALID;
    ctl_gguf_writer *w = (ctl_gguf_writer *)ctl_alloc(ctx, sizeof(ctl_gguf_writer));
    *out = w;
    if (!w) return ctl__fail(ctx, CTL_ERR_OUT_OF_MEMORY, "gguf writer: out of memory");
    memset(w, 0, sizeof *w);
    w->ctx = ctx;
    return CTL_OK;
}

// The key copies, each tensor's bytes, and the arrays; nothing the caller passed in is kept.
CTL_API void ctl_gguf_writer_free(ctl_gguf_writer *w) {
    if (!w) return;
    for (int64_t i = 0; i < w->n_kv; i++) ctl_free(w->ctx, w->keys[i]);
    for (int64_t i = 0; i < w->n_tensors; i++) ctl_free(w->ctx, w->tensors[i].bytes);
    ctl_free(w->ctx, w->keys);
    ctl_free(w->ctx, w->tensors);
    ctl_free(w->ctx, w->kv);
    ctl_free(w->ctx, w);
}

// A scalar: its n bytes are copied in host order, which is the file's order on a little-endian host only.
// "general.alignment" describes the layout, which is the writer's: it aligns to 32 and writes no
// such key, which means 32. Asked for 32 it does nothing more (*done); any other value is refused,
// as a file that says one alignment and has another would be.
static ctl_status ctl__walignment(ctl_gguf_writer *w, const char *key, ctl_gguf_type type, const void *value, bool *done) {
    *done = !strcmp(key, "general.alignment");
    if (!*done) return CTL_OK;
    uint32_t a = 0;
    if (type == CTL_GGUF_U32) memcpy(&a, value, 4);   // (ggml reads it as a u32)
    return a == 32 ? CTL_OK
                   : ctl__fail(w->ctx, CTL_ERR_UNSUPPORTED, "gguf writer: general.alignment: the writer aligns to 32 (the one value accepted, as a u32)");
}

CTL_API ctl_status ctl_gguf_writer_set(ctl_gguf_writer *w, const char *key, ctl_gguf_type type, const void *value) {
    if (!CTL__ARGS(w ? w->ctx : NULL, w && key && value)) return CTL_ERR_INVALID;
    size_t n = ctl__gguf_scalar_size(type);
    if (!n) return ctl__fail(w->ctx, CTL_ERR_INVALID, "gguf writer: '%s': type %d is not a scalar", key, (int)type);
    bool done;
    ctl_status st = ctl__walignment(w, key, type, value, &done);
    if (st || done) return st;
    st = ctl__wkey(w, key, type);
    return st ? st : ctl__wput(w, value, n);
}

CTL_API ctl_status ctl_gguf_writer_set_u32(ctl_gguf_writer *w, const char *key, uint32_t v) {
    return ctl_gguf_writer_set(w, key, CTL_GGUF_U32, &v);
}

CTL_API ctl_status ctl_gguf_writer_set_f32(ctl_gguf_writer *w, const char *key, float v) {
    return ctl_gguf_writer_set(w, key, CTL_GGUF_F32, &v);
}

// A GGUF string: u64 length, then the bytes, with no NUL (s need not have one).
CTL_API ctl_status ctl_gguf_writer_set_str(ctl_gguf_writer *w, const char *key, const char *s, size_t len) {
    if (!CTL__ARGS(w ? w->ctx : NULL, w && key && (s || len == 0))) return CTL_ERR_INVALID;
    ctl_status st = ctl__wkey(w, key, CTL_GGUF_STR);
    if (!st) st = ctl__wput_u64(w, len);
    return st ? st : ctl__wput(w, s, len);
}

CTL_API ctl_status ctl_gguf_writer_set_array(ctl_gguf_writer *w, const char *key, ctl_gguf_type elem_type,
                                             const void *values, uint64_t count) {
    if (!CTL__ARGS(w ? w->ctx : NULL, w && key && (values || count == 0))) return CTL_ERR_INVALID;
    size_t n = ctl__gguf_scalar_size(elem_type);
    // count * n is formed only once it is known to fit a size_t.
    if (!n || count > (uint64_t)SIZE_MAX / n)
        return ctl__fail(w->ctx, CTL_ERR_INVALID, "gguf writer: '%s': bad array (type %d, %" PRIu64 " values)", key,
                         (int)elem_type, count);
    ctl_status st = ctl__wkey(w, key, CTL_GGUF_ARR);
    if (!st) st = ctl__wput_u32(w, (uint32_t)elem_type);
    if (!st) st = ctl__wput_u64(w, count);
    return st ? st : ctl__wput(w, values, (size_t)count * n);
}

// Each string is lens[i] bytes at strs[i]; none need be NUL-terminated. GGUF stores each as a u64 length and its bytes.
CTL_API ctl_status ctl_gguf_writer_set_str_array(ctl_gguf_writer *w, const char *key, const char *const *strs,
                                                 const size_t *lens, uint64_t count) {
    if (!CTL__ARGS(w ? w->ctx : NULL, w && key && ((strs && lens) || count == 0))) return CTL_ERR_INVALID;
    ctl_status st = ctl__wkey(w, key, CTL_GGUF_ARR);
    if (!st) st = ctl__wput_u32(w, CTL_GGUF_STR);
    if (!st) st = ctl__wput_u64(w, count);
    for (uint64_t i = 0; i < count && !st; i++) {
        st = ctl__wput_u64(w, lens[i]);
        if (!st) st = ctl__wput(w, strs[i], lens[i]);
    }
    return st;
}

// Copies one entry of an open file byte for byte, whatever its type. A string array's bytes run from data to the end of
// its last element (last offset + 8-byte length + that length), all inside the file by the parser's checks.
CTL_API ctl_status ctl_gguf_writer_copy_kv(ctl_gguf_writer *w, const ctl_gguf *g, const ctl_gguf_kv *kv) {
    if (!CTL__ARGS(w ? w->ctx : g ? g->ctx : NULL, w && g && kv)) return CTL_ERR_INVALID;
    bool done;
    ctl_status st = ctl__walignment(w, kv->key, kv->type, kv->data, &done);
    if (st || done) return st;
    if ((st = ctl__wkey(w, kv->key, kv->type))) return st;
    if (kv->type == CTL_GGUF_STR) {
        st = ctl__wput_u64(w, kv->count);
        return st ? st : ctl__wput(w, kv->data, (size_t)kv->count);
    }
    if (kv->type != CTL_GGUF_ARR) return ctl__wput(w, kv->data, ctl__gguf_scalar_size(kv->type));
    st = ctl__wput_u32(w, (uint32_t)kv->elem_type);
    if (!st) st = ctl__wput_u64(w, kv->count);
    if (st) return st;
    size_t bytes = kv->elem_type == CTL_GGUF_STR
                       ? (kv->count ? (size_t)kv->str_offsets[kv->count - 1] + 8 + (size_t)ctl__le64(kv->data + kv->str_offsets[kv->count - 1]) : 0)
                       : (size_t)kv->count * ctl__gguf_scalar_size(kv->elem_type);
    (void)g;   // g only names the source's context for the argument check
    return ctl__wput(w, kv->data, bytes);
}

// Checks a new tensor by the reader's rules (a unique name of 1-63 bytes, 1-4 dimensions, ne[0] a multiple of the
// block) and adds it with room for its bytes, left for the caller to fill. Unlike the reader, a zero dimension is
// refused. *out stays valid until the next tensor is added.
static ctl_status ctl__wtensor_new(ctl_gguf_writer *w, const char *name, ctl_ggml_type type, int n_dims,
                                   const int64_t *ne, ctl__wtensor **out) {
    int ti = ctl__ggml_index(type);
    size_t len = strlen(name);
    if (ti < 0 || n_dims < 1 || n_dims > 4 || !len || len >= 64)
        return ctl__fail(w->ctx, CTL_ERR_INVALID, "gguf writer: tensor '%s': bad name, type %d or %d dims", name, (int)type, n_dims);
    for (int64_t i = 0; i < w->n_tensors; i++)
        if (!strcmp(w->tensors[i].name, name)) return ctl__fail(w->ctx, CTL_ERR_INVALID, "gguf writer: tensor '%s' added twice", name);
    ctl__wtensor t;
    memset(&t, 0, sizeof t);
    memcpy(t.name, name, len);
    t.type = type, t.n_dims = n_dims;
    uint64_t numel = 1;
    // The reader's bound: the product of the dimensions stays <= INT64_MAX, so nbytes cannot wrap.
    for (int d = 0; d < 4; d++) {
        t.ne[d] = d < n_dims ? ne[d] : 1;
        if (t.ne[d] <= 0 || numel > (uint64_t)INT64_MAX / (uint64_t)t.ne[d])
            return ctl__fail(w->ctx, CTL_ERR_INVALID, "gguf writer: tensor '%s': bad shape", name);
        numel *= (uint64_t)t.ne[d];
    }
    if (t.ne[0] % ctl__ggml_types[ti].block)
        return ctl__fail(w->ctx, CTL_ERR_INVALID, "gguf writer: tensor '%s': ne[0] = %" PRId64 " is not a multiple of %d",
                         name, t.ne[0], ctl__ggml_types[ti].block);
    t.nbytes = numel / (uint64_t)ctl__ggml_types[ti].block * (uint64_t)ctl__ggml_types[ti].bytes;
    void *ts = w->tensors;
    // Both allocations happen before anything is recorded, so a failure leaves the writer as it was.
    t.bytes = (unsigned char *)ctl_alloc(w->ctx, (size_t)t.nbytes);
    if (!t.bytes || !ctl__grow(w->ctx, &ts, sizeof(ctl__wtensor), &w->cap_tensors, w->n_tensors + 1)) {
        ctl_free(w->ctx, t.bytes);
        return ctl__fail(w->ctx, CTL_ERR_OUT_OF_MEMORY, "gguf writer: tensor '%s': out of memory", name);
    }
    w->tensors = (ctl__wtensor *)ts;
    w->tensors[w->n_tensors] = t;
    *out = &w->tensors[w->n_tensors++];
    return CTL_OK;
}

// bytes holds the tensor already encoded, nbytes of it: quantised blocks exactly as ggml lays them out.
CTL_API ctl_status ctl_gguf_writer_add_raw(ctl_gguf_writer *w, const char *name, ctl_ggml_type type, int n_dims,
                                           const int64_t *ne, const void *bytes) {
    if (!CTL__ARGS(w ? w->ctx : NULL, w && name && ne && bytes)) return CTL_ERR_INVALID;
    ctl__wtensor *t;
    ctl_status st = ctl__wtensor_new(w, name, type, n_dims, ne, &t);
    if (!st) memcpy(t->bytes, bytes, (size_t)t->nbytes);
    return st;
}

// Q8_0 as ggml quantises it: d = max|x| / 127 per block of 32, q = round(x / d).
// The scale is stored rounded to f16 but the values are divided by the unrounded d, exactly as ggml's
// quantize_row_q8_0_ref does, so the bytes match ggml's. n is a multiple of 32 (ne[0] is).
static void ctl__quantize_q8_0(const float *x, unsigned char *b, int64_t n) {
    for (int64_t i = 0; i < n; i += 32, b += 34, x += 32) {
        float amax = 0.0f;
        for (int j = 0; j < 32; j++) amax = CTL__MAX(amax, fabsf(x[j]));
        float d = amax / 127.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
        uint16_t h = ctl_f32_to_f16(d);
        b[0] = (unsigned char)h, b[1] = (unsigned char)(h >> 8);
        for (int j = 0; j < 32; j++) b[2 + j] = (unsigned char)(int8_t)roundf(x[j] * id);
    }
}

// fp32 values in, stored as `type`: f32 copied (host order), f16 and bf16 rounded to nearest even, q8_0 quantised per
// block of 32. Other quantised types are not written: cotlab has no quantiser for them (ctl_gguf_writer_add_raw takes
// bytes already quantised).
CTL_API ctl_status ctl_gguf_writer_add_tensor(ctl_gguf_writer *w, const char *name, ctl_ggml_type type, int n_dims,
                                              const int64_t *ne, const float *values) {
    if (!CTL__ARGS(w ? w->ctx : NULL, w && name && ne && values)) return CTL_ERR_INVALID;
    if (type != CTL_GGML_F32 && type != CTL_GGML_F16 && type != CTL_GGML_BF16 && type != CTL_GGML_Q8_0)
        return ctl__fail(w->ctx, CTL_ERR_UNSUPPORTED, "gguf writer: tensor '%s': cotlab writes f32, f16, bf16 and q8_0, not %s",
                         name, ctl_ggml_type_name(type));
    ctl__wtensor *t;
    ctl_status st = ctl__wtensor_new(w, name, type, n_dims, ne, &t);
    if (st) return st;
    int64_t n = t->ne[0] * t->ne[1] * t->ne[2] * t->ne[3];
    // f16 and bf16 are stored little-endian byte by byte; f32 by memcpy, so host order.
    for (int64_t i = 0; type != CTL_GGML_Q8_0 && i < n; i++) {
        uint16_t h = type == CTL_GGML_F16 ? ctl_f32_to_f16(values[i]) : ctl_f32_to_bf16(values[i]);
        if (type == CTL_GGML_F32) memcpy(t->bytes + 4 * i, values + i, 4);
        else t->bytes[2 * i] = (unsigned char)h, t->bytes[2 * i + 1] = (unsigned char)(h >> 8);
    }
    if (type == CTL_GGML_Q8_0) ctl__quantize_q8_0(values, t->bytes, n);
    return CTL_OK;
}

// The layout of ggml's and gguf-py's writers (gguf.md 1.1): header, metadata, tensor infos, zero padding to 32, then
// each tensor's bytes padded to 32, in info order. Each offset is the running sum of the padded sizes before it: the
// gapless layout that ggml's reader demands. The alignment is always the default 32 and no general.alignment key is
// written, so a general.alignment copied in with another value would make the file contradict itself.
CTL_API ctl_status ctl_gguf_writer_save(ctl_gguf_writer *w, const char *path) {
    if (!CTL__ARGS(w ? w->ctx : NULL, w && path)) return CTL_ERR_INVALID;
    ctl_ctx *ctx = w->ctx;
    const uint64_t align = 32;
    ctl__wfile wf;
    ctl_status wst = ctl__wfile_open(ctx, &wf, path, "gguf writer");
    if (wst) return wst;
    FILE *f = wf.f;
    // Header, metadata and tensor infos go through the metadata buffer's tail, then out.
    size_t kv_end = w->kv_size;   // the infos go after it, and are cut off again at the end
    ctl_status st = CTL_OK;
    uint64_t offset = 0;
    // Tensor infos: name, n_dims, ne[n_dims], type, and the offset, the running sum of the padded sizes before it.
    for (int64_t i = 0; i < w->n_tensors && !st; i++) {
        const ctl__wtensor *t = &w->tensors[i];
        st = ctl__wput_u64(w, strlen(t->name));
        if (!st) st = ctl__wput(w, t->name, strlen(t->name));
        if (!st) st = ctl__wput_u32(w, (uint32_t)t->n_dims);
        for (int d = 0; d < t->n_dims && !st; d++) st = ctl__wput_u64(w, (uint64_t)t->ne[d]);
        if (!st) st = ctl__wput_u32(w, (uint32_t)t->type);
        if (!st) st = ctl__wput_u64(w, offset);
        offset += (t->nbytes + align - 1) / align * align;
    }
    // Magic, version 3 (u32), then tensor_count and kv_count as little-endian u64.
    unsigned char head[24] = {'G', 'G', 'U', 'F', 3, 0, 0, 0};
    for (int b = 0; b < 8; b++) {
        head[8 + b] = (unsigned char)((uint64_t)w->n_tensors >> (8 * b));
        head[16 + b] = (unsigned char)((uint64_t)w->n_kv >> (8 * b));
    }
    // Every record is built before the first write; on any failure ctl__wfile_close removes the temporary file.
    static const unsigned char zeros[32] = {0};
    // Header, metadata and infos, then zeros up to the first multiple of 32, where the data section starts.
    size_t written = 24 + w->kv_size;
    bool ok = !st && fwrite(head, 1, 24, f) == 24 && fwrite(w->kv, 1, w->kv_size, f) == w->kv_size;
    ok = ok && fwrite(zeros, 1, (size_t)((align - written % align) % align), f) == (size_t)((align - written % align) % align);
    for (int64_t i = 0; ok && i < w->n_tensors; i++) {
        const ctl__wtensor *t = &w->tensors[i];
        // Each tensor is followed by zeros up to the next multiple of 32, so the next one starts at its recorded offset.
        size_t pad = (size_t)((align - t->nbytes % align) % align);
        ok = fwrite(t->bytes, 1, (size_t)t->nbytes, f) == (size_t)t->nbytes && fwrite(zeros, 1, pad, f) == pad;
    }
    w->kv_size = kv_end;   // the infos are rebuilt on every save
    wst = ctl__wfile_close(ctx, &wf, ok);
    return st ? st : wst;
}


// ---- safetensors -----------------------------------------------------------------------------

// One __metadata__ entry; both strings owned (copied from the JSON with their escapes decoded).
typedef struct ctl__st_meta { char *key, *value; } ctl__st_meta;

// An open safetensors file: like ctl_gguf, the tensors' data point into `bytes`.
struct ctl_safetensors {
    ctl_ctx *ctx;
    char file[128];   // for messages: the path, or "<memory>"
    const unsigned char *bytes;
    size_t size;
    void *owned;
    int64_t n, cap, n_meta, cap_meta;   // counts and capacities of the two arrays below
    ctl_safetensors_tensor *tensors;
    ctl__st_meta *meta;
};

// A small JSON reader (safetensors headers, PEFT's adapter_config.json): objects, strings
// (with escapes), numbers, literals, and any value skipped. Every read is bounded by the text,
// nesting by CTL__JSON_DEPTH; the first error is kept, its message naming `where` and the byte
// offset (plus `base`, where the text sits in its file).
// Limits, stated: strings are decoded into fixed buffers and a longer one is an error, and an escaped NUL (u0000)
// ends the C string early. The text is never NUL-terminated: every read tests pos against n first.
#define CTL__JSON_DEPTH 64
typedef struct ctl__json {
    ctl_ctx *ctx;
    const char *where;
    size_t base;
    const unsigned char *p;   // the text, p[0, n); pos <= n always
    size_t n, pos;
    ctl_status err;
} ctl__json;

// Only the first error is kept: a failure deep inside a value and its callers' failures after it make one message.
static bool ctl__j_fail(ctl__json *j, const char *what) {
    if (!j->err) j->err = ctl__fail(j->ctx, CTL_ERR_FORMAT, "%s: offset %zu: %s", j->where, j->pos + j->base, what);
    return false;
}

// JSON's four whitespace characters, and no others.
static void ctl__j_ws(ctl__json *j) {
    while (j->pos < j->n && (j->p[j->pos] == ' ' || j->p[j->pos] == '\n' || j->p[j->pos] == '\r' || j->p[j->pos] == '\t'))
        j->pos++;
}

static bool ctl__j_is(ctl__json *j, char c) {   // consumes c (after spaces) if it is next
    ctl__j_ws(j);
    if (j->pos < j->n && j->p[j->pos] == (unsigned char)c) return j->pos++, true;
    return false;
}

// Like ctl__j_is, but a missing c is an error naming it.
static bool ctl__j_expect(ctl__json *j, char c) {
    char msg[32];
    if (ctl__j_is(j, c)) return true;
    snprintf(msg, sizeof msg, "expected '%c'", c);
    return ctl__j_fail(j, msg);
}

// Appends cp (below 0x110000) to out[*len] as 1-4 UTF-8 bytes; out must have 4 bytes free.
static void ctl__utf8(char *out, size_t *len, uint32_t cp) {
    if (cp < 0x80) out[(*len)++] = (char)cp;
    else if (cp < 0x800) out[(*len)++] = (char)(0xC0 | cp >> 6), out[(*len)++] = (char)(0x80 | (cp & 63));
    else if (cp < 0x10000)
        out[(*len)++] = (char)(0xE0 | cp >> 12), out[(*len)++] = (char)(0x80 | (cp >> 6 & 63)), out[(*len)++] = (char)(0x80 | (cp & 63));
    else
        out[(*len)++] = (char)(0xF0 | cp >> 18), out[(*len)++] = (char)(0x80 | (cp >> 12 & 63)),
        out[(*len)++] = (char)(0x80 | (cp >> 6 & 63)), out[(*len)++] = (char)(0x80 | (cp & 63));
}

// The four hex digits of a u-escape; the count is checked before the first digit is read.
static bool ctl__j_hex4(ctl__json *j, uint32_t *v) {
    *v = 0;
    if (j->n - j->pos < 4) return ctl__j_fail(j, "short \\u escape");
    for (int i = 0; i < 4; i++) {
        int c = j->p[j->pos++], d = c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1;
        if (d < 0) return ctl__j_fail(j, "bad \\u escape");
        *v = *v << 4 | (uint32_t)d;
    }
    return true;
}

// A string into out (cap bytes with the NUL); longer strings are an error. out NULL: the string
// is checked and skipped, however long.
// Before each character, len + 4 < cap leaves room for the longest UTF-8 sequence an escape can produce plus the NUL,
// so a string is refused a few bytes before it would truly not fit. Raw bytes are copied unvalidated; control
// characters are refused as JSON demands.
static bool ctl__j_string(ctl__json *j, char *out, size_t cap) {
    size_t len = 0;
    if (!ctl__j_expect(j, '"')) return false;
    while (j->pos < j->n && j->p[j->pos] != '"') {
        if (out && len + 4 >= cap) return ctl__j_fail(j, "string too long");
        unsigned char c = j->p[j->pos++];
        if (c < 0x20) return ctl__j_fail(j, "control character in a string");
        if (c != '\\') {
            if (out) out[len++] = (char)c;
            continue;
        }
        if (j->pos >= j->n) break;
        c = j->p[j->pos++];
        const char *simple = strchr("\"\\/bfnrt", c), *value = "\"\\/\b\f\n\r\t";
        if (c && simple) {
            if (out) out[len++] = value[simple - "\"\\/bfnrt"];
        } else if (c == 'u') {
            uint32_t cp, lo;
            if (!ctl__j_hex4(j, &cp)) return false;
            // Escapes are UTF-16: a high surrogate must be followed by an escaped low one, the two making one code point above
            // U+FFFF. A lone surrogate has no UTF-8 form and is refused.
            if (cp >= 0xD800 && cp < 0xDC00) {   // a surrogate pair
                if (j->n - j->pos < 6 || j->p[j->pos] != '\\' || j->p[j->pos + 1] != 'u') return ctl__j_fail(j, "lone surrogate");
                j->pos += 2;
                if (!ctl__j_hex4(j, &lo)) return false;
                if (lo < 0xDC00 || lo > 0xDFFF) return ctl__j_fail(j, "bad surrogate pair");
                cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
            } else if (cp >= 0xDC00 && cp < 0xE000) {
                return ctl__j_fail(j, "lone surrogate");
            }
            if (out) ctl__utf8(out, &len, cp);
        } else {
            return ctl__j_fail(j, "bad escape");
        }
    }
    if (!ctl__j_expect(j, '"')) return ctl__j_fail(j, "unterminated string");
    if (out) out[len] = 0;
    return true;
}

// Digits only, no sign, fraction or exponent: what shape and data_offsets hold. A value past 2^64 - 1 is refused
// before it can wrap.
static bool ctl__j_uint(ctl__json *j, uint64_t *v) {
    ctl__j_ws(j);
    *v = 0;
    size_t start = j->pos;
    while (j->pos < j->n && j->p[j->pos] >= '0' && j->p[j->pos] <= '9') {
        uint64_t d = (uint64_t)(j->p[j->pos++] - '0');
        if (*v > (UINT64_MAX - d) / 10) return ctl__j_fail(j, "number too large");
        *v = *v * 10 + d;
    }
    return j->pos > start ? true : ctl__j_fail(j, "expected a non-negative integer");
}

// A number (JSON's grammar, checked by hand; strtod does the conversion).
// The extent is found first so that strtod, which needs a NUL, reads a copy and never runs past the text; a number
// of 64 characters or more is refused. The check is a little looser than JSON (it takes "01", "-.5" and "1."), never
// stricter. strtod follows the C locale's decimal point: a program that sets another locale gets wrong values.
static bool ctl__j_number(ctl__json *j, double *v) {
    ctl__j_ws(j);
    size_t start = j->pos, digits = 0;
    char buf[64];
    if (j->pos < j->n && j->p[j->pos] == '-') j->pos++;
    for (; j->pos < j->n && j->p[j->pos] >= '0' && j->p[j->pos] <= '9'; j->pos++) digits++;
    if (j->pos < j->n && j->p[j->pos] == '.')
        for (j->pos++; j->pos < j->n && j->p[j->pos] >= '0' && j->p[j->pos] <= '9'; j->pos++) digits++;
    if (digits && j->pos < j->n && (j->p[j->pos] == 'e' || j->p[j->pos] == 'E')) {
        j->pos++;
        if (j->pos < j->n && (j->p[j->pos] == '+' || j->p[j->pos] == '-')) j->pos++;
        while (j->pos < j->n && j->p[j->pos] >= '0' && j->p[j->pos] <= '9') j->pos++;
    }
    if (!digits || j->pos - start >= sizeof buf) return j->pos = start, ctl__j_fail(j, "expected a number");
    memcpy(buf, j->p + start, j->pos - start);
    buf[j->pos - start] = 0;
    *v = strtod(buf, NULL);
    return true;
}

// true, false or null: *v is 1, 0 or -1.
static bool ctl__j_literal(ctl__json *j, int *v) {
    static const char *const words[3] = {"null", "false", "true"};
    ctl__j_ws(j);
    for (int k = 0; k < 3; k++) {
        size_t len = strlen(words[k]);
        if (j->n - j->pos >= len && !memcmp(j->p + j->pos, words[k], len)) return j->pos += len, *v = k - 1, true;
    }
    return ctl__j_fail(j, "expected true, false or null");
}

// Any one value, skipped.
// Nesting deeper than CTL__JSON_DEPTH is refused, so hostile input cannot overflow the stack by recursion; a level
// holds a few bytes. Strings (keys too) are checked, not kept, so a skipped field may be of any length.
static bool ctl__j_skip(ctl__json *j, int depth) {
    double x;
    int b;
    ctl__j_ws(j);
    if (depth > CTL__JSON_DEPTH) return ctl__j_fail(j, "nested too deeply");
    if (j->pos >= j->n) return ctl__j_fail(j, "expected a value");
    unsigned char c = j->p[j->pos];
    if (c == '"') return ctl__j_string(j, NULL, 0);
    // An object or an array: members up to the closing bracket, an object's member being a string key, ':' and a value.
    if (c == '{' || c == '[') {
        bool obj = c == '{';
        j->pos++;
        if (ctl__j_is(j, obj ? '}' : ']')) return true;
        do {
            if (obj && (!ctl__j_string(j, NULL, 0) || !ctl__j_expect(j, ':'))) return false;
            if (!ctl__j_skip(j, depth + 1)) return false;
        } while (ctl__j_is(j, ','));
        return ctl__j_expect(j, obj ? '}' : ']');
    }
    if (c == '-' || (c >= '0' && c <= '9')) return ctl__j_number(j, &x);
    return ctl__j_literal(j, &b);
}

// Bits per element of a safetensors dtype (0: unknown).
// The dtype strings of trl_peft.md 5. F4 and the F6 types are narrower than a byte: a tensor of them must still fill
// whole bytes, which the size check in ctl__st_parse requires.
static int ctl__st_bits(const char *d) {
    static const struct { const char *name; int bits; } t[] = {
        {"BOOL", 8}, {"U8", 8}, {"I8", 8}, {"F8_E4M3", 8}, {"F8_E5M2", 8}, {"F8_E8M0", 8}, {"F8_E4M3FNUZ", 8},
        {"F8_E5M2FNUZ", 8}, {"I16", 16}, {"U16", 16}, {"F16", 16}, {"BF16", 16}, {"I32", 32}, {"U32", 32},
        {"F32", 32}, {"I64", 64}, {"U64", 64}, {"F64", 64}, {"C64", 64}, {"F4", 4}, {"F6_E2M3", 6}, {"F6_E3M2", 6}};
    for (size_t i = 0; i < sizeof t / sizeof t[0]; i++)
        if (!strcmp(t[i].name, d)) return t[i].bits;
    return 0;
}

// One tensor entry: {"dtype": string, "shape": [integers], "data_offsets": [begin, end]}, the keys in any order and
// each required. An unknown key is refused rather than skipped. At most 8 dimensions (ctl_safetensors_tensor.shape); shape []
// is a scalar. A key given twice keeps its last value.
static bool ctl__st_tensor(ctl__json *j, ctl_safetensors_tensor *t) {
    bool have_dtype = false, have_shape = false, have_offsets = false;
    char key[32];
    if (!ctl__j_expect(j, '{')) return false;
    if (ctl__j_is(j, '}')) return ctl__j_fail(j, "empty tensor entry");
    do {
        if (!ctl__j_string(j, key, sizeof key) || !ctl__j_expect(j, ':')) return false;
        // Keys are compared in a 32-byte buffer: a longer key is an error, as an unknown key would be.
        if (!strcmp(key, "dtype")) {
            if (!ctl__j_string(j, t->dtype_name, sizeof t->dtype_name)) return false;
            have_dtype = true;
        } else if (!strcmp(key, "shape")) {
            if (!ctl__j_expect(j, '[')) return false;
            t->ndim = 0;
            if (!ctl__j_is(j, ']')) {
                do {
                    uint64_t d;
                    // Tested before the store: a ninth dimension cannot write past shape[8].
                    if (t->ndim == 8) return ctl__j_fail(j, "more than 8 dimensions");
                    if (!ctl__j_uint(j, &d)) return false;
                    if (d > (uint64_t)INT64_MAX) return ctl__j_fail(j, "dimension too large");
                    t->shape[t->ndim++] = (int64_t)d;
                } while (ctl__j_is(j, ','));
                if (!ctl__j_expect(j, ']')) return false;
            }
            have_shape = true;
        } else if (!strcmp(key, "data_offsets")) {
            // Exactly two integers; that end >= begin and both lie in the buffer is checked by ctl__st_parse.
            if (!ctl__j_expect(j, '[') || !ctl__j_uint(j, &t->begin) || !ctl__j_expect(j, ',') || !ctl__j_uint(j, &t->end) ||
                !ctl__j_expect(j, ']'))
                return false;
            have_offsets = true;
        } else {
            return ctl__j_fail(j, "unknown field in a tensor entry");
        }
    } while (ctl__j_is(j, ','));
    if (!ctl__j_expect(j, '}')) return false;
    if (!have_dtype || !have_shape || !have_offsets) return ctl__j_fail(j, "tensor entry lacks dtype, shape or data_offsets");
    return true;
}

// A tensor's byte range and its index, sorted by begin (then end) to check that the ranges tile the buffer.
typedef struct ctl__st_span { uint64_t begin, end; int64_t index; } ctl__st_span;
static int ctl__st_span_cmp(const void *a, const void *b) {
    const ctl__st_span *x = (const ctl__st_span *)a, *y = (const ctl__st_span *)b;
    return x->begin < y->begin ? -1 : x->begin > y->begin ? 1 : (x->end > y->end) - (x->end < y->end);
}

// The "__metadata__" object, at j just after its key and ':': string values only, each pair copied into st->meta,
// with name and value as scratch (4096 bytes each). Returns false when the object does not open, so the caller
// stops; any other failure is left in j->err.
static bool ctl__st_meta_read(ctl_safetensors *st, ctl__json *j, char *name, char *value) {
    ctl_ctx *ctx = st->ctx;
    if (!ctl__j_expect(j, '{')) return false;
    if (ctl__j_is(j, '}')) return true;
    do {
        // Each entry "key": "value"; a value that is not a string fails in ctl__j_string.
        if (!ctl__j_string(j, name, 4096) || !ctl__j_expect(j, ':') || !ctl__j_string(j, value, 4096)) break;
        void *meta = st->meta;
        char *k = (char *)ctl_alloc(ctx, strlen(name) + 1), *v = (char *)ctl_alloc(ctx, strlen(value) + 1);
        if (!k || !v || !ctl__grow(ctx, &meta, sizeof(ctl__st_meta), &st->cap_meta, st->n_meta + 1)) {
            ctl_free(ctx, k), ctl_free(ctx, v);
            j->err = ctl__fail(ctx, CTL_ERR_OUT_OF_MEMORY, "safetensors %s: out of memory", st->file);
            break;
        }
        st->meta = (ctl__st_meta *)meta;
        strcpy(k, name), strcpy(v, value);
        st->meta[st->n_meta].key = k, st->meta[st->n_meta++].value = v;
    } while (ctl__j_is(j, ','));
    if (!j->err) ctl__j_expect(j, '}');
    return true;
}

// A tensor entry named `name` (at most 127 bytes), at j just after its key and ':': grown into the array first, then
// filled; it is counted only once ctl__st_tensor accepts it. Returns false on any failure, left in j->err.
static bool ctl__st_entry_read(ctl_safetensors *st, ctl__json *j, const char *name) {
    void *ts = st->tensors;
    if (j->err || !ctl__grow(st->ctx, &ts, sizeof(ctl_safetensors_tensor), &st->cap, st->n + 1)) {
        if (!j->err) j->err = ctl__fail(st->ctx, CTL_ERR_OUT_OF_MEMORY, "safetensors %s: out of memory", st->file);
        return false;
    }
    st->tensors = (ctl_safetensors_tensor *)ts;
    ctl_safetensors_tensor *t = &st->tensors[st->n];
    memset(t, 0, sizeof *t);
    memcpy(t->name, name, strlen(name) + 1);
    if (!ctl__st_tensor(j, t)) return false;
    st->n++;
    return true;
}

// The JSON header, the hlen bytes after the length (hlen <= size - 8), into st's metadata and tensor entries; only
// spaces may follow it. Returns the first failure; what was parsed hangs on st for ctl_safetensors_close.
static ctl_status ctl__st_json_read(ctl_safetensors *st, uint64_t hlen) {
    ctl_ctx *ctx = st->ctx;
    ctl__json j;
    char where[160];
    snprintf(where, sizeof where, "safetensors %s: header", st->file);
    // base = 8: messages give offsets in the file, where the JSON starts after the length.
    j.ctx = st->ctx, j.where = where, j.base = 8, j.p = st->bytes + 8, j.n = (size_t)hlen, j.pos = 0, j.err = CTL_OK;
    // Scratch for one key and one value: tensor names are read with cap 128 (ctl_safetensors_tensor.name), metadata strings with
    // 4096, so each tensor entry's name is copied without a second bound.
    char *name = (char *)ctl_alloc(ctx, 4096), *value = (char *)ctl_alloc(ctx, 4096);
    if (!name || !value) {
        ctl_free(ctx, name), ctl_free(ctx, value);
        return ctl__fail(ctx, CTL_ERR_OUT_OF_MEMORY, "safetensors %s: out of memory", st->file);
    }
    // The header is one object. "__metadata__" maps to an object of string values (anything else there is an error);
    // every other key names a tensor. A `continue` inside the do-while jumps to its condition: the next ',' or the end.
    if (ctl__j_expect(&j, '{') && !ctl__j_is(&j, '}')) {
        do {
            if (!ctl__j_string(&j, name, 128) || !ctl__j_expect(&j, ':')) break;
            if (!strcmp(name, "__metadata__")) {
                if (!ctl__st_meta_read(st, &j, name, value)) break;
                continue;
            }
            if (!ctl__st_entry_read(st, &j, name)) break;
        } while (!j.err && ctl__j_is(&j, ','));
        if (!j.err) ctl__j_expect(&j, '}');
    }
    // Past the JSON: a parse error returns now, before any range is trusted.
    ctl_free(ctx, name), ctl_free(ctx, value);
    if (j.err) return j.err;
    ctl__j_ws(&j);
    // Only spaces may follow the JSON inside the N bytes: writers pad the header with them to a multiple of 8.
    if (j.pos != j.n) return ctl__fail(ctx, CTL_ERR_FORMAT, "safetensors %s: bytes after the header's JSON", st->file);
    return CTL_OK;
}

// Sizes match dtype and shape: each tensor's byte range, inside the buf bytes after the hlen-byte header, holds exactly
// its elements. Sets each tensor's dtype and data, and spans[i] (room for st->n) for the tiling check. Returns the
// first failure.
static ctl_status ctl__st_sizes_check(ctl_safetensors *st, uint64_t hlen, size_t buf, ctl__st_span *spans) {
    ctl_status res = CTL_OK;
    for (int64_t i = 0; i < st->n && !res; i++) {
        ctl_safetensors_tensor *t = &st->tensors[i];
        int bits = ctl__st_bits(t->dtype_name);
        uint64_t numel = 1;
        // numel saturates at UINT64_MAX / 64, so numel * bits cannot wrap; a saturated count never matches a real byte range.
        for (int d = 0; d < t->ndim; d++)
            numel = t->shape[d] && numel > UINT64_MAX / 64 / (uint64_t)t->shape[d] ? UINT64_MAX / 64 : numel * (uint64_t)t->shape[d];
        // The three float dtypes cotlab converts get their own tag; any other known dtype is kept as
        // CTL_SAFETENSORS_OTHER, readable as raw bytes but refused by ctl_safetensors_read_f32.
        t->dtype = !strcmp(t->dtype_name, "F32") ? CTL_SAFETENSORS_F32 : !strcmp(t->dtype_name, "F16") ? CTL_SAFETENSORS_F16
                 : !strcmp(t->dtype_name, "BF16") ? CTL_SAFETENSORS_BF16 : CTL_SAFETENSORS_OTHER;
        if (!bits) res = ctl__fail(st->ctx, CTL_ERR_FORMAT, "safetensors %s: tensor '%s' has unknown dtype '%s'", st->file, t->name, t->dtype_name);
        // end is tested against buf before end - begin is used; a sub-byte dtype must come to whole bytes.
        else if (t->end < t->begin || t->end > buf || (numel * (uint64_t)bits) % 8 || t->end - t->begin != numel * (uint64_t)bits / 8)
            res = ctl__fail(st->ctx, CTL_ERR_FORMAT, "safetensors %s: tensor '%s' (%s) has data_offsets [%" PRIu64 ", %" PRIu64 ") that do not fit its shape or the %zu-byte buffer",
                            st->file, t->name, t->dtype_name, t->begin, t->end, buf);
        spans[i].begin = t->begin, spans[i].end = t->end, spans[i].index = i;
        t->data = st->bytes + 8 + hlen + t->begin;   // read only if every check passes
    }
    return res;
}

// Names are unique (checked sorted: O(n log n)). Fails naming a duplicate, or when out of memory.
static ctl_status ctl__st_names_check(ctl_safetensors *st) {
    ctl_ctx *ctx = st->ctx;
    ctl_status res = CTL_OK;
    ctl__named *ix = (ctl__named *)ctl_alloc(ctx, (size_t)(st->n + 1) * sizeof(ctl__named));
    const char *dup = NULL;
    for (int64_t i = 0; ix && i < st->n; i++) ix[i].name = st->tensors[i].name, ix[i].begin = ix[i].end = 0;
    if (!ix) res = ctl__fail(ctx, CTL_ERR_OUT_OF_MEMORY, "safetensors %s: out of memory", st->file);
    else if ((dup = ctl__duplicate(ix, st->n))) res = ctl__fail(ctx, CTL_ERR_FORMAT, "safetensors %s: tensor '%s' appears twice", st->file, dup);
    ctl_free(ctx, ix);
    return res;
}

// Sorted by begin, each range must start where the last one ended (at), and the last end at the buffer's end (buf
// bytes). Empty tensors take no bytes and fit anywhere in the sequence. Sorts spans; fails at the first hole or overlap.
static ctl_status ctl__st_tiling_check(ctl_safetensors *st, ctl__st_span *spans, size_t buf) {
    ctl_status res = CTL_OK;
    qsort(spans, (size_t)st->n, sizeof *spans, ctl__st_span_cmp);
    uint64_t at = 0;
    for (int64_t i = 0; i < st->n && !res; at = spans[i].end, i++)
        if (spans[i].begin != at)
            res = ctl__fail(st->ctx, CTL_ERR_FORMAT, "safetensors %s: tensor '%s' starts at %" PRIu64 ", expected %" PRIu64 " (holes or overlaps)",
                            st->file, st->tensors[spans[i].index].name, spans[i].begin, at);
    if (!res && at != buf)
        res = ctl__fail(st->ctx, CTL_ERR_FORMAT, "safetensors %s: the tensors cover %" PRIu64 " of the %zu data bytes", st->file, at, buf);
    return res;
}

// The layout (trl_peft.md 5): u64 LE header length N, N bytes of JSON, then the byte buffer that data_offsets index
// (begin inclusive, end exclusive, from the buffer's start). After the JSON, the checks of the Rust reference reader:
// each byte range matches dtype and shape, names are unique, and sorted by begin the ranges tile the buffer from 0 to
// its end with no hole, overlap or trailing byte.
static ctl_status ctl__st_parse(ctl_safetensors *st) {
    ctl_ctx *ctx = st->ctx;
    if (st->size < 8) return ctl__fail(ctx, CTL_ERR_FORMAT, "safetensors %s: %zu bytes is too small for a header", st->file, st->size);
    uint64_t hlen = ctl__le64(st->bytes);
    // 1e8 is the reference reader's HeaderTooLarge limit; hlen <= size - 8 keeps the JSON inside the file.
    if (hlen > 100000000 || hlen > st->size - 8)
        return ctl__fail(ctx, CTL_ERR_FORMAT, "safetensors %s: header length %" PRIu64 " (file %zu bytes, limit 1e8)", st->file, hlen, st->size);
    ctl_status res = ctl__st_json_read(st, hlen);
    if (res) return res;
    // Sizes match dtype and shape; sorted by offset, the tensors tile the buffer exactly.
    // buf: the size of the byte buffer that follows the header; every range must lie inside it.
    size_t buf = st->size - 8 - (size_t)hlen;
    ctl__st_span *spans = (ctl__st_span *)ctl_alloc(ctx, (size_t)(st->n + 1) * sizeof(ctl__st_span));
    if (!spans) return ctl__fail(ctx, CTL_ERR_OUT_OF_MEMORY, "safetensors %s: out of memory", st->file);
    res = ctl__st_sizes_check(st, hlen, buf, spans);
    if (!res) res = ctl__st_names_check(st);
    if (!res) res = ctl__st_tiling_check(st, spans, buf);
    ctl_free(ctx, spans);
    return res;
}

// As ctl_gguf_close: the owned copies, the arrays, and the file's bytes when read from a path.
CTL_API void ctl_safetensors_close(ctl_safetensors *st) {
    if (!st) return;
    for (int64_t i = 0; i < st->n_meta; i++) ctl_free(st->ctx, st->meta[i].key), ctl_free(st->ctx, st->meta[i].value);
    ctl_free(st->ctx, st->meta);
    ctl_free(st->ctx, st->tensors);
    ctl_free(st->ctx, st->owned);
    ctl_free(st->ctx, st);
}

// An empty ctl_safetensors whose messages name `file`, quoted (truncated to fit file[128]).
static ctl_status ctl__st_new(ctl_ctx *ctx, const char *file, ctl_safetensors **out) {
    ctl_safetensors *st = (ctl_safetensors *)ctl_alloc(ctx, sizeof(ctl_safetensors));
    *out = st;
    if (!st) return ctl__fail(ctx, CTL_ERR_OUT_OF_MEMORY, "safetensors '%s': out of memory", file);
    memset(st, 0, sizeof *st);
    st->ctx = ctx;
    snprintf(st->file, sizeof st->file, "'%s'", file);
    return CTL_OK;
}

// Parses st; on failure st is freed and *out is NULL.
static ctl_status ctl__st_finish(ctl_safetensors *st, ctl_safetensors **out) {
    ctl_status res = ctl__st_parse(st);
    if (res) ctl_safetensors_close(st), st = NULL;
    *out = st;
    return res;
}

// The bytes are borrowed, not copied: they must outlive the ctl_safetensors.
CTL_API ctl_status ctl_safetensors_open_memory(ctl_ctx *ctx, const void *data, size_t size, ctl_safetensors **out) {
    if (out) *out = NULL;
    if (!CTL__ARGS(ctx, ctx && (data || size == 0) && out)) return CTL_ERR_INVALID;
    ctl_safetensors *st;
    ctl_status res = ctl__st_new(ctx, "<memory>", &st);
    if (res) return *out = NULL, res;
    st->bytes = (const unsigned char *)data, st->size = data ? size : 0;
    return ctl__st_finish(st, out);
}

// Reads the whole file into memory; the ctl_safetensors owns the bytes and frees them at close.
CTL_API ctl_status ctl_safetensors_open(ctl_ctx *ctx, const char *path, ctl_safetensors **out) {
    if (out) *out = NULL;
    if (!CTL__ARGS(ctx, ctx && path && out)) return CTL_ERR_INVALID;
    ctl_safetensors *st;
    void *data;
    size_t size = 0;
    ctl_status res = ctl__read_file(ctx, "safetensors", path, &data, &size);
    if (res) return res;
    if ((res = ctl__st_new(ctx, path, &st))) return ctl_free(ctx, data), res;
    st->owned = data, st->bytes = (const unsigned char *)data, st->size = size;
    return ctl__st_finish(st, out);
}

CTL_API int64_t ctl_safetensors_tensor_count(const ctl_safetensors *st) { return CTL__ARGS(NULL, st) ? st->n : 0; }
CTL_API const ctl_safetensors_tensor *ctl_safetensors_tensor_at(const ctl_safetensors *st, int64_t i) {
    return CTL__ARGS(NULL, st) && i >= 0 && i < st->n ? &st->tensors[i] : NULL;
}
// A linear search by name; names are unique (checked when the file was opened).
CTL_API const ctl_safetensors_tensor *ctl_safetensors_find_tensor(const ctl_safetensors *st, const char *name) {
    if (!CTL__ARGS(st ? st->ctx : NULL, st && name)) return NULL;
    for (int64_t i = 0; i < st->n; i++)
        if (!strcmp(st->tensors[i].name, name)) return &st->tensors[i];
    return NULL;
}
CTL_API int64_t ctl_safetensors_meta_count(const ctl_safetensors *st) { return CTL__ARGS(NULL, st) ? st->n_meta : 0; }
CTL_API bool ctl_safetensors_meta_at(const ctl_safetensors *st, int64_t i, const char **key, const char **value) {
    if (!CTL__ARGS(st ? st->ctx : NULL, st && key && value)) return false;
    if (i < 0 || i >= st->n_meta) return false;
    *key = st->meta[i].key, *value = st->meta[i].value;
    return true;
}

// The first entry with `key` (the reader does not refuse a key given twice), or NULL.
CTL_API const char *ctl_safetensors_find_meta(const ctl_safetensors *st, const char *key) {
    if (!CTL__ARGS(st ? st->ctx : NULL, st && key)) return NULL;
    for (int64_t i = 0; i < st->n_meta; i++)
        if (!strcmp(st->meta[i].key, key)) return st->meta[i].value;
    return NULL;
}

// The whole tensor into out as fp32 (numel floats). Each element is loaded little-endian, so this works on any host.
// Integer, F64 and F8 tensors are refused, not converted.
CTL_API ctl_status ctl_safetensors_read_f32(const ctl_safetensors *st, const ctl_safetensors_tensor *t, float *out) {
    if (!CTL__ARGS(st ? st->ctx : NULL, st && t && out)) return CTL_ERR_INVALID;
    const unsigned char *p = (const unsigned char *)t->data;
    // The element count from the byte range, which the parser matched to the shape.
    uint64_t n = (t->end - t->begin) / (t->dtype == CTL_SAFETENSORS_F32 ? 4 : 2);
    if (t->dtype == CTL_SAFETENSORS_OTHER)
        return ctl__fail(st->ctx, CTL_ERR_UNSUPPORTED, "safetensors %s: tensor '%s' is %s; cotlab reads F32, F16 and BF16",
                         st->file, t->name, t->dtype_name);
    for (uint64_t i = 0; i < n; i++) {
        if (t->dtype == CTL_SAFETENSORS_F32) {
            uint32_t b = ctl__le32(p + 4 * i);
            memcpy(out + i, &b, 4);
        } else {
            uint16_t h = ctl__le16(p + 2 * i);
            out[i] = t->dtype == CTL_SAFETENSORS_F16 ? ctl_f16_to_f32(h) : ctl_bf16_to_f32(h);
        }
    }
    return CTL_OK;
}

// A tensor held by the writer: name, dtype string, bits per element, shape, and its nbytes bytes (owned, as they will
// sit in the file).
typedef struct ctl__st_wt { char name[128], dtype[16]; int bits, ndim; int64_t shape[8]; size_t nbytes; unsigned char *bytes; } ctl__st_wt;

struct ctl_safetensors_writer {
    ctl_ctx *ctx;
    int64_t n, cap, n_meta, cap_meta;
    ctl__st_wt *tensors;
    ctl__st_meta *meta;
};

// An empty writer; as with GGUF, every add copies its bytes.
CTL_API ctl_status ctl_safetensors_writer_init(ctl_ctx *ctx, ctl_safetensors_writer **out) {
    if (out) *out = NULL;
    if (!CTL__ARGS(ctx, ctx && out)) return CTL_ERR_INVALID;
    ctl_safetensors_writer *w = (ctl_safetensors_writer *)ctl_alloc(ctx, sizeof(ctl_safetensors_writer));
    *out = w;
    if (!w) return ctl__fail(ctx, CTL_ERR_OUT_OF_MEMORY, "safetensors writer: out of memory");
    memset(w, 0, sizeof *w);
    w->ctx = ctx;
    return CTL_OK;
}

// Each tensor's bytes, the metadata copies, and the arrays.
CTL_API void ctl_safetensors_writer_free(ctl_safetensors_writer *w) {
    if (!w) return;
    for (int64_t i = 0; i < w->n; i++) ctl_free(w->ctx, w->tensors[i].bytes);
    for (int64_t i = 0; i < w->n_meta; i++) ctl_free(w->ctx, w->meta[i].key), ctl_free(w->ctx, w->meta[i].value);
    ctl_free(w->ctx, w->tensors);
    ctl_free(w->ctx, w->meta);
    ctl_free(w->ctx, w);
}

// A __metadata__ entry (PEFT wants {"format": "pt"}). A key is not checked against those already set.
CTL_API ctl_status ctl_safetensors_writer_set_str(ctl_safetensors_writer *w, const char *key, const char *value) {
    if (!CTL__ARGS(w ? w->ctx : NULL, w && key && value)) return CTL_ERR_INVALID;
    void *meta = w->meta;
    char *k = (char *)ctl_alloc(w->ctx, strlen(key) + 1), *v = (char *)ctl_alloc(w->ctx, strlen(value) + 1);
    if (!k || !v || !ctl__grow(w->ctx, &meta, sizeof(ctl__st_meta), &w->cap_meta, w->n_meta + 1)) {
        ctl_free(w->ctx, k), ctl_free(w->ctx, v);
        return ctl__fail(w->ctx, CTL_ERR_OUT_OF_MEMORY, "safetensors writer: out of memory");
    }
    w->meta = (ctl__st_meta *)meta;
    strcpy(k, key), strcpy(v, value);
    w->meta[w->n_meta].key = k, w->meta[w->n_meta++].value = v;
    return CTL_OK;
}

// A new tensor entry of `dtype` with room for its bytes (left for the caller to fill).
// A dimension may be 0 (an empty tensor) and ndim may be 0 (a scalar), as the format allows. *out stays valid until
// the next tensor is added.
static ctl_status ctl__st_writer_new(ctl_safetensors_writer *w, const char *name, const char *dtype, int ndim, const int64_t *shape,
                                     ctl__st_wt **out) {
    ctl_ctx *ctx = w->ctx;
    int bits = ctl__st_bits(dtype);
    if (strlen(name) >= 128 || !name[0] || ndim < 0 || ndim > 8 || !bits)
        return ctl__fail(ctx, CTL_ERR_INVALID, "safetensors writer: tensor '%s': bad name, rank %d or dtype '%s'", name, ndim, dtype);
    for (int64_t i = 0; i < w->n; i++)
        if (!strcmp(w->tensors[i].name, name)) return ctl__fail(ctx, CTL_ERR_INVALID, "safetensors writer: '%s' added twice", name);
    ctl__st_wt t;
    memset(&t, 0, sizeof t);
    // Both fit: the name was tested above and a known dtype string is under 16 bytes.
    strcpy(t.name, name), strcpy(t.dtype, dtype);
    t.bits = bits, t.ndim = ndim;
    size_t numel = 1;
    for (int d = 0; d < ndim; d++) {
        if (shape[d] < 0 || (shape[d] && numel > SIZE_MAX / 64 / (size_t)shape[d]))   // numel * bits (<= 64) fits
            return ctl__fail(ctx, CTL_ERR_INVALID, "safetensors writer: '%s': bad shape", name);
        t.shape[d] = shape[d], numel *= (size_t)shape[d];
    }
    if (numel * (size_t)bits % 8)
        return ctl__fail(ctx, CTL_ERR_INVALID, "safetensors writer: '%s': %zu %s values are not whole bytes", name, numel, dtype);
    t.nbytes = numel * (size_t)bits / 8;
    void *ts = w->tensors;
    t.bytes = (unsigned char *)ctl_alloc(ctx, t.nbytes ? t.nbytes : 1);
    if (!t.bytes || !ctl__grow(ctx, &ts, sizeof(ctl__st_wt), &w->cap, w->n + 1)) {
        ctl_free(ctx, t.bytes);
        return ctl__fail(ctx, CTL_ERR_OUT_OF_MEMORY, "safetensors writer: '%s': out of memory", name);
    }
    w->tensors = (ctl__st_wt *)ts;
    w->tensors[w->n] = t;
    *out = &w->tensors[w->n++];
    return CTL_OK;
}

CTL_API ctl_status ctl_safetensors_writer_add_tensor(ctl_safetensors_writer *w, const char *name, ctl_safetensors_dtype dtype,
                                                   int ndim, const int64_t *shape, const float *values) {
    if (!CTL__ARGS(w ? w->ctx : NULL, w && name && shape && values)) return CTL_ERR_INVALID;
    // fp32 values in; F16 and BF16 rounded to nearest even. dtype indexes this table, so it is range-checked first.
    static const char *const dtypes[] = {"F32", "F16", "BF16"};
    if ((unsigned)dtype > (unsigned)CTL_SAFETENSORS_BF16)
        return ctl__fail(w->ctx, CTL_ERR_INVALID, "safetensors writer: tensor '%s': dtype %d (F32, F16 or BF16 from fp32)", name, (int)dtype);
    ctl__st_wt *t;
    ctl_status st = ctl__st_writer_new(w, name, dtypes[dtype], ndim, shape, &t);
    if (st) return st;
    size_t numel = t->nbytes / (dtype == CTL_SAFETENSORS_F32 ? 4 : 2);
    for (size_t i = 0; i < numel; i++) {
        uint16_t h = dtype == CTL_SAFETENSORS_F16 ? ctl_f32_to_f16(values[i]) : ctl_f32_to_bf16(values[i]);
        if (dtype == CTL_SAFETENSORS_F32) memcpy(t->bytes + 4 * i, values + i, 4);
        else t->bytes[2 * i] = (unsigned char)h, t->bytes[2 * i + 1] = (unsigned char)(h >> 8);
    }
    return CTL_OK;
}

// bytes holds the tensor's whole size, already in the file's little-endian order; dtype is any known dtype string.
CTL_API ctl_status ctl_safetensors_writer_add_raw(ctl_safetensors_writer *w, const char *name, const char *dtype, int ndim,
                                                  const int64_t *shape, const void *bytes) {
    if (!CTL__ARGS(w ? w->ctx : NULL, w && name && dtype && shape && bytes)) return CTL_ERR_INVALID;
    ctl__st_wt *t;
    ctl_status st = ctl__st_writer_new(w, name, dtype, ndim, shape, &t);
    if (st) return st;
    if (t->nbytes) memcpy(t->bytes, bytes, t->nbytes);
    return CTL_OK;
}

// A growing text buffer for the JSON header; an allocation failure is remembered.
typedef struct ctl__text { ctl_ctx *ctx; void *p; int64_t n, cap; bool oom; } ctl__text;   // p[0, n) holds the text

// Appends len bytes, keeping one spare byte past them; after a failure it does nothing.
static void ctl__text_raw(ctl__text *t, const char *s, size_t len) {
    if (t->oom || !ctl__grow(t->ctx, &t->p, 1, &t->cap, t->n + (int64_t)len + 1)) {
        t->oom = true;
        return;
    }
    memcpy((char *)t->p + t->n, s, len);
    t->n += (int64_t)len;
}

static void ctl__text_str(ctl__text *t, const char *s) { ctl__text_raw(t, s, strlen(s)); }

// A decimal number: 20 digits at most.
static void ctl__text_u64(ctl__text *t, uint64_t v) {
    char b[24];
    ctl__text_raw(t, b, (size_t)snprintf(b, sizeof b, "%" PRIu64, v));
}

// Escapes only what JSON requires (quote, backslash and control characters); other bytes, UTF-8 included, pass as is.
static void ctl__text_json(ctl__text *t, const char *s) {   // s as a JSON string
    ctl__text_raw(t, "\"", 1);
    for (; *s; s++) {
        unsigned char c = (unsigned char)*s;
        char esc[8];
        if (c == '"' || c == '\\') esc[0] = '\\', esc[1] = (char)c, ctl__text_raw(t, esc, 2);
        else if (c < 0x20) ctl__text_raw(t, esc, (size_t)snprintf(esc, sizeof esc, "\\u%04x", c));
        else ctl__text_raw(t, (const char *)&c, 1);
    }
    ctl__text_raw(t, "\"", 1);
}

static int ctl__st_wt_cmp(const void *a, const void *b) {   // wider dtypes first (alignment), then by name
    const ctl__st_wt *x = (const ctl__st_wt *)a, *y = (const ctl__st_wt *)b;
    return x->bits != y->bits ? y->bits - x->bits : strcmp(x->name, y->name);
}

// The file as the reference writer makes it (trl_peft.md 5): compact JSON with __metadata__ first, the tensors sorted
// widest dtype first and then by name, with gapless offsets, and the header padded with spaces to a multiple of 8.
// The buffer then starts 8-aligned and, thanks to the sort, every tensor sits at a multiple of its element size.
// The sort reorders the writer's own list; saving twice writes the same file.
CTL_API ctl_status ctl_safetensors_writer_save(ctl_safetensors_writer *w, const char *path) {
    if (!CTL__ARGS(w ? w->ctx : NULL, w && path)) return CTL_ERR_INVALID;
    ctl_ctx *ctx = w->ctx;
    ctl__text h;
    memset(&h, 0, sizeof h);
    h.ctx = ctx;
    // The offsets are assigned in this order, and the bytes written in it.
    qsort(w->tensors, (size_t)w->n, sizeof *w->tensors, ctl__st_wt_cmp);
    ctl__text_str(&h, "{");
    if (w->n_meta) {
        ctl__text_str(&h, "\"__metadata__\":{");
        for (int64_t i = 0; i < w->n_meta; i++) {
            if (i) ctl__text_str(&h, ",");
            ctl__text_json(&h, w->meta[i].key), ctl__text_str(&h, ":"), ctl__text_json(&h, w->meta[i].value);
        }
        ctl__text_str(&h, w->n ? "}," : "}");
    }
    uint64_t off = 0;
    // Each entry is "name":{"dtype":"F32","shape":[...],"data_offsets":[begin,end]}, begin being the previous end.
    for (int64_t i = 0; i < w->n; i++) {
        const ctl__st_wt *t = &w->tensors[i];
        if (i) ctl__text_str(&h, ",");
        ctl__text_json(&h, t->name);
        ctl__text_str(&h, ":{\"dtype\":\""), ctl__text_str(&h, t->dtype), ctl__text_str(&h, "\",\"shape\":[");
        for (int d = 0; d < t->ndim; d++) {
            if (d) ctl__text_str(&h, ",");
            ctl__text_u64(&h, (uint64_t)t->shape[d]);
        }
        ctl__text_str(&h, "],\"data_offsets\":["), ctl__text_u64(&h, off), ctl__text_str(&h, ",");
        off += t->nbytes;
        ctl__text_u64(&h, off), ctl__text_str(&h, "]}");
    }
    ctl__text_str(&h, "}");
    while (!h.oom && h.n % 8) ctl__text_str(&h, " ");   // the data starts 8-aligned
    // One check for the whole header: after a failed allocation ctl__text stops appending.
    if (h.oom) {
        ctl_free(ctx, h.p);
        return ctl__fail(ctx, CTL_ERR_OUT_OF_MEMORY, "safetensors writer: out of memory");
    }
    // The header length N as a little-endian u64, then the N bytes of JSON, then the tensors in the same order as their
    // offsets.
    unsigned char len8[8];
    for (int b = 0; b < 8; b++) len8[b] = (unsigned char)((uint64_t)h.n >> (8 * b));
    ctl__wfile wf;
    ctl_status st = ctl__wfile_open(ctx, &wf, path, "safetensors writer");
    if (st) return ctl_free(ctx, h.p), st;
    bool ok = fwrite(len8, 1, 8, wf.f) == 8 && fwrite(h.p, 1, (size_t)h.n, wf.f) == (size_t)h.n;
    for (int64_t i = 0; ok && i < w->n; i++) ok = fwrite(w->tensors[i].bytes, 1, w->tensors[i].nbytes, wf.f) == w->tensors[i].nbytes;
    ctl_free(ctx, h.p);
    return ctl__wfile_close(ctx, &wf, ok);
}


// >>impl:tokenizer ==============================================================================
// Byte-level BPE as GPT-2 defined it and llama.cpp runs it (gguf.md 4): special tokens are cut out of the text first;
// a pre-tokenizer (a hand-written matcher for each family's regex) splits each remaining fragment into pieces; each
// piece's bytes become the tokens of their byte-level characters, and merges join adjacent tokens by rank until none
// applies. Only GGUF's 'gpt2' tokenizer model is read: SentencePiece vocabularies ('llama') are refused.
// Then chat templates: the two layouts cotlab knows, rendered in C rather than by running the template's Jinja.

// Unicode 14.0.0 letters (1) and numbers (2) as sorted [first, last] ranges; tools/gen_unicode_table.py
// Letters are the general categories L* and numbers N*, what the pre-tokenizers' \p{L} and \p{N} match; marks (M*)
// and everything else fall in class 0. Rows are {first, last, class}, sorted and disjoint, for a binary search.
static const uint32_t ctl__unicode_ranges[][3] = {
    {0x30, 0x39, 2}, {0x41, 0x5a, 1}, {0x61, 0x7a, 1}, {0xaa, 0xaa, 1}, {0xb2, 0xb3, 2},
    {0xb5, 0xb5, 1}, {0xb9, 0xb9, 2}, {0xba, 0xba, 1}, {0xbc, 0xbe, 2}, {0xc0, 0xd6, 1},
    {0xd8, 0xf6, 1}, {0xf8, 0x2c1, 1}, {0x2c6, 0x2d1, 1}, {0x2e0, 0x2e4, 1}, {0x2ec, 0x2ec, 1},
    {0x2ee, 0x2ee, 1}, {0x370, 0x374, 1}, {0x376, 0x377, 1}, {0x37a, 0x37d, 1}, {0x37f, 0x37f, 1},
    {0x386, 0x386, 1}, {0x388, 0x38a, 1}, {0x38c, 0x38c, 1}, {0x38e, 0x3a1, 1}, {0x3a3, 0x3f5, 1},
    {0x3f7, 0x481, 1}, {0x48a, 0x52f, 1}, {0x531, 0x556, 1}, {0x559, 0x559, 1}, {0x560, 0x588, 1},
    {0x5d0, 0x5ea, 1}, {0x5ef, 0x5f2, 1}, {0x620, 0x64a, 1}, {0x660, 0x669, 2}, {0x66e, 0x66f, 1},
    {0x671, 0x6d3, 1}, {0x6d5, 0x6d5, 1}, {0x6e5, 0x6e6, 1}, {0x6ee, 0x6ef, 1}, {0x6f0, 0x6f9, 2},
    {0x6fa, 0x6fc, 1}, {0x6ff, 0x6ff, 1}, {0x710, 0x710, 1}, {0x712, 0x72f, 1}, {0x74d, 0x7a5, 1},
    {0x7b1, 0x7b1, 1}, {0x7c0, 0x7c9, 2}, {0x7ca, 0x7ea, 1}, {0x7f4, 0x7f5, 1}, {0x7fa, 0x7fa, 1},
    {0x800, 0x815, 1}, {0x81a, 0x81a, 1}, {0x824, 0x824, 1}, {0x828, 0x828, 1}, {0x840, 0x858, 1},
    {0x860, 0x86a, 1}, {0x870, 0x887, 1}, {0x889, 0x88e, 1}, {0x8a0, 0x8c9, 1}, {0x904, 0x939, 1},
    {0x93d, 0x93d, 1}, {0x950, 0x950, 1}, {0x958, 0x961, 1}, {0x966, 0x96f, 2}, {0x971, 0x980, 1},
    {0x985, 0x98c, 1}, {0x98f, 0x990, 1}, {0x993, 0x9a8, 1}, {0x9aa, 0x9b0, 1}, {0x9b2, 0x9b2, 1},
    {0x9b6, 0x9b9, 1}, {0x9bd, 0x9bd, 1}, {0x9ce, 0x9ce, 1}, {0x9dc, 0x9dd, 1}, {0x9df, 0x9e1, 1},
    {0x9e6, 0x9ef, 2}, {0x9f0, 0x9f1, 1}, {0x9f4, 0x9f9, 2}, {0x9fc, 0x9fc, 1}, {0xa05, 0xa0a, 1},
    {0xa0f, 0xa10, 1}, {0xa13, 0xa28, 1}, {0xa2a, 0xa30, 1}, {0xa32, 0xa33, 1}, {0xa35, 0xa36, 1},
    {0xa38, 0xa39, 1}, {0xa59, 0xa5c, 1}, {0xa5e, 0xa5e, 1}, {0xa66, 0xa6f, 2}, {0xa72, 0xa74, 1},
    {0xa85, 0xa8d, 1}, {0xa8f, 0xa91, 1}, {0xa93, 0xaa8, 1}, {0xaaa, 0xab0, 1}, {0xab2, 0xab3, 1},
    {0xab5, 0xab9, 1}, {0xabd, 0xabd, 1}, {0xad0, 0xad0, 1}, {0xae0, 0xae1, 1}, {0xae6, 0xaef, 2},
    {0xaf9, 0xaf9, 1}, {0xb05, 0xb0c, 1}, {0xb0f, 0xb10, 1}, {0xb13, 0xb28, 1}, {0xb2a, 0xb30, 1},
    {0xb32, 0xb33, 1}, {0xb35, 0xb39, 1}, {0xb3d, 0xb3d, 1}, {0xb5c, 0xb5d, 1}, {0xb5f, 0xb61, 1},
    {0xb66, 0xb6f, 2}, {0xb71, 0xb71, 1}, {0xb72, 0xb77, 2}, {0xb83, 0xb83, 1}, {0xb85, 0xb8a, 1},
    {0xb8e, 0xb90, 1}, {0xb92, 0xb95, 1}, {0xb99, 0xb9a, 1}, {0xb9c, 0xb9c, 1}, {0xb9e, 0xb9f, 1},
    {0xba3, 0xba4, 1}, {0xba8, 0xbaa, 1}, {0xbae, 0xbb9, 1}, {0xbd0, 0xbd0, 1}, {0xbe6, 0xbf2, 2},
    {0xc05, 0xc0c, 1}, {0xc0e, 0xc10, 1}, {0xc12, 0xc28, 1}, {0xc2a, 0xc39, 1}, {0xc3d, 0xc3d, 1},
    {0xc58, 0xc5a, 1}, {0xc5d, 0xc5d, 1}, {0xc60, 0xc61, 1}, {0xc66, 0xc6f, 2}, {0xc78, 0xc7e, 2},
    {0xc80, 0xc80, 1}, {0xc85, 0xc8c, 1}, {0xc8e, 0xc90, 1}, {0xc92, 0xca8, 1}, {0xcaa, 0xcb3, 1},
    {0xcb5, 0xcb9, 1}, {0xcbd, 0xcbd, 1}, {0xcdd, 0xcde, 1}, {0xce0, 0xce1, 1}, {0xce6, 0xcef, 2},
    {0xcf1, 0xcf2, 1}, {0xd04, 0xd0c, 1}, {0xd0e, 0xd10, 1}, {0xd12, 0xd3a, 1}, {0xd3d, 0xd3d, 1},
    {0xd4e, 0xd4e, 1}, {0xd54, 0xd56, 1}, {0xd58, 0xd5e, 2}, {0xd5f, 0xd61, 1}, {0xd66, 0xd78, 2},
    {0xd7a, 0xd7f, 1}, {0xd85, 0xd96, 1}, {0xd9a, 0xdb1, 1}, {0xdb3, 0xdbb, 1}, {0xdbd, 0xdbd, 1},
    {0xdc0, 0xdc6, 1}, {0xde6, 0xdef, 2}, {0xe01, 0xe30, 1}, {0xe32, 0xe33, 1}, {0xe40, 0xe46, 1},
    {0xe50, 0xe59, 2}, {0xe81, 0xe82, 1}, {0xe84, 0xe84, 1}, {0xe86, 0xe8a, 1}, {0xe8c, 0xea3, 1},
    {0xea5, 0xea5, 1}, {0xea7, 0xeb0, 1}, {0xeb2, 0xeb3, 1}, {0xebd, 0xebd, 1}, {0xec0, 0xec4, 1},
    {0xec6, 0xec6, 1}, {0xed0, 0xed9, 2}, {0xedc, 0xedf, 1}, {0xf00, 0xf00, 1}, {0xf20, 0xf33, 2},
    {0xf40, 0xf47, 1}, {0xf49, 0xf6c, 1}, {0xf88, 0xf8c, 1}, {0x1000, 0x102a, 1},
    {0x103f, 0x103f, 1}, {0x1040, 0x1049, 2}, {0x1050, 0x1055, 1}, {0x105a, 0x105d, 1},
    {0x1061, 0x1061, 1}, {0x1065, 0x1066, 1}, {0x106e, 0x1070, 1}, {0x1075, 0x1081, 1},
    {0x108e, 0x108e, 1}, {0x1090, 0x1099, 2}, {0x10a0, 0x10c5, 1}, {0x10c7, 0x10c7, 1},
    {0x10cd, 0x10cd, 1}, {0x10d0, 0x10fa, 1}, {0x10fc, 0x1248, 1}, {0x124a, 0x124d, 1},
    {0x1250, 0x1256, 1}, {0x1258, 0x1258, 1}, {0x125a, 0x125d, 1}, {0x1260, 0x1288, 1},
    {0x128a, 0x128d, 1}, {0x1290, 0x12b0, 1}, {0x12b2, 0x12b5, 1}, {0x12b8, 0x12be, 1},
    {0x12c0, 0x12c0, 1}, {0x12c2, 0x12c5, 1}, {0x12c8, 0x12d6, 1}, {0x12d8, 0x1310, 1},
    {0x1312, 0x1315, 1}, {0x1318, 0x135a, 1}, {0x1369, 0x137c, 2}, {0x1380, 0x138f, 1},
    {0x13a0, 0x13f5, 1}, {0x13f8, 0x13fd, 1}, {0x1401, 0x166c, 1}, {0x166f, 0x167f, 1},
    {0x1681, 0x169a, 1}, {0x16a0, 0x16ea, 1}, {0x16ee, 0x16f0, 2}, {0x16f1, 0x16f8, 1},
    {0x1700, 0x1711, 1}, {0x171f, 0x1731, 1}, {0x1740, 0x1751, 1}, {0x1760, 0x176c, 1},
    {0x176e, 0x1770, 1}, {0x1780, 0x17b3, 1}, {0x17d7, 0x17d7, 1}, {0x17dc, 0x17dc, 1},
    {0x17e0, 0x17e9, 2}, {0x17f0, 0x17f9, 2}, {0x1810, 0x1819, 2}, {0x1820, 0x1878, 1},
    {0x1880, 0x1884, 1}, {0x1887, 0x18a8, 1}, {0x18aa, 0x18aa, 1}, {0x18b0, 0x18f5, 1},
    {0x1900, 0x191e, 1}, {0x1946, 0x194f, 2}, {0x1950, 0x196d, 1}, {0x1970, 0x1974, 1},
    {0x1980, 0x19ab, 1}, {0x19b0, 0x19c9, 1}, {0x19d0, 0x19da, 2}, {0x1a00, 0x1a16, 1},
    {0x1a20, 0x1a54, 1}, {0x1a80, 0x1a89, 2}, {0x1a90, 0x1a99, 2}, {0x1aa7, 0x1aa7, 1},
    {0x1b05, 0x1b33, 1}, {0x1b45, 0x1b4c, 1}, {0x1b50, 0x1b59, 2}, {0x1b83, 0x1ba0, 1},
    {0x1bae, 0x1baf, 1}, {0x1bb0, 0x1bb9, 2}, {0x1bba, 0x1be5, 1}, {0x1c00, 0x1c23, 1},
    {0x1c40, 0x1c49, 2}, {0x1c4d, 0x1c4f, 1}, {0x1c50, 0x1c59, 2}, {0x1c5a, 0x1c7d, 1},
    {0x1c80, 0x1c88, 1}, {0x1c90, 0x1cba, 1}, {0x1cbd, 0x1cbf, 1}, {0x1ce9, 0x1cec, 1},
    {0x1cee, 0x1cf3, 1}, {0x1cf5, 0x1cf6, 1}, {0x1cfa, 0x1cfa, 1}, {0x1d00, 0x1dbf, 1},
    {0x1e00, 0x1f15, 1}, {0x1f18, 0x1f1d, 1}, {0x1f20, 0x1f45, 1}, {0x1f48, 0x1f4d, 1},
    {0x1f50, 0x1f57, 1}, {0x1f59, 0x1f59, 1}, {0x1f5b, 0x1f5b, 1}, {0x1f5d, 0x1f5d, 1},
    {0x1f5f, 0x1f7d, 1}, {0x1f80, 0x1fb4, 1}, {0x1fb6, 0x1fbc, 1}, {0x1fbe, 0x1fbe, 1},
    {0x1fc2, 0x1fc4, 1}, {0x1fc6, 0x1fcc, 1}, {0x1fd0, 0x1fd3, 1}, {0x1fd6, 0x1fdb, 1},
    {0x1fe0, 0x1fec, 1}, {0x1ff2, 0x1ff4, 1}, {0x1ff6, 0x1ffc, 1}, {0x2070, 0x2070, 2},
    {0x2071, 0x2071, 1}, {0x2074, 0x2079, 2}, {0x207f, 0x207f, 1}, {0x2080, 0x2089, 2},
    {0x2090, 0x209c, 1}, {0x2102, 0x2102, 1}, {0x2107, 0x2107, 1}, {0x210a, 0x2113, 1},
    {0x2115, 0x2115, 1}, {0x2119, 0x211d, 1}, {0x2124, 0x2124, 1}, {0x2126, 0x2126, 1},
    {0x2128, 0x2128, 1}, {0x212a, 0x212d, 1}, {0x212f, 0x2139, 1}, {0x213c, 0x213f, 1},
    {0x2145, 0x2149, 1}, {0x214e, 0x214e, 1}, {0x2150, 0x2182, 2}, {0x2183, 0x2184, 1},
    {0x2185, 0x2189, 2}, {0x2460, 0x249b, 2}, {0x24ea, 0x24ff, 2}, {0x2776, 0x2793, 2},
    {0x2c00, 0x2ce4, 1}, {0x2ceb, 0x2cee, 1}, {0x2cf2, 0x2cf3, 1}, {0x2cfd, 0x2cfd, 2},
    {0x2d00, 0x2d25, 1}, {0x2d27, 0x2d27, 1}, {0x2d2d, 0x2d2d, 1}, {0x2d30, 0x2d67, 1},
    {0x2d6f, 0x2d6f, 1}, {0x2d80, 0x2d96, 1}, {0x2da0, 0x2da6, 1}, {0x2da8, 0x2dae, 1},
    {0x2db0, 0x2db6, 1}, {0x2db8, 0x2dbe, 1}, {0x2dc0, 0x2dc6, 1}, {0x2dc8, 0x2dce, 1},
    {0x2dd0, 0x2dd6, 1}, {0x2dd8, 0x2dde, 1}, {0x2e2f, 0x2e2f, 1}, {0x3005, 0x3006, 1},
    {0x3007, 0x3007, 2}, {0x3021, 0x3029, 2}, {0x3031, 0x3035, 1}, {0x3038, 0x303a, 2},
    {0x303b, 0x303c, 1}, {0x3041, 0x3096, 1}, {0x309d, 0x309f, 1}, {0x30a1, 0x30fa, 1},
    {0x30fc, 0x30ff, 1}, {0x3105, 0x312f, 1}, {0x3131, 0x318e, 1}, {0x3192, 0x3195, 2},
    {0x31a0, 0x31bf, 1}, {0x31f0, 0x31ff, 1}, {0x3220, 0x3229, 2}, {0x3248, 0x324f, 2},
    {0x3251, 0x325f, 2}, {0x3280, 0x3289, 2}, {0x32b1, 0x32bf, 2}, {0x3400, 0x4dbf, 1},
    {0x4e00, 0xa48c, 1}, {0xa4d0, 0xa4fd, 1}, {0xa500, 0xa60c, 1}, {0xa610, 0xa61f, 1},
    {0xa620, 0xa629, 2}, {0xa62a, 0xa62b, 1}, {0xa640, 0xa66e, 1}, {0xa67f, 0xa69d, 1},
    {0xa6a0, 0xa6e5, 1}, {0xa6e6, 0xa6ef, 2}, {0xa717, 0xa71f, 1}, {0xa722, 0xa788, 1},
    {0xa78b, 0xa7ca, 1}, {0xa7d0, 0xa7d1, 1}, {0xa7d3, 0xa7d3, 1}, {0xa7d5, 0xa7d9, 1},
    {0xa7f2, 0xa801, 1}, {0xa803, 0xa805, 1}, {0xa807, 0xa80a, 1}, {0xa80c, 0xa822, 1},
    {0xa830, 0xa835, 2}, {0xa840, 0xa873, 1}, {0xa882, 0xa8b3, 1}, {0xa8d0, 0xa8d9, 2},
    {0xa8f2, 0xa8f7, 1}, {0xa8fb, 0xa8fb, 1}, {0xa8fd, 0xa8fe, 1}, {0xa900, 0xa909, 2},
    {0xa90a, 0xa925, 1}, {0xa930, 0xa946, 1}, {0xa960, 0xa97c, 1}, {0xa984, 0xa9b2, 1},
    {0xa9cf, 0xa9cf, 1}, {0xa9d0, 0xa9d9, 2}, {0xa9e0, 0xa9e4, 1}, {0xa9e6, 0xa9ef, 1},
    {0xa9f0, 0xa9f9, 2}, {0xa9fa, 0xa9fe, 1}, {0xaa00, 0xaa28, 1}, {0xaa40, 0xaa42, 1},
    {0xaa44, 0xaa4b, 1}, {0xaa50, 0xaa59, 2}, {0xaa60, 0xaa76, 1}, {0xaa7a, 0xaa7a, 1},
    {0xaa7e, 0xaaaf, 1}, {0xaab1, 0xaab1, 1}, {0xaab5, 0xaab6, 1}, {0xaab9, 0xaabd, 1},
    {0xaac0, 0xaac0, 1}, {0xaac2, 0xaac2, 1}, {0xaadb, 0xaadd, 1}, {0xaae0, 0xaaea, 1},
    {0xaaf2, 0xaaf4, 1}, {0xab01, 0xab06, 1}, {0xab09, 0xab0e, 1}, {0xab11, 0xab16, 1},
    {0xab20, 0xab26, 1}, {0xab28, 0xab2e, 1}, {0xab30, 0xab5a, 1}, {0xab5c, 0xab69, 1},
    {0xab70, 0xabe2, 1}, {0xabf0, 0xabf9, 2}, {0xac00, 0xd7a3, 1}, {0xd7b0, 0xd7c6, 1},
    {0xd7cb, 0xd7fb, 1}, {0xf900, 0xfa6d, 1}, {0xfa70, 0xfad9, 1}, {0xfb00, 0xfb06, 1},
    {0xfb13, 0xfb17, 1}, {0xfb1d, 0xfb1d, 1}, {0xfb1f, 0xfb28, 1}, {0xfb2a, 0xfb36, 1},
    {0xfb38, 0xfb3c, 1}, {0xfb3e, 0xfb3e, 1}, {0xfb40, 0xfb41, 1}, {0xfb43, 0xfb44, 1},
    {0xfb46, 0xfbb1, 1}, {0xfbd3, 0xfd3d, 1}, {0xfd50, 0xfd8f, 1}, {0xfd92, 0xfdc7, 1},
    {0xfdf0, 0xfdfb, 1}, {0xfe70, 0xfe74, 1}, {0xfe76, 0xfefc, 1}, {0xff10, 0xff19, 2},
    {0xff21, 0xff3a, 1}, {0xff41, 0xff5a, 1}, {0xff66, 0xffbe, 1}, {0xffc2, 0xffc7, 1},
    {0xffca, 0xffcf, 1}, {0xffd2, 0xffd7, 1}, {0xffda, 0xffdc, 1}, {0x10000, 0x1000b, 1},
    {0x1000d, 0x10026, 1}, {0x10028, 0x1003a, 1}, {0x1003c, 0x1003d, 1}, {0x1003f, 0x1004d, 1},
    {0x10050, 0x1005d, 1}, {0x10080, 0x100fa, 1}, {0x10107, 0x10133, 2}, {0x10140, 0x10178, 2},
    {0x1018a, 0x1018b, 2}, {0x10280, 0x1029c, 1}, {0x102a0, 0x102d0, 1}, {0x102e1, 0x102fb, 2},
    {0x10300, 0x1031f, 1}, {0x10320, 0x10323, 2}, {0x1032d, 0x10340, 1}, {0x10341, 0x10341, 2},
    {0x10342, 0x10349, 1}, {0x1034a, 0x1034a, 2}, {0x10350, 0x10375, 1}, {0x10380, 0x1039d, 1},
    {0x103a0, 0x103c3, 1}, {0x103c8, 0x103cf, 1}, {0x103d1, 0x103d5, 2}, {0x10400, 0x1049d, 1},
    {0x104a0, 0x104a9, 2}, {0x104b0, 0x104d3, 1}, {0x104d8, 0x104fb, 1}, {0x10500, 0x10527, 1},
    {0x10530, 0x10563, 1}, {0x10570, 0x1057a, 1}, {0x1057c, 0x1058a, 1}, {0x1058c, 0x10592, 1},
    {0x10594, 0x10595, 1}, {0x10597, 0x105a1, 1}, {0x105a3, 0x105b1, 1}, {0x105b3, 0x105b9, 1},
    {0x105bb, 0x105bc, 1}, {0x10600, 0x10736, 1}, {0x10740, 0x10755, 1}, {0x10760, 0x10767, 1},
    {0x10780, 0x10785, 1}, {0x10787, 0x107b0, 1}, {0x107b2, 0x107ba, 1}, {0x10800, 0x10805, 1},
    {0x10808, 0x10808, 1}, {0x1080a, 0x10835, 1}, {0x10837, 0x10838, 1}, {0x1083c, 0x1083c, 1},
    {0x1083f, 0x10855, 1}, {0x10858, 0x1085f, 2}, {0x10860, 0x10876, 1}, {0x10879, 0x1087f, 2},
    {0x10880, 0x1089e, 1}, {0x108a7, 0x108af, 2}, {0x108e0, 0x108f2, 1}, {0x108f4, 0x108f5, 1},
    {0x108fb, 0x108ff, 2}, {0x10900, 0x10915, 1}, {0x10916, 0x1091b, 2}, {0x10920, 0x10939, 1},
    {0x10980, 0x109b7, 1}, {0x109bc, 0x109bd, 2}, {0x109be, 0x109bf, 1}, {0x109c0, 0x109cf, 2},
    {0x109d2, 0x109ff, 2}, {0x10a00, 0x10a00, 1}, {0x10a10, 0x10a13, 1}, {0x10a15, 0x10a17, 1},
    {0x10a19, 0x10a35, 1}, {0x10a40, 0x10a48, 2}, {0x10a60, 0x10a7c, 1}, {0x10a7d, 0x10a7e, 2},
    {0x10a80, 0x10a9c, 1}, {0x10a9d, 0x10a9f, 2}, {0x10ac0, 0x10ac7, 1}, {0x10ac9, 0x10ae4, 1},
    {0x10aeb, 0x10aef, 2}, {0x10b00, 0x10b35, 1}, {0x10b40, 0x10b55, 1}, {0x10b58, 0x10b5f, 2},
    {0x10b60, 0x10b72, 1}, {0x10b78, 0x10b7f, 2}, {0x10b80, 0x10b91, 1}, {0x10ba9, 0x10baf, 2},
    {0x10c00, 0x10c48, 1}, {0x10c80, 0x10cb2, 1}, {0x10cc0, 0x10cf2, 1}, {0x10cfa, 0x10cff, 2},
    {0x10d00, 0x10d23, 1}, {0x10d30, 0x10d39, 2}, {0x10e60, 0x10e7e, 2}, {0x10e80, 0x10ea9, 1},
    {0x10eb0, 0x10eb1, 1}, {0x10f00, 0x10f1c, 1}, {0x10f1d, 0x10f26, 2}, {0x10f27, 0x10f27, 1},
    {0x10f30, 0x10f45, 1}, {0x10f51, 0x10f54, 2}, {0x10f70, 0x10f81, 1}, {0x10fb0, 0x10fc4, 1},
    {0x10fc5, 0x10fcb, 2}, {0x10fe0, 0x10ff6, 1}, {0x11003, 0x11037, 1}, {0x11052, 0x1106f, 2},
    {0x11071, 0x11072, 1}, {0x11075, 0x11075, 1}, {0x11083, 0x110af, 1}, {0x110d0, 0x110e8, 1},
    {0x110f0, 0x110f9, 2}, {0x11103, 0x11126, 1}, {0x11136, 0x1113f, 2}, {0x11144, 0x11144, 1},
    {0x11147, 0x11147, 1}, {0x11150, 0x11172, 1}, {0x11176, 0x11176, 1}, {0x11183, 0x111b2, 1},
    {0x111c1, 0x111c4, 1}, {0x111d0, 0x111d9, 2}, {0x111da, 0x111da, 1}, {0x111dc, 0x111dc, 1},
    {0x111e1, 0x111f4, 2}, {0x11200, 0x11211, 1}, {0x11213, 0x1122b, 1}, {0x11280, 0x11286, 1},
    {0x11288, 0x11288, 1}, {0x1128a, 0x1128d, 1}, {0x1128f, 0x1129d, 1}, {0x1129f, 0x112a8, 1},
    {0x112b0, 0x112de, 1}, {0x112f0, 0x112f9, 2}, {0x11305, 0x1130c, 1}, {0x1130f, 0x11310, 1},
    {0x11313, 0x11328, 1}, {0x1132a, 0x11330, 1}, {0x11332, 0x11333, 1}, {0x11335, 0x11339, 1},
    {0x1133d, 0x1133d, 1}, {0x11350, 0x11350, 1}, {0x1135d, 0x11361, 1}, {0x11400, 0x11434, 1},
    {0x11447, 0x1144a, 1}, {0x11450, 0x11459, 2}, {0x1145f, 0x11461, 1}, {0x11480, 0x114af, 1},
    {0x114c4, 0x114c5, 1}, {0x114c7, 0x114c7, 1}, {0x114d0, 0x114d9, 2}, {0x11580, 0x115ae, 1},
    {0x115d8, 0x115db, 1}, {0x11600, 0x1162f, 1}, {0x11644, 0x11644, 1}, {0x11650, 0x11659, 2},
    {0x11680, 0x116aa, 1}, {0x116b8, 0x116b8, 1}, {0x116c0, 0x116c9, 2}, {0x11700, 0x1171a, 1},
    {0x11730, 0x1173b, 2}, {0x11740, 0x11746, 1}, {0x11800, 0x1182b, 1}, {0x118a0, 0x118df, 1},
    {0x118e0, 0x118f2, 2}, {0x118ff, 0x11906, 1}, {0x11909, 0x11909, 1}, {0x1190c, 0x11913, 1},
    {0x11915, 0x11916, 1}, {0x11918, 0x1192f, 1}, {0x1193f, 0x1193f, 1}, {0x11941, 0x11941, 1},
    {0x11950, 0x11959, 2}, {0x119a0, 0x119a7, 1}, {0x119aa, 0x119d0, 1}, {0x119e1, 0x119e1, 1},
    {0x119e3, 0x119e3, 1}, {0x11a00, 0x11a00, 1}, {0x11a0b, 0x11a32, 1}, {0x11a3a, 0x11a3a, 1},
    {0x11a50, 0x11a50, 1}, {0x11a5c, 0x11a89, 1}, {0x11a9d, 0x11a9d, 1}, {0x11ab0, 0x11af8, 1},
    {0x11c00, 0x11c08, 1}, {0x11c0a, 0x11c2e, 1}, {0x11c40, 0x11c40, 1}, {0x11c50, 0x11c6c, 2},
    {0x11c72, 0x11c8f, 1}, {0x11d00, 0x11d06, 1}, {0x11d08, 0x11d09, 1}, {0x11d0b, 0x11d30, 1},
    {0x11d46, 0x11d46, 1}, {0x11d50, 0x11d59, 2}, {0x11d60, 0x11d65, 1}, {0x11d67, 0x11d68, 1},
    {0x11d6a, 0x11d89, 1}, {0x11d98, 0x11d98, 1}, {0x11da0, 0x11da9, 2}, {0x11ee0, 0x11ef2, 1},
    {0x11fb0, 0x11fb0, 1}, {0x11fc0, 0x11fd4, 2}, {0x12000, 0x12399, 1}, {0x12400, 0x1246e, 2},
    {0x12480, 0x12543, 1}, {0x12f90, 0x12ff0, 1}, {0x13000, 0x1342e, 1}, {0x14400, 0x14646, 1},
    {0x16800, 0x16a38, 1}, {0x16a40, 0x16a5e, 1}, {0x16a60, 0x16a69, 2}, {0x16a70, 0x16abe, 1},
    {0x16ac0, 0x16ac9, 2}, {0x16ad0, 0x16aed, 1}, {0x16b00, 0x16b2f, 1}, {0x16b40, 0x16b43, 1},
    {0x16b50, 0x16b59, 2}, {0x16b5b, 0x16b61, 2}, {0x16b63, 0x16b77, 1}, {0x16b7d, 0x16b8f, 1},
    {0x16e40, 0x16e7f, 1}, {0x16e80, 0x16e96, 2}, {0x16f00, 0x16f4a, 1}, {0x16f50, 0x16f50, 1},
    {0x16f93, 0x16f9f, 1}, {0x16fe0, 0x16fe1, 1}, {0x16fe3, 0x16fe3, 1}, {0x17000, 0x187f7, 1},
    {0x18800, 0x18cd5, 1}, {0x18d00, 0x18d08, 1}, {0x1aff0, 0x1aff3, 1}, {0x1aff5, 0x1affb, 1},
    {0x1affd, 0x1affe, 1}, {0x1b000, 0x1b122, 1}, {0x1b150, 0x1b152, 1}, {0x1b164, 0x1b167, 1},
    {0x1b170, 0x1b2fb, 1}, {0x1bc00, 0x1bc6a, 1}, {0x1bc70, 0x1bc7c, 1}, {0x1bc80, 0x1bc88, 1},
    {0x1bc90, 0x1bc99, 1}, {0x1d2e0, 0x1d2f3, 2}, {0x1d360, 0x1d378, 2}, {0x1d400, 0x1d454, 1},
    {0x1d456, 0x1d49c, 1}, {0x1d49e, 0x1d49f, 1}, {0x1d4a2, 0x1d4a2, 1}, {0x1d4a5, 0x1d4a6, 1},
    {0x1d4a9, 0x1d4ac, 1}, {0x1d4ae, 0x1d4b9, 1}, {0x1d4bb, 0x1d4bb, 1}, {0x1d4bd, 0x1d4c3, 1},
    {0x1d4c5, 0x1d505, 1}, {0x1d507, 0x1d50a, 1}, {0x1d50d, 0x1d514, 1}, {0x1d516, 0x1d51c, 1},
    {0x1d51e, 0x1d539, 1}, {0x1d53b, 0x1d53e, 1}, {0x1d540, 0x1d544, 1}, {0x1d546, 0x1d546, 1},
    {0x1d54a, 0x1d550, 1}, {0x1d552, 0x1d6a5, 1}, {0x1d6a8, 0x1d6c0, 1}, {0x1d6c2, 0x1d6da, 1},
    {0x1d6dc, 0x1d6fa, 1}, {0x1d6fc, 0x1d714, 1}, {0x1d716, 0x1d734, 1}, {0x1d736, 0x1d74e, 1},
    {0x1d750, 0x1d76e, 1}, {0x1d770, 0x1d788, 1}, {0x1d78a, 0x1d7a8, 1}, {0x1d7aa, 0x1d7c2, 1},
    {0x1d7c4, 0x1d7cb, 1}, {0x1d7ce, 0x1d7ff, 2}, {0x1df00, 0x1df1e, 1}, {0x1e100, 0x1e12c, 1},
    {0x1e137, 0x1e13d, 1}, {0x1e140, 0x1e149, 2}, {0x1e14e, 0x1e14e, 1}, {0x1e290, 0x1e2ad, 1},
    {0x1e2c0, 0x1e2eb, 1}, {0x1e2f0, 0x1e2f9, 2}, {0x1e7e0, 0x1e7e6, 1}, {0x1e7e8, 0x1e7eb, 1},
    {0x1e7ed, 0x1e7ee, 1}, {0x1e7f0, 0x1e7fe, 1}, {0x1e800, 0x1e8c4, 1}, {0x1e8c7, 0x1e8cf, 2},
    {0x1e900, 0x1e943, 1}, {0x1e94b, 0x1e94b, 1}, {0x1e950, 0x1e959, 2}, {0x1ec71, 0x1ecab, 2},
    {0x1ecad, 0x1ecaf, 2}, {0x1ecb1, 0x1ecb4, 2}, {0x1ed01, 0x1ed2d, 2}, {0x1ed2f, 0x1ed3d, 2},
    {0x1ee00, 0x1ee03, 1}, {0x1ee05, 0x1ee1f, 1}, {0x1ee21, 0x1ee22, 1}, {0x1ee24, 0x1ee24, 1},
    {0x1ee27, 0x1ee27, 1}, {0x1ee29, 0x1ee32, 1}, {0x1ee34, 0x1ee37, 1}, {0x1ee39, 0x1ee39, 1},
    {0x1ee3b, 0x1ee3b, 1}, {0x1ee42, 0x1ee42, 1}, {0x1ee47, 0x1ee47, 1}, {0x1ee49, 0x1ee49, 1},
    {0x1ee4b, 0x1ee4b, 1}, {0x1ee4d, 0x1ee4f, 1}, {0x1ee51, 0x1ee52, 1}, {0x1ee54, 0x1ee54, 1},
    {0x1ee57, 0x1ee57, 1}, {0x1ee59, 0x1ee59, 1}, {0x1ee5b, 0x1ee5b, 1}, {0x1ee5d, 0x1ee5d, 1},
    {0x1ee5f, 0x1ee5f, 1}, {0x1ee61, 0x1ee62, 1}, {0x1ee64, 0x1ee64, 1}, {0x1ee67, 0x1ee6a, 1},
    {0x1ee6c, 0x1ee72, 1}, {0x1ee74, 0x1ee77, 1}, {0x1ee79, 0x1ee7c, 1}, {0x1ee7e, 0x1ee7e, 1},
    {0x1ee80, 0x1ee89, 1}, {0x1ee8b, 0x1ee9b, 1}, {0x1eea1, 0x1eea3, 1}, {0x1eea5, 0x1eea9, 1},
    {0x1eeab, 0x1eebb, 1}, {0x1f100, 0x1f10c, 2}, {0x1fbf0, 0x1fbf9, 2}, {0x20000, 0x2a6df, 1},
    {0x2a700, 0x2b738, 1}, {0x2b740, 0x2b81d, 1}, {0x2b820, 0x2cea1, 1}, {0x2ceb0, 0x2ebe0, 1},
    {0x2f800, 0x2fa1d, 1}, {0x30000, 0x3134a, 1},
};

// 1: letter, 2: number, 0: other (binary search over the ranges).
// About ten probes over the table; tokenizers call it only above U+FFFF (ctl__class).
static int ctl__uclass(uint32_t cp) {
    int64_t lo = 0, hi = (int64_t)(sizeof ctl__unicode_ranges / sizeof ctl__unicode_ranges[0]) - 1;
    while (lo <= hi) {
        int64_t mid = (lo + hi) / 2;
        if (cp < ctl__unicode_ranges[mid][0]) hi = mid - 1;
        else if (cp > ctl__unicode_ranges[mid][1]) lo = mid + 1;
        else return (int)ctl__unicode_ranges[mid][2];
    }
    return 0;
}

// The 25 code points of Unicode's White_Space property: what \s means in the pre-tokenizers.
static bool ctl__uspace(uint32_t cp) {   // Unicode White_Space
    return (cp >= 9 && cp <= 13) || cp == 32 || cp == 0x85 || cp == 0xA0 || cp == 0x1680 ||
           (cp >= 0x2000 && cp <= 0x200A) || cp == 0x2028 || cp == 0x2029 || cp == 0x202F || cp == 0x205F || cp == 0x3000;
}

// The code point at s[i] (n bytes in all) and its length; malformed bytes count as one code
// point each (U+FFFD), so any input is consumed.
// A sequence cut off by the end of the text is malformed too (for need 0 the length test never fires). Overlong forms,
// surrogates and values above U+10FFFF decode without complaint: the result only picks a character class, while the
// bytes themselves go on to BPE unchanged. Reads stay inside s[0, n).
static uint32_t ctl__utf8_at(const unsigned char *s, size_t n, size_t i, size_t *len) {
    unsigned c = s[i];
    // need: the continuation bytes the lead byte announces (110xxxxx: 1, 1110xxxx: 2, 11110xxx: 3); a stray continuation
    // byte or 0xF8-0xFF gives -1.
    int need = c < 0x80 ? 0 : (c >> 5) == 6 ? 1 : (c >> 4) == 14 ? 2 : (c >> 3) == 30 ? 3 : -1;
    uint32_t cp = need == 0 ? c : need == 1 ? (c & 31) : need == 2 ? (c & 15) : (c & 7);
    if (need < 0 || i + (size_t)need >= n + (need == 0)) return *len = 1, 0xFFFD;
    for (int k = 1; k <= need; k++) {
        if ((s[i + k] & 0xC0) != 0x80) return *len = 1, 0xFFFD;
        cp = cp << 6 | (s[i + k] & 63);
    }
    *len = (size_t)need + 1;
    return cp;
}

// A slot of the two open-addressing tables: key 0 marks an empty slot (both kinds of key are made non-zero); value is
// a token id or a merge rank.
typedef struct ctl__hslot { uint64_t key; int32_t value; } ctl__hslot;

// The pre-tokenizers cotlab has, by GGUF tokenizer.ggml.pre: "gpt-2" (and "default"), "smollm",
// "llama-bpe" (Llama-3) and "qwen2".
typedef enum ctl__pre { CTL__PRE_GPT2, CTL__PRE_SMOLLM, CTL__PRE_LLAMA3, CTL__PRE_QWEN2 } ctl__pre;

// Built once from a GGUF file and never changed afterwards: tokenizing only reads it.
struct ctl_tokenizer {
    ctl_ctx *ctx;
    int64_t V;   // vocabulary size, < 2^31
    char *pool;                 // every token's text, back to back
    uint64_t *off;              // (V+1) offsets into pool
    int32_t *type;              // GGUF token types: 1 normal, 3 control, 4 user-defined, 6 byte ...
    ctl__hslot *by_text;        // hash(text) -> id, open addressing
    ctl__hslot *merges;         // (left << 32 | right) -> rank
    int32_t *merge_to;          // rank -> merged id
    uint64_t cap_text, cap_merge;   // slots in each table: powers of two, at least twice the entries
    int32_t *special;           // ids of control / user-defined tokens, by first byte, longest first
    int64_t n_special;
    int64_t special_from[257];  // special[special_from[b] .. special_from[b+1]) start with byte b
    int32_t byte_token[256];    // the token of each byte's byte-level character
    unsigned char cp_byte[324]; // byte-level code point -> byte
    int8_t bmp_class[65536];    // the class of U+0000..U+FFFF (ctl__class), looked up
    int32_t bos, eos;   // -1 when the file names none or an id outside [0, V)
    ctl__pre pre;               // which pre-tokenizer
    bool ignore_merges;         // Llama-3: a piece that is a whole token is not merged
    bool add_bos;
};

// The class of a code point for the pre-tokenizers: -1 whitespace, 0 other, 1 letter, 2 number.
// ctl__class_slow is the reference (a binary search); tokenizers look the BMP up in a table.
static int ctl__class_slow(uint32_t cp) { return ctl__uspace(cp) ? -1 : ctl__uclass(cp); }

// The 64 Ki-entry table from the ranges, then whitespace written over them, so whitespace wins any overlap.
static void ctl__class_fill(int8_t *t) {
    memset(t, 0, 65536);
    for (size_t r = 0; r < sizeof ctl__unicode_ranges / sizeof ctl__unicode_ranges[0]; r++)
        for (uint32_t cp = ctl__unicode_ranges[r][0]; cp <= ctl__unicode_ranges[r][1] && cp < 65536; cp++)
            t[cp] = (int8_t)ctl__unicode_ranges[r][2];
    for (uint32_t cp = 0; cp < 65536; cp++)
        if (ctl__uspace(cp)) t[cp] = -1;
}

CTL__INLINE int ctl__class(const ctl_tokenizer *tk, uint32_t cp) { return cp < 65536 ? tk->bmp_class[cp] : ctl__class_slow(cp); }

// Special tokens are ordered by first byte, then longest first, then by id (which only makes the order total): within
// a group, the scan's first match is the longest one.
typedef struct ctl__special_key { int32_t first, id; uint64_t len; } ctl__special_key;
static int ctl__special_cmp(const void *a, const void *b) {
    const ctl__special_key *x = (const ctl__special_key *)a, *y = (const ctl__special_key *)b;
    if (x->first != y->first) return x->first < y->first ? -1 : 1;
    if (x->len != y->len) return x->len > y->len ? -1 : 1;
    return (x->id > y->id) - (x->id < y->id);
}

// FNV-1a, 64-bit, over a token's bytes.
static uint64_t ctl__fnv(const char *s, size_t n) {
    uint64_t h = 1469598103934665603ull;
    for (size_t i = 0; i < n; i++) h = (h ^ (unsigned char)s[i]) * 1099511628211ull;
    return h | 1;   // 0 marks an empty slot
}

// The first half of MurmurHash3's 64-bit finaliser: spreads high bits into the low ones that pick a slot. Masked
// unmixed, a merge key would pick its slot by the right id alone, so every pair ending in one token would collide.
static uint64_t ctl__mix(uint64_t x) {
    x ^= x >> 33, x *= 0xff51afd7ed558ccdull, x ^= x >> 33;
    return x;
}

// The id of the token whose text is s[0, n), or -1. Linear probing from mix(hash): the table is at most half full, so
// an empty slot always ends the search. The text itself is compared, so a hash collision cannot give a wrong id.
static int32_t ctl__tok_find(const ctl_tokenizer *tk, const char *s, size_t n) {
    uint64_t h = ctl__fnv(s, n), mask = tk->cap_text - 1;
    for (uint64_t i = ctl__mix(h) & mask;; i = (i + 1) & mask) {
        const ctl__hslot *e = &tk->by_text[i];
        if (!e->key) return -1;
        if (e->key == h && tk->off[e->value + 1] - tk->off[e->value] == n && !memcmp(tk->pool + tk->off[e->value], s, n))
            return e->value;
    }
}

// The rank of merge (a, b), or -1. The key is a << 32 | b, plus 1 so that the pair (0, 0) does not look empty.
static int32_t ctl__merge_rank(const ctl_tokenizer *tk, int32_t a, int32_t b) {
    uint64_t key = ((uint64_t)(uint32_t)a << 32 | (uint32_t)b) + 1, mask = tk->cap_merge - 1;
    for (uint64_t i = ctl__mix(key) & mask;; i = (i + 1) & mask) {
        if (!tk->merges[i].key) return -1;
        if (tk->merges[i].key == key) return tk->merges[i].value;
    }
}

CTL_API void ctl_tokenizer_free(ctl_tokenizer *tk) {
    if (!tk) return;
    ctl_ctx *ctx = tk->ctx;
    ctl_free(ctx, tk->pool), ctl_free(ctx, tk->off), ctl_free(ctx, tk->type), ctl_free(ctx, tk->by_text);
    ctl_free(ctx, tk->merges), ctl_free(ctx, tk->merge_to), ctl_free(ctx, tk->special), ctl_free(ctx, tk);
}

CTL_API int64_t ctl_tokenizer_vocab(const ctl_tokenizer *tk) { return CTL__ARGS(NULL, tk) ? tk->V : 0; }
CTL_API int32_t ctl_tokenizer_bos(const ctl_tokenizer *tk) { return CTL__ARGS(NULL, tk) ? tk->bos : -1; }
CTL_API int32_t ctl_tokenizer_eos(const ctl_tokenizer *tk) { return CTL__ARGS(NULL, tk) ? tk->eos : -1; }
// True only when the file asks for BOS and names one.
CTL_API bool ctl_tokenizer_add_bos(const ctl_tokenizer *tk) { return CTL__ARGS(NULL, tk) && tk->add_bos && tk->bos >= 0; }

// tokenizer.ggml.model, which must be 'gpt2', and tokenizer.ggml.pre, which picks tk->pre (and Llama-3's
// ignore_merges and add_bos). Fails, recording on tk->ctx, on a missing or other model or an unknown pre-tokenizer.
static ctl_status ctl__tk_pre_read(ctl_tokenizer *tk, const ctl_gguf *g) {
    ctl_ctx *ctx = tk->ctx;
    const char *s;
    size_t len;
    ctl_status st;
    // tokenizer.ggml.model names the algorithm: 'gpt2' is byte-level BPE, whatever the model's architecture.
    if ((st = ctl_gguf_get_str(g, "tokenizer.ggml.model", &s, &len))) return st;
    if (len != 4 || memcmp(s, "gpt2", 4))
        return ctl__fail(ctx, CTL_ERR_UNSUPPORTED, "tokenizer: model '%.*s' (cotlab reads byte-level BPE, 'gpt2')", (int)CTL__MIN(len, (size_t)32), s);
    if (!ctl_gguf_get_str(g, "tokenizer.ggml.pre", &s, &len)) {
        // The names llama.cpp maps onto each of these four (llama-vocab.cpp). An absent key leaves GPT-2's split (the struct
        // is zeroed). "default" gets GPT-2's split too, an approximation: llama.cpp's DEFAULT also cuts runs of punctuation
        // and groups of digits first (gguf.md 4.2), so the two can differ on such text.
        static const struct { const char *name; ctl__pre pre; } names[] = {
            {"gpt-2", CTL__PRE_GPT2}, {"default", CTL__PRE_GPT2}, {"smollm", CTL__PRE_SMOLLM},
            {"llama-bpe", CTL__PRE_LLAMA3}, {"llama3", CTL__PRE_LLAMA3}, {"llama-v3", CTL__PRE_LLAMA3},
            {"qwen2", CTL__PRE_QWEN2}, {"deepseek-r1-qwen", CTL__PRE_QWEN2}};
        size_t k = 0, n_names = sizeof names / sizeof names[0];
        while (k < n_names && !(strlen(names[k].name) == len && !memcmp(s, names[k].name, len))) k++;
        if (k == n_names)
            return ctl__fail(ctx, CTL_ERR_UNSUPPORTED, "tokenizer: pre-tokenizer '%.*s' (cotlab has gpt-2, smollm, llama-bpe and qwen2)",
                             (int)CTL__MIN(len, (size_t)32), s);
        tk->pre = names[k].pre;
        // Llama-3 also turns on ignore_merges and, unless tokenizer.ggml.add_bos_token says otherwise below, add_bos.
        tk->ignore_merges = tk->add_bos = tk->pre == CTL__PRE_LLAMA3;
    }
    return CTL_OK;
}

// Sizes tk's arrays for the string arrays toks (1..2^31-1 texts) and merges, allocates them and empties the two hash
// tables. On failure (out of memory) what was allocated hangs on tk for ctl_tokenizer_free.
static ctl_status ctl__tk_tables_alloc(ctl_tokenizer *tk, const ctl_gguf *g, const ctl_gguf_kv *toks, const ctl_gguf_kv *merges) {
    ctl_ctx *ctx = tk->ctx;
    const char *s;
    size_t len;
    // token_type is optional: without it every token is normal (1). Sizes first: the pool holds every text back to back
    // (bounded by the file), and each hash table gets at least twice as many slots as entries.
    tk->V = (int64_t)toks->count;
    uint64_t total = 0;
    // The texts' total length, to hold them all in one allocation; it is bounded by the file's size.
    for (uint64_t i = 0; i < toks->count; i++) ctl_gguf_arr_str(g, toks, i, &s, &len), total += len;
    for (tk->cap_text = 16; tk->cap_text < 2 * (uint64_t)tk->V; tk->cap_text *= 2) {}
    for (tk->cap_merge = 16; tk->cap_merge < 2 * merges->count + 2; tk->cap_merge *= 2) {}
    tk->pool = (char *)ctl_alloc(ctx, (size_t)total + 1);
    tk->off = (uint64_t *)ctl_alloc(ctx, (size_t)(tk->V + 1) * sizeof(uint64_t));
    tk->type = (int32_t *)ctl_alloc(ctx, (size_t)tk->V * sizeof(int32_t));
    tk->by_text = (ctl__hslot *)ctl_alloc(ctx, (size_t)tk->cap_text * sizeof(ctl__hslot));
    tk->merges = (ctl__hslot *)ctl_alloc(ctx, (size_t)tk->cap_merge * sizeof(ctl__hslot));
    // merge_to is indexed by rank; special has room for V ids, since any token may be control or user-defined.
    tk->merge_to = (int32_t *)ctl_alloc(ctx, (size_t)(merges->count + 1) * sizeof(int32_t));
    tk->special = (int32_t *)ctl_alloc(ctx, (size_t)tk->V * sizeof(int32_t));
    if (!tk->pool || !tk->off || !tk->type || !tk->by_text || !tk->merges || !tk->merge_to || !tk->special)
        return ctl__fail(ctx, CTL_ERR_OUT_OF_MEMORY, "tokenizer: out of memory");
    // Zeroed tables: every slot empty.
    memset(tk->by_text, 0, (size_t)tk->cap_text * sizeof(ctl__hslot));
    memset(tk->merges, 0, (size_t)tk->cap_merge * sizeof(ctl__hslot));
    return CTL_OK;
}

// The pool, the offsets, the types and the text table, one token at a time, from toks and types (may be NULL), into
// the tables ctl__tk_tables_alloc sized. Fails with ctl_gguf_arr_int's status on a short or non-integer token_type.
static ctl_status ctl__tk_texts_read(ctl_tokenizer *tk, const ctl_gguf *g, const ctl_gguf_kv *toks, const ctl_gguf_kv *types) {
    const char *s;
    size_t len;
    uint64_t at = 0;
    // Control (3) and user-defined (4) tokens with a text become the special tokens, cut out of the text before
    // pre-tokenizing.
    for (int64_t i = 0; i < tk->V; i++) {
        int64_t t = 1;
        ctl_gguf_arr_str(g, toks, (uint64_t)i, &s, &len);
        memcpy(tk->pool + at, s, len);
        tk->off[i] = at, at += len;
        // A token_type array that is short or not of integers fails here; the call is repeated only to return its status.
        if (types && ctl_gguf_arr_int(g, types, (uint64_t)i, &t)) return ctl_gguf_arr_int(g, types, (uint64_t)i, &t);
        tk->type[i] = (int32_t)t;
        // Insert into the text table unless the text is already there: linear probing to the first empty slot.
        uint64_t h = ctl__fnv(s, len), mask = tk->cap_text - 1, k = ctl__mix(h) & mask;
        if (ctl__tok_find(tk, s, len) >= 0) continue;   // a duplicate text keeps its first id
        while (tk->by_text[k].key) k = (k + 1) & mask;
        tk->by_text[k].key = h, tk->by_text[k].value = (int32_t)i;
        if ((t == 3 || t == 4) && len) tk->special[tk->n_special++] = (int32_t)i;   // an empty text would match anywhere
    }
    // The end of the last text: token i's text is pool[off[i], off[i + 1]).
    tk->off[tk->V] = at;
    return CTL_OK;
}

// Special texts grouped by first byte, longest first in each group (so "<|im_start|>" wins
// over any prefix of it): the scan at a position tries only those that can match there.
// Needs the texts read; fails only when the sort's scratch array cannot be allocated.
static ctl_status ctl__tk_specials_sort(ctl_tokenizer *tk) {
    ctl_ctx *ctx = tk->ctx;
    ctl__special_key *keys = (ctl__special_key *)ctl_alloc(ctx, (size_t)(tk->n_special + 1) * sizeof(ctl__special_key));
    if (!keys) return ctl__fail(ctx, CTL_ERR_OUT_OF_MEMORY, "tokenizer: out of memory");
    for (int64_t i = 0; i < tk->n_special; i++) {
        int32_t id = tk->special[i];
        // A special text is never empty, so its first byte exists.
        keys[i].first = (unsigned char)tk->pool[tk->off[id]], keys[i].len = tk->off[id + 1] - tk->off[id], keys[i].id = id;
    }
    qsort(keys, (size_t)tk->n_special, sizeof *keys, ctl__special_cmp);
    memset(tk->special_from, 0, sizeof tk->special_from);
    // A counting sort's offsets: count each group at first + 1, then a prefix sum makes special_from[b] the group's start.
    for (int64_t i = 0; i < tk->n_special; i++) tk->special[i] = keys[i].id, tk->special_from[keys[i].first + 1]++;
    for (int b = 0; b < 256; b++) tk->special_from[b + 1] += tk->special_from[b];
    ctl_free(ctx, keys);
    return CTL_OK;
}

// GPT-2's byte-level alphabet (gguf.md 4.3): the 188 printable bytes 0x21-0x7E, 0xA1-0xAC and 0xAE-0xFF stand for the
// code point of the same value; the other 68, in increasing order, for U+0100 upwards (so the space is U+0120).
// A byte whose character is not in the vocabulary keeps byte_token -1. Needs the text table; cannot fail.
static bool ctl__byte_stands_for_itself(uint32_t b) {
    return (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174 && b <= 255);
}

static void ctl__tk_bytes_map(ctl_tokenizer *tk) {
    for (int b = 0, n = 0; b < 256; b++) {
        bool self = ctl__byte_stands_for_itself((uint32_t)b);
        uint32_t cp = self ? (uint32_t)b : (uint32_t)(256 + n++);
        char u[4];
        size_t ul = 0;
        ctl__utf8(u, &ul, cp);
        tk->cp_byte[cp] = (unsigned char)b;
        tk->byte_token[b] = ctl__tok_find(tk, u, ul);
    }
}

// Merges are "A B" split at the first space after index 0, and a merge's rank is its index: lower ranks apply first.
// Each is stored as (id of A, id of B) -> rank, and merge_to[rank] is the id of the text A + B, so BPE works on ids and
// never on text. A merge whose joined text is 512 bytes or longer is dropped. Fails on a merge with no space.
static ctl_status ctl__tk_merges_read(ctl_tokenizer *tk, const ctl_gguf *g, const ctl_gguf_kv *merges) {
    const char *s;
    size_t len;
    for (uint64_t r = 0; r < merges->count; r++) {
        ctl_gguf_arr_str(g, merges, r, &s, &len);
        const char *sp = len > 1 ? (const char *)memchr(s + 1, ' ', len - 1) : NULL;
        if (!sp) return ctl__fail(tk->ctx, CTL_ERR_FORMAT, "tokenizer: merge %" PRIu64 " '%.*s' has no space", r, (int)CTL__MIN(len, (size_t)40), s);
        size_t la = (size_t)(sp - s), lb = len - la - 1;
        char buf[512];
        int32_t a = ctl__tok_find(tk, s, la), b = ctl__tok_find(tk, sp + 1, lb), m = -1;
        if (la + lb < sizeof buf) memcpy(buf, s, la), memcpy(buf + la, sp + 1, lb), m = ctl__tok_find(tk, buf, la + lb);
        if (a < 0 || b < 0 || m < 0) continue;   // as llama.cpp: a merge of unknown tokens is never applied
        uint64_t key = ((uint64_t)(uint32_t)a << 32 | (uint32_t)b) + 1, mask = tk->cap_merge - 1, k = ctl__mix(key) & mask;
        while (tk->merges[k].key && tk->merges[k].key != key) k = (k + 1) & mask;
        if (tk->merges[k].key) continue;   // the first (lowest) rank of a pair counts
        tk->merges[k].key = key, tk->merges[k].value = (int32_t)r;
        tk->merge_to[r] = m;   // only ranks that made it into the table are read
    }
    return CTL_OK;
}

// Optional keys: a missing or malformed one leaves its default (-1, or the pre-tokenizer's add_bos); so does a BOS or
// EOS id outside the vocabulary, which a hostile file could use to index past the embeddings. Cannot fail: the
// message a missing key left on the context is cleared.
static void ctl__tk_options_read(ctl_tokenizer *tk, const ctl_gguf *g) {
    int64_t v;
    tk->bos = ctl_gguf_get_int(g, "tokenizer.ggml.bos_token_id", &v) || v < 0 || v >= tk->V ? -1 : (int32_t)v;
    tk->eos = ctl_gguf_get_int(g, "tokenizer.ggml.eos_token_id", &v) || v < 0 || v >= tk->V ? -1 : (int32_t)v;
    bool add_bos;
    if (!ctl_gguf_get_bool(g, "tokenizer.ggml.add_bos_token", &add_bos)) tk->add_bos = add_bos;
    tk->ctx->err[0] = 0;   // absent optional keys are not errors
}

// Reads the vocabulary (gguf.md 4.1): the texts of tokenizer.ggml.tokens, their tokenizer.ggml.token_type, the merges
// in rank order, BOS, EOS and add_bos. The file may be hostile: the arrays' types are checked, the token count must be
// in 1..2^31-1, and every id in the tables is found by lookup rather than read from the file (BOS and EOS aside).
// On failure the caller frees tk.
static ctl_status ctl__tk_build(ctl_tokenizer *tk, const ctl_gguf *g) {
    ctl_status st;
    ctl__class_fill(tk->bmp_class);
    if ((st = ctl__tk_pre_read(tk, g))) return st;
    const ctl_gguf_kv *toks = ctl_gguf_find_kv(g, "tokenizer.ggml.tokens"), *types = ctl_gguf_find_kv(g, "tokenizer.ggml.token_type");
    const ctl_gguf_kv *merges = ctl_gguf_find_kv(g, "tokenizer.ggml.merges");
    if (!toks || toks->type != CTL_GGUF_ARR || toks->elem_type != CTL_GGUF_STR || !merges || merges->type != CTL_GGUF_ARR || merges->elem_type != CTL_GGUF_STR ||
        toks->count == 0 || toks->count > INT32_MAX)
        return ctl__fail(tk->ctx, CTL_ERR_NOT_FOUND, "tokenizer: tokenizer.ggml.tokens and tokenizer.ggml.merges (string arrays) are required");
    if ((st = ctl__tk_tables_alloc(tk, g, toks, merges)) || (st = ctl__tk_texts_read(tk, g, toks, types)) ||
        (st = ctl__tk_specials_sort(tk)))
        return st;
    ctl__tk_bytes_map(tk);
    if ((st = ctl__tk_merges_read(tk, g, merges))) return st;
    ctl__tk_options_read(tk, g);
    return CTL_OK;
}

// The tokenizer owns copies of everything it needs: g may be closed afterwards.
CTL_API ctl_status ctl_tokenizer_from_gguf(ctl_ctx *ctx, const ctl_gguf *g, ctl_tokenizer **out) {
    if (out) *out = NULL;
    if (!CTL__ARGS(ctx, ctx && g && out)) return CTL_ERR_INVALID;
    ctl_tokenizer *tk = (ctl_tokenizer *)ctl_alloc(ctx, sizeof(ctl_tokenizer));
    if (!tk) return ctl__fail(ctx, CTL_ERR_OUT_OF_MEMORY, "tokenizer: out of memory");
    memset(tk, 0, sizeof *tk);
    tk->ctx = ctx;
    ctl_status st = ctl__tk_build(tk, g);
    if (st) return ctl_tokenizer_free(tk), st;
    *out = tk;
    return CTL_OK;
}

// Output of ids with a capacity: counts past the end so the caller learns the size needed.
typedef struct ctl__ids { int32_t *ids; int64_t n, cap; bool oom; } ctl__ids;
static void ctl__ids_put(ctl__ids *o, int32_t id) {
    if (o->n < o->cap) o->ids[o->n] = id;
    o->n++;
}

// Two implementations of the same merges, checked against each other by the tests: a scan, simple and fast for short
// pieces, and a heap for long ones, where the scan's cost grows with the square of the length.
#define CTL__BPE_SCAN_MAX 64   // pieces up to this many symbols take the scan (the usual case: words)

// BPE merges on the m symbols sym: the lowest-ranked adjacent pair, the leftmost of equals,
// until none is left; returns the count left (-1: out of memory). The reference: a scan per
// merge, quadratic in m; each pair's rank is looked up once and kept in rank[] (-1: none).
static int64_t ctl__bpe_scan(const ctl_tokenizer *tk, int32_t *sym, int64_t m) {
    // Pieces longer than CTL__BPE_SCAN_MAX only reach here from the tests; ctl__bpe sends them to the heap.
    int32_t local[CTL__BPE_SCAN_MAX], *rank = m <= CTL__BPE_SCAN_MAX ? local : (int32_t *)ctl_alloc(tk->ctx, (size_t)m * sizeof(int32_t));
    if (!rank) return -1;
    // rank[i] is the rank of the pair (sym[i], sym[i + 1]).
    for (int64_t i = 0; i + 1 < m; i++) rank[i] = ctl__merge_rank(tk, sym[i], sym[i + 1]);
    // Each pass merges one pair, the best one left: at most m - 1 passes.
    for (;;) {
        int32_t best = INT32_MAX;
        int64_t at = -1;
        for (int64_t i = 0; i + 1 < m; i++)
            if (rank[i] >= 0 && rank[i] < best) best = rank[i], at = i;
        // No adjacent pair has a merge: done.
        if (at < 0) {
            if (rank != local) ctl_free(tk->ctx, rank);
            return m;
        }
        // Merge sym[at] with sym[at + 1]: drop the right symbol and the rank of the pair just merged; only the two pairs that
        // touch the new symbol need a new rank.
        sym[at] = tk->merge_to[best];
        memmove(sym + at + 1, sym + at + 2, (size_t)(m - at - 2) * sizeof(int32_t));
        memmove(rank + at, rank + at + 1, (size_t)(m - at - 2) * sizeof(int32_t));
        m--;
        if (at > 0) rank[at - 1] = ctl__merge_rank(tk, sym[at - 1], sym[at]);
        if (at + 1 < m) rank[at] = ctl__merge_rank(tk, sym[at], sym[at + 1]);
    }
}

// The same merges in O(m log m), for long pieces (a line of 1 MB without a space would take the
// scan hours): the symbols as a linked list, candidate pairs in a min-heap on (rank, position
// of the left symbol), which orders them as the scan picks them. A pair whose symbols changed
// since it was pushed is skipped when it comes out. Returns -1 when out of memory.
typedef struct ctl__bpe_pair { int32_t rank, a, b; int64_t left; } ctl__bpe_pair;

// The scan's order: lowest rank, then leftmost.
CTL__INLINE bool ctl__bpe_less(const ctl__bpe_pair *x, const ctl__bpe_pair *y) {
    return x->rank < y->rank || (x->rank == y->rank && x->left < y->left);
}

// Pushes the pair (sym[i], sym[j]), j being i's right neighbour, if it has a rank: a binary heap's sift-up.
static void ctl__bpe_push(const ctl_tokenizer *tk, ctl__bpe_pair *h, int64_t *nh, const int32_t *sym, int64_t i, int64_t j) {
    ctl__bpe_pair e = {ctl__merge_rank(tk, sym[i], sym[j]), sym[i], sym[j], i};
    if (e.rank < 0) return;
    int64_t k = (*nh)++;
    for (; k > 0 && ctl__bpe_less(&e, &h[(k - 1) / 2]); k = (k - 1) / 2) h[k] = h[(k - 1) / 2];
    h[k] = e;
}

// Removes and returns the least pair: the last element sifts down from the root. The heap must not be empty.
static ctl__bpe_pair ctl__bpe_pop(ctl__bpe_pair *h, int64_t *nh) {
    ctl__bpe_pair top = h[0], last = h[--*nh];
    int64_t k = 0;
    for (int64_t c; (c = 2 * k + 1) < *nh; k = c) {
        if (c + 1 < *nh && ctl__bpe_less(&h[c + 1], &h[c])) c++;
        if (!ctl__bpe_less(&h[c], &last)) break;
        h[k] = h[c];
    }
    if (*nh) h[k] = last;
    return top;
}

static int64_t ctl__bpe_heap(const ctl_tokenizer *tk, int32_t *sym, int64_t m) {
    // Every merge pushes at most 2 pairs and there are at most m - 1 merges.
    int64_t *next = (int64_t *)ctl_alloc(tk->ctx, (size_t)m * 2 * sizeof(int64_t)), *prev = next + m, nh = 0;
    ctl__bpe_pair *h = (ctl__bpe_pair *)ctl_alloc(tk->ctx, (size_t)m * 3 * sizeof(ctl__bpe_pair));
    if (!next || !h) return ctl_free(tk->ctx, next), ctl_free(tk->ctx, h), -1;
    // next and prev link the live symbols by index (m and -1 mark the ends); indices never move, so a pair's left index
    // keeps its place in the order.
    for (int64_t i = 0; i < m; i++) next[i] = i + 1, prev[i] = i - 1;
    // Every adjacent pair of the initial symbols that has a merge.
    for (int64_t i = 0; i + 1 < m; i++) ctl__bpe_push(tk, h, &nh, sym, i, i + 1);
    while (nh) {
        ctl__bpe_pair e = ctl__bpe_pop(h, &nh);
        int64_t i = e.left, j = next[i];
        if (sym[i] != e.a || j >= m || sym[j] != e.b) continue;   // stale: i merged away, or i or its neighbour changed
        // The merge: i takes the new id and j is unlinked; then the pairs the new symbol forms with both its neighbours.
        sym[i] = tk->merge_to[e.rank], sym[j] = -1;                // j leaves the list (index 0 never does)
        next[i] = next[j];
        if (next[j] < m) prev[next[j]] = i;
        if (prev[i] >= 0) ctl__bpe_push(tk, h, &nh, sym, prev[i], i);
        if (next[i] < m) ctl__bpe_push(tk, h, &nh, sym, i, next[i]);
    }
    int64_t k = 0;
    // The survivors, compacted in order.
    for (int64_t i = 0; i < m; i = next[i]) sym[k++] = sym[i];
    ctl_free(tk->ctx, next), ctl_free(tk->ctx, h);
    return k;
}

// BPE on one pre-tokenized piece: start from its bytes' tokens, then merge.
// Every symbol is a token id at every step (merge_to holds ids looked up when the merges were read), so no per-byte
// fallback is needed at the end, as it is in llama.cpp's loop over texts. Pieces up to 256 bytes use the stack.
static void ctl__bpe(const ctl_tokenizer *tk, const unsigned char *s, size_t n, ctl__ids *o) {
    int32_t local[256], *sym = n <= 256 ? local : (int32_t *)ctl_alloc(tk->ctx, n * sizeof(int32_t));
    if (!sym) {
        o->oom = true;
        return;
    }
    int64_t m = 0;
    // The piece's bytes as tokens of their byte-level characters (byte_token).
    for (size_t i = 0; i < n; i++)   // a byte without a token (SmolLM2 has none for 21) is dropped, as llama.cpp does
        if (tk->byte_token[s[i]] >= 0) sym[m++] = tk->byte_token[s[i]];
    // The text buffer only bounds this check: a piece longer than it simply goes through the merges.
    if (tk->ignore_merges && m > 1) {   // the piece's byte-level text, if it is a token as a whole
        char text[512];
        size_t tl = 0;
        for (int64_t i = 0; i < m && sym[i] >= 0 && tl + 4 <= sizeof text; i++) {
            size_t w = (size_t)(tk->off[sym[i] + 1] - tk->off[sym[i]]);
            memcpy(text + tl, tk->pool + tk->off[sym[i]], w), tl += w;
        }
        int32_t whole = tl + 4 <= sizeof text ? ctl__tok_find(tk, text, tl) : -1;
        if (whole >= 0) sym[0] = whole, m = 1;
    }
    // On out-of-memory the piece is dropped and o->oom tells ctl_tokenize to fail; its ids are not emitted.
    m = m <= CTL__BPE_SCAN_MAX ? ctl__bpe_scan(tk, sym, m) : ctl__bpe_heap(tk, sym, m);
    if (m < 0) o->oom = true;
    for (int64_t i = 0; i < m; i++) ctl__ids_put(o, sym[i]);
    if (sym != local) ctl_free(tk->ctx, sym);
}

// The GPT-2 pre-tokenizer over s[0, n):
//   's|'t|'re|'ve|'m|'ll|'d | ?\p{L}+ | ?\p{N}+ | ?[^\s\p{L}\p{N}]+ | \s+(?!\S) | \s+
// A hand-written matcher for that regex, like llama.cpp's unicode_regex_split_custom_gpt2; the last \s+ is from
// Hugging Face's version. Each match is one piece for BPE, and every byte lands in exactly one piece.
static void ctl__gpt2_split(const ctl_tokenizer *tk, const unsigned char *s, size_t n, ctl__ids *o) {
    size_t i = 0, l;
    // i is where the next piece starts; each pass emits exactly one piece of at least one byte.
    while (i < n) {
        size_t start = i, j;
        if (s[i] == '\'' && i + 1 < n) {   // contractions
            // Lower case only: GPT-2's regex is case-sensitive (the Llama-3 family's is not).
            static const char *const c[] = {"re", "ve", "ll", "s", "t", "m", "d"};
            size_t k;
            for (k = 0; k < 7; k++) {
                size_t cl = strlen(c[k]);
                if (i + 1 + cl <= n && !memcmp(s + i + 1, c[k], cl)) break;
            }
            // A contraction is a piece by itself.
            if (k < 7) {
                i += 1 + strlen(c[k]);
                ctl__bpe(tk, s + start, i - start, o);
                continue;
            }
        }
        j = i + (s[i] == ' ' && i + 1 < n);   // the optional leading space
        uint32_t cp = ctl__utf8_at(s, n, j, &l);
        int cls = ctl__class(tk, cp);
        // A space followed by whitespace starts no word: it belongs to the whitespace run.
        if (j > i && cls < 0) j = i, cp = ctl__utf8_at(s, n, j, &l), cls = -1;   // "  ": no space prefix
        // The alternatives ' ?\p{L}+', ' ?\p{N}+' and ' ?[^\s\p{L}\p{N}]+' are one rule over three classes: from j, the run of
        // j's class.
        if (cls >= 0) {   // letters, numbers, or other: a run of the same class
            i = j;
            while (i < n) {
                uint32_t c2 = ctl__utf8_at(s, n, i, &l);
                int k2 = ctl__class(tk, c2);
                if (k2 != cls) break;
                i += l;
            }
        // \s+(?!\S): a run followed by more text leaves its last character to lead the next piece (" word"); a run of one
        // is taken whole (the final \s+).
        } else {   // whitespace: the run, less its last character if something follows
            size_t last = i;
            while (i < n) {
                uint32_t c2 = ctl__utf8_at(s, n, i, &l);
                if (ctl__class(tk, c2) != -1) break;
                last = i, i += l;
            }
            if (i < n && last > start) i = last;
        }
        ctl__bpe(tk, s + start, i - start, o);
    }
}

// The class of the code point at s[i] for the splitters: -2 past the end, -1 whitespace,
// 0 other, 1 letter, 2 number; *len its length in bytes.
static int ctl__class_at(const ctl_tokenizer *tk, const unsigned char *s, size_t n, size_t i, size_t *len) {
    if (i >= n) return *len = 0, -2;
    return ctl__class(tk, ctl__utf8_at(s, n, i, len));
}

// The Llama-3 pre-tokenizer (max_digits 3) and Qwen2's (max_digits 1) over s[0, n):
//   (?i:'s|'t|'re|'ve|'m|'ll|'d) | [^\r\n\p{L}\p{N}]?\p{L}+ | \p{N}{1,max_digits} |
//    ?[^\s\p{L}\p{N}]+[\r\n]* | \s*[\r\n]+ | \s+(?!\S) | \s+
// tried in that order at each position, as llama.cpp's hand-written matcher does.
// Each branch below is one alternative, in the regex's order; the tests before a branch are the conditions under which
// that alternative is the first to match at i.
static void ctl__llama3_split(const ctl_tokenizer *tk, const unsigned char *s, size_t n, int max_digits, ctl__ids *o) {
    size_t i = 0, l, l2;
    while (i < n) {
        size_t start = i;
        int cls = ctl__class_at(tk, s, n, i, &l);
        unsigned char c = s[i];
        if (c == '\'' && i + 1 < n) {   // contractions, either case
            // | 0x20 lower-cases an ASCII letter; no other byte becomes one of the letters tested.
            int a = s[i + 1] | 0x20, b = i + 2 < n ? s[i + 2] | 0x20 : 0;
            size_t cl = (a == 's' || a == 't' || a == 'm' || a == 'd') ? 2
                      : ((a == 'r' && b == 'e') || (a == 'v' && b == 'e') || (a == 'l' && b == 'l')) ? 3 : 0;
            if (cl) {
                ctl__bpe(tk, s + i, cl, o);
                i += cl;
                continue;
            }
        }
        // [^\r\n\p{L}\p{N}]?\p{L}+: a letter here, or any other non-newline, non-number character followed by a letter.
        if (c != '\r' && c != '\n' && cls != 2 && (cls == 1 || ctl__class_at(tk, s, n, i + l, &l2) == 1)) {
            for (i += l; ctl__class_at(tk, s, n, i, &l2) == 1; i += l2) {}   // an optional lead, then letters
        // \p{N}{1,max_digits}: digits in groups of at most max_digits.
        } else if (cls == 2) {
            for (int d = 0; d < max_digits && ctl__class_at(tk, s, n, i, &l2) == 2; d++) i += l2;
        // '?[^\s\p{L}\p{N}]+[\r\n]*' after an optional space: punctuation and symbols, and the newlines after them.
        } else if ((c == ' ' ? ctl__class_at(tk, s, n, i + 1, &l2) : cls) == 0) {
            for (i += c == ' '; ctl__class_at(tk, s, n, i, &l2) == 0; i += l2) {}   // punctuation and symbols
            while (i < n && (s[i] == '\r' || s[i] == '\n')) i++;
        } else {   // whitespace: nothing else gets this far
            size_t end = i, last = i, after_nl = 0;
            while (ctl__class_at(tk, s, n, end, &l2) == -1) {
                last = end, end += l2;
                if (s[last] == '\r' || s[last] == '\n') after_nl = end;
            }
            if (after_nl) i = after_nl;                         // \s*[\r\n]+
            else if (end > i + l && end < n) i = last;          // \s+(?!\S): all but the last one
            else i = end;                                       // \s+
        }
        ctl__bpe(tk, s + start, i - start, o);
    }
}

// A fragment without special tokens. SmolLM first makes every digit its own piece, then
// splits the rest as GPT-2 does.
// That is Hugging Face's Digits(individual_digits=true) followed by the GPT-2 regex (gguf.md 4.2): " 123" gives " ",
// "1", "2" and "3".
static void ctl__pretokenize(const ctl_tokenizer *tk, const unsigned char *s, size_t n, ctl__ids *o) {
    // The same matcher serves Llama-3 and Qwen2; their regexes differ only in how many digits make one piece.
    if (tk->pre == CTL__PRE_LLAMA3 || tk->pre == CTL__PRE_QWEN2) {
        ctl__llama3_split(tk, s, n, tk->pre == CTL__PRE_LLAMA3 ? 3 : 1, o);
        return;
    }
    // "gpt-2", "default" and an absent key.
    if (tk->pre == CTL__PRE_GPT2) {
        ctl__gpt2_split(tk, s, n, o);
        return;
    }
    // SmolLM: every digit is a piece by itself, and the text between digits goes to the GPT-2 split.
    size_t i = 0, from = 0, l;
    while (i < n) {
        uint32_t cp = ctl__utf8_at(s, n, i, &l);
        if (ctl__class(tk, cp) == 2) {
            if (i > from) ctl__gpt2_split(tk, s + from, i - from, o);
            ctl__gpt2_split(tk, s + i, l, o);
            from = i + l;
        }
        i += l;
    }
    if (n > from) ctl__gpt2_split(tk, s + from, n - from, o);
}

// Special tokens first (gguf.md 4.3): at each byte, the special texts that start with it are tried longest first. A hit
// ends the current fragment, which is pre-tokenized and merged, and emits the special token's id. User-defined tokens
// (4) always match; control tokens (3) only with parse_special, so user text that spells "<|im_end|>" stays text
// unless asked. Unknown-type tokens (2), which llama.cpp also cuts out, are left to BPE here.
// BOS is not added here: callers check ctl_tokenizer_add_bos. With ids NULL, or cap too small, *n is still the count
// the whole text needs, so a caller may measure first.
CTL_API ctl_status ctl_tokenize(const ctl_tokenizer *tk, const char *text, size_t len, bool parse_special,
                                int32_t *ids, int64_t cap, int64_t *n) {
    if (!CTL__ARGS(tk ? tk->ctx : NULL, tk && (text || len == 0) && n)) return CTL_ERR_INVALID;
    ctl__ids o;
    // With ids NULL nothing is stored and o.n only counts.
    o.ids = ids, o.n = 0, o.cap = ids ? cap : 0, o.oom = false;
    const unsigned char *s = (const unsigned char *)text;
    size_t from = 0;
    for (size_t i = 0; i < len;) {
        int32_t hit = -1;
        // Only the specials whose text starts with s[i], longest first; sl <= len - i is tested before memcmp reads.
        for (int64_t k = tk->special_from[s[i]]; k < tk->special_from[s[i] + 1]; k++) {
            int32_t id = tk->special[k];
            size_t sl = (size_t)(tk->off[id + 1] - tk->off[id]);
            if ((parse_special || tk->type[id] == 4) && sl <= len - i && !memcmp(s + i, tk->pool + tk->off[id], sl)) {
                hit = id;
                break;
            }
        }
        // No special text starts here: the byte stays in the current fragment.
        if (hit < 0) {
            i++;
            continue;
        }
        // The text between the previous special token and this one.
        if (i > from) ctl__pretokenize(tk, s + from, i - from, &o);
        // The special token itself: never merged with its neighbours.
        ctl__ids_put(&o, hit);
        i += (size_t)(tk->off[hit + 1] - tk->off[hit]);
        from = i;
    }
    // The fragment after the last special token (or the whole text).
    if (len > from) ctl__pretokenize(tk, s + from, len - from, &o);
    *n = o.n;
    // Out of memory comes first: with a piece dropped, the count is not the true one.
    if (o.oom) return ctl__fail(tk->ctx, CTL_ERR_OUT_OF_MEMORY, "tokenize: out of memory (a piece of the %zu bytes)", len);
    if (ids && o.n > cap)
        return ctl__fail(tk->ctx, CTL_ERR_CAPACITY, "tokenize: %" PRId64 " tokens do not fit in %" PRId64, o.n, cap);
    return CTL_OK;
}

// The inverse map: a normal token's characters back to bytes through cp_byte; control and user-defined tokens copied
// raw, since their text is not in the byte alphabet. Control tokens are printed, which llama.cpp does only on request.
// *len counts every byte even past cap (out gets the first cap), and out is NUL-terminated when there is room.
// A code point outside the byte-level alphabet (324 and above, or a raw space, control or soft hyphen in a hand-made
// vocabulary) is copied as its UTF-8 bytes: the references have no byte for it either.
CTL_API ctl_status ctl_detokenize(const ctl_tokenizer *tk, const int32_t *ids, int64_t n, char *out, size_t cap,
                                  size_t *len) {
    if (!CTL__ARGS(tk ? tk->ctx : NULL, tk && (ids || n == 0) && n >= 0 && (out || cap == 0) && len)) return CTL_ERR_INVALID;
    size_t w = 0;
    for (int64_t k = 0; k < n; k++) {
        if (ids[k] < 0 || ids[k] >= tk->V)   // ids come from callers and samplers: checked before indexing
            return ctl__fail(tk->ctx, CTL_ERR_RANGE, "detokenize: id %d (number %" PRId64 ") is outside the vocabulary", ids[k], k);
        const unsigned char *t = (const unsigned char *)tk->pool + tk->off[ids[k]];
        size_t tl = (size_t)(tk->off[ids[k] + 1] - tk->off[ids[k]]), l;
        bool raw = tk->type[ids[k]] == 3 || tk->type[ids[k]] == 4;
        // A raw token byte by byte; any other one code point at a time.
        for (size_t i = 0; i < tl; i += raw ? 1 : l) {
            uint32_t cp = raw ? 0 : ctl__utf8_at(t, tl, i, &l);
            bool alphabet = cp >= 256 ? cp < 324 : ctl__byte_stands_for_itself(cp);
            if (raw || !alphabet) {   // not a byte-level character: copy its bytes as they are
                size_t m = raw ? 1 : l;
                for (size_t q = 0; q < m; q++, w++)
                    if (w < cap) out[w] = (char)t[i + q];
            } else {
                if (w < cap) out[w] = (char)tk->cp_byte[cp];
                w++;
            }
        }
    }
    if (w < cap) out[w] = 0;
    *len = w;
    return CTL_OK;
}

// ---- chat templates --------------------------------------------------------------------------

// Recognises tokenizer.chat_template by its markers instead of running its Jinja: "<|start_header_id|>" means Llama-3,
// "<|im_start|>" ChatML, and anything else is refused. What the Jinja would compute beyond the fixed layout (tools,
// dates, other conditionals) is not reproduced; only ChatML's default system prompt is taken from the text.
CTL_API ctl_status ctl_chat_template_from_gguf(ctl_ctx *ctx, const ctl_gguf *g, ctl_chat_template *out) {
    if (!CTL__ARGS(ctx, ctx && g && out)) return CTL_ERR_INVALID;
    const char *s;
    size_t len;
    ctl_status st = ctl_gguf_get_str(g, "tokenizer.chat_template", &s, &len);
    memset(out, 0, sizeof *out);
    if (st) return st;
    char *t = (char *)ctl_alloc(ctx, len + 1);   // NUL-terminated, for strstr
    if (!t) return ctl__fail(ctx, CTL_ERR_OUT_OF_MEMORY, "chat template: out of memory");
    memcpy(t, s, len);
    t[len] = 0;
    if (strstr(t, "<|start_header_id|>")) {
        out->format = CTL_CHAT_LLAMA3;
        int64_t bos;
        const ctl_gguf_kv *toks = ctl_gguf_find_kv(g, "tokenizer.ggml.tokens");
        // The BOS text is rendered only when the template prints bos_token, and kept only when it fits out->bos; the id is
        // range-checked by ctl_gguf_arr_str.
        if (strstr(t, "bos_token") && toks && !ctl_gguf_get_int(g, "tokenizer.ggml.bos_token_id", &bos) &&
            !ctl_gguf_arr_str(g, toks, (uint64_t)bos, &s, &len) && len < sizeof out->bos)
            memcpy(out->bos, s, len);
    } else if (strstr(t, "<|im_start|>")) {
        out->format = CTL_CHAT_CHATML;
        // SmolLM2 style: "... != 'system' %}{{ '<|im_start|>system\nDEFAULT<|im_end|>..."
        // The default prompt is the text between that marker and the next <|im_end|>, cut to fit default_system.
        const char *cond = strstr(t, "!= 'system'"), *from = cond ? strstr(cond, "<|im_start|>system\n") : NULL;
        const char *to = from ? strstr(from, "<|im_end|>") : NULL;
        if (to) {
            from += strlen("<|im_start|>system\n");
            size_t n = CTL__MIN((size_t)(to - from), sizeof out->default_system - 1);
            memcpy(out->default_system, from, n);
        }
    } else {
        ctl_free(ctx, t);
        return ctl__fail(ctx, CTL_ERR_UNSUPPORTED, "chat template: neither ChatML nor Llama-3 (cotlab recognises those two)");
    }
    ctl_free(ctx, t);
    return CTL_OK;
}

// Appends s[0, n) at *w, writing only below cap but always advancing *w, so a pass with cap 0 measures.
static void ctl__cat(char *out, size_t cap, size_t *w, const char *s, size_t n) {
    for (size_t i = 0; i < n; i++, (*w)++)
        if (*w < cap) out[*w] = s[i];
}

// Renders into out (cap bytes); spans (2 per message, may be NULL) get each assistant turn's
// byte range, content through end-of-turn token ([0, 0) for other roles).
// The span includes the end-of-turn token so that a trained model learns to stop; the newline after ChatML's
// <|im_end|> falls outside it. Returns the rendered length, which may exceed cap.
static size_t ctl__chat_render(const ctl_chat_template *t, const ctl_chat_msg *msgs, int64_t n,
                               bool add_generation_prompt, char *out, size_t cap, size_t *spans) {
    size_t w = 0;
#define CTL__CAT(str) ctl__cat(out, cap, &w, (str), strlen(str))
    // CTL__CAT is local to this function: each string goes through ctl__cat's capacity rule.
    if (t->format == CTL_CHAT_CHATML) {
        // ChatML: "<|im_start|>role\n" content "<|im_end|>\n" per message, after the template's default system prompt when the
        // conversation does not open with its own.
        if (t->default_system[0] && (n == 0 || strcmp(msgs[0].role, "system"))) {
            CTL__CAT("<|im_start|>system\n"), CTL__CAT(t->default_system), CTL__CAT("<|im_end|>\n");
        }
        for (int64_t i = 0; i < n; i++) {
            CTL__CAT("<|im_start|>"), CTL__CAT(msgs[i].role), CTL__CAT("\n");
            size_t from = w;
            CTL__CAT(msgs[i].content), CTL__CAT("<|im_end|>");
            if (spans) spans[2 * i] = from, spans[2 * i + 1] = strcmp(msgs[i].role, "assistant") ? from : w;
            CTL__CAT("\n");
        }
        // The generation prompt opens an assistant turn for the model to complete.
        if (add_generation_prompt) CTL__CAT("<|im_start|>assistant\n");
    } else {   // Llama-3: BOS, then a header per message; the content is trimmed of spaces
        CTL__CAT(t->bos);
        for (int64_t i = 0; i < n; i++) {
            const char *c = msgs[i].content, *e = c + strlen(c);
            // The template's "| trim", for the four ASCII whitespace bytes only.
            while (c < e && (*c == ' ' || *c == '\n' || *c == '\t' || *c == '\r')) c++;
            while (e > c && (e[-1] == ' ' || e[-1] == '\n' || e[-1] == '\t' || e[-1] == '\r')) e--;
            // Per message: "<|start_header_id|>role<|end_header_id|>\n\n", the trimmed content, "<|eot_id|>".
            CTL__CAT("<|start_header_id|>"), CTL__CAT(msgs[i].role), CTL__CAT("<|end_header_id|>\n\n");
            size_t from = w;
            ctl__cat(out, cap, &w, c, (size_t)(e - c));
            CTL__CAT("<|eot_id|>");
            if (spans) spans[2 * i] = from, spans[2 * i + 1] = strcmp(msgs[i].role, "assistant") ? from : w;
        }
        if (add_generation_prompt) CTL__CAT("<|start_header_id|>assistant<|end_header_id|>\n\n");
    }
#undef CTL__CAT
    if (w < cap) out[w] = 0;
    return w;
}

// The rendered text; with cap too small, *len is still the whole length (measure with cap 0, then render).
CTL_API ctl_status ctl_chat_apply(const ctl_chat_template *t, const ctl_chat_msg *msgs, int64_t n,
                                  bool add_generation_prompt, char *out, size_t cap, size_t *len) {
    if (!CTL__ARGS(NULL, t && (msgs || n == 0) && n >= 0 && (out || cap == 0) && len)) return CTL_ERR_INVALID;
    *len = ctl__chat_render(t, msgs, n, add_generation_prompt, out, cap, NULL);
    return CTL_OK;
}

// Renders twice (measure, then write), tokenizes with parse_special so the layout's markers become their control
// tokens, and sets mask[i] = 1 for the tokens that start inside an assistant span. Limits, stated: text inside a
// message that spells a control token becomes that token too (as Hugging Face tokenizers do by default); a token is
// assigned by the byte it starts at, so where an assistant content begins with whitespace that joins the token
// before it, those bytes go unmasked. The mask costs one detokenize and one pass over the messages per token.
CTL_API ctl_status ctl_chat_tokenize(const ctl_tokenizer *tk, const ctl_chat_template *t, const ctl_chat_msg *msgs,
                                     int64_t n, bool add_generation_prompt, int32_t *ids, float *mask, int64_t cap,
                                     int64_t *n_ids) {
    if (!CTL__ARGS(tk ? tk->ctx : NULL, tk && t && (msgs || n == 0) && n >= 0 && ids && n_ids)) return CTL_ERR_INVALID;
    ctl_ctx *ctx = tk->ctx;
    size_t len = ctl__chat_render(t, msgs, n, add_generation_prompt, NULL, 0, NULL);
    char *text = (char *)ctl_alloc(ctx, len + 1);
    // spans holds 2 entries per message (+1 so that n = 0 still allocates).
    size_t *spans = (size_t *)ctl_alloc(ctx, (size_t)(2 * n + 1) * sizeof(size_t));
    ctl_status st = text && spans ? CTL_OK : ctl__fail(ctx, CTL_ERR_OUT_OF_MEMORY, "chat_tokenize: out of memory");
    if (!st) ctl__chat_render(t, msgs, n, add_generation_prompt, text, len + 1, spans);
    // When cap is too small this fails with CTL_ERR_CAPACITY, *n_ids still the count needed, and no mask is made.
    if (!st) st = ctl_tokenize(tk, text, len, true, ids, cap, n_ids);
    size_t pos = 0;   // byte offset of token i: the lengths of the tokens before it
    // The tokens' byte lengths add up to the rendered text's, so pos walks the text alongside the ids.
    for (int64_t i = 0; !st && mask && i < *n_ids; i++) {
        mask[i] = 0.0f;
        for (int64_t k = 0; k < n; k++)
            if (pos >= spans[2 * k] && pos < spans[2 * k + 1]) mask[i] = 1.0f;
        size_t tl;
        ctl_detokenize(tk, ids + i, 1, NULL, 0, &tl);
        pos += tl;
    }
    ctl_free(ctx, text), ctl_free(ctx, spans);
    return st;
}


// >>impl:model ==================================================================================

// Parameter indices of one transformer block; -1 where the architecture has none. Parts of a
// fused layer (q|k|v, gate|up) are separate tensors laid out back to back, so one matmul over
// the first part's pointer covers them all.
typedef struct ctl__block {
    // norm1 comes before attention and norm2 before the MLP; the biases (*_b) exist on gpt2 only.
    // n_qkv is 1 for a fused attn_qkv, else 3 (q, k, v); n_up is 1 for gpt2's ffn_up, 2 for
    // llama's gate and up, whose gate comes first.
    int64_t norm1_w, norm1_b, norm2_w, norm2_b, o_w, o_b, down_w, down_b;
    int64_t qkv_w[3], qkv_b[3], up_w[2], up_b[2];
    int n_qkv, n_up;
} ctl__block;

// What adapts one base weight (indices into the parameter table; -1 where absent). A LoRA's
// lora_a is (rank, in) and lora_b (out, rank), except on the token embedding, where lora_a is
// (V, rank) so a token picks a row (llama.cpp's layout). A sparse delta keeps its entries'
// flat indices row * in + col in ascending order.
typedef struct ctl__adapter {
    // base: the adapted weight; dora_m: DoRA's magnitude vector (out); sparse: the delta's values.
    // scale multiplies B A: alpha / rank, or alpha / sqrt(rank) with rsLoRA.
    int64_t base, lora_a, lora_b, dora_m, sparse;
    int64_t rank, n_sparse;
    float scale, dropout;
    // Owned by the record (the parameter `sparse` holds the values, in the same order).
    int64_t *sparse_idx;
    int32_t *sparse_row, *sparse_col;   // the same entries as (row, col)
    float *dora_n;                      // while merged: DoRA's row norms, for unmerging
} ctl__adapter;

struct ctl_model {
    ctl_ctx *ctx;
    ctl_model_config cfg;
    // params[0, n_base) are the base weights, placed in `data` in ctl__build's order; from n_base on
    // come the adapter parameters, each attach's in its own blocks_extra allocation. params grows by
    // copying, so keep indices, not ctl_param pointers, across an attach.
    unsigned char *data;   // the base weights, one block (fp32 or quantised tensors)
    size_t bytes;
    int64_t numel, n_params, n_base, cap_params;   // n_base: parameters before any adapter
    ctl_param *params;
    ctl__block *blocks;
    int64_t tok_embd, pos_embd, out_norm_w, out_norm_b, output;   // output == tok_embd if tied
    // Adapters: adapter_of[i] (i < n_base) is the index of base parameter i's adapter or -1.
    ctl__adapter *adapters;
    int64_t n_adapters, cap_adapters, *adapter_of;
    void **blocks_extra;          // one allocation per attach, for the adapters' values
    int64_t n_extra, cap_extra;
    ctl_lora_desc lora;           // as attached (rank 0: none)
    float **scores;               // ctl_sparse_calibrate: per base parameter, or NULL
    bool adapters_on, merged;
    // A trainer refuses to run once `structure` moved past the value it was built with; a backend
    // copy of the weights (ctl__exec_upload) and DoRA's cached norms are refreshed when `version`
    // moved.
    uint64_t structure, version;  // bumped when adapters change / when any weight changes
};

// Fills the config's zero fields with their defaults and refuses what no model can be built from.
// Every later size computation trusts the result, so the bounds below are checked here, once.
CTL_API ctl_status ctl_model_config_resolve(ctl_ctx *ctx, const ctl_model_config *in,
                                            ctl_model_config *out) {
    if (!CTL__ARGS(ctx, ctx && in && out)) return CTL_ERR_INVALID;
    ctl_model_config c = *in;
    const char *who = "model config";
    if (c.arch != CTL_ARCH_GPT2 && c.arch != CTL_ARCH_LLAMA)
        return ctl__fail(ctx, CTL_ERR_INVALID, "%s: unknown arch %d", who, (int)c.arch);
    if (c.vocab_size <= 0 || c.vocab_size > INT32_MAX)
        return ctl__fail(ctx, CTL_ERR_INVALID, "%s: vocab_size %" PRId64 " must be in [1, 2^31)", who, c.vocab_size);
    if (c.n_ctx <= 0 || c.n_embd <= 0 || c.n_layer <= 0 || c.n_head <= 0)
        return ctl__fail(ctx, CTL_ERR_INVALID, "%s: n_ctx %" PRId64 ", n_embd %" PRId64 ", n_layer %" PRId64
                         " and n_head %" PRId64 " must all be positive", who, c.n_ctx, c.n_embd, c.n_layer, c.n_head);
    // Grouped-query attention: each group of n_head / n_kv_head query heads shares one K and V head.
    if (c.n_kv_head == 0) c.n_kv_head = c.n_head;
    if (c.n_kv_head < 0 || c.n_head % c.n_kv_head)
        return ctl__fail(ctx, CTL_ERR_INVALID, "%s: n_kv_head %" PRId64 " must divide n_head %" PRId64, who, c.n_kv_head, c.n_head);
    if (c.head_dim == 0) {
        if (c.n_embd % c.n_head)
            return ctl__fail(ctx, CTL_ERR_INVALID, "%s: n_head %" PRId64 " does not divide n_embd %" PRId64
                             " (set head_dim)", who, c.n_head, c.n_embd);
        c.head_dim = c.n_embd / c.n_head;
    }
    // RoPE rotates pairs of dimensions, so a llama head needs an even size; the cap is the size of
    // the attention kernels' per-head accumulators, which live on the stack.
    if (c.head_dim <= 0 || c.head_dim > CTL__MAX_HEAD_DIM || (c.arch == CTL_ARCH_LLAMA && c.head_dim % 2))
        return ctl__fail(ctx, CTL_ERR_INVALID, "%s: head_dim %" PRId64 " must be in [1, %d] (and even with RoPE)",
                         who, c.head_dim, CTL__MAX_HEAD_DIM);
    // GPT-2's MLP is 4C wide. A SwiGLU MLP has three matrices, so LLaMA's 8C/3 keeps the parameter
    // count of a 4C two-matrix MLP (3 * 8C/3 = 2 * 4); rounded up to a multiple of 32.
    if (c.n_ff == 0) c.n_ff = c.arch == CTL_ARCH_GPT2 ? 4 * c.n_embd : (8 * c.n_embd / 3 + 31) / 32 * 32;
    if (c.n_ff < 0) return ctl__fail(ctx, CTL_ERR_INVALID, "%s: n_ff %" PRId64 " is negative", who, c.n_ff);
    // Bounds that keep every size computed from these (products of a few of them, counts of
    // weights, bytes of caches) far from int64's range; no real model comes near them.
    const int64_t big = (int64_t)1 << 24;
    // The weight count in double: the int64 product could itself overflow before the check.
    double weights = (double)c.n_layer * ((double)c.n_embd * (double)(c.n_head + 2 * c.n_kv_head) * (double)c.head_dim +
                                          3.0 * (double)c.n_embd * (double)c.n_ff) + 2.0 * (double)c.vocab_size * (double)c.n_embd;
    if (c.n_ctx > big || c.n_embd > big || c.n_head > big || c.n_ff > big || c.n_layer > 65536 || weights > 1099511627776.0)
        return ctl__fail(ctx, CTL_ERR_RANGE, "%s: n_ctx %" PRId64 ", n_embd %" PRId64 ", n_head %" PRId64 ", n_ff %" PRId64 " (each at most 2^24), "
                         "n_layer %" PRId64 " (at most 65536) or %.3g weights (at most 2^40) out of range", who, c.n_ctx, c.n_embd,
                         c.n_head, c.n_ff, c.n_layer, weights);
    if (c.norm_eps == 0.0f) c.norm_eps = 1e-5f;
    if (c.rope_theta == 0.0f) c.rope_theta = 10000.0f;
    if (!(c.norm_eps > 0.0f) || !(c.rope_theta > 0.0f))
        return ctl__fail(ctx, CTL_ERR_INVALID, "%s: norm_eps %g and rope_theta %g must be positive", who,
                         (double)c.norm_eps, (double)c.rope_theta);
    if (c.arch == CTL_ARCH_GPT2) {
        // GPT-2 always reads its logits through the token embedding (wte), so the head is that tensor.
        c.tied_embeddings = true;
        if (c.n_kv_head != c.n_head)
            return ctl__fail(ctx, CTL_ERR_INVALID, "%s: gpt2 has no grouped-query attention (n_kv_head %" PRId64
                             " != n_head %" PRId64 ")", who, c.n_kv_head, c.n_head);
    } else {
        // Llama files store q, k and v apart, and GQA makes their row counts differ.
        c.separate_qkv = true;
    }
    *out = c;
    return CTL_OK;
}

// Builds the parameter table in two passes: with params == NULL it only counts. Tensors are
// stored as types[i] (NULL: all fp32), each starting 4-byte aligned, except that the parts of
// a fused layer (q|k|v, gate|up) follow each other directly, so one product covers them all.
typedef struct ctl__builder {
    ctl_param *params;
    const ctl_dtype *types;
    unsigned char *data;   // NULL: tensors get no data pointer (planning)
    int64_t n, numel;
    size_t bytes;
    bool overflow;         // a size past int64/size_t: the config cannot be built
} ctl__builder;

// Appends tensor (d0, d1) (d1 == 0: a vector of d0) and returns its index. A fused part gets no
// alignment padding, so it starts where the previous part ended and one product spans them.
static int64_t ctl__add_part(ctl__builder *bd, const char *name, int64_t layer, int64_t d0, int64_t d1, bool fused_part) {
    int64_t idx = bd->n++;
    ctl_dtype type = bd->types ? bd->types[idx] : CTL_F32;
    if (!fused_part) bd->bytes = (bd->bytes + 3) & ~(size_t)3;
    if (bd->params) {
        ctl_param *p = &bd->params[idx];
        int64_t shape[2] = {d0, d1};
        memset(p, 0, sizeof *p);
        if (layer >= 0) snprintf(p->name, sizeof p->name, "blk.%" PRId64 ".%s", layer, name);
        else snprintf(p->name, sizeof p->name, "%s", name);
        p->value = ctl_tensor_f32(bd->data ? (float *)(void *)(bd->data + bd->bytes) : NULL, d1 ? 2 : 1, shape);
        p->value.dtype = type;
        // Quantised and bf16 weights have no fp32 master copy to update: they are frozen. Matrices
        // decay, vectors (norms, biases) do not: nanoGPT's convention.
        p->trainable = type == CTL_F32;
        p->decay = d1 != 0;
    }
    int64_t n = d1 ? d1 : 1;
    if (d0 < 0 || n < 0 || (n && d0 > INT64_MAX / 8 / n) || bd->numel > INT64_MAX / 8 - d0 * n ||
        bd->bytes > SIZE_MAX / 2 - ctl_dtype_bytes(type, d0 * n)) {
        bd->overflow = true;   // sizes stay within int64 / 8 so that every product of them fits
        return idx;
    }
    bd->numel += d0 * n;
    bd->bytes += ctl_dtype_bytes(type, d0 * n);
    return idx;
}

static int64_t ctl__add(ctl__builder *bd, const char *name, int64_t layer, int64_t d0, int64_t d1) {
    return ctl__add_part(bd, name, layer, d0, d1, false);
}

// Lays out every parameter of config c in the order of GGUF's tensor names (the order the
// forward reads them), filling blocks (NULL while counting) and ids = {token embedding,
// position embedding, output norm weight, its bias, output weight}, -1 where absent.
static void ctl__build(const ctl_model_config *c, ctl__builder *bd, ctl__block *blocks,
                       int64_t ids[5]) {
    bool gpt2 = c->arch == CTL_ARCH_GPT2;
    int64_t C = c->n_embd, HS = c->head_dim, q = c->n_head * HS, kv = c->n_kv_head * HS, FF = c->n_ff;
    ctl__block blk;
    ids[0] = ctl__add(bd, "token_embd.weight", -1, c->vocab_size, C);
    ids[1] = gpt2 ? ctl__add(bd, "position_embd.weight", -1, c->n_ctx, C) : -1;
    for (int64_t l = 0; l < c->n_layer; l++) {
        // (All bytes 0xff is -1 in two's complement; n_qkv and n_up are set below.)
        memset(&blk, 0xff, sizeof blk);   // every index -1
        blk.norm1_w = ctl__add(bd, "attn_norm.weight", l, C, 0);
        if (gpt2) blk.norm1_b = ctl__add(bd, "attn_norm.bias", l, C, 0);
        if (c->separate_qkv) {
            blk.n_qkv = 3;
            blk.qkv_w[0] = ctl__add(bd, "attn_q.weight", l, q, C);
            blk.qkv_w[1] = ctl__add_part(bd, "attn_k.weight", l, kv, C, true);
            blk.qkv_w[2] = ctl__add_part(bd, "attn_v.weight", l, kv, C, true);
            if (gpt2) {
                blk.qkv_b[0] = ctl__add(bd, "attn_q.bias", l, q, 0);
                blk.qkv_b[1] = ctl__add_part(bd, "attn_k.bias", l, kv, 0, true);
                blk.qkv_b[2] = ctl__add_part(bd, "attn_v.bias", l, kv, 0, true);
            }
        } else {
            blk.n_qkv = 1;
            blk.qkv_w[0] = ctl__add(bd, "attn_qkv.weight", l, q + 2 * kv, C);
            blk.qkv_b[0] = ctl__add(bd, "attn_qkv.bias", l, q + 2 * kv, 0);
        }
        blk.o_w = ctl__add(bd, "attn_output.weight", l, C, q);
        if (gpt2) blk.o_b = ctl__add(bd, "attn_output.bias", l, C, 0);
        blk.norm2_w = ctl__add(bd, "ffn_norm.weight", l, C, 0);
        if (gpt2) {
            blk.norm2_b = ctl__add(bd, "ffn_norm.bias", l, C, 0);
            blk.n_up = 1;
            blk.up_w[0] = ctl__add(bd, "ffn_up.weight", l, FF, C);
            blk.up_b[0] = ctl__add(bd, "ffn_up.bias", l, FF, 0);
        } else {
            blk.n_up = 2;
            blk.up_w[0] = ctl__add(bd, "ffn_gate.weight", l, FF, C);
            blk.up_w[1] = ctl__add_part(bd, "ffn_up.weight", l, FF, C, true);
        }
        blk.down_w = ctl__add(bd, "ffn_down.weight", l, C, FF);
        if (gpt2) blk.down_b = ctl__add(bd, "ffn_down.bias", l, C, 0);
        if (blocks) blocks[l] = blk;
    }
    ids[2] = ctl__add(bd, "output_norm.weight", -1, C, 0);
    ids[3] = gpt2 ? ctl__add(bd, "output_norm.bias", -1, C, 0) : -1;
    // Tied: the head is the token embedding, so both roles share one index and one gradient.
    ids[4] = c->tied_embeddings ? ids[0] : ctl__add(bd, "output.weight", -1, c->vocab_size, C);
}

// Frees the adapters' own arrays, their value blocks, the calibration scores, then the model.
CTL_API void ctl_model_free(ctl_model *m) {
    if (!m) return;
    ctl_ctx *ctx = m->ctx;
    for (int64_t i = 0; i < m->n_adapters; i++)
        ctl_free(ctx, m->adapters[i].sparse_idx), ctl_free(ctx, m->adapters[i].sparse_row), ctl_free(ctx, m->adapters[i].sparse_col),
            ctl_free(ctx, m->adapters[i].dora_n);
    for (int64_t i = 0; i < m->n_extra; i++) ctl_free(ctx, m->blocks_extra[i]);
    for (int64_t i = 0; m->scores && i < m->n_base; i++) ctl_free(ctx, m->scores[i]);
    ctl_free(ctx, m->scores);
    ctl_free(ctx, m->adapters), ctl_free(ctx, m->adapter_of), ctl_free(ctx, m->blocks_extra);
    ctl_free(ctx, m->data);
    ctl_free(ctx, m->params);
    ctl_free(ctx, m->blocks);
    ctl_free(ctx, m);
}

// A model with zeroed weights stored as types[i] (NULL: all fp32); the config is resolved.
static ctl_status ctl__model_new(ctl_ctx *ctx, const ctl_model_config *c, const ctl_dtype *types, ctl_model **out) {
    ctl__builder bd;
    int64_t ids[5];
    *out = NULL;
    memset(&bd, 0, sizeof bd);
    bd.types = types;
    // Two passes: the first only counts and sizes, so the weights are one allocation of known size
    // and any overflow is found before anything is allocated.
    ctl__build(c, &bd, NULL, ids);   // count
    if (bd.overflow) return ctl__fail(ctx, CTL_ERR_INVALID, "model_create: the config's tensors are too large to address");
    ctl_model *m = (ctl_model *)ctl_alloc(ctx, sizeof(ctl_model));
    if (!m) return ctl__fail(ctx, CTL_ERR_OUT_OF_MEMORY, "model_create: out of memory");
    memset(m, 0, sizeof *m);
    m->ctx = ctx;
    m->cfg = *c;
    m->numel = bd.numel;
    m->bytes = bd.bytes;
    m->n_params = m->n_base = m->cap_params = bd.n;
    m->adapters_on = true;
    m->data = (unsigned char *)ctl_alloc(ctx, bd.bytes);
    m->params = (ctl_param *)ctl_alloc(ctx, (size_t)bd.n * sizeof(ctl_param));
    m->blocks = (ctl__block *)ctl_alloc(ctx, (size_t)c->n_layer * sizeof(ctl__block));
    m->adapter_of = (int64_t *)ctl_alloc(ctx, (size_t)bd.n * sizeof(int64_t));
    if (!m->data || !m->params || !m->blocks || !m->adapter_of) {
        ctl_model_free(m);
        return ctl__fail(ctx, CTL_ERR_OUT_OF_MEMORY, "model_create: cannot allocate %" PRId64 " weights (%.1f MB)",
                         bd.numel, (double)bd.bytes / 1e6);
    }
    memset(m->data, 0, bd.bytes);
    for (int64_t i = 0; i < bd.n; i++) m->adapter_of[i] = -1;
    // The second pass, with the same types, gives each parameter its place in `data`.
    bd.params = m->params, bd.data = m->data, bd.n = 0, bd.numel = 0, bd.bytes = 0;
    ctl__build(c, &bd, m->blocks, ids);
    m->tok_embd = ids[0], m->pos_embd = ids[1], m->out_norm_w = ids[2], m->out_norm_b = ids[3], m->output = ids[4];
    *out = m;
    return CTL_OK;
}

CTL_API ctl_status ctl_model_create(ctl_ctx *ctx, const ctl_model_config *cfg, ctl_model **out) {
    ctl_model_config c;
    if (out) *out = NULL;
    if (!CTL__ARGS(ctx, ctx && cfg && out)) return CTL_ERR_INVALID;
    ctl_status st = ctl_model_config_resolve(ctx, cfg, &c);
    return st ? st : ctl__model_new(ctx, &c, NULL, out);
}

static bool ctl__ends_with(const char *s, const char *suffix) {
    size_t n = strlen(s), k = strlen(suffix);
    return n >= k && !strcmp(s + n - k, suffix);
}

// GPT-2's initialisation, as nanoGPT writes it: N(0, 0.02) for matrices and embeddings, biases 0,
// norm weights 1, and the residual projections (attn_output, ffn_down) scaled down to
// 0.02 / sqrt(2 L) so the residual stream's variance does not grow with depth. One rng stream
// in parameter order: the same seed gives the same model at any thread count.
CTL_API void ctl_model_init_random(ctl_model *m, uint64_t seed) {
    if (!CTL__ARGS(NULL, m)) return;
    ctl_rng rng;
    ctl_rng_seed(&rng, seed);
    float proj_std = 0.02f / sqrtf(2.0f * (float)m->cfg.n_layer);
    for (int64_t i = 0; i < m->n_base; i++) {
        ctl_param *p = &m->params[i];
        float *x = (float *)p->value.data;
        int64_t n = ctl_tensor_numel(&p->value);
        if (p->value.dtype != CTL_F32) continue;   // quantised weights are what was loaded
        bool norm = strstr(p->name, "norm.") != NULL, bias = ctl__ends_with(p->name, ".bias");
        bool proj = strstr(p->name, "attn_output.weight") || strstr(p->name, "ffn_down.weight");
        float std = proj ? proj_std : 0.02f;
        for (int64_t j = 0; j < n; j++) x[j] = bias ? 0.0f : norm ? 1.0f : std * ctl_rng_normal(&rng);
    }
    m->version++;
}

CTL_API const ctl_model_config *ctl_model_cfg(const ctl_model *m) { return CTL__ARGS(NULL, m) ? &m->cfg : NULL; }
CTL_API ctl_ctx *ctl_model_ctx(const ctl_model *m) { return CTL__ARGS(NULL, m) ? m->ctx : NULL; }
CTL_API int64_t ctl_model_param_count(const ctl_model *m) { return CTL__ARGS(NULL, m) ? m->n_params : 0; }
CTL_API int64_t ctl_model_numel(const ctl_model *m) { return CTL__ARGS(NULL, m) ? m->numel : 0; }
// The base block plus each adapter parameter as ctl__add_params pads it (64-byte aligned).
CTL_API size_t ctl_model_bytes(const ctl_model *m) {
    if (!CTL__ARGS(NULL, m)) return 0;
    size_t n = m->bytes;
    for (int64_t i = m->n_base; i < m->n_params; i++) n += ctl__align64((size_t)ctl_tensor_numel(&m->params[i].value) * sizeof(float));
    return n;
}

CTL_API ctl_param *ctl_model_param(ctl_model *m, int64_t i) {
    return CTL__ARGS(NULL, m) && i >= 0 && i < m->n_params ? &m->params[i] : NULL;
}

// For callers that wrote weights through ctl_model_param: bumps the version so cached copies
// (a GPU's, DoRA's norms) are refreshed.
CTL_API void ctl_model_touch(ctl_model *m) {
    if (CTL__ARGS(NULL, m)) m->version++;
}

// A linear scan over the names: meant for setup code, not for a loop over parameters.
CTL_API ctl_param *ctl_model_find(ctl_model *m, const char *name) {
    if (!CTL__ARGS(m ? m->ctx : NULL, m && name)) return NULL;
    for (int64_t i = 0; i < m->n_params; i++)
        if (!strcmp(m->params[i].name, name)) return &m->params[i];
    return NULL;
}

// ---- models in safetensors (Hugging Face naming) ---------------------------------------------

// How parameter i travels to a file: its GGUF name and row count, or false to skip it. gpt2's
// separate q, k, v (back to back in memory) travel as one fused attn_qkv, as both llama.cpp and
// Hugging Face store them.
static bool ctl__export_view(const ctl_model *m, int64_t i, char name[64], int64_t *rows) {
    const ctl_param *p = &m->params[i];
    if (i >= m->n_base) return false;   // adapters travel in their own files
    snprintf(name, 64, "%s", p->name);
    *rows = p->value.shape[0];
    if (m->cfg.arch != CTL_ARCH_GPT2 || !m->cfg.separate_qkv) return true;
    // k and v travel inside q's fused view: they follow q directly in memory (ctl__add_part).
    if (strstr(name, ".attn_k.") || strstr(name, ".attn_v.")) return false;
    char *at = strstr(name, ".attn_q.");
    if (at) {
        // ".attn_q." becomes ".attn_qkv.": shift the tail right by two bytes and write the new middle.
        memmove(at + 9, at + 7, strlen(at + 7) + 1);
        memcpy(at, ".attn_qkv", 9);
        *rows *= 3;
    }
    return true;
}

// The Hugging Face name of a GGUF-named parameter, and whether HF stores it transposed.
static bool ctl__hf_name(ctl_arch arch, const char *name, char *out, size_t cap, bool *transposed) {
    static const char *const llama[][2] = {
        {"token_embd.weight", "model.embed_tokens.weight"}, {"output_norm.weight", "model.norm.weight"},
        {"output.weight", "lm_head.weight"}, {"attn_norm.weight", "input_layernorm.weight"},
        {"attn_q.weight", "self_attn.q_proj.weight"}, {"attn_k.weight", "self_attn.k_proj.weight"},
        {"attn_v.weight", "self_attn.v_proj.weight"}, {"attn_output.weight", "self_attn.o_proj.weight"},
        {"ffn_norm.weight", "post_attention_layernorm.weight"}, {"ffn_gate.weight", "mlp.gate_proj.weight"},
        {"ffn_up.weight", "mlp.up_proj.weight"}, {"ffn_down.weight", "mlp.down_proj.weight"}};
    static const char *const gpt2[][2] = {   // a trailing '*' marks Conv1D weights, stored (in, out)
        {"token_embd.weight", "transformer.wte.weight"}, {"position_embd.weight", "transformer.wpe.weight"},
        {"output_norm.weight", "transformer.ln_f.weight"}, {"output_norm.bias", "transformer.ln_f.bias"},
        {"attn_norm.weight", "ln_1.weight"}, {"attn_norm.bias", "ln_1.bias"}, {"attn_qkv.weight", "attn.c_attn.weight*"},
        {"attn_qkv.bias", "attn.c_attn.bias"}, {"attn_output.weight", "attn.c_proj.weight*"},
        {"attn_output.bias", "attn.c_proj.bias"}, {"ffn_norm.weight", "ln_2.weight"}, {"ffn_norm.bias", "ln_2.bias"},
        {"ffn_up.weight", "mlp.c_fc.weight*"}, {"ffn_up.bias", "mlp.c_fc.bias"}, {"ffn_down.weight", "mlp.c_proj.weight*"},
        {"ffn_down.bias", "mlp.c_proj.bias"}};
    bool g = arch == CTL_ARCH_GPT2;
    int n = g ? (int)(sizeof gpt2 / sizeof gpt2[0]) : (int)(sizeof llama / sizeof llama[0]), layer = -1, skip = 0;
    const char *rest = name;
    if (sscanf(name, "blk.%d.%n", &layer, &skip) == 1 && skip > 0) rest = name + skip;
    for (int i = 0; i < n; i++) {
        const char *from = g ? gpt2[i][0] : llama[i][0], *to = g ? gpt2[i][1] : llama[i][1];
        // The first entries of each table are the names outside the blocks (no "blk.N." prefix).
        bool block_entry = i >= (g ? 4 : 3);
        if (strcmp(rest, from) || block_entry != (layer >= 0)) continue;
        size_t len = strlen(to);
        *transposed = to[len - 1] == '*';
        if (layer >= 0) snprintf(out, cap, g ? "transformer.h.%d.%.*s" : "model.layers.%d.%.*s", layer, (int)(len - *transposed), to);
        else snprintf(out, cap, "%.*s", (int)(len - *transposed), to);
        return true;
    }
    return false;
}

// Halves -> adjacent: within each head, row 2j + t comes from row t*HS/2 + j.
// RoPE layouts. Hugging Face's llama rotates dimension j with j + HS/2 (rotate_half: "halves");
// GGUF files and cotlab's default rotate 2j with 2j + 1 ("adjacent"). The same model in the
// other layout has the rows of W_q and W_k permuted within each head, which these two do;
// attention scores are unchanged, since q and k are permuted alike.
static void ctl__rows_to_adjacent(float *dst, const float *src, int64_t rows, int64_t cols, int64_t HS) {
    for (int64_t r = 0; r < rows; r++) {
        int64_t h = r / HS, i = r % HS, from = h * HS + (i % 2) * (HS / 2) + i / 2;
        memcpy(dst + r * cols, src + from * cols, (size_t)cols * sizeof(float));
    }
}

// Adjacent -> halves, the inverse of ctl__rows_to_adjacent.
static void ctl__rows_to_halves(float *dst, const float *src, int64_t rows, int64_t cols, int64_t HS) {
    for (int64_t r = 0; r < rows; r++) {
        int64_t h = r / HS, i = r % HS, to = h * HS + (i % 2) * (HS / 2) + i / 2;
        memcpy(dst + to * cols, src + r * cols, (size_t)cols * sizeof(float));
    }
}

// The weights whose rows a RoPE layout change permutes: llama's q and k (gpt2 has no RoPE).
static bool ctl__is_qk(const ctl_model *m, const char *name) {
    return m->cfg.arch == CTL_ARCH_LLAMA && (strstr(name, ".attn_q.") || strstr(name, ".attn_k."));
}

static void ctl__adapter_delta(ctl_ctx *ctx, const ctl_model *m, const ctl__adapter *ad, float *out, float *rowbuf);

// Whether the view of ctl__export_view at parameter i (`rows` rows, its fused parts included)
// can travel as its quantised bytes: stored quantised, with no adapter applied to any part.
static bool ctl__export_raw(const ctl_model *m, int64_t i, int64_t rows) {
    // An applied adapter changes what the weight computes, so its stored bytes are not the weight.
    // The loop walks the view's parts: parameter j covers rows [r, r + its rows) of the view.
    bool applied = m->adapters_on && !m->merged;
    for (int64_t j = i, r = 0; r < rows; r += m->params[j].value.shape[0], j++)
        if (m->params[j].value.dtype == CTL_F32 || (applied && m->adapter_of[j] >= 0)) return false;
    return true;
}

// The fp32 values of that view, with the adapters merged in when they are applied, into *buf
// (grown as needed). NULL when out of memory (the message set).
static const float *ctl__export_values(const ctl_model *m, int64_t i, int64_t rows, float **buf, size_t *cap, const char *who) {
    ctl_ctx *ctx = m->ctx;
    const ctl_tensor *t = &m->params[i].value;
    int64_t cols = t->ndim == 2 ? t->shape[1] : 1, most = 0;
    for (int64_t j = i, r = 0; r < rows; r += m->params[j].value.shape[0], j++) most = CTL__MAX(most, m->params[j].value.shape[0]);
    // One buffer, carved as: the view's values (rows, cols); one part's delta (most, cols); DoRA's
    // row scratch, 2 cols per thread; DoRA's row norms (most). The layout ctl__adapter_delta wants.
    size_t need = (size_t)(rows * cols) + (size_t)(most * cols) + (size_t)(2 * ctx->n_threads) * (size_t)cols + (size_t)most;
    if (need > *cap) {
        ctl_free(ctx, *buf);
        if (!(*buf = (float *)ctl_alloc(ctx, need * sizeof(float)))) {
            *cap = 0;
            ctl__fail(ctx, CTL_ERR_OUT_OF_MEMORY, "%s: out of memory", who);
            return NULL;
        }
        *cap = need;
    }
    float *out = *buf, *delta = out + rows * cols, *rowbuf = delta + most * cols;
    for (int64_t j = i, r = 0; r < rows; r += m->params[j].value.shape[0], j++) {
        const ctl_tensor *p = &m->params[j].value;
        int64_t n = ctl_tensor_numel(p);
        if (p->dtype == CTL_F32) memcpy(out + r * cols, p->data, (size_t)n * sizeof(float));
        else ctl_ggml_dequantize(ctl__ggml_of(p->dtype), p->data, out + r * cols, n);
        // What the model computes is W + delta: export the sum, so the file needs no adapter to match.
        if (m->adapters_on && !m->merged && m->adapter_of[j] >= 0) {
            ctl__adapter_delta(ctx, m, &m->adapters[m->adapter_of[j]], delta, rowbuf);
            for (int64_t k = 0; k < n; k++) out[r * cols + k] += delta[k];
        }
    }
    return out;
}

// Reads a Hugging Face checkpoint into a model of matching config (built first with
// ctl_model_create). Each tensor is found by its HF name, checked for shape, then read straight
// in, or through tmp when it must be transposed (GPT-2's Conv1D) or row-permuted (RoPE layout).
// A failure part way leaves the tensors read so far overwritten: the model is then unfit for use.
CTL_API ctl_status ctl_model_load_safetensors(ctl_model *m, const char *path) {
    if (!CTL__ARGS(m ? m->ctx : NULL, m && path)) return CTL_ERR_INVALID;
    ctl_ctx *ctx = m->ctx;
    ctl_safetensors *st;
    ctl_status res = ctl_safetensors_open(ctx, path, &st);
    if (res) return res;
    float *tmp = NULL;
    for (int64_t i = 0; i < m->n_params && !res; i++) {
        char name[64], hf[160];
        int64_t rows, cols = m->params[i].value.ndim == 2 ? m->params[i].value.shape[1] : 1;
        bool tr = false;
        if (!ctl__export_view(m, i, name, &rows)) continue;
        if (!ctl__hf_name(m->cfg.arch, name, hf, sizeof hf, &tr)) {
            res = ctl__fail(ctx, CTL_ERR_UNSUPPORTED, "safetensors '%s': no Hugging Face name for '%s'", path, name);
            break;
        }
        const ctl_safetensors_tensor *t = ctl_safetensors_find_tensor(st, hf);
        if (!t && !strncmp(hf, "transformer.", 12)) t = ctl_safetensors_find_tensor(st, hf + 12);   // GPT-2 files without the prefix
        int64_t want0 = tr ? cols : rows, want1 = tr ? rows : cols;
        bool two = m->params[i].value.ndim == 2;
        if (!t) res = ctl__fail(ctx, CTL_ERR_NOT_FOUND, "safetensors '%s': no tensor '%s'", path, hf);
        else if (t->ndim != (two ? 2 : 1) || t->shape[0] != want0 || (two && t->shape[1] != want1))
            res = ctl__fail(ctx, CTL_ERR_SHAPE, "safetensors '%s': '%s' has shape [%" PRId64 ", %" PRId64 "], the model needs [%" PRId64 ", %" PRId64 "]",
                            path, hf, t->shape[0], t->ndim > 1 ? t->shape[1] : 0, want0, two ? want1 : 0);
        if (res) break;
        // Only fp32 destinations: quantising on load is the GGUF path's job (keep_quantized).
        if (m->params[i].value.dtype != CTL_F32) {
            res = ctl__fail(ctx, CTL_ERR_UNSUPPORTED, "safetensors '%s': '%s' is stored %s in the model; load into an fp32 one",
                            path, name, ctl_dtype_name(m->params[i].value.dtype));
            break;
        }
        float *dst = (float *)m->params[i].value.data;
        // HF stores q and k in the halves layout; a model running adjacent reads them permuted.
        bool permute = ctl__is_qk(m, name) && m->cfg.rope_layout == CTL_ROPE_ADJACENT;
        if (!tr && !permute) {
            res = ctl_safetensors_read_f32(st, t, dst);
            continue;
        }
        ctl_free(ctx, tmp);
        if (!(tmp = (float *)ctl_alloc(ctx, (size_t)(rows * cols) * sizeof(float)))) {
            res = ctl__fail(ctx, CTL_ERR_OUT_OF_MEMORY, "safetensors '%s': out of memory", path);
            break;
        }
        if ((res = ctl_safetensors_read_f32(st, t, tmp))) break;
        if (permute) ctl__rows_to_adjacent(dst, tmp, rows, cols, m->cfg.head_dim);
        else
            for (int64_t r = 0; r < rows; r++)
                // A plain transpose, strided on the read side: run once per load, not a hot path.
                for (int64_t c = 0; c < cols; c++) dst[r * cols + c] = tmp[c * rows + r];
    }
    ctl_free(ctx, tmp);
    ctl_safetensors_close(st);
    return res;
}

// The inverse of the load, with applied adapters merged into the values written (the file is a
// plain HF checkpoint). The writer keeps every tensor in memory until ctl_safetensors_writer_save: peak
// memory is about the model again in `dtype`.
CTL_API ctl_status ctl_model_save_safetensors(const ctl_model *m, const char *path, ctl_safetensors_dtype dtype) {
    if (!CTL__ARGS(m ? m->ctx : NULL, m && path)) return CTL_ERR_INVALID;
    ctl_ctx *ctx = m->ctx;
    ctl_safetensors_writer *w;
    ctl_status res = ctl_safetensors_writer_init(ctx, &w);
    if (!res) res = ctl_safetensors_writer_set_str(w, "format", "pt");
    float *tmp = NULL, *vals = NULL;
    size_t cap = 0;
    for (int64_t i = 0; i < m->n_params && !res; i++) {
        char name[64], hf[160];
        int64_t rows, cols = m->params[i].value.ndim == 2 ? m->params[i].value.shape[1] : 1, shape[2];
        bool tr = false;
        if (!ctl__export_view(m, i, name, &rows)) continue;
        if (!ctl__hf_name(m->cfg.arch, name, hf, sizeof hf, &tr)) {
            res = ctl__fail(ctx, CTL_ERR_UNSUPPORTED, "save_safetensors: no Hugging Face name for '%s'", name);
            break;
        }
        const float *x = ctl__export_values(m, i, rows, &vals, &cap, "save_safetensors");
        if (!x) {
            res = CTL_ERR_OUT_OF_MEMORY;
            break;
        }
        // Back to HF's halves layout for a model that runs adjacent, as the load permuted them.
        bool permute = ctl__is_qk(m, name) && m->cfg.rope_layout == CTL_ROPE_ADJACENT;
        if (tr || permute) {
            ctl_free(ctx, tmp);
            if (!(tmp = (float *)ctl_alloc(ctx, (size_t)(rows * cols) * sizeof(float)))) {
                res = ctl__fail(ctx, CTL_ERR_OUT_OF_MEMORY, "save_safetensors: out of memory");
                break;
            }
            if (permute) ctl__rows_to_halves(tmp, x, rows, cols, m->cfg.head_dim);
            else
                for (int64_t r = 0; r < rows; r++)
                    for (int64_t c = 0; c < cols; c++) tmp[c * rows + r] = x[r * cols + c];
            x = tmp;
        }
        shape[0] = tr ? cols : rows, shape[1] = tr ? rows : cols;
        // The writer copies (and converts) x now, so tmp and vals are free for the next tensor.
        res = ctl_safetensors_writer_add_tensor(w, hf, dtype, m->params[i].value.ndim == 2 ? 2 : 1, shape, x);
    }
    ctl_free(ctx, tmp), ctl_free(ctx, vals);
    if (!res) res = ctl_safetensors_writer_save(w, path);
    ctl_safetensors_writer_free(w);
    return res;
}


// ---- models in GGUF --------------------------------------------------------------------------

// An integer "<arch>.<name>", or `def` when the key is absent (def < 0: the key is required).
// (A present key is read, and its type checked, by ctl_gguf_get_int.)
static ctl_status ctl__gguf_arch_int(const ctl_gguf *g, const char *arch, const char *name, int64_t def, int64_t *out) {
    char key[128];
    snprintf(key, sizeof key, "%s.%s", arch, name);
    if (def >= 0 && !ctl_gguf_find_kv(g, key)) return *out = def, CTL_OK;
    return ctl_gguf_get_int(g, key, out);
}

// The config of the model in g, from its "<arch>.*" metadata and the presence of some tensors, resolved into *rc.
// Fails, recording on ctx, for an architecture other than llama and gpt2, a missing or mistyped key, a feature the
// kernels lack (scaled or partial RoPE), or a block_count that the file's tensors cannot bear out.
static ctl_status ctl__gguf_config_read(ctl_ctx *ctx, const ctl_gguf *g, ctl_model_config *rc) {
    ctl_model_config c;
    const char *s = NULL;
    size_t len = 0;
    double eps = 0.0, theta;
    int64_t rope_dims = 0;
    memset(&c, 0, sizeof c);
    ctl_status st = ctl_gguf_get_str(g, "general.architecture", &s, &len);
    if (st) return st;
    if (len == 4 && !memcmp(s, "gpt2", 4)) c.arch = CTL_ARCH_GPT2;
    else if (len == 5 && !memcmp(s, "llama", 5)) c.arch = CTL_ARCH_LLAMA;
    else return ctl__fail(ctx, CTL_ERR_UNSUPPORTED, "gguf %s: architecture '%.*s' (cotlab loads llama and gpt2)", g->file,
                          (int)CTL__MIN(len, (size_t)64), s);
    const char *a = c.arch == CTL_ARCH_GPT2 ? "gpt2" : "llama";
    const ctl_gguf_tensor *emb = ctl_gguf_find_tensor(g, "token_embd.weight");
    if (!emb) return ctl__fail(ctx, CTL_ERR_NOT_FOUND, "gguf %s: no tensor 'token_embd.weight'", g->file);
    // Llama 3.1-style RoPE scaling stores per-frequency factors in this tensor; the RoPE kernels
    // use plain theta^(-2i/d) frequencies, so such a file would load and compute wrong answers.
    if (ctl_gguf_find_tensor(g, "rope_freqs.weight"))
        return ctl__fail(ctx, CTL_ERR_UNSUPPORTED, "gguf %s: rope_freqs.weight (scaled RoPE) is not supported", g->file);
    if ((st = ctl__gguf_arch_int(g, a, "context_length", -1, &c.n_ctx)) ||
        (st = ctl__gguf_arch_int(g, a, "embedding_length", -1, &c.n_embd)) ||
        (st = ctl__gguf_arch_int(g, a, "block_count", -1, &c.n_layer)) ||
        (st = ctl__gguf_arch_int(g, a, "feed_forward_length", -1, &c.n_ff)) ||
        (st = ctl__gguf_arch_int(g, a, "attention.head_count", -1, &c.n_head)) ||
        (st = ctl__gguf_arch_int(g, a, "attention.head_count_kv", 0, &c.n_kv_head)) ||
        (st = ctl__gguf_arch_int(g, a, "attention.key_length", 0, &c.head_dim)) ||
        (st = ctl__gguf_arch_int(g, a, "rope.dimension_count", 0, &rope_dims)))
        return st;
    char key[128];
    snprintf(key, sizeof key, "%s.attention.%s", a, c.arch == CTL_ARCH_GPT2 ? "layer_norm_epsilon" : "layer_norm_rms_epsilon");
    if ((st = ctl_gguf_get_float(g, key, &eps))) return st;
    snprintf(key, sizeof key, "%s.rope.freq_base", a);
    theta = 10000.0;
    if (ctl_gguf_find_kv(g, key) && (st = ctl_gguf_get_float(g, key, &theta))) return st;
    // ne is innermost first: token_embd's ne = [C, V]. The tensor, not a metadata key, gives V.
    c.vocab_size = emb->ne[1];
    c.norm_eps = (float)eps, c.rope_theta = (float)theta, c.rope_layout = CTL_ROPE_ADJACENT;
    // The file's tensors, not its metadata, tell tying and q/k/v fusion apart, as llama.cpp does.
    c.tied_embeddings = ctl_gguf_find_tensor(g, "output.weight") == NULL;
    c.separate_qkv = ctl_gguf_find_tensor(g, "blk.0.attn_qkv.weight") == NULL;
    if ((st = ctl_model_config_resolve(ctx, &c, rc))) return st;
    // Partial RoPE (rotating only some dimensions of a head) is not implemented.
    if (c.arch == CTL_ARCH_LLAMA && rope_dims && rope_dims != rc->head_dim)
        return ctl__fail(ctx, CTL_ERR_UNSUPPORTED, "gguf %s: rope.dimension_count %" PRId64 " differs from the head size %" PRId64,
                         g->file, rope_dims, rc->head_dim);
    // Nothing is sized from the metadata before the file's tensors bear it out: a layer has at
    // least 9 tensors, and every parameter must be a tensor of its exact shape (the tensors'
    // data does not overlap, so the model is at most about 7 times the file's size).
    if (rc->n_layer > g->n_tensors / 9)
        return ctl__fail(ctx, CTL_ERR_FORMAT, "gguf %s: block_count %" PRId64 " but only %" PRId64 " tensors", g->file, rc->n_layer, g->n_tensors);
    return CTL_OK;
}

// A fused layer is one product over back-to-back parts, so its parts must share one storage
// type; when they do not (a file may quantise k and v unlike q), all its parts become fp32.
// types is indexed by parameter; blocks are the n_layer layers that index it. Cannot fail.
static void ctl__fused_types_unify(const ctl__block *blocks, int64_t n_layer, ctl_dtype *types) {
    for (int64_t l = 0; l < n_layer; l++) {
        const ctl__block *k = &blocks[l];
        for (int p = 1; p < k->n_qkv; p++)
            if (types[k->qkv_w[p]] != types[k->qkv_w[0]])
                for (int q = 0; q < k->n_qkv; q++) types[k->qkv_w[q]] = CTL_F32;
        if (k->n_up == 2 && types[k->up_w[0]] != types[k->up_w[1]]) types[k->up_w[0]] = types[k->up_w[1]] = CTL_F32;
    }
}

// Every parameter of config rc looked up in g and checked for shape, then its storage type chosen: *types (one per
// parameter, allocated on ctx) for the caller to pass to ctl__model_new and free. On failure nothing stays
// allocated, *types is NULL and the first missing or misshapen tensor is named.
static ctl_status ctl__gguf_dtypes_choose(ctl_ctx *ctx, const ctl_gguf *g, const ctl_model_desc *desc,
                                          const ctl_model_config *rc, ctl_dtype **types_out) {
    ctl__builder bd;
    int64_t ids[5];
    ctl_status st = CTL_OK;
    *types_out = NULL;
    memset(&bd, 0, sizeof bd);
    // The names and shapes of every parameter (a planning pass with no data), to look each up in
    // the file; the real model is built by ctl__model_new once the types are known.
    ctl__build(rc, &bd, NULL, ids);
    if (bd.overflow) return ctl__fail(ctx, CTL_ERR_FORMAT, "gguf %s: the metadata's sizes are too large to address", g->file);
    ctl_dtype *types = (ctl_dtype *)ctl_alloc(ctx, (size_t)bd.n * sizeof(ctl_dtype));
    bd.params = (ctl_param *)ctl_alloc(ctx, (size_t)bd.n * sizeof(ctl_param));
    ctl__block *blocks = (ctl__block *)ctl_alloc(ctx, (size_t)rc->n_layer * sizeof(ctl__block));
    if (!types || !bd.params || !blocks) {
        ctl_free(ctx, types), ctl_free(ctx, bd.params), ctl_free(ctx, blocks);
        return ctl__fail(ctx, CTL_ERR_OUT_OF_MEMORY, "gguf %s: out of memory", g->file);
    }
    bd.n = bd.numel = 0;
    ctl__build(rc, &bd, blocks, ids);
    // Which tensors stay compressed: 2-D ones stored as Q8_0, Q4_0, Q4_1 or BF16, when asked,
    // and the parts of a fused layer only when they share one type; with desc->bf16 the other
    // matrices become BF16.
    for (int64_t i = 0; i < bd.n && !st; i++) {
        const ctl_param *p = &bd.params[i];
        const ctl_gguf_tensor *t = ctl_gguf_find_tensor(g, p->name);
        int64_t rows = p->value.shape[0], cols = p->value.ndim == 2 ? p->value.shape[1] : 1;
        if (!t) st = ctl__fail(ctx, CTL_ERR_NOT_FOUND, "gguf %s: no tensor '%s'", g->file, p->name);
        else if (p->value.ndim == 2 ? t->ne[0] != cols || t->ne[1] != rows || t->ne[2] != 1 || t->ne[3] != 1
                                    : ctl_gguf_tensor_numel(t) != rows)
            st = ctl__fail(ctx, CTL_ERR_SHAPE, "gguf %s: tensor '%s' has ne [%" PRId64 ", %" PRId64 ", %" PRId64 "], the config needs [%" PRId64 ", %" PRId64 "]",
                           g->file, p->name, t->ne[0], t->ne[1], t->ne[2], p->value.ndim == 2 ? cols : rows, p->value.ndim == 2 ? rows : 1);
        else types[i] = desc && desc->keep_quantized && p->value.ndim == 2 ? ctl__dtype_of(t->type) : CTL_F32;
    }
    if (st) {
        ctl_free(ctx, types), ctl_free(ctx, bd.params), ctl_free(ctx, blocks);
        return st;
    }
    ctl__fused_types_unify(blocks, rc->n_layer, types);
    for (int64_t i = 0; i < bd.n && desc && desc->bf16; i++)
        if (types[i] == CTL_F32 && bd.params[i].value.ndim == 2) types[i] = CTL_BF16;
    if (ids[1] >= 0) types[ids[1]] = CTL_F32;   // gpt2's position embedding is added, not multiplied: fp32
    ctl_free(ctx, bd.params), ctl_free(ctx, blocks);
    *types_out = types;
    return CTL_OK;
}

// The weights of g copied or converted into m, built from g's config and types (every tensor is there, of its
// shape: ctl__gguf_dtypes_choose checked). Returns the first failure (out of memory, or from the dequantiser),
// leaving m part-filled for the caller to free.
static ctl_status ctl__gguf_weights_copy(ctl_ctx *ctx, const ctl_gguf *g, ctl_model *m) {
    ctl_status st = CTL_OK;
    for (int64_t i = 0; i < m->n_params; i++) {   // every tensor is there, of its shape (checked above)
        ctl_param *p = &m->params[i];
        const ctl_gguf_tensor *t = ctl_gguf_find_tensor(g, p->name);
        int64_t rows = p->value.shape[0], cols = p->value.ndim == 2 ? p->value.shape[1] : 1;
        // Three cases: fp32 (any file type dequantised), kept as stored (raw copy: same block layout),
        // or bf16 requested over a type that is not bf16 (desc->bf16).
        if (p->value.dtype == CTL_F32) st = ctl_gguf_read_f32(g, t, (float *)p->value.data);
        else if (ctl__ggml_of(p->value.dtype) == t->type) memcpy(p->value.data, t->data, ctl_dtype_bytes(p->value.dtype, rows * cols));
        else {   // to bf16, through fp32 one matrix at a time
            float *f = (float *)ctl_alloc(ctx, (size_t)(rows * cols) * sizeof(float));
            uint16_t *h = (uint16_t *)p->value.data;
            if (!f) st = ctl__fail(ctx, CTL_ERR_OUT_OF_MEMORY, "gguf %s: out of memory", g->file);
            else if (!(st = ctl_gguf_read_f32(g, t, f)))
                for (int64_t j = 0; j < rows * cols; j++) h[j] = ctl_f32_to_bf16(f[j]);
            ctl_free(ctx, f);
        }
        if (st) return st;
    }
    return CTL_OK;
}

// A model from an open GGUF file: the config from "<arch>.*" metadata, then every tensor checked
// against the config before the model is allocated, then the weights copied or converted.
// GGUF llama files hold q and k in the "adjacent" RoPE layout (llama.cpp's converter permutes).
CTL_API ctl_status ctl_model_from_gguf(ctl_ctx *ctx, const ctl_gguf *g, const ctl_model_desc *desc, ctl_model **out) {
    if (out) *out = NULL;
    if (!CTL__ARGS(ctx, ctx && g && out)) return CTL_ERR_INVALID;
    ctl_model_config rc;
    ctl_dtype *types;
    ctl_model *m;
    *out = NULL;
    ctl_status st = ctl__gguf_config_read(ctx, g, &rc);
    if (st) return st;
    if ((st = ctl__gguf_dtypes_choose(ctx, g, desc, &rc, &types))) return st;
    st = ctl__model_new(ctx, &rc, types, &m);
    ctl_free(ctx, types);
    if (st) return st;
    if ((st = ctl__gguf_weights_copy(ctx, g, m))) {
        ctl_model_free(m);
        return st;
    }
    *out = m;
    return CTL_OK;
}

CTL_API ctl_status ctl_model_load_gguf(ctl_ctx *ctx, const char *path, const ctl_model_desc *desc, ctl_model **out) {
    ctl_gguf *g;
    if (out) *out = NULL;
    if (!CTL__ARGS(ctx, ctx && path && out)) return CTL_ERR_INVALID;
    ctl_status st = ctl_gguf_open(ctx, path, &g);
    if (st) return st;
    st = ctl_model_from_gguf(ctx, g, desc, out);
    ctl_gguf_close(g);
    return st;
}

CTL_API ctl_status ctl_model_save_gguf(const ctl_model *m, const char *path, ctl_ggml_type type) {
    return ctl_model_export_gguf(m, NULL, path, type);
}

// Writes the model as a GGUF llama.cpp loads: the hyperparameters, the tokenizer and "general."
// entries copied from `from` (the file the model came from; NULL: none), and each tensor in
// `type`, with applied adapters merged in. Untouched quantised tensors are copied as their
// bytes, so re-exporting a quantised model loses nothing further.
CTL_API ctl_status ctl_model_export_gguf(const ctl_model *m, const ctl_gguf *from, const char *path, ctl_ggml_type type) {
    if (!CTL__ARGS(m ? m->ctx : from ? from->ctx : NULL, m && path)) return CTL_ERR_INVALID;
    ctl_ctx *ctx = m->ctx;
    const ctl_model_config *c = &m->cfg;
    bool gpt2 = c->arch == CTL_ARCH_GPT2;
    const char *a = gpt2 ? "gpt2" : "llama";
    char key[128];
    ctl_gguf_writer *w;
    ctl_status st = ctl_gguf_writer_init(ctx, &w);
    if (st) return st;
    // llama.cpp's llama_ftype numbers (ALL_F32 0, MOSTLY_F16 1, MOSTLY_Q8_0 7, MOSTLY_BF16 32).
    uint32_t ftype = type == CTL_GGML_F16 ? 1 : type == CTL_GGML_Q8_0 ? 7 : type == CTL_GGML_BF16 ? 32 : 0;
    st = ctl_gguf_writer_set_str(w, "general.architecture", a, strlen(a));
    if (!st) st = ctl_gguf_writer_set_u32(w, "general.file_type", ftype);
    // The keys skipped describe the file rather than the model: written above, or not carried over.
    for (int64_t i = 0; from && i < ctl_gguf_kv_count(from) && !st; i++) {   // the tokenizer and the names
        const ctl_gguf_kv *kv = ctl_gguf_kv_at(from, i);
        if ((!strncmp(kv->key, "tokenizer.", 10) || !strncmp(kv->key, "general.", 8)) && strcmp(kv->key, "general.architecture") &&
            strcmp(kv->key, "general.file_type") && strcmp(kv->key, "general.type") && strcmp(kv->key, "general.alignment"))
            st = ctl_gguf_writer_copy_kv(w, from, kv);
    }
    static const char *const names[] = {"context_length", "embedding_length", "block_count", "feed_forward_length",
                                        "attention.head_count", "attention.head_count_kv"};
    int64_t dims[] = {c->n_ctx, c->n_embd, c->n_layer, c->n_ff, c->n_head, c->n_kv_head};
    for (int i = 0; i < 6 && !st; i++) {
        snprintf(key, sizeof key, "%s.%s", a, names[i]);
        st = ctl_gguf_writer_set_u32(w, key, (uint32_t)dims[i]);
    }
    snprintf(key, sizeof key, "%s.attention.%s", a, gpt2 ? "layer_norm_epsilon" : "layer_norm_rms_epsilon");
    if (!st) st = ctl_gguf_writer_set_f32(w, key, c->norm_eps);
    if (!gpt2) {
        snprintf(key, sizeof key, "llama.rope.freq_base");
        if (!st) st = ctl_gguf_writer_set_f32(w, key, c->rope_theta);
        if (!st) st = ctl_gguf_writer_set_u32(w, "llama.rope.dimension_count", (uint32_t)c->head_dim);
        // llama.cpp assumes head_dim = n_embd / n_head unless these keys say otherwise.
        if (!st && c->head_dim * c->n_head != c->n_embd) {
            st = ctl_gguf_writer_set_u32(w, "llama.attention.key_length", (uint32_t)c->head_dim);
            if (!st) st = ctl_gguf_writer_set_u32(w, "llama.attention.value_length", (uint32_t)c->head_dim);
        }
    }
    float *tmp = NULL, *vals = NULL;
    size_t cap = 0;
    for (int64_t i = 0; i < m->n_params && !st; i++) {
        const ctl_param *p = &m->params[i];
        int64_t rows = p->value.shape[0], cols = p->value.ndim == 2 ? p->value.shape[1] : 1, ne[2];
        char name[64];
        if (!ctl__export_view(m, i, name, &rows)) continue;
        ne[0] = cols, ne[1] = rows;
        if (ctl__export_raw(m, i, rows)) {   // quantised as loaded (always the adjacent layout)
            st = ctl_gguf_writer_add_raw(w, name, ctl__ggml_of(p->value.dtype), 2, ne, p->value.data);
            continue;
        }
        const float *x = ctl__export_values(m, i, rows, &vals, &cap, "save_gguf");
        if (!x) {
            st = CTL_ERR_OUT_OF_MEMORY;
            break;
        }
        if (!gpt2 && c->rope_layout == CTL_ROPE_HALVES && (strstr(name, ".attn_q.") || strstr(name, ".attn_k."))) {
            ctl_free(ctx, tmp);
            tmp = (float *)ctl_alloc(ctx, (size_t)(rows * cols) * sizeof(float));
            if (!tmp) st = ctl__fail(ctx, CTL_ERR_OUT_OF_MEMORY, "save_gguf: out of memory");
            else ctl__rows_to_adjacent(tmp, x, rows, cols, c->head_dim), x = tmp;
        }
        // Vectors stay F32, as llama.cpp's converters keep them; Q8_0 needs rows of whole 32-blocks.
        ctl_ggml_type tt = p->value.ndim == 1 || (type == CTL_GGML_Q8_0 && cols % 32) ? CTL_GGML_F32 : type;
        if (!st) st = ctl_gguf_writer_add_tensor(w, name, tt, p->value.ndim == 2 ? 2 : 1, p->value.ndim == 2 ? ne : ne + 1, x);
    }
    ctl_free(ctx, tmp), ctl_free(ctx, vals);
    if (!st) st = ctl_gguf_writer_save(w, path);
    ctl_gguf_writer_free(w);
    return st;
}


// >>impl:adapters ===============================================================================

// The block of a base parameter's name ("blk.3.attn_q.weight" -> 3), -1 outside the blocks.
static int64_t ctl__param_layer(const char *name) {
    int layer = -1, skip = 0;
    return sscanf(name, "blk.%d.%n", &layer, &skip) == 1 && skip > 0 ? layer : -1;
}

// The CTL_LINEAR_* bits of base parameter i, 0 when it is not a linear layer's weight.
static uint32_t ctl__param_linear(const ctl_model *m, int64_t i) {
    static const struct { const char *suffix; uint32_t bits; } t[] = {
        {".attn_q.weight", CTL_LINEAR_Q}, {".attn_k.weight", CTL_LINEAR_K}, {".attn_v.weight", CTL_LINEAR_V},
        {".attn_qkv.weight", CTL_LINEAR_Q | CTL_LINEAR_K | CTL_LINEAR_V}, {".attn_output.weight", CTL_LINEAR_O},
        {".ffn_gate.weight", CTL_LINEAR_GATE}, {".ffn_up.weight", CTL_LINEAR_UP}, {".ffn_down.weight", CTL_LINEAR_DOWN}};
    const char *name = m->params[i].name;
    // The head and the embedding count as linear layers only when untied: a LoRA on a tied tensor
    // would adapt both roles at once, which the forward does not implement.
    if (!m->cfg.tied_embeddings && i == m->output) return CTL_LINEAR_HEAD;
    if (!m->cfg.tied_embeddings && i == m->tok_embd) return CTL_LINEAR_EMBED;
    for (size_t k = 0; k < sizeof t / sizeof t[0]; k++)
        if (ctl__ends_with(name, t[k].suffix)) return t[k].bits;
    return 0;
}

// The CTL_KIND_* of base parameter i.
// (Order matters: "norm." first, so that no norm is taken for attention by its "attn_" prefix.)
static uint32_t ctl__param_kind(const ctl_model *m, int64_t i) {
    const char *name = m->params[i].name;
    if (strstr(name, "norm.")) return CTL_KIND_NORM;
    if (i == m->tok_embd || i == m->pos_embd) return CTL_KIND_EMBED;
    if (i == m->output) return CTL_KIND_HEAD;
    return strstr(name, ".attn_") ? CTL_KIND_ATTN : CTL_KIND_MLP;
}

// Whether a block index lies in [from, to); [0, 0) means every layer, the descs' zero default.
static bool ctl__in_layers(int64_t layer, int64_t from, int64_t to) {
    return from == 0 && to == 0 ? true : layer >= from && layer < to;
}

// Appends n parameters (names, 1-D when d1[k] == 0) with zeroed fp32 values in one new block;
// returns the index of the first, or -1 (out of memory, with the context's message set).
static int64_t ctl__add_params(ctl_model *m, int64_t n, char (*names)[64], const int64_t *d0, const int64_t *d1) {
    ctl_ctx *ctx = m->ctx;
    size_t bytes = 0;
    // One block per call, each tensor 64-byte aligned (a cache line, and the widest vector loads).
    for (int64_t k = 0; k < n; k++) bytes += ctl__align64((size_t)(d0[k] * (d1[k] ? d1[k] : 1)) * sizeof(float));
    void *params = m->params, *extra = m->blocks_extra;
    unsigned char *block = (unsigned char *)ctl_alloc(ctx, bytes ? bytes : 1);
    if (!block || !ctl__grow(ctx, &params, sizeof(ctl_param), &m->cap_params, m->n_params + n) ||
        // params is stored back before the second grow can fail: the first may have moved it.
        (m->params = (ctl_param *)params, !ctl__grow(ctx, &extra, sizeof(void *), &m->cap_extra, m->n_extra + 1))) {
        ctl_free(ctx, block);
        ctl__fail(ctx, CTL_ERR_OUT_OF_MEMORY, "adapters: cannot allocate %.1f MB", (double)bytes / 1e6);
        return -1;
    }
    m->blocks_extra = (void **)extra;
    m->blocks_extra[m->n_extra++] = block;
    memset(block, 0, bytes);
    int64_t first = m->n_params;
    for (int64_t k = 0, at = 0; k < n; k++) {
        ctl_param *p = &m->params[m->n_params++];
        int64_t shape[2] = {d0[k], d1[k]};
        memset(p, 0, sizeof *p);
        snprintf(p->name, sizeof p->name, "%s", names[k]);
        p->value = ctl_tensor_f32((float *)(void *)(block + at), d1[k] ? 2 : 1, shape);
        p->trainable = true;
        p->decay = d1[k] != 0;
        at += (int64_t)ctl__align64((size_t)(d0[k] * (d1[k] ? d1[k] : 1)) * sizeof(float));
    }
    // New parameters: trainers must be rebuilt, and the weights re-uploaded.
    m->structure++, m->version++;
    return first;
}

// The adapter record of base parameter i, made if it has none (NULL: out of memory).
// One record per base weight, so a LoRA and a sparse delta on the same weight share it.
static ctl__adapter *ctl__adapter_for(ctl_model *m, int64_t i) {
    if (m->adapter_of[i] >= 0) return &m->adapters[m->adapter_of[i]];
    void *a = m->adapters;
    if (!ctl__grow(m->ctx, &a, sizeof(ctl__adapter), &m->cap_adapters, m->n_adapters + 1)) return NULL;
    m->adapters = (ctl__adapter *)a;
    ctl__adapter *ad = &m->adapters[m->n_adapters];
    memset(ad, 0, sizeof *ad);
    ad->base = i, ad->lora_a = ad->lora_b = ad->dora_m = ad->sparse = -1;
    m->adapter_of[i] = m->n_adapters++;
    return ad;
}

// Parameter i's fp32 values, NULL for an absent (-1) one. Only for fp32 tensors: adapters, or
// a base weight known to be fp32.
static float *ctl__pf(const ctl_model *m, int64_t i) { return i < 0 ? NULL : (float *)m->params[i].value.data; }

// Row o of base weight i as fp32 (dequantised when it is stored quantised) into buf (cols).
static const float *ctl__weight_row(const ctl_model *m, int64_t i, int64_t o, float *buf) {
    const ctl_tensor *w = &m->params[i].value;
    return ctl__row_f32(w->dtype, w->data, w->shape[1], o, buf);
}

// DoRA's row norms n = ||W + scale B A|| of one adapted weight, and g = m / n (g may be NULL);
// rowbuf holds 2 * cols floats per thread.
static void ctl__dora_norms(ctl_ctx *ctx, const ctl_model *m, const ctl__adapter *ad, float *rowbuf, float *nrm, float *g) {
    const ctl_tensor *w = &m->params[ad->base].value;
    ctl__dora_norms_cpu(ctx, nrm, g, w->dtype, w->data, ctl__pf(m, ad->lora_a), ctl__pf(m, ad->lora_b), ctl__pf(m, ad->dora_m),
                        w->shape[0], w->shape[1], ad->rank, ad->scale, false, rowbuf);
}

// The adapters from the n_adapters-th on removed, with the parameters and storage they added:
// the model as it was when it had n_adapters adapters, n_params parameters, n_extra blocks (an
// adapter kept loses the LoRA or sparse delta it took since: those parameters go).
// The attach functions record (n_adapters, n_params, n_extra) on entry and call this on failure,
// which is what makes each attach all-or-nothing. It relies on parameters and blocks being
// appended in order, never reused: everything at or past the recorded counts is new.
static void ctl__adapters_truncate(ctl_model *m, int64_t n_adapters, int64_t n_params, int64_t n_extra) {
    // Records kept may have gained a LoRA or a delta after the mark (a sparse attach onto a weight
    // with a LoRA, say): those parts go, the rest of the record stays.
    for (int64_t a = 0; a < n_adapters; a++) {
        ctl__adapter *ad = &m->adapters[a];
        if (ad->lora_a >= n_params) ad->lora_a = ad->lora_b = ad->dora_m = -1, ad->rank = 0;
        if (ad->sparse >= n_params) {
            ctl_free(m->ctx, ad->sparse_idx), ctl_free(m->ctx, ad->sparse_row), ctl_free(m->ctx, ad->sparse_col);
            ad->sparse_idx = NULL, ad->sparse_row = ad->sparse_col = NULL, ad->sparse = -1, ad->n_sparse = 0;
        }
    }
    // Records made after the mark go whole, and their weights point at no adapter again.
    for (int64_t a = n_adapters; a < m->n_adapters; a++) {
        ctl__adapter *ad = &m->adapters[a];
        ctl_free(m->ctx, ad->sparse_idx), ctl_free(m->ctx, ad->sparse_row), ctl_free(m->ctx, ad->sparse_col), ctl_free(m->ctx, ad->dora_n);
        m->adapter_of[ad->base] = -1;
    }
    for (int64_t i = n_extra; i < m->n_extra; i++) ctl_free(m->ctx, m->blocks_extra[i]);
    m->n_extra = n_extra, m->n_adapters = n_adapters, m->n_params = n_params;
    m->structure++, m->version++;
}

// A LoRA of rank R on base weight i, initialised from rng (see ctl_lora_init).
// B starts at 0 (A at 0 on the embedding), so a fresh LoRA leaves the model's output unchanged;
// PEFT's default init. On failure the parameters may be half added: the caller truncates.
static ctl_status ctl__lora_add(ctl_model *m, int64_t i, int64_t R, float scale, float dropout, bool dora, ctl_lora_init init,
                                ctl_rng *rng) {
    ctl_ctx *ctx = m->ctx;
    const ctl_tensor *w = &m->params[i].value;
    bool embed = ctl__param_linear(m, i) == CTL_LINEAR_EMBED;
    int64_t out = embed ? w->shape[1] : w->shape[0], in = embed ? w->shape[0] : w->shape[1];
    char names[3][64];
    // lora_a (rank, in), lora_b (out, rank), lora_m (out). The embedding (V, C) maps a token id
    // (in = V) to C outputs, hence the swapped sides above and lora_a (V, rank).
    int64_t d0[3] = {embed ? in : R, out, out}, d1[3] = {embed ? R : in, R, 0};
    // %.55s leaves room for the suffix in the 64-byte name; real weight names are far shorter.
    snprintf(names[0], 64, "%.55s.lora_a", m->params[i].name);
    snprintf(names[1], 64, "%.55s.lora_b", m->params[i].name);
    snprintf(names[2], 64, "%.55s.lora_m", m->params[i].name);
    int64_t first = ctl__add_params(m, dora ? 3 : 2, names, d0, d1);
    ctl__adapter *ad = first < 0 ? NULL : ctl__adapter_for(m, i);
    if (!ad) return first < 0 ? CTL_ERR_OUT_OF_MEMORY : ctl__fail(ctx, CTL_ERR_OUT_OF_MEMORY, "lora: out of memory");
    ad->lora_a = first, ad->lora_b = first + 1, ad->dora_m = dora ? first + 2 : -1;
    ad->rank = R, ad->scale = scale, ad->dropout = dropout;
    float *A = ctl__pf(m, ad->lora_a), *Bm = ctl__pf(m, ad->lora_b);
    if (embed) {   // PEFT's embedding LoRA: A = 0, B ~ N(0, 1)
        for (int64_t k = 0; k < out * R; k++) Bm[k] = ctl_rng_normal(rng);
    } else {
        float bound = 1.0f / sqrtf((float)in);   // kaiming_uniform(a = sqrt(5)) on (R, in)
        for (int64_t k = 0; k < R * in; k++)
            A[k] = init == CTL_LORA_INIT_GAUSSIAN ? ctl_rng_normal(rng) / (float)R : bound * (2.0f * ctl_rng_uniform(rng) - 1.0f);
    }
    // DoRA (Liu et al. 2024) writes W' = m (W + s B A) / ||W + s B A|| row by row; starting m at
    // the row norms makes W' = W at B = 0.
    if (ad->dora_m >= 0) {   // m = ||W|| per row (B is 0)
        float *rowbuf = (float *)ctl_alloc(ctx, (size_t)ctx->n_threads * 2 * (size_t)in * sizeof(float));
        if (!rowbuf) return ctl__fail(ctx, CTL_ERR_OUT_OF_MEMORY, "lora: out of memory");
        ctl__dora_norms(ctx, m, ad, rowbuf, ctl__pf(m, ad->dora_m), NULL);
        ctl_free(ctx, rowbuf);
    }
    return CTL_OK;
}

// Two passes over the targeted weights: the first checks every one (so a refusal attaches
// nothing), the second attaches, drawing every LoRA's init from one rng stream in parameter
// order, so a seed gives the same adapters at any thread count.
CTL_API ctl_status ctl_lora_attach(ctl_model *m, const ctl_lora_desc *desc) {
    if (!CTL__ARGS(NULL, m)) return CTL_ERR_INVALID;
    ctl_ctx *ctx = m->ctx;
    ctl_lora_desc d;
    memset(&d, 0, sizeof d);
    if (desc) d = *desc;
    if (d.rank == 0) d.rank = 8;
    if (d.alpha == 0.0f) d.alpha = (float)d.rank;
    if (d.targets == 0) d.targets = CTL_LINEAR_ALL;
    if (d.rank < 0 || !(d.alpha > 0.0f) || !(d.dropout >= 0.0f && d.dropout < 1.0f) || d.layer_from < 0 ||
        d.layer_to < d.layer_from || (d.targets & ~(uint32_t)(CTL_LINEAR_ALL | CTL_LINEAR_HEAD | CTL_LINEAR_EMBED)) ||
        (unsigned)d.init > (unsigned)CTL_LORA_INIT_GAUSSIAN)
        return ctl__fail(ctx, CTL_ERR_INVALID, "lora_attach: rank %" PRId64 ", alpha %g, dropout %g, layers [%" PRId64 ", %" PRId64
                         "), targets 0x%x or init %d out of range", d.rank, (double)d.alpha, (double)d.dropout, d.layer_from,
                         d.layer_to, (unsigned)d.targets, (int)d.init);
    if (m->merged) return ctl__fail(ctx, CTL_ERR_INVALID, "lora_attach: the adapters are merged; unmerge first");
    if (m->cfg.tied_embeddings && (d.targets & (CTL_LINEAR_HEAD | CTL_LINEAR_EMBED)))
        return ctl__fail(ctx, CTL_ERR_UNSUPPORTED, "lora_attach: the head and embeddings are tied in this model; "
                         "CTL_LINEAR_HEAD and CTL_LINEAR_EMBED need untied ones");
    // LoRA's alpha / r (Hu et al. 2021), or rsLoRA's alpha / sqrt(r) (Kalajdzievski 2023), which
    // keeps the update's scale from shrinking as the rank grows.
    float scale = d.rslora ? d.alpha / sqrtf((float)d.rank) : d.alpha / (float)d.rank;
    int64_t n_targets = 0;
    for (int64_t i = 0; i < m->n_base; i++) {
        uint32_t bits = ctl__param_linear(m, i);
        if (!(bits & d.targets) || !ctl__in_layers(ctl__param_layer(m->params[i].name), d.layer_from, d.layer_to)) continue;
        if (m->adapter_of[i] >= 0 && m->adapters[m->adapter_of[i]].lora_a >= 0)
            return ctl__fail(ctx, CTL_ERR_INVALID, "lora_attach: '%s' has a LoRA already", m->params[i].name);
        // DoRA rescales each whole row of W + s B A; where a sparse delta would enter that formula is
        // not defined here, so the pair is refused.
        if (m->adapter_of[i] >= 0 && d.dora)
            return ctl__fail(ctx, CTL_ERR_UNSUPPORTED, "lora_attach: '%s' has a sparse delta; DoRA does not combine with one", m->params[i].name);
        if (d.dora && (bits & (CTL_LINEAR_HEAD | CTL_LINEAR_EMBED)))
            return ctl__fail(ctx, CTL_ERR_UNSUPPORTED, "lora_attach: DoRA on '%s' (cotlab has DoRA on block layers only)", m->params[i].name);
        const ctl_tensor *w = &m->params[i].value;
        // B A has rank at most min(out, in): a larger rank only adds parameters and cost.
        if (d.rank > CTL__MIN(w->shape[0], w->shape[1]))
            return ctl__fail(ctx, CTL_ERR_RANGE, "lora_attach: rank %" PRId64 " exceeds '%s' (%" PRId64 " x %" PRId64 "): a rank above the "
                             "smaller side adds nothing", d.rank, m->params[i].name, w->shape[0], w->shape[1]);
        n_targets++;
    }
    if (n_targets == 0) return ctl__fail(ctx, CTL_ERR_INVALID, "lora_attach: no weight matches targets 0x%x in layers [%" PRId64 ", %" PRId64 ")",
                                         (unsigned)d.targets, d.layer_from, d.layer_to);
    ctl_rng rng;
    ctl_rng_seed(&rng, d.seed);
    const int64_t n_adapters0 = m->n_adapters, n_params0 = m->n_params, n_extra0 = m->n_extra;
    for (int64_t i = 0; i < m->n_base; i++) {
        uint32_t bits = ctl__param_linear(m, i);
        if (!(bits & d.targets) || !ctl__in_layers(ctl__param_layer(m->params[i].name), d.layer_from, d.layer_to)) continue;
        ctl_status st = ctl__lora_add(m, i, d.rank, scale, d.dropout, d.dora, d.init, &rng);
        if (st) return ctl__adapters_truncate(m, n_adapters0, n_params0, n_extra0), st;   // out of memory: none attached
    }
    // Attaching freezes the whole base, norms included, as PEFT does; ctl_model_set_trainable
    // unfreezes parts of it again.
    for (int64_t i = 0; i < m->n_base; i++) m->params[i].trainable = false;
    // The resolved alpha (defaults filled in) is what the adapter files record. m->lora describes
    // the last attach only: a model with attaches of several ranks has no single rank to export.
    d.alpha = d.rslora ? scale * sqrtf((float)d.rank) : scale * (float)d.rank;
    m->lora = d;
    return CTL_OK;
}

// ---- sparse deltas ---------------------------------------------------------------------------

typedef struct ctl__score { float s; int64_t i; } ctl__score;

// The index tie-break makes the selection a total order, so qsort (not stable) picks the same
// entries on every platform.
static int ctl__score_cmp(const void *a, const void *b) {   // high score first, then low index
    const ctl__score *x = (const ctl__score *)a, *y = (const ctl__score *)b;
    bool xn = isnan(x->s), yn = isnan(y->s);   // a NaN (from NaN gradients) is the lowest: an order qsort can keep
    if (xn != yn) return xn ? 1 : -1;
    if (!xn && x->s != y->s) return x->s > y->s ? -1 : 1;
    return (x->i > y->i) - (x->i < y->i);
}

static int ctl__i64_cmp(const void *a, const void *b) {
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return (x > y) - (x < y);
}

// Fills the desc's defaults (1% density, every block linear layer) and checks its ranges.
static ctl_status ctl__sparse_check(ctl_model *m, ctl_sparse_desc *d, const char *who) {
    if (d->density == 0.0f) d->density = 0.01f;
    if (d->targets == 0) d->targets = CTL_LINEAR_ALL;
    if (!(d->density > 0.0f && d->density <= 1.0f) || d->layer_from < 0 || d->layer_to < d->layer_from ||
        (d->targets & ~(uint32_t)(CTL_LINEAR_ALL | CTL_LINEAR_HEAD | CTL_LINEAR_EMBED)) || (unsigned)d->select > (unsigned)CTL_SPARSE_RANDOM)
        return ctl__fail(m->ctx, CTL_ERR_INVALID, "%s: density %g, layers [%" PRId64 ", %" PRId64 "), targets 0x%x or select %d out of range",
                         who, (double)d->density, d->layer_from, d->layer_to, (unsigned)d->targets, (int)d->select);
    return CTL_OK;
}

// Whether base weight i is among d's targets and layers.
static bool ctl__sparse_targeted(const ctl_model *m, const ctl_sparse_desc *d, int64_t i) {
    return (ctl__param_linear(m, i) & d->targets) && ctl__in_layers(ctl__param_layer(m->params[i].name), d->layer_from, d->layer_to);
}

// Gives adapter ad the sparse delta of parameter `values` at the ascending flat indices idx
// (K of them, taken over), of a matrix with `cols` columns.
static ctl_status ctl__sparse_set(ctl_model *m, ctl__adapter *ad, int64_t values, int64_t *idx, int64_t K, int64_t cols) {
    // idx is owned by the adapter from here, even on failure: ctl__adapters_truncate frees it.
    ad->sparse = values, ad->sparse_idx = idx, ad->n_sparse = K;
    ad->sparse_row = (int32_t *)ctl_alloc(m->ctx, (size_t)K * sizeof(int32_t));
    ad->sparse_col = (int32_t *)ctl_alloc(m->ctx, (size_t)K * sizeof(int32_t));
    if (!ad->sparse_row || !ad->sparse_col) return ctl__fail(m->ctx, CTL_ERR_OUT_OF_MEMORY, "sparse delta: out of memory");
    // The kernels take (row, col) pairs. int32 holds a side of any real weight; the config's bounds
    // (n_embd, n_ff below 2^24) do not cover n_head * head_dim, which could in principle pass 2^31.
    for (int64_t k = 0; k < K; k++) ad->sparse_row[k] = (int32_t)(idx[k] / cols), ad->sparse_col[k] = (int32_t)(idx[k] % cols);
    return CTL_OK;
}

// A sparse delta trains K = density * rows * cols chosen entries of each targeted weight, as in
// the sparse fine-tuning papers (LT-SFT, LIFT's top-k). The check pass refuses before anything
// is attached; the attach pass scores every entry, keeps the top K and sorts their indices.
CTL_API ctl_status ctl_sparse_attach(ctl_model *m, const ctl_sparse_desc *desc) {
    if (!CTL__ARGS(NULL, m)) return CTL_ERR_INVALID;
    ctl_ctx *ctx = m->ctx;
    ctl_sparse_desc d;
    memset(&d, 0, sizeof d);
    if (desc) d = *desc;
    ctl_status st = ctl__sparse_check(m, &d, "sparse_attach");
    if (st) return st;
    if (m->merged) return ctl__fail(ctx, CTL_ERR_INVALID, "sparse_attach: the adapters are merged; unmerge first");
    int64_t n_targets = 0;
    for (int64_t i = 0; i < m->n_base; i++) {
        if (!ctl__sparse_targeted(m, &d, i)) continue;
        const ctl__adapter *ad = m->adapter_of[i] >= 0 ? &m->adapters[m->adapter_of[i]] : NULL;
        if (ad && (ad->sparse >= 0 || ad->dora_m >= 0))
            return ctl__fail(ctx, CTL_ERR_INVALID, "sparse_attach: '%s' has a %s already", m->params[i].name, ad->sparse >= 0 ? "sparse delta" : "DoRA");
        if (ctl__param_linear(m, i) & (CTL_LINEAR_HEAD | CTL_LINEAR_EMBED))
            return ctl__fail(ctx, CTL_ERR_UNSUPPORTED, "sparse_attach: '%s' (cotlab has sparse deltas on block layers only)", m->params[i].name);
        if (d.select == CTL_SPARSE_GRADIENT && !(m->scores && m->scores[i]))
            return ctl__fail(ctx, CTL_ERR_INVALID, "sparse_attach: no gradient scores for '%s' (run ctl_sparse_calibrate with these targets first)",
                             m->params[i].name);
        n_targets++;
    }
    if (n_targets == 0) return ctl__fail(ctx, CTL_ERR_INVALID, "sparse_attach: no weight matches targets 0x%x", (unsigned)d.targets);
    ctl_rng rng;
    ctl_rng_seed(&rng, d.seed);
    const int64_t n_adapters0 = m->n_adapters, n_params0 = m->n_params, n_extra0 = m->n_extra;
    for (int64_t i = 0; i < m->n_base && !st; i++) {
        if (!ctl__sparse_targeted(m, &d, i)) continue;
        const ctl_tensor *w = &m->params[i].value;
        int64_t rows = w->shape[0], cols = w->shape[1], n = rows * cols;
        // At least one entry, so that every targeted weight gets a delta.
        int64_t K = CTL__MAX((int64_t)1, (int64_t)((double)d.density * (double)n + 0.5));
        // Scoring is a full sort of the weight's n entries: 16 bytes and O(n log n) per weight, once.
        ctl__score *sc = (ctl__score *)ctl_alloc(ctx, (size_t)n * sizeof(ctl__score));
        int64_t *idx = (int64_t *)ctl_alloc(ctx, (size_t)K * sizeof(int64_t));
        float *buf = (float *)ctl_alloc(ctx, (size_t)cols * sizeof(float));
        if (!sc || !idx || !buf) {
            ctl_free(ctx, sc), ctl_free(ctx, idx), ctl_free(ctx, buf);
            st = ctl__fail(ctx, CTL_ERR_OUT_OF_MEMORY, "sparse_attach: out of memory scoring '%s'", m->params[i].name);
            break;
        }
        for (int64_t r = 0; r < rows; r++) {
            // Scores: |W| (magnitude), accumulated |gradient| from ctl_sparse_calibrate, or uniform
            // noise (random). The rng is drawn in entry order, so a seed picks the same entries anywhere.
            const float *row = d.select == CTL_SPARSE_MAGNITUDE ? ctl__weight_row(m, i, r, buf) : NULL;
            for (int64_t c = 0; c < cols; c++) {
                int64_t k = r * cols + c;
                sc[k].i = k;
                sc[k].s = d.select == CTL_SPARSE_MAGNITUDE ? fabsf(row[c]) : d.select == CTL_SPARSE_GRADIENT ? m->scores[i][k] : ctl_rng_uniform(&rng);
            }
        }
        qsort(sc, (size_t)n, sizeof *sc, ctl__score_cmp);
        for (int64_t k = 0; k < K; k++) idx[k] = sc[k].i;
        // Ascending indices: row-major order, as the adapter record promises and the files store them.
        qsort(idx, (size_t)K, sizeof *idx, ctl__i64_cmp);
        ctl_free(ctx, sc), ctl_free(ctx, buf);
        char name[1][64];
        int64_t d0 = K, d1 = 0;
        snprintf(name[0], 64, "%.55s.sparse", m->params[i].name);
        int64_t at = ctl__add_params(m, 1, name, &d0, &d1);
        ctl__adapter *ad = at < 0 ? NULL : ctl__adapter_for(m, i);
        if (!ad) {
            ctl_free(ctx, idx);
            st = at < 0 ? CTL_ERR_OUT_OF_MEMORY : ctl__fail(ctx, CTL_ERR_OUT_OF_MEMORY, "sparse_attach: out of memory");
            break;
        }
        m->params[at].decay = false;   // a delta: decaying it would pull towards the base, not towards 0 weights
        st = ctl__sparse_set(m, ad, at, idx, K, cols);
    }
    if (st) return ctl__adapters_truncate(m, n_adapters0, n_params0, n_extra0), st;   // out of memory: none attached
    for (int64_t i = 0; i < m->n_base; i++) m->params[i].trainable = false;
    return CTL_OK;
}

// ---- freezing, switching, merging ------------------------------------------------------------

// Base parameters only (adapter parameters keep their flags). Tensors outside the blocks
// (embeddings, head, final norm) are matched only when all layers are selected.
CTL_API int64_t ctl_model_set_trainable(ctl_model *m, uint32_t kinds, int64_t layer_from, int64_t layer_to, bool trainable) {
    if (!CTL__ARGS(NULL, m)) return 0;
    int64_t n = 0;
    for (int64_t i = 0; i < m->n_base; i++) {
        ctl_param *p = &m->params[i];
        int64_t layer = ctl__param_layer(p->name);
        bool all_layers = layer_from == 0 && layer_to == 0;
        if (!(ctl__param_kind(m, i) & kinds) || (layer < 0 ? !all_layers : !ctl__in_layers(layer, layer_from, layer_to))) continue;
        // A quantised or bf16 weight cannot be trained (no fp32 values to update): it stays frozen.
        if (trainable && p->value.dtype != CTL_F32) continue;
        p->trainable = trainable, n++;
    }
    m->structure++;
    return n;
}

// Plain backtracking: exponential in the number of '*' at worst, harmless on 64-byte names.
static bool ctl__glob(const char *pat, const char *s) {   // '*' matches any run, '?' one character
    if (!*pat) return !*s;
    if (*pat == '*') return ctl__glob(pat + 1, s) || (*s && ctl__glob(pat, s + 1));
    return *s && (*pat == '?' || *pat == *s) && ctl__glob(pat + 1, s + 1);
}

CTL_API int64_t ctl_model_set_trainable_match(ctl_model *m, const char *pattern, bool trainable) {
    if (!CTL__ARGS(m ? m->ctx : NULL, m && pattern)) return 0;
    int64_t n = 0;
    for (int64_t i = 0; i < m->n_params; i++) {
        ctl_param *p = &m->params[i];
        if (!ctl__glob(pattern, p->name) || (trainable && p->value.dtype != CTL_F32)) continue;
        p->trainable = trainable, n++;
    }
    m->structure++;
    return n;
}

// Off, the model computes its base (TRL's reference model for a PEFT policy); the version moves
// because what the weights compute changed, though no byte of them did.
CTL_API void ctl_adapters_enable(ctl_model *m, bool on) {
    if (!CTL__ARGS(NULL, m)) return;
    if (m->adapters_on != on) m->adapters_on = on, m->version++;
}

// The dense delta of adapter a, W_eff - W (rows, cols), into out; DoRA gives m/n (.) (W + sBA) - W.
// rowbuf: 2 * cols floats per thread for DoRA's norms, then `rows` more for the norms
// themselves. Used by export, merge and compose, never in a forward: its cost (a dense product
// of the full weight's size) is paid once per call.
static void ctl__adapter_delta(ctl_ctx *ctx, const ctl_model *m, const ctl__adapter *ad, float *out, float *rowbuf) {
    const ctl_tensor *w = &m->params[ad->base].value;
    bool embed = ad->base == m->tok_embd && !m->cfg.tied_embeddings;
    int64_t rows = w->shape[0], cols = w->shape[1];
    memset(out, 0, (size_t)(rows * cols) * sizeof(float));
    if (ad->lora_a >= 0) {
        const float *A = ctl__pf(m, ad->lora_a), *B = ctl__pf(m, ad->lora_b);
        if (embed)   // E (V, C) += scale * A (V, r) B^T (r, C)
            ctl_gemm(ctx, rows, cols, ad->rank, A, ad->rank, 1, B, 1, ad->rank, out, cols, false);
        else         // W (out, in) += scale * B (out, r) A (r, in)
            ctl_gemm(ctx, rows, cols, ad->rank, B, ad->rank, 1, A, cols, 1, out, cols, false);
        for (int64_t k = 0; k < rows * cols; k++) out[k] *= ad->scale;
    }
    // W + s B A is out + W, so the delta becomes g (W + out) - W with g = m / ||W + s B A|| per row.
    if (ad->dora_m >= 0) {
        float *nrm = rowbuf + (size_t)ctx->n_threads * 2 * (size_t)cols;
        ctl__dora_norms(ctx, m, ad, rowbuf, nrm, NULL);
        const float *mag = ctl__pf(m, ad->dora_m);
        for (int64_t o = 0; o < rows; o++) {
            const float *wr = ctl__weight_row(m, ad->base, o, rowbuf);
            float g = mag[o] / nrm[o];
            for (int64_t c = 0; c < cols; c++) out[o * cols + c] = g * (wr[c] + out[o * cols + c]) - wr[c];
        }
    }
    // A sparse delta adds at its entries (never with DoRA: attach refuses that pair).
    for (int64_t k = 0; ad->sparse >= 0 && k < ad->n_sparse; k++) out[ad->sparse_idx[k]] += ctl__pf(m, ad->sparse)[k];
}

// Merging adds each adapter's delta into its fp32 base in place (inference at base cost), and
// unmerging subtracts it again. The result is within float rounding of the original, not
// bit-exact. While merged the forward skips the adapters (ctl__arun.on) and attaching refuses.
static ctl_status ctl__merge(ctl_model *m, bool merge) {
    ctl_ctx *ctx = m->ctx;
    const char *who = merge ? "adapters_merge" : "adapters_unmerge";
    if (m->merged == merge) return ctl__fail(ctx, CTL_ERR_INVALID, "%s: the adapters are %smerged already", who, merge ? "" : "un");
    size_t most = 0;
    for (int64_t a = 0; a < m->n_adapters; a++) {
        const ctl_tensor *w = &m->params[m->adapters[a].base].value;
        if (w->dtype != CTL_F32)
            return ctl__fail(ctx, CTL_ERR_UNSUPPORTED, "%s: '%s' is stored %s; only fp32 bases merge in place (ctl_model_save_gguf writes merged weights)",
                             who, m->params[m->adapters[a].base].name, ctl_dtype_name(w->dtype));
        // Scratch for the largest weight: its delta, DoRA's row buffers, its row norms.
        most = CTL__MAX(most, (size_t)ctl_tensor_numel(w) + (size_t)(2 * ctx->n_threads) * (size_t)w->shape[1] + (size_t)w->shape[0]);
    }
    float *tmp = (float *)ctl_alloc(ctx, most * sizeof(float));
    if (!tmp) return ctl__fail(ctx, CTL_ERR_OUT_OF_MEMORY, "%s: out of memory", who);
    // DoRA keeps n = ||W + sBA|| while merged (W' alone cannot give it back: its rows have norm |m|). Its memory is
    // taken before any weight changes, so running out leaves the model as it was.
    for (int64_t a = 0; merge && a < m->n_adapters; a++) {
        ctl__adapter *ad = &m->adapters[a];
        if (ad->dora_m >= 0 && !(ad->dora_n = (float *)ctl_alloc(ctx, (size_t)m->params[ad->base].value.shape[0] * sizeof(float)))) {
            for (int64_t b = 0; b < a; b++) ctl_free(ctx, m->adapters[b].dora_n), m->adapters[b].dora_n = NULL;
            ctl_free(ctx, tmp);
            return ctl__fail(ctx, CTL_ERR_OUT_OF_MEMORY, "%s: out of memory", who);
        }
    }
    for (int64_t a = 0; a < m->n_adapters; a++) {
        ctl__adapter *ad = &m->adapters[a];
        float *w = ctl__pf(m, ad->base), *rowbuf = tmp + ctl_tensor_numel(&m->params[ad->base].value);
        int64_t rows = m->params[ad->base].value.shape[0], cols = m->params[ad->base].value.shape[1], n = rows * cols;
        if (merge && ad->dora_m >= 0) ctl__dora_norms(ctx, m, ad, rowbuf, ad->dora_n, NULL);
        if (!merge && ad->dora_m >= 0) {   // W = W' n / m - s B A
            const float *A = ctl__pf(m, ad->lora_a), *B = ctl__pf(m, ad->lora_b), *mag = ctl__pf(m, ad->dora_m);
            ctl_gemm(ctx, rows, cols, ad->rank, B, ad->rank, 1, A, cols, 1, tmp, cols, false);
            for (int64_t o = 0; o < rows; o++)
                for (int64_t c = 0; c < cols; c++) w[o * cols + c] = w[o * cols + c] * (ad->dora_n[o] / mag[o]) - ad->scale * tmp[o * cols + c];
            ctl_free(ctx, ad->dora_n);
            ad->dora_n = NULL;
            continue;
        }
        // Unmerging them subtracts the same delta; a DoRA delta does depend on W and is undone above.
        ctl__adapter_delta(ctx, m, ad, tmp, rowbuf);   // LoRA and sparse deltas do not depend on W
        for (int64_t k = 0; k < n; k++) w[k] = merge ? w[k] + tmp[k] : w[k] - tmp[k];
    }
    ctl_free(ctx, tmp);
    m->merged = merge;
    m->structure++, m->version++;
    return CTL_OK;
}

CTL_API ctl_status ctl_adapters_merge(ctl_model *m) { return CTL__ARGS(NULL, m) ? ctl__merge(m, true) : CTL_ERR_INVALID; }
CTL_API ctl_status ctl_adapters_unmerge(ctl_model *m) { return CTL__ARGS(NULL, m) ? ctl__merge(m, false) : CTL_ERR_INVALID; }

// ---- adapter files ---------------------------------------------------------------------------

// The Hugging Face module of base weight i ("model.layers.3.self_attn.q_proj"), false if none.
// PEFT names a LoRA by the module it wraps: the parameter's HF name without ".weight".
static bool ctl__hf_module(const ctl_model *m, int64_t i, char *out, size_t cap) {
    bool tr;
    if (!ctl__hf_name(m->cfg.arch, m->params[i].name, out, cap, &tr)) return false;
    size_t n = strlen(out);
    if (n > 7 && !strcmp(out + n - 7, ".weight")) out[n - 7] = 0;
    return true;
}

// Whether B's rows (and DoRA's magnitudes) of weight i travel reordered between the model's
// RoPE layout and `layout`: llama q and k whose layouts differ.
static bool ctl__qk_reorder(const ctl_model *m, int64_t i, ctl_rope_layout layout) {
    return ctl__is_qk(m, m->params[i].name) && m->cfg.rope_layout != layout;
}

// Rows of x (rows, cols) into out in `layout`'s order (from the model's), or copied.
static void ctl__rows_layout(const ctl_model *m, int64_t i, ctl_rope_layout layout, float *out, const float *x, int64_t rows, int64_t cols) {
    if (!ctl__qk_reorder(m, i, layout)) memcpy(out, x, (size_t)(rows * cols) * sizeof(float));
    else if (layout == CTL_ROPE_HALVES) ctl__rows_to_halves(out, x, rows, cols, m->cfg.head_dim);
    else ctl__rows_to_adjacent(out, x, rows, cols, m->cfg.head_dim);
}

// What a format cannot carry: DoRA (llama.cpp), sparse deltas (both), gpt2's separate q/k/v.
// gpt2 files fuse q, k, v into c_attn, so a LoRA on a separate q (or k, v) has no module to
// attach to in them. Checked over every adapter before anything is written.
static ctl_status ctl__lora_exportable(const ctl_model *m, bool dora_ok, const char *who) {
    int64_t n = 0;
    for (int64_t a = 0; a < m->n_adapters; a++) {
        const ctl__adapter *ad = &m->adapters[a];
        const char *name = m->params[ad->base].name;
        if (ad->sparse >= 0)
            return ctl__fail(m->ctx, CTL_ERR_UNSUPPORTED, "%s: '%s' has a sparse delta, which a LoRA file cannot hold (save the merged model)", who, name);
        if (ad->dora_m >= 0 && !dora_ok)
            return ctl__fail(m->ctx, CTL_ERR_UNSUPPORTED, "%s: '%s' has DoRA, which llama.cpp does not apply (save the merged model)", who, name);
        if (m->cfg.arch == CTL_ARCH_GPT2 && m->cfg.separate_qkv && strstr(name, ".attn_") && !strstr(name, ".attn_output"))
            return ctl__fail(m->ctx, CTL_ERR_UNSUPPORTED, "%s: '%s': gpt2 with separate q/k/v has no such layer in the file's model", who, name);
        if (m->merged) return ctl__fail(m->ctx, CTL_ERR_INVALID, "%s: the adapters are merged; unmerge first", who);
        n += ad->lora_a >= 0;
    }
    return n ? CTL_OK : ctl__fail(m->ctx, CTL_ERR_INVALID, "%s: the model has no LoRA", who);
}

// An adapter GGUF llama.cpp's --lora loads: per adapted weight "<name>.lora_a" and
// "<name>.lora_b", B's rows in the GGUF RoPE layout (adjacent) to match the base GGUF's q and k.
CTL_API ctl_status ctl_lora_save_llamacpp(const ctl_model *m, const char *path) {
    if (!CTL__ARGS(m ? m->ctx : NULL, m && path)) return CTL_ERR_INVALID;
    ctl_ctx *ctx = m->ctx;
    ctl_status st = ctl__lora_exportable(m, false, "lora_save_llamacpp");
    if (st) return st;
    // llama.cpp scales each tensor by alpha / its rank from one file-wide alpha: the adapters must
    // share one scale and one rank for a single alpha = scale * rank to give every one its scale.
    float scale = 0.0f, *tmp = NULL;
    int64_t rank = 0;
    for (int64_t a = 0; a < m->n_adapters; a++) {
        const ctl__adapter *ad = &m->adapters[a];
        if (scale != 0.0f && ad->scale != scale)
            return ctl__fail(ctx, CTL_ERR_UNSUPPORTED, "lora_save_llamacpp: the adapters' scales differ (%g, %g); llama.cpp takes one alpha",
                             (double)scale, (double)ad->scale);
        if (rank && ad->rank != rank)
            return ctl__fail(ctx, CTL_ERR_UNSUPPORTED, "lora_save_llamacpp: the adapters' ranks differ (%" PRId64 ", %" PRId64 "); llama.cpp "
                             "divides one alpha by each rank", rank, ad->rank);
        scale = ad->scale, rank = ad->rank;
    }
    ctl_gguf_writer *w;
    const char *arch = m->cfg.arch == CTL_ARCH_GPT2 ? "gpt2" : "llama";
    if ((st = ctl_gguf_writer_init(ctx, &w))) return st;
    st = ctl_gguf_writer_set_str(w, "general.architecture", arch, strlen(arch));
    if (!st) st = ctl_gguf_writer_set_str(w, "general.type", "adapter", 7);
    if (!st) st = ctl_gguf_writer_set_str(w, "adapter.type", "lora", 4);
    // llama.cpp scales by alpha / rank (rank = lora_b's ne[0]): alpha = scale * rank keeps ours
    if (!st) st = ctl_gguf_writer_set_f32(w, "adapter.lora.alpha", scale * (float)m->adapters[0].rank);
    for (int64_t a = 0; a < m->n_adapters && !st; a++) {
        const ctl__adapter *ad = &m->adapters[a];
        const ctl_tensor *A = &m->params[ad->lora_a].value, *B = &m->params[ad->lora_b].value;
        char name[80];
        int64_t ne[2];
        if (ad->lora_a < 0) continue;
        ctl_free(ctx, tmp);
        if (!(tmp = (float *)ctl_alloc(ctx, (size_t)ctl_tensor_numel(B) * sizeof(float)))) {
            st = ctl__fail(ctx, CTL_ERR_OUT_OF_MEMORY, "lora_save_llamacpp: out of memory");
            break;
        }
        ctl__rows_layout(m, ad->base, CTL_ROPE_ADJACENT, tmp, (const float *)B->data, B->shape[0], B->shape[1]);
        snprintf(name, sizeof name, "%s.lora_a", m->params[ad->base].name);
        ne[0] = A->shape[1], ne[1] = A->shape[0];   // (rank, in) as ne [in, rank]; the embedding's (V, rank) as [rank, V]
        st = ctl_gguf_writer_add_tensor(w, name, CTL_GGML_F32, 2, ne, (const float *)A->data);
        snprintf(name, sizeof name, "%s.lora_b", m->params[ad->base].name);
        ne[0] = B->shape[1], ne[1] = B->shape[0];   // (out, rank) as ne [rank, out]
        if (!st) st = ctl_gguf_writer_add_tensor(w, name, CTL_GGML_F32, 2, ne, tmp);
    }
    ctl_free(ctx, tmp);
    if (!st) st = ctl_gguf_writer_save(w, path);
    ctl_gguf_writer_free(w);
    return st;
}

// "<dir>/<file>" into out (false if too long).
static bool ctl__path(char *out, size_t cap, const char *dir, const char *file) {
    return snprintf(out, cap, "%s/%s", dir, file) < (int)cap;
}

// cotlab's adapter file and PEFT's config hold one rank, alpha, dropout and DoRA flag for every LoRA: those of
// m->lora, the last attach. A LoRA attached with other settings would be written under the wrong ones (and, for
// another rank, not load again), so it is refused. (The scale is compared to rounding: alpha is kept as scale * rank.)
static ctl_status ctl__lora_uniform(const ctl_model *m, const char *who) {
    const ctl_lora_desc *l = &m->lora;
    float scale = l->rank < 1 ? 0.0f : l->rslora ? l->alpha / sqrtf((float)l->rank) : l->alpha / (float)l->rank;
    for (int64_t a = 0; a < m->n_adapters; a++) {
        const ctl__adapter *ad = &m->adapters[a];
        if (ad->lora_a < 0) continue;
        if (ad->rank != l->rank || fabsf(ad->scale - scale) > 1e-6f * fabsf(scale) || ad->dropout != l->dropout || (ad->dora_m >= 0) != l->dora)
            return ctl__fail(m->ctx, CTL_ERR_UNSUPPORTED, "%s: the LoRA on '%s' (rank %" PRId64 ", scale %g, dropout %g%s) differs from the last "
                             "attach's (rank %" PRId64 ", scale %g, dropout %g%s); the file holds one setting for all", who, m->params[ad->base].name,
                             ad->rank, (double)ad->scale, (double)ad->dropout, ad->dora_m >= 0 ? ", DoRA" : "", l->rank, (double)scale,
                             (double)l->dropout, l->dora ? ", DoRA" : "");
    }
    return CTL_OK;
}

// A PEFT adapter directory: adapter_model.safetensors ("base_model.model.<module>.lora_A.weight"
// (rank, in), "...lora_B.weight" (out, rank), DoRA's "lora_magnitude_vector" (out)) and
// adapter_config.json. q's and k's B rows (and magnitudes) go to HF's "halves" RoPE layout. The
// config's r, lora_alpha and use_dora come from m->lora: the last attach's.
CTL_API ctl_status ctl_lora_save_peft(const ctl_model *m, const char *dir) {
    if (!CTL__ARGS(m ? m->ctx : NULL, m && dir)) return CTL_ERR_INVALID;
    ctl_ctx *ctx = m->ctx;
    const char *who = "lora_save_peft";
    ctl_status st = ctl__lora_exportable(m, true, who);
    if (!st) st = ctl__lora_uniform(m, who);
    if (st) return st;
    char path[1024], module[160], key[256];
    if (!ctl__path(path, sizeof path, dir, "adapter_model.safetensors")) return ctl__fail(ctx, CTL_ERR_INVALID, "%s: path too long", who);
    if (mkdir(dir, 0755) && errno != EEXIST) return ctl__fail(ctx, CTL_ERR_IO, "%s: cannot make directory '%s'", who, dir);
    ctl_safetensors_writer *w;
    if ((st = ctl_safetensors_writer_init(ctx, &w))) return st;
    st = ctl_safetensors_writer_set_str(w, "format", "pt");
    ctl__text cfg;   // adapter_config.json, the keys in sorted order as PEFT writes them
    memset(&cfg, 0, sizeof cfg);
    cfg.ctx = ctx;
    float *tmp = NULL;
    ctl__text_str(&cfg, "{\n  \"bias\": \"none\",\n  \"fan_in_fan_out\": ");
    // GPT-2's HF layers are Conv1D, stored (in, out): PEFT must be told with fan_in_fan_out.
    ctl__text_str(&cfg, m->cfg.arch == CTL_ARCH_GPT2 ? "true" : "false");
    ctl__text_str(&cfg, ",\n  \"inference_mode\": true,\n  \"init_lora_weights\": true,\n  \"lora_alpha\": ");
    snprintf(key, sizeof key, "%.9g,\n  \"lora_dropout\": %.9g,\n  \"peft_type\": \"LORA\",\n  \"r\": %" PRId64 ",\n  \"target_modules\": [",
             (double)m->lora.alpha, (double)m->lora.dropout, m->lora.rank);
    ctl__text_str(&cfg, key);
    for (int64_t a = 0, k = 0; a < m->n_adapters && !st; a++) {
        const ctl__adapter *ad = &m->adapters[a];
        if (ad->lora_a < 0) continue;
        if (!ctl__hf_module(m, ad->base, module, sizeof module)) {
            st = ctl__fail(ctx, CTL_ERR_UNSUPPORTED, "%s: no Hugging Face name for '%s'", who, m->params[ad->base].name);
            break;
        }
        ctl__text_str(&cfg, k++ ? ",\n    " : "\n    "), ctl__text_json(&cfg, module);
        const ctl_tensor *A = &m->params[ad->lora_a].value, *B = &m->params[ad->lora_b].value;
        bool embed = ad->base == m->tok_embd;
        int64_t R = ad->rank, n = CTL__MAX(ctl_tensor_numel(A), ctl_tensor_numel(B));
        ctl_free(ctx, tmp);
        if (!(tmp = (float *)ctl_alloc(ctx, (size_t)n * sizeof(float)))) {
            st = ctl__fail(ctx, CTL_ERR_OUT_OF_MEMORY, "%s: out of memory", who);
            break;
        }
        int64_t shape[2];
        if (embed) {   // PEFT keeps the embedding's A as (rank, V): ours transposed
            for (int64_t v = 0; v < A->shape[0]; v++)
                for (int64_t j = 0; j < R; j++) tmp[j * A->shape[0] + v] = ((const float *)A->data)[v * R + j];
            shape[0] = R, shape[1] = A->shape[0];
            snprintf(key, sizeof key, "base_model.model.%s.lora_embedding_A", module);
            st = ctl_safetensors_writer_add_tensor(w, key, CTL_SAFETENSORS_F32, 2, shape, tmp);
            snprintf(key, sizeof key, "base_model.model.%s.lora_embedding_B", module);
            if (!st) st = ctl_safetensors_writer_add_tensor(w, key, CTL_SAFETENSORS_F32, 2, B->shape, (const float *)B->data);
            continue;
        }
        snprintf(key, sizeof key, "base_model.model.%s.lora_A.weight", module);
        st = ctl_safetensors_writer_add_tensor(w, key, CTL_SAFETENSORS_F32, 2, A->shape, (const float *)A->data);
        // B's rows are W's output rows, so they follow W's RoPE permutation; A (over inputs) does not.
        ctl__rows_layout(m, ad->base, CTL_ROPE_HALVES, tmp, (const float *)B->data, B->shape[0], R);
        snprintf(key, sizeof key, "base_model.model.%s.lora_B.weight", module);
        if (!st) st = ctl_safetensors_writer_add_tensor(w, key, CTL_SAFETENSORS_F32, 2, B->shape, tmp);
        if (!st && ad->dora_m >= 0) {
            ctl__rows_layout(m, ad->base, CTL_ROPE_HALVES, tmp, ctl__pf(m, ad->dora_m), B->shape[0], 1);
            snprintf(key, sizeof key, "base_model.model.%s.lora_magnitude_vector", module);
            st = ctl_safetensors_writer_add_tensor(w, key, CTL_SAFETENSORS_F32, 1, B->shape, tmp);
        }
    }
    ctl_free(ctx, tmp);
    snprintf(key, sizeof key, "\n  ],\n  \"task_type\": \"CAUSAL_LM\",\n  \"use_dora\": %s,\n  \"use_rslora\": %s\n}\n",
             m->lora.dora ? "true" : "false", m->lora.rslora ? "true" : "false");
    ctl__text_str(&cfg, key);
    if (!st && cfg.oom) st = ctl__fail(ctx, CTL_ERR_OUT_OF_MEMORY, "%s: out of memory", who);
    if (!st && ctl__path(path, sizeof path, dir, "adapter_model.safetensors")) st = ctl_safetensors_writer_save(w, path);
    ctl_safetensors_writer_free(w);
    ctl__wfile wf;
    if (!st && ctl__path(path, sizeof path, dir, "adapter_config.json") && !(st = ctl__wfile_open(ctx, &wf, path, who)))   // the config last
        st = ctl__wfile_close(ctx, &wf, fwrite(cfg.p, 1, (size_t)cfg.n, wf.f) == (size_t)cfg.n);
    ctl_free(ctx, cfg.p);
    return st;
}


// cotlab's own adapter GGUF: every adapter kind, and what attaching it again takes. Its tensors
// are the adapter parameters under their own names; a sparse delta's entries are the metadata
// array "cotlab.sparse.<weight name>" (int64 flat indices).
// The rank, alpha, dropout, rsLoRA and DoRA flags are file-wide (m->lora); each LoRA's own rank
// is also in its tensors' shapes, which the reader checks against the file-wide one.
static ctl_status ctl__adapters_write(const ctl_model *m, ctl_gguf_writer *w) {
    const char *arch = m->cfg.arch == CTL_ARCH_GPT2 ? "gpt2" : "llama";
    ctl_status st = ctl__lora_uniform(m, "adapters");
    if (st) return st;
    st = ctl_gguf_writer_set_str(w, "general.architecture", arch, strlen(arch));
    uint8_t rslora = m->lora.rslora, dora = m->lora.dora;
    if (!st) st = ctl_gguf_writer_set_str(w, "general.type", "adapter", 7);
    if (!st) st = ctl_gguf_writer_set_u32(w, "cotlab.adapter.format", 1);
    if (!st) st = ctl_gguf_writer_set_u32(w, "cotlab.lora.rank", (uint32_t)m->lora.rank);
    if (!st) st = ctl_gguf_writer_set_f32(w, "cotlab.lora.alpha", m->lora.alpha);
    if (!st) st = ctl_gguf_writer_set_f32(w, "cotlab.lora.dropout", m->lora.dropout);
    if (!st) st = ctl_gguf_writer_set(w, "cotlab.lora.rslora", CTL_GGUF_BOOL, &rslora);
    if (!st) st = ctl_gguf_writer_set(w, "cotlab.lora.dora", CTL_GGUF_BOOL, &dora);
    for (int64_t i = m->n_base; i < m->n_params && !st; i++) {
        const ctl_tensor *v = &m->params[i].value;
        // ne innermost first: (rows, cols) is written [cols, rows]; a vector's ne[1] is unused (ndim 1).
        int64_t ne[2] = {v->ndim == 2 ? v->shape[1] : v->shape[0], v->shape[0]};
        st = ctl_gguf_writer_add_tensor(w, m->params[i].name, CTL_GGML_F32, v->ndim, ne, (const float *)v->data);
    }
    for (int64_t a = 0; a < m->n_adapters && !st; a++) {
        const ctl__adapter *ad = &m->adapters[a];
        char key[96];
        if (ad->sparse < 0) continue;
        snprintf(key, sizeof key, "cotlab.sparse.%s", m->params[ad->base].name);
        st = ctl_gguf_writer_set_array(w, key, CTL_GGUF_I64, ad->sparse_idx, (uint64_t)ad->n_sparse);
    }
    return st;
}

// The base weight an adapter tensor adapts ("blk.0.attn_q.weight.lora_a": its index, and kind
// 'a', 'b', 'm' or 's'), or -1.
// A linear scan of the base names per tensor: quadratic in the parameter count, at load only.
static int64_t ctl__adapter_tensor(const ctl_model *m, const char *name, char *kind) {
    static const char *const suffix[4] = {".lora_a", ".lora_b", ".lora_m", ".sparse"};
    size_t n = strlen(name);
    for (int k = 0; k < 4; k++) {
        size_t sl = strlen(suffix[k]);
        if (n <= sl || strcmp(name + n - sl, suffix[k])) continue;
        for (int64_t i = 0; i < m->n_base; i++)
            if (strlen(m->params[i].name) == n - sl && !strncmp(m->params[i].name, name, n - sl)) return *kind = "abms"[k], i;
    }
    return -1;
}

// What a checkpoint holds besides adapters (ctl_train_save): AdamW moments, and trained base
// weights under their own names.
static bool ctl__skip_in_adapters(const ctl_model *m, const char *name) {
    if (ctl__ends_with(name, ".adam_m") || ctl__ends_with(name, ".adam_v")) return true;
    for (int64_t i = 0; i < m->n_base; i++)
        if (!strcmp(m->params[i].name, name)) return true;
    return false;
}

// The LoRA settings of an adapter file: the cotlab.lora.* keys, required even in a file of sparse deltas only.
typedef struct ctl__adapter_hdr {
    int64_t rank;
    double alpha, dropout;
    bool rslora, dora;
} ctl__adapter_hdr;

// The header of cotlab's adapter GGUF g: its architecture must be m's, its format 1, and the LoRA keys present (*h).
// Fails, recording on m's context (messages name `who` and `path`), with the first key that is missing or wrong.
static ctl_status ctl__adapters_header_read(const ctl_model *m, const ctl_gguf *g, const char *path, const char *who,
                                            ctl__adapter_hdr *h) {
    ctl_ctx *ctx = m->ctx;
    const char *s;
    size_t len;
    int64_t fmt;
    const char *arch = m->cfg.arch == CTL_ARCH_GPT2 ? "gpt2" : "llama";
    ctl_status st = ctl_gguf_get_str(g, "general.architecture", &s, &len);
    if (st) return st;
    if (len != strlen(arch) || memcmp(s, arch, len))
        return ctl__fail(ctx, CTL_ERR_INVALID, "%s '%s': adapters for architecture '%.*s', the model is %s", who, path, (int)CTL__MIN(len, (size_t)32), s, arch);
    if (ctl_gguf_get_int(g, "cotlab.adapter.format", &fmt) || fmt != 1)
        return ctl__fail(ctx, CTL_ERR_FORMAT, "%s '%s': not a cotlab adapter file (no cotlab.adapter.format 1)", who, path);
    // Required even in a file of sparse deltas only (the writer always writes them).
    if ((st = ctl_gguf_get_int(g, "cotlab.lora.rank", &h->rank)) || (st = ctl_gguf_get_float(g, "cotlab.lora.alpha", &h->alpha)) ||
        (st = ctl_gguf_get_float(g, "cotlab.lora.dropout", &h->dropout)) || (st = ctl_gguf_get_bool(g, "cotlab.lora.rslora", &h->rslora)) ||
        (st = ctl_gguf_get_bool(g, "cotlab.lora.dora", &h->dora)))
        return st;
    return CTL_OK;
}

// The indices of sparse delta t on weight i (key cotlab.sparse.<weight>): one per value, strictly ascending and in
// range, since the kernels index the weight with them without checking. Fails naming the first bad index.
static ctl_status ctl__sparse_idx_check(const ctl_model *m, const ctl_gguf *g, const ctl_gguf_tensor *t, int64_t i,
                                        const char *path, const char *who) {
    ctl_ctx *ctx = m->ctx;
    const ctl_tensor *w = &m->params[i].value;
    char key[96];
    ctl_status st;
    snprintf(key, sizeof key, "cotlab.sparse.%s", m->params[i].name);
    const ctl_gguf_kv *kv = ctl_gguf_find_kv(g, key);
    if (!kv || kv->type != CTL_GGUF_ARR || kv->count != (uint64_t)ctl_gguf_tensor_numel(t))
        return ctl__fail(ctx, CTL_ERR_FORMAT, "%s '%s': '%s' has %" PRId64 " values but no matching %s", who, path, t->name,
                         ctl_gguf_tensor_numel(t), key);
    for (uint64_t e = 0, prev = 0; e < kv->count; e++) {
        int64_t idx;
        if ((st = ctl_gguf_arr_int(g, kv, e, &idx))) return st;
        // Strictly ascending and in range: the kernels index the weight with these without checking.
        if (idx < 0 || idx >= ctl_tensor_numel(w) || (e && (uint64_t)idx <= prev))
            return ctl__fail(ctx, CTL_ERR_FORMAT, "%s '%s': %s[%" PRIu64 "] = %" PRId64 " is not an ascending index into the %" PRId64 " entries",
                             who, path, key, e, idx, ctl_tensor_numel(w));
        prev = (uint64_t)idx;
    }
    return CTL_OK;
}

// One tensor t of the file checked against m before anything is attached: the weight it adapts (free of adapters),
// F32, its partner tensor, its shape for rank h->rank, or a sparse delta's indices. A checkpoint's other tensors
// pass. Fails, naming the tensor, at the first check it does not meet.
static ctl_status ctl__adapter_tensor_check(const ctl_model *m, const ctl_gguf *g, const ctl_gguf_tensor *t,
                                            const ctl__adapter_hdr *h, const char *path, const char *who) {
    ctl_ctx *ctx = m->ctx;
    int64_t rank = h->rank;
    char kind = 0, key[96];
    if (ctl__skip_in_adapters(m, t->name)) return CTL_OK;
    int64_t i = ctl__adapter_tensor(m, t->name, &kind);
    if (i < 0) return ctl__fail(ctx, CTL_ERR_NOT_FOUND, "%s '%s': tensor '%s' adapts no weight of this model", who, path, t->name);
    if (t->type != CTL_GGML_F32) return ctl__fail(ctx, CTL_ERR_FORMAT, "%s '%s': tensor '%s' is not F32", who, path, t->name);
    if (m->adapter_of[i] >= 0) return ctl__fail(ctx, CTL_ERR_INVALID, "%s '%s': '%s' has an adapter already", who, path, m->params[i].name);
    if (kind != 's' && (rank < 1 || rank > 65536 || !isfinite(h->alpha) || !(h->dropout >= 0.0 && h->dropout < 1.0)))
        return ctl__fail(ctx, CTL_ERR_FORMAT, "%s '%s': cotlab.lora.rank %" PRId64 ", alpha %g or dropout %g out of range", who, path, rank, h->alpha, h->dropout);
    if (kind != 's') {   // a LoRA is its A and its B (and DoRA's magnitude with them)
        const char *need = kind == 'a' ? "lora_b" : "lora_a";
        snprintf(key, sizeof key, "%s.%s", m->params[i].name, need);
        if (!ctl_gguf_find_tensor(g, key)) return ctl__fail(ctx, CTL_ERR_FORMAT, "%s '%s': '%s' but no '%s'", who, path, t->name, key);
    }
    // What ctl_lora_attach refuses, a file cannot bring either: DoRA with a sparse delta on one weight, or DoRA on
    // the head or the embeddings.
    snprintf(key, sizeof key, "%s.%s", m->params[i].name, kind == 'm' ? "sparse" : "lora_m");
    if ((kind == 'm' || kind == 's') && ctl_gguf_find_tensor(g, key))
        return ctl__fail(ctx, CTL_ERR_UNSUPPORTED, "%s '%s': '%s' has DoRA and a sparse delta; they do not combine", who, path, m->params[i].name);
    if (kind == 'm' && (ctl__param_linear(m, i) & (CTL_LINEAR_HEAD | CTL_LINEAR_EMBED)))
        return ctl__fail(ctx, CTL_ERR_UNSUPPORTED, "%s '%s': DoRA on '%s' (cotlab has DoRA on block layers only)", who, path, m->params[i].name);
    const ctl_tensor *w = &m->params[i].value;
    bool embed = ctl__param_linear(m, i) == CTL_LINEAR_EMBED;
    int64_t out = embed ? w->shape[1] : w->shape[0], in = embed ? w->shape[0] : w->shape[1];
    // The expected ne (innermost first) of A (rank, in) or (V, rank) on the embedding, and B (out, rank).
    int64_t want0 = kind == 'a' ? (embed ? rank : in) : kind == 'b' ? rank : 0, want1 = kind == 'a' ? (embed ? in : rank) : out;
    if (kind == 's') return ctl__sparse_idx_check(m, g, t, i, path, who);
    if (t->n_dims != (kind == 'm' ? 1 : 2) || (kind == 'm' ? t->ne[0] != out : t->ne[0] != want0 || t->ne[1] != want1))
        return ctl__fail(ctx, CTL_ERR_SHAPE, "%s '%s': '%s' has ne [%" PRId64 ", %" PRId64 "]; rank %" PRId64 " and the model need [%" PRId64
                         ", %" PRId64 "]", who, path, t->name, t->ne[0], t->ne[1], rank, kind == 'm' ? out : want0, kind == 'm' ? 1 : want1);
    return CTL_OK;
}

// The LoRA whose lora_a is t, attached to weight i (checked) with the file's A, B and, when present, DoRA magnitude.
// Returns the first failure (memory, or a missing lora_b); the caller then undoes every attachment of the file.
static ctl_status ctl__adapter_lora_attach(ctl_model *m, const ctl_gguf *g, const ctl_gguf_tensor *t, int64_t i,
                                           const ctl__adapter_hdr *h, float scale, ctl_rng *rng, const char *path, const char *who) {
    char name[80];
    ctl_status st;
    snprintf(name, sizeof name, "%s.lora_m", m->params[i].name);
    if ((st = ctl__lora_add(m, i, h->rank, scale, (float)h->dropout, ctl_gguf_find_tensor(g, name) != NULL, CTL_LORA_INIT_DEFAULT, rng))) return st;
    const ctl__adapter *ad = &m->adapters[m->adapter_of[i]];
    snprintf(name, sizeof name, "%s.lora_b", m->params[i].name);
    const ctl_gguf_tensor *tb = ctl_gguf_find_tensor(g, name), *tm;
    if (!tb) st = ctl__fail(m->ctx, CTL_ERR_NOT_FOUND, "%s '%s': no '%s'", who, path, name);
    if (!st) st = ctl_gguf_read_f32(g, t, ctl__pf(m, ad->lora_a));
    if (!st) st = ctl_gguf_read_f32(g, tb, ctl__pf(m, ad->lora_b));
    snprintf(name, sizeof name, "%s.lora_m", m->params[i].name);
    if (!st && (tm = ctl_gguf_find_tensor(g, name))) st = ctl_gguf_read_f32(g, tm, ctl__pf(m, ad->dora_m));
    return st;
}

// The sparse delta t, attached to weight i (checked) at the indices of its cotlab.sparse key. Returns the first
// failure (memory); the caller then undoes every attachment of the file.
static ctl_status ctl__adapter_sparse_attach(ctl_model *m, const ctl_gguf *g, const ctl_gguf_tensor *t, int64_t i, const char *who) {
    ctl_ctx *ctx = m->ctx;
    char key[96];
    ctl_status st;
    int64_t K = ctl_gguf_tensor_numel(t), d0 = K, d1 = 0, *idx = (int64_t *)ctl_alloc(ctx, (size_t)K * sizeof(int64_t) + 1);
    char names[1][64];
    snprintf(names[0], 64, "%s", t->name);
    snprintf(key, sizeof key, "cotlab.sparse.%s", m->params[i].name);
    const ctl_gguf_kv *kv = ctl_gguf_find_kv(g, key);
    if (!idx) return ctl__fail(ctx, CTL_ERR_OUT_OF_MEMORY, "%s: out of memory", who);
    // Every read succeeded in the checks pass, so the status is not looked at again.
    for (int64_t e = 0; e < K; e++) ctl_gguf_arr_int(g, kv, (uint64_t)e, &idx[e]);
    int64_t at = ctl__add_params(m, 1, names, &d0, &d1);
    ctl__adapter *ad = at < 0 ? NULL : ctl__adapter_for(m, i);
    if (!ad) return ctl_free(ctx, idx), at < 0 ? CTL_ERR_OUT_OF_MEMORY : ctl__fail(ctx, CTL_ERR_OUT_OF_MEMORY, "%s: out of memory", who);
    m->params[at].decay = false;
    if (!(st = ctl__sparse_set(m, ad, at, idx, K, m->params[i].value.shape[1]))) st = ctl_gguf_read_f32(g, t, ctl__pf(m, at));
    return st;
}

// Reads cotlab's adapter GGUF onto m. Every tensor is checked (its weight, shape, partner
// tensors, indices) before anything is attached, and whatever fails after that (memory) is
// undone: the model ends with all of the file's adapters or none of them.
// The checks pass guards every size used later: an adapter file is untrusted input, and the
// attach pass below reads its tensors without checking them again.
static ctl_status ctl__adapters_read(ctl_model *m, const ctl_gguf *g, const char *path, const char *who) {
    ctl__adapter_hdr h;
    h.rank = 0, h.alpha = 0.0, h.dropout = 0.0, h.rslora = false, h.dora = false;
    const int64_t n_adapters0 = m->n_adapters, n_params0 = m->n_params, n_extra0 = m->n_extra;
    ctl_status st = ctl__adapters_header_read(m, g, path, who, &h);
    if (st) return st;
    for (int64_t k = 0; k < ctl_gguf_tensor_count(g); k++)   // the checks
        if ((st = ctl__adapter_tensor_check(m, g, ctl_gguf_tensor_at(g, k), &h, path, who))) return st;
    // The same formula as ctl_lora_attach, so a saved and reloaded LoRA computes the same.
    float scale = (float)(h.rslora ? h.alpha / sqrt((double)h.rank) : h.alpha / (double)h.rank);
    ctl_rng rng;
    // (ctl__lora_add draws an init that the file's values overwrite at once.)
    ctl_rng_seed(&rng, 0);
    for (int64_t k = 0; k < ctl_gguf_tensor_count(g) && !st; k++) {   // attach: LoRA at its lora_a, a delta at its values
        const ctl_gguf_tensor *t = ctl_gguf_tensor_at(g, k);
        char kind = 0;
        if (ctl__skip_in_adapters(m, t->name)) continue;
        int64_t i = ctl__adapter_tensor(m, t->name, &kind);
        if (kind == 'a') st = ctl__adapter_lora_attach(m, g, t, i, &h, scale, &rng, path, who);
        else if (kind == 's') st = ctl__adapter_sparse_attach(m, g, t, i, who);
    }
    if (st) {
        ctl__adapters_truncate(m, n_adapters0, n_params0, n_extra0);
        return st;
    }
    for (int64_t i = 0; i < m->n_base; i++) m->params[i].trainable = false;
    // Recorded so that saving again writes the same header; targets from what was attached.
    if (h.rank > 0) {
        m->lora.rank = h.rank, m->lora.alpha = (float)h.alpha, m->lora.dropout = (float)h.dropout, m->lora.rslora = h.rslora, m->lora.dora = h.dora;
        for (int64_t a = 0; a < m->n_adapters; a++) m->lora.targets |= m->adapters[a].lora_a >= 0 ? ctl__param_linear(m, m->adapters[a].base) : 0;
    }
    return CTL_OK;
}

CTL_API ctl_status ctl_adapter_save(const ctl_model *m, const char *path) {
    if (!CTL__ARGS(m ? m->ctx : NULL, m && path)) return CTL_ERR_INVALID;
    ctl_gguf_writer *w;
    if (m->n_adapters == 0) return ctl__fail(m->ctx, CTL_ERR_INVALID, "adapter_save: the model has no adapters");
    ctl_status st = ctl_gguf_writer_init(m->ctx, &w);
    if (!st) st = ctl__adapters_write(m, w);
    if (!st) st = ctl_gguf_writer_save(w, path);
    ctl_gguf_writer_free(w);
    return st;
}

CTL_API ctl_status ctl_adapter_load(ctl_model *m, const char *path) {
    if (!CTL__ARGS(m ? m->ctx : NULL, m && path)) return CTL_ERR_INVALID;
    ctl_gguf *g;
    if (m->merged) return ctl__fail(m->ctx, CTL_ERR_INVALID, "adapter_load: the adapters are merged; unmerge first");
    ctl_status st = ctl_gguf_open(m->ctx, path, &g);
    if (st) return st;
    st = ctl__adapters_read(m, g, path, "adapter_load");
    ctl_gguf_close(g);
    return st;
}

// Every adapter removed: the model as it was before attaching any.
static void ctl__adapters_drop(ctl_model *m) {
    ctl__adapters_truncate(m, 0, m->n_base, 0);
    memset(&m->lora, 0, sizeof m->lora);
}

// Task arithmetic (Ilharco et al. 2023): W += weight * delta for each adapter of the file, then
// the file's adapters are dropped. Done on a model with no adapters, so that "the base" is
// unambiguous and the truncation that drops them removes only what this call added.
CTL_API ctl_status ctl_adapter_compose(ctl_model *m, const char *path, float weight) {
    if (!CTL__ARGS(m ? m->ctx : NULL, m && path)) return CTL_ERR_INVALID;
    ctl_ctx *ctx = m->ctx;
    const char *who = "adapter_compose";
    if (m->n_adapters) return ctl__fail(ctx, CTL_ERR_INVALID, "%s: compose into the base before attaching adapters (this model has %" PRId64 ")", who, m->n_adapters);
    ctl_gguf *g;
    bool *was = (bool *)ctl_alloc(ctx, (size_t)m->n_base * sizeof(bool));   // the base's trainable flags come back afterwards
    if (!was) return ctl__fail(ctx, CTL_ERR_OUT_OF_MEMORY, "%s: out of memory", who);
    for (int64_t i = 0; i < m->n_base; i++) was[i] = m->params[i].trainable;
    ctl_status st = ctl_gguf_open(ctx, path, &g);
    // Reading attaches the file's adapters normally; they exist only until the deltas are added.
    if (!st) st = ctl__adapters_read(m, g, path, who), ctl_gguf_close(g);
    for (int64_t a = 0; a < m->n_adapters && !st; a++)
        if (m->params[m->adapters[a].base].value.dtype != CTL_F32)
            st = ctl__fail(ctx, CTL_ERR_UNSUPPORTED, "%s: '%s' is stored %s; deltas compose into fp32 bases", who, m->params[m->adapters[a].base].name,
                           ctl_dtype_name(m->params[m->adapters[a].base].value.dtype));
    size_t most = 0, total = 0;
    for (int64_t a = 0; a < m->n_adapters; a++) {
        const ctl_tensor *w = &m->params[m->adapters[a].base].value;
        most = CTL__MAX(most, (size_t)ctl_tensor_numel(w) + (size_t)(2 * ctx->n_threads) * (size_t)w->shape[1] + (size_t)w->shape[0]);
        total += (size_t)ctl_tensor_numel(w);
    }
    // Every delta first, from the base as it was (a DoRA delta reads W), then all are added.
    float *tmp = st ? NULL : (float *)ctl_alloc(ctx, (most + total) * sizeof(float)), *deltas = tmp ? tmp + most : NULL;
    if (!st && !tmp) st = ctl__fail(ctx, CTL_ERR_OUT_OF_MEMORY, "%s: out of memory", who);
    for (int64_t a = 0, at = 0; a < m->n_adapters && !st; a++) {
        const ctl__adapter *ad = &m->adapters[a];
        int64_t n = ctl_tensor_numel(&m->params[ad->base].value);
        ctl__adapter_delta(ctx, m, ad, deltas + at, tmp);
        at += n;
    }
    for (int64_t a = 0, at = 0; a < m->n_adapters && !st; a++) {
        float *w = ctl__pf(m, m->adapters[a].base);
        int64_t n = ctl_tensor_numel(&m->params[m->adapters[a].base].value);
        for (int64_t k = 0; k < n; k++) w[k] += weight * deltas[at + k];
        at += n;
    }
    ctl_free(ctx, tmp);
    ctl__adapters_drop(m);
    for (int64_t i = 0; i < m->n_base; i++) m->params[i].trainable = was[i];
    ctl_free(ctx, was);
    return st;
}

// PEFT's adapter_config.json: what cotlab needs of it, with what it cannot honour refused.
// Anything else in the file (target_modules, task_type, ...) is skipped: the tensors present say
// which modules are adapted.
typedef struct ctl__peft_cfg {
    int64_t r;
    double alpha, dropout;
    bool rslora, dora;
} ctl__peft_cfg;

// The file's bytes (size of them, no NUL needed); where names it in messages.
// A single pass over the top-level object: each key either fills c, is refused because it asks
// for something cotlab cannot honour (biases, per-module ranks, saved full modules), or is
// skipped whole, nested values included.
static ctl_status ctl__peft_config_parse(ctl_ctx *ctx, const char *where, const void *data, size_t size, ctl__peft_cfg *c) {
    ctl_status st = CTL_OK;
    char key[128], val[128];
    ctl__json j;
    memset(&j, 0, sizeof j);
    j.ctx = ctx, j.where = where, j.p = (const unsigned char *)data, j.n = size;
    memset(c, 0, sizeof *c);
    c->r = 8, c->alpha = 8.0;   // PEFT's defaults
    bool lora = false;
    if (ctl__j_expect(&j, '{') && !ctl__j_is(&j, '}')) {
        do {
            if (!ctl__j_string(&j, key, sizeof key) || !ctl__j_expect(&j, ':')) break;
            double x;
            int b;
            if (!strcmp(key, "peft_type") || !strcmp(key, "bias")) {
                if (!ctl__j_string(&j, val, sizeof val)) break;
                if (!strcmp(key, "peft_type") && !(lora = !strcmp(val, "LORA"))) {
                    st = ctl__fail(ctx, CTL_ERR_UNSUPPORTED, "%s: peft_type '%s' (cotlab reads LORA)", where, val);
                    break;
                }
                if (!strcmp(key, "bias") && strcmp(val, "none")) {
                    st = ctl__fail(ctx, CTL_ERR_UNSUPPORTED, "%s: bias '%s' (cotlab's LoRA trains no biases)", where, val);
                    break;
                }
            } else if (!strcmp(key, "r") || !strcmp(key, "lora_alpha") || !strcmp(key, "lora_dropout")) {
                if (!ctl__j_number(&j, &x)) break;
                if (key[0] == 'r') c->r = x >= 1.0 && x <= 65536.0 && x == floor(x) ? (int64_t)x : -1;   // -1: refused below
                else if (key[5] == 'a') c->alpha = x;
                else c->dropout = x;
            } else if (!strcmp(key, "use_rslora") || !strcmp(key, "use_dora") || !strcmp(key, "lora_bias")) {
                if (!ctl__j_literal(&j, &b)) break;
                if (key[0] == 'l' && b == 1) {
                    st = ctl__fail(ctx, CTL_ERR_UNSUPPORTED, "%s: lora_bias (cotlab's LoRA trains no biases)", where);
                    break;
                }
                if (key[4] == 'r') c->rslora = b == 1;
                else if (key[4] == 'd') c->dora = b == 1;
            } else if (!strcmp(key, "rank_pattern") || !strcmp(key, "alpha_pattern") || !strcmp(key, "modules_to_save")) {
                ctl__j_ws(&j);
                // PEFT writes these as {} or [] or null when unused; anything else changes the model.
                bool empty = (ctl__j_is(&j, '{') && ctl__j_is(&j, '}')) || (ctl__j_is(&j, '[') && ctl__j_is(&j, ']')) ||
                             (j.pos < j.n && j.p[j.pos] == 'n' && ctl__j_literal(&j, &b));
                if (!empty && !j.err) {
                    st = ctl__fail(ctx, CTL_ERR_UNSUPPORTED, "%s: %s is not empty (cotlab reads one rank and alpha, adapters only)", where, key);
                    break;
                }
            } else if (!ctl__j_skip(&j, 0)) {
                break;
            }
        } while (ctl__j_is(&j, ','));
        if (!st && !j.err) ctl__j_expect(&j, '}');
    }
    if (!st && j.err) st = j.err;
    if (!st && !lora) st = ctl__fail(ctx, CTL_ERR_FORMAT, "%s: no \"peft_type\": \"LORA\"", where);
    if (!st && (c->r < 1 || c->r > 65536 || !(c->alpha > 0.0) || !(c->dropout >= 0.0 && c->dropout < 1.0)))
        st = ctl__fail(ctx, CTL_ERR_FORMAT, "%s: r %" PRId64 ", lora_alpha %g or lora_dropout %g out of range", where, c->r, c->alpha, c->dropout);
    return st;
}

static ctl_status ctl__peft_config(ctl_ctx *ctx, const char *path, ctl__peft_cfg *c) {
    void *data;
    size_t size;
    ctl_status st = ctl__read_file(ctx, "peft config", path, &data, &size);
    if (st) return st;
    char where[1100];
    snprintf(where, sizeof where, "peft config %s", path);
    st = ctl__peft_config_parse(ctx, where, data, size, c);
    ctl_free(ctx, data);
    return st;
}

// First every check, so that a bad file attaches nothing: each LoRA tensor of sf names a module
// of this model, with the shapes c->r and the model make, on a weight free of adapters. `path` (the safetensors
// file) and `who` are for messages. Fails at the first module that does not fit, or when sf holds no LoRA here.
static ctl_status ctl__peft_tensors_check(const ctl_model *m, const ctl_safetensors *sf, const ctl__peft_cfg *c,
                                          const char *path, const char *who) {
    ctl_ctx *ctx = m->ctx;
    char module[160], key[256];
    ctl_status st = CTL_OK;
    int64_t n_found = 0, n_lora = 0;
    for (int64_t k = 0; k < ctl_safetensors_tensor_count(sf); k++) {
        const char *name = ctl_safetensors_tensor_at(sf, k)->name;
        // Counting the file's LoRAs lets a file for another model fail loudly instead of attaching
        // the subset whose names happen to match.
        n_lora += strstr(name, ".lora_A.weight") || strstr(name, ".lora_embedding_A");
    }
    for (int64_t i = 0; i < m->n_base && !st; i++) {
        if (!ctl__param_linear(m, i) || !ctl__hf_module(m, i, module, sizeof module)) continue;
        bool embed = ctl__param_linear(m, i) == CTL_LINEAR_EMBED;
        const ctl_tensor *w = &m->params[i].value;
        int64_t out = embed ? w->shape[1] : w->shape[0], in = embed ? w->shape[0] : w->shape[1];
        snprintf(key, sizeof key, "base_model.model.%s.%s", module, embed ? "lora_embedding_A" : "lora_A.weight");
        const ctl_safetensors_tensor *A = ctl_safetensors_find_tensor(sf, key), *B, *M;
        if (!A) continue;
        snprintf(key, sizeof key, "base_model.model.%s.%s", module, embed ? "lora_embedding_B" : "lora_B.weight");
        B = ctl_safetensors_find_tensor(sf, key);
        snprintf(key, sizeof key, "base_model.model.%s.lora_magnitude_vector", module);
        M = ctl_safetensors_find_tensor(sf, key);
        // (DoRA is never on an embedding here: a magnitude is only required for the other layers.)
        if (!B || (c->dora && !M && !embed))
            st = ctl__fail(ctx, CTL_ERR_FORMAT, "%s: '%s' lacks its %s", who, module, !B ? "lora_B" : "lora_magnitude_vector");
        else if (A->ndim != 2 || B->ndim != 2 || A->shape[0] != c->r || A->shape[1] != in || B->shape[0] != out || B->shape[1] != c->r ||
                 (M && (M->ndim != 1 || M->shape[0] != out)))
            st = ctl__fail(ctx, CTL_ERR_SHAPE, "%s: '%s': lora_A [%" PRId64 ", %" PRId64 "], lora_B [%" PRId64 ", %" PRId64 "]; the model and r = %" PRId64
                           " need [%" PRId64 ", %" PRId64 "] and [%" PRId64 ", %" PRId64 "]", who, module, A->shape[0], A->shape[1], B->shape[0],
                           B->shape[1], c->r, c->r, in, out, c->r);
        else if (m->adapter_of[i] >= 0)
            st = ctl__fail(ctx, CTL_ERR_INVALID, "%s: '%s' has an adapter already", who, m->params[i].name);
        else if (c->dora && embed)
            st = ctl__fail(ctx, CTL_ERR_UNSUPPORTED, "%s: DoRA on the embedding (cotlab has DoRA on block layers only)", who);
        n_found++;
    }
    // n_found counts the modules of this model with a lora_A in the file; any other lora_A names
    // a module this model does not have.
    if (!st && n_found != n_lora)
        st = ctl__fail(ctx, CTL_ERR_NOT_FOUND, "%s: %" PRId64 " of the file's %" PRId64 " LoRA modules are not layers of this model (another architecture or size?)",
                       who, n_lora - n_found, n_lora);
    if (!st && n_lora == 0) st = ctl__fail(ctx, CTL_ERR_NOT_FOUND, "%s: '%s' holds no LoRA tensors", who, path);
    return st;
}

// The file's A, B and (DoRA) magnitude of `module` copied into the LoRA just attached to weight i, through *tmp
// (reallocated to fit; the caller frees it), transposed or row-permuted where PEFT's layout differs from the model's.
// Returns the first failure: out of memory, or a tensor unreadable after the checks.
static ctl_status ctl__peft_module_fill(ctl_model *m, const ctl_safetensors *sf, int64_t i, const char *module,
                                       const ctl_safetensors_tensor *A, int64_t r, float **tmp, const char *who) {
    ctl_ctx *ctx = m->ctx;
    char key[256];
    ctl_status st;
    bool embed = ctl__param_linear(m, i) == CTL_LINEAR_EMBED;
    const ctl__adapter *ad = &m->adapters[m->adapter_of[i]];
    const ctl_tensor *pa = &m->params[ad->lora_a].value, *pb = &m->params[ad->lora_b].value;
    ctl_free(ctx, *tmp);
    if (!(*tmp = (float *)ctl_alloc(ctx, (size_t)CTL__MAX(ctl_tensor_numel(pa), ctl_tensor_numel(pb)) * sizeof(float))))
        return ctl__fail(ctx, CTL_ERR_OUT_OF_MEMORY, "%s: out of memory", who);
    float *t = *tmp;
    if ((st = ctl_safetensors_read_f32(sf, A, t))) return st;
    // PEFT keeps the embedding's A as (rank, V): transposed into ours (V, rank).
    if (embed)
        for (int64_t v = 0; v < pa->shape[0]; v++)
            for (int64_t j = 0; j < r; j++) ((float *)pa->data)[v * r + j] = t[j * pa->shape[0] + v];
    else memcpy(pa->data, t, (size_t)ctl_tensor_numel(pa) * sizeof(float));
    snprintf(key, sizeof key, "base_model.model.%s.%s", module, embed ? "lora_embedding_B" : "lora_B.weight");
    if ((st = ctl_safetensors_read_f32(sf, ctl_safetensors_find_tensor(sf, key), t))) return st;
    // The file's B rows are in HF's halves layout; the model's q and k may be adjacent.
    if (ctl__qk_reorder(m, i, CTL_ROPE_HALVES)) ctl__rows_to_adjacent((float *)pb->data, t, pb->shape[0], r, m->cfg.head_dim);
    else memcpy(pb->data, t, (size_t)ctl_tensor_numel(pb) * sizeof(float));
    if (ad->dora_m >= 0) {
        snprintf(key, sizeof key, "base_model.model.%s.lora_magnitude_vector", module);
        if ((st = ctl_safetensors_read_f32(sf, ctl_safetensors_find_tensor(sf, key), t))) return st;
        if (ctl__qk_reorder(m, i, CTL_ROPE_HALVES)) ctl__rows_to_adjacent(ctl__pf(m, ad->dora_m), t, pb->shape[0], 1, m->cfg.head_dim);
        else memcpy(ctl__pf(m, ad->dora_m), t, (size_t)pb->shape[0] * sizeof(float));
    }
    return CTL_OK;
}

// Then attach and fill: a LoRA of config c on every weight whose module has a lora_A in sf (all checked), the
// kinds of layer adapted or-ed into *targets. Returns the first failure, with the LoRAs attached so far left for the
// caller to remove.
static ctl_status ctl__peft_attach(ctl_model *m, const ctl_safetensors *sf, const ctl__peft_cfg *c, uint32_t *targets, const char *who) {
    char module[160], key[256];
    ctl_status st = CTL_OK;
    float scale = (float)(c->rslora ? c->alpha / sqrt((double)c->r) : c->alpha / (double)c->r);
    float *tmp = NULL;
    ctl_rng rng;
    ctl_rng_seed(&rng, 0);
    for (int64_t i = 0; i < m->n_base && !st; i++) {
        if (!ctl__param_linear(m, i) || !ctl__hf_module(m, i, module, sizeof module)) continue;
        bool embed = ctl__param_linear(m, i) == CTL_LINEAR_EMBED;
        snprintf(key, sizeof key, "base_model.model.%s.%s", module, embed ? "lora_embedding_A" : "lora_A.weight");
        const ctl_safetensors_tensor *A = ctl_safetensors_find_tensor(sf, key);
        if (!A) continue;
        if ((st = ctl__lora_add(m, i, c->r, scale, (float)c->dropout, c->dora && !embed, CTL_LORA_INIT_DEFAULT, &rng))) break;
        *targets |= ctl__param_linear(m, i);
        st = ctl__peft_module_fill(m, sf, i, module, A, c->r, &tmp, who);
    }
    ctl_free(m->ctx, tmp);
    return st;
}

// Reads a PEFT LoRA directory onto the model, the inverse of ctl_lora_save_peft: the checks
// first, then attach and fill. Every LoRA gets the config's single r and alpha.
CTL_API ctl_status ctl_lora_load_peft(ctl_model *m, const char *dir) {
    if (!CTL__ARGS(m ? m->ctx : NULL, m && dir)) return CTL_ERR_INVALID;
    ctl_ctx *ctx = m->ctx;
    const char *who = "lora_load_peft";
    char path[1024];
    ctl__peft_cfg c;
    if (m->merged) return ctl__fail(ctx, CTL_ERR_INVALID, "%s: the adapters are merged; unmerge first", who);
    if (!ctl__path(path, sizeof path, dir, "adapter_config.json")) return ctl__fail(ctx, CTL_ERR_INVALID, "%s: path too long", who);
    ctl_status st = ctl__peft_config(ctx, path, &c);
    if (st) return st;
    ctl_safetensors *sf;
    if (!ctl__path(path, sizeof path, dir, "adapter_model.safetensors")) return ctl__fail(ctx, CTL_ERR_INVALID, "%s: path too long", who);
    if ((st = ctl_safetensors_open(ctx, path, &sf))) return st;
    st = ctl__peft_tensors_check(m, sf, &c, path, who);
    uint32_t targets = 0;
    const int64_t n_adapters0 = m->n_adapters, n_params0 = m->n_params, n_extra0 = m->n_extra;
    if (!st) st = ctl__peft_attach(m, sf, &c, &targets, who);
    ctl_safetensors_close(sf);
    if (st) {   // out of memory, or a tensor unreadable after all: nothing stays attached
        ctl__adapters_truncate(m, n_adapters0, n_params0, n_extra0);
        return st;
    }
    for (int64_t i = 0; i < m->n_base; i++) m->params[i].trainable = false;
    memset(&m->lora, 0, sizeof m->lora);
    m->lora.rank = c.r, m->lora.alpha = (float)c.alpha, m->lora.dropout = (float)c.dropout;
    m->lora.rslora = c.rslora, m->lora.dora = c.dora, m->lora.targets = targets;
    return CTL_OK;
}

// ---- the linear layer, with its adapters -----------------------------------------------------
//
// Forward and backward of one (possibly fused) linear layer of a block, with whatever adapts
// each of its parts, as the training and the generation forwards use them. For a part with
// LoRA on input x (x_d = dropout(x) in training, else x) and output y:
//   h = scale * x_d A^T                       (N, rank), kept for backward
//   LoRA:  y += h B^T
//   DoRA:  u = W x_d, z = u + h B^T, g = m / n:   y = W x + b + g (.) z - u
//          (no dropout: u = W x, so y = b + g (.) z)
//   sparse: y += x S^T                        (S the delta at its entries)
// and backward, with gy = g (.) dy under DoRA and dy otherwise:
//   dB += gy^T h;  dh = gy B;  dA += scale * dh^T x_d;  dx_d = scale * dh A
// DoRA's backward treats the row norms n as constants, as the DoRA paper (section 4.3) and PEFT
// do: no gradient flows through ||W + s B A||.
// Shapes: x (N, in), y and dy (N, out) with rows ld apart (a part's columns of a fused output),
// A (rank, in), B (out, rank), m, n and g (out).
//   DoRA: dm += sum over rows of dy (.) z / n;  dx_d += ((g - 1) (.) dy) W under dropout
//   sparse: dS += (dy^T x) at its entries;  dx += dy S

// What the forward keeps per adapter record (training) or reuses (generation).
typedef struct ctl__abuf {
    // h = scale * x_d A^T, written by the forward and read by the backward (dB += dy^T h). Per
    // adapter record, so every adapted layer of every block keeps its own until the backward.
    float *h;          // (N, rank)
    float *z;          // (N, out) DoRA
    float *g, *nrm;    // (out) DoRA
} ctl__abuf;

// How one forward treats the adapters.
typedef struct ctl__arun {
    bool on;                 // applied at all (enabled, not merged)
    bool train;              // a training forward: dropout on, DoRA norms computed afresh
    bool hold_norms;         // keep the norms of the last forward (the tests' finite differences
                             // of DoRA's gradient, which treats them as constants)
    // The backward regenerates the same masks from this seed instead of storing them.
    uint64_t seed;           // this forward's dropout masks
    ctl__abuf *bufs;         // per adapter record
    float *xd, *tmp, *dh;    // scratch (N, widest input), (N, widest part), (N, largest rank)
    float *rowbuf;           // scratch: 2 * widest input per thread (DoRA norms)
} ctl__arun;

// Each adapter's masks from its own seed (an odd 64-bit multiplier spreads the indices), so two
// layers reading the same x do not drop the same elements.
static uint64_t ctl__adapter_seed(const ctl__arun *run, int64_t a) { return run->seed ^ ((uint64_t)(a + 1) * 0xD1B54A32D192ED03ull); }

// The part sizes of a fused layer: rows of each part's weight.
// (q's rows differ from k's and v's under GQA, so each part's width is read from its weight.)
static int64_t ctl__rows_of(const ctl_model *m, int64_t w) { return m->params[w].value.shape[0]; }

// The adapter record of base parameter i when it has a LoRA and the adapters are applied, or NULL.
static const ctl__adapter *ctl__lora_of(const ctl_model *m, const ctl__arun *run, int64_t i) {
    int64_t a = i >= 0 && i < m->n_base ? m->adapter_of[i] : -1;
    return run->on && a >= 0 && m->adapters[a].lora_a >= 0 ? &m->adapters[a] : NULL;
}

// Where a forward runs: a backend's kernels (ctl__kernels) and the model's parameters as they
// see them. On the CPU w and the sparse entries are NULL: the model's own arrays serve.
// The training forward, its backward and generation call through this, so one list of calls
// serves the CPU and CUDA (see "the backend" in >>impl:kernels).
typedef struct ctl__exec {
    ctl_ctx *ctx;
    const ctl__kernels *k;
    const ctl_model *m;
    void *const *w;                            // parameter i on the backend
    float *const *g;                           // its gradient there (NULL: frozen, or no gradients)
    int32_t *const *sp_row, *const *sp_col;    // adapter a's sparse entries there
} ctl__exec;

// The CPU's view: w and the sparse entries NULL (the model's own arrays), grads as given.
static ctl__exec ctl__exec_cpu(ctl_ctx *ctx, const ctl_model *m, float *const *grads) {
    ctl__exec x;
    memset(&x, 0, sizeof x);
    x.ctx = ctx, x.k = &ctl__cpu_kernels, x.m = m, x.g = grads;
    return x;
}

// Parameter i's values and gradient where the backend holds them; NULL for an absent (-1) one.
static const void *ctl__xw(const ctl__exec *x, int64_t i) { return i < 0 ? NULL : x->w ? x->w[i] : x->m->params[i].value.data; }
static const float *ctl__xf(const ctl__exec *x, int64_t i) { return (const float *)ctl__xw(x, i); }
static float *ctl__xg(const ctl__exec *x, int64_t i) { return i < 0 || !x->g ? NULL : x->g[i]; }

// The model's weights (the base block at `weights`, the adapters' at their own places) to the
// backend when the model changed since *version. On the CPU the backend's arrays are the
// model's own: source and destination are the same, and nothing moves.
static ctl_status ctl__exec_upload(const ctl__exec *x, void *weights, uint64_t *version) {
    const ctl_model *m = x->m;
    // Every weight goes up whenever anything changed. A training step does not trigger this: the
    // trainer records the version its own update on the backend made (>>impl:training).
    if (*version == m->version) return CTL_OK;
    ctl_status st = x->k->to_backend(x->ctx, weights, m->data, m->bytes);
    for (int64_t i = m->n_base; !st && i < m->n_params; i++) {
        const ctl_tensor *v = &m->params[i].value;
        st = x->k->to_backend(x->ctx, (void *)ctl__xw(x, i), v->data, ctl_dtype_bytes(v->dtype, ctl_tensor_numel(v)));
    }
    if (!st) *version = m->version;
    return st;
}

// The norm of the model's architecture (LayerNorm: GPT-2; RMSNorm: Llama) with weight w and
// bias b (parameter indices), over N rows.
static void ctl__norm_forward(const ctl__exec *x, float *out, float *mean, float *rstd, const float *inp, int64_t w, int64_t b,
                              int64_t N) {
    const ctl_model_config *c = &x->m->cfg;
    // mean (N) is LayerNorm's alone; rstd (N) both keep for the backward.
    if (c->arch == CTL_ARCH_GPT2) x->k->layernorm_forward(x->ctx, out, mean, rstd, inp, ctl__xf(x, w), ctl__xf(x, b), N, c->n_embd, c->norm_eps);
    else x->k->rmsnorm_forward(x->ctx, out, rstd, inp, ctl__xf(x, w), N, c->n_embd, c->norm_eps);
}

// Its backward, accumulating into dinp and into the norm's gradients where they exist.
static void ctl__norm_backward(const ctl__exec *x, float *dinp, int64_t w, int64_t b, const float *dout, const float *inp,
                               const float *mean, const float *rstd, int64_t N) {
    int64_t C = x->m->cfg.n_embd;
    if (x->m->cfg.arch == CTL_ARCH_GPT2)
        x->k->layernorm_backward(x->ctx, dinp, ctl__xg(x, w), ctl__xg(x, b), dout, inp, ctl__xf(x, w), mean, rstd, N, C);
    else
        x->k->rmsnorm_backward(x->ctx, dinp, ctl__xg(x, w), dout, inp, ctl__xf(x, w), rstd, N, C);
}

// Adapter a of a part on its columns of out (row stride ldo): x_in (N, C) in, OC outputs, bias
// the part's (or NULL). DoRA's norms are computed here in training forwards (generation keeps
// them from when the weights last changed).
static void ctl__adapter_forward(const ctl__exec *x, const ctl__arun *run, int64_t a, float *out, int64_t ldo, const float *x_in,
                                 const float *bias, int64_t N, int64_t C, int64_t OC) {
    ctl_ctx *ctx = x->ctx;
    const ctl__kernels *k = x->k;
    const ctl__adapter *ad = &x->m->adapters[a];
    const ctl__abuf *buf = &run->bufs[a];
    if (ad->lora_a >= 0) {
        bool drop = run->train && ad->dropout > 0.0f;
        const float *xd = x_in, *A = ctl__xf(x, ad->lora_a), *B = ctl__xf(x, ad->lora_b);
        // Dropout applies to the adapter's input only, as in PEFT: the base product already used x.
        if (drop) k->dropout(ctx, run->xd, x_in, N * C, ad->dropout, ctl__adapter_seed(run, a), false), xd = run->xd;
        if (ad->dora_m < 0) {
            k->lora_forward(ctx, out, ldo, buf->h, xd, A, B, N, C, OC, ad->rank, ad->scale);
        } else {   // z = u + h B^T with u = W x_d; y = b + g (.) z, or with dropout W x + b + g (.) z - u
            const ctl_tensor *w = &x->m->params[ad->base].value;
            if (run->train)
                // One pass over the part's W per training forward: DoRA's main extra cost over LoRA.
                k->dora_norms(ctx, buf->nrm, buf->g, w->dtype, ctl__xw(x, ad->base), A, B, ctl__xf(x, ad->dora_m), OC, C, ad->rank, ad->scale,
                              run->hold_norms, run->rowbuf);
            if (drop) {
                k->linear_forward(ctx, run->tmp, xd, w->dtype, ctl__xw(x, ad->base), NULL, N, C, OC);
                // With dropout u = W x_d must be computed apart: out holds W x, on the undropped input.
                k->cols_sub(ctx, buf->z, run->tmp, OC, NULL, N, OC);
            } else {   // u = W x is what out holds, less the bias
                k->cols_sub(ctx, buf->z, out, ldo, bias, N, OC);
            }
            k->lora_forward(ctx, buf->z, OC, buf->h, xd, A, B, N, C, OC, ad->rank, ad->scale);
            // z now holds u + h B^T; out's part is overwritten (or corrected) with DoRA's output.
            k->dora_out(ctx, out, ldo, buf->z, drop ? run->tmp : NULL, bias, buf->g, N, OC);
        }
    }
    if (ad->sparse >= 0)
        // The sparse delta reads the undropped input: dropout belongs to the LoRA branch only.
        k->sparse_forward(ctx, out, ldo, x_in, ctl__xf(x, ad->sparse), x->sp_row ? x->sp_row[a] : ad->sparse_row,
                          x->sp_col ? x->sp_col[a] : ad->sparse_col, ad->n_sparse, N, C);
}

// out (N, OC) = inp (N, C) W^T + b over a layer's parts (weights, and biases, back to back:
// one product), then each part's adapters.
// w and b are the parts' parameter indices (b[p] -1 where a part has no bias); the parts
// follow each other in memory, so the product through w[0]'s pointer covers all of them.
static void ctl__linear_forward(const ctl__exec *x, const ctl__arun *run, float *out, const float *inp, const int64_t *w,
                                const int64_t *b, int n_parts, int64_t N, int64_t C, int64_t OC) {
    const ctl_model *m = x->m;
    // The base first: DoRA reads W x + b from out, and LoRA and sparse deltas add onto it.
    x->k->linear_forward(x->ctx, out, inp, m->params[w[0]].value.dtype, ctl__xw(x, w[0]), ctl__xf(x, b[0]), N, C, OC);
    for (int64_t p = 0, r0 = 0; run->on && p < n_parts; r0 += ctl__rows_of(m, w[p]), p++)
        if (m->adapter_of[w[p]] >= 0) ctl__adapter_forward(x, run, m->adapter_of[w[p]], out + r0, OC, inp, ctl__xf(x, b[p]), N, C, ctl__rows_of(m, w[p]));
}

// Backward of ctl__linear_forward into the gradients x->g has (NULL: frozen). dout (N, OC) is
// consumed: DoRA scales its columns in place.
static void ctl__linear_backward(const ctl__exec *x, const ctl__arun *run, float *dinp, float *dout, const float *inp, const int64_t *w,
                                 const int64_t *b, int n_parts, int64_t N, int64_t C, int64_t OC) {
    ctl_ctx *ctx = x->ctx;
    const ctl__kernels *k = x->k;
    const ctl_model *m = x->m;
    // Order: DoRA's backward first, while dout still holds dy (it needs dy for dm and the bias,
    // and then scales dout to g (.) dy in place); then the base's dx and dW from dout; then each
    // part's LoRA and sparse gradients, which read dout as the base's backward left it.
    bool bias_done[4] = {false, false, false, false};
    for (int64_t p = 0, r0 = 0; run->on && p < n_parts; r0 += ctl__rows_of(m, w[p]), p++) {   // DoRA first: dm, the bias, g (.) dy
        int64_t a = m->adapter_of[w[p]];
        if (a < 0 || m->adapters[a].dora_m < 0) continue;
        const ctl__adapter *ad = &m->adapters[a];
        k->dora_backward(ctx, ctl__xg(x, ad->dora_m), ctl__xg(x, b[p]), dout + r0, OC, run->bufs[a].z, run->bufs[a].nrm, run->bufs[a].g,
                         !(run->train && ad->dropout > 0.0f), N, ctl__rows_of(m, w[p]));
        // Its bias gradient is a sum of dy, which dout no longer holds once scaled.
        bias_done[p] = true;
    }
    k->linear_backward(ctx, dinp, dout, m->params[w[0]].value.dtype, ctl__xw(x, w[0]), N, C, OC);
    for (int64_t p = 0, r0 = 0; p < n_parts; r0 += ctl__rows_of(m, w[p]), p++) {
        float *db = bias_done[p] ? NULL : ctl__xg(x, b[p]);
        if (ctl__xg(x, w[p]) || db) k->linear_dw(ctx, ctl__xg(x, w[p]), db, dout + r0, OC, inp, N, C, ctl__rows_of(m, w[p]));
    }
    for (int64_t p = 0, r0 = 0; run->on && p < n_parts; r0 += ctl__rows_of(m, w[p]), p++) {
        int64_t a = m->adapter_of[w[p]], OCp = ctl__rows_of(m, w[p]);
        if (a < 0) continue;
        const ctl__adapter *ad = &m->adapters[a];
        const ctl__abuf *buf = &run->bufs[a];
        if (ad->lora_a >= 0) {
            bool drop = run->train && ad->dropout > 0.0f, dora = ad->dora_m >= 0;
            const float *xd = inp, *A = ctl__xf(x, ad->lora_a), *gy = dout + r0;
            int64_t ldg = OC;
            uint64_t seed = ctl__adapter_seed(run, a);
            if (dora && drop) {   // gy = g (.) dy (without dropout dout holds it already)
                k->cols_scale(ctx, run->tmp, dout + r0, OC, buf->g, 0.0f, N, OCp);
                gy = run->tmp, ldg = OCp;
            }
            if (drop) k->dropout(ctx, run->xd, inp, N * C, ad->dropout, seed, false), xd = run->xd;
            // With dropout the input gradient must go back through the mask, so dx_d is assembled in
            // run->xd below (from dh, which lora_backward leaves scaled) instead of added to dinp here.
            k->lora_backward(ctx, drop ? NULL : dinp, ctl__xg(x, ad->lora_a), ctl__xg(x, ad->lora_b), run->dh, gy, ldg, xd, buf->h, A,
                             ctl__xf(x, ad->lora_b), N, C, OCp, ad->rank, ad->scale);
            if (drop && dinp) {   // dx_d = dh A (+ ((g - 1) (.) dy) W under DoRA), then through the mask
                k->gemm(ctx, N, C, ad->rank, run->dh, ad->rank, 1, A, C, 1, run->xd, C, false);
                if (dora) {
                    const ctl_tensor *wp = &m->params[w[p]].value;
                    k->cols_scale(ctx, run->tmp, dout + r0, OC, buf->g, 1.0f, N, OCp);
                    k->linear_backward(ctx, run->xd, run->tmp, wp->dtype, ctl__xw(x, w[p]), N, C, OCp);
                }
                // dinp += mask (.) dx_d / (1 - p): the same mask as the forward, from the same seed.
                k->dropout(ctx, dinp, run->xd, N * C, ad->dropout, seed, true);
            }
        }
        if (ad->sparse >= 0)
            k->sparse_backward(ctx, dinp, ctl__xg(x, ad->sparse), dout + r0, OC, inp, ctl__xf(x, ad->sparse),
                               x->sp_row ? x->sp_row[a] : ad->sparse_row, x->sp_col ? x->sp_col[a] : ad->sparse_col, ad->n_sparse, N, C);
    }
}

// The LM head as the lmhead kernels take it: the output weight, and a LoRA on it (untied
// models) whose h = scale * x_d A^T this computes when x_in is not NULL (a forward). The
// gradient fields are the caller's to fill.
// The head's LoRA is applied inside the LM head kernels, chunk by chunk, because the logits
// (N, V) are never stored whole; h (N, rank) is small and is computed here once.
static ctl__head ctl__head_forward(const ctl__exec *x, const ctl__arun *run, const float *x_in, int64_t N) {
    const ctl_model *m = x->m;
    const ctl__adapter *ad = m->cfg.tied_embeddings ? NULL : ctl__lora_of(m, run, m->output);
    ctl__head hd;
    memset(&hd, 0, sizeof hd);
    hd.type = m->params[m->output].value.dtype, hd.w = ctl__xw(x, m->output);
    if (!ad) return hd;
    int64_t a = m->adapter_of[m->output], C = m->cfg.n_embd;
    hd.r = ad->rank, hd.h = run->bufs[a].h, hd.lora_b = ctl__xf(x, ad->lora_b);
    // No input: the backward's call, which only needs the pointers.
    if (!x_in) return hd;
    const float *xd = x_in;
    if (run->train && ad->dropout > 0.0f) x->k->dropout(x->ctx, run->xd, x_in, N * C, ad->dropout, ctl__adapter_seed(run, a), false), xd = run->xd;
    x->k->gemm(x->ctx, N, ad->rank, C, xd, C, 1, ctl__xf(x, ad->lora_a), 1, C, run->bufs[a].h, ad->rank, false);
    x->k->scale(x->ctx, run->bufs[a].h, N * ad->rank, ad->scale);
    return hd;
}

// The head's LoRA after the LM head's backward left dh (N, rank) = dlogits B in run->dh:
// dA += scale dh^T x_d, dx += scale dh A (through the dropout mask).
static void ctl__head_backward(const ctl__exec *x, const ctl__arun *run, float *dx, const float *x_in, int64_t N) {
    const ctl_model *m = x->m;
    const ctl__adapter *ad = m->cfg.tied_embeddings ? NULL : ctl__lora_of(m, run, m->output);
    if (!ad) return;
    ctl_ctx *ctx = x->ctx;
    const ctl__kernels *k = x->k;
    int64_t C = m->cfg.n_embd, R = ad->rank;
    bool drop = run->train && ad->dropout > 0.0f;
    uint64_t seed = ctl__adapter_seed(run, m->adapter_of[m->output]);
    const float *A = ctl__xf(x, ad->lora_a), *xd = x_in;
    k->scale(ctx, run->dh, N * R, ad->scale);
    if (drop) k->dropout(ctx, run->xd, x_in, N * C, ad->dropout, seed, false), xd = run->xd;
    // dA first: with dropout, run->xd holds x_d here and is overwritten by dx_d just below.
    if (ctl__xg(x, ad->lora_a)) k->gemm(ctx, R, C, N, run->dh, 1, R, xd, C, 1, ctl__xg(x, ad->lora_a), C, true);
    k->gemm(ctx, N, C, R, run->dh, R, 1, A, C, 1, drop ? run->xd : dx, C, !drop);
    if (drop) k->dropout(ctx, dx, run->xd, N * C, ad->dropout, seed, true);
}

// Token embeddings of N rows (token tokens[r] at position pos[r]), with a LoRA on them:
// x += scale * A[token] B^T.
// The LoRA's A is itself gathered like an embedding (row A[token]), so the lookup kernel serves.
// No dropout: an embedding's input is a token id, and PEFT applies none there either.
static void ctl__embed_forward(const ctl__exec *x, const ctl__arun *run, float *out, const int32_t *tokens, const int32_t *pos, int64_t N) {
    const ctl_model *m = x->m;
    const ctl_tensor *wte = &m->params[m->tok_embd].value;
    int64_t C = m->cfg.n_embd;
    x->k->embedding_forward(x->ctx, out, tokens, pos, wte->dtype, ctl__xw(x, m->tok_embd), ctl__xf(x, m->pos_embd), N, C);
    const ctl__adapter *ad = m->cfg.tied_embeddings ? NULL : ctl__lora_of(m, run, m->tok_embd);
    if (!ad) return;
    float *h = run->bufs[m->adapter_of[m->tok_embd]].h;
    x->k->embedding_forward(x->ctx, h, tokens, pos, CTL_F32, ctl__xw(x, ad->lora_a), NULL, N, ad->rank);
    x->k->scale(x->ctx, h, N * ad->rank, ad->scale);
    x->k->gemm(x->ctx, N, C, ad->rank, h, ad->rank, 1, ctl__xf(x, ad->lora_b), 1, ad->rank, out, C, true);
}

// Its backward from dx (N, C): the embeddings' gradients, then the LoRA's: dB += dx^T h,
// dA[token] += scale * dx B.
static void ctl__embed_backward(const ctl__exec *x, const ctl__arun *run, const float *dx, const int32_t *tokens, const int32_t *pos,
                                int64_t N) {
    const ctl_model *m = x->m;
    ctl_ctx *ctx = x->ctx;
    int64_t C = m->cfg.n_embd;
    if (ctl__xg(x, m->tok_embd) || ctl__xg(x, m->pos_embd))
        x->k->embedding_backward(ctx, ctl__xg(x, m->tok_embd), ctl__xg(x, m->pos_embd), dx, tokens, pos, N, C);
    const ctl__adapter *ad = m->cfg.tied_embeddings ? NULL : ctl__lora_of(m, run, m->tok_embd);
    if (!ad) return;
    int64_t R = ad->rank;
    if (ctl__xg(x, ad->lora_b))
        x->k->gemm(ctx, C, R, N, dx, 1, C, run->bufs[m->adapter_of[m->tok_embd]].h, R, 1, ctl__xg(x, ad->lora_b), R, true);
    // dh = scale * dx B (N, rank); the embedding backward then scatters its rows onto the tokens'
    // rows of dA, adding where a token occurs more than once.
    x->k->gemm(ctx, N, R, C, dx, C, 1, ctl__xf(x, ad->lora_b), R, 1, run->dh, R, false);
    x->k->scale(ctx, run->dh, N * R, ad->scale);
    if (ctl__xg(x, ad->lora_a)) x->k->embedding_backward(ctx, ctl__xg(x, ad->lora_a), NULL, run->dh, tokens, pos, N, R);
}

// What the adapters of a model need of a forward's scratch: the widest input and output of an
// adapted part, the largest rank and the head's, and whether any has DoRA or dropout.
typedef struct ctl__adapter_needs {
    int64_t in, out, rank, head_rank;
    bool dora, dropout;
} ctl__adapter_needs;

// Scans every adapter once; the trainer and ctl_infer size their scratch from the result.
static ctl__adapter_needs ctl__needs(const ctl_model *m) {
    ctl__adapter_needs n;
    memset(&n, 0, sizeof n);
    for (int64_t a = 0; m && a < m->n_adapters; a++) {
        const ctl__adapter *ad = &m->adapters[a];
        const ctl_tensor *w = &m->params[ad->base].value;
        n.in = CTL__MAX(n.in, w->shape[1]), n.out = CTL__MAX(n.out, w->shape[0]), n.rank = CTL__MAX(n.rank, ad->rank);
        n.dora |= ad->dora_m >= 0, n.dropout |= ad->lora_a >= 0 && ad->dropout > 0.0f;
        if (ad->base == m->output && !m->cfg.tied_embeddings) n.head_rank = ad->rank;
    }
    return n;
}


// >>impl:objectives =============================================================================

// The plain weighted mean, for callers with their own loops; the objectives below add TRL's
// normalisers and gradient accumulation. Sums in double, in token order: the result does not
// depend on the thread count.
CTL_API ctl_status ctl_cross_entropy(ctl_ctx *ctx, int64_t n, const float *logp,
                                     const float *weights, float *dlogp, float *loss) {
    if (!CTL__ARGS(ctx, ctx && logp && dlogp && loss && n >= 0)) return CTL_ERR_INVALID;
    double wsum = 0.0, sum = 0.0;
    for (int64_t i = 0; i < n; i++) {
        float w = weights ? weights[i] : 1.0f;
        if (!isfinite(w) || w < 0.0f)
            return ctl__fail(ctx, CTL_ERR_RANGE, "cross_entropy: weight %g at token %" PRId64 " must be finite and >= 0",
                             (double)w, i);
        // A zero-weight token's log-prob is never read, so padding may hold anything (NaN included).
        if (w != 0.0f && !isfinite(logp[i]))
            return ctl__fail(ctx, CTL_ERR_NONFINITE, "cross_entropy: log-prob at token %" PRId64 " is %g", i,
                             (double)logp[i]);
        wsum += w;
        if (w != 0.0f) sum += (double)w * logp[i];
    }
    if (wsum <= 0.0) return ctl__fail(ctx, CTL_ERR_INVALID, "cross_entropy: all %" PRId64 " token weights are 0", n);
    for (int64_t i = 0; i < n; i++) dlogp[i] = (float)(-(weights ? weights[i] : 1.0f) / wsum);
    *loss = (float)(-sum / wsum);
    return CTL_OK;
}

CTL_API double ctl_metric_get(const ctl_objective_out *out, const char *name) {
    if (!CTL__ARGS(NULL, out && name)) return NAN;
    for (int i = 0; i < out->n_metrics; i++)
        if (!strcmp(out->metrics[i].name, name)) return out->metrics[i].value;
    return NAN;
}

// Silently drops a new name once CTL_MAX_METRICS are set: metrics are reports, never inputs.
CTL_API void ctl_metric_set(ctl_objective_out *out, const char *name, double value) {
    if (!CTL__ARGS(NULL, out && name)) return;
    int i = 0;
    while (i < out->n_metrics && strcmp(out->metrics[i].name, name)) i++;
    if (i == CTL_MAX_METRICS) return;
    if (i == out->n_metrics) {
        snprintf(out->metrics[i].name, sizeof out->metrics[i].name, "%s", name);
        out->n_metrics++;
    }
    out->metrics[i].value = value;
}

// What every objective checks first: shapes, buffers, and that each log-prob it will read is
// finite (a masked-out token's is never read).
static ctl_status ctl__obj_check(ctl_ctx *ctx, const char *who, const ctl_logprobs *in, ctl_objective_out *out,
                                 bool need_ref) {
    if (!in || !out || !in->logp || !out->dlogp)
        return ctl__fail(ctx, CTL_ERR_INVALID, "%s: needs log-probs and a dlogp buffer", who);
    if (in->B < 1 || in->T < 1)
        return ctl__fail(ctx, CTL_ERR_SHAPE, "%s: %" PRId64 "x%" PRId64 " log-probs", who, in->B, in->T);
    if (need_ref && !in->ref_logp) return ctl__fail(ctx, CTL_ERR_INVALID, "%s: needs reference log-probs", who);
    out->loss = 0.0, out->n_metrics = 0;
    for (int64_t i = 0; i < in->B * in->T; i++) {
        float m = in->mask ? in->mask[i] : 1.0f;
        if (!(m >= 0.0f) || !isfinite(m))
            return ctl__fail(ctx, CTL_ERR_RANGE, "%s: mask %g at (b=%" PRId64 ", t=%" PRId64 ") must be finite and >= 0",
                             who, (double)m, i / in->T, i % in->T);
        if (m == 0.0f) continue;
        const float *arr[3] = {in->logp, in->old_logp, need_ref ? in->ref_logp : NULL};
        const char *what[3] = {"log-prob", "old log-prob", "reference log-prob"};
        for (int k = 0; k < 3; k++)
            if (arr[k] && !isfinite(arr[k][i]))
                return ctl__fail(ctx, CTL_ERR_NONFINITE, "%s: %s at (b=%" PRId64 ", t=%" PRId64 ") is %g", who, what[k],
                                 i / in->T, i % in->T, (double)arr[k][i]);
    }
    // Every entry is written: masked-out tokens get 0, so the backward may run over all (B,T).
    memset(out->dlogp, 0, (size_t)(in->B * in->T) * sizeof(float));
    return CTL_OK;
}

// Token i's weight (0 for prompt and padding); NULL mask means every token counts with 1.
static double ctl__mask(const ctl_logprobs *in, int64_t i) { return in->mask ? in->mask[i] : 1.0; }

// Masked token mean of the per-token entropies, reported when the caller gave them; rows
// flagged in `dropped` (may be NULL) do not count.
static void ctl__obj_entropy(const ctl_logprobs *in, const uint8_t *dropped, ctl_objective_out *out) {
    if (!in->entropy) return;
    double s = 0.0, n = 0.0;
    for (int64_t i = 0; i < in->B * in->T; i++) {
        double m = dropped && dropped[i / in->T] ? 0.0 : ctl__mask(in, i);
        if (m != 0.0) s += m * in->entropy[i], n += m;
    }
    ctl_metric_set(out, "entropy", n > 0.0 ? s / n : 0.0);
}

// sum_t mask * logp per row, or that over max(1, sum_t mask): an empty row averages to 0.
CTL_API void ctl_sequence_logprobs(const ctl_logprobs *in, bool average, float *seq) {
    if (!CTL__ARGS(NULL, in && in->logp && seq)) return;
    for (int64_t b = 0; b < in->B; b++) {
        double s = 0.0, n = 0.0;
        for (int64_t t = 0; t < in->T; t++) {
            double m = ctl__mask(in, b * in->T + t);
            if (m != 0.0) s += m * in->logp[b * in->T + t], n += m;
        }
        seq[b] = (float)(average ? s / CTL__MAX(n, 1.0) : s);
    }
}

// ---- SFT --------------------------------------------------------------------------------------

// SFT: -sum(mask * logp) / N, so d loss / d logp_t = -mask_t / N, whatever the logp.
CTL_API ctl_status ctl_objective_sft(ctl_ctx *ctx, const ctl_logprobs *in, const ctl_sft_desc *d,
                                     ctl_objective_out *out) {
    if (!CTL__ARGS(ctx, ctx && in && out)) return CTL_ERR_INVALID;
    ctl_sft_desc z;
    memset(&z, 0, sizeof z);
    if (!d) d = &z;
    ctl_status st = ctl__obj_check(ctx, "objective_sft", in, out, false);
    if (st) return st;
    int64_t B = in->B, T = in->T;
    double accum = d->accum > 0 ? (double)d->accum : 1.0, n_all = 0.0, loss = 0.0;
    for (int64_t i = 0; i < B * T; i++) n_all += ctl__mask(in, i);
    // TOKENS: transformers' num_items_in_batch. N counts the masked tokens of the whole optimiser
    // step, so summing the accum micro-batches' gradients gives the step's token mean. Without
    // step_tokens the guess n_all * accum is exact only when micro-batches hold equal counts.
    if (d->norm == CTL_SFT_TOKENS) {
        double N = d->step_tokens > 0.0 ? d->step_tokens : CTL__MAX(n_all, 1.0) * accum;
        for (int64_t i = 0; i < B * T; i++) {
            double m = ctl__mask(in, i);
            if (m == 0.0) continue;
            loss -= m * in->logp[i] / N;
            out->dlogp[i] = (float)(-m / N);
        }
    } else {
        for (int64_t b = 0; b < B; b++) {
            double n = 0.0, s = 0.0;
            for (int64_t t = 0; t < T; t++) n += ctl__mask(in, b * T + t);
            // SEQUENCES: each row's token mean, averaged over B rows and the accum micro-batches.
            double w = 1.0 / (CTL__MAX(n, 1.0) * (double)B * accum);
            for (int64_t t = 0; t < T; t++) {
                double m = ctl__mask(in, b * T + t);
                if (m != 0.0) s += m * in->logp[b * T + t], out->dlogp[b * T + t] = (float)(-m * w);
            }
            loss -= s * w;
        }
    }
    out->loss = loss;
    ctl_metric_set(out, "num_tokens", n_all);
    ctl__obj_entropy(in, NULL, out);
    return CTL_OK;
}

// ---- the DPO family ---------------------------------------------------------------------------

// log σ(x) and σ(x) in forms whose exp never overflows: exp of a non-positive number only.
static double ctl__logsig(double x) { return x >= 0.0 ? -log1p(exp(-x)) : x - log1p(exp(x)); }
static double ctl__sig(double x) { return x >= 0.0 ? 1.0 / (1.0 + exp(-x)) : exp(x) / (1.0 + exp(x)); }

// One pair's loss and its derivatives by the pair's four scalars: the chosen and rejected
// (summed or averaged) policy log-probs pc, pr and their reference log-ratios dc, dr
// (pc - refc, ...). gc, gr receive d loss / d pc and d loss / d pr.
typedef struct ctl__pair {
    double pc, pr, dc, dr, nc, nr;   // nc, nr: completion lengths (>= 1)
} ctl__pair;

static double ctl__pair_loss(const ctl_dpo_desc *d, double beta, const ctl__pair *p, double *gc, double *gr) {
    double eps = d->label_smoothing, h = p->dc - p->dr, L = 0.0, x;
    *gc = *gr = 0.0;
    // Each case: the loss of one pair, then its derivatives by the pair's scalars (h = dc - dr, so
    // d/d dc = β L'(βh) and d/d dr = -β L'(βh) for the losses of h alone). Formulas: the public
    // comment above ctl_dpo_desc, as in TRL's dpo_trainer.py.
    switch (d->loss) {
    // DPO (Rafailov et al. 2023): -logσ(βh); with ε > 0 conservative DPO's label smoothing.
    case CTL_DPO_SIGMOID:   // d/dx -logσ(x) = -σ(-x)
        x = beta * h;
        L = -(1.0 - eps) * ctl__logsig(x) - eps * ctl__logsig(-x);
        *gc = beta * (-(1.0 - eps) * ctl__sig(-x) + eps * ctl__sig(x)), *gr = -*gc;
        break;
    // Robust DPO (Chowdhury et al. 2024): unbiased under preference labels flipped with rate ε.
    case CTL_DPO_ROBUST:
        x = beta * h;
        L = (-(1.0 - eps) * ctl__logsig(x) + eps * ctl__logsig(-x)) / (1.0 - 2.0 * eps);
        *gc = beta * (-(1.0 - eps) * ctl__sig(-x) - eps * ctl__sig(x)) / (1.0 - 2.0 * eps), *gr = -*gc;
        break;
    // SLiC's hinge (Zhao et al. 2023): relu(1 - βh); the subgradient at the kink is taken as 0.
    case CTL_DPO_HINGE:
        x = 1.0 - beta * h;
        L = x > 0.0 ? x : 0.0;
        *gc = x > 0.0 ? -beta : 0.0, *gr = -*gc;
        break;
    // IPO (Azar et al. 2023): (h' - 1/(2β))², h' on per-token averages as TRL computes it; the
    // derivatives are by the summed log-probs, hence the 1/|y| factors.
    case CTL_DPO_IPO:
        x = p->dc / p->nc - p->dr / p->nr - 1.0 / (2.0 * beta);
        L = x * x;
        *gc = 2.0 * x / p->nc, *gr = -2.0 * x / p->nr;
        break;
    // -logσ(β(Δc/|yc| - Δr/|yr|)): DPO on length-normalised log-ratios.
    case CTL_DPO_SIGMOID_NORM:
        x = beta * (p->dc / p->nc - p->dr / p->nr);
        L = -ctl__logsig(x);
        *gc = -ctl__sig(-x) * beta / p->nc, *gr = ctl__sig(-x) * beta / p->nr;
        break;
    // EXO (Ji et al. 2024), paired: KL(q || (1-ε, ε)) from the model's preference q to smoothed labels.
    case CTL_DPO_EXO_PAIR: {   // q_w (logσ(x) - log(1-ε)) + q_l (logσ(-x) - log ε), q_w = σ(x), q_l = σ(-x)
        x = beta * h;
        double qw = ctl__sig(x), ql = ctl__sig(-x), a = ctl__logsig(x) - log1p(-eps), b = ctl__logsig(-x) - log(eps);
        L = qw * a + ql * b;
        // d/dx: qw ql a + qw ql - qw ql b - ql qw = qw ql (a - b)
        *gc = beta * qw * ql * (a - b), *gr = -*gc;
        break;
    }
    // NCA (Chen et al. 2024): -logσ(βΔc) - ½logσ(-βΔc) - ½logσ(-βΔr), on each reward alone.
    case CTL_DPO_NCA_PAIR: {
        double xc = beta * p->dc, xr = beta * p->dr;
        L = -ctl__logsig(xc) - 0.5 * ctl__logsig(-xc) - 0.5 * ctl__logsig(-xr);
        *gc = beta * (-ctl__sig(-xc) + 0.5 * ctl__sig(xc)), *gr = beta * 0.5 * ctl__sig(xr);
        break;
    }
    // BCO (Jung et al. 2024), paired, as TRL's HEAD has it (no running-mean shift δ).
    case CTL_DPO_BCO_PAIR: {
        double xc = beta * p->dc, xr = beta * p->dr;
        L = -ctl__logsig(xc) - ctl__logsig(-xr);
        *gc = -beta * ctl__sig(-xc), *gr = beta * ctl__sig(xr);
        break;
    }
    // SPPO (Wu et al. 2024) with hard labels: each log-ratio pulled to ±1/(2β).
    case CTL_DPO_SPPO_HARD: {
        double a = p->dc - 0.5 / beta, b = p->dr + 0.5 / beta;
        L = a * a + b * b;
        *gc = 2.0 * a, *gr = 2.0 * b;
        break;
    }
    // APO (D'Oosterlinck et al. 2024), zero: chosen up, rejected down, each through its own σ.
    case CTL_DPO_APO_ZERO: {
        double sc = ctl__sig(beta * p->dc), sr = ctl__sig(beta * p->dr);
        L = 1.0 - sc + sr;
        *gc = -beta * sc * (1.0 - sc), *gr = beta * sr * (1.0 - sr);
        break;
    }
    // APO, down: the chosen completion's likelihood is pushed down, the rejected one's further.
    case CTL_DPO_APO_DOWN: {
        double sc = ctl__sig(beta * p->dc), sh = ctl__sig(beta * h);
        L = sc + 1.0 - sh;
        *gc = beta * sc * (1.0 - sc) - beta * sh * (1.0 - sh), *gr = beta * sh * (1.0 - sh);
        break;
    }
    // SimPO (Meng et al. 2024): -logσ(β(ac - ar) - γ), TRL CPOTrainer's form with smoothing ε.
    case CTL_DPO_SIMPO:   // on average log-probs, no reference
        x = beta * (p->pc - p->pr) - d->simpo_gamma;
        L = -(1.0 - eps) * ctl__logsig(x) - eps * ctl__logsig(-x);
        *gc = beta * (-(1.0 - eps) * ctl__sig(-x) + eps * ctl__sig(x)), *gr = -*gc;
        break;
    // ORPO (Hong et al. 2024); the NLL term is added by the caller. log(1 - e^p) is log(-expm1(p)),
    // exact for p near 0 where 1 - exp(p) would cancel; the caller ensures p < 0.
    case CTL_DPO_ORPO: {   // -β logσ(lo), lo = (pc - pr) - (log(1 - e^pc) - log(1 - e^pr))
        double lc = log(-expm1(p->pc)), lr = log(-expm1(p->pr)), lo = (p->pc - p->pr) - (lc - lr);
        L = -beta * ctl__logsig(lo);
        // d lo / d pc = 1 + e^pc / (1 - e^pc) = 1 / (1 - e^pc)
        double g = -beta * ctl__sig(-lo);
        *gc = g / -expm1(p->pc), *gr = -g / -expm1(p->pr);
        break;
    }
    }
    return L;
}

// Whether pair (rc, rr) compares a completion with itself: the same masked targets in order.
// Such a pair has h = 0 for any weights: under DPO its two gradients cancel, yet counted in the
// mean it would dilute the other pairs, and the losses on Δc and Δr apart would move it.
static bool ctl__same_pair(const ctl_logprobs *in, const int32_t *targets, int64_t rc, int64_t rr) {
    int64_t T = in->T, a = 0, b = 0;
    if (!targets) return false;
    for (;; a++, b++) {
        while (a < T && ctl__mask(in, rc * T + a) == 0.0) a++;
        while (b < T && ctl__mask(in, rr * T + b) == 0.0) b++;
        if (a == T || b == T) return a == T && b == T;
        if (targets[rc * T + a] != targets[rr * T + b]) return false;
    }
}

CTL_API ctl_dpo_desc ctl_dpo_desc_default(void) {
    ctl_dpo_desc d;
    memset(&d, 0, sizeof d);
    d.beta = 0.1f, d.simpo_gamma = 0.5f;
    return d;
}

// A pair's rows (k = 0 chosen, 1 rejected): masked sums of the policy's log-probs (sum), of the mask (n) and of
// the reference's log-probs (ref; TRL's precomputed sums, d->ref_seq, win over per-token ones; none reference-free).
static void ctl__dpo_sums(const ctl_logprobs *in, const ctl_dpo_desc *d, const int64_t rows[2], bool ref_free, double sum[2],
                          double n[2], double ref[2]) {
    for (int k = 0; k < 2; k++) {
        sum[k] = n[k] = ref[k] = 0.0;
        for (int64_t t = 0; t < in->T; t++) {
            int64_t j = rows[k] * in->T + t;
            double m = ctl__mask(in, j);
            if (m == 0.0) continue;
            sum[k] += m * in->logp[j], n[k] += m;
            if (!ref_free && !d->ref_seq) ref[k] += m * in->ref_logp[j];
        }
        if (!ref_free && d->ref_seq) ref[k] = d->ref_seq[rows[k]];
    }
}

// d loss / d logp of row `row`'s tokens: g times each token's mask (d sum_t m_t logp_t / d logp_t = m_t).
static void ctl__dpo_spread(const ctl_logprobs *in, int64_t row, double g, float *dlogp) {
    for (int64_t t = 0; t < in->T; t++) {
        int64_t j = row * in->T + t;
        double m = ctl__mask(in, j);
        if (m != 0.0) dlogp[j] = (float)(m * g);
    }
}

// The NLL term's share of chosen row `row`: each token's d loss / d logp lowered by alpha m / n_chosen / accum.
static void ctl__dpo_nll_grad(const ctl_logprobs *in, int64_t row, double alpha, double n_chosen, double accum, float *dlogp) {
    for (int64_t t = 0; t < in->T; t++) {
        int64_t j = row * in->T + t;
        double m = ctl__mask(in, j);
        if (m != 0.0) dlogp[j] = (float)(dlogp[j] - alpha * m / n_chosen / accum);
    }
}

// The DPO family. Rows 0..P-1 chosen, P..2P-1 rejected. Per pair: sums (or, reference-free,
// token means) of the masked log-probs, the pair's loss and two derivatives (ctl__pair_loss),
// then every token of a completion gets that completion's derivative times its mask, since
// d sum_t m_t logp_t / d logp_t = m_t. The loss is the mean over the pairs in use / accum.
CTL_API ctl_status ctl_objective_dpo(ctl_ctx *ctx, const ctl_logprobs *in, const ctl_dpo_desc *d,
                                     ctl_objective_out *out) {
    const char *who = "objective_dpo";
    if (!CTL__ARGS(ctx, ctx && in && d && out)) return CTL_ERR_INVALID;
    if (!d) return ctl__fail(ctx, CTL_ERR_INVALID, "%s: needs a description", who);
    if ((unsigned)d->loss > (unsigned)CTL_DPO_ORPO) return ctl__fail(ctx, CTL_ERR_INVALID, "%s: unknown loss %d", who, (int)d->loss);
    bool ref_free = d->loss == CTL_DPO_SIMPO || d->loss == CTL_DPO_ORPO;   // these work on per-token averages
    // Per-token reference log-probs are needed only when no precomputed sums replace them.
    ctl_status st = ctl__obj_check(ctx, who, in, out, !ref_free && !d->ref_seq);
    if (st) return st;
    int64_t B = in->B, P = B / 2, used = 0;
    double beta = d->beta > 0.0f ? d->beta : 0.1, eps = d->label_smoothing, accum = d->accum > 0 ? (double)d->accum : 1.0;
    if (B % 2) return ctl__fail(ctx, CTL_ERR_SHAPE, "%s: %" PRId64 " rows; pairs need chosen rows then as many rejected", who, B);
    if (!(beta > 0.0) || !isfinite(beta) || !(eps >= 0.0) || eps >= (d->loss == CTL_DPO_ROBUST ? 0.5 : 1.0) ||
        (d->loss == CTL_DPO_EXO_PAIR && eps <= 0.0))
        return ctl__fail(ctx, CTL_ERR_RANGE, "%s: beta %g, label_smoothing %g (EXO_PAIR needs it in (0, 1), ROBUST in [0, 0.5))",
                         who, beta, eps);
    for (int64_t i = 0; !ref_free && d->ref_seq && i < B; i++)
        if (!isfinite(d->ref_seq[i])) return ctl__fail(ctx, CTL_ERR_NONFINITE, "%s: ref_seq[%" PRId64 "] is %g", who, i, (double)d->ref_seq[i]);
    // The mean is over the pairs in use: skipped pairs change neither the loss nor its scale.
    for (int64_t i = 0; i < P; i++) used += !ctl__same_pair(in, d->targets, i, P + i);
    double U = used ? (double)used : 1.0, w = 1.0 / (U * accum);   // mean over pairs, then accumulation
    double loss = 0.0, n_chosen = 0.0, nll = 0.0, m_rc = 0.0, m_rr = 0.0, m_acc = 0.0, m_lc = 0.0, m_lr = 0.0;
    double m_lo = 0.0, m_lor = 0.0;
    for (int64_t i = 0; i < P; i++) {
        if (ctl__same_pair(in, d->targets, i, P + i)) continue;
        int64_t rows[2] = {i, P + i};
        double sum[2], n[2], ref[2];
        ctl__dpo_sums(in, d, rows, ref_free, sum, n, ref);
        ctl__pair p;
        // Completion lengths, at least 1 (TRL clamps the same way), for the averaging losses.
        p.nc = CTL__MAX(n[0], 1.0), p.nr = CTL__MAX(n[1], 1.0);
        p.pc = ref_free ? sum[0] / p.nc : sum[0], p.pr = ref_free ? sum[1] / p.nr : sum[1];
        // The odds p / (1 - p) of an average log-prob of 0 would be infinite; refused, not clamped.
        if (d->loss == CTL_DPO_ORPO && (!(p.pc < 0.0) || !(p.pr < 0.0)))
            return ctl__fail(ctx, CTL_ERR_RANGE, "%s: ORPO pair %" PRId64 ": a completion of average log-prob %g (empty, or "
                             "probability 1) has no odds", who, i, p.pc < 0.0 ? p.pr : p.pc);
        p.dc = ref_free ? p.pc : sum[0] - ref[0], p.dr = ref_free ? p.pr : sum[1] - ref[1];
        double gc, gr;
        loss += ctl__pair_loss(d, beta, &p, &gc, &gr) * w;
        for (int k = 0; k < 2; k++)   // reference-free losses saw token means: each token's share is divided by the length
            ctl__dpo_spread(in, rows[k], (k ? gr : gc) * w / (ref_free ? (k ? p.nr : p.nc) : 1.0), out->dlogp);
        n_chosen += n[0], nll -= sum[0];
        // TRL's metrics: implicit rewards β Δ, and accuracy as a strict β Δc > β Δr.
        m_rc += beta * p.dc, m_rr += beta * p.dr, m_acc += beta * p.dc > beta * p.dr ? 1.0 : 0.0;
        m_lc += p.pc, m_lr += p.pr;
        if (d->loss == CTL_DPO_ORPO) {
            double lo = (p.pc - p.pr) - (log(-expm1(p.pc)) - log(-expm1(p.pr)));
            m_lo += lo, m_lor += ctl__logsig(lo);
        }
    }
    // The NLL term: the token mean over the chosen completions in use (ORPO's has weight 1).
    // RPO (Pang et al. 2024) / CPO's cpo_alpha: + α NLL of the chosen tokens, the token mean over
    // all chosen completions in use (not per pair), matching TRL's "sft" loss term.
    double alpha = d->loss == CTL_DPO_ORPO ? 1.0 : d->rpo_alpha;
    if (alpha != 0.0 && n_chosen > 0.0) {
        loss += alpha * nll / n_chosen / accum;
        for (int64_t i = 0; i < P; i++)
            if (!ctl__same_pair(in, d->targets, i, P + i)) ctl__dpo_nll_grad(in, i, alpha, n_chosen, accum, out->dlogp);
    }
    out->loss = loss;
    // Reference-free, TRL logs beta * (average) log-prob as the reward; m_rc is that already.
    ctl_metric_set(out, "rewards/chosen", m_rc / U), ctl_metric_set(out, "rewards/rejected", m_rr / U);
    ctl_metric_set(out, "rewards/accuracies", m_acc / U);
    ctl_metric_set(out, "rewards/margins", (m_rc - m_rr) / U);
    ctl_metric_set(out, "logps/chosen", m_lc / U), ctl_metric_set(out, "logps/rejected", m_lr / U);
    if (alpha != 0.0) ctl_metric_set(out, "nll_loss", n_chosen > 0.0 ? nll / n_chosen : 0.0);
    if (d->loss == CTL_DPO_ORPO) ctl_metric_set(out, "log_odds_ratio", m_lor / U), ctl_metric_set(out, "log_odds_chosen", m_lo / U);
    ctl_metric_set(out, "pairs", (double)used), ctl_metric_set(out, "pairs_skipped", (double)(P - used));
    ctl__obj_entropy(in, NULL, out);
    return CTL_OK;
}

// ---- the GRPO family --------------------------------------------------------------------------

// NaN-aware mean and unbiased std of n values with stride `stride` (TRL's nanmean / nanstd:
// the std is NaN for fewer than two values).
// Two passes (mean, then squared deviations) rather than one running sum of squares, which
// loses precision to cancellation when the rewards share a large offset.
static void ctl__nanstats(const double *x, int64_t n, int64_t stride, double *mean, double *std) {
    double s = 0.0, q = 0.0;
    int64_t c = 0;
    for (int64_t i = 0; i < n; i++)
        if (!isnan(x[i * stride])) s += x[i * stride], c++;
    *mean = c ? s / (double)c : NAN;
    for (int64_t i = 0; i < n; i++)
        if (!isnan(x[i * stride])) q += (x[i * stride] - *mean) * (x[i * stride] - *mean);
    *std = c > 1 ? sqrt(q / (double)(c - 1)) : NAN;
}

// GRPO's group-relative advantages (Shao et al. 2024): A_i = (r_i - mean_group) / (std + 1e-4),
// or RLOO's leave-one-out baseline (Ahmadian et al. 2024). rewards is (n, K) row-major.
// Everything in double; NaN marks unscored values through every step, as TRL's nan* functions.
CTL_API ctl_status ctl_advantages(ctl_ctx *ctx, const ctl_advantage_desc *d, int64_t n, const float *rewards,
                                  float *adv, ctl_objective_out *metrics) {
    const char *who = "advantages";
    if (!CTL__ARGS(ctx, ctx && d && rewards && adv)) return CTL_ERR_INVALID;
    if (!d || !rewards || !adv) return ctl__fail(ctx, CTL_ERR_INVALID, "%s: needs a description, rewards and an output", who);
    int64_t G = d->group_size, K = d->n_funcs > 0 ? d->n_funcs : 1;
    if (G < 2) return ctl__fail(ctx, CTL_ERR_INVALID, "%s: group_size %" PRId64 "; a group needs at least 2 completions of its prompt", who, G);
    if (n < 1 || n % G) return ctl__fail(ctx, CTL_ERR_SHAPE, "%s: %" PRId64 " rows are not whole groups of %" PRId64, who, n, G);
    if (K > 16) return ctl__fail(ctx, CTL_ERR_RANGE, "%s: %" PRId64 " reward functions (at most 16)", who, K);
    // TRL's defaults: GRPO scales by the group's std, RLOO does not scale.
    ctl_reward_scale scale = d->scale != CTL_SCALE_DEFAULT ? d->scale : d->kind == CTL_ADV_RLOO ? CTL_SCALE_NONE : CTL_SCALE_GROUP;
    if ((unsigned)d->kind > (unsigned)CTL_ADV_RLOO || (unsigned)scale > (unsigned)CTL_SCALE_NONE ||
        (d->kind == CTL_ADV_RLOO && scale == CTL_SCALE_GROUP))
        return ctl__fail(ctx, CTL_ERR_INVALID, "%s: kind %d with scale %d (RLOO takes SCALE_NONE or SCALE_BATCH)", who,
                         (int)d->kind, (int)d->scale);
    for (int64_t k = 0; d->weights && k < K; k++)
        if (!isfinite(d->weights[k])) return ctl__fail(ctx, CTL_ERR_NONFINITE, "%s: weight %" PRId64 " is %g", who, k, (double)d->weights[k]);
    for (int64_t i = 0; i < n * K; i++)
        if (isinf(rewards[i]))
            return ctl__fail(ctx, CTL_ERR_NONFINITE, "%s: reward %" PRId64 " of row %" PRId64 " is %g (NaN means unscored; infinity is refused)",
                             who, i % K, i / K, (double)rewards[i]);
    double *r = (double *)ctl_alloc(ctx, (size_t)(2 * n) * sizeof(double)), *a = r + n;
    if (!r) return ctl__fail(ctx, CTL_ERR_OUT_OF_MEMORY, "%s: out of memory", who);
    // r (n) holds the row rewards, a (n) the advantages: one allocation for both.
    for (int64_t i = 0; i < n; i++) {   // nansum of the weighted scores; NaN when nothing scored the row
        double s = 0.0;
        bool any = false;
        for (int64_t k = 0; k < K; k++)
            if (!isnan(rewards[i * K + k])) s += (double)(d->weights ? d->weights[k] : 1.0f) * rewards[i * K + k], any = true;
        r[i] = any ? s : NAN;
    }
    // The batch statistics: reported, and SCALE_BATCH's std for GRPO.
    double bmean, bstd, zero_std = 0.0;
    ctl__nanstats(r, n, 1, &bmean, &bstd);
    for (int64_t g0 = 0; g0 < n; g0 += G) {
        double gmean, gstd;
        ctl__nanstats(r + g0, G, 1, &gmean, &gstd);
        // SCALE_BATCH keeps the group's mean but the batch's std, as TRL's scale_rewards="batch".
        double std = scale == CTL_SCALE_BATCH && d->kind == CTL_ADV_GRPO ? bstd : gstd;
        zero_std += fabs(std) <= 1e-8 ? (double)G : 0.0;   // torch.isclose(std, 0); NaN is not close
        int64_t c = 0;
        double s = 0.0;
        for (int64_t i = g0; i < g0 + G; i++)
            if (!isnan(r[i])) s += r[i], c++;
        for (int64_t i = g0; i < g0 + G; i++) {
            // A group of equal rewards has std 0 and gives A = 0 / 1e-4 = 0: no signal, no blow-up.
            if (d->kind == CTL_ADV_GRPO) a[i] = scale == CTL_SCALE_NONE ? r[i] - gmean : (r[i] - gmean) / (std + 1e-4);
            else a[i] = r[i] - (s - r[i]) / (double)(c - 1);   // leave-one-out: NaN for a lone scored row
        }
    }
    // TRL's RLOO normalize_advantages: standardise over the batch after the leave-one-out step.
    if (d->kind == CTL_ADV_RLOO && scale == CTL_SCALE_BATCH) {
        double am, as;
        ctl__nanstats(a, n, 1, &am, &as);
        for (int64_t i = 0; i < n; i++) a[i] = (a[i] - am) / (as + 1e-4);
    }
    // An unscored row (or a group with one scored row under RLOO) gets 0: it neither pushes nor pulls.
    for (int64_t i = 0; i < n; i++) adv[i] = isnan(a[i]) ? 0.0f : (float)a[i];
    if (metrics) {
        char name[48];
        metrics->n_metrics = 0, metrics->loss = 0.0;
        ctl_metric_set(metrics, "reward", bmean);
        ctl_metric_set(metrics, "reward_std", bstd);
        ctl_metric_set(metrics, "frac_reward_zero_std", zero_std / (double)n);
        for (int64_t k = 0; k < K; k++) {
            double fm, fs;
            // a is free again (the advantages are out), so it holds function k's column here.
            for (int64_t i = 0; i < n; i++) a[i] = rewards[i * K + k];
            ctl__nanstats(a, n, 1, &fm, &fs);
            if (d->names) snprintf(name, sizeof name, "rewards/%.30s/mean", d->names[k]);
            else snprintf(name, sizeof name, "rewards/%" PRId64 "/mean", k);
            ctl_metric_set(metrics, name, fm);
            memcpy(name + strlen(name) - 4, "std", 4);
            ctl_metric_set(metrics, name, fs);
        }
    }
    ctl_free(ctx, r);
    return CTL_OK;
}

// GRPO's clipped surrogate (Shao et al. 2024, from PPO), per token:
//   l_t = -min(r A, clamp(r, 1 - ε_low, 1 + ε_high) A) + β k3,  r = exp(logp - old_logp)
// with DAPO's asymmetric clip (Yu et al. 2025), GSPO's sequence ratio (Zheng et al. 2025),
// INTELLECT-2's cap δ, the k3 KL estimator, and TRL's four normalisers. Term for term TRL's
// GRPOTrainer._compute_loss; tools/make_objective_fixtures.py runs TRL for the tests' cases.
// The parts below: the call's settings checked (ctl__grpo_setup), each row weighed
// (ctl__grpo_row_weigh), then its tokens (token level) or its one ratio (sequence level).

// One call's settings, checked, with the effective mask's token count and the normaliser.
typedef struct ctl__grpo_k {
    const ctl_logprobs *in;
    const ctl_grpo_desc *d;
    int64_t B, T;
    double el, eh, delta, beta, accum;   // ε_low, ε_high, the cap δ, β, accumulation steps
    double n_all, norm_all;              // masked tokens of the micro-batch; the shared normaliser (not GRPO's)
} ctl__grpo_k;

// What the rows add up: the loss, the k3 sum and TRL's clip counts (over clip_count).
typedef struct ctl__grpo_sums { double loss, kl, low, high, region, low_min, high_max, clip_count; } ctl__grpo_sums;

// One row: its advantage A, masked token count n, mean log-ratio seq_lw (GSPO) and each token's weight wt.
typedef struct ctl__grpo_row { int64_t b; double A, n, seq_lw, wt; } ctl__grpo_row;

// The effective mask at flat index i: completion tokens of rows that were not truncated.
static double ctl__grpo_mask(const ctl__grpo_k *k, int64_t i) {
    return k->d->truncated && k->d->truncated[i / k->T] ? 0.0 : ctl__mask(k->in, i);
}

// d loss / d l_t = wt(row) * mask: the normaliser by loss type, from k's settings and n_all. GRPO's normaliser is
// per row (ctl__grpo_row_weigh), so this returns 0 for it; the others are one number for the micro-batch.
static double ctl__grpo_normaliser(const ctl__grpo_k *k) {
    const ctl_grpo_desc *d = k->d;
    double norm_all = 0.0;
    switch (d->loss) {
    // BNPO: this micro-batch's token mean, / accum.
    case CTL_GRPO_BNPO: norm_all = CTL__MAX(k->n_all, 1.0) * k->accum; break;
    // Dr. GRPO (Liu et al. 2025): a constant, B * max_completion_length, free of length bias.
    case CTL_GRPO_DR_GRPO: norm_all = (double)k->B * (double)d->max_completion_length * k->accum; break;
    case CTL_GRPO_DAPO: {
        // DAPO: a token mean over the generation batch. gen_tokens * accum / spg is the whole
        // generation batch's count when steps_per_generation equals accum (TRL's default), so the
        // step's summed micro-batch gradients are its token mean; the fixtures also cover spg > accum.
        double spg = d->steps_per_generation > 0 ? (double)d->steps_per_generation : k->accum;
        norm_all = d->gen_tokens > 0.0 ? CTL__MAX(d->gen_tokens, 1.0) * k->accum / spg : CTL__MAX(k->n_all * k->accum, 1.0);
        break;
    }
    case CTL_GRPO_GRPO: break;
    }
    return norm_all;
}

// Checks d and the log-probs (in, out: non-NULL, as ctl_objective_grpo's argument check ensured) and fills k.
// Fails, recording on ctx, for a missing advantage array, an unknown loss, a setting out of range or a
// non-finite advantage.
static ctl_status ctl__grpo_setup(ctl_ctx *ctx, const ctl_logprobs *in, const ctl_grpo_desc *d, ctl_objective_out *out,
                                  ctl__grpo_k *k) {
    const char *who = "objective_grpo";
    if (!d || !d->advantages) return ctl__fail(ctx, CTL_ERR_INVALID, "%s: needs a description with advantages", who);
    if ((unsigned)d->loss > (unsigned)CTL_GRPO_DR_GRPO) return ctl__fail(ctx, CTL_ERR_INVALID, "%s: unknown loss %d", who, (int)d->loss);
    ctl_status st = ctl__obj_check(ctx, who, in, out, d->beta != 0.0f);
    if (st) return st;
    int64_t B = in->B;
    k->in = in, k->d = d, k->B = B, k->T = in->T;
    // ε_low below 1 keeps 1 - ε_low positive, so the clamp's lower bound is a ratio.
    double el = d->epsilon > 0.0f ? d->epsilon : 0.2, eh = d->epsilon_high > 0.0f ? d->epsilon_high : el;
    double delta = d->delta, beta = d->beta, accum = d->accum > 0 ? (double)d->accum : 1.0;
    if (!isfinite(el) || el >= 1.0 || !isfinite(eh) || !isfinite(beta) || beta < 0.0 || !(delta >= 0.0) || !isfinite(delta) ||
        (d->loss == CTL_GRPO_DR_GRPO && d->max_completion_length < 1))
        return ctl__fail(ctx, CTL_ERR_RANGE, "%s: epsilon %g, epsilon_high %g, delta %g, beta %g, max_completion_length %" PRId64
                         " (DR_GRPO needs it)", who, el, eh, delta, beta, d->max_completion_length);
    for (int64_t b = 0; b < B; b++)
        if (!isfinite(d->advantages[b])) return ctl__fail(ctx, CTL_ERR_NONFINITE, "%s: advantage of row %" PRId64 " is %g", who, b, (double)d->advantages[b]);
    k->el = el, k->eh = eh, k->delta = delta, k->beta = beta, k->accum = accum;
    k->n_all = 0.0;
    for (int64_t i = 0; i < B * k->T; i++) k->n_all += ctl__grpo_mask(k, i);
    k->norm_all = ctl__grpo_normaliser(k);
    return CTL_OK;
}

// Row b's masked token count n and, for GSPO, the mean log-ratio seq_lw = sum m lw / n, and the weight of each of
// its masked tokens in the micro-batch's loss. Cannot fail.
static ctl__grpo_row ctl__grpo_row_weigh(const ctl__grpo_k *k, int64_t b) {
    const float *lp = k->in->logp + b * k->T, *old = k->in->old_logp ? k->in->old_logp + b * k->T : NULL;
    ctl__grpo_row rw;
    rw.b = b, rw.A = k->d->advantages[b], rw.n = 0.0, rw.seq_lw = 0.0;
    for (int64_t t = 0; t < k->T; t++) {
        double m = ctl__grpo_mask(k, b * k->T + t);
        rw.n += m;
        if (m != 0.0 && old) rw.seq_lw += m * ((double)lp[t] - old[t]);
    }
    // Each masked token's weight in the micro-batch's loss: GRPO's 1 / (n_i B accum) (the mean
    // of the rows' token means), or the shared 1 / norm_all.
    rw.wt = k->d->loss == CTL_GRPO_GRPO ? 1.0 / (CTL__MAX(rw.n, 1.0) * (double)k->B * k->accum) : 1.0 / k->norm_all;
    rw.seq_lw /= CTL__MAX(rw.n, 1.0);
    return rw;
}

// Token t of row rw, masked in with weight m != 0, at log-ratio lw: adds m wt l_t to s->loss and m k3 to s->kl.
// Returns the capped ratio r1 (for the clip metrics), and through *dlt d(surrogate)/d lw and through *dkl
// β d k3 / d logp, both before the weight m wt. Cannot fail.
static double ctl__grpo_token(const ctl__grpo_k *k, const ctl__grpo_row *rw, int64_t t, double m, double lw,
                              ctl__grpo_sums *s, double *dlt, double *dkl) {
    double A = rw->A, el = k->el, eh = k->eh;
    double r = exp(lw), rc = CTL__MIN(CTL__MAX(r, 1.0 - el), 1.0 + eh), r1 = r;
    double g1 = A * r, g2 = r >= 1.0 - el && r <= 1.0 + eh ? A * r : 0.0;   // d(r A)/d lw, d(rc A)/d lw
    if (k->delta > 0.0) {   // cap the unclipped ratio (clamp's gradient passes at the bound)
        if (r > k->delta) r1 = k->delta, g1 = 0.0;
    }
    // torch.minimum's backward: the smaller side's gradient, half of each on a tie (the on-policy
    // case, r = rc = 1, is always a tie and gets A).
    double l1 = r1 * A, l2 = rc * A, l, g;
    if (l1 < l2) l = l1, g = g1;           // torch.min: the smaller; half each on a tie
    else if (l1 > l2) l = l2, g = g2;
    else l = l1, g = 0.5 * (g1 + g2);
    double lt = -l;                        // this token's loss; d / d lw is -g
    *dlt = -g, *dkl = 0.0;
    // k3 (Schulman's estimator): exp(ref - logp) - (ref - logp) - 1 >= 0, unbiased for KL(π || π_ref)
    // on tokens sampled from π; d k3 / d logp = 1 - exp(ref - logp).
    if (k->beta != 0.0) {
        int64_t j = rw->b * k->T + t;
        double x = (double)k->in->ref_logp[j] - k->in->logp[j], k3 = exp(x) - x - 1.0;
        lt += k->beta * k3, *dkl = k->beta * (1.0 - exp(x));
        s->kl += m * k3;
    }
    s->loss += m * rw->wt * lt;
    return r1;
}

// Token level: each token's own ratio exp(logp - old_logp). Writes row rw's d loss / d logp into out->dlogp and
// adds its loss and clip counts to s: means over all masked tokens; low_min and high_max are over rows with tokens.
static void ctl__grpo_row_tokens(const ctl__grpo_k *k, const ctl__grpo_row *rw, ctl__grpo_sums *s, ctl_objective_out *out) {
    int64_t b = rw->b, T = k->T;
    const float *lp = k->in->logp + b * T, *old = k->in->old_logp ? k->in->old_logp + b * T : NULL;
    double A = rw->A, n = rw->n, row_low = 0.0, row_high = 0.0;   // clip counts
    for (int64_t t = 0; t < T; t++) {
        double m = ctl__grpo_mask(k, b * T + t), dlt, dkl;
        if (m == 0.0) continue;
        // On-policy (old_logp NULL) lw = 0, r = 1: the value is 1 but d r / d logp = r = 1, so the
        // gradient is REINFORCE's A ∇logp, as TRL gets from old = logp.detach().
        double lw = old ? (double)lp[t] - old[t] : 0.0;
        double r1 = ctl__grpo_token(k, rw, t, m, lw, s, &dlt, &dkl);
        out->dlogp[b * T + t] = (float)(m * rw->wt * (dlt + dkl));
        // TRL's clip metrics: low when the ratio fell under 1 - ε_low with A < 0, high over 1 + ε_high
        // with A > 0 (the cases where the clamp cuts the gradient).
        bool lo = r1 < 1.0 - k->el && A < 0.0, hi = r1 > 1.0 + k->eh && A > 0.0;
        row_low += m * lo, row_high += m * hi;
    }
    s->low += row_low, s->high += row_high, s->region += row_low + row_high, s->clip_count += n;
    if (n > 0.0) s->low_min = CTL__MIN(s->low_min, row_low / n), s->high_max = CTL__MAX(s->high_max, row_high / n);
}

// Sequence level (GSPO): one ratio exp(seq_lw) for the whole row. Writes row rw's d loss / d logp into out->dlogp
// and adds its loss to s, and to the clip counts one value per sequence, every row counted (as TRL).
static void ctl__grpo_row_sequence(const ctl__grpo_k *k, const ctl__grpo_row *rw, ctl__grpo_sums *s, ctl_objective_out *out) {
    int64_t b = rw->b, T = k->T;
    double A = rw->A, n = rw->n, dseq = 0.0;   // d loss / d lw_i (sequence level)
    for (int64_t t = 0; t < T; t++) {
        double m = ctl__grpo_mask(k, b * T + t), dlt, dkl;
        if (m == 0.0) continue;
        ctl__grpo_token(k, rw, t, m, rw->seq_lw, s, &dlt, &dkl);
        // GSPO: the surrogate's gradient is by the row's shared lw; it is spread over the tokens below.
        // The KL term stays per token.
        dseq += m * rw->wt * dlt, out->dlogp[b * T + t] = (float)(m * rw->wt * dkl);
    }
    // The row's ratio is the masked mean of its log-ratios.
    for (int64_t t = 0; t < T; t++) {
        double m = ctl__grpo_mask(k, b * T + t);
        if (m != 0.0) out->dlogp[b * T + t] = (float)(out->dlogp[b * T + t] + dseq * m / CTL__MAX(n, 1.0));
    }
    double r = exp(rw->seq_lw), r1 = k->delta > 0.0 ? CTL__MIN(r, k->delta) : r;
    bool lo = r1 < 1.0 - k->el && A < 0.0, hi = r1 > 1.0 + k->eh && A > 0.0;
    s->low += lo, s->high += hi, s->region += lo || hi, s->clip_count += 1.0;
    s->low_min = CTL__MIN(s->low_min, (double)lo), s->high_max = CTL__MAX(s->high_max, (double)hi);
}

// Metrics: kl is the token mean of k3 over the effective mask; clip ratios over clip_count. Cannot fail.
static void ctl__grpo_metrics_set(const ctl__grpo_k *k, const ctl__grpo_sums *s, ctl_objective_out *out) {
    double cc = CTL__MAX(s->clip_count, 1.0);
    if (k->beta != 0.0) ctl_metric_set(out, "kl", s->kl / CTL__MAX(k->n_all, 1.0));
    ctl_metric_set(out, "clip_ratio/low_mean", s->low / cc);
    ctl_metric_set(out, "clip_ratio/high_mean", s->high / cc);
    ctl_metric_set(out, "clip_ratio/region_mean", s->region / cc);
    ctl_metric_set(out, "clip_ratio/low_min", isfinite(s->low_min) ? s->low_min : NAN);
    ctl_metric_set(out, "clip_ratio/high_max", isfinite(s->high_max) ? s->high_max : NAN);
}

// The loss above over the micro-batch, row by row, then its metrics and the entropy.
CTL_API ctl_status ctl_objective_grpo(ctl_ctx *ctx, const ctl_logprobs *in, const ctl_grpo_desc *d,
                                      ctl_objective_out *out) {
    if (!CTL__ARGS(ctx, ctx && in && d && out)) return CTL_ERR_INVALID;
    ctl__grpo_k k;
    memset(&k, 0, sizeof k);
    ctl_status st = ctl__grpo_setup(ctx, in, d, out, &k);
    if (st) return st;
    ctl__grpo_sums s = {0.0, 0.0, 0.0, 0.0, 0.0, INFINITY, -INFINITY, 0.0};
    for (int64_t b = 0; b < k.B; b++) {
        ctl__grpo_row rw = ctl__grpo_row_weigh(&k, b);
        if (d->sequence_level) ctl__grpo_row_sequence(&k, &rw, &s, out);
        else ctl__grpo_row_tokens(&k, &rw, &s, out);
    }
    out->loss = s.loss;
    ctl__grpo_metrics_set(&k, &s, out);
    ctl__obj_entropy(in, d->truncated, out);
    return CTL_OK;
}

// >>impl:sampling ===============================================================================

// The reference sampler: greedy argmax when temperature <= 0, else one draw from softmax(logits / temperature),
// found by walking the CDF in id order until it passes u * sum. The largest logit is subtracted before exp so
// nothing overflows, and the sums are in double. exp is computed twice rather than stored: there is no scratch.
CTL_API int32_t ctl_sample_token(const float *logits, int64_t V, float temperature, ctl_rng *rng) {
    if (!CTL__ARGS(NULL, logits && V >= 1 && (rng || temperature <= 0.0f))) return 0;
    int64_t best = 0;
    for (int64_t v = 1; v < V; v++)
        if (logits[v] > logits[best]) best = v;   // strict: ties keep the lowest id
    if (temperature <= 0.0f) return (int32_t)best;
    double sum = 0.0;
    for (int64_t v = 0; v < V; v++) sum += exp((double)(logits[v] - logits[best]) / temperature);
    double u = (double)ctl_rng_uniform(rng) * sum, acc = 0.0;
    for (int64_t v = 0; v < V; v++) {
        acc += exp((double)(logits[v] - logits[best]) / temperature);
        if (u < acc) return (int32_t)v;
    }
    return (int32_t)best;   // only reached through rounding at the very end
}

// ---- generation with a KV cache --------------------------------------------------------------

typedef struct ctl__cand { float logit; int32_t id; } ctl__cand;   // a token and its tempered logit, as the samplers sort them

// A generator: the KV caches of S sequences and the scratch of one forward over up to R rows, every array
// carved from one block (mem) at init, so decoding allocates nothing. R = max(S, max_len) covers both uses: a
// prompt fed whole (up to max_len rows of one sequence) and a decoding step (one row for each of up to S).
// Invariant: sequence s's own cache holds positions shared[s] .. len[s]-1; those below shared[s] are read from
// sequence parent[s], which must not be reset or refilled while s still reads them (ctl__generate_end).
struct ctl_infer {
    ctl_ctx *ctx;
    ctl_model *m;
    int64_t S, max_len, R;             // sequences, tokens per sequence, rows per forward
    int64_t *len;                      // tokens in each sequence
    int64_t *parent, *shared;          // (S) positions below shared[s] are read from sequence parent[s]
    float *kcache, *vcache;            // (L, S, max_len, NKV*HS)
    // One forward over R rows: activations (R, width), RoPE tables (max_len, HS/2).
    float *x, *ln, *qkv, *att, *proj, *fch, *act, *mean, *rstd, *rope_cos, *rope_sin;
    int32_t *tok, *pos, *hist;         // rows' tokens and positions; hist (S, max_len)
    int64_t *row_seq;   // (R) the sequence each row belongs to
    float *logits;                     // (2*S, V) for ctl_generate
    ctl__cand *cand;                   // (n_threads, V) for sampling
    int64_t *slot_out, *slot_prompt;   // ctl_generate: each sequence's output and prompt, or -1
    int64_t *live;                     // (S) this round's sequences
    float *u;                          // (S) their uniform draws
    int32_t *toks;                     // (S) their tokens
    ctl__arun run;                     // adapters: h and z shared by all, DoRA's g and n each
    float *ah, *az;                    // (R, largest rank), (R, widest DoRA part)
    int64_t n_adapters;                // the model's when made
    uint64_t version;                  // the model's when DoRA's norms were taken
    size_t bytes;   // mem's size
    unsigned char *mem;   // the one allocation every array above points into
    ctl__exec ex;                      // the backend the forward runs on, the parameters there
    ctl__arun *run_on;                 // the adapters' buffers there (&run on the CPU)
    struct {                           // the forward's arrays where the backend uses them: the
        float *kcache, *vcache, *x, *ln, *qkv, *att, *proj, *fch, *act, *mean, *rstd;   // above
        float *rope_cos, *rope_sin, *logits;                                           // on the CPU
        int32_t *tok, *pos;
        int64_t *seq;
        void *weights;                 // the base weights' block
        uint64_t version;              // the model's version those weights are of
    } on;
    struct ctl__idev *dev;             // on a CUDA context: the weights and buffers on the device
};

#ifdef COTLAB_CUDA
static ctl_status ctl__idev_init(ctl_infer *f);   // generation on a CUDA context, below
static void ctl__idev_free(ctl_infer *f);
static ctl_status ctl__generate_sample_dev(ctl_infer *f, int64_t n, const int64_t *ids, const ctl_sampler_desc *sd, ctl_rng *rng,
                                           int32_t *toks);
#else   // (without CUDA no context has a device: never reached)
static ctl_status ctl__idev_init(ctl_infer *f) { return (void)f, CTL_OK; }
static void ctl__idev_free(ctl_infer *f) { (void)f; }
static ctl_status ctl__generate_sample_dev(ctl_infer *f, int64_t n, const int64_t *ids, const ctl_sampler_desc *sd, ctl_rng *rng,
                                           int32_t *toks) {
    return (void)n, (void)ids, (void)sd, (void)rng, (void)toks, ctl__fail(f->ctx, CTL_ERR_UNSUPPORTED, "generate: no device");
}
#endif

static size_t ctl__infer_layout(ctl_infer *f, unsigned char *base) {
    const ctl_model_config *c = &f->m->cfg;
    int64_t R = f->R, C = c->n_embd, HS = c->head_dim, KVD = c->n_kv_head * HS;
    int64_t QKV = (c->n_head + 2 * c->n_kv_head) * HS, FF = c->n_ff, FFH = c->arch == CTL_ARCH_GPT2 ? FF : 2 * FF;
    // Carves f's arrays from base in a fixed order and returns the bytes used. With base NULL it only measures:
    // ctl__take then returns NULL, so nothing may be written through the pointers (hence `if (base)` below). Sizing
    // and laying out run the same code, so the plan and the block cannot disagree.
    size_t used = 0, kind = 0, F = sizeof(float);
    f->len = (int64_t *)ctl__take(base, &used, &kind, (size_t)f->S * sizeof(int64_t));
    f->parent = (int64_t *)ctl__take(base, &used, &kind, (size_t)f->S * sizeof(int64_t));
    f->shared = (int64_t *)ctl__take(base, &used, &kind, (size_t)f->S * sizeof(int64_t));
    f->slot_out = (int64_t *)ctl__take(base, &used, &kind, (size_t)f->S * sizeof(int64_t));
    f->slot_prompt = (int64_t *)ctl__take(base, &used, &kind, (size_t)f->S * sizeof(int64_t));
    f->live = (int64_t *)ctl__take(base, &used, &kind, (size_t)f->S * sizeof(int64_t));
    f->u = (float *)ctl__take(base, &used, &kind, (size_t)f->S * sizeof(float));
    f->toks = (int32_t *)ctl__take(base, &used, &kind, (size_t)f->S * sizeof(int32_t));
    // The caches dominate: 2 * L * S * max_len * NKV*HS floats, fp32 (no quantised cache).
    f->kcache = (float *)ctl__take(base, &used, &kind, (size_t)(c->n_layer * f->S * f->max_len * KVD) * F);
    f->vcache = (float *)ctl__take(base, &used, &kind, (size_t)(c->n_layer * f->S * f->max_len * KVD) * F);
    f->x = (float *)ctl__take(base, &used, &kind, (size_t)(R * C) * F);
    f->ln = (float *)ctl__take(base, &used, &kind, (size_t)(R * C) * F);
    f->proj = (float *)ctl__take(base, &used, &kind, (size_t)(R * C) * F);
    f->qkv = (float *)ctl__take(base, &used, &kind, (size_t)(R * QKV) * F);
    f->att = (float *)ctl__take(base, &used, &kind, (size_t)(R * c->n_head * HS) * F);
    f->fch = (float *)ctl__take(base, &used, &kind, (size_t)(R * FFH) * F);
    f->act = (float *)ctl__take(base, &used, &kind, (size_t)(R * FF) * F);
    f->mean = (float *)ctl__take(base, &used, &kind, (size_t)R * F);
    f->rstd = (float *)ctl__take(base, &used, &kind, (size_t)R * F);
    f->rope_cos = (float *)ctl__take(base, &used, &kind, (size_t)(f->max_len * (HS / 2)) * F);
    f->rope_sin = (float *)ctl__take(base, &used, &kind, (size_t)(f->max_len * (HS / 2)) * F);
    f->tok = (int32_t *)ctl__take(base, &used, &kind, (size_t)R * sizeof(int32_t));
    f->pos = (int32_t *)ctl__take(base, &used, &kind, (size_t)R * sizeof(int32_t));
    f->row_seq = (int64_t *)ctl__take(base, &used, &kind, (size_t)R * sizeof(int64_t));
    f->hist = (int32_t *)ctl__take(base, &used, &kind, (size_t)(f->S * f->max_len) * sizeof(int32_t));
    // Logits (2S, V): row s holds sequence s's next-token logits; rows S..2S-1 take a step's output in step order
    // before ctl_generate_groups copies it back by sequence. cand: one row of V candidates per thread, so parallel
    // sampling tasks never share scratch.
    f->logits = (float *)ctl__take(base, &used, &kind, (size_t)(2 * f->S * c->vocab_size) * F);
    f->cand = (ctl__cand *)ctl__take(base, &used, &kind, (size_t)(f->ctx->n_threads * c->vocab_size) * sizeof(ctl__cand));
    const ctl_model *m = f->m;
    // Adapters: inference keeps nothing for a backward, so one h (R, largest rank) and one DoRA z (R, widest output)
    // serve every adapter in turn; DoRA's g and n (one per output row) are each adapter's own, kept between forwards.
    // rowbuf: per-thread rows for recomputing DoRA's norms.
    ctl__adapter_needs need = ctl__needs(m);
    f->ah = (float *)ctl__take(base, &used, &kind, (size_t)(R * need.rank) * F);
    f->az = need.dora ? (float *)ctl__take(base, &used, &kind, (size_t)(R * need.out) * F) : NULL;
    f->run.rowbuf = need.dora ? (float *)ctl__take(base, &used, &kind, (size_t)(f->ctx->n_threads * 2 * need.in) * F) : NULL;
    f->run.bufs = (ctl__abuf *)ctl__take(base, &used, &kind, (size_t)m->n_adapters * sizeof(ctl__abuf));
    for (int64_t a = 0; a < m->n_adapters; a++) {
        int64_t rows = m->params[m->adapters[a].base].value.shape[0];
        ctl__abuf b;
        memset(&b, 0, sizeof b);
        b.h = f->ah, b.z = f->az;
        if (m->adapters[a].dora_m >= 0) {
            b.g = (float *)ctl__take(base, &used, &kind, (size_t)rows * F);
            b.nrm = (float *)ctl__take(base, &used, &kind, (size_t)rows * F);
        }
        if (base) f->run.bufs[a] = b;
    }
    return used;
}

// Checks desc against the model and sizes f (its fields set, nothing allocated).
static ctl_status ctl__infer_size(ctl_model *m, const ctl_infer_desc *desc, ctl_infer *f) {
    ctl_ctx *ctx = m->ctx;
    memset(f, 0, sizeof *f);
    f->ctx = ctx, f->m = m;
    f->S = desc && desc->max_seqs ? desc->max_seqs : 1;
    f->max_len = desc && desc->max_len ? desc->max_len : m->cfg.n_ctx;
    if (f->S < 1 || f->S > (int64_t)1 << 24 || f->max_len < 1 || f->max_len > m->cfg.n_ctx)
        return ctl__fail(ctx, CTL_ERR_INVALID, "infer_init: max_seqs %" PRId64 " (at most 2^24) and max_len %" PRId64 " must be positive, max_len at "
                         "most n_ctx %" PRId64, desc ? desc->max_seqs : 0, desc ? desc->max_len : 0, m->cfg.n_ctx);
    double kv = 2.0 * (double)m->cfg.n_layer * (double)f->S * (double)f->max_len * (double)(m->cfg.n_kv_head * m->cfg.head_dim) * 4.0;
    if (kv > 70368744177664.0)   // 2^46 bytes, 64 TiB: beyond any machine, and the sizes below would near int64's range
        return ctl__fail(ctx, CTL_ERR_OUT_OF_MEMORY, "infer_init: %" PRId64 " sequences of %" PRId64 " tokens need %.3g GB of keys and values",
                         f->S, f->max_len, kv / 1e9);
    // R: a prompt of up to max_len rows, or one row for each of S sequences.
    f->R = CTL__MAX(f->S, f->max_len);
    f->bytes = ctl__infer_layout(f, NULL);
    return CTL_OK;
}

CTL_API ctl_status ctl_infer_plan(const ctl_model *m, const ctl_infer_desc *desc, size_t *bytes) {
    if (bytes) *bytes = 0;
    if (!CTL__ARGS(m ? m->ctx : NULL, m && bytes)) return CTL_ERR_INVALID;
    ctl_infer f;
    ctl_status st = ctl__infer_size((ctl_model *)m, desc, &f);   // sizes only: the model is not written
    *bytes = st ? 0 : f.bytes;
    return st;
}

CTL_API ctl_status ctl_infer_init(ctl_model *m, const ctl_infer_desc *desc, ctl_infer **out) {
    if (out) *out = NULL;
    if (!CTL__ARGS(m ? m->ctx : NULL, m && out)) return CTL_ERR_INVALID;
    ctl_ctx *ctx = m->ctx;
    ctl_infer *f = (ctl_infer *)ctl_alloc(ctx, sizeof(ctl_infer));
    if (!f) return ctl__fail(ctx, CTL_ERR_OUT_OF_MEMORY, "infer_init: out of memory");
    ctl_status st = ctl__infer_size(m, desc, f);
    if (st) return ctl_free(ctx, f), st;
    if (!(f->mem = (unsigned char *)ctl_alloc(ctx, f->bytes))) {
        ctl_free(ctx, f);
        return ctl__fail(ctx, CTL_ERR_OUT_OF_MEMORY, "infer_init: cannot allocate %.1f MB", (double)f->bytes / 1e6);
    }
    // The block starts zeroed, then is carved exactly as it was measured; every sequence starts empty.
    memset(f->mem, 0, f->bytes);
    ctl__infer_layout(f, f->mem);
    ctl_infer_reset(f, -1);
    // The adapters are fixed now (ctl__infer_check_tokens refuses a model that gained some); a version one behind
    // the model's makes the first forward compute DoRA's norms.
    f->n_adapters = m->n_adapters, f->version = m->version - 1;   // DoRA's norms are due
    if (m->cfg.arch == CTL_ARCH_LLAMA) ctl_rope_table(f->rope_cos, f->rope_sin, f->max_len, m->cfg.head_dim, m->cfg.rope_theta);
    f->ex = ctl__exec_cpu(ctx, m, NULL), f->run_on = &f->run;   // (a generator on the device changes these)
    // on.*: the arrays as the backend sees them. On the CPU they are the host arrays themselves; on.version one
    // behind makes the first forward call ctl__exec_upload, which on the CPU copies nothing.
    f->on.kcache = f->kcache, f->on.vcache = f->vcache, f->on.x = f->x, f->on.ln = f->ln, f->on.qkv = f->qkv, f->on.att = f->att;
    f->on.proj = f->proj, f->on.fch = f->fch, f->on.act = f->act, f->on.mean = f->mean, f->on.rstd = f->rstd;
    f->on.rope_cos = f->rope_cos, f->on.rope_sin = f->rope_sin, f->on.logits = f->logits;
    f->on.tok = f->tok, f->on.pos = f->pos, f->on.seq = f->row_seq, f->on.weights = m->data, f->on.version = m->version - 1;
    // Where the backend's memory is not the host's, the weights and buffers also get copies there
    // (ctl__idev_init); a failure frees it all.
    if (!ctl__backend(ctx)->host_memory && (st = ctl__idev_init(f))) {
        ctl_infer_free(f);
        return st;
    }
    *out = f;
    return CTL_OK;
}

CTL_API void ctl_infer_free(ctl_infer *f) {
    if (!f) return;
    ctl__idev_free(f);
    ctl_free(f->ctx, f->mem);
    ctl_free(f->ctx, f);
}

CTL_API size_t ctl_infer_memory(const ctl_infer *f) { return CTL__ARGS(NULL, f) ? f->bytes : 0; }
CTL_API int64_t ctl_infer_len(const ctl_infer *f, int64_t seq) {
    return CTL__ARGS(NULL, f) && seq >= 0 && seq < f->S ? f->len[seq] : -1;
}
// A reset sequence forgets its length and its parent; its cache is not cleared, since reads never go past
// len and refeeding overwrites it. A parent must not be reset while another sequence reads from it.
CTL_API void ctl_infer_reset(ctl_infer *f, int64_t seq) {
    if (!CTL__ARGS(NULL, f)) return;
    for (int64_t s = 0; s < f->S; s++)
        if (seq < 0 || s == seq) f->len[s] = 0, f->parent[s] = -1, f->shared[s] = 0;
}

// (defined with the trainer's non-finite guards, >>impl:training)
static int64_t ctl__nonfinite_at(const float *x, int64_t n);
static bool ctl__nonfinite_param(const ctl_model *m, bool trainable_only, char *buf, size_t cap);

// A NaN or infinity in x (R rows of width w), which `what` made (for instance "layer 3's
// output"): CTL_ERR_NONFINITE naming the row's sequence and position, and the first fp32
// weight holding one, if any does.
static ctl_status ctl__infer_finite(ctl_infer *f, const float *x, int64_t R, int64_t w, const char *what) {
    int64_t j = ctl__nonfinite_at(x, R * w);
    if (j < 0) return CTL_OK;
    char held[256] = "";
    if (ctl__nonfinite_param(f->m, false, held + 2, sizeof held - 2)) held[0] = ';', held[1] = ' ';
    return ctl__fail(f->ctx, CTL_ERR_NONFINITE, "infer: %g in %s (sequence %" PRId64 ", position %d)%s", (double)x[j], what,
                     f->row_seq[j / w], f->pos[j / w], held);
}


// One forward over R rows (token tok[r] at position pos[r] of sequence row_seq[r]); leaves the
// final normalised hidden states in on.ln. Keys and values go to the cache before attention, so
// rows of one sequence (in position order) see each other causally. Where the backend's arrays
// are the host's, a NaN or infinity in the residual stream stops it, naming the layer whose
// output first holds one (elsewhere the logits are checked).
static ctl_status ctl__infer_forward(ctl_infer *f, int64_t R) {
    ctl_ctx *ctx = f->ctx;
    const ctl__exec *x = &f->ex;
    const ctl__kernels *K = x->k;
    const ctl_model *m = f->m;
    const ctl_model_config *c = &m->cfg;
    int64_t C = c->n_embd, NH = c->n_head, NKV = c->n_kv_head, HS = c->head_dim;
    int64_t QKV = (NH + 2 * NKV) * HS, FF = c->n_ff, FFH = c->arch == CTL_ARCH_GPT2 ? FF : 2 * FF;
    ctl__arun *run = f->run_on;
    run->on = m->adapters_on && !m->merged && m->n_adapters > 0, run->train = false;
    ctl_status st = ctl__exec_upload(x, f->on.weights, &f->on.version);
    if (st) return st;
    // DoRA's norms depend only on the weights: recomputed once per model version (after a step, say), not per forward.
    if (run->on && f->version != m->version) {   // DoRA's g = m / n, for the weights as they are now
        for (int64_t a = 0; a < m->n_adapters; a++) {
            const ctl__adapter *ad = &m->adapters[a];
            const ctl_tensor *w = &m->params[ad->base].value;
            if (ad->dora_m < 0) continue;
            K->dora_norms(ctx, run->bufs[a].nrm, run->bufs[a].g, w->dtype, ctl__xw(x, ad->base), ctl__xf(x, ad->lora_a), ctl__xf(x, ad->lora_b),
                          ctl__xf(x, ad->dora_m), w->shape[0], w->shape[1], ad->rank, ad->scale, false, run->rowbuf);
        }
        f->version = m->version;
    }
    // The rows' tokens, positions and sequences, which the kernels index by (on the CPU source and destination
    // are the same array).
    if ((st = K->to_backend(ctx, f->on.tok, f->tok, (size_t)R * sizeof(int32_t))) ||
        (st = K->to_backend(ctx, f->on.pos, f->pos, (size_t)R * sizeof(int32_t))) ||
        (st = K->to_backend(ctx, f->on.seq, f->row_seq, (size_t)R * sizeof(int64_t))))
        return st;
    float *h = f->on.x, *ln = f->on.ln, *qkv = f->on.qkv, *proj = f->on.proj;
    ctl__embed_forward(x, run, h, f->on.tok, f->on.pos, R);
    // Each block as in training (ctl__train_forward), except that keys and values go to the cache first and
    // attention reads the cache (positions 0..pos of each row's sequence) rather than the rows' own qkv. The
    // scans for NaN read the residual stream after every layer: a cost paid on the CPU only.
    st = K->host_memory ? ctl__infer_finite(f, h, R, C, "the embeddings") : CTL_OK;
    for (int64_t l = 0; !st && l < c->n_layer; l++) {
        const ctl__block *k = &m->blocks[l];
        // attention: h += o(attention(rope(qkv(norm1(h))))), the rows' keys and values stored before attention reads
        // the cache, so a prompt's rows see each other (and themselves) causally.
        ctl__norm_forward(x, ln, f->on.mean, f->on.rstd, h, k->norm1_w, k->norm1_b, R);
        ctl__linear_forward(x, run, qkv, ln, k->qkv_w, k->qkv_b, k->n_qkv, R, C, QKV);
        if (c->arch == CTL_ARCH_LLAMA) K->rope_forward(ctx, qkv, f->on.rope_cos, f->on.rope_sin, f->on.pos, R, NH + NKV, HS, QKV, c->rope_layout);
        K->kv_store(ctx, f->on.kcache, f->on.vcache, qkv, f->on.seq, f->on.pos, R, l, f->S, f->max_len, NH, NKV, HS);
        K->attention_cached(ctx, f->on.att, qkv, f->on.kcache, f->on.vcache, f->on.seq, f->on.pos, f->parent, f->shared, R, l, f->S,
                            f->max_len, NH, NKV, HS);
        ctl__linear_forward(x, run, proj, f->on.att, &k->o_w, &k->o_b, 1, R, NH * HS, C);
        K->residual_forward(ctx, h, h, proj, R * C);
        // MLP: h += down(act(up(norm2(h)))), GELU for GPT-2, SwiGLU for Llama (fch holds gate and up side by side).
        ctl__norm_forward(x, ln, f->on.mean, f->on.rstd, h, k->norm2_w, k->norm2_b, R);
        ctl__linear_forward(x, run, f->on.fch, ln, k->up_w, k->up_b, k->n_up, R, C, FFH);
        if (c->arch == CTL_ARCH_GPT2) K->gelu_forward(ctx, f->on.act, f->on.fch, R * FF);
        else K->swiglu_forward(ctx, f->on.act, f->on.fch, R, FF);
        ctl__linear_forward(x, run, proj, f->on.act, &k->down_w, &k->down_b, 1, R, FF, C);
        K->residual_forward(ctx, h, h, proj, R * C);
        if (K->host_memory) {
            char what[48];
            snprintf(what, sizeof what, "layer %" PRId64 "'s output", l);
            st = ctl__infer_finite(f, h, R, C, what);
        }
    }
    if (st) return st;
    // The final norm; its rows go through the LM head only where logits are wanted (ctl__infer_logits).
    ctl__norm_forward(x, ln, f->on.mean, f->on.rstd, h, m->out_norm_w, m->out_norm_b, R);
    return K->host_memory ? ctl__infer_finite(f, ln, R, C, "the final norm's output") : K->sync(ctx);
}

// The logits of `rows` final hidden states h (the backend's), with the head's LoRA: into out
// (the host's) and, on the device, into its logits from row `at` on (out may then be NULL:
// they stay there for the device's sampler).
static ctl_status ctl__infer_logits(ctl_infer *f, const float *h, int64_t rows, int64_t at, float *out) {
    const ctl__kernels *K = f->ex.k;
    int64_t C = f->m->cfg.n_embd, V = f->m->cfg.vocab_size;
    float *z = K->host_memory ? out : f->on.logits + at * V;
    ctl__head hd = ctl__head_forward(&f->ex, f->run_on, h, rows);
    K->linear_forward(f->ctx, z, h, hd.type, hd.w, NULL, rows, C, V);
    // A LoRA on the head adds its low-rank product, from the h that ctl__head_forward made, to the base logits.
    if (hd.r) K->gemm(f->ctx, rows, V, hd.r, hd.h, hd.r, 1, hd.lora_b, 1, hd.r, z, V, true);
    if (K->host_memory) return CTL_OK;
    ctl_status st = K->sync(f->ctx);
    return st || !out ? st : K->to_host(f->ctx, out, z, (size_t)(rows * V) * sizeof(float));
}

#ifdef COTLAB_CUDA
// ---- generation on a CUDA context ------------------------------------------------------------
//
// ctl__infer_forward runs on the device through its kernel table, on device copies of the
// weights (taken again whenever the model's version changes) and of the buffers; the adapters'
// buffers (h, DoRA's z, g and n) are the device's too.
typedef struct ctl__idev {
    unsigned char *w;   // the model's weight block
    void **aw;          // host: the device copy of each parameter (a base weight's lies in w)
    int32_t **sp_row, **sp_col;   // host: each sparse delta's entries, on the device
    ctl__arun run;      // the adapters' buffers on the device (bufs: a host array)
    size_t mark, end;   // the device block's marks before and after this generator's part
    float *kcache, *vcache, *x, *ln, *qkv, *att, *proj, *fch, *act, *mean, *rstd, *rope_cos, *rope_sin, *logits;
    int32_t *tok, *pos, *hist;   // hist (S, max_len): ctl_generate's histories, for the sampler
    int64_t *seq;
    int32_t *hist_rows;          // host: the histories of one round's rows, gathered
    int64_t *hist_lens;          // host: their lengths
} ctl__idev;

// The device copies of a model's adapters, shared by generators and trainers: w[i] for each
// adapter parameter (i >= n_base), and each sparse delta's entries (sp_row[a], sp_col[a],
// copied now), all from the context's block. false: something did not fit (it has said what).
static bool ctl__adapters_alloc(ctl_ctx *ctx, const ctl_model *m, void **w, int32_t **sp_row, int32_t **sp_col) {
    bool ok = true;
    for (int64_t i = m->n_base; ok && i < m->n_params; i++) {
        const ctl_tensor *v = &m->params[i].value;
        ok = (w[i] = ctl_device_alloc(ctx, ctl_dtype_bytes(v->dtype, ctl_tensor_numel(v)))) != NULL;
    }
    for (int64_t a = 0; ok && a < m->n_adapters; a++) {
        const ctl__adapter *ad = &m->adapters[a];
        size_t b = (size_t)ad->n_sparse * sizeof(int32_t);
        if (ad->sparse < 0) continue;
        ok = (sp_row[a] = (int32_t *)ctl_device_alloc(ctx, b)) && (sp_col[a] = (int32_t *)ctl_device_alloc(ctx, b)) &&
             !ctl_copy_to_device(ctx, sp_row[a], ad->sparse_row, b) && !ctl_copy_to_device(ctx, sp_col[a], ad->sparse_col, b);
    }
    return ok;
}

static ctl_status ctl__idev_init(ctl_infer *f) {
    ctl_ctx *ctx = f->ctx;
    const ctl_model_config *c = &f->m->cfg;
    int64_t R = f->R, C = c->n_embd, HS = c->head_dim, KVD = c->n_kv_head * HS, V = c->vocab_size;
    int64_t QKV = (c->n_head + 2 * c->n_kv_head) * HS, FF = c->n_ff, FFH = c->arch == CTL_ARCH_GPT2 ? FF : 2 * FF;
    size_t F = sizeof(float), cache = (size_t)(c->n_layer * f->S * f->max_len * KVD) * F;
    ctl__idev *d = (ctl__idev *)ctl_alloc(ctx, sizeof(ctl__idev));
    if (!d) return ctl__fail(ctx, CTL_ERR_OUT_OF_MEMORY, "infer_init: out of memory");
    memset(d, 0, sizeof *d);
    d->mark = ctl_device_mark(ctx);
    bool ok = (d->w = (unsigned char *)ctl_device_alloc(ctx, f->m->bytes)) && (d->kcache = (float *)ctl_device_alloc(ctx, cache)) &&
              (d->vcache = (float *)ctl_device_alloc(ctx, cache)) && (d->x = (float *)ctl_device_alloc(ctx, (size_t)(R * C) * F)) &&
              (d->ln = (float *)ctl_device_alloc(ctx, (size_t)(R * C) * F)) && (d->qkv = (float *)ctl_device_alloc(ctx, (size_t)(R * QKV) * F)) &&
              (d->att = (float *)ctl_device_alloc(ctx, (size_t)(R * c->n_head * HS) * F)) &&
              (d->proj = (float *)ctl_device_alloc(ctx, (size_t)(R * C) * F)) && (d->fch = (float *)ctl_device_alloc(ctx, (size_t)(R * FFH) * F)) &&
              (d->act = (float *)ctl_device_alloc(ctx, (size_t)(R * FF) * F)) && (d->mean = (float *)ctl_device_alloc(ctx, (size_t)R * F)) &&
              (d->rstd = (float *)ctl_device_alloc(ctx, (size_t)R * F)) &&
              (d->rope_cos = (float *)ctl_device_alloc(ctx, (size_t)(f->max_len * (HS / 2)) * F)) &&
              (d->rope_sin = (float *)ctl_device_alloc(ctx, (size_t)(f->max_len * (HS / 2)) * F)) &&
              (d->logits = (float *)ctl_device_alloc(ctx, (size_t)(f->S * V) * F)) &&
              (d->tok = (int32_t *)ctl_device_alloc(ctx, (size_t)R * sizeof(int32_t))) &&
              (d->pos = (int32_t *)ctl_device_alloc(ctx, (size_t)R * sizeof(int32_t))) &&
              (d->seq = (int64_t *)ctl_device_alloc(ctx, (size_t)R * sizeof(int64_t))) &&
              (d->hist = (int32_t *)ctl_device_alloc(ctx, (size_t)(f->S * f->max_len) * sizeof(int32_t)));
    const ctl_model *m = f->m;
    int64_t P = m->n_params, NA = m->n_adapters;
    ctl__adapter_needs need = ctl__needs(m);
    if (ok) {   // every parameter's device address, the sparse entries, the adapters' buffers
        size_t ptrs = (size_t)P * sizeof(void *) + (size_t)(2 * NA) * sizeof(int32_t *) + (size_t)NA * sizeof(ctl__abuf);
        ok = (d->aw = (void **)ctl_alloc(ctx, ptrs)) != NULL;
        if (!ok) ctl__fail(ctx, CTL_ERR_OUT_OF_MEMORY, "infer_init: out of memory");
        if (ok) {
            memset(d->aw, 0, ptrs), d->sp_row = (int32_t **)(d->aw + P), d->sp_col = d->sp_row + NA;
            d->run.bufs = (ctl__abuf *)(d->sp_col + NA);
            for (int64_t i = 0; i < m->n_base; i++) d->aw[i] = d->w + ((unsigned char *)m->params[i].value.data - m->data);
        }
        ok = ok && ctl__adapters_alloc(ctx, m, d->aw, d->sp_row, d->sp_col);
        float *ah = NULL, *az = NULL;
        if (ok && need.rank > 0) ok = (ah = (float *)ctl_device_alloc(ctx, (size_t)(R * need.rank) * F)) != NULL;
        if (ok && need.dora) ok = (az = (float *)ctl_device_alloc(ctx, (size_t)(R * need.out) * F)) != NULL;
        for (int64_t a = 0; ok && a < NA; a++) {
            int64_t rows = m->params[m->adapters[a].base].value.shape[0];
            d->run.bufs[a].h = ah, d->run.bufs[a].z = az;
            if (m->adapters[a].dora_m >= 0)
                ok = (d->run.bufs[a].g = (float *)ctl_device_alloc(ctx, (size_t)rows * F)) &&
                     (d->run.bufs[a].nrm = (float *)ctl_device_alloc(ctx, (size_t)rows * F));
        }
    }
    d->end = ctl_device_mark(ctx);
    ctl_status st = ok ? CTL_OK : CTL_ERR_OUT_OF_MEMORY;   // ctl_device_alloc has said what did not fit
    f->dev = d;
    d->hist_rows = (int32_t *)ctl_alloc(ctx, (size_t)(f->S * f->max_len) * sizeof(int32_t));
    d->hist_lens = (int64_t *)ctl_alloc(ctx, (size_t)f->S * sizeof(int64_t));
    if (!st && (!d->hist_rows || !d->hist_lens)) st = ctl__fail(ctx, CTL_ERR_OUT_OF_MEMORY, "infer_init: out of memory");
    if (ok && c->arch == CTL_ARCH_LLAMA) {
        size_t tb = (size_t)(f->max_len * (HS / 2)) * F;
        if (!(st = ctl_copy_to_device(ctx, d->rope_cos, f->rope_cos, tb))) st = ctl_copy_to_device(ctx, d->rope_sin, f->rope_sin, tb);
    }
    f->ex.k = ctl__backend(ctx), f->ex.w = d->aw, f->ex.sp_row = d->sp_row, f->ex.sp_col = d->sp_col, f->run_on = &d->run;
    f->on.kcache = d->kcache, f->on.vcache = d->vcache, f->on.x = d->x, f->on.ln = d->ln, f->on.qkv = d->qkv, f->on.att = d->att;
    f->on.proj = d->proj, f->on.fch = d->fch, f->on.act = d->act, f->on.mean = d->mean, f->on.rstd = d->rstd;
    f->on.rope_cos = d->rope_cos, f->on.rope_sin = d->rope_sin, f->on.logits = d->logits;
    f->on.tok = d->tok, f->on.pos = d->pos, f->on.seq = d->seq, f->on.weights = d->w;
    return st;
}

static void ctl__idev_free(ctl_infer *f) {
    if (!f->dev) return;
    ctl_device_release_span(f->ctx, f->dev->mark, f->dev->end);
    ctl_free(f->ctx, f->dev->hist_rows);
    ctl_free(f->ctx, f->dev->hist_lens);
    ctl_free(f->ctx, f->dev->aw);
    ctl_free(f->ctx, f->dev);
    f->dev = NULL;
}

// ctl_generate's sampling on the device: rows k = 0..n-1 of the device's logits belong to
// sequences ids[k]; their histories go over, and only the tokens come back.
static ctl_status ctl__generate_sample_dev(ctl_infer *f, int64_t n, const int64_t *ids, const ctl_sampler_desc *sd, ctl_rng *rng,
                                           int32_t *toks) {
    ctl__idev *d = f->dev;
    bool pen = sd->repetition_penalty > 0.0f && sd->repetition_penalty != 1.0f;   // as ctl_sample
    for (int64_t k = 0; pen && k < n; k++) {
        d->hist_lens[k] = f->len[ids[k]];
        memcpy(d->hist_rows + k * f->max_len, f->hist + ids[k] * f->max_len, (size_t)f->len[ids[k]] * sizeof(int32_t));
    }
    const ctl__kernels *K = f->ex.k;
    ctl_status st = pen ? K->to_backend(f->ctx, d->hist, d->hist_rows, (size_t)(n * f->max_len) * sizeof(int32_t)) : CTL_OK;
    return st ? st : K->sample(f->ctx, toks, d->logits, n, f->m->cfg.vocab_size, sd, pen ? d->hist : NULL, f->max_len,
                               pen ? d->hist_lens : NULL, rng);
}
#endif

static ctl_status ctl__infer_check_tokens(ctl_infer *f, const int32_t *tokens, int64_t n) {
    if (f->n_adapters != f->m->n_adapters)
        return ctl__fail(f->ctx, CTL_ERR_INVALID, "infer: adapters were attached after ctl_infer_init; make a new one");
    // The adapter check above: the buffers were sized for the adapters attached at init. Here: an id outside the
    // vocabulary would index past the embedding table.
    for (int64_t i = 0; i < n; i++)
        if (tokens[i] < 0 || tokens[i] >= f->m->cfg.vocab_size)
            return ctl__fail(f->ctx, CTL_ERR_RANGE, "infer: token %d (number %" PRId64 ") is outside the vocabulary [0, %" PRId64 ")",
                             tokens[i], i, f->m->cfg.vocab_size);
    return CTL_OK;
}

// A run of tokens (a prompt) as one forward of n rows, causal among themselves through the cache. Only the
// last row goes through the LM head: nothing reads the other rows' logits.
CTL_API ctl_status ctl_infer_feed(ctl_infer *f, int64_t seq, const int32_t *tokens, int64_t n, float *logits) {
    if (!CTL__ARGS(NULL, f)) return CTL_ERR_INVALID;
    if (seq < 0 || seq >= f->S || n < 1 || !tokens)
        return ctl__fail(f->ctx, CTL_ERR_INVALID, "infer_feed: sequence %" PRId64 " (of %" PRId64 ") with %" PRId64 " tokens", seq, f->S, n);
    if (n > f->max_len - f->len[seq])
        return ctl__fail(f->ctx, CTL_ERR_CAPACITY, "infer_feed: sequence %" PRId64 " holds %" PRId64 " tokens; %" PRId64 " more exceed max_len %" PRId64,
                         seq, f->len[seq], n, f->max_len);
    ctl_status st = ctl__infer_check_tokens(f, tokens, n);
    if (st) return st;
    // len moves only after the forward succeeds: a failed feed leaves the sequence as it was (what it wrote to the
    // cache lies past len and is never read).
    for (int64_t r = 0; r < n; r++) f->tok[r] = tokens[r], f->pos[r] = (int32_t)(f->len[seq] + r), f->row_seq[r] = seq;
    if ((st = ctl__infer_forward(f, n))) return st;
    f->len[seq] += n;
    // The last row's final hidden state through the head: the logits of the token after the run.
    if (!logits || (st = ctl__infer_logits(f, f->on.ln + (n - 1) * f->m->cfg.n_embd, 1, 0, logits))) return st;
    f->row_seq[0] = seq, f->pos[0] = (int32_t)(f->len[seq] - 1);   // (the row the logits are of)
    return ctl__infer_finite(f, logits, 1, f->m->cfg.vocab_size, "the logits");
}

// One decoding step: one new token for each of n distinct sequences, as one forward of n rows. Two rows of one
// sequence would both sit at position len and write the same cache slot, hence the check (O(n^2), n <= S).
CTL_API ctl_status ctl_infer_step(ctl_infer *f, int64_t n, const int64_t *seqs, const int32_t *tokens, float *logits) {
    if (!CTL__ARGS(f ? f->ctx : NULL, f && seqs && tokens)) return CTL_ERR_INVALID;
    if (n < 1 || n > f->S) return ctl__fail(f->ctx, CTL_ERR_INVALID, "infer_step: %" PRId64 " sequences (1..%" PRId64 ")", n, f->S);
    for (int64_t i = 0; i < n; i++) {
        if (seqs[i] < 0 || seqs[i] >= f->S) return ctl__fail(f->ctx, CTL_ERR_INVALID, "infer_step: sequence %" PRId64, seqs[i]);
        if (f->len[seqs[i]] >= f->max_len)
            return ctl__fail(f->ctx, CTL_ERR_CAPACITY, "infer_step: sequence %" PRId64 " is full (%" PRId64 " tokens)", seqs[i], f->max_len);
        for (int64_t j = 0; j < i; j++)
            if (seqs[j] == seqs[i]) return ctl__fail(f->ctx, CTL_ERR_INVALID, "infer_step: sequence %" PRId64 " given twice", seqs[i]);
    }
    ctl_status st = ctl__infer_check_tokens(f, tokens, n);
    if (st) return st;
    for (int64_t r = 0; r < n; r++) f->tok[r] = tokens[r], f->pos[r] = (int32_t)f->len[seqs[r]], f->row_seq[r] = seqs[r];
    f->ctx->decode = true;   // every product sums each row in one order (ctl__gemm): a stream's bits do not depend on the others
    st = ctl__infer_forward(f, n);
    // As in ctl_infer_feed, lengths move only after a successful forward; decode is reset on every path.
    if (!st) {
        for (int64_t r = 0; r < n; r++) f->len[seqs[r]]++;
        if (logits) st = ctl__infer_logits(f, f->on.ln, n, 0, logits);
    }
    f->ctx->decode = false;
    return st || !logits ? st : ctl__infer_finite(f, logits, n, f->m->cfg.vocab_size, "the logits");
}

// A total order (ties broken by id): the partial and the full sort agree on every prefix, and qsort's
// instability cannot change a result.
static int ctl__cand_cmp(const void *a, const void *b) {   // by logit, high first; ties by id
    const ctl__cand *x = (const ctl__cand *)a, *y = (const ctl__cand *)b;
    if (x->logit != y->logit) return x->logit > y->logit ? -1 : 1;
    return (x->id > y->id) - (x->id < y->id);
}

static bool ctl__cand_before(const ctl__cand *x, const ctl__cand *y) {   // the same order, strict
    return x->logit > y->logit || (x->logit == y->logit && x->id < y->id);
}

// Reorders c[0, n) so that its first m entries are, in sorted order, the m that sort first:
// a quickselect (Hoare partitions, median-of-three pivots) then a sort of those m.
// Expected O(n) for the selection, then O(m log m): top_k = 40 over a large vocabulary sorts 40 entries.
static void ctl__cand_top(ctl__cand *c, int64_t n, int64_t m) {
    int64_t lo = 0, hi = n - 1;
    while (m < n && lo < hi) {
        ctl__cand a = c[lo], b = c[lo + (hi - lo) / 2], d = c[hi], pivot;
        if (ctl__cand_before(&a, &b)) pivot = ctl__cand_before(&b, &d) ? b : ctl__cand_before(&a, &d) ? d : a;
        else pivot = ctl__cand_before(&a, &d) ? a : ctl__cand_before(&b, &d) ? d : b;
        // After the partition, [lo, j] sort no later than the pivot and [i, hi] no earlier; entries between j and i
        // equal it.
        int64_t i = lo, j = hi;
        while (i <= j) {
            while (ctl__cand_before(&c[i], &pivot)) i++;
            while (ctl__cand_before(&pivot, &c[j])) j--;
            if (i <= j) {
                ctl__cand t = c[i];
                c[i++] = c[j], c[j--] = t;
            }
        }
        if (m - 1 <= j) hi = j;        // the m-th lies left of the split
        else if (m - 1 >= i) lo = i;   // or right of it
        else break;                    // or it is the pivot itself
    }
    qsort(c, (size_t)m, sizeof *c, ctl__cand_cmp);
}

// The sampler with the candidates sorted either wholly (full_sort: the plain reference) or only
// as far as the filters need. Both see the same sorted prefix and make the same choices from
// it, so they return the same token for the same uniform draw u (unused when greedy).
static int32_t ctl__sample_u(float *logits, int64_t V, const ctl_sampler_desc *sd, const int32_t *history,
                             int64_t n_history, float u_draw, float *scratch, bool full_sort) {
    // scratch holds V candidates (2V floats), reused three ways below: marks for the penalty, the candidates, and
    // the unfiltered path's exps.
    ctl__cand *cand = (ctl__cand *)(void *)scratch;
    float pen = sd->repetition_penalty;
    // Repetition penalty, the CTRL rule (Keskar et al. 2019) as HF and llama.cpp apply it: a token seen in the
    // history has its logit divided by pen when positive, multiplied when negative, so pen > 1 always makes it
    // less likely. Before the temperature; ids outside [0, V) in the history are ignored.
    if (pen > 0.0f && pen != 1.0f) {   // each distinct token once: mark them in the scratch ids
        for (int64_t v = 0; v < V; v++) cand[v].id = 0;
        for (int64_t i = 0; i < n_history; i++)
            if (history[i] >= 0 && history[i] < V && !cand[history[i]].id) {
                cand[history[i]].id = 1;
                float *z = &logits[history[i]];
                *z = *z > 0.0f ? *z / pen : *z * pen;
            }
    }
    // Greedy: the argmax of the penalised logits (no filter changes the argmax).
    if (sd->temperature <= 0.0f) return ctl_sample_token(logits, V, 0.0f, NULL);
    // Candidates at the temperature; top, their largest, is subtracted before every exp so none overflows.
    float top = -INFINITY;
    for (int64_t v = 0; v < V; v++) {
        float z = logits[v] / sd->temperature;
        cand[v].logit = z == z ? z : -INFINITY, cand[v].id = (int32_t)v;   // NaN sorts last
        top = CTL__MAX(top, cand[v].logit);
    }
    // The filters, in the order top_k, top_p, min_p: top_k keeps the kk best; top_p (nucleus sampling, Holtzman
    // et al. 2020) the smallest sorted prefix whose mass reaches top_p of the kk's total (with no top_k, of the
    // whole vocabulary's, summed in id order); min_p (Nguyen et al. 2024) those at least min_p times as likely
    // as the best, at least one. `limit` is the most that can stay: min_p and top_k cut top_p's prefix.
    bool use_p = sd->top_p > 0.0f && sd->top_p < 1.0f;
    int64_t kk = sd->top_k > 0 ? CTL__MIN(sd->top_k, V) : V, limit = kk;
    if (sd->min_p > 0.0f) {
        int64_t above = 0;
        for (int64_t v = 0; v < V; v++) above += exp((double)(cand[v].logit - top)) >= sd->min_p;
        limit = CTL__MIN(limit, CTL__MAX(above, (int64_t)1));
    }
    double u = (double)u_draw, total = 0.0, sum = 0.0, acc = 0.0;
    if (limit == V && !use_p) {   // no filter: a draw over the whole vocabulary in id order, each
        double *e = (double *)(void *)cand;   // exp once, into the candidate's own 8 bytes
        for (int64_t v = 0; v < V; v++) sum += (e[v] = exp((double)(cand[v].logit - top)));
        for (int64_t v = 0; v < V; v++)
            if (u * sum < (acc += e[v])) return (int32_t)v;
        return (int32_t)(V - 1);
    }
    // top_p alone: the whole vocabulary's mass, summed in id order before any sorting, so the total cannot depend
    // on how far the sort below went (the partial and the full sort must agree).
    if (use_p && kk == V)
        for (int64_t v = 0; v < V; v++) total += exp((double)(cand[v].logit - top));
    // Sort only what the filters read: the kk or limit best, or for top_p alone a prefix that
    // grows eightfold until the nucleus ends inside it.
    int64_t keep = limit, m = full_sort ? V : !use_p ? limit : kk < V ? kk : CTL__MIN(limit, (int64_t)64);
    for (bool have_total = kk == V;; m = CTL__MIN(limit, 8 * m)) {
        ctl__cand_top(cand, V, m);
        if (!use_p) break;
        // With top_k the total is the kk best's mass, summed in sorted order once they are sorted.
        for (int64_t i = 0; !have_total && i < kk; i++) total += exp((double)(cand[i].logit - top));
        have_total = true;
        // The nucleus ends at the first i whose running mass reaches top_p: inside the sorted prefix, done; else sort further.
        double cum = 0.0;
        int64_t i = 0, n = CTL__MIN(m, limit);
        while (i < n && (cum += exp((double)(cand[i].logit - top)) / total) < sd->top_p) i++;
        if (i < n) {
            keep = i + 1;
            break;
        }
        if (m >= limit) break;
    }
    // The draw over the kept candidates, renormalised: the first whose running mass exceeds u times their total.
    for (int64_t i = 0; i < keep; i++) sum += exp((double)(cand[i].logit - top));
    for (int64_t i = 0; i < keep; i++)
        if (u * sum < (acc += exp((double)(cand[i].logit - top)))) return cand[i].id;
    return cand[keep - 1].id;   // reached only through rounding at the end of the sum
}

// One uniform per sampled token, drawn before anything else reads the logits (none when greedy): the RNG then
// advances the same way whatever the filters do, and a batched caller can draw a whole round's uniforms first.
static int32_t ctl__sample(float *logits, int64_t V, const ctl_sampler_desc *sd, const int32_t *history,
                           int64_t n_history, ctl_rng *rng, float *scratch, bool full_sort) {
    float u = sd->temperature > 0.0f ? ctl_rng_uniform(rng) : 0.0f;
    return ctl__sample_u(logits, V, sd, history, n_history, u, scratch, full_sort);
}

// The public sampler takes the partial sort; the full sort is the tests' reference for it.
CTL_API int32_t ctl_sample(float *logits, int64_t V, const ctl_sampler_desc *sd, const int32_t *history,
                           int64_t n_history, ctl_rng *rng, float *scratch) {
    if (!CTL__ARGS(NULL, logits && V >= 1 && sd && (history || n_history == 0) && (rng || sd->temperature <= 0.0f) && scratch))
        return 0;
    return ctl__sample(logits, V, sd, history, n_history, rng, scratch, false);
}

// Whether the text of the last (up to 32) generated tokens contains a stop string. An earlier
// occurrence would have stopped the sequence already, so any match is new. Limits: a stop string whose text
// spans more than the last 32 tokens, or lies past the 4095 bytes kept, is not seen; a detokenize error counts
// as no match.
static bool ctl__hit_stop_string(const ctl_sampler_desc *sd, const int32_t *gen, int64_t n) {
    char text[4096];
    size_t len;
    int64_t from = n > 32 ? n - 32 : 0;
    if (ctl_detokenize(sd->tokenizer, gen + from, n - from, text, sizeof text, &len)) return false;
    len = CTL__MIN(len, sizeof text - 1);
    for (int64_t k = 0; k < sd->n_stop_strings; k++) {
        size_t sl = strlen(sd->stop_strings[k]);
        for (size_t i = 0; sl && i + sl <= len; i++)
            if (!memcmp(text + i, sd->stop_strings[k], sl)) return true;
    }
    return false;
}

typedef struct ctl__sample_args {   // what every sampling task of a round reads
    ctl_infer *f;
    const ctl_sampler_desc *sd;
} ctl__sample_args;

// Row k of a round: live sequence f->live[k] samples with its draw f->u[k] into f->toks[k], in its thread's own
// candidate row. Its history for the repetition penalty is the sequence so far (hist: prompt and new tokens).
static void ctl__sample_task(void *arg, int64_t k, int thread) {
    const ctl__sample_args *a = (const ctl__sample_args *)arg;
    ctl_infer *f = a->f;
    int64_t s = f->live[k], V = f->m->cfg.vocab_size;
    f->toks[k] = ctl__sample_u(f->logits + s * V, V, a->sd, f->hist + s * f->max_len, f->len[s], f->u[k],
                               (float *)(void *)(f->cand + (int64_t)thread * V), false);
}

// Starts prompt p in G free sequences: fed once into the first, whose keys and values the
// other G - 1 then read (on a CUDA context, fed into each); each has the prompt's last logits.
static ctl_status ctl__generate_start(ctl_infer *f, int64_t p, const int32_t *prompt, int64_t len, int64_t G, int64_t *free_slots) {
    int64_t V = f->m->cfg.vocab_size, first = -1;
    for (int64_t s = 0, g = 0; s < f->S && g < G; s++) {
        if (f->slot_prompt[s] >= 0) continue;
        f->slot_prompt[s] = p, f->slot_out[s] = p * G + g, (*free_slots)--;   // output row p*G + g
        memcpy(f->hist + s * f->max_len, prompt, (size_t)len * sizeof(int32_t));
        // hist holds the prompt too: the repetition penalty counts its tokens, as HF's does.
        ctl_infer_reset(f, s);
        ctl_status st = CTL_OK;
        if (first < 0 || f->dev) {
            st = ctl_infer_feed(f, s, prompt, len, f->dev ? NULL : f->logits + s * V);
            // On the device the logits stay there, sequence s's in row s, and are sampled there.
            if (!st && f->dev) st = ctl__infer_logits(f, f->on.ln + (len - 1) * f->m->cfg.n_embd, 1, s, NULL);
            if (first < 0) first = s;
        } else {
            // A follower: the whole prompt is read from the first sequence's cache, and its first logits are the first's.
            f->len[s] = len, f->parent[s] = first, f->shared[s] = len;
            memcpy(f->logits + s * V, f->logits + first * V, (size_t)V * sizeof(float));
        }
        if (st) return st;
        g++;
    }
    return CTL_OK;
}

// A stream has stopped: once none of its prompt's streams goes on, their sequences are free. They are freed
// together because the followers read the first sequence's cache: it cannot be reused while one still runs.
static void ctl__generate_end(ctl_infer *f, int64_t s, int64_t *free_slots) {
    int64_t p = f->slot_prompt[s];
    f->slot_out[s] = -1;
    for (int64_t k = 0; k < f->S; k++)
        if (f->slot_prompt[k] == p && f->slot_out[k] >= 0) return;
    for (int64_t k = 0; k < f->S; k++)
        if (f->slot_prompt[k] == p) f->slot_prompt[k] = -1, (*free_slots)++;
}

// The sampler's settings in their ranges (NaN is in none): temperature 0 or in [1e-6, 1e6]
// (below, logits / temperature overflow), top_k >= 0, top_p and min_p in [0, 1], a repetition
// penalty in [0, 1e6], and the stop lists as long as they say.
static ctl_status ctl__sampler_check(ctl_ctx *ctx, const ctl_sampler_desc *sd, const char *who) {
    float t = sd->temperature, pen = sd->repetition_penalty;
    if (!(t == 0.0f || (t >= 1e-6f && t <= 1e6f)) || sd->top_k < 0 || !(sd->top_p >= 0.0f && sd->top_p <= 1.0f) ||
        !(sd->min_p >= 0.0f && sd->min_p <= 1.0f) || !(pen >= 0.0f && pen <= 1e6f) || sd->max_new_tokens < 0)
        return ctl__fail(ctx, CTL_ERR_RANGE, "%s: sampler temperature %g (0, or 1e-6..1e6), top_k %" PRId64 " (>= 0), top_p %g and min_p %g "
                         "(0..1), repetition_penalty %g (0..1e6) or max_new_tokens %" PRId64 " (>= 0) out of range", who, (double)t,
                         sd->top_k, (double)sd->top_p, (double)sd->min_p, (double)pen, sd->max_new_tokens);
    if (sd->n_stop_tokens < 0 || (sd->n_stop_tokens > 0 && !sd->stop_tokens) || sd->n_stop_strings < 0 ||
        (sd->n_stop_strings > 0 && !sd->stop_strings))
        return ctl__fail(ctx, CTL_ERR_INVALID, "%s: sampler stop lists: %" PRId64 " tokens and %" PRId64 " strings, with their arrays",
                         who, sd->n_stop_tokens, sd->n_stop_strings);
    for (int64_t i = 0; i < sd->n_stop_strings; i++)
        if (!sd->stop_strings[i]) return ctl__fail(ctx, CTL_ERR_INVALID, "%s: stop string %" PRId64 " is NULL", who, i);
    return CTL_OK;
}

// The scheduler. Sequences ("slots") go to prompts a whole group of G at a time: slot_prompt[s] is the prompt
// whose group holds s (-1: free), slot_out[s] the output row s writes (-1: stopped). Each round samples one
// token for every live stream, then feeds them all with one ctl_infer_step. For a given seed and max_seqs the
// output is exact on any thread count; another max_seqs starts prompts in other rounds, so the same draws
// go to other streams and the samples differ.
// Token t sampled for the stream in slot s: false when it ends the stream. A stop token ends it unemitted (and is
// its `ended`); any other is appended to the stream's output, after which the callback, a stop string, the output's
// width (limit) or a full cache may end it.
static bool ctl__generate_emit(ctl_infer *f, int64_t s, int32_t t, const ctl_sampler_desc *sd, int64_t max_new, int64_t limit,
                               int32_t *out, int64_t *out_lens, int32_t *ended, ctl_token_fn fn, void *user, int64_t *made) {
    int64_t i = f->slot_out[s];
    for (int64_t j = 0; j < sd->n_stop_tokens; j++)
        if (t == sd->stop_tokens[j]) {
            if (ended) ended[i] = t;
            return false;
        }
    out[i * max_new + out_lens[i]++] = t, (*made)++;
    bool go = true;
    if (fn && !fn(i, t, user)) go = false;
    if (sd->n_stop_strings && sd->tokenizer && ctl__hit_stop_string(sd, out + i * max_new, out_lens[i])) go = false;
    if (out_lens[i] >= limit || f->len[s] >= f->max_len) go = false;
    return go;
}

// ctl_generate_groups, and with `ended` (n_prompts * G, or NULL) each output's end: the stop token it sampled,
// or -1 when something else ended it (max_new, a stop string, the callback, a full cache).
static ctl_status ctl__generate_groups(ctl_infer *f, int64_t n_prompts, const int32_t *const *prompts, const int64_t *prompt_lens,
                                       int64_t G, const ctl_sampler_desc *sd, int64_t max_new, int32_t *out, int64_t *out_lens,
                                       int32_t *ended, ctl_token_fn fn, void *user) {
    ctl_ctx *ctx = f->ctx;
    int64_t V = f->m->cfg.vocab_size, S = f->S, limit = max_new, free_slots = S, next = 0, made = 0;
    // (n_prompts * G is used below: its overflow is refused here)
    if (n_prompts < 1 || G < 1 || G > S || max_new < 0 || !sd || !prompts || !prompt_lens || !out || !out_lens ||
        n_prompts > INT64_MAX / G)
        return ctl__fail(ctx, CTL_ERR_INVALID, "generate: %" PRId64 " prompts x %" PRId64 " samples (1..%" PRId64 " sequences a prompt), max_new %" PRId64
                         ", and every array given", n_prompts, G, S, max_new);
    ctl_status bad = ctl__sampler_check(ctx, sd, "generate");
    if (bad) return bad;
    if (f->dev && n_prompts * G > S)
        return ctl__fail(ctx, CTL_ERR_INVALID, "generate on a CUDA context: %" PRId64 " streams; at most %" PRId64 " (max_seqs) at once",
                         n_prompts * G, S);
    for (int64_t p = 0; p < n_prompts; p++)
        if (!prompts[p] || prompt_lens[p] < 1 || prompt_lens[p] > f->max_len)
            return ctl__fail(ctx, CTL_ERR_INVALID, "generate: prompt %" PRId64 " has %" PRId64 " tokens (1..%" PRId64 ")", p,
                             prompts[p] ? prompt_lens[p] : 0, f->max_len);
    // max_new is out's row width; the sampler's max_new_tokens may cap lower.
    if (sd->max_new_tokens > 0) limit = CTL__MIN(limit, sd->max_new_tokens);
    for (int64_t i = 0; i < n_prompts * G; i++) out_lens[i] = 0;
    for (int64_t i = 0; ended && i < n_prompts * G; i++) ended[i] = -1;
    ctl_rng rng;
    ctl_rng_seed(&rng, sd->seed);   // the only randomness: one stream of draws for the whole call
    ctl_infer_reset(f, -1);
    for (int64_t s = 0; s < S; s++) f->slot_out[s] = f->slot_prompt[s] = -1;
    float *stepped = f->logits + S * V;   // rows S..2S-1: a step's logits, in step order
    int64_t *seqs = f->live + 0;   // (stepped sequences are a prefix-ordered subset of the live ones)
    for (;;) {
        // Start prompts while a whole group of sequences is free (so at first as many as fit).
        while (next < n_prompts && free_slots >= G) {
            ctl_status st = ctl__generate_start(f, next, prompts[next], prompt_lens[next], G, &free_slots);
            if (st) return st;
            // With limit 0 a group produces nothing: its streams end as soon as they start.
            for (int64_t s = 0; limit == 0 && s < S; s++)
                if (f->slot_prompt[s] == next) ctl__generate_end(f, s, &free_slots);
            next++;
        }
        // This round's streams in the order of their outputs: one draw each, in that order, all taken before the rows
        // are sampled in parallel (each task reads its own), so the thread count cannot change who gets which draw.
        int64_t rows = 0;
        for (int64_t s = 0; s < S; s++)
            if (f->slot_out[s] >= 0) {
                int64_t k = rows++;
                for (; k > 0 && f->slot_out[f->live[k - 1]] > f->slot_out[s]; k--) f->live[k] = f->live[k - 1];
                f->live[k] = s;
            }
        // Nothing live: done once every prompt has started; otherwise the last groups ended at once (limit 0) and
        // freed their slots for the next prompts.
        if (!rows) {
            if (next == n_prompts) return CTL_OK;
            continue;
        }
        if (f->ex.k->sample) {   // where the logits are
            ctl_status st = ctl__generate_sample_dev(f, rows, f->live, sd, &rng, f->toks);
            if (st) return st;
        } else {
            for (int64_t k = 0; k < rows; k++) f->u[k] = sd->temperature > 0.0f ? ctl_rng_uniform(&rng) : 0.0f;
            ctl__sample_args sa = {f, sd};
            ctl_parallel_for(ctx, rows, ctl__sample_task, &sa);
        }
        // Each sampled token: a stop token ends its stream unemitted; any other is emitted, after which the callback, a
        // stop string, the output's width or a full cache may end the stream. Streams that go on are fed this round.
        int64_t act = 0;
        for (int64_t k = 0; k < rows; k++) {   // (act <= k: seqs and toks[act] are written after live[k] and toks[k] are read)
            int64_t s = f->live[k];
            int32_t t = f->toks[k];
            if (!ctl__generate_emit(f, s, t, sd, max_new, limit, out, out_lens, ended, fn, user, &made)) {
                ctl__generate_end(f, s, &free_slots);
                continue;
            }
            f->hist[s * f->max_len + f->len[s]] = t;   // the repetition penalty's history
            seqs[act] = s, f->toks[act++] = t;
        }
        if (sd->progress) sd->progress(made, sd->progress_user);   // after each round: tokens made so far
        if (!act) continue;   // every stream stopped this round: start more, or finish
        // One forward for every continuing stream; the step's logits (in step order) then go back to their sequences'
        // rows for the next round (on the device they stay there, in rows 0..act-1).
        ctl_status st = ctl_infer_step(f, act, seqs, f->toks, f->dev ? NULL : stepped);
        if (!st && f->dev) st = ctl__infer_logits(f, f->on.ln, act, 0, NULL);   // rows 0..act-1: the next round's
        if (st) return st;
        for (int64_t k = 0; k < act && !f->dev; k++) memcpy(f->logits + seqs[k] * V, stepped + k * V, (size_t)V * sizeof(float));
    }
}

CTL_API ctl_status ctl_generate_groups(ctl_infer *f, int64_t n_prompts, const int32_t *const *prompts, const int64_t *prompt_lens,
                                       int64_t G, const ctl_sampler_desc *sd, int64_t max_new, int32_t *out, int64_t *out_lens,
                                       ctl_token_fn fn, void *user) {
    if (!CTL__ARGS(NULL, f)) return CTL_ERR_INVALID;
    return ctl__generate_groups(f, n_prompts, prompts, prompt_lens, G, sd, max_new, out, out_lens, NULL, fn, user);
}

// Groups of one.
CTL_API ctl_status ctl_generate(ctl_infer *f, int64_t n, const int32_t *const *prompts, const int64_t *prompt_lens,
                                const ctl_sampler_desc *sd, int64_t max_new, int32_t *out, int64_t *out_lens,
                                ctl_token_fn fn, void *user) {
    return ctl_generate_groups(f, n, prompts, prompt_lens, 1, sd, max_new, out, out_lens, fn, user);
}


// ---- rewards ----------------------------------------------------------------------------------

// ASCII classes, independent of the C locale: <ctype.h>'s follow setlocale and are undefined for negative
// char values, which UTF-8 bytes are where char is signed.
static bool ctl__digit(char c) { return c >= '0' && c <= '9'; }
static char ctl__lower(char c) { return c >= 'A' && c <= 'Z' ? (char)(c - 'A' + 'a') : c; }
static bool ctl__space(char c) { return c == ' ' || c == '\n' || c == '\t' || c == '\r' || c == '\f' || c == '\v'; }

// The number starting at s[i] (a digit, or a sign/'$'/'.' before one): its value and end.
static bool ctl__number_at(const char *s, size_t len, size_t i, double *val, size_t *end) {
    size_t j = i;
    bool neg = false;
    // Limits: "1,2,3" reads as 1 (groups of exactly three only); "1e5" as 1; a fraction a/b with b = 0 leaves a. The
    // value is built digit by digit in double, so long decimals may differ from strtod in the last bits; the
    // comparisons allow 1e-6 relative.
    if (j < len && (s[j] == '-' || s[j] == '+')) neg = s[j] == '-', j++;
    if (j < len && s[j] == '$') j++;
    if (!(j < len && (ctl__digit(s[j]) || (s[j] == '.' && j + 1 < len && ctl__digit(s[j + 1]))))) return false;
    double v = 0.0;
    for (; j < len; j++) {   // digits, with commas that separate groups of exactly three
        if (ctl__digit(s[j])) v = v * 10.0 + (s[j] - '0');
        else if (s[j] == ',' && j + 3 < len + 0 && ctl__digit(s[j + 1]) && ctl__digit(s[j + 2]) && ctl__digit(s[j + 3]) &&
                 (j + 4 >= len || !ctl__digit(s[j + 4])))
            continue;
        else break;
    }
    if (j + 1 < len && s[j] == '.' && ctl__digit(s[j + 1]))
        for (double f = 0.1; ++j < len && ctl__digit(s[j]); f /= 10.0) v += f * (s[j] - '0');
    if (j + 1 < len && s[j] == '/' && ctl__digit(s[j + 1])) {   // a fraction a/b
        double d = 0.0;
        for (j++; j < len && ctl__digit(s[j]); j++) d = d * 10.0 + (s[j] - '0');
        if (d != 0.0) v /= d;
    }
    *val = neg ? -v : v, *end = j;
    return true;
}

// "\frac{a}{b}" (or \dfrac, \tfrac) at s[i]: its value and end.
static bool ctl__frac_at(const char *s, size_t len, size_t i, double *val, size_t *end) {
    // Only plain numbers inside the braces: \frac{a+1}{2} or \frac{\pi}{2} is not read (false).
    static const char *const names[3] = {"\\frac{", "\\dfrac{", "\\tfrac{"};
    for (int k = 0; k < 3; k++) {
        size_t n = strlen(names[k]), e1, e2;
        double a, b;
        if (i + n > len || memcmp(s + i, names[k], n)) continue;
        if (!ctl__number_at(s, len, i + n, &a, &e1) || e1 + 1 >= len || s[e1] != '}' || s[e1 + 1] != '{' ||
            !ctl__number_at(s, len, e1 + 2, &b, &e2) || e2 >= len || s[e2] != '}' || b == 0.0)
            return false;
        *val = a / b, *end = e2 + 1;
        return true;
    }
    return false;
}

// A number may start at i: not inside a word or another number.
static bool ctl__number_start(const char *s, size_t i) {
    if (i == 0) return true;
    char p = s[i - 1];
    return !ctl__digit(p) && p != '.' && p != ',' && !((p >= 'a' && p <= 'z') || (p >= 'A' && p <= 'Z'));
}

// The first place a number may start wins; a \frac counts as one number.
CTL_API bool ctl_parse_number(const char *s, size_t len, double *out) {
    if (!CTL__ARGS(NULL, s && out)) return false;
    for (size_t i = 0; i < len; i++) {
        size_t end;
        if (s[i] == '\\' && ctl__frac_at(s, len, i, out, &end)) return true;
        if ((ctl__digit(s[i]) || s[i] == '-' || s[i] == '$' || s[i] == '.') && ctl__number_start(s, i) &&
            ctl__number_at(s, len, i, out, &end))
            return true;
    }
    return false;
}

// The last occurrence of pat (any case when nocase: pat must then be lower case, only s is folded) in s, or
// NULL. From the end: a completion's final answer follows its reasoning, which may use the same words.
static const char *ctl__last(const char *s, size_t len, const char *pat, bool nocase) {
    size_t n = strlen(pat);
    for (size_t i = len >= n ? len - n + 1 : 0; i-- > 0;) {
        size_t k = 0;
        while (k < n && (nocase ? ctl__lower(s[i + k]) == pat[k] : s[i + k] == pat[k])) k++;
        if (k == n) return s + i;
    }
    return NULL;
}

CTL_API bool ctl_extract_answer(const char *text, size_t len, const char **start, size_t *alen) {
    if (!CTL__ARGS(NULL, text && start && alen)) return false;
    const char *p, *e = text + len;
    double v;
    size_t end;
    // A "####" decides alone: with no number after it the completion states none, even if a \boxed{} does.
    if ((p = ctl__last(text, len, "####", false))) {   // the rest of that line
        p += 4;
        const char *nl = (const char *)memchr(p, '\n', (size_t)(e - p));
        *start = p, *alen = (size_t)((nl ? nl : e) - p);
        return ctl_parse_number(*start, *alen, &v);
    }
    // Braces are counted, so \boxed{\frac{1}{2}} keeps its inside whole; an unclosed one falls through.
    if ((p = ctl__last(text, len, "\\boxed{", false))) {   // up to the matching brace
        int depth = 1;
        const char *q = p + 7;
        for (; q < e && depth; q++) depth += *q == '{' ? 1 : *q == '}' ? -1 : 0;
        if (!depth) {
            *start = p + 7, *alen = (size_t)(q - 1 - (p + 7));
            return true;
        }
    }
    // Whichever of the two phrases comes later.
    const char *a = ctl__last(text, len, "answer is", true), *b = ctl__last(text, len, "answer:", true);
    p = a > b ? a : b;
    if (p) {   // the first number after it
        size_t from = (size_t)(p - text) + (p == a ? 9 : 7);
        for (size_t i = from; i < len; i++)
            if (((text[i] == '\\' && ctl__frac_at(text, len, i, &v, &end)) ||
                 ((ctl__digit(text[i]) || text[i] == '-' || text[i] == '$' || text[i] == '.') && ctl__number_start(text, i) &&
                  ctl__number_at(text, len, i, &v, &end)))) {
                *start = text + i, *alen = end - i;
                return true;
            }
    }
    for (size_t i = len; i-- > 0;) {   // the last number: find its start, then parse forward
        if (!ctl__digit(text[i])) continue;
        // Back over the number's characters (digits; ',' '.' '/' between digits; a '$' or '.'; a '-'), then parsed forward
        // by the same rule as the others.
        size_t j = i;
        while (j > 0 && (ctl__digit(text[j - 1]) || ((text[j - 1] == ',' || text[j - 1] == '.' || text[j - 1] == '/') &&
                                                    j >= 2 && ctl__digit(text[j - 2]))))
            j--;
        if (j > 0 && (text[j - 1] == '$' || text[j - 1] == '.')) j--;
        if (j > 0 && text[j - 1] == '-' && ctl__number_start(text, j - 1)) j--;
        if (!ctl__number_start(text, j)) {   // the tail of a word ("version2"): look further back
            i = j;
            continue;
        }
        if (ctl__number_at(text, len, j, &v, &end)) {
            *start = text + j, *alen = end - j;
            return true;
        }
    }
    return false;
}

// The reference may be a bare number ("72"), or a GSM8K solution whose value follows its last "####" (its worked
// steps hold other numbers first, so the marker wins over the first number).
CTL_API float ctl_reward_math(const char *completion, size_t len, const char *reference) {
    if (!CTL__ARGS(NULL, completion && reference)) return NAN;
    double want, got;
    const char *a;
    size_t alen;
    if (!reference || !ctl_parse_number(reference, strlen(reference), &want)) {
        const char *h = reference ? strstr(reference, "####") : NULL;   // a GSM8K answer: its last line
        if (!h || !ctl_parse_number(h + 4, strlen(h + 4), &want)) return NAN;
    } else if (strstr(reference, "####")) {
        const char *h = ctl__last(reference, strlen(reference), "####", false);
        if (!ctl_parse_number(h + 4, strlen(h + 4), &want)) return NAN;
    }
    if (!ctl_extract_answer(completion, len, &a, &alen) || !ctl_parse_number(a, alen, &got)) return 0.0f;
    return fabs(got - want) <= 1e-6 * CTL__MAX(1.0, fabs(want)) ? 1.0f : 0.0f;   // relative, absolute below 1
}

CTL_API float ctl_reward_answer_line(const char *completion, size_t len) {
    if (!CTL__ARGS(NULL, completion)) return NAN;
    const char *e = completion + len, *s;
    while (e > completion && ctl__space(e[-1])) e--;   // the last non-empty line: [s, e)
    for (s = e; s > completion && s[-1] != '\n'; s--) {}
    while (s < e && ctl__space(*s)) s++;
    if (e - s < 5 || memcmp(s, "####", 4)) return 0.0f;   // "####" and at least one more character
    const char *p = s + 4;
    while (p < e && ctl__space(*p)) p++;
    double v;
    if (p == e || !ctl_parse_number(p, (size_t)(e - p), &v)) return 0.0f;
    for (const char *q = p; q < e; q++)   // nothing but the number: no words after it
        if ((*q >= 'a' && *q <= 'z') || (*q >= 'A' && *q <= 'Z')) return 0.0f;
    return 1.0f;
}

CTL_API float ctl_reward_format(const char *completion, size_t len) {
    if (!CTL__ARGS(NULL, completion)) return NAN;
    const char *s = completion, *e = completion + len;
    while (s < e && ctl__space(*s)) s++;
    // Opens with <think>; the last </think> closes it with no second <think> between; text other than space follows.
    if ((size_t)(e - s) < 7 || memcmp(s, "<think>", 7)) return 0.0f;
    const char *close = ctl__last(s, (size_t)(e - s), "</think>", false);
    if (!close || ctl__last(s + 7, (size_t)(close - s - 7), "<think>", false)) return 0.0f;
    for (const char *q = close + 8; q < e; q++)
        if (!ctl__space(*q)) return 1.0f;
    return 0.0f;
}

CTL_API float ctl_reward_length(int64_t n_tokens, int64_t budget) {
    if (budget <= 0 || n_tokens <= budget) return 0.0f;
    return n_tokens >= 2 * budget ? -1.0f : -(float)(n_tokens - budget) / (float)budget;
}

CTL_API float ctl_reward_fn_math(const ctl_reward_input *in, void *user) {
    (void)user;
    if (!CTL__ARGS(NULL, in && in->completion)) return NAN;
    const char *ref = in->example ? in->example->answer : NULL;
    return ref ? ctl_reward_math(in->completion, in->completion_len, ref) : NAN;
}

CTL_API float ctl_reward_fn_answer_line(const ctl_reward_input *in, void *user) {
    (void)user;
    if (!CTL__ARGS(NULL, in && in->completion)) return NAN;
    return ctl_reward_answer_line(in->completion, in->completion_len);
}

CTL_API float ctl_reward_fn_format(const ctl_reward_input *in, void *user) {
    (void)user;
    if (!CTL__ARGS(NULL, in && in->completion)) return NAN;
    return ctl_reward_format(in->completion, in->completion_len);
}

// user points at the budget (int64_t); without one the budget is 0, and every length scores 0.
CTL_API float ctl_reward_fn_length(const ctl_reward_input *in, void *user) {
    if (!CTL__ARGS(NULL, in)) return NAN;
    return ctl_reward_length(in->n_tokens, user ? *(const int64_t *)user : 0);
}

// rewards (n, k) row-major: column j is function j's. A batch function fills its column through stride k; it
// runs with ctx NULL (there is none here to hold its message), and its failure leaves its column NaN, unscored,
// rather than failing the others. ctl_rl scores with a context instead (ctl__rl_score).
CTL_API void ctl_rewards_score(const ctl_reward_func *funcs, int64_t k, const ctl_reward_input *in, int64_t n,
                               float *rewards, float *weights, const char **names) {
    if (!CTL__ARGS(NULL, funcs && in && rewards && k >= 0 && n >= 0)) return;
    for (int64_t j = 0; j < k; j++) {
        if (weights) weights[j] = funcs[j].weight;
        if (names) names[j] = funcs[j].name;
        if (funcs[j].batch) {
            for (int64_t i = 0; i < n; i++) rewards[i * k + j] = NAN;
            if (funcs[j].batch(NULL, in, n, rewards + j, k, funcs[j].user))
                for (int64_t i = 0; i < n; i++) rewards[i * k + j] = NAN;
            continue;
        }
        for (int64_t i = 0; i < n; i++) rewards[i * k + j] = funcs[j].fn(&in[i], funcs[j].user);
    }
}

// Safe on a partly filled rollout: ctl_rollout_run zeroes it first.
CTL_API void ctl_rollout_free(ctl_ctx *ctx, ctl_rollout *r) {
    if (!r || !CTL__ARGS(NULL, ctx)) return;
    for (int64_t i = 0; r->text && i < r->n; i++) ctl_free(ctx, r->text[i]);
    ctl_free(ctx, r->tokens), ctl_free(ctx, r->targets), ctl_free(ctx, r->weights), ctl_free(ctx, r->completion);
    ctl_free(ctx, r->completion_len), ctl_free(ctx, r->truncated), ctl_free(ctx, r->text);
    memset(r, 0, sizeof *r);
}

// G samples of each prompt, then each as a training row: prompt, completion and, when it ended at a stop token, that
// token with weight 1, so the policy learns to stop (TRL keeps the EOS in the loss). A completion that ended
// otherwise (max_new, a stop string, a full cache) sampled no stop token and is given none.
CTL_API ctl_status ctl_rollout_run(ctl_infer *inf, const ctl_tokenizer *tk, const int32_t *const *prompts,
                                   const int64_t *prompt_lens, int64_t n_prompts, int64_t G, const ctl_sampler_desc *sd,
                                   int64_t max_new, int64_t T, ctl_rollout *out) {
    if (out) memset(out, 0, sizeof *out);   // freeable whatever happens
    if (!CTL__ARGS(inf ? inf->ctx : tk ? tk->ctx : NULL, inf && prompts && prompt_lens && sd && out)) return CTL_ERR_INVALID;
    ctl_ctx *ctx = inf->ctx;
    int64_t n = n_prompts * G;
    if (n_prompts < 1 || G < 1 || max_new < 1 || T < 2)
        return ctl__fail(ctx, CTL_ERR_INVALID, "rollout: %" PRId64 " prompts x %" PRId64 ", max_new %" PRId64 ", T %" PRId64, n_prompts, G,
                         max_new, T);
    for (int64_t p = 0; p < n_prompts; p++)
        if (prompt_lens[p] < 1 || prompt_lens[p] + max_new > T)
            return ctl__fail(ctx, CTL_ERR_CAPACITY, "rollout: prompt %" PRId64 " (%" PRId64 " tokens) and %" PRId64 " new tokens do not fit rows of %" PRId64,
                             p, prompt_lens[p], max_new, T);
    out->n = n, out->T = T, out->max_new = max_new;
    size_t N = (size_t)(n * T);
    out->tokens = (int32_t *)ctl_alloc(ctx, N * 4), out->targets = (int32_t *)ctl_alloc(ctx, N * 4);
    out->weights = (float *)ctl_alloc(ctx, N * 4), out->completion = (int32_t *)ctl_alloc(ctx, (size_t)(n * max_new) * 4);
    out->completion_len = (int64_t *)ctl_alloc(ctx, (size_t)n * 8), out->truncated = (uint8_t *)ctl_alloc(ctx, (size_t)n);
    out->text = (char **)ctl_alloc(ctx, (size_t)n * sizeof(char *));
    const int32_t **pp = (const int32_t **)ctl_alloc(ctx, (size_t)n * sizeof(int32_t *));
    int64_t *pl = (int64_t *)ctl_alloc(ctx, (size_t)n * 8);
    int32_t *seq = (int32_t *)ctl_alloc(ctx, (size_t)(T + 1) * 4);   // one row before the shift into (token, target) pairs
    float *mask = (float *)ctl_alloc(ctx, (size_t)(T + 1) * 4);
    int32_t *ended = (int32_t *)ctl_alloc(ctx, (size_t)n * 4);   // each completion's stop token, or -1
    ctl_status st = CTL_OK;
    if (!out->tokens || !out->targets || !out->weights || !out->completion || !out->completion_len || !out->truncated ||
        !out->text || !pp || !pl || !seq || !mask || !ended)
        st = ctl__fail(ctx, CTL_ERR_OUT_OF_MEMORY, "rollout: out of memory for %" PRId64 " rows", n);
    if (!st) memset(out->text, 0, (size_t)n * sizeof(char *));
    // Row i is sample i % G of prompt i / G.
    for (int64_t i = 0; !st && i < n; i++) pp[i] = prompts[i / G], pl[i] = prompt_lens[i / G];
    if (!st) st = ctl__generate_groups(inf, n_prompts, prompts, prompt_lens, G, sd, max_new, out->completion, out->completion_len, ended, NULL, NULL);
    int32_t stop = sd && sd->n_stop_tokens > 0 ? sd->stop_tokens[0] : 0;   // also the padding (weight 0)
    for (int64_t i = 0; !st && i < n; i++) {
        int64_t np = pl[i], nc = out->completion_len[i], len = np + nc;
        out->truncated[i] = nc == max_new;   // ran to max_new: no stop token to learn
        // The row's sequence: prompt, completion, then the stop token it sampled, if any.
        memcpy(seq, pp[i], (size_t)np * 4);
        memcpy(seq + np, out->completion + i * max_new, (size_t)nc * 4);
        if (ended[i] >= 0) seq[len++] = ended[i];
        for (int64_t t = 0; t < len; t++) mask[t] = t >= np ? 1.0f : 0.0f;   // the completion (and stop token) is learnt
        out->n_tokens += (double)ctl_batch_row(out->tokens, out->targets, out->weights, T, i, seq, mask, len, stop);
        if (tk) {
            size_t tl;
            // Measured, then written: the text's length is not known before.
            ctl_detokenize(tk, out->completion + i * max_new, nc, NULL, 0, &tl);
            out->text[i] = (char *)ctl_alloc(ctx, tl + 1);
            if (!out->text[i]) st = ctl__fail(ctx, CTL_ERR_OUT_OF_MEMORY, "rollout: out of memory");
            else ctl_detokenize(tk, out->completion + i * max_new, nc, out->text[i], tl + 1, &tl), out->text[i][tl] = 0;
        }
    }
    // The scratch goes; on failure the partial rollout too (out stays safe to free again).
    ctl_free(ctx, (void *)pp), ctl_free(ctx, pl), ctl_free(ctx, seq), ctl_free(ctx, mask), ctl_free(ctx, ended);
    if (st) ctl_rollout_free(ctx, out);
    return st;
}

CTL_API double ctl_pass_at_k(int64_t n, int64_t c, int64_t k) {
    if (n < 1 || k < 1 || c < 0 || c > n || k > n) return NAN;
    // The product needs no factorials, so nothing overflows; with fewer than k wrong samples every k-subset holds a
    // correct one.
    if (n - c < k) return 1.0;
    double q = 1.0;   // C(n-c, k) / C(n, k) = prod_{i=0}^{k-1} (n-c-i) / (n-i)
    for (int64_t i = 0; i < k; i++) q *= (double)(n - c - i) / (double)(n - i);
    return 1.0 - q;
}

// The stated answer of a completion as a value, NAN when it states none.
static double ctl__answer_value(const char *text) {
    const char *a;
    size_t al;
    double v;
    return ctl_extract_answer(text, strlen(text), &a, &al) && ctl_parse_number(a, al, &v) ? v : NAN;
}

CTL_API int64_t ctl_majority_vote(const char *const *completions, int64_t n, double *value) {
    if (!CTL__ARGS(NULL, completions && n >= 0)) return -1;
    int64_t best = -1, best_n = 0;
    // Answers within 1e-6 relative count as one; a completion with no answer (NaN) counts for none; ties keep the
    // earliest (strict >).
    for (int64_t i = 0; i < n; i++) {   // n is a handful of samples: count by comparing each pair
        double vi = ctl__answer_value(completions[i]);
        int64_t c = 0;
        for (int64_t j = 0; j < n && !isnan(vi); j++) c += fabs(ctl__answer_value(completions[j]) - vi) <= 1e-6 * CTL__MAX(1.0, fabs(vi));
        if (c > best_n) best = i, best_n = c;
    }
    if (value) *value = best >= 0 ? ctl__answer_value(completions[best]) : NAN;
    return best;
}

// >>impl:optimiser ==============================================================================

// A multiplier of o->lr: linear warmup from 0, then a half cosine (Loshchilov & Hutter 2017) from 1 down to
// min_lr_ratio at total_steps, and flat there after; with total_steps 0, constant 1 after the warmup.
CTL_API float ctl_lr_schedule(const ctl_optim_desc *o, int64_t step) {
    if (!CTL__ARGS(NULL, o)) return 0.0f;
    if (step < o->warmup) return (float)step / (float)CTL__MAX((int64_t)1, o->warmup);
    if (o->total_steps <= 0) return 1.0f;
    double progress = (double)(step - o->warmup) / (double)CTL__MAX((int64_t)1, o->total_steps - o->warmup);
    progress = CTL__MIN(progress, 1.0);   // Hugging Face's cosine rises again past the end; this one stays at the floor
    double f = 0.5 * (1.0 + cos(3.141592653589793 * progress));
    return (float)CTL__MAX(0.0, f * (1.0 - o->min_lr_ratio) + o->min_lr_ratio);
}

// The per-step constants of AdamW, in double then rounded once, as torch computes them in Python.
typedef struct ctl__adam_k { float grad_scale, beta1, beta2, eps, step_size, bc2_sqrt, decay; } ctl__adam_k;

// t counts updates from 1, so the bias corrections 1 - beta^t are never 0. decay is 1 - lr * weight_decay: the
// decoupled weight decay, applied to p rather than added to the gradient (the W in AdamW).
static ctl__adam_k ctl__adam_consts(float grad_scale, float lr, float beta1, float beta2, float eps,
                                    float weight_decay, int64_t t) {
    ctl__adam_k k;
    k.grad_scale = grad_scale, k.beta1 = beta1, k.beta2 = beta2, k.eps = eps;
    k.step_size = (float)(lr / (1.0 - pow(beta1, (double)t)));
    k.bc2_sqrt = (float)sqrt(1.0 - pow(beta2, (double)t));
    k.decay = (float)(1.0 - (double)lr * weight_decay);
    return k;
}

// The update of p[i..n) with its moments m and v, in the order torch.optim.AdamW's single-tensor path computes it:
// m += (1 - b1)(g - m) is b1 m + (1 - b1) g written as torch's lerp.
static void ctl__adamw_span(float *p, const float *g, float *m, float *v, int64_t i, int64_t n,
                            const ctl__adam_k *k) {
    for (; i < n; i++) {
        float gi = g[i] * k->grad_scale;
        m[i] += (1.0f - k->beta1) * (gi - m[i]);
        v[i] = k->beta2 * v[i] + (1.0f - k->beta2) * gi * gi;
        p[i] = p[i] * k->decay - k->step_size * m[i] / (sqrtf(v[i]) / k->bc2_sqrt + k->eps);
    }
}

// The public single-tensor form, for callers with their own state and for the tests; the trainer runs the same
// span segment by segment (ctl__adamw_task).
CTL_API void ctl_adamw_update(float *p, const float *g, float *m, float *v, int64_t n,
                              float grad_scale, float lr, float beta1, float beta2, float eps,
                              float weight_decay, int64_t t) {
    if (!CTL__ARGS(NULL, p && g && m && v && n >= 0)) return;
    ctl__adam_k k = ctl__adam_consts(grad_scale, lr, beta1, beta2, eps, weight_decay, t);
    ctl__adamw_span(p, g, m, v, 0, n, &k);
}

#ifdef CTL__AVX2
// The same update eight values at a time (a plain sqrtf loop does not vectorise: errno). Its fused multiply-adds
// round once where the loop above rounds twice, so the two agree to rounding (the tests allow 1e-6 relative), not
// bit for bit: machines with and without AVX2 train on slightly different bits; thread counts still agree.
__attribute__((target("avx2,fma"))) static void ctl__adamw_avx2(float *p, const float *g, float *m,
                                                                float *v, int64_t n, const ctl__adam_k *k) {
    __m256 gs = _mm256_set1_ps(k->grad_scale), b1c = _mm256_set1_ps(1.0f - k->beta1), b2 = _mm256_set1_ps(k->beta2);
    __m256 b2c = _mm256_set1_ps(1.0f - k->beta2), eps = _mm256_set1_ps(k->eps), step = _mm256_set1_ps(k->step_size);
    __m256 bc2 = _mm256_set1_ps(k->bc2_sqrt), decay = _mm256_set1_ps(k->decay);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 gi = _mm256_mul_ps(_mm256_loadu_ps(g + i), gs), mi = _mm256_loadu_ps(m + i);
        mi = _mm256_fmadd_ps(b1c, _mm256_sub_ps(gi, mi), mi);
        __m256 vi = _mm256_fmadd_ps(b2c, _mm256_mul_ps(gi, gi), _mm256_mul_ps(b2, _mm256_loadu_ps(v + i)));
        __m256 denom = _mm256_add_ps(_mm256_div_ps(_mm256_sqrt_ps(vi), bc2), eps);
        __m256 pi = _mm256_fnmadd_ps(step, _mm256_div_ps(mi, denom), _mm256_mul_ps(_mm256_loadu_ps(p + i), decay));
        _mm256_storeu_ps(m + i, mi);
        _mm256_storeu_ps(v + i, vi);
        _mm256_storeu_ps(p + i, pi);
    }
    ctl__adamw_span(p, g, m, v, i, n, k);
}
#endif

// ---- the optimiser's table entries on the CPU ------------------------------------------------
//
// Optimiser work is cut into segments of at most CTL__SEGMENT values of one array (ctl__params),
// run in parallel; the sums of squares are added in segment order, so the norm is the same on
// any thread count.
#define CTL__SEGMENT 65536

typedef struct ctl__optim_args {
    ctl_ctx *ctx;
    const ctl__params *p;
    ctl__adam_k k[2];   // AdamW's constants without and with weight decay
} ctl__optim_args;

static void ctl__sumsq_task(void *arg, int64_t s, int thread) {
    const ctl__params *p = ((const ctl__optim_args *)arg)->p;
    const ctl__segment *sg = &p->seg[s];
    const float *g = p->g[sg->param] + sg->offset;
    double acc = 0.0;
    (void)thread;
    for (int64_t i = 0; i < sg->len; i++) acc += (double)g[i] * g[i];
    // A non-finite parameter makes the norm NaN too: ctl_train_step then finds and names it.
    if (ctl__nonfinite_at(p->w[sg->param] + sg->offset, sg->len) >= 0) acc = NAN;
    p->seg_sq[s] = acc;
}

static void ctl__adamw_task(void *arg, int64_t s, int thread) {
    const ctl__optim_args *a = (const ctl__optim_args *)arg;
    const ctl__params *p = a->p;
    const ctl__segment *sg = &p->seg[s];
    int64_t i = sg->param, off = sg->offset;
    (void)thread;
    float *w = p->w[i] + off, *g = p->g[i] + off, *m = p->m[i] + off, *v = p->v[i] + off;
#ifdef CTL__AVX2
    if (a->ctx->simd >= CTL_SIMD_AVX2) ctl__adamw_avx2(w, g, m, v, sg->len, &a->k[p->decay[i]]);
    else
#endif
        ctl__adamw_span(w, g, m, v, 0, sg->len, &a->k[p->decay[i]]);
    memset(g, 0, sg->len * sizeof(float));
}

static void ctl__zero_task(void *arg, int64_t s, int thread) {
    const ctl__params *p = ((const ctl__optim_args *)arg)->p;
    (void)thread;
    memset(p->g[p->seg[s].param] + p->seg[s].offset, 0, p->seg[s].len * sizeof(float));
}

static ctl_status ctl__grad_sumsq_cpu(ctl_ctx *ctx, const ctl__params *p, double *sq) {
    ctl__optim_args a;
    a.ctx = ctx, a.p = p;
    ctl_parallel_for(ctx, p->n_seg, ctl__sumsq_task, &a);
    *sq = 0.0;
    for (int64_t s = 0; s < p->n_seg; s++) *sq += p->seg_sq[s];
    return CTL_OK;
}

static void ctl__adamw_cpu(ctl_ctx *ctx, const ctl__params *p, const ctl_optim_desc *o, float grad_scale, float lr, int64_t step) {
    ctl__optim_args a;
    a.ctx = ctx, a.p = p;
    for (int d = 0; d < 2; d++) a.k[d] = ctl__adam_consts(grad_scale, lr, o->beta1, o->beta2, o->eps, d ? o->weight_decay : 0.0f, step);
    ctl_parallel_for(ctx, p->n_seg, ctl__adamw_task, &a);
}

static void ctl__grad_zero_cpu(ctl_ctx *ctx, const ctl__params *p) {
    ctl__optim_args a;
    a.ctx = ctx, a.p = p;
    ctl_parallel_for(ctx, p->n_seg, ctl__zero_task, &a);
}

// >>impl:training ===============================================================================

// Each (N = B*T rows, width): ln1, ln2 (N,C) the norms' outputs, their mean (LayerNorm only, else NULL) and rstd
// (N); qkv (N, (NH + 2*NKV)*HS); lse (N, NH) each head's attention log-sum-exp, from which the backward recomputes
// the probabilities (no (T,T) matrix is kept); atty (N, NH*HS); res2, res3 (N,C) the residual stream after
// attention and after the MLP; fch (N, FF, or 2*FF for SwiGLU's gate and up) and fch_act (N, FF).
typedef struct ctl__acts {   // what one block's backward needs from its forward
    float *ln1, *ln1_mean, *ln1_rstd, *qkv, *lse, *atty, *res2;
    float *ln2, *ln2_mean, *ln2_rstd, *fch, *fch_act, *res3;
} ctl__acts;

// ---- non-finite guards ----------------------------------------------------------------------

// Index of the first NaN or infinity in x[0..n) (exponent bits all ones), or -1. Blocks of
// 1024 are screened with integer ops, which vectorise; the bad block is then searched.
static int64_t ctl__nonfinite_at(const float *x, int64_t n) {
    for (int64_t i0 = 0; i0 < n; i0 += 1024) {
        int64_t e = CTL__MIN(n, i0 + 1024);
        uint32_t bad = 0;
        for (int64_t i = i0; i < e; i++) {
            uint32_t u;
            memcpy(&u, x + i, 4);
            bad |= (uint32_t)((u & 0x7f800000u) == 0x7f800000u);
        }
        for (int64_t i = i0; bad && i < e; i++)
            if (!isfinite(x[i])) return i;
    }
    return -1;
}

// "'blk.3.attn_q.weight' (layer 3)", or "'output_norm.weight'" outside the blocks.
static const char *ctl__param_where(const char *name, char *buf, size_t cap) {
    int64_t l = ctl__param_layer(name);
    if (l >= 0) snprintf(buf, cap, "'%s' (layer %" PRId64 ")", name, l);
    else snprintf(buf, cap, "'%s'", name);
    return buf;
}

// Describes the first fp32 parameter holding a non-finite value (all of them when !trainable
// only, else the trainable ones); false when there is none.
static bool ctl__nonfinite_param(const ctl_model *m, bool trainable_only, char *buf, size_t cap) {
    for (int64_t i = 0; i < m->n_params; i++) {
        const ctl_param *p = &m->params[i];
        if (p->value.dtype != CTL_F32 || (trainable_only && !p->trainable)) continue;
        int64_t j = ctl__nonfinite_at((const float *)p->value.data, ctl_tensor_numel(&p->value));
        if (j < 0) continue;
        char where[96];
        snprintf(buf, cap, "%s holds %g at element %" PRId64, ctl__param_where(p->name, where, sizeof where),
                 (double)((const float *)p->value.data)[j], j);
        return true;
    }
    return false;
}


// A trainer: everything a step needs, for batches up to (B,T), laid out once in one arena (ctl__train_layout):
// only error paths allocate in the forward, backward or step. grad, adam_m, adam_v hold per parameter a pointer into
// the arena, NULL when frozen. The per-token arrays hold the last forward's (cur_B, cur_T) rows, row-major, at
// the front of their planned (B,T) space.
struct ctl_train {
    ctl_ctx *ctx;
    ctl_model *m;
    ctl_model_config cfg;
    ctl_train_desc desc;   // defaults filled in
    int64_t B, T, chunk;   // planned maxima; LM-head rows per chunk
    int64_t cur_B, cur_T;  // shape of the last forward
    bool have_forward;
    int64_t step, n_micro;   // updates done; backward passes waiting for the next update
    uint64_t structure;    // the model's, when the trainer was made
    ctl_arena arena;
    ctl_memory_plan plan;   // bytes by kind (ctl_train_memory)
    float **grad, **adam_m, **adam_v;   // per parameter; NULL when frozen
    ctl__params host;      // the trainable parameters on the host, in segments for the optimiser
    ctl__acts *acts;   // (L) per block
    // encoded (N,C) the embeddings; lnf (N,C) the final norm's output, with its mean and rstd (N); per token (N):
    // logp the targets' log-probs, lse the head's log-sum-exp, dlogp d loss / d logp, entropy (or NULL).
    float *encoded, *lnf, *lnf_mean, *lnf_rstd, *logp, *lse, *dlogp, *entropy;
    float inv_temp;        // the last forward's 1 / temperature
    int32_t *pos;          // (B,T) the last forward's positions when packed
    bool packed;
    int32_t *tokens, *targets;   // (N) the checked batch, copied in
    // Scratch shared by all blocks: proj (N,C) a linear layer's output before its residual add; dres (N,C) d(residual
    // stream); dln, datty, dqkv, dfch, dact the gradients of the activations of those names; lm_scratch one LM-head
    // chunk; the RoPE tables (T, HS/2).
    float *proj, *dres, *dln, *datty, *dqkv, *dfch, *dact, *lm_scratch, *rope_cos, *rope_sin;
    ctl__arun run;         // the adapters' buffers and this forward's treatment of them
    ctl__exec ex;          // the backend the forward and backward run on, the parameters there
    struct {               // the forward's inputs and outputs where the backend uses them: the
        int32_t *tokens, *targets, *pos;   // arrays above on the CPU, device copies on a GPU
        float *logp, *lse, *dlogp, *entropy, *rope_cos, *rope_sin;
        float **adam_m, **adam_v;          // per parameter
        ctl__params params;                // the trainable ones, for the optimiser's entries
        void *weights;                     // the base weights' block
        uint64_t version;                  // the model's version those weights are of
    } on;
    struct ctl__tdev *dev; // a trainer on a CUDA context: its device side; NULL on the CPU
};

// Checks desc against the config into *out, defaults filled: lr 1e-3, betas 0.9 and 0.999, eps 1e-8 (torch's
// AdamW defaults; weight_decay stays 0, where torch's default is 0.01).
static ctl_status ctl__train_check(ctl_ctx *ctx, const ctl_model_config *c, const ctl_train_desc *in,
                                   ctl_train_desc *out) {
    const char *who = "train";
    if (!in) return ctl__fail(ctx, CTL_ERR_INVALID, "%s: no ctl_train_desc", who);
    ctl_train_desc d = *in;
    ctl_optim_desc *o = &d.optim;
    if (d.batch <= 0 || d.seq_len <= 0)
        return ctl__fail(ctx, CTL_ERR_INVALID, "%s: batch %" PRId64 " and seq_len %" PRId64 " must be positive", who,
                         d.batch, d.seq_len);
    if (d.seq_len > c->n_ctx)
        return ctl__fail(ctx, CTL_ERR_INVALID, "%s: seq_len %" PRId64 " exceeds the model's n_ctx %" PRId64, who,
                         d.seq_len, c->n_ctx);
    if (d.batch > INT32_MAX / d.seq_len)
        return ctl__fail(ctx, CTL_ERR_INVALID, "%s: batch*seq_len %" PRId64 "*%" PRId64 " must stay below 2^31", who,
                         d.batch, d.seq_len);
    if (d.lm_head_chunk < 0)
        return ctl__fail(ctx, CTL_ERR_INVALID, "%s: lm_head_chunk %" PRId64 " is negative", who, d.lm_head_chunk);
    if (o->lr == 0.0f) o->lr = 1e-3f;
    if (o->beta1 == 0.0f) o->beta1 = 0.9f;
    if (o->beta2 == 0.0f) o->beta2 = 0.999f;
    if (o->eps == 0.0f) o->eps = 1e-8f;
    if (!(o->lr > 0.0f) || !(o->beta1 > 0.0f && o->beta1 < 1.0f) || !(o->beta2 > 0.0f && o->beta2 < 1.0f) ||
        !(o->eps > 0.0f) || !(o->weight_decay >= 0.0f) || !(o->clip >= 0.0f) || o->warmup < 0 ||
        o->total_steps < 0 || !(o->min_lr_ratio >= 0.0f && o->min_lr_ratio <= 1.0f))
        return ctl__fail(ctx, CTL_ERR_INVALID, "%s: optimiser settings out of range (lr %g, betas %g %g, eps %g, "
                         "weight_decay %g, clip %g, warmup %" PRId64 ", total_steps %" PRId64 ", min_lr_ratio %g)", who,
                         (double)o->lr, (double)o->beta1, (double)o->beta2, (double)o->eps, (double)o->weight_decay,
                         (double)o->clip, o->warmup, o->total_steps, (double)o->min_lr_ratio);
    // lm_head_chunk: rows whose logits the LM head holds at once. By default as many as fit 64 MiB of fp32 logits,
    // then evened out over the chunks so the last is not a sliver.
    int64_t N = d.batch * d.seq_len, fit = (int64_t)((64u << 20) / sizeof(float)) / c->vocab_size;
    if (d.lm_head_chunk == 0) {   // as many rows as fit, in equal chunks
        int64_t rows = CTL__MAX((int64_t)1, CTL__MIN(N, fit)), chunks = (N + rows - 1) / rows;
        d.lm_head_chunk = (N + chunks - 1) / chunks;
    }
    d.lm_head_chunk = CTL__MIN(d.lm_head_chunk, N);
    *out = d;
    return CTL_OK;
}

// Where ctl__train_layout is: the host arena (base, used so far) and where activations and scratch go (ab, *au:
// the device's block on a CUDA context, else the host's again). base NULL: measuring only.
typedef struct ctl__layout {
    unsigned char *base, *ab;
    size_t used, *au;
} ctl__layout;

// Per parameter: a gradient and AdamW's two moments, for the trainable ones only; then the optimiser's view of the
// same arrays (t->host: the trainable parameters alone, in model order, cut into segments). These stay on the host
// even for a device trainer (its device copies are laid out by ctl__tdev_init).
static void ctl__layout_optim(ctl_train *t, const ctl_param *params, int64_t n_params, ctl__layout *L) {
    unsigned char *base = L->base;
    size_t *used = &L->used, *scr = &t->plan.scratch, F = sizeof(float);
    t->grad = (float **)ctl__take(base, used, scr, n_params * sizeof(float *));
    t->adam_m = (float **)ctl__take(base, used, scr, n_params * sizeof(float *));
    t->adam_v = (float **)ctl__take(base, used, scr, n_params * sizeof(float *));
    ctl__params *p = &t->host;
    p->n = p->n_seg = 0;
    for (int64_t i = 0; i < n_params; i++) {
        int64_t n = ctl_tensor_numel(&params[i].value);
        float *g = NULL, *mm = NULL, *v = NULL;
        if (params[i].trainable) {
            g = (float *)ctl__take(base, used, &t->plan.grads, n * F);
            mm = (float *)ctl__take(base, used, &t->plan.optim, n * F);
            v = (float *)ctl__take(base, used, &t->plan.optim, n * F);
            p->n++, p->n_seg += (n + CTL__SEGMENT - 1) / CTL__SEGMENT;
        }
        if (base) t->grad[i] = g, t->adam_m[i] = mm, t->adam_v[i] = v;
    }
    float **pw = (float **)ctl__take(base, used, scr, 4 * p->n * sizeof(float *));
    int64_t *len = (int64_t *)ctl__take(base, used, scr, p->n * sizeof(int64_t));
    bool *decay = (bool *)ctl__take(base, used, scr, p->n * sizeof(bool));
    ctl__segment *seg = (ctl__segment *)ctl__take(base, used, scr, p->n_seg * sizeof(ctl__segment));
    p->seg_sq = (double *)ctl__take(base, used, scr, p->n_seg * sizeof(double));
    if (!base) return;
    p->w = pw, p->g = pw + p->n, p->m = pw + 2 * p->n, p->v = pw + 3 * p->n, p->len = len, p->decay = decay, p->seg = seg;
    for (int64_t i = 0, j = 0, s = 0; i < n_params; i++) {
        if (!params[i].trainable) continue;
        int64_t n = len[j] = ctl_tensor_numel(&params[i].value);
        pw[j] = (float *)params[i].value.data, p->g[j] = t->grad[i], p->m[j] = t->adam_m[i], p->v[j] = t->adam_v[i];
        decay[j] = params[i].decay;
        for (int64_t off = 0; off < n; off += CTL__SEGMENT, s++)
            seg[s].param = j, seg[s].offset = off, seg[s].len = CTL__MIN((int64_t)CTL__SEGMENT, n - off);
        j++;
    }
}

// What the backward reads, per block, then outside the blocks, then the adapters' (h per LoRA; z, g and n per
// DoRA). Planned at the maximum (B,T): a smaller batch uses the front of each array. The per-token arrays (logp ...
// pos) are the host's on every backend: the objectives read logp and write dlogp there.
static void ctl__layout_acts(ctl_train *t, const ctl_model *m, ctl__layout *L) {
    const ctl_model_config *c = &t->cfg;
    bool gpt2 = c->arch == CTL_ARCH_GPT2;
    int64_t N = t->B * t->T, C = c->n_embd, NH = c->n_head, HS = c->head_dim, QKV = (NH + 2 * c->n_kv_head) * HS;
    int64_t FF = c->n_ff, FFH = gpt2 ? FF : 2 * FF, A = NH * HS;
    unsigned char *base = L->base, *ab = L->ab;
    size_t *used = &L->used, *au = L->au, *act = &t->plan.activations, F = sizeof(float);
    t->acts = (ctl__acts *)ctl__take(base, used, act, c->n_layer * sizeof(ctl__acts));
    for (int64_t l = 0; l < c->n_layer; l++) {
        ctl__acts a;
        a.ln1 = (float *)ctl__take(ab, au, act, N * C * F);
        a.ln1_mean = gpt2 ? (float *)ctl__take(ab, au, act, N * F) : NULL;
        a.ln1_rstd = (float *)ctl__take(ab, au, act, N * F);
        a.qkv = (float *)ctl__take(ab, au, act, N * QKV * F);
        a.lse = (float *)ctl__take(ab, au, act, N * NH * F);
        a.atty = (float *)ctl__take(ab, au, act, N * A * F);
        a.res2 = (float *)ctl__take(ab, au, act, N * C * F);
        a.ln2 = (float *)ctl__take(ab, au, act, N * C * F);
        a.ln2_mean = gpt2 ? (float *)ctl__take(ab, au, act, N * F) : NULL;
        a.ln2_rstd = (float *)ctl__take(ab, au, act, N * F);
        a.fch = (float *)ctl__take(ab, au, act, N * FFH * F);
        a.fch_act = (float *)ctl__take(ab, au, act, N * FF * F);
        a.res3 = (float *)ctl__take(ab, au, act, N * C * F);
        if (base) t->acts[l] = a;
    }
    t->encoded = (float *)ctl__take(ab, au, act, N * C * F);
    t->lnf = (float *)ctl__take(ab, au, act, N * C * F);
    t->lnf_mean = gpt2 ? (float *)ctl__take(ab, au, act, N * F) : NULL;
    t->lnf_rstd = (float *)ctl__take(ab, au, act, N * F);
    t->logp = (float *)ctl__take(base, used, act, N * F);
    t->lse = (float *)ctl__take(base, used, act, N * F);
    t->dlogp = (float *)ctl__take(base, used, act, N * F);
    t->entropy = t->desc.entropy ? (float *)ctl__take(base, used, act, N * F) : NULL;
    t->tokens = (int32_t *)ctl__take(base, used, act, N * sizeof(int32_t));
    t->targets = (int32_t *)ctl__take(base, used, act, N * sizeof(int32_t));
    t->pos = (int32_t *)ctl__take(base, used, act, N * sizeof(int32_t));
    int64_t n_adapters = m ? m->n_adapters : 0;
    t->run.bufs = (ctl__abuf *)ctl__take(base, used, &t->plan.scratch, n_adapters * sizeof(ctl__abuf));
    for (int64_t a = 0; a < n_adapters; a++) {
        const ctl__adapter *ad = &m->adapters[a];
        int64_t rows = m->params[ad->base].value.shape[0];
        ctl__abuf b;
        memset(&b, 0, sizeof b);
        if (ad->lora_a >= 0) b.h = (float *)ctl__take(ab, au, act, N * ad->rank * F);
        if (ad->dora_m >= 0) {
            b.z = (float *)ctl__take(ab, au, act, N * rows * F);
            b.g = (float *)ctl__take(ab, au, act, rows * F);
            b.nrm = (float *)ctl__take(ab, au, act, rows * F);
        }
        if (base) t->run.bufs[a] = b;
    }
}

// Scratch, reused by every block in turn: its size does not grow with the number of layers. Then the adapters':
// xd the dropped-out input of a LoRA with dropout, tmp DoRA's, dh (N, largest rank) the gradient of a LoRA's h,
// rowbuf per-thread rows for DoRA's norms. On a device the LM head takes its chunk of logits from the block's
// scratch instead of lm_scratch.
static void ctl__layout_scratch(ctl_train *t, const ctl_model *m, bool dev, ctl__layout *L) {
    const ctl_model_config *c = &t->cfg;
    bool gpt2 = c->arch == CTL_ARCH_GPT2;
    int64_t N = t->B * t->T, C = c->n_embd, HS = c->head_dim, A = c->n_head * HS, QKV = (c->n_head + 2 * c->n_kv_head) * HS;
    int64_t FF = c->n_ff, FFH = gpt2 ? FF : 2 * FF;
    unsigned char *base = L->base, *ab = L->ab;
    size_t *used = &L->used, *au = L->au, *scr = &t->plan.scratch, F = sizeof(float);
    ctl__adapter_needs need = ctl__needs(m);
    t->proj = (float *)ctl__take(ab, au, scr, N * C * F);
    t->dres = (float *)ctl__take(ab, au, scr, N * C * F);
    t->dln = (float *)ctl__take(ab, au, scr, N * C * F);
    t->datty = (float *)ctl__take(ab, au, scr, N * A * F);
    t->dqkv = (float *)ctl__take(ab, au, scr, N * QKV * F);
    t->dfch = (float *)ctl__take(ab, au, scr, N * FFH * F);
    t->dact = (float *)ctl__take(ab, au, scr, N * FF * F);
    t->lm_scratch = (float *)ctl__take(ab, au, scr, dev ? 0 : t->chunk * (c->vocab_size + 2 * C + 2 * need.head_rank + 1) * F);
    t->rope_cos = gpt2 ? NULL : (float *)ctl__take(base, used, scr, t->T * (HS / 2) * F);
    t->rope_sin = gpt2 ? NULL : (float *)ctl__take(base, used, scr, t->T * (HS / 2) * F);
    t->run.xd = need.dropout ? (float *)ctl__take(ab, au, scr, N * need.in * F) : NULL;
    t->run.tmp = need.dora ? (float *)ctl__take(ab, au, scr, N * need.out * F) : NULL;
    t->run.dh = (float *)ctl__take(ab, au, scr, N * need.rank * F);
    t->run.rowbuf = need.dora ? (float *)ctl__take(base, used, scr, (int64_t)t->ctx->n_threads * 2 * need.in * F) : NULL;
}

// Lays the trainer's arena out, adding each piece to its kind in t->plan, and returns the host bytes used. With
// base == NULL it only measures (and must not write through t's pointer arrays, which are NULL then). m may be NULL
// (planning from a config: no adapters). With dused (a trainer on a CUDA context), the activations and scratch are
// laid out in device memory from dbase instead, *dused counting them; the host keeps the pointer arrays, the
// per-token arrays, and copies of the gradients and moments (for ctl_train_grad and checkpoints).
static size_t ctl__train_layout(ctl_train *t, const ctl_model *m, const ctl_param *params, int64_t n_params,
                                unsigned char *base, unsigned char *dbase, size_t *dused) {
    bool dev = dused != NULL;
    ctl__layout L;
    L.base = base, L.ab = dev ? dbase : base, L.used = 0, L.au = dev ? dused : &L.used;
    t->plan.grads = t->plan.optim = t->plan.activations = t->plan.scratch = 0;   // each ctl__take adds to one
    ctl__layout_optim(t, params, n_params, &L);
    ctl__layout_acts(t, m, &L);
    ctl__layout_scratch(t, m, dev, &L);
    t->plan.total = t->plan.weights + L.used + (dev ? *dused : 0);   // host and device together
    return L.used;
}

// From a config alone: the parameter list is built twice, once to count it and once into an array, with every
// parameter trainable and no adapters, then laid out with base NULL (measured only).
CTL_API ctl_status ctl_train_plan(ctl_ctx *ctx, const ctl_model_config *cfg,
                                  const ctl_train_desc *desc, ctl_memory_plan *out) {
    if (!CTL__ARGS(ctx, ctx && cfg && desc && out)) return CTL_ERR_INVALID;
    ctl_train t;
    ctl__builder bd;
    int64_t ids[5];
    memset(&t, 0, sizeof t);
    memset(&bd, 0, sizeof bd);
    t.ctx = ctx;
    ctl_status st = ctl_model_config_resolve(ctx, cfg, &t.cfg);
    if (st || (st = ctl__train_check(ctx, &t.cfg, desc, &t.desc))) return st;
    ctl__build(&t.cfg, &bd, NULL, ids);
    if (bd.overflow) return ctl__fail(ctx, CTL_ERR_INVALID, "train_plan: the config's tensors are too large to address");
    bd.params = (ctl_param *)ctl_alloc(ctx, (size_t)bd.n * sizeof(ctl_param));
    if (!bd.params) return ctl__fail(ctx, CTL_ERR_OUT_OF_MEMORY, "train_plan: out of memory");
    bd.n = bd.numel = 0, bd.bytes = 0;
    ctl__build(&t.cfg, &bd, NULL, ids);
    t.B = t.desc.batch, t.T = t.desc.seq_len, t.chunk = t.desc.lm_head_chunk;
    t.plan.weights = bd.bytes;
    ctl__train_layout(&t, NULL, bd.params, bd.n, NULL, NULL, NULL);
    ctl_free(ctx, bd.params);
    *out = t.plan;
    return CTL_OK;
}

// The checks ctl_train_init and ctl_train_plan_model share: quantised tensors (there is an update rule for fp32
// only) and DoRA bases
// must be frozen.
static ctl_status ctl__train_model_check(const ctl_model *m) {
    for (int64_t i = 0; i < m->n_params; i++)
        if (m->params[i].trainable && m->params[i].value.dtype != CTL_F32)
            return ctl__fail(m->ctx, CTL_ERR_INVALID, "train_init: '%s' is stored %s and cannot train (freeze it)",
                             m->params[i].name, ctl_dtype_name(m->params[i].value.dtype));
    for (int64_t a = 0; a < m->n_adapters; a++)
        if (m->adapters[a].dora_m >= 0 && m->params[m->adapters[a].base].trainable)
            return ctl__fail(m->ctx, CTL_ERR_INVALID, "train_init: '%s' has DoRA; its base weight must stay frozen",
                             m->params[m->adapters[a].base].name);
    if (m->merged) return ctl__fail(m->ctx, CTL_ERR_INVALID, "train_init: the adapters are merged; unmerge them to train");
    return CTL_OK;
}

CTL_API ctl_status ctl_train_plan_model(const ctl_model *m, const ctl_train_desc *desc, ctl_memory_plan *out) {
    if (!CTL__ARGS(m ? m->ctx : NULL, m && desc && out)) return CTL_ERR_INVALID;
    ctl_train t;
    memset(&t, 0, sizeof t);
    t.ctx = m->ctx, t.cfg = m->cfg;
    ctl_status st = ctl__train_model_check(m);
    if (st || (st = ctl__train_check(m->ctx, &m->cfg, desc, &t.desc))) return st;
    t.B = t.desc.batch, t.T = t.desc.seq_len, t.chunk = t.desc.lm_head_chunk;
    t.plan.weights = ctl_model_bytes(m);
    ctl__train_layout(&t, m, m->params, m->n_params, NULL, NULL, NULL);
    *out = t.plan;
    return CTL_OK;
}

// ---- training on a CUDA context --------------------------------------------------------------
//
// The same forward, backward and step, kernel for kernel, on device copies of the weights (taken
// again whenever the model's version changes), with the gradients, AdamW moments, activations
// and scratch in the context's device block. The host keeps what the objectives and the rest of
// the API read: the per-token log-probs (copied back after each forward), d loss / d log-prob
// (copied over before each backward), and copies of the trainable weights, taken after every
// step, so the model on the host is always the trained one.
#ifdef COTLAB_CUDA
typedef struct ctl__tdev {
    size_t mark, end;     // the device block's marks before and after the trainer's part
    unsigned char *wbase; // the base weight block (same offsets as the model's)
    void **w;             // per parameter: its device copy
    float **grad, **adam_m, **adam_v;   // per parameter; NULL when frozen
    int64_t n_grads;
    int32_t **sp_row, **sp_col;          // per adapter: its sparse entries, or NULL
    float *logp, *lse, *dlogp, *entropy, *rope_cos, *rope_sin;
    int32_t *tokens, *targets, *pos;
    bool pinned;          // the model's weight block is page-locked by this trainer
} ctl__tdev;


// Allocates the device side (and lays the activations out in it). Everything starts at zero.
static ctl_status ctl__tdev_init(ctl_train *t, size_t act_bytes) {
    ctl_ctx *ctx = t->ctx;
    ctl_model *m = t->m;
    int64_t P = m->n_params, NA = m->n_adapters, N = t->B * t->T, HS = t->cfg.head_dim;
    size_t F = sizeof(float), ptrs = (size_t)(4 * P + 2 * NA + 4 * t->host.n) * sizeof(void *);
    ctl__tdev *d = (ctl__tdev *)ctl_alloc(ctx, sizeof(ctl__tdev) + ptrs);
    if (!d) return ctl__fail(ctx, CTL_ERR_OUT_OF_MEMORY, "train_init: out of memory");
    memset(d, 0, sizeof *d + ptrs);
    d->w = (void **)(d + 1), d->grad = (float **)(d->w + P), d->adam_m = d->grad + P, d->adam_v = d->adam_m + P;
    d->sp_row = (int32_t **)(d->adam_v + P), d->sp_col = d->sp_row + NA;
    ctl__params *op = &t->on.params;   // the optimiser's arrays: the device's, the same lengths
    op->w = (float **)(d->sp_col + NA), op->g = op->w + op->n, op->m = op->g + op->n, op->v = op->m + op->n;
    d->mark = ctl_device_mark(ctx);
    t->dev = d;
    for (int64_t i = 0; i < P; i++) d->n_grads += m->params[i].trainable ? ctl_tensor_numel(&m->params[i].value) : 0;
    bool ok = (d->wbase = (unsigned char *)ctl_device_alloc(ctx, m->bytes)) != NULL && ctl__adapters_alloc(ctx, m, d->w, d->sp_row, d->sp_col);
    for (int64_t i = 0; i < m->n_base; i++) d->w[i] = d->wbase + ((unsigned char *)m->params[i].value.data - m->data);
    float *g = NULL, *mm = NULL, *v = NULL;
    ok = ok && (g = (float *)ctl_device_alloc(ctx, (size_t)d->n_grads * F)) && (mm = (float *)ctl_device_alloc(ctx, (size_t)d->n_grads * F)) &&
         (v = (float *)ctl_device_alloc(ctx, (size_t)d->n_grads * F));
    for (int64_t i = 0, j = 0; ok && i < P; i++) {
        int64_t n = ctl_tensor_numel(&m->params[i].value);
        if (!m->params[i].trainable) continue;
        d->grad[i] = op->g[j] = g, d->adam_m[i] = op->m[j] = mm, d->adam_v[i] = op->v[j] = v, op->w[j++] = (float *)d->w[i];
        g += n, mm += n, v += n;
    }
    size_t rb = (size_t)(t->T * (HS / 2)) * F;
    ok = ok && (d->logp = (float *)ctl_device_alloc(ctx, (size_t)N * F)) && (d->lse = (float *)ctl_device_alloc(ctx, (size_t)N * F)) &&
         (d->dlogp = (float *)ctl_device_alloc(ctx, (size_t)N * F)) && (d->entropy = (float *)ctl_device_alloc(ctx, (size_t)N * F)) &&
         (d->tokens = (int32_t *)ctl_device_alloc(ctx, (size_t)N * 4)) && (d->targets = (int32_t *)ctl_device_alloc(ctx, (size_t)N * 4)) &&
         (d->pos = (int32_t *)ctl_device_alloc(ctx, (size_t)N * 4));
    if (ok && t->cfg.arch == CTL_ARCH_LLAMA)
        ok = (d->rope_cos = (float *)ctl_device_alloc(ctx, rb)) && (d->rope_sin = (float *)ctl_device_alloc(ctx, rb));
    unsigned char *acts = ok ? (unsigned char *)ctl_device_alloc(ctx, act_bytes) : NULL;
    d->end = ctl_device_mark(ctx);
    d->pinned = acts && ctl__backend(ctx)->pin(ctx, m->data, m->bytes);   // (pageable, only slower, where it cannot be)
    if (!acts) {
        char why[512];
        snprintf(why, sizeof why, "%s", ctl_last_error(ctx));
        return ctl__fail(ctx, CTL_ERR_OUT_OF_MEMORY, "train_init: the device block cannot hold the trainer (%s; "
                         "ctl_ctx_desc.device_memory sets its size)", why);
    }
    size_t dused = 0;
    t->arena.used = ctl__train_layout(t, m, m->params, m->n_params, t->arena.base, acts, &dused);
    t->ex.k = ctl__backend(ctx), t->ex.w = d->w, t->ex.g = d->grad, t->ex.sp_row = d->sp_row, t->ex.sp_col = d->sp_col;
    t->on.tokens = d->tokens, t->on.targets = d->targets, t->on.pos = d->pos, t->on.logp = d->logp, t->on.lse = d->lse;
    t->on.dlogp = d->dlogp, t->on.entropy = t->entropy ? d->entropy : NULL, t->on.rope_cos = d->rope_cos, t->on.rope_sin = d->rope_sin;
    t->on.adam_m = d->adam_m, t->on.adam_v = d->adam_v, t->on.weights = d->wbase;
    if (d->rope_cos) {
        ctl_status st = ctl_copy_to_device(ctx, d->rope_cos, t->rope_cos, rb);
        if (st || (st = ctl_copy_to_device(ctx, d->rope_sin, t->rope_sin, rb))) return st;
    }
    for (int64_t j = 0; j < op->n; j++)   // gradients and moments start at zero
        t->ex.k->zero(ctx, op->g[j], op->len[j]), t->ex.k->zero(ctx, op->m[j], op->len[j]), t->ex.k->zero(ctx, op->v[j], op->len[j]);
    return ctl_device_sync(ctx);
}

static void ctl__tdev_free(ctl_train *t) {
    if (!t->dev) return;
    ctl_device_release_span(t->ctx, t->dev->mark, t->dev->end);
    if (t->dev->pinned) ctl__backend(t->ctx)->unpin(t->ctx, t->m->data);
    ctl_free(t->ctx, t->dev);
    t->dev = NULL;
}

#else   // (without CUDA no context has a device: never reached)
static ctl_status ctl__tdev_init(ctl_train *t, size_t act_bytes) { return (void)t, (void)act_bytes, CTL_OK; }
static void ctl__tdev_free(ctl_train *t) { (void)t; }
#endif

// on_device: on a CUDA context, train there when the model allows (ctl_sparse_calibrate's
// trainer reads its gradients on the host, so it stays on the CPU).
static ctl_status ctl__train_init(ctl_model *m, const ctl_train_desc *desc, bool on_device, ctl_train **out) {
    ctl_ctx *ctx = m->ctx;
    *out = NULL;
    ctl_status st = ctl__train_model_check(m);
    if (st) return st;
    // A device trainer keeps its activations and scratch in device memory (dbytes) and the rest in the host arena.
    bool dev = !ctl__backend(ctx)->host_memory && on_device;
    ctl_train *t = (ctl_train *)ctl_alloc(ctx, sizeof(ctl_train));
    if (!t) return ctl__fail(ctx, CTL_ERR_OUT_OF_MEMORY, "train_init: out of memory");
    memset(t, 0, sizeof *t);
    t->ctx = ctx, t->m = m, t->cfg = m->cfg, t->structure = m->structure, t->inv_temp = 1.0f;
    st = ctl__train_check(ctx, &m->cfg, desc, &t->desc);
    if (st) return ctl_free(ctx, t), st;
    t->B = t->desc.batch, t->T = t->desc.seq_len, t->chunk = t->desc.lm_head_chunk;
    t->plan.weights = ctl_model_bytes(m);
    // Measured first (base NULL), then laid out for real in an arena of exactly that size.
    size_t dbytes = 0, bytes = ctl__train_layout(t, m, m->params, m->n_params, NULL, NULL, dev ? &dbytes : NULL);
    if ((st = ctl_arena_init(ctx, &t->arena, bytes))) {
        ctl_free(ctx, t);
        return ctl__fail(ctx, st, "train_init: cannot allocate %.1f MB for batch %" PRId64 "x%" PRId64,
                         (double)bytes / 1e6, t->desc.batch, t->desc.seq_len);
    }
    memset(t->arena.base, 0, bytes);   // gradients and moments start at zero
    size_t dlaid = 0;                  // (the device part is laid out by ctl__tdev_init)
    t->arena.used = ctl__train_layout(t, m, m->params, m->n_params, t->arena.base, NULL, dev ? &dlaid : NULL);
    if (t->rope_cos) ctl_rope_table(t->rope_cos, t->rope_sin, t->T, t->cfg.head_dim, t->cfg.rope_theta);
    // on.*: the arrays as the backend sees them, the host's own on the CPU (ctl__tdev_init repoints them at device
    // copies). on.version one behind the model's makes the first forward call ctl__exec_upload (on the CPU a no-op).
    t->ex = ctl__exec_cpu(ctx, m, t->grad);   // (a trainer on the device changes both)
    t->on.tokens = t->tokens, t->on.targets = t->targets, t->on.pos = t->pos, t->on.logp = t->logp, t->on.lse = t->lse;
    t->on.dlogp = t->dlogp, t->on.entropy = t->entropy, t->on.rope_cos = t->rope_cos, t->on.rope_sin = t->rope_sin;
    t->on.adam_m = t->adam_m, t->on.adam_v = t->adam_v, t->on.params = t->host, t->on.weights = m->data;
    t->on.version = m->version - 1;
    if (dev && (st = ctl__tdev_init(t, dbytes))) return ctl_train_free(t), st;
    *out = t;
    return CTL_OK;
}

CTL_API ctl_status ctl_train_init(ctl_model *m, const ctl_train_desc *desc, ctl_train **out) {
    if (out) *out = NULL;
    if (!CTL__ARGS(m ? m->ctx : NULL, m && desc && out)) return CTL_ERR_INVALID;
    return ctl__train_init(m, desc, true, out);
}

CTL_API void ctl_train_free(ctl_train *t) {
    if (!t) return;
    ctl__tdev_free(t);
    ctl_arena_free(t->ctx, &t->arena);
    ctl_free(t->ctx, t);
}

CTL_API void ctl_train_memory(const ctl_train *t, ctl_memory_plan *out) {
    if (CTL__ARGS(t ? t->ctx : NULL, t && out)) *out = t->plan;
    else if (out) memset(out, 0, sizeof *out);
}
CTL_API const float *ctl_train_logprobs(const ctl_train *t) { return CTL__ARGS(NULL, t) ? t->logp : NULL; }
CTL_API const float *ctl_train_entropy(const ctl_train *t) { return CTL__ARGS(NULL, t) ? t->entropy : NULL; }

// The policy's own forward with the adapters off, then on again. It overwrites the activations, so it must
// run before the policy's forward of the step, never between that forward and its backward (have_forward is
// cleared so ctl_train_backward refuses).
CTL_API ctl_status ctl_train_reference(ctl_train *t, const ctl_batch *b, float *ref) {
    if (!CTL__ARGS(t ? t->ctx : NULL, t && b && ref)) return CTL_ERR_INVALID;
    ctl_model *m = t->m;
    if (m->n_adapters == 0 || m->merged)
        return ctl__fail(t->ctx, CTL_ERR_INVALID, "train_reference: the model has no %s adapters to switch off; precompute "
                         "reference log-probs (ctl_sequence_logprobs) from the initial model instead",
                         m->merged ? "unmerged" : "");
    bool on = m->adapters_on;
    bool current = t->on.version == m->version;   // switching adapters leaves the weights alone:
    ctl_adapters_enable(m, false);                // the backend's copy need not be taken again
    if (current) t->on.version = m->version;
    ctl_status st = ctl_train_forward(t, b);
    ctl_adapters_enable(m, on);
    if (current) t->on.version = m->version;
    if (st) return st;
    memcpy(ref, t->logp, (size_t)(b->B * b->T) * sizeof(float));
    t->have_forward = false;   // not the policy's forward: nothing to go back through
    return CTL_OK;
}

CTL_API ctl_status ctl_train_set_temperature(ctl_train *t, float temperature) {
    if (!CTL__ARGS(NULL, t)) return CTL_ERR_INVALID;
    if (!(temperature > 0.0f) || !isfinite(temperature))
        return ctl__fail(t->ctx, CTL_ERR_RANGE, "train_set_temperature: %g (must be finite and > 0)", (double)temperature);
    if (t->have_forward && 1.0f / temperature != t->inv_temp)
        t->have_forward = false;   // the last forward's log-probs were at another temperature
    t->inv_temp = 1.0f / temperature;   // the LM head multiplies the logits by it
    return CTL_OK;
}
CTL_API float *ctl_train_dlogprobs(ctl_train *t) { return CTL__ARGS(NULL, t) ? t->dlogp : NULL; }
// The gradient as accumulated so far (the backwards since the last step), for inspection and the tests.
CTL_API float *ctl_train_grad(ctl_train *t, int64_t i) {
    if (!CTL__ARGS(NULL, t)) return NULL;
    if (i < 0 || i >= t->m->n_params || !t->grad[i]) return NULL;
    const ctl__kernels *K = t->ex.k;   // (on the CPU both are the same array: nothing moves)
    if (K->sync(t->ctx) || K->to_host(t->ctx, t->grad[i], t->ex.g[i], (size_t)ctl_tensor_numel(&t->m->params[i].value) * sizeof(float)))
        return NULL;
    return t->grad[i];
}

// Between the model on the host and the backend's copies (see ctl__exec_upload for the way up).
// The trainable weights back to the host after a step: the model is always the trained one. The cost: every
// trainable tensor crosses after every step (with LoRA, only the adapters); on the CPU nothing moves.
static ctl_status ctl__train_download(ctl_train *t) {
    const ctl_model *m = t->m;
    ctl_status st = t->ex.k->sync(t->ctx);
    for (int64_t i = 0; !st && i < m->n_params; i++)
        if (m->params[i].trainable)
            st = t->ex.k->to_host(t->ctx, m->params[i].value.data, ctl__xw(&t->ex, i), (size_t)ctl_tensor_numel(&m->params[i].value) * sizeof(float));
    return st;
}

// The gradients (which = 0) or AdamW's moments (1) between the backend's copies and the host's.
static ctl_status ctl__train_sync_state(ctl_train *t, int which, bool to_host) {
    const ctl_model *m = t->m;
    const ctl__kernels *K = t->ex.k;
    ctl_status st = K->sync(t->ctx);
    // On the CPU both sides are the same arrays and the copies are no-ops. Used to name a NaN gradient, to save
    // and to load a checkpoint; never in a healthy step.
    for (int64_t i = 0; !st && i < m->n_params; i++) {
        if (!m->params[i].trainable) continue;
        size_t b = (size_t)ctl_tensor_numel(&m->params[i].value) * sizeof(float);
        float *h[2] = {which ? t->adam_m[i] : t->grad[i], which ? t->adam_v[i] : NULL};
        float *on[2] = {which ? t->on.adam_m[i] : t->ex.g[i], which ? t->on.adam_v[i] : NULL};
        for (int k = 0; k < 2 && !st && h[k]; k++) st = to_host ? K->to_host(t->ctx, h[k], on[k], b) : K->to_backend(t->ctx, on[k], h[k], b);
    }
    return st;
}

// The first non-finite hidden state (after the embedding, then after each layer), named for
// the message; searched only when a log-prob came out non-finite, so its allocation and copies (one (N,C)
// hidden state at a time) are paid only once a run has already gone wrong.
static ctl_status ctl__train_nonfinite(ctl_train *t, const char *who) {
    ctl_ctx *ctx = t->ctx;
    int64_t N = t->cur_B * t->cur_T, C = t->cfg.n_embd, T = t->cur_T;
    float *x = (float *)ctl_alloc(ctx, (size_t)(N * C) * sizeof(float));
    if (!x) return ctl__fail(ctx, CTL_ERR_OUT_OF_MEMORY, "%s: out of memory", who);
    ctl_status st = CTL_OK;
    // Front to back: the first hidden state holding a NaN or infinity names the layer where it arose. When all are
    // finite (the head overflowed), this returns CTL_OK and the objectives report the log-prob.
    for (int64_t l = 0; l <= t->cfg.n_layer && !st; l++) {
        if ((st = t->ex.k->to_host(ctx, x, l ? t->acts[l - 1].res3 : t->encoded, (size_t)(N * C) * sizeof(float)))) break;
        int64_t bad = ctl__nonfinite_at(x, N * C);
        if (bad < 0) continue;
        char where[64], param[192] = "every fp32 parameter is finite (the activations overflowed)";
        if (l) snprintf(where, sizeof where, "after layer %" PRId64, l - 1);
        else snprintf(where, sizeof where, "after the embedding");
        ctl__nonfinite_param(t->m, false, param, sizeof param);
        st = ctl__fail(ctx, CTL_ERR_NONFINITE, "%s (update %" PRId64 "): the hidden state %s is %g at (b=%" PRId64 ", t=%" PRId64
                       ", channel %" PRId64 "); %s", who, t->step + 1, where, (double)x[bad], bad / C / T, bad / C % T, bad % C, param);
    }
    ctl_free(ctx, x);
    return st;
}

// The forward over a checked batch (t->tokens, t->targets; t->pos when packed), block by block:
//   x = embed(tokens) [+ the embedding's LoRA]
//   per block: res2 = x + o(attention(rope(qkv(norm1(x)))));  res3 = res2 + down(act(up(norm2(res2))))
//   logp, lse = lmhead(norm(x)) [+ the head's LoRA]
// every linear layer with its adapters (ctl__linear_forward). Then the log-probs come to the host.
static ctl_status ctl__train_forward(ctl_train *t, int64_t B, int64_t T) {
    ctl_ctx *ctx = t->ctx;
    const ctl__exec *x = &t->ex;
    const ctl__kernels *K = x->k;
    const ctl_model *m = t->m;
    const ctl_model_config *c = &t->cfg;
    ctl__arun *run = &t->run;
    int64_t N = B * T, C = c->n_embd, V = c->vocab_size, NH = c->n_head, NKV = c->n_kv_head, HS = c->head_dim;
    int64_t QKV = (NH + 2 * NKV) * HS, FF = c->n_ff, FFH = c->arch == CTL_ARCH_GPT2 ? FF : 2 * FF;
    for (int64_t i = 0; !t->packed && i < N; i++) t->pos[i] = (int32_t)(i % T);   // unpacked: position = column
    const int32_t *P = t->packed ? t->on.pos : NULL;   // packed documents: attention stays within each
    size_t ib = (size_t)N * sizeof(int32_t);
    // The weights go over only when the model's version moved (a step, a load, adapters switched); then the batch.
    ctl_status st = ctl__exec_upload(x, t->on.weights, &t->on.version);
    if (!st) st = K->to_backend(ctx, t->on.tokens, t->tokens, ib);
    if (!st) st = K->to_backend(ctx, t->on.targets, t->targets, ib);
    if (!st) st = K->to_backend(ctx, t->on.pos, t->pos, ib);
    if (st) return st;
    float *h = t->encoded;
    ctl__embed_forward(x, run, h, t->on.tokens, t->on.pos, N);
    for (int64_t l = 0; l < c->n_layer; l++) {
        ctl__acts *a = &t->acts[l];
        const ctl__block *k = &m->blocks[l];
        // attention: res2 = x + o(attention(rope(qkv(norm1(x))))); each output the backward reads is kept in a.
        ctl__norm_forward(x, a->ln1, a->ln1_mean, a->ln1_rstd, h, k->norm1_w, k->norm1_b, N);
        ctl__linear_forward(x, run, a->qkv, a->ln1, k->qkv_w, k->qkv_b, k->n_qkv, N, C, QKV);
        if (t->on.rope_cos) K->rope_forward(ctx, a->qkv, t->on.rope_cos, t->on.rope_sin, t->on.pos, N, NH + NKV, HS, QKV, c->rope_layout);
        K->attention_forward(ctx, a->atty, a->lse, a->qkv, P, B, T, NH, NKV, HS);
        ctl__linear_forward(x, run, t->proj, a->atty, &k->o_w, &k->o_b, 1, N, NH * HS, C);
        K->residual_forward(ctx, a->res2, h, t->proj, N * C);
        // MLP: res3 = res2 + down(act(up(norm2(res2)))); proj is scratch, overwritten by the next block.
        ctl__norm_forward(x, a->ln2, a->ln2_mean, a->ln2_rstd, a->res2, k->norm2_w, k->norm2_b, N);
        ctl__linear_forward(x, run, a->fch, a->ln2, k->up_w, k->up_b, k->n_up, N, C, FFH);
        if (c->arch == CTL_ARCH_GPT2) K->gelu_forward(ctx, a->fch_act, a->fch, N * FF);
        else K->swiglu_forward(ctx, a->fch_act, a->fch, N, FF);
        ctl__linear_forward(x, run, t->proj, a->fch_act, &k->down_w, &k->down_b, 1, N, FF, C);
        K->residual_forward(ctx, a->res3, a->res2, t->proj, N * C);
        h = a->res3;   // the next block's input, read in place
    }
    // The final norm, kept (lnf) for the head's backward and for ctl_train_logits.
    ctl__norm_forward(x, t->lnf, t->lnf_mean, t->lnf_rstd, h, m->out_norm_w, m->out_norm_b, N);
    ctl__head hd = ctl__head_forward(x, run, t->lnf, N);
    // The LM head in chunks of t->chunk rows: each chunk's logits (chunk, V) live only in lm_scratch and are reduced
    // at once to each row's target log-prob and log-sum-exp (and entropy), so (N, V) logits never exist.
    K->lmhead_forward(ctx, t->on.logp, t->on.lse, t->on.entropy, t->lnf, &hd, t->on.targets, N, C, V, t->inv_temp, t->lm_scratch, t->chunk);
    // The log-probs to the host for the objectives; a non-finite one starts the search for where it began.
    if ((st = K->sync(ctx)) || (st = K->to_host(ctx, t->logp, t->on.logp, (size_t)N * sizeof(float))) ||
        (t->entropy && (st = K->to_host(ctx, t->entropy, t->on.entropy, (size_t)N * sizeof(float)))))
        return st;
    t->cur_B = B, t->cur_T = T;   // the shape the backward and the log-prob readers go by
    return ctl__nonfinite_at(t->logp, N) >= 0 ? ctl__train_nonfinite(t, "train_forward") : CTL_OK;
}

// d(residual) as a linear layer's dout: dres itself, or a copy in proj where DoRA would scale it.
static float *ctl__train_dout(ctl_train *t, int64_t N) {
    if (!t->run.tmp) return t->dres;   // (run.tmp exists exactly when some adapter has DoRA)
    t->ex.k->copy_rows(t->ctx, t->proj, t->dres, N, t->cfg.n_embd);
    return t->proj;
}

// The forward's calls in reverse. One running buffer dres carries d(residual stream): the
// residual add passes it unchanged to both branches (ctl_residual_backward with da = db = dres
// would add it twice to itself), so each branch's norm backward simply adds into it.
static ctl_status ctl__train_backward(ctl_train *t) {
    ctl_ctx *ctx = t->ctx;
    const ctl__exec *x = &t->ex;
    const ctl__kernels *K = x->k;
    const ctl_model *m = t->m;
    const ctl_model_config *c = &t->cfg;
    const ctl__arun *run = &t->run;
    int64_t B = t->cur_B, T = t->cur_T, N = B * T, C = c->n_embd, V = c->vocab_size, NH = c->n_head, NKV = c->n_kv_head;
    int64_t HS = c->head_dim, QKV = (NH + 2 * NKV) * HS, FF = c->n_ff, FFH = c->arch == CTL_ARCH_GPT2 ? FF : 2 * FF;
    const int32_t *P = t->packed ? t->on.pos : NULL;
    // Every _backward adds into the gradient of its input, so paths that meet can sum; hence each buffer is zeroed
    // before the first call that adds into it.
    ctl_status st = K->to_backend(ctx, t->on.dlogp, t->dlogp, (size_t)N * sizeof(float));
    if (st) return st;
    K->zero(ctx, t->dln, N * C);
    // The LM head first: d logp -> dln (N,C) through the same chunks, each chunk's logits recomputed from lnf and
    // the forward's lse rather than kept; with a gradient for the head's weight when it trains.
    ctl__head hd = ctl__head_forward(x, run, NULL, N);
    if (hd.r) {   // the head's LoRA: its h from the forward; dh comes back
        hd.dh = run->dh, hd.dlora_b = ctl__xg(x, m->adapters[m->adapter_of[m->output]].lora_b);
        K->zero(ctx, run->dh, N * hd.r);
    }
    K->lmhead_backward(ctx, t->dln, ctl__xg(x, m->output), t->on.dlogp, t->lnf, &hd, t->on.targets, t->on.lse, N, C, V, t->inv_temp,
                       t->lm_scratch, t->chunk);
    ctl__head_backward(x, run, t->dln, t->lnf, N);
    K->zero(ctx, t->dres, N * C);
    // The final norm's backward starts dres: d(residual stream) after the last block.
    ctl__norm_backward(x, t->dres, m->out_norm_w, m->out_norm_b, t->dln, c->n_layer ? t->acts[c->n_layer - 1].res3 : t->encoded,
                       t->lnf_mean, t->lnf_rstd, N);
    for (int64_t l = c->n_layer - 1; l >= 0; l--) {
        ctl__acts *a = &t->acts[l];
        const ctl__block *k = &m->blocks[l];
        const float *h = l ? t->acts[l - 1].res3 : t->encoded;
        // MLP: res3 = res2 + down(act(up(norm2(res2))))
        K->zero(ctx, t->dact, N * FF);
        ctl__linear_backward(x, run, t->dact, ctl__train_dout(t, N), a->fch_act, &k->down_w, &k->down_b, 1, N, FF, C);
        K->zero(ctx, t->dfch, N * FFH);
        if (c->arch == CTL_ARCH_GPT2) K->gelu_backward(ctx, t->dfch, t->dact, a->fch, N * FF);
        else K->swiglu_backward(ctx, t->dfch, t->dact, a->fch, N, FF);
        K->zero(ctx, t->dln, N * C);
        ctl__linear_backward(x, run, t->dln, t->dfch, a->ln2, k->up_w, k->up_b, k->n_up, N, C, FFH);
        ctl__norm_backward(x, t->dres, k->norm2_w, k->norm2_b, t->dln, a->res2, a->ln2_mean, a->ln2_rstd, N);
        // attention: res2 = x + o(attention(rope(qkv(norm1(x)))))
        K->zero(ctx, t->datty, N * NH * HS);
        ctl__linear_backward(x, run, t->datty, ctl__train_dout(t, N), a->atty, &k->o_w, &k->o_b, 1, N, NH * HS, C);
        K->zero(ctx, t->dqkv, N * QKV);
        K->attention_backward(ctx, t->dqkv, t->datty, a->qkv, a->atty, a->lse, P, B, T, NH, NKV, HS);
        if (t->on.rope_cos) K->rope_backward(ctx, t->dqkv, t->on.rope_cos, t->on.rope_sin, t->on.pos, N, NH + NKV, HS, QKV, c->rope_layout);
        K->zero(ctx, t->dln, N * C);
        ctl__linear_backward(x, run, t->dln, t->dqkv, a->ln1, k->qkv_w, k->qkv_b, k->n_qkv, N, C, QKV);
        ctl__norm_backward(x, t->dres, k->norm1_w, k->norm1_b, t->dln, h, a->ln1_mean, a->ln1_rstd, N);
    }
    // What is left in dres is d(embeddings): added into the rows of the tokens (and positions) the batch used.
    ctl__embed_backward(x, run, t->dres, t->on.tokens, t->on.pos, N);
    return K->sync(ctx);
}

CTL_API ctl_status ctl_train_forward(ctl_train *t, const ctl_batch *b) { return ctl_train_forward_packed(t, b, NULL); }

// Everything is checked before anything is copied: a rejected batch leaves the last forward as it was.
CTL_API ctl_status ctl_train_forward_packed(ctl_train *t, const ctl_batch *b, const int32_t *pos) {
    if (!CTL__ARGS(t ? t->ctx : NULL, t && b)) return CTL_ERR_INVALID;
    ctl_ctx *ctx = t->ctx;
    const ctl_model_config *c = &t->cfg;
    const ctl_model *m = t->m;
    const char *who = "train_forward";
    if (t->structure != m->structure)
        return ctl__fail(ctx, CTL_ERR_INVALID, "%s: the model's adapters or frozen set changed after ctl_train_init; make a new trainer", who);
    if (!b || !b->tokens || !b->targets)
        return ctl__fail(ctx, CTL_ERR_INVALID, "%s: the batch needs tokens and targets", who);
    if (b->B < 1 || b->T < 1 || b->B > t->B || b->T > t->T)
        return ctl__fail(ctx, b->B < 1 || b->T < 1 ? CTL_ERR_SHAPE : CTL_ERR_CAPACITY,
                         "%s: batch %" PRId64 "x%" PRId64 " does not fit the planned %" PRId64 "x%" PRId64, who, b->B,
                         b->T, t->B, t->T);
    int64_t B = b->B, T = b->T, N = B * T, V = c->vocab_size;
    // An id outside [0, V) would index past the embedding table or the head's rows.
    for (int64_t i = 0; i < N; i++) {
        int32_t tok = b->tokens[i], tgt = b->targets[i];
        if (tok < 0 || tok >= V || tgt < 0 || tgt >= V)
            return ctl__fail(ctx, CTL_ERR_RANGE, "%s: %s %d at (b=%" PRId64 ", t=%" PRId64 ") is outside the vocabulary [0, %" PRId64 ")",
                             who, tok < 0 || tok >= V ? "token" : "target", tok < 0 || tok >= V ? tok : tgt, i / T, i % T, V);
    }
    // A packed row's positions: 0 starts a document, anything else follows its left neighbour by one; never above
    // the column, so no document reaches back past the row's start.
    for (int64_t i = 0; pos && i < N; i++)
        if (pos[i] < 0 || pos[i] > i % T || (i % T && pos[i] != 0 && pos[i] != pos[i - 1] + 1))
            return ctl__fail(ctx, CTL_ERR_RANGE, "%s: position %d at (b=%" PRId64 ", t=%" PRId64 ") does not start a document (0) or "
                             "follow the one before", who, pos[i], i / T, i % T);
    // The batch is copied in: the backward reads tokens, targets and positions again, after the caller may have
    // reused its arrays.
    memcpy(t->tokens, b->tokens, N * sizeof(int32_t));
    memcpy(t->targets, b->targets, N * sizeof(int32_t));
    if (pos) memcpy(t->pos, pos, N * sizeof(int32_t));
    t->packed = pos != NULL;
    t->have_forward = false;

    ctl__arun *run = &t->run;
    // train: the adapters keep what their backward needs (h, dropout's input, DoRA's z) in the trainer's buffers.
    run->on = m->adapters_on && !m->merged && m->n_adapters > 0, run->train = true;
    // Masks follow (seed, step, micro-batch): a resumed run draws the same ones.
    run->seed = ctl__mix(t->desc.seed ^ ctl__mix((uint64_t)t->step * 0x9E3779B97F4A7C15ull + (uint64_t)t->n_micro + 1));
    ctl_status st = ctl__train_forward(t, B, T);
    t->have_forward = st == CTL_OK;
    return st;
}

// Recomputed on the host from the final hidden state the forward kept (lnf), as the forward never holds a row
// of logits; at temperature 1 (the trainer's temperature is not applied). One row costs a (1,C) x (C,V) product.
CTL_API ctl_status ctl_train_logits(ctl_train *t, int64_t b, int64_t pos, float *logits) {
    if (!CTL__ARGS(t ? t->ctx : NULL, t && logits)) return CTL_ERR_INVALID;
    if (!t->have_forward || b < 0 || b >= t->cur_B || pos < 0 || pos >= t->cur_T)
        return ctl__fail(t->ctx, CTL_ERR_RANGE, "train_logits: row (b=%" PRId64 ", t=%" PRId64 ") is not in the last forward (%" PRId64 "x%" PRId64 ")",
                         b, pos, t->have_forward ? t->cur_B : 0, t->have_forward ? t->cur_T : 0);
    int64_t C = t->cfg.n_embd, row = b * t->cur_T + pos;
    ctl__exec ex = ctl__exec_cpu(t->ctx, t->m, NULL);   // the host holds the same weights as the device
    ctl__head hd = ctl__head_forward(&ex, &t->run, NULL, 0);
    const ctl__adapter *ad = t->cfg.tied_embeddings ? NULL : ctl__lora_of(t->m, &t->run, t->m->output);
    int64_t R = ad ? ad->rank : 0;
    const float *x = t->lnf + row * C, *h = ad ? t->run.bufs[t->m->adapter_of[t->m->output]].h + row * R : NULL;
    float *xh = NULL;   // the row's final hidden state (and head LoRA h) from a device; the host holds the same weights
    // From a device: the row's hidden state (and the head LoRA's h) come over; the product is done on the host.
    if (!t->ex.k->host_memory) {
        const ctl__kernels *K = t->ex.k;
        ctl_status st = (xh = (float *)ctl_alloc(t->ctx, (size_t)(C + R) * sizeof(float))) ? CTL_OK : CTL_ERR_OUT_OF_MEMORY;
        if (st) return ctl__fail(t->ctx, st, "train_logits: out of memory");
        if ((st = K->to_host(t->ctx, xh, x, (size_t)C * sizeof(float))) || (R && (st = K->to_host(t->ctx, xh + C, h, (size_t)R * sizeof(float)))))
            return ctl_free(t->ctx, xh), st;
        x = xh, h = xh + C;
    }
    ctl__gemm_wt(t->ctx, 1, t->cfg.vocab_size, C, x, C, hd.type, hd.w, logits, t->cfg.vocab_size, false);
    if (ad)   // the h of that row, as the forward left it
        ctl_gemm(t->ctx, 1, t->cfg.vocab_size, R, h, R, 1, ctl__pf(t->m, ad->lora_b), 1, R, logits, t->cfg.vocab_size, true);
    ctl_free(t->ctx, xh);
    return CTL_OK;
}

// Every d loss / d log-prob must be finite: a NaN here would spread into every gradient, and ctl_train_step could
// only say that the norm is NaN. n_micro counts the backwards the next step will apply.
CTL_API ctl_status ctl_train_backward(ctl_train *t) {
    if (!CTL__ARGS(NULL, t)) return CTL_ERR_INVALID;
    ctl_ctx *ctx = t->ctx;
    if (!t->have_forward) return ctl__fail(ctx, CTL_ERR_INVALID, "train_backward: no forward pass to go back through");
    int64_t T = t->cur_T, N = t->cur_B * T;
    for (int64_t i = 0; i < N; i++)
        if (!isfinite(t->dlogp[i]))
            return ctl__fail(ctx, CTL_ERR_NONFINITE, "train_backward: d loss / d log-prob at (b=%" PRId64 ", t=%" PRId64 ") is %g",
                             i / T, i % T, (double)t->dlogp[i]);
    ctl_status st = ctl__train_backward(t);
    if (!st) t->n_micro++;
    return st;
}

CTL_API ctl_status ctl_train_step(ctl_train *t, ctl_step_stats *stats) {
    if (!CTL__ARGS(NULL, t)) return CTL_ERR_INVALID;
    ctl_ctx *ctx = t->ctx;
    const ctl_optim_desc *o = &t->desc.optim;
    if (t->n_micro == 0) return ctl__fail(ctx, CTL_ERR_INVALID, "train_step: no backward pass since the last step");
    const ctl__kernels *K = t->ex.k;
    double sq = 0.0;
    ctl_status st = K->grad_sumsq(ctx, &t->on.params, &sq);
    if (st) return st;
    float grad_scale = 1.0f;   // the objectives' normalisers already divide by the step's size
    float norm = (float)sqrt(sq);
    t->n_micro = 0;
    if (!isfinite(norm)) {   // a parameter, else a gradient, else the sum of squares overflowed
        char what[192];
        if ((st = ctl__train_sync_state(t, 0, true))) return st;   // the gradients, to name the culprit
        snprintf(what, sizeof what, "the gradient norm is %g", (double)norm);
        if (!ctl__nonfinite_param(t->m, true, what, sizeof what))
            for (int64_t i = 0; i < t->m->n_params; i++) {
                int64_t j = t->grad[i] ? ctl__nonfinite_at(t->grad[i], ctl_tensor_numel(&t->m->params[i].value)) : -1;
                char where[96];
                if (j < 0) continue;
                snprintf(what, sizeof what, "the gradient of %s is %g at element %" PRId64,
                         ctl__param_where(t->m->params[i].name, where, sizeof where), (double)t->grad[i][j], j);
                break;
            }
        ctl_train_discard(t);
        return ctl__fail(ctx, CTL_ERR_NONFINITE, "train_step (update %" PRId64 "): %s; the step is skipped (weights, moments and step "
                         "count unchanged, gradients dropped)", t->step + 1, what);
    }
    bool clipped = false;
    if (o->clip > 0.0f) {   // torch.nn.utils.clip_grad_norm_: scale by clip / (norm + 1e-6) when below 1
        float coef = o->clip / (norm + 1e-6f);
        if (coef < 1.0f) grad_scale *= coef, clipped = true;
    }
    float lr = o->lr * ctl_lr_schedule(o, t->step);
    K->adamw(ctx, &t->on.params, o, grad_scale, lr, t->step + 1);
    if ((st = ctl__train_download(t))) return st;
    t->step++;
    t->m->version++;
    t->on.version = t->m->version;   // the backend made this version
    if (stats) stats->step = t->step, stats->lr = lr, stats->grad_norm = norm, stats->clipped = clipped;
    return CTL_OK;
}

CTL_API void ctl_train_discard(ctl_train *t) {
    if (!CTL__ARGS(NULL, t)) return;
    t->ex.k->grad_zero(t->ctx, &t->on.params);
    t->n_micro = 0;
}

// ---- checkpoints ------------------------------------------------------------------------------

// The file: the adapters as ctl_adapter_save writes them; per trainable parameter its value (base weights here,
// the adapters' are already in) and AdamW's two moments as "<name>.adam_m" / ".adam_v"; the step and the run state.
// ctl_gguf_writer_save writes a temporary file and renames it over path, with fsyncs of the file and (POSIX)
// of the directory: a crash leaves the old checkpoint or the new one, never a torn file.
CTL_API ctl_status ctl_train_save(const ctl_train *t, const char *path, const ctl_run_state *run) {
    if (!CTL__ARGS(t ? t->ctx : NULL, t && path)) return CTL_ERR_INVALID;
    const ctl_model *m = t->m;
    ctl_ctx *ctx = t->ctx;
    // Pending gradients are not saved: a resume would silently lose them.
    if (t->n_micro) return ctl__fail(ctx, CTL_ERR_INVALID, "train_save: %" PRId64 " micro-batches wait for ctl_train_step", t->n_micro);
    ctl_status dst = ctl__train_sync_state((ctl_train *)t, 1, true);   // the moments (the weights are current)
    if (dst) return dst;
    for (int64_t i = 0; i < m->n_params; i++) {   // no checkpoint holds a NaN or infinity
        const float *arr[3] = {(const float *)m->params[i].value.data, t->adam_m[i], t->adam_v[i]};
        static const char *const kind[3] = {"", "the first AdamW moment of ", "the second AdamW moment of "};
        for (int k = 0; t->grad[i] && k < 3; k++) {
            int64_t j = ctl__nonfinite_at(arr[k], ctl_tensor_numel(&m->params[i].value));
            char where[96];
            if (j >= 0)
                return ctl__fail(ctx, CTL_ERR_NONFINITE, "train_save '%s': %s%s holds %g at element %" PRId64 "; nothing written",
                                 path, kind[k], ctl__param_where(m->params[i].name, where, sizeof where), (double)arr[k][j], j);
        }
    }
    ctl_gguf_writer *w;
    ctl_status st = ctl_gguf_writer_init(ctx, &w);
    uint64_t step = (uint64_t)t->step;
    // The adapter tensors first, with their metadata, so the checkpoint also loads with ctl_adapter_load.
    if (!st) st = ctl__adapters_write(m, w);   // the adapters (and their values), as ctl_adapter_save
    if (!st) st = ctl_gguf_writer_set(w, "cotlab.train.step", CTL_GGUF_U64, &step);
    if (!st && run) {
        int64_t counters[3] = {run->epoch, run->position, run->counter};
        st = ctl_gguf_writer_set_array(w, "cotlab.run.rng", CTL_GGUF_U64, run->rng, 4);
        if (!st) st = ctl_gguf_writer_set_array(w, "cotlab.run.counters", CTL_GGUF_I64, counters, 3);
        if (!st && run->config) st = ctl_gguf_writer_set_str(w, "cotlab.run.config", run->config, strlen(run->config));
    }
    // Frozen parameters are not written: they come from the base model at resume.
    for (int64_t i = 0; i < m->n_params && !st; i++) {
        const ctl_tensor *v = &m->params[i].value;
        int64_t ne[2] = {v->ndim == 2 ? v->shape[1] : v->shape[0], v->shape[0]};   // GGUF's ne: innermost first
        char name[80];
        if (!t->grad[i]) continue;
        if (i < m->n_base) st = ctl_gguf_writer_add_tensor(w, m->params[i].name, CTL_GGML_F32, v->ndim, ne, (const float *)v->data);
        snprintf(name, sizeof name, "%s.adam_m", m->params[i].name);
        if (!st) st = ctl_gguf_writer_add_tensor(w, name, CTL_GGML_F32, v->ndim, ne, t->adam_m[i]);
        snprintf(name, sizeof name, "%s.adam_v", m->params[i].name);
        if (!st) st = ctl_gguf_writer_add_tensor(w, name, CTL_GGML_F32, v->ndim, ne, t->adam_v[i]);
    }
    if (!st) st = ctl_gguf_writer_save(w, path);
    ctl_gguf_writer_free(w);
    return st;
}

// Whether checkpoint g was saved from a model with the trainer's adapters: the same LoRA
// settings, no tensor it trains that this trainer does not, the same sparse entries.
static ctl_status ctl__ckpt_matches(const ctl_train *t, const ctl_gguf *g, const char *path) {
    const ctl_model *m = t->m;
    ctl_ctx *ctx = t->ctx;
    int64_t rank = 0;
    double alpha = 0.0;
    bool rslora = false, dora = false;
    const ctl_gguf_kv *kv;
    // The LoRA settings must match exactly: the same values under another alpha or rank would train a different model.
    if (ctl_gguf_find_kv(g, "cotlab.lora.rank")) {   // (absent from checkpoints made before it was written)
        bool ok = !ctl_gguf_get_int(g, "cotlab.lora.rank", &rank) && !ctl_gguf_get_float(g, "cotlab.lora.alpha", &alpha) &&
                  !ctl_gguf_get_bool(g, "cotlab.lora.rslora", &rslora) && !ctl_gguf_get_bool(g, "cotlab.lora.dora", &dora);
        if (!ok) return CTL_ERR_FORMAT;   // (the getter said which key)
        if (rank != m->lora.rank || (rank && ((float)alpha != m->lora.alpha || rslora != m->lora.rslora || dora != m->lora.dora)))
            return ctl__fail(ctx, CTL_ERR_INVALID, "train_load '%s': it holds a LoRA of rank %" PRId64 ", alpha %g%s%s; the model's has rank %" PRId64
                             ", alpha %g%s%s", path, rank, alpha, rslora ? ", rsLoRA" : "", dora ? ", DoRA" : "", m->lora.rank,
                             (double)m->lora.alpha, m->lora.rslora ? ", rsLoRA" : "", m->lora.dora ? ", DoRA" : "");
    }
    for (int64_t i = 0; i < ctl_gguf_tensor_count(g); i++) {   // each tensor it trains, trained here
        const char *name = ctl_gguf_tensor_at(g, i)->name;
        size_t n = strlen(name);
        char base[80];
        // A moment's name less its suffix is its parameter's.
        if (n > 7 && (!strcmp(name + n - 7, ".adam_m") || !strcmp(name + n - 7, ".adam_v"))) n -= 7;
        snprintf(base, sizeof base, "%.*s", (int)CTL__MIN(n, sizeof base - 1), name);
        int64_t i_par = -1;
        for (int64_t j = 0; j < m->n_params && i_par < 0; j++)
            if (!strcmp(m->params[j].name, base)) i_par = j;
        if (i_par < 0 || !t->grad[i_par])
            return ctl__fail(ctx, CTL_ERR_INVALID, "train_load '%s': it trains '%s', which this %s (other adapters or targets?)", path, base,
                             i_par < 0 ? "model does not have" : "trainer keeps frozen");
    }
    // A sparse delta's values are meaningful only at the same entries: the index lists must match exactly.
    for (int64_t a = 0; a < m->n_adapters; a++) {   // the sparse deltas' entries
        const ctl__adapter *ad = &m->adapters[a];
        char key[96];
        if (ad->sparse < 0) continue;
        snprintf(key, sizeof key, "cotlab.sparse.%s", m->params[ad->base].name);
        kv = ctl_gguf_find_kv(g, key);
        bool same = kv && kv->type == CTL_GGUF_ARR && kv->elem_type == CTL_GGUF_I64 && kv->count == (uint64_t)ad->n_sparse;
        for (int64_t k = 0; same && k < ad->n_sparse; k++) same = (int64_t)ctl__le64(kv->data + 8 * k) == ad->sparse_idx[k];
        if (!same) return ctl__fail(ctx, CTL_ERR_INVALID, "train_load '%s': the sparse entries of '%s' differ from the model's", path, m->params[ad->base].name);
    }
    return CTL_OK;
}

CTL_API ctl_status ctl_train_load(ctl_train *t, const char *path, ctl_run_state *run) {
    if (!CTL__ARGS(t ? t->ctx : NULL, t && path)) return CTL_ERR_INVALID;
    ctl_model *m = t->m;
    ctl_ctx *ctx = t->ctx;
    ctl_gguf *g;
    ctl_status st = ctl_gguf_open(ctx, path, &g);
    if (st) return st;
    int64_t step = 0;
    // A file without the step is not a checkpoint (an adapter file, say). The run state is optional: zero without it.
    if ((st = ctl_gguf_get_int(g, "cotlab.train.step", &step))) return ctl_gguf_close(g), st;
    ctl_run_state rs;   // (given to the caller only when the whole checkpoint loads)
    memset(&rs, 0, sizeof rs);
    const ctl_gguf_kv *r = ctl_gguf_find_kv(g, "cotlab.run.rng"), *c = ctl_gguf_find_kv(g, "cotlab.run.counters");
    if (r && r->type == CTL_GGUF_ARR && r->elem_type == CTL_GGUF_U64 && r->count == 4)
        for (int k = 0; k < 4; k++) rs.rng[k] = ctl__le64(r->data + 8 * k);
    if (c && c->type == CTL_GGUF_ARR && c->elem_type == CTL_GGUF_I64 && c->count == 3)
        rs.epoch = (int64_t)ctl__le64(c->data), rs.position = (int64_t)ctl__le64(c->data + 8), rs.counter = (int64_t)ctl__le64(c->data + 16);
    if (!st) st = ctl__ckpt_matches(t, g, path);
    // Two passes: the first checks every tensor's presence, type and size, the second copies, so a checkpoint that
    // fails leaves the trainer's weights and moments, and run, untouched.
    for (int pass = 0; pass < 2 && !st; pass++)   // every trainable tensor and its moments, checked, then copied
        for (int64_t i = 0; i < m->n_params && !st; i++) {
            if (!t->grad[i]) continue;
            for (int k = 0; k < 3 && !st; k++) {
                char name[80];
                snprintf(name, sizeof name, "%s%s", m->params[i].name, k == 0 ? "" : k == 1 ? ".adam_m" : ".adam_v");
                const ctl_gguf_tensor *gt = ctl_gguf_find_tensor(g, name);
                int64_t n = ctl_tensor_numel(&m->params[i].value);
                float *dst = k == 0 ? (float *)m->params[i].value.data : k == 1 ? t->adam_m[i] : t->adam_v[i];
                if (!gt || gt->type != CTL_GGML_F32 || ctl_gguf_tensor_numel(gt) != n)
                    st = ctl__fail(ctx, CTL_ERR_NOT_FOUND, "train_load '%s': no F32 tensor '%s' of %" PRId64 " values (a checkpoint of another run?)",
                                   path, name, n);
                else if (pass) memcpy(dst, gt->data, (size_t)n * sizeof(float));
            }
        }
    ctl_gguf_close(g);
    if (st) return st;
    if (run) *run = rs;
    // Pending gradients are dropped (the checkpoint holds none: saving needs them applied), and the version bump
    // makes every copy of the weights (a device trainer's, a generator's) be taken again. The step count restores
    // the schedule and AdamW's bias corrections, so the run continues bit for bit.
    t->step = step, t->n_micro = 0, t->have_forward = false;
    ctl__grad_zero_cpu(ctx, &t->host);
    m->version++;   // (a trainer on the device takes the weights again at its next forward)
    if (t->ex.k->host_memory) return CTL_OK;
    ctl_train_discard(t);
    return ctl__train_sync_state(t, 1, false);   // the moments to the device; weights follow at the next forward
}

// ---- calibration for sparse adapters (here: it drives a trainer) -----------------------------

CTL_API ctl_status ctl_sparse_calibrate(ctl_model *m, const ctl_sparse_desc *desc, const ctl_batch *batches,
                                        int64_t n) {
    if (!CTL__ARGS(m ? m->ctx : NULL, m && batches && n >= 1)) return CTL_ERR_INVALID;
    ctl_ctx *ctx = m->ctx;
    ctl_sparse_desc d;
    memset(&d, 0, sizeof d);
    if (desc) d = *desc;
    ctl_status st = ctl__sparse_check(m, &d, "sparse_calibrate");
    if (st) return st;
    if (n < 1 || !batches) return ctl__fail(ctx, CTL_ERR_INVALID, "sparse_calibrate: %" PRId64 " batches", n);
    ctl_train_desc td;
    memset(&td, 0, sizeof td);
    // A temporary trainer sized for the largest batch, on the CPU (the scores are read from its host gradients).
    for (int64_t k = 0; k < n; k++) td.batch = CTL__MAX(td.batch, batches[k].B), td.seq_len = CTL__MAX(td.seq_len, batches[k].T);
    bool *was = (bool *)ctl_alloc(ctx, (size_t)m->n_params * sizeof(bool));
    // The scores live with the model (per base tensor, NULL where not targeted) until ctl_sparse_attach uses them.
    if (!m->scores) {
        m->scores = (float **)ctl_alloc(ctx, (size_t)m->n_base * sizeof(float *));
        if (m->scores) memset(m->scores, 0, (size_t)m->n_base * sizeof(float *));
    }
    if (!was || !m->scores) return ctl_free(ctx, was), ctl__fail(ctx, CTL_ERR_OUT_OF_MEMORY, "sparse_calibrate: out of memory");
    // Only the targeted matrices are trainable during calibration (no adapter, no other weight gets a gradient);
    // the caller's trainable set is restored at the end.
    for (int64_t i = 0; i < m->n_params; i++) was[i] = m->params[i].trainable, m->params[i].trainable = false;
    for (int64_t i = 0; i < m->n_base && !st; i++) {
        if (!ctl__sparse_targeted(m, &d, i)) continue;
        // Targets must be fp32 matrices inside the blocks: the head and the embeddings are not scored.
        if (m->params[i].value.dtype != CTL_F32 || (ctl__param_linear(m, i) & (CTL_LINEAR_HEAD | CTL_LINEAR_EMBED))) {
            st = ctl__fail(ctx, CTL_ERR_UNSUPPORTED, "sparse_calibrate: '%s' must be an fp32 block weight", m->params[i].name);
            break;
        }
        int64_t numel = ctl_tensor_numel(&m->params[i].value);
        ctl_free(ctx, m->scores[i]);
        if (!(m->scores[i] = (float *)ctl_alloc(ctx, (size_t)numel * sizeof(float))))
            st = ctl__fail(ctx, CTL_ERR_OUT_OF_MEMORY, "sparse_calibrate: out of memory");
        else memset(m->scores[i], 0, (size_t)numel * sizeof(float)), m->params[i].trainable = true;
    }
    ctl_train *t = NULL;
    if (!st) st = ctl__train_init(m, &td, false, &t);
    for (int64_t k = 0; k < n && !st; k++) {   // score += |gradient| of each batch's weighted cross-entropy
        const struct ctl_batch *b = &batches[k];
        float loss;
        if ((st = ctl_train_forward(t, b)) ||
            (st = ctl_cross_entropy(ctx, b->B * b->T, ctl_train_logprobs(t), b->weights, ctl_train_dlogprobs(t), &loss)) ||
            (st = ctl_train_backward(t)))
            break;
        // Each batch's gradient, taken alone, is added as |g| and cleared; nothing is ever stepped, so n_micro is reset
        // by hand.
        for (int64_t i = 0; i < m->n_base; i++) {
            float *g = t->grad[i];
            for (int64_t j = 0, numel = ctl_tensor_numel(&m->params[i].value); g && j < numel; j++) m->scores[i][j] += fabsf(g[j]), g[j] = 0.0f;
        }
        t->n_micro = 0;
    }
    ctl_train_free(t);
    for (int64_t i = 0; i < m->n_params; i++) m->params[i].trainable = was[i];
    ctl_free(ctx, was);
    m->structure++;   // trainers made before must be remade (ctl_train_forward checks)
    return st;
}

// >>impl:data ===================================================================================

// A parsed dataset: one ctl_example per non-blank line, its strings in a block of its own (blocks[i]), so the
// file's text is released after parsing and an example's strings sit together. ex is sized for every line.
struct ctl_dataset {
    ctl_ctx *ctx;
    ctl_data_format format;
    ctl_example *ex;
    void **blocks;           // one allocation per example
    int64_t n, skipped;   // examples kept; malformed lines dropped (skip_bad)
};

// Bump allocation inside one example's block. The block is sized from its line before parsing, with room to
// spare: a decoded JSON string is never longer than its text (ctl__dataset_parse).
typedef struct ctl__exblock {
    char *p;
    size_t used, cap;
} ctl__exblock;

static void *ctl__exb_take(ctl__exblock *b, size_t bytes, size_t align) {
    size_t at = (b->used + align - 1) / align * align;
    if (at + bytes > b->cap) return NULL;   // full: the caller fails the line "out of room"
    b->used = at + bytes;
    return b->p + at;
}

// A JSON string decoded into the block (decoding never lengthens it).
static const char *ctl__exb_string(ctl__json *j, ctl__exblock *b) {
    size_t room = b->cap - b->used;
    char *s = b->p + b->used;
    if (!ctl__j_string(j, s, room)) return NULL;
    b->used += strlen(s) + 1;
    return s;
}

// A part: a string, or an array of {"role", "content"} objects.
static bool ctl__exb_part(ctl__json *j, ctl__exblock *b, ctl_part *out) {
    memset(out, 0, sizeof *out);
    ctl__j_ws(j);
    if (j->pos < j->n && j->p[j->pos] == '"') return (out->text = ctl__exb_string(j, b)) != NULL;
    if (!ctl__j_is(j, '[')) return ctl__j_fail(j, "must be a string or a list of messages");
    // Messages, counted by the '{' left in the line: an over-count (later parts' and strings' braces count too),
    // never an under-count, so the array never grows.
    int64_t cap = 0;
    for (size_t i = j->pos; i < j->n; i++) cap += j->p[i] == '{';
    ctl_chat_msg *msgs = (ctl_chat_msg *)ctl__exb_take(b, (size_t)(cap + 1) * sizeof(ctl_chat_msg), sizeof(void *));
    if (!msgs) return ctl__j_fail(j, "out of room");
    out->msgs = msgs;
    if (ctl__j_is(j, ']')) return true;
    do {
        char key[32];
        // A message: an object whose role and content are strings; any other key is skipped, whatever its value.
        const char *role = NULL, *content = NULL;
        if (!ctl__j_expect(j, '{')) return false;
        if (!ctl__j_is(j, '}')) do {
                if (!ctl__j_string(j, key, sizeof key) && !j->err) return false;
                if (j->err || !ctl__j_expect(j, ':')) return false;
                ctl__j_ws(j);
                if (!strcmp(key, "role") || !strcmp(key, "content")) {
                    const char *v = ctl__exb_string(j, b);
                    if (!v) return ctl__j_fail(j, "a message's role and content must be strings");
                    *(key[0] == 'r' ? &role : &content) = v;
                } else if (!ctl__j_skip(j, 2)) {
                    return false;
                }
            } while (ctl__j_is(j, ','));
        if (!ctl__j_expect(j, '}')) return false;
        if (!role || !content) return ctl__j_fail(j, "a message needs \"role\" and \"content\"");
        msgs[out->n_msgs].role = role, msgs[out->n_msgs].content = content, out->n_msgs++;
    } while (ctl__j_is(j, ','));
    return ctl__j_expect(j, ']');
}

// TRL's extract_prompt: the common start of chosen and rejected (whole messages, at least one left to each side;
// for text,
// characters, leaving a space before the difference to the completions).
static void ctl__implicit_prompt(ctl_example *e) {
    ctl_part *c = &e->chosen, *r = &e->rejected;
    if (c->msgs && r->msgs) {
        int64_t k = 0;
        while (k < c->n_msgs - 1 && k < r->n_msgs - 1 && !strcmp(c->msgs[k].role, r->msgs[k].role) &&
               !strcmp(c->msgs[k].content, r->msgs[k].content))
            k++;
        e->prompt.msgs = c->msgs, e->prompt.n_msgs = k;
        c->msgs += k, c->n_msgs -= k, r->msgs += k, r->n_msgs -= k;
    } else if (c->text && r->text) {
        size_t k = 0;
        while (c->text[k] && c->text[k] == r->text[k]) k++;
        if (k > 0 && c->text[k - 1] == ' ' && c->text[k] != r->text[k]) k--;
        // The prompt is a copy of the common start, made in the block by ctl__line: n_msgs carries its length there,
        // and ctl__line copies it from just before the (advanced) chosen text.
        e->prompt.text = NULL;
        e->prompt.n_msgs = (int64_t)k;   // a marker for ctl__line: the length to copy
        c->text += k, r->text += k;
    }
}

// Parses one line into e, its strings in block b. Returns false with j->err set.
static bool ctl__line(ctl__json *j, ctl__exblock *b, ctl_example *e, ctl_data_format *fmt) {
    int64_t cap = 1;
    for (size_t i = 0; i < j->n; i++) cap += j->p[i] == ':';
    const char **keys = (const char **)ctl__exb_take(b, (size_t)cap * sizeof(char *), sizeof(void *));
    const char **vals = (const char **)ctl__exb_take(b, (size_t)cap * sizeof(char *), sizeof(void *));
    bool has[6] = {false};   // text, prompt, completion, messages, chosen, rejected
    bool q = false, a = false;
    const char *raw_answer = NULL;
    // Every field is kept (keys, values: ctl_example_field and the rewards read them); the known parts are also
    // parsed into the example; a value that is not a string is kept as its JSON text. The arrays hold one field per
    // ':' in the line, an upper bound.
    if (!keys || !vals || !ctl__j_expect(j, '{')) return ctl__j_fail(j, "expected an object");
    e->keys = keys, e->values = vals, e->n_fields = 0;
    if (!ctl__j_is(j, '}')) do {
            const char *key = ctl__exb_string(j, b);
            if (!key || !ctl__j_expect(j, ':')) return false;
            ctl__j_ws(j);
            static const char *const parts[6] = {"text", "prompt", "completion", "messages", "chosen", "rejected"};
            int k = 0;
            while (k < 6 && strcmp(key, parts[k])) k++;
            size_t start = j->pos;
            // text, completion and messages all land in e->completion: a line of one format has one of them.
            ctl_part *dst[6] = {&e->completion, &e->prompt, &e->completion, &e->completion, &e->chosen, &e->rejected};
            if (k < 6) {
                if (has[k]) return ctl__j_fail(j, "a key appears twice");
                if (!ctl__exb_part(j, b, dst[k])) return false;
                if (k == 0 && !dst[k]->text) return j->pos = start, ctl__j_fail(j, "\"text\" must be a string");
                if (k == 3 && !dst[k]->msgs) return ctl__j_fail(j, "\"messages\" must be a list of messages");
                has[k] = true;
            } else if (j->pos < j->n && j->p[j->pos] == '"') {
                const char *v = ctl__exb_string(j, b);
                if (!v) return false;
                vals[e->n_fields] = v;
                if (!strcmp(key, "question")) q = true, e->prompt.text = v;
                if (!strcmp(key, "answer")) a = true, raw_answer = v;
            } else {   // any other value, kept as written
                if (!ctl__j_skip(j, 1)) return false;
                char *v = (char *)ctl__exb_take(b, j->pos - start + 1, 1);
                if (!v) return ctl__j_fail(j, "out of room");
                memcpy(v, j->p + start, j->pos - start), v[j->pos - start] = 0;
                vals[e->n_fields] = v;
            }
            // A part also as a field: its text, or "" when it is a list of messages.
            if (k < 6) vals[e->n_fields] = dst[k]->text ? dst[k]->text : "";
            keys[e->n_fields++] = key;
        } while (ctl__j_is(j, ','));
    if (!ctl__j_expect(j, '}')) return false;
    ctl__j_ws(j);
    if (j->pos != j->n) return ctl__j_fail(j, "text after the object");   // one object a line
    // The line's format from its keys. The first line fixes the dataset's (unless desc named one); every later line
    // must then have that format's keys, so a file cannot mix formats unnoticed.
    ctl_data_format f = has[4] || has[5] ? CTL_DATA_PREFERENCE : has[3] ? CTL_DATA_MESSAGES : has[0] ? CTL_DATA_TEXT
                        : has[1] && has[2] ? CTL_DATA_PROMPT_COMPLETION : has[1] ? CTL_DATA_PROMPT
                        : q && a ? CTL_DATA_GSM8K : CTL_DATA_AUTO;
    if (*fmt == CTL_DATA_AUTO) {
        if (f == CTL_DATA_AUTO) return ctl__j_fail(j, "no known keys (text, prompt, completion, messages, chosen, rejected, question)");
        *fmt = f;
    }
    static const char *const need[7] = {"", "\"text\"", "\"prompt\" and \"completion\"", "\"messages\"",
                                        "\"chosen\" and \"rejected\"", "\"prompt\"", "\"question\" and \"answer\""};
    bool ok = *fmt == CTL_DATA_TEXT ? has[0] : *fmt == CTL_DATA_PROMPT_COMPLETION ? has[1] && has[2]
              : *fmt == CTL_DATA_MESSAGES ? has[3] : *fmt == CTL_DATA_PREFERENCE ? has[4] && has[5]
              : *fmt == CTL_DATA_PROMPT ? has[1] : q && a;
    if (!ok) {
        char msg[96];
        snprintf(msg, sizeof msg, "this dataset's lines need %s", need[*fmt]);
        j->pos = 0;
        return ctl__j_fail(j, msg);
    }
    if (*fmt == CTL_DATA_PREFERENCE && !has[1]) {
        ctl__implicit_prompt(e);
        if (e->chosen.text) {   // copy the common start of the texts as the prompt
            size_t k = (size_t)e->prompt.n_msgs;
            char *p = (char *)ctl__exb_take(b, k + 1, 1);
            if (!p) return ctl__j_fail(j, "out of room");
            memcpy(p, e->chosen.text - k, k), p[k] = 0;
            e->prompt.text = p, e->prompt.n_msgs = 0;
        }
    }
    if (*fmt == CTL_DATA_PREFERENCE && (!e->chosen.text != !e->rejected.text || !e->prompt.text != !e->chosen.text))
        return j->pos = 0, ctl__j_fail(j, "prompt, chosen and rejected must all be strings or all be messages");
    if (*fmt == CTL_DATA_GSM8K) {   // the completion is the worked answer; the answer its last line's number
        e->completion.text = raw_answer;
        const char *h = ctl__last(raw_answer, strlen(raw_answer), "####", false);
        if (!h) return j->pos = 0, ctl__j_fail(j, "a GSM8K answer needs a final \"#### N\" line");
        for (h += 4; *h == ' '; h++) {}   // the answer: what follows "#### "
        e->answer = h;
    } else {
        e->answer = ctl_example_field(e, "answer");
    }
    return true;
}

// A linear search: an example has a handful of fields.
CTL_API const char *ctl_example_field(const ctl_example *e, const char *key) {
    if (!CTL__ARGS(NULL, e && key)) return NULL;
    for (int64_t i = 0; i < e->n_fields; i++)
        if (!strcmp(e->keys[i], key)) return e->values[i];
    return NULL;
}

// The lines of text (size bytes, no NUL needed); path names them in messages.
static ctl_status ctl__dataset_parse(ctl_ctx *ctx, const char *path, const char *text, size_t size, const ctl_dataset_desc *desc,
                                     ctl_dataset **out) {
    ctl_dataset_desc dd;
    memset(&dd, 0, sizeof dd);
    if (desc) dd = *desc;
    *out = NULL;
    if ((unsigned)dd.format > (unsigned)CTL_DATA_GSM8K) return ctl__fail(ctx, CTL_ERR_INVALID, "dataset: unknown format %d", (int)dd.format);
    if (size >= 3 && !memcmp(text, "\xef\xbb\xbf", 3)) text += 3, size -= 3;   // a UTF-8 byte-order mark (as Windows editors write)
    ctl_status st = CTL_OK;
    // One pass counts the lines: an upper bound on the examples, so their array is allocated once.
    int64_t lines = 1;
    for (size_t i = 0; i < size; i++) lines += text[i] == '\n';
    ctl_dataset *ds = (ctl_dataset *)ctl_alloc(ctx, sizeof(ctl_dataset));
    if (ds) memset(ds, 0, sizeof *ds);
    if (ds) ds->ex = (ctl_example *)ctl_alloc(ctx, (size_t)lines * sizeof(ctl_example));
    if (ds) ds->blocks = (void **)ctl_alloc(ctx, (size_t)lines * sizeof(void *));
    if (!ds || !ds->ex || !ds->blocks) {
        if (ds) ctl_free(ctx, ds->ex), ctl_free(ctx, ds->blocks), ctl_free(ctx, ds);
        return ctl__fail(ctx, CTL_ERR_OUT_OF_MEMORY, "dataset '%s': out of memory", path);
    }
    ds->ctx = ctx, ds->format = dd.format;
    char where[600];
    int64_t line = 0;
    for (size_t pos = 0; pos < size && !st; line++) {
        const char *nl = (const char *)memchr(text + pos, '\n', size - pos);
        size_t len = (size_t)((nl ? nl : text + size) - (text + pos)), from = pos;
        pos += len + 1;
        while (len && (text[from + len - 1] == '\r' || text[from + len - 1] == ' ')) len--;   // CRLF files, trailing spaces
        size_t lead = 0;
        while (lead < len && (text[from + lead] == ' ' || text[from + lead] == '\t')) lead++;
        if (lead == len) continue;   // blank lines are allowed
        snprintf(where, sizeof where, "dataset '%.400s' line %" PRId64, path, line + 1);
        // The block: the line's strings decoded (each no longer than its JSON) and a copied prompt (at most the line),
        // the key and value arrays (one per ':') and the message arrays (one per '{'), with slack for alignment.
        size_t colons = 0, braces = 0;
        for (size_t i = 0; i < len; i++) colons += text[from + i] == ':', braces += text[from + i] == '{';
        ctl__exblock b;
        b.cap = 2 * len + 64 + (colons + 2) * 2 * sizeof(char *) + (braces + 2) * sizeof(ctl_chat_msg), b.used = 0;
        b.p = (char *)ctl_alloc(ctx, b.cap);
        if (!b.p) {
            st = ctl__fail(ctx, CTL_ERR_OUT_OF_MEMORY, "%s: out of memory", where);
            break;
        }
        ctl__json j;
        memset(&j, 0, sizeof j);
        j.ctx = ctx, j.where = where, j.p = (const unsigned char *)text + from, j.n = len;
        ctl_example *e = &ds->ex[ds->n];
        memset(e, 0, sizeof *e);
        e->line = line + 1;   // 1-based file line, blank lines counted, for messages
        // A bad line fails the whole dataset with its file and line, or with skip_bad is dropped and counted.
        if (ctl__line(&j, &b, e, &ds->format)) {
            ds->blocks[ds->n++] = b.p;
        } else {
            ctl_free(ctx, b.p);
            if (dd.skip_bad) ds->skipped++;
            else st = j.err ? j.err : ctl__fail(ctx, CTL_ERR_FORMAT, "%s: malformed", where);
        }
    }
    if (!st && ds->n == 0) st = ctl__fail(ctx, CTL_ERR_FORMAT, "dataset '%s': no examples%s", path, ds->skipped ? " (every line was malformed)" : "");
    if (st) return ctl_dataset_close(ds), st;
    *out = ds;
    return CTL_OK;
}

// The file is read whole, parsed, and released: the dataset keeps only its own copies.
CTL_API ctl_status ctl_dataset_open(ctl_ctx *ctx, const char *path, const ctl_dataset_desc *desc, ctl_dataset **out) {
    void *data;
    size_t size;
    if (out) *out = NULL;
    if (!CTL__ARGS(ctx, ctx && path && out)) return CTL_ERR_INVALID;
    ctl_status st = ctl__read_file(ctx, "dataset", path, &data, &size);
    if (st) return st;
    st = ctl__dataset_parse(ctx, path, (const char *)data, size, desc, out);
    ctl_free(ctx, data);
    return st;
}

CTL_API ctl_status ctl_dataset_open_memory(ctl_ctx *ctx, const void *data, size_t size, const ctl_dataset_desc *desc, ctl_dataset **out) {
    if (out) *out = NULL;
    if (!CTL__ARGS(ctx, ctx && (data || size == 0) && out)) return CTL_ERR_INVALID;
    return ctl__dataset_parse(ctx, "(memory)", (const char *)data, size, desc, out);
}

CTL_API void ctl_dataset_close(ctl_dataset *ds) {
    if (!ds) return;
    for (int64_t i = 0; i < ds->n; i++) ctl_free(ds->ctx, ds->blocks[i]);
    ctl_free(ds->ctx, ds->blocks), ctl_free(ds->ctx, ds->ex), ctl_free(ds->ctx, ds);
}

CTL_API int64_t ctl_dataset_size(const ctl_dataset *ds) { return CTL__ARGS(NULL, ds) ? ds->n : 0; }
CTL_API int64_t ctl_dataset_skipped(const ctl_dataset *ds) { return CTL__ARGS(NULL, ds) ? ds->skipped : 0; }
CTL_API ctl_data_format ctl_dataset_format(const ctl_dataset *ds) { return CTL__ARGS(NULL, ds) ? ds->format : CTL_DATA_AUTO; }
CTL_API const ctl_example *ctl_dataset_get(const ctl_dataset *ds, int64_t i) {
    return CTL__ARGS(NULL, ds) && i >= 0 && i < ds->n ? &ds->ex[i] : NULL;
}

// Fisher-Yates (Durstenfeld's form) from a seeded ctl_rng, so one seed gives one order on every platform. The
// modulo's bias, below (i+1) / 2^64, is negligible for any dataset.
CTL_API void ctl_dataset_shuffle(const ctl_dataset *ds, uint64_t seed, int64_t *order) {
    if (!CTL__ARGS(ds ? ds->ctx : NULL, ds && order)) return;
    ctl_rng r;
    ctl_rng_seed(&r, seed);
    for (int64_t i = 0; i < ds->n; i++) order[i] = i;
    for (int64_t i = ds->n - 1; i > 0; i--) {
        int64_t k = (int64_t)(ctl_rng_next(&r) % (uint64_t)(i + 1)), t = order[i];
        order[i] = order[k], order[k] = t;
    }
}

CTL_API ctl_status ctl_example_encode(const ctl_example *e, const ctl_part *part, const ctl_tokenizer *tk,
                                      const ctl_chat_template *tmpl, int32_t *ids, float *mask, int64_t cap,
                                      int64_t *n) {
    if (!CTL__ARGS(tk ? tk->ctx : NULL, e && tk && ids && n)) return CTL_ERR_INVALID;
    ctl_ctx *ctx = tk->ctx;
    // Two shapes. A conversation goes through the chat template whole; plain text is [BOS] prompt completion EOS, the
    // two parts tokenised apart so no token straddles the boundary and the mask starts exactly at the completion.
    bool chat = e->prompt.msgs || (part && part->msgs);
    *n = 0;
    if (chat) {   // the whole conversation; the part's assistant turns are masked in
        if (!tmpl) return ctl__fail(ctx, CTL_ERR_INVALID, "example on line %" PRId64 ": a conversation needs a chat template", e->line);
        int64_t np = e->prompt.n_msgs, nc = part ? part->n_msgs : 0, np_tok = 0;
        ctl_chat_msg *all = (ctl_chat_msg *)ctl_alloc(ctx, (size_t)(np + nc + 1) * sizeof(ctl_chat_msg));
        if (!all) return ctl__fail(ctx, CTL_ERR_OUT_OF_MEMORY, "encode: out of memory");
        if (np) memcpy(all, e->prompt.msgs, (size_t)np * sizeof(ctl_chat_msg));
        if (nc) memcpy(all + np, part->msgs, (size_t)nc * sizeof(ctl_chat_msg));
        // With no part (a prompt to generate from), the template's generation prompt ends it and nothing is learnt.
        ctl_status st = ctl_chat_tokenize(tk, tmpl, all, np + nc, nc == 0, ids, mask, cap, n);
        // Only the part's turns count: assistant turns inside the prompt are context. Their tokens are found by
        // tokenising the prompt alone (with the generation prompt), assumed to be a prefix of the whole: true of
        // templates that render turn by turn, which the common ones do.
        if (!st && np && nc && mask) {
            int32_t *tmp = (int32_t *)ctl_alloc(ctx, (size_t)cap * sizeof(int32_t));
            st = tmp ? ctl_chat_tokenize(tk, tmpl, all, np, true, tmp, NULL, cap, &np_tok) : CTL_ERR_OUT_OF_MEMORY;
            for (int64_t i = 0; !st && i < np_tok && i < *n; i++) mask[i] = 0.0f;
            ctl_free(ctx, tmp);
        }
        if (!st && mask && !nc)
            for (int64_t i = 0; i < *n; i++) mask[i] = 0.0f;
        ctl_free(ctx, all);
        return st;
    }
    const char *ptext = e->prompt.text ? e->prompt.text : "", *ctext = part && part->text ? part->text : NULL;
    int64_t np = 0, nc = 0, at = 0;
    // Each tokenize call counts its full length even when out of room (CTL_ERR_CAPACITY), so *n and the message
    // say how many tokens the example needs.
    bool bos = ctl_tokenizer_add_bos(tk) && ctl_tokenizer_bos(tk) >= 0;
    if (bos && cap > 0) ids[0] = ctl_tokenizer_bos(tk);
    at = bos;
    // Special-token text in the data stays plain text (parse_special false): a dataset cannot inject control tokens.
    ctl_status st = ctl_tokenize(tk, ptext, strlen(ptext), false, ids + CTL__MIN(at, cap), CTL__MAX(cap - at, 0), &np);
    ctl_status st2 = CTL_OK;
    if (ctext) {
        int64_t off = CTL__MIN(at + np, cap);
        st2 = ctl_tokenize(tk, ctext, strlen(ctext), false, ids + off, CTL__MAX(cap - off, 0), &nc);
        nc += 1;   // EOS
    }
    *n = at + np + nc;
    if ((st && st != CTL_ERR_CAPACITY) || (st2 && st2 != CTL_ERR_CAPACITY)) return st ? st : st2;
    if (*n > cap) return ctl__fail(ctx, CTL_ERR_CAPACITY, "encode: line %" PRId64 " needs %" PRId64 " tokens, room for %" PRId64,
                                   e->line, *n, cap);
    // EOS ends a completion so the model learns to stop; a prompt alone gets none.
    if (ctext) ids[*n - 1] = ctl_tokenizer_eos(tk);
    for (int64_t i = 0; mask && i < *n; i++) mask[i] = i >= at + np ? 1.0f : 0.0f;
    return CTL_OK;
}

// Appends a sequence of n tokens to row b at *offset as n - 1 (token, target) pairs, positions from 0. A fresh
// row (offset 0) is first filled with pad, weight 0. The padding after the last document is numbered as one more
// document (from 0), so the row keeps ctl_train_forward_packed's position rule. False: it does not fit (or n < 2).
CTL_API bool ctl_batch_pack(int32_t *tokens, int32_t *targets, float *weights, int32_t *pos, int64_t T, int64_t b,
                            int64_t *offset, const int32_t *ids, const float *mask, int64_t n, int32_t pad) {
    if (!CTL__ARGS(NULL, tokens && targets && weights && pos && offset && (ids || n <= 0) && T >= 0 && b >= 0)) return false;
    int64_t at = *offset, len = n - 1;
    if (at == 0)
        for (int64_t t = 0; t < T; t++) tokens[b * T + t] = targets[b * T + t] = pad, weights[b * T + t] = 0.0f, pos[b * T + t] = (int32_t)t;
    if (len < 1 || at + len > T) return false;
    for (int64_t t = 0; t < len; t++) {
        int64_t r = b * T + at + t;
        tokens[r] = ids[t], targets[r] = ids[t + 1], weights[r] = mask ? mask[t + 1] : 1.0f, pos[r] = (int32_t)t;
    }
    *offset = at + len;
    for (int64_t t = at + len; t < T; t++) pos[b * T + t] = (int32_t)(t - at - len);   // the padding after it
    return true;
}

// One sequence into row b: tokens ids[t], targets ids[t+1], weight mask[t+1] (a mask is of the token predicted);
// past the sequence, pad with weight 0; a sequence longer than T + 1 is cut. Returns the weighted targets.
CTL_API int64_t ctl_batch_row(int32_t *tokens, int32_t *targets, float *weights, int64_t T, int64_t b,
                              const int32_t *ids, const float *mask, int64_t n, int32_t pad) {
    if (!CTL__ARGS(NULL, tokens && targets && weights && (ids || n <= 0) && T >= 0 && b >= 0)) return 0;
    int64_t count = 0;
    for (int64_t t = 0; t < T; t++) {
        bool in = t + 1 < n;
        tokens[b * T + t] = t < n ? ids[t] : pad;
        targets[b * T + t] = in ? ids[t + 1] : pad;
        weights[b * T + t] = in && mask ? mask[t + 1] : in ? 1.0f : 0.0f;
        count += weights[b * T + t] != 0.0f;
    }
    return count;
}

// >>impl:loops ==================================================================================

// An example as the batcher feeds it. With a chat template and text_as_chat, a text prompt becomes a user turn
// (after an optional system turn) and a text part the assistant's reply, so a plain-text dataset trains in the
// chat format the model will be prompted in; otherwise as ctl_example_encode.
CTL_API ctl_status ctl_example_tokens(const ctl_example *e, const ctl_part *part, const ctl_encoding *enc, int32_t *ids,
                                      float *mask, int64_t cap, int64_t *n) {
    if (!CTL__ARGS(NULL, e && enc && enc->tokenizer && ids && n)) return CTL_ERR_INVALID;
    const ctl_tokenizer *tk = enc->tokenizer;
    bool as_chat = enc->chat && enc->text_as_chat && !e->prompt.msgs;
    ctl_chat_msg msgs[3];   // system, user, assistant
    int k = 0;
    if (as_chat && (!part || part->text)) {   // text asked (and answered) as chat turns
        if (enc->system) msgs[k].role = "system", msgs[k++].content = enc->system;
        msgs[k].role = "user", msgs[k++].content = e->prompt.text ? e->prompt.text : "";
        if (!part) {
            ctl_status st = ctl_chat_tokenize(tk, enc->chat, msgs, k, true, ids, NULL, cap, n);
            for (int64_t i = 0; !st && mask && i < *n; i++) mask[i] = 0.0f;
            return st;
        }
        msgs[k].role = "assistant", msgs[k].content = part->text;
        // The wrapped turns as a conversational example, so ctl_example_encode masks exactly the reply.
        ctl_example chat = *e;
        ctl_part reply;
        chat.prompt.text = NULL, chat.prompt.msgs = msgs, chat.prompt.n_msgs = k;
        reply.text = NULL, reply.msgs = msgs + k, reply.n_msgs = 1;
        return ctl_example_encode(&chat, &reply, tk, enc->chat, ids, mask, cap, n);
    }
    if (!part && mask == NULL) {   // ctl_example_encode writes a mask: lend it one
        float *tmp = (float *)ctl_alloc(tk->ctx, (size_t)CTL__MAX(cap, (int64_t)1) * sizeof(float));
        if (!tmp) return ctl__fail(tk->ctx, CTL_ERR_OUT_OF_MEMORY, "example_tokens: out of memory");
        ctl_status st = ctl_example_encode(e, NULL, tk, enc->chat, ids, tmp, cap, n);
        ctl_free(tk->ctx, tmp);
        return st;
    }
    return ctl_example_encode(e, part, tk, enc->chat, ids, mask, cap, n);
}

// ---- batches from a dataset -------------------------------------------------------------------

// Hands out a step's rows. Each pass walks the dataset in an order shuffled from (seed, pass), so (epoch,
// position) is the whole iteration state: ctl_batcher_tell and _seek save and restore it exactly. Preference rows
// come as 2 * batch rows a micro-batch: chosen in rows 0..batch-1, rejected in batch..2*batch-1 (pair r is rows
// r and batch + r).
struct ctl_batcher {
    ctl_ctx *ctx;
    const ctl_dataset *ds;
    ctl_batcher_desc d;
    // n examples; the pass; the next index into order; examples skipped; rows per micro-batch; ids' capacity.
    int64_t n, epoch, position, skipped, rows, cap;
    int64_t *order;
    int32_t *ids, *tok, *tgt, *pos, *ptok;   // ids/mask: one encoded sequence (cap); ptok: (batch, seq_len) prompts
    float *mask, *w;
    ctl_rl_prompt *prompts;
    bool pending;                            // packing: ids holds an example that did not fit the last row
    int64_t pending_n;
};

CTL_API void ctl_batcher_free(ctl_batcher *b) {
    if (!b) return;
    ctl_ctx *ctx = b->ctx;
    ctl_free(ctx, b->order), ctl_free(ctx, b->ids), ctl_free(ctx, b->mask), ctl_free(ctx, b->tok), ctl_free(ctx, b->tgt);
    ctl_free(ctx, b->w), ctl_free(ctx, b->pos), ctl_free(ctx, b->ptok), ctl_free(ctx, b->prompts), ctl_free(ctx, b);
}

CTL_API ctl_status ctl_batcher_init(const ctl_dataset *ds, const ctl_batcher_desc *desc, ctl_batcher **out) {
    if (out) *out = NULL;
    if (!CTL__ARGS(ds ? ds->ctx : NULL, ds && desc && out)) return CTL_ERR_INVALID;
    ctl_ctx *ctx = ds->ctx;
    ctl_batcher_desc d = *desc;
    d.accum = d.accum ? d.accum : 1;
    if (!d.encoding.tokenizer) return ctl__fail(ctx, CTL_ERR_INVALID, "batcher: encoding.tokenizer is required");
    if ((unsigned)d.kind > CTL_ROWS_PROMPTS || d.batch < 1 || d.accum < 1 || d.seq_len < 2 || d.max_new < 0 ||
        d.seq_len > (int64_t)1 << 24 || d.batch > (int64_t)1 << 20 || d.accum > (int64_t)1 << 20 ||
        (d.kind == CTL_ROWS_PROMPTS && d.max_new >= d.seq_len) || (d.packing && d.kind != CTL_ROWS_SFT))
        return ctl__fail(ctx, CTL_ERR_INVALID, "batcher: kind %d, batch %" PRId64 ", accum %" PRId64 ", seq_len %" PRId64
                         ", max_new %" PRId64 "%s: batch and accum must be positive, seq_len at least 2 and above max_new, packing only for SFT",
                         (int)d.kind, d.batch, d.accum, d.seq_len, d.max_new, d.packing ? ", packing" : "");
    double step_tokens = (double)d.accum * (double)(d.kind == CTL_ROWS_PREFERENCE ? 2 * d.batch : d.batch) * (double)d.seq_len;
    if (step_tokens > 1099511627776.0)   // 2^40 (each bound alone allows a product past int64_t)
        return ctl__fail(ctx, CTL_ERR_INVALID, "batcher: a step of %.3g tokens (accum x rows x seq_len) is more than 2^40", step_tokens);
    if (ctl_dataset_size(ds) < 1) return ctl__fail(ctx, CTL_ERR_INVALID, "batcher: the dataset has no examples");
    if (d.kind == CTL_ROWS_PREFERENCE && ctl_dataset_format(ds) != CTL_DATA_PREFERENCE)
        return ctl__fail(ctx, CTL_ERR_INVALID, "batcher: preference rows need preference data (prompt, chosen, rejected)");
    ctl_batcher *b = (ctl_batcher *)ctl_alloc(ctx, sizeof *b);
    if (!b) return ctl__fail(ctx, CTL_ERR_OUT_OF_MEMORY, "batcher: out of memory");
    memset(b, 0, sizeof *b);
    // ids holds up to 4 * seq_len + 64 tokens, so an example longer than a row still encodes whole before it is cut;
    // a longer one is skipped even without drop_long (a limit of this buffer).
    b->ctx = ctx, b->ds = ds, b->d = d, b->n = ctl_dataset_size(ds), b->cap = 4 * d.seq_len + 64;
    b->rows = d.kind == CTL_ROWS_PREFERENCE ? 2 * d.batch : d.batch;
    // Token, target and weight arrays for a whole step's micro-batches (accum * rows, seq_len), reused every call.
    size_t N = (size_t)(d.accum * b->rows * d.seq_len);
    b->order = (int64_t *)ctl_alloc(ctx, (size_t)b->n * sizeof(int64_t));
    b->ids = (int32_t *)ctl_alloc(ctx, (size_t)b->cap * sizeof(int32_t));
    b->mask = (float *)ctl_alloc(ctx, (size_t)b->cap * sizeof(float));
    bool ok = b->order && b->ids && b->mask;
    if (d.kind == CTL_ROWS_PROMPTS) {
        b->ptok = (int32_t *)ctl_alloc(ctx, (size_t)(d.batch * d.seq_len) * sizeof(int32_t));
        b->prompts = (ctl_rl_prompt *)ctl_alloc(ctx, (size_t)d.batch * sizeof(ctl_rl_prompt));
        ok = ok && b->ptok && b->prompts;
    } else {
        b->tok = (int32_t *)ctl_alloc(ctx, N * sizeof(int32_t)), b->tgt = (int32_t *)ctl_alloc(ctx, N * sizeof(int32_t));
        b->w = (float *)ctl_alloc(ctx, N * sizeof(float));
        b->pos = d.packing ? (int32_t *)ctl_alloc(ctx, N * sizeof(int32_t)) : NULL;
        ok = ok && b->tok && b->tgt && b->w && (b->pos || !d.packing);
    }
    if (!ok) {
        ctl_batcher_free(b);
        return ctl__fail(ctx, CTL_ERR_OUT_OF_MEMORY, "batcher: out of memory for %" PRId64 " rows of %" PRId64, d.accum * b->rows, d.seq_len);
    }
    // Pass e's order comes from seed * 1000003 + e: passes differ, and two seeds share an order only a million
    // passes apart.
    ctl_dataset_shuffle(ds, d.seed * 1000003u, b->order);
    *out = b;
    return CTL_OK;
}

CTL_API void ctl_batcher_tell(const ctl_batcher *b, int64_t *epoch, int64_t *position) {
    bool ok = CTL__ARGS(NULL, b);
    if (epoch) *epoch = ok ? b->epoch : 0;
    if (position) *position = ok ? b->position : 0;
}

// Restores a place saved by ctl_batcher_tell (in a checkpoint's ctl_run_state): the pass's order is recomputed
// from the seed. ctl_batcher_next never leaves an example pending between calls; pending is cleared for safety.
CTL_API ctl_status ctl_batcher_seek(ctl_batcher *b, int64_t epoch, int64_t position) {
    if (!CTL__ARGS(NULL, b)) return CTL_ERR_INVALID;
    if (epoch < 0 || position < 0 || position > b->n)
        return ctl__fail(b->ctx, CTL_ERR_RANGE, "batcher_seek: pass %" PRId64 ", position %" PRId64 " (0..%" PRId64 ")", epoch, position, b->n);
    b->epoch = epoch, b->position = position, b->pending = false;
    ctl_dataset_shuffle(b->ds, b->d.seed * 1000003u + (uint64_t)epoch, b->order);
    return CTL_OK;
}

CTL_API int64_t ctl_batcher_skipped(const ctl_batcher *b) { return CTL__ARGS(NULL, b) ? b->skipped : 0; }

// The next example in this pass's order (a new pass, newly shuffled, after the last).
static const ctl_example *ctl__batcher_take(ctl_batcher *b) {
    if (b->position >= b->n) {
        b->position = 0, b->epoch++;
        ctl_dataset_shuffle(b->ds, b->d.seed * 1000003u + (uint64_t)b->epoch, b->order);
    }
    return ctl_dataset_get(b->ds, b->order[b->position++]);
}

// The failure just recorded, prefixed with the line of the example it came from. The old
// message is copied out first: it cannot be an argument of the vsnprintf that overwrites it.
static ctl_status ctl__batcher_fail_at(ctl_batcher *b, ctl_status st, const ctl_example *e) {
    char why[sizeof b->ctx->err];
    snprintf(why, sizeof why, "%s", b->ctx->err);
    return ctl__fail(b->ctx, st, "batcher: line %" PRId64 ": %s", e->line, why);
}

// Example e with `part` into b->ids / b->mask: its length (at most seq_len + 1, the rest cut
// off), 0 when it is skipped (too long for ids; too long for a row with drop_long; no weighted target left
// within the row), -1 on an error (the message set).
static int64_t ctl__batcher_encode(ctl_batcher *b, const ctl_example *e, const ctl_part *part) {
    int64_t n, T = b->d.seq_len;
    ctl_status st = ctl_example_tokens(e, part, &b->d.encoding, b->ids, b->mask, b->cap, &n);
    if (st == CTL_ERR_CAPACITY) return b->skipped++, 0;
    if (st) return ctl__batcher_fail_at(b, st, e), -1;
    if (n > T + 1 && b->d.drop_long) return b->skipped++, 0;
    n = CTL__MIN(n, T + 1);
    double kept = 0.0;
    for (int64_t i = 1; i < n; i++) kept += b->mask[i];
    if (kept <= 0.0) return b->skipped++, 0;   // its completion starts past the cut
    return n;
}

// A whole pass met nothing usable: stop rather than loop for ever.
static ctl_status ctl__batcher_nothing(ctl_batcher *b, const char *what) {
    return ctl__fail(b->ctx, CTL_ERR_INVALID, "batcher: no example of the %" PRId64 " fits %s (seq_len %" PRId64 "%s%s); %" PRId64 " skipped so far",
                     b->n, what, b->d.seq_len, b->d.kind == CTL_ROWS_PROMPTS ? ", less max_new" : "", b->d.drop_long ? ", drop_long" : "",
                     b->skipped);
}

// PROMPTS rows: batch prompts for generation, each encoded with the generation prompt into its own seq_len slot
// of ptok, at most seq_len - max_new tokens so the completion fits after it; one that does not fit is skipped.
static ctl_status ctl__batcher_prompts(ctl_batcher *b, ctl_rows *out) {
    int64_t T = b->d.seq_len, room = T - b->d.max_new;
    for (int64_t p = 0; p < b->d.batch; p++) {
        int64_t n = 0;
        const ctl_example *e = NULL;
        for (int64_t tries = 0;; tries++) {
            if (tries >= b->n) return ctl__batcher_nothing(b, "as a prompt");
            e = ctl__batcher_take(b);
            int32_t *ids = b->ptok + p * T;
            ctl_status st = ctl_example_tokens(e, NULL, &b->d.encoding, ids, NULL, room, &n);
            if (!st && n >= 1) break;
            if (st && st != CTL_ERR_CAPACITY) return ctl__batcher_fail_at(b, st, e);
            b->skipped++;
        }
        b->prompts[p].tokens = b->ptok + p * T, b->prompts[p].n = n, b->prompts[p].example = e;
    }
    out->prompts = b->prompts, out->n_prompts = b->d.batch, out->examples = b->d.batch;
    return CTL_OK;
}

CTL_API ctl_status ctl_batcher_next(ctl_batcher *b, ctl_rows *out) {
    if (!CTL__ARGS(b ? b->ctx : NULL, b && out)) return CTL_ERR_INVALID;
    memset(out, 0, sizeof *out);
    if (b->d.kind == CTL_ROWS_PROMPTS) return ctl__batcher_prompts(b, out);
    // out->examples counts the examples read (skipped ones included); out->tokens the weighted targets, the SFT
    // normaliser's step_tokens.
    int64_t T = b->d.seq_len, B = b->d.batch, R = b->rows, A = b->d.accum;
    // Padding carries weight 0, so any valid id serves; EOS is one every tokenizer has.
    int32_t pad = ctl_tokenizer_eos(b->d.encoding.tokenizer);
    bool pref = b->d.kind == CTL_ROWS_PREFERENCE;
    for (int64_t mb = 0; mb < A; mb++) {
        // Micro-batch mb is rows [mb*R, (mb+1)*R) of the step's arrays.
        int64_t base = mb * R * T;
        int32_t *tok = b->tok + base, *tgt = b->tgt + base, *pos = b->pos ? b->pos + base : NULL;
        float *w = b->w + base;
        for (int64_t r = 0; r < B; r++) {
            if (b->d.packing) {   // as many examples as fit; one that does not waits for the next row
                int64_t off = 0, misses = 0;
                for (;;) {
                    if (!b->pending) {
                        if (misses >= b->n) return ctl__batcher_nothing(b, "in a row");
                        const ctl_example *e = ctl__batcher_take(b);
                        int64_t n = ctl__batcher_encode(b, e, &e->completion);
                        if (n < 0) return CTL_ERR_INVALID;
                        out->examples++;
                        if (n == 0) { misses++; continue; }
                        b->pending = true, b->pending_n = n;
                    }
                    if (!ctl_batch_pack(tok, tgt, w, pos, T, r, &off, b->ids, b->mask, b->pending_n, pad)) {
                        if (off > 0) break;   // the row is full: the example waits for the next row
                        b->pending = false;   // cannot happen once encoded (n >= 2), but never loop on it
                        continue;
                    }
                    b->pending = false, misses = 0;
                    for (int64_t i = 1; i < b->pending_n; i++) out->tokens += b->mask[i];   // the weighted targets it brought
                }
                continue;
            }
            // One example a row (a pair of rows for preference data); misses stops an endless search through a dataset
            // where nothing fits.
            for (int64_t misses = 0;; misses++) {   // the next example that fits
                if (misses >= b->n) return ctl__batcher_nothing(b, pref ? "as a pair of rows" : "in a row");
                const ctl_example *e = ctl__batcher_take(b);
                out->examples++;
                int64_t n = ctl__batcher_encode(b, e, pref ? &e->chosen : &e->completion), n2 = 0;
                if (n < 0) return CTL_ERR_INVALID;
                if (n == 0) continue;
                // A pair whose rejected side is skipped is skipped whole: the next example's chosen row overwrites this one.
                double c = (double)ctl_batch_row(tok, tgt, w, T, r, b->ids, b->mask, n, pad);
                if (pref) {
                    if ((n2 = ctl__batcher_encode(b, e, &e->rejected)) < 0) return CTL_ERR_INVALID;
                    if (n2 == 0) continue;
                    c += (double)ctl_batch_row(tok, tgt, w, T, B + r, b->ids, b->mask, n2, pad);
                }
                out->tokens += c;
                break;
            }
        }
    }
    // The example read ahead that did not fit starts the next call (the same bits as reading it then).
    if (b->pending) b->position--, b->pending = false, out->examples--;
    ctl_batch bt = {A * R, T, b->tok, b->tgt, b->w};   // the whole step; callers cut it into micro-batches of R rows
    out->batch = bt, out->rows = R, out->pos = b->pos;
    return CTL_OK;
}

// ---- an SFT or DPO step ------------------------------------------------------------------------

// The reference's log-probs of batch bt into ref: ref_t's forward, or this model with its
// adapters off.
static ctl_status ctl__reference(ctl_train *t, ctl_train *ref_t, const ctl_batch *bt, float *ref) {
    if (!ref_t) return ctl_train_reference(t, bt, ref);
    ctl_status st = ctl_train_forward(ref_t, bt);
    if (!st) memcpy(ref, ctl_train_logprobs(ref_t), (size_t)(bt->B * bt->T) * sizeof(float));
    return st;
}

// One optimiser step of SFT or DPO from the batcher: accum micro-batches, each forward -> objective -> backward,
// then one ctl_train_step. The objectives divide by the whole step's size (accum, step_tokens), so the summed
// gradient is the step's mean and the split into micro-batches changes the update only by rounding.
CTL_API ctl_status ctl_train_batches(ctl_train *t, ctl_batcher *b, const ctl_step_desc *d, ctl_step_out *out) {
    if (!CTL__ARGS(t ? t->ctx : b ? b->ctx : NULL, t && b && out)) return CTL_ERR_INVALID;
    ctl_ctx *ctx = t->ctx;
    memset(out, 0, sizeof *out);
    const ctl_dpo_desc *dpo = d ? d->dpo : NULL;
    if (b->d.kind != (dpo ? CTL_ROWS_PREFERENCE : CTL_ROWS_SFT))
        return ctl__fail(ctx, CTL_ERR_INVALID, "train_batches: %s needs a batcher of %s rows", dpo ? "DPO" : "SFT", dpo ? "PREFERENCE" : "SFT");
    ctl_rows rows;
    ctl_status st = ctl_batcher_next(b, &rows);
    if (st) return st;
    if (!(rows.tokens > 0))   // (the batcher's rules keep this from happening; rows made otherwise may not)
        return ctl__fail(ctx, CTL_ERR_INVALID, "train_batches: the step's rows hold no completion token: nothing to learn from");
    int64_t A = b->d.accum, R = rows.rows, T = rows.batch.T;
    // A reference forward unless the loss has no reference (SimPO, ORPO) or the caller gave its log-probs (ref_seq).
    // ref: one micro-batch's (R, T), allocated per step.
    bool reference = dpo && dpo->loss != CTL_DPO_SIMPO && dpo->loss != CTL_DPO_ORPO && dpo->ref_seq == NULL;
    float *ref = reference ? (float *)ctl_alloc(ctx, (size_t)(R * T) * sizeof(float)) : NULL;
    if (reference && !ref) return ctl__fail(ctx, CTL_ERR_OUT_OF_MEMORY, "train_batches: out of memory");
    out->tokens = rows.tokens;
    for (int64_t mb = 0; !st && mb < A; mb++) {
        int64_t base = mb * R * T;
        ctl_batch bt = {R, T, rows.batch.tokens + base, rows.batch.targets + base, rows.batch.weights + base};
        ctl_logprobs in = {R, T, NULL, bt.weights, NULL, NULL, NULL};
        // The reference first: without a reference trainer it runs on t itself and overwrites the activations the
        // policy's backward needs.
        if (reference) st = ctl__reference(t, d->reference, &bt, ref), in.ref_logp = ref;
        if (!st) st = ctl_train_forward_packed(t, &bt, rows.pos ? rows.pos + base : NULL);
        in.logp = ctl_train_logprobs(t), in.entropy = ctl_train_entropy(t), out->metrics.dlogp = ctl_train_dlogprobs(t);
        if (!st && dpo) {
            ctl_dpo_desc dd = *dpo;
            dd.accum = A, dd.targets = bt.targets;
            st = ctl_objective_dpo(ctx, &in, &dd, &out->metrics);
        } else if (!st) {
            ctl_sft_desc sd;
            memset(&sd, 0, sizeof sd);
            if (d && d->sft) sd = *d->sft;
            sd.accum = A, sd.step_tokens = rows.tokens;
            st = ctl_objective_sft(ctx, &in, &sd, &out->metrics);
        }
        if (!st) st = ctl_train_backward(t);
        if (!st) out->loss += out->metrics.loss;
    }
    ctl_free(ctx, ref);
    if (!st) st = ctl_train_step(t, &out->stats);
    else ctl_train_discard(t);   // a failed micro-batch: no partial step
    out->metrics.dlogp = NULL;
    return st;
}

// ---- online RL ----------------------------------------------------------------------------------

// Online RL: a generator on the trainer's own model (rollouts always sample the current policy), one
// generation's rollouts, rewards and advantages, and its rows cut to their used length Tu for the updates.
struct ctl_rl {
    ctl_ctx *ctx;
    ctl_train *t;
    ctl_rl_desc d;
    ctl_infer *inf;
    int64_t P, G, B, iter, iters, Tu, n;   // prompts, group, micro-batch rows; iteration; row length; rows
    ctl_rollout ro;
    ctl_reward_input *ri;
    float *rewards, *row_reward, *adv, *old, *ref, *w, *rw;   // (P*G, n_rewards), (P*G) x 3, (P*G, Tu) x 3
    int32_t *tok, *tgt, *rtok, *rtgt;                            // the rows at Tu; rtok/rtgt: DPO and RFT's picks
    const int32_t **pp;
    int64_t *pl, *chosen, *rejected;                             // (P) prompts' lengths; DPO's pairs
    int64_t *order, *used;                                       // (P*G) GRPO's rows by used length, and those lengths
    float *mb_adv, *mb_reward;                                   // (B) a micro-batch's advantages and rewards, in its rows' order
    uint8_t *mb_truncated;                                       // (B) and which of its rows were truncated
    ctl_objective_out gen;                                       // the generation's metrics
    bool have;                                                   // a generation to learn from
};

CTL_API void ctl_rl_free(ctl_rl *rl) {
    if (!rl) return;
    ctl_ctx *ctx = rl->ctx;
    ctl_infer_free(rl->inf);
    ctl_rollout_free(ctx, &rl->ro);
    void *bufs[] = {rl->ri, rl->rewards, rl->row_reward, rl->adv, rl->old, rl->ref, rl->w, rl->rw, rl->tok, rl->tgt, rl->rtok, rl->rtgt,
                    (void *)rl->pp, rl->pl, rl->chosen, rl->rejected, rl->order, rl->used, rl->mb_adv, rl->mb_reward, rl->mb_truncated};
    for (size_t i = 0; i < sizeof bufs / sizeof *bufs; i++) ctl_free(ctx, bufs[i]);
    ctl_free(ctx, rl);
}

CTL_API ctl_rl_desc ctl_rl_desc_default(void) {
    ctl_rl_desc d;
    memset(&d, 0, sizeof d);
    d.prompts = 1, d.group = 8, d.max_new = 256, d.sampler.temperature = 1.0f;
    d.dpo = ctl_dpo_desc_default();
    return d;
}

CTL_API ctl_status ctl_rl_init(ctl_train *t, const ctl_rl_desc *desc, ctl_rl **out) {
    if (out) *out = NULL;
    if (!CTL__ARGS(t ? t->ctx : NULL, t && desc && out)) return CTL_ERR_INVALID;
    ctl_ctx *ctx = t->ctx;
    ctl_rl_desc d = *desc;
    int64_t P = d.prompts, G = d.group, T = t->T, n = P * G;
    // Defaults: one update per generation; a row is correct when its weighted reward reaches 1.
    d.iterations = d.iterations ? d.iterations : 1;
    d.accept = d.accept != 0.0f ? d.accept : 1.0f;
    // max_new < T: a prompt needs at least one token of the row; each prompt's own length is checked per generation.
    if ((unsigned)d.method > CTL_RL_RFT || P < 1 || G < 1 || P > (int64_t)1 << 16 || G > (int64_t)1 << 16 || d.max_new < 1 ||
        d.max_new >= T || d.batch < 0 || d.iterations < 1 || d.n_rewards < 1 || !d.rewards || !(d.accept == d.accept))
        return ctl__fail(ctx, CTL_ERR_INVALID, "rl_init: method %d, %" PRId64 " prompts x %" PRId64 ", max_new %" PRId64 " (below the trainer's seq_len %" PRId64
                         "), batch %" PRId64 ", iterations %" PRId64 ", %" PRId64 " reward functions: each must be positive (batch may be 0) and a reward given",
                         (int)d.method, P, G, d.max_new, T, d.batch, d.iterations, d.n_rewards);
    if (d.method == CTL_RL_GRPO && G < 2) return ctl__fail(ctx, CTL_ERR_INVALID, "rl_init: GRPO compares a prompt's completions: group must be at least 2");
    // Micro-batch rows: by default the whole generation at once (DPO: one pair per prompt). GRPO cuts the generation
    // into n / B micro-batches of whole rows, so B must divide it.
    int64_t B = d.batch ? d.batch : d.method == CTL_RL_DPO ? 2 * P : n;
    if (d.method == CTL_RL_DPO && B % 2) return ctl__fail(ctx, CTL_ERR_INVALID, "rl_init: DPO's batch holds pairs: %" PRId64 " rows is odd", B);
    if (d.method == CTL_RL_GRPO && n % B)
        return ctl__fail(ctx, CTL_ERR_INVALID, "rl_init: prompts x group (%" PRId64 ") must be a multiple of batch (%" PRId64 ")", n, B);
    // A micro-batch must fit the trainer's planned batch, and the reference trainer's when there is one.
    if (B > t->B || (d.reference && (B > d.reference->B || T > d.reference->T)))
        return ctl__fail(ctx, CTL_ERR_CAPACITY, "rl_init: micro-batches of %" PRId64 " rows do not fit the trainer's batch of %" PRId64 "%s", B, t->B,
                         d.reference ? " (or the reference's)" : "");
    for (int64_t k = 0; k < d.n_rewards; k++)
        if (!d.rewards[k].fn && !d.rewards[k].batch) return ctl__fail(ctx, CTL_ERR_INVALID, "rl_init: reward function %" PRId64 " has no function", k);
    // Without a reference trainer the reference is the model with its adapters off (ctl_train_reference), which a
    // model without adapters does not have.
    if ((d.method == CTL_RL_DPO || (d.method == CTL_RL_GRPO && d.grpo.beta > 0.0f)) && !d.reference &&
        (t->m->n_adapters == 0 || t->m->merged))
        return ctl__fail(ctx, CTL_ERR_INVALID, "rl_init: %s needs a reference: give desc.reference (a trainer of the initial model), or train adapters "
                         "(their base is the reference)", d.method == CTL_RL_DPO ? "DPO" : "the KL term (grpo.beta > 0)");
    // The trainers' log-probs at the sampling temperature, as TRL's GRPO computes them, so the ratios and the KL
    // compare the distribution that was sampled; RFT is plain SFT at 1. This stays set on the trainers after ctl_rl.
    float temp = d.method != CTL_RL_RFT && d.sampler.temperature > 0.0f ? d.sampler.temperature : 1.0f;
    ctl_status st = ctl_train_set_temperature(t, temp);
    if (!st && d.reference) st = ctl_train_set_temperature(d.reference, temp);
    if (st) return st;
    ctl_rl *rl = (ctl_rl *)ctl_alloc(ctx, sizeof *rl);
    if (!rl) return ctl__fail(ctx, CTL_ERR_OUT_OF_MEMORY, "rl_init: out of memory");
    memset(rl, 0, sizeof *rl);
    rl->ctx = ctx, rl->t = t, rl->d = d, rl->P = P, rl->G = G, rl->B = B;
    ctl_infer_desc id = {n, T};   // a prompt and max_new tokens fit in T (ctl_rollout_run checks)
    if ((st = ctl_infer_init(t->m, &id, &rl->inf))) return ctl_rl_free(rl), st;
    // Every row array at the trainer's full T; each generation uses the first Tu columns' worth of each.
    size_t N = (size_t)(n * T), F = sizeof(float), I = sizeof(int32_t);
    rl->ri = (ctl_reward_input *)ctl_alloc(ctx, (size_t)n * sizeof(ctl_reward_input));
    rl->rewards = (float *)ctl_alloc(ctx, (size_t)(n * d.n_rewards) * F);
    rl->row_reward = (float *)ctl_alloc(ctx, (size_t)n * F), rl->adv = (float *)ctl_alloc(ctx, (size_t)n * F);
    rl->old = (float *)ctl_alloc(ctx, N * F), rl->ref = (float *)ctl_alloc(ctx, N * F), rl->w = (float *)ctl_alloc(ctx, N * F);
    rl->rw = (float *)ctl_alloc(ctx, N * F), rl->tok = (int32_t *)ctl_alloc(ctx, N * I), rl->tgt = (int32_t *)ctl_alloc(ctx, N * I);
    rl->rtok = (int32_t *)ctl_alloc(ctx, N * I), rl->rtgt = (int32_t *)ctl_alloc(ctx, N * I);
    rl->pp = (const int32_t **)ctl_alloc(ctx, (size_t)P * sizeof(int32_t *)), rl->pl = (int64_t *)ctl_alloc(ctx, (size_t)P * sizeof(int64_t));
    rl->chosen = (int64_t *)ctl_alloc(ctx, (size_t)P * sizeof(int64_t)), rl->rejected = (int64_t *)ctl_alloc(ctx, (size_t)P * sizeof(int64_t));
    rl->order = (int64_t *)ctl_alloc(ctx, (size_t)n * sizeof(int64_t)), rl->used = (int64_t *)ctl_alloc(ctx, (size_t)n * sizeof(int64_t));
    rl->mb_adv = (float *)ctl_alloc(ctx, (size_t)B * F), rl->mb_reward = (float *)ctl_alloc(ctx, (size_t)B * F);
    rl->mb_truncated = (uint8_t *)ctl_alloc(ctx, (size_t)B);
    if (!rl->ri || !rl->rewards || !rl->row_reward || !rl->adv || !rl->old || !rl->ref || !rl->w || !rl->rw || !rl->tok || !rl->tgt ||
        !rl->rtok || !rl->rtgt || !rl->pp || !rl->pl || !rl->chosen || !rl->rejected || !rl->order || !rl->used || !rl->mb_adv ||
        !rl->mb_reward || !rl->mb_truncated) {
        ctl_rl_free(rl);
        return ctl__fail(ctx, CTL_ERR_OUT_OF_MEMORY, "rl_init: out of memory for %" PRId64 " rows of %" PRId64, n, T);
    }
    *out = rl;
    return CTL_OK;
}

CTL_API const ctl_rollout *ctl_rl_rollout(const ctl_rl *rl) { return CTL__ARGS(NULL, rl) && rl->have ? &rl->ro : NULL; }
CTL_API const float *ctl_rl_rewards(const ctl_rl *rl) { return CTL__ARGS(NULL, rl) && rl->have ? rl->rewards : NULL; }

// Scores every completion with every function into rl->rewards (n, k): callbacks row by row,
// batch functions at once.
static ctl_status ctl__rl_score(ctl_rl *rl) {
    int64_t n = rl->n, k = rl->d.n_rewards;
    for (int64_t j = 0; j < k; j++) {
        const ctl_reward_func *f = &rl->d.rewards[j];
        if (f->batch) {
            for (int64_t i = 0; i < n; i++) rl->rewards[i * k + j] = NAN;
            // A batch function's message is copied out of ctx->err before ctl__fail formats the new one over it.
            rl->ctx->err[0] = 0;
            ctl_status st = f->batch(rl->ctx, rl->ri, n, rl->rewards + j, k, f->user);
            if (st) {
                char why[sizeof rl->ctx->err];
                memcpy(why, rl->ctx->err, sizeof why);
                return ctl__fail(rl->ctx, st, "rl: reward '%s' failed: %s", f->name ? f->name : "?", why[0] ? why : ctl_status_str(st));
            }
        } else {
            for (int64_t i = 0; i < n; i++) rl->rewards[i * k + j] = f->fn(&rl->ri[i], f->user);
        }
    }
    return CTL_OK;
}

// One generation: G samples of each prompt (from seed), every reward function on each, advantages within each
// group, and the rows for the updates. The updates that follow (ctl_rl_update) all learn from this generation.
CTL_API ctl_status ctl_rl_generate(ctl_rl *rl, const ctl_rl_prompt *prompts, int64_t n_prompts, uint64_t seed, ctl_objective_out *metrics) {
    if (!CTL__ARGS(NULL, rl)) return CTL_ERR_INVALID;
    ctl_ctx *ctx = rl->ctx;
    int64_t G = rl->G, T = rl->t->T, k = rl->d.n_rewards;
    rl->have = false;   // until this generation is complete
    if (!prompts || n_prompts < 1 || n_prompts > rl->P)
        return ctl__fail(ctx, CTL_ERR_INVALID, "rl_generate: %" PRId64 " prompts (1..%" PRId64 ")", n_prompts, rl->P);
    for (int64_t p = 0; p < n_prompts; p++) {
        if (!prompts[p].tokens || prompts[p].n < 1)
            return ctl__fail(ctx, CTL_ERR_INVALID, "rl_generate: prompt %" PRId64 " is empty", p);
        rl->pp[p] = prompts[p].tokens, rl->pl[p] = prompts[p].n;
    }
    int64_t n = n_prompts * G;
    if (rl->d.method == CTL_RL_GRPO && n % rl->B)
        return ctl__fail(ctx, CTL_ERR_INVALID, "rl_generate: %" PRId64 " prompts x %" PRId64 " is not a multiple of batch %" PRId64, n_prompts, G, rl->B);
    ctl_sampler_desc sd = rl->d.sampler;
    sd.seed = seed;
    ctl_rollout_free(ctx, &rl->ro);
    ctl_status st = ctl_rollout_run(rl->inf, rl->d.tokenizer, rl->pp, rl->pl, n_prompts, G, &sd, rl->d.max_new, T, &rl->ro);
    if (st) return st;
    rl->n = n;
    // The rewards' view of each completion.
    double len_sum = 0.0, term_sum = 0.0, len_min = INFINITY, len_max = 0.0, clipped = 0.0;
    for (int64_t i = 0; i < n; i++) {
        const ctl_rl_prompt *pr = &prompts[i / G];
        ctl_reward_input *in = &rl->ri[i];
        memset(in, 0, sizeof *in);
        in->prompt = pr->example && pr->example->prompt.text ? pr->example->prompt.text : NULL;
        // Without a tokenizer the completion's text is empty: token-level rewards still see in->tokens.
        in->completion = rl->ro.text && rl->ro.text[i] ? rl->ro.text[i] : "";
        in->completion_len = strlen(in->completion);
        in->n_tokens = rl->ro.completion_len[i], in->truncated = rl->ro.truncated[i], in->example = pr->example;
        in->tokens = rl->ro.completion + i * rl->d.max_new, in->prompt_index = i / G;
        double len = (double)in->n_tokens;
        len_sum += len, len_min = CTL__MIN(len_min, len), len_max = CTL__MAX(len_max, len), clipped += in->truncated;
        if (!in->truncated) term_sum += len;
    }
    if ((st = ctl__rl_score(rl))) return st;
    const char *names[CTL_MAX_METRICS / 2];
    float weights[CTL_MAX_METRICS / 2];
    // Each reward function takes two metric slots (rewards/<name>/mean and /std): at most half of them.
    if (k > CTL_MAX_METRICS / 2) return ctl__fail(ctx, CTL_ERR_INVALID, "rl: %" PRId64 " reward functions; at most %d", k, CTL_MAX_METRICS / 2);
    for (int64_t j = 0; j < k; j++) names[j] = rl->d.rewards[j].name, weights[j] = rl->d.rewards[j].weight;
    // Group-relative advantages (ctl_advantages, as rl->d.advantages asks). With G = 1 there is no group to compare
    // within (DPO and RFT pick rows by reward, not by advantage).
    ctl_advantage_desc ad = rl->d.advantages;
    ad.group_size = G, ad.n_funcs = k, ad.weights = weights, ad.names = names;
    if (G >= 2 && (st = ctl_advantages(ctx, &ad, n, rl->rewards, rl->adv, &rl->gen))) return st;
    if (G < 2) memset(&rl->gen, 0, sizeof rl->gen), memset(rl->adv, 0, (size_t)n * sizeof(float));
    // Each row's reward, the weighted sum of the functions that scored it, for DPO and RFT's picks, the objectives'
    // metrics and the "correct" fraction (rows whose reward reaches accept).
    double correct = 0.0;
    for (int64_t i = 0; i < n; i++) {   // r = sum_k w_k R_k over the scored ones; NaN if none
        double r = 0.0;
        bool any = false;
        for (int64_t j = 0; j < k; j++) {
            float v = rl->rewards[i * k + j];
            if (v == v) r += (double)weights[j] * v, any = true;
        }
        rl->row_reward[i] = any ? (float)r : NAN;
        correct += any && rl->row_reward[i] >= rl->d.accept;
    }
    // The rows, cut to the longest prompt + completion (+ stop token) of the generation.
    // Tu counts (token, target) pairs: tokens - 1 of the longest row. The updates then run over Tu columns, not T.
    int64_t Tu = 2;
    for (int64_t i = 0; i < n; i++) Tu = CTL__MAX(Tu, rl->pl[i / G] + rl->ro.completion_len[i] + !rl->ro.truncated[i] - 1);
    Tu = CTL__MIN(Tu, T);
    // The rows repacked at stride Tu, so the micro-batches are contiguous (B, Tu) batches.
    for (int64_t i = 0; i < n; i++) {
        memcpy(rl->tok + i * Tu, rl->ro.tokens + i * T, (size_t)Tu * sizeof(int32_t));
        memcpy(rl->tgt + i * Tu, rl->ro.targets + i * T, (size_t)Tu * sizeof(int32_t));
        memcpy(rl->w + i * Tu, rl->ro.weights + i * T, (size_t)Tu * sizeof(float));
    }
    rl->Tu = Tu, rl->iter = 0, rl->have = true;   // the next update is the first on this generation
    // The completions' statistics under TRL's names.
    ctl_metric_set(&rl->gen, "completions/mean_length", len_sum / (double)n);
    ctl_metric_set(&rl->gen, "completions/min_length", len_min);
    ctl_metric_set(&rl->gen, "completions/max_length", len_max);
    ctl_metric_set(&rl->gen, "completions/clipped_ratio", clipped / (double)n);
    ctl_metric_set(&rl->gen, "completions/mean_terminated_length", clipped < (double)n ? term_sum / ((double)n - clipped) : 0.0);
    ctl_metric_set(&rl->gen, "correct", correct / (double)n);
    if (metrics) *metrics = rl->gen, metrics->dlogp = NULL;
    return CTL_OK;
}

// Row i of the generation's rows into row r of the picked rows (DPO, RFT).
static void ctl__rl_pick(ctl_rl *rl, int64_t r, int64_t i) {
    int64_t Tu = rl->Tu;
    memcpy(rl->rtok + r * Tu, rl->tok + i * Tu, (size_t)Tu * sizeof(int32_t));
    memcpy(rl->rtgt + r * Tu, rl->tgt + i * Tu, (size_t)Tu * sizeof(int32_t));
    memcpy(rl->rw + r * Tu, rl->w + i * Tu, (size_t)Tu * sizeof(float));
}

static bool ctl__rl_correct(const ctl_rl *rl, int64_t i) { return rl->row_reward[i] >= rl->d.accept; }   // NaN: no

// A row's used length: up to its last weighted target (at least 2, as Tu). Positions past it change
// no log-prob that counts (attention is causal), so a micro-batch can be cut to its longest row.
static int64_t ctl__rl_used(const float *w, int64_t Tu) {
    int64_t u = Tu;
    while (u > 2 && w[u - 1] == 0.0f) u--;
    return u;
}

// GRPO's micro-batches hold rows of like length: the rows by used length, longest first (ties by
// index, so the order is fixed by the generation), B at a time, each micro-batch cut to its
// longest row and packed at that stride into rtok/rtgt/rw (at the micro-batch's offset, where its
// old and reference log-probs are kept too). Padding to the generation's longest row would cost a
// completion's worth of positions for each short one.
static void ctl__rl_order(ctl_rl *rl) {
    int64_t n = rl->n;
    for (int64_t i = 0; i < n; i++) {
        rl->used[i] = ctl__rl_used(rl->w + i * rl->Tu, rl->Tu);
        int64_t k = i;   // insertion: n is a few hundred at most
        for (; k > 0 && rl->used[rl->order[k - 1]] < rl->used[i]; k--) rl->order[k] = rl->order[k - 1];
        rl->order[k] = i;
    }
}

// Micro-batch mb (rows order[mb*B ..]) packed at its own length; returns that length.
static int64_t ctl__rl_pack(ctl_rl *rl, int64_t mb) {
    int64_t B = rl->B, Tu = rl->Tu, base = mb * B * Tu, Tm = 2;
    for (int64_t r = 0; r < B; r++) Tm = CTL__MAX(Tm, rl->used[rl->order[mb * B + r]]);
    for (int64_t r = 0; r < B; r++) {
        int64_t i = rl->order[mb * B + r];
        memcpy(rl->rtok + base + r * Tm, rl->tok + i * Tu, (size_t)Tm * sizeof(int32_t));
        memcpy(rl->rtgt + base + r * Tm, rl->tgt + i * Tu, (size_t)Tm * sizeof(int32_t));
        memcpy(rl->rw + base + r * Tm, rl->w + i * Tu, (size_t)Tm * sizeof(float));
        rl->mb_adv[r] = rl->adv[i], rl->mb_reward[r] = rl->row_reward[i], rl->mb_truncated[r] = rl->ro.truncated[i];
    }
    return Tm;
}

// GRPO: every row, in micro-batches of B rows of like length (ctl__rl_order); the first iteration
// keeps its log-probs as the old ones and computes the reference's.
static ctl_status ctl__rl_grpo(ctl_rl *rl, ctl_step_out *out) {
    ctl_ctx *ctx = rl->ctx;
    ctl_train *t = rl->t;
    int64_t B = rl->B, Tu = rl->Tu, GA = rl->n / B, it = rl->iter;
    ctl_grpo_desc gd = rl->d.grpo;
    double gen_tokens = 0.0;
    // The generation's weighted completion tokens (truncated rows left out when they are masked): DAPO's
    // token-level normaliser (Yu et al. 2025), the same for every micro-batch of every update on this generation.
    for (int64_t i = 0; i < rl->n * Tu; i++) gen_tokens += rl->d.mask_truncated && rl->ro.truncated[i / Tu] ? 0.0 : rl->w[i];
    gd.accum = GA, gd.steps_per_generation = GA, gd.max_completion_length = rl->d.max_new, gd.gen_tokens = gen_tokens;
    bool kl = gd.beta > 0.0f;   // a KL term needs reference log-probs
    ctl__rl_order(rl);
    ctl_status st = CTL_OK;
    for (int64_t mb = 0; !st && mb < GA; mb++) {
        int64_t base = mb * B * Tu, Tm = ctl__rl_pack(rl, mb);
        ctl_batch bt = {B, Tm, rl->rtok + base, rl->rtgt + base, rl->rw + base};
        ctl_logprobs in = {B, Tm, NULL, rl->rw + base, it ? rl->old + base : NULL, kl ? rl->ref + base : NULL, NULL};
        // The first update keeps the policy's log-probs as the old ones (the policy that sampled, up to the forward's
        // rounding) and the reference's; later updates take the clipped ratio against them. The reference runs first:
        // on t itself it would overwrite the activations the backward needs.
        if (kl && it == 0) st = ctl__reference(t, rl->d.reference, &bt, rl->ref + base);
        if (!st) st = ctl_train_forward(t, &bt);
        if (!st && it == 0) memcpy(rl->old + base, ctl_train_logprobs(t), (size_t)(B * Tm) * sizeof(float));
        in.logp = ctl_train_logprobs(t), in.entropy = ctl_train_entropy(t), out->metrics.dlogp = ctl_train_dlogprobs(t);
        ctl_grpo_desc g = gd;
        g.advantages = rl->mb_adv, g.rewards = rl->mb_reward;
        g.truncated = rl->d.mask_truncated ? rl->mb_truncated : NULL;   // DAPO: truncated rows out of the loss
        // A user objective replaces GRPO's loss with the same inputs and contract.
        if (!st) st = rl->d.objective ? rl->d.objective(ctx, &in, &g, &out->metrics) : ctl_objective_grpo(ctx, &in, &g, &out->metrics);
        if (!st) st = ctl_train_backward(t);
        if (!st) out->loss += out->metrics.loss;
    }
    out->tokens = gen_tokens;
    return st;
}

// DPO on pairs, or SFT on the correct rows (rejection-sampling fine-tuning, RFT: Yuan et al. 2023): the picked
// rows in micro-batches of B.
static ctl_status ctl__rl_offline(ctl_rl *rl, ctl_step_out *out) {
    ctl_ctx *ctx = rl->ctx;
    ctl_train *t = rl->t;
    int64_t Tu = rl->Tu, picked = 0, G = rl->G, n_prompts = rl->n / G;
    bool dpo = rl->d.method == CTL_RL_DPO;
    if (dpo) {   // per prompt: its first correct and first wrong completion
        int64_t pairs = 0, *ci = rl->chosen, *wi = rl->rejected;
        for (int64_t p = 0; p < n_prompts; p++) {
            int64_t c = -1, w = -1;
            for (int64_t g = G - 1; g >= 0; g--) {
                int64_t i = p * G + g;
                if (ctl__rl_correct(rl, i)) c = i;
                else if (rl->row_reward[i] == rl->row_reward[i]) w = i;   // NaN, unscored: neither
            }
            if (c >= 0 && w >= 0) ci[pairs] = c, wi[pairs++] = w;
        }
        // Micro-batches of B / 2 pairs: chosen rows then rejected rows in each.
        int64_t per = rl->B / 2;
        // Pair k goes to micro-batch k / per, its chosen row at k % per and its rejected row in_mb rows later; the last
        // micro-batch may hold fewer pairs.
        for (int64_t k = 0; k < pairs; k++) {
            int64_t mb = k / per, in_mb = CTL__MIN(per, pairs - mb * per), at = mb * rl->B;
            ctl__rl_pick(rl, at + k % per, ci[k]), ctl__rl_pick(rl, at + in_mb + k % per, wi[k]);
        }
        picked = 2 * pairs;
    } else {
        for (int64_t i = 0; i < rl->n; i++)
            if (ctl__rl_correct(rl, i)) ctl__rl_pick(rl, picked++, i);
    }
    if (picked == 0) return out->skipped = true, CTL_OK;   // nothing to learn from: no step either
    // A micro-batches; the last may be short. tokens, the weighted targets of all picked rows, normalises SFT.
    int64_t B = rl->B, A = (picked + B - 1) / B;
    double tokens = 0.0;
    for (int64_t i = 0; i < picked * Tu; i++) tokens += rl->rw[i];
    ctl_status st = CTL_OK;
    for (int64_t mb = 0; !st && mb < A; mb++) {
        int64_t rows = CTL__MIN(B, picked - mb * B), base = mb * B * Tu, Tm = 2;
        // The micro-batch cut to its longest row (ctl__rl_used), its rows moved down to that stride in place.
        for (int64_t r = 0; r < rows; r++) Tm = CTL__MAX(Tm, ctl__rl_used(rl->rw + base + r * Tu, Tu));
        for (int64_t r = 1; r < rows && Tm < Tu; r++) {
            memmove(rl->rtok + base + r * Tm, rl->rtok + base + r * Tu, (size_t)Tm * sizeof(int32_t));
            memmove(rl->rtgt + base + r * Tm, rl->rtgt + base + r * Tu, (size_t)Tm * sizeof(int32_t));
            memmove(rl->rw + base + r * Tm, rl->rw + base + r * Tu, (size_t)Tm * sizeof(float));
        }
        ctl_batch bt = {rows, Tm, rl->rtok + base, rl->rtgt + base, rl->rw + base};
        ctl_logprobs in = {rows, Tm, NULL, rl->rw + base, NULL, dpo ? rl->ref : NULL, NULL};
        if (dpo) st = ctl__reference(t, rl->d.reference, &bt, rl->ref);
        if (!st) st = ctl_train_forward(t, &bt);
        in.logp = ctl_train_logprobs(t), in.entropy = ctl_train_entropy(t), out->metrics.dlogp = ctl_train_dlogprobs(t);
        if (!st && dpo) {
            ctl_dpo_desc dd = rl->d.dpo;
            dd.accum = A, dd.targets = bt.targets;
            st = ctl_objective_dpo(ctx, &in, &dd, &out->metrics);
        } else if (!st) {
            ctl_sft_desc sd = {CTL_SFT_TOKENS, A, tokens};   // the mean over all picked tokens
            st = ctl_objective_sft(ctx, &in, &sd, &out->metrics);
        }
        if (!st) st = ctl_train_backward(t);
        if (!st) out->loss += out->metrics.loss;
    }
    out->tokens = tokens;
    return st;
}

// One update on the current generation. GRPO may take rl->d.iterations of them (the old log-probs correct the
// later ones' off-policy drift); online DPO and RFT take exactly one.
CTL_API ctl_status ctl_rl_update(ctl_rl *rl, ctl_step_out *out) {
    if (!CTL__ARGS(rl ? rl->ctx : NULL, rl && out)) return CTL_ERR_INVALID;
    memset(out, 0, sizeof *out);
    if (!rl->have || (rl->d.method != CTL_RL_GRPO && rl->iter > 0))
        return ctl__fail(rl->ctx, CTL_ERR_INVALID, "rl_update: no generation to learn from%s: call ctl_rl_generate first",
                         rl->have ? " (online DPO and RFT take one step per generation)" : "");
    ctl_status st = rl->d.method == CTL_RL_GRPO ? ctl__rl_grpo(rl, out) : ctl__rl_offline(rl, out);
    if (!st && !out->skipped) st = ctl_train_step(rl->t, &out->stats);
    else if (st) ctl_train_discard(rl->t);
    if (st && rl->iter == 0) rl->have = false;   // no old log-probs to go on with
    rl->iter++;
    // The generation's metrics ride along with the update's.
    for (int i = 0; i < rl->gen.n_metrics; i++) ctl_metric_set(&out->metrics, rl->gen.metrics[i].name, rl->gen.metrics[i].value);
    out->metrics.dlogp = NULL;
    return st;
}

// A generation, then its updates; out reports the last.
CTL_API ctl_status ctl_rl_step(ctl_rl *rl, const ctl_rl_prompt *prompts, int64_t n, uint64_t seed, ctl_step_out *out) {
    if (!CTL__ARGS(rl ? rl->ctx : NULL, rl && out)) return CTL_ERR_INVALID;
    ctl_status st = ctl_rl_generate(rl, prompts, n, seed, NULL);
    for (int64_t it = 0; !st && it < (rl->d.method == CTL_RL_GRPO ? rl->d.iterations : 1); it++) st = ctl_rl_update(rl, out);
    return st;
}

#endif // COTLAB_IMPLEMENTATION

/*
MIT License

Copyright (c) 2026 the cotlab authors

Permission is hereby granted, free of charge, to any person obtaining a copy of this software and
associated documentation files (the "Software"), to deal in the Software without restriction,
including without limitation the rights to use, copy, modify, merge, publish, distribute,
sublicense, and/or sell copies of the Software, and to permit persons to whom the Software is
furnished to do so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in all copies or
substantial portions of the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR IMPLIED, INCLUDING BUT
NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY, FITNESS FOR A PARTICULAR PURPOSE AND
NONINFRINGEMENT. IN NO EVENT SHALL THE AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM,
DAMAGES OR OTHER LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM, OUT
OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE SOFTWARE.
*/
