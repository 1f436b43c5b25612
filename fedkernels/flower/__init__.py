"""Run fedkernels federations on Flower (optional extra: ``pip install 'fedkernels[flower]'``).

Nothing here is imported by ``import fedkernels``; the names below load `flwr` on first use:

- `HeteroLoRAStrategy` (`fedkernels.flower.strategy`): Message-API strategy (seeded sampling, per-node plans from
  the node's memory budget, validated replies, `fedkernels.aggregation` rules, checkpoints and resume);
- `make_server_app` / `make_client_app`: the ServerApp and ClientApp of a Flower App (see ``examples/flower``);
- `run_local_deployment` (`fedkernels.flower.launch`): a SuperLink and SuperNodes on 127.0.0.1 plus ``flwr run``.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["HeteroLoRAStrategy", "make_client_app", "make_server_app", "run_local_deployment", "flwr_available"]

_WHERE = {
    "HeteroLoRAStrategy": "fedkernels.flower.strategy",
    "make_client_app": "fedkernels.flower.client",
    "make_server_app": "fedkernels.flower.server",
    "run_local_deployment": "fedkernels.flower.launch",
}


def flwr_available() -> bool:
    """Whether Flower (``flwr``) can be imported."""
    return importlib.util.find_spec("flwr") is not None


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'fedkernels.flower' has no attribute {name!r}")
