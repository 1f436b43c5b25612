"""HeteroLoRAStrategy on an in-process grid (no Ray, no sockets): the real ClientApp, validated replies."""

from __future__ import annotations

import copy
import json
import logging

import numpy as np
import pytest
import torch

pytest.importorskip("flwr")

from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict  # noqa: E402

from fedkernels.federated import FederatedConfig, FederatedTrainer  # noqa: E402
from fedkernels.federated.trainer import prepare  # noqa: E402
from fedkernels.flower.client import make_client_app  # noqa: E402
from fedkernels.flower.strategy import HeteroLoRAStrategy  # noqa: E402
from tests.federated.test_trainer import BASE  # noqa: E402
from tests.flower.grid import InProcessGrid, set_task_identity  # noqa: E402


@pytest.fixture(autouse=True)
def _identity():
    set_task_identity()


def cfg(tmp_path, name="run", **kw):
    return FederatedConfig(**{**BASE, "output_dir": str(tmp_path / name), **kw})


def grid_for(strategy, budgets_as="str"):
    """One node per client partition; node ids are scattered (Flower's are random 64-bit ints)."""
    nodes = {}
    for cid, b in strategy.trainer.configured_budgets.items():
        nodes[1000 + 37 * cid] = {"partition-id": cid, "memory-budget": f"{b}B" if budgets_as == "str" else b}
    return InProcessGrid(make_client_app(), nodes)


def factors(state):
    return {m: (A.clone(), B.clone()) for m, (A, B) in state.factors.items()}


def assert_close_factors(a, b, atol=1e-6):
    assert a.keys() == b.keys()
    for m in a:
        torch.testing.assert_close(a[m][0], b[m][0], atol=atol, rtol=1e-5)
        torch.testing.assert_close(a[m][1], b[m][1], atol=atol, rtol=1e-5)


def snapshot(strategy, rnd):
    """What aggregate_train of round ``rnd`` consumes or changes, to run it twice on the same state."""
    tr = strategy.trainer
    return (tr.global_state, dict(tr.global_head), dict(tr.client_starts), strategy._rounds[rnd],
            copy.deepcopy(strategy.executor._pending[rnd]))


def restore(strategy, rnd, snap):
    tr = strategy.trainer
    tr.global_state, tr.global_head, starts, strategy._rounds[rnd], pending = snap
    tr.client_starts = dict(starts)
    strategy.executor._pending[rnd] = copy.deepcopy(pending)


def first_round(strategy, grid):
    """configure_train + the nodes' replies of round 1, by client id."""
    msgs = list(strategy.configure_train(1, ArrayRecord(), ConfigRecord(), grid))
    return {r.content["config"]["client-id"]: r for r in grid.send_and_receive(msgs)}


def replace_arrays(reply: Message, change) -> Message:
    """A copy of ``reply`` whose ArrayRecord went through ``change(dict[str, np.ndarray]) -> dict``."""
    arrays = {k: reply.content["arrays"][k].numpy().copy() for k in reply.content["arrays"]}
    arrays = change(arrays)
    content = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                          "metrics": reply.content["metrics"], "config": reply.content["config"]})
    return Message(content, metadata=reply.metadata)


def test_flower_strategy_matches_in_process_trainer(tmp_path):
    """Same seed, same plans: the Flower path (wire encoding, ClientApp, validation) ends at the trainer's
    global adapter, and the heterogeneous plans really differ in modules and ranks."""
    ref = FederatedTrainer(cfg(tmp_path, "ref"))
    ref.run()
    strategy = HeteroLoRAStrategy(cfg(tmp_path, "flwr"), round_timeout=30)
    grid = grid_for(strategy)
    summary = strategy.start(grid)
    assert summary.rounds == 2
    assert strategy.trainer.budgets == ref.budgets  # node-reported budgets ("<n>B" strings) parsed back
    assert_close_factors(factors(strategy.trainer.global_state), factors(ref.global_state))
    for k in ref.global_head:
        torch.testing.assert_close(strategy.trainer.global_head[k], ref.global_head[k], atol=1e-6, rtol=1e-5)
    got, want = summary.history, ref.history
    assert [h["succeeded"] for h in got] == [h["succeeded"] for h in want]
    assert [h["accuracy"] for h in got] == pytest.approx([h["accuracy"] for h in want])
    shapes = {(c["modules"], tuple(c["ranks"])) for h in got for c in h["clients"]}
    assert len(shapes) > 1, shapes  # heterogeneous replies: different module sets / ranks in one run
    assert (tmp_path / "flwr" / "checkpoints" / "LATEST").read_text().strip() == "round-00002"
    assert all(b["bytes_down"] > 0 and b["bytes_up"] > 0 for b in strategy.bytes_log)


def test_flora_nodes_train_on_the_merged_base_like_in_process(tmp_path):
    """FLoRA merges the stacked adapters into the frozen base on the server: nodes get that base (round 2)."""
    ref = FederatedTrainer(cfg(tmp_path, "ref", strategy="flora"))
    ref.run()
    strategy = HeteroLoRAStrategy(cfg(tmp_path, "flwr", strategy="flora"), round_timeout=30)
    strategy.start(grid_for(strategy))
    fresh = prepare(cfg(tmp_path, "fresh", strategy="flora"))
    assert any(not torch.equal(fresh.layers[m].base_layer.weight, layer.base_layer.weight)
               for m, layer in ref.layers.items())  # the base really moved
    for m, layer in ref.layers.items():
        torch.testing.assert_close(strategy.trainer.layers[m].base_layer.weight, layer.base_layer.weight,
                                   atol=1e-6, rtol=1e-5)
    assert_close_factors(factors(strategy.trainer.global_state), factors(ref.global_state))


def test_nan_shape_and_error_replies_are_excluded_and_the_round_goes_on(tmp_path, caplog):
    faults = {"0": "raise", "1": "nan", "2": "shape"}
    strategy = HeteroLoRAStrategy(cfg(tmp_path, fraction=1.0, rounds=1, faults=faults), round_timeout=30)
    grid = grid_for(strategy, budgets_as="int")
    before = factors(strategy.trainer.global_state)
    with caplog.at_level(logging.WARNING, logger="fedkernels.flower"):
        rec = strategy.start(grid).history[0]
    assert not rec["skipped"] and rec["succeeded"] == [3, 4, 5]
    reasons = {f["client"]: f["reason"] for f in rec["failures"]}
    assert set(reasons) == {0, 1, 2}
    assert "error reply" in reasons[0] and "crashed" in reasons[0]
    assert "non-finite" in reasons[1] and "shape" in reasons[2]
    status = {c["client"]: c["status"] for c in rec["clients"]}
    assert status == {0: "failed", 1: "rejected", 2: "rejected", 3: "trained", 4: "trained", 5: "trained"}
    assert any("client 1 rejected" in r.message for r in caplog.records)
    after = factors(strategy.trainer.global_state)
    assert any(not torch.equal(before[m][1], after[m][1]) for m in before)
    assert all(torch.isfinite(A).all() and torch.isfinite(B).all() for A, B in after.values())


def test_wrong_shape_reply_gives_the_same_result_in_either_order(tmp_path):
    strategy = HeteroLoRAStrategy(cfg(tmp_path, fraction=1.0, rounds=1), round_timeout=30)
    grid = grid_for(strategy)
    msgs = list(strategy.configure_train(1, ArrayRecord(), ConfigRecord(), grid))
    replies = grid.send_and_receive(msgs)
    victim = 0
    bad_key = next(k for k in replies[victim].content["arrays"] if k.startswith("update/") and k.endswith("/B"))
    bad = replace_arrays(replies[victim], lambda a: {**a, bad_key: a[bad_key][:-1]})
    bad_cid = replies[victim].content["config"]["client-id"]
    good = replies[1:]
    snap = snapshot(strategy, 1)
    arrays1, metrics1 = strategy.aggregate_train(1, [bad, *good])
    rec1 = strategy.records[1]
    restore(strategy, 1, snap)
    arrays2, metrics2 = strategy.aggregate_train(1, [*reversed(good), bad])
    rec2 = strategy.records[1]
    for rec in (rec1, rec2):
        assert bad_cid not in rec["succeeded"] and len(rec["succeeded"]) == len(good)
        assert [f["client"] for f in rec["failures"]] == [bad_cid] and "shape" in rec["failures"][0]["reason"]
    assert arrays1.keys() == arrays2.keys()
    for k in arrays1:
        np.testing.assert_array_equal(arrays1[k].numpy(), arrays2[k].numpy())
    assert metrics1["accuracy"] == metrics2["accuracy"] and metrics1["skipped"] == 0


def test_reply_validation_rejects_keys_dtype_counts_and_impostors(tmp_path):
    strategy = HeteroLoRAStrategy(cfg(tmp_path, fraction=1.0, rounds=1, min_fit_fraction=0.3), round_timeout=30)
    grid = grid_for(strategy)
    by_cid = first_round(strategy, grid)
    plans = strategy._rounds[1].job.plans
    small = min(plans, key=lambda c: len(plans[c].modules))  # a client that leaves some module out
    unplanned = next(m for m in strategy.trainer.module_names if m not in plans[small].modules)
    shape_of = {m: (A.shape, B.shape) for m, (A, B) in strategy.trainer.global_state.factors.items()}
    rng = np.random.default_rng(0)
    tampered = {
        small: replace_arrays(by_cid[small], lambda a: {
            **a, f"update/{unplanned}/A": rng.standard_normal((1, shape_of[unplanned][0][1])).astype(np.float32),
            f"update/{unplanned}/B": rng.standard_normal((shape_of[unplanned][1][0], 1)).astype(np.float32)}),
    }
    others = [c for c in sorted(by_cid) if c != small]
    k64 = next(k for k in by_cid[others[0]].content["arrays"] if k.startswith("update/"))
    tampered[others[0]] = replace_arrays(by_cid[others[0]], lambda a: {**a, k64: a[k64].astype(np.float64)})
    r = by_cid[others[1]]
    metrics = r.content["metrics"]
    metrics["num-examples"] = -3
    tampered[others[1]] = r
    r = by_cid[others[2]]
    r.content["config"]["client-id"] = others[3]
    tampered[others[2]] = r
    kept = [by_cid[c] for c in others[3:]]
    strategy.aggregate_train(1, [*tampered.values(), *kept])
    rec = strategy.records[1]
    reasons = {f["client"]: f["reason"] for f in rec["failures"]}
    assert "not in its plan" in reasons[small]
    assert "float64" in reasons[others[0]]
    assert "num-examples" in reasons[others[1]]
    assert "claims client id" in reasons[others[2]]
    assert rec["succeeded"] == others[3:] and not rec["skipped"]


def test_too_few_good_replies_keep_the_global_adapter(tmp_path):
    strategy = HeteroLoRAStrategy(cfg(tmp_path, fraction=1.0, rounds=1, min_fit_fraction=0.9,
                                      faults={"0": "nan", "1": "raise"}), round_timeout=30)
    grid = grid_for(strategy)
    grid.down.add(next(n for n, c in grid.nodes.items() if c["partition-id"] == 2))  # a node gone before the round
    before = factors(strategy.trainer.global_state)
    head = {k: v.clone() for k, v in strategy.trainer.global_head.items()}
    rec = strategy.start(grid).history[0]
    assert rec["skipped"] and rec["succeeded"] == [3, 4, 5]
    assert "no SuperNode" in {f["client"]: f["reason"] for f in rec["failures"]}[2]
    after = factors(strategy.trainer.global_state)
    assert all(torch.equal(before[m][0], after[m][0]) and torch.equal(before[m][1], after[m][1]) for m in before)
    assert all(torch.equal(head[k], strategy.trainer.global_head[k]) for k in head)


def test_silent_node_counts_as_failed_and_resume_continues(tmp_path):
    c = cfg(tmp_path, rounds=2)
    strategy = HeteroLoRAStrategy(c, round_timeout=30)
    grid = grid_for(strategy)
    strategy.start(grid, num_rounds=1)
    assert strategy.trainer.round == 1 and c.rounds == 2  # num_rounds left the config object alone
    # a fresh server resumes from the round-1 checkpoint; a node that stops answering mid-round is excluded
    resumed = HeteroLoRAStrategy(c, round_timeout=30)
    grid2 = grid_for(resumed)
    sampled = resumed.trainer.sample_clients(2)
    silent = next(n for n, cf in grid2.nodes.items() if cf["partition-id"] == sampled[0])

    real = grid2.send_and_receive

    def drop_silent(messages, *, timeout=None):  # the node is listed online but its reply never comes
        return [r for r in real(messages, timeout=timeout)
                if r.metadata.src_node_id != silent or r.metadata.message_type != "train"]

    grid2.send_and_receive = drop_silent
    summary = resumed.start(grid2, resume=True)
    assert summary.rounds == 2 and [h["round"] for h in summary.history] == [1, 2]
    rec = summary.history[-1]
    assert sampled[0] not in rec["succeeded"]
    assert "no reply" in {f["client"]: f["reason"] for f in rec["failures"]}[sampled[0]]


def test_run_config_builds_the_federated_config(tmp_path):
    from fedkernels.errors import ConfigError
    from fedkernels.flower.server import config_from_run_config

    (tmp_path / "app").mkdir()
    (tmp_path / "app" / "fed.toml").write_text('[federated]\nmodel = "tiny-bert"\nrounds = 5\nnum_clients = 4\n')
    cfg_ = config_from_run_config({"config": "fed.toml", "overrides": "rounds=2; seed=3",
                                   "output-dir": str(tmp_path / "o")}, app_dir=tmp_path / "app")
    assert (cfg_.model, cfg_.rounds, cfg_.seed, cfg_.num_clients) == ("tiny-bert", 2, 3, 4)
    assert cfg_.output_dir == str(tmp_path / "o")
    with pytest.raises(ConfigError, match="roundz"):
        config_from_run_config({"config": "fed.toml", "overrides": "roundz=2"}, app_dir=tmp_path / "app")


def test_node_budgets_are_parsed():
    from fedkernels.errors import ConfigError
    from fedkernels.flower.executor import parse_budget

    assert parse_budget("6GiB", 1) == 6 * 2**30 and parse_budget(12345, 1) == 12345 and parse_budget(None, 1) is None
    for bad in (True, float("nan"), "1e308TiB", 10**400, "lots", -5, 0):
        with pytest.raises(ConfigError, match="node 9"):
            parse_budget(bad, 9)


# ---------------------------------------------------------------------------------------------- hostile nodes
def forged_round(tmp_path, forge, name="run"):
    """Round 1 with every client; ``forge(reply, strategy)`` tampers the reply of the first sampled client.
    Returns (strategy, victim client id, round record, honest-only global B of the victim's modules)."""
    strategy = HeteroLoRAStrategy(cfg(tmp_path, name, fraction=1.0, rounds=1, min_fit_fraction=0.3), round_timeout=30)
    by_cid = first_round(strategy, grid_for(strategy))
    victim = min(by_cid)
    forge(by_cid[victim], strategy)
    arrays, metrics = strategy.aggregate_train(1, list(by_cid.values()))
    return strategy, victim, strategy.records[1], arrays


def assert_only_victim_rejected(strategy, victim, rec, arrays, reason_part):
    reasons = {f["client"]: f["reason"] for f in rec["failures"]}
    assert set(reasons) == {victim} and reason_part in reasons[victim], reasons
    assert {c["client"]: c["status"] for c in rec["clients"]}[victim] == "rejected"
    assert not rec["skipped"] and victim not in rec["succeeded"] and len(rec["succeeded"]) == 5
    assert all(np.isfinite(arrays[k].numpy()).all() for k in arrays)


@pytest.mark.parametrize("claim", [10**12, 2**63 - 1, 1e300, float("nan"), 0.5])
def test_a_node_cannot_weigh_its_update_by_the_examples_it_claims(tmp_path, claim):
    """Issue 12.1: the weight is the size of the partition the server assigned; a different claim is rejected."""

    def forge(reply, strategy):
        reply.content["metrics"]["num-examples"] = claim

    assert_only_victim_rejected(*forged_round(tmp_path, forge), "num-examples")


@pytest.mark.parametrize("value", ["1e80", "1" + "0" * 400, "-2.0", "true", '"2.0"'])
def test_a_node_cannot_rescale_its_update(tmp_path, value):
    """Issue 12.2/12.3: a client-reported LoRA scale is never used; one that is not the plan's rejects the reply
    (1e80 made the global B Inf; 10**400 raised OverflowError out of aggregate_train)."""

    def forge(reply, strategy):
        scales = json.loads(reply.content["config"]["scales"])
        m = sorted(scales)[0]
        text = json.dumps({k: ("@" if k == m else v) for k, v in scales.items()})
        reply.content["config"]["scales"] = text.replace('"@"', value)

    assert_only_victim_rejected(*forged_round(tmp_path, forge), "scale")


@pytest.mark.parametrize("field,value,match", [
    ("measured-bytes", float("nan"), "measured-bytes"),  # raised "cannot convert float NaN to integer"
    ("measured-bytes", 1e300, "measured-bytes"),
    ("wall-s", float("inf"), "wall-s"),
])
def test_a_bad_metric_rejects_that_reply_alone(tmp_path, field, value, match):
    def forge(reply, strategy):
        reply.content["metrics"][field] = value

    assert_only_victim_rejected(*forged_round(tmp_path, forge), match)


def test_a_reply_with_a_wrong_record_type_rejects_that_reply_alone(tmp_path):
    def forge(reply, strategy):
        reply.content["arrays"] = ConfigRecord({"update/x/A": 1})

    assert_only_victim_rejected(*forged_round(tmp_path, forge), "ArrayRecord")


def late_node_grid(strategy, pid, budget):
    """Nodes for every partition but ``pid``, whose node joins after round 1 with ``budget``."""
    grid = grid_for(strategy)
    late = next(n for n, c in grid.nodes.items() if c["partition-id"] == pid)
    grid.nodes[late]["memory-budget"] = budget
    grid.contexts[late].node_config["memory-budget"] = budget
    grid.down.add(late)
    return grid, late


@pytest.mark.parametrize("budget", ["1B", "1e308TiB", float("nan"), "a lot"])
def test_a_late_node_with_a_bad_budget_is_excluded_and_the_run_goes_on(tmp_path, caplog, budget):
    """Issue 12.4: "1B" aborted the run with InfeasibleBudgetError in round 2; 1e308TiB / NaN raised."""
    strategy = HeteroLoRAStrategy(cfg(tmp_path, fraction=1.0, rounds=2), round_timeout=30)
    grid, late = late_node_grid(strategy, 5, budget)
    real = grid.send_and_receive
    rounds_done = []

    def join_after_round_1(messages, *, timeout=None):
        replies = real(messages, timeout=timeout)
        if any(m.metadata.message_type == "train" for m in messages):
            rounds_done.append(1)
            grid.down.discard(late)
        return replies

    grid.send_and_receive = join_after_round_1
    with caplog.at_level(logging.WARNING, logger="fedkernels.flower"):
        summary = strategy.start(grid)
    assert summary.rounds == 2 and len(rounds_done) == 2
    assert late in strategy.executor.excluded and late not in strategy.executor.nodes
    assert any(f"node {late} excluded" in r.message for r in caplog.records)
    rec = summary.history[-1]
    assert "no SuperNode" in {f["client"]: f["reason"] for f in rec["failures"]}[5]
    assert strategy.trainer.budgets[5] == strategy.trainer.configured_budgets[5]
    assert not rec["skipped"] and rec["succeeded"] == [0, 1, 2, 3, 4]


def test_a_partition_claimed_twice_takes_messages_and_budget_from_one_node(tmp_path, caplog):
    """Issue 12.4: messages went to the lowest node id but the budget came from the other claimant."""
    strategy = HeteroLoRAStrategy(cfg(tmp_path, fraction=1.0, rounds=1), round_timeout=30)
    grid = grid_for(strategy)
    budgets = strategy.trainer.configured_budgets
    small, large = min(budgets.values()), max(budgets.values())
    owner = next(n for n, c in grid.nodes.items() if c["partition-id"] == 0)
    grid.nodes[owner]["memory-budget"] = small
    grid.contexts[owner].node_config["memory-budget"] = small
    rival = owner + 10**6  # a higher node id claiming the same partition with another budget
    grid.nodes[rival] = {"partition-id": 0, "memory-budget": large}
    grid.contexts[rival] = type(grid.contexts[owner])(7, rival, dict(grid.nodes[rival]), RecordDict(), {})
    with caplog.at_level(logging.WARNING, logger="fedkernels.flower"):
        msgs = list(strategy.configure_train(1, ArrayRecord(), ConfigRecord(), grid))
    assert [m.metadata.dst_node_id for m in msgs if m.content["config"]["client-id"] == 0] == [owner]
    assert strategy.trainer.budgets[0] == small != large
    assert strategy._rounds[1].job.budgets[0] == small
    assert any("claimed by nodes" in r.message and str(owner) in r.message for r in caplog.records)


def test_the_trainer_loop_runs_on_the_flower_executor_too(tmp_path):
    """`FlowerExecutor.train` (the trainer's own loop) and Flower's configure_train/aggregate_train loop are the
    same rounds: equal global adapters."""
    from fedkernels.flower.executor import FlowerExecutor

    strategy = HeteroLoRAStrategy(cfg(tmp_path, "flwr"), round_timeout=30)
    strategy.start(grid_for(strategy))
    executor = FlowerExecutor(cfg(tmp_path, "loop"), round_timeout=30)
    trainer = FederatedTrainer(cfg(tmp_path, "loop"), executor=executor)
    executor.bind(grid_for(strategy))
    summary = trainer.run()
    assert summary.rounds == 2 and executor.bytes_log and len(executor.bytes_log) == 2
    a, b = factors(strategy.trainer.global_state), factors(trainer.global_state)
    assert a.keys() == b.keys() and all(torch.equal(a[m][0], b[m][0]) and torch.equal(a[m][1], b[m][1]) for m in a)


def test_flower_runs_the_causal_lm_task_like_in_process(tmp_path):
    """The LM task through the ClientApp (nodes rebuild it from the config's dataset file): no head on the wire,
    the same global adapter and held-out loss / ROUGE-L as the in-process trainer."""
    from tests.federated.test_llm_runs import BASE as LM_BASE
    from tests.federated.test_llm_runs import instructions

    path = tmp_path / "instructions.jsonl"
    instructions().to_json(str(path), lines=True)

    def lm(name, **kw):
        return FederatedConfig(**{**LM_BASE, "model": "tiny-llama", "dataset": str(path),
                                  "output_dir": str(tmp_path / name), **kw})

    ref = FederatedTrainer(lm("ref"))
    ref.run()
    strategy = HeteroLoRAStrategy(lm("flwr"), round_timeout=60)
    summary = strategy.start(grid_for(strategy))
    assert summary.rounds == 2 and strategy.trainer.global_head == {} and summary.metric == "rougeL"
    assert_close_factors(factors(strategy.trainer.global_state), factors(ref.global_state))
    got, want = summary.history, ref.history
    assert [h["succeeded"] for h in got] == [h["succeeded"] for h in want] and all(h["succeeded"] for h in got)
    assert [h["loss"] for h in got] == pytest.approx([h["loss"] for h in want], rel=1e-5)
    assert [h["rougeL"] for h in got] == pytest.approx([h["rougeL"] for h in want])
