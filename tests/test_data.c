// Datasets (included by tests/test.c, which holds the harness): every JSONL format, strings and
// conversations, TRL's implicit prompt, GSM8K's real files (the answer of every line against the
// file's own numeric "ans" field), malformed lines, encoding and batch rows.

#define GSM8K_DIR "examples/gsm8k/"

static const char *write_text_file(const char *name, const char *text) {
    static char path[256];
    snprintf(path, sizeof path, "build/%s", name);
    FILE *f = fopen(path, "wb");
    if (f) fputs(text, f), fclose(f);
    return path;
}

static void test_datasets(void) {
    ctl_ctx *ctx = make_ctx(1, CTL_SIMD_AUTO);
    ctl_dataset *ds;
    const ctl_example *e;
    // Strings, in every format.
    static const struct { const char *text; ctl_data_format fmt; } files[] = {
        {"{\"text\": \"one\"}\n\n{\"text\": \"two \\u00e9\", \"id\": 7}\n", CTL_DATA_TEXT},
        {"{\"prompt\": \"2+2=\", \"completion\": \"4\"}\r\n{\"completion\": \"x\", \"prompt\": \"y\"}", CTL_DATA_PROMPT_COMPLETION},
        {"{\"prompt\": \"Q\", \"answer\": \"12\", \"difficulty\": 0.5, \"tags\": [1, 2]}\n", CTL_DATA_PROMPT},
        {"{\"prompt\": \"Say\", \"chosen\": \" yes\", \"rejected\": \" no\"}\n", CTL_DATA_PREFERENCE},
        {"{\"chosen\": \"The sky is blue.\", \"rejected\": \"The sky is green.\"}\n", CTL_DATA_PREFERENCE},
        {"{\"question\": \"How many?\", \"answer\": \"2 + 3 = 5\\n#### 5\"}\n", CTL_DATA_GSM8K}};
    for (size_t f = 0; f < sizeof files / sizeof *files; f++) {
        const char *path = write_text_file("data.jsonl", files[f].text);
        CHECK(ctl_dataset_open(ctx, path, NULL, &ds) == CTL_OK, "file %d: %s", (int)f, ctl_last_error(ctx));
        if (!ds) continue;
        CHECK(ctl_dataset_format(ds) == files[f].fmt, "file %d: format %d", (int)f, (int)ctl_dataset_format(ds));
        e = ctl_dataset_get(ds, 0);
        switch (f) {
        case 0:
            CHECK(ctl_dataset_size(ds) == 2 && !strcmp(e->completion.text, "one") && ctl_dataset_get(ds, 1)->line == 3 &&
                  !strcmp(ctl_dataset_get(ds, 1)->completion.text, "two \xc3\xa9") &&
                  !strcmp(ctl_example_field(ctl_dataset_get(ds, 1), "id"), "7"), "text lines");
            break;
        case 1: CHECK(!strcmp(e->prompt.text, "2+2=") && !strcmp(e->completion.text, "4") && ctl_dataset_size(ds) == 2, "prompt-completion"); break;
        case 2:
            CHECK(!strcmp(e->prompt.text, "Q") && !strcmp(e->answer, "12") && !strcmp(ctl_example_field(e, "difficulty"), "0.5") &&
                  !strcmp(ctl_example_field(e, "tags"), "[1, 2]") && !ctl_example_field(e, "nothing"), "prompt-only with fields");
            break;
        case 3: CHECK(!strcmp(e->prompt.text, "Say") && !strcmp(e->chosen.text, " yes") && !strcmp(e->rejected.text, " no"), "preference"); break;
        case 4:   // TRL's extract_prompt: the space before the difference goes to the completions
            CHECK(!strcmp(e->prompt.text, "The sky is") && !strcmp(e->chosen.text, " blue.") && !strcmp(e->rejected.text, " green."),
                  "implicit prompt: '%s' '%s' '%s'", e->prompt.text, e->chosen.text, e->rejected.text);
            break;
        case 5: CHECK(!strcmp(e->prompt.text, "How many?") && !strcmp(e->answer, "5") && strstr(e->completion.text, "2 + 3"), "gsm8k"); break;
        }
        ctl_dataset_close(ds);
    }
    // Conversations.
    const char *conv =
        "{\"messages\": [{\"role\": \"user\", \"content\": \"Hi\"}, {\"role\": \"assistant\", \"content\": \"Hello\"}]}\n";
    CHECK(ctl_dataset_open(ctx, write_text_file("data.jsonl", conv), NULL, &ds) == CTL_OK, "messages: %s", ctl_last_error(ctx));
    e = ctl_dataset_get(ds, 0);
    CHECK(ctl_dataset_format(ds) == CTL_DATA_MESSAGES && e->completion.n_msgs == 2 && !strcmp(e->completion.msgs[1].content, "Hello"), "messages");
    ctl_dataset_close(ds);
    const char *pref =
        "{\"chosen\": [{\"role\": \"user\", \"content\": \"Pick\"}, {\"role\": \"assistant\", \"content\": \"A\"}],"
        " \"rejected\": [{\"role\": \"user\", \"content\": \"Pick\"}, {\"role\": \"assistant\", \"content\": \"B\"}]}\n";
    CHECK(ctl_dataset_open(ctx, write_text_file("data.jsonl", pref), NULL, &ds) == CTL_OK, "conversational preference: %s", ctl_last_error(ctx));
    e = ctl_dataset_get(ds, 0);
    CHECK(e->prompt.n_msgs == 1 && !strcmp(e->prompt.msgs[0].content, "Pick") && e->chosen.n_msgs == 1 &&
          !strcmp(e->chosen.msgs[0].content, "A") && !strcmp(e->rejected.msgs[0].content, "B"), "implicit conversational prompt");
    ctl_dataset_close(ds);

    // A field cotlab does not read is skipped whatever its length and nesting (a 64 KiB string, an object of long keys).
    {
        size_t big = 65536, cap = 2 * big + 256;
        char *text = (char *)malloc(cap), *p = text;
        p += sprintf(p, "{\"prompt\": \"2+2?\", \"meta\": {\"");
        memset(p, 'k', big), p += big;
        p += sprintf(p, "\": [\"");
        memset(p, 'v', big), p += big;
        p += sprintf(p, "\\u00e9\"]}, \"completion\": \" 4\"}\n");
        CHECK(ctl_dataset_open_memory(ctx, text, (size_t)(p - text), NULL, &ds) == CTL_OK && ctl_dataset_size(ds) == 1 &&
                  !strcmp(ctl_dataset_get(ds, 0)->completion.text, " 4"),
              "a long unknown field: %s", ctl_last_error(ctx));
        if (ds) ctl_dataset_close(ds);
        free(text);
    }

    // Malformed lines: the file and line named; or skipped and counted.
    static const struct { const char *text, *msg; } bad[] = {
        {"{\"text\": \"a\"}\n{\"text\": \"b\"\n", "line 2"},
        {"{\"text\": \"a\"}\n{\"prompt\": \"b\"}\n", "need \"text\""},
        {"{\"text\": 5}\n", "must be a string"},
        {"{\"messages\": [{\"role\": \"user\"}]}\n", "needs \"role\" and \"content\""},
        {"{\"question\": \"q\", \"answer\": \"no final line\"}\n", "#### N"},
        {"{\"foo\": 1}\n", "no known keys"},
        {"[1, 2]\n", "expected"},
        {"{\"text\": \"a\"} x\n", "text after"},
        {"{\"text\": \"\\ud800\"}\n", "surrogate"},
        {"", "no examples"}};
    for (size_t k = 0; k < sizeof bad / sizeof *bad; k++) {
        ds = NULL;
        ctl_status st = ctl_dataset_open(ctx, write_text_file("bad.jsonl", bad[k].text), NULL, &ds);
        CHECK(st != CTL_OK && !ds && strstr(ctl_last_error(ctx), bad[k].msg) && (k == 9 || strstr(ctl_last_error(ctx), "bad.jsonl' line")),
              "bad file %d: %s", (int)k, ctl_last_error(ctx));
    }
    ctl_dataset_desc dd = {CTL_DATA_AUTO, true};
    CHECK(ctl_dataset_open(ctx, write_text_file("bad.jsonl", "{\"text\": \"a\"}\n{oops\n{\"text\": \"c\"}\n"), &dd, &ds) == CTL_OK &&
          ctl_dataset_size(ds) == 2 && ctl_dataset_skipped(ds) == 1 && ctl_dataset_get(ds, 1)->line == 3, "skip_bad");
    ctl_dataset_close(ds);
    CHECK(ctl_dataset_open(ctx, "build/no_such.jsonl", NULL, &ds) == CTL_ERR_IO, "missing file");

    // GSM8K as shipped: every line's answer is the file's own numeric "ans" field.
    const char *gsm[2] = {GSM8K_DIR "dev.jsonl", GSM8K_DIR "train.jsonl"};
    for (int f = 0; f < 2; f++) {
        if (ctl_dataset_open(ctx, gsm[f], NULL, &ds) != CTL_OK) {   // they ship with the repository
            CHECK(false, "%s: %s", gsm[f], ctl_last_error(ctx));
            continue;
        }
        int64_t n = ctl_dataset_size(ds), bad_ans = 0;
        for (int64_t i = 0; i < n; i++) {
            e = ctl_dataset_get(ds, i);
            double got, want;
            const char *ans = ctl_example_field(e, "ans");
            if (!ans || !ctl_parse_number(e->answer, strlen(e->answer), &got) || !ctl_parse_number(ans, strlen(ans), &want) ||
                fabs(got - want) > 1e-9 * fmax(1.0, fabs(want)))
                bad_ans++;
        }
        CHECK(ctl_dataset_format(ds) == CTL_DATA_GSM8K && bad_ans == 0 && n > 100, "%s: %lld of %lld answers differ", gsm[f],
              (long long)bad_ans, (long long)n);
        printf("    %s: %lld examples, answers equal the \"ans\" field\n", gsm[f], (long long)n);
        int64_t *o1 = (int64_t *)malloc(n * 8), *o2 = (int64_t *)malloc(n * 8), *o3 = (int64_t *)malloc(n * 8);
        ctl_dataset_shuffle(ds, 1, o1), ctl_dataset_shuffle(ds, 1, o2), ctl_dataset_shuffle(ds, 2, o3);
        char *seen = (char *)calloc(n, 1);
        bool perm = true;
        for (int64_t i = 0; i < n; i++) perm = perm && !seen[o1[i]], seen[o1[i]] = 1;
        CHECK(perm && !memcmp(o1, o2, n * 8) && memcmp(o1, o3, n * 8), "shuffle: a seeded permutation");
        free(o1), free(o2), free(o3), free(seen);
        ctl_dataset_close(ds);
    }
    ctl_ctx_free(ctx);
}

// Encoding: text parts are prompt + completion + EOS with the mask on the completion;
// conversations are the chat template's tokens with the mask on the part's assistant turns.
static void test_example_encode(void) {
    ctl_ctx *ctx = make_ctx(1, CTL_SIMD_AUTO);
    ctl_gguf *g;
    if (ctl_gguf_open(ctx, VOCAB_DIR "ggml-vocab-qwen2.gguf", &g) != CTL_OK) {
        printf("    skipped: the Qwen2 vocabulary is missing (make models)\n");
        ctl_ctx_free(ctx);
        return;
    }
    ctl_tokenizer *tk;
    ctl_chat_template tmpl;
    ctl_tokenizer_from_gguf(ctx, g, &tk);
    ctl_chat_template_from_gguf(ctx, g, &tmpl);
    ctl_dataset *ds;
    const char *text = "{\"prompt\": \"What is 6 * 7?\", \"completion\": \" 42\"}\n"
                       "{\"prompt\": [{\"role\": \"user\", \"content\": \"What is 6 * 7?\"}], \"completion\": [{\"role\": "
                       "\"assistant\", \"content\": \"42\"}]}\n";
    CHECK(ctl_dataset_open(ctx, write_text_file("enc.jsonl", text), NULL, &ds) == CTL_OK, "open: %s", ctl_last_error(ctx));
    int32_t ids[128], a[128], c[128], tokens[2 * 16], targets[2 * 16];
    float mask[128], w[2 * 16];
    int64_t n, na, nc;
    const ctl_example *e = ctl_dataset_get(ds, 0);
    CHECK(ctl_example_encode(e, &e->completion, tk, &tmpl, ids, mask, 128, &n) == CTL_OK, "encode: %s", ctl_last_error(ctx));
    ctl_tokenize(tk, "What is 6 * 7?", 14, false, a, 128, &na);
    ctl_tokenize(tk, " 42", 3, false, c, 128, &nc);
    bool ok = n == na + nc + 1 && !memcmp(ids, a, na * 4) && !memcmp(ids + na, c, nc * 4) && ids[n - 1] == ctl_tokenizer_eos(tk);
    for (int64_t i = 0; i < n; i++) ok = ok && mask[i] == (i >= na ? 1.0f : 0.0f);
    CHECK(ok, "text: prompt + completion + EOS, mask on the completion");
    CHECK(ctl_example_encode(e, &e->completion, tk, &tmpl, ids, mask, 3, &n) == CTL_ERR_CAPACITY && n == na + nc + 1, "capacity");
    // A row: tokens and targets shifted by one, weights from the mask of the predicted token.
    ctl_example_encode(e, &e->completion, tk, &tmpl, ids, mask, 128, &n);
    int64_t counted = ctl_batch_row(tokens, targets, w, 16, 1, ids, mask, n, 0);
    ok = counted == nc + 1;
    for (int64_t t = 0; t < 16; t++)
        ok = ok && tokens[16 + t] == (t < n ? ids[t] : 0) && targets[16 + t] == (t + 1 < n ? ids[t + 1] : 0) &&
             w[16 + t] == (t + 1 < n ? mask[t + 1] : 0.0f);
    CHECK(ok, "batch row");
    e = ctl_dataset_get(ds, 1);
    CHECK(ctl_example_encode(e, &e->completion, tk, &tmpl, ids, mask, 128, &n) == CTL_OK, "chat encode: %s", ctl_last_error(ctx));
    ctl_chat_msg all[2] = {e->prompt.msgs[0], e->completion.msgs[0]};
    float m2[128];
    ctl_chat_tokenize(tk, &tmpl, all, 2, false, a, m2, 128, &na);
    ok = n == na && !memcmp(ids, a, n * 4) && !memcmp(mask, m2, n * 4);
    CHECK(ok, "chat: the template's tokens and assistant mask");
    CHECK(ctl_example_encode(e, NULL, tk, &tmpl, ids, mask, 128, &n) == CTL_OK && all_zero(mask, n), "prompt alone: nothing masked");
    ctl_chat_tokenize(tk, &tmpl, all, 1, true, a, NULL, 128, &na);
    CHECK(n == na && !memcmp(ids, a, n * 4), "prompt alone ends with the generation prompt");
    ctl_dataset_close(ds);
    ctl_tokenizer_free(tk);
    ctl_gguf_close(g);
    ctl_ctx_free(ctx);
}

// Packing: documents packed into rows give the log-probs and gradients of the same documents
// one per row (attention stays within a document, positions restart), for gpt2 (learned
// positions) and llama (RoPE), through the AVX2 and the portable paths, across block edges.
static void test_packing(void) {
    for (int arch = 0; arch < 2; arch++)
        for (int simd = 0; simd < 2; simd++) {
            ctl_ctx *ctx = make_ctx(2, simd ? CTL_SIMD_SCALAR : CTL_SIMD_AUTO);
            ctl_model_config cfg = tiny_config(arch ? CTL_ARCH_LLAMA : CTL_ARCH_GPT2);
            cfg.n_ctx = 80;
            ctl_model *m;
            ctl_model_create(ctx, &cfg, &m);
            ctl_model_init_random(m, 5 + arch);
            scale_weights(m, 3.0f);
            enum { D = 5, T = 72 };
            int64_t lens[D] = {9, 40, 3, 25, 31};   // tokens per document; row 0: 9+40+3 -> 49 positions, row 1: 25+31
            int32_t ids[D][48], tok[2 * T], tgt[2 * T], pos[2 * T], stok[D * 40], stgt[D * 40];
            float mask[D][48], w[2 * T], sw[D * 40];
            for (int d = 0; d < D; d++)
                for (int i = 0; i < lens[d]; i++) ids[d][i] = (int32_t)((d * 7 + i * 3) % cfg.vocab_size), mask[d][i] = i >= 2 ? 1.0f : 0.0f;
            int64_t off[2] = {0, 0};
            int row_of[D] = {0, 0, 0, 1, 1};
            bool fit = true;
            for (int d = 0; d < D; d++)
                fit = fit && ctl_batch_pack(tok, tgt, w, pos, T, row_of[d], &off[row_of[d]], ids[d], mask[d], lens[d], 0);
            CHECK(fit && off[0] == 49 && off[1] == 54 && !ctl_batch_pack(tok, tgt, w, pos, T, 1, &off[1], ids[1], mask[1], 40, 0),
                  "pack: offsets %d %d", (int)off[0], (int)off[1]);
            for (int d = 0; d < D; d++) ctl_batch_row(stok, stgt, sw, 40, d, ids[d], mask[d], lens[d], 0);
            ctl_train_desc td;
            memset(&td, 0, sizeof td);
            td.batch = D, td.seq_len = T;
            ctl_train *tp, *ts;
            ctl_train_init(m, &td, &tp), ctl_train_init(m, &td, &ts);
            ctl_batch bp = {2, T, tok, tgt, w}, bs = {D, 40, stok, stgt, sw};
            CHECK(ctl_train_forward_packed(tp, &bp, pos) == CTL_OK && ctl_train_forward(ts, &bs) == CTL_OK, "forwards: %s", ctl_last_error(ctx));
            double lerr = 0.0, n_all = 0.0;
            for (int d = 0; d < D; d++) {
                int64_t at = 0;
                for (int e = 0; e < d; e++) at += row_of[e] == row_of[d] ? lens[e] - 1 : 0;
                for (int i = 0; i + 1 < lens[d]; i++)
                    lerr = fmax(lerr, fabs(ctl_train_logprobs(tp)[row_of[d] * T + at + i] - ctl_train_logprobs(ts)[d * 40 + i]));
            }
            for (int i = 0; i < 2 * T; i++) n_all += w[i];
            ctl_sft_desc sd;
            memset(&sd, 0, sizeof sd);
            ctl_objective_out o1, o2;
            ctl_logprobs lp = {2, T, ctl_train_logprobs(tp), w, NULL, NULL, NULL}, ls = {D, 40, ctl_train_logprobs(ts), sw, NULL, NULL, NULL};
            o1.dlogp = ctl_train_dlogprobs(tp), o2.dlogp = ctl_train_dlogprobs(ts);
            ctl_objective_sft(ctx, &lp, &sd, &o1), ctl_objective_sft(ctx, &ls, &sd, &o2);
            ctl_train_backward(tp), ctl_train_backward(ts);
            double gerr = 0.0;
            for (int64_t i = 0; i < ctl_model_param_count(m); i++)
                gerr = fmax(gerr, rel_err_ff(ctl_train_grad(tp, i), ctl_train_grad(ts, i), ctl_tensor_numel(&ctl_model_param(m, i)->value)));
            CHECK(lerr < 2e-5 && fabs(o1.loss - o2.loss) < 1e-5 * fabs(o2.loss) && gerr < 1e-4,
                  "%s %s: packed vs one per row: log-probs %g, loss %g vs %g, gradients %g", arch ? "llama" : "gpt2",
                  ctl_ctx_simd_name(ctx), lerr, o1.loss, o2.loss, gerr);
            printf("    %s, %s: log-probs within %.1e, gradients %.1e (%g tokens)\n", arch ? "llama" : "gpt2", ctl_ctx_simd_name(ctx),
                   lerr, gerr, n_all);
            pos[5] = 3;
            CHECK(ctl_train_forward_packed(tp, &bp, pos) == CTL_ERR_RANGE, "bad positions refused");
            ctl_train_free(tp), ctl_train_free(ts);
            ctl_model_free(m);
            ctl_ctx_free(ctx);
        }
}
