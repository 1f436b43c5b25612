"""Parallel client simulation (`parallel_clients > 1`, `fedkernels.federated.parallel`) on a tiny random BERT."""

import numpy as np
import pytest
import torch

from fedkernels.errors import ConfigError
from fedkernels.federated import FederatedConfig, FederatedTrainer
from tests.federated.test_trainer import BASE, assert_same_history, global_factors


@pytest.fixture(autouse=True)
def one_thread():
    # 2 shared cores: two intra-op threads competing with other processes made these steps ~100x slower
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make(tmp_path, name, *, no_dropout=False, **kw):
    trainer = FederatedTrainer(FederatedConfig(**{**BASE, "output_dir": str(tmp_path / name), **kw}))
    if no_dropout:  # base dropout draws different masks for a concatenated batch: off for exact comparisons
        for m in trainer.model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
    return trainer


def train_round(trainer, round_idx=1):
    job = trainer.plan_round(round_idx)
    out = trainer.executor.train(job)
    return job.sampled, job.plans, out.results, out.client_log, out.failures


def rel_err(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


@pytest.mark.parametrize("strategy", ["fedpilot", "hetlora"])
def test_parallel_round_equals_sequential(tmp_path, strategy):
    kw = dict(strategy=strategy, fraction=1.0, rounds=1, measure_memory=False, no_dropout=True)
    seq = make(tmp_path, "seq", **kw)
    par = make(tmp_path, "par", parallel_clients=3, **kw)
    sampled, plans, r_seq, _, f_seq = train_round(seq)
    _, _, r_par, log_par, f_par = train_round(par)
    assert not f_seq and not f_par
    # heterogeneous plans: different module sets (fedpilot) or ranks (hetlora) inside one group
    shapes = {(frozenset(p.modules), tuple(sorted(p.modules.values()))) for p in plans.values()}
    assert len(shapes) > 1, shapes
    assert [r.client_id for r in r_par] == sampled == [r.client_id for r in r_seq]
    assert all(len(r.extra["parallel_group"]) == 3 for r in r_par)  # really trained in groups of 3
    for a, b in zip(r_par, r_seq, strict=True):
        assert a.ranks == b.ranks and a.factors.keys() == b.factors.keys() and a.num_samples == b.num_samples
        assert a.bytes_down == b.bytes_down
        for m in b.factors:
            assert a.factors[m][0].shape == b.factors[m][0].shape
            assert rel_err(a.factors[m][0], b.factors[m][0]) < 1e-5, (a.client_id, m)
            assert rel_err(a.factors[m][1], b.factors[m][1]) < 1e-5, (a.client_id, m)
        for k in b.head:
            assert rel_err(a.head[k], b.head[k]) < 1e-5, (a.client_id, k)
        assert a.loss == pytest.approx(b.loss, rel=1e-5)
    # training moved the adapters: the equality is not that of two untouched starts
    g = seq.global_state.factors
    moved = [m for r in r_seq for m in r.factors if not torch.allclose(r.factors[m][1], g[m][1][:, :r.ranks[m]])]
    assert moved
    assert [e["status"] for e in log_par] == ["trained"] * len(sampled)


def test_parallel_isolates_faulty_clients(tmp_path):
    kw = dict(fraction=1.0, rounds=1, faults={"1": "raise", "3": "nan"}, min_fit_fraction=0.3)
    runs = {}
    for pc in (1, 3):
        trainer = make(tmp_path, f"pc{pc}", parallel_clients=pc, **kw)
        trainer.client_indices[4] = np.array([], dtype=np.int64)  # client 4 crashes inside training
        rec = trainer.run().history[0]
        runs[pc] = rec
    for rec in runs.values():
        assert not rec["skipped"]
        assert sorted(rec["succeeded"]) == [0, 2, 5]
        assert {f["client"] for f in rec["failures"]} == {1, 3, 4}
        status = {c["client"]: c["status"] for c in rec["clients"]}
        assert status[1] == "failed" and status[4] == "failed" and status[3] == "rejected"
    reasons = {f["client"]: f["reason"] for f in runs[3]["failures"]}
    assert "ZeroDivisionError" in reasons[4] and "injected fault" in reasons[1]


def test_parallel_run_is_deterministic(tmp_path):
    # default dropout on and measure_memory on: a mix of sequential (measuring) and parallel clients
    t1, t2 = make(tmp_path, "a", parallel_clients=2), make(tmp_path, "b", parallel_clients=2)
    s1, s2 = t1.run(), t2.run()
    assert_same_history(s1.history, s2.history)
    assert any(c.get("measured_bytes") for h in s1.history for c in h["clients"])  # the measuring clients did
    f1, f2 = global_factors(t1), global_factors(t2)
    assert all(torch.equal(f1[m][0], f2[m][0]) and torch.equal(f1[m][1], f2[m][1]) for m in f1)
    assert 0.0 <= s1.final_accuracy <= 1.0 and not any(h["skipped"] for h in s1.history)


def test_lora_dropout_falls_back_to_sequential(tmp_path):
    kw = dict(rounds=1, lora_dropout=0.1, measure_memory=False)
    a = make(tmp_path, "a", **kw).run()
    b = make(tmp_path, "b", parallel_clients=3, **kw).run()
    assert_same_history(a.history, b.history)


def test_parallel_clients_must_be_positive():
    with pytest.raises(ConfigError, match="parallel_clients.*0"):
        FederatedConfig(**{**BASE, "parallel_clients": 0})


def test_parallel_fallback_goes_through_its_sequential_executor(tmp_path):
    """The seam: a group that raises is retrained by the ParallelExecutor's own SequentialExecutor (no call back
    into the trainer), and only that group."""
    from fedkernels.federated.executor import ParallelExecutor, SequentialExecutor

    trainer = make(tmp_path, "spy", fraction=1.0, rounds=1, measure_memory=False)
    trainer.client_indices[4] = np.array([], dtype=np.int64)  # client 4 crashes inside training
    calls = []

    class Spy(SequentialExecutor):
        def train(self, job, progress=None):
            calls.append(list(job.sampled))
            return super().train(job, progress)

    executor = ParallelExecutor(trainer.shared, trainer.settings, 3, fallback=Spy(trainer.shared, trainer.settings))
    out = executor.train(trainer.plan_round(1))
    assert calls == [[3, 4, 5]]
    assert [f["client"] for f in out.failures] == [4] and "ZeroDivisionError" in out.failures[0]["reason"]
    assert [r.client_id for r in out.results] == [0, 1, 2, 3, 5]
    assert all(r.extra["parallel_group"] == [0, 1, 2] for r in out.results[:3])
    assert [e["client"] for e in out.client_log] == list(range(6))
