"""inject_lora on real transformers architectures, export to vanilla peft and back."""

import json

import pytest
import torch
from peft import PeftModel

from fedkernels.errors import AdapterFormatError, ConfigError, NonFiniteError, UnknownModuleError
from fedkernels.nn import LoRAConfig, export_peft, from_peft, inject_lora, load_adapter, lora_modules

from .models import batch, tiny_bert, tiny_gpt2, tiny_llama

CASES = [
    ("bert", tiny_bert, ["query", "value"], ["classifier"]),
    ("llama", tiny_llama, ["q_proj", "v_proj", "down_proj"], []),
    ("gpt2", tiny_gpt2, ["c_attn", "c_proj"], []),  # Conv1D: weight stored [in, out]
]


def logits(model, b):
    with torch.no_grad():
        return model(**b).logits


def train_few_steps(model, b, steps=3):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    model.train()
    for _ in range(steps):
        out = model(**b)
        loss = out.logits.float().pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


@pytest.mark.parametrize("name,factory,targets,save", CASES, ids=[c[0] for c in CASES])
def test_inject_train_export_load_in_peft(name, factory, targets, save, tmp_path):
    torch.manual_seed(0)
    model = factory()
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    b = batch()
    before = logits(model, b)
    cfg = LoRAConfig(r=8, alpha=16, target_modules=targets, modules_to_save=save, rank_pattern={r"\.1\.": 4})
    layers = inject_lora(model, cfg)
    # 2 blocks; GPT-2's c_proj exists in both attention and MLP
    assert len(layers) == 2 * len(targets) + (2 if name == "gpt2" else 0)
    torch.testing.assert_close(logits(model, b), before)  # B = 0: still the base model
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or any(s in n for s in save) for n in trainable)
    # heterogeneous plan: one module masked to rank 2, one frozen and never trained (excluded from export)
    names = list(layers)
    layers[names[0]].set_active_rank(2)
    layers[names[-1]].trainable = False
    train_few_steps(model, b)
    ours = logits(model, b)
    assert not torch.allclose(ours, before)
    out = export_peft(model, tmp_path / "adapter")
    cfg_json = json.loads((out / "adapter_config.json").read_text())
    assert names[-1].replace(".", r"\.") not in cfg_json["target_modules"]
    assert cfg_json["fan_in_fan_out"] is (name == "gpt2")

    fresh = factory()
    fresh.load_state_dict(base_state)
    peft_model = PeftModel.from_pretrained(fresh, str(out)).eval()
    torch.testing.assert_close(logits(peft_model, b), ours, atol=1e-5, rtol=1e-5)
    # the rank-2 module really is rank 2 inside peft
    lora_a = dict(peft_model.named_modules())[f"base_model.model.{names[0]}"].lora_A["default"].weight
    assert lora_a.shape[0] == 2

    # from_peft round trip: a plain model with our layers, same outputs, trainable again
    back = from_peft(peft_model)
    assert set(lora_modules(back)) == set(names[:-1])
    torch.testing.assert_close(logits(back, b), ours, atol=1e-5, rtol=1e-5)

    # load_adapter into a freshly injected model reproduces the outputs too
    again = factory()
    again.load_state_dict(base_state)
    inject_lora(again, cfg)
    loaded = load_adapter(again, out)
    assert loaded[names[0]] == 2
    torch.testing.assert_close(logits(again, b), ours, atol=1e-5, rtol=1e-5)


def test_layers_to_transform_and_regex_targets():
    model = tiny_bert(layers=3)
    layers = inject_lora(model, LoRAConfig(target_modules=["query"], layers_to_transform=[0, 2]))
    assert sorted(layers) == ["bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.2.attention.self.query"]
    model = tiny_bert(layers=3)
    layers = inject_lora(model, LoRAConfig(target_modules=r"bert\.encoder\.layer\.1\.attention\.self\.(query|key)"))
    assert len(layers) == 2


def test_bad_inputs_raise_typed_errors(tmp_path):
    with pytest.raises(UnknownModuleError, match="'qkv_proj'"):
        inject_lora(tiny_bert(), LoRAConfig(target_modules=["query", "qkv_proj"]))
    with pytest.raises(ConfigError, match="-3"):
        LoRAConfig(r=-3)
    with pytest.raises(ConfigError, match="1.5"):
        LoRAConfig(dropout=1.5)
    model = tiny_bert()
    inject_lora(model, LoRAConfig())
    # a pickle adapter is refused, and its payload never runs
    sentinel = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(sentinel), "w"))

    torch.save({"x": Evil()}, tmp_path / "adapter_model.bin")
    with pytest.raises(AdapterFormatError, match="pickle"):
        load_adapter(model, tmp_path / "adapter_model.bin")
    with pytest.raises(AdapterFormatError, match="no adapter_model.safetensors"):
        load_adapter(model, tmp_path)
    assert not sentinel.exists()
    # truncated safetensors and NaN values fail cleanly
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":")
    with pytest.raises(AdapterFormatError, match="not a valid safetensors"):
        load_adapter(model, tmp_path / "bad")
    layer = next(iter(lora_modules(model).values()))
    torch.nn.init.normal_(layer.lora_B)
    out = export_peft(model, tmp_path / "good")
    from safetensors.torch import load_file, save_file

    t = load_file(str(out / "adapter_model.safetensors"))
    key = next(k for k in t if k.endswith("lora_B.weight"))
    t[key][0, 0] = float("nan")
    save_file(t, str(out / "adapter_model.safetensors"))
    with pytest.raises(NonFiniteError, match=key.replace(".", r"\.")):
        load_adapter(model, out)
