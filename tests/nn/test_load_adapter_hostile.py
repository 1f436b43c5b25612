"""Issue 12 items 12-15: a hostile or broken adapter folder is refused with the documented typed error, naming the
file and the key, and leaves the model unchanged."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from fedkernels.errors import AdapterFormatError, FedKernelsError, NonFiniteError, ShapeError, UnknownModuleError
from fedkernels.nn import LoRAConfig, export_peft, inject_lora, load_adapter, lora_modules

from .models import tiny_bert

REPO = Path(__file__).resolve().parents[2]


def _model():
    torch.manual_seed(0)
    model = tiny_bert()
    inject_lora(model, LoRAConfig(r=8, alpha=16.0, modules_to_save=["classifier"]))
    return model


@pytest.fixture
def adapter(tmp_path):
    """A valid exported adapter (every module at rank 8, non-zero B) and a fresh model to load it into."""
    src = _model()
    for layer in lora_modules(src).values():
        torch.nn.init.normal_(layer.lora_B)
    out = export_peft(src, tmp_path / "adapter")
    return out, _model()


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _unchanged(model, before):
    after = model.state_dict()
    return all(torch.equal(before[k], after[k]) for k in before)


def _assert_refused(model, out, err, match):
    """``load_adapter`` raises ``err`` (message matching ``match``) and leaves every model tensor as it was."""
    before = _state(model)
    with pytest.raises(err, match=match):
        load_adapter(model, out)
    assert _unchanged(model, before)


def _edit_config(folder: Path, **changes):
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg.update(changes)
    (folder / "adapter_config.json").write_text(json.dumps(cfg))  # json.dumps writes NaN / Infinity as such


def _edit_tensors(folder: Path, fn):
    t = load_file(str(folder / "adapter_model.safetensors"))
    fn(t)
    save_file(t, str(folder / "adapter_model.safetensors"))


def test_valid_adapter_loads(adapter):
    out, model = adapter
    loaded = load_adapter(model, out)
    assert loaded and set(loaded.values()) == {8}


# ------------------------------------------------------------------ item 12: lora_alpha / r in the config
@pytest.mark.parametrize("alpha,err", [(float("nan"), NonFiniteError), (float("inf"), NonFiniteError),
                                        (1e300, AdapterFormatError), (-16.0, AdapterFormatError),
                                        ("16", AdapterFormatError), (True, AdapterFormatError)])
def test_bad_lora_alpha_refused(adapter, alpha, err):
    out, model = adapter
    _edit_config(out, lora_alpha=alpha)
    _assert_refused(model, out, err, r"adapter_config\.json.*lora_alpha")


def test_bad_alpha_pattern_value_refused(adapter):
    out, model = adapter
    name = next(iter(lora_modules(model)))
    _edit_config(out, alpha_pattern={name: float("nan")})
    with pytest.raises(NonFiniteError, match=r"alpha_pattern.*" + name.replace(".", r"\.")):
        load_adapter(model, out)


@pytest.mark.parametrize("changes,err,match", [
    ({"r": 0}, AdapterFormatError, r"adapter_config\.json.*key 'r'"),
    ({"r": -4}, AdapterFormatError, r"adapter_config\.json.*key 'r'"),
    ({"r": 10**9}, AdapterFormatError, r"adapter_config\.json.*key 'r'"),
    ({"r": 8.5}, AdapterFormatError, r"adapter_config\.json.*key 'r'"),
    ({"r": "8"}, AdapterFormatError, r"adapter_config\.json.*key 'r'"),
    ({"r": 4}, ShapeError, "declares rank 4"),  # r disagreeing with the tensors
    # alpha within bounds but alpha / r above the scale cap (B * scale would overflow fp16)
    ({"lora_alpha": 1e6}, AdapterFormatError, "LoRA scale"),
], ids=["r0", "r-4", "r1e9", "r8.5", "r-str", "r-mismatch", "huge-scale"])
def test_bad_r_or_scale_refused(adapter, changes, err, match):
    out, model = adapter
    _edit_config(out, **changes)
    _assert_refused(model, out, err, match)


# ------------------------------------------------------------------ item 13: pathological pattern keys
def test_catastrophic_pattern_key_finishes_fast(tmp_path):
    """``([\\w.]+)+Z`` backtracks exponentially over a 40-character module name under peft's
    ``re.match(rf"(.*\\.)?({key})$", name)``; the loader must refuse it in well under a second. Run in a child
    process so that a regression shows as a timeout, not as a hung test run."""
    script = textwrap.dedent(f"""
        import json, sys, time
        import torch, torch.nn as nn
        from fedkernels.errors import AdapterFormatError
        from fedkernels.nn import LoRAConfig, export_peft, inject_lora, load_adapter, lora_modules

        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.blocks = nn.ModuleList([nn.Module()])
                self.blocks[0].self_attention_output_projection_q = nn.Linear(16, 16)

        model = Net()
        inject_lora(model, LoRAConfig(r=4, target_modules=["self_attention_output_projection_q"]))
        for layer in lora_modules(model).values():
            nn.init.normal_(layer.lora_B)
        out = export_peft(model, {str(tmp_path / "a")!r})
        cfg = json.loads((out / "adapter_config.json").read_text())
        cfg["alpha_pattern"] = {{r"([\\w.]+)+Z": 4.0}}
        cfg["rank_pattern"] = {{r"([\\w.]+)+Z": 4}}
        (out / "adapter_config.json").write_text(json.dumps(cfg))
        t0 = time.perf_counter()
        try:
            load_adapter(model, out)
            outcome = "loaded"
        except AdapterFormatError as exc:
            outcome = "refused: " + str(exc)
        print(json.dumps({{"seconds": time.perf_counter() - t0, "outcome": outcome}}))
    """)
    env = {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    try:
        proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    except subprocess.TimeoutExpired:
        pytest.fail("load_adapter hung on a catastrophic-backtracking alpha_pattern key (> 120 s with imports)")
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["seconds"] < 1.0, res
    assert res["outcome"].startswith("refused") and "regular expression" in res["outcome"], res


@pytest.mark.parametrize("key", ["(", "[a-", "q(?P<x", "a{2,1}"])
def test_invalid_regex_keys_are_typed(adapter, key):
    out, model = adapter
    _edit_config(out, alpha_pattern={key: 2.0})
    with pytest.raises(AdapterFormatError, match=r"adapter_config\.json.*alpha_pattern"):
        load_adapter(model, out)


def test_literal_and_suffix_keys_match_like_peft(adapter):
    """peft's ``(.*\\.)?key$``: a key names a module exactly or as a dotted suffix; escaped keys (export_peft)
    are read literally. A suffix alpha of 32 at rank 8 (scale 4 against the layer's 2) doubles B."""
    out, model = adapter
    ref = _model()
    load_adapter(ref, out)
    _edit_config(out, alpha_pattern={"query": 32.0, r"bert\.encoder\.layer\.1\.attention\.self\.value": 32.0})
    load_adapter(model, out)
    for name, layer in lora_modules(model).items():
        expect = 2.0 if name.endswith(".query") or name == "bert.encoder.layer.1.attention.self.value" else 1.0
        torch.testing.assert_close(layer.lora_B, lora_modules(ref)[name].lora_B * expect)


# ------------------------------------------------------------------ item 14: modules_to_save shapes
@pytest.mark.parametrize("bad", ["scalar_bias", "row_weight", "big_weight"])
def test_head_tensor_must_match_exactly(adapter, bad):
    out, model = adapter
    key_w = "base_model.model.classifier.weight"
    key_b = "base_model.model.classifier.bias"

    def tamper(t):
        if bad == "scalar_bias":
            t[key_b] = torch.tensor(5.0)
        elif bad == "row_weight":
            t[key_w] = torch.randn(1, t[key_w].shape[1])  # would broadcast over the 3 labels
        else:
            t[key_w] = torch.randn(t[key_w].shape[0] + 1, t[key_w].shape[1])

    _edit_tensors(out, tamper)
    _assert_refused(model, out, ShapeError, r"adapter_model\.safetensors.*classifier\.(weight|bias).*no broadcasting")


def test_nan_head_is_non_finite(adapter):
    out, model = adapter

    def tamper(t):
        t["base_model.model.classifier.bias"][0] = float("nan")

    _edit_tensors(out, tamper)
    with pytest.raises(NonFiniteError, match="classifier.bias"):
        load_adapter(model, out)


# ------------------------------------------------------------------ item 15: every failure typed, names file and key
def test_config_not_json(adapter):
    out, model = adapter
    (out / "adapter_config.json").write_text("{ not json")
    with pytest.raises(AdapterFormatError, match=r"adapter_config\.json.*not valid JSON"):
        load_adapter(model, out)


@pytest.mark.parametrize("raw", ["[1, 2]", '"LORA"', "null"])
def test_config_not_an_object(adapter, raw):
    out, model = adapter
    (out / "adapter_config.json").write_text(raw)
    with pytest.raises(AdapterFormatError, match=r"adapter_config\.json.*JSON object"):
        load_adapter(model, out)


@pytest.mark.parametrize("field,value", [("alpha_pattern", [1, 2]), ("rank_pattern", "q"), ("use_rslora", "yes"),
                                         ("alpha_pattern", {"": 2.0}), ("rank_pattern", {"query": 2.5})])
def test_config_wrong_types(adapter, field, value):
    out, model = adapter
    _edit_config(out, **{field: value})
    with pytest.raises(AdapterFormatError, match=rf"adapter_config\.json.*{field}"):
        load_adapter(model, out)


def test_A_rank_2_beside_B_rank_8(adapter):
    out, model = adapter
    name = next(iter(lora_modules(model)))
    key_a = f"base_model.model.{name}.lora_A.weight"

    def tamper(t):
        t[key_a] = t[key_a][:2].contiguous()

    _edit_tensors(out, tamper)
    _assert_refused(model, out, ShapeError, r"A has rank 2 but B has rank 8")


def test_A_without_B(adapter):
    out, model = adapter
    name = next(iter(lora_modules(model)))

    def tamper(t):
        del t[f"base_model.model.{name}.lora_B.weight"]

    _edit_tensors(out, tamper)
    with pytest.raises(AdapterFormatError, match="has lora_A but no lora_B"):
        load_adapter(model, out)


def test_1d_factor_and_integer_factor(adapter):
    out, model = adapter
    name = next(iter(lora_modules(model)))
    key_b = f"base_model.model.{name}.lora_B.weight"
    for bad in (lambda t: t.reshape(-1), lambda t: t.to(torch.int64)):
        _edit_tensors(out, lambda t, bad=bad: t.__setitem__(key_b, bad(t[key_b]).contiguous()))
        with pytest.raises(ShapeError, match=key_b.replace(".", r"\.")):
            load_adapter(model, out)
        export_dir_restore = load_file(str(out / "adapter_model.safetensors"))
        export_dir_restore[key_b] = torch.randn(32, 8)
        save_file(export_dir_restore, str(out / "adapter_model.safetensors"))


def test_unknown_parameter_of_a_saved_module(adapter):
    """``classifier.nope`` under a modules_to_save entry: nn.Module.get_parameter raises AttributeError."""
    out, model = adapter

    def tamper(t):
        t["base_model.model.classifier.nope"] = torch.zeros(3)

    _edit_tensors(out, tamper)
    with pytest.raises(UnknownModuleError, match=r"adapter_model\.safetensors.*classifier\.nope"):
        load_adapter(model, out)
    assert load_adapter(model, out, strict=False)


def test_every_failure_is_a_fedkernels_error(adapter):
    out, model = adapter
    (out / "adapter_config.json").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(FedKernelsError):
        load_adapter(model, out)


# ------------------------------------------------------------------ from_peft
def _peft_model():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    return get_peft_model(tiny_bert(), LoraConfig(r=4, lora_alpha=8, target_modules=["query"]))


def test_from_peft_nan_factor_is_non_finite():
    from fedkernels.nn import from_peft

    pm = _peft_model()
    lay = next(m for n, m in pm.named_modules() if n.endswith("query") and hasattr(m, "lora_B"))
    with torch.no_grad():
        lay.lora_B["default"].weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"query.*lora_B"):
        from_peft(pm)


def test_from_peft_non_finite_scaling_and_bad_input():
    from fedkernels.nn import from_peft

    pm = _peft_model()
    lay = next(m for n, m in pm.named_modules() if n.endswith("query") and hasattr(m, "lora_B"))
    lay.scaling["default"] = float("inf")
    with pytest.raises(NonFiniteError, match="query.*scaling"):
        from_peft(pm)
    with pytest.raises(AdapterFormatError, match="expects a peft model"):
        from_peft(object())
