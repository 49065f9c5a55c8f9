/*
 * Times one CPU training step of karpathy/llm.c's GPT-2 (train_gpt2.c), so that `make bench` can
 * quote it next to cotlab. None of llm.c is copied here: tools/get_llmc.sh puts its sources in
 * models/llm.c/ and this file #includes train_gpt2.c from there, calling llm.c's own functions.
 *
 * Built (Makefile rule build/bench_llmc) with the flags llm.c's own Makefile uses for its CPU
 * train_gpt2 on Linux, so that llm.c is measured as its authors build it:
 *     cc -Ofast -march=native -fopenmp -DOMP -Imodels/llm.c tools/bench_llmc.c -o build/bench_llmc -lm -lgomp
 *   -Ofast            CFLAGS = -Ofast ...  (its kernels count on it to turn loops into FMAs)
 *   -march=native     CFLAGS_COND, added when the compiler accepts it
 *   -fopenmp -DOMP    "Check for OpenMP support in GCC or Clang on Linux": CFLAGS += -fopenmp -DOMP
 *   -lm -lgomp        LDLIBS = -lm, then LDLIBS += -lgomp in that same OpenMP branch
 * (its -Wno-* flags only silence warnings and are left out.)
 *
 *     build/bench_llmc [--B 4] [--T 64] [--steps 5] [--threads N] [--ckpt PATH]
 *
 * llm.c needs a checkpoint file; with no real weights here it writes (once) a GPT-2 124M one with
 * random weights in llm.c's format to PATH (default build/llmc_gpt2_124M_random.bin, ~500 MB).
 * A step's cost does not depend on the weights' values. Then 1 warm-up step (llm.c allocates
 * activations, gradients and AdamW state lazily in the first one) and `steps` timed steps of
 * forward + zero_grad + backward + AdamW update, as llm.c's main loop does them, on random tokens.
 *
 * stdout gets exactly one line:
 *     RESULT ms_per_step=%.1f tokens_per_s=%.2f threads=%d B=%d T=%d     (median timed step)
 * or  UNAVAILABLE <reason>, with a non-zero exit. llm.c's own chatter and the per-step loss (about
 * ln(50257) = 10.8 at first, as random weights should give) go to stderr.
 */

// llm.c's training program has its own main(); rename it out of the way and use our own.
#define main llmc_train_main
#include "train_gpt2.c"
#undef main

#include <sys/stat.h>

// A small seeded RNG (splitmix64) for weights and tokens: the same checkpoint on every machine.
static uint64_t rng_next(uint64_t *s) {
    uint64_t z = (*s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static double rng_uniform(uint64_t *s) { // in (0, 1), never 0, so log() below is finite
    return ((rng_next(s) >> 11) + 0.5) / 9007199254740992.0;
}

static float rng_normal(uint64_t *s, float std) { // Box-Muller
    double u = rng_uniform(s), v = rng_uniform(s);
    return (float)(std * sqrt(-2.0 * log(u)) * cos(6.283185307179586 * v));
}

// GPT-2 124M, the model llm.c's train_gpt2.c trains; Vp is V padded to a multiple of 128.
static GPT2Config gpt2_124m(void) {
    GPT2Config c = {.max_seq_len = 1024, .vocab_size = 50257, .padded_vocab_size = 50304,
                    .num_layers = 12, .num_heads = 12, .channels = 768};
    return c;
}

static size_t checkpoint_bytes(GPT2Config c) {
    size_t sizes[NUM_PARAMETER_TENSORS], n = 0;
    fill_in_parameter_sizes(sizes, c);
    for (int i = 0; i < NUM_PARAMETER_TENSORS; i++) n += sizes[i];
    return 256 * sizeof(int) + n * sizeof(float);
}

// Writes a checkpoint gpt2_build_from_checkpoint reads: 256 int32 of header, then the 16
// parameter tensors as fp32 in llm.c's order (taken from its own fill_in_parameter_sizes).
// Written under a temporary name and renamed, so an interrupted run leaves no half file at path.
static int write_checkpoint(const char *path, GPT2Config c) {
    int header[256] = {0};
    header[0] = 20240326; // magic
    header[1] = 3;        // version 3: fp32 parameters
    header[2] = c.max_seq_len;
    header[3] = c.vocab_size;
    header[4] = c.num_layers;
    header[5] = c.num_heads;
    header[6] = c.channels;
    header[7] = c.padded_vocab_size;

    size_t sizes[NUM_PARAMETER_TENSORS];
    fill_in_parameter_sizes(sizes, c);
    // Which tensors (in llm.c's order wte, wpe, ln1w, ln1b, qkvw, ...) are what: weight matrices
    // and embeddings get N(0, 0.02) as in GPT-2's init, layernorm gains 1, biases 0.
    enum { ZERO, ONE, NORMAL };
    static const int kind[NUM_PARAMETER_TENSORS] = {
        NORMAL, NORMAL, ONE, ZERO, NORMAL, ZERO, NORMAL, ZERO,
        ONE, ZERO, NORMAL, ZERO, NORMAL, ZERO, ONE, ZERO};

    char tmp[4096];
    if (snprintf(tmp, sizeof tmp, "%s.tmp.%d", path, (int)getpid()) >= (int)sizeof tmp) return -1;
    FILE *f = fopen(tmp, "wb");
    if (!f) return -1;
    int ok = fwrite(header, sizeof(int), 256, f) == 256;
    enum { CHUNK = 1 << 16 };
    static float buf[CHUNK];
    uint64_t rng = 20240326;
    for (int t = 0; t < NUM_PARAMETER_TENSORS && ok; t++) {
        for (size_t done = 0; done < sizes[t] && ok; done += CHUNK) {
            size_t n = sizes[t] - done < CHUNK ? sizes[t] - done : CHUNK;
            for (size_t i = 0; i < n; i++) {
                // wte's rows past V are padding; llm.c's exporter writes them as zeros.
                int pad = t == 0 && (done + i) >= (size_t)c.vocab_size * c.channels;
                buf[i] = kind[t] == ONE ? 1.0f
                       : kind[t] == NORMAL && !pad ? rng_normal(&rng, 0.02f) : 0.0f;
            }
            ok = fwrite(buf, sizeof(float), n, f) == n;
        }
    }
    ok = (fclose(f) == 0) && ok;
    if (!ok || rename(tmp, path) != 0) {
        remove(tmp);
        return -1;
    }
    return 0;
}

// llm.c prints progress to stdout and exits on errors; while it runs, stdout goes to stderr so
// that ours carries only the one RESULT / UNAVAILABLE line a caller parses.
static int saved_stdout = -1;
static int finished = 0;

static void stdout_to_stderr(void) {
    fflush(stdout);
    saved_stdout = dup(1);
    dup2(2, 1);
}

static void stdout_back(void) {
    if (saved_stdout < 0) return;
    fflush(stdout);
    dup2(saved_stdout, 1);
    close(saved_stdout);
    saved_stdout = -1;
}

// If llm.c calls exit() (bad checkpoint, out of memory), still say so on stdout.
static void at_exit(void) {
    if (finished) return;
    stdout_back();
    printf("UNAVAILABLE llm.c exited during the run (see stderr)\n");
}

static int unavailable(const char *reason) {
    stdout_back();
    printf("UNAVAILABLE %s\n", reason);
    finished = 1;
    return 1;
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

int main(int argc, char **argv) {
    int B = 4, T = 64, steps = 5, threads = 1;
#ifdef OMP
    threads = omp_get_num_procs();
#endif
    const char *ckpt = "build/llmc_gpt2_124M_random.bin";
    // Line-buffered, so that llm.c's lines (sent to stderr below) come in order with ours.
    setvbuf(stdout, NULL, _IOLBF, 0);
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!v) return unavailable("usage: bench_llmc [--B n] [--T n] [--steps n] [--threads n] [--ckpt path]");
        if (!strcmp(a, "--B")) B = atoi(v);
        else if (!strcmp(a, "--T")) T = atoi(v);
        else if (!strcmp(a, "--steps")) steps = atoi(v);
        else if (!strcmp(a, "--threads")) threads = atoi(v);
        else if (!strcmp(a, "--ckpt")) ckpt = v;
        else return unavailable("unknown option (options: --B --T --steps --threads --ckpt)");
        i++;
    }
    GPT2Config config = gpt2_124m();
    if (B < 1 || T < 1 || T > config.max_seq_len || steps < 1 || threads < 1)
        return unavailable("bad arguments: need B >= 1, 1 <= T <= 1024, steps >= 1, threads >= 1");
#ifdef OMP
    omp_set_num_threads(threads);
#else
    threads = 1; // built without -DOMP: llm.c runs single-threaded
#endif

    // (Re)write the checkpoint when it is missing or not the size a 124M one has.
    struct stat st;
    if (stat(ckpt, &st) != 0 || (size_t)st.st_size != checkpoint_bytes(config)) {
        fprintf(stderr, "bench_llmc: writing a random-weight GPT-2 124M checkpoint to %s\n", ckpt);
        if (write_checkpoint(ckpt, config) != 0) return unavailable("cannot write the checkpoint");
    }

    atexit(at_exit);
    stdout_to_stderr();
    GPT2 model;
    gpt2_build_from_checkpoint(&model, ckpt);

    size_t n = (size_t)B * T;
    int *tokens = malloc((n + 1) * sizeof(int));
    double *ms = malloc(steps * sizeof(double));
    if (!tokens || !ms) return unavailable("out of memory");
    uint64_t rng = 1337;
    for (int step = 0; step <= steps; step++) { // step 0 is the warm-up
        // Fresh random tokens each step; targets are the inputs shifted by one, as llm.c's
        // dataloader gives them. (Drawn outside the timed part, which is the compute alone.)
        for (size_t i = 0; i <= n; i++) tokens[i] = (int)(rng_next(&rng) % config.vocab_size);
        double t0 = now_s();
        gpt2_forward(&model, tokens, tokens + 1, B, T);
        gpt2_zero_grad(&model);
        gpt2_backward(&model);
        gpt2_update(&model, 1e-4f, 0.9f, 0.999f, 1e-8f, 0.0f, step + 1);
        double dt = (now_s() - t0) * 1e3;
        if (step > 0) ms[step - 1] = dt;
        fprintf(stderr, "bench_llmc: step %d%s: loss %.4f, %.1f ms\n", step,
                step == 0 ? " (warm-up)" : "", model.mean_loss, dt);
    }
    gpt2_free(&model);
    stdout_back();

    qsort(ms, steps, sizeof(double), cmp_double);
    double med = steps % 2 ? ms[steps / 2] : 0.5 * (ms[steps / 2 - 1] + ms[steps / 2]);
    printf("RESULT ms_per_step=%.1f tokens_per_s=%.2f threads=%d B=%d T=%d\n",
           med, n / (med * 1e-3), threads, B, T);
    finished = 1;
    free(tokens);
    free(ms);
    return 0;
}
