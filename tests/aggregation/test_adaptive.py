"""fk-adaptive (ours): exact product-update average across ranks, bounded compensation, update norms."""

from __future__ import annotations

import math

import pytest
import torch

from fedkernels import aggregation
from fedkernels.aggregation import ClientUpdate
from fedkernels.aggregation.adaptive import product_delta_norm
from fedkernels.errors import ConfigError
from tests.aggregation.helpers import SCALE, SHAPES, R, global_state

D = torch.float64


def _dense(A, B, s):
    return s * B.to(D) @ A.to(D)


def _b_only_update(state, cid: int, plan: dict[str, int], n: int) -> ClientUpdate:
    """A client that changed only B (A is the global's truncated A): every change stays in the global row space, so
    the rank-R result represents the exact average with nothing truncated."""
    factors = {}
    for m, r in plan.items():
        gA, gB = state.factors[m]
        factors[m] = (gA[:r].clone(), gB[:, :r] + torch.randn_like(gB[:, :r]))
    return ClientUpdate(client_id=cid, factors=factors, ranks=dict(plan), scales={m: SCALE for m in plan},
                        num_samples=n)


def test_exact_average_of_product_updates_across_ranks():
    torch.manual_seed(0)
    state = global_state()
    plans = {0: {"l0.q": R, "l1.q": 2}, 1: {"l0.q": 3}, 2: {"l0.q": 1, "l1.q": 5}}
    ns = {0: 40, 1: 25, 2: 10}
    updates = [_b_only_update(state, c, plans[c], ns[c]) for c in plans]
    rule = aggregation.get("fk-adaptive", beta=0.0, server_lr=1.0)
    out = rule.aggregate(state, updates, plans).global_state
    for m in ("l0.q", "l1.q"):
        ts = [u for u in updates if m in u.factors]
        tot = sum(u.num_samples for u in ts)
        gA, gB = state.factors[m]
        want = _dense(gA, gB, SCALE)
        for u in ts:
            A, B = u.factors[m]
            r = A.shape[0]
            want = want + (u.num_samples / tot) * (_dense(A, B, SCALE) - _dense(gA[:r], gB[:, :r], SCALE))
        got = _dense(*out.factors[m], SCALE)
        assert torch.allclose(got, want, atol=1e-10, rtol=1e-10), (m, (got - want).abs().max())
    # nobody trained l0.v: unchanged
    assert torch.equal(out.factors["l0.v"][0], state.factors["l0.v"][0])


def test_a_client_that_changes_nothing_leaves_the_product_unchanged_even_compensated():
    torch.manual_seed(1)
    state = global_state()
    plans = {0: {"l0.q": 2}, 1: {"l1.q": R}, 2: {"l0.v": 4}}
    updates = [ClientUpdate(c, {m: (state.factors[m][0][:r].clone(), state.factors[m][1][:, :r].clone())
                                for m, r in p.items()}, dict(p), {m: SCALE for m in p}, 10) for c, p in plans.items()]
    out = aggregation.get("fk-adaptive", beta=1.0, eta_max=3.0).aggregate(state, updates, plans).global_state
    for m in SHAPES:
        assert torch.allclose(_dense(*out.factors[m], SCALE), _dense(*state.factors[m], SCALE), atol=1e-10)
        # the trace identity squares before the sqrt: a zero change reads as ~sqrt(eps) * ||W||, 1.5e-8 * ||W|| in fp64
        size = float(torch.linalg.norm(_dense(*state.factors[m], SCALE)))
        assert out.extra["update_norms"].get(m, 0.0) <= 1e-6 * size


def test_compensation_scales_the_product_step_linearly_and_is_capped():
    torch.manual_seed(2)
    state = global_state()
    # 4 clients of equal weight; only client 3 trains l1.q: coverage rho = 1/4
    plans = {0: {"l0.q": R}, 1: {"l0.q": R}, 2: {"l0.v": R}, 3: {"l1.q": 3}}
    updates = [_b_only_update(state, c, p, 10) for c, p in plans.items()]
    gA, gB = state.factors["l1.q"]
    A, B = updates[3].factors["l1.q"]
    step = _dense(A, B, SCALE) - _dense(gA[:3], gB[:, :3], SCALE)
    for beta, eta_max, eta in ((0.0, 1.5, 1.0), (0.25, 5.0, 4 ** 0.25), (0.5, 1.5, 1.5)):
        rule = aggregation.get("fk-adaptive", beta=beta, eta_max=eta_max, server_lr=1.0)
        out = rule.aggregate(state, updates, plans).global_state
        got = _dense(*out.factors["l1.q"], SCALE) - _dense(gA, gB, SCALE)
        assert torch.allclose(got, eta * step, atol=1e-9), (beta, eta_max)
    # the default: no compensation, a full step (beta 0 and server_lr 1 on the tuning seeds, the docstring)
    out = aggregation.get("fk-adaptive").aggregate(state, updates, plans).global_state
    assert torch.allclose(_dense(*out.factors["l1.q"], SCALE) - _dense(gA, gB, SCALE), step, atol=1e-9)
    # server_lr scales the product step (and declares the head's step), on top of the compensation
    rule = aggregation.get("fk-adaptive", server_lr=0.5, beta=0.5, eta_max=1.5)
    out = rule.aggregate(state, updates, plans).global_state
    assert torch.allclose(_dense(*out.factors["l1.q"], SCALE) - _dense(gA, gB, SCALE), 0.75 * step, atol=1e-9)
    assert rule.head_step == 0.5 and aggregation.get("fedpilot").head_step == 1.0


def _two_clients_on_one_module(seed: int):
    """Clients 0 (rank R, 30 samples) and 1 (rank 2, 10 samples) changed B of l0.q."""
    torch.manual_seed(seed)
    state = global_state()
    plans = {0: {"l0.q": R}, 1: {"l0.q": 2}}
    return state, plans, [_b_only_update(state, 0, plans[0], 30), _b_only_update(state, 1, plans[1], 10)]


def test_orthonormal_a_split_keeps_the_exact_product_and_a_at_unit_scale():
    state, plans, updates = _two_clients_on_one_module(5)
    balanced = aggregation.get("fk-adaptive").aggregate(state, updates, plans).global_state
    unit = aggregation.get("fk-adaptive", factor_split="orthonormal-a").aggregate(state, updates, plans).global_state
    A, B = unit.factors["l0.q"]
    torch.testing.assert_close(_dense(A, B, SCALE), _dense(*balanced.factors["l0.q"], SCALE), rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(A.to(D) @ A.to(D).T, torch.eye(A.shape[0], dtype=D), rtol=0, atol=1e-6)
    with pytest.raises(ConfigError, match="factor_split must be one of .*got 'sqrt'"):
        aggregation.get("fk-adaptive", factor_split="sqrt")


def test_update_norms_are_the_trainers_mean_client_change():
    state, plans, updates = _two_clients_on_one_module(3)
    out = aggregation.get("fk-adaptive").aggregate(state, updates, plans).global_state
    gA, gB = state.factors["l0.q"]
    want = 0.0
    for u, p in zip(updates, (0.75, 0.25), strict=True):
        A, B = u.factors["l0.q"]
        r = A.shape[0]
        want += p * float(torch.linalg.norm(_dense(A, B, SCALE) - _dense(gA[:r], gB[:, :r], SCALE)))
    assert out.extra["update_norms"]["l0.q"] == pytest.approx(want, rel=1e-9)
    assert set(out.extra["update_norms"]) == {"l0.q"}


def test_product_delta_norm_matches_the_dense_norm():
    torch.manual_seed(4)
    A, B, A0, B0 = torch.randn(3, 17, dtype=D), torch.randn(11, 3, dtype=D), torch.randn(3, 17, dtype=D), \
        torch.randn(11, 3, dtype=D)
    dense = float(torch.linalg.norm(1.5 * B @ A - 0.5 * B0 @ A0))
    assert product_delta_norm(A, B, A0, B0, 1.5, 0.5) == pytest.approx(dense, rel=1e-10)


@pytest.mark.parametrize("opts", [{"beta": -0.1}, {"eta_max": 0.5}, {"beta": math.nan}, {"eta_max": math.inf},
                                  {"beta": True}, {"gamma": 1.0}, {"server_lr": 0}, {"server_lr": 1.5}])
def test_bad_options_are_refused_quoting_the_value(opts):
    with pytest.raises(ConfigError) as exc:
        aggregation.get("fk-adaptive", **opts)
    assert str(next(iter(opts))) in str(exc.value)
