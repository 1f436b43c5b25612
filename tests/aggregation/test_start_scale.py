"""Issue 12 item 19: a client whose LoRA scale s_k differs from the global s_g starts from the global model at its
own scale, so a round in which it changes nothing leaves the global product unchanged (ratio 1.000)."""

from __future__ import annotations

import pytest
import torch

from fedkernels import aggregation
from fedkernels.aggregation import ClientUpdate, GlobalState
from fedkernels.errors import ConfigError

M = "layer.q"
S_G, S_K = 2.0, 4.0


def _state(zero_B: bool = False) -> GlobalState:
    g = torch.Generator().manual_seed(0)
    A = torch.randn(8, 48, generator=g, dtype=torch.float64)
    B = torch.zeros(64, 8, dtype=torch.float64) if zero_B else torch.randn(64, 8, generator=g, dtype=torch.float64)
    return GlobalState.from_factors({M: (A, B)}, {M: S_G})


def _effective(state: GlobalState, base_deltas: dict) -> torch.Tensor:
    """What the model computes on top of the frozen base: merged deltas plus s_g B A."""
    A, B = state.factors[M]
    out = state.scales[M] * B @ A
    if M in base_deltas:
        A_s, B_s, s = base_deltas[M]
        out = out + s * B_s @ A_s
    return out


def _noop_round(name: str, state: GlobalState):
    rule = aggregation.get(name)
    plan = {M: 8}
    start = rule.start_for(state, 0, plan, scales={M: S_K})
    # the client's own model on top of the base: s_k B_k A_k must be the global model s_g B A
    A_k, B_k = start[M]
    up = ClientUpdate(client_id=0, factors={M: (A_k.clone(), B_k.clone())}, ranks=dict(plan), scales={M: S_K},
                      num_samples=10)
    result = rule.aggregate(state, [up], {0: plan})
    assert not result.rejected
    return start, result


@pytest.mark.parametrize("name", ["fedit", "hetlora", "fedhello", "ffa", "flexlora", "fedpilot", "fedra"])
def test_noop_round_keeps_global_product_when_client_scale_differs(name):
    state = _state()
    before = _effective(state, {})
    start, result = _noop_round(name, state)
    A_k, B_k = start[M]
    torch.testing.assert_close(S_K * B_k @ A_k, before, rtol=1e-12, atol=1e-12)
    after = _effective(result.global_state, result.base_deltas)
    ratio = float(after.norm() / before.norm())
    assert ratio == pytest.approx(1.0, abs=1e-9), f"{name}: no-op round scaled the product by {ratio:.3f}"
    torch.testing.assert_close(after, before, rtol=1e-9, atol=1e-9)


def test_flora_noop_round_keeps_effective_weight():
    # FLoRA's global B is 0 between rounds (the product lives in the base weight); a client that changes nothing
    # must merge nothing, whatever its scale.
    state = _state(zero_B=True)
    g = torch.Generator().manual_seed(1)
    W0 = torch.randn(64, 48, generator=g, dtype=torch.float64)
    start, result = _noop_round("flora", state)
    assert torch.count_nonzero(start[M][1]) == 0
    after = W0 + _effective(result.global_state, result.base_deltas)
    assert float(after.norm() / W0.norm()) == pytest.approx(1.0, abs=1e-12)
    torch.testing.assert_close(after, W0, rtol=0, atol=1e-12)


def test_ffa_start_keeps_frozen_A():
    state = _state()
    start = aggregation.get("ffa").start_for(state, 0, {M: 8}, scales={M: S_K})
    torch.testing.assert_close(start[M][0], state.factors[M][0], rtol=0, atol=0)
    torch.testing.assert_close(start[M][1], state.factors[M][1] * (S_G / S_K), rtol=1e-15, atol=0)


def test_equal_scale_start_is_plain_truncation():
    state = _state()
    for scales in (None, {M: S_G}):
        A, B = aggregation.get("fedit").start_for(state, 0, {M: 5}, scales=scales)[M]
        torch.testing.assert_close(A, state.factors[M][0][:5], rtol=0, atol=0)
        torch.testing.assert_close(B, state.factors[M][1][:, :5], rtol=0, atol=0)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_start_scale_is_refused(bad):
    with pytest.raises(ConfigError, match="start scale"):
        aggregation.get("fedit").start_for(_state(), 3, {M: 8}, scales={M: bad})
