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
    CHECK(ctl_reward_length(100, 100) == 0.0f && ctl_reward_length(150, 100) == -0.5f && ctl_reward_length(400, 100) == -1.0f &&
              ctl_reward_length(5, 0) == 0.0f, "length reward");
}
