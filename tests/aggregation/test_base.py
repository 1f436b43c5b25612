"""Registry, GlobalState round trip, validation and rejection paths."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from fedkernels import aggregation
from fedkernels.aggregation import ClientUpdate, GlobalState, validate_update
from fedkernels.errors import ClientUpdateError, ConfigError, RankError, UnknownModuleError

from .helpers import SHAPES, R, global_state, round_setup, update

RULES = aggregation.available()


def test_registry_lists_all_rules():
    assert sorted(["fedit", "ffa", "flora", "hetlora", "flexlora", "fedra", "fedhello", "fedpilot",
                   "fk-adaptive"]) == RULES
    for name in RULES:
        assert aggregation.get(name).name == name


def test_registry_errors_quote_values():
    with pytest.raises(ValueError, match=r"'nope'.*fedit.*flexlora"):
        aggregation.get("nope")
    with pytest.raises(ConfigError, match="bogus"):
        aggregation.get("fedit", bogus=1)
    with pytest.raises(ConfigError, match="-1"):
        aggregation.get("fedpilot", eta_max=-1)
    with pytest.raises(ConfigError, match="1.5"):
        aggregation.get("hetlora", prune_gamma=1.5)
    with pytest.raises(ConfigError, match="'sideways'"):
        aggregation.get("fedhello", pad="sideways")
    with pytest.raises(ConfigError, match="'median'"):
        aggregation.get("fedit", weighting="median")


def test_global_state_round_trip_through_json():
    gs = global_state()
    gs.extra.update(round=3, staleness={"l0.q": 0, "l1.q": 2}, tensor_stat=torch.randn(4))
    d = gs.state_dict()
    meta = json.loads(json.dumps({k: v for k, v in d.items() if not isinstance(v, torch.Tensor)}))
    tensors = {k: v for k, v in d.items() if isinstance(v, torch.Tensor)}
    back = GlobalState.from_factors(gs.factors, gs.scales)
    back.load_state_dict({**meta, **tensors})
    assert back.round == 3 and back.extra["staleness"] == {"l0.q": 0, "l1.q": 2}
    assert torch.equal(back.extra["tensor_stat"], gs.extra["tensor_stat"])
    gs.extra["bad"] = {1: object()}
    with pytest.raises(ConfigError, match="'bad'"):
        gs.state_dict()


def test_clone_is_deep():
    gs = global_state()
    gs.extra["staleness"] = {"l0.q": 1}
    c = gs.clone()
    c.factors["l0.q"][0].add_(1.0)
    c.extra["staleness"]["l0.q"] = 7
    assert not torch.equal(c.factors["l0.q"][0], gs.factors["l0.q"][0])
    assert gs.extra["staleness"]["l0.q"] == 1


@pytest.mark.parametrize("name", RULES)
def test_resume_from_state_dict_gives_identical_next_round(name):
    rule = aggregation.get(name, **({"prune_gamma": 0.5} if name == "hetlora" else {}))
    plans, ups = round_setup()
    r1 = rule.aggregate(global_state(), ups, plans)
    d = r1.global_state.state_dict()
    meta = json.loads(json.dumps({k: v for k, v in d.items() if not isinstance(v, torch.Tensor)}))
    resumed = GlobalState.from_factors(r1.global_state.factors, r1.global_state.scales)
    resumed.load_state_dict({**meta, **{k: v for k, v in d.items() if isinstance(v, torch.Tensor)}})
    plans2, ups2 = round_setup(3)
    a = rule.aggregate(r1.global_state, ups2, plans2)
    b = rule.aggregate(resumed, ups2, plans2)
    for m in SHAPES:
        assert torch.equal(a.global_state.factors[m][0], b.global_state.factors[m][0])
        assert torch.equal(a.global_state.factors[m][1], b.global_state.factors[m][1])
    assert a.global_state.extra == b.global_state.extra


def test_start_for_truncates_and_checks():
    gs = global_state()
    rule = aggregation.get("fedit")
    st = rule.start_for(gs, 3, {"l0.q": 2, "l1.q": R})
    assert torch.equal(st["l0.q"][0], gs.factors["l0.q"][0][:2])
    assert torch.equal(st["l0.q"][1], gs.factors["l0.q"][1][:, :2])
    with pytest.raises(UnknownModuleError, match="'nope'"):
        rule.start_for(gs, 3, {"nope": 2})
    with pytest.raises(RankError, match="rank 9"):
        rule.start_for(gs, 3, {"l0.q": 9})


# ---------------------------------------------------------------- rejection paths
def _corrupt(kind: str, u: ClientUpdate, plans: dict) -> tuple[ClientUpdate, str | None, str]:
    """Return a bad copy of client u's update, the module at fault and the expected reason."""
    f = {m: (A.clone(), B.clone()) for m, (A, B) in u.factors.items()}
    u = dataclasses.replace(u, factors=f, ranks=dict(u.ranks), scales=dict(u.scales))
    m = "l0.q"
    A, B = f[m]
    if kind == "nan":
        B[0, 0] = float("nan")
        return u, m, "non_finite"
    if kind == "inf":
        A[1, 2] = float("-inf")
        return u, m, "non_finite"
    if kind == "in_dim":
        f[m] = (A[:, :-1], B)
        return u, m, "shape"
    if kind == "out_dim":
        f[m] = (A, torch.cat([B, B[:1]]))
        return u, m, "shape"
    if kind == "ab_rank":
        f[m] = (A, B[:, :-1])
        return u, m, "shape"
    if kind == "plan_rank":
        f[m] = (A[:-1], B[:, :-1])
        u.ranks[m] -= 1
        return u, m, "rank"
    if kind == "declared_rank":
        u.ranks[m] += 1
        return u, m, "rank"
    if kind == "unknown_module":
        f["l9.k"] = (A, B)
        return u, "l9.k", "unknown_module"
    if kind == "unplanned_module":
        plans[u.client_id] = {k: v for k, v in plans[u.client_id].items() if k != "l1.q"}
        return u, "l1.q", "unplanned_module"
    if kind == "missing_module":
        del f["l1.q"]
        return u, "l1.q", "missing_module"
    if kind == "scale":
        u.scales[m] = -1.0
        return u, m, "scale"
    if kind.startswith("n="):
        u.num_samples = {"n=0": 0, "n=-3": -3, "n=nan": float("nan"), "n=2.5": 2.5, "n=True": True}[kind]
        return u, None, "num_samples"
    if kind == "not_sampled":
        del plans[u.client_id]
        return u, None, "not_sampled"
    raise AssertionError(kind)


KINDS = ["nan", "inf", "in_dim", "out_dim", "ab_rank", "plan_rank", "declared_rank", "unknown_module",
         "unplanned_module", "missing_module", "scale", "n=0", "n=-3", "n=nan", "n=2.5", "n=True", "not_sampled"]


def _assert_same(a, b):
    for m in SHAPES:
        torch.testing.assert_close(a.global_state.factors[m], b.global_state.factors[m], rtol=1e-13, atol=1e-13)
    assert set(a.client_starts) == set(b.client_starts)
    for m in a.base_deltas:
        Aa, Ba, sa = a.base_deltas[m]
        Ab, Bb, sb = b.base_deltas[m]
        torch.testing.assert_close(Ba @ Aa * sa, Bb @ Ab * sb, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("name", RULES)
@pytest.mark.parametrize("kind", KINDS)
def test_rejection_paths_both_orders(name, kind):
    rule = aggregation.get(name)
    gs = global_state()
    plans, ups = round_setup(3)
    bad_plan = {c: dict(p) for c, p in plans.items()}
    bad_client = 7
    bad_plan[bad_client] = {m: R for m in SHAPES}
    bad, module, reason = _corrupt(kind, update(bad_client, bad_plan[bad_client], 30), bad_plan)
    clean = rule.aggregate(gs, ups, plans)
    first = rule.aggregate(gs, [bad] + ups, bad_plan)
    last = rule.aggregate(gs, ups + [bad], bad_plan)
    for res in (first, last):
        assert res.rejected, kind
        assert all(isinstance(e, ClientUpdateError) and e.client == bad_client for e in res.rejected)
        hit = [e for e in res.rejected if e.reason == reason and e.module == module]
        assert hit, [(e.reason, e.module, str(e)) for e in res.rejected]
        assert f"client {bad_client}" in str(hit[0])
        if module is not None:
            assert repr(module) in str(hit[0])
        _assert_same(res, clean)
    assert not clean.rejected


def test_duplicate_updates_rejected_in_both_orders():
    rule = aggregation.get("fedit")
    gs = global_state()
    plans, ups = round_setup(3)
    dup = update(1, plans[1], 99)
    a = rule.aggregate(gs, ups + [dup], plans)
    b = rule.aggregate(gs, [dup] + ups, plans)
    without = rule.aggregate(gs, [u for u in ups if u.client_id != 1], plans)
    for res in (a, b):
        assert [e.reason for e in res.rejected] == ["duplicate", "duplicate"]
        _assert_same(res, without)


def test_validate_update_reports_all_problems():
    gs = global_state()
    u = update(2, {"l0.q": 3, "l1.q": 2}, 0)
    u.factors["l0.q"][1][0, 0] = float("inf")
    errs = validate_update(u, {"l0.q": 3, "l1.q": 4, "l0.v": 2}, gs)
    reasons = sorted(e.reason for e in errs)
    assert reasons == ["missing_module", "non_finite", "num_samples", "rank"]
    assert any("planned rank 4" in str(e) for e in errs)


@pytest.mark.parametrize("name", RULES)
def test_input_state_not_mutated(name):
    gs = global_state()
    gs.extra["staleness"] = {"l0.q": 1}
    before = {m: (A.clone(), B.clone()) for m, (A, B) in gs.factors.items()}
    plans, ups = round_setup()
    aggregation.get(name).aggregate(gs, ups, plans)
    for m in SHAPES:
        assert torch.equal(before[m][0], gs.factors[m][0]) and torch.equal(before[m][1], gs.factors[m][1])
    assert gs.extra == {"staleness": {"l0.q": 1}}
