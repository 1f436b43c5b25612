"""Preset models are planned from a hyperparameter table with no torch/transformers import (issue 11 item 7).

The table (`solvers._analytic._CONFIG_DEFAULTS` + `PRESETS`) and the module-by-module count in
`_preset_layout` must give exactly what the meta-device transformers model gives, for every preset and both
tasks: a transformers upgrade that changes a default or a module layout fails here.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from solvers import _analytic
from solvers._analytic import PRESETS, preset_config, resolve_config
from solvers.memory_model import MemoryModel

ROOT = Path(__file__).resolve().parents[2]
TASKS = ("classification", "causal-lm")
# Every adaptable linear of every family (GPT-2's c_proj and BERT's dense suffixes match two kinds each).
ALL_TARGETS = ("query", "key", "value", "dense", "c_attn", "c_proj", "c_fc",
               "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SIZES = dict(batch_size=4, seq_len=64, rank=8)


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_layout_equals_meta_model(name, task):
    hp, cfg = preset_config(name), resolve_config(name, num_labels=3)
    fam = _analytic._family(hp)
    assert _analytic._dims(hp) == _analytic._dims(cfg)
    counted = _analytic._preset_layout(hp, fam, task, num_labels=3)
    walked = _analytic._model_layout(_analytic._meta_model(cfg, task), fam, task)
    assert counted.linears == walked.linears  # names, in and out features, in named_modules order
    assert counted.num_params == walked.num_params
    assert counted.buffer_bytes == walked.buffer_bytes
    assert counted.head_params == walked.head_params


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_memory_model_equals_meta_path(name, task):
    # default targets; every linear with padding; the second-half linears only (a later entry segment), another
    # head width and optimizer. Each family has one of the three suffixes.
    for kw in ({}, {"targets": ALL_TARGETS, "padded": True},
               {"targets": ("c_proj", "output.dense", "down_proj"), "num_labels": 5, "optimizer": "sgd"}):
        fast = MemoryModel.from_config(name, task=task, **SIZES, **kw).to_dict()
        meta = MemoryModel.from_config(resolve_config(name, kw.get("num_labels", 2)), task=task, **SIZES,
                                       **kw).to_dict()
        assert fast == meta, sorted(k for k in fast if fast[k] != meta[k])


def test_preset_shapes_and_dtype():
    mm = MemoryModel.from_config("llama-3-8b", **SIZES, targets=("q_proj", "k_proj"))
    k = mm.spec("model.layers.31.self_attn.k_proj")
    assert (k.d_in, k.d_out, k.block, k.kind) == (4096, 1024, 31, "model.layers.#.self_attn.k_proj")  # 8 KV heads
    assert mm.dtype == "bfloat16" and len(mm.modules) == 64
    gpt = MemoryModel.from_config("gpt2", **SIZES)
    c = gpt.spec("transformer.h.0.attn.c_attn")
    assert (c.d_in, c.d_out) == (768, 2304) and gpt.dtype == "float32"
    bert = MemoryModel.from_config("bert-tiny", **SIZES, targets=("output.dense",))
    assert [s.name for s in bert.modules if s.block == 1] == ["bert.encoder.layer.1.attention.output.dense",
                                                                "bert.encoder.layer.1.output.dense"]


def test_preset_does_not_build_a_model(monkeypatch):
    def refuse(cfg, task):
        raise AssertionError("a preset must not build a transformers model")

    monkeypatch.setattr(_analytic, "_meta_model", refuse)
    assert len(MemoryModel.from_config("llama-7b", **SIZES).modules) == 64
    with pytest.raises(AssertionError, match="must not build"):
        MemoryModel.from_config({"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
                                 "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 100}, **SIZES)


@pytest.mark.parametrize("module", ["solvers", "fedkernels.cli"])
def test_plan_preset_imports_no_torch(module):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    out = subprocess.run([sys.executable, "-X", "importtime", "-m", module, "plan", "--model", "llama-7b",
                          "--budget", "24GiB"], capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
    assert "llama-7b" in out.stdout and "64/64" in out.stdout, out.stdout
    # -X importtime writes "import time: self | cumulative | package" per module to stderr
    imported = {line.rsplit("|", 1)[-1].strip() for line in out.stderr.splitlines() if line.startswith("import time:")}
    assert "solvers._analytic" in imported  # the parse sees the imports
    assert not imported & {"torch", "transformers"}, sorted(imported & {"torch", "transformers"})
