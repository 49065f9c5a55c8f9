// Rewards (included by tests/test.c, which holds the harness): the answer extractor on a table
// of completions (GSM8K's own solutions, SmolLM2-135M-Instruct's greedy and sampled answers to
// GSM8K questions, and hand-written hard cases), each with the number a reader takes as its
// final answer; the format and length rewards.

typedef struct reward_case {
    const char *text;
    double answer;   // NAN: the text states no answer
} reward_case;

static const reward_case REWARD_CASES[] = {
    // GSM8K solutions (dev.jsonl; the answer is the dataset's "ans" field)
    {"Thus, starting with only 1 bacterial cell, after 4 hours, there will be 1*2*2*2*2*2*2*2*2*2*2*2*2= 4,096 bacterial cells\n#### 4,096", 4096},
    {"So each day they made 320*30=$<<320*30=9600>>9600\nThey did 2+1=<<2+1=3>>3 days\nSo they made 9600*3=$<<9600*3=28800>>28,800\n#### 28,800", 28800},
    {"That means it cost 15,000+7,500=$<<15000+7500=22500>>22,500\nThat means in total he spent 45,000+22,500=$67,500\n#### 67,500", 67500},
    {"They can fly 9,492 feet up because 84 x 113 = <<84*113=9492>>9,492\n#### 9,492", 9492},
    {"Red = 516 * (1/2) = <<516*(1/2)=258>>258\nBlack = 516 - (172 + 258) = 86\nThere are 86 black cars on the lot.\n#### 86", 86},
    {"Madeline's brother has $48/2 = $<<48/2=24>>24.\nTogether, they have $48 + $24 = $<<48+24=72>>72.\n#### 72", 72},
    {"Thus, blue flowers make up (4/10)*100=<<4/10*100=40>>40%.\n#### 40", 40},
    {"$9 / $27 * 100% = 33.333%, which rounds down to 33%\n#### 33", 33},
    {"Each shirt cost 20*.5=$<<20*.5=10>>10 with the sale\nSo he paid 10*6=$<<10*6=60>>60\n#### 60", 60},
    {"No pass thrown:80(.30)=24\nSacked:24/2=<<24/2=12>>12\n#### 12", 12},
    {"Sam weighs 130-25=<<130-25=105>>105 pounds.\n#### 105", 105},
    {"So, the camel is 336 / 12 = <<336/12=28>>28 feet tall.\n#### 28", 28},
    // hand-written: the forms models use
    {"The answer is 42.", 42},
    {"So the answer is $1,250.", 1250},
    {"Therefore, the final answer is: -7", -7},
    {"Answer: 3/4", 0.75},
    {"ANSWER: 18 dollars", 18},
    {"We get \\boxed{72}.", 72},
    {"The total is \\boxed{\\frac{5}{2}} hours.", 2.5},
    {"\\boxed{\\dfrac{3}{8}}", 0.375},
    {"so x = \\boxed{-12}", -12},
    {"The cost is \\boxed{\\$18.50}", 18.5},
    {"First 3 + 4 = 7, then 7 * 2 = 14. So she has 14 apples left.", 14},
    {"He pays 5 + 3 = 8 dollars, and 8 - 2 = 6.", 6},
    {"The temperature drops to -5 degrees.", -5},
    {"It grew by 12.5%.", 12.5},
    {"1,234,567 people live there.", 1234567},
    {"Items: 3, 4, and 5", 5},
    {"It costs $0.75 each", 0.75},
    {"It takes .5 hours", 0.5},
    {"<think>12 * 3 = 36, minus 6 is 30</think> The answer is 30.", 30},
    {"<think>Let me count: 2, 4, 6.</think>\n\\boxed{6}", 6},
    {"The answer is 10, not 12.", 10},
    {"Step 1: 20 - 4 = 16\nStep 2: 16 / 2 = 8\n#### 8\nI hope this helps! 99 problems solved.", 8},
    {"#### $1,000", 1000},
    {"#### -3", -3},
    {"The answer is seven.", NAN},
    {"I do not know.", NAN},
    {"", NAN},
    {"\\boxed{}", NAN},
    {"version2 of the file", NAN},
    {"She walked 3.5 miles, then 1.25 more: 4.75 miles in all.", 4.75},
    {"The ratio is 2/3.", 2.0 / 3.0},
    {"A total of 1,000,000.", 1000000},
    {"The answer is: $ 45", 45},
    {"After 2 weeks (14 days) he saved 70 dollars", 70},
    {"Therefore, Janet makes $18 every day at the farmers' market.", 18},
    {"x=5", 5},
};

// SmolLM2-135M-Instruct's answers to the first GSM8K dev questions; the answer is what each
// text ends up stating (often wrong for the question: the extractor is under test, not the model).
#include "fixtures/smollm2_completions.h"

static void test_reward_extract(void) {
    int n = 0, wrong = 0;
    for (int pass = 0; pass < 2; pass++) {
        const reward_case *cases = pass ? SMOLLM2_CASES : REWARD_CASES;
        int count = pass ? (int)(sizeof SMOLLM2_CASES / sizeof *SMOLLM2_CASES) : (int)(sizeof REWARD_CASES / sizeof *REWARD_CASES);
        for (int i = 0; i < count; i++, n++) {
            const char *s, *text = cases[i].text;
            size_t alen;
            double v = NAN;
            bool found = ctl_extract_answer(text, strlen(text), &s, &alen) && ctl_parse_number(s, alen, &v);
            bool ok = isnan(cases[i].answer) ? !found : found && fabs(v - cases[i].answer) <= 1e-9 * fmax(1.0, fabs(v));
            wrong += !ok;
            CHECK(ok, "case %d of %s: '%.60s...' gave %s%g, want %g", i, pass ? "SmolLM2" : "the table", text,
                  found ? "" : "no answer ", v, cases[i].answer);
            float r = ctl_reward_math(text, strlen(text), "#### 18");
            CHECK(r == (found && fabs(v - 18.0) < 1e-6 ? 1.0f : 0.0f), "case %d: math reward %g", i, r);
        }
    }
    CHECK(n >= 50, "only %d cases", n);
    printf("    %d completions, %d wrong\n", n, wrong);
    CHECK(isnan(ctl_reward_math("42", 2, "no number")), "a reference without a number is unscorable");
    CHECK(ctl_reward_math("so 1,000", 8, "1000") == 1.0f && ctl_reward_math("0.5", 3, "1/2") == 1.0f, "numeric equality");
    CHECK(ctl_reward_math("The answer is 42", 16, "Reasoning 6 * 7 = 42\n#### 42") == 1.0f, "a GSM8K answer as reference");

    static const struct { const char *text; float want; } formats[] = {
        {"<think>2 + 2 = 4</think> The answer is 4.", 1}, {"  <think>\nhmm\n</think>\n4", 1},
        {"<think>2 + 2 = 4</think>", 0},                  {"<think>2 + 2 = 4</think>   \n", 0},
        {"The answer is 4. <think>x</think> 4", 0},        {"<think>a<think>b</think> 4", 0},
        {"<think>unclosed 4", 0},                          {"", 0}};
    for (size_t i = 0; i < sizeof formats / sizeof *formats; i++)
        CHECK(ctl_reward_format(formats[i].text, strlen(formats[i].text)) == formats[i].want, "format case %d", (int)i);
    static const struct { const char *text; float want; } lines[] = {
        {"3 + 4 = 7.\n#### 7", 1}, {"So 1,000 in all.\n#### 1,234\n\n", 1}, {"  ####  -3.5  ", 1}, {"#### $18", 1},
        {"#### 7 apples", 0},      {"The answer is 7", 0},                  {"#### \n", 0},        {"#### 7\nmore text", 0},
        {"### 7", 0},              {"", 0}};
    for (size_t i = 0; i < sizeof lines / sizeof *lines; i++)
        CHECK(ctl_reward_answer_line(lines[i].text, strlen(lines[i].text)) == lines[i].want, "answer line case %d", (int)i);
    ctl_ctx *gctx = make_ctx(1, CTL_SIMD_AUTO);   // every GSM8K dev solution ends in such a line
    ctl_dataset *gds;
    int64_t solutions = 0, lined = 0;
    if (ctl_dataset_open(gctx, "examples/gsm8k/dev.jsonl", NULL, &gds) == CTL_OK) {
        for (int64_t i = 0; i < ctl_dataset_size(gds); i++, solutions++) {
            const char *t = ctl_dataset_get(gds, i)->completion.text;
            lined += ctl_reward_answer_line(t, strlen(t)) == 1.0f;
        }
        ctl_dataset_close(gds);
    }
    CHECK(solutions == 768 && lined == solutions, "answer line: %lld of %lld GSM8K dev solutions", (long long)lined, (long long)solutions);
    ctl_ctx_free(gctx);
    CHECK(ctl_reward_length(100, 100) == 0.0f && ctl_reward_length(150, 100) == -0.5f && ctl_reward_length(400, 100) == -1.0f &&
              ctl_reward_length(5, 0) == 0.0f, "length reward");
}

// pass@k against counting every k-subset of the n samples; the majority vote on stated answers;
// reward callbacks in one matrix.
static void test_eval_helpers(void) {
    double worst = 0.0;
    for (int n = 1; n <= 10; n++)
        for (int c = 0; c <= n; c++)
            for (int k = 1; k <= n; k++) {
                int64_t subsets = 0, hit = 0;
                for (int mask = 0; mask < 1 << n; mask++) {
                    if (__builtin_popcount((unsigned)mask) != k) continue;
                    subsets++, hit += (mask & ((1 << c) - 1)) != 0;   // samples 0..c-1 are the correct ones
                }
                worst = fmax(worst, fabs(ctl_pass_at_k(n, c, k) - (double)hit / (double)subsets));
            }
    CHECK(worst < 1e-12, "pass@k vs counting subsets: %g", worst);
    CHECK(isnan(ctl_pass_at_k(3, 1, 4)) && isnan(ctl_pass_at_k(3, 4, 1)), "pass@k refuses k > n and c > n");
    const char *votes[5] = {"so 12", "The answer is 7.", "I think 7", "#### 12", "#### 7.0"};
    double v;
    CHECK(ctl_majority_vote(votes, 5, &v) == 1 && v == 7.0, "majority vote: %g", v);
    const char *none[2] = {"no idea", "none"};
    CHECK(ctl_majority_vote(none, 2, &v) == -1 && isnan(v), "no answers: no vote");
    const char *tie[2] = {"4", "5"};
    CHECK(ctl_majority_vote(tie, 2, &v) == 0 && v == 4.0, "a tie goes to the earliest");

    ctl_example ex;
    memset(&ex, 0, sizeof ex);
    ex.answer = "42";
    int64_t budget = 4;
    ctl_reward_func fns[3] = {{"math", ctl_reward_fn_math, NULL, 1.0f, NULL}, {"format", ctl_reward_fn_format, NULL, 0.5f, NULL},
                              {"length", ctl_reward_fn_length, &budget, 0.1f, NULL}};
    ctl_reward_input in[2] = {{"q", "<think>6*7</think> 42", 21, 6, false, &ex, NULL, 0}, {"q", "41", 2, 2, false, NULL, NULL, 0}};
    float r[6], w[3];
    const char *names[3];
    ctl_rewards_score(fns, 3, in, 2, r, w, names);
    CHECK(r[0] == 1.0f && r[1] == 1.0f && r[2] == -0.5f && isnan(r[3]) && r[4] == 0.0f && r[5] == 0.0f && w[1] == 0.5f &&
          !strcmp(names[2], "length"), "reward matrix: %g %g %g / %g %g %g", r[0], r[1], r[2], r[3], r[4], r[5]);
}

// Rollouts: the rows hold the prompt, the sampled tokens (those ctl_generate draws with the same
// seed) and the stop token when there was one; weights mark exactly the completion.
static void test_rollout(void) {
    ctl_ctx *ctx = make_ctx(2, CTL_SIMD_AUTO);
    ctl_model_config cfg = tiny_config(CTL_ARCH_LLAMA);
    cfg.n_ctx = 24;
    ctl_model *m;
    ctl_model_create(ctx, &cfg, &m);
    ctl_model_init_random(m, 12);
    ctl_infer *inf;
    ctl_infer_desc id = {6, 24};
    ctl_infer_init(m, &id, &inf);
    int32_t p0[3] = {1, 2, 3}, p1[5] = {4, 5, 6, 7, 8}, stop = 5;
    const int32_t *prompts[2] = {p0, p1};
    int64_t lens[2] = {3, 5};
    ctl_sampler_desc sd;
    memset(&sd, 0, sizeof sd);
    sd.temperature = 1.0f, sd.seed = 77, sd.stop_tokens = &stop, sd.n_stop_tokens = 1;
    ctl_rollout r;
    CHECK(ctl_rollout_run(inf, NULL, prompts, lens, 2, 3, &sd, 8, 16, &r) == CTL_OK, "rollout: %s", ctl_last_error(ctx));
    // The same draws by hand.
    const int32_t *pp[6] = {p0, p0, p0, p1, p1, p1};
    int64_t pl[6] = {3, 3, 3, 5, 5, 5}, ol[6];
    int32_t out[6 * 8];
    ctl_generate(inf, 6, pp, pl, &sd, 8, out, ol, NULL, NULL);
    bool ok = r.n == 6;
    double tokens = 0.0;
    int truncated = 0;
    for (int i = 0; i < 6; i++) {
        int64_t np = pl[i], nc = ol[i], len = np + nc + (nc < 8);
        ok = ok && r.completion_len[i] == nc && r.truncated[i] == (nc == 8) && !memcmp(out + i * 8, r.completion + i * 8, (size_t)nc * 4);
        truncated += r.truncated[i];
        for (int64_t t = 0; t < 16; t++) {
            int32_t want = t < np ? pp[i][t] : t < np + nc ? out[i * 8 + t - np] : stop;   // then the stop token, then padding
            ok = ok && r.tokens[i * 16 + t] == want;
            ok = ok && r.weights[i * 16 + t] == (t + 1 >= np && t + 1 < len ? 1.0f : 0.0f);
            if (t + 1 < len) ok = ok && r.targets[i * 16 + t] == (t + 1 < np ? pp[i][t + 1] : t + 1 < np + nc ? out[i * 8 + t + 1 - np] : stop);
            tokens += r.weights[i * 16 + t];
        }
    }
    CHECK(ok && tokens == r.n_tokens, "rollout rows: prompt, completion, stop token; weights on the completion");
    printf("    6 completions, %d cut off at max_new, %.0f completion tokens\n", truncated, r.n_tokens);
    ctl_rollout_free(ctx, &r);
    // Several stop tokens, greedy: every token stops, so each completion is empty and its row ends with the token it
    // sampled (the argmax after its prompt, found here with ctl_infer_feed), not stop_tokens[0].
    float logits[2][23];
    int32_t argmax[2] = {0, 0}, stops[23];
    for (int p = 0; p < 2; p++) {
        ctl_infer_reset(inf, -1);
        ctl_infer_feed(inf, 0, prompts[p], lens[p], logits[p]);
        for (int v = 1; v < 23; v++)
            if (logits[p][v] > logits[p][argmax[p]]) argmax[p] = v;
    }
    int32_t first = 0;   // a stop token neither prompt samples
    while (first == argmax[0] || first == argmax[1]) first++;
    stops[0] = first;
    for (int v = 0, k = 1; v < 23; v++)
        if (v != first) stops[k++] = v;
    ctl_sampler_desc greedy = sd;
    greedy.temperature = 0.0f, greedy.stop_tokens = stops, greedy.n_stop_tokens = 23;
    CHECK(ctl_rollout_run(inf, NULL, prompts, lens, 2, 3, &greedy, 8, 16, &r) == CTL_OK, "rollout: %s", ctl_last_error(ctx));
    ok = true;
    for (int i = 0; i < 6; i++) {
        int64_t np = lens[i / 3];
        ok = ok && r.completion_len[i] == 0 && r.targets[i * 16 + np - 1] == argmax[i / 3] && r.weights[i * 16 + np - 1] == 1.0f &&
             r.weights[i * 16 + np] == 0.0f;
    }
    CHECK(ok, "a completion stopped by stop_tokens[k] ends its row with that token (argmax %d, %d; stop_tokens[0] %d)", argmax[0],
          argmax[1], first);
    ctl_rollout_free(ctx, &r);
    lens[1] = 12;
    CHECK(ctl_rollout_run(inf, NULL, prompts, lens, 2, 3, &sd, 8, 16, &r) == CTL_ERR_CAPACITY, "a prompt that leaves no room is refused");
    ctl_infer_free(inf);
    ctl_model_free(m);
    ctl_ctx_free(ctx);
}
