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

The modules' shapes and the parameter count come from the model's layout. For a preset name they are counted
here from the hyperparameters (`_preset_layout`: no torch or transformers import, so ``plan --model llama-7b``
starts in well under a second); for any other config a meta-device transformers model is built and walked
(`_model_layout`). tests/solvers/test_analytic_presets.py checks that both give the same memory model for
every preset, so the table cannot drift from transformers.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from solvers.errors import ProblemError
from solvers.memspec import ModuleSpec, dtype_bytes, dtype_name, kind_of, opt_scalar_bytes, opt_states

__all__ = ["PRESETS", "resolve_config", "preset_config", "build", "default_dtype", "BF16_FROM_PARAMS"]

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

# The transformers defaults of each preset family's config class, for the fields a preset leaves out: the
# dataclass field defaults of BertConfig, GPT2Config and LlamaConfig in transformers 5.24.0
# (transformers/models/{bert,gpt2,llama}/configuration_{bert,gpt2,llama}.py). Only the fields that shape the
# parameters and buffers are listed; None is what the config class derives (GPT-2 n_inner -> 4 n_embd;
# Llama num_key_value_heads -> num_attention_heads, head_dim -> hidden_size / num_attention_heads).
_CONFIG_DEFAULTS: dict[str, dict[str, Any]] = {
    "bert": dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                 intermediate_size=3072, max_position_embeddings=512, type_vocab_size=2, tie_word_embeddings=True,
                 use_cache=True),
    "gpt2": dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12, n_inner=None,
                 tie_word_embeddings=True, use_cache=True),
    "llama": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=None, head_dim=None, max_position_embeddings=2048,
                  tie_word_embeddings=False, attention_bias=False, mlp_bias=False, use_cache=True),
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


_TASKS = ("classification", "causal-lm")


def preset_config(name: str) -> SimpleNamespace:
    """The hyperparameters of preset `name`: its overrides on the family's transformers defaults (no import)."""
    key = str(name).lower()
    if key not in PRESETS:
        raise ProblemError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    mt, kw = PRESETS[key]
    return SimpleNamespace(model_type=mt, **{**_CONFIG_DEFAULTS[mt], **kw})


def _dims(cfg: Any) -> dict[str, int]:
    """The sizes the memory terms use, from a transformers config or a preset's hyperparameters."""
    h = int(getattr(cfg, "hidden_size", getattr(cfg, "n_embd", 0)))
    heads = int(getattr(cfg, "num_attention_heads", getattr(cfg, "n_head", 1)))
    head_dim = int(getattr(cfg, "head_dim", None) or h // heads)
    return {"h": h, "heads": heads, "head_dim": head_dim,
            "f": int(getattr(cfg, "intermediate_size", None) or getattr(cfg, "n_inner", None) or 4 * h),
            "kv": int(getattr(cfg, "num_key_value_heads", None) or heads) * head_dim,
            "nb": int(getattr(cfg, "num_hidden_layers", getattr(cfg, "n_layer", 0))),
            "vocab": int(cfg.vocab_size), "use_cache": int(bool(getattr(cfg, "use_cache", True)))}


@dataclass(frozen=True)
class _Layout:
    """What `build` needs from the model itself: the adaptable linears and the parameter and buffer totals."""

    linears: tuple[tuple[str, int, int], ...]  # (module name, in features, out features), in named_modules order
    num_params: int
    buffer_bytes: int
    head_params: int  # the classification head's (``classifier`` / ``score``) parameters; 0 for a causal LM


def _meta_model(cfg, task: str) -> Any:
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    cls = {"classification": AutoModelForSequenceClassification, "causal-lm": AutoModelForCausalLM}[task]
    with torch.device("meta"):
        return cls.from_config(cfg)


def _model_layout(model: Any, fam: str, task: str) -> _Layout:
    """The layout of a (meta-device) transformers model, read module by module."""
    from torch import nn

    linears = []
    for name, mod in model.named_modules():
        w = getattr(mod, "weight", None)
        if _suffix(name, fam) is None or w is None or w.dim() != 2:
            continue
        d_in, d_out = (int(w.shape[1]), int(w.shape[0])) if isinstance(mod, nn.Linear) else (
            int(w.shape[0]), int(w.shape[1]))  # transformers Conv1D stores [in, out]
        linears.append((name, d_in, d_out))
    head = sum(p.numel() for n, p in model.named_parameters()
               if n.startswith(("classifier", "score"))) if task == "classification" else 0
    return _Layout(linears=tuple(linears), num_params=sum(p.numel() for p in model.parameters()),
                   buffer_bytes=sum(buf.numel() * buf.element_size() for buf in model.buffers()),
                   head_params=int(head))


def _preset_layout(hp: Any, fam: str, task: str, num_labels: int) -> _Layout:
    """`_model_layout` of the model transformers 5.24.0 builds for `hp` (BertForSequenceClassification /
    BertLMHeadModel, GPT2ForSequenceClassification / GPT2LMHeadModel, LlamaForSequenceClassification /
    LlamaForCausalLM), counted from the hyperparameters. Tied weights count once, as ``parameters()`` does."""
    d = _dims(hp)
    h, f, nb, V, nl = d["h"], d["f"], d["nb"], d["vocab"], int(num_labels)
    untied_lm_head = 0 if hp.tie_word_embeddings else V * h
    linears: list[tuple[str, int, int]] = []
    if fam == "bert":
        P = int(hp.max_position_embeddings)
        shapes = dict(zip(_ORDER[fam], ((h, h), (h, h), (h, h), (h, h), (h, f), (f, h)), strict=True))
        for i in range(nb):
            linears += [(f"bert.encoder.layer.{i}.{suf}", di, do) for suf, (di, do) in shapes.items()]
        # word, position and token-type embeddings + their LayerNorm; per layer the six linears (with bias)
        # and two LayerNorms (weight and bias each)
        params = (V + P + int(hp.type_vocab_size)) * h + 2 * h
        params += nb * (sum(di * do + do for di, do in shapes.values()) + 2 * 2 * h)
        if task == "classification":
            head = h * nl + nl  # classifier (with bias)
            params += h * h + h + head  # + pooler dense
        else:  # no pooler; LM head transform dense + LayerNorm, decoder bias (its weight is the word embedding)
            head = 0
            params += h * h + h + 2 * h + V + untied_lm_head
        buffers = 2 * P * 8  # position_ids and token_type_ids: int64 [1, max_position_embeddings] each
    elif fam == "gpt2":
        P = int(hp.n_positions)
        shapes = dict(zip(_ORDER[fam], ((h, 3 * h), (h, h), (h, f), (f, h)), strict=True))
        for i in range(nb):
            linears += [(f"transformer.h.{i}.{suf}", di, do) for suf, (di, do) in shapes.items()]
        # token and position embeddings; per block four Conv1D (with bias), ln_1 and ln_2; ln_f
        params = (V + P) * h + nb * (sum(di * do + do for di, do in shapes.values()) + 2 * 2 * h) + 2 * h
        head = h * nl if task == "classification" else 0  # score: no bias
        params += head if task == "classification" else untied_lm_head
        buffers = 0
    else:
        q, kv = d["heads"] * d["head_dim"], d["kv"]
        ab, mb = int(bool(hp.attention_bias)), int(bool(hp.mlp_bias))
        shapes3 = {"q_proj": (h, q, ab), "k_proj": (h, kv, ab), "v_proj": (h, kv, ab), "o_proj": (q, h, ab),
                   "gate_proj": (h, f, mb), "up_proj": (h, f, mb), "down_proj": (f, h, mb)}
        for i in range(nb):
            for suf in _ORDER[fam]:
                sub = "mlp" if suf in ("gate_proj", "up_proj", "down_proj") else "self_attn"
                linears.append((f"model.layers.{i}.{sub}.{suf}", shapes3[suf][0], shapes3[suf][1]))
        # token embeddings; per layer seven linears and two RMSNorms (weight only); the final RMSNorm
        params = V * h + nb * (sum(di * do + bias * do for di, do, bias in shapes3.values()) + 2 * h) + h
        head = h * nl if task == "classification" else 0  # score: no bias
        params += head if task == "classification" else untied_lm_head
        # rotary inv_freq and original_inv_freq: float32 [head_dim / 2] each (arange(0, head_dim, 2))
        buffers = 2 * ((d["head_dim"] + 1) // 2) * 4
    return _Layout(linears=tuple(linears), num_params=int(params), buffer_bytes=int(buffers), head_params=int(head))


def _resolve(config: Any, task: str, num_labels: int) -> tuple[Any, str, _Layout]:
    """(config or preset hyperparameters, family, layout). A preset name is counted here, with no torch or
    transformers import; anything else is resolved by transformers and walked as a meta-device model."""
    if isinstance(config, str | Path) and str(config).lower() in PRESETS:
        hp = preset_config(str(config))
        fam = _family(hp)
        return hp, fam, _preset_layout(hp, fam, task, num_labels)
    cfg = resolve_config(config, num_labels)
    fam = _family(cfg)
    return cfg, fam, _model_layout(_meta_model(cfg, task), fam, task)


def build(cls, config: Any, *, batch_size: int, seq_len: int, rank: int, targets: Sequence[str] | None,
          task: str, dtype: str | None, optimizer: str, num_labels: int, rank_scaling: bool, padded: bool = False):
    if int(batch_size) < 1 or int(seq_len) < 1:
        raise ProblemError(f"batch_size and seq_len must be >= 1, got {batch_size!r} and {seq_len!r}")
    if int(rank) < 1:
        raise ProblemError(f"LoRA rank must be >= 1, got {rank!r}")
    if task not in _TASKS:
        raise ProblemError(f"unknown task {task!r}; expected 'classification' or 'causal-lm'")
    cfg, fam, layout = _resolve(config, task, num_labels)
    targets = tuple(targets) if targets else _DEFAULT_TARGETS[fam]
    if dtype is None:
        dtype = default_dtype(layout.num_params)
    e = dtype_bytes(dtype)
    states = opt_states(optimizer)

    b, s, R = int(batch_size), int(seq_len), int(rank)
    T = b * s
    dims = _dims(cfg)
    h, heads, f, head_dim, kv = dims["h"], dims["heads"], dims["f"], dims["head_dim"], dims["kv"]
    lse = T * heads * 4
    mask = b * s * s * e if padded else 0  # explicit SDPA mask, saved again by every block
    if padded and fam == "llama":
        kv = h  # repeat_kv: keys and values expanded to all heads before the masked SDPA call
    if fam == "bert":
        segments = [4 * T * h * e + lse + mask, T * h * e + 2 * T * 4, T * f * e, T * h * e + 2 * T * 4]
        tail = 0
    elif fam == "gpt2":
        kv_copies = 2 * T * h * e if dims["use_cache"] else 0
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
    for name, d_in, d_out in layout.linears:
        suf = _suffix(name, fam)
        if not any(name == t or name.endswith("." + t) for t in targets):
            continue
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
    nb = dims["nb"]
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

    static = layout.num_params * e + lora_bytes + layout.buffer_bytes
    head_params = layout.head_params
    if task == "classification":
        if fam == "bert":
            head_act = b * h * e + b * num_labels * e + b * 8 + 4
        else:
            head_act = T * h * e + b * num_labels * e + 3 * b * 8 + 4
    else:  # causal LM: the (frozen, tied) LM head saves nothing until something trains: log-softmax in tail
        head_act = 0
        vocab = dims["vocab"]
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
        transient += 2 * T * dims["vocab"] * 4
    return cls(modules=tuple(specs), static_bytes=int(static), head_bytes=int(head), block_costs=tuple(a),
               param_train_bytes=param_train, rank_act_bytes=rank_act, input_bytes=inp, entry_discount=discount,
               batch_size=b, seq_len=s, dtype=dtype_name(dtype), optimizer=optimizer,
               rank_scaling=rank_scaling, source=f"analytic:{cfg.model_type}", head_act_bytes=int(head_act),
               transient_bytes=(int(transient),) * nb, head_transient_bytes=int(transient))
