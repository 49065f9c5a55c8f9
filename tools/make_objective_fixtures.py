#!/usr/bin/env python3
"""TRL references for cotlab's objectives: loss, metrics and d loss / d log-prob per token.

    python3 tools/make_objective_fixtures.py      (needs torch and trl; written against TRL 1.16.0)

Every case draws random per-token log-probs (B, T) with ragged completion masks (rows of
different lengths, empty rows included) and runs TRL's own code where it can be called on
log-probs, in float64 autograd:

  grpo.*   GRPOTrainer._compute_loss on a stand-in trainer whose _get_per_token_logps_and_entropies
           returns our log-probs: loss types grpo, bnpo, dr_grpo, dapo; token and sequence (GSPO)
           ratios; on- and off-policy; beta 0 and 0.04 (k3 KL); epsilon_high; delta; truncated
           completions masked as TRL masks them; gradient accumulation and steps_per_generation.
  dpo.*    DPOTrainer._compute_loss on a stand-in model returning our log-probs (every loss_type
           cotlab has, and ["sigmoid", "sft"] for RPO) with precomputed reference log-probs;
           CPOTrainer.cpo_loss (SimPO) and ORPOTrainer.odds_ratio_loss (ORPO) on average log-probs,
           plus the chosen NLL as those trainers add it. cDPO (sigmoid with label smoothing) is
           TRL 0.28's formula, restated.
  sft.*    the token mean over the optimiser step (transformers' num_items_in_batch), and the
           per-sequence mean, restated.
  adv.*    GRPO's and RLOO's advantages and reward metrics: the statements of
           GRPOTrainer._generate_and_score_completions / RLOOTrainer (TRL 1.16.0), restated with
           TRL's own nanstd, on rewards of several functions with NaN (unscored) entries,
           all-equal groups and unscorable rows; group sizes 2, 3, 4, 8.

Each case's records are <family>.<k>.<field>: opts (text, "key=value" words), logp, mask, old,
ref, entropy, adv, trunc, ref_seq, targets, rewards, weights; and the answers: loss (1,), dlogp,
advantages, metric_names (text, one per line) and metric_values. Written to
tests/fixtures/objectives.bin.
"""
import math
import os
import sys
from collections import defaultdict
from types import SimpleNamespace

import numpy as np
import torch
import trl
from trl.experimental.cpo import CPOTrainer
from trl.experimental.orpo import ORPOTrainer
from trl.trainer.dpo_trainer import DPOTrainer
from trl.trainer.grpo_trainer import GRPOTrainer
from trl.trainer.utils import nanstd

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ctlfix import write_fixture  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "fixtures", "objectives.bin")
D = torch.float64
records = []
counts = defaultdict(int)


def f32(x):
    return np.asarray(x, dtype=np.float32)


def text(s):
    return np.frombuffer(s.encode(), dtype=np.uint8).copy()


def add(family, fields, opts, metrics):
    k = counts[family]
    counts[family] += 1
    pre = f"{family}.{k}."
    records.append((pre + "opts", text(" ".join(f"{a}={b}" for a, b in opts.items()))))
    for name, arr in fields.items():
        records.append((pre + name, arr))
    names = sorted(metrics)
    records.append((pre + "metric_names", text("\n".join(names))))
    records.append((pre + "metric_values", f32([metrics[n] for n in names])))


def ragged(rng, B, T, empty_row=None):
    """Masks with a prompt part (0), a completion (1) and padding (0); row empty_row has none."""
    m = np.zeros((B, T), np.float32)
    for b in range(B):
        start = rng.integers(0, T // 2)
        length = rng.integers(1, T - start + 1)
        m[b, start:start + length] = 1
    if empty_row is not None:
        m[empty_row] = 0
    return m


def logprobs(rng, B, T, masked_nan=True):
    lp = -rng.exponential(1.5, size=(B, T)).astype(np.float32) - 0.01
    return lp


class Acc:
    """A one-process accelerate.Accelerator as far as the loss code uses it."""
    num_processes = 1
    device = torch.device("cpu")

    def reduce(self, x, reduction="sum"):
        return x

    def gather(self, x):
        return x

    def gather_for_metrics(self, x):
        return x


def last(metrics):
    return {k: v[-1] for k, v in metrics["train"].items()}


# ---- GRPO -----------------------------------------------------------------------------------

def grpo_case(rng, loss_type, level, off_policy, beta, idx):
    B, T = 6, 9
    mask = ragged(rng, B, T, empty_row=2 if idx % 4 == 1 else None)
    lp = logprobs(rng, B, T)
    old = (lp + rng.normal(0, 0.25, size=(B, T))).astype(np.float32) if off_policy else None
    ref = (lp + rng.normal(0, 0.3, size=(B, T))).astype(np.float32)
    ent = rng.uniform(0.1, 3.0, size=(B, T)).astype(np.float32)
    adv = rng.normal(0, 1, size=B).astype(np.float32)
    trunc = (rng.uniform(size=B) < 0.25).astype(np.float32) if idx % 3 == 2 else np.zeros(B, np.float32)
    eps = 0.2 if idx % 2 == 0 else 0.15
    eps_high = 0.28 if idx % 4 in (1, 2) else None
    delta = 1.3 if idx % 5 == 3 else None
    ga = 1 + idx % 3
    spg = ga if idx % 6 != 5 else 2 * ga
    eff = mask * (1 - trunc[:, None])   # what mask_truncated_completions leaves
    gen_tokens = float(eff.sum()) * spg + (3.0 if idx % 7 == 0 else 0.0)
    max_len = T + 3

    f = SimpleNamespace()
    f.top_entropy_quantile, f.off_policy_mask_threshold = 1.0, None
    f.importance_sampling_level, f.beta, f.loss_type = level, beta, loss_type
    f.epsilon_low, f.epsilon_high = eps, eps_high if eps_high is not None else eps
    f.args = SimpleNamespace(use_bias_correction_kl=False, delta=delta, steps_per_generation=spg)
    f.use_vllm, f.vllm_importance_sampling_correction = False, False
    f.model = SimpleNamespace(training=True)
    f.current_gradient_accumulation_steps, f.max_completion_length = ga, max_len
    f.accelerator, f._entropy_bonus_enabled, f.aux_loss_enabled = Acc(), False, False
    f._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    lpt = torch.tensor(lp, dtype=D, requires_grad=True)
    f._get_per_token_logps_and_entropies = lambda *a, **k: (lpt, torch.tensor(ent, dtype=D), None)
    inputs = {
        "prompt_ids": torch.zeros(B, 1, dtype=torch.long), "prompt_mask": torch.ones(B, 1, dtype=torch.long),
        "completion_ids": torch.zeros(B, T, dtype=torch.long), "completion_mask": torch.tensor(eff, dtype=D),
        "advantages": torch.tensor(adv, dtype=D), "num_items_in_batch": torch.tensor(gen_tokens, dtype=D),
    }
    if old is not None:
        inputs["old_per_token_logps"] = torch.tensor(old, dtype=D)
    if beta:
        inputs["ref_per_token_logps"] = torch.tensor(ref, dtype=D)
    loss = GRPOTrainer._compute_loss(f, None, inputs)
    loss.backward()
    fields = {"logp": lp, "mask": mask, "entropy": ent, "adv": adv, "trunc": trunc, "ref": ref,
              "loss": f32([loss.item()]), "dlogp": f32(lpt.grad.numpy())}
    if old is not None:
        fields["old"] = old
    opts = {"loss": loss_type, "level": level, "beta": beta, "eps": eps, "eps_high": eps_high or 0,
            "delta": delta or 0, "accum": ga, "spg": spg, "gen_tokens": gen_tokens, "max_len": max_len}
    add("grpo", fields, opts, last(f._metrics))


# ---- DPO family -----------------------------------------------------------------------------

def dpo_inputs(rng, P, T):
    B = 2 * P
    mask = ragged(rng, B, T)
    lp = logprobs(rng, B, T)
    ref = (lp + rng.normal(0, 0.4, size=(B, T))).astype(np.float32)
    ent = rng.uniform(0.1, 3.0, size=(B, T)).astype(np.float32)
    return B, mask, lp, ref, ent


def dpo_case(rng, loss_type, beta, eps, rpo_alpha, ga):
    P, T = 4, 8
    B, mask, lp, ref, ent = dpo_inputs(rng, P, T)
    ref_seq = (ref * mask).sum(1).astype(np.float32)
    lpt = torch.tensor(lp, dtype=D, requires_grad=True)
    mt = torch.tensor(mask, dtype=D)
    if loss_type == "cdpo":   # TRL 0.28 sigmoid with label_smoothing, restated
        s = (lpt * mt).sum(1)
        r = torch.tensor(ref_seq, dtype=D)
        dc, dr = s[:P] - r[:P], s[P:] - r[P:]
        h = beta * (dc - dr)
        loss = (-(1 - eps) * torch.nn.functional.logsigmoid(h) - eps * torch.nn.functional.logsigmoid(-h)).mean()
        cr, rr = beta * dc.detach(), beta * dr.detach()
        metrics = {"rewards/chosen": cr.mean().item(), "rewards/rejected": rr.mean().item(),
                   "rewards/accuracies": (cr > rr).double().mean().item(), "rewards/margins": (cr - rr).mean().item(),
                   "logps/chosen": s[:P].mean().item(), "logps/rejected": s[P:].mean().item()}
    else:
        f = SimpleNamespace()
        f.model = SimpleNamespace(training=True)
        f.accelerator, f.aux_loss_enabled, f.ld_alpha, f.precompute_ref_logps = Acc(), False, None, True
        f.f_divergence_type, f.beta, f.label_smoothing, f.use_weighting = "reverse_kl", beta, eps, False
        f.loss_types = [loss_type] + (["sft"] if rpo_alpha else [])
        f.loss_weights = [1.0] + ([rpo_alpha] if rpo_alpha else [])
        f.args = SimpleNamespace(discopop_tau=0.05)
        f._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
        f._total_train_tokens, f._tp_size = 0, 1
        full = np.concatenate([np.zeros((B, 1), np.float32), mask], 1)   # TRL's mask is on input_ids

        def model(**kw):
            return SimpleNamespace(log_probs=lpt * mt, entropy=torch.tensor(ent, dtype=D),
                                   mean_logits=torch.zeros(B, T, dtype=D), is_top1=torch.zeros(B, T, dtype=torch.bool))
        inputs = {"input_ids": torch.zeros(B, T + 1, dtype=torch.long), "attention_mask": torch.ones(B, T + 1, dtype=torch.long),
                  "completion_mask": torch.tensor(full, dtype=torch.long),
                  "ref_chosen_logps": torch.tensor(ref_seq[:P], dtype=D), "ref_rejected_logps": torch.tensor(ref_seq[P:], dtype=D)}
        loss = DPOTrainer._compute_loss(f, model, inputs, False)
        metrics = {k: v for k, v in last(f._metrics).items()
                   if k.startswith("rewards/") or k.startswith("logps/") or k == "entropy"}
    loss = loss / ga   # the HF Trainer divides by gradient accumulation
    loss.backward()
    fields = {"logp": lp, "mask": mask, "ref": ref, "entropy": ent, "loss": f32([loss.item()]),
              "dlogp": f32(lpt.grad.numpy())}
    use_ref_seq = rng.uniform() < 0.5
    if use_ref_seq:
        fields["ref_seq"] = ref_seq
    opts = {"loss": loss_type, "beta": beta, "eps": eps, "rpo": rpo_alpha, "accum": ga, "ref_seq": int(use_ref_seq)}
    add("dpo", fields, opts, metrics)


def ref_free_case(rng, kind, beta, eps, gamma, alpha, ga):
    P, T = 4, 8
    B, mask, lp, _, ent = dpo_inputs(rng, P, T)
    lp = np.minimum(lp, -0.05).astype(np.float32)   # ORPO's log(1 - p) needs p < 1
    lpt = torch.tensor(lp, dtype=D, requires_grad=True)
    mt = torch.tensor(mask, dtype=D)
    avg = (lpt * mt).sum(1) / mt.sum(1)              # get_batch_logps(average_log_prob=True)
    nll = -(lpt[:P] * mt[:P]).sum() / mt[:P].sum()   # cross-entropy over the chosen completions
    f = SimpleNamespace(accelerator=Acc(), beta=beta, label_smoothing=eps, alpha=0.0, loss_type="simpo", simpo_gamma=gamma)
    if kind == "simpo":
        losses, cr, rr = CPOTrainer.cpo_loss(f, avg[:P], avg[P:])
        loss = losses.mean() + alpha * nll
        extra = {"nll_loss": nll.item()} if alpha else {}
    else:
        losses, cr, rr, ratio, log_odds = ORPOTrainer.odds_ratio_loss(f, avg[:P], avg[P:])
        loss = nll - losses.mean()
        extra = {"nll_loss": nll.item(), "log_odds_ratio": ratio.item(), "log_odds_chosen": log_odds.item()}
    loss = loss / ga
    loss.backward()
    metrics = {"rewards/chosen": cr.mean().item(), "rewards/rejected": rr.mean().item(),
               "rewards/accuracies": (cr > rr).double().mean().item(), "rewards/margins": (cr - rr).mean().item(),
               "logps/chosen": avg[:P].mean().item(), "logps/rejected": avg[P:].mean().item(), **extra}
    fields = {"logp": lp, "mask": mask, "entropy": ent, "loss": f32([loss.item()]), "dlogp": f32(lpt.grad.numpy())}
    opts = {"loss": kind, "beta": beta, "eps": eps, "gamma": gamma, "rpo": alpha if kind == "simpo" else 0, "accum": ga,
            "ref_seq": 0}
    add("dpo", fields, opts, metrics)


# ---- SFT ------------------------------------------------------------------------------------

def sft_case(rng, norm, ga, step_tokens):
    B, T = 5, 7
    mask = ragged(rng, B, T, empty_row=3)
    mask[0] *= rng.uniform(0.5, 2.0, size=T).astype(np.float32)   # weights, not only 0/1
    lp = logprobs(rng, B, T)
    ent = rng.uniform(0.1, 3.0, size=(B, T)).astype(np.float32)
    lpt = torch.tensor(lp, dtype=D, requires_grad=True)
    mt = torch.tensor(mask, dtype=D)
    if norm == "tokens":   # transformers: sum over tokens / num_items_in_batch (or local count / GA)
        n = step_tokens if step_tokens else mt.sum().item() * ga
        loss = -(lpt * mt).sum() / n
    else:
        loss = (-(lpt * mt).sum(1) / mt.sum(1).clamp(min=1.0)).mean() / ga
    loss.backward()
    metrics = {"num_tokens": mt.sum().item(), "entropy": ((torch.tensor(ent, dtype=D) * mt).sum() / mt.sum()).item()}
    fields = {"logp": lp, "mask": mask, "entropy": ent, "loss": f32([loss.item()]), "dlogp": f32(lpt.grad.numpy())}
    add("sft", fields, {"norm": norm, "accum": ga, "step_tokens": step_tokens}, metrics)


# ---- advantages -----------------------------------------------------------------------------

def grpo_advantages(R, w, G, scale):
    """GRPOTrainer._generate_and_score_completions, multi_objective_aggregation sum_then_normalize."""
    unscorable = torch.isnan(R).all(dim=1)
    rewards = (R * w.unsqueeze(0)).nansum(dim=1)
    rewards[unscorable] = torch.nan
    mean_g = torch.nanmean(rewards.view(-1, G), dim=1).repeat_interleave(G, dim=0)
    if scale in ("group", "none"):
        std = nanstd(rewards.view(-1, G), dim=1).repeat_interleave(G, dim=0)
    else:
        std = nanstd(rewards).expand_as(rewards)
    adv = rewards - mean_g
    if scale != "none":
        adv = adv / (std + 1e-4)
    zero = torch.isclose(std, torch.zeros_like(std))
    return torch.nan_to_num(adv, nan=0.0), rewards, zero


def rloo_advantages(R, w, G, normalize):
    """RLOOTrainer: leave-one-out baseline over the scored rows of the group (beta 0)."""
    unscorable = torch.isnan(R).all(dim=1)
    rewards = (R * w.unsqueeze(0)).nansum(dim=1)
    rewards[unscorable] = torch.nan
    grouped = rewards.view(-1, G)
    std = nanstd(grouped, dim=1).repeat_interleave(G, dim=0)
    counts = (~torch.isnan(grouped)).sum(dim=1, keepdim=True)
    base = ((torch.nansum(grouped, dim=1, keepdim=True) - grouped) / (counts - 1)).view(-1)
    adv = rewards - base
    if normalize:
        adv = (adv - torch.nanmean(adv)) / (nanstd(adv) + 1e-4)
    zero = torch.isclose(std, torch.zeros_like(std))
    return torch.nan_to_num(adv, nan=0.0), rewards, zero


def adv_case(rng, kind, scale, G, K):
    n = G * 3
    R = rng.choice([0.0, 0.5, 1.0, 2.0], size=(n, K)) + rng.normal(0, 0.3, size=(n, K)) * (rng.uniform(size=(n, K)) < 0.5)
    R[0:G] = R[0]                        # a group of equal rewards
    R[rng.uniform(size=(n, K)) < 0.15] = np.nan   # unscored entries
    R[G + 1] = np.nan                    # an unscorable row
    if G == 2:
        R[2 * G] = np.nan                # a group with one scored row
    R = R.astype(np.float32)
    w = rng.choice([1.0, 0.5, 2.0], size=K).astype(np.float32)
    Rt, wt = torch.tensor(R, dtype=D), torch.tensor(w, dtype=D)
    if kind == "grpo":
        adv, rewards, zero = grpo_advantages(Rt, wt, G, scale)
    else:
        adv, rewards, zero = rloo_advantages(Rt, wt, G, scale == "batch")
    metrics = {"reward": torch.nanmean(rewards).item(), "reward_std": nanstd(rewards).item(),
               "frac_reward_zero_std": zero.double().mean().item()}
    for k in range(K):
        metrics[f"rewards/f{k}/mean"] = torch.nanmean(Rt[:, k]).item()
        metrics[f"rewards/f{k}/std"] = nanstd(Rt[:, k]).item()
    add("adv", {"rewards": R, "weights": w, "advantages": f32(adv.numpy())},
        {"kind": kind, "scale": scale, "G": G, "K": K}, metrics)


def main():
    print(f"trl {trl.__version__}, torch {torch.__version__}")
    rng = np.random.default_rng(20261202)
    idx = 0
    for loss_type in ("grpo", "bnpo", "dr_grpo", "dapo"):
        for level in ("token", "sequence"):
            for off in (False, True):
                for beta in (0.0, 0.04):
                    grpo_case(rng, loss_type, level, off, beta, idx)
                    idx += 1
    for i, lt in enumerate(("sigmoid", "ipo", "hinge", "robust", "exo_pair", "nca_pair", "bco_pair", "sppo_hard",
                            "apo_zero", "apo_down", "sigmoid_norm", "cdpo")):
        eps = {"robust": 0.1, "exo_pair": 1e-3, "cdpo": 0.1}.get(lt, 0.0)
        for beta, rpo, ga in ((0.1, 0.0, 1), (0.5, 0.3 if lt == "sigmoid" else 0.0, 2)):
            dpo_case(rng, lt, beta, eps, rpo, ga)
    for beta, eps, gamma, alpha, ga in ((2.0, 0.0, 0.5, 0.0, 1), (2.5, 0.1, 1.0, 1.0, 2)):
        ref_free_case(rng, "simpo", beta, eps, gamma, alpha, ga)
    for beta, ga in ((0.1, 1), (0.25, 3)):
        ref_free_case(rng, "orpo", beta, 0.0, 0.0, 0.0, ga)
    for norm in ("tokens", "sequences"):
        for ga, st in ((1, 0.0), (3, 0.0), (2, 41.5)):
            if norm == "sequences" and st:
                continue
            sft_case(rng, norm, ga, st)
    for G in (2, 3, 4, 8):
        for K in (1, 3):
            for kind, scale in (("grpo", "group"), ("grpo", "batch"), ("grpo", "none"), ("rloo", "none"), ("rloo", "batch")):
                adv_case(rng, kind, scale, G, K)
    for fam, c in sorted(counts.items()):
        records.append((fam + ".count", np.array([c], dtype=np.int32)))
    size = write_fixture(OUT, records)
    print(f"{OUT}: {dict(counts)}, {size} bytes")


if __name__ == "__main__":
    main()
