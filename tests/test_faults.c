// The command line as a hostile user and a failing machine meet it (POSIX; needs build/cotlab
// and build/fuzz/make_seeds):
//   torture  every option of every subcommand given 0, -1, NaN, infinities, 2^31, 2^62, 1e308,
//            a word and nothing; each run bounded (3 GB of address space, 60 s): none may
//            crash or hang; a failure says why ("cotlab: ...") and exits 1 or 2, a value that
//            is no number for a numeric option exits 2.
//   disk     every kind of file written with the disk full (a file-size limit, SIGXFSZ
//            ignored, makes each write past 8 KB fail): the run fails with a message and the
//            files of the good run before it are as they were, byte for byte, with no
//            temporary file left beside them.
//   lock     a second run on a directory in use fails at once naming the first run's pid.
//   nothing  hostile files and settings that once hung, crashed or passed silently.
// Usage: test_faults [torture|disk|lock|nothing ...] (all by default). FAULTS_NO_AS_LIMIT=1
// leaves the address space unlimited, for a build/cotlab under AddressSanitizer (whose shadow
// memory needs terabytes of it; with ASAN_OPTIONS=allocator_may_return_null=1).
#define COTLAB_IMPLEMENTATION
#include "../cotlab.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define DIR_ "build/faults"

static int failures, checks;
#define CHECK(cond, ...) \
    do { checks++; if (!(cond)) { failures++; printf("    %s:%d: ", __FILE__, __LINE__); printf(__VA_ARGS__); printf("\n"); } } while (0)

static char root[4096];   // the absolute path of DIR_

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static char *slurp(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (!f) return *len = 0, NULL;
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *buf = (char *)malloc((size_t)n + 1);
    *len = fread(buf, 1, (size_t)n, f);
    buf[*len] = 0;
    fclose(f);
    return buf;
}

// How a child run is bounded and fed.
typedef struct limits {
    double seconds;       // killed after (a hang)
    rlim_t address;       // RLIMIT_AS, 0: none
    rlim_t file_size;     // RLIMIT_FSIZE, 0: none (SIGXFSZ ignored, so writes past it fail)
    const char *stdin_text;
    const char *cwd;
} limits;

typedef struct result {
    int code;             // exit status, or -signal, or -1000 when killed for taking too long
    char out[4096];       // the end of stdout + stderr
} result;

// Runs build/cotlab with argv (NULL-terminated, argv[0] the subcommand).
static result run_cli(const char *const *args, const limits *lim) {
    result r;
    memset(&r, 0, sizeof r);
    char log[4200], bin[4200];
    snprintf(log, sizeof log, "%s/run.log", root);
    snprintf(bin, sizeof bin, "%s/../cotlab", root);
    int in[2];
    if (pipe(in)) return r.code = -2000, r;
    pid_t pid = fork();
    if (pid == 0) {
        const char *argv[128];
        int n = 0;
        argv[n++] = bin;
        for (int i = 0; args[i] && n < 126; i++) argv[n++] = args[i];
        argv[n] = NULL;
        int fd = open(log, O_WRONLY | O_CREAT | O_TRUNC, 0644);
        if (fd >= 0) dup2(fd, 1), dup2(fd, 2), close(fd);
        dup2(in[0], 0), close(in[0]), close(in[1]);
        if (lim->cwd && chdir(lim->cwd)) _exit(126);
        struct rlimit rl;
        if (lim->address && !getenv("FAULTS_NO_AS_LIMIT")) rl.rlim_cur = rl.rlim_max = lim->address, setrlimit(RLIMIT_AS, &rl);
        if (lim->file_size) rl.rlim_cur = rl.rlim_max = lim->file_size, setrlimit(RLIMIT_FSIZE, &rl), signal(SIGXFSZ, SIG_IGN);
        execv(bin, (char *const *)argv);
        _exit(127);
    }
    close(in[0]);
    if (lim->stdin_text && write(in[1], lim->stdin_text, strlen(lim->stdin_text)) < 0) r.code = -3000;
    close(in[1]);
    int status = 0;
    double t0 = now();
    bool killed = false;
    while (waitpid(pid, &status, WNOHANG) == 0) {
        if (now() - t0 > lim->seconds) kill(pid, SIGKILL), waitpid(pid, &status, 0), killed = true;
        else {
            struct timespec ts = {0, 2000000};
            nanosleep(&ts, NULL);
        }
        if (killed) break;
    }
    r.code = killed ? -1000 : WIFSIGNALED(status) ? -WTERMSIG(status) : WEXITSTATUS(status);
    size_t len;
    char *text = slurp(log, &len);
    if (text) snprintf(r.out, sizeof r.out, "%s", len >= sizeof r.out ? text + len - (sizeof r.out - 1) : text);
    free(text);
    return r;
}

// The fixtures: a small llama with a byte-level vocabulary and a chat template, data of each
// kind, an adapter, two eval --details files and a metrics file.
static bool make_fixtures(void) {
    char cmd[12800];
    snprintf(cmd, sizeof cmd, "rm -rf %s && mkdir -p %s/seeds && build/fuzz/make_seeds %s/seeds > /dev/null", root, root, root);
    if (system(cmd)) return printf("    build/fuzz/make_seeds failed (make build/fuzz/make_seeds)\n"), false;
    ctl_ctx *ctx;
    ctl_gguf *vocab;
    ctl_model *m;
    ctl_model_config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.arch = CTL_ARCH_LLAMA, cfg.vocab_size = 264, cfg.n_ctx = 128, cfg.n_embd = 32, cfg.n_layer = 2, cfg.n_head = 4;
    cfg.n_kv_head = 2, cfg.n_ff = 64, cfg.tied_embeddings = true;
    if (ctl_ctx_init(&ctx, NULL) || ctl_gguf_open(ctx, DIR_ "/seeds/vocab.gguf", &vocab) || ctl_model_create(ctx, &cfg, &m))
        return printf("    fixtures: %s\n", ctl_last_error(ctx)), false;
    ctl_model_init_random(m, 5);
    bool ok = !ctl_model_export_gguf(m, vocab, DIR_ "/model.gguf", CTL_GGML_F32);
    ((float *)ctl_model_param(m, 3)->value.data)[7] = NAN;   // a NaN in a block's weight: generation must say where
    ok = ok && !ctl_model_export_gguf(m, vocab, DIR_ "/nan.gguf", CTL_GGML_F32);
    if (!ok) printf("    fixtures: %s\n", ctl_last_error(ctx));
    ctl_model_free(m), ctl_gguf_close(vocab), ctl_ctx_free(ctx);
    FILE *f = fopen(DIR_ "/sft.jsonl", "w");
    for (int i = 0; i < 12; i++) fprintf(f, "{\"prompt\": \"What is %d + 1?\", \"completion\": \"%d\"}\n", i, i + 1);
    fclose(f);
    f = fopen(DIR_ "/pref.jsonl", "w");
    for (int i = 0; i < 8; i++) fprintf(f, "{\"prompt\": \"Pick %d\", \"chosen\": \"7\", \"rejected\": \"%d\"}\n", i, i);
    fclose(f);
    f = fopen(DIR_ "/gsm.jsonl", "w");
    for (int i = 0; i < 4; i++) fprintf(f, "{\"question\": \"What is %d + 1?\", \"answer\": \"%d + 1 = %d\\n#### %d\"}\n", i, i, i + 1, i + 1);
    fclose(f);
    f = fopen(DIR_ "/long.jsonl", "w");   // no example fits 32 tokens
    for (int i = 0; i < 6; i++) fprintf(f, "{\"prompt\": \"%0200d\", \"completion\": \"x\"}\n", i);
    fclose(f);
    f = fopen(DIR_ "/bom.jsonl", "w");   // a byte-order mark before the first line, as Windows editors write
    fprintf(f, "\xef\xbb\xbf{\"prompt\": \"a\", \"completion\": \"b\"}\n{\"prompt\": \"c\", \"completion\": \"d\"}\n");
    fclose(f);
    f = fopen(DIR_ "/metrics.jsonl", "w");
    for (int i = 1; i <= 5; i++) fprintf(f, "{\"step\": %d, \"loss\": %g, \"lr\": 0.001}\n", i, 3.0 / i);
    fclose(f);
    if (!ok) return false;
    limits lim = {120, 0, 0, NULL, root};
    const char *sft[] = {"sft", "--model", "model.gguf", "--data", "sft.jsonl", "--steps", "2", "--batch", "2", "--seq-len", "96",
                         "--threads", "1", "--out", "fixture_run", NULL};
    result r = run_cli(sft, &lim);
    const char *ev[] = {"eval", "--model", "model.gguf", "--data", "gsm.jsonl", "--max-new", "4", "--threads", "1", "--details", "a.jsonl", NULL};
    result e1 = run_cli(ev, &lim);
    ev[10] = "b.jsonl";
    result e2 = run_cli(ev, &lim);
    if (r.code || e1.code || e2.code) return printf("    fixtures: a run failed:\n%s%s%s\n", r.out, e1.out, e2.out), false;
    return true;
}

// ---- torture ----------------------------------------------------------------------------------

// Each subcommand with the arguments of a short valid run (the tortured option's own value
// replaces the one given here, if any).
static const struct { const char *cmd; const char *args[24]; const char *stdin_text; } commands[] = {
    {"sft", {"--model", "../../model.gguf", "--data", "../../sft.jsonl", "--steps", "2", "--stop-at", "1", "--batch", "2", "--seq-len", "96", "--threads", "1", "--out", "o"}, NULL},
    {"dpo", {"--model", "../../model.gguf", "--data", "../../pref.jsonl", "--steps", "2", "--stop-at", "1", "--batch", "1", "--seq-len", "96", "--threads", "1", "--out", "o"}, NULL},
    {"grpo", {"--model", "../../model.gguf", "--data", "../../gsm.jsonl", "--steps", "2", "--stop-at", "1", "--group", "2", "--prompts", "1",
              "--batch", "2", "--max-new", "4", "--seq-len", "96", "--threads", "1", "--out", "o"}, NULL},
    {"rft", {"--model", "../../model.gguf", "--data", "../../gsm.jsonl", "--rounds", "1", "--samples", "2", "--max-new", "4", "--limit", "2",
             "--steps", "1", "--batch", "2", "--seq-len", "96", "--threads", "1", "--out", "o"}, NULL},
    {"generate", {"--model", "../../model.gguf", "--prompt", "hi", "--max-new", "4", "--threads", "1"}, NULL},
    {"chat", {"--model", "../../model.gguf", "--max-new", "4", "--threads", "1"}, "hello\n"},
    {"eval", {"--model", "../../model.gguf", "--data", "../../gsm.jsonl", "--max-new", "4", "--limit", "2", "--threads", "1"}, NULL},
    {"export", {"--model", "../../model.gguf", "--load", "../../fixture_run/adapter.gguf", "--out", "x.gguf", "--threads", "1"}, NULL},
    {"merge", {"--model", "../../model.gguf", "--adapters", "../../fixture_run/adapter.gguf:0.5", "--out", "m.gguf", "--threads", "1"}, NULL},
    {"info", {"--model", "../../model.gguf", "--threads", "1"}, NULL},
    {"plot", {"../../metrics.jsonl", "--out", "p.svg"}, NULL},
    {"compare", {"../../a.jsonl", "../../b.jsonl"}, NULL},
};

static const char *const hostile[] = {"0", "-1", "nan", "inf", "-inf", "2147483648", "4611686018427387904", "1e308", "abc", ""};

// The options of a subcommand from its --help: names, and whether each takes a value and is a
// number (its placeholder N, R, A, P, ... and not PATH, TEXT, LIST, KIND, ...).
typedef struct option_info { char name[40]; bool value, number; } option_info;

static int options_of(const char *cmd, option_info *opt, int cap) {
    const char *args[] = {cmd, "--help", NULL};
    limits lim = {30, 0, 0, NULL, root};
    result r = run_cli(args, &lim);
    int n = 0;
    for (char *p = r.out; (p = strstr(p, "\n  --")) && n < cap; p++) {
        char name[40], place[16] = "";
        if (sscanf(p + 5, "%39s %15s", name, place) < 1) continue;
        const char *after = p + 5 + strlen(name);
        size_t gap = strspn(after, " ");
        bool value = after[gap] >= 'A' && after[gap] <= 'Z' && (after[gap + 1] == ' ' || (after[gap + 1] >= 'A' && after[gap + 1] <= 'Z'));
        static const char *const words[] = {"PATH", "TEXT", "LIST", "KIND", "DIR", "WHAT", "PROG", "F", "L", "S"};
        bool number = value;
        for (size_t k = 0; k < sizeof words / sizeof *words; k++) number &= strcmp(place, words[k]) != 0;
        if (!strcmp(name, "seed") || !strcmp(name, "scale") || !strcmp(name, "loss")) number = !strcmp(name, "seed");
        snprintf(opt[n].name, sizeof opt[n].name, "%s", name);
        opt[n].value = value, opt[n].number = number, n++;
    }
    return n;
}

static void test_torture(void) {
    int runs = 0, accepted = 0, worst_i = -1;
    double t0 = now(), worst = 0;
    for (size_t c = 0; c < sizeof commands / sizeof *commands; c++) {
        option_info opt[80];
        int n_opt = options_of(commands[c].cmd, opt, 80);
        CHECK(n_opt > 0, "%s --help lists no option", commands[c].cmd);
        for (int o = 0; o < n_opt; o++) {
            if (!opt[o].value) continue;
            for (size_t v = 0; v < sizeof hostile / sizeof *hostile; v++) {
                const char *args[64];
                int n = 0;
                char flag[64];
                snprintf(flag, sizeof flag, "--%.40s", opt[o].name);
                args[n++] = commands[c].cmd;
                for (int a = 0; commands[c].args[a]; a++) {
                    bool is_opt = commands[c].args[a][0] == '-' && commands[c].args[a][1] == '-';
                    if (is_opt && !strcmp(commands[c].args[a], flag)) { a++; continue; }   // replaced below
                    args[n++] = commands[c].args[a];
                }
                args[n++] = flag, args[n++] = hostile[v], args[n] = NULL;
                char dir[4200], cmd[8600];
                snprintf(dir, sizeof dir, "%s/t/%d", root, runs);
                snprintf(cmd, sizeof cmd, "mkdir -p %s", dir);
                if (system(cmd)) return;
                limits lim = {60, (rlim_t)3 << 30, 0, commands[c].stdin_text, dir};
                double t = now();
                result r = run_cli(args, &lim);
                t = now() - t;
                if (t > worst) worst = t, worst_i = runs;
                runs++, accepted += r.code == 0;
                bool said = strstr(r.out, "cotlab: ") || strstr(r.out, "cotlab <command>");
                CHECK(r.code >= 0 && r.code <= 2 && (r.code == 0 || said), "cotlab %s %s '%s': %s%s", commands[c].cmd, flag, hostile[v],
                      r.code == -1000 ? "did not end in 60 s" : r.code < 0 ? "killed by a signal" : r.code > 2 ? "odd exit status" : "no message",
                      r.out + (strlen(r.out) > 300 ? strlen(r.out) - 300 : 0));
                if (opt[o].number && (v == 2 || v == 3 || v == 4 || v == 8 || v == 9))
                    CHECK(r.code == 2, "cotlab %s %s '%s': exit %d, wanted 2 (not a number)", commands[c].cmd, flag, hostile[v], r.code);
                snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
                if (system(cmd)) return;
            }
        }
    }
    printf("    %d runs (%d accepted and run, the rest refused), %.0f s, the longest %.1f s (run %d)\n", runs, accepted, now() - t0, worst, worst_i);
}

// ---- disk -------------------------------------------------------------------------------------

// Every file under dir but its lock and metrics (names and checksums) as one text.
static char *dir_state(const char *dir) {
    char cmd[8400], path[4200];
    snprintf(path, sizeof path, "%s/state.txt", root);
    snprintf(cmd, sizeof cmd, "cd %s && find . -type f ! -name lock ! -name metrics.jsonl ! -name 'm1*' | sort | xargs -r md5sum > %s", dir, path);
    if (system(cmd)) return NULL;
    size_t len;
    return slurp(path, &len);
}

static void test_disk(void) {
    char run_dir[4200], cmd[8600];
    snprintf(run_dir, sizeof run_dir, "%s/disk", root);
    snprintf(cmd, sizeof cmd, "rm -rf %s && mkdir -p %s", run_dir, run_dir);
    if (system(cmd)) return;
    limits ok_lim = {120, 0, 0, NULL, run_dir}, full = {120, 0, 8192, NULL, run_dir};
    // A good run first: checkpoints, adapter, metrics; then each kind of write with the disk full.
    const char *sft[] = {"sft", "--model", "../model.gguf", "--data", "../sft.jsonl", "--steps", "3", "--save-every", "1", "--batch", "2",
                         "--seq-len", "96", "--threads", "1", "--out", "run", NULL};
    result r = run_cli(sft, &ok_lim);
    CHECK(r.code == 0, "the good run: %s", r.out);
    const char *exp[] = {"export", "--model", "../model.gguf", "--load", "run/adapter.gguf", "--out", "lora.gguf", NULL};
    const char *peft[] = {"export", "--model", "../model.gguf", "--load", "run/adapter.gguf", "--to", "peft", "--out", "peft", NULL};
    const char *mrg[] = {"merge", "--model", "../model.gguf", "--adapters", "run/adapter.gguf:1", "--out", "merged.gguf", NULL};
    const char *ev[] = {"eval", "--model", "../model.gguf", "--data", "../gsm.jsonl", "--max-new", "4", "--details", "details.jsonl", NULL};
    const char *plot[] = {"plot", "run/metrics.jsonl", "--out", "chart.svg", NULL};
    const char *full_ft[] = {"sft", "--model", "../model.gguf", "--data", "../sft.jsonl", "--steps", "1", "--adapter", "full", "--batch", "2",
                             "--seq-len", "96", "--threads", "1", "--out", "full", NULL};
    const char *const *writers[] = {exp, peft, mrg, ev, plot, full_ft};
    for (size_t k = 0; k < sizeof writers / sizeof *writers; k++) {
        r = run_cli(writers[k], &ok_lim);
        CHECK(r.code == 0, "the good %s: %s", writers[k][0], r.out);
    }
    size_t len0, len1;
    char *before = dir_state(run_dir), *metrics0 = slurp(DIR_ "/disk/run/metrics.jsonl", &len0);
    // Resuming with more steps: the next checkpoint cannot be written.
    const char *resume[] = {"sft", "--model", "../model.gguf", "--data", "../sft.jsonl", "--steps", "6", "--save-every", "1", "--batch", "2",
                            "--seq-len", "96", "--threads", "1", "--out", "run", "--resume", "--allow-change", "steps", NULL};
    r = run_cli(resume, &full);
    CHECK(r.code == 1 && strstr(r.out, "cotlab: ") && strstr(r.out, "failed"), "resume with the disk full: exit %d: %s", r.code, r.out);
    limits tiny = full;
    tiny.file_size = 256;   // (each of these files is larger)
    for (size_t k = 0; k < sizeof writers / sizeof *writers; k++) {
        if (writers[k] == full_ft) continue;
        r = run_cli(writers[k], &tiny);
        CHECK(r.code == 1 && strstr(r.out, "cotlab: "), "%s with the disk full: exit %d: %s", writers[k][0], r.code, r.out);
    }
    r = run_cli(full_ft, &full);   // (a fresh run into a directory holding checkpoints is refused before any write)
    CHECK(r.code == 2 && strstr(r.out, "--resume continues it"), "a fresh run over another's checkpoints: exit %d: %s", r.code, r.out);
    char *after = dir_state(run_dir), *metrics1 = slurp(DIR_ "/disk/run/metrics.jsonl", &len1);
    CHECK(before && after && !strcmp(before, after), "the files after the failed writes are not those before:\n%s\nvs before\n%s",
          after ? after : "", before ? before : "");
    CHECK(metrics0 && metrics1 && len1 >= len0 && !memcmp(metrics0, metrics1, len0), "metrics.jsonl lost lines:\n%s\nnow\n%s",
          metrics0 ? metrics0 : "", metrics1 ? metrics1 : "");
    // The newest checkpoint still resumes (without the limit).
    r = run_cli(resume, &ok_lim);
    CHECK(r.code == 0 && strstr(r.out, "resumed from run/ckpt-00000003.gguf"), "resume after the full disk: %s", r.out);
    free(before), free(after), free(metrics0), free(metrics1);
}

// ---- lock -------------------------------------------------------------------------------------

static void test_lock(void) {
    char dir[4200], cmd[8600], log[4300];
    snprintf(dir, sizeof dir, "%s/lock", root);
    snprintf(cmd, sizeof cmd, "rm -rf %s && mkdir -p %s", dir, dir);
    snprintf(log, sizeof log, "%s/first.log", dir);
    if (system(cmd)) return;
    pid_t first = fork();
    if (first == 0) {   // a long run, stopped by SIGTERM below
        if (chdir(dir)) _exit(126);
        int fd = open(log, O_WRONLY | O_CREAT | O_TRUNC, 0644);
        if (fd >= 0) dup2(fd, 1), dup2(fd, 2), close(fd);
        execl("../../cotlab", "cotlab", "sft", "--model", "../model.gguf", "--data", "../sft.jsonl", "--steps", "1000000", "--save-every",
              "100000", "--batch", "2", "--seq-len", "96", "--threads", "1", "--out", "run", (char *)NULL);
        _exit(127);
    }
    char lock_path[4300], want[64];
    snprintf(lock_path, sizeof lock_path, "%s/run/metrics.jsonl", dir);
    snprintf(want, sizeof want, "(pid %ld)", (long)first);
    double t0 = now();
    struct stat st;
    while (now() - t0 < 30 && (stat(lock_path, &st) || st.st_size == 0)) {   // until its first step is logged
        struct timespec ts = {0, 5000000};
        nanosleep(&ts, NULL);
    }
    limits lim = {30, 0, 0, NULL, dir};
    const char *second[] = {"sft", "--model", "../model.gguf", "--data", "../sft.jsonl", "--steps", "5", "--batch", "2", "--seq-len", "96",
                            "--out", "run", "--resume", NULL};
    double t = now();
    result r = run_cli(second, &lim);
    t = now() - t;
    CHECK(r.code == 1 && strstr(r.out, "in use by another run") && strstr(r.out, want), "a second run on the directory: exit %d: %s", r.code, r.out);
    printf("    the second run was refused in %.2f s: %s", t, strstr(r.out, "cotlab: ") ? strstr(r.out, "cotlab: ") : r.out);
    // SIGTERM: the first run finishes its step, writes a checkpoint, exits 143.
    kill(first, SIGTERM);
    int status;
    waitpid(first, &status, 0);
    size_t len;
    char *text = slurp(log, &len);
    CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 143 && text && strstr(text, "terminated: stopped after step"),
          "SIGTERM: status %d: %s", status, text ? text : "");
    char ckpts[4400];
    snprintf(ckpts, sizeof ckpts, "ls %s/run/ckpt-*.gguf > /dev/null 2>&1", dir);
    CHECK(system(ckpts) == 0, "SIGTERM left no checkpoint in %s/run", dir);
    free(text);
}

// ---- things that once went wrong ----------------------------------------------------------------

static void test_nothing(void) {
    limits lim = {60, (rlim_t)3 << 30, 0, NULL, root};
    struct { const char *args[24]; int code; const char *says; } cases[] = {
        // No example fits: one pass over the data, then a message (it used to loop for ever).
        {{"sft", "--model", "model.gguf", "--data", "long.jsonl", "--seq-len", "32", "--steps", "3", "--out", "n1"}, 1, "no example of the 6 fits"},
        {{"sft", "--model", "model.gguf", "--data", "long.jsonl", "--seq-len", "32", "--steps", "3", "--out", "n2", "--drop-long"}, 1, "no example of the 6 fits"},
        // NaN weights: generation and evaluation fail naming where.
        {{"generate", "--model", "nan.gguf", "--prompt", "hi", "--max-new", "4"}, 1, "in layer 0's output"},
        {{"eval", "--model", "nan.gguf", "--data", "gsm.jsonl", "--max-new", "4"}, 1, "holds nan"},
        // An output over an input.
        {{"export", "--model", "model.gguf", "--load", "fixture_run/adapter.gguf", "--out", "model.gguf"}, 2, "it would be written over"},
        {{"merge", "--model", "model.gguf", "--adapters", "fixture_run/adapter.gguf", "--out", "fixture_run/adapter.gguf"}, 2, "it would be written over"},
        {{"eval", "--model", "model.gguf", "--data", "gsm.jsonl", "--max-new", "4", "--details", "gsm.jsonl"}, 2, "it would be written over"},
        // Sizes against the model and the memory.
        {{"sft", "--model", "model.gguf", "--data", "sft.jsonl", "--rank", "64", "--out", "n3"}, 1, "rank 64 exceeds"},
        {{"generate", "--model", "model.gguf", "--prompt", "hi", "--max-new", "1000"}, 2, "exceeds the model's context"},
        {{"generate", "--model", "model.gguf", "--prompt", "hi", "--max-new", "100", "--samples", "1000000"}, 2, "need"},
        {{"generate", "--model", "model.gguf", "--prompt", "hi", "--max-new", "4", "--temperature", "1e-30"}, 1, "sampler temperature"},
        // A resume of another run.
        {{"sft", "--model", "model.gguf", "--data", "sft.jsonl", "--steps", "2", "--batch", "2", "--seq-len", "96", "--out", "fixture_run",
          "--resume", "--alpha", "8"}, 2, "alpha=32"},
        {{"sft", "--model", "model.gguf", "--data", "sft.jsonl", "--steps", "2", "--batch", "2", "--seq-len", "96", "--out", "fixture_run",
          "--resume", "--targets", "attn"}, 2, "targets=all"},
        {{"sft", "--model", "model.gguf", "--data", "gsm.jsonl", "--steps", "2", "--batch", "2", "--seq-len", "96", "--out", "fixture_run",
          "--resume"}, 2, "data="},
        {{"sft", "--model", "nan.gguf", "--data", "sft.jsonl", "--steps", "2", "--batch", "2", "--seq-len", "96", "--out", "fixture_run",
          "--resume"}, 2, "model="},
        {{"sft", "--model", "model.gguf", "--data", "sft.jsonl", "--steps", "4", "--batch", "2", "--seq-len", "96", "--out", "fixture_run",
          "--resume"}, 2, "--allow-change lr,steps"},
        // A program's quote in --out runs nothing: reward programs get no shell.
        {{"grpo", "--model", "model.gguf", "--data", "gsm.jsonl", "--steps", "1", "--group", "2", "--prompts", "1", "--batch", "2",
          "--max-new", "4", "--seq-len", "96", "--reward", "none", "--reward-cmd", "awk '{print 1}'", "--out", "q'; touch pwned; '"}, 0, "wrote"},
        {{"grpo", "--model", "model.gguf", "--data", "gsm.jsonl", "--steps", "1", "--group", "2", "--prompts", "1", "--batch", "2",
          "--max-new", "4", "--seq-len", "96", "--reward", "none", "--reward-cmd", "/no/such/program", "--out", "n4"}, 1, "cannot run '/no/such/program'"},
        // A byte-order mark before the first line.
        {{"sft", "--model", "model.gguf", "--data", "bom.jsonl", "--steps", "1", "--batch", "2", "--seq-len", "96", "--out", "n5"}, 0, "wrote"},
        // Usage errors.
        {{"frobnicate"}, 2, "unknown command 'frobnicate'"},
        {{"sft", "--rank", "0"}, 2, "--rank 0 is outside [1, 65536]"},
        {{"sft", "--log-every", "0"}, 2, "--log-every 0 is outside"},
        {{"plot", "metrics.jsonl", "--out", "metrics.jsonl"}, 2, "is the metrics file itself"},
    };
    for (size_t k = 0; k < sizeof cases / sizeof *cases; k++) {
        result r = run_cli(cases[k].args, &lim);
        CHECK(r.code == cases[k].code && strstr(r.out, cases[k].says), "cotlab %s ... %s: exit %d (wanted %d with '%s'):\n%s", cases[k].args[0],
              cases[k].args[1] ? cases[k].args[1] : "", r.code, cases[k].code, cases[k].says, r.out);
    }
    struct stat st;
    CHECK(stat(DIR_ "/pwned", &st) != 0, "a quote in --out ran a command");
    // An --out of 500 characters: every checkpoint its own name, --keep keeping the newest two.
    char out[600], ck[4800];
    snprintf(out, sizeof out, "long/%0200d/%0200d/%0100d", 1, 2, 3);
    const char *longer[] = {"sft", "--model", "model.gguf", "--data", "sft.jsonl", "--steps", "3", "--save-every", "1", "--keep", "2",
                            "--batch", "2", "--seq-len", "96", "--threads", "1", "--out", out, NULL};
    result lr = run_cli(longer, &lim);
    int kept = 0;
    for (int k = 1; k <= 3; k++) snprintf(ck, sizeof ck, "%s/%s/ckpt-%08d.gguf", root, out, k), kept += (stat(ck, &st) == 0) << (k - 1);
    CHECK(lr.code == 0 && kept == 6 && strlen(out) >= 500, "--out of %zu characters: exit %d, checkpoints 2 and 3 kept (%d): %s", strlen(out),
          lr.code, kept, lr.out);
    // A resume may change the learning rate and the steps when asked to.
    const char *more[] = {"sft", "--model", "model.gguf", "--data", "sft.jsonl", "--steps", "3", "--lr", "1e-3", "--batch", "2", "--seq-len",
                          "96", "--threads", "1", "--out", "fixture_run", "--resume", "--allow-change", "lr,steps", NULL};
    result r = run_cli(more, &lim);
    CHECK(r.code == 0 && strstr(r.out, "resumed from fixture_run/ckpt-00000002.gguf"), "--allow-change lr,steps: %s", r.out);
    // A damaged newest checkpoint is skipped for the one before it, and said so.
    FILE *f = fopen(DIR_ "/fixture_run/ckpt-00000003.gguf", "r+b");
    if (f) fseek(f, 20, SEEK_SET), fputs("garbage", f), fclose(f);
    const char *again[] = {"sft", "--model", "model.gguf", "--data", "sft.jsonl", "--steps", "4", "--lr", "1e-3", "--batch", "2", "--seq-len",
                           "96", "--threads", "1", "--out", "fixture_run", "--resume", "--allow-change", "lr,steps", "--stop-at", "3", NULL};
    r = run_cli(again, &lim);
    CHECK(r.code == 0 && strstr(r.out, "skipped fixture_run/ckpt-00000003.gguf") && strstr(r.out, "resumed from fixture_run/ckpt-00000002.gguf"),
          "a damaged newest checkpoint: %s", r.out);
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0);   // a line at a time, also into a pipe or a log
    if (!getcwd(root, sizeof root - 64)) return 1;
    strcat(root, "/" DIR_);
    printf("the command line under hostile values and faults\n");
    if (!make_fixtures()) return printf("  FAIL\n"), 1;
    static const struct { const char *name; void (*fn)(void); } parts[] = {
        {"nothing", test_nothing}, {"lock", test_lock}, {"disk", test_disk}, {"torture", test_torture}};
    for (size_t p = 0; p < sizeof parts / sizeof *parts; p++) {
        bool want = argc < 2;
        for (int a = 1; a < argc; a++) want |= !strcmp(argv[a], parts[p].name);
        if (!want) continue;
        int before = failures;
        double t = now();
        printf("  %s\n", parts[p].name);
        parts[p].fn();
        printf("    %s (%.0f s)\n", failures == before ? "ok" : "FAIL", now() - t);
    }
    printf("%s: %d checks, %d failed\n", failures ? "FAIL" : "ok", checks, failures);
    return failures ? 1 : 0;
}
