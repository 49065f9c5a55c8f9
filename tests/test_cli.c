// The command line (included by tests/test.c): build/cotlab driven end to end on a tiny random
// llama that carries SmolLM2's tokenizer and chat template, and on small data files. Each
// subcommand runs; bad flags, missing files and malformed JSONL exit non-zero with a message;
// --resume continues bit for bit; exports read back.

#define CLI "build/cli"

// Runs a command line; returns its exit status, stderr+stdout in build/cli/out.txt.
static int sh(const char *fmt, ...) {
    char cmd[4096];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(cmd, sizeof cmd, fmt, ap);
    va_end(ap);
    char full[4200];
    snprintf(full, sizeof full, "%s > " CLI "/out.txt 2>&1", cmd);
    int rc = system(full);
    return WIFEXITED(rc) ? WEXITSTATUS(rc) : -1;
}

static bool out_has(const char *s) {
    size_t len;
    char *text = read_file(CLI "/out.txt", &len);
    bool ok = text && strstr(text, s);
    free(text);
    return ok;
}

// The "loss" and "grad_norm" fields of every line of a metrics file, as text.
static char *losses_of(const char *path) {
    size_t len;
    char *text = read_file(path, &len), *out = (char *)calloc(1, len + 1), *w = out;
    for (char *p = text; p && (p = strstr(p, "\"loss\": ")); p++) {
        char *e = strstr(p, ", \"lr\"");
        char *g = strstr(p, "\"grad_norm\": "), *ge = g ? strchr(g, ',') : NULL;
        if (!e || !ge) break;
        w += sprintf(w, "%.*s %.*s\n", (int)(e - p), p, (int)(ge - g), g);
    }
    free(text);
    return out;
}

static void test_cli(void) {
    if (system("test -x build/cotlab") != 0) {
        CHECK(false, "build/cotlab is missing (make build/cotlab)");
        return;
    }
    ctl_ctx *ctx = make_ctx(1, CTL_SIMD_AUTO);
    ctl_gguf *g;
    if (ctl_gguf_open(ctx, SMOLLM2, &g) != CTL_OK) {
        printf("    skipped: %s is missing (make models)\n", SMOLLM2);
        ctl_ctx_free(ctx);
        return;
    }
    CHECK(system("rm -rf " CLI " && mkdir -p " CLI) == 0, "mkdir");
    ctl_model_config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.arch = CTL_ARCH_LLAMA, cfg.vocab_size = 49152, cfg.n_ctx = 256, cfg.n_embd = 32, cfg.n_layer = 2, cfg.n_head = 4;
    cfg.n_kv_head = 2, cfg.tied_embeddings = true;
    ctl_model *m;
    CHECK(ctl_model_create(ctx, &cfg, &m) == CTL_OK, "tiny model: %s", ctl_last_error(ctx));
    ctl_model_init_random(m, 3);
    CHECK(ctl_model_export_gguf(m, g, CLI "/tiny.gguf", CTL_GGML_F32) == CTL_OK, "export tiny: %s", ctl_last_error(ctx));
    ctl_model_free(m);
    ctl_gguf_close(g);
    FILE *f = fopen(CLI "/sft.jsonl", "w");
    for (int i = 0; i < 24; i++) fprintf(f, "{\"prompt\": \"What is %d + %d?\", \"completion\": \"%d\"}\n", i % 5, 7 - i % 5, 7);
    fclose(f);
    f = fopen(CLI "/pref.jsonl", "w");
    for (int i = 0; i < 12; i++) fprintf(f, "{\"prompt\": \"Pick %d\", \"chosen\": \"7\", \"rejected\": \"%d\"}\n", i, i);
    fclose(f);
    f = fopen(CLI "/gsm.jsonl", "w");
    for (int i = 0; i < 8; i++) fprintf(f, "{\"question\": \"What is %d + %d?\", \"answer\": \"%d + %d = 7\\n#### 7\"}\n", i % 5, 7 - i % 5, i % 5, 7 - i % 5);
    fclose(f);
    f = fopen(CLI "/bad.jsonl", "w");
    fprintf(f, "{\"prompt\": \"a\", \"completion\": \"b\"}\n{\"prompt\": \"a\", \"completion\": }\n");
    fclose(f);
    const char *M = "build/cotlab", *TINY = "--model " CLI "/tiny.gguf --threads 1";

    // SFT, full fine-tuning: the tiny model learns to answer 7 (the later subcommands use it).
    CHECK(sh("%s sft %s --adapter full --data " CLI "/sft.jsonl --steps 60 --batch 4 --seq-len 96 --lr 1e-2 --out " CLI "/full", M, TINY) == 0,
          "sft full: %s", (system("cat " CLI "/out.txt"), ""));
    char *lines = losses_of(CLI "/full/metrics.jsonl");
    double first = NAN, last = NAN;
    sscanf(lines, "\"loss\": %lf", &first);
    char *lastl = strrchr(lines, '"') ? lines : lines;
    for (char *p = lines; (p = strstr(p, "\"loss\": ")); p++) lastl = p;
    sscanf(lastl, "\"loss\": %lf", &last);
    CHECK(isfinite(first) && last < 0.5 * first, "sft loss falls: %g -> %g", first, last);
    free(lines);
    const char *T7 = "--model " CLI "/full/model.gguf --threads 1";
    CHECK(sh("%s generate %s --prompt 'What is 3 + 4?' --greedy --max-new 8", M, T7) == 0 && out_has("7"), "generate says 7");
    CHECK(sh("printf 'What is 3 + 4?\\nAnd 2 + 5?\\n' | %s chat %s --greedy --max-new 8", M, T7) == 0 && out_has("7\n7"), "chat: two turns");
    {   // the same weights as Hugging Face safetensors, the shape and tokenizer from the GGUF
        ctl_model *mf = NULL;
        CHECK(ctl_model_load_gguf(ctx, CLI "/full/model.gguf", NULL, &mf) == CTL_OK &&
              ctl_model_save_safetensors(mf, CLI "/full.safetensors", CTL_SAFETENSORS_F32) == CTL_OK, "safetensors: %s", ctl_last_error(ctx));
        if (mf) ctl_model_free(mf);
        CHECK(sh("%s generate --model " CLI "/full.safetensors --base " CLI "/tiny.gguf --prompt 'What is 3 + 4?' --greedy --max-new 8", M) == 0 &&
              out_has("7"), "generate from safetensors");
        CHECK(sh("%s generate --model " CLI "/full.safetensors --prompt x", M) != 0 && out_has("needs --base"), "safetensors without --base");
    }

    // LoRA SFT with resume: 20 steps straight == 10, stop, resume, 10 more (losses and grad norms bit for bit).
    const char *common = "--data " CLI "/sft.jsonl --steps 20 --batch 2 --accum 2 --seq-len 96 --lr 1e-2 --rank 4 --dropout 0.1 --save-every 5";
    CHECK(sh("%s sft %s %s --out " CLI "/a", M, T7, common) == 0, "sft a");
    CHECK(sh("%s sft %s %s --out " CLI "/b --stop-at 10", M, T7, common) == 0, "sft b, first half");
    CHECK(sh("%s sft %s %s --out " CLI "/b --resume", M, T7, common) == 0 && out_has("resumed from"), "sft b, resumed");
    char *la = losses_of(CLI "/a/metrics.jsonl"), *lb = losses_of(CLI "/b/metrics.jsonl");
    int n_lines = 0;
    for (char *p = la; *p; p++) n_lines += *p == '\n';
    CHECK(n_lines == 20 && !strcmp(la, lb), "resume: %d steps, identical: %s", n_lines, strcmp(la, lb) ? "no" : "yes");
    free(la), free(lb);
    CHECK(system("ls " CLI "/a/ckpt-*.gguf | wc -l | grep -qx 3") == 0, "--keep 3 checkpoints");
    // A NaN weight in layer 1: the run stops at step 1 naming it and writes no checkpoint; with
    // --on-nonfinite skip a LoRA run drops every step (the adapters stay finite, checkpoints are
    // written), and a full fine-tune stops at the first checkpoint, which would hold the NaN.
    {
        ctl_model *mn = NULL;
        ctl_gguf *gt = NULL;
        CHECK(ctl_model_load_gguf(ctx, CLI "/tiny.gguf", NULL, &mn) == CTL_OK && ctl_gguf_open(ctx, CLI "/tiny.gguf", &gt) == CTL_OK,
              "load tiny: %s", ctl_last_error(ctx));
        ctl_param *p = mn ? ctl_model_find(mn, "blk.1.ffn_down.weight") : NULL;
        if (p) ((float *)p->value.data)[7] = NAN;
        CHECK(p && ctl_model_export_gguf(mn, gt, CLI "/nan.gguf", CTL_GGML_F32) == CTL_OK, "export a NaN model");
        if (mn) ctl_model_free(mn);
        if (gt) ctl_gguf_close(gt);
        const char *nan_run = "--model " CLI "/nan.gguf --threads 1 --data " CLI "/sft.jsonl --steps 3 --batch 2 --seq-len 64 --save-every 2";
        CHECK(sh("%s sft %s --out " CLI "/nan1", M, nan_run) == 1 && out_has("step 1: train_forward (update 1): the hidden state after layer 1 is nan") &&
              out_has("'blk.1.ffn_down.weight' (layer 1) holds nan at element 7") && out_has("the run stops") &&
              system("ls " CLI "/nan1/ckpt-* >/dev/null 2>&1") != 0, "NaN weight: the run stops at step 1, no checkpoint");
        CHECK(sh("%s sft %s --on-nonfinite skip --out " CLI "/nan2", M, nan_run) == 0 && out_has("step 3 skipped: train_forward") &&
              out_has("3 steps skipped") && system("test -f " CLI "/nan2/ckpt-00000002.gguf && test -f " CLI "/nan2/adapter.gguf") == 0,
              "--on-nonfinite skip: every step dropped, the adapters saved");
        CHECK(sh("%s sft %s --adapter full --on-nonfinite skip --out " CLI "/nan3", M, nan_run) == 1 && out_has("step 2 skipped") &&
              out_has("holds nan at element 7; nothing written") && system("ls " CLI "/nan3/ckpt-* >/dev/null 2>&1") != 0,
              "full fine-tuning: no checkpoint with the NaN weight");
        CHECK(sh("%s sft %s --on-nonfinite maybe", M, nan_run) == 2 && out_has("stop or skip"), "--on-nonfinite maybe");
    }

    // The same on a bf16 base (multiplied in bf16 where the CPU can): the same course, within bf16's rounding.
    CHECK(sh("%s sft %s %s --bf16 --bf16-dot --out " CLI "/bf", M, T7, common) == 0, "sft --bf16 --bf16-dot");
    la = losses_of(CLI "/a/metrics.jsonl"), lb = losses_of(CLI "/bf/metrics.jsonl");
    double l32 = NAN, l16 = NAN;
    char *p32 = strrchr(la, '\n'), *p16 = strrchr(lb, '\n');   // the last line: after the one-before-last newline
    while (p32 && p32 > la && p32[-1] != '\n') p32--;
    while (p16 && p16 > lb && p16[-1] != '\n') p16--;
    if (p32 && p16) sscanf(p32, "\"loss\": %lf", &l32), sscanf(p16, "\"loss\": %lf", &l16);
    CHECK(isfinite(l16) && fabs(l16 - l32) < 0.05 * l32 + 0.01, "bf16 base: final loss %g, fp32 base %g", l16, l32);
    free(la), free(lb);
    CHECK(sh("%s sft %s --adapter full --bf16 --data " CLI "/sft.jsonl --steps 1", M, T7) != 0 && out_has("bf16 base is frozen"), "--bf16 with full");
    const char *packed = "--data " CLI "/sft.jsonl --steps 8 --batch 2 --seq-len 96 --lr 1e-2 --rank 4 --packing --save-every 2";
    CHECK(sh("%s sft %s %s --out " CLI "/pa", M, T7, packed) == 0 && sh("%s sft %s %s --out " CLI "/pb --stop-at 3", M, T7, packed) == 0 &&
          sh("%s sft %s %s --out " CLI "/pb --resume", M, T7, packed) == 0, "sft --packing");
    la = losses_of(CLI "/pa/metrics.jsonl"), lb = losses_of(CLI "/pb/metrics.jsonl");
    CHECK(strlen(la) > 0 && !strcmp(la, lb) && system("grep -q '\"num_tokens\": 8' " CLI "/pa/metrics.jsonl") == 0,
          "packing: two examples a row, and a resume continues exactly");
    free(la), free(lb);

    // DPO (the base as reference), GRPO (built-in and external rewards), RFT, eval.
    CHECK(sh("%s dpo %s --data " CLI "/pref.jsonl --steps 3 --batch 2 --seq-len 96 --loss sigmoid --rpo-alpha 0.5 --out " CLI "/dpo", M, T7) == 0 &&
          system("grep -q 'rewards/margins' " CLI "/dpo/metrics.jsonl") == 0, "dpo");
    CHECK(sh("%s grpo %s --data " CLI "/gsm.jsonl --steps 2 --group 4 --prompts 2 --batch 4 --max-new 8 --seq-len 96 --beta 0.04 "
             "--reward math,format:0.1 --out " CLI "/grpo", M, T7) == 0 && system("grep -q 'rewards/math/mean' " CLI "/grpo/metrics.jsonl") == 0,
          "grpo");
    CHECK(system("grep -q '\"reward\": [1-9]' " CLI "/grpo/metrics.jsonl || grep -q '\"reward\": 0.[1-9]' " CLI "/grpo/metrics.jsonl") == 0,
          "grpo: the model that learnt 7 earns math reward");
    // From an adapter with a KL term: its reference is that adapter's model, so the first step's KL is 0.
    CHECK(sh("%s grpo %s --data " CLI "/gsm.jsonl --steps 1 --group 4 --prompts 2 --batch 4 --max-new 8 --seq-len 96 --beta 0.04 "
             "--init-adapter " CLI "/grpo/adapter.gguf --reward math --out " CLI "/grpo_init", M, T7) == 0 &&
              out_has("the KL's reference") && system("grep -q '\"kl\": 0,' " CLI "/grpo_init/metrics.jsonl") == 0,
          "grpo from an adapter: the KL to that adapter's model starts at 0");
    CHECK(sh("%s grpo %s --data " CLI "/gsm.jsonl --steps 1 --group 2 --prompts 2 --batch 2 --max-new 4 --seq-len 96 --reward none "
             "--reward-cmd 'awk \"{print NR %% 2}\"' --iterations 2 --out " CLI "/grpo_cmd", M, T7) == 0 &&
          system("grep -q 'rewards/cmd/mean\": 0.5' " CLI "/grpo_cmd/metrics.jsonl") == 0, "grpo with an external reward program");
    CHECK(sh("%s rft %s --data " CLI "/gsm.jsonl --rounds 2 --samples 3 --temperature 0.8 --max-new 8 --steps 2 --batch 2 --seq-len 64 "
             "--out " CLI "/rft", M, T7) == 0 && out_has("round 2:") && system("test -f " CLI "/rft/round-2/adapter.gguf") == 0, "rft");
    CHECK(sh("%s eval %s --data " CLI "/gsm.jsonl --samples 4 --k 2 --temperature 0.8 --max-new 8", M, T7) == 0 &&
          out_has("\"greedy_accuracy\": 1.0000") && out_has("pass@2") && out_has("majority_vote"), "eval");

    // Exports read back: llama.cpp GGUF, PEFT, merged; merge of two adapters; info; plot.
    const char *AD = CLI "/dpo/adapter.gguf";   // no dropout: the forward here is deterministic
    CHECK(sh("%s export %s --load %s --to llamacpp --out " CLI "/lora.gguf", M, T7, AD) == 0, "export llamacpp");
    CHECK(sh("%s export %s --load %s --to peft --out " CLI "/peft", M, T7, AD) == 0, "export peft");
    CHECK(sh("%s export %s --load %s --to merged --out " CLI "/merged.gguf", M, T7, AD) == 0, "export merged");
    CHECK(sh("%s merge %s --adapters %s:0.5,%s:0.5 --out " CLI "/avg.gguf", M, T7, AD, CLI "/grpo/adapter.gguf") == 0, "merge");
    {   // the PEFT directory and the merged model give the adapter's own log-probs
        ctl_model *ma = NULL, *mp = NULL, *mm = NULL, *mv = NULL;
        ctl_model_load_gguf(ctx, CLI "/full/model.gguf", NULL, &ma), ctl_model_load_gguf(ctx, CLI "/full/model.gguf", NULL, &mp);
        ctl_model_load_gguf(ctx, CLI "/merged.gguf", NULL, &mm), ctl_model_load_gguf(ctx, CLI "/avg.gguf", NULL, &mv);
        bool ok = ma && mp && mm && mv && ctl_adapter_load(ma, AD) == CTL_OK && ctl_lora_load_peft(mp, CLI "/peft") == CTL_OK;
        CHECK(ok, "read back: %s", ctl_last_error(ctx));
        int32_t tok[16], tgt[16];
        make_batch(1, 16, 49152, tok, tgt, NULL, 9);
        ctl_batch b = {1, 16, tok, tgt, NULL};
        float lp[4][16];
        ctl_model *ms[4] = {ma, mp, mm, mv};
        ctl_train_desc td;
        memset(&td, 0, sizeof td);
        td.batch = 1, td.seq_len = 16;
        for (int k = 0; ok && k < 4; k++) {
            ctl_train *t;
            ok = ctl_train_init(ms[k], &td, &t) == CTL_OK && ctl_train_forward(t, &b) == CTL_OK;
            if (ok) memcpy(lp[k], ctl_train_logprobs(t), sizeof lp[k]), ctl_train_free(t);
        }
        double e1 = 0, e2 = 0, e3 = 0;
        for (int i = 0; ok && i < 16; i++)
            e1 = fmax(e1, fabs(lp[1][i] - lp[0][i])), e2 = fmax(e2, fabs(lp[2][i] - lp[0][i])), e3 = fmax(e3, fabs(lp[3][i] - lp[0][i]));
        CHECK(ok && e1 < 1e-4 && e2 < 1e-4 && e3 > 1e-6, "PEFT %g and merged %g equal the adapter; the average differs %g", e1, e2, e3);
        for (int k = 0; k < 4; k++) if (ms[k]) ctl_model_free(ms[k]);
        ctl_gguf *lg;
        CHECK(ctl_gguf_open(ctx, CLI "/lora.gguf", &lg) == CTL_OK && ctl_gguf_find_tensor(lg, "blk.0.attn_q.weight.lora_a"), "llama.cpp file");
        if (lg) ctl_gguf_close(lg);
    }
    CHECK(sh("%s info %s --rank 8 --batch 2 --seq-len 64", M, TINY) == 0 && out_has("needs") && out_has("blk.0.attn_q.weight.lora_a"), "info");
    CHECK(sh("%s plot " CLI "/a/metrics.jsonl -o " CLI "/a.svg", M) == 0 && system("grep -q '<polyline' " CLI "/a.svg") == 0, "plot");

    // Bad input: a message and a non-zero exit.
    static const struct { const char *args, *msg; } bad[] = {
        {"sft --bogus 1", "unknown option '--bogus'"},
        {"sft --model " CLI "/tiny.gguf --data " CLI "/sft.jsonl --lr fast", "'fast' is not a finite number"},
        {"sft --data " CLI "/sft.jsonl", "--model is required"},
        {"sft --model " CLI "/nope.gguf --data " CLI "/sft.jsonl", "cannot open"},
        {"sft --model " CLI "/tiny.gguf --data " CLI "/nope.jsonl", "cannot open"},
        {"sft --model " CLI "/tiny.gguf --data " CLI "/bad.jsonl --steps 1", "bad.jsonl' line 2"},
        {"sft --model " CLI "/tiny.gguf --data " CLI "/sft.jsonl --adapter wide", "is not full, lora"},
        {"sft --model " CLI "/tiny.gguf --data " CLI "/sft.jsonl --targets qq", "unknown 'qq'"},
        {"dpo --model " CLI "/tiny.gguf --data " CLI "/sft.jsonl", "needs preference data"},
        {"grpo --model " CLI "/tiny.gguf --data " CLI "/gsm.jsonl --reward speed", "'speed' is not math"},
        {"grpo --model " CLI "/tiny.gguf --data " CLI "/gsm.jsonl --group 1", "--group 1 is outside [2, 65536]"},
        {"export --model " CLI "/tiny.gguf", "--load is required"},
        {"plot", "give the metrics file"},
        {"frobnicate", "usage"}};
    for (size_t k = 0; k < sizeof bad / sizeof *bad; k++) {
        int rc = sh("%s %s", M, bad[k].args);
        CHECK(rc != 0 && out_has(bad[k].msg), "cotlab %s: exit %d, wanted a message with '%s'", bad[k].args, rc, bad[k].msg);
    }
    CHECK(sh("%s sft --model " CLI "/tiny.gguf --threads 1 --data " CLI "/bad.jsonl --steps 1 --skip-bad --seq-len 32 --out " CLI "/skip", M) == 0 &&
          out_has("skipped 1 malformed"), "--skip-bad");
    CHECK(sh("%s sft --help", M) == 0 && out_has("--resume"), "--help");
    ctl_ctx_free(ctx);
}
