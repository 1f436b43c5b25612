"""Issue 11 item 5: one exception policy. An unknown backend is a BackendError in every layer, config and op; a
NaN adapter is a NonFiniteError; ClientUpdateError.reason is a RejectReason that still compares equal to its
string."""

from __future__ import annotations

import pytest
import torch

from fedkernels.errors import (
    BackendError,
    ClientUpdateError,
    ConfigError,
    FedKernelsError,
    NonFiniteError,
    RejectReason,
    UnsupportedModuleError,
)
from fedkernels.nn import LoRAConfig, LoRALinear, MultiLoRALinear
from fedkernels.ops import lora_linear


def _builders():
    lin = torch.nn.Linear(8, 6)
    x = torch.randn(3, 8)
    A, B = torch.randn(4, 8), torch.randn(6, 4)
    return {
        "LoRALinear": lambda b: LoRALinear(torch.nn.Linear(8, 6), r=4, backend=b),
        "MultiLoRALinear": lambda b: MultiLoRALinear(torch.nn.Linear(8, 6), 2, 4, backend=b),
        "LoRAConfig": lambda b: LoRAConfig(backend=b),
        "lora_linear": lambda b: lora_linear(x, lin.weight, lin.bias, A, B, 1.0, backend=b),
    }


@pytest.mark.parametrize("where", sorted(_builders()))
@pytest.mark.parametrize("backend", ["cuda", "Triton", None])
def test_unknown_backend_is_backend_error_everywhere(where, backend):
    with pytest.raises(BackendError, match=repr(backend).replace("(", r"\(")):
        _builders()[where](backend)


def test_nan_multi_client_adapter_is_non_finite():
    layer = MultiLoRALinear(torch.nn.Linear(8, 6), 2, 4)
    A = torch.randn(4, 8)
    A[1, 2] = float("nan")
    with pytest.raises(NonFiniteError, match="slot 1"):
        layer.set_adapter(1, A, torch.randn(6, 4))


def test_wrapping_a_conv_is_typed_and_still_a_type_error():
    with pytest.raises(UnsupportedModuleError, match="Conv2d") as info:
        LoRALinear(torch.nn.Conv2d(3, 3, 1), r=2)
    assert isinstance(info.value, TypeError) and isinstance(info.value, FedKernelsError)


def test_bad_arguments_are_config_errors():
    with pytest.raises(ConfigError, match="dropout"):
        LoRALinear(torch.nn.Linear(8, 6), r=2, dropout=1.5)
    with pytest.raises(ConfigError, match="num_clients"):
        MultiLoRALinear(torch.nn.Linear(8, 6), 0, 4)


def test_reject_reason_is_an_enum_that_compares_as_string():
    e = ClientUpdateError("x", client=3, module="q", reason="non_finite")
    assert e.reason is RejectReason.NON_FINITE
    assert e.reason == "non_finite" and f"{e.reason}" == "non_finite"
    assert ClientUpdateError("x").reason is RejectReason.INVALID
    assert ClientUpdateError("x", reason=RejectReason.SHAPE).reason == "shape"
    with pytest.raises(ConfigError, match="'bogus'"):
        ClientUpdateError("x", reason="bogus")
