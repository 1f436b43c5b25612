"""Typed exceptions of fedkernels.

Every message names the offending value and, where there is one, the client and module, so a user
can act on the first line of a traceback. `ValueError` subclasses are used where a caller would
naturally catch `ValueError` (bad arguments); I/O refusals subclass `OSError`-free `FedKernelsError`.
"""

from __future__ import annotations

from enum import StrEnum


class FedKernelsError(Exception):
    """Base class of every error raised on purpose by fedkernels."""


class ShapeError(FedKernelsError, ValueError):
    """A tensor has a shape that does not fit the operation or the module it is meant for."""


class RankError(FedKernelsError, ValueError):
    """A LoRA rank is out of range (negative, or above the module's maximum rank)."""


class BackendError(FedKernelsError, ValueError):
    """An unknown compute backend was asked for, or it is unavailable for the given tensors."""


class NonFiniteError(FedKernelsError, ValueError):
    """NaN or Inf found where only finite numbers are allowed (merge, adapter load, client update)."""


class UnknownModuleError(FedKernelsError, KeyError):
    """A module name (LoRA target, adapter key) that the model does not have."""

    def __str__(self) -> str:  # KeyError quotes its argument; keep the plain message instead
        return str(self.args[0]) if self.args else ""


class UnsupportedModuleError(FedKernelsError, TypeError):
    """A module of a type the operation cannot wrap (LoRA wraps nn.Linear and transformers Conv1D only)."""


class AdapterFormatError(FedKernelsError, ValueError):
    """An adapter file in a format we refuse to read (pickle) or that is malformed."""


class CheckpointError(FedKernelsError, ValueError):
    """A checkpoint that cannot be resumed from: a missing or corrupt file (digest mismatch), a missing key, or
    metadata out of range. The message names the file, the key and the value."""


class RunFolderError(FedKernelsError):
    """A run folder that this run may not use: it holds another run's files (a fresh start needs ``--overwrite``),
    or it has nothing to resume from."""


class RunLockedError(RunFolderError):
    """Another live process holds the run folder's lock; the message names the folder, pid, host and start time."""


class RunFailedError(FedKernelsError):
    """A run ended without a single successful client update in any round (its summary.json says so too)."""


class ConfigError(FedKernelsError, ValueError):
    """An invalid configuration value; the message quotes it."""


class RejectReason(StrEnum):
    """Why a client update was rejected. A ``str`` enum: ``reason == "shape"`` and JSON logs keep working."""

    INVALID = "invalid"  # default when a caller names no reason
    CLIENT_ID = "client_id"  # the client id is not an integer, or the reply claims another client's id
    NOT_SAMPLED = "not_sampled"  # an update from a client that got no plan this round
    DUPLICATE = "duplicate"  # two updates from one client in one round
    NUM_SAMPLES = "num_samples"  # the sample count (FedAvg weight) is not a positive integer
    MEASURED_BYTES = "measured_bytes"  # a reported memory measurement that is not a finite byte count
    UNKNOWN_MODULE = "unknown_module"  # a module the global adapter does not have
    UNPLANNED_MODULE = "unplanned_module"  # a module outside the client's plan
    MISSING_MODULE = "missing_module"  # a planned module (or head key) absent from the update
    UNKNOWN_KEY = "unknown_key"  # a reply key that names nothing the server knows
    SHAPE = "shape"  # factors that do not fit A [r, in] / B [out, r]
    DTYPE = "dtype"  # a tensor dtype outside the allowed floating-point ones
    RANK = "rank"  # declared, planned and actual ranks disagree, or exceed the global rank
    SCALE = "scale"  # a LoRA scale that is not a positive finite number
    NON_FINITE = "non_finite"  # NaN / Inf entries
    MALFORMED = "malformed"  # a reply missing a record, or one that does not parse
    CONFIG = "config"  # a reply's config record that does not parse
    ERROR_REPLY = "error_reply"  # the node answered with an error instead of an update


class ClientUpdateError(FedKernelsError, ValueError):
    """A client's update was rejected before aggregation.

    Attributes:
        client: id of the client whose update was rejected.
        module: the module (adapter key) at fault, or None when the update as a whole is bad.
        reason: a `RejectReason` (a ``str``, so ``e.reason == "non_finite"`` holds); the constructor also takes the
            plain string and converts it, refusing unknown ones (ConfigError listing the valid ones).
    """

    def __init__(self, message: str, *, client: object = None, module: str | None = None,
                 reason: RejectReason | str = RejectReason.INVALID):
        super().__init__(message)
        self.client = client
        self.module = module
        try:
            self.reason = RejectReason(reason)
        except ValueError:
            raise ConfigError(f"ClientUpdateError: unknown reason {reason!r}; valid: "
                              f"{', '.join(r.value for r in RejectReason)}") from None
