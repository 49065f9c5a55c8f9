// What every fuzz harness shares: cotlab's implementation and one single-threaded context.
//   clang -fsanitize=fuzzer,address,undefined tests/fuzz/fuzz_gguf.c   libFuzzer drives it
//   tests/fuzz/replay.c                                                all of them, on files
#ifndef FUZZ_H
#define FUZZ_H
#define COTLAB_IMPLEMENTATION
#include "../../cotlab.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static volatile float fuzz_sink;   // values read, so that the reads are not optimised away

// A harness's own loops over what the library wrote: ASan checks every read as before, but
// coverage does not instrument them (a compare callback per element cost more than the read,
// and a loop count taken from the input tells the fuzzer nothing the library's code does not).
#if defined(__clang__)
#define FUZZ_NO_COVERAGE __attribute__((no_sanitize("coverage"), noinline))
#else
#define FUZZ_NO_COVERAGE __attribute__((noinline))
#endif

// Errors are expected by the thousand: the context keeps them quietly (no logger).
static ctl_ctx *fuzz_ctx(void) {
    static ctl_ctx *ctx;
    if (!ctx) {
        ctl_ctx_desc d = ctl_ctx_desc_default();
        d.n_threads = 1;
        if (ctl_ctx_init(&ctx, &d)) abort();
    }
    return ctx;
}

// The model fuzz_adapter loads adapter files onto (make_seeds writes its seeds for it): untied,
// so that the head and the embeddings can take adapters too.
#define FUZZ_VOCAB 32
static ctl_model_config fuzz_adapter_config(void) {
    ctl_model_config c;
    memset(&c, 0, sizeof c);
    c.arch = CTL_ARCH_LLAMA, c.vocab_size = FUZZ_VOCAB, c.n_ctx = 8, c.n_embd = 16, c.n_layer = 2;
    c.n_head = 2, c.n_kv_head = 1, c.n_ff = 24, c.tied_embeddings = false;
    return c;
}

#endif
