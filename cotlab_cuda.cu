// cotlab_cuda.cu: cotlab's kernels on NVIDIA GPUs (CUDA runtime and cuBLAS).
//
// Build:  nvcc -O2 -c cotlab_cuda.cu -o cotlab_cuda.o -arch=sm_80   (any sm_80 or later)
//         cc -DCOTLAB_CUDA ... your.c cotlab_cuda.o -lcudart -lcublas -lstdc++
// and open the context with ctl_ctx_desc.device = CTL_DEVICE_CUDA. cotlab.h is included for its
// declarations only; the implementation (COTLAB_IMPLEMENTATION) lives in one C file as usual.
//
// Each kernel is the CPU kernel of the same name, reorganised for threads: a warp per row for
// the row operations, a thread per element for the elementwise ones, cuBLAS for the products,
// and tiles of 32 queries by 32 keys in shared memory for training attention. Sums over rows
// (weight and bias gradients) are walked in row order by one thread per column, and
// attention's key and value gradients come from a pass over key tiles, so no value is ever
// added to by two threads and every run gives the same bits.
//
// The file also compiles as plain C++ against tests/cuda_emu.h (CTL_CUDA_EMU), which runs the
// kernels on the CPU, thread by thread, with __syncthreads and warp shuffles emulated: that is
// how the index arithmetic, the tiling and the reductions are tested on machines without a GPU.
//
// The tests compare each kernel with the CPU's of the same name within fp32 1e-5, TF32 1e-3 and bf16
// products 1e-2. Sums here run in another order than the CPU's, so the bits match the CPU's only where
// a kernel says so, but the same inputs give the same bits every run; cuBLAS repeats its results on
// one GPU model and library version, and another may round differently.
// Limits: one stream per context, so work runs in queue order (which lets scratch go back right after
// its launches); a fault inside a kernel leaves the CUDA context unusable: ctl_device_sync reports it.

#ifndef COTLAB_CUDA
#define COTLAB_CUDA
#endif
#define COTLAB_CUDA_BACKEND   // the backend's declarations
#include "cotlab.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#ifndef CTL_CUDA_EMU
#include <cublas_v2.h>
#include <cuda_runtime.h>
// Each launch is checked at once (ctl__cu_launched) for a bad configuration; a fault inside the kernel
// shows at the next sync. tests/cuda_emu.h defines the same four macros to run launches on the CPU.
// A grid of 0 blocks (work over nothing: ctl__blocks(0, ...)) launches nothing, where CUDA would
// refuse the configuration.
#define CTL_LAUNCH(c, kernel, grid, block, ...)                                                               \
    ((grid) == 0 ? (void)0                                                                                     \
                 : (kernel<<<(unsigned)(grid), (unsigned)(block), 0, (c)->stream>>>(__VA_ARGS__),             \
                    ctl__cu_launched(c, #kernel)))
#define CTL_LAUNCH_SHARED(c, kernel, grid, block, shared, ...)                                                \
    ((grid) == 0 ? (void)0                                                                                     \
                 : (kernel<<<(unsigned)(grid), (unsigned)(block), (size_t)(shared), (c)->stream>>>(__VA_ARGS__), \
                    ctl__cu_launched(c, #kernel)))
#define CTL__SHARED_DYN(type, name) extern __shared__ type name[]
#define CTL__UNROLL _Pragma("unroll")
#endif

// One block size for every kernel: the block reductions (ctl__block_sum, the sampler's part[]) size
// their shared arrays by it, and the warp-per-row kernels take CTL__CU_WARPS rows a block.
// Allocations are rounded to 256 bytes, the alignment cudaMalloc itself gives.
#define CTL__CU_THREADS 256   // threads per block for every kernel
#define CTL__CU_WARPS (CTL__CU_THREADS / 32)
#define CTL__CU_ALIGN 256
#define CTL__CU_HELD 64   // spans given back out of order, waiting for the ones above them

// The backend's state, one per context. Device memory is one cudaMalloc made at open: arrays that live
// with a model or trainer grow from the bottom (used), kernel scratch from the top (top), and nothing
// is allocated from CUDA again until close, so a step never waits on cudaMalloc.
struct ctl_cuda {
    ctl_ctx *ctx;
    int device;
    cudaStream_t stream;
    cublasHandle_t blas;
    unsigned char *base;   // the one device block: ctl_device_alloc from the bottom, scratch from the top
    size_t size, used, top;
    bool tf32, bf16;
    int shared_max;        // dynamic shared memory a block may opt in to (bytes)
    struct { size_t from, to; } held[CTL__CU_HELD];   // spans given back below the top (ctl_device_release_span)
    int n_held;
    ctl_status err;        // the first failure since the last ctl_device_sync
    char name[300];
};

// ---- errors ----------------------------------------------------------------------------------

// Keeps the first failure (status and message) until ctl_device_sync reports it.
static void ctl__cu_fail(ctl_cuda *c, ctl_status s, const char *fmt, ...) {
    if (c->err) return;
    char msg[400];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    c->err = ctl_fail(c->ctx, s, "cuda: %s", msg);
}

static bool ctl__cu_ok(ctl_cuda *c, cudaError_t e, const char *what) {
    if (e == cudaSuccess) return true;
    ctl__cu_fail(c, e == cudaErrorMemoryAllocation ? CTL_ERR_OUT_OF_MEMORY : CTL_ERR_INVALID, "%s: %s", what,
                 cudaGetErrorString(e));
    return false;
}

static bool ctl__blas_ok(ctl_cuda *c, cublasStatus_t e, const char *what) {
    if (e == CUBLAS_STATUS_SUCCESS) return true;
    ctl__cu_fail(c, CTL_ERR_INVALID, "%s: cuBLAS status %d", what, (int)e);
    return false;
}

// After a launch: cudaGetLastError returns a launch error (a bad grid, too much shared memory);
// a failure while the kernel runs comes back from the next synchronisation instead.
static void ctl__cu_launched(ctl_cuda *c, const char *kernel) { ctl__cu_ok(c, cudaGetLastError(), kernel); }

static ctl_cuda *ctl__cu(ctl_ctx *ctx) { return ctl_ctx_cuda(ctx); }

// Blocks of `per` threads (or rows) that cover n. n = 0 gives a grid of 0, which CTL_LAUNCH skips.
static unsigned ctl__blocks(int64_t n, int64_t per) { return (unsigned)((n + per - 1) / per); }

// ---- the context's device block --------------------------------------------------------------

CTL_API bool ctl_cuda_available(const char **why) {
    int n = 0;
    cudaError_t e = cudaGetDeviceCount(&n);
    if (e != cudaSuccess || n < 1) {
        if (why) *why = e != cudaSuccess ? cudaGetErrorString(e) : "no CUDA device";
        return false;
    }
    if (why) *why = "";
    return true;
}

static void ctl__cuda_close(ctl_cuda *c);

// Opens device desc->cuda_index: a cuBLAS handle bound to the context's own stream (so products and
// kernels run in queue order), TF32 tensor-core math when desc->tf32, and the one device block
// (desc->device_memory, 1 GiB by default). Compute capability 8.0 is the floor because the bf16 and
// TF32 tensor-core products need it. On failure what was made is closed and the first failure returned.
static ctl_status ctl__cuda_open(ctl_ctx *ctx, const ctl_ctx_desc *desc, ctl_cuda **out) {
    *out = NULL;
    const char *why;
    if (!ctl_cuda_available(&why)) return ctl_fail(ctx, CTL_ERR_UNSUPPORTED, "cuda: no GPU to open (%s)", why);
    int n = 0;
    cudaGetDeviceCount(&n);
    if (desc->cuda_index < 0 || desc->cuda_index >= n)
        return ctl_fail(ctx, CTL_ERR_RANGE, "cuda: device %d of %d", desc->cuda_index, n);
    ctl_cuda *c = (ctl_cuda *)ctl_alloc(ctx, sizeof(ctl_cuda));
    if (!c) return ctl_fail(ctx, CTL_ERR_OUT_OF_MEMORY, "cuda: backend state");
    memset(c, 0, sizeof *c);
    c->ctx = ctx, c->device = desc->cuda_index, c->tf32 = desc->tf32, c->bf16 = desc->bf16_dot;
    c->size = desc->device_memory ? desc->device_memory : (size_t)1 << 30;
    cudaDeviceProp prop;
    bool ok = ctl__cu_ok(c, cudaSetDevice(c->device), "select the device") &&
              ctl__cu_ok(c, cudaGetDeviceProperties(&prop, c->device), "device properties") &&
              ctl__cu_ok(c, cudaDeviceGetAttribute(&c->shared_max, cudaDevAttrMaxSharedMemoryPerBlockOptin, c->device),
                         "shared memory per block");
    if (ok) snprintf(c->name, sizeof c->name, "%s (sm_%d%d)", prop.name, prop.major, prop.minor);
    if (ok && prop.major < 8) ctl__cu_fail(c, CTL_ERR_UNSUPPORTED, "%s: compute capability 8.0 or later needed", c->name), ok = false;
    ok = ok && ctl__cu_ok(c, cudaStreamCreate(&c->stream), "create a stream");
    ok = ok && ctl__blas_ok(c, cublasCreate(&c->blas), "cublasCreate");
    ok = ok && ctl__blas_ok(c, cublasSetStream(c->blas, c->stream), "cublasSetStream");
    ok = ok && ctl__blas_ok(c, cublasSetMathMode(c->blas, c->tf32 ? CUBLAS_TF32_TENSOR_OP_MATH : CUBLAS_DEFAULT_MATH),
                            "cublasSetMathMode");
    if (ok) {
        cudaError_t e = cudaMalloc((void **)&c->base, c->size);
        if (e != cudaSuccess) {
            size_t free_b = 0, total_b = 0;
            cudaMemGetInfo(&free_b, &total_b);
            ctl__cu_fail(c, CTL_ERR_OUT_OF_MEMORY, "device memory: %zu MiB asked (ctl_ctx_desc.device_memory), %zu MiB free of %zu",
                         c->size >> 20, free_b >> 20, total_b >> 20);
            c->base = NULL, ok = false;
        }
    }
    if (!ok) {
        ctl_status st = c->err;
        ctl__cuda_close(c);
        return st;
    }
    c->top = c->size;
    *out = c;
    return CTL_OK;
}

// Waits for queued work before freeing the block it may still use. Safe on a half-open state.
static void ctl__cuda_close(ctl_cuda *c) {
    if (!c) return;
    if (c->stream) cudaStreamSynchronize(c->stream);
    if (c->base) cudaFree(c->base);
    if (c->blas) cublasDestroy(c->blas);
    if (c->stream) cudaStreamDestroy(c->stream);
    ctl_free(c->ctx, c);
}

CTL_API const char *ctl_ctx_device_name(const ctl_ctx *ctx) {
    ctl_cuda *c = ctl_ctx_cuda(ctx);
    return c ? c->name : "cpu";
}

static size_t ctl__round_up(size_t n) { return (n + CTL__CU_ALIGN - 1) / CTL__CU_ALIGN * CTL__CU_ALIGN; }

// A bump allocator from the bottom of the block: no free list, no fragmentation. It fails at once,
// with the sizes in the message, where it would meet the scratch taken from the top.
CTL_API void *ctl_device_alloc(ctl_ctx *ctx, size_t size) {
    ctl_cuda *c = ctl__cu(ctx);
    if (!c) {
        ctl_fail(ctx, CTL_ERR_UNSUPPORTED, "device alloc of %zu bytes: not a CUDA context", size);
        return NULL;
    }
    size_t n = ctl__round_up(size ? size : 1);
    if (n < size || n > c->top - c->used) {
        ctl_fail(ctx, CTL_ERR_OUT_OF_MEMORY, "device alloc of %zu bytes: %zu of %zu left (ctl_ctx_desc.device_memory)", size,
                 c->top - c->used, c->size);
        return NULL;
    }
    void *p = c->base + c->used;
    c->used += n;
    return p;
}

CTL_API size_t ctl_device_mark(const ctl_ctx *ctx) {
    ctl_cuda *c = ctl_ctx_cuda(ctx);
    return c ? c->used : 0;
}

// Frees everything allocated since `mark`, as a stack does, and the held spans above it.
CTL_API void ctl_device_release(ctl_ctx *ctx, size_t mark) {
    ctl_cuda *c = ctl__cu(ctx);
    if (!c || mark > c->used) return;
    c->used = mark;
    for (int i = 0; i < c->n_held;)   // spans above the mark went with it
        if (c->held[i].from >= mark) c->held[i] = c->held[--c->n_held];
        else i++;
}

// Frees [from, to) out of stack order. Only the topmost span can move `used` down; one below memory
// still in use is remembered (up to CTL__CU_HELD of them) and merged once everything above it goes,
// so spans freed in any order leave the block as empty as a stack would.
CTL_API void ctl_device_release_span(ctl_ctx *ctx, size_t from, size_t to) {
    ctl_cuda *c = ctl__cu(ctx);
    if (!c || from >= to || to > c->used) return;
    if (to < c->used) {   // something above it is still in use: held until that goes
        if (c->n_held < CTL__CU_HELD) c->held[c->n_held].from = from, c->held[c->n_held++].to = to;
        return;   // (with no slot left, it stays taken until the context closes)
    }
    c->used = from;
    for (int i = 0; i < c->n_held;)   // and the held spans this uncovers
        if (c->held[i].to == c->used) c->used = c->held[i].from, c->held[i] = c->held[--c->n_held], i = 0;
        else i++;
}

// Kernel scratch from the top of the block. Freed (ctl__scratch_pop) right after the launches
// that use it: later work on the same stream runs after them.
// Each caller saves c->top, takes what it needs, queues its launches and restores top, innermost
// first. Running out records CTL_ERR_CAPACITY for the next sync and returns NULL; the caller then
// launches nothing.
static void *ctl__scratch(ctl_cuda *c, size_t size, const char *what) {
    size_t n = ctl__round_up(size ? size : 1);
    if (n < size || n > c->top - c->used) {
        ctl__cu_fail(c, CTL_ERR_CAPACITY, "%s: %zu bytes of scratch, %zu left in the device block", what, size,
                     c->top - c->used);
        return NULL;
    }
    c->top -= n;
    return c->base + c->top;
}

static void ctl__scratch_pop(ctl_cuda *c, size_t top) { c->top = top; }

// Copies go on the stream, after the kernels queued before them. A device-to-host copy waits for
// them, so the host may read dst on return.
static ctl_status ctl__copy(ctl_ctx *ctx, void *dst, const void *src, size_t size, cudaMemcpyKind kind, const char *what) {
    ctl_cuda *c = ctl__cu(ctx);
    if (!c) return ctl_fail(ctx, CTL_ERR_UNSUPPORTED, "%s: not a CUDA context", what);
    if (!size) return CTL_OK;
    if (!ctl__cu_ok(c, cudaMemcpyAsync(dst, src, size, kind, c->stream), what)) return c->err;
    if (kind == cudaMemcpyDeviceToHost && !ctl__cu_ok(c, cudaStreamSynchronize(c->stream), what)) return c->err;
    return CTL_OK;
}

// Host-to-device copies wait too, so the caller may reuse its buffer at once.
CTL_API ctl_status ctl_copy_to_device(ctl_ctx *ctx, void *dst, const void *src, size_t size) {
    ctl_status st = ctl__copy(ctx, dst, src, size, cudaMemcpyHostToDevice, "copy to device");
    ctl_cuda *c = ctl__cu(ctx);
    if (!st && size && !ctl__cu_ok(c, cudaStreamSynchronize(c->stream), "copy to device")) return c->err;
    return st;
}

CTL_API ctl_status ctl_copy_to_host(ctl_ctx *ctx, void *dst, const void *src, size_t size) {
    return ctl__copy(ctx, dst, src, size, cudaMemcpyDeviceToHost, "copy to host");
}

// The table's pin and unpin: cudaHostRegister on memory the caller owns. A refusal (already pinned,
// not allowed) is cleared from the runtime's last error, so the next sync does not report it.
static bool ctl__cuda_pin(ctl_ctx *ctx, void *p, size_t n) {
    if (!ctl__cu(ctx) || !p || !n) return false;
    if (cudaHostRegister(p, n, cudaHostRegisterDefault) == cudaSuccess) return true;
    cudaGetLastError();   // not a failure of the work: copies to p stay pageable
    return false;
}

static void ctl__cuda_unpin(ctl_ctx *ctx, void *p) {
    if (ctl__cu(ctx) && p && cudaHostUnregister(p) != cudaSuccess) cudaGetLastError();
}

// The one place queued failures come back: waits for the stream, then returns the first failure
// recorded since the last sync (a launch, a copy, cuBLAS, scratch) and clears it.
CTL_API ctl_status ctl_device_sync(ctl_ctx *ctx) {
    ctl_cuda *c = ctl__cu(ctx);
    if (!c) return ctl_fail(ctx, CTL_ERR_UNSUPPORTED, "device sync: not a CUDA context");
    ctl__cu_ok(c, cudaStreamSynchronize(c->stream), "kernels");
    ctl__cu_ok(c, cudaGetLastError(), "kernels");
    ctl_status st = c->err;
    c->err = CTL_OK;
    return st;
}

// ---- reductions --------------------------------------------------------------------------------

// Butterfly reductions over a warp (xor offsets 16, 8, 4, 2, 1): every lane ends with the same value,
// and the pairing is fixed, so the result depends only on the 32 inputs, never on timing. All 32
// lanes must take part (the full mask): the row kernels' warps leave whole or not at all.
__device__ __forceinline__ float ctl__warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float ctl__warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// A sum over the block (every thread must call; all get the result). sh: CTL__CU_WARPS slots.
// Warp sums, then every thread adds the CTL__CU_WARPS partials itself, in warp order: no further
// barrier or broadcast. T is float or double (the LM head, the sampler and the sum of squares).
template <typename T> __device__ T ctl__block_sum(T v, T *sh) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    int warp = (int)threadIdx.x / 32, lane = (int)threadIdx.x % 32;
    __syncthreads();   // sh may still be read by a previous call
    if (lane == 0) sh[warp] = v;
    __syncthreads();
    T t = 0;
    for (int w = 0; w < CTL__CU_WARPS; w++) t += sh[w];
    return t;
}

// The same for a maximum (a softmax's shift): exact in any order.
__device__ float ctl__block_max(float v, float *sh) {
    v = ctl__warp_max(v);
    int warp = (int)threadIdx.x / 32, lane = (int)threadIdx.x % 32;
    __syncthreads();
    if (lane == 0) sh[warp] = v;
    __syncthreads();
    float t = -INFINITY;
    for (int w = 0; w < CTL__CU_WARPS; w++) t = fmaxf(t, sh[w]);
    return t;
}

// ---- products --------------------------------------------------------------------------------

// C (M,N) = A B (+ C) for strides cuBLAS cannot take: a thread per value, k in order.
// A fallback, with no tiling and in fp32 whatever the math mode: far slower than cuBLAS. K = 0 (an
// empty sum) comes here too and writes zeros, or leaves C as it was when accumulating.
__global__ void ctl__k_gemm_plain(int64_t M, int64_t N, int64_t K, const float *a, int64_t a_rs, int64_t a_cs,
                                  const float *b, int64_t b_rs, int64_t b_cs, float *c, int64_t ldc, bool acc) {
    int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= M * N) return;
    int64_t m = i / N, n = i % N;
    float s = 0.0f;
    for (int64_t k = 0; k < K; k++) s += a[m * a_rs + k * a_cs] * b[k * b_rs + n * b_cs];
    c[m * ldc + n] = acc ? c[m * ldc + n] + s : s;
}

// One operand of a column-major product: element (i, j) of an R x Cc matrix at i*si + j*sj.
// cuBLAS takes it as op N (si = 1) or op T (sj = 1) with a leading dimension of at least the
// stored rows; false when the strides fit neither.
// A vector (R or Cc of 1) fits either way, since its other stride is never stepped over.
static bool ctl__blas_operand(int64_t R, int64_t Cc, int64_t si, int64_t sj, cublasOperation_t *op, int64_t *ld) {
    int64_t r1 = R > 1 ? R : 1, c1 = Cc > 1 ? Cc : 1;
    if (si == 1 && (Cc == 1 || sj >= r1)) {
        *op = CUBLAS_OP_N, *ld = Cc == 1 ? r1 : sj;
        return true;
    }
    if (sj == 1 && (R == 1 || si >= c1)) {
        *op = CUBLAS_OP_T, *ld = R == 1 ? c1 : si;
        return true;
    }
    return false;
}

// Row-major C = A B is column-major C^T = B^T A^T: cuBLAS's m = N, n = M.
// The row-major product goes to cuBLAS as its transpose, so no operand is copied: B^T is the first
// column-major operand and A^T the second. With M = 1, C's leading dimension is never stepped over,
// so N stands in for an ldc cuBLAS would refuse. Sizes or strides past int32, or operands that are
// neither op N nor op T, take the plain kernel.
static void ctl__cuda_gemm(ctl_ctx *ctx, int64_t M, int64_t N, int64_t K, const float *a, int64_t a_rs, int64_t a_cs,
                           const float *b, int64_t b_rs, int64_t b_cs, float *c, int64_t ldc, bool accumulate) {
    ctl_cuda *cu = ctl__cu(ctx);
    if (M <= 0 || N <= 0) return;
    cublasOperation_t opb, opa;
    int64_t ldb, lda, ldc1 = M == 1 && ldc < N ? N : ldc;
    bool fits = K > 0 && ldc1 >= N && M < INT32_MAX && N < INT32_MAX && K < INT32_MAX &&
                ctl__blas_operand(N, K, b_cs, b_rs, &opb, &ldb) && ctl__blas_operand(K, M, a_cs, a_rs, &opa, &lda) &&
                ldb < INT32_MAX && lda < INT32_MAX && ldc1 < INT32_MAX;
    if (!fits) {
        CTL_LAUNCH(cu, ctl__k_gemm_plain, ctl__blocks(M * N, CTL__CU_THREADS), CTL__CU_THREADS, M, N, K, a, a_rs, a_cs, b,
                   b_rs, b_cs, c, ldc, accumulate);
        return;
    }
    float one = 1.0f, beta = accumulate ? 1.0f : 0.0f;
    ctl__blas_ok(cu, cublasSgemm(cu->blas, opb, opa, (int)N, (int)M, (int)K, &one, b, (int)ldb, a, (int)lda, &beta, c, (int)ldc1),
                 "gemm");
}

// out rows = bias (then the product accumulates onto them).
__global__ void ctl__k_rows_set(float *out, const float *bias, int64_t N, int64_t OC) {
    int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < N * OC) out[i] = bias[i % OC];
}

// out = inp w^T + bias for an fp32 w: the bias rows are written first and the product accumulates
// onto them, so no second pass adds the bias.
static void ctl__cuda_matmul_forward(ctl_ctx *ctx, float *out, const float *inp, const float *w, const float *bias,
                                     int64_t N, int64_t C, int64_t OC) {
    ctl_cuda *c = ctl__cu(ctx);
    if (bias) CTL_LAUNCH(c, ctl__k_rows_set, ctl__blocks(N * OC, CTL__CU_THREADS), CTL__CU_THREADS, out, bias, N, OC);
    ctl__cuda_gemm(ctx, N, OC, C, inp, C, 1, w, 1, C, out, OC, bias != NULL);
}

// dbias[o] += sum over rows of dout[n, o]: a thread per column, rows in order.
// Adjacent threads read adjacent columns (coalesced), and no value is added to by two threads, so
// there are no atomics; the price is a loop over all N rows in each thread.
__global__ void ctl__k_colsum(float *dst, const float *src, int64_t ld, int64_t N, int64_t cols) {
    int64_t o = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (o >= cols) return;
    float s = 0.0f;
    for (int64_t n = 0; n < N; n++) s += src[n * ld + o];
    dst[o] += s;
}

static void ctl__cuda_matmul_dw(ctl_ctx *ctx, float *dw, float *dbias, const float *dout, int64_t ld, const float *inp,
                                int64_t N, int64_t C, int64_t OC) {
    ctl_cuda *c = ctl__cu(ctx);
    if (dw) ctl__cuda_gemm(ctx, OC, C, N, dout, 1, ld, inp, C, 1, dw, C, true);
    if (dbias) CTL_LAUNCH(c, ctl__k_colsum, ctl__blocks(OC, CTL__CU_THREADS), CTL__CU_THREADS, dbias, dout, ld, N, OC);
}

// ---- compressed weights ----------------------------------------------------------------------

// A block's half-precision scale (the CPU's ctl__f16: exact for every finite half).
// The half's exponent and mantissa are moved into float position as they are; the multiply by 2^112
// then rebiases the exponent (127 - 15), and half subnormals, which land as float subnormals, come out
// exact the same way. Inf and NaN get the all-ones exponent and skip the multiply.
__device__ __forceinline__ float ctl__cu_f16(const unsigned char *p) {
    unsigned h = (unsigned)p[0] | (unsigned)p[1] << 8, bits = (h & 0x7fffu) << 13;
    if ((h & 0x7c00u) == 0x7c00u) bits |= 0x7f800000u;
    float f = __uint_as_float(bits);
    if ((h & 0x7c00u) != 0x7c00u) f *= 5.192296858534828e33f;   // 2^112
    return (h & 0x8000u) ? -f : f;
}

// Bytes of one stored row of C values (the quantized types: C / 32 blocks).
static int64_t ctl__row_bytes(ctl_dtype type, int64_t C) { return (int64_t)ctl_dtype_bytes(type, C); }

// Widens value k of row `row` of a (.., C) matrix stored as `type`.
// GGML's block layouts, 32 values a block: Q8_0 is a half scale d and 32 int8 (34 bytes), value q d;
// Q4_0 is d and 16 bytes of nibbles (18), value (q - 8) d; Q4_1 is d, a half minimum m and 16 bytes
// (20), value q d + m. Values 0..15 are the low nibbles, 16..31 the high ones. A thread per value
// decodes its block's scale again each time.
__device__ float ctl__typed_at(const unsigned char *w, int type, int64_t row, int64_t k, int64_t row_bytes) {
    const unsigned char *r = w + row * row_bytes;
    if (type == CTL_F32) return ((const float *)r)[k];
    if (type == CTL_BF16) return __uint_as_float((unsigned)((const unsigned short *)r)[k] << 16);
    int bs = type == CTL_Q8_0 ? 34 : type == CTL_Q4_0 ? 18 : 20, j = (int)(k % 32);
    const unsigned char *b = r + (k / 32) * bs;
    float d = ctl__cu_f16(b);
    if (type == CTL_Q8_0) return (float)(signed char)b[2 + j] * d;
    if (type == CTL_Q4_0) return (float)((j < 16 ? b[2 + j] & 0xF : b[2 + j - 16] >> 4) - 8) * d;
    return (float)(j < 16 ? b[4 + j] & 0xF : b[4 + j - 16] >> 4) * d + ctl__cu_f16(b + 2);
}

// Rows [r0, r0 + rows) of a (.., C) matrix stored as `type`, widened to fp32: a thread per value.
__global__ void ctl__k_dequant(float *out, const unsigned char *w, int type, int64_t r0, int64_t rows, int64_t C,
                               int64_t row_bytes) {
    int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < rows * C) out[i] = ctl__typed_at(w, type, r0 + i / C, i % C, row_bytes);
}

// fp32 to bf16, round to nearest even (NaN stays NaN).
// The CPU's ctl_f32_to_bf16 bit for bit: both backends' bf16 products see the same rounded activations.
__global__ void ctl__k_to_bf16(unsigned short *out, const float *in, int64_t n) {
    int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    unsigned u = __float_as_uint(in[i]);
    out[i] = (u & 0x7fffffffu) > 0x7f800000u ? (unsigned short)((u >> 16) | 0x40) : (unsigned short)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

// The weight rows taken a slice at a time: at most 64 MiB of widened values.
// 16 Mi floats: a slice's scratch is bounded whatever OC is; a C past 16 Mi still gets one row.
static int64_t ctl__slice_rows(int64_t C, int64_t OC) {
    int64_t r = ((int64_t)16 << 20) / (C > 0 ? C : 1);
    return r < 1 ? 1 : r > OC ? OC : r;
}

// bf16 x bf16 -> fp32 on tensor cores: C (M,N) row-major = A (M,K) row-major . W (N,K)^T, with
// the activations rounded into scratch.
// The stored w (N,K) is column-major (K,N), so op T makes it the first operand. cuBLAS accumulates in
// fp32; both inputs are bf16, hence the 1e-2 tolerance. Unlike ctl__cuda_gemm, the int casts here are
// not checked against INT32_MAX.
static void ctl__gemm_bf16(ctl_cuda *c, int64_t M, int64_t N, int64_t K, const float *a, const void *w, float *out,
                           int64_t ldo, bool accumulate) {
    size_t top = c->top;
    unsigned short *ab = (unsigned short *)ctl__scratch(c, (size_t)(M * K) * 2, "bf16 product");
    if (!ab) return;
    CTL_LAUNCH(c, ctl__k_to_bf16, ctl__blocks(M * K, CTL__CU_THREADS), CTL__CU_THREADS, ab, a, M * K);
    float one = 1.0f, beta = accumulate ? 1.0f : 0.0f;
    ctl__blas_ok(c, cublasGemmEx(c->blas, CUBLAS_OP_T, CUBLAS_OP_N, (int)N, (int)M, (int)K, &one, w, CUDA_R_16BF, (int)K, ab,
                                 CUDA_R_16BF, (int)K, &beta, out, CUDA_R_32F, (int)ldo, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
                 "bf16 gemm");
    ctl__scratch_pop(c, top);
}

// The table's linear_forward for any storage type. fp32: cuBLAS directly. bf16 with bf16 products on
// (ctl_ctx_desc.bf16_dot): tensor cores on the stored weights. Otherwise (bf16 without them, Q8_0,
// Q4_0, Q4_1) the weights are widened a slice of rows at a time into scratch and multiplied in fp32
// (TF32 when on), each slice writing its own columns out[:, r0 .. r0 + rows) with ldc OC.
static void ctl__cuda_matmul_forward_typed(ctl_ctx *ctx, float *out, const float *inp, ctl_dtype type, const void *w,
                                           const float *bias, int64_t N, int64_t C, int64_t OC) {
    ctl_cuda *c = ctl__cu(ctx);
    if (type == CTL_F32) return ctl__cuda_matmul_forward(ctx, out, inp, (const float *)w, bias, N, C, OC);
    if (bias) CTL_LAUNCH(c, ctl__k_rows_set, ctl__blocks(N * OC, CTL__CU_THREADS), CTL__CU_THREADS, out, bias, N, OC);
    if (type == CTL_BF16 && c->bf16) return ctl__gemm_bf16(c, N, OC, C, inp, w, out, OC, bias != NULL);
    int64_t slice = ctl__slice_rows(C, OC), rb = ctl__row_bytes(type, C);
    size_t top = c->top;
    float *wf = (float *)ctl__scratch(c, (size_t)(slice * C) * sizeof(float), "widened weights");
    if (!wf) return;
    for (int64_t r0 = 0; r0 < OC; r0 += slice) {
        int64_t rows = OC - r0 < slice ? OC - r0 : slice;
        CTL_LAUNCH(c, ctl__k_dequant, ctl__blocks(rows * C, CTL__CU_THREADS), CTL__CU_THREADS, wf, (const unsigned char *)w,
                   (int)type, r0, rows, C, rb);
        ctl__cuda_gemm(ctx, N, rows, C, inp, C, 1, wf, 1, C, out + r0, OC, bias != NULL);
    }
    ctl__scratch_pop(c, top);
}

// The table's linear_backward: dinp += dout w through the same widened slices, in order (the bf16
// tensor-core path is forward only). No dw: these weights are frozen.
static void ctl__cuda_matmul_backward_typed(ctl_ctx *ctx, float *dinp, const float *dout, ctl_dtype type, const void *w,
                                            int64_t N, int64_t C, int64_t OC) {
    ctl_cuda *c = ctl__cu(ctx);
    if (type == CTL_F32) return ctl__cuda_gemm(ctx, N, C, OC, dout, OC, 1, (const float *)w, C, 1, dinp, C, true);
    int64_t slice = ctl__slice_rows(C, OC), rb = ctl__row_bytes(type, C);
    size_t top = c->top;
    float *wf = (float *)ctl__scratch(c, (size_t)(slice * C) * sizeof(float), "widened weights");
    if (!wf) return;
    for (int64_t r0 = 0; r0 < OC; r0 += slice) {   // dinp += dout[:, r0..] W[r0..]
        int64_t rows = OC - r0 < slice ? OC - r0 : slice;
        CTL_LAUNCH(c, ctl__k_dequant, ctl__blocks(rows * C, CTL__CU_THREADS), CTL__CU_THREADS, wf, (const unsigned char *)w,
                   (int)type, r0, rows, C, rb);
        ctl__cuda_gemm(ctx, N, C, rows, dout + r0, OC, 1, wf, C, 1, dinp, C, true);
    }
    ctl__scratch_pop(c, top);
}

// ---- embedding -------------------------------------------------------------------------------

// A thread per channel walks the rows in order: the same sums as the CPU, in the same order.
// Row r is at position pos[r] (packed rows), or r % T.
// A token that occurs twice is added to by the same thread, in row order, so repeated tokens need no
// atomics. A warp reads 32 adjacent channels of a row of dout (coalesced).
__global__ void ctl__k_embed_back(float *dwte, float *dwpe, const float *dout, const int32_t *tokens, const int32_t *pos, int64_t T,
                                  int64_t N, int64_t C) {
    int64_t c = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    for (int64_t r = 0; r < N; r++) {
        float d = dout[r * C + c];
        if (dwte) dwte[(int64_t)tokens[r] * C + c] += d;
        if (dwpe) dwpe[(pos ? (int64_t)pos[r] : r % T) * C + c] += d;
    }
}

// The table's embedding_backward. T = 1 makes r % T zero: with pos NULL every row would count as
// position 0, where the CPU kernel uses r (the model code always passes pos). Only C threads in all,
// so 64-thread blocks reach more multiprocessors than 256-thread ones would.
static void ctl__cuda_embedding_backward_rows(ctl_ctx *ctx, float *dwte, float *dwpe, const float *dout, const int32_t *tokens,
                                              const int32_t *pos, int64_t R, int64_t C) {
    ctl_cuda *c = ctl__cu(ctx);
    CTL_LAUNCH(c, ctl__k_embed_back, ctl__blocks(C, 64), 64, dwte, dwpe, dout, tokens, pos, (int64_t)1, R, C);
}

// ---- LayerNorm and RMSNorm: a warp per row ---------------------------------------------------

// A warp per row, CTL__CU_WARPS rows a block: lane l takes channels l, l+32, ..., so a warp loads 32
// adjacent floats (coalesced) and a row's sum is a warp shuffle, with no shared memory or barrier.
// The CPU sums a row left to right; here 32 strided partials meet in the butterfly, so the two agree
// within fp32 rounding rather than bit for bit, and each gives the same bits every run.

// LayerNorm (Ba et al. 2016) as the CPU's ctl__layernorm_row: two passes, the biased variance about
// the mean. The row is read again for each pass rather than held in registers: C has no bound.
__global__ void ctl__k_layernorm(float *out, float *mean, float *rstd, const float *inp, const float *w, const float *b,
                                 int64_t N, int64_t C, float eps) {
    int64_t n = (int64_t)blockIdx.x * CTL__CU_WARPS + threadIdx.x / 32;
    int lane = (int)threadIdx.x % 32;
    if (n >= N) return;   // whole warps leave together
    const float *x = inp + n * C;
    float s = 0.0f;
    for (int64_t c = lane; c < C; c += 32) s += x[c];
    float mu = ctl__warp_sum(s) / (float)C, v = 0.0f;
    for (int64_t c = lane; c < C; c += 32) v += (x[c] - mu) * (x[c] - mu);
    float rs = 1.0f / sqrtf(ctl__warp_sum(v) / (float)C + eps);
    for (int64_t c = lane; c < C; c += 32) out[n * C + c] = (x[c] - mu) * rs * w[c] + (b ? b[c] : 0.0f);
    if (lane == 0) mean[n] = mu, rstd[n] = rs;
}

static void ctl__cuda_layernorm_forward(ctl_ctx *ctx, float *out, float *mean, float *rstd, const float *inp, const float *w,
                                        const float *b, int64_t N, int64_t C, float eps) {
    ctl_cuda *c = ctl__cu(ctx);
    CTL_LAUNCH(c, ctl__k_layernorm, ctl__blocks(N, CTL__CU_WARPS), CTL__CU_THREADS, out, mean, rstd, inp, w, b, N, C, eps);
}

// dx += (dn - mean(dn) - xhat mean(dn xhat)) rstd, dn = dout w.
// s1 and s2 are the row's two means, a warp sum each; then every lane adds its channels' dx. The
// weight and bias gradients are another kernel: a warp per row cannot own a column.
__global__ void ctl__k_layernorm_back(float *dinp, const float *dout, const float *inp, const float *w, const float *mean,
                                      const float *rstd, int64_t N, int64_t C) {
    int64_t n = (int64_t)blockIdx.x * CTL__CU_WARPS + threadIdx.x / 32;
    int lane = (int)threadIdx.x % 32;
    if (n >= N) return;
    const float *x = inp + n * C, *d = dout + n * C;
    float mu = mean[n], rs = rstd[n], s1 = 0.0f, s2 = 0.0f;
    for (int64_t c = lane; c < C; c += 32) {
        float dn = d[c] * w[c];
        s1 += dn, s2 += dn * (x[c] - mu) * rs;
    }
    s1 = ctl__warp_sum(s1) / (float)C, s2 = ctl__warp_sum(s2) / (float)C;
    for (int64_t c = lane; c < C; c += 32) dinp[n * C + c] += (d[c] * w[c] - s1 - (x[c] - mu) * rs * s2) * rs;
}

// Weight (and bias) gradients of a norm: a thread per channel, rows in order. rms: no mean.
// Each row's warp adding into dw would make many writers per value; a thread per column walking the
// rows in order makes one, with no atomics and the same bits every run.
__global__ void ctl__k_norm_dw(float *dw, float *db, const float *dout, const float *inp, const float *mean,
                               const float *rstd, int64_t N, int64_t C) {
    int64_t c = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    float sw = 0.0f, sb = 0.0f;
    for (int64_t n = 0; n < N; n++) {
        float d = dout[n * C + c];
        sw += d * (inp[n * C + c] - (mean ? mean[n] : 0.0f)) * rstd[n];
        sb += d;
    }
    if (dw) dw[c] += sw;
    if (db) db[c] += sb;
}

static void ctl__cuda_layernorm_backward(ctl_ctx *ctx, float *dinp, float *dw, float *db, const float *dout, const float *inp,
                                         const float *w, const float *mean, const float *rstd, int64_t N, int64_t C) {
    ctl_cuda *c = ctl__cu(ctx);
    if (dinp)
        CTL_LAUNCH(c, ctl__k_layernorm_back, ctl__blocks(N, CTL__CU_WARPS), CTL__CU_THREADS, dinp, dout, inp, w, mean, rstd, N, C);
    if (dw || db) CTL_LAUNCH(c, ctl__k_norm_dw, ctl__blocks(C, 64), 64, dw, db, dout, inp, mean, rstd, N, C);
}

// RMSNorm (Zhang and Sennrich 2019): out = x rstd w, rstd = 1 / sqrt(mean(x^2) + eps); one pass,
// no mean.
__global__ void ctl__k_rmsnorm(float *out, float *rstd, const float *inp, const float *w, int64_t N, int64_t C, float eps) {
    int64_t n = (int64_t)blockIdx.x * CTL__CU_WARPS + threadIdx.x / 32;
    int lane = (int)threadIdx.x % 32;
    if (n >= N) return;
    const float *x = inp + n * C;
    float s = 0.0f;
    for (int64_t c = lane; c < C; c += 32) s += x[c] * x[c];
    float rs = 1.0f / sqrtf(ctl__warp_sum(s) / (float)C + eps);
    for (int64_t c = lane; c < C; c += 32) out[n * C + c] = x[c] * rs * w[c];
    if (lane == 0) rstd[n] = rs;
}

static void ctl__cuda_rmsnorm_forward(ctl_ctx *ctx, float *out, float *rstd, const float *inp, const float *w, int64_t N,
                                      int64_t C, float eps) {
    ctl_cuda *c = ctl__cu(ctx);
    CTL_LAUNCH(c, ctl__k_rmsnorm, ctl__blocks(N, CTL__CU_WARPS), CTL__CU_THREADS, out, rstd, inp, w, N, C, eps);
}

// dx += rstd (dout w - x rstd mean(dout w x rstd)).
// One warp sum per row (dot); dw comes from ctl__k_norm_dw with no mean and no bias.
__global__ void ctl__k_rmsnorm_back(float *dinp, const float *dout, const float *inp, const float *w, const float *rstd,
                                    int64_t N, int64_t C) {
    int64_t n = (int64_t)blockIdx.x * CTL__CU_WARPS + threadIdx.x / 32;
    int lane = (int)threadIdx.x % 32;
    if (n >= N) return;
    const float *x = inp + n * C, *d = dout + n * C;
    float rs = rstd[n], s = 0.0f;
    for (int64_t c = lane; c < C; c += 32) s += d[c] * w[c] * x[c];
    float dot = ctl__warp_sum(s) * rs / (float)C;
    for (int64_t c = lane; c < C; c += 32) dinp[n * C + c] += (d[c] * w[c] - x[c] * rs * dot) * rs;
}

static void ctl__cuda_rmsnorm_backward(ctl_ctx *ctx, float *dinp, float *dw, const float *dout, const float *inp,
                                       const float *w, const float *rstd, int64_t N, int64_t C) {
    ctl_cuda *c = ctl__cu(ctx);
    if (dinp) CTL_LAUNCH(c, ctl__k_rmsnorm_back, ctl__blocks(N, CTL__CU_WARPS), CTL__CU_THREADS, dinp, dout, inp, w, rstd, N, C);
    if (dw) CTL_LAUNCH(c, ctl__k_norm_dw, ctl__blocks(C, 64), 64, dw, (float *)NULL, dout, inp, (const float *)NULL, rstd, N, C);
}

// ---- attention -------------------------------------------------------------------------------
//
// Training attention works on tiles. A block takes 32 queries of one (batch row, head), four per
// warp, and walks the keys they see 32 at a time, staged in shared memory: each key and value is
// read from global memory once per 32 queries. Within a key tile lane l owns key l (its score
// against each of its warp's queries) and dims l, l+32, ... of each output row (DIMS of them:
// 2, 4 or 8, for HS up to 64, 128 or 256). The softmax is online (a running max and sum per
// query), so the T x T scores never exist. The backward recomputes the probabilities from the
// log-sum-exp: dq in the same layout, dk and dv with the roles swapped (a block takes 32 keys and
// walks the queries that see them), so every gradient element is summed by one thread, in a
// fixed order. A query skips whole key tiles outside its range (its document, up to itself);
// within a tile the keys outside it score -inf. Shared rows that a lane reads across (lane l,
// row l) are padded to HS + 1 floats so the 32 lanes hit 32 different banks.
//
// Shared memory, in floats: the forward stages q (32 x HS), k (32 x (HS + 1)) and v (32 x HS), that is
// 32 (3 HS + 1); the dq pass adds dout and pads v too, 32 (4 HS + 2); the dk and dv pass stages the
// same four plus 32 lse and 32 D values. From HS = 128 the forward needs more than the default 48 KiB,
// and at HS = 256 the three need about 96, 128 and 129 KiB: they opt in (ctl__shared_opt_in; sm_80
// allows 163 KiB). DIMS is a template argument so the 4 x DIMS accumulators stay in registers.
//
// Generation's cached attention has one query per (row, head): a warp per row (ctl__att_row).

#define CTL__ATT_DIMS 8                               // dims per lane at most: HS <= 256
#define CTL__ATT_TILE 32                              // queries per block, keys per shared tile
#define CTL__ATT_ROWS (CTL__ATT_TILE / CTL__CU_WARPS)   // queries (or keys) per warp

// The dot of v (HS, in shared memory) with row r of length HS.
// A plain loop in d: in the cached attention each lane walks its own key, so this is per thread.
__device__ __forceinline__ float ctl__dot_hs(const float *v, const float *r, int64_t HS) {
    float s = 0.0f;
    for (int64_t d = 0; d < HS; d++) s += v[d] * r[d];
    return s;
}

// The warp's row: softmax(q . k_j / sqrt(HS)) over keys j = lo..t (row j of k0, v0 at `stride`)
// applied to the values, in tiles of 32 keys with an online softmax, written to o (lane l
// writes dims l, l+32, ...; o NULL: nothing) and the scores' log-sum-exp returned. t < lo: no keys.
// Lane l scores key j0 + l: the 32 lanes read 32 different cache rows, `stride` floats apart, so the
// key reads do not coalesce; the value reads (lane l, dim l + 32 jj) do. corr rescales what was summed
// when the running max grows (the online softmax of Milakov and Gimelshein 2018).
__device__ float ctl__att_row(float *o, const float *q, const float *k0, const float *v0, int64_t stride, int64_t lo, int64_t t,
                              int64_t HS, int lane) {
    float scale = 1.0f / sqrtf((float)HS), m = -INFINITY, l = 0.0f, acc[CTL__ATT_DIMS];
    for (int j = 0; j < CTL__ATT_DIMS; j++) acc[j] = 0.0f;
    for (int64_t j0 = lo; j0 <= t; j0 += 32) {   // keys lo..t
        int64_t j = j0 + lane;
        float s = j <= t ? ctl__dot_hs(q, k0 + j * stride, HS) * scale : -INFINITY;
        float m_new = fmaxf(m, ctl__warp_max(s)), p = j <= t ? expf(s - m_new) : 0.0f, corr = expf(m - m_new);
        l = l * corr + ctl__warp_sum(p);
        for (int jj = 0; jj < CTL__ATT_DIMS; jj++) acc[jj] *= corr;
                // Key kk's weight from lane kk, keys in order: each lane's accumulators sum in key order.
        for (int kk = 0; kk < 32 && j0 + kk <= t; kk++) {
            float pk = __shfl_sync(0xffffffffu, p, kk);
            const float *v = v0 + (j0 + kk) * stride;
            for (int jj = 0; jj < CTL__ATT_DIMS && lane + 32 * jj < HS; jj++) acc[jj] += pk * v[lane + 32 * jj];
        }
        m = m_new;
    }
    for (int jj = 0; o && jj < CTL__ATT_DIMS && lane + 32 * jj < HS; jj++) o[lane + 32 * jj] = acc[jj] / l;
    return m + logf(l);
}

// The first key query row (b, t) sees: its document's start when rows are packed (pos, the
// position within the document), else 0.
__device__ __forceinline__ int64_t ctl__att_first(const int32_t *pos, int64_t b, int64_t T, int64_t t) {
    return pos ? t - pos[b * T + t] : 0;
}

// The end (one past the last query) of the document holding key row (b, j): the next row that
// starts a document when rows are packed, else T. The whole warp calls it, for the same j.
// pos NULL: one document, ending at T. Else 32 rows a step, one a lane; a warp min finds the first start.
__device__ int64_t ctl__att_doc_end(const int32_t *pos, int64_t b, int64_t T, int64_t j, int lane) {
    for (int64_t t0 = j + 1; pos && t0 < T; t0 += 32) {
        int64_t t = t0 + lane, e = t < T && pos[b * T + t] == 0 ? t : T;
        for (int o = 16; o > 0; o >>= 1) e = min(e, __shfl_xor_sync(0xffffffffu, e, o));
        if (e < T) return e;
    }
    return T;
}

// Rows 0..n-1 of a tile (HS floats each, `stride` apart from src) into shared memory at `ld`
// floats per row; rows n..31 are zeros, so no lane ever reads what no thread wrote.
// A warp per row (coalesced reads, no division by HS).
// Every thread of the block must call it (rows go to warps); the barriers around it are the caller's.
__device__ void ctl__att_stage(float *dst, int64_t ld, const float *src, int64_t stride, int64_t n, int64_t HS) {
    for (int r = (int)threadIdx.x / 32; r < CTL__ATT_TILE; r += CTL__CU_WARPS)
        for (int64_t d = threadIdx.x % 32; d < HS; d += 32) dst[r * ld + d] = r < n ? src[r * stride + d] : 0.0f;
}

// A block's rows of the tiled kernels: tile `tile` of the (b, head) pair in blockIdx.x, whose
// tiles are numbered so that the first blocks launched get the most work (causal masks leave
// the late query tiles, and the early key tiles, the most to do).
struct ctl__att_block {
    int64_t b, h, t0, n;   // n: rows of the tile (32, fewer in the last)
};

// blockIdx.x = (b * heads + h) * tiles + i: consecutive blocks take tiles of the same (b, h).
__device__ ctl__att_block ctl__att_tile(int64_t T, int64_t heads, bool late_first) {
    int64_t tiles = (T + CTL__ATT_TILE - 1) / CTL__ATT_TILE, i = (int64_t)blockIdx.x % tiles;
    int64_t tile = late_first ? tiles - 1 - i : i, t0 = tile * CTL__ATT_TILE;
    ctl__att_block k = {(int64_t)blockIdx.x / tiles / heads, (int64_t)blockIdx.x / tiles % heads, t0, min((int64_t)CTL__ATT_TILE, T - t0)};
    return k;
}

// Forward: out and the log-sum-exp of each query's scores.
// Grid: B * NH * ceil(T/32) blocks of 256 threads; warp w owns queries t0 + 4w .. t0 + 4w + 3, and
// head h reads kv head h / (NH / NKV). Key tiles start at jlo, the first key any of the block's queries
// sees, so with packed documents a tile may straddle a document start: each query's range a..e masks
// what it must not see. After the warp reductions every lane holds the same m and l.
template <int DIMS>
__global__ void ctl__k_attention(float *out, float *lse, const float *qkv, const int32_t *pos, int64_t T, int64_t NH, int64_t NKV,
                                 int64_t HS) {
    CTL__SHARED_DYN(float, sm);
    float *qs = sm, *ks = qs + CTL__ATT_TILE * HS, *vs = ks + CTL__ATT_TILE * (HS + 1);
    int warp = (int)threadIdx.x / 32, lane = (int)threadIdx.x % 32;
    ctl__att_block k = ctl__att_tile(T, NH, true);
    int64_t QKV = (NH + 2 * NKV) * HS, b = k.b, h = k.h;
    const float *k0 = qkv + b * T * QKV + (NH + h / (NH / NKV)) * HS, *v0 = k0 + NKV * HS;
    ctl__att_stage(qs, HS, qkv + (b * T + k.t0) * QKV + h * HS, QKV, k.n, HS);
    float scale = 1.0f / sqrtf((float)HS), m[CTL__ATT_ROWS], l[CTL__ATT_ROWS], acc[CTL__ATT_ROWS][DIMS];
    int64_t lo[CTL__ATT_ROWS], hi[CTL__ATT_ROWS], jlo = k.t0;   // query r sees keys lo[r]..hi[r]
    CTL__UNROLL
    for (int r = 0; r < CTL__ATT_ROWS; r++) {
        int64_t t = k.t0 + warp * CTL__ATT_ROWS + r;
        lo[r] = t < T ? ctl__att_first(pos, b, T, t) : 0, hi[r] = t < T ? t : -1, m[r] = -INFINITY, l[r] = 0.0f;
        CTL__UNROLL
        for (int jj = 0; jj < DIMS; jj++) acc[r][jj] = 0.0f;
    }
        // The tile's earliest document start: key tiles before it are seen by none of its queries.
    for (int64_t t = k.t0; t < k.t0 + k.n; t++) jlo = min(jlo, ctl__att_first(pos, b, T, t));
    for (int64_t j0 = jlo; j0 < k.t0 + k.n; j0 += CTL__ATT_TILE) {
        __syncthreads();   // the last tile has been read
        int64_t kn = min((int64_t)CTL__ATT_TILE, k.t0 + k.n - j0);
        ctl__att_stage(ks, HS + 1, k0 + j0 * QKV, QKV, kn, HS);
        ctl__att_stage(vs, HS, v0 + j0 * QKV, QKV, kn, HS);
        __syncthreads();
                // The warp's 4 queries against lane l's key: q read as a broadcast, k from lane l's padded row.
        float s[CTL__ATT_ROWS] = {0};
        for (int64_t d = 0; d < HS; d++) {
            float kd = ks[lane * (HS + 1) + d];
            CTL__UNROLL
            for (int r = 0; r < CTL__ATT_ROWS; r++) s[r] += qs[(warp * CTL__ATT_ROWS + r) * HS + d] * kd;
        }
                // a and e are the same in every lane (they depend on the query only): a skip keeps the warp whole.
        CTL__UNROLL
        for (int r = 0; r < CTL__ATT_ROWS; r++) {
            int a = (int)max(lo[r] - j0, (int64_t)0), e = (int)min(hi[r] - j0, (int64_t)CTL__ATT_TILE - 1);   // keys a..e of the tile
            if (a > e) continue;
            bool in = lane >= a && lane <= e;
            float sc = in ? s[r] * scale : -INFINITY, mn = fmaxf(m[r], ctl__warp_max(sc)), p = in ? expf(sc - mn) : 0.0f;
            float corr = expf(m[r] - mn);
            l[r] = l[r] * corr + ctl__warp_sum(p), m[r] = mn;
            CTL__UNROLL
            for (int jj = 0; jj < DIMS; jj++) acc[r][jj] *= corr;
                        // Keys a..e in order, each weight shuffled from its lane: the sum per dim is in key order.
            for (int kk = a; kk <= e; kk++) {
                float pk = __shfl_sync(0xffffffffu, p, kk);
                CTL__UNROLL
                for (int jj = 0; jj < DIMS && lane + 32 * jj < HS; jj++) acc[r][jj] += pk * vs[kk * HS + lane + 32 * jj];
            }
        }
    }
        // Lane l writes its dims of each output row; lane 0 the log-sum-exp, (B, NH, T), for the backward.
    CTL__UNROLL
    for (int r = 0; r < CTL__ATT_ROWS; r++) {
        int64_t t = k.t0 + warp * CTL__ATT_ROWS + r;
        if (t >= T) continue;
        float *o = out + (b * T + t) * NH * HS + h * HS;
        CTL__UNROLL
        for (int jj = 0; jj < DIMS && lane + 32 * jj < HS; jj++) o[lane + 32 * jj] = acc[r][jj] / l[r];
        if (lane == 0) lse[(b * NH + h) * T + t] = m[r] + logf(l[r]);
    }
}

// Kernels asking for more than the default 48 KiB of dynamic shared memory must opt in first.
// It runs before every launch, so nothing has to remember which kernels opted in. The check counts
// dynamic shared memory only: ctl__k_att_back_kv's 256 static bytes come on top.
template <typename K> static bool ctl__shared_opt_in(ctl_cuda *c, K *kernel, size_t bytes, const char *what, int64_t HS) {
    if (bytes <= (size_t)48 << 10) return true;
    if (bytes > (size_t)c->shared_max) {
        ctl__cu_fail(c, CTL_ERR_UNSUPPORTED, "%s: head size %lld needs %zu bytes of shared memory per block, the device has %d",
                     what, (long long)HS, bytes, c->shared_max);
        return false;
    }
    return ctl__cu_ok(c, cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes), what);
}

// Launches kernel<2>, <4> or <8> (dims per lane, by HS) on `grid` blocks with `bytes` of shared memory.
// Three instantiations so that DIMS is a compile-time constant; HS picks one at run time.
#define CTL__ATT_LAUNCH(c, kernel, HS, grid, bytes, what, ...)                                                  \
    do {                                                                                                          \
        if ((HS) <= 64) {                                                                                         \
            if (ctl__shared_opt_in(c, kernel<2>, bytes, what, HS))                                                \
                CTL_LAUNCH_SHARED(c, kernel<2>, grid, CTL__CU_THREADS, bytes, __VA_ARGS__);                      \
        } else if ((HS) <= 128) {                                                                                 \
            if (ctl__shared_opt_in(c, kernel<4>, bytes, what, HS))                                                \
                CTL_LAUNCH_SHARED(c, kernel<4>, grid, CTL__CU_THREADS, bytes, __VA_ARGS__);                      \
        } else if (ctl__shared_opt_in(c, kernel<8>, bytes, what, HS)) {                                           \
            CTL_LAUNCH_SHARED(c, kernel<8>, grid, CTL__CU_THREADS, bytes, __VA_ARGS__);                          \
        }                                                                                                         \
    } while (0)

// The tiled kernels' limits: 1 <= HS <= 256 (8 dims per lane, as the CPU's CTL__MAX_HEAD_DIM) and
// query heads a multiple of the kv heads. Past them: CTL_ERR_UNSUPPORTED, and no launch.
static bool ctl__att_shape_ok(ctl_cuda *c, const char *what, int64_t NH, int64_t NKV, int64_t HS) {
    if (HS >= 1 && HS <= 32 * CTL__ATT_DIMS && NKV >= 1 && NH % NKV == 0) return true;
    ctl__cu_fail(c, CTL_ERR_UNSUPPORTED, "%s: head size %lld (1 to %d), %lld heads over %lld kv heads", what, (long long)HS,
                 32 * CTL__ATT_DIMS, (long long)NH, (long long)NKV);
    return false;
}

static int64_t ctl__att_tiles(int64_t T) { return (T + CTL__ATT_TILE - 1) / CTL__ATT_TILE; }

// The table's attention_forward. No rows: no launch (a grid of 0 would be an error).
static void ctl__cuda_attention_forward_packed(ctl_ctx *ctx, float *out, float *lse, const float *qkv, const int32_t *pos, int64_t B,
                                               int64_t T, int64_t NH, int64_t NKV, int64_t HS) {
    ctl_cuda *c = ctl__cu(ctx);
    if (!ctl__att_shape_ok(c, "attention", NH, NKV, HS) || B * T == 0) return;
    size_t bytes = (size_t)CTL__ATT_TILE * (size_t)(3 * HS + 1) * sizeof(float);
    CTL__ATT_LAUNCH(c, ctl__k_attention, HS, B * NH * ctl__att_tiles(T), bytes, "attention", out, lse, qkv, pos, T, NH, NKV, HS);
}

// D (B,NH,T) = dout . out per row: the softmax backward's row term.
// A warp per (b, h, t), numbered in lse's (B, NH, T) order, so the backward indexes both alike.
__global__ void ctl__k_att_rowdot(float *D, const float *dout, const float *out, int64_t rows, int64_t T, int64_t NH,
                                  int64_t HS) {
    int64_t row = (int64_t)blockIdx.x * CTL__CU_WARPS + threadIdx.x / 32;
    int lane = (int)threadIdx.x % 32;
    if (row >= rows) return;
    int64_t t = row % T, h = row / T % NH, b = row / T / NH, off = (b * T + t) * NH * HS + h * HS;
    float s = 0.0f;
    for (int64_t d = lane; d < HS; d += 32) s += dout[off + d] * out[off + d];
    s = ctl__warp_sum(s);
    if (lane == 0) D[row] = s;
}

// The backward's two scores for each of the warp's rows r: x[r] = a_r . a'_lane and
// y[r] = b_r . b'_lane, a and b the block's own rows (HS apart), a' and b' the tile being walked
// (HS + 1 apart, lane l reading row l).
// dq and dk/dv each need two scores per pair (q . k for p, dout . v for dp): one loop over d makes both.
__device__ __forceinline__ void ctl__att_dots2(float *x, float *y, const float *a, const float *a2, const float *b, const float *b2,
                                               int64_t HS, int warp, int lane) {
    CTL__UNROLL
    for (int r = 0; r < CTL__ATT_ROWS; r++) x[r] = y[r] = 0.0f;
    for (int64_t d = 0; d < HS; d++) {
        float ad = a2[lane * (HS + 1) + d], bd = b2[lane * (HS + 1) + d];
        CTL__UNROLL
        for (int r = 0; r < CTL__ATT_ROWS; r++) {
            x[r] += a[(warp * CTL__ATT_ROWS + r) * HS + d] * ad;
            y[r] += b[(warp * CTL__ATT_ROWS + r) * HS + d] * bd;
        }
    }
}

// dq for query (b, h, t): the sum over the keys j it sees of ds_j k_j scale, ds_j = p_j (dout . v_j - D).
// Same grid and warp layout as the forward. Shared: q and dout of the block's queries (HS apart, read
// as broadcasts), k and v of the key tile (HS + 1 apart: lane l reads row l). p is recomputed as
// exp(q . k scale - lse), so nothing of size T x T was kept.
template <int DIMS>
__global__ void ctl__k_att_back_q(float *dqkv, const float *dout, const float *qkv, const float *lse, const float *D,
                                  const int32_t *pos, int64_t T, int64_t NH, int64_t NKV, int64_t HS) {
    CTL__SHARED_DYN(float, sm);
    float *qs = sm, *gs = qs + CTL__ATT_TILE * HS, *ks = gs + CTL__ATT_TILE * HS, *vs = ks + CTL__ATT_TILE * (HS + 1);
    int warp = (int)threadIdx.x / 32, lane = (int)threadIdx.x % 32;
    ctl__att_block k = ctl__att_tile(T, NH, true);
    int64_t QKV = (NH + 2 * NKV) * HS, b = k.b, h = k.h;
    const float *k0 = qkv + b * T * QKV + (NH + h / (NH / NKV)) * HS, *v0 = k0 + NKV * HS;
    ctl__att_stage(qs, HS, qkv + (b * T + k.t0) * QKV + h * HS, QKV, k.n, HS);
    ctl__att_stage(gs, HS, dout + (b * T + k.t0) * NH * HS + h * HS, NH * HS, k.n, HS);
    float scale = 1.0f / sqrtf((float)HS), L[CTL__ATT_ROWS], Dr[CTL__ATT_ROWS], acc[CTL__ATT_ROWS][DIMS];
    int64_t lo[CTL__ATT_ROWS], hi[CTL__ATT_ROWS], jlo = k.t0;
    CTL__UNROLL
    for (int r = 0; r < CTL__ATT_ROWS; r++) {
        int64_t t = k.t0 + warp * CTL__ATT_ROWS + r, row = (b * NH + h) * T + t;
        lo[r] = t < T ? ctl__att_first(pos, b, T, t) : 0, hi[r] = t < T ? t : -1;
        L[r] = t < T ? lse[row] : 0.0f, Dr[r] = t < T ? D[row] : 0.0f;
        CTL__UNROLL
        for (int jj = 0; jj < DIMS; jj++) acc[r][jj] = 0.0f;
    }
    for (int64_t t = k.t0; t < k.t0 + k.n; t++) jlo = min(jlo, ctl__att_first(pos, b, T, t));
    for (int64_t j0 = jlo; j0 < k.t0 + k.n; j0 += CTL__ATT_TILE) {
        __syncthreads();
        int64_t kn = min((int64_t)CTL__ATT_TILE, k.t0 + k.n - j0);
        ctl__att_stage(ks, HS + 1, k0 + j0 * QKV, QKV, kn, HS);
        ctl__att_stage(vs, HS + 1, v0 + j0 * QKV, QKV, kn, HS);
        __syncthreads();
        float sq[CTL__ATT_ROWS], sg[CTL__ATT_ROWS];
        ctl__att_dots2(sq, sg, qs, ks, gs, vs, HS, warp, lane);
        CTL__UNROLL
        for (int r = 0; r < CTL__ATT_ROWS; r++) {
            int a = (int)max(lo[r] - j0, (int64_t)0), e = (int)min(hi[r] - j0, (int64_t)CTL__ATT_TILE - 1);
            if (a > e) continue;
                        // ds for lane l's key; dq then gathers the tile's keys in key order, one shuffle each.
            float ds = lane >= a && lane <= e ? expf(sq[r] * scale - L[r]) * (sg[r] - Dr[r]) : 0.0f;
            for (int kk = a; kk <= e; kk++) {
                float dk = __shfl_sync(0xffffffffu, ds, kk);
                CTL__UNROLL
                for (int jj = 0; jj < DIMS && lane + 32 * jj < HS; jj++) acc[r][jj] += dk * ks[kk * (HS + 1) + lane + 32 * jj];
            }
        }
    }
    CTL__UNROLL
    for (int r = 0; r < CTL__ATT_ROWS; r++) {
        int64_t t = k.t0 + warp * CTL__ATT_ROWS + r;
        if (t >= T) continue;
        float *dq = dqkv + (b * T + t) * QKV + h * HS;
        CTL__UNROLL
        for (int jj = 0; jj < DIMS && lane + 32 * jj < HS; jj++) dq[lane + 32 * jj] += acc[r][jj] * scale;
    }
}

// dk, dv for key (b, kv head g, j): sums over the group's query heads and the queries that see
// the key (t >= j, within its document).
// The keys' side, roles swapped: a block owns 32 keys of one kv head (grid B * NKV * ceil(T/32)) and
// walks each query head of the group, then the query tiles from its first key to thi. Each dk and dv
// value is summed by one thread, heads then queries in order: no atomics, the same bits every run.
// Early key tiles are seen by the most queries, so they launch first (late_first false).
template <int DIMS>
__global__ void ctl__k_att_back_kv(float *dqkv, const float *dout, const float *qkv, const float *lse, const float *D,
                                   const int32_t *pos, int64_t T, int64_t NH, int64_t NKV, int64_t HS) {
    CTL__SHARED_DYN(float, sm);
    float *ks = sm, *vs = ks + CTL__ATT_TILE * HS, *qs = vs + CTL__ATT_TILE * HS, *gs = qs + CTL__ATT_TILE * (HS + 1);
    float *ls = gs + CTL__ATT_TILE * (HS + 1), *Ds = ls + CTL__ATT_TILE;
    __shared__ int64_t ends[CTL__ATT_TILE];
    int warp = (int)threadIdx.x / 32, lane = (int)threadIdx.x % 32;
    ctl__att_block k = ctl__att_tile(T, NKV, false);
    int64_t QKV = (NH + 2 * NKV) * HS, b = k.b, g = k.h, group = NH / NKV;
    ctl__att_stage(ks, HS, qkv + (b * T + k.t0) * QKV + (NH + g) * HS, QKV, k.n, HS);
    ctl__att_stage(vs, HS, qkv + (b * T + k.t0) * QKV + (NH + NKV + g) * HS, QKV, k.n, HS);
    float scale = 1.0f / sqrtf((float)HS), dk[CTL__ATT_ROWS][DIMS], dv[CTL__ATT_ROWS][DIMS];
    int64_t lo[CTL__ATT_ROWS], end[CTL__ATT_ROWS];   // key r is seen by queries lo[r]..end[r]-1
    CTL__UNROLL
    for (int r = 0; r < CTL__ATT_ROWS; r++) {
        int64_t j = k.t0 + warp * CTL__ATT_ROWS + r;
        lo[r] = j, end[r] = j < T ? ctl__att_doc_end(pos, b, T, j, lane) : 0;
        if (lane == 0) ends[warp * CTL__ATT_ROWS + r] = end[r];
        CTL__UNROLL
        for (int jj = 0; jj < DIMS; jj++) dk[r][jj] = dv[r][jj] = 0.0f;
    }
    __syncthreads();
    int64_t thi = 0;   // one past the last query any key of the block is seen by
    for (int i = 0; i < CTL__ATT_TILE; i++) thi = max(thi, ends[i]);
    for (int64_t h = g * group; h < (g + 1) * group; h++)
        for (int64_t t0 = k.t0; t0 < thi; t0 += CTL__ATT_TILE) {
            __syncthreads();
            int64_t qn = min((int64_t)CTL__ATT_TILE, thi - t0);
            ctl__att_stage(qs, HS + 1, qkv + (b * T + t0) * QKV + h * HS, QKV, qn, HS);
            ctl__att_stage(gs, HS + 1, dout + (b * T + t0) * NH * HS + h * HS, NH * HS, qn, HS);
                        // lse and D of the tile's queries; each lane reads its own query's, so no padding.
            for (int64_t i = threadIdx.x; i < CTL__ATT_TILE; i += blockDim.x) {
                ls[i] = i < qn ? lse[(b * NH + h) * T + t0 + i] : 0.0f;
                Ds[i] = i < qn ? D[(b * NH + h) * T + t0 + i] : 0.0f;
            }
            __syncthreads();
            float sq[CTL__ATT_ROWS], sg[CTL__ATT_ROWS];
            ctl__att_dots2(sq, sg, ks, qs, vs, gs, HS, warp, lane);
                        // p and ds of lane l's query for each key r; the queries then reach every lane by shuffle.
            CTL__UNROLL
            for (int r = 0; r < CTL__ATT_ROWS; r++) {
                int a = (int)max(lo[r] - t0, (int64_t)0), e = (int)min(end[r] - 1 - t0, (int64_t)CTL__ATT_TILE - 1);   // queries a..e
                if (a > e) continue;
                bool in = lane >= a && lane <= e;
                float p = in ? expf(sq[r] * scale - ls[lane]) : 0.0f, ds = in ? p * (sg[r] - Ds[lane]) : 0.0f;
                for (int kk = a; kk <= e; kk++) {
                    float pk = __shfl_sync(0xffffffffu, p, kk), dsk = __shfl_sync(0xffffffffu, ds, kk);
                    CTL__UNROLL
                    for (int jj = 0; jj < DIMS && lane + 32 * jj < HS; jj++) {
                        dk[r][jj] += dsk * qs[kk * (HS + 1) + lane + 32 * jj];
                        dv[r][jj] += pk * gs[kk * (HS + 1) + lane + 32 * jj];
                    }
                }
            }
        }
        // dk takes the softmax scale once here rather than in every term.
    CTL__UNROLL
    for (int r = 0; r < CTL__ATT_ROWS; r++) {
        int64_t j = k.t0 + warp * CTL__ATT_ROWS + r;
        if (j >= T) continue;
        float *dkr = dqkv + (b * T + j) * QKV + (NH + g) * HS, *dvr = dkr + NKV * HS;
        CTL__UNROLL
        for (int jj = 0; jj < DIMS && lane + 32 * jj < HS; jj++) {
            dkr[lane + 32 * jj] += dk[r][jj] * scale;
            dvr[lane + 32 * jj] += dv[r][jj];
        }
    }
}

// The table's attention_backward. D (B,NH,T) = dout . out per query is scratch from the top; the two
// passes write disjoint parts of dqkv (q; k and v), and D is popped once both are queued.
static void ctl__cuda_attention_backward_packed(ctl_ctx *ctx, float *dqkv, const float *dout, const float *qkv, const float *out,
                                                const float *lse, const int32_t *pos, int64_t B, int64_t T, int64_t NH, int64_t NKV,
                                                int64_t HS) {
    ctl_cuda *c = ctl__cu(ctx);
    if (!ctl__att_shape_ok(c, "attention backward", NH, NKV, HS) || B * T == 0) return;
    size_t top = c->top;
    float *D = (float *)ctl__scratch(c, (size_t)(B * NH * T) * sizeof(float), "attention backward");
    if (!D) return;
    size_t bytes = (size_t)CTL__ATT_TILE * (size_t)(4 * HS + 2) * sizeof(float);
    CTL_LAUNCH(c, ctl__k_att_rowdot, ctl__blocks(B * NH * T, CTL__CU_WARPS), CTL__CU_THREADS, D, dout, out, B * NH * T, T, NH, HS);
    CTL__ATT_LAUNCH(c, ctl__k_att_back_q, HS, B * NH * ctl__att_tiles(T), bytes, "attention backward", dqkv, dout, qkv, lse, D, pos,
                    T, NH, NKV, HS);
    CTL__ATT_LAUNCH(c, ctl__k_att_back_kv, HS, B * NKV * ctl__att_tiles(T), bytes + 2 * CTL__ATT_TILE * sizeof(float),
                    "attention backward", dqkv, dout, qkv, lse, D, pos, T, NH, NKV, HS);
    ctl__scratch_pop(c, top);
}

// ---- generation: rows at their own positions, the KV cache -----------------------------------

// Generation feeds rows of several sequences at once, each at its own position pos[r]: these kernels
// index by row, never by r % T.

// The table's embedding_forward, for training too: out (R,C) = wte[tokens[r]] (widened) + wpe[pos[r]].
__global__ void ctl__k_embed_rows(float *out, const int32_t *tokens, const int32_t *pos, int type, const unsigned char *wte,
                                  int64_t row_bytes, const float *wpe, int64_t R, int64_t C) {
    int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= R * C) return;
    int64_t r = i / C, c = i % C;
    out[i] = ctl__typed_at(wte, type, tokens[r], c, row_bytes) + (wpe ? wpe[(int64_t)pos[r] * C + c] : 0.0f);
}

static void ctl__cuda_embedding_rows(ctl_ctx *ctx, float *out, const int32_t *tokens, const int32_t *pos, ctl_dtype type,
                                     const void *wte, const float *wpe, int64_t R, int64_t C) {
    ctl_cuda *c = ctl__cu(ctx);
    CTL_LAUNCH(c, ctl__k_embed_rows, ctl__blocks(R * C, CTL__CU_THREADS), CTL__CU_THREADS, out, tokens, pos, (int)type,
               (const unsigned char *)wte, ctl__row_bytes(type, C), wpe, R, C);
}

// A thread per rotated pair (row r, head h, pair i), angle from the tables at (pos[r], i). ADJACENT
// pairs dims 2i and 2i + 1 (llama's GGUF layout), HALVES i and i + HS/2 (NeoX's). sign -1 turns back:
// the rotation's transpose, its exact backward. row_stride lets it work in place on qkv rows.
__global__ void ctl__k_rope_rows(float *x, const float *cos_t, const float *sin_t, const int32_t *pos, int64_t R,
                                 int64_t n_heads, int64_t HS, int64_t row_stride, int adjacent, float sign) {
    int64_t half = HS / 2, j = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= R * n_heads * half) return;
    int64_t i = j % half, h = j / half % n_heads, r = j / half / n_heads, p = pos[r];
    float *v = x + r * row_stride + h * HS;
    int64_t i0 = adjacent ? 2 * i : i, i1 = adjacent ? 2 * i + 1 : i + half;
    float x0 = v[i0], x1 = v[i1], c = cos_t[p * half + i], s = sign * sin_t[p * half + i];
    v[i0] = x0 * c - x1 * s;
    v[i1] = x0 * s + x1 * c;
}

static void ctl__cuda_rope_rows_backward(ctl_ctx *ctx, float *dx, const float *cos_t, const float *sin_t, const int32_t *pos, int64_t R,
                                         int64_t n_heads, int64_t HS, int64_t row_stride, ctl_rope_layout layout) {
    ctl_cuda *c = ctl__cu(ctx);
    CTL_LAUNCH(c, ctl__k_rope_rows, ctl__blocks(R * n_heads * (HS / 2), CTL__CU_THREADS), CTL__CU_THREADS, dx, cos_t, sin_t, pos, R,
               n_heads, HS, row_stride, layout == CTL_ROPE_ADJACENT, -1.0f);
}

static void ctl__cuda_rope_rows(ctl_ctx *ctx, float *x, const float *cos_t, const float *sin_t, const int32_t *pos, int64_t R,
                                int64_t n_heads, int64_t HS, int64_t row_stride, ctl_rope_layout layout) {
    ctl_cuda *c = ctl__cu(ctx);
    CTL_LAUNCH(c, ctl__k_rope_rows, ctl__blocks(R * n_heads * (HS / 2), CTL__CU_THREADS), CTL__CU_THREADS, x, cos_t, sin_t, pos, R,
               n_heads, HS, row_stride, layout == CTL_ROPE_ADJACENT, 1.0f);
}

// Cache entry (layer, seq, pos) of (L, S, max_len, NKV*HS).
__device__ __forceinline__ int64_t ctl__kv_at(int64_t layer, int64_t S, int64_t seq, int64_t max_len, int64_t pos, int64_t KVD) {
    return ((layer * S + seq) * max_len + pos) * KVD;
}

// A thread per cached value: row r's k and v parts of qkv (after RoPE) go to (layer, seq[r], pos[r]).
// Rows of one call are expected to have distinct (seq, pos); two sharing one would race.
__global__ void ctl__k_kv_store(float *kc, float *vc, const float *qkv, const int64_t *seq, const int32_t *pos, int64_t R,
                                int64_t layer, int64_t S, int64_t max_len, int64_t NH, int64_t KVD, int64_t HS) {
    int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= R * KVD) return;
    int64_t r = i / KVD, d = i % KVD, QKV = NH * HS + 2 * KVD, at = ctl__kv_at(layer, S, seq[r], max_len, pos[r], KVD) + d;
    kc[at] = qkv[r * QKV + NH * HS + d];
    vc[at] = qkv[r * QKV + NH * HS + KVD + d];
}

static void ctl__cuda_kv_store(ctl_ctx *ctx, float *kcache, float *vcache, const float *qkv, const int64_t *seq,
                               const int32_t *pos, int64_t R, int64_t layer, int64_t S, int64_t max_len, int64_t NH,
                               int64_t NKV, int64_t HS) {
    ctl_cuda *c = ctl__cu(ctx);
    CTL_LAUNCH(c, ctl__k_kv_store, ctl__blocks(R * NKV * HS, CTL__CU_THREADS), CTL__CU_THREADS, kcache, vcache, qkv, seq, pos, R,
               layer, S, max_len, NH, NKV * HS, HS);
}

// A warp per (row, head): the row's query against its sequence's cached keys 0..pos[r].
// Grid: ceil(R NH / 8) blocks, warp w of block i is task 8i + w. The query is staged in the warp's
// slice of shared memory (256 floats: HS <= 256) so ctl__dot_hs reads it as a broadcast. A warp past
// the last task runs with no keys and writes nothing; tasks are whole warps, so __syncwarp never splits one.
__global__ void ctl__k_att_cached(float *out, const float *qkv, const float *kc, const float *vc, const int64_t *seq,
                                  const int32_t *pos, int64_t R, int64_t layer, int64_t S, int64_t max_len, int64_t NH,
                                  int64_t NKV, int64_t HS) {
    __shared__ float qs[CTL__CU_WARPS][CTL__ATT_DIMS * 32];
    int warp = (int)threadIdx.x / 32, lane = (int)threadIdx.x % 32;
    int64_t task = (int64_t)blockIdx.x * CTL__CU_WARPS + warp;
    bool live = task < R * NH;
    int64_t r = live ? task / NH : 0, h = live ? task % NH : 0, KVD = NKV * HS, QKV = NH * HS + 2 * KVD;
    int64_t t = live ? pos[r] : -1, base = live ? ctl__kv_at(layer, S, seq[r], max_len, 0, KVD) + h / (NH / NKV) * HS : 0;
    const float *k0 = kc + base, *v0 = vc + base;
    for (int64_t d = lane; live && d < HS; d += 32) qs[warp][d] = qkv[r * QKV + h * HS + d];
    __syncwarp();
    ctl__att_row(live ? out + r * NH * HS + h * HS : NULL, qs[warp], k0, v0, KVD, 0, t, HS, lane);
}

// HS past 256, or heads that do not group: CTL_ERR_UNSUPPORTED (the message names only the head size).
static void ctl__cuda_attention_cached(ctl_ctx *ctx, float *out, const float *qkv, const float *kcache, const float *vcache,
                                       const int64_t *seq, const int32_t *pos, int64_t R, int64_t layer, int64_t S,
                                       int64_t max_len, int64_t NH, int64_t NKV, int64_t HS) {
    ctl_cuda *c = ctl__cu(ctx);
    if (HS > 32 * CTL__ATT_DIMS || NKV < 1 || NH % NKV) {
        ctl__cu_fail(c, CTL_ERR_UNSUPPORTED, "cached attention: head size %lld (at most %d)", (long long)HS, 32 * CTL__ATT_DIMS);
        return;
    }
    CTL_LAUNCH(c, ctl__k_att_cached, ctl__blocks(R * NH, CTL__CU_WARPS), CTL__CU_THREADS, out, qkv, kcache, vcache, seq, pos, R,
               layer, S, max_len, NH, NKV, HS);
}

// ---- activations and residual: a thread per value ---------------------------------------------

// Elementwise: a thread per value, consecutive threads on consecutive values (coalesced).
#define CTL__CU_GELU_K 0.7978845608028654f   // sqrt(2/pi)

// GELU, tanh approximation (Hendrycks and Gimpel 2016, as GPT-2): 0.5 x (1 + tanh(k (x + 0.044715 x^3))).
__global__ void ctl__k_gelu(float *out, const float *inp, int64_t n) {
    int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float x = inp[i];
    out[i] = 0.5f * x * (1.0f + tanhf(CTL__CU_GELU_K * (x + 0.044715f * x * x * x)));
}

// d/dx = 0.5 (1 + th) + 0.5 x (1 - th^2) k (1 + 3 * 0.044715 x^2), th recomputed from x: the forward
// keeps only its input.
__global__ void ctl__k_gelu_back(float *dinp, const float *dout, const float *inp, int64_t n) {
    int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float x = inp[i], th = tanhf(CTL__CU_GELU_K * (x + 0.044715f * x * x * x)), sech2 = 1.0f - th * th;
    dinp[i] += (0.5f * (1.0f + th) + 0.5f * x * sech2 * CTL__CU_GELU_K * (1.0f + 3.0f * 0.044715f * x * x)) * dout[i];
}

static void ctl__cuda_gelu_forward(ctl_ctx *ctx, float *out, const float *inp, int64_t n) {
    ctl_cuda *c = ctl__cu(ctx);
    CTL_LAUNCH(c, ctl__k_gelu, ctl__blocks(n, CTL__CU_THREADS), CTL__CU_THREADS, out, inp, n);
}

static void ctl__cuda_gelu_backward(ctl_ctx *ctx, float *dinp, const float *dout, const float *inp, int64_t n) {
    ctl_cuda *c = ctl__cu(ctx);
    CTL_LAUNCH(c, ctl__k_gelu_back, ctl__blocks(n, CTL__CU_THREADS), CTL__CU_THREADS, dinp, dout, inp, n);
}

// SwiGLU (Shazeer 2020): inp (N, 2 FF) is [gate | up] per row; out (N,FF) = silu(gate) up, silu(g) = g sigmoid(g).
__global__ void ctl__k_swiglu(float *out, const float *inp, int64_t N, int64_t FF) {
    int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= N * FF) return;
    int64_t n = i / FF, f = i % FF;
    float g = inp[n * 2 * FF + f];
    out[i] = g / (1.0f + expf(-g)) * inp[n * 2 * FF + FF + f];
}

// d gate = dout up sig (1 + g (1 - sig)), d up = dout silu(g): a thread adds to its own two inputs only.
__global__ void ctl__k_swiglu_back(float *dinp, const float *dout, const float *inp, int64_t N, int64_t FF) {
    int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= N * FF) return;
    int64_t n = i / FF, f = i % FF, gi = n * 2 * FF + f;
    float g = inp[gi], u = inp[gi + FF], sig = 1.0f / (1.0f + expf(-g)), d = dout[i];
    dinp[gi] += d * u * sig * (1.0f + g * (1.0f - sig));
    dinp[gi + FF] += d * g * sig;
}

static void ctl__cuda_swiglu_forward(ctl_ctx *ctx, float *out, const float *inp, int64_t N, int64_t FF) {
    ctl_cuda *c = ctl__cu(ctx);
    CTL_LAUNCH(c, ctl__k_swiglu, ctl__blocks(N * FF, CTL__CU_THREADS), CTL__CU_THREADS, out, inp, N, FF);
}

static void ctl__cuda_swiglu_backward(ctl_ctx *ctx, float *dinp, const float *dout, const float *inp, int64_t N, int64_t FF) {
    ctl_cuda *c = ctl__cu(ctx);
    CTL_LAUNCH(c, ctl__k_swiglu_back, ctl__blocks(N * FF, CTL__CU_THREADS), CTL__CU_THREADS, dinp, dout, inp, N, FF);
}

// The residual stream: out = a + b. out may be a or b: each thread reads its values before it writes.
__global__ void ctl__k_add(float *out, const float *a, const float *b, int64_t n) {
    int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = a[i] + b[i];
}

static void ctl__cuda_residual_forward(ctl_ctx *ctx, float *out, const float *a, const float *b, int64_t n) {
    ctl_cuda *c = ctl__cu(ctx);
    CTL_LAUNCH(c, ctl__k_add, ctl__blocks(n, CTL__CU_THREADS), CTL__CU_THREADS, out, a, b, n);
}

// ---- fused LM head + log-softmax: a block per row of a chunk's logits ------------------------

// Logits exist a chunk of rows at a time, in scratch (chunk x V floats from the top of the block), and
// the backward makes them again from lse alone (DESIGN.md 2).
// lse = max + log sum e^(z s - max) (the sums in double, as on the CPU); logp = z[target] s - lse;
// with entropy, also -sum p log p = log S - sum e^u u / S, u = z s - max, S = sum e^u.
// A block per row of the chunk, threads striding over V. Both sums use shd, which ctl__block_sum's
// first barrier makes safe. The sums' order is not the CPU's: they agree within rounding.
__global__ void ctl__k_lse(float *logp, float *lse, float *entropy, const float *z, const int32_t *targets, int64_t V, float s) {
    __shared__ float shm[CTL__CU_WARPS];
    __shared__ double shd[CTL__CU_WARPS];
    const float *zr = z + (int64_t)blockIdx.x * V;
    float mx = -INFINITY;
    for (int64_t v = threadIdx.x; v < V; v += blockDim.x) mx = fmaxf(mx, zr[v] * s);
    mx = ctl__block_max(mx, shm);
    double sum = 0.0, su = 0.0;
    for (int64_t v = threadIdx.x; v < V; v += blockDim.x) {
        float u = zr[v] * s - mx, e = expf(u);
        sum += (double)e;
        if (entropy) su += (double)e * u;
    }
    sum = ctl__block_sum(sum, shd);
    if (entropy) su = ctl__block_sum(su, shd);
    if (threadIdx.x == 0) {
        float l = mx + (float)log(sum);
        lse[blockIdx.x] = l;
        logp[blockIdx.x] = zr[targets[blockIdx.x]] * s - l;
        if (entropy) entropy[blockIdx.x] = (float)(log(sum) - su / sum);
    }
}

// The chunk's logits become d logp / d z in place: dlogp s (1[v = target] - e^(z s - lse)).
// A block per row, each thread its strided values: no reduction, nothing shared.
__global__ void ctl__k_dlogits(float *z, const float *dlogp, const float *lse, const int32_t *targets, int64_t V, float s) {
    float *zr = z + (int64_t)blockIdx.x * V, g = dlogp[blockIdx.x] * s, l = lse[blockIdx.x];
    int64_t tgt = targets[blockIdx.x];
    for (int64_t v = threadIdx.x; v < V; v += blockDim.x) zr[v] = (v == tgt ? g : 0.0f) - g * expf(zr[v] * s - l);
}

// chunk clamped to 1..N (with N = 0, to 1, and the loops below do not run).
static int64_t ctl__chunk(int64_t chunk, int64_t N) { return chunk < 1 ? 1 : chunk > N ? (N > 0 ? N : 1) : chunk; }

// The table's lmhead_forward. Per chunk: z (rows,V) = x W^T through the typed product (a quantized
// head is widened slice by slice inside it, its scratch below z), plus the head's LoRA h lora_b^T,
// then a block per row. z is popped after the loop: later work on the stream runs after it.
static void ctl__cuda_lmhead_forward_typed(ctl_ctx *ctx, float *logp, float *lse, float *entropy, const float *x, ctl_dtype type,
                                           const void *w, int64_t R, const float *h, const float *lora_b, const int32_t *targets,
                                           int64_t N, int64_t C, int64_t V, float inv_temp, int64_t chunk) {
    ctl_cuda *c = ctl__cu(ctx);
    chunk = ctl__chunk(chunk, N);
    size_t top = c->top;
    float *z = (float *)ctl__scratch(c, (size_t)(chunk * V) * sizeof(float), "lm head");
    if (!z) return;
    for (int64_t r0 = 0; r0 < N; r0 += chunk) {
        int64_t rows = N - r0 < chunk ? N - r0 : chunk;
        ctl__cuda_matmul_forward_typed(ctx, z, x + r0 * C, type, w, NULL, rows, C, V);
        if (R) ctl__cuda_gemm(ctx, rows, V, R, h + r0 * R, R, 1, lora_b, 1, R, z, V, true);
        CTL_LAUNCH(c, ctl__k_lse, rows, CTL__CU_THREADS, logp + r0, lse + r0, entropy ? entropy + r0 : NULL, z, targets + r0, V,
                   inv_temp);
    }
    ctl__scratch_pop(c, top);
}

// Per chunk: the logits again, made d logits in place, then dx += dz W (typed), dw += dz^T x (fp32
// heads only, where the CPU adds dw whatever the type), dh = dz lora_b written, dlora_b += dz^T h.
// The CPU gathers only the rows whose dlogp is not zero; here every row is made again, and a zero
// row gives zero d logits, so the results agree and only the work differs.
static void ctl__cuda_lmhead_backward_typed(ctl_ctx *ctx, float *dx, float *dw, const float *dlogp, const float *x, ctl_dtype type,
                                            const void *w, int64_t R, const float *h, const float *lora_b, float *dh,
                                            float *dlora_b, const int32_t *targets, const float *lse, int64_t N, int64_t C,
                                            int64_t V, float inv_temp, int64_t chunk) {
    ctl_cuda *c = ctl__cu(ctx);
    chunk = ctl__chunk(chunk, N);
    size_t top = c->top;
    float *z = (float *)ctl__scratch(c, (size_t)(chunk * V) * sizeof(float), "lm head backward");
    if (!z) return;
    for (int64_t r0 = 0; r0 < N; r0 += chunk) {
        int64_t rows = N - r0 < chunk ? N - r0 : chunk;
        ctl__cuda_matmul_forward_typed(ctx, z, x + r0 * C, type, w, NULL, rows, C, V);
        if (R) ctl__cuda_gemm(ctx, rows, V, R, h + r0 * R, R, 1, lora_b, 1, R, z, V, true);
        CTL_LAUNCH(c, ctl__k_dlogits, rows, CTL__CU_THREADS, z, dlogp + r0, lse + r0, targets + r0, V, inv_temp);
        if (dx) ctl__cuda_matmul_backward_typed(ctx, dx + r0 * C, z, type, w, rows, C, V);
        if (dw && type == CTL_F32) ctl__cuda_gemm(ctx, V, C, rows, z, 1, V, x + r0 * C, C, 1, dw, C, true);
        if (R && dh) ctl__cuda_gemm(ctx, rows, R, V, z, V, 1, lora_b, R, 1, dh + r0 * R, R, false);
        if (R && dlora_b) ctl__cuda_gemm(ctx, V, R, rows, z, 1, V, h + r0 * R, R, 1, dlora_b, R, true);
    }
    ctl__scratch_pop(c, top);
}

// ---- adapters --------------------------------------------------------------------------------

__global__ void ctl__k_scale(float *x, int64_t n, float s) {
    int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] *= s;
}

static void ctl__cuda_scale(ctl_ctx *ctx, float *x, int64_t n, float s) {
    ctl_cuda *c = ctl__cu(ctx);
    CTL_LAUNCH(c, ctl__k_scale, ctl__blocks(n, CTL__CU_THREADS), CTL__CU_THREADS, x, n, s);
}

__global__ void ctl__k_zero(float *x, int64_t n) {
    int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] = 0.0f;
}

static void ctl__cuda_zero(ctl_ctx *ctx, float *x, int64_t n) {
    ctl_cuda *c = ctl__cu(ctx);
    CTL_LAUNCH(c, ctl__k_zero, ctl__blocks(n, CTL__CU_THREADS), CTL__CU_THREADS, x, n);
}

// ctl__keep's hash, bit for bit: element i is kept when its 24-bit draw is >= p.
// SplitMix64's finaliser over seed + i * 2^64/phi: a function of (seed, i) alone, so the backward
// remakes the mask instead of storing it and both backends drop the same elements. Every draw is
// below 1, so p = 1 keeps nothing and the infinite inv never multiplies.
__global__ void ctl__k_dropout(float *dst, const float *src, int64_t n, float p, float inv, uint64_t seed, bool accumulate) {
    int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    uint64_t x = seed + (uint64_t)i * 0x9E3779B97F4A7C15ull;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    float v = (double)((x ^ (x >> 31)) >> 40) * (1.0 / 16777216.0) >= p ? src[i] * inv : 0.0f;
    dst[i] = accumulate ? dst[i] + v : v;
}

static void ctl__cuda_dropout(ctl_ctx *ctx, float *dst, const float *src, int64_t n, float p, uint64_t seed, bool accumulate) {
    ctl_cuda *c = ctl__cu(ctx);
    CTL_LAUNCH(c, ctl__k_dropout, ctl__blocks(n, CTL__CU_THREADS), CTL__CU_THREADS, dst, src, n, p, 1.0f / (1.0f - p), seed,
               accumulate);
}

// LoRA (Hu et al. 2021): h (N,R) = scale x A^T, then out (rows ldo apart) += h B^T onto the base output.
static void ctl__cuda_lora_forward(ctl_ctx *ctx, float *out, int64_t ldo, float *h, const float *x, const float *A,
                                   const float *B, int64_t N, int64_t C, int64_t OC, int64_t R, float scale) {
    ctl__cuda_gemm(ctx, N, R, C, x, C, 1, A, 1, C, h, R, false);
    ctl__cuda_scale(ctx, h, N * R, scale);
    ctl__cuda_gemm(ctx, N, OC, R, h, R, 1, B, 1, R, out, ldo, true);
}

// dB += dy^T h (h holds the scale already); dh = scale dy B, written, then read by dA += dh^T x and
// dx += dh A, which is why dh is the one gradient that may not be NULL.
static void ctl__cuda_lora_backward(ctl_ctx *ctx, float *dx, float *dA, float *dB, float *dh, const float *dy, int64_t ldy,
                                    const float *x, const float *h, const float *A, const float *B, int64_t N, int64_t C,
                                    int64_t OC, int64_t R, float scale) {
    if (dB) ctl__cuda_gemm(ctx, OC, R, N, dy, 1, ldy, h, R, 1, dB, R, true);
    ctl__cuda_gemm(ctx, N, R, OC, dy, ldy, 1, B, R, 1, dh, R, false);
    ctl__cuda_scale(ctx, dh, N * R, scale);
    if (dA) ctl__cuda_gemm(ctx, R, C, N, dh, 1, R, x, C, 1, dA, C, true);
    if (dx) ctl__cuda_gemm(ctx, N, C, R, dh, R, 1, A, C, 1, dx, C, true);
}

// ---- DoRA: the norms of W + scale B A, and the per-column steps around the products ----------

// A warp per output row o: row = W[o] (widened) + scale sum_j B[o,j] A[j] (j in order, as the
// CPU's), nrm[o] = |row| (squares summed in double), g[o] = mag[o] / nrm[o]. hold: keep nrm.
// The norms rebuild W + scale B A a row at a time, R multiply-adds per value, without storing it:
// O(OC C R) work per call. Lane l takes columns l, l+32, ...; squares go into a double, and the butterfly
// gives every lane the same total. hold skips that: the norms stay as last computed (DoRA's gradient
// treats them as constants). A zero row gives nrm 0 and g infinite, on the CPU as here.
__global__ void ctl__k_dora_norms(float *nrm, float *g, int type, const unsigned char *w, int64_t row_bytes, const float *A,
                                  const float *B, const float *mag, int64_t OC, int64_t C, int64_t R, float scale, bool hold) {
    int64_t o = (int64_t)blockIdx.x * CTL__CU_WARPS + threadIdx.x / 32;
    int lane = (int)threadIdx.x % 32;
    if (o >= OC) return;   // whole warps leave together
    if (!hold) {
        double sq = 0.0;
        for (int64_t c = lane; c < C; c += 32) {
            float v = ctl__typed_at(w, type, o, c, row_bytes);
            for (int64_t j = 0; j < R; j++) v += scale * B[o * R + j] * A[j * C + c];
            sq += (double)v * v;
        }
        for (int off = 16; off > 0; off >>= 1) sq += __shfl_xor_sync(0xffffffffu, sq, off);
        if (lane == 0) nrm[o] = (float)sqrt(sq);
    }
    if (lane == 0) g[o] = mag[o] / nrm[o];
}

static void ctl__cuda_dora_norms(ctl_ctx *ctx, float *nrm, float *g, ctl_dtype type, const void *w, const float *A, const float *B,
                                 const float *mag, int64_t OC, int64_t C, int64_t R, float scale, bool hold) {
    ctl_cuda *c = ctl__cu(ctx);
    CTL_LAUNCH(c, ctl__k_dora_norms, ctl__blocks(OC, CTL__CU_WARPS), CTL__CU_THREADS, nrm, g, (int)type, (const unsigned char *)w,
               ctl__row_bytes(type, C), A, B, mag, OC, C, R, scale, hold);
}

// dst (N,OC) = (g - sub) (.) src, or src - bias (g NULL; bias may be NULL: a copy); src's rows
// are ld apart.
// One kernel for the table's cols_scale and cols_sub, and for copy_rows (no bias, ld = C). dst is
// packed (N,OC); only src is strided.
__global__ void ctl__k_cols(float *dst, const float *src, int64_t ld, const float *g, float sub, const float *bias, int64_t N,
                            int64_t OC) {
    int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= N * OC) return;
    int64_t n = i / OC, o = i % OC;
    float x = src[n * ld + o];
    dst[i] = g ? (g[o] - sub) * x : x - (bias ? bias[o] : 0.0f);
}

static void ctl__cuda_cols_scale(ctl_ctx *ctx, float *dst, const float *src, int64_t ld, const float *g, float sub, int64_t N,
                                 int64_t OC) {
    ctl_cuda *c = ctl__cu(ctx);
    CTL_LAUNCH(c, ctl__k_cols, ctl__blocks(N * OC, CTL__CU_THREADS), CTL__CU_THREADS, dst, src, ld, g, sub, (const float *)NULL, N,
               OC);
}

static void ctl__cuda_cols_sub(ctl_ctx *ctx, float *dst, const float *src, int64_t ld, const float *bias, int64_t N, int64_t OC) {
    ctl_cuda *c = ctl__cu(ctx);
    CTL_LAUNCH(c, ctl__k_cols, ctl__blocks(N * OC, CTL__CU_THREADS), CTL__CU_THREADS, dst, src, ld, (const float *)NULL, 0.0f, bias,
               N, OC);
}

// The output: y = g (.) z + bias, or with u (dropout) y += g (.) z - u. y's rows are ld apart.
// A thread per value; y may be a view (rows ld apart) into a wider output.
__global__ void ctl__k_dora_out(float *y, int64_t ld, const float *z, const float *u, const float *bias, const float *g, int64_t N,
                                int64_t OC) {
    int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= N * OC) return;
    int64_t n = i / OC, o = i % OC;
    float gz = g[o] * z[i], *yo = y + n * ld + o;
    *yo = u ? *yo + gz - u[i] : gz + (bias ? bias[o] : 0.0f);
}

static void ctl__cuda_dora_out(ctl_ctx *ctx, float *y, int64_t ld, const float *z, const float *u, const float *bias, const float *g,
                               int64_t N, int64_t OC) {
    ctl_cuda *c = ctl__cu(ctx);
    CTL_LAUNCH(c, ctl__k_dora_out, ctl__blocks(N * OC, CTL__CU_THREADS), CTL__CU_THREADS, y, ld, z, u, bias, g, N, OC);
}

// A thread per column o, rows in order: dm[o] += sum dy z / nrm[o], db[o] += sum dy, and
// without dropout dy -> g (.) dy in place. dy's rows are ld apart.
// 64-thread blocks: only OC threads in all. dy is rescaled by the thread that has just read it.
__global__ void ctl__k_dora_back(float *dm, float *db, float *dy, int64_t ld, const float *z, const float *nrm, const float *g,
                                 bool scale, int64_t N, int64_t OC) {
    int64_t o = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (o >= OC) return;
    float sm = 0.0f, sb = 0.0f;
    for (int64_t n = 0; n < N; n++) {
        float d = dy[n * ld + o];
        sm += d * z[n * OC + o] / nrm[o], sb += d;
        if (scale) dy[n * ld + o] = d * g[o];
    }
    if (dm) dm[o] += sm;
    if (db) db[o] += sb;
}

static void ctl__cuda_dora_backward(ctl_ctx *ctx, float *dm, float *db, float *dy, int64_t ld, const float *z, const float *nrm,
                                    const float *g, bool scale_dy, int64_t N, int64_t OC) {
    ctl_cuda *c = ctl__cu(ctx);
    CTL_LAUNCH(c, ctl__k_dora_back, ctl__blocks(OC, 64), 64, dm, db, dy, ld, z, nrm, g, scale_dy, N, OC);
}

// A thread per row of x walks the entries in order (as the CPU does), so writes never collide.
// Forward (y not NULL): y[r, rows[k]] += v[k] x[r, cols[k]]; backward: dx[r, cols[k]] += v[k]
// dy[r, rows[k]]. The entries are read as broadcasts, but x and dy C and ld apart: not coalesced.
__global__ void ctl__k_sparse_rows(float *y, const float *x, float *dx, const float *dy, int64_t ld, const float *v,
                                   const int32_t *rows, const int32_t *cols, int64_t n, int64_t N, int64_t C) {
    int64_t r = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (r >= N) return;
    for (int64_t k = 0; k < n; k++) {
        if (y) y[r * ld + rows[k]] += v[k] * x[r * C + cols[k]];
        else dx[r * C + cols[k]] += v[k] * dy[r * ld + rows[k]];
    }
}

// A thread per entry, rows in order: entries never share an output, so no atomics.
__global__ void ctl__k_sparse_dv(float *dv, const float *dy, int64_t ld, const float *x, const int32_t *rows,
                                 const int32_t *cols, int64_t n, int64_t N, int64_t C) {
    int64_t k = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (k >= n) return;
    float acc = 0.0f;
    for (int64_t r = 0; r < N; r++) acc += dy[r * ld + rows[k]] * x[r * C + cols[k]];
    dv[k] += acc;
}

static void ctl__cuda_sparse_forward(ctl_ctx *ctx, float *y, int64_t ld, const float *x, const float *v, const int32_t *rows,
                                     const int32_t *cols, int64_t n, int64_t N, int64_t C) {
    ctl_cuda *c = ctl__cu(ctx);
    CTL_LAUNCH(c, ctl__k_sparse_rows, ctl__blocks(N, 64), 64, y, x, (float *)NULL, (const float *)NULL, ld, v, rows, cols, n, N, C);
}

static void ctl__cuda_sparse_backward(ctl_ctx *ctx, float *dx, float *dv, const float *dy, int64_t ld, const float *x,
                                      const float *v, const int32_t *rows, const int32_t *cols, int64_t n, int64_t N,
                                      int64_t C) {
    ctl_cuda *c = ctl__cu(ctx);
    if (dv) CTL_LAUNCH(c, ctl__k_sparse_dv, ctl__blocks(n, CTL__CU_THREADS), CTL__CU_THREADS, dv, dy, ld, x, rows, cols, n, N, C);
    if (dx)
        CTL_LAUNCH(c, ctl__k_sparse_rows, ctl__blocks(N, 64), 64, (float *)NULL, (const float *)NULL, dx, dy, ld, v, rows, cols, n,
                   N, C);
}

// ---- optimiser -------------------------------------------------------------------------------

// torch.optim.AdamW with the CPU's constants and operation order; the gradient then starts
// again at zero.
// The same fp32 operations as the CPU's ctl__adamw_span, constants made in double as ctl__adam_consts
// makes them; nvcc may fuse a multiply and an add, so a weight can differ in its last bits. g is
// zeroed in the same pass, as the table asks.
__global__ void ctl__k_adamw(float *p, float *g, float *m, float *v, int64_t n, float grad_scale, float beta1,
                             float beta2, float eps, float step_size, float bc2_sqrt, float decay) {
    int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float gi = g[i] * grad_scale, mi = m[i] + (1.0f - beta1) * (gi - m[i]);
    g[i] = 0.0f;
    float vi = beta2 * v[i] + (1.0f - beta2) * gi * gi;
    m[i] = mi, v[i] = vi;
    p[i] = p[i] * decay - step_size * mi / (sqrtf(vi) / bc2_sqrt + eps);
}

// A launch per parameter array: arrays differ in length and in whether weight decay applies.
static void ctl__cuda_adamw(ctl_ctx *ctx, const ctl__params *p, const ctl_optim_desc *o, float grad_scale, float lr, int64_t t) {
    ctl_cuda *c = ctl__cu(ctx);
    float step_size = (float)(lr / (1.0 - pow(o->beta1, (double)t))), bc2_sqrt = (float)sqrt(1.0 - pow(o->beta2, (double)t));
    for (int64_t i = 0; i < p->n; i++) {
        float decay = (float)(1.0 - (double)lr * (p->decay[i] ? o->weight_decay : 0.0f));
        CTL_LAUNCH(c, ctl__k_adamw, ctl__blocks(p->len[i], CTL__CU_THREADS), CTL__CU_THREADS, p->w[i], p->g[i], p->m[i], p->v[i],
                   p->len[i], grad_scale, o->beta1, o->beta2, o->eps, step_size, bc2_sqrt, decay);
    }
}

static void ctl__cuda_grad_zero(ctl_ctx *ctx, const ctl__params *p) {
    for (int64_t i = 0; i < p->n; i++) ctl__cuda_zero(ctx, p->g[i], p->len[i]);
}

// A fixed grid for the partials rather than one sized to the device: where the partials split the
// arrays, and so the bits, do not depend on the GPU's number of multiprocessors.
#define CTL__SUMSQ_BLOCKS 256

// Sum of squares in two fixed stages (block partials, then one block over them): deterministic.
// Thread i of the 65,536 takes values i, i + 65,536, ... (coalesced), squares added in double.
__global__ void ctl__k_sumsq(double *part, const float *x, int64_t n) {
    __shared__ double sh[CTL__CU_WARPS];
    double s = 0.0;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
        s += (double)x[i] * x[i];
    s = ctl__block_sum(s, sh);
    if (threadIdx.x == 0) part[blockIdx.x] = s;
}

// One block over all the partials: thread t adds parts t, t + 256, ..., then the block sum.
__global__ void ctl__k_sum_parts(double *out, const double *part, int64_t n) {
    __shared__ double sh[CTL__CU_WARPS];
    double s = 0.0;
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) s += part[i];
    s = ctl__block_sum(s, sh);
    if (threadIdx.x == 0) *out = s;
}

// The sum of the squares of every gradient of p in two fixed stages (CTL__SUMSQ_BLOCKS partials
// per array, then one block over all of them in array order): the same bits on every run. The
// weights are not read: a non-finite weight shows in the forward's log-probs, checked there.
// *out is NaN until the copy lands, so a failed scratch or launch shows as a non-finite norm as well
// as in the status. The scratch is popped after ctl_copy_to_host, which has waited for the kernels.
static ctl_status ctl__cuda_grad_sumsq(ctl_ctx *ctx, const ctl__params *p, double *out) {
    ctl_cuda *c = ctl__cu(ctx);
    if (!c) return ctl_fail(ctx, CTL_ERR_UNSUPPORTED, "sumsq: not a CUDA context");
    size_t top = c->top;
    int64_t parts = p->n * CTL__SUMSQ_BLOCKS;
    double *part = (double *)ctl__scratch(c, (size_t)(parts + 1) * sizeof(double), "sumsq");
    *out = NAN;
    if (part) {
        for (int64_t i = 0; i < p->n; i++)
            CTL_LAUNCH(c, ctl__k_sumsq, CTL__SUMSQ_BLOCKS, CTL__CU_THREADS, part + i * CTL__SUMSQ_BLOCKS, p->g[i], p->len[i]);
        CTL_LAUNCH(c, ctl__k_sum_parts, 1, CTL__CU_THREADS, part + parts, part, parts);
        ctl_copy_to_host(ctx, out, part + parts, sizeof(double));
    }
    ctl__scratch_pop(c, top);
    return ctl_device_sync(ctx);
}

// ---- sampling: a block per row ---------------------------------------------------------------
//
// ctl_sample keeps a prefix of the candidates sorted by logit (ties: lower id first) and draws
// from it in that order. Here the sort is never done: each candidate gets a 64-bit key that
// orders the same way (the logit's bits made monotone, then the inverted id), and every prefix
// boundary the sampler needs (the k-th best, the end of the nucleus, the drawn token) is found
// by a search over key bits, each step a count or a mass over the row.
//
// Each boundary costs 64 passes over the row (a row may need four: the limit, top_k's total for top_p,
// the nucleus end, the draw), each a block sum. The masses are summed in the block's order, not the
// CPU's sorted order, so a draw within rounding of a boundary can take the neighbouring token.

// The sampler's settings, passed by value as a kernel argument: nothing to copy to the device.
typedef struct ctl__cu_samp {
    float temperature, top_p, min_p, penalty;
    int64_t top_k;
} ctl__cu_samp;

// The order key: a float's bits made so that unsigned order is float order, then 0xffffffff - id so
// that among equal logits the lower id has the larger key. Keys are distinct, so each boundary is one
// candidate. -inf (NaN is made -inf before) orders below every finite logit.
__device__ __forceinline__ unsigned long long ctl__key(float z, int64_t v) {
    unsigned b = __float_as_uint(z == 0.0f ? 0.0f : z);   // -0 ties with +0, as in a comparison
    b = (b & 0x80000000u) ? ~b : (b | 0x80000000u);
    return (unsigned long long)b << 32 | (unsigned)(0xffffffffu - (unsigned)v);
}

// The largest key K with count(key >= K) >= k (mass == NULL) or with mass(key >= K) > target
// (strict) / >= target: the boundary of the prefix wanted. Every thread calls; all get K.
// Bit by bit from the top: a bit stays when the prefix it implies still passes the (monotone) test.
// A zero-mass candidate adds nothing above it, so the largest K never stops on one: it is never drawn.
__device__ unsigned long long ctl__search(const float *z, const double *e, int64_t V, int64_t k, double target, bool strict,
                                          double *shd) {
    unsigned long long K = 0;
    for (int bit = 63; bit >= 0; bit--) {
        unsigned long long cand = K | 1ull << bit;
        double s = 0.0;
        for (int64_t v = threadIdx.x; v < V; v += blockDim.x)
            if (ctl__key(z[v], v) >= cand) s += e ? e[v] : 1.0;
        s = ctl__block_sum(s, shd);
        if (e ? (strict ? s > target : s >= target) : s >= (double)k) K = cand;
    }
    return K;
}

// The mass (sum of e) of the candidates with key >= K: a kept prefix's total.
__device__ double ctl__mass_from(const float *z, const double *e, int64_t V, unsigned long long K, double *shd) {
    double s = 0.0;
    for (int64_t v = threadIdx.x; v < V; v += blockDim.x)
        if (ctl__key(z[v], v) >= K) s += e[v];
    return ctl__block_sum(s, shd);
}

// A block per row. Per-row scratch: z (V floats, tempered logits), e (V doubles, exp(z - max)), seen
// (V bytes). The steps are ctl__sample_u's, u[row] the row's uniform, drawn on the host.
__global__ void ctl__k_sample(int32_t *out, float *logits, float *zs, double *es, unsigned char *seen, int64_t V,
                              ctl__cu_samp sd, const int32_t *hist, int64_t hist_stride, const int64_t *n_hist, const double *u) {
    __shared__ float shf[CTL__CU_WARPS];
    __shared__ double shd[CTL__CU_WARPS], part[CTL__CU_THREADS];
    __shared__ long long shi[CTL__CU_WARPS];
    int64_t row = blockIdx.x;
    float *lg = logits + row * V, *z = zs + row * V;
    double *e = es + row * V;
        // Thread 0 walks the history in order, as the CPU does; the marks make a repeated token count once.
    if (sd.penalty > 0.0f && sd.penalty != 1.0f && hist) {   // each distinct token of the history once
        unsigned char *mark = seen + row * V;
        for (int64_t v = threadIdx.x; v < V; v += blockDim.x) mark[v] = 0;
        __syncthreads();
        if (threadIdx.x == 0)
            for (int64_t i = 0; i < n_hist[row]; i++) {
                int32_t t = hist[row * hist_stride + i];
                if (t >= 0 && t < V && !mark[t]) mark[t] = 1, lg[t] = lg[t] > 0.0f ? lg[t] / sd.penalty : lg[t] * sd.penalty;
            }
        __syncthreads();
    }
        // Each thread keeps its first largest; then the block max and the lowest id holding it. A NaN
        // never wins (comparisons with it are false); an all-NaN row gives id 0.
    if (sd.temperature <= 0.0f) {   // greedy: the first of the largest
        float best = -INFINITY;
        long long id = V;
        for (int64_t v = threadIdx.x; v < V; v += blockDim.x)
            if (lg[v] > best || (lg[v] == best && v < id)) best = lg[v], id = v;
        float top = ctl__block_max(best, shf);
        long long cand = best == top ? id : (long long)V;
        for (int o = 16; o > 0; o >>= 1) cand = min(cand, (long long)__shfl_xor_sync(0xffffffffu, cand, o));
        __syncthreads();
        if (threadIdx.x % 32 == 0) shi[threadIdx.x / 32] = cand;
        __syncthreads();
        if (threadIdx.x == 0) {
            long long b = V;
            for (int w = 0; w < CTL__CU_WARPS; w++) b = min(b, shi[w]);
            out[row] = (int32_t)(b < V ? b : 0);
        }
        return;
    }
        // NaN becomes -inf (no mass), as on the CPU; e is in double, shifted by the max so none overflows.
    float top = -INFINITY;
    for (int64_t v = threadIdx.x; v < V; v += blockDim.x) {
        float x = lg[v] / sd.temperature;
        z[v] = x == x ? x : -INFINITY;
        top = fmaxf(top, z[v]);
    }
    top = ctl__block_max(top, shf);
        // above: the candidates at least min_p times as likely as the best (e >= min_p); at least one stays.
    double above = 0.0;
    for (int64_t v = threadIdx.x; v < V; v += blockDim.x) {
        e[v] = exp((double)(z[v] - top));
        above += e[v] >= (double)sd.min_p ? 1.0 : 0.0;
    }
    above = ctl__block_sum(above, shd);
    bool use_p = sd.top_p > 0.0f && sd.top_p < 1.0f;
    int64_t kk = sd.top_k > 0 ? (sd.top_k < V ? sd.top_k : V) : V, limit = kk;
    if (sd.min_p > 0.0f) limit = min(limit, max((int64_t)above, (int64_t)1));
    double uu = u[row];
        // The CPU draws in id order when nothing is filtered, so this path does too: a run of ids per
        // thread, each thread's prefix from the 256 run sums (walked in order by every thread), then the
        // first id whose running mass passes u times the total; the lowest such id in the block wins.
    if (limit == V && !use_p) {   // no filter: the whole row in id order, a chunk per thread
        int64_t per = (V + blockDim.x - 1) / blockDim.x, lo = threadIdx.x * per, hi = min(V, lo + per);
        double s = 0.0;
        for (int64_t v = lo; v < hi; v++) s += e[v];
        __syncthreads();
        part[threadIdx.x] = s;
        __syncthreads();
        double before = 0.0, sum = 0.0;
        for (int t = 0; t < (int)blockDim.x; t++) {
            if (t == (int)threadIdx.x) before = sum;
            sum += part[t];
        }
        long long found = V, acc_found;
        double acc = before;
        for (int64_t v = lo; v < hi; v++)
            if (uu * sum < (acc += e[v])) {
                found = v;
                break;
            }
        for (int o = 16; o > 0; o >>= 1) found = min(found, (long long)__shfl_xor_sync(0xffffffffu, found, o));
        __syncthreads();
        if (threadIdx.x % 32 == 0) shi[threadIdx.x / 32] = found;
        __syncthreads();
        acc_found = V;
        for (int w = 0; w < CTL__CU_WARPS; w++) acc_found = min(acc_found, shi[w]);
        if (threadIdx.x == 0) out[row] = (int32_t)(acc_found < V ? acc_found : V - 1);
        return;
    }
        // K_lim: the limit-th best (top_k and min_p together). With top_p, the total is the top_k best's
        // mass (the whole row's with no top_k) and the nucleus is the shortest prefix reaching top_p of it;
        // the kept prefix is the shorter of the two, that is the larger key.
    unsigned long long K_lim = ctl__search(z, NULL, V, limit, 0.0, false, shd), K_keep = K_lim;
    if (use_p) {
        unsigned long long K_kk = kk == V ? 0 : kk == limit ? K_lim : ctl__search(z, NULL, V, kk, 0.0, false, shd);
        double total = ctl__mass_from(z, e, V, K_kk, shd);
        unsigned long long K_p = ctl__search(z, e, V, 0, (double)sd.top_p * total, false, shd);
        if (K_p > K_keep) K_keep = K_p;   // the nucleus ends inside the limit
    }
        // The draw: the first kept candidate whose running mass passes u times the kept total.
    double sum = ctl__mass_from(z, e, V, K_keep, shd);
    unsigned long long K = ctl__search(z, e, V, 0, uu * sum, true, shd);
    if (K < K_keep) K = K_keep;   // rounding at the very end: the last kept
    if (threadIdx.x == 0) out[row] = (int32_t)(0xffffffffu - (unsigned)(K & 0xffffffffu));
}

// Scratch from the top: out, u and n_history, then z, e and seen (13 V + 20 bytes a row). The uniforms
// are drawn here, one per row in row order and none when greedy, as ctl__sample draws them, so the RNG
// advances as on the CPU. Waits for the tokens: ctl_device_sync follows the copy back.
static ctl_status ctl__cuda_sample(ctl_ctx *ctx, int32_t *out, float *logits, int64_t n, int64_t V,
                                   const struct ctl_sampler_desc *sd, const int32_t *history, int64_t hist_stride,
                                   const int64_t *n_history, ctl_rng *rng) {
    ctl_cuda *c = ctl__cu(ctx);
    if (!c) return ctl_fail(ctx, CTL_ERR_UNSUPPORTED, "sample: not a CUDA context");
    if (n < 1 || V < 1 || V > INT32_MAX) return ctl_fail(ctx, CTL_ERR_INVALID, "sample: %lld rows of %lld logits", (long long)n, (long long)V);
    ctl__cu_samp s = {sd->temperature, sd->top_p, sd->min_p, sd->repetition_penalty, sd->top_k};
    size_t top = c->top;
    int32_t *dout = (int32_t *)ctl__scratch(c, (size_t)n * sizeof(int32_t), "sample");
    double *du = (double *)ctl__scratch(c, (size_t)n * sizeof(double), "sample");
    int64_t *dn = (int64_t *)ctl__scratch(c, (size_t)n * sizeof(int64_t), "sample");
    float *zs = (float *)ctl__scratch(c, (size_t)(n * V) * sizeof(float), "sample");
    double *es = (double *)ctl__scratch(c, (size_t)(n * V) * sizeof(double), "sample");
    unsigned char *seen = (unsigned char *)ctl__scratch(c, (size_t)(n * V), "sample");
    double *u = (double *)ctl_alloc(ctx, (size_t)n * sizeof(double));
    ctl_status st = CTL_OK;
    if (!u) st = ctl_fail(ctx, CTL_ERR_OUT_OF_MEMORY, "sample: %lld random numbers", (long long)n);
    if (!st && dout && du && dn && zs && es && seen) {   // (a failed piece has recorded why; a later, smaller one may fit)
        for (int64_t i = 0; i < n; i++) u[i] = sd->temperature > 0.0f ? (double)ctl_rng_uniform(rng) : 0.0;
        ctl__cu_ok(c, cudaMemcpyAsync(du, u, (size_t)n * sizeof(double), cudaMemcpyHostToDevice, c->stream), "sample");
        if (history && n_history)
            ctl__cu_ok(c, cudaMemcpyAsync(dn, n_history, (size_t)n * sizeof(int64_t), cudaMemcpyHostToDevice, c->stream), "sample");
        CTL_LAUNCH(c, ctl__k_sample, n, CTL__CU_THREADS, dout, logits, zs, es, seen, V, s, history && n_history ? history : NULL,
                   hist_stride, dn, du);
        ctl__cu_ok(c, cudaMemcpyAsync(out, dout, (size_t)n * sizeof(int32_t), cudaMemcpyDeviceToHost, c->stream), "sample");
    }
    ctl__scratch_pop(c, top);
    ctl_status sync = ctl_device_sync(ctx);
    ctl_free(ctx, u);
    return st ? st : sync;
}

// ---- the table: what cotlab.h calls ----------------------------------------------------------
//
// The kernels above under the table's signatures (ctl__kernels in cotlab.h). The few that
// differ: the LM head takes its description as one struct, cached attention never reads shared
// prefixes (ctl_generate shares none on a device), and the DoRA norms need no host scratch.

static void ctl__cuda_copy_rows(ctl_ctx *ctx, float *dst, const float *src, int64_t N, int64_t C) {
    ctl__cuda_cols_sub(ctx, dst, src, C, NULL, N, C);
}

static void ctl__cuda_lmhead_forward(ctl_ctx *ctx, float *logp, float *lse, float *entropy, const float *x, const ctl__head *hd,
                                     const int32_t *targets, int64_t N, int64_t C, int64_t V, float inv_temp, float *scratch,
                                     int64_t chunk) {
    (void)scratch;
    ctl__cuda_lmhead_forward_typed(ctx, logp, lse, entropy, x, hd->type, hd->w, hd->r, hd->h, hd->lora_b, targets, N, C, V, inv_temp,
                                   chunk);
}

static void ctl__cuda_lmhead_backward(ctl_ctx *ctx, float *dx, float *dw, const float *dlogp, const float *x, const ctl__head *hd,
                                      const int32_t *targets, const float *lse, int64_t N, int64_t C, int64_t V, float inv_temp,
                                      float *scratch, int64_t chunk) {
    (void)scratch;
    ctl__cuda_lmhead_backward_typed(ctx, dx, dw, dlogp, x, hd->type, hd->w, hd->r, hd->h, hd->lora_b, hd->dh, hd->dlora_b, targets,
                                    lse, N, C, V, inv_temp, chunk);
}

static void ctl__cuda_attention_cached_table(ctl_ctx *ctx, float *out, const float *qkv, const float *kcache, const float *vcache,
                                             const int64_t *seq, const int32_t *pos, const int64_t *parent, const int64_t *shared,
                                             int64_t R, int64_t layer, int64_t S, int64_t max_len, int64_t NH, int64_t NKV, int64_t HS) {
    (void)parent, (void)shared;
    ctl__cuda_attention_cached(ctx, out, qkv, kcache, vcache, seq, pos, R, layer, S, max_len, NH, NKV, HS);
}

// rowbuf is the CPU's row buffer; the device kernel makes each value of a row as it needs it.
static void ctl__cuda_dora_norms_table(ctl_ctx *ctx, float *nrm, float *g, ctl_dtype type, const void *w, const float *A,
                                       const float *B, const float *mag, int64_t OC, int64_t C, int64_t R, float scale, bool hold,
                                       float *rowbuf) {
    (void)rowbuf;
    ctl__cuda_dora_norms(ctx, nrm, g, type, w, A, B, mag, OC, C, R, scale, hold);
}

// In the order of ctl__kernels' fields: the initialiser is positional, so a field added to the struct
// needs its entry here in the same place. host_memory is false: results are copied to the host.
const ctl__kernels ctl__cuda_kernels = {
    "cuda", false, ctl__cuda_open, ctl__cuda_close, ctl_copy_to_device, ctl_copy_to_host, ctl_device_sync, ctl__cuda_pin,
    ctl__cuda_unpin, ctl__cuda_zero, ctl__cuda_scale, ctl__cuda_copy_rows, ctl__cuda_gemm,
    ctl__cuda_matmul_forward_typed, ctl__cuda_matmul_backward_typed, ctl__cuda_matmul_dw,
    ctl__cuda_layernorm_forward, ctl__cuda_layernorm_backward, ctl__cuda_rmsnorm_forward, ctl__cuda_rmsnorm_backward,
    ctl__cuda_embedding_rows, ctl__cuda_embedding_backward_rows, ctl__cuda_rope_rows, ctl__cuda_rope_rows_backward,
    ctl__cuda_attention_forward_packed, ctl__cuda_attention_backward_packed, ctl__cuda_gelu_forward, ctl__cuda_gelu_backward,
    ctl__cuda_swiglu_forward, ctl__cuda_swiglu_backward, ctl__cuda_residual_forward, ctl__cuda_kv_store,
    ctl__cuda_attention_cached_table, ctl__cuda_lmhead_forward, ctl__cuda_lmhead_backward,
    ctl__cuda_dropout, ctl__cuda_lora_forward, ctl__cuda_lora_backward, ctl__cuda_dora_norms_table, ctl__cuda_cols_scale,
    ctl__cuda_cols_sub, ctl__cuda_dora_out, ctl__cuda_dora_backward, ctl__cuda_sparse_forward, ctl__cuda_sparse_backward,
    ctl__cuda_grad_sumsq, ctl__cuda_adamw, ctl__cuda_grad_zero, ctl__cuda_sample,
};
