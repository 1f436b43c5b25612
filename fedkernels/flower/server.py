"""`make_server_app`: a Flower ServerApp running `HeteroLoRAStrategy` on a `FederatedConfig`.

Run config keys (``[tool.flwr.app.config]`` of the app, overridable with ``flwr run --run-config``):

- ``config``: path of the `FederatedConfig` file (YAML/TOML/JSON); relative paths are resolved against the
  app folder;
- ``overrides``: extra ``key=value`` overrides of the config, separated by ``;`` (e.g. ``"rounds=2;seed=1"``);
- ``output-dir``: replaces ``output_dir`` when not empty (give an absolute path: the ServerApp process does
  not run in your shell's folder);
- ``resume``: continue from the latest checkpoint in the output folder;
- ``round-timeout``: seconds to wait for train replies; ``min-nodes``: nodes to wait for before round 1;
  ``node-wait``: how long to wait for them.
"""

from __future__ import annotations

import logging
from pathlib import Path

from fedkernels.errors import ConfigError
from fedkernels.federated.config import FederatedConfig
from fedkernels.flower.strategy import HeteroLoRAStrategy

try:
    from flwr.app import Context
    from flwr.serverapp import Grid, ServerApp
except ImportError as exc:  # pragma: no cover - exercised only without flwr
    raise ImportError("fedkernels.flower needs Flower: pip install 'fedkernels[flower]'") from exc

__all__ = ["make_server_app", "config_from_run_config"]

log = logging.getLogger("fedkernels.flower")


def config_from_run_config(run_config: dict, app_dir: str | Path | None = None) -> FederatedConfig:
    """The `FederatedConfig` a run config describes (see the module docstring)."""
    path = run_config.get("config", "")
    if path:
        p = Path(str(path))
        if not p.is_absolute() and app_dir is not None:
            p = Path(app_dir) / p
        cfg = FederatedConfig.from_file(p)
    else:
        cfg = FederatedConfig()
    overrides = [s.strip() for s in str(run_config.get("overrides", "")).split(";") if s.strip()]
    if overrides:
        cfg = cfg.with_overrides(overrides)
    out = str(run_config.get("output-dir", "") or "")
    if out:
        cfg = cfg.with_overrides({"output_dir": out})
    return cfg


def _log_to_stderr() -> None:
    """fedkernels' round logs at INFO in the ServerApp's log stream (not the root logger: httpx would flood it)."""
    root = logging.getLogger("fedkernels")
    if not root.handlers and not logging.getLogger().handlers:  # the CLI may have configured logging already
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
    root.setLevel(logging.INFO)


def make_server_app(app_dir: str | Path | None = None) -> ServerApp:
    """The ServerApp: builds the strategy from the run config and runs it to the end (or resumes)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        _log_to_stderr()
        rc = dict(context.run_config)
        cfg = config_from_run_config(rc, app_dir)
        try:
            timeout = float(rc.get("round-timeout", 600.0))
            min_nodes = int(rc.get("min-nodes", 1))
            node_wait = float(rc.get("node-wait", 300.0))
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"bad run config {rc!r}: {exc}") from exc
        strategy = HeteroLoRAStrategy(cfg, round_timeout=timeout, min_nodes=min_nodes, node_wait_s=node_wait)
        summary = strategy.start(grid, resume=bool(rc.get("resume", False)))
        log.info("finished %d rounds: accuracy %.4f, output %s, bytes per round %s", summary.rounds,
                 summary.final_accuracy, summary.output_dir, strategy.bytes_log)

    return app
