"""`LoRALinear`: drop-in replacement for `nn.Linear` (or GPT-2's `Conv1D`) with a masked LoRA adapter."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from fedkernels.errors import ConfigError, NonFiniteError, RankError, ShapeError, UnsupportedModuleError
from fedkernels.ops import lora_linear
from fedkernels.ops._backend import check_backend

__all__ = ["LoRALinear", "base_weight_view"]


def _is_conv1d(module: nn.Module) -> bool:
    # transformers' Conv1D (GPT-2) stores weight as [in, out]; detected by name to keep transformers optional.
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def base_weight_view(base: nn.Module) -> torch.Tensor:
    """The base weight as ``[out, in]`` (a transposed view for `Conv1D`, no copy)."""
    return base.weight.T if _is_conv1d(base) else base.weight


def _check_wrappable(base: nn.Module, wrapper: str) -> None:
    if not isinstance(base, nn.Linear) and not _is_conv1d(base):
        raise UnsupportedModuleError(f"{wrapper} wraps nn.Linear or transformers Conv1D, got {type(base).__name__}")


def adopt_frozen_base(layer: nn.Module, base: nn.Module) -> torch.Tensor:
    """Make ``base`` the frozen ``layer.base_layer``, record its orientation and (out, in) features; return its
    ``[out, in]`` weight view (adapters are allocated on its device and dtype)."""
    layer.base_layer = base
    for p in base.parameters():
        p.requires_grad_(False)
    layer.fan_in_fan_out = _is_conv1d(base)
    weight = base_weight_view(base)
    layer.out_features, layer.in_features = int(weight.shape[0]), int(weight.shape[1])
    return weight


class LoRALinear(nn.Module):
    """A frozen linear layer plus a LoRA adapter of maximum rank ``r`` whose active ranks can be masked.

    ``y = base(x) + scale * ((dropout(x) A^T) * m) B^T`` with ``A = lora_A`` ``[r, in]`` and
    ``B = lora_B`` ``[out, r]``, initialised as in peft (A Kaiming-uniform with a=sqrt(5), B = 0, so the
    layer starts as an exact no-op).

    The scale is ``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA), computed from the *maximum* rank and
    kept fixed when `set_active_rank` masks ranks: masking must not rescale the surviving ranks, or a
    client's update would not be comparable with the global adapter it was sliced from. Exporting to
    peft writes an ``alpha_pattern`` that reproduces exactly this scale at the exported rank.

    Args:
        base: the `nn.Linear` (or transformers `Conv1D`) to wrap; its parameters are frozen.
        r: maximum rank (>= 1).
        alpha: LoRA alpha.
        dropout: LoRA dropout probability on the adapter path (mask regenerated in backward).
        use_rslora: scale by alpha / sqrt(r) instead of alpha / r.
        backend: "auto", "torch" or "triton" (see `fedkernels.ops.lora_linear`).
    """

    def __init__(
        self,
        base: nn.Module,
        r: int,
        alpha: float | None = None,
        *,
        dropout: float = 0.0,
        use_rslora: bool = False,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        _check_wrappable(base, "LoRALinear")
        if int(r) < 1:
            raise RankError(f"LoRA rank r must be >= 1, got {r!r}")
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"LoRA dropout must be in [0, 1), got {dropout!r}")
        check_backend(backend, "LoRALinear backend")
        weight = adopt_frozen_base(self, base)
        self.r = int(r)
        self.alpha = float(alpha if alpha is not None else r)
        self.use_rslora = bool(use_rslora)
        self.dropout = float(dropout)
        self.backend = backend
        factory = {"device": weight.device, "dtype": weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(self.r, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, self.r, **factory))
        self.active_rank = self.r
        # Non-prefix rank mask (None = the prefix given by active_rank). A buffer so it moves with .to().
        self.register_buffer("rank_mask", None, persistent=False)
        self.merged = False
        self.reset_parameters()

    # ------------------------------------------------------------------ parameters
    def reset_parameters(self) -> None:
        """peft's default init: A ~ Kaiming-uniform(a=sqrt(5)), B = 0 (the adapter starts as a no-op)."""
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    @property
    def scale(self) -> float:
        return self.alpha / math.sqrt(self.r) if self.use_rslora else self.alpha / self.r

    @property
    def trainable(self) -> bool:
        return self.lora_A.requires_grad or self.lora_B.requires_grad

    @trainable.setter
    def trainable(self, value: bool) -> None:
        """Freeze (False) or unfreeze (True) this module's adapter without removing it.

        A frozen adapter still adds its product in forward but gets no gradients, no optimizer state
        and saves no tensors for dA/dB.
        """
        self.lora_A.requires_grad_(bool(value))
        self.lora_B.requires_grad_(bool(value))

    def set_active_rank(self, rank: int) -> None:
        """Use only the first ``rank`` ranks (0 disables the adapter); ranks >= rank are masked."""
        rank = int(rank)
        if not 0 <= rank <= self.r:
            raise RankError(f"active rank must be in [0, {self.r}] for this module, got {rank}")
        self.active_rank = rank
        self.rank_mask = None

    def set_rank_mask(self, mask: torch.Tensor | None) -> None:
        """Use an arbitrary (non-prefix) 0/1 mask of length r; None returns to the prefix mode."""
        if mask is None:
            self.rank_mask = None
            return
        mask = torch.as_tensor(mask)
        if mask.shape != (self.r,):
            raise ShapeError(f"rank mask must have shape ({self.r},), got {tuple(mask.shape)}")
        if not torch.all((mask == 0) | (mask == 1)):
            raise RankError(f"rank mask must be 0/1, got values {mask.unique().tolist()}")
        self.rank_mask = mask.to(device=self.lora_A.device, dtype=self.lora_A.dtype)
        self.active_rank = self.r

    def effective_mask(self) -> torch.Tensor:
        """The 0/1 mask of ranks in use, length r."""
        if self.rank_mask is not None:
            return self.rank_mask
        m = torch.zeros(self.r, device=self.lora_A.device, dtype=self.lora_A.dtype)
        m[: self.active_rank] = 1
        return m

    def delta_weight(self) -> torch.Tensor:
        """``scale * (B * m) A`` as ``[out, in]`` (in the base weight's layout orientation [out, in])."""
        m = self.effective_mask()
        return self.scale * (self.lora_B * m) @ self.lora_A

    # ------------------------------------------------------------------ merge
    @torch.no_grad()
    def merge(self) -> None:
        """Add the adapter product into the base weight. Refuses (and changes nothing) if non-finite."""
        if self.merged:
            return
        weight = base_weight_view(self.base_layer)
        merged = weight + self.delta_weight().to(weight.dtype)
        if not torch.isfinite(merged).all():
            raise NonFiniteError(
                f"merge refused: NaN/Inf in the merged weight of a LoRALinear({self.in_features}->{self.out_features});"
                " the base weight is unchanged"
            )
        weight.copy_(merged)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the adapter product from the base weight again (inverse of `merge`)."""
        if not self.merged:
            return
        weight = base_weight_view(self.base_layer)
        weight.sub_(self.delta_weight().to(weight.dtype))
        self.merged = False

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged or self.active_rank == 0:
            return self.base_layer(x)
        weight = base_weight_view(self.base_layer)
        if self.rank_mask is None and self.active_rank < self.r:
            # Prefix mask: slice instead of masking so the rank-sized work scales with the active rank.
            A, B, mask = self.lora_A[: self.active_rank], self.lora_B[:, : self.active_rank], None
        else:
            A, B, mask = self.lora_A, self.lora_B, self.rank_mask
        p = self.dropout if self.training else 0.0
        seed = None
        if p > 0.0:
            # Drawn from the global torch RNG: reproducible under torch.manual_seed, and a resumed run that
            # restores the RNG state draws the same masks (a per-module call counter would not be restored).
            seed = int(torch.randint(0, 2**62, (1,)).item())
        return lora_linear(
            x, weight, self.base_layer.bias, A, B, self.scale, mask,
            dropout_p=p, dropout_seed=seed, backend=self.backend,
        )

    def extra_repr(self) -> str:
        parts = [
            f"in_features={self.in_features}",
            f"out_features={self.out_features}",
            f"r={self.r}",
            f"active_rank={self.active_rank if self.rank_mask is None else int(self.rank_mask.sum())}",
            f"alpha={self.alpha:g}",
            f"scale={self.scale:.4g}",
        ]
        if self.use_rslora:
            parts.append("rslora=True")
        if self.dropout:
            parts.append(f"dropout={self.dropout:g}")
        if self.fan_in_fan_out:
            parts.append("fan_in_fan_out=True")
        parts.append(f"trainable={self.trainable}")
        if self.merged:
            parts.append("merged=True")
        parts.append(f"backend={self.backend!r}")
        return ", ".join(parts)
