"""Masked LoRA linear: ``y = x W^T + b + s * ((drop(x) A^T) * m) B^T`` with a hand-derived backward.

Layers of this op: reference (`fedkernels.reference.lora_linear_ref`) -> torch path (here) /
Triton kernels (`fedkernels.ops.triton_lora`, CUDA) -> `LoRALinearFunction` -> `fedkernels.nn.LoRALinear`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fedkernels.errors import ConfigError, ShapeError
from fedkernels.ops._backend import resolve_backend

__all__ = ["lora_linear", "LoRALinearFunction", "dropout_keep_mask"]


def dropout_keep_mask(shape: torch.Size, p: float, seed: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Scaled keep-mask ``bernoulli(1-p) / (1-p)`` drawn from a private generator seeded by ``seed``.

    The same (shape, p, seed, device) always gives the same mask, so the backward pass regenerates it
    instead of keeping it alive: peft keeps both the mask and the dropped copy of x (T*in bytes each).
    """
    gen = torch.Generator(device=device)
    gen.manual_seed(int(seed))
    # One buffer, updated in place (draw, compare, scale): no bool and cast temporaries of T*in elements.
    keep = torch.rand(shape, generator=gen, device=device, dtype=dtype if dtype.is_floating_point else None)
    return keep.ge_(p).mul_(1.0 / (1.0 - p)).to(dtype)


def _check_shapes(x, weight, bias, lora_A, lora_B, rank_mask) -> None:
    out_f, in_f = weight.shape
    if x.shape[-1] != in_f:
        raise ShapeError(
            f"x has {x.shape[-1]} features in its last dim but weight expects in={in_f} (x {tuple(x.shape)})"
        )
    if lora_A.dim() != 2 or lora_A.shape[1] != in_f:
        raise ShapeError(f"lora_A must be [R, {in_f}], got {tuple(lora_A.shape)}")
    rank = lora_A.shape[0]
    if lora_B.shape != (out_f, rank):
        raise ShapeError(f"lora_B must be [{out_f}, {rank}] to match weight and lora_A, got {tuple(lora_B.shape)}")
    if bias is not None and bias.shape != (out_f,):
        raise ShapeError(f"bias must be [{out_f}], got {tuple(bias.shape)}")
    if rank_mask is not None and rank_mask.shape != (rank,):
        raise ShapeError(f"rank_mask must be [{rank}] (one entry per rank), got {tuple(rank_mask.shape)}")


class LoRALinearFunction(torch.autograd.Function):
    r"""Autograd function of the masked LoRA linear, torch path.

    Forward, for 2-D ``x`` ``[T, in]`` (leading dims are flattened by the caller):

        d   = x * K / (1-p)            dropout keep-mask K (only on the LoRA path; d = x when p = 0)
        h   = d A^T                    [T, R]   (the "shrink")
        hm  = h * m                    m: 0/1 rank mask
        y   = x W^T + b + s * hm B^T   [T, out] (the "expand")

    Backward by the chain rule, with g = dL/dy ``[T, out]``:

        dL/dB  = s * g^T hm                        [out, R]   needs hm, i.e. the saved rank-sized h
        dL/dhm = s * g B                           [T, R]
        dL/dh  = dL/dhm * m  =: gh                 (masked ranks get no gradient)
        dL/dA  = gh^T d                            [R, in]    needs d = x * K/(1-p): x saved, K regenerated
        dL/dd  = gh A                              [T, in]
        dL/dx  = g W + (gh A) * K / (1-p)          the frozen base contributes g W (no use of x)
        dL/db  = sum_t g,    dL/dW = g^T x         only when the base is trainable (rarely)

    Products are ordered so every intermediate is rank-sized ([T, R] or [R, in]); the [in, out]
    product x^T g is never formed unless W itself requires grad. Saved for backward: x (only if A or
    W needs a gradient), h ([T, R]), and nothing else: the dropout mask is regenerated from its seed.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scale, rank_mask, dropout_p, dropout_seed):
        keep = None
        if dropout_p > 0.0:
            keep = dropout_keep_mask(x.shape, dropout_p, dropout_seed, x.device, x.dtype)
            h = (x * keep) @ lora_A.T
        else:
            h = x @ lora_A.T
        hm = h * rank_mask if rank_mask is not None else h
        y = F.linear(x, weight, bias)
        # addmm folds the scale into the GEMM and adds into y in place: no [T, out] temporary.
        y.addmm_(hm, lora_B.T, alpha=scale)

        need_x = ctx.needs_input_grad[3] or ctx.needs_input_grad[1]
        ctx.save_for_backward(x if need_x else None, weight, lora_A, lora_B, h, rank_mask)
        ctx.scale = scale
        ctx.dropout_p = dropout_p
        ctx.dropout_seed = dropout_seed
        ctx.x_shape = x.shape
        return y

    @staticmethod
    def backward(ctx, g):
        x, weight, lora_A, lora_B, h, rank_mask = ctx.saved_tensors
        need_x, need_w, need_b, need_a, need_bb = ctx.needs_input_grad[:5]
        s, p = ctx.scale, ctx.dropout_p
        dx = dW = db = dA = dB = None
        g = g.contiguous()

        gh = None
        if need_x or need_a:
            gh = (g @ lora_B) * s
            if rank_mask is not None:
                gh = gh * rank_mask
        keep = None
        if p > 0.0 and (need_x or need_a):
            keep = dropout_keep_mask(ctx.x_shape, p, ctx.dropout_seed, g.device, g.dtype)
        if need_bb:
            hm = h * rank_mask if rank_mask is not None else h
            dB = (g.T @ hm) * s
        if need_a:
            d = x * keep if keep is not None else x
            dA = gh.T @ d
        if need_x:
            dx = g @ weight
            if keep is not None:
                dx.add_((gh @ lora_A) * keep)
            else:
                dx.addmm_(gh, lora_A)
        if need_w:
            dW = g.T @ x
        if need_b:
            db = g.sum(0)
        return dx, dW, db, dA, dB, None, None, None, None


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scale: float,
    rank_mask: torch.Tensor | None = None,
    *,
    dropout_p: float = 0.0,
    dropout_seed: int | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Masked LoRA linear ``x W^T + b + scale * ((drop(x) A^T) * rank_mask) B^T``.

    Args:
        x: ``[..., in]``; leading dims are flattened and restored.
        weight: ``[out, in]`` frozen base weight (a transposed view is fine, e.g. GPT-2 ``Conv1D.weight.T``).
        bias: ``[out]`` or None.
        lora_A: ``[R, in]``; lora_B: ``[out, R]``.
        scale: LoRA scaling.
        rank_mask: ``[R]`` 0/1, None for all ranks. Prefer slicing A/B to an active rank when the
            mask is a prefix (that is what `LoRALinear.set_active_rank` does): work then scales with r_i.
        dropout_p: LoRA dropout on the adapter path; the mask comes from ``dropout_seed`` and is
            regenerated in backward, never stored.
            Each backend has its own generator (torch: `dropout_keep_mask`; triton: Philox in the
            kernels, materialised by `fedkernels.ops.triton_lora.triton_dropout_keep_mask`), so one seed
            gives different, equally distributed masks on the two backends; each is consistent fwd/bwd.
        backend: "torch", "triton" or "auto" (triton on CUDA tensors, torch otherwise).
    Raises:
        ShapeError: shapes do not match. BackendError: unknown or unavailable backend.
    """
    _check_shapes(x, weight, bias, lora_A, lora_B, rank_mask)
    if not 0.0 <= dropout_p < 1.0:
        raise ConfigError(f"dropout_p must be in [0, 1), got {dropout_p!r}")
    if dropout_p > 0.0 and dropout_seed is None:
        dropout_seed = int(torch.randint(0, 2**62, (1,)).item())
    chosen = resolve_backend(backend, x, weight)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    mask = rank_mask.to(x.dtype) if rank_mask is not None else None
    if chosen == "triton":
        from fedkernels.ops import triton_lora  # imported lazily: triton is heavy and CUDA-only

        y = triton_lora.lora_linear_triton(
            x2, weight, bias, lora_A, lora_B, scale, mask, dropout_p=dropout_p, dropout_seed=dropout_seed
        )
    else:
        y = LoRALinearFunction.apply(
            x2, weight, bias, lora_A, lora_B, float(scale), mask, float(dropout_p), dropout_seed
        )
    return y.reshape(*lead, weight.shape[0])
