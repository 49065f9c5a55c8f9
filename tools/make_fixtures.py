#!/usr/bin/env python3
"""Generate reference fixtures for the cotlab test-suite.

The fixtures are produced by independent reference implementations:
Hugging Face transformers' ``GPT2LMHeadModel`` and ``LlamaForCausalLM``
(eager attention, float32, CPU), ``torch.optim.AdamW``,
``torch.nn.utils.clip_grad_norm_`` and the learning-rate schedule
functions shipped in ``transformers``.  Everything is seeded, so running the
script twice with the same library versions produces identical files.

Usage::

    python3 tools/make_fixtures.py [OUTPUT_DIR]

``OUTPUT_DIR`` defaults to ``tests/fixtures`` under the repository root
(located from this file's path).  One line is printed per file written,
together with its size, and the torch / transformers versions in use are
printed first.  The fixtures currently in the tree were generated with
torch 2.15.0 and transformers 5.24.0.

Files written
-------------
``gpt2_tiny.bin``        GPT-2, vocab 61, n_ctx 16, C 32, 2 layers, 4 heads.
``llama_tiny.bin``       Llama, vocab 61, n_ctx 16, C 32, 2 layers, 4 heads,
                         2 KV heads (GQA), FF 40, untied ``output.weight``.
``llama_tied_tiny.bin``  As above with 4 KV heads and tied embeddings.
``lr_schedule.bin``      Cosine schedule multipliers (see ``make_schedules``).

File format (little-endian)
---------------------------
::

    char     magic[8]  = "CTLFIX01"
    u32      record_count
    record_count times:
        u32      name_len
        char     name[name_len]          ASCII, no terminating NUL
        u32      dtype                   0 = float32, 1 = int32
        u32      ndim
        i64      shape[ndim]
        4-byte   data[numel]             row-major (C order)

Model file records (in this order)
----------------------------------
``config``      int32  [arch (0 gpt2, 1 llama), vocab, n_ctx, n_embd, n_layer,
                        n_head, n_kv_head, head_dim, n_ff, tied]
``config_f``    f32    [norm_eps, rope_theta]  (rope_theta 0 for gpt2)
``tokens``      int32  (B, T)  input token ids
``targets``     int32  (B, T)  target ids (explicit, not a shift of tokens)
``weights``     f32    (B, T)  per-position loss weights
``param/<n>``   f32    initial parameters, cotlab naming and layout
``logits``      f32    (B, T, V)
``logp``        f32    (B, T)  log_softmax(logits)[target]
``loss``        f32    (1,)    -sum(weights * logp) / sum(weights)
``grad/<n>``    f32    d loss / d param, same naming and layout
``optim``       f32    [lr, beta1, beta2, eps, weight_decay, clip,
                        warmup_steps, total_steps]
``grad_norm``   f32    (2,)    pre-clip global grad norm at steps 1 and 2
``loss_steps``  f32    (2,)    loss at steps 1 and 2
``after2/<n>``  f32    parameters after two AdamW steps

Each optimiser step is: zero grads, forward, loss, backward,
``clip_grad_norm_(params, clip)``, ``AdamW.step()``, scheduler step.  Weight
decay applies to every parameter with ndim >= 2 (matrices and embeddings,
including the GPT-2 position embedding) and not to 1-D parameters (biases and
norm weights).  A tied embedding is a single tensor, stored and optimised once
under ``token_embd.weight``.

All linear weights are stored as (out_features, in_features), as in
``torch.nn.Linear``; GPT-2's ``Conv1D`` weights (in, out) are transposed.
Llama q/k projection rows are kept in Hugging Face order (the rotate-half
RoPE layout: within a head, dimension j pairs with j + head_dim/2).

Numerical caveat: the GPT-2 key bias (rows [C, 2C) of ``attn_qkv.bias``) has
an exactly zero gradient in exact arithmetic (softmax is invariant to a
per-row constant), so ``grad/blk.*.attn_qkv.bias`` there holds float32
round-off (~1e-9) and AdamW (eps 1e-8) turns that noise into updates of up to
~lr/5 per step.  Compare those gradient entries with an absolute tolerance and
do not expect ``after2/`` to match on that slice.
"""

import math
import os
import struct
import sys

import numpy as np

from ctlfix import write_fixture
import torch
import transformers
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    get_cosine_schedule_with_warmup,
)

MAGIC = b"CTLFIX01"
DT_F32 = 0
DT_I32 = 1

B, T = 2, 7
VOCAB = 61
N_CTX = 16
N_EMBD = 32
N_LAYER = 2
N_HEAD = 4
NORM_EPS = 1e-5
ROPE_THETA = 10000.0

LR = 1e-2
BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8
WEIGHT_DECAY = 0.1
WARMUP = 0
TOTAL = 4


# --------------------------------------------------------------------------
# Writer
# --------------------------------------------------------------------------

def f32(x):
    """Snapshot as a float32 array (always a copy: tensors keep changing)."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.array(x, dtype=np.float32, order="C", copy=True)


def i32(x):
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.array(x, dtype=np.int32, order="C", copy=True)


# --------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------

def make_gpt2():
    cfg = GPT2Config(
        vocab_size=VOCAB,
        n_positions=N_CTX,
        n_embd=N_EMBD,
        n_layer=N_LAYER,
        n_head=N_HEAD,
        n_inner=4 * N_EMBD,
        activation_function="gelu_new",
        layer_norm_epsilon=NORM_EPS,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        summary_first_dropout=0.0,
        scale_attn_weights=True,
        scale_attn_by_inverse_layer_idx=False,
        reorder_and_upcast_attn=False,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=None,
        attn_implementation="eager",
    )
    model = GPT2LMHeadModel(cfg)
    return model


def make_llama(n_kv_head, tied):
    kw = dict(
        vocab_size=VOCAB,
        max_position_embeddings=N_CTX,
        hidden_size=N_EMBD,
        intermediate_size=40,
        num_hidden_layers=N_LAYER,
        num_attention_heads=N_HEAD,
        num_key_value_heads=n_kv_head,
        head_dim=N_EMBD // N_HEAD,
        hidden_act="silu",
        rms_norm_eps=NORM_EPS,
        attention_bias=False,
        mlp_bias=False,
        attention_dropout=0.0,
        tie_word_embeddings=tied,
        attn_implementation="eager",
    )
    try:
        cfg = LlamaConfig(rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA}, **kw)
    except TypeError:  # older transformers
        cfg = LlamaConfig(rope_theta=ROPE_THETA, rope_scaling=None, **kw)
    model = LlamaForCausalLM(cfg)
    return model


def reinit_(model, gen):
    """Re-initialise every (unique) parameter: matrices/embeddings and biases
    ~ 0.1*N(0,1); norm weights 1 + 0.1*N(0,1)."""
    norm_weights = set()
    for mod in model.modules():
        if isinstance(mod, torch.nn.LayerNorm) or type(mod).__name__.endswith("RMSNorm"):
            norm_weights.add(id(mod.weight))
    with torch.no_grad():
        for name, p in model.named_parameters():  # deduplicated: tied tensor once
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if id(p) in norm_weights:
                p.copy_(1.0 + 0.1 * noise)
            else:
                p.copy_(0.1 * noise)


def gpt2_mapping(model):
    """[(cotlab_name, tensor, transpose)] in cotlab order."""
    tr = model.transformer
    out = [("token_embd.weight", tr.wte.weight, False),
           ("position_embd.weight", tr.wpe.weight, False)]
    for i, h in enumerate(tr.h):
        p = f"blk.{i}."
        out += [
            (p + "attn_norm.weight", h.ln_1.weight, False),
            (p + "attn_norm.bias", h.ln_1.bias, False),
            (p + "attn_qkv.weight", h.attn.c_attn.weight, True),
            (p + "attn_qkv.bias", h.attn.c_attn.bias, False),
            (p + "attn_output.weight", h.attn.c_proj.weight, True),
            (p + "attn_output.bias", h.attn.c_proj.bias, False),
            (p + "ffn_norm.weight", h.ln_2.weight, False),
            (p + "ffn_norm.bias", h.ln_2.bias, False),
            (p + "ffn_up.weight", h.mlp.c_fc.weight, True),
            (p + "ffn_up.bias", h.mlp.c_fc.bias, False),
            (p + "ffn_down.weight", h.mlp.c_proj.weight, True),
            (p + "ffn_down.bias", h.mlp.c_proj.bias, False),
        ]
    out += [("output_norm.weight", tr.ln_f.weight, False),
            ("output_norm.bias", tr.ln_f.bias, False)]
    return out


def llama_mapping(model, tied):
    m = model.model
    out = [("token_embd.weight", m.embed_tokens.weight, False)]
    for i, L in enumerate(m.layers):
        p = f"blk.{i}."
        a, f = L.self_attn, L.mlp
        out += [
            (p + "attn_norm.weight", L.input_layernorm.weight, False),
            (p + "attn_q.weight", a.q_proj.weight, False),
            (p + "attn_k.weight", a.k_proj.weight, False),
            (p + "attn_v.weight", a.v_proj.weight, False),
            (p + "attn_output.weight", a.o_proj.weight, False),
            (p + "ffn_norm.weight", L.post_attention_layernorm.weight, False),
            (p + "ffn_gate.weight", f.gate_proj.weight, False),
            (p + "ffn_up.weight", f.up_proj.weight, False),
            (p + "ffn_down.weight", f.down_proj.weight, False),
        ]
    out += [("output_norm.weight", m.norm.weight, False)]
    if not tied:
        out += [("output.weight", model.lm_head.weight, False)]
    return out


def check_mapping(model, mapping):
    """Every unique model parameter must appear exactly once in the mapping."""
    mapped = [id(t) for _, t, _ in mapping]
    assert len(mapped) == len(set(mapped)), "duplicate tensor in mapping"
    uniq = {id(p) for p in model.parameters()}
    assert set(mapped) == uniq, "mapping does not cover the model's parameters"


def layout(t, transpose):
    t = t.detach()
    return f32(t.t().contiguous() if transpose else t)


# --------------------------------------------------------------------------
# Loss / training
# --------------------------------------------------------------------------

def make_batch(gen):
    tokens = torch.randint(0, VOCAB, (B, T), generator=gen, dtype=torch.int64)
    targets = torch.randint(0, VOCAB, (B, T), generator=gen, dtype=torch.int64)
    weights = torch.ones(B, T, dtype=torch.float32)
    weights[0, :3] = 0.0   # prompt masking
    weights[1, 4] = 0.5
    return tokens, targets, weights


def compute_loss(model, tokens, targets, weights):
    logits = model(input_ids=tokens).logits                      # (B,T,V)
    logp_all = torch.log_softmax(logits, dim=-1)
    logp = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (B,T)
    loss = -(weights * logp).sum() / weights.sum()
    return logits, logp, loss


def round_sig(x, sig=2):
    if x == 0:
        return 0.0
    return round(x, sig - 1 - int(math.floor(math.log10(abs(x)))))


def build_model_fixture(kind, seed):
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    if kind == "gpt2":
        model = make_gpt2()
        tied = True
        arch, n_kv, n_ff, rope = 0, N_HEAD, 4 * N_EMBD, 0.0
    elif kind == "llama":
        model = make_llama(n_kv_head=2, tied=False)
        tied = False
        arch, n_kv, n_ff, rope = 1, 2, 40, ROPE_THETA
    elif kind == "llama_tied":
        model = make_llama(n_kv_head=N_HEAD, tied=True)
        tied = True
        arch, n_kv, n_ff, rope = 1, N_HEAD, 40, ROPE_THETA
    else:
        raise ValueError(kind)

    model = model.to(torch.float32)
    reinit_(model, gen)
    model.eval()  # all dropout probabilities are 0 as well
    assert model.config._attn_implementation == "eager", model.config._attn_implementation
    if kind == "gpt2":
        assert model.lm_head.weight is model.transformer.wte.weight, "gpt2 tie broken"
    elif tied:
        assert model.lm_head.weight is model.model.embed_tokens.weight, "llama tie broken"
    else:
        assert model.lm_head.weight is not model.model.embed_tokens.weight

    mapping = gpt2_mapping(model) if kind == "gpt2" else llama_mapping(model, tied)
    check_mapping(model, mapping)

    tokens, targets, weights = make_batch(gen)

    head_dim = N_EMBD // N_HEAD
    recs = [
        ("config", i32([arch, VOCAB, N_CTX, N_EMBD, N_LAYER, N_HEAD, n_kv, head_dim, n_ff, int(tied)])),
        ("config_f", f32([NORM_EPS, rope])),
        ("tokens", i32(tokens)),
        ("targets", i32(targets)),
        ("weights", f32(weights)),
    ]
    recs += [("param/" + n, layout(t, tr)) for n, t, tr in mapping]

    # Forward / backward at the initial parameters.
    model.zero_grad(set_to_none=True)
    logits, logp, loss = compute_loss(model, tokens, targets, weights)
    loss.backward()
    grads = [("grad/" + n, layout(t.grad, tr)) for n, t, tr in mapping]
    params = [p for p in model.parameters()]
    norm0 = torch.linalg.vector_norm(
        torch.stack([torch.linalg.vector_norm(p.grad) for p in params])).item()
    clip = round_sig(0.5 * norm0, 2)

    recs += [("logits", f32(logits)), ("logp", f32(logp)), ("loss", f32([loss.item()]))]
    recs += grads
    recs += [("optim", f32([LR, BETAS[0], BETAS[1], ADAM_EPS, WEIGHT_DECAY, clip, WARMUP, TOTAL]))]

    # Two AdamW steps.
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": WEIGHT_DECAY},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=LR, betas=BETAS, eps=ADAM_EPS)
    sched = get_cosine_schedule_with_warmup(opt, num_warmup_steps=WARMUP, num_training_steps=TOTAL)
    norms, losses, lrs = [], [], []
    for _ in range(2):
        opt.zero_grad(set_to_none=True)
        _, _, l = compute_loss(model, tokens, targets, weights)
        l.backward()
        n = torch.nn.utils.clip_grad_norm_(params, clip)
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
        norms.append(n.item())
        losses.append(l.item())
    assert losses[0] == loss.item(), "step-1 loss differs from the recorded loss"
    assert norms[0] > clip, "clipping is not active at step 1"

    recs += [("grad_norm", f32(norms)), ("loss_steps", f32(losses))]
    after = [("after2/" + n, layout(t, tr)) for n, t, tr in mapping]
    initial = dict(recs)
    for n, a in after:
        assert not np.array_equal(a, initial["param/" + n[len("after2/"):]]), f"{n} did not change"
    recs += after
    info = dict(norms=norms, clip=clip, losses=losses, lrs=lrs)
    return recs, info


# --------------------------------------------------------------------------
# Schedules
# --------------------------------------------------------------------------

def schedule_multipliers(factory, n, **kw):
    dummy = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([dummy], lr=1.0)
    sched = factory(opt, **kw)
    lam = sched.lr_lambdas[0]
    return [float(lam(s)) for s in range(n)]


def make_schedules():
    recs = [
        ("cosine_w3_t10", f32(schedule_multipliers(
            get_cosine_schedule_with_warmup, 12, num_warmup_steps=3, num_training_steps=10))),
        ("cosine_w0_t7", f32(schedule_multipliers(
            get_cosine_schedule_with_warmup, 9, num_warmup_steps=0, num_training_steps=7))),
    ]
    minlr = getattr(transformers, "get_cosine_with_min_lr_schedule_with_warmup", None)
    if minlr is None:
        print("note: transformers.get_cosine_with_min_lr_schedule_with_warmup not available; skipped")
    else:
        recs.append(("cosine_minlr_w2_t8", f32(schedule_multipliers(
            minlr, 10, num_warmup_steps=2, num_training_steps=8, min_lr_rate=0.1))))
    return recs


# --------------------------------------------------------------------------
# Independent read-back check
# --------------------------------------------------------------------------

def read_fixture(path):
    """Minimal reader, written separately from ``write_fixture``."""
    with open(path, "rb") as f:
        buf = f.read()
    if buf[:8] != MAGIC:
        raise ValueError(f"{path}: bad magic")
    off = 8
    (count,) = struct.unpack_from("<I", buf, off)
    off += 4
    out = []
    for _ in range(count):
        (nlen,) = struct.unpack_from("<I", buf, off)
        off += 4
        name = buf[off:off + nlen].decode("ascii")
        off += nlen
        dtype, ndim = struct.unpack_from("<II", buf, off)
        off += 8
        shape = struct.unpack_from("<%dq" % ndim, buf, off)
        off += 8 * ndim
        numel = 1
        for s in shape:
            numel *= s
        np_dt = {DT_F32: "<f4", DT_I32: "<i4"}[dtype]
        data = np.frombuffer(buf, dtype=np_dt, count=numel, offset=off).reshape(shape)
        off += 4 * numel
        out.append((name, data))
    if off != len(buf):
        raise ValueError(f"{path}: {len(buf) - off} trailing bytes")
    return out


def verify(path, records):
    back = read_fixture(path)
    assert [n for n, _ in back] == [n for n, _ in records], f"{path}: names differ"
    for (n, a), (_, b) in zip(records, back):
        assert tuple(a.shape) == tuple(b.shape), f"{path}:{n}: shape {a.shape} vs {b.shape}"
        assert a.dtype.kind == b.dtype.kind, f"{path}:{n}: dtype differs"
        assert np.array_equal(a, b), f"{path}:{n}: data differs"


# --------------------------------------------------------------------------

def main(argv):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    outdir = argv[1] if len(argv) > 1 else os.path.join(root, "tests", "fixtures")
    os.makedirs(outdir, exist_ok=True)

    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, numpy {np.__version__}")

    jobs = [("gpt2_tiny.bin", "gpt2", 1001),
            ("llama_tiny.bin", "llama", 2002),
            ("llama_tied_tiny.bin", "llama_tied", 3003)]
    for fname, kind, seed in jobs:
        recs, info = build_model_fixture(kind, seed)
        path = os.path.join(outdir, fname)
        size = write_fixture(path, recs)
        verify(path, recs)
        print(f"wrote {path} ({size} bytes, {len(recs)} records)  "
              f"grad_norm={info['norms'][0]:.6g},{info['norms'][1]:.6g} clip={info['clip']:g} "
              f"loss={info['losses'][0]:.6g},{info['losses'][1]:.6g} lr={info['lrs'][0]:.6g},{info['lrs'][1]:.6g}")

    recs = make_schedules()
    path = os.path.join(outdir, "lr_schedule.bin")
    size = write_fixture(path, recs)
    verify(path, recs)
    print(f"wrote {path} ({size} bytes, {len(recs)} records)")


if __name__ == "__main__":
    main(sys.argv)
