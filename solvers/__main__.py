"""``python -m solvers plan ...``: the standalone planner CLI (see `solvers.cli`)."""

from solvers.cli import app

if __name__ == "__main__":
    app(prog_name="python -m solvers")
