"""Formulas of each rule in float64 on random factors."""

from __future__ import annotations

import math
import random
from dataclasses import fields

import pytest
import torch

from fedkernels import aggregation
from fedkernels.aggregation import GlobalState
from fedkernels.errors import ConfigError
from fedkernels.ops import merge_stacked

from .helpers import SCALE, SHAPES, D, R, global_state, round_setup, update

RULES = aggregation.available()
TOL = {"rtol": 1e-11, "atol": 1e-11}


def _prod(pair, scale=1.0):
    A, B = pair
    return scale * B @ A


def _weights(ups, m):
    ts = [u for u in ups if m in u.factors]
    tot = sum(u.num_samples for u in ts)
    return [(u, u.num_samples / tot) for u in ts]


def test_fedit_formula_rows_and_zero_pad():
    gs = global_state()
    plans, ups = round_setup(5)
    res = aggregation.get("fedit").aggregate(gs, ups, plans)
    zres = aggregation.get("fedit", pad="zero").aggregate(gs, ups, plans)
    for m in SHAPES:
        gA, gB = gs.factors[m]
        ts = _weights(ups, m)
        A_exp, B_exp = gA.clone(), gB.clone()
        zA, zB = torch.zeros_like(gA), torch.zeros_like(gB)
        for j in range(R):  # row j averaged over the clients covering it
            cov = [(u, p) for u, p in ts if u.factors[m][0].shape[0] > j]
            if cov:
                w = sum(p for _, p in cov)
                A_exp[j] = sum(p * u.factors[m][0][j] for u, p in cov) / w
                B_exp[:, j] = sum(p * u.factors[m][1][:, j] for u, p in cov) / w
                zA[j] = sum(p * u.factors[m][0][j] for u, p in cov)
                zB[:, j] = sum(p * u.factors[m][1][:, j] for u, p in cov)
        torch.testing.assert_close(res.global_state.factors[m], (A_exp, B_exp), **TOL)
        torch.testing.assert_close(zres.global_state.factors[m], (zA, zB), **TOL)
    assert res.global_state.round == 1


def test_fedhello_default_is_plain_mean():
    gs = global_state()
    plans = {0: {"l0.q": R}, 1: {"l0.q": R}}
    ups = [update(0, plans[0], 10), update(1, plans[1], 90)]
    res = aggregation.get("fedhello").aggregate(gs, ups, plans)
    exp_A = (ups[0].factors["l0.q"][0] + ups[1].factors["l0.q"][0]) / 2
    torch.testing.assert_close(res.global_state.factors["l0.q"][0], exp_A, **TOL)
    res_w = aggregation.get("fedra").aggregate(gs, ups, plans)
    exp_Aw = 0.1 * ups[0].factors["l0.q"][0] + 0.9 * ups[1].factors["l0.q"][0]
    torch.testing.assert_close(res_w.global_state.factors["l0.q"][0], exp_Aw, **TOL)


def test_ffa_keeps_A_averages_B():
    gs = global_state()
    plans = {0: {m: R for m in SHAPES}, 1: {"l0.q": R}}
    ups = [update(0, plans[0], 30), update(1, plans[1], 10)]
    res = aggregation.get("ffa").aggregate(gs, ups, plans)
    assert torch.equal(res.global_state.factors["l0.q"][0], gs.factors["l0.q"][0])
    exp_B = 0.75 * ups[0].factors["l0.q"][1] + 0.25 * ups[1].factors["l0.q"][1]
    torch.testing.assert_close(res.global_state.factors["l0.q"][1], exp_B, **TOL)
    torch.testing.assert_close(res.global_state.factors["l1.q"][1], ups[0].factors["l1.q"][1], **TOL)


def test_hetlora_padded_norm_weighted_average_matches_formula():
    gs = global_state()
    plans, ups = round_setup(5)
    res = aggregation.get("hetlora").aggregate(gs, ups, plans)
    for m in SHAPES:
        ts = [u for u in ups if m in u.factors]
        norms = [torch.linalg.matrix_norm(_prod(u.factors[m], SCALE)).item() for u in ts]
        w = [x / sum(norms) for x in norms]
        A_exp = torch.zeros_like(gs.factors[m][0])
        B_exp = torch.zeros_like(gs.factors[m][1])
        for wk, u in zip(w, ts, strict=True):
            A, B = u.factors[m]
            A_exp[: A.shape[0]] += wk * A
            B_exp[:, : B.shape[1]] += wk * B
        torch.testing.assert_close(res.global_state.factors[m], (A_exp, B_exp), **TOL)


def test_hetlora_self_pruning_over_rounds():
    rule = aggregation.get("hetlora", prune_gamma=0.5, prune_min_rank=1)
    gs = global_state()
    plan = {"l0.q": 4}
    u1 = update(0, plan, 10)
    r1 = rule.aggregate(gs, [u1], {0: plan})
    assert r1.global_state.extra["pruned_ranks"] == {}
    u2 = update(0, plan, 10)
    A, B = u2.factors["l0.q"]
    A[2:] *= 1e-3  # tail norm shrank -> prune to floor(0.5 * 4) = 2
    r2 = rule.aggregate(r1.global_state, [u2], {0: plan})
    assert r2.global_state.extra["pruned_ranks"] == {"0": {"l0.q": 2}}
    assert any("pruned 4 -> 2" in n for n in r2.notes)
    # the pruned ranks are dropped from the aggregate and zeroed in the client's start
    assert float(r2.global_state.factors["l0.q"][0][2:].abs().max()) == 0.0
    st = rule.start_for(r2.global_state, 0, plan)
    assert float(st["l0.q"][0][2:].abs().max()) == 0.0 and float(st["l0.q"][1][:, 2:].abs().max()) == 0.0
    assert float(st["l0.q"][0][:2].abs().min()) > 0
    u3 = update(0, plan, 10)
    r3 = rule.aggregate(r2.global_state, [u3], {0: plan})
    torch.testing.assert_close(r3.global_state.factors["l0.q"][0][:2], u3.factors["l0.q"][0][:2], **TOL)
    assert float(r3.global_state.factors["l0.q"][0][2:].abs().max()) == 0.0


def test_hetlora_local_tail_penalty_value_and_gradient():
    lam, gamma = 0.3, 0.5
    rule = aggregation.get("hetlora", prune_gamma=gamma, prune_min_rank=1, tail_penalty=lam)
    assert aggregation.get("hetlora").local_penalty(0) is None  # no lambda: no term
    g = torch.Generator().manual_seed(5)
    live = {"q": (torch.randn(6, 11, generator=g, dtype=D, requires_grad=True),
                  torch.randn(9, 6, generator=g, dtype=D, requires_grad=True)),
            "v": (torch.randn(1, 11, generator=g, dtype=D, requires_grad=True),  # g = max(1, 0) = 1 = r: no tail
                  torch.randn(9, 1, generator=g, dtype=D, requires_grad=True))}
    pen = rule.local_penalty(0)(live)
    A, B = live["q"]
    expected = lam * torch.linalg.matrix_norm(B[:, 3:6] @ A[3:6])  # g = floor(0.5 * 6) = 3, dense product
    torch.testing.assert_close(pen, expected, rtol=1e-12, atol=1e-12)
    pen.backward()
    assert float(A.grad[:3].abs().max()) == 0.0 and float(A.grad[3:].abs().max()) > 0  # only the tail is pushed
    assert live["v"][0].grad is None
    # zero B (round 0): finite, zero, no NaN gradient
    Z = (torch.randn(4, 5, dtype=D, requires_grad=True), torch.zeros(7, 4, dtype=D, requires_grad=True))
    p0 = rule.local_penalty(0)({"q": Z})
    p0.backward()
    assert float(p0.detach()) < 1e-100 and torch.isfinite(Z[0].grad).all() and torch.isfinite(Z[1].grad).all()


@pytest.mark.parametrize("opts", [{"tail_penalty": 0.1}, {"prune_gamma": 0.5, "tail_penalty": -1.0},
                                  {"prune_gamma": 0.5, "tail_penalty": float("nan")},
                                  {"prune_gamma": 0.5, "tail_penalty": True}])
def test_hetlora_tail_penalty_rejects_bad_options(opts):
    with pytest.raises(ConfigError, match="tail_penalty"):
        aggregation.get("hetlora", **opts)


def test_fedpilot_eta_and_staleness():
    rule = aggregation.get("fedpilot", eta_max=3.0, beta=0.5, gamma=1.0)
    gs = global_state()
    plans = {0: {"l0.q": R, "l0.v": R}, 1: {"l0.q": R}}
    ups = [update(0, plans[0], 10), update(1, plans[1], 30)]
    r1 = rule.aggregate(gs, ups, plans)
    assert r1.global_state.extra["staleness"] == {"l0.q": 0, "l0.v": 0, "l1.q": 1}
    # l0.v: rho = 10/40, u = 0 -> eta = min(3, 2 * 1) = 2
    gA, gB = gs.factors["l0.v"]
    A0, B0 = ups[0].factors["l0.v"]
    torch.testing.assert_close(r1.global_state.factors["l0.v"], (gA + 2 * (A0 - gA), gB + 2 * (B0 - gB)), **TOL)
    # l0.q: rho = 1 -> eta = 1: plain weighted average
    exp = 0.25 * ups[0].factors["l0.q"][0] + 0.75 * ups[1].factors["l0.q"][0]
    torch.testing.assert_close(r1.global_state.factors["l0.q"][0], exp, **TOL)
    assert torch.equal(r1.global_state.factors["l1.q"][0], gs.factors["l1.q"][0])
    # round 2: l1.q stale for 1 round, trained by 1 of 2 clients with equal n: eta = min(3, sqrt(2) * 2) = 2.83
    plans2 = {0: {"l1.q": 3}, 1: {"l0.q": R}}
    ups2 = [update(0, plans2[0], 20), update(1, plans2[1], 20)]
    r2 = rule.aggregate(r1.global_state, ups2, plans2)
    eta = min(3.0, math.sqrt(2) * 2)
    gA, gB = r1.global_state.factors["l1.q"]
    A0, B0 = ups2[0].factors["l1.q"]
    exp_A = gA.clone()
    exp_A[:3] = gA[:3] + eta * (A0 - gA[:3])
    torch.testing.assert_close(r2.global_state.factors["l1.q"][0], exp_A, **TOL)
    assert r2.global_state.extra["staleness"] == {"l0.q": 0, "l0.v": 1, "l1.q": 0}


def test_fedpilot_beta_gamma_zero_is_fedhello_weighted():
    gs = global_state()
    plans, ups = round_setup(5)
    a = aggregation.get("fedpilot", beta=0.0, gamma=0.0).aggregate(gs, ups, plans)
    b = aggregation.get("fedhello", weighting="samples").aggregate(gs, ups, plans)
    for m in SHAPES:
        torch.testing.assert_close(a.global_state.factors[m], b.global_state.factors[m], **TOL)


@pytest.mark.parametrize("name", ["fedpilot", "fedit"])
def test_server_lr_moves_factors_and_head_part_way(name):
    gs = global_state()
    plans, ups = round_setup(5)
    full = aggregation.get(name).aggregate(gs, ups, plans).global_state
    rule = aggregation.get(name, server_lr=0.25)
    half = rule.aggregate(gs, ups, plans).global_state
    assert rule.head_step == 0.25 and aggregation.get(name).head_step == 1.0
    for m in SHAPES:
        for g, f, h in zip(gs.factors[m], full.factors[m], half.factors[m], strict=True):
            assert not torch.equal(f, g)
            torch.testing.assert_close(h, g + 0.25 * (f - g), **TOL)
    with pytest.raises(ConfigError, match="server_lr must be a number in \\(0, 1\\], got 0"):
        aggregation.get(name, server_lr=0)


def test_flora_base_delta_is_exact_sum_and_adapters_reset():
    gs = global_state(zero_B=True)
    plans, ups = round_setup(5)
    ups[2].scales = {m: 0.5 for m in ups[2].scales}  # unequal alpha/r: folded into A_stack
    res = aggregation.get("flora", seed=3).aggregate(gs, ups, plans)
    for m, (o, i) in SHAPES.items():
        exp = sum(p * _prod(u.factors[m], u.scales[m]) for u, p in _weights(ups, m))
        A_s, B_s, s = res.base_deltas[m]
        torch.testing.assert_close(s * B_s @ A_s, exp, **TOL)
        W = torch.randn(o, i, dtype=D)
        merged = W.clone()
        merge_stacked(merged.unsqueeze(0), A_s.unsqueeze(0), B_s.unsqueeze(0), s)
        torch.testing.assert_close(merged, W + exp, **TOL)
        A0, B0 = res.global_state.factors[m]
        assert float(B0.abs().max()) == 0.0 and float(A0.abs().max()) <= 1 / math.sqrt(i)
        assert float(A0.abs().min()) > 0 and not torch.equal(A0, gs.factors[m][0])
    rule = aggregation.get("flora", seed=3)
    st1 = rule.start_for(res.global_state, 1, {"l0.q": 3})
    st1b = aggregation.get("flora", seed=3).start_for(res.global_state, 1, {"l0.q": 3})
    st2 = rule.start_for(res.global_state, 2, {"l0.q": 3})
    assert torch.equal(st1["l0.q"][0], st1b["l0.q"][0]) and not torch.equal(st1["l0.q"][0], st2["l0.q"][0])
    assert st1["l0.q"][0].shape == (3, 10) and float(st1["l0.q"][1].abs().max()) == 0.0


def _best_rank_error(dense, r):
    s = torch.linalg.svdvals(dense)
    return torch.sqrt((s[r:] ** 2).sum())


@pytest.mark.parametrize("split", ["balanced", "orthonormal-a"])
def test_flexlora_global_and_client_starts_are_best_rank_r(split):
    gs = global_state()
    plans, ups = round_setup(5)
    ups[1].scales = {m: 4.0 for m in ups[1].scales}  # clients with their own alpha/r
    rule = aggregation.get("flexlora", factor_split=split)
    res = rule.aggregate(gs, ups, plans)
    for m in SHAPES:
        dense = sum(p * _prod(u.factors[m], u.scales[m]) for u, p in _weights(ups, m))
        g = _prod(res.global_state.factors[m], SCALE)
        torch.testing.assert_close(torch.linalg.matrix_norm(dense - g), _best_rank_error(dense, R), rtol=1e-9,
                                   atol=1e-10)
        if split == "orthonormal-a":  # the FlexLoRA code's split: A with orthonormal rows, sigma on B
            A = res.global_state.factors[m][0].double()
            torch.testing.assert_close(A @ A.T, torch.eye(R, dtype=A.dtype), rtol=0, atol=1e-6)
        for u in ups:
            if m not in u.factors:
                assert m not in res.client_starts.get(u.client_id, {})
                continue
            r = plans[u.client_id][m]
            if u.scales[m] == SCALE:  # equal scale: the start is the truncated global state
                assert u.client_id not in res.client_starts
                A, B = rule.start_for(res.global_state, u.client_id, {m: r})[m]
            else:
                A, B = res.client_starts[u.client_id][m]
            assert A.shape == (r, SHAPES[m][1]) and B.shape == (SHAPES[m][0], r)
            err = torch.linalg.matrix_norm(dense - u.scales[m] * B @ A)
            torch.testing.assert_close(err, _best_rank_error(dense, r), rtol=1e-9, atol=1e-10)
    with pytest.raises(ConfigError, match="factor_split must be one of .*got 'sqrt'"):
        aggregation.get("flexlora", factor_split="sqrt")


@pytest.mark.parametrize("name", RULES)
def test_one_client_returns_its_own_update(name):
    gs = global_state()
    plan = {m: R for m in SHAPES}
    u = update(5, plan, 17)
    # a full server step (fk-adaptive's default is half a step: its own test checks that)
    full_step = {"server_lr": 1.0} if "server_lr" in {f.name for f in fields(aggregation.get(name).Options)} else {}
    res = aggregation.get(name, **full_step).aggregate(gs, [u], {5: plan})
    for m in SHAPES:
        own = _prod(u.factors[m], SCALE)
        if name == "flora":
            A_s, B_s, s = res.base_deltas[m]
            torch.testing.assert_close(s * B_s @ A_s, own, **TOL)
        elif name in ("flexlora", "fk-adaptive"):  # factors are re-split (SVD), the product is the client's own
            torch.testing.assert_close(_prod(res.global_state.factors[m], SCALE), own, rtol=1e-9, atol=1e-10)
            assert 5 not in res.client_starts  # same scale as the global state: start = truncated global
        elif name == "ffa":
            torch.testing.assert_close(res.global_state.factors[m][1], u.factors[m][1], **TOL)
        else:
            torch.testing.assert_close(res.global_state.factors[m], u.factors[m], **TOL)


@pytest.mark.parametrize("name", RULES)
def test_permuting_clients_changes_nothing(name):
    gs = global_state()
    plans, ups = round_setup(5)
    ups[1].scales = {m: 4.0 for m in ups[1].scales}  # a client with its own alpha/r (flexlora: own start)
    a = aggregation.get(name).aggregate(gs, ups, plans)
    assert name != "flexlora" or set(a.client_starts) == {1}
    shuffled = list(ups)
    random.Random(1).shuffle(shuffled)
    assert [u.client_id for u in shuffled] != [u.client_id for u in ups]
    b = aggregation.get(name).aggregate(gs, shuffled, plans)
    for m in SHAPES:
        torch.testing.assert_close(a.global_state.factors[m], b.global_state.factors[m], rtol=1e-14, atol=1e-14)
    for c in a.client_starts:
        for m in a.client_starts[c]:
            torch.testing.assert_close(a.client_starts[c][m], b.client_starts[c][m], rtol=1e-14, atol=1e-14)
    for m in a.base_deltas:
        torch.testing.assert_close(a.base_deltas[m][:2], b.base_deltas[m][:2], rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("name", RULES)
def test_round0_zero_B_works(name):
    gs = global_state(zero_B=True)
    plans = {0: {m: R for m in SHAPES}, 1: {"l0.q": 3}}
    ups = [update(0, plans[0], 10, zero_B=True), update(1, plans[1], 5, zero_B=True)]
    res = aggregation.get(name).aggregate(gs, ups, plans)
    assert not res.rejected
    for m in SHAPES:
        A, B = res.global_state.factors[m]
        assert torch.isfinite(A).all() and torch.isfinite(B).all()
        assert float((B @ A).abs().max()) == 0.0
    for st in res.client_starts.values():
        for A, B in st.values():
            assert torch.isfinite(A).all() and float((B @ A).abs().max()) == 0.0
    if name == "hetlora":
        assert any("norms are zero" in n for n in res.notes)


@pytest.mark.parametrize("name", RULES)
def test_untrained_module_unchanged_with_note(name):
    gs = global_state(zero_B=(name == "flora"))
    plans = {0: {"l0.q": 4}, 1: {"l0.q": 2, "l0.v": 3}}
    ups = [update(0, plans[0], 10), update(1, plans[1], 7)]
    res = aggregation.get(name).aggregate(gs, ups, plans)
    assert any("'l1.q'" in n and "unchanged" in n for n in res.notes), res.notes
    if name == "flora":  # base unchanged (nothing to merge); the adapter restarts as every round
        assert "l1.q" not in res.base_deltas
        assert float(res.global_state.factors["l1.q"][1].abs().max()) == 0.0
    else:
        assert torch.equal(res.global_state.factors["l1.q"][0], gs.factors["l1.q"][0])
        assert torch.equal(res.global_state.factors["l1.q"][1], gs.factors["l1.q"][1])


@pytest.mark.parametrize("name", ["fedit", "hetlora", "fedpilot", "fedhello"])
def test_client_scale_folded(name):
    gs = global_state()
    plan = {m: R for m in SHAPES}
    u = update(0, plan, 8, scale=0.5)
    res = aggregation.get(name).aggregate(gs, [u], {0: plan})
    for m in SHAPES:
        torch.testing.assert_close(_prod(res.global_state.factors[m], SCALE), _prod(u.factors[m], 0.5), **TOL)


def test_float32_state_keeps_dtype():
    gs32 = GlobalState.from_factors({m: (A.float(), B.float()) for m, (A, B) in global_state().factors.items()},
                                    {m: SCALE for m in SHAPES})
    plans, _ = round_setup(3)
    ups = [update(c, plans[c], 10 + c, dtype=torch.float32) for c in plans]
    for name in RULES:
        res = aggregation.get(name).aggregate(gs32, ups, plans)
        assert not res.rejected
        for A, B in res.global_state.factors.values():
            assert A.dtype == B.dtype == torch.float32


def test_flexlora_batched_group_equals_per_module():
    """l0.q and l0.v have equal shapes and trainers, so they are SVD'd in one batched call."""
    gs = global_state()
    plans = {0: {"l0.q": 4, "l0.v": 4}, 1: {"l0.q": 6, "l0.v": 6}}
    ups = [update(0, plans[0], 10, scale=0.7), update(1, plans[1], 25, scale=1.3)]
    both = aggregation.get("flexlora").aggregate(gs, ups, plans)
    for m in ("l0.q", "l0.v"):
        single_plans = {c: {m: p[m]} for c, p in plans.items()}
        single_ups = [update(c, single_plans[c], u.num_samples, scale=u.scales[m])
                      for c, u in zip(plans, ups, strict=True)]
        for su, u in zip(single_ups, ups, strict=True):
            su.factors[m] = u.factors[m]
        one = aggregation.get("flexlora").aggregate(gs, single_ups, single_plans)
        torch.testing.assert_close(_prod(both.global_state.factors[m]), _prod(one.global_state.factors[m]), **TOL)
        for c in plans:
            torch.testing.assert_close(_prod(both.client_starts[c][m]), _prod(one.client_starts[c][m]), **TOL)
