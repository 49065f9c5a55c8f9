// The command line's argument parser, with the lists inside options (--targets, --reward):
// the input is argv, NUL-separated (argv[0] added here). Nothing is opened or run. Its messages
// go to stdout and stderr: run it with -close_fd_mask=3.
#define COTLAB_CLI_NO_MAIN
#include "../../tools/cotlab.c"

#include <stdint.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size > 4096) return 0;
    char *buf = (char *)malloc(size + 1), *argv[258];
    int argc = 1;
    memcpy(buf, data, size);
    buf[size] = 0;
    argv[0] = (char *)"cotlab";
    for (size_t i = 0; i <= size && argc < 257;) {
        argv[argc++] = buf + i;
        i += strlen(buf + i) + 1;
    }
    argv[argc] = NULL;
    cli(argc, argv, false);
    free(buf);
    return 0;
}

