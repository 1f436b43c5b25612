"""fk-adaptive (ours) end to end on tiny BERT: plans within budget, re-solved as importance follows training, a
resumed run identical to an uninterrupted one; and the eval_every / eval_last schedule."""

import pytest

from fedkernels.errors import ConfigError
from fedkernels.federated import FederatedConfig, FederatedTrainer
from tests.federated.test_trainer import BASE, assert_same_factors, assert_same_history, global_factors


def cfg(tmp_path, name="run", **kw):
    return FederatedConfig(**{**BASE, "strategy": "fk-adaptive", "output_dir": str(tmp_path / name), **kw})


def test_plans_fit_and_are_resolved_when_importance_moves(tmp_path):
    trainer = FederatedTrainer(cfg(tmp_path, rounds=4, fraction=1.0, allocation_options={"replan_tol": 0.0}))
    summary = trainer.run()
    for h in summary.history:
        for c in h["clients"]:
            assert c["planned_bytes"] <= c["budget"], c
            if c.get("measured_bytes"):
                assert c["measured_bytes"] <= c["budget"], c
    # tolerance 0: every round after the first sees new update norms and re-solves
    assert trainer.planner.replans == [2, 3, 4]
    imp = trainer.planner.current_importance()
    assert sum(imp.values()) == pytest.approx(1.0) and imp != trainer.planner.fisher
    assert set(trainer.global_state.extra["update_norms"]) <= set(trainer.layers)


def test_a_huge_tolerance_never_replans(tmp_path):
    trainer = FederatedTrainer(cfg(tmp_path, rounds=3, allocation_options={"replan_tol": 2.0}))
    trainer.run()
    assert trainer.planner.replans == []


def test_resumed_run_equals_the_uninterrupted_one(tmp_path):
    opts = {"replan_tol": 0.02}
    full = FederatedTrainer(cfg(tmp_path, "full", rounds=4, allocation_options=opts))
    s_full = full.run()
    part = FederatedTrainer(cfg(tmp_path, "part", rounds=4, allocation_options=opts))
    part.run(stop_after=2)
    again = FederatedTrainer(cfg(tmp_path, "part", rounds=4, allocation_options=opts))
    s_again = again.run(resume=True)
    assert_same_history(s_again.history, s_full.history)
    assert_same_factors(global_factors(again), global_factors(full))
    assert again.planner.replans == full.planner.replans


def test_coverage_floor_reaches_the_plans(tmp_path):
    from collections import Counter

    trainer = FederatedTrainer(cfg(tmp_path, rounds=2, fraction=1.0, allocation_options={"min_coverage": 1.0}))
    summary = trainer.run()
    plans = trainer.planner.plans_for_round(2, list(range(trainer.cfg.num_clients)), trainer.budgets)
    counts = Counter(m for p in plans.values() for m in p.modules)
    assert counts and set(counts.values()) == {trainer.cfg.num_clients}  # every kept module: every client
    for h in summary.history:
        for c in h["clients"]:
            assert c["planned_bytes"] <= c["budget"], c


@pytest.mark.parametrize("opts", [{"replan_tol": -1}, {"ig_lambda": 1.5}, {"decay": "0.5"}, {"lam": 0.5},
                                  {"min_coverage": 1.2}])
def test_bad_allocation_options_are_refused(tmp_path, opts):
    with pytest.raises(ConfigError) as exc:
        FederatedTrainer(cfg(tmp_path, allocation_options=opts))
    assert next(iter(opts)) in str(exc.value)


def test_allocation_options_on_a_fixed_strategy_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="not adaptive"):
        FederatedTrainer(cfg(tmp_path, strategy="fedpilot", allocation_options={"replan_tol": 0.1}))


def test_eval_schedule_evaluates_every_k_and_the_last_rounds(tmp_path):
    summary = FederatedTrainer(cfg(tmp_path, strategy="fedra", rounds=5, eval_every=2, eval_last=2)).run()
    evaluated = [h["round"] for h in summary.history if "accuracy" in h]
    assert evaluated == [2, 4, 5]
    assert all("loss" not in h for h in summary.history if h["round"] in (1, 3))
    assert summary.final_accuracy == summary.history[-1]["accuracy"]


def test_server_lr_moves_the_head_part_way_to_the_clients_average(tmp_path, monkeypatch):
    import torch

    from fedkernels.federated import trainer as trainer_mod

    averages = []
    real = trainer_mod._weighted_head
    monkeypatch.setattr(trainer_mod, "_weighted_head", lambda good: averages.append(real(good)) or averages[-1])
    trainer = FederatedTrainer(cfg(tmp_path, rounds=1, aggregation_options={"server_lr": 0.25}))
    before = {k: v.clone() for k, v in trainer.global_head.items()}
    trainer.run()
    assert before and len(averages) == 1
    for k, old in before.items():
        want = old.double() + 0.25 * (averages[0][k].double() - old.double())
        assert not torch.equal(averages[0][k], old)  # the clients did move the head
        assert torch.allclose(trainer.global_head[k].double(), want, atol=1e-6), k
