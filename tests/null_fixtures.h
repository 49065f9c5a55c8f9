// The objects the NULL-argument test (build/test_null.c, written by tools/gen_null_test.c)
// passes as the valid arguments: one of everything the API takes, made once from a tiny random
// llama with a byte-level vocabulary, its files in build/null/. The test forks a child for each
// call, so a call may change these freely: the next child starts from them as they were.
#define COTLAB_IMPLEMENTATION
#include "../cotlab.h"

#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#define NULL_DIR "build/null/"

// Plain data: every float, int and byte array points into this zeroed block (2 MiB, far more
// than any call here reads), so a missing NULL check meets a valid neighbour, not a short buffer.
static double g_block[1 << 18];
#define BUF ((void *)g_block)

static ctl_ctx *g_ctx;
static ctl_model *g_model;   // no adapters
static ctl_model *g_lora;    // the same weights with a LoRA on every linear layer
static ctl_train *g_train;   // on g_lora: batch 4, seq_len 32, one forward done
static ctl_gguf *g_gguf;     // NULL_DIR "model.gguf": g_model with the vocabulary
static const ctl_gguf_kv *g_kv_str, *g_kv_int, *g_kv_float;   // tokens, token_type, scores
static const ctl_gguf_tensor *g_tensor;
static ctl_gguf_writer *g_gguf_writer;
static ctl_safetensors *g_st;
static const ctl_safetensors_tensor *g_st_tensor;
static ctl_safetensors_writer *g_st_writer;
static ctl_tokenizer *g_tok;
static ctl_chat_template g_tmpl;
static ctl_dataset *g_data;
static const ctl_example *g_example;
static ctl_infer *g_infer;   // on g_model: 4 sequences of 32
static ctl_batcher *g_batcher;
static ctl_rl *g_rl;
static ctl_rollout g_rollout, g_rollout_out;
static ctl_arena g_arena;
static void *g_alloc;        // from ctl_alloc, for ctl_free
static ctl_rng g_rng;
static ctl_tensor g_view;
static unsigned char *g_gguf_bytes, *g_st_bytes;
static size_t g_gguf_size, g_st_size;

static ctl_ctx_desc g_ctx_desc;
static ctl_model_config g_cfg;
static ctl_model_desc g_model_desc;
static ctl_lora_desc g_lora_desc;
static ctl_sparse_desc g_sparse_desc;
static int32_t g_tokens[2 * 32], g_targets[2 * 32];
static ctl_batch g_batch;
static float g_logp[64], g_ref_logp[64], g_ones[64], g_adv_values[8];
static ctl_logprobs g_logprobs;
static ctl_sft_desc g_sft;
static ctl_dpo_desc g_dpo;
static ctl_advantage_desc g_adv;
static ctl_grpo_desc g_grpo;
static ctl_objective_out g_obj_out;
static ctl_infer_desc g_infer_desc;
static ctl_sampler_desc g_sampler;
static ctl_reward_input g_reward_in;
static ctl_reward_func g_reward_func;
static int64_t g_budget = 4;
static ctl_optim_desc g_optim;
static ctl_train_desc g_train_desc;
static ctl_run_state g_run;
static ctl_dataset_desc g_data_desc;
static ctl_part g_part;
static ctl_encoding g_enc;
static ctl_batcher_desc g_batcher_desc;
static ctl_step_desc g_step_desc;
static ctl_rl_desc g_rl_desc;
static ctl_rl_prompt g_rl_prompts[2];
static ctl_chat_msg g_msgs[2] = {{"user", "What is 3 + 4?"}, {"assistant", "7"}};
static const int32_t g_prompt_a[3] = {40, 41, 42}, g_prompt_b[3] = {43, 44, 45};
static const int32_t *const g_prompts[2] = {g_prompt_a, g_prompt_b};
static const int64_t g_prompt_lens[2] = {3, 3};
static const int64_t g_seqs[4] = {0, 1, 2, 3};
static const int64_t g_shape[4] = {4, 1, 1, 1};
static const char *const g_strs[4] = {"#### 7", "#### 7", "#### 8", "x"};
static const size_t g_lens[4] = {6, 6, 6, 1};
static const char *g_str_out[8];
static const char g_jsonl[] = "{\"prompt\": \"What is 3 + 4?\", \"completion\": \" 7\", \"answer\": \"7\"}\n"
                              "{\"prompt\": \"What is 2 + 5?\", \"completion\": \" 7\", \"answer\": \"7\"}\n"
                              "{\"prompt\": \"What is 1 + 6?\", \"completion\": \" 7\", \"answer\": \"7\"}\n";

static void g_task(void *arg, int64_t task, int thread) { (void)arg, (void)task, (void)thread; }
static bool g_on_token(int64_t seq, int32_t token, void *user) { return (void)seq, (void)token, (void)user, true; }

static unsigned char *null_read(const char *path, size_t *size) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    unsigned char *b = (unsigned char *)malloc(n > 0 ? (size_t)n : 1);
    *size = b && n > 0 && fread(b, 1, (size_t)n, f) == (size_t)n ? (size_t)n : 0;
    fclose(f);
    return b;
}

// A byte-level vocabulary as tests/fuzz/make_seeds.c writes it: GPT-2's 256 byte symbols, a few
// merges, the ChatML tokens (control tokens, BOS and EOS), and scores for an array of floats.
static ctl_status null_vocabulary(ctl_gguf_writer *w) {
    static char store[256][4];
    const char *toks[264];
    size_t lens[264];
    int n = 0, extra = 0;
    for (int b = 0; b < 256; b++) {
        bool direct = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || b >= 174;
        unsigned cp = direct ? (unsigned)b : 256u + (unsigned)extra++;
        char *s = store[n];
        if (cp < 0x80) s[0] = (char)cp, s[1] = 0;
        else s[0] = (char)(0xc0 | (cp >> 6)), s[1] = (char)(0x80 | (cp & 0x3f)), s[2] = 0;
        toks[n] = s, lens[n] = strlen(s), n++;
    }
    static const char *const merged[] = {"th", "he", "the", "Ġt", "Ġthe", "12", "<|im_start|>", "<|im_end|>"};
    static const char *const merges[] = {"t h", "h e", "t he", "Ġ t", "Ġt he", "1 2"};
    for (int i = 0; i < 8; i++) toks[n] = merged[i], lens[n] = strlen(merged[i]), n++;
    size_t mlens[6];
    for (int i = 0; i < 6; i++) mlens[i] = strlen(merges[i]);
    int32_t types[264];
    float scores[264];
    for (int i = 0; i < n; i++) types[i] = i >= n - 2 ? 3 : 1, scores[i] = -(float)i;
    static const char tmpl[] = "{% for m in messages %}{{'<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n'}}{% endfor %}";
    ctl_status st = ctl_gguf_writer_set_str(w, "tokenizer.ggml.model", "gpt2", 4);
    if (!st) st = ctl_gguf_writer_set_str(w, "tokenizer.ggml.pre", "smollm", 6);
    if (!st) st = ctl_gguf_writer_set_str_array(w, "tokenizer.ggml.tokens", toks, lens, (uint64_t)n);
    if (!st) st = ctl_gguf_writer_set_array(w, "tokenizer.ggml.token_type", CTL_GGUF_I32, types, (uint64_t)n);
    if (!st) st = ctl_gguf_writer_set_array(w, "tokenizer.ggml.scores", CTL_GGUF_F32, scores, (uint64_t)n);
    if (!st) st = ctl_gguf_writer_set_str_array(w, "tokenizer.ggml.merges", merges, mlens, 6);
    if (!st) st = ctl_gguf_writer_set_u32(w, "tokenizer.ggml.bos_token_id", (uint32_t)n - 2);
    if (!st) st = ctl_gguf_writer_set_u32(w, "tokenizer.ggml.eos_token_id", (uint32_t)n - 1);
    if (!st) st = ctl_gguf_writer_set_str(w, "tokenizer.chat_template", tmpl, sizeof tmpl - 1);
    uint8_t no = 0;
    if (!st) st = ctl_gguf_writer_set(w, "tokenizer.ggml.add_bos_token", CTL_GGUF_BOOL, &no);
    return st;
}

#define NULL_TRY(call)                                                                         \
    do {                                                                                       \
        if ((call) != CTL_OK) {                                                                \
            printf("test_null setup: %s: %s\n", #call, ctl_last_error(g_ctx));                 \
            return 1;                                                                          \
        }                                                                                      \
    } while (0)

// Makes every fixture; 0 on success. One thread: the test forks, and a child has no pool.
static int null_setup(void) {
    mkdir("build", 0755);
    mkdir(NULL_DIR, 0755);
    g_ctx_desc = ctl_ctx_desc_default();
    g_ctx_desc.n_threads = 1;
    if (ctl_ctx_init(&g_ctx, &g_ctx_desc) != CTL_OK) return printf("test_null setup: no context\n"), 1;
    ctl_rng_seed(&g_rng, 1);
    NULL_TRY(ctl_arena_init(g_ctx, &g_arena, 4096));
    g_alloc = ctl_alloc(g_ctx, 64);

    ctl_gguf_writer *w;   // the vocabulary, then the model with it
    NULL_TRY(ctl_gguf_writer_init(g_ctx, &w));
    NULL_TRY(null_vocabulary(w));
    NULL_TRY(ctl_gguf_writer_save(w, NULL_DIR "vocab.gguf"));
    ctl_gguf_writer_free(w);
    ctl_gguf *vocab;
    NULL_TRY(ctl_gguf_open(g_ctx, NULL_DIR "vocab.gguf", &vocab));
    g_cfg.arch = CTL_ARCH_LLAMA, g_cfg.vocab_size = 264, g_cfg.n_ctx = 64, g_cfg.n_embd = 32, g_cfg.n_layer = 1;
    g_cfg.n_head = 2, g_cfg.n_kv_head = 1, g_cfg.n_ff = 32, g_cfg.tied_embeddings = true;
    NULL_TRY(ctl_model_create(g_ctx, &g_cfg, &g_model));
    ctl_model_init_random(g_model, 7);
    NULL_TRY(ctl_model_export_gguf(g_model, vocab, NULL_DIR "model.gguf", CTL_GGML_F32));
    ctl_gguf_close(vocab);
    NULL_TRY(ctl_gguf_open(g_ctx, NULL_DIR "model.gguf", &g_gguf));
    g_kv_str = ctl_gguf_find_kv(g_gguf, "tokenizer.ggml.tokens");
    g_kv_int = ctl_gguf_find_kv(g_gguf, "tokenizer.ggml.token_type");
    g_kv_float = ctl_gguf_find_kv(g_gguf, "tokenizer.ggml.scores");
    g_tensor = ctl_gguf_find_tensor(g_gguf, "token_embd.weight");
    if (!g_kv_str || !g_kv_int || !g_kv_float || !g_tensor) return printf("test_null setup: model.gguf lacks a key or tensor\n"), 1;
    g_gguf_bytes = null_read(NULL_DIR "model.gguf", &g_gguf_size);
    NULL_TRY(ctl_tokenizer_from_gguf(g_ctx, g_gguf, &g_tok));
    NULL_TRY(ctl_chat_template_from_gguf(g_ctx, g_gguf, &g_tmpl));
    NULL_TRY(ctl_gguf_writer_init(g_ctx, &g_gguf_writer));

    NULL_TRY(ctl_model_save_safetensors(g_model, NULL_DIR "model.safetensors", CTL_SAFETENSORS_F32));
    NULL_TRY(ctl_safetensors_open(g_ctx, NULL_DIR "model.safetensors", &g_st));
    g_st_tensor = ctl_safetensors_tensor_at(g_st, 0);
    g_st_bytes = null_read(NULL_DIR "model.safetensors", &g_st_size);
    NULL_TRY(ctl_safetensors_writer_init(g_ctx, &g_st_writer));
    g_view = ctl_tensor_f32((float *)BUF, 1, g_shape);

    g_lora_desc.rank = 2, g_lora_desc.alpha = 4.0f;
    NULL_TRY(ctl_model_load_gguf(g_ctx, NULL_DIR "model.gguf", NULL, &g_lora));
    NULL_TRY(ctl_lora_attach(g_lora, &g_lora_desc));
    NULL_TRY(ctl_adapter_save(g_lora, NULL_DIR "adapter.gguf"));
    NULL_TRY(ctl_lora_save_peft(g_lora, NULL_DIR "peft"));
    g_sparse_desc.density = 0.1f;
    g_optim.lr = 1e-3f, g_optim.warmup = 2, g_optim.total_steps = 10;

    for (int i = 0; i < 2 * 32; i++) g_tokens[i] = 40 + i % 20, g_targets[i] = 41 + i % 20;
    g_batch.B = 2, g_batch.T = 32, g_batch.tokens = g_tokens, g_batch.targets = g_targets;
    g_train_desc.batch = 4, g_train_desc.seq_len = 32, g_train_desc.entropy = true;
    NULL_TRY(ctl_train_init(g_lora, &g_train_desc, &g_train));
    NULL_TRY(ctl_train_save(g_train, NULL_DIR "train.gguf", NULL));
    NULL_TRY(ctl_train_forward(g_train, &g_batch));

    FILE *f = fopen(NULL_DIR "data.jsonl", "w");
    if (!f) return printf("test_null setup: cannot write " NULL_DIR "data.jsonl\n"), 1;
    fputs(g_jsonl, f);
    fclose(f);
    NULL_TRY(ctl_dataset_open(g_ctx, NULL_DIR "data.jsonl", &g_data_desc, &g_data));
    g_example = ctl_dataset_get(g_data, 0);
    g_part = g_example->completion;
    g_enc.tokenizer = g_tok, g_enc.chat = &g_tmpl;
    g_batcher_desc.kind = CTL_ROWS_SFT, g_batcher_desc.batch = 2, g_batcher_desc.seq_len = 32, g_batcher_desc.encoding = g_enc;
    NULL_TRY(ctl_batcher_init(g_data, &g_batcher_desc, &g_batcher));

    g_infer_desc.max_seqs = 4, g_infer_desc.max_len = 32;
    NULL_TRY(ctl_infer_init(g_model, &g_infer_desc, &g_infer));
    g_sampler.temperature = 1.0f, g_sampler.seed = 3;
    NULL_TRY(ctl_rollout_run(g_infer, g_tok, g_prompts, g_prompt_lens, 1, 2, &g_sampler, 4, 16, &g_rollout));

    g_reward_in.prompt = "What is 3 + 4?", g_reward_in.completion = "#### 7", g_reward_in.completion_len = 6;
    g_reward_in.n_tokens = 2, g_reward_in.example = g_example, g_reward_in.tokens = g_prompt_a;
    g_reward_func.name = "math", g_reward_func.fn = ctl_reward_fn_math, g_reward_func.weight = 1.0f;
    for (int i = 0; i < 2; i++) g_rl_prompts[i].tokens = g_prompts[i], g_rl_prompts[i].n = 3, g_rl_prompts[i].example = g_example;
    g_rl_desc.method = CTL_RL_GRPO, g_rl_desc.prompts = 2, g_rl_desc.group = 2, g_rl_desc.max_new = 4;
    g_rl_desc.sampler = g_sampler, g_rl_desc.tokenizer = g_tok, g_rl_desc.rewards = &g_reward_func, g_rl_desc.n_rewards = 1;
    NULL_TRY(ctl_rl_init(g_train, &g_rl_desc, &g_rl));
    NULL_TRY(ctl_rl_generate(g_rl, g_rl_prompts, 2, 5, NULL));

    for (int i = 0; i < 64; i++) g_logp[i] = -1.0f - 0.01f * (float)i, g_ref_logp[i] = -1.0f, g_ones[i] = 1.0f;
    for (int i = 0; i < 8; i++) g_adv_values[i] = i % 2 ? 1.0f : -1.0f;
    g_logprobs.B = 2, g_logprobs.T = 4, g_logprobs.logp = g_logp, g_logprobs.ref_logp = g_ref_logp;
    g_adv.group_size = 2;
    g_grpo.advantages = g_adv_values;
    g_obj_out.dlogp = (float *)BUF;
    return 0;
}

// ---- the runner --------------------------------------------------------------------------------

typedef struct null_case {
    const char *func, *arg;   // arg: the parameter passed NULL; "" for the call with every argument valid
    int (*call)(void);        // returns the child's exit code
} null_case;

enum { NULL_PASSED, NULL_SUCCEEDED, NULL_SILENT };

// A result read byte by byte into a volatile: the compiler must make the call (the test
// includes the implementation, so it could otherwise drop a call whose result is unused).
static volatile unsigned char g_sink;
static void null_keep(const void *p, size_t n) {
    for (size_t i = 0; i < n; i++) g_sink = (unsigned char)(g_sink ^ ((const unsigned char *)p)[i]);
}

// A ctl_status after a NULL argument: a failure, with a message in the context when an argument
// carries one (every fixture's is g_ctx). With no context left (the NULL was the only handle),
// the status is all cotlab can give: it keeps no global error buffer. Where NULL is allowed,
// success too.
static int null_status(ctl_status st, bool in_ctx, bool allowed) {
    if (st == CTL_OK) return allowed ? NULL_PASSED : NULL_SUCCEEDED;
    return !in_ctx || *ctl_last_error(g_ctx) ? NULL_PASSED : NULL_SILENT;
}

// Any other function after a NULL argument: a message, as above, unless NULL is allowed there
// (or no context is left: then not crashing is what can be checked).
static int null_message(bool in_ctx, bool allowed) {
    return allowed || !in_ctx || *ctl_last_error(g_ctx) ? NULL_PASSED : NULL_SILENT;
}

// --valid: every argument valid, to see that the fixtures are (a NULL then is the one fault).
static int null_baseline(ctl_status st, bool in_ctx) {
    if (st != CTL_OK) printf("    status %d: %s\n", (int)st, in_ctx ? ctl_last_error(g_ctx) : ctl_status_str(st));
    fflush(stdout);
    return st == CTL_OK ? 0 : 1;
}

// build/test_null runs every NULL call; build/test_null FUNCTION, that function's alone;
// build/test_null --valid, each ctl_status function once with every argument valid (it prints
// those that fail: a fixture to mend, or a CPU build's CUDA functions).
static int null_main(int argc, char **argv, const null_case *cases, int n, int n_funcs, int n_declared) {
    bool valid = argc > 1 && !strcmp(argv[1], "--valid");
    const char *only = argc > 1 && !valid ? argv[1] : NULL;   // a function's name: its calls alone
    if (null_setup()) return 1;
    int passed = 0, failed = 0;
    for (int i = 0; i < n; i++) {
        const null_case *c = &cases[i];
        if (!*c->arg != valid || (only && strcmp(only, c->func))) continue;
        if (valid) printf("  %s\n", c->func);
        fflush(stdout);
        pid_t pid = fork();
        if (pid < 0) return perror("fork"), 1;
        if (pid == 0) {   // the child: messages cleared, ten seconds at most
            alarm(10);
            ctl_fail(g_ctx, CTL_OK, "%s", "");
            _exit(c->call());
        }
        int ws = 0;
        if (waitpid(pid, &ws, 0) != pid) return perror("waitpid"), 1;
        char why[128] = "";
        if (WIFSIGNALED(ws) && WTERMSIG(ws) == SIGALRM) snprintf(why, sizeof why, "did not return within 10 s");
        else if (WIFSIGNALED(ws)) snprintf(why, sizeof why, "crashed (signal %d: %s)", WTERMSIG(ws), strsignal(WTERMSIG(ws)));
        else if (!WIFEXITED(ws)) snprintf(why, sizeof why, "stopped");
        else if (WEXITSTATUS(ws) == NULL_SUCCEEDED) snprintf(why, sizeof why, "returned CTL_OK");
        else if (WEXITSTATUS(ws) == NULL_SILENT) snprintf(why, sizeof why, "failed without a message");
        else if (WEXITSTATUS(ws) != NULL_PASSED) snprintf(why, sizeof why, "exit %d", WEXITSTATUS(ws));
        if (valid) {   // the child printed its status and message; a crash is told here
            if (!WIFEXITED(ws)) printf("    %s\n", why);
            if (WIFEXITED(ws) && WEXITSTATUS(ws) == 0) passed++;
            else failed++;
            continue;
        }
        if (*why) printf("  FAIL  %s(%s = NULL): %s\n", c->func, c->arg, why), failed++;
        else passed++;
    }
    if (valid) return printf("every argument valid: %d calls returned CTL_OK, %d did not\n", passed, failed), 0;
    printf("NULL arguments: %d functions of %d declared, %d calls\n", n_funcs, n_declared, passed + failed);
    printf("%d passed, %d failed\n", passed, failed);
    return failed != 0;
}
