"""Task kinds: registry, inference, losses, evaluation metrics, default targets, training, peft round trip."""

import math

import numpy as np
import pytest
import torch
import torch.nn as nn
from datasets import Dataset

from fedkernels.errors import ConfigError
from fedkernels.federated import FederatedConfig
from fedkernels.federated.instruct import IGNORE
from fedkernels.federated.model import build_causal_lm, default_lora_targets
from fedkernels.federated.tasks import (
    TASKS,
    CausalLMTask,
    ClassificationTask,
    get_task,
    infer_task,
    rouge_l,
    task_from_config,
)
from fedkernels.nn import LoRAConfig
from tests.nn.models import tiny_bert


def _instructions(n=12):
    words = ["alpha", "beta", "gamma", "delta"]
    return Dataset.from_dict({
        "instruction": [f"Repeat the word {words[i % 4]}." for i in range(n)],
        "input": [" ".join(["please"] * (i % 3)) for i in range(n)],  # prompts of 3 lengths
        "output": [f"{words[i % 4]} {words[i % 4]}" for i in range(n)],
        "task": ["echo" if i % 3 else "other" for i in range(n)],
    })


@pytest.fixture(scope="module")
def llama():
    task = get_task("causal-lm", gen_eval_per_task=3, max_new_tokens=5)
    tok, model, layers, head = task.build_model("tiny-llama", LoRAConfig(r=4, alpha=8.0), seed=0)
    data = task.tokenize(_instructions(), tok, 32)
    return task, tok, model, layers, data


def test_registry_and_unknown_names():
    assert set(TASKS) == {"classification", "causal-lm"}
    assert isinstance(get_task("classification"), ClassificationTask)
    assert ClassificationTask.trains_head and not CausalLMTask.trains_head
    with pytest.raises(ConfigError, match=r"unknown task 'seq2seq'; valid tasks: \['causal-lm', 'classification'\]"):
        get_task("seq2seq")
    with pytest.raises(ConfigError, match="max_new_tokens must be an integer >= 1, got 0"):
        CausalLMTask(max_new_tokens=0)


def test_infer_task_from_columns():
    assert infer_task(["text", "label"]) == "classification"
    assert infer_task(["instruction", "input", "output"]) == "causal-lm"
    assert infer_task(["instruction", "context", "response", "category"]) == "causal-lm"  # Dolly
    assert infer_task(["body", "y"], {"text": "body", "label": "y"}) == "classification"
    with pytest.raises(ConfigError, match=r"columns found: \['body', 'y'\]"):
        infer_task(["body", "y"])
    cfg = FederatedConfig(dataset="x.jsonl")
    assert isinstance(task_from_config(cfg, ["instruction", "output"]), CausalLMTask)
    lm = task_from_config(FederatedConfig(task="causal-lm", eval_every=3, max_new_tokens=7, gen_eval_per_task=2))
    assert (lm.max_new_tokens, lm.gen_eval_per_task, lm.generates) == (7, 2, True)


def test_config_validates_task_fields():
    with pytest.raises(ConfigError, match="FederatedConfig.task must be None"):
        FederatedConfig(task="seq2seq")
    with pytest.raises(ConfigError, match=r"FederatedConfig.max_new_tokens must be an integer >= 1, got 0"):
        FederatedConfig(max_new_tokens=0)
    with pytest.raises(ConfigError, match="'answer': 'resp'"):
        FederatedConfig(columns={"answer": "resp"})
    cfg = FederatedConfig().with_overrides(["task=causal-lm", "eval_every=2", "columns=output:response"])
    assert cfg.task == "causal-lm" and cfg.eval_every == 2 and cfg.columns == {"output": "response"}


def test_lm_loss_is_hf_loss_and_finite_when_all_masked(llama):
    task, _, model, _, data = llama
    batch = data.batch([0, 1, 2, 3])
    ours = task.loss(model, batch)
    hf = model(**batch).loss  # transformers' own shifted CE with ignore_index -100
    torch.testing.assert_close(ours, hf.float(), rtol=1e-5, atol=1e-6)
    masked = {**batch, "labels": torch.full_like(batch["labels"], IGNORE)}
    loss = task.loss(model, masked)
    assert torch.isfinite(loss) and loss.item() == 0.0
    loss.backward()  # a zero gradient, not NaN
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is None or torch.isfinite(g).all() for g in grads)
    model.zero_grad(set_to_none=True)


def test_classification_loss_and_evaluate():
    task = get_task("classification")
    model = tiny_bert(num_labels=3)
    g = torch.Generator().manual_seed(0)

    class Data:
        input_ids = torch.randint(0, 100, (10, 7), generator=g)
        attention_mask = torch.ones(10, 7, dtype=torch.long)
        labels = torch.randint(0, 3, (10,), generator=g)

        def batch(self, idx):
            idx = torch.as_tensor(np.asarray(idx))
            return {"input_ids": self.input_ids[idx], "attention_mask": self.attention_mask[idx],
                    "labels": self.labels[idx]}

    data = Data()
    with torch.no_grad():
        logits = model(input_ids=data.input_ids, attention_mask=data.attention_mask).logits
    metrics = task.evaluate(model, data, range(10), batch_size=4)
    assert metrics["accuracy"] == pytest.approx(float((logits.argmax(-1) == data.labels).float().mean()))
    assert metrics["loss"] == pytest.approx(float(nn.functional.cross_entropy(logits, data.labels)), rel=1e-5)
    assert (task.partition_labels(data) == data.labels.numpy()).all()


def test_rouge_l_known_pair():
    # LCS("the cat sat on the mat", "the cat on the mat") = 5 words: P = 5/5, R = 5/6, F = 2PR/(P+R) = 10/11.
    assert rouge_l("the cat on the mat", "the cat sat on the mat") == pytest.approx(10 / 11)
    assert rouge_l("Positive!", "positive") == 1.0
    assert rouge_l("", "negative") == 0.0


def test_generation_schedule_is_the_configs():
    # one schedule: the config's evaluates_at; the task only declares whether scheduled rounds generate
    cfg = FederatedConfig(task="causal-lm", rounds=7, eval_every=3, eval_last=1)
    assert [r for r in range(1, 8) if cfg.evaluates_at(r)] == [3, 6, 7]
    assert CausalLMTask(gen_eval_per_task=1).generates and not CausalLMTask(gen_eval_per_task=0).generates
    assert not ClassificationTask().generates


def test_evaluate_loss_perplexity_and_generation_scores(llama):
    task, _, model, _, data = llama
    idx = np.arange(len(data))
    m = task.evaluate(model, data, idx, generate=True)
    batch = data.batch(idx)
    with torch.no_grad():
        whole = float(task.loss(model, batch))  # token-weighted mean over the same rows
    assert m["loss"] == pytest.approx(whole, rel=1e-5) and m["perplexity"] == pytest.approx(math.exp(whole))
    assert set(data.task_names) == {"echo", "other"}
    for t in data.task_names:
        assert f"rougeL/{t}" in m and f"exact_match/{t}" in m and f"loss/{t}" in m
    assert m["rougeL"] == pytest.approx(np.mean([m[f"rougeL/{t}"] for t in data.task_names]))
    assert "rougeL" not in task.evaluate(model, data, idx)  # generation only when asked


def test_batched_generation_equals_one_by_one(llama):
    task, _, model, _, data = llama
    rows = [0, 1, 5]  # prompts of different lengths: left padding must not change the continuation
    assert len({len(data.prompt_ids[r]) for r in rows}) > 1
    batched = task.generate(model, data, rows, batch_size=3)
    single = [task.generate(model, data, [r], batch_size=1)[0] for r in rows]
    assert batched == single


def test_scores_are_perfect_for_a_model_that_answers_right(llama):
    task, tok, _, _, data = llama

    class Oracle(nn.Module):
        """Emits the reference answer of the row whose prompt it is given, then EOS."""

        def generate(self, input_ids, attention_mask, generation_config):
            out = []
            for k in range(input_ids.shape[0]):
                p = input_ids[k][attention_mask[k].bool()].tolist()
                row = data.prompt_ids.index(p)
                ans = tok(data.references[row], add_special_tokens=False)["input_ids"] + [data.eos_token_id]
                out.append(input_ids[k].tolist() + ans + [data.pad_token_id] * 8)
            width = max(len(o) for o in out)
            return torch.tensor([o + [data.pad_token_id] * (width - len(o)) for o in out])

    m = task.generation_metrics(Oracle(), data, np.arange(len(data)))
    assert m["rougeL"] == pytest.approx(1.0) and m["exact_match"] == 1.0


def test_default_targets_per_architecture():
    _, llama, layers, head = build_causal_lm("tiny-llama", LoRAConfig(r=2), seed=0)
    assert head is None and default_lora_targets(llama) == ["q_proj", "v_proj"]
    assert sorted({n.rsplit(".", 1)[-1] for n in layers}) == ["q_proj", "v_proj"]
    _, gpt2, layers, _ = build_causal_lm("tiny-gpt2", LoRAConfig(r=2), seed=0)
    assert sorted({n.rsplit(".", 1)[-1] for n in layers}) == ["c_attn"]
    assert all(layer.fan_in_fan_out for layer in layers.values())  # GPT-2 Conv1D stores W as [in, out]
    assert default_lora_targets(tiny_bert()) == ["query", "value"]
    _, _, chosen, _ = build_causal_lm("tiny-llama", LoRAConfig(r=2), seed=0, targets=["o_proj"])
    assert sorted({n.rsplit(".", 1)[-1] for n in chosen}) == ["o_proj"]
    with pytest.raises(ConfigError, match="no default LoRA targets for Sequential"):
        default_lora_targets(nn.Sequential(nn.Linear(2, 2)))


def test_lora_steps_lower_the_lm_loss():
    task = get_task("causal-lm")
    every_linear = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    tok, model, layers, _ = task.build_model("tiny-llama", LoRAConfig(r=8, alpha=16.0), seed=0, targets=every_linear)
    data = task.tokenize(_instructions(8), tok, 32)
    with torch.no_grad():
        # The final RMSNorm fixes the hidden state's scale and the random head has std 0.02, so logits stay
        # within about +-0.6 and no adapter can move the loss far from ln(30522) = 10.33: scale the frozen head.
        model.lm_head.weight.mul_(25.0)
        for layer in layers.values():  # B = 0 at init: start the adapters off zero so both factors learn
            nn.init.normal_(layer.lora_B, std=0.02)
    params = [p for p in model.parameters() if p.requires_grad]
    adapters = {id(t) for lay in layers.values() for t in (lay.lora_A, lay.lora_B)}
    assert {id(p) for p in params} == adapters  # only the adapters train
    opt = torch.optim.AdamW(params, lr=5e-2)
    batch = data.batch(np.arange(8))
    with torch.no_grad():
        first = float(task.loss(model, batch))
    for _ in range(15):
        opt.zero_grad()
        task.loss(model, batch).backward()
        opt.step()
    with torch.no_grad():
        last = float(task.loss(model, batch))
    assert last < 0.8 * first, (first, last)


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-gpt2"])
def test_peft_round_trip_generates_identical_tokens(tmp_path, preset):
    from peft import PeftModel, PeftModelForCausalLM

    from fedkernels.federated.model import _tiny_causal_lm
    from fedkernels.nn.peft_interop import export_peft

    task = get_task("causal-lm", max_new_tokens=8)
    tok, model, layers, _ = task.build_model(preset, LoRAConfig(r=4, alpha=8.0), seed=0)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for layer in layers.values():  # a trained-looking adapter: B != 0 changes the output
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.5)
    data = task.tokenize(_instructions(6), tok, 32)
    ours = task.generate(model, data, range(6))
    path = export_peft(model, tmp_path / "adapter", task_type="CAUSAL_LM")
    torch.manual_seed(0)  # build_causal_lm seeds the base init with `seed`: the same random base again
    _, base = _tiny_causal_lm(preset)
    peft_model = PeftModel.from_pretrained(base.eval(), str(path))
    assert isinstance(peft_model, PeftModelForCausalLM)
    theirs = task.generate(peft_model, data, range(6))
    assert theirs == ours
    # Not vacuous: without the adapter the base generates something else.
    with peft_model.disable_adapter():
        assert task.generate(peft_model, data, range(6)) != ours
