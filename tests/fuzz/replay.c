// Every harness in one program without libFuzzer (one compile for make test):
//   replay NAME FILE...   each file once through fuzz_NAME's LLVMFuzzerTestOneInput
#define COTLAB_CLI_NO_MAIN
#include <stdint.h>
#include <stddef.h>

#define LLVMFuzzerTestOneInput fuzz_one_gguf
#include "fuzz_gguf.c"
#undef LLVMFuzzerTestOneInput
#define LLVMFuzzerTestOneInput fuzz_one_safetensors
#include "fuzz_safetensors.c"
#undef LLVMFuzzerTestOneInput
#define LLVMFuzzerTestOneInput fuzz_one_peft_config
#include "fuzz_peft_config.c"
#undef LLVMFuzzerTestOneInput
#define LLVMFuzzerTestOneInput fuzz_one_dataset
#include "fuzz_dataset.c"
#undef LLVMFuzzerTestOneInput
#define LLVMFuzzerTestOneInput fuzz_one_tokenizer
#include "fuzz_tokenizer.c"
#undef LLVMFuzzerTestOneInput
#define LLVMFuzzerTestOneInput fuzz_one_chat
#include "fuzz_chat.c"
#undef LLVMFuzzerTestOneInput
#define LLVMFuzzerTestOneInput fuzz_one_cli
#include "fuzz_cli.c"
#undef LLVMFuzzerTestOneInput
#define LLVMFuzzerTestOneInput fuzz_one_adapter
#include "fuzz_adapter.c"
#undef LLVMFuzzerTestOneInput

static const struct { const char *name; int (*one)(const uint8_t *, size_t); } harnesses[] = {
    {"gguf", fuzz_one_gguf}, {"safetensors", fuzz_one_safetensors}, {"peft_config", fuzz_one_peft_config},
    {"dataset", fuzz_one_dataset}, {"tokenizer", fuzz_one_tokenizer}, {"chat", fuzz_one_chat}, {"cli", fuzz_one_cli}, {"adapter", fuzz_one_adapter}};

int main(int argc, char **argv) {
    size_t h = 0;
    while (argc > 1 && h < sizeof harnesses / sizeof *harnesses && strcmp(harnesses[h].name, argv[1])) h++;
    if (argc < 2 || h == sizeof harnesses / sizeof *harnesses) return fprintf(stderr, "usage: replay NAME FILE...\n"), 2;
    int n = 0;
    for (int i = 2; i < argc; i++, n++) {
        FILE *f = fopen(argv[i], "rb");
        long len = -1;
        if (f && !fseek(f, 0, SEEK_END)) len = ftell(f);
        uint8_t *buf = len >= 0 ? (uint8_t *)malloc((size_t)len + 1) : NULL;
        if (!f || !buf || fseek(f, 0, SEEK_SET) || fread(buf, 1, (size_t)len, f) != (size_t)len)
            return fprintf(stderr, "replay: cannot read %s\n", argv[i]), 1;
        fclose(f);
        harnesses[h].one(buf, (size_t)len);
        free(buf);
    }
    fflush(stdout);
    fprintf(stderr, "replay %s: %d inputs, no crash, leak or sanitizer report\n", harnesses[h].name, n);
    return 0;
}
