#!/usr/bin/env python3
"""TRL reference for cotlab's GRPO step: one GRPOTrainer step with a PEFT LoRA adapter, on the CPU.

Measures the wall time of one optimiser step of trl.GRPOTrainer (generation of --prompts x --group
completions with HF generate, reward, the log-prob forward/backward of the policy, AdamW on the
adapter) for SmolLM2-135M-Instruct, dequantised to float32 from the GGUF file by transformers
(gguf_file=..., offline). Settings: num_generations=--group, max_completion_length=--max-new,
temperature 1.0, loss_type "dapo", beta 0 (no reference model), num_iterations 1, constant lr 1e-5,
fp32, use_cpu, no vLLM, no activation checkpointing (TRL defaults it on; --grad-ckpt restores it).
per_device_train_batch_size=--group with gradient_accumulation_steps=--prompts, so the generation
batch (steps_per_generation x micro-batch) is prompts x group, generated at once, and one optimiser
step covers it all. LoRA r 16, alpha 32, dropout 0 on q, k, v,
o, gate, up, down. Prompts: the first --prompts GSM8K questions of --data, as chat messages; reward
1.0 when the last number of the completion equals the number after "####" in the answer.

One warm-up step, then --steps timed steps (TrainerCallback on_step_begin/on_step_end); the last
line is machine-readable:

    RESULT step_s=... completion_tokens=... peak_rss_mb=... trl=VERSION torch=VERSION

(step_s the median, completion_tokens the mean over the timed steps of completions/mean_length x
prompts x group, peak_rss_mb the process ru_maxrss). Without torch/transformers/trl/peft it prints
"UNAVAILABLE <reason>" and exits with 3.
"""
import argparse
import json
import os
import re
import resource
import shutil
import statistics
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def last_number(text):
    nums = re.findall(r"-?\d[\d,]*\.?\d*", text)
    if not nums:
        return None
    try:
        return float(nums[-1].replace(",", "").rstrip("."))
    except ValueError:
        return None


def math_reward(completions, answer, **kwargs):
    out = []
    for c, a in zip(completions, answer):
        text = c[-1]["content"] if isinstance(c, list) else c   # conversational: list of messages
        want = last_number(a.split("####")[-1])
        got = last_number(text)
        out.append(1.0 if got is not None and want is not None and got == want else 0.0)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=2, help="timed steps after one warm-up step")
    p.add_argument("--max-new", type=int, default=256)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--data", default="examples/gsm8k/dev.jsonl")
    p.add_argument("--model", default="models/SmolLM2-135M-Instruct.Q4_1.gguf")
    p.add_argument("--grad-ckpt", action="store_true", help="TRL's default activation checkpointing (off here)")
    args = p.parse_args()
    try:
        import torch
        import transformers
        import trl
        from datasets import Dataset
        from peft import LoraConfig
        from trl import GRPOConfig, GRPOTrainer
    except ImportError as e:
        print("UNAVAILABLE", e)
        return 3
    torch.set_num_threads(args.threads)
    torch.manual_seed(1234)

    with open(args.data) as f:
        rows = [json.loads(line) for line in f if line.strip()][:args.prompts]
    ds = Dataset.from_list([{"prompt": [{"role": "user", "content": r["question"]}], "answer": r["answer"]}
                            for r in rows])

    d, name = os.path.split(os.path.abspath(args.model))
    tok = transformers.AutoTokenizer.from_pretrained(d, gguf_file=name)
    # A plain gguf_file= load dequantises to fp32 nn.Linear but leaves the model tagged as GGUF-quantised,
    # which Trainer refuses to train; dequantize=True drops the tag (same weights).
    model = transformers.AutoModelForCausalLM.from_pretrained(
        d, gguf_file=name, dtype=torch.float32,
        quantization_config=transformers.GgufConfig(gguf_file=name, dequantize=True))

    out_dir = tempfile.mkdtemp(prefix="bench_trl_grpo_")
    cfg = GRPOConfig(
        output_dir=out_dir, use_cpu=True, bf16=False, fp16=False, use_vllm=False,
        per_device_train_batch_size=args.group, gradient_accumulation_steps=args.prompts,
        num_generations=args.group, max_completion_length=args.max_new, temperature=1.0,
        loss_type="dapo", beta=0.0, num_iterations=1, learning_rate=1e-5, lr_scheduler_type="constant",
        gradient_checkpointing=args.grad_ckpt,
        max_steps=1 + args.steps, logging_steps=1, save_strategy="no", report_to="none",
        seed=1234, dataloader_pin_memory=False, disable_tqdm=True)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, task_type="CAUSAL_LM",
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])

    times, lengths, t0 = [], [], [0.0]

    class Timer(transformers.TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            t0[0] = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            times.append(time.perf_counter() - t0[0])

        def on_log(self, a, state, control, logs=None, **kw):
            if logs and "completions/mean_length" in logs:
                lengths.append(logs["completions/mean_length"])

    trainer = GRPOTrainer(model=model, reward_funcs=math_reward, args=cfg, train_dataset=ds,
                          processing_class=tok, peft_config=lora, callbacks=[Timer()])
    try:
        trainer.train()
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)

    n = args.prompts * args.group
    for i, (t, l) in enumerate(zip(times, lengths + [float("nan")] * len(times))):
        print("step %d%s: %.2f s, completion tokens %.0f" % (i, " (warm-up)" if i == 0 else "", t, l * n))
    timed = times[1:] or times
    tl = lengths[1:] or lengths
    step_s = statistics.median(timed)
    tokens = statistics.mean(tl) * n if tl else float("nan")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    print("RESULT step_s=%.2f completion_tokens=%.0f peak_rss_mb=%.0f trl=%s torch=%s"
          % (step_s, tokens, rss, trl.__version__, torch.__version__))
    return 0


if __name__ == "__main__":
    sys.exit(main())
