// Crash-safe checkpoints: build/cotlab trains a small model with a checkpoint every step, and
// is killed with SIGKILL at random moments (half of the kills aimed at the moment a checkpoint
// is being written), then resumed with --resume, again and again. After every kill the newest
// complete checkpoint must open and name its own step, and every whole line of metrics.jsonl
// must equal the uninterrupted run's line for that step, bit for bit (loss, lr, grad norm as
// %.17g); a run that gets to the end must leave the uninterrupted run's final weights, byte for
// byte. Two runs: full fine-tuning, and LoRA with dropout (random masks that must resume too).
// Then the same with SIGINT and SIGTERM (a third as many), which must stop the run cleanly after
// its step with a checkpoint of it (exit 130 or 143), and with a second signal at once.
// Usage: test_kill [KILLS (60)]; needs build/cotlab and build/fuzz/make_seeds (POSIX).
#define COTLAB_IMPLEMENTATION
#include "../cotlab.h"

#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define DIR_ "build/kill"
#define STEPS 100
#define MAX_LINE 512

static int failures;
#define CHECK(cond, ...) \
    do { if (!(cond)) { failures++; printf("    %s:%d: ", __FILE__, __LINE__); printf(__VA_ARGS__); printf("\n"); } } while (0)

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static void sleep_s(double s) {
    struct timespec ts = {(time_t)s, (long)((s - (double)(time_t)s) * 1e9)};
    nanosleep(&ts, NULL);
}

static char *slurp(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *buf = (char *)malloc((size_t)n + 1);
    *len = fread(buf, 1, (size_t)n, f);
    buf[*len] = 0;
    fclose(f);
    return buf;
}

// The metrics of one run: per step, the text from "loss" to the rate (loss, lr, grad norm).
typedef struct metrics { char line[STEPS + 1][MAX_LINE]; } metrics;

// Reads a metrics.jsonl; returns the count of steps it has, or -1 for a line out of place. The
// file is only appended to: a resumed run marks where it resumed ({"resumed_from_step": N})
// after ending a line the kill tore, and repeats the steps after its checkpoint, which must
// equal what the killed run wrote for them.
static int read_metrics(const char *path, metrics *mt) {
    memset(mt, 0, sizeof *mt);
    FILE *f = fopen(path, "r");
    char buf[4096];
    int n = 0;
    bool torn = false;
    while (f && fgets(buf, sizeof buf, f)) {
        long long step;
        size_t len = strlen(buf);
        char *a = strstr(buf, "\"loss\""), *b = strstr(buf, ", \"tokens_per_s\"");
        if (len < 2 || strcmp(buf + len - 2, "}\n")) {   // torn: the kill came while it was written
            torn = true;
            continue;
        }
        if (sscanf(buf, "{\"resumed_from_step\": %lld", &step) == 1) {
            torn = false;
            continue;
        }
        if (torn || sscanf(buf, "{\"step\": %lld", &step) != 1 || step < 1 || step > STEPS || !a || !b || b - a >= MAX_LINE ||
            (mt->line[step][0] && strncmp(mt->line[step], a, (size_t)(b - a)))) {
            fclose(f);
            return -1;
        }
        n += !mt->line[step][0];
        memcpy(mt->line[step], a, (size_t)(b - a));
    }
    if (f) fclose(f);
    return n;
}

// The step of the newest ckpt-N.gguf in dir (0: none), and whether a .tmp is lying there.
static long long newest(const char *dir, bool *tmp) {
    DIR *d = opendir(dir);
    struct dirent *de;
    long long best = 0, step;
    char tail[8];
    *tmp = false;
    while (d && (de = readdir(d))) {
        if (strstr(de->d_name, ".tmp")) *tmp = true;
        if (sscanf(de->d_name, "ckpt-%lld.gguf%1s", &step, tail) == 1 && step > best) best = step;
    }
    if (d) closedir(d);
    return best;
}

static bool tmp_present(const char *dir) {
    bool tmp;
    newest(dir, &tmp);
    return tmp;
}

static pid_t start(const char *const *args, const char *out, bool resume, const char *log) {
    pid_t pid = fork();
    if (pid == 0) {
        const char *argv[64];
        int n = 0;
        for (; args[n]; n++) argv[n] = args[n];
        argv[n++] = "--out", argv[n++] = out;
        if (resume) argv[n++] = "--resume";
        argv[n] = NULL;
        int fd = open(log, O_WRONLY | O_CREAT | O_APPEND, 0644);
        if (fd >= 0) dup2(fd, 1), dup2(fd, 2), close(fd);
        execv(argv[0], (char *const *)argv);
        _exit(127);
    }
    return pid;
}

typedef struct stats { int kills, in_write, before_first, resumes, completed, clean_stops, double_signals; } stats;

// One configuration: the uninterrupted run, then kill cycles until `kills` kills were done.
// sig SIGKILL: the process dies where it is. SIGINT or SIGTERM: it must finish its step, write
// a checkpoint of it and exit 128 + sig; a quarter of the time a second signal follows at
// once, which ends it where it is (as SIGKILL).
static void kill_cycles(const char *name, const char *const *args, const char *final_file, int kills, int sig, ctl_rng *rng, stats *s) {
    char ref_dir[256], run_dir[256], log[256], path[512], cmd[600];
    snprintf(ref_dir, sizeof ref_dir, DIR_ "/%s_ref", name);
    snprintf(run_dir, sizeof run_dir, DIR_ "/%s_run", name);
    snprintf(log, sizeof log, DIR_ "/%s.log", name);
    static metrics ref, got;
    int status;
    double t0 = now();
    pid_t pid = start(args, ref_dir, false, log);
    waitpid(pid, &status, 0);
    double t_ref = now() - t0;
    snprintf(path, sizeof path, "%s/metrics.jsonl", ref_dir);
    CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0 && read_metrics(path, &ref) == STEPS,
          "%s: the uninterrupted run (see %s)", name, log);
    if (failures) return;
    size_t ref_len, got_len;
    snprintf(path, sizeof path, "%s/%s", ref_dir, final_file);
    char *ref_final = slurp(path, &ref_len);
    printf("    %s: the uninterrupted run took %.2f s\n", name, t_ref);
    while (s->kills < kills && !failures) {   // one run from scratch, killed until it gets to the end
        snprintf(cmd, sizeof cmd, "rm -rf %s", run_dir);
        if (system(cmd)) return;
        for (bool first = true;; first = false) {
            pid = start(args, run_dir, !first, log);
            s->resumes += !first;
            bool aimed = ctl_rng_uniform(rng) < 0.5f, exited = false;
            if (s->kills >= kills) waitpid(pid, &status, 0), exited = true;   // enough kills: this one runs to the end
            double t = now(), wait = ctl_rng_uniform(rng) * 0.15 * t_ref;
            while (!exited && now() - t < (aimed ? t_ref : wait)) {   // aimed: kill just after a .tmp appears
                if (waitpid(pid, &status, WNOHANG) == pid) exited = true;
                else if (aimed && tmp_present(run_dir)) {
                    sleep_s(ctl_rng_uniform(rng) * 1e-3);
                    break;
                } else sleep_s(aimed ? 2e-5 : 2e-4);
            }
            bool stopped = false;
            if (!exited) {
                bool twice = sig != SIGKILL && ctl_rng_uniform(rng) < 0.25f;
                kill(pid, sig);
                if (twice) kill(pid, sig), s->double_signals++;
                waitpid(pid, &status, 0);
                stopped = WIFEXITED(status) && WEXITSTATUS(status) == 128 + sig;   // finished its step, wrote a checkpoint
                exited = !WIFSIGNALED(status) && !stopped;   // it ended just before the signal
                CHECK(stopped || exited || (WIFSIGNALED(status) && (WTERMSIG(status) == sig || sig == SIGKILL)),
                      "%s: after signal %d the status is %d (see %s)", name, sig, status, log);
                s->clean_stops += stopped;
            }
            if (exited) {
                CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0, "%s: a resumed run failed (see %s)", name, log);
                if (failures) return;
            } else {
                s->kills++;
            }
            bool tmp;
            long long step = newest(run_dir, &tmp);
            s->in_write += !exited && tmp, s->before_first += !exited && step == 0;
            if (step > 0) {   // the newest complete checkpoint opens and names its own step
                ctl_ctx *ctx;
                ctl_gguf *g;
                int64_t saved = -1;
                snprintf(path, sizeof path, "%s/ckpt-%08lld.gguf", run_dir, step);
                ctl_ctx_init(&ctx, NULL);
                bool ok = ctl_gguf_open(ctx, path, &g) == CTL_OK;
                if (ok) ok = ctl_gguf_get_int(g, "cotlab.train.step", &saved) == CTL_OK && saved == step, ctl_gguf_close(g);
                CHECK(ok, "%s: %s does not open as the checkpoint of step %lld: %s", name, path, step, ctl_last_error(ctx));
                ctl_ctx_free(ctx);
            }
            snprintf(path, sizeof path, "%s/metrics.jsonl", run_dir);
            int n = read_metrics(path, &got);
            CHECK(n >= 0, "%s: a line of %s is out of place", name, path);
            int last = 0;
            for (int k = 1; k <= STEPS; k++) last = got.line[k][0] ? k : last;
            CHECK(!stopped || step == last, "%s: stopped by signal %d after step %d, but the newest checkpoint is of step %lld", name, sig, last, step);
            for (int k = 1; k <= STEPS && !failures; k++)
                CHECK(!got.line[k][0] || !strcmp(got.line[k], ref.line[k]), "%s, step %d after %d kills:\n      got  %s\n      want %s",
                      name, k, s->kills, got.line[k], ref.line[k]);
            if (failures) return;
            if (exited) {   // the end: every step there, the final weights the uninterrupted run's
                snprintf(path, sizeof path, "%s/%s", run_dir, final_file);
                char *final = slurp(path, &got_len);
                CHECK(n == STEPS && final && ref_final && got_len == ref_len && !memcmp(final, ref_final, ref_len),
                      "%s: the finished run's %s or metrics differ from the uninterrupted run's", name, final_file);
                free(final);
                s->completed++;
                break;
            }
        }
    }
    free(ref_final);
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0);   // a line at a time, also into a pipe or a log
    int kills = argc > 1 ? atoi(argv[1]) : 60;
    if (system("rm -rf " DIR_ " && mkdir -p " DIR_ " && build/fuzz/make_seeds " DIR_) != 0)
        return printf("test_kill: build/fuzz/make_seeds failed (make build/fuzz/make_seeds)\n"), 1;
    ctl_ctx *ctx;
    ctl_gguf *vocab;
    ctl_model *m;
    ctl_model_config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.arch = CTL_ARCH_LLAMA, cfg.vocab_size = 264, cfg.n_ctx = 64, cfg.n_embd = 64, cfg.n_layer = 2, cfg.n_head = 4;
    cfg.n_kv_head = 2, cfg.n_ff = 160, cfg.tied_embeddings = true;
    if (ctl_ctx_init(&ctx, NULL) || ctl_gguf_open(ctx, DIR_ "/vocab.gguf", &vocab) || ctl_model_create(ctx, &cfg, &m))
        return printf("test_kill: %s\n", ctl_last_error(ctx)), 1;
    ctl_model_init_random(m, 3);
    if (ctl_model_export_gguf(m, vocab, DIR_ "/model.gguf", CTL_GGML_F32)) return printf("test_kill: %s\n", ctl_last_error(ctx)), 1;
    ctl_model_free(m), ctl_gguf_close(vocab), ctl_ctx_free(ctx);
    FILE *f = fopen(DIR_ "/data.jsonl", "w");
    for (int i = 0; i < 40; i++)
        fprintf(f, "{\"prompt\": \"What is %d + %d?\", \"completion\": \"%d + %d = %d, so the answer is %d.\"}\n", i, 2 * i + 1, i, 2 * i + 1,
                3 * i + 1, 3 * i + 1);
    fclose(f);

    printf("crash-safe checkpoints: %d SIGKILLs per run kind, each resumed with --resume\n", kills);
#define COMMON "build/cotlab", "sft", "--model", DIR_ "/model.gguf", "--data", DIR_ "/data.jsonl", "--steps", "100", "--batch", "2", \
        "--seq-len", "48", "--save-every", "1", "--keep", "2", "--threads", "1", "--seed", "7"
    static const char *const full[] = {COMMON, "--adapter", "full", "--lr", "1e-3", NULL};
    static const char *const lora[] = {COMMON, "--adapter", "lora", "--rank", "8", "--dropout", "0.1", "--lr", "1e-2", NULL};
    ctl_rng rng;
    ctl_rng_seed(&rng, (uint64_t)time(NULL));
    stats s[4];
    memset(s, 0, sizeof s);
    kill_cycles("full", full, "model.gguf", kills, SIGKILL, &rng, &s[0]);
    kill_cycles("lora", lora, "adapter.gguf", kills, SIGKILL, &rng, &s[1]);
    kill_cycles("lora_sigint", lora, "adapter.gguf", kills / 3, SIGINT, &rng, &s[2]);
    kill_cycles("full_sigterm", full, "model.gguf", kills / 3, SIGTERM, &rng, &s[3]);
    static const char *const names[4] = {"full, SIGKILL", "lora, SIGKILL", "lora, SIGINT", "full, SIGTERM"};
    for (int k = 0; k < 4; k++)
        printf("    %s: %d kills (%d inside a checkpoint write, %d before the first checkpoint; %d clean stops, %d second signals), "
               "%d resumes, %d runs to the end\n", names[k], s[k].kills, s[k].in_write, s[k].before_first, s[k].clean_stops,
               s[k].double_signals, s[k].resumes, s[k].completed);
    CHECK(s[0].kills + s[1].kills >= 2 * kills, "kills: %d", s[0].kills + s[1].kills);
    CHECK(s[0].in_write + s[1].in_write >= kills / 5, "too few kills inside a checkpoint write (%d)", s[0].in_write + s[1].in_write);
    CHECK(s[2].clean_stops + s[3].clean_stops >= kills / 3, "too few clean stops by SIGINT/SIGTERM (%d)", s[2].clean_stops + s[3].clean_stops);
    for (int k = 0; k < 4; k++) CHECK(s[k].completed >= 1, "%s: the run got to the end at least once", names[k]);
    printf(failures ? "  FAIL\n" : "  ok: every resume continued the uninterrupted run bit for bit\n");
    return failures ? 1 : 0;
}
