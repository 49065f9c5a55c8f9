// The loops section (included by tests/test.c, which holds the harness): ctl_batcher's rows
// against the same examples encoded and laid out by hand, ctl_train_batches against the step
// written out, ctl_rl against the command line's GRPO loop as it was written before ctl_rl
// existed, and bad input to all of them.

// ---- batches -----------------------------------------------------------------------------------

// Every kind of row from a small dataset, against ctl_example_tokens + ctl_batch_row (or
// ctl_batch_pack) in the batcher's documented order; the skip rule; a dataset where nothing fits
// fails within one pass; tell/seek continue exactly; ctl_train_batches equals its step by hand.
static void test_batcher(void) {
    ctl_ctx *ctx = make_ctx(2, CTL_SIMD_AUTO);
    ctl_gguf *g;
    if (ctl_gguf_open(ctx, VOCAB_DIR "ggml-vocab-qwen2.gguf", &g) != CTL_OK) {
        printf("    skipped: the Qwen2 vocabulary is missing (make models)\n");
        ctl_ctx_free(ctx);
        return;
    }
    ctl_tokenizer *tk;
    ctl_chat_template tmpl;
    CHECK(ctl_tokenizer_from_gguf(ctx, g, &tk) == CTL_OK && ctl_chat_template_from_gguf(ctx, g, &tmpl) == CTL_OK, "vocabulary");
    // Nine examples, one far too long for rows of 24 and one whose completion starts past the cut.
    char text[8192] = "", line[2048];
    for (int i = 0; i < 9; i++) {
        const char *long_prompt = "one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
                                  "seventeen eighteen nineteen twenty twenty-one twenty-two twenty-three twenty-four";
        snprintf(line, sizeof line, "{\"prompt\": \"%s %d?\", \"completion\": \" %d %s\", \"chosen\": \" %d\", \"rejected\": \" %d!\"}\n",
                 i == 4 ? long_prompt : "What is", i, i * 7, i == 6 ? long_prompt : "", i, i + 1);
        strcat(text, line);
    }
    ctl_dataset *ds, *pref;
    ctl_dataset_desc dd = {CTL_DATA_PROMPT_COMPLETION, false}, dp = {CTL_DATA_PREFERENCE, false};
    CHECK(ctl_dataset_open_memory(ctx, text, strlen(text), &dd, &ds) == CTL_OK && ctl_dataset_open_memory(ctx, text, strlen(text), &dp, &pref) == CTL_OK,
          "datasets: %s", ctl_last_error(ctx));
    ctl_encoding enc = {tk, &tmpl, false, NULL};
    enum { T = 24, B = 3 };
    int32_t ids[512], tok[2 * B * T], tgt[2 * B * T];
    float mask[512], w[2 * B * T];
    int64_t order[9], n;
    // SFT rows, two micro-batches a call: the shuffled order, the example that does not fit skipped.
    ctl_batcher_desc bd;
    memset(&bd, 0, sizeof bd);
    bd.kind = CTL_ROWS_SFT, bd.batch = B, bd.accum = 2, bd.seq_len = T, bd.encoding = enc;
    for (bd.seed = 1;; bd.seed++) {   // a seed whose first pass meets the example that cannot fit among the first rows
        ctl_dataset_shuffle(ds, bd.seed * 1000003u, order);
        int64_t i = 0;
        while (order[i] != 4) i++;
        if (i < 2 * B) break;
    }
    ctl_batcher *b;
    CHECK(ctl_batcher_init(ds, &bd, &b) == CTL_OK, "batcher: %s", ctl_last_error(ctx));
    ctl_rows rows;
    CHECK(ctl_batcher_next(b, &rows) == CTL_OK && rows.batch.B == 2 * B && rows.rows == B, "next: %s", ctl_last_error(ctx));
    bool same = true;
    int64_t at = 0, skipped = 0;
    double tokens = 0.0;
    for (int64_t r = 0; r < 2 * B; r++) {   // the rows by hand: encode, cut to T + 1, skip what has no completion left
        for (;; at++) {
            const ctl_example *e = ctl_dataset_get(ds, order[at % 9]);
            CHECK(ctl_example_tokens(e, &e->completion, &enc, ids, mask, 512, &n) == CTL_OK, "encode");
            double kept = 0.0;
            for (int64_t i = 1; i < CTL__MIN(n, T + 1); i++) kept += mask[i];
            if (kept > 0.0) break;
            skipped++;
        }
        at++;
        tokens += (double)ctl_batch_row(tok, tgt, w, T, r, ids, mask, CTL__MIN(n, T + 1), ctl_tokenizer_eos(tk));
    }
    same = !memcmp(tok, rows.batch.tokens, sizeof tok / 2) && !memcmp(tgt, rows.batch.targets, sizeof tgt / 2) &&
           !memcmp(w, rows.batch.weights, sizeof w / 2) && tokens == rows.tokens;
    int64_t sft_skipped = skipped;
    CHECK(same && skipped == ctl_batcher_skipped(b) && skipped == 1, "SFT rows differ from the examples laid out by hand (skipped %lld, %lld)",
          (long long)skipped, (long long)ctl_batcher_skipped(b));
    // tell / seek: the same next rows from where it was.
    int64_t ep, pos;
    ctl_batcher_tell(b, &ep, &pos);
    ctl_batcher_next(b, &rows);
    memcpy(tok, rows.batch.tokens, sizeof tok / 2);
    CHECK(ctl_batcher_seek(b, ep, pos) == CTL_OK && ctl_batcher_next(b, &rows) == CTL_OK && !memcmp(tok, rows.batch.tokens, sizeof tok / 2),
          "seek does not give the same rows again");
    CHECK(ctl_batcher_seek(b, 0, 10) == CTL_ERR_RANGE, "a position past the data");
    ctl_batcher_free(b);
    // Preference rows: chosen in rows 0..B-1, rejected in B..2B-1.
    bd.kind = CTL_ROWS_PREFERENCE, bd.accum = 1;
    CHECK(ctl_batcher_init(ds, &bd, &b) == CTL_ERR_INVALID, "preference rows need preference data");
    CHECK(ctl_batcher_init(pref, &bd, &b) == CTL_OK && ctl_batcher_next(b, &rows) == CTL_OK && rows.batch.B == 2 * B, "preference: %s",
          ctl_last_error(ctx));
    same = true, at = 0;
    for (int64_t r = 0; r < B; r++, at++) {   // an example whose chosen or rejected row keeps no completion token is skipped
        for (;; at++) {
            const ctl_example *e = ctl_dataset_get(pref, order[at]);
            int64_t n2;
            double kept = 0.0, kept2 = 0.0;
            ctl_example_tokens(e, &e->chosen, &enc, ids, mask, 512, &n);
            for (int64_t i = 1; i < CTL__MIN(n, T + 1); i++) kept += mask[i];
            ctl_batch_row(tok, tgt, w, T, r, ids, mask, CTL__MIN(n, T + 1), ctl_tokenizer_eos(tk));
            ctl_example_tokens(e, &e->rejected, &enc, ids, mask, 512, &n2);
            for (int64_t i = 1; i < CTL__MIN(n2, T + 1); i++) kept2 += mask[i];
            ctl_batch_row(tok, tgt, w, T, B + r, ids, mask, CTL__MIN(n2, T + 1), ctl_tokenizer_eos(tk));
            if (kept > 0.0 && kept2 > 0.0) break;
        }
    }
    CHECK(same && !memcmp(tok, rows.batch.tokens, (size_t)(2 * B * T) * 4) && !memcmp(w, rows.batch.weights, (size_t)(2 * B * T) * 4),
          "preference rows differ from chosen and rejected laid out by hand");
    ctl_batcher_free(b);
    // Prompts: ready for generation, within seq_len - max_new.
    bd.kind = CTL_ROWS_PROMPTS, bd.max_new = 8, bd.batch = 4;
    CHECK(ctl_batcher_init(ds, &bd, &b) == CTL_OK && ctl_batcher_next(b, &rows) == CTL_OK && rows.n_prompts == 4, "prompts: %s", ctl_last_error(ctx));
    same = true;
    for (int64_t p = 0; p < rows.n_prompts; p++) {
        CHECK(ctl_example_tokens(rows.prompts[p].example, NULL, &enc, ids, NULL, 512, &n) == CTL_OK, "prompt encode");
        same = same && n == rows.prompts[p].n && n <= T - 8 && !memcmp(ids, rows.prompts[p].tokens, (size_t)n * 4);
    }
    CHECK(same, "prompts differ from their examples encoded for generation");
    ctl_batcher_free(b);
    // An example that cannot be encoded: the batcher's message says where, around the encoder's.
    const char *conv = "{\"messages\": [{\"role\": \"user\", \"content\": \"Hi\"}, {\"role\": \"assistant\", \"content\": \"Yo\"}]}\n";
    ctl_dataset *cds;
    ctl_batcher_desc cbd = bd;
    cbd.kind = CTL_ROWS_SFT, cbd.batch = 1, cbd.accum = 1, cbd.encoding.chat = NULL;   // a conversation without a template
    CHECK(ctl_dataset_open_memory(ctx, conv, strlen(conv), NULL, &cds) == CTL_OK && ctl_batcher_init(cds, &cbd, &b) == CTL_OK,
          "conversation: %s", ctl_last_error(ctx));
    CHECK(ctl_batcher_next(b, &rows) == CTL_ERR_INVALID &&
              !strcmp(ctl_last_error(ctx), "batcher: line 1: example on line 1: a conversation needs a chat template"),
          "a failed encoding, as told: '%s'", ctl_last_error(ctx));
    ctl_batcher_free(b);
    cbd.accum = (int64_t)1 << 20, cbd.batch = (int64_t)1 << 20, cbd.seq_len = (int64_t)1 << 24;   // each within its bound
    CHECK(ctl_batcher_init(cds, &cbd, &b) == CTL_ERR_INVALID && strstr(ctl_last_error(ctx), "2^40"), "a step of 2^64 tokens: %s",
          ctl_last_error(ctx));
    ctl_dataset_close(cds);
    // Packing: the examples in order, each where ctl_batch_pack puts it.
    bd.kind = CTL_ROWS_SFT, bd.batch = 2, bd.packing = true, bd.seq_len = 48;
    CHECK(ctl_batcher_init(ds, &bd, &b) == CTL_OK && ctl_batcher_next(b, &rows) == CTL_OK && rows.pos, "packing: %s", ctl_last_error(ctx));
    int32_t ptok[2 * 48], ptgt[2 * 48], ppos[2 * 48];
    float pw[2 * 48];
    at = 0, skipped = 0, same = true;
    for (int64_t r = 0; r < 2 && same; r++) {
        int64_t off = 0;
        for (;;) {
            const ctl_example *e = ctl_dataset_get(ds, order[at % 9]);
            ctl_example_tokens(e, &e->completion, &enc, ids, mask, 512, &n);
            n = CTL__MIN(n, 49);
            double kept = 0.0;
            for (int64_t i = 1; i < n; i++) kept += mask[i];
            if (kept <= 0.0) { at++; continue; }
            if (!ctl_batch_pack(ptok, ptgt, pw, ppos, 48, r, &off, ids, mask, n, ctl_tokenizer_eos(tk))) break;
            at++;
        }
    }
    same = !memcmp(ptok, rows.batch.tokens, sizeof ptok) && !memcmp(ppos, rows.pos, sizeof ppos) && !memcmp(pw, rows.batch.weights, sizeof pw);
    CHECK(same, "packed rows differ from ctl_batch_pack by hand");
    ctl_batcher_free(b);
    // Nothing fits rows of 4 tokens with drop_long: a clear failure after one pass, not a loop.
    bd.packing = false, bd.seq_len = 4, bd.drop_long = true;
    CHECK(ctl_batcher_init(ds, &bd, &b) == CTL_OK, "batcher");
    CHECK(ctl_batcher_next(b, &rows) == CTL_ERR_INVALID && strstr(ctl_last_error(ctx), "no example of the 9 fits"), "nothing fits: %s",
          ctl_last_error(ctx));
    ctl_batcher_free(b);
    bd.kind = CTL_ROWS_PROMPTS, bd.seq_len = 6, bd.max_new = 4, bd.drop_long = false;
    CHECK(ctl_batcher_init(ds, &bd, &b) == CTL_OK && ctl_batcher_next(b, &rows) == CTL_ERR_INVALID && strstr(ctl_last_error(ctx), "as a prompt"),
          "no prompt fits: %s", ctl_last_error(ctx));
    ctl_batcher_free(b);
    // ctl_train_batches: the step written out gives the same loss and weights, bit for bit.
    ctl_model_config cfg = tiny_config(CTL_ARCH_LLAMA);
    cfg.vocab_size = ctl_tokenizer_vocab(tk), cfg.n_ctx = 32;
    ctl_model *m[2];
    ctl_train *t[2];
    ctl_train_desc td;
    memset(&td, 0, sizeof td);
    td.batch = B, td.seq_len = T, td.optim.lr = 1e-2f, td.optim.clip = 1.0f;
    for (int k = 0; k < 2; k++) {
        ctl_model_create(ctx, &cfg, &m[k]);
        ctl_model_init_random(m[k], 3);
        CHECK(ctl_train_init(m[k], &td, &t[k]) == CTL_OK, "trainer: %s", ctl_last_error(ctx));
    }
    bd.kind = CTL_ROWS_SFT, bd.batch = B, bd.accum = 2, bd.seq_len = T;
    ctl_batcher *b2 = NULL;
    CHECK(ctl_batcher_init(ds, &bd, &b) == CTL_OK, "batcher");
    CHECK(ctl_batcher_init(ds, &bd, &b2) == CTL_OK, "second batcher");
    ctl_step_out so;
    CHECK(ctl_train_batches(t[0], b, NULL, &so) == CTL_OK, "train_batches: %s", ctl_last_error(ctx));
    if (ctl_batcher_next(b2, &rows) != CTL_OK) rows.batch.tokens = NULL;
    CHECK(rows.batch.tokens != NULL, "rows: %s", ctl_last_error(ctx));
    double loss = 0.0;
    for (int mb = 0; mb < 2 && rows.batch.tokens; mb++) {
        ctl_batch bt = {B, T, rows.batch.tokens + mb * B * T, rows.batch.targets + mb * B * T, rows.batch.weights + mb * B * T};
        ctl_objective_out o;
        ctl_sft_desc sd = {CTL_SFT_TOKENS, 2, rows.tokens};
        ctl_train_forward(t[1], &bt);
        ctl_logprobs in = {B, T, ctl_train_logprobs(t[1]), bt.weights, NULL, NULL, NULL};
        o.dlogp = ctl_train_dlogprobs(t[1]);
        ctl_objective_sft(ctx, &in, &sd, &o);
        ctl_train_backward(t[1]);
        loss += o.loss;
    }
    ctl_step_stats ss;
    ctl_train_step(t[1], &ss);
    same = loss == so.loss && ss.grad_norm == so.stats.grad_norm;
    for (int64_t i = 0; i < ctl_model_param_count(m[0]); i++)
        same = same && same_bits((float *)ctl_model_param(m[0], i)->value.data, (float *)ctl_model_param(m[1], i)->value.data,
                                 ctl_tensor_numel(&ctl_model_param(m[0], i)->value));
    CHECK(same, "train_batches: loss %.9g vs %.9g by hand, or weights differ", so.loss, loss);
    printf("    SFT rows (%lld skipped), tell/seek, prompts, packed rows: as laid out by hand; an SFT step of 2 micro-batches: "
           "loss and weights bit for bit; nothing fitting fails after one pass\n", (long long)sft_skipped);
    ctl_batcher_free(b), ctl_batcher_free(b2);
    for (int k = 0; k < 2; k++) ctl_train_free(t[k]), ctl_model_free(m[k]);
    ctl_dataset_close(ds), ctl_dataset_close(pref);
    ctl_tokenizer_free(tk);
    ctl_gguf_close(g);
    ctl_ctx_free(ctx);
}

// ---- online RL ---------------------------------------------------------------------------------

// The toy reward: the fraction of the completion's tokens that are 7.
static float reward_sevens(const ctl_reward_input *in, void *user) {
    (void)user;
    int64_t k = 0;
    for (int64_t i = 0; i < in->n_tokens; i++) k += in->tokens[i] == 7;
    return in->n_tokens ? (float)k / (float)in->n_tokens : 0.0f;
}

enum { RL_P = 3, RL_G = 4, RL_NEW = 9, RL_T = 20, RL_B = 4, RL_MU = 2 };

// The command line's GRPO loop for one generation as it was written before ctl_rl (tools/cotlab.c,
// cmd_grpo): rollouts, rewards, advantages, then mu optimiser steps over micro-batches of B rows
// (the reference forward before each policy forward, the first iteration's log-probs kept as
// the old ones), on rows of Tr positions (the command line used the whole T); with cut, in
// micro-batches laid out as ctl_rl lays them out (ctl__rl_order).
static void old_grpo_loop(ctl_ctx *ctx, ctl_train *t, ctl_infer *inf, const int32_t *const *prompts, const int64_t *lens,
                          const ctl_sampler_desc *sd, const ctl_grpo_desc *g0, int64_t Tr, bool cut, double *losses, float *norms) {
    int64_t R = RL_P * RL_G, GA = R / RL_B;
    ctl_rollout ro;
    CHECK(ctl_rollout_run(inf, NULL, prompts, lens, RL_P, RL_G, sd, RL_NEW, RL_T, &ro) == CTL_OK, "rollout: %s", ctl_last_error(ctx));
    float rew[RL_P * RL_G], adv[RL_P * RL_G], w[RL_P * RL_G * RL_T], old[RL_P * RL_G * RL_T], ref[RL_P * RL_G * RL_T];
    int32_t tok[RL_P * RL_G * RL_T], tgt[RL_P * RL_G * RL_T];
    for (int64_t i = 0; i < R; i++) {
        ctl_reward_input in;
        memset(&in, 0, sizeof in);
        in.tokens = ro.completion + i * RL_NEW, in.n_tokens = ro.completion_len[i];
        rew[i] = reward_sevens(&in, NULL);
        memcpy(tok + i * Tr, ro.tokens + i * RL_T, (size_t)Tr * 4), memcpy(tgt + i * Tr, ro.targets + i * RL_T, (size_t)Tr * 4);
        memcpy(w + i * Tr, ro.weights + i * RL_T, (size_t)Tr * 4);
    }
    ctl_advantage_desc ad;
    memset(&ad, 0, sizeof ad);
    ad.group_size = RL_G, ad.n_funcs = 1;
    ctl_objective_out am, obj;
    CHECK(ctl_advantages(ctx, &ad, R, rew, adv, &am) == CTL_OK, "advantages");
    double gen_tokens = 0.0;
    for (int64_t i = 0; i < R * Tr; i++) gen_tokens += w[i];
    ctl_grpo_desc gd = *g0;
    gd.accum = GA, gd.steps_per_generation = GA, gd.max_completion_length = RL_NEW, gd.gen_tokens = gen_tokens;
    // cut: the micro-batches as ctl_rl lays them out: rows by used length (up to the last weighted
    // target, at least 2), longest first, ties by index; each micro-batch cut to its longest row.
    int64_t used[RL_P * RL_G], order[RL_P * RL_G];
    for (int64_t i = 0; i < R; i++) {
        used[i] = Tr;
        while (cut && used[i] > 2 && w[i * Tr + used[i] - 1] == 0.0f) used[i]--;
        order[i] = i;
    }
    for (int64_t i = 0; i < R && cut; i++)   // a stable selection of the longest remaining
        for (int64_t j = i + 1; j < R; j++)
            if (used[order[j]] > used[order[i]]) {
                int64_t x = order[j];
                memmove(order + i + 1, order + i, (size_t)(j - i) * sizeof(int64_t)), order[i] = x;
            }
    for (int64_t it = 0; it < RL_MU; it++) {
        double loss = 0.0;
        for (int64_t mb = 0; mb < GA; mb++) {
            int64_t base = mb * RL_B * Tr, Tm = 2;
            int32_t mtok[RL_B * RL_T], mtgt[RL_B * RL_T];
            float mw[RL_B * RL_T], madv[RL_B];
            for (int64_t r = 0; r < RL_B; r++) Tm = used[order[mb * RL_B + r]] > Tm ? used[order[mb * RL_B + r]] : Tm;
            for (int64_t r = 0; r < RL_B; r++) {
                int64_t i = order[mb * RL_B + r];
                memcpy(mtok + r * Tm, tok + i * Tr, (size_t)Tm * 4), memcpy(mtgt + r * Tm, tgt + i * Tr, (size_t)Tm * 4);
                memcpy(mw + r * Tm, w + i * Tr, (size_t)Tm * 4), madv[r] = adv[i];
            }
            ctl_batch bt = {RL_B, Tm, mtok, mtgt, mw};
            ctl_logprobs in = {RL_B, Tm, NULL, mw, it ? old + base : NULL, NULL, NULL};
            if (gd.beta > 0) {
                CHECK(ctl_train_reference(t, &bt, ref + base) == CTL_OK, "reference");
                in.ref_logp = ref + base;
            }
            CHECK(ctl_train_forward(t, &bt) == CTL_OK, "forward: %s", ctl_last_error(ctx));
            if (it == 0) memcpy(old + base, ctl_train_logprobs(t), (size_t)(RL_B * Tm) * 4);
            in.logp = ctl_train_logprobs(t), in.entropy = ctl_train_entropy(t), obj.dlogp = ctl_train_dlogprobs(t);
            ctl_grpo_desc g = gd;
            g.advantages = madv;
            CHECK(ctl_objective_grpo(ctx, &in, &g, &obj) == CTL_OK && ctl_train_backward(t) == CTL_OK, "objective: %s", ctl_last_error(ctx));
            loss += obj.loss;
        }
        ctl_step_stats ss;
        CHECK(ctl_train_step(t, &ss) == CTL_OK, "step");
        losses[it] = loss, norms[it] = ss.grad_norm;
    }
    ctl_rollout_free(ctx, &ro);
}

// Three equal tiny llamas with LoRA: one steps through ctl_rl (GRPO, two iterations on each
// generation, k3 KL to the adapters-off reference, micro-batches of 4 of 12 rows), one through
// the old loop on the rows ctl_rl uses (cut to the longest sequence), one through the old loop
// on whole rows of T, as the command line ran it. Two generations each.
static void test_rl_vs_old_loop(void) {
    ctl_ctx *ctx = make_ctx(2, CTL_SIMD_AUTO);
    ctl_model_config cfg = tiny_config(CTL_ARCH_LLAMA);
    cfg.n_ctx = 32;
    ctl_model *m[3];
    ctl_train *t[3];
    ctl_train_desc td;
    memset(&td, 0, sizeof td);
    td.batch = RL_B, td.seq_len = RL_T, td.optim.lr = 3e-2f, td.optim.clip = 1.0f, td.entropy = true;
    ctl_lora_desc ld;
    memset(&ld, 0, sizeof ld);
    ld.rank = 4, ld.alpha = 8.0f, ld.init = CTL_LORA_INIT_GAUSSIAN, ld.seed = 5;
    for (int k = 0; k < 3; k++) {
        ctl_model_create(ctx, &cfg, &m[k]);
        ctl_model_init_random(m[k], 11);
        scale_weights(m[k], 4.0f);
        CHECK(ctl_lora_attach(m[k], &ld) == CTL_OK && ctl_train_init(m[k], &td, &t[k]) == CTL_OK, "setup: %s", ctl_last_error(ctx));
    }
    int32_t p0[4] = {1, 2, 3, 4}, p1[6] = {5, 6, 7, 8, 9, 10}, p2[3] = {11, 12, 13};
    const int32_t *pp[RL_P] = {p0, p1, p2};
    int64_t lens[RL_P] = {4, 6, 3};
    ctl_rl_prompt rp[RL_P] = {{p0, 4, NULL}, {p1, 6, NULL}, {p2, 3, NULL}};
    int32_t stop = 5;
    ctl_reward_func rf = {"sevens", reward_sevens, NULL, 1.0f, NULL};
    ctl_rl_desc rd;
    memset(&rd, 0, sizeof rd);
    rd.method = CTL_RL_GRPO, rd.prompts = RL_P, rd.group = RL_G, rd.max_new = RL_NEW, rd.batch = RL_B, rd.iterations = RL_MU;
    rd.sampler.temperature = 1.0f, rd.sampler.stop_tokens = &stop, rd.sampler.n_stop_tokens = 1;
    rd.rewards = &rf, rd.n_rewards = 1, rd.grpo.loss = CTL_GRPO_DAPO, rd.grpo.beta = 0.05f, rd.grpo.epsilon = 0.1f;
    ctl_rl *rl;
    CHECK(ctl_rl_init(t[0], &rd, &rl) == CTL_OK, "rl_init: %s", ctl_last_error(ctx));
    ctl_infer *inf[2];
    ctl_infer_desc id = {RL_P * RL_G, RL_T + 1};
    CHECK(ctl_infer_init(m[1], &id, &inf[0]) == CTL_OK && ctl_infer_init(m[2], &id, &inf[1]) == CTL_OK, "infer");
    bool same_cut = true;
    double loss_apart = 0.0;   // against whole rows: the same sums in other micro-batches, so equal up to rounding
    double weights_apart = 0.0;
    for (int gen = 0; gen < 2; gen++) {
        ctl_sampler_desc sd = rd.sampler;
        sd.seed = 100 + (uint64_t)gen;
        double lnew[RL_MU], lcut[RL_MU], lfull[RL_MU];
        float nnew[RL_MU], ncut[RL_MU], nfull[RL_MU];
        CHECK(ctl_rl_generate(rl, rp, RL_P, sd.seed, NULL) == CTL_OK, "rl_generate: %s", ctl_last_error(ctx));
        for (int it = 0; it < RL_MU; it++) {
            ctl_step_out so;
            CHECK(ctl_rl_update(rl, &so) == CTL_OK, "rl_update: %s", ctl_last_error(ctx));
            lnew[it] = so.loss, nnew[it] = so.stats.grad_norm;
        }
        int64_t Tu = rl->Tu;
        old_grpo_loop(ctx, t[1], inf[0], pp, lens, &sd, &rd.grpo, Tu, true, lcut, ncut);
        old_grpo_loop(ctx, t[2], inf[1], pp, lens, &sd, &rd.grpo, RL_T, false, lfull, nfull);
        for (int it = 0; it < RL_MU; it++)
            same_cut = same_cut && lnew[it] == lcut[it] && nnew[it] == ncut[it], loss_apart = fmax(loss_apart, fabs(lnew[it] - lfull[it]) / fmax(1.0, fabs(lfull[it])));
        CHECK(Tu < RL_T, "the rows were not cut (Tu %lld)", (long long)Tu);
    }
    for (int64_t i = 0; i < ctl_model_param_count(m[0]); i++) {
        const ctl_param *a = ctl_model_param(m[0], i);
        int64_t n = ctl_tensor_numel(&a->value);
        if (!a->trainable) continue;
        same_cut = same_cut && same_bits((float *)a->value.data, (float *)ctl_model_param(m[1], i)->value.data, n);
        for (int64_t j = 0; j < n; j++)
            weights_apart = fmax(weights_apart, fabs(((float *)a->value.data)[j] - ((float *)ctl_model_param(m[2], i)->value.data)[j]));
    }
    CHECK(same_cut, "ctl_rl differs from the old loop on the same rows (losses, gradient norms or weights)");
    CHECK(loss_apart < 1e-6 && weights_apart < 1e-5, "against whole rows: losses %g, weights %g apart", loss_apart, weights_apart);
    printf("    2 generations x 2 GRPO iterations: losses, gradient norms and adapter weights equal the old loop's bit for bit on the "
           "same micro-batches; on whole rows of T as the command line ran it, losses within %.1e and weights within %.1e\n", loss_apart,
           weights_apart);
    ctl_rl_free(rl);
    for (int k = 0; k < 3; k++) {
        if (k < 2) ctl_infer_free(inf[k]);
        ctl_train_free(t[k]), ctl_model_free(m[k]);
    }
    ctl_ctx_free(ctx);
}

static float reward_nan(const ctl_reward_input *in, void *user) { return (void)in, (void)user, NAN; }
static float reward_one(const ctl_reward_input *in, void *user) { return (void)in, (void)user, 1.0f; }
static float reward_inf_row5(const ctl_reward_input *in, void *user) {
    (void)user;
    return in->prompt_index == 1 && in->tokens[0] != 9999 ? INFINITY : 0.0f;
}
static ctl_status reward_batch_fails(ctl_ctx *ctx, const ctl_reward_input *in, int64_t n, float *r, int64_t stride, void *user) {
    (void)in, (void)n, (void)r, (void)stride, (void)user;
    return ctl_fail(ctx, CTL_ERR_IO, "the grader crashed");
}

// A user's objective of the GRPO family's shape: checks what it is handed, then does GRPO.
typedef struct seen_args {
    int calls;
    bool rewards_ok;
} seen_args;

static ctl_status objective_checks(ctl_ctx *ctx, const ctl_logprobs *in, const ctl_grpo_desc *d, ctl_objective_out *out) {
    seen_args *s = (seen_args *)d->user;
    s->calls++;
    for (int64_t b = 0; b < in->B; b++) s->rewards_ok = s->rewards_ok && d->rewards && d->advantages && isfinite(d->rewards[b]);
    return ctl_objective_grpo(ctx, in, d, out);
}

// Bad input to ctl_rl: each case fails with a status and a message, or runs with the defined
// outcome; none hangs.
static void test_rl_bad_input(void) {
    ctl_ctx *ctx = make_ctx(2, CTL_SIMD_AUTO);
    ctl_model_config cfg = tiny_config(CTL_ARCH_LLAMA);
    cfg.n_ctx = 32;
    ctl_model *m;
    ctl_train *t = NULL;
    ctl_model_create(ctx, &cfg, &m);
    ctl_model_init_random(m, 2);
    ctl_train_desc td;
    memset(&td, 0, sizeof td);
    td.batch = 8, td.seq_len = 16;
    ctl_lora_desc ld;
    memset(&ld, 0, sizeof ld);
    ld.rank = 2, ld.alpha = 2.0f;
    if (ctl_lora_attach(m, &ld) != CTL_OK || ctl_train_init(m, &td, &t) != CTL_OK) {
        CHECK(0, "setup: %s", ctl_last_error(ctx));
        ctl_model_free(m), ctl_ctx_free(ctx);
        return;
    }
    int32_t p[12] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12};
    ctl_rl_prompt rp[2] = {{p, 3, NULL}, {p + 3, 4, NULL}};
    ctl_reward_func rf = {"nan", reward_nan, NULL, 1.0f, NULL};
    ctl_rl_desc rd;
    memset(&rd, 0, sizeof rd);
    rd.method = CTL_RL_GRPO, rd.prompts = 2, rd.group = 4, rd.max_new = 6, rd.rewards = &rf, rd.n_rewards = 1;
    rd.sampler.temperature = 1.0f;
    ctl_rl *rl;
    ctl_step_out so;
    ctl_objective_out gm;
    CHECK(ctl_rl_init(t, &rd, &rl) == CTL_OK, "rl_init: %s", ctl_last_error(ctx));
    // A prompt that leaves no room for max_new tokens in the trainer's rows.
    ctl_rl_prompt longp[2] = {{p, 3, NULL}, {p, 12, NULL}};
    CHECK(ctl_rl_generate(rl, longp, 2, 1, NULL) == CTL_ERR_CAPACITY && strstr(ctl_last_error(ctx), "prompt 1 (12 tokens)"), "a long prompt: %s",
          ctl_last_error(ctx));
    CHECK(ctl_rl_update(rl, &so) == CTL_ERR_INVALID, "an update without a generation");
    // Every reward NaN: no row scored, advantages 0, a step of zero loss and gradient.
    CHECK(ctl_rl_step(rl, rp, 2, 1, &so) == CTL_OK && so.loss == 0.0 && so.stats.grad_norm == 0.0, "all unscored: %s (loss %g)",
          ctl_last_error(ctx), so.loss);
    ctl_rl_free(rl);
    // Every group equal: all groups zero-std, zero loss.
    rf.fn = reward_one;
    CHECK(ctl_rl_init(t, &rd, &rl) == CTL_OK && ctl_rl_generate(rl, rp, 2, 2, &gm) == CTL_OK && ctl_metric_get(&gm, "frac_reward_zero_std") == 1.0 &&
          ctl_rl_update(rl, &so) == CTL_OK && so.loss == 0.0, "equal rewards: %s", ctl_last_error(ctx));
    ctl_rl_free(rl);
    // An infinite reward, and a batch reward function that fails: the step fails, saying so.
    rf.fn = reward_inf_row5;
    CHECK(ctl_rl_init(t, &rd, &rl) == CTL_OK && ctl_rl_step(rl, rp, 2, 3, &so) != CTL_OK && strstr(ctl_last_error(ctx), "inf"),
          "an infinite reward: %s", ctl_last_error(ctx));
    ctl_rl_free(rl);
    rf.fn = NULL, rf.batch = reward_batch_fails;
    CHECK(ctl_rl_init(t, &rd, &rl) == CTL_OK && ctl_rl_step(rl, rp, 2, 3, &so) == CTL_ERR_IO && strstr(ctl_last_error(ctx), "the grader crashed"),
          "a failing reward function: %s", ctl_last_error(ctx));
    ctl_rl_free(rl);
    // A user's objective receives the micro-batch's advantages and summed rewards.
    seen_args seen = {0, true};
    rf.batch = NULL, rf.fn = reward_sevens;
    rd.objective = objective_checks, rd.grpo.user = &seen, rd.batch = 4;
    CHECK(ctl_rl_init(t, &rd, &rl) == CTL_OK && ctl_rl_step(rl, rp, 2, 4, &so) == CTL_OK && seen.calls == 2 && seen.rewards_ok,
          "a user's objective: %s (%d calls)", ctl_last_error(ctx), seen.calls);
    ctl_rl_free(rl);
    // Online DPO without a pair, and RFT without a correct completion: no step, said so.
    rd.objective = NULL, rd.batch = 0, rd.method = CTL_RL_DPO, rf.fn = reward_one;
    int64_t step0 = 0;
    CHECK(ctl_rl_init(t, &rd, &rl) == CTL_OK && ctl_rl_step(rl, rp, 2, 5, &so) == CTL_OK && so.skipped, "DPO without pairs: %s",
          ctl_last_error(ctx));
    ctl_rl_free(rl);
    rd.method = CTL_RL_RFT, rf.fn = reward_nan;
    CHECK(ctl_rl_init(t, &rd, &rl) == CTL_OK && ctl_rl_step(rl, rp, 2, 6, &so) == CTL_OK && so.skipped && so.stats.step == step0,
          "RFT without correct completions: %s", ctl_last_error(ctx));
    ctl_rl_free(rl);
    // Descriptions that cannot work.
    rd.method = CTL_RL_GRPO, rd.group = 1;
    CHECK(ctl_rl_init(t, &rd, &rl) == CTL_ERR_INVALID && strstr(ctl_last_error(ctx), "group must be at least 2"), "GRPO with a group of 1");
    rd.group = 4, rd.max_new = 16;
    CHECK(ctl_rl_init(t, &rd, &rl) == CTL_ERR_INVALID, "max_new of the whole row");
    rd.max_new = 6, rd.prompts = 3, rd.batch = 5;
    CHECK(ctl_rl_init(t, &rd, &rl) == CTL_ERR_INVALID, "rows not a multiple of the micro-batch");
    printf("    long prompts, updates without rollouts, NaN, equal and infinite rewards, a failing reward function, DPO without pairs, "
           "RFT without correct answers, impossible descriptions: each a status or its defined outcome\n");
    ctl_train_free(t);
    ctl_model_free(m);
    ctl_ctx_free(ctx);
}
