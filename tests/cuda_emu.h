// cuda_emu.h: enough of CUDA to run cotlab_cuda.cu's kernels on a CPU, for testing their logic
// on machines without a GPU. Compile the .cu as C++ with
//     g++ -x c++ -DCTL_CUDA_EMU -include tests/cuda_emu.h -c cotlab_cuda.cu
//
// A block runs as one fiber per thread on the calling thread (switched by a few instructions
// on x86-64, by ucontext elsewhere or with CTL_EMU_UCONTEXT defined). __syncthreads and
// __syncwarp park a fiber until every live thread of its block (or warp) has arrived; a warp
// shuffle is a write to a slot, a warp barrier, a read, and another barrier. A fiber that waits
// at a block barrier while its warp waits at a warp barrier (divergent barriers), or a barrier
// no one can reach, aborts with a message: those are kernel bugs on a GPU too. Blocks run one
// after another, so __shared__ variables are plain statics. Memory is host memory ("device"
// allocations are mapped pages that the host cannot touch outside kernels, copies and cuBLAS
// calls: a host read or write of device memory is a segmentation fault, as on a GPU;
// CTL_EMU_OPEN=1 leaves them open), and cuBLAS is replaced by plain loops written from the BLAS
// definition (column-major, op(A) op(B), beta = 0 never reads C). TF32 and bf16 products are
// computed in fp32 / on the bf16 values: the emulator checks logic, not rounding.
#ifndef CTL_CUDA_EMU_H
#define CTL_CUDA_EMU_H

#include <functional>
#include <map>
#include <math.h>
#include <string>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <ucontext.h>
#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static

struct dim3 {
    unsigned x, y, z;
    dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

enum { CTL_EMU_RUN, CTL_EMU_BLOCK, CTL_EMU_WARP, CTL_EMU_DONE };

// Dynamic shared memory: 48 KiB per block unless the kernel opts in to more
// (cudaFuncSetAttribute), up to what an sm_80 device allows.
#define CTL_EMU_SHARED_DEFAULT (48 << 10)
#define CTL_EMU_SHARED_OPTIN 166912
#define CTL__SHARED_DYN(type, name) type *name = (type *)ctl_emu.dyn
#define CTL__UNROLL

// Fiber switches. swapcontext saves and restores the signal mask, a system call each time,
// which made it most of the emulator's run time; on x86-64 ctl_emu_switch instead saves the
// callee-saved registers on the old stack, stores its stack pointer in *save, and resumes the
// stack at `load` (pushed the same way, or prepared by ctl_emu_fiber_init).
#if defined(__x86_64__) && !defined(CTL_EMU_UCONTEXT)
#define CTL_EMU_ASM 1
extern "C" void ctl_emu_switch(void **save, void *load);
__asm__(".text\n"
        ".globl ctl_emu_switch\n"
        ".type ctl_emu_switch, @function\n"
        "ctl_emu_switch:\n"
        "    pushq %rbp\n    pushq %rbx\n    pushq %r12\n    pushq %r13\n    pushq %r14\n    pushq %r15\n"
        "    movq %rsp, (%rdi)\n"
        "    movq %rsi, %rsp\n"
        "    popq %r15\n    popq %r14\n    popq %r13\n    popq %r12\n    popq %rbx\n    popq %rbp\n"
        "    ret\n"
        ".size ctl_emu_switch, .-ctl_emu_switch\n");
#endif

struct ctl_emu_fiber {
#ifdef CTL_EMU_ASM
    void *sp;
#else
    ucontext_t uc;
#endif
    int state;
    char *stack;
};

struct ctl_emu_state {
    dim3 grid, block, block_idx;
    unsigned n;      // threads in the block
    unsigned cur;    // the running fiber
    ctl_emu_fiber *f;
    unsigned cap;
#ifdef CTL_EMU_ASM
    void *sched_sp;
#else
    ucontext_t sched;
#endif
    std::function<void()> body;
    uint64_t slot[1024];
    int last_error;
    bool fast;                            // threads run as plain calls: no barrier may be reached
    bool waited;                          // a barrier was reached in this launch
    std::map<std::string, bool> barriers;  // kernel name -> whether it has ever reached one
    std::map<const void *, int> max_shared;  // kernel -> its cudaFuncAttributeMaxDynamicSharedMemorySize
    alignas(16) float dyn[CTL_EMU_SHARED_OPTIN / 4];   // the block's dynamic shared memory
};

inline ctl_emu_state ctl_emu;

// Device memory: mapped regions, open (read-write) only while the emulated device works.
inline std::map<void *, size_t> ctl_emu_regions;
inline int ctl_emu_depth;   // nested opens

// A fault inside a closed region is host code reading or writing device memory: say so.
inline void ctl_emu_segv(int sig, siginfo_t *si, void *uc) {
    (void)uc;
    for (auto &r : ctl_emu_regions)
        if ((char *)si->si_addr >= (char *)r.first && (char *)si->si_addr < (char *)r.first + r.second) {
            static const char msg[] = "cuda_emu: host code touched device memory (a device pointer used on the host)\n";
            if (write(2, msg, sizeof msg - 1) < 0) break;
            break;
        }
    signal(sig, SIG_DFL);
    raise(sig);
}

// Whether device memory is fenced (not CTL_EMU_OPEN); the first call installs the handler.
inline bool ctl_emu_fenced() {
    static int fenced = -1;
    if (fenced < 0) {
        fenced = getenv("CTL_EMU_OPEN") == NULL;
        struct sigaction sa;
        memset(&sa, 0, sizeof sa);
        sa.sa_sigaction = ctl_emu_segv, sa.sa_flags = SA_SIGINFO;
        if (fenced) sigaction(SIGSEGV, &sa, NULL);
    }
    return fenced;
}

inline void ctl_emu_protect(int prot) {
    if (!ctl_emu_fenced()) return;
    for (auto &r : ctl_emu_regions) mprotect(r.first, r.second, prot);
}
inline void ctl_emu_open() {
    if (ctl_emu_depth++ == 0) ctl_emu_protect(PROT_READ | PROT_WRITE);
}
inline void ctl_emu_close() {
    if (--ctl_emu_depth == 0) ctl_emu_protect(PROT_NONE);
}

inline dim3 ctl_emu_tid() { return dim3(ctl_emu.cur % ctl_emu.block.x, ctl_emu.cur / ctl_emu.block.x % ctl_emu.block.y,
                                        ctl_emu.cur / (ctl_emu.block.x * ctl_emu.block.y)); }
#define threadIdx (ctl_emu_tid())
#define blockIdx (ctl_emu.block_idx)
#define blockDim (ctl_emu.block)
#define gridDim (ctl_emu.grid)
#define warpSize 32

inline void ctl_emu_abort(const char *what) {
    fprintf(stderr, "cuda_emu: %s (block %u, thread %u)\n", what, ctl_emu.block_idx.x, ctl_emu.cur);
    abort();
}

// From the running fiber to the scheduler, and from the scheduler to fiber t.
inline void ctl_emu_to_sched() {
#ifdef CTL_EMU_ASM
    ctl_emu_switch(&ctl_emu.f[ctl_emu.cur].sp, ctl_emu.sched_sp);
#else
    swapcontext(&ctl_emu.f[ctl_emu.cur].uc, &ctl_emu.sched);
#endif
}

inline void ctl_emu_to_fiber(unsigned t) {
#ifdef CTL_EMU_ASM
    ctl_emu_switch(&ctl_emu.sched_sp, ctl_emu.f[t].sp);
#else
    swapcontext(&ctl_emu.sched, &ctl_emu.f[t].uc);
#endif
}

inline void ctl_emu_wait(int state) {
    if (ctl_emu.fast) ctl_emu_abort("a barrier in a kernel that never reached one before (run it with CTL_EMU_SLOW=1)");
    ctl_emu.waited = true;
    ctl_emu.f[ctl_emu.cur].state = state;
    ctl_emu_to_sched();
}

inline void __syncthreads() { ctl_emu_wait(CTL_EMU_BLOCK); }
inline void __syncwarp(unsigned mask = 0xffffffffu) {
    if (mask != 0xffffffffu) ctl_emu_abort("__syncwarp with a partial mask is not emulated");
    ctl_emu_wait(CTL_EMU_WARP);
}

// Shuffles: every lane of the warp must take part (as the full masks used here say).
template <typename T> inline T ctl_emu_shfl(T v, int src) {
    unsigned lane = ctl_emu.cur % 32, base = ctl_emu.cur - lane;
    static_assert(sizeof(T) <= 8, "shuffle of at most 8 bytes");
    memcpy(&ctl_emu.slot[ctl_emu.cur], &v, sizeof(T));
    __syncwarp();
    T r = v;
    if (src >= 0 && src < 32 && base + (unsigned)src < ctl_emu.n) memcpy(&r, &ctl_emu.slot[base + (unsigned)src], sizeof(T));
    __syncwarp();
    return r;
}
template <typename T> inline T __shfl_sync(unsigned mask, T v, int src) { return (void)mask, ctl_emu_shfl(v, src & 31); }
template <typename T> inline T __shfl_xor_sync(unsigned mask, T v, int m) {
    return (void)mask, ctl_emu_shfl(v, (int)(ctl_emu.cur % 32) ^ m);
}
template <typename T> inline T __shfl_down_sync(unsigned mask, T v, unsigned d) {
    unsigned lane = ctl_emu.cur % 32;
    return (void)mask, ctl_emu_shfl(v, lane + d < 32 ? (int)(lane + d) : (int)lane);
}

inline float __uint_as_float(unsigned u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}
inline unsigned __float_as_uint(float f) {
    unsigned u;
    memcpy(&u, &f, 4);
    return u;
}
template <typename A, typename B> inline A min(A a, B b) { return b < a ? (A)b : a; }
template <typename A, typename B> inline A max(A a, B b) { return b > a ? (A)b : a; }

inline void ctl_emu_fiber_main() {
    ctl_emu.body();
    ctl_emu.f[ctl_emu.cur].state = CTL_EMU_DONE;   // then back to the scheduler (never resumed)
#ifdef CTL_EMU_ASM
    ctl_emu_to_sched();
    abort();
#endif
}

// A fiber that starts in ctl_emu_fiber_main on its own stack at the next switch to it.
inline void ctl_emu_fiber_init(ctl_emu_fiber *f, size_t stack) {
#ifdef CTL_EMU_ASM
    // Six register slots, then the address ctl_emu_switch's ret goes to, then a pad: at entry
    // rsp is 8 past a multiple of 16, as after a call.
    uint64_t *sp = (uint64_t *)(((uintptr_t)f->stack + stack) & ~(uintptr_t)15) - 8;
    memset(sp, 0, 8 * sizeof(uint64_t));
    void (*entry)() = ctl_emu_fiber_main;
    memcpy(&sp[6], &entry, sizeof entry);
    f->sp = sp;
#else
    getcontext(&f->uc);
    f->uc.uc_stack.ss_sp = f->stack, f->uc.uc_stack.ss_size = stack, f->uc.uc_link = &ctl_emu.sched;
    makecontext(&f->uc, ctl_emu_fiber_main, 0);
#endif
    f->state = CTL_EMU_RUN;
}

// Releases the barrier that every live thread of a warp, or of the block, waits at.
inline bool ctl_emu_release() {
    bool any = false;
    for (unsigned w = 0; w * 32 < ctl_emu.n; w++) {
        unsigned at = 0, live = 0;
        for (unsigned t = w * 32; t < ctl_emu.n && t < w * 32 + 32; t++)
            if (ctl_emu.f[t].state != CTL_EMU_DONE) live++, at += ctl_emu.f[t].state == CTL_EMU_WARP;
        if (live && at == live) {
            for (unsigned t = w * 32; t < ctl_emu.n && t < w * 32 + 32; t++)
                if (ctl_emu.f[t].state == CTL_EMU_WARP) ctl_emu.f[t].state = CTL_EMU_RUN;
            any = true;
        }
    }
    if (any) return true;
    unsigned at = 0, live = 0;
    for (unsigned t = 0; t < ctl_emu.n; t++)
        if (ctl_emu.f[t].state != CTL_EMU_DONE) live++, at += ctl_emu.f[t].state == CTL_EMU_BLOCK;
    if (!live) return false;
    if (at != live) ctl_emu_abort("threads wait at different barriers (divergent __syncthreads / warp shuffle)");
    for (unsigned t = 0; t < ctl_emu.n; t++)
        if (ctl_emu.f[t].state == CTL_EMU_BLOCK) ctl_emu.f[t].state = CTL_EMU_RUN;
    return true;
}

// The first launch of a kernel runs every thread as a fiber. A kernel whose launches have
// never reached a barrier runs its threads as plain calls after that (fast), and reaching a
// barrier then aborts rather than giving a wrong result; CTL_EMU_SLOW=1 keeps fibers for all.
// Each block starts with its dynamic shared memory filled with NaNs, so a kernel that reads
// shared memory no thread of the block wrote gets NaNs rather than an earlier block's values.
inline void ctl_emu_launch(const char *name, dim3 grid, dim3 block, std::function<void()> body, size_t shared = 0,
                           const void *kernel = NULL) {
    const size_t stack = 256 << 10;
    unsigned n = block.x * block.y * block.z;
    if (n == 0 || n > 1024 || grid.x == 0) {
        ctl_emu.last_error = 9;   // cudaErrorInvalidConfiguration
        return;
    }
    auto opt = ctl_emu.max_shared.find(kernel);
    if (shared > (opt != ctl_emu.max_shared.end() && opt->second > CTL_EMU_SHARED_DEFAULT ? (size_t)opt->second
                                                                                          : (size_t)CTL_EMU_SHARED_DEFAULT)) {
        ctl_emu.last_error = 1;   // cudaErrorInvalidValue: more shared memory than the kernel may take
        return;
    }
#define CTL_EMU_POISON_SHARED() memset(ctl_emu.dyn, 0xff, shared)
    auto seen = ctl_emu.barriers.find(name);
    if (seen != ctl_emu.barriers.end() && !seen->second && !getenv("CTL_EMU_SLOW")) {
        ctl_emu_open();
        ctl_emu.grid = grid, ctl_emu.block = block, ctl_emu.n = n, ctl_emu.fast = true;
        for (unsigned bz = 0; bz < grid.z; bz++)
            for (unsigned by = 0; by < grid.y; by++)
                for (unsigned bx = 0; bx < grid.x; bx++) {
                    ctl_emu.block_idx = dim3(bx, by, bz);
                    CTL_EMU_POISON_SHARED();
                    for (ctl_emu.cur = 0; ctl_emu.cur < n; ctl_emu.cur++) body();
                }
        ctl_emu.fast = false;
        ctl_emu_close();
        return;
    }
    ctl_emu_open();
    ctl_emu.waited = false;
    if (n > ctl_emu.cap) {
        ctl_emu.f = (ctl_emu_fiber *)realloc(ctl_emu.f, n * sizeof(ctl_emu_fiber));
        for (unsigned t = ctl_emu.cap; t < n; t++) ctl_emu.f[t].stack = (char *)malloc(stack);
        ctl_emu.cap = n;
    }
    ctl_emu.grid = grid, ctl_emu.block = block, ctl_emu.n = n, ctl_emu.body = body;
    for (unsigned bz = 0; bz < grid.z; bz++)
        for (unsigned by = 0; by < grid.y; by++)
            for (unsigned bx = 0; bx < grid.x; bx++) {
                ctl_emu.block_idx = dim3(bx, by, bz);
                CTL_EMU_POISON_SHARED();
                for (unsigned t = 0; t < n; t++) ctl_emu_fiber_init(&ctl_emu.f[t], stack);
                do
                    for (unsigned t = 0; t < n; t++)
                        if (ctl_emu.f[t].state == CTL_EMU_RUN) {
                            ctl_emu.cur = t;
                            ctl_emu_to_fiber(t);
                        }
                while (ctl_emu_release());
            }
    ctl_emu.barriers[name] = ctl_emu.barriers[name] || ctl_emu.waited;
    ctl_emu_close();
}

#undef CTL_EMU_POISON_SHARED

// As cotlab_cuda.cu's: a grid of 0 launches nothing (a zero grid that reached ctl_emu_launch is refused, as CUDA does).
#define CTL_LAUNCH(c, kernel, grid, block, ...)                                                                      \
    ((grid) == 0 ? (void)0                                                                                            \
                 : (ctl_emu_launch(#kernel, dim3((unsigned)(grid)), dim3((unsigned)(block)), [=]() { kernel(__VA_ARGS__); }), \
                    ctl__cu_launched(c, #kernel)))
#define CTL_LAUNCH_SHARED(c, kernel, grid, block, shared, ...)                                                          \
    ((grid) == 0 ? (void)0                                                                                               \
                 : (ctl_emu_launch(#kernel, dim3((unsigned)(grid)), dim3((unsigned)(block)), [=]() { kernel(__VA_ARGS__); }, \
                                   (size_t)(shared), reinterpret_cast<const void *>(&kernel)),                           \
                    ctl__cu_launched(c, #kernel)))

// ---- the runtime API, as far as cotlab uses it -------------------------------------------------

typedef int cudaError_t;
typedef void *cudaStream_t;
enum { cudaSuccess = 0, cudaErrorMemoryAllocation = 2, cudaErrorInvalidValue = 1 };
typedef enum { cudaMemcpyHostToDevice = 1, cudaMemcpyDeviceToHost = 2, cudaMemcpyDeviceToDevice = 3 } cudaMemcpyKind;
struct cudaDeviceProp {
    char name[256];
    int major, minor;
};

// CTL_EMU_DEVICES=0 in the environment: no device (to test the paths that report it).
inline cudaError_t cudaGetDeviceCount(int *n) {
    const char *e = getenv("CTL_EMU_DEVICES");
    *n = e ? atoi(e) : 1;
    return *n > 0 ? cudaSuccess : 100;   // cudaErrorNoDevice
}
inline const char *cudaGetErrorString(cudaError_t e) {
    return e == cudaSuccess ? "no error" : e == 2 ? "out of memory" : e == 100 ? "no CUDA-capable device is detected"
                                             : e == 9 ? "invalid configuration argument" : "invalid argument";
}
inline cudaError_t cudaGetLastError() {
    cudaError_t e = ctl_emu.last_error;
    ctl_emu.last_error = cudaSuccess;
    return e;
}
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
template <typename F> inline cudaError_t cudaFuncSetAttribute(F *kernel, cudaFuncAttribute a, int v) {
    if (a != cudaFuncAttributeMaxDynamicSharedMemorySize || v < 0 || v > CTL_EMU_SHARED_OPTIN) return cudaErrorInvalidValue;
    ctl_emu.max_shared[reinterpret_cast<const void *>(kernel)] = v;
    return cudaSuccess;
}
enum cudaDeviceAttr { cudaDevAttrMaxSharedMemoryPerBlockOptin = 97 };
inline cudaError_t cudaDeviceGetAttribute(int *v, cudaDeviceAttr a, int d) {
    if (a != cudaDevAttrMaxSharedMemoryPerBlockOptin || d != 0) return cudaErrorInvalidValue;
    return *v = CTL_EMU_SHARED_OPTIN, cudaSuccess;
}
inline cudaError_t cudaSetDevice(int d) { return d == 0 ? cudaSuccess : cudaErrorInvalidValue; }
inline cudaError_t cudaGetDeviceProperties(cudaDeviceProp *p, int d) {
    snprintf(p->name, sizeof p->name, "cotlab CUDA emulator on the CPU");
    p->major = 8, p->minor = 0;
    return d == 0 ? cudaSuccess : cudaErrorInvalidValue;
}
// CTL_EMU_MEMORY (bytes): the most one allocation may take.
inline cudaError_t cudaMalloc(void **p, size_t n) {
    const char *e = getenv("CTL_EMU_MEMORY");
    if (e && n > (size_t)strtoull(e, NULL, 10)) return cudaErrorMemoryAllocation;
    // In 2 MiB pages where the kernel allows (madvise), so that opening and closing a large
    // block changes a few page-table entries rather than thousands.
    size_t huge = (size_t)2 << 20, len = (n + huge - 1) / huge * huge;
    if (!len) len = huge;
    char *raw = (char *)mmap(NULL, len + huge, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (raw == (char *)MAP_FAILED) return cudaErrorMemoryAllocation;
    char *m = (char *)(((uintptr_t)raw + huge - 1) & ~(uintptr_t)(huge - 1));
    if (m > raw) munmap(raw, (size_t)(m - raw));
    if (m + len < raw + len + huge) munmap(m + len, (size_t)(raw + len + huge - (m + len)));
#ifdef MADV_HUGEPAGE
    madvise(m, len, MADV_HUGEPAGE);
#endif
    memset(m, 0xA5, n);   // not zeroed, like device memory
    ctl_emu_regions[m] = len;
    if (ctl_emu_depth == 0 && ctl_emu_fenced()) mprotect(m, len, PROT_NONE);
    *p = m;
    return cudaSuccess;
}
inline cudaError_t cudaFree(void *p) {
    auto r = ctl_emu_regions.find(p);
    if (r == ctl_emu_regions.end()) return p ? cudaErrorInvalidValue : cudaSuccess;
    munmap(r->first, r->second);
    ctl_emu_regions.erase(r);
    return cudaSuccess;
}
inline cudaError_t cudaMemGetInfo(size_t *free_b, size_t *total_b) { return *free_b = *total_b = (size_t)1 << 32, cudaSuccess; }
inline cudaError_t cudaMemcpyAsync(void *dst, const void *src, size_t n, cudaMemcpyKind k, cudaStream_t s) {
    (void)k, (void)s;
    ctl_emu_open();
    memmove(dst, src, n);
    ctl_emu_close();
    return cudaSuccess;
}
// Page-locked host ranges: registering one that overlaps another, or unregistering a pointer
// that starts none, fails as on a GPU.
inline std::map<char *, size_t> ctl_emu_pinned;
enum { cudaHostRegisterDefault = 0, cudaErrorHostMemoryAlreadyRegistered = 712, cudaErrorHostMemoryNotRegistered = 713 };
inline cudaError_t cudaHostRegister(void *p, size_t n, unsigned flags) {
    char *c = (char *)p;
    if (!p || !n || flags != cudaHostRegisterDefault) return cudaErrorInvalidValue;
    for (auto &r : ctl_emu_pinned)
        if (c < r.first + r.second && r.first < c + n) return ctl_emu.last_error = cudaErrorHostMemoryAlreadyRegistered;
    ctl_emu_pinned[c] = n;
    return cudaSuccess;
}
inline cudaError_t cudaHostUnregister(void *p) {
    if (!ctl_emu_pinned.erase((char *)p)) return ctl_emu.last_error = cudaErrorHostMemoryNotRegistered;
    return cudaSuccess;
}
inline cudaError_t cudaStreamCreate(cudaStream_t *s) { return *s = (cudaStream_t)&ctl_emu, cudaSuccess; }
inline cudaError_t cudaStreamDestroy(cudaStream_t s) { return (void)s, cudaSuccess; }
inline cudaError_t cudaStreamSynchronize(cudaStream_t s) { return (void)s, cudaSuccess; }

// ---- cuBLAS ----------------------------------------------------------------------------------

typedef void *cublasHandle_t;
typedef int cublasStatus_t;
typedef enum { CUBLAS_OP_N = 0, CUBLAS_OP_T = 1 } cublasOperation_t;
typedef enum { CUBLAS_DEFAULT_MATH = 0, CUBLAS_TF32_TENSOR_OP_MATH = 3 } cublasMath_t;
typedef enum { CUDA_R_32F = 0, CUDA_R_16BF = 14 } cudaDataType;
typedef enum { CUBLAS_COMPUTE_32F = 68 } cublasComputeType_t;
typedef enum { CUBLAS_GEMM_DEFAULT = -1 } cublasGemmAlgo_t;
enum { CUBLAS_STATUS_SUCCESS = 0, CUBLAS_STATUS_INVALID_VALUE = 7 };

inline cublasStatus_t cublasCreate(cublasHandle_t *h) { return *h = (cublasHandle_t)&ctl_emu, CUBLAS_STATUS_SUCCESS; }
inline cublasStatus_t cublasDestroy(cublasHandle_t h) { return (void)h, CUBLAS_STATUS_SUCCESS; }
inline cublasStatus_t cublasSetStream(cublasHandle_t h, cudaStream_t s) { return (void)h, (void)s, CUBLAS_STATUS_SUCCESS; }
inline cublasStatus_t cublasSetMathMode(cublasHandle_t h, cublasMath_t m) { return (void)h, (void)m, CUBLAS_STATUS_SUCCESS; }

// C (m,n) = alpha op(A) op(B) + beta C, column-major; op(A) is m x k. Element loads by type.
inline float ctl_emu_load(const void *p, cudaDataType t, int64_t i) {
    if (t == CUDA_R_32F) return ((const float *)p)[i];
    return __uint_as_float((unsigned)((const uint16_t *)p)[i] << 16);
}
inline cublasStatus_t ctl_emu_gemm(cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k, const float *alpha,
                                   const void *A, cudaDataType at, int lda, const void *B, cudaDataType bt, int ldb,
                                   const float *beta, float *C, int ldc) {
    if (m < 0 || n < 0 || k < 0 || ldc < (m > 1 ? m : 1) || lda < ((ta == CUBLAS_OP_N ? m : k) > 1 ? (ta == CUBLAS_OP_N ? m : k) : 1) ||
        ldb < ((tb == CUBLAS_OP_N ? k : n) > 1 ? (tb == CUBLAS_OP_N ? k : n) : 1))
        return CUBLAS_STATUS_INVALID_VALUE;
    ctl_emu_open();
    for (int j = 0; j < n; j++)
        for (int i = 0; i < m; i++) {
            float s = 0.0f;
            for (int l = 0; l < k; l++) {
                float a = ctl_emu_load(A, at, ta == CUBLAS_OP_N ? i + (int64_t)l * lda : l + (int64_t)i * lda);
                float b = ctl_emu_load(B, bt, tb == CUBLAS_OP_N ? l + (int64_t)j * ldb : j + (int64_t)l * ldb);
                s += a * b;
            }
            float *c = &C[i + (int64_t)j * ldc];
            *c = *beta == 0.0f ? *alpha * s : *alpha * s + *beta * *c;
        }
    ctl_emu_close();
    return CUBLAS_STATUS_SUCCESS;
}
inline cublasStatus_t cublasSgemm(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k,
                                  const float *alpha, const float *A, int lda, const float *B, int ldb, const float *beta,
                                  float *C, int ldc) {
    (void)h;
    return ctl_emu_gemm(ta, tb, m, n, k, alpha, A, CUDA_R_32F, lda, B, CUDA_R_32F, ldb, beta, C, ldc);
}
inline cublasStatus_t cublasGemmEx(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k,
                                   const void *alpha, const void *A, cudaDataType at, int lda, const void *B, cudaDataType bt,
                                   int ldb, const void *beta, void *C, cudaDataType ct, int ldc, cublasComputeType_t comp,
                                   cublasGemmAlgo_t algo) {
    (void)h, (void)algo;
    if (ct != CUDA_R_32F || comp != CUBLAS_COMPUTE_32F) return CUBLAS_STATUS_INVALID_VALUE;
    return ctl_emu_gemm(ta, tb, m, n, k, (const float *)alpha, A, at, lda, B, bt, ldb, (const float *)beta, (float *)C, ldc);
}

#endif
