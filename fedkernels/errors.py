"""Typed exceptions of fedkernels.

Every message names the offending value and, where there is one, the client and module, so a user
can act on the first line of a traceback. `ValueError` subclasses are used where a caller would
naturally catch `ValueError` (bad arguments); I/O refusals subclass `OSError`-free `FedKernelsError`.
"""

from __future__ import annotations


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


class ClientUpdateError(FedKernelsError, ValueError):
    """A client's update was rejected before aggregation.

    Attributes:
        client: id of the client whose update was rejected.
        module: the module (adapter key) at fault, or None when the update as a whole is bad.
        reason: short machine-readable reason ("non_finite", "shape", "rank", "unknown_module",
            "missing_module", "num_samples", "error").
    """

    def __init__(self, message: str, *, client: object = None, module: str | None = None, reason: str = "invalid"):
        super().__init__(message)
        self.client = client
        self.module = module
        self.reason = reason
