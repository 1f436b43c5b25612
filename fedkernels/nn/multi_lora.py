"""`MultiLoRALinear` and `to_multi_client`: K simulated clients trained in one forward/backward.

Each client slot has its own adapter (``lora_A[c]``, ``lora_B[c]``), scale, active rank and trainable flag;
all slots share one frozen base layer (the very module object of the `LoRALinear` it replaces, no weight
copy). A batch mixes examples of several clients; the loss is the **sum of per-client mean losses**, so the
gradient reaching ``lora_A[c]`` is exactly client c's own gradient: y's rows of client c depend on no
other client's adapter, and the frozen base gives no cross-client coupling (see
`fedkernels.ops.multi_lora.MultiLoRAFunction`). This is how the simulator trains many heterogeneous
clients at the cost of one large batch instead of K small ones.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence

import torch
import torch.nn as nn

from fedkernels.errors import ConfigError, NonFiniteError, RankError, ShapeError, UnknownModuleError
from fedkernels.nn.inject import _set_submodule, lora_modules
from fedkernels.nn.lora import LoRALinear, _check_wrappable, adopt_frozen_base, base_weight_view
from fedkernels.ops._backend import check_backend
from fedkernels.ops.multi_lora import MultiLoRAMeta, build_meta, multi_lora_linear

__all__ = ["ClientRouter", "MultiClientLoRA", "MultiLoRALinear", "to_multi_client"]


class ClientRouter:
    """Holds the client ids of the current batch and the `MultiLoRAMeta` built from them, shared by layers.

    The ids are example-level (``[B]``, every token of example b belongs to client ``ids[b]``) or
    token-level (``[B, S]`` matching x's leading dims, e.g. -1 on padding tokens). The meta is built on
    the first layer's call and cached per (token shape, device), so all layers of a forward reuse one sort.
    """

    def __init__(self, num_clients: int) -> None:
        self.num_clients = int(num_clients)
        self._ids: torch.Tensor | None = None
        self._cache: dict[tuple, MultiLoRAMeta] = {}

    @property
    def active(self) -> bool:
        return self._ids is not None

    def set(self, ids: torch.Tensor | Sequence[int]) -> None:
        ids = torch.as_tensor(ids)
        if ids.dim() == 0:
            ids = ids.reshape(1)
        # validate here (dtype, range) so a bad id fails before the forward starts
        if ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise ShapeError(f"client ids must be integers, got dtype {ids.dtype}")
        if ids.numel() and (int(ids.min()) < -1 or int(ids.max()) >= self.num_clients):
            bad = int(ids.min()) if int(ids.min()) < -1 else int(ids.max())
            raise ConfigError(f"client id {bad} out of range [-1, {self.num_clients}) (num_clients={self.num_clients})")
        self._ids = ids
        self._cache = {}

    def clear(self) -> None:
        self._ids = None
        self._cache = {}

    def meta_for(self, lead: torch.Size, device: torch.device) -> MultiLoRAMeta:
        if self._ids is None:
            raise ConfigError(
                "a MultiLoRALinear ran without client ids: wrap the forward in `with multi.clients(ids):` "
                "or pass client_ids to the layer"
            )
        key = (tuple(lead), str(device))
        meta = self._cache.get(key)
        if meta is None:
            meta = build_meta(self._token_ids(tuple(lead)).to(device), self.num_clients)
            self._cache[key] = meta
        return meta

    def _token_ids(self, lead: tuple[int, ...]) -> torch.Tensor:
        ids = self._ids
        n = math.prod(lead)
        if tuple(ids.shape) == lead or (ids.dim() == 1 and ids.numel() == n):
            return ids.reshape(-1)
        if ids.dim() == 1 and len(lead) >= 1 and lead[0] == ids.numel():
            return ids.repeat_interleave(n // ids.numel())  # example-level: x is [B, ...] row-major
        raise ShapeError(
            f"client ids of shape {tuple(ids.shape)} fit neither the examples nor the tokens of an input with "
            f"leading shape {lead}"
        )


class MultiLoRALinear(nn.Module):
    """A frozen linear layer (or GPT-2 `Conv1D`) with K client adapters applied per token.

    ``y[t] = base(x[t]) + s_c * (x[t] A_c[:r_c]^T) B_c[:, :r_c]^T`` with ``c`` the token's client
    (-1: base only). ``lora_A`` ``[K, R, in]`` and ``lora_B`` ``[K, out, R]`` are single parameters;
    per-client scale, rank and trainable flag are buffers. A frozen client's rows of ``lora_A.grad`` /
    ``lora_B.grad`` stay exactly zero and cost no backward work.

    Args:
        base: the frozen `nn.Linear` / `Conv1D` (shared, not copied).
        num_clients: K slots.
        r: maximum rank R.
        scale: initial scale of every slot (change per slot with `set_scale`).
        backend: "auto", "torch" or "triton" (see `fedkernels.ops.multi_lora_linear`).
        deterministic: ask the Triton path for bitwise run-to-run reproducibility.
        router: a shared `ClientRouter` giving the batch's client ids (`to_multi_client` wires one).
    """

    def __init__(
        self,
        base: nn.Module,
        num_clients: int,
        r: int,
        *,
        scale: float = 1.0,
        backend: str = "auto",
        deterministic: bool = False,
        router: ClientRouter | None = None,
    ) -> None:
        super().__init__()
        _check_wrappable(base, "MultiLoRALinear")
        if int(num_clients) < 1:
            raise ConfigError(f"num_clients must be >= 1, got {num_clients!r}")
        if int(r) < 1:
            raise RankError(f"LoRA rank r must be >= 1, got {r!r}")
        check_backend(backend, "MultiLoRALinear backend")
        weight = adopt_frozen_base(self, base)
        self.num_clients, self.r = int(num_clients), int(r)
        self.backend, self.deterministic = backend, bool(deterministic)
        self.router = router
        factory = {"device": weight.device, "dtype": weight.dtype}
        self.lora_A = nn.Parameter(torch.zeros(self.num_clients, self.r, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(self.num_clients, self.out_features, self.r, **factory))
        # Host-side lists, not buffers: the op needs them on the host, and reading a CUDA buffer in every
        # layer's forward would cost one device sync per layer.
        self.scales: list[float] = [float(scale)] * self.num_clients
        self.ranks: list[int] = [self.r] * self.num_clients
        self.trainable_mask: list[bool] = [True] * self.num_clients

    @classmethod
    def from_lora(cls, layer: LoRALinear, num_clients: int, *, router: ClientRouter | None = None,
                  name: str = "?") -> MultiLoRALinear:
        """K slots over ``layer``'s base module, each starting from ``layer``'s adapter, scale, rank, flag."""
        if layer.merged:
            raise ConfigError(f"module {name!r} is merged; unmerge it before going multi-client")
        if layer.rank_mask is not None:
            raise ConfigError(
                f"module {name!r} uses a non-prefix rank mask {layer.rank_mask.tolist()}; the multi-client op "
                "supports per-client prefix ranks only"
            )
        if layer.dropout > 0.0:
            raise ConfigError(
                f"module {name!r} has LoRA dropout {layer.dropout!r}; the multi-client op has no dropout "
                "(set LoRAConfig.dropout=0 for multi-client simulation)"
            )
        multi = cls(layer.base_layer, num_clients, layer.r, scale=layer.scale, backend=layer.backend,
                    router=router)
        with torch.no_grad():
            multi.lora_A.copy_(layer.lora_A.expand(num_clients, -1, -1))
            multi.lora_B.copy_(layer.lora_B.expand(num_clients, -1, -1))
        multi.ranks = [int(layer.active_rank)] * num_clients
        multi.trainable_mask = [bool(layer.trainable)] * num_clients
        multi._sync_requires_grad()
        return multi

    # ------------------------------------------------------------------ per-slot state
    def _slot(self, slot: int) -> int:
        if not 0 <= int(slot) < self.num_clients:
            raise ConfigError(f"client slot {slot!r} out of range [0, {self.num_clients})")
        return int(slot)

    def _sync_requires_grad(self) -> None:
        flag = any(self.trainable_mask)
        self.lora_A.requires_grad_(flag)
        self.lora_B.requires_grad_(flag)

    @torch.no_grad()
    def set_adapter(self, slot: int, A: torch.Tensor, B: torch.Tensor) -> None:
        """Copy ``A`` ``[r, in]`` / ``B`` ``[out, r]`` (r <= R; missing ranks are zero-filled) into ``slot``."""
        slot = self._slot(slot)
        A, B = torch.as_tensor(A), torch.as_tensor(B)
        if A.dim() != 2 or A.shape[1] != self.in_features or not 1 <= A.shape[0] <= self.r:
            raise ShapeError(f"slot {slot}: A must be [r<={self.r}, {self.in_features}], got {tuple(A.shape)}")
        if tuple(B.shape) != (self.out_features, A.shape[0]):
            raise ShapeError(f"slot {slot}: B must be [{self.out_features}, {A.shape[0]}], got {tuple(B.shape)}")
        if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
            raise NonFiniteError(f"slot {slot}: adapter contains NaN/Inf")
        r = A.shape[0]
        self.lora_A[slot].zero_()
        self.lora_B[slot].zero_()
        self.lora_A[slot, :r] = A
        self.lora_B[slot, :, :r] = B

    def get_adapter(self, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Copies of ``slot``'s full-rank ``(A [R, in], B [out, R])``."""
        slot = self._slot(slot)
        return self.lora_A[slot].detach().clone(), self.lora_B[slot].detach().clone()

    def set_rank(self, slot: int, rank: int) -> None:
        slot, rank = self._slot(slot), int(rank)
        if not 0 <= rank <= self.r:
            raise RankError(f"slot {slot}: active rank must be in [0, {self.r}], got {rank}")
        self.ranks[slot] = rank

    def set_scale(self, slot: int, scale: float) -> None:
        self.scales[self._slot(slot)] = float(scale)

    def set_trainable(self, slot: int, flag: bool) -> None:
        self.trainable_mask[self._slot(slot)] = bool(flag)
        self._sync_requires_grad()

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, client_ids: torch.Tensor | MultiLoRAMeta | None = None) -> torch.Tensor:
        if client_ids is None:
            if self.router is None:
                raise ConfigError("MultiLoRALinear needs client_ids (or a router set by `to_multi_client`)")
            client_ids = self.router.meta_for(x.shape[:-1], x.device)
        return multi_lora_linear(
            x, base_weight_view(self.base_layer), self.base_layer.bias, self.lora_A, self.lora_B,
            self.scales, self.ranks, client_ids, backend=self.backend,
            deterministic=self.deterministic, trainable=self.trainable_mask,
        )

    def extra_repr(self) -> str:
        parts = [
            f"in_features={self.in_features}",
            f"out_features={self.out_features}",
            f"num_clients={self.num_clients}",
            f"r={self.r}",
            f"ranks={self.ranks}",
            f"scales={[round(s, 4) for s in self.scales]}",
            f"trainable={self.trainable_mask}",
        ]
        if self.fan_in_fan_out:
            parts.append("fan_in_fan_out=True")
        parts.append(f"backend={self.backend!r}")
        if self.deterministic:
            parts.append("deterministic=True")
        return ", ".join(parts)


class MultiClientLoRA:
    """Handle on a model whose `LoRALinear` layers were replaced by `MultiLoRALinear` (see `to_multi_client`).

    Usage::

        multi = to_multi_client(model, num_clients=4)
        multi.set_client_adapter(2, "bert.encoder.layer.0.attention.self.query", A, B)
        with multi.clients(example_client_ids):          # [B] or [B, S]
            logits = model(**batch).logits
        loss = sum(F.cross_entropy(logits[ids == c], labels[ids == c]) for c in clients)  # per-client means
        loss.backward()
        grads = multi.client_grads(2)                    # {module: (dA [R, in], dB [out, R])}
        multi.restore(slot=2)                            # back to single-client layers holding slot 2

    Per-client optimizers: keep each client's adapter (or optimizer state) outside, copy it in with
    `load_client_state` before the step and read `client_grads` after it; or update the views of
    `client_parameters` in place under ``torch.no_grad()``.
    """

    def __init__(self, model: nn.Module, num_clients: int, *, deterministic: bool = False) -> None:
        originals = lora_modules(model)
        if not originals:
            raise UnknownModuleError(
                f"{type(model).__name__} has no LoRALinear module; call inject_lora before to_multi_client"
            )
        self.model = model
        self.num_clients = int(num_clients)
        self.router = ClientRouter(self.num_clients)
        self._originals: dict[str, LoRALinear] = originals
        # build every layer first: a refused layer must leave the model untouched
        self.modules: dict[str, MultiLoRALinear] = {
            name: MultiLoRALinear.from_lora(layer, self.num_clients, router=self.router, name=name)
            for name, layer in originals.items()
        }
        for name, multi in self.modules.items():
            multi.deterministic = bool(deterministic)
            _set_submodule(model, name, multi)
        self._restored = False

    # ------------------------------------------------------------------ batches
    @contextlib.contextmanager
    def clients(self, client_ids: torch.Tensor | Sequence[int]) -> Iterator[MultiClientLoRA]:
        """Route the forward inside this block: example-level ``[B]`` or token-level ``[B, S]`` ids (-1 = none)."""
        self.router.set(client_ids)
        try:
            yield self
        finally:
            self.router.clear()

    # ------------------------------------------------------------------ per-slot access
    def _module(self, module: str) -> MultiLoRALinear:
        try:
            return self.modules[module]
        except KeyError:
            raise UnknownModuleError(
                f"module {module!r} is not a multi-client LoRA module; known e.g. {list(self.modules)[:4]}"
            ) from None

    def _targets(self, module: str | None) -> list[MultiLoRALinear]:
        return list(self.modules.values()) if module is None else [self._module(module)]

    def set_client_adapter(self, slot: int, module: str, A: torch.Tensor, B: torch.Tensor) -> None:
        self._module(module).set_adapter(slot, A, B)

    def get_client_adapter(self, slot: int, module: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self._module(module).get_adapter(slot)

    def set_client_rank(self, slot: int, module: str | None, rank: int) -> None:
        """Active rank of ``slot`` in ``module`` (None: every module)."""
        for m in self._targets(module):
            m.set_rank(slot, rank)

    def set_client_trainable(self, slot: int, module: str | None, flag: bool) -> None:
        """Train (True) or freeze (False) ``slot``'s adapter in ``module`` (None: every module)."""
        for m in self._targets(module):
            m.set_trainable(slot, flag)

    def client_state(self, slot: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Copies of ``slot``'s adapters, by module name."""
        return {name: m.get_adapter(slot) for name, m in self.modules.items()}

    def load_client_state(self, slot: int, state: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        for name, (A, B) in state.items():
            self.set_client_adapter(slot, name, A, B)

    def client_parameters(self, slot: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Views ``(lora_A[slot], lora_B[slot])`` of the shared parameters (update them under no_grad)."""
        return {name: (m.lora_A[m._slot(slot)], m.lora_B[m._slot(slot)]) for name, m in self.modules.items()}

    def client_grads(self, slot: int) -> dict[str, tuple[torch.Tensor | None, torch.Tensor | None]]:
        """``slot``'s gradients ``(dA [R, in], dB [out, R])`` by module; None before any backward.

        They equal the gradients of training that client alone on its examples when the loss is a sum
        of per-client losses. A frozen client's entries are exactly zero.
        """
        out = {}
        for name, m in self.modules.items():
            s = m._slot(slot)
            out[name] = (None if m.lora_A.grad is None else m.lora_A.grad[s],
                         None if m.lora_B.grad is None else m.lora_B.grad[s])
        return out

    def zero_grad(self) -> None:
        for m in self.modules.values():
            m.lora_A.grad = None
            m.lora_B.grad = None

    # ------------------------------------------------------------------ undo
    @torch.no_grad()
    def restore(self, slot: int | None = None) -> dict[str, LoRALinear]:
        """Put the original `LoRALinear` layers back; with ``slot``, they take that slot's adapter, rank, flag."""
        if self._restored:
            return self._originals
        for name, multi in self.modules.items():
            layer = self._originals[name]
            if slot is not None:
                s = multi._slot(slot)
                layer.lora_A.copy_(multi.lora_A[s])
                layer.lora_B.copy_(multi.lora_B[s])
                layer.set_active_rank(int(multi.ranks[s]))
                layer.trainable = bool(multi.trainable_mask[s])
            _set_submodule(self.model, name, layer)
        self._restored = True
        return self._originals


def to_multi_client(model: nn.Module, num_clients: int, *, deterministic: bool = False) -> MultiClientLoRA:
    """Replace every `LoRALinear` of ``model`` (from `inject_lora`) by a K-slot `MultiLoRALinear`, in place.

    The frozen base modules are shared, never copied; every slot starts from the layer's current adapter,
    scale, active rank and trainable flag. Undo with `MultiClientLoRA.restore`.

    Raises:
        UnknownModuleError: the model has no `LoRALinear`. ConfigError: a layer is merged, uses a
            non-prefix rank mask or LoRA dropout (unsupported by the multi-client op).
    """
    return MultiClientLoRA(model, num_clients, deterministic=deterministic)
