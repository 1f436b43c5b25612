"""ServerApp: `fedkernels.flower.HeteroLoRAStrategy` configured from the run config (see pyproject.toml)."""

from pathlib import Path

from flwr.serverapp import ServerApp

from fedkernels.flower.server import make_server_app
from fedkernels.flower.warm import PollingGrid

# relative `config` paths are resolved against the app folder (this file's parent's parent)
_app = make_server_app(app_dir=Path(__file__).resolve().parent.parent)
app = ServerApp()


@app.main()
def main(grid, context):
    """The fedkernels ServerApp on a grid that polls for replies every 0.1 s (Flower's own: every 3 s)."""
    return _app._main(PollingGrid(grid), context)
