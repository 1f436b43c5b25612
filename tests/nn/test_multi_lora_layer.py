"""`MultiLoRALinear` and `to_multi_client`: K clients in one forward/backward equal K separate runs."""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fedkernels.errors import ConfigError, RankError, ShapeError, UnknownModuleError
from fedkernels.nn import LoRAConfig, LoRALinear, MultiLoRALinear, inject_lora, lora_modules, to_multi_client
from fedkernels.reference import multi_lora_linear_ref
from tests.nn.models import tiny_bert, tiny_gpt2

K = 3
RANKS = [8, 3, 5]  # heterogeneous clients: client 1 trains rank 3 of 8, ...
FROZEN = {(2, "bert.encoder.layer.0.attention.self.value")}  # client 2 does not train this module


def lora_bert():
    model = tiny_bert()
    inject_lora(model, LoRAConfig(r=8, alpha=16, target_modules=["query", "value", "dense"]))
    return model


def client_adapters(model, seed):
    """Random non-zero adapters per (client, module): B = 0 would hide dA bugs."""
    g = torch.Generator().manual_seed(seed)
    return {
        (c, name): (torch.randn(layer.r, layer.in_features, generator=g) * 0.2,
                    torch.randn(layer.out_features, layer.r, generator=g) * 0.2)
        for c in range(K) for name, layer in lora_modules(model).items()
    }


def data(seed=3, n=7, seq=6):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 100, (n, seq), generator=g)
    labels = torch.randint(0, 3, (n,), generator=g)
    clients = torch.tensor([0, 2, 1, 0, 2, 0, 2])  # client 1 has one example, others several
    return ids, labels, clients


def single_client_run(model, adapters, c, ids, labels, clients, steps, lr):
    """Reference: client c alone, on its own examples, with plain LoRALinear layers and torch SGD."""
    m = copy.deepcopy(model)
    params = []
    for name, layer in lora_modules(m).items():
        A, B = adapters[(c, name)]
        with torch.no_grad():
            layer.lora_A.copy_(A)
            layer.lora_B.copy_(B)
        layer.set_active_rank(RANKS[c])
        layer.trainable = (c, name) not in FROZEN
        if layer.trainable:
            params += [layer.lora_A, layer.lora_B]
    opt = torch.optim.SGD(params, lr=lr)
    rows = clients == c
    grads = None
    for _ in range(steps):
        opt.zero_grad()
        logits = m(input_ids=ids[rows]).logits
        loss = F.cross_entropy(logits, labels[rows])
        loss.backward()
        grads = {n: tuple(None if p.grad is None else p.grad.clone() for p in (lay.lora_A, lay.lora_B))
                 for n, lay in lora_modules(m).items()}
        opt.step()
    return logits.detach(), grads, {n: (lay.lora_A.detach(), lay.lora_B.detach()) for n, lay in lora_modules(m).items()}


def setup_multi(model, adapters):
    multi = to_multi_client(model, K)
    for (c, name), (A, B) in adapters.items():
        multi.set_client_adapter(c, name, A, B)
    for c in range(K):
        multi.set_client_rank(c, None, RANKS[c])
    for c, name in FROZEN:
        multi.set_client_trainable(c, name, False)
    return multi


def multi_step(model, multi, ids, labels, clients):
    multi.zero_grad()
    with multi.clients(clients):
        logits = model(input_ids=ids).logits
    # sum of per-client mean losses: each client's gradient is its own
    loss = sum(F.cross_entropy(logits[clients == c], labels[clients == c]) for c in range(K))
    loss.backward()
    return logits.detach()


def test_k_clients_equal_separate_training_on_bert():
    model = lora_bert()
    adapters = client_adapters(model, seed=5)
    ids, labels, clients = data()
    refs = {c: single_client_run(model, adapters, c, ids, labels, clients, steps=1, lr=0.0) for c in range(K)}

    base_ptrs = {n: lay.base_layer.weight.data_ptr() for n, lay in lora_modules(model).items()}
    multi = setup_multi(model, adapters)
    assert all(m.base_layer.weight.data_ptr() == base_ptrs[n] for n, m in multi.modules.items())  # no copy
    logits = multi_step(model, multi, ids, labels, clients)
    for c in range(K):
        ref_logits, ref_grads, _ = refs[c]
        torch.testing.assert_close(logits[clients == c], ref_logits, rtol=1e-5, atol=1e-5)
        got = multi.client_grads(c)
        for name, (gA, gB) in got.items():
            rA, rB = ref_grads[name]
            if (c, name) in FROZEN:
                assert rA is None and torch.all(gA == 0) and torch.all(gB == 0)
                continue
            torch.testing.assert_close(gA, rA, rtol=1e-4, atol=1e-6, msg=f"dA client {c} {name}")
            torch.testing.assert_close(gB, rB, rtol=1e-4, atol=1e-6, msg=f"dB client {c} {name}")
            assert torch.all(gA[RANKS[c]:] == 0) and torch.all(gB[:, RANKS[c]:] == 0)
            assert gA.abs().sum() > 0 and gB.abs().sum() > 0


def test_sgd_steps_match_separate_training_and_restore():
    model = lora_bert()
    adapters = client_adapters(model, seed=7)
    ids, labels, clients = data(seed=4)
    steps, lr = 3, 0.5
    refs = {c: single_client_run(model, adapters, c, ids, labels, clients, steps=steps, lr=lr) for c in range(K)}
    multi = setup_multi(model, adapters)
    for _ in range(steps):
        multi_step(model, multi, ids, labels, clients)
        with torch.no_grad():
            for c in range(K):
                for name, (A, B) in multi.client_parameters(c).items():
                    gA, gB = multi.client_grads(c)[name]
                    A -= lr * gA
                    B -= lr * gB
    for c in range(K):
        _, _, ref_params = refs[c]
        for name, (A, B) in multi.client_state(c).items():
            rA, rB = ref_params[name]
            torch.testing.assert_close(A, rA, rtol=1e-4, atol=1e-5, msg=f"A client {c} {name}")
            torch.testing.assert_close(B, rB, rtol=1e-4, atol=1e-5, msg=f"B client {c} {name}")
    layers = multi.restore(slot=1)
    assert all(isinstance(m, LoRALinear) for m in lora_modules(model).values())
    assert not any(isinstance(m, MultiLoRALinear) for m in model.modules())
    name = next(iter(layers))
    assert layers[name].active_rank == RANKS[1]
    torch.testing.assert_close(layers[name].lora_A.detach(), refs[1][2][name][0], rtol=1e-4, atol=1e-5)


def test_layer_matches_reference_with_token_level_ids_and_gpt2_conv1d():
    model = tiny_gpt2()
    inject_lora(model, LoRAConfig(r=4, alpha=8, target_modules=["c_attn"]))
    name, layer = next(iter(lora_modules(model).items()))
    multi = MultiLoRALinear.from_lora(layer, 2, name=name)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        multi.lora_A.copy_(torch.randn(multi.lora_A.shape, generator=g))
        multi.lora_B.copy_(torch.randn(multi.lora_B.shape, generator=g))
    multi.set_rank(1, 2)
    multi.set_scale(0, 0.3)
    x = torch.randn(2, 5, layer.in_features, generator=g)
    ids = torch.tensor([[0, 0, 1, -1, 1], [1, -1, 0, 0, 0]])
    y = multi(x, ids)
    ref = multi_lora_linear_ref(x.reshape(10, -1), layer.base_layer.weight.T, layer.base_layer.bias,
                                multi.lora_A.detach(), multi.lora_B.detach(), torch.tensor(multi.scales),
                                torch.tensor(multi.ranks), ids.reshape(-1))
    torch.testing.assert_close(y.reshape(10, -1), ref, rtol=1e-5, atol=1e-5)
    text = repr(multi)
    assert "num_clients=2" in text and "ranks=[4, 2]" in text and "fan_in_fan_out=True" in text


def test_example_level_ids_expand_to_tokens_and_meta_built_once(monkeypatch):
    model = lora_bert()
    multi = to_multi_client(model, K)
    import fedkernels.nn.multi_lora as mod

    calls = []
    real = mod.build_meta
    monkeypatch.setattr(mod, "build_meta", lambda *a, **k: calls.append(1) or real(*a, **k))
    ids, _, clients = data()
    with multi.clients(clients):
        model(input_ids=ids)
    # one sort for the [B, S] token layers (shared by all 10 of them), one for the pooler's [B] input
    assert len(calls) == 2
    assert len(multi.modules) == 2 * 5 + 1  # query, value, 3 x dense per BERT layer, pooler dense


def test_errors_and_guards():
    model = lora_bert()
    name = next(iter(lora_modules(model)))
    lora_modules(model)[name].set_rank_mask(torch.tensor([1, 0, 1, 0, 1, 0, 1, 0]))
    with pytest.raises(ConfigError, match="non-prefix"):
        to_multi_client(model, 2)
    assert all(isinstance(m, LoRALinear) for m in lora_modules(model).values())  # untouched after refusal
    dropout_model = tiny_bert()
    inject_lora(dropout_model, LoRAConfig(r=4, dropout=0.1))
    with pytest.raises(ConfigError, match="dropout 0.1"):
        to_multi_client(dropout_model, 2)
    with pytest.raises(UnknownModuleError, match="no LoRALinear"):
        to_multi_client(nn.Sequential(nn.Linear(3, 3)), 2)

    model = lora_bert()
    multi = to_multi_client(model, 2)
    ids, _, _ = data()
    with pytest.raises(ConfigError, match="without client ids"):
        model(input_ids=ids)
    with pytest.raises(ValueError, match="client id 2"), multi.clients(torch.tensor([0, 2])):
        pass
    with pytest.raises(ShapeError, match="fit neither"), multi.clients(torch.tensor([0, 1, 0])):
        model(input_ids=ids)
    with pytest.raises(RankError, match="slot 1"):
        multi.set_client_rank(1, None, 9)
    with pytest.raises(ConfigError, match="slot 5"):
        multi.set_client_trainable(5, None, False)
    with pytest.raises(UnknownModuleError, match="nope"):
        multi.get_client_adapter(0, "nope")
    with pytest.raises(ShapeError, match="slot 0"):
        multi.set_client_adapter(0, name, torch.randn(2, 5), torch.randn(32, 2))
    # everyone frozen in a module: its adapter tensors stop requiring grad
    multi.set_client_trainable(0, name, False)
    multi.set_client_trainable(1, name, False)
    assert not multi.modules[name].lora_A.requires_grad
