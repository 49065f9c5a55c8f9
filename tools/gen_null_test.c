// Writes the NULL-argument test: reads cotlab.h's declarations and writes a C program that calls
// every public function of a CPU build with NULL in each of its pointer arguments, one at a
// time, the other arguments valid (sizes small and positive, handles real objects made by
// tests/null_fixtures.h), each call in a child process of its own. A crash, a hang, or a
// ctl_status function that says CTL_OK (or fails without a message) fails the test.
//
//     gen_null_test cotlab.h build/test_null.c    write the test
//     gen_null_test --list cotlab.h               the declarations as the generator reads them
//
// The header is read as a C compiler would for a CPU build: comments dropped, #ifdef
// COTLAB_CUDA (and anything else under an undefined macro) skipped, every CTL_API
// declaration up to its ';' whatever its line breaks. The tables below say which values are
// valid (by function and parameter first, then by name and type) and where NULL is allowed.
#include <ctype.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_PARAMS 24
#define MAX_FUNCS 600

typedef struct param {
    char type[128];   // as declared, tokens joined by single spaces: "const int32_t * const *"
    char name[128];
    bool pointer;     // a '*' in the type, or a function-pointer typedef
} param;

typedef struct func {
    char ret[128];
    char name[96];
    param p[MAX_PARAMS];
    int n;
    bool variadic;
} func;

static func funcs[MAX_FUNCS];
static int n_funcs;
static char fnptr_types[32][64];   // typedef R (*name)(...): pointers too
static int n_fnptr_types;

static void die(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "gen_null_test: ");
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, "\n");
    va_end(ap);
    exit(1);
}

static char *read_all(const char *path) {
    FILE *f = fopen(path, "rb");
    if (!f) die("cannot open %s", path);
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *s = (char *)malloc((size_t)n + 1);
    if (!s || fread(s, 1, (size_t)n, f) != (size_t)n) die("cannot read %s", path);
    s[n] = 0;
    fclose(f);
    return s;
}

// ---- reading the header ------------------------------------------------------------------------

// The declarations part as a compiler sees it in a CPU build: comments become spaces,
// preprocessor lines (continued ones included) and the lines of inactive conditionals are
// dropped, and the text ends where the include guard's #if closes. #ifdef X is active when X
// is defined, which nothing is here (COTLAB_CUDA, COTLAB_STATIC, __cplusplus); other #if
// conditions only choose attributes in this part of the header, and are taken as true.
static char *declarations(const char *src) {
    size_t n = strlen(src);
    char *out = (char *)malloc(n + 1), *w = out;
    bool active[64];
    int depth = 0;
    const char *p = src;
    bool line_start = true;
    while (*p) {
        if (line_start) {
            const char *q = p;
            while (*q == ' ' || *q == '\t') q++;
            if (*q == '#') {   // a directive, to the end of its (continued) line
                const char *e = q;
                while (*e && !(*e == '\n' && e[-1] != '\\')) e++;
                char d[256];
                size_t len = (size_t)(e - q) < sizeof d - 1 ? (size_t)(e - q) : sizeof d - 1;
                memcpy(d, q, len), d[len] = 0;
                bool parent = depth == 0 || active[depth - 1];
                if (!strncmp(d, "#ifdef", 6)) active[depth++] = false;   // nothing is defined
                else if (!strncmp(d, "#ifndef", 7)) active[depth++] = parent;
                else if (!strncmp(d, "#if", 3)) active[depth++] = parent;
                else if (!strncmp(d, "#else", 5) || !strncmp(d, "#elif", 5)) {
                    bool grand = depth < 2 || active[depth - 2];
                    if (!strncmp(d, "#else", 5)) active[depth - 1] = grand && !active[depth - 1];
                    else active[depth - 1] = false;
                } else if (!strncmp(d, "#endif", 6)) {
                    if (--depth == 0) break;   // the include guard: the declarations end here
                }
                if (depth > 63) die("conditionals nested too deep");
                p = *e ? e + 1 : e;
                *w++ = '\n';
                continue;
            }
        }
        bool on = depth == 0 || active[depth - 1];
        if (p[0] == '/' && p[1] == '/') {
            while (*p && *p != '\n') p++;
            continue;
        }
        if (p[0] == '/' && p[1] == '*') {
            const char *e = strstr(p + 2, "*/");
            if (!e) die("unterminated comment");
            for (; p < e + 2; p++)
                if (*p == '\n') *w++ = '\n';
            line_start = false;
            continue;
        }
        if (*p == '"') {   // a string literal, kept whole (none holds "CTL_API" or ';' that matters)
            if (on) *w++ = *p;
            for (p++; *p && *p != '"'; p++) {
                if (*p == '\\' && p[1]) {
                    if (on) *w++ = *p;
                    p++;
                }
                if (on) *w++ = *p;
            }
            if (*p) {
                if (on) *w++ = *p;
                p++;
            }
            line_start = false;
            continue;
        }
        line_start = *p == '\n';
        if (on || *p == '\n') *w++ = *p;
        p++;
    }
    *w = 0;
    return out;
}

static bool is_ident(char c) { return isalnum((unsigned char)c) || c == '_'; }

// Tokens joined by single spaces, '*' a token of its own: "const char *const*" -> "const char * const *".
static void normalise(const char *s, size_t len, char *out, size_t cap) {
    size_t o = 0;
    for (size_t i = 0; i < len;) {
        if (isspace((unsigned char)s[i])) { i++; continue; }
        size_t j = i;
        if (is_ident(s[i])) while (j < len && is_ident(s[j])) j++;
        else j = i + 1;
        if (o && o + 1 < cap) out[o++] = ' ';
        for (; i < j && o + 1 < cap; i++) out[o++] = s[i];
        i = j;
    }
    out[o] = 0;
}

static bool is_fnptr_type(const char *type) {
    char t[128];
    snprintf(t, sizeof t, "%s", type);
    char *word = strrchr(t, ' ');
    word = word ? word + 1 : t;
    for (int i = 0; i < n_fnptr_types; i++)
        if (!strcmp(word, fnptr_types[i])) return true;
    return false;
}

static void parse_param(func *f, const char *s, size_t len) {
    char norm[128];
    normalise(s, len, norm, sizeof norm);
    if (!strcmp(norm, "void") && f->n == 0) return;
    if (!strcmp(norm, ". . .")) {
        f->variadic = true;
        return;
    }
    if (f->n == MAX_PARAMS) die("%s: too many parameters", f->name);
    param *p = &f->p[f->n++];
    char *name = strrchr(norm, ' ');
    if (!name) die("%s: parameter '%s' has no name", f->name, norm);
    *name++ = 0;
    snprintf(p->name, sizeof p->name, "%s", name);
    snprintf(p->type, sizeof p->type, "%s", norm);
    p->pointer = strchr(p->type, '*') || is_fnptr_type(p->type);
}

// "CTL_API ret name(params)" up to the ';'.
static void parse_decl(const char *s, size_t len) {
    if (n_funcs == MAX_FUNCS) die("too many functions");
    func *f = &funcs[n_funcs];
    memset(f, 0, sizeof *f);
    const char *open = memchr(s, '(', len), *end = s + len;
    if (!open) die("a CTL_API declaration without parameters: %.*s", (int)len, s);
    const char *ne = open;
    while (ne > s && isspace((unsigned char)ne[-1])) ne--;
    const char *nb = ne;
    while (nb > s && is_ident(nb[-1])) nb--;
    if (nb == ne || (size_t)(ne - nb) >= sizeof f->name) die("no function name in: %.*s", (int)len, s);
    memcpy(f->name, nb, (size_t)(ne - nb));
    normalise(s, (size_t)(nb - s), f->ret, sizeof f->ret);
    int depth = 0;
    const char *arg = open + 1, *q;
    for (q = open; q < end; q++) {
        if (*q == '(') depth++;
        else if (*q == ')' && --depth == 0) break;
        else if (*q == ',' && depth == 1) parse_param(f, arg, (size_t)(q - arg)), arg = q + 1;
    }
    if (q == end) die("%s: unbalanced parentheses", f->name);
    parse_param(f, arg, (size_t)(q - arg));
    n_funcs++;
}

static void read_header(const char *path) {
    char *src = read_all(path), *text = declarations(src);
    for (char *p = text; (p = strstr(p, "typedef")); p++) {   // function-pointer typedefs
        char *semi = strchr(p, ';'), *star = strstr(p, "(*");
        if (!semi || !star || star > semi) continue;
        char *b = star + 2, *e = b;
        while (is_ident(*e)) e++;
        if (n_fnptr_types < 32 && e > b && (size_t)(e - b) < sizeof fnptr_types[0])
            memcpy(fnptr_types[n_fnptr_types++], b, (size_t)(e - b));
    }
    for (char *p = text; (p = strstr(p, "CTL_API")); p += 7) {
        if ((p > text && is_ident(p[-1])) || is_ident(p[7])) continue;
        char *semi = strchr(p, ';');
        if (!semi) die("a CTL_API declaration without ';'");
        parse_decl(p + 7, (size_t)(semi - p - 7));
    }
    free(text);
    free(src);
}

// ---- the valid arguments -----------------------------------------------------------------------
//
// The fixtures' names are tests/null_fixtures.h's. A value is looked up by function and
// parameter first, then (pointers) by type and name, by name, by type, else BUF (plain data);
// (scalars) by name, else 1 (0 for enums: the first constant, always a valid one).

typedef struct rule {
    const char *key, *value;
} rule;

// Objects owned through a context: where a failure's message goes when one is passed (all
// fixtures share g_ctx), and how to free one a `ctl_x **out` call made after all.
static const struct {
    const char *type, *fixture, *free_fn;
} handles[] = {
    {"ctl_ctx", "g_ctx", "ctl_ctx_free"},
    {"ctl_model", "g_model", "ctl_model_free"},
    {"ctl_train", "g_train", "ctl_train_free"},
    {"ctl_gguf", "g_gguf", "ctl_gguf_close"},
    {"ctl_gguf_writer", "g_gguf_writer", "ctl_gguf_writer_free"},
    {"ctl_safetensors", "g_st", "ctl_safetensors_close"},
    {"ctl_safetensors_writer", "g_st_writer", "ctl_safetensors_writer_free"},
    {"ctl_tokenizer", "g_tok", "ctl_tokenizer_free"},
    {"ctl_dataset", "g_data", "ctl_dataset_close"},
    {"ctl_infer", "g_infer", "ctl_infer_free"},
    {"ctl_batcher", "g_batcher", "ctl_batcher_free"},
    {"ctl_rl", "g_rl", "ctl_rl_free"},
};

static const rule by_func[] = {
    {"ctl_free.ptr", "g_alloc"},
    {"ctl_gguf_open.path", "NULL_DIR \"model.gguf\""},
    {"ctl_model_load_gguf.path", "NULL_DIR \"model.gguf\""},
    {"ctl_safetensors_open.path", "NULL_DIR \"model.safetensors\""},
    {"ctl_model_load_safetensors.path", "NULL_DIR \"model.safetensors\""},
    {"ctl_adapter_load.path", "NULL_DIR \"adapter.gguf\""},
    {"ctl_adapter_compose.path", "NULL_DIR \"adapter.gguf\""},
    {"ctl_train_load.path", "NULL_DIR \"train.gguf\""},
    {"ctl_dataset_open.path", "NULL_DIR \"data.jsonl\""},
    {"ctl_lora_load_peft.dir", "NULL_DIR \"peft\""},
    {"ctl_gguf_open_memory.data", "g_gguf_bytes"},
    {"ctl_gguf_open_memory.size", "g_gguf_size"},
    {"ctl_safetensors_open_memory.data", "g_st_bytes"},
    {"ctl_safetensors_open_memory.size", "g_st_size"},
    {"ctl_dataset_open_memory.data", "g_jsonl"},
    {"ctl_dataset_open_memory.size", "sizeof g_jsonl - 1"},
    {"ctl_gguf_get_int.key", "\"tokenizer.ggml.bos_token_id\""},
    {"ctl_gguf_get_uint.key", "\"tokenizer.ggml.bos_token_id\""},
    {"ctl_gguf_get_float.key", "\"llama.attention.layer_norm_rms_epsilon\""},
    {"ctl_gguf_get_bool.key", "\"tokenizer.ggml.add_bos_token\""},
    {"ctl_gguf_arr_int.kv", "g_kv_int"},
    {"ctl_gguf_arr_float.kv", "g_kv_float"},
    {"ctl_gguf_writer_set.type", "CTL_GGUF_U32"},
    {"ctl_gguf_writer_set_array.elem_type", "CTL_GGUF_I32"},
    {"ctl_adapters_enable.m", "g_lora"},
    {"ctl_adapters_merge.m", "g_lora"},
    {"ctl_adapters_unmerge.m", "g_lora"},
    {"ctl_lora_save_llamacpp.m", "g_lora"},
    {"ctl_lora_save_peft.m", "g_lora"},
    {"ctl_adapter_save.m", "g_lora"},
    {"ctl_cross_entropy.weights", "g_ones"},
    {"ctl_sparse_calibrate.n", "1"},
    {"ctl_chat_apply.n", "2"},
    {"ctl_chat_tokenize.n", "2"},
    {"ctl_infer_step.n", "2"},
    {"ctl_generate.n", "2"},
    {"ctl_generate_groups.n_prompts", "2"},
    {"ctl_rollout_run.n_prompts", "1"},
    {"ctl_rollout_run.T", "16"},
    {"ctl_rollout_run.out", "&g_rollout_out"},
    {"ctl_rewards_score.n", "1"},
    {"ctl_majority_vote.n", "3"},
    {"ctl_rl_generate.n", "2"},
    {"ctl_rl_step.n", "2"},
    {"ctl_batch_row.T", "8"},
    {"ctl_batch_pack.T", "8"},
    {"ctl_reward_fn_length.user", "&g_budget"},
};

// Pointers by "type name", then by name.
static const rule by_type_name[] = {
    {"const char * value", "\"v\""},
    {"const char * dtype", "\"F32\""},
};
static const rule by_pointer_name[] = {
    {"shape", "g_shape"}, {"ne", "g_shape"}, {"prompt_lens", "g_prompt_lens"}, {"seqs", "g_seqs"},
    {"lens", "g_lens"}, {"key", "\"general.architecture\""}, {"name", "\"token_embd.weight\""},
    {"reference", "\"7\""}, {"pattern", "\"*\""}, {"fmt", "\"x\""}, {"user", "NULL"}, {"arg", "NULL"},
};

// Pointers by type.
static const rule by_type[] = {
    {"const char *", "\"#### 7\""},
    {"const char * *", "g_str_out"},
    {"const char * const *", "g_strs"},
    {"const int32_t * const *", "g_prompts"},
    {"ctl_task_fn", "g_task"},
    {"ctl_token_fn", "g_on_token"},
    {"const ctl_gguf_kv *", "g_kv_str"},
    {"const ctl_gguf_tensor *", "g_tensor"},
    {"const ctl_safetensors_tensor *", "g_st_tensor"},
    {"const ctl_example *", "g_example"},
    {"ctl_arena *", "&g_arena"},
    {"ctl_rng *", "&g_rng"},
    {"const ctl_tensor *", "&g_view"},
    {"const ctl_ctx_desc *", "&g_ctx_desc"},
    {"const ctl_model_config *", "&g_cfg"},
    {"const ctl_model_desc *", "&g_model_desc"},
    {"const ctl_lora_desc *", "&g_lora_desc"},
    {"const ctl_sparse_desc *", "&g_sparse_desc"},
    {"const ctl_batch *", "&g_batch"},
    {"const struct ctl_batch *", "&g_batch"},
    {"const ctl_logprobs *", "&g_logprobs"},
    {"const ctl_sft_desc *", "&g_sft"},
    {"const ctl_dpo_desc *", "&g_dpo"},
    {"const ctl_advantage_desc *", "&g_adv"},
    {"const ctl_grpo_desc *", "&g_grpo"},
    {"ctl_objective_out *", "&g_obj_out"},
    {"const ctl_objective_out *", "&g_obj_out"},
    {"const ctl_infer_desc *", "&g_infer_desc"},
    {"const ctl_sampler_desc *", "&g_sampler"},
    {"const ctl_reward_input *", "&g_reward_in"},
    {"const ctl_reward_func *", "&g_reward_func"},
    {"ctl_rollout *", "&g_rollout"},
    {"const ctl_optim_desc *", "&g_optim"},
    {"const ctl_train_desc *", "&g_train_desc"},
    {"const ctl_run_state *", "&g_run"},
    {"ctl_run_state *", "&g_run"},
    {"const ctl_dataset_desc *", "&g_data_desc"},
    {"const ctl_part *", "&g_part"},
    {"const ctl_encoding *", "&g_enc"},
    {"const ctl_batcher_desc *", "&g_batcher_desc"},
    {"const ctl_step_desc *", "&g_step_desc"},
    {"const ctl_rl_desc *", "&g_rl_desc"},
    {"const ctl_rl_prompt *", "g_rl_prompts"},
    {"const ctl_chat_template *", "&g_tmpl"},
    {"const ctl_chat_msg *", "g_msgs"},
};

// Scalars by name: the kernels' shapes are small and consistent (attention: B 1, T 2, NH 2,
// NKV 1, HS 4; a GEMM 4x4x4), counts are positive, indices 0.
static const rule by_scalar_name[] = {
    {"n", "4"}, {"N", "2"}, {"C", "4"}, {"OC", "4"}, {"B", "1"}, {"T", "2"}, {"V", "8"}, {"NH", "2"},
    {"NKV", "1"}, {"HS", "4"}, {"FF", "4"}, {"M", "4"}, {"K", "4"}, {"a_rs", "4"}, {"a_cs", "1"},
    {"b_rs", "4"}, {"b_cs", "1"}, {"ldc", "4"}, {"n_pos", "4"}, {"n_heads", "2"}, {"row_stride", "8"},
    {"chunk", "2"}, {"eps", "1e-5f"}, {"theta", "10000.0f"}, {"size", "64"}, {"len", "6"}, {"cap", "64"},
    {"i", "0"}, {"seq", "0"}, {"b", "0"}, {"pos", "0"}, {"step", "0"}, {"mark", "0"}, {"from", "0"},
    {"to", "0"}, {"epoch", "0"}, {"position", "0"}, {"layer_from", "0"}, {"layer_to", "0"}, {"pad", "0"},
    {"kinds", "CTL_KIND_ALL"}, {"G", "2"}, {"max_new", "4"}, {"count", "2"}, {"beta1", "0.9f"},
    {"beta2", "0.999f"}, {"weight_decay", "0.0f"}, {"lr", "1e-3f"}, {"s", "CTL_ERR_INVALID"},
    {"n_tasks", "2"}, {"budget", "4"}, {"n_prompts", "1"},
};

// Where NULL is part of the contract (the header says "may be NULL", "or NULL", a skipped
// gradient output, freeing NULL): the call may succeed, and must not crash. Every other NULL
// must be refused with a message (and, from a ctl_status function, a status other than CTL_OK).
static const char *const null_allowed[] = {
    // basics and tensors
    "ctl_ctx_init.desc", "ctl_ctx_free.ctx", "ctl_last_error.ctx", "ctl_free.ptr", "ctl_arena_free.a",
    "ctl_cuda_available.why", "ctl_parallel_for.arg", "ctl_tensor_f32.data",
    // a CPU build's device functions take any context: they have nothing to do with it
    "ctl_ctx_device_name.ctx", "ctl_device_mark.ctx", "ctl_device_release.ctx", "ctl_device_release_span.ctx",
    // kernels: optional inputs, and gradient outputs (skipped)
    "ctl_matmul_forward.bias", "ctl_matmul_backward.dinp", "ctl_matmul_backward.dw", "ctl_matmul_backward.dbias",
    "ctl_embedding_forward.wpe", "ctl_embedding_backward.dwte", "ctl_embedding_backward.dwpe",
    "ctl_layernorm_forward.b", "ctl_layernorm_backward.dinp", "ctl_layernorm_backward.dw", "ctl_layernorm_backward.db",
    "ctl_rmsnorm_backward.dinp", "ctl_rmsnorm_backward.dw", "ctl_attention_backward.dqkv", "ctl_gelu_backward.dinp",
    "ctl_swiglu_backward.dinp", "ctl_residual_backward.da", "ctl_residual_backward.db", "ctl_lmhead_backward.dx",
    "ctl_lmhead_backward.dw",
    // formats, tokenizer
    "ctl_gguf_close.g", "ctl_gguf_writer_free.w", "ctl_safetensors_close.st", "ctl_safetensors_writer_free.w",
    "ctl_tokenizer_free.tk", "ctl_tokenize.ids", "ctl_chat_tokenize.mask",
    // model, adapters
    "ctl_model_free.m", "ctl_model_from_gguf.desc", "ctl_model_load_gguf.desc", "ctl_model_export_gguf.from",
    "ctl_lora_attach.desc", "ctl_sparse_calibrate.desc", "ctl_sparse_attach.desc",
    // objectives
    "ctl_cross_entropy.weights", "ctl_objective_sft.d", "ctl_advantages.metrics",
    // sampling and rewards
    "ctl_infer_init.desc", "ctl_infer_plan.desc", "ctl_infer_free.inf", "ctl_infer_feed.logits", "ctl_infer_step.logits",
    "ctl_generate.fn", "ctl_generate.user", "ctl_generate_groups.fn", "ctl_generate_groups.user",
    "ctl_reward_fn_math.user", "ctl_reward_fn_format.user", "ctl_reward_fn_answer_line.user", "ctl_reward_fn_length.user",
    "ctl_rewards_score.weights", "ctl_rewards_score.names", "ctl_rollout_run.tk", "ctl_rollout_free.r",
    "ctl_majority_vote.value",
    // training
    "ctl_train_free.t", "ctl_train_forward_packed.pos", "ctl_train_step.stats", "ctl_train_save.run", "ctl_train_load.run",
    // data, loops
    "ctl_dataset_open.desc", "ctl_dataset_open_memory.desc", "ctl_dataset_close.ds", "ctl_example_encode.part",
    "ctl_example_encode.tmpl", "ctl_example_encode.mask", "ctl_batch_row.mask", "ctl_batch_pack.mask",
    "ctl_example_tokens.part", "ctl_example_tokens.mask", "ctl_batcher_free.b", "ctl_batcher_tell.epoch",
    "ctl_batcher_tell.position", "ctl_train_batches.d", "ctl_rl_free.rl", "ctl_rl_generate.metrics",
};

static const char *lookup(const rule *r, size_t n, const char *key) {
    for (size_t i = 0; i < n; i++)
        if (!strcmp(r[i].key, key)) return r[i].value;
    return NULL;
}
#define LOOKUP(table, key) lookup(table, sizeof table / sizeof table[0], key)

// The handle a type names ("const ctl_model *" -> 0..), -1 when none; *out when it is "ctl_x * *".
static int handle_of(const char *type, bool *out) {
    char t[128];
    snprintf(t, sizeof t, "%s", !strncmp(type, "const ", 6) ? type + 6 : type);
    *out = false;
    size_t len = strlen(t);
    if (len > 4 && !strcmp(t + len - 4, " * *")) *out = true, t[len - 4] = 0;
    else if (len > 2 && !strcmp(t + len - 2, " *")) t[len - 2] = 0;
    else return -1;
    for (size_t i = 0; i < sizeof handles / sizeof handles[0]; i++)
        if (!strcmp(t, handles[i].type)) return (int)i;
    return -1;
}

static bool is_allowed(const func *f, const param *p) {
    char key[256];
    snprintf(key, sizeof key, "%s.%s", f->name, p->name);
    for (size_t i = 0; i < sizeof null_allowed / sizeof null_allowed[0]; i++)
        if (!strcmp(null_allowed[i], key)) return true;
    return false;
}

// The valid value of parameter p of f, as C source.
static const char *valid_value(const func *f, const param *p) {
    static char buf[256];
    char key[256];
    snprintf(key, sizeof key, "%s.%s", f->name, p->name);
    const char *v = LOOKUP(by_func, key);
    if (v) return v;
    if (!p->pointer) {
        if ((v = LOOKUP(by_scalar_name, p->name))) return v;
        return !strncmp(p->type, "ctl_", 4) ? "0" : "1";
    }
    bool out;
    int h = handle_of(p->type, &out);
    if (h >= 0 && !out) return handles[h].fixture;
    if (!strcmp(p->name, "path") || !strcmp(p->name, "dir")) {   // a file or folder written
        snprintf(buf, sizeof buf, "NULL_DIR \"out_%s\"", f->name + 4);
        return buf;
    }
    snprintf(key, sizeof key, "%s %s", p->type, p->name);
    if ((v = LOOKUP(by_type_name, key)) || (v = LOOKUP(by_pointer_name, p->name)) || (v = LOOKUP(by_type, p->type))) return v;
    return "BUF";
}

// Whether to make the call with every argument valid (--valid): ctl_status functions that
// destroy nothing (the fixtures must stay whole, even in a child).
static bool valid_call(const func *f) {
    return !strcmp(f->ret, "ctl_status") && !strstr(f->name, "_free") && !strstr(f->name, "_close");
}

// ---- writing the test --------------------------------------------------------------------------

// One call of f with parameter `nul` NULL (-1: none, the baseline call), as the body of a
// function returning the child's exit code.
static void emit_call(FILE *o, const func *f, int nul) {
    // Where the message goes: to the ctl_ctx argument if the function takes one, else to the
    // context of a handle argument, else (both NULL, or none) nowhere: the status tells.
    bool has_ctx = false, in_ctx = false, allowed = nul >= 0 && is_allowed(f, &f->p[nul]);
    for (int k = 0; k < f->n; k++) {   // outputs into locals, freed if the call made one
        bool out;
        int h = handle_of(f->p[k].type, &out);
        if (h >= 0 && out && k != nul) fprintf(o, "    %s *h_%s = NULL;\n", handles[h].type, f->p[k].name);
        if (h == 0 && !out) has_ctx = true, in_ctx = k != nul;
        if (h >= 0 && !out && k != nul && !has_ctx) in_ctx = true;
    }
    bool status = !strcmp(f->ret, "ctl_status"), value = !status && strcmp(f->ret, "void");
    if (status) fprintf(o, "    ctl_status st = %s(", f->name);
    else if (value) fprintf(o, "    %s r = %s(", f->ret, f->name);   // kept (null_keep): else the call may go
    else fprintf(o, "    %s(", f->name);
    for (int k = 0; k < f->n; k++) {
        bool out;
        int h = handle_of(f->p[k].type, &out);
        fprintf(o, "%s", k ? ", " : "");
        if (k == nul) fprintf(o, "(%s)NULL", f->p[k].type);
        else if (h >= 0 && out) fprintf(o, "&h_%s", f->p[k].name);
        else fprintf(o, "(%s)(%s)", f->p[k].type, valid_value(f, &f->p[k]));
    }
    fprintf(o, ");\n");
    for (int k = 0; k < f->n; k++) {
        bool out;
        int h = handle_of(f->p[k].type, &out);
        if (h >= 0 && out && k != nul) fprintf(o, "    if (h_%s) %s(h_%s);\n", f->p[k].name, handles[h].free_fn, f->p[k].name);
    }
    if (value) fprintf(o, "    null_keep(&r, sizeof r);\n");
    const char *where = in_ctx ? "true" : "false", *may = allowed ? "true" : "false";
    if (status && nul >= 0) fprintf(o, "    return null_status(st, %s, %s);\n", where, may);
    else if (status) fprintf(o, "    return null_baseline(st, %s);\n", where);
    else if (nul >= 0) fprintf(o, "    return null_message(%s, %s);\n", where, may);
    else fprintf(o, "    return 0;\n");
}

static void write_test(const char *header, const char *path) {
    FILE *o = fopen(path, "w");
    if (!o) die("cannot write %s", path);
    fprintf(o, "// Written by tools/gen_null_test.c from %s; do not edit. Every public function of a CPU\n"
               "// build, called with NULL in each of its pointer arguments in turn, the others valid.\n"
               "#define _POSIX_C_SOURCE 200809L\n#include \"../tests/null_fixtures.h\"\n\n", header);
    int n_cases = 0, n_tested = 0, n_args = 0;
    for (int i = 0; i < n_funcs; i++) {
        const func *f = &funcs[i];
        bool any = false;
        for (int k = -1; k < f->n; k++) {
            if (k >= 0 ? !f->p[k].pointer : !valid_call(f)) continue;
            fprintf(o, "static int c%d(void) {   // %s: %s%s\n", n_cases++, f->name, k >= 0 ? f->p[k].name : "every argument valid",
                    k >= 0 ? " NULL" : "");
            emit_call(o, f, k);
            fprintf(o, "}\n");
            if (k >= 0) any = true, n_args++;
        }
        n_tested += any;
    }
    fprintf(o, "\nstatic const null_case cases[] = {\n");
    n_cases = 0;
    for (int i = 0; i < n_funcs; i++) {
        const func *f = &funcs[i];
        for (int k = -1; k < f->n; k++)
            if (k >= 0 ? f->p[k].pointer : valid_call(f)) fprintf(o, "    {\"%s\", \"%s\", c%d},\n", f->name, k >= 0 ? f->p[k].name : "", n_cases++);
    }
    fprintf(o, "};\n\nint main(int argc, char **argv) {\n"
               "    return null_main(argc, argv, cases, (int)(sizeof cases / sizeof cases[0]), %d, %d);\n}\n",
            n_tested, n_funcs);
    if (fclose(o)) die("cannot write %s", path);
    fprintf(stderr, "gen_null_test: %d functions (%d with pointer arguments), %d NULL calls -> %s\n", n_funcs, n_tested, n_args, path);
}

int main(int argc, char **argv) {
    if (argc == 3 && !strcmp(argv[1], "--list")) {
        read_header(argv[2]);
        for (int i = 0; i < n_funcs; i++) {
            const func *f = &funcs[i];
            printf("%s %s(", f->ret, f->name);
            for (int k = 0; k < f->n; k++) printf("%s%s %s%s", k ? ", " : "", f->p[k].type, f->p[k].name, f->p[k].pointer ? " [pointer]" : "");
            printf("%s)\n", f->variadic ? ", ..." : "");
        }
        return 0;
    }
    if (argc != 3) {
        fprintf(stderr, "usage: gen_null_test cotlab.h OUT.c | gen_null_test --list cotlab.h\n");
        return 2;
    }
    read_header(argv[1]);
    if (n_funcs < 100) die("only %d declarations found in %s", n_funcs, argv[1]);
    write_test(argv[1], argv[2]);
    return 0;
}
