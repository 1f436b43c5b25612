"""Importance of LoRA modules and layers: empirical Fisher, gradient norms, Fed-pilot's IG-score,
Fed-HeLLo's geometric layer patterns and FIM clustering (../shared/docs/algorithms.md sections 1 and 2).

torch is imported lazily by the functions that need a model, so the pattern helpers stay usable without it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from solvers.errors import ProblemError

__all__ = [
    "PATTERNS",
    "fisher_scores",
    "grad_norm_scores",
    "layer_scores",
    "ig_score",
    "geometric_pattern",
    "fim_clusters",
    "fim_pattern",
]

PATTERNS = ("triangle", "inverted-triangle", "bottleneck", "uniform")

# Fed-HeLLo's only shipped layer-probability vector ("bone", 12 layers), from
# github.com/TNI-playground/Fed_HeLLo @ 4c07f5b (algorithms.md sec. 2): ends favoured, middle rarely trained.
_BONE12 = np.array([3, 3, 3, 2, 2, 1, 1, 1, 2, 3, 3, 3], dtype=float) / 27.0


def _grads(model, batches, lora_params, loss_fn, per_sample: bool):
    """Yield, per backward pass, ``{module: [grad of each LoRA factor]}`` (requires_grad restored after)."""
    import torch

    from solvers.measure import default_loss

    loss_fn = loss_fn or default_loss
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    old = [p.grad for p in params]
    lora_ids = {id(p) for ps in lora_params.values() for p in ps}
    try:
        for p in params:
            p.requires_grad_(id(p) in lora_ids)
            p.grad = None
        for batch in batches:
            parts = [batch]
            if per_sample:
                n = next(v.shape[0] for v in batch.values() if isinstance(v, torch.Tensor))
                parts = [{k: v[i:i + 1] if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
                         for i in range(n)]
            for part in parts:
                loss = loss_fn(model, part)
                grads = torch.autograd.grad(loss, [p for ps in lora_params.values() for p in ps], allow_unused=True)
                out, k = {}, 0
                for name, ps in lora_params.items():
                    out[name] = [g if g is not None else torch.zeros_like(p) for g, p in zip(grads[k:k + len(ps)], ps,
                                                                                            strict=True)]
                    k += len(ps)
                yield out
    finally:
        for p, f, g in zip(params, flags, old, strict=True):
            p.requires_grad_(f)
            p.grad = g


def fisher_scores(
    model,
    batches: Iterable[Mapping[str, Any]],
    lora_params: Mapping[str, Sequence[Any]],
    loss_fn: Callable | None = None,
    *,
    per_sample: bool = False,
    reduce: str = "sum",
) -> dict[str, float]:
    """Empirical-Fisher score of each LoRA module.

    The Fisher diagonal of a factor is ``F = (1/N) sum_n g_n**2`` (elementwise), ``g_n`` the gradient of the
    loss on sample n (``per_sample=True``: one backward per example, the definition) or on batch n (default:
    a cheaper batch-level proxy). ``reduce="sum"``: the module's Fisher mass ``sum F`` over A and B
    (Fed-pilot's local term, algorithms.md sec. 1); ``reduce="frobenius"``: ``sum_factors ||F||_F``
    (Fed-HeLLo's ``utils/fim_calculator.py`` layer score, sec. 2). To reproduce Fed-HeLLo exactly, pass a
    ``loss_fn`` returning the true-class logit instead of the loss.
    """
    if reduce not in ("sum", "frobenius"):
        raise ProblemError(f"reduce must be 'sum' or 'frobenius', got {reduce!r}")
    acc: dict[str, list] = {}
    n = 0
    for grads in _grads(model, batches, lora_params, loss_fn, per_sample):
        n += 1
        for name, gs in grads.items():
            sq = [g.detach().double() ** 2 for g in gs]
            acc[name] = sq if name not in acc else [a + b for a, b in zip(acc[name], sq, strict=True)]
    if n == 0:
        raise ProblemError("fisher_scores: no batches given")
    out = {}
    for name, fs in acc.items():
        fs = [f / n for f in fs]
        out[name] = float(sum(f.sum() for f in fs)) if reduce == "sum" else float(sum(f.norm() for f in fs))
    return out


def grad_norm_scores(
    model,
    batches: Iterable[Mapping[str, Any]],
    lora_params: Mapping[str, Sequence[Any]],
    loss_fn: Callable | None = None,
) -> dict[str, float]:
    """Mean over batches of the Frobenius norm of each module's gradient (A and B together)."""
    acc: dict[str, float] = {}
    n = 0
    for grads in _grads(model, batches, lora_params, loss_fn, per_sample=False):
        n += 1
        for name, gs in grads.items():
            acc[name] = acc.get(name, 0.0) + float(sum(float((g.double() ** 2).sum()) for g in gs) ** 0.5)
    if n == 0:
        raise ProblemError("grad_norm_scores: no batches given")
    return {k: v / n for k, v in acc.items()}


def layer_scores(scores: Mapping[str, float], blocks: Mapping[str, int], num_layers: int | None = None) -> list[float]:
    """Per-layer score: the sum of its modules' scores (Fed-HeLLo ``S_l = sum_{theta in l} ||F_theta||_F``).

    Returns a list indexed by layer, of length ``num_layers`` (default: 1 + the largest block).
    """
    missing = sorted(set(scores) - set(blocks))
    if missing:
        raise ProblemError(f"layer_scores: no block for modules {missing[:5]}")
    nl = num_layers if num_layers is not None else 1 + max(blocks[m] for m in scores) if scores else 0
    out = [0.0] * nl
    for m, v in scores.items():
        if not 0 <= blocks[m] < nl:
            raise ProblemError(f"module {m!r}: block {blocks[m]} outside [0, {nl})")
        out[blocks[m]] += float(v)
    return out


def ig_score(
    local: Mapping[str, float], global_update_norms: Mapping[str, float] | None, lam: float = 0.5
) -> dict[str, float]:
    """Fed-pilot's local-global IG-score (algorithms.md sec. 1, our [I] form).

    ``v_i = lam * F_i / sum F + (1 - lam) * U_i / sum U`` with F the local Fisher mass and U the Frobenius
    norm of the module's last aggregated update. A term whose sum is 0 (e.g. no update yet, round 1) is
    replaced by the uniform 1/n, so it does not change the ranking.
    """
    if not 0.0 <= lam <= 1.0:
        raise ProblemError(f"ig_score: lam must be in [0, 1], got {lam!r}")
    names = sorted(set(local) | set(global_update_norms or {}))
    if not names:
        return {}

    def norm(d: Mapping[str, float] | None) -> dict[str, float]:
        vals = {n: float((d or {}).get(n, 0.0)) for n in names}
        bad = {n: v for n, v in vals.items() if not np.isfinite(v) or v < 0}
        if bad:
            raise ProblemError(f"ig_score: scores must be finite and >= 0, got {bad}")
        tot = sum(vals.values())
        return {n: v / tot for n, v in vals.items()} if tot > 0 else {n: 1.0 / len(names) for n in names}

    lo, gl = norm(local), norm(global_update_norms)
    return {n: lam * lo[n] + (1 - lam) * gl[n] for n in names}


def geometric_pattern(num_layers: int, kind: str = "bottleneck", orientation: str = "output") -> np.ndarray:
    """Fed-HeLLo GD/RGD layer probabilities (sum 1), layer 0 = closest to the input.

    * ``triangle``: ``p_l ∝ l + 1`` (more clients train layers near the output);
    * ``inverted-triangle``: ``p_l ∝ L - l``;
    * ``bottleneck``: Fed-HeLLo's 12-layer "bone" vector ``[3,3,3,2,2,1,1,1,2,3,3,3]/27``, resampled by
      nearest position for other depths;
    * ``uniform``: ``1/L``.

    ``orientation="input"`` mirrors the pattern (the paper may orient Triangle the other way; algorithms.md
    sec. 2 [I]).
    """
    L = int(num_layers)
    if L < 1:
        raise ProblemError(f"num_layers must be >= 1, got {num_layers!r}")
    if orientation not in ("output", "input"):
        raise ProblemError(f"orientation must be 'output' or 'input', got {orientation!r}")
    idx = np.arange(L, dtype=float)
    if kind == "triangle":
        w = idx + 1
    elif kind == "inverted-triangle":
        w = L - idx
    elif kind == "bottleneck":
        w = _BONE12[np.rint(idx * 11 / max(L - 1, 1)).astype(int)] if L > 1 else np.ones(1)
    elif kind == "uniform":
        w = np.ones(L)
    else:
        raise ProblemError(f"unknown layer pattern {kind!r}; expected one of {', '.join(PATTERNS)}")
    if orientation == "input":
        w = w[::-1]
    return np.asarray(w / w.sum(), dtype=float)


def fim_clusters(layer_scores: Sequence[float] | Mapping[int, float], k: int = 3) -> np.ndarray:
    """1-D k-means of layer scores; cluster ids ordered by centroid (0 = lowest scores).

    Exact: the optimal 1-D k-means partition is contiguous in sorted order, found by dynamic programming
    over split points (O(k L^2)), so the result is deterministic (Fed-HeLLo uses sklearn K-means, whose ids
    are arbitrary; algorithms.md sec. 2 asks to sort clusters by centroid).
    """
    if isinstance(layer_scores, Mapping):
        keys = sorted(layer_scores)
        vals = np.array([float(layer_scores[i]) for i in keys])
    else:
        vals = np.asarray(list(layer_scores), dtype=float)
    n = len(vals)
    if n == 0:
        raise ProblemError("fim_clusters: no layer scores")
    if not np.all(np.isfinite(vals)):
        raise ProblemError(f"fim_clusters: scores must be finite, got {vals.tolist()}")
    if int(k) < 1:
        raise ProblemError(f"fim_clusters: k must be >= 1, got {k!r}")
    k = min(int(k), n)
    order = np.argsort(vals, kind="stable")
    x = vals[order]
    c1, c2 = np.concatenate([[0], np.cumsum(x)]), np.concatenate([[0], np.cumsum(x * x)])

    def sse(i: int, j: int) -> float:  # points x[i:j]
        m = j - i
        s = c1[j] - c1[i]
        return float(c2[j] - c2[i] - s * s / m)

    inf = float("inf")
    D = np.full((k + 1, n + 1), inf)
    arg = np.zeros((k + 1, n + 1), dtype=int)
    D[0, 0] = 0.0
    for c in range(1, k + 1):
        for j in range(c, n + 1):
            best, bi = inf, c - 1
            for i in range(c - 1, j):
                v = D[c - 1, i] + sse(i, j)
                if v < best - 1e-15:
                    best, bi = v, i
            D[c, j], arg[c, j] = best, bi
    labels_sorted = np.zeros(n, dtype=int)
    j = n
    for c in range(k, 0, -1):
        i = arg[c, j]
        labels_sorted[i:j] = c - 1
        j = i
    out = np.zeros(n, dtype=int)
    out[order] = labels_sorted
    return out


def fim_pattern(layer_scores: Sequence[float] | Mapping[int, float], k: int = 3) -> np.ndarray:
    """Fed-HeLLo FIM-HLA layer probabilities: cluster c (by centroid, 0 lowest) weighs ``c + 1``, normalised.

    For k = 3 these are the code's 1/27, 2/27, 1/9 (= 3/27) before normalisation (algorithms.md sec. 2).
    """
    w = fim_clusters(layer_scores, k).astype(float) + 1.0
    return w / w.sum()
