// Modular chains: the demo's task, generated in C. A problem is x0 op1 a1 op2 a2 ... opK aK,
// evaluated left to right mod 10, with +, - and x (the x operand from {1, 3, 7, 9}), so every
// step is a bijection of the running value and guessing the answer scores exactly 10%. K is
// the difficulty. Sequences (token ids below):
//   prompt      x0 op1 a1 ... opK aK =
//   direct      # ans <eos>
//   full CoT    > v1 v2 ... v(K-1) # ans <eos>          every running value
//   coarse CoT  > v2 v4 ... # ans <eos>                 every second running value
// An imperfect teacher writes full chains with one systematic slip: for a subtraction with
// v < a it writes (a - v) mod 10 instead of (v - a) mod 10, with probability `slip`, and goes
// on from the wrong value. Test problems are those whose hash is 0 mod 8; training problems
// are drawn from the rest, so the two never overlap.
//
// Needs cotlab.h (ctl_rng) included before it.
#ifndef CHAINS_H
#define CHAINS_H

#define CH_MAX_K 16
enum { CH_PLUS = 10, CH_MINUS, CH_TIMES, CH_EQ, CH_THINK, CH_ANS, CH_EOS, CH_PAD, CH_VOCAB };
typedef enum ch_format { CH_DIRECT, CH_COARSE, CH_FULL } ch_format;

typedef struct ch_problem {
    int K, x0, op[CH_MAX_K], a[CH_MAX_K];   // op: CH_PLUS, CH_MINUS or CH_TIMES
} ch_problem;

static const int CH_TIMES_OPERANDS[4] = {1, 3, 7, 9};

static int ch_apply(int v, int op, int a) {
    return op == CH_PLUS ? (v + a) % 10 : op == CH_MINUS ? (v - a + 10) % 10 : v * a % 10;
}

// The running value after the first k steps (k = 0: x0).
static int ch_value(const ch_problem *p, int k) {
    int v = p->x0;
    for (int i = 0; i < k; i++) v = ch_apply(v, p->op[i], p->a[i]);
    return v;
}

static uint64_t ch_hash(const ch_problem *p) {
    uint64_t h = 1469598103934665603ull ^ (uint64_t)p->K;
    h = (h ^ (uint64_t)p->x0) * 1099511628211ull;
    for (int i = 0; i < p->K; i++) h = ((h ^ (uint64_t)p->op[i]) * 1099511628211ull ^ (uint64_t)p->a[i]) * 1099511628211ull;
    return h ^ h >> 29;
}

static bool ch_is_test(const ch_problem *p) { return ch_hash(p) % 8 == 0; }

// A random problem of K steps from the test split (test) or the training split.
static ch_problem ch_sample(ctl_rng *r, int K, bool test) {
    ch_problem p;
    do {
        p.K = K, p.x0 = (int)(ctl_rng_next(r) % 10);
        for (int i = 0; i < K; i++) {
            p.op[i] = CH_PLUS + (int)(ctl_rng_next(r) % 3);
            p.a[i] = p.op[i] == CH_TIMES ? CH_TIMES_OPERANDS[ctl_rng_next(r) % 4] : (int)(ctl_rng_next(r) % 10);
        }
    } while (ch_is_test(&p) != test);
    return p;
}

// The prompt's tokens into out; returns their count (2K + 2).
static int ch_prompt(const ch_problem *p, int32_t *out) {
    int n = 0;
    out[n++] = p->x0;
    for (int i = 0; i < p->K; i++) out[n++] = p->op[i], out[n++] = p->a[i];
    out[n++] = CH_EQ;
    return n;
}

// The completion in format f into out (the teacher slips with probability slip, drawing from
// r, which may be NULL when slip is 0); returns its length. *slipped counts the slips made.
static int ch_completion(const ch_problem *p, ch_format f, double slip, ctl_rng *r, int32_t *out, int *slipped) {
    int n = 0, v = p->x0;
    if (slipped) *slipped = 0;
    if (f != CH_DIRECT) out[n++] = CH_THINK;
    for (int i = 0; i < p->K; i++) {
        int next = ch_apply(v, p->op[i], p->a[i]);
        if (p->op[i] == CH_MINUS && v < p->a[i] && slip > 0.0 && ctl_rng_uniform(r) < slip) {
            next = (p->a[i] - v) % 10;   // the sign slip
            if (slipped) (*slipped)++;
        }
        v = next;
        if (i + 1 < p->K && (f == CH_FULL || (f == CH_COARSE && (i + 1) % 2 == 0))) out[n++] = v;
    }
    out[n++] = CH_ANS, out[n++] = v, out[n++] = CH_EOS;
    return n;
}

// The answer a completion states: the digit after the last '#', which must be followed by EOS
// (or end the completion); -1 when there is none or the completion is malformed there.
static int ch_parse_answer(const int32_t *c, int n) {
    int at = -1;
    for (int i = 0; i < n; i++)
        if (c[i] == CH_ANS) at = i;
    if (at < 0 || at + 1 >= n || c[at + 1] < 0 || c[at + 1] > 9) return -1;
    if (at + 2 < n && c[at + 2] != CH_EOS) return -1;
    return c[at + 1];
}

#endif
