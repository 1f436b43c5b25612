"""Analytic memory terms of BERT-, GPT-2- and Llama-style transformers from their config (no weights).

Per-block accounting, checked tensor by tensor against ``saved_tensors_hooks`` on tiny random models
(torch 2.13 CPU, transformers' default SDPA attention, eval mode; tokens T = batch x seq, hidden h, FFN f,
H heads, KV width h_kv, activation bytes e, LayerNorm/RMSNorm statistics and the SDPA logsumexp in
float32 = 4 bytes). Segments are listed in forward order; a module "enters" its block at a segment: when it
is the lowest trained module, the segments before it are not kept (algorithms.md sec. 1(b)).

* BERT: attention core (q, k, v, out: 4Th e; lse: T H 4) <- query/key/value; LayerNorm 1 (input T h e,
  mean and rstd 2T 4) <- attention.output.dense; GELU input (T f e) <- intermediate.dense; LayerNorm 2
  (T h e + 2T 4) <- output.dense. Head: pooler tanh output (b h e) + logits, labels.
* GPT-2: ln_1 (T h e + 2T 4); attention core (the fused c_attn output 3Th e viewed by q, k and v copied
  into the KV cache when ``use_cache``: +2Th e, out Th e, lse) <- c_attn; ln_2 <- attn.c_proj; gelu_new
  (x, tanh, 0.5x, 1+tanh: 4Tf e) <- mlp.c_fc; nothing <- mlp.c_proj. Tail: ln_f.
* Llama: input RMSNorm (float32 input T h 4, rsqrt T 4); attention core (q Th e, k and v T h_kv e each,
  out Th e, lse) <- q/k/v_proj; post-attention RMSNorm <- o_proj; SwiGLU (gate, silu(gate), up: 3Tf e)
  <- gate/up_proj; nothing <- down_proj. Tail: final RMSNorm + RoPE cos and sin (2 s d_head e).
* Padded batches (``padded=True``): each block also saves the ``[b, 1, s, s]`` SDPA mask, and Llama's
  keys/values are expanded to all heads (``repeat_kv``) before the masked call.
* Sequence-classification heads of GPT-2/Llama run ``score`` on every position: its input (T h e) is saved.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from solvers.errors import ProblemError
from solvers.memspec import ModuleSpec, dtype_bytes, dtype_name, kind_of, opt_scalar_bytes, opt_states

__all__ = ["PRESETS", "resolve_config", "build", "default_dtype", "BF16_FROM_PARAMS"]

# Models of this many parameters and more are fine-tuned in bfloat16 by the people who run them (the
# Llama/Mistral/Qwen model cards ship bf16 weights; a 7B model in fp32 needs 27 GiB for its weights alone),
# smaller ones (BERT, MiniLM, GPT-2) in float32: the default dtype of `MemoryModel.from_config`.
BF16_FROM_PARAMS = 1_000_000_000


def default_dtype(num_params: int) -> str:
    """``bfloat16`` for models of `BF16_FROM_PARAMS` parameters and more, else ``float32``."""
    return "bfloat16" if int(num_params) >= BF16_FROM_PARAMS else "float32"

# Preset name -> (model_type, config kwargs). Shapes from the public model cards' config.json files.
PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "bert-tiny": ("bert", dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=512)),
    "bert-base": ("bert", {}),
    "bert-large": ("bert", dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                                intermediate_size=4096)),
    "minilm-l6": ("bert", dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                               intermediate_size=1536)),
    "gpt2": ("gpt2", {}),
    "gpt2-medium": ("gpt2", dict(n_embd=1024, n_layer=24, n_head=16)),
    "llama-7b": ("llama", dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                               num_attention_heads=32, num_key_value_heads=32, vocab_size=32000)),
    "llama-3-8b": ("llama", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                 num_attention_heads=32, num_key_value_heads=8, vocab_size=128256)),
    "tinyllama-1.1b": ("llama", dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                                     num_attention_heads=32, num_key_value_heads=4, vocab_size=32000)),
}

_FAMILY = {"bert": "bert", "roberta": "bert", "xlm-roberta": "bert", "gpt2": "gpt2",
           "llama": "llama", "mistral": "llama", "qwen2": "llama"}
_DEFAULT_TARGETS = {"bert": ("query", "value"), "gpt2": ("c_attn",), "llama": ("q_proj", "v_proj")}
# Forward order of the adaptable linears in one block (suffix of the module name), and which segment
# each enters at (see the module docstring).
_ORDER = {
    "bert": ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
             "intermediate.dense", "output.dense"),
    "gpt2": ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"),
    "llama": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
}
_ENTRY = {
    "bert": {"attention.self.query": 0, "attention.self.key": 0, "attention.self.value": 0,
             "attention.output.dense": 1, "intermediate.dense": 2, "output.dense": 3},
    "gpt2": {"attn.c_attn": 1, "attn.c_proj": 2, "mlp.c_fc": 3, "mlp.c_proj": 4},
    "llama": {"q_proj": 1, "k_proj": 1, "v_proj": 1, "o_proj": 2, "gate_proj": 3, "up_proj": 3, "down_proj": 4},
}
_SHARED = {"bert": (("attention.self.query", "attention.self.key", "attention.self.value"),),
           "gpt2": (),
           "llama": (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))}


def resolve_config(config: Any, num_labels: int = 2):
    """A transformers ``PretrainedConfig`` from a preset name, a config object or dict, or a local path."""
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(config, PretrainedConfig):
        cfg = config
    elif isinstance(config, dict):
        d = dict(config)
        mt = d.pop("model_type", None)
        if mt is None:
            raise ProblemError(f"config dict needs a 'model_type', got keys {sorted(d)[:8]}")
        cfg = AutoConfig.for_model(mt, **d)
    elif isinstance(config, str | Path) and str(config).lower() in PRESETS:
        mt, kw = PRESETS[str(config).lower()]
        cfg = AutoConfig.for_model(mt, **kw)
    elif isinstance(config, str | Path) and Path(config).exists():
        p = Path(config)
        if p.is_file():
            cfg = resolve_config(json.loads(p.read_text()), num_labels)
        else:
            cfg = AutoConfig.from_pretrained(str(p), local_files_only=True)
    else:
        try:
            cfg = AutoConfig.from_pretrained(str(config), local_files_only=True)
        except Exception:
            raise ProblemError(f"unknown model {config!r}: not a preset ({', '.join(PRESETS)}), "
                               "a config.json, or a local model folder") from None
    cfg.num_labels = int(num_labels)
    if getattr(cfg, "pad_token_id", None) is None:
        cfg.pad_token_id = 0
    return cfg


def _family(cfg) -> str:
    fam = _FAMILY.get(getattr(cfg, "model_type", ""))
    if fam is None:
        raise ProblemError(f"no analytic memory model for model_type {cfg.model_type!r}; supported: "
                           f"{', '.join(sorted(_FAMILY))} (or measure one with MemoryModel.from_model)")
    return fam


def _suffix(name: str, fam: str) -> str | None:
    for suf in _ORDER[fam]:
        if name == suf or name.endswith("." + suf):
            return suf
    return None


def _meta_model(cfg, task: str) -> Any:
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    cls = {"classification": AutoModelForSequenceClassification, "causal-lm": AutoModelForCausalLM}.get(task)
    if cls is None:
        raise ProblemError(f"unknown task {task!r}; expected 'classification' or 'causal-lm'")
    with torch.device("meta"):
        return cls.from_config(cfg)


def build(cls, config: Any, *, batch_size: int, seq_len: int, rank: int, targets: Sequence[str] | None,
          task: str, dtype: str | None, optimizer: str, num_labels: int, rank_scaling: bool, padded: bool = False):
    from torch import nn

    if int(batch_size) < 1 or int(seq_len) < 1:
        raise ProblemError(f"batch_size and seq_len must be >= 1, got {batch_size!r} and {seq_len!r}")
    if int(rank) < 1:
        raise ProblemError(f"LoRA rank must be >= 1, got {rank!r}")
    cfg = resolve_config(config, num_labels)
    fam = _family(cfg)
    targets = tuple(targets) if targets else _DEFAULT_TARGETS[fam]
    model = _meta_model(cfg, task)
    if dtype is None:
        dtype = default_dtype(sum(p.numel() for p in model.parameters()))
    e = dtype_bytes(dtype)
    states = opt_states(optimizer)

    b, s, R = int(batch_size), int(seq_len), int(rank)
    T = b * s
    h = int(getattr(cfg, "hidden_size", getattr(cfg, "n_embd", 0)))
    heads = int(getattr(cfg, "num_attention_heads", getattr(cfg, "n_head", 1)))
    f = int(getattr(cfg, "intermediate_size", None) or getattr(cfg, "n_inner", None) or 4 * h)
    head_dim = int(getattr(cfg, "head_dim", None) or h // heads)
    kv = int(getattr(cfg, "num_key_value_heads", None) or heads) * head_dim
    lse = T * heads * 4
    mask = b * s * s * e if padded else 0  # explicit SDPA mask, saved again by every block
    if padded and fam == "llama":
        kv = h  # repeat_kv: keys and values expanded to all heads before the masked SDPA call
    if fam == "bert":
        segments = [4 * T * h * e + lse + mask, T * h * e + 2 * T * 4, T * f * e, T * h * e + 2 * T * 4]
        tail = 0
    elif fam == "gpt2":
        kv_copies = 2 * T * h * e if getattr(cfg, "use_cache", True) else 0
        segments = [T * h * e + 2 * T * 4, 3 * T * h * e + kv_copies + T * h * e + lse + mask, T * h * e + 2 * T * 4,
                    4 * T * f * e, 0]
        tail = T * h * e + 2 * T * 4
    else:
        norm = T * h * 4 + T * 4
        segments = [norm, T * h * e + 2 * T * kv * e + T * h * e + lse + mask, norm, 3 * T * f * e, 0]
        tail = norm + 2 * s * head_dim * e

    # modules
    specs, param_train, rank_act, inp = [], {}, {}, {}
    lora_bytes = 0
    for name, mod in model.named_modules():
        suf = _suffix(name, fam)
        if suf is None or not any(name == t or name.endswith("." + t) for t in targets):
            continue
        w = getattr(mod, "weight", None)
        if w is None or w.dim() != 2:
            continue
        d_in, d_out = (int(w.shape[1]), int(w.shape[0])) if isinstance(mod, nn.Linear) else (
            int(w.shape[0]), int(w.shape[1]))  # transformers Conv1D stores [in, out]
        m = re.search(r"(?:^|\.)(\d+)(?:\.|$)", name)
        if m is None:
            continue
        group = next((",".join(g) for g in _SHARED[fam] if suf in g), suf)
        specs.append(ModuleSpec(name=name, block=int(m.group(1)), d_in=d_in, d_out=d_out, max_rank=R,
                                kind=kind_of(name), group=group, order=_ORDER[fam].index(suf)))
        pbytes = R * (d_in + d_out) * e
        lora_bytes += pbytes
        param_train[name] = (1 + states) * pbytes + 2 * opt_scalar_bytes(optimizer)  # A and B: a step each
        rank_act[name] = T * R * e
        inp[name] = T * d_in * e
    if not specs:
        raise ProblemError(f"no module of {cfg.model_type!r} matches targets {list(targets)}; "
                           f"adaptable: {', '.join(_ORDER[fam])}")
    nb = int(getattr(cfg, "num_hidden_layers", getattr(cfg, "n_layer", 0)))
    first_entry = min(_ENTRY[fam][_suffix(sp.name, fam)] for sp in specs)
    full = sum(segments)
    partial = sum(segments[first_entry:])
    # a_j = P(j) - P(j+1) with P(l) = partial(l) + full * (L-1-l) + tail
    a = [full] * nb
    a[nb - 1] = partial + tail
    if nb > 1:
        a = [full] * (nb - 1) + [partial + tail]
    discount = {sp.kind: partial - sum(segments[_ENTRY[fam][_suffix(sp.name, fam)]:]) for sp in specs}
    discount = {k: v for k, v in discount.items() if v > 0}

    static = sum(p.numel() for p in model.parameters()) * e + lora_bytes
    static += sum(buf.numel() * buf.element_size() for buf in model.buffers())
    head_params = sum(p.numel() for n, p in model.named_parameters()
                      if n.startswith(("classifier", "score"))) if task == "classification" else 0
    if task == "classification":
        if fam == "bert":
            head_act = b * h * e + b * num_labels * e + b * 8 + 4
        else:
            head_act = T * h * e + b * num_labels * e + 3 * b * 8 + 4
    else:  # causal LM: the (frozen, tied) LM head saves nothing until something trains: log-softmax in tail
        head_act = 0
        vocab = int(cfg.vocab_size)
        a[nb - 1] += T * vocab * 4 + (T * vocab * 4 if e != 4 else 0)
    head = head_act + (1 + states) * head_params * e
    # Peak transient above the saved-tensor count (issue 13): the gradients alive at once in a block's
    # backward, the input and output gradients of its widest linear (2 T max(f, 3h) e; GPT-2's fused
    # c_attn is 3h wide) and the float32 residual-stream gradient (T h 4), plus, for a causal LM, the
    # float32 logits' gradient and the log-softmax buffer (2 T V 4: SmolLM2's 49k vocabulary makes this
    # the largest term). A first-order count; bench/memory_peak.py reports its distance to the
    # calibrated transients on small configs.
    transient = 2 * T * max(f, 3 * h) * e + T * h * 4
    if task != "classification":
        transient += 2 * T * int(cfg.vocab_size) * 4
    return cls(modules=tuple(specs), static_bytes=int(static), head_bytes=int(head), block_costs=tuple(a),
               param_train_bytes=param_train, rank_act_bytes=rank_act, input_bytes=inp, entry_discount=discount,
               batch_size=b, seq_len=s, dtype=dtype_name(dtype), optimizer=optimizer,
               rank_scaling=rank_scaling, source=f"analytic:{cfg.model_type}", head_act_bytes=int(head_act),
               transient_bytes=(int(transient),) * nb, head_transient_bytes=int(transient))
