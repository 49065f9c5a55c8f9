// The demo's task generator (examples/chains.h; included by tests/test.c): chains are correct,
// the teacher slips exactly where and as often as configured, the answer parser is exact, and
// test problems never appear in training.
#include "../examples/chains.h"

static void test_chains(void) {
    ctl_rng r;
    ctl_rng_seed(&r, 2026);
    // Every step is a bijection of the running value (so a guessed answer is right 1 time in 10).
    for (int op = CH_PLUS; op <= CH_TIMES; op++)
        for (int a = 0; a < 10; a++) {
            if (op == CH_TIMES && a % 2 == 0) continue;
            if (op == CH_TIMES && a == 5) continue;
            int seen = 0;
            for (int v = 0; v < 10; v++) seen |= 1 << ch_apply(v, op, a);
            CHECK(seen == 1023, "op %d operand %d is not a bijection", op, a);
        }
    int32_t seq[4 * CH_MAX_K + 8];
    int64_t slips = 0, chances = 0, wrong = 0, other = 0;
    for (int i = 0; i < 20000; i++) {
        int K = 1 + i % 8;
        ch_problem p = ch_sample(&r, K, i % 5 == 0);
        for (int k = 0; k < K; k++)
            CHECK(p.op[k] != CH_TIMES || p.a[k] == 1 || p.a[k] == 3 || p.a[k] == 7 || p.a[k] == 9, "x operand %d", p.a[k]);
        int np = ch_prompt(&p, seq), pok = np == 2 * K + 2 && seq[0] == p.x0 && seq[np - 1] == CH_EQ;
        for (int k = 0; k < K; k++) pok = pok && seq[1 + 2 * k] == p.op[k] && seq[2 + 2 * k] == p.a[k];
        wrong += !pok;
        // Full chains from the correct teacher: every running value and the answer, recomputed by hand.
        int n = ch_completion(&p, CH_FULL, 0.0, NULL, seq, NULL), v = p.x0, ok = seq[0] == CH_THINK && n == K + 3;
        for (int k = 0; k < K; k++) {
            int w = p.op[k] == CH_PLUS ? v + p.a[k] : p.op[k] == CH_MINUS ? v - p.a[k] : v * p.a[k];
            v = ((w % 10) + 10) % 10;
            if (k + 1 < K) ok = ok && seq[1 + k] == v;
        }
        ok = ok && seq[K] == CH_ANS && seq[K + 1] == v && seq[K + 2] == CH_EOS && ch_parse_answer(seq, n) == v && ch_value(&p, K) == v;
        wrong += !ok;
        // Coarse and direct: every second value; the answer only.
        int nc = ch_completion(&p, CH_COARSE, 0.0, NULL, seq, NULL), nd;
        ok = nc == 1 + (K - 1) / 2 + 3 && ch_parse_answer(seq, nc) == v;
        for (int k = 2; k < K; k += 2) ok = ok && seq[k / 2] == ch_value(&p, k);
        nd = ch_completion(&p, CH_DIRECT, 0.0, NULL, seq, NULL);
        wrong += !ok || nd != 3 || seq[0] != CH_ANS || ch_parse_answer(seq, nd) != v;
        // The imperfect teacher: a slip only on a subtraction below zero, at the configured rate.
        int s;
        ch_completion(&p, CH_FULL, 0.8, &r, seq, &s);
        int tv = p.x0;
        for (int k = 0; k < K; k++) {
            int want = ch_apply(tv, p.op[k], p.a[k]), got = k + 1 < K ? seq[1 + k] : seq[K + 1];
            bool chance = p.op[k] == CH_MINUS && tv < p.a[k];
            chances += chance;
            if (got != want) {   // a visible slip (one with a - v = 5 writes the right value)
                if (!chance || got != (p.a[k] - tv) % 10) other++;
                slips++;
            }
            tv = got;   // the teacher goes on from what it wrote
        }
    }
    CHECK(wrong == 0, "%lld chains wrong", (long long)wrong);
    CHECK(other == 0, "%lld slips of another kind", (long long)other);
    // Visible slips: rate 0.8 of the chances whose slip changes the value (a - v != 5): 8/9 of them.
    double rate = (double)slips / ((double)chances * 8.0 / 9.0);
    CHECK(fabs(rate - 0.8) < 0.02, "slip rate %.3f over %lld chances", rate, (long long)chances);
    printf("    20000 problems: chains exact; %lld slips of %lld chances (rate %.3f of the visible ones)\n", (long long)slips,
           (long long)chances, rate);
    // The parser: exact on malformed completions.
    int32_t bad[][4] = {{CH_ANS, CH_EOS, 0, 0}, {CH_THINK, 3, CH_EOS, 0}, {CH_ANS, 4, 5, CH_EOS}, {CH_ANS, CH_PLUS, CH_EOS, 0}};
    int bad_n[4] = {2, 3, 4, 3};
    for (int k = 0; k < 4; k++) CHECK(ch_parse_answer(bad[k], bad_n[k]) == -1, "malformed completion %d parsed", k);
    int32_t good[3] = {CH_ANS, 7, CH_EOS}, cut[2] = {CH_ANS, 7};
    CHECK(ch_parse_answer(good, 3) == 7 && ch_parse_answer(cut, 2) == 7, "answers");
    // Train and test never overlap: every problem the training sampler draws is outside the test split.
    int leaks = 0, tests = 0;
    for (int i = 0; i < 50000; i++) {
        ch_problem p = ch_sample(&r, 1 + i % 6, i % 2);
        tests += ch_is_test(&p);
        leaks += (i % 2 == 0) && ch_is_test(&p);
    }
    CHECK(leaks == 0 && tests == 25000, "train/test split: %d leaks, %d test draws", leaks, tests);
}

// The demo's quick run end to end (build/cot_demo --quick): every stage finishes, writes its
// table and charts, and shows the demo's two effects even at this size: full chain-of-thought
// beats direct answering, and GRPO from the imperfect teacher's plateau does not lower
// accuracy. Run in the default build only (it is a program of its own, ~1 minute on 2 cores).
#define DEMO_OUT "build/demo_quick"

static void test_demo_quick(void) {
#if defined(COTLAB_NO_THREADS) || defined(COTLAB_NO_SIMD) || defined(__SANITIZE_ADDRESS__)
    printf("    skipped: run by the default build's suite\n");
#else
    if (system("test -x build/cot_demo") != 0) {
        CHECK(false, "build/cot_demo is missing (make build/cot_demo)");
        return;
    }
    int rc = system("rm -rf " DEMO_OUT " && ./build/cot_demo --quick --out " DEMO_OUT " > build/demo_quick.txt 2>&1");
    CHECK(WIFEXITED(rc) && WEXITSTATUS(rc) == 0, "cot_demo --quick failed (build/demo_quick.txt)");
    size_t len;
    char *tsv = read_file(DEMO_OUT "/results.tsv", &len);
    CHECK(tsv != NULL, "no " DEMO_OUT "/results.tsv");
    if (!tsv) return;
    // stage, then accuracy at K = 2, 4, 6, 8, mean length, steps, CPU seconds
    static const char *stages[8] = {"direct answer", "coarse chain-of-thought", "full chain-of-thought",
                                    "imperfect teacher: plateau", "+ SFT (control)", "+ GRPO", "+ DPO", "+ STaR (rejection SFT)"};
    double acc[8][4] = {{0}};
    int found = 0;
    for (char *line = strchr(tsv, '\n'); line && line[1]; line = strchr(line + 1, '\n')) {
        char *tab = strchr(line + 1, '\t');
        if (!tab) break;
        for (int s = 0; s < 8; s++)
            if ((size_t)(tab - line - 1) == strlen(stages[s]) && !strncmp(line + 1, stages[s], strlen(stages[s]))) {
                found |= 1 << s;
                char *p = tab;
                for (int k = 0; k < 4; k++) acc[s][k] = strtod(p + 1, &p);
            }
    }
    free(tsv);
    CHECK(found == 255, "results.tsv lacks stages (found mask %x)", found);
    for (int s = 0; s < 8; s++)
        for (int k = 0; k < 4; k++) CHECK(acc[s][k] >= 0.0 && acc[s][k] <= 1.0, "%s K index %d: accuracy %g", stages[s], k, acc[s][k]);
    double mean[8];
    for (int s = 0; s < 8; s++) mean[s] = (acc[s][0] + acc[s][1] + acc[s][2]) / 3;   // K = 2, 4, 6
    printf("    K=2: direct %.1f%%, full CoT %.1f%%; K=6: plateau %.1f%%, GRPO %.1f%%\n", 100 * acc[0][0], 100 * acc[2][0],
           100 * acc[3][2], 100 * acc[5][2]);
    CHECK(acc[2][0] >= acc[0][0] + 0.15, "full CoT %.3f vs direct %.3f at K = 2", acc[2][0], acc[0][0]);
    CHECK(mean[2] >= mean[0] + 0.05, "full CoT %.3f vs direct %.3f over K = 2, 4, 6", mean[2], mean[0]);
    CHECK(acc[5][2] >= acc[3][2] - 0.03 && mean[5] >= mean[3] - 0.02, "GRPO lowered accuracy: K = 6 %.3f (plateau %.3f), mean %.3f (%.3f)",
          acc[5][2], acc[3][2], mean[5], mean[3]);
    static const char *charts[5] = {"1_formats", "2_teacher", "3_grpo", "4_dpo", "5_star"};
    for (int c = 0; c < 5; c++) {
        char path[128];
        snprintf(path, sizeof path, DEMO_OUT "/%s.svg", charts[c]);
        char *svg = read_file(path, &len);
        CHECK(svg && strstr(svg, "<svg") && strstr(svg, "</svg>") && strstr(svg, "<polyline"), "%s is not a chart", path);
        free(svg);
    }
#endif
}
