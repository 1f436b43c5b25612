"""Memory model vs measurement on tiny random-init BERT, GPT-2 and Llama models with peft LoRA."""

from __future__ import annotations

import random

import pytest
import torch

from solvers import AllocationProblem
from solvers.errors import ProblemError
from solvers.memory import MemoryModel, find_lora_params, infer_blocks, measure, set_trainable

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

B, S, R = 3, 24, 8
ARCHS = ("bert", "gpt2", "llama")


def _build(kind: str, layers: int = 3):
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        GPT2Config,
        GPT2ForSequenceClassification,
        LlamaConfig,
        LlamaForSequenceClassification,
    )

    torch.manual_seed(0)
    if kind == "bert":
        cfg = BertConfig(vocab_size=120, hidden_size=64, num_hidden_layers=layers, num_attention_heads=4,
                         intermediate_size=128, num_labels=3)
        model, targets = BertForSequenceClassification(cfg), ["query", "value", "intermediate.dense"]
    elif kind == "gpt2":
        cfg = GPT2Config(vocab_size=120, n_embd=64, n_layer=layers, n_head=4, num_labels=3, pad_token_id=0,
                         bos_token_id=1, eos_token_id=1)
        model, targets = GPT2ForSequenceClassification(cfg), ["c_attn", "c_fc"]
    else:
        cfg = LlamaConfig(vocab_size=120, hidden_size=96, num_hidden_layers=layers, num_attention_heads=4,
                          num_key_value_heads=2, intermediate_size=160, num_labels=3, pad_token_id=0)
        model, targets = LlamaForSequenceClassification(cfg), ["q_proj", "v_proj", "down_proj"]
    model.eval()
    pm = peft.get_peft_model(model, peft.LoraConfig(r=R, target_modules=targets, lora_dropout=0.0))
    lora = find_lora_params(pm)
    head = [p for n, p in pm.named_parameters() if ".classifier." in n or ".score." in n]
    return cfg, pm, targets, lora, head


def _batch(b: int = B, s: int = S) -> dict:
    return {"input_ids": torch.randint(1, 120, (b, s)), "attention_mask": torch.ones(b, s, dtype=torch.long),
            "labels": torch.randint(0, 3, (b,))}


def _plans(names: list[str], blocks: dict[str, int]) -> list[list[str]]:
    top = max(blocks.values())
    rng = random.Random(1)
    plans = [[], [names[-1]], [n for n in names if blocks[n] == top], [names[0]], list(names),
             [n for n in names if blocks[n] == 1], names[1::2]]
    plans += [rng.sample(names, k) for k in (2, 3, 4)]
    return plans


@pytest.fixture(scope="module", params=ARCHS)
def arch(request):
    torch.manual_seed(0)
    cfg, pm, targets, lora, head = _build(request.param)
    batch = _batch()
    blocks = infer_blocks(lora)
    calibrated = MemoryModel.from_model(pm, batch, lora, blocks, always_trainable=head)
    analytic = MemoryModel.from_config(cfg, batch_size=B, seq_len=S, rank=R, targets=targets, num_labels=3)
    return request.param, cfg, pm, targets, lora, head, batch, blocks, calibrated, analytic


def test_predict_within_10_percent_of_measured(arch):
    kind, _, pm, _, lora, head, batch, blocks, calibrated, analytic = arch
    names = list(lora)
    worst = {"calibrated": 0.0, "analytic": 0.0}
    worst_dyn = {"calibrated": 0.0, "analytic": 0.0}
    for plan in _plans(names, blocks):
        meas = measure(pm, batch, head + [p for n in plan for p in lora[n]])
        dynamic = meas.total - meas.param_bytes  # what the plan changes: saved + grads + optimizer state
        for label, mm in (("calibrated", calibrated), ("analytic", analytic)):
            pred = mm.saved_count(plan)
            assert abs(pred - meas.total) <= 0.10 * meas.total, (kind, label, plan, pred, meas)
            assert abs((pred - mm.static_bytes) - dynamic) <= 0.10 * dynamic, (kind, label, plan, pred, meas)
            worst[label] = max(worst[label], abs(pred - meas.total) / meas.total)
            worst_dyn[label] = max(worst_dyn[label], abs(pred - mm.static_bytes - dynamic) / dynamic)
    # measured structure: static = every parameter and buffer; the calibrated model agrees with it exactly
    assert calibrated.static_bytes == meas.param_bytes
    assert analytic.static_bytes == meas.param_bytes
    print(f"{kind}: max relative error of the total: calibrated {worst['calibrated']:.4%}, analytic "
          f"{worst['analytic']:.4%}; of the plan-dependent part: calibrated {worst_dyn['calibrated']:.4%}, "
          f"analytic {worst_dyn['analytic']:.4%}")


def test_activation_part_depends_on_lowest_block(arch):
    """algorithms.md oracle 12: beyond the lowest block, each extra module adds only its own terms."""
    _, _, pm, _, lora, head, batch, blocks, calibrated, _ = arch
    names = list(lora)
    low = [n for n in names if blocks[n] == 0][0]
    others = [n for n in names if blocks[n] > 0]
    base = measure(pm, batch, head + lora[low]).saved_bytes
    for n in others:
        with_n = measure(pm, batch, head + lora[low] + lora[n]).saved_bytes
        extra = with_n - base
        # rank-sized A x plus (at most) the module's input: never another block's pass-through bytes
        sp = calibrated.spec(n)
        assert 0 < extra <= B * S * (sp.max_rank + sp.d_in) * 4
    # and a single low module costs far more than a single top module (non-additive through lmin)
    top = [n for n in names if blocks[n] == max(blocks.values())][0]
    assert calibrated.saved_count([low]) - calibrated.saved_count([top]) >= sum(calibrated.block_costs[:-1]) * 0.9


def test_problem_costs_never_undercount_predict(arch):
    _, _, _, _, lora, _, _, blocks, calibrated, analytic = arch
    rng = random.Random(0)
    for mm in (calibrated, analytic):
        prob = mm.problem(mm.full_bytes())
        assert isinstance(prob, AllocationProblem)
        assert prob.static_bytes + prob.head_bytes == mm.static_bytes + mm.head_bytes
        for _ in range(20):
            # plans train >= 1 module (min_trainable_bytes); the head-only step's transient is not a problem cost
            plan = {n: mm.spec(n).max_rank for n in rng.sample(mm.module_names, rng.randint(1, len(lora)))}
            assert prob.cost(plan) >= mm.predict(plan)
            # the problem only over-counts shared inputs and ignores the lowest block's entry discount
            slack = sum(mm.input_bytes.values()) + max(mm.entry_discount.values(), default=0)
            assert prob.cost(plan) - mm.predict(plan) <= slack
        assert mm.min_trainable_bytes() == prob.min_train_bytes()


def test_unselected_modules_have_no_grads_no_state_nothing_saved_below(arch):
    kind, _, pm, _, lora, head, batch, blocks, _, _ = arch
    top = max(blocks.values())
    plan = {n: R for n in lora if blocks[n] == top}
    flags = {id(p): p.requires_grad for p in pm.parameters()}
    set_trainable(lora, plan)
    try:
        for n, ps in lora.items():
            assert all(p.requires_grad == (n in plan) for p in ps)
        # tag every saved tensor with the block running when it was saved
        current: list[int] = [-1]
        hooks = []
        for name, mod in pm.named_modules():
            if name.count(".") and name.split(".")[-1].isdigit() and name.split(".")[-2] in ("layer", "h", "layers"):
                idx = int(name.split(".")[-1])
                hooks.append(mod.register_forward_pre_hook(lambda m, a, i=idx: current.__setitem__(0, i)))
                hooks.append(mod.register_forward_hook(lambda m, a, o: current.__setitem__(0, -1)))
        seen: list[int] = []

        def pack(t):
            seen.append(current[0])
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = pm(**batch).loss
        for h in hooks:
            h.remove()
        assert seen and all(b == -1 or b >= top for b in seen), (kind, sorted(set(seen)))
        assert top in seen
        params = [p for p in pm.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-3)
        loss.backward()
        opt.step()
        for n, ps in lora.items():
            for p in ps:
                assert (p.grad is not None) == (n in plan), n
                assert (p in opt.state) == (n in plan), n
        assert all(p.grad is None for p in head)  # peft without a task type leaves the head frozen
    finally:
        for p in pm.parameters():
            p.grad = None
            p.requires_grad_(flags[id(p)])


def test_measure_restores_flags_and_counts_grads(arch):
    _, _, pm, _, lora, head, batch, _, _, _ = arch
    before = [p.requires_grad for p in pm.parameters()]
    name = next(iter(lora))
    m = measure(pm, batch, lora[name], optimizer="adamw")
    assert [p.requires_grad for p in pm.parameters()] == before
    nbytes = sum(p.numel() * p.element_size() for p in lora[name])
    assert m.grad_bytes == nbytes and m.optimizer_bytes == 2 * nbytes
    assert m.total == m.saved_bytes + m.param_bytes + m.grad_bytes + m.optimizer_bytes
    assert m.cuda_peak is None
    sgd = measure(pm, batch, lora[name], optimizer="sgd")
    assert sgd.optimizer_bytes == 0 and sgd.saved_bytes == m.saved_bytes


def test_calibrate_rescales_to_the_config_batch():
    """A config-built model refit by measuring a smaller batch predicts the bigger batch's measurement."""
    cfg, pm, targets, lora, head = _build("llama", layers=2)
    big = _batch(4, 32)
    small = _batch(2, 16)
    analytic = MemoryModel.from_config(cfg, batch_size=4, seq_len=32, rank=R, targets=targets, num_labels=3)
    fitted = analytic.calibrate(pm, small, lora, always_trainable=head)
    assert fitted.source.endswith("+calibrated")
    names = list(lora)
    for plan in ([names[0]], names, [names[-1]], names[1:3]):
        meas = measure(pm, big, head + [p for n in plan for p in lora[n]])
        assert abs(fitted.saved_count(plan) - meas.total) <= 0.10 * meas.total


def test_from_model_discovers_lora_and_draws_a_batch():
    cfg, pm, targets, lora, head = _build("bert", layers=2)
    for p in head:
        p.requires_grad_(True)
    mm = MemoryModel.from_model(pm, batch_size=2, seq_len=8, rank=R)
    assert set(mm.module_names) == set(lora)
    assert mm.blocks == infer_blocks(lora)
    assert mm.batch_size == 2 and mm.seq_len == 8
    assert mm.head_bytes > 0  # the classifier (modules_to_save) is trained by everyone
    # names without the peft prefix resolve too
    bare = [n.removeprefix("base_model.model.") for n in mm.module_names]
    assert mm.predict(bare) == mm.predict(mm.module_names)


def test_rank_scaling_and_bad_input():
    mm = MemoryModel.from_config("bert-tiny", batch_size=2, seq_len=16, rank=8)
    name = mm.module_names[-1]
    assert mm.predict({name: 2}) < mm.predict({name: 8})  # analytic models slice ranks
    fixed = MemoryModel.from_config("bert-tiny", batch_size=2, seq_len=16, rank=8, rank_scaling=False)
    assert fixed.predict({name: 2}) == fixed.predict({name: 8})
    assert mm.predict({}) == mm.static_bytes + mm.head_bytes + mm.head_transient_bytes
    assert mm.predict({name: 0}) == mm.predict({})
    with pytest.raises(ProblemError, match="rank 9"):
        mm.predict({name: 9})
    with pytest.raises(ProblemError, match="nope"):
        mm.predict(["nope"])
    with pytest.raises(ProblemError, match="llama-99"):
        MemoryModel.from_config("llama-99", batch_size=1, seq_len=1, rank=1)
    with pytest.raises(ProblemError, match="foo"):
        MemoryModel.from_config("gpt2", batch_size=1, seq_len=4, rank=4, targets=["foo"])


def test_presets_plan_without_weights():
    """llama-7b in bf16 on the meta device: numbers of the right magnitude, no memory allocated."""
    mm = MemoryModel.from_config("llama-7b", batch_size=1, seq_len=512, rank=16, dtype="bfloat16")
    assert 12.5e9 < mm.static_bytes < 14e9  # 6.7 B parameters x 2 bytes
    assert mm.num_blocks == 32 and len(mm.modules) == 64
    assert mm.full_bytes() > mm.min_trainable_bytes() > mm.static_bytes


@pytest.mark.parametrize("kind", ARCHS)
def test_padded_batches(kind):
    """Padding makes transformers pass SDPA an explicit mask (saved per block); padded=True models it."""
    cfg, pm, targets, lora, head = _build(kind, layers=2)
    batch = _batch()
    batch["attention_mask"][:, -S // 3:] = 0
    analytic = MemoryModel.from_config(cfg, batch_size=B, seq_len=S, rank=R, targets=targets, num_labels=3,
                                       padded=True)
    calibrated = MemoryModel.from_model(pm, batch, lora, always_trainable=head)
    names = list(lora)
    for plan in ([names[0]], names, [names[-1]]):
        meas = measure(pm, batch, head + [p for n in plan for p in lora[n]])
        dynamic = meas.total - meas.param_bytes
        for mm in (analytic, calibrated):
            assert abs(mm.saved_count(plan) - meas.total) <= 0.10 * meas.total
            assert abs(mm.saved_count(plan) - mm.static_bytes - dynamic) <= 0.10 * dynamic


def test_causal_lm_analytic():
    """Causal-LM task: frozen tied LM head; the float32 log-softmax over the vocabulary appears once trained."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=128, pad_token_id=0)
    model = LlamaForCausalLM(cfg).eval()
    pm = peft.get_peft_model(model, peft.LoraConfig(r=R, target_modules=["q_proj", "v_proj"]))
    ids = torch.randint(1, 300, (B, S))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    lora = find_lora_params(pm)
    mm = MemoryModel.from_config(cfg, batch_size=B, seq_len=S, rank=R, targets=["q_proj", "v_proj"],
                                 task="causal-lm")
    names = list(lora)
    for plan in ([names[-1]], [names[0]], names):
        meas = measure(pm, batch, [p for n in plan for p in lora[n]])
        dynamic = meas.total - meas.param_bytes
        assert abs(mm.saved_count(plan) - mm.static_bytes - dynamic) <= 0.10 * dynamic


def test_dict_round_trip():
    import json

    mm = MemoryModel.from_config("gpt2", batch_size=2, seq_len=64, rank=4, targets=["c_attn", "c_fc"], padded=True)
    back = MemoryModel.from_dict(json.loads(json.dumps(mm.to_dict())))
    assert back == mm
    rng = random.Random(2)
    for _ in range(10):
        plan = {n: rng.choice([1, 2, 4]) for n in rng.sample(mm.module_names, 5)}
        assert back.predict(plan) == mm.predict(plan)
    with pytest.raises(ProblemError, match="bogus"):
        MemoryModel.from_dict({**mm.to_dict(), "bogus": 1})
