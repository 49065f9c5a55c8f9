// The JSONL dataset reader, every format. The first byte picks the format (its value mod 7:
// AUTO, TEXT, PROMPT_COMPLETION, MESSAGES, PREFERENCE, PROMPT, GSM8K) and, in bit 3, skip_bad;
// the rest is the file. Every example's parts and fields are read back.
#include "fuzz.h"

static void walk_part(const ctl_part *p) {
    size_t n = p->text ? strlen(p->text) : 0;
    for (int64_t i = 0; i < p->n_msgs; i++) n += strlen(p->msgs[i].role) + strlen(p->msgs[i].content);
    fuzz_sink = (float)n;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size < 1) return 0;
    ctl_dataset_desc dd = {(ctl_data_format)(data[0] % 7), (data[0] & 8) != 0};
    ctl_dataset *ds;
    if (ctl_dataset_open_memory(fuzz_ctx(), data + 1, size - 1, &dd, &ds)) return 0;
    ctl_dataset_format(ds), ctl_dataset_skipped(ds);
    for (int64_t i = 0; i < ctl_dataset_size(ds); i++) {
        const ctl_example *e = ctl_dataset_get(ds, i);
        walk_part(&e->prompt), walk_part(&e->completion), walk_part(&e->chosen), walk_part(&e->rejected);
        if (e->answer) fuzz_sink = (float)strlen(e->answer);
        for (int64_t k = 0; k < e->n_fields; k++) fuzz_sink = (float)(strlen(e->keys[k]) + strlen(e->values[k]));
        ctl_example_field(e, "answer");
    }
    int64_t order[64];
    if (ctl_dataset_size(ds) <= 64) ctl_dataset_shuffle(ds, 7, order);
    ctl_dataset_close(ds);
    return 0;
}
