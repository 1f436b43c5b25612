"""ServerApp: `fedkernels.flower.HeteroLoRAStrategy` configured from the run config (see pyproject.toml)."""

from pathlib import Path

from fedkernels.flower.server import make_server_app

# relative `config` paths are resolved against the app folder (this file's parent's parent)
app = make_server_app(app_dir=Path(__file__).resolve().parent.parent)
