"""Importance scores: Fisher on a tiny linear LoRA model vs the analytic value; IG-score; HLA patterns."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch import nn

from solvers.errors import ProblemError
from solvers.importance import (
    PATTERNS,
    fim_clusters,
    fim_pattern,
    fisher_scores,
    geometric_pattern,
    grad_norm_scores,
    ig_score,
    layer_scores,
)

D_IN, D_OUT, RANK, N = 5, 4, 3, 7


class TwoLoRA(nn.Module):
    """Two LoRA-only linear maps in sequence-free parallel: y = B1 A1 x + B2 A2 x (fp64)."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.A1 = nn.Parameter(torch.randn(RANK, D_IN, generator=g, dtype=torch.float64))
        self.B1 = nn.Parameter(torch.randn(D_OUT, RANK, generator=g, dtype=torch.float64))
        self.A2 = nn.Parameter(torch.randn(RANK, D_IN, generator=g, dtype=torch.float64))
        self.B2 = nn.Parameter(torch.randn(D_OUT, RANK, generator=g, dtype=torch.float64))

    def forward(self, x):
        return x @ self.A1.T @ self.B1.T + x @ self.A2.T @ self.B2.T


def _loss(model, batch):  # 0.5 ||y - t||^2 summed over the batch
    return 0.5 * ((model(batch["x"]) - batch["t"]) ** 2).sum()


def _analytic(model, x, t):
    """Per-sample gradients by hand: e = y - t, dB_k = e (A_k x)^T, dA_k = B_k^T e x^T."""
    with torch.no_grad():
        out = {"m1": [], "m2": []}
        for xi, ti in zip(x, t, strict=True):
            e = model(xi[None])[0] - ti
            for key, A, B in (("m1", model.A1, model.B1), ("m2", model.A2, model.B2)):
                out[key].append((torch.outer(B.T @ e, xi), torch.outer(e, A @ xi)))
    return out


@pytest.fixture
def linear():
    model = TwoLoRA()
    x = torch.randn(N, D_IN, dtype=torch.float64)
    t = torch.randn(N, D_OUT, dtype=torch.float64)
    lora = {"m1": [model.A1, model.B1], "m2": [model.A2, model.B2]}
    return model, x, t, lora


def test_fisher_equals_analytic_on_linear_model(linear):
    model, x, t, lora = linear
    grads = _analytic(model, x, t)
    got = fisher_scores(model, [{"x": x, "t": t}], lora, _loss, per_sample=True)
    got_frob = fisher_scores(model, [{"x": x, "t": t}], lora, _loss, per_sample=True, reduce="frobenius")
    for key in ("m1", "m2"):
        FA = sum(gA**2 for gA, _ in grads[key]) / N
        FB = sum(gB**2 for _, gB in grads[key]) / N
        assert got[key] == pytest.approx(float(FA.sum() + FB.sum()), rel=1e-10)
        assert got_frob[key] == pytest.approx(float(FA.norm() + FB.norm()), rel=1e-10)
    # the batch-level proxy with one-example batches is the same estimator
    singles = [{"x": x[i:i + 1], "t": t[i:i + 1]} for i in range(N)]
    assert fisher_scores(model, singles, lora, _loss) == pytest.approx(got, rel=1e-10)
    # and flags / grads are left as they were
    assert all(p.requires_grad for p in model.parameters()) and all(p.grad is None for p in model.parameters())


def test_grad_norm_scores_analytic(linear):
    model, x, t, lora = linear
    batches = [{"x": x[:3], "t": t[:3]}, {"x": x[3:], "t": t[3:]}]
    got = grad_norm_scores(model, batches, lora, _loss)
    for key in ("m1", "m2"):
        norms = []
        for sl in (slice(0, 3), slice(3, N)):
            g = _analytic(model, x[sl], t[sl])[key]
            gA, gB = sum(a for a, _ in g), sum(b for _, b in g)
            norms.append(float(torch.sqrt((gA**2).sum() + (gB**2).sum())))
        assert got[key] == pytest.approx(np.mean(norms), rel=1e-10)


def test_layer_scores_and_ig_score():
    rng = np.random.default_rng(0)
    scores = {f"l{j}.{m}": float(rng.random()) for j in range(4) for m in "qv"}
    blocks = {k: int(k[1]) for k in scores}
    per_layer = layer_scores(scores, blocks)
    assert per_layer == pytest.approx([scores[f"l{j}.q"] + scores[f"l{j}.v"] for j in range(4)])
    glob = {k: float(rng.random()) for k in scores}
    v = ig_score(scores, glob, lam=0.5)
    ls, gs = sum(scores.values()), sum(glob.values())
    for k in scores:
        assert v[k] == pytest.approx(0.5 * scores[k] / ls + 0.5 * glob[k] / gs)
    assert sum(v.values()) == pytest.approx(1.0)
    assert ig_score(scores, glob, lam=1.0) == pytest.approx({k: s / ls for k, s in scores.items()})
    # no global update yet: the global term is uniform and the ranking is the local one
    v0 = ig_score(scores, {}, lam=0.5)
    assert sorted(v0, key=v0.get) == sorted(scores, key=scores.get)
    with pytest.raises(ProblemError, match="lam"):
        ig_score(scores, glob, lam=1.5)


def test_geometric_patterns():
    bone = geometric_pattern(12, "bottleneck")
    assert bone == pytest.approx(np.array([3, 3, 3, 2, 2, 1, 1, 1, 2, 3, 3, 3]) / 27)  # Fed-HeLLo's vector
    for L in (1, 5, 12, 32):
        for kind in PATTERNS:
            for orient in ("output", "input"):
                p = geometric_pattern(L, kind, orient)
                assert p.shape == (L,) and p.sum() == pytest.approx(1.0) and (p > 0).all()
    tri = geometric_pattern(8, "triangle")
    assert (np.diff(tri) > 0).all()  # more weight near the output
    assert geometric_pattern(8, "triangle", "input") == pytest.approx(tri[::-1])
    assert (np.diff(geometric_pattern(8, "inverted-triangle")) < 0).all()
    b32 = geometric_pattern(32, "bottleneck")
    assert b32[0] > b32[16] and b32[-1] > b32[16]
    with pytest.raises(ProblemError, match="zigzag"):
        geometric_pattern(8, "zigzag")


def _brute_sse(vals, k):
    best = np.inf
    for labels in itertools.product(range(k), repeat=len(vals)):
        sse = sum(((vals[np.array(labels) == c] - vals[np.array(labels) == c].mean()) ** 2).sum()
                  for c in range(k) if (np.array(labels) == c).any())
        best = min(best, sse)
    return best


def test_fim_clusters_optimal_and_ordered_by_centroid():
    rng = np.random.default_rng(1)
    for _ in range(5):
        vals = rng.random(7) * rng.choice([1, 10, 100], 7)
        labels = fim_clusters(vals, 3)
        sse = sum(((vals[labels == c] - vals[labels == c].mean()) ** 2).sum() for c in set(labels))
        assert sse == pytest.approx(_brute_sse(vals, 3), rel=1e-9, abs=1e-12)
        cents = [vals[labels == c].mean() for c in range(3)]
        assert cents == sorted(cents)  # id 0 = lowest centroid
        order = np.argsort(vals)
        assert (np.diff(labels[order]) >= 0).all()  # higher score never in a lower cluster
    scores = [1.0, 1.1, 5.0, 5.2, 9.0, 9.1, 0.9]
    p = fim_pattern(scores)
    assert p.sum() == pytest.approx(1.0)
    assert p[4] > p[2] > p[0]
    assert p[4] / p[0] == pytest.approx(3.0)  # Fed-HeLLo's 1/27 : 2/27 : 3/27
