"""Launch the Flower App: in Flower's simulation engine, or as a real deployment on 127.0.0.1.

`run_local_deployment` starts one ``flower-superlink`` and one ``flower-supernode`` per client (insecure,
loopback only, free ports), each SuperNode in ``--isolation process`` mode with one long-lived ClientApp process
beside it (`fedkernels.flower.warm`: torch imported and the model prepared once per run, not once per message),
submits the app with ``flwr run <app> <connection> --stream`` through a private
``FLWR_HOME``, waits for the run to end, and stops every process it started, also on errors and Ctrl-C.
It needs no Ray. `run_in_simulation` uses `flwr.simulation.run_simulation`, which needs Ray (``flwr[simulation]``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from fedkernels.errors import ConfigError
from fedkernels.federated.config import FederatedConfig

__all__ = ["LocalDeployment", "run_local_deployment", "run_in_simulation", "example_app_dir", "flwr_executable"]

log = logging.getLogger("fedkernels.flower")


def example_app_dir() -> Path:
    """``examples/flower`` of a source checkout (the runnable Flower App)."""
    return Path(__file__).resolve().parents[2] / "examples" / "flower"


def flwr_executable(name: str) -> str:
    """Path of a Flower command (``flwr``, ``flower-superlink``...): next to the interpreter, else on PATH."""
    for cand in (Path(sys.executable).parent / name, *(Path(p) / name for p in _extra_bin_dirs())):
        if cand.is_file() and os.access(cand, os.X_OK):
            return str(cand)
    found = shutil.which(name)
    if found is None:
        raise ConfigError(f"cannot find the Flower command {name!r}; install the extra: "
                          "pip install 'fedkernels[flower]'")
    return found


def _extra_bin_dirs() -> list[str]:
    """``bin`` folders of PYTHONPATH entries (Flower installed with ``pip install --target DIR`` puts them there)."""
    out = []
    for p in os.environ.get("PYTHONPATH", "").split(os.pathsep):
        if p and (Path(p) / "bin").is_dir():
            out.append(str(Path(p) / "bin"))
    return out


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, proc: subprocess.Popen, what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode} before listening on 127.0.0.1:{port}")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"{what} did not listen on 127.0.0.1:{port} within {timeout:.0f}s")


@dataclass
class LocalDeployment:
    """A SuperLink and SuperNodes on 127.0.0.1 (use as a context manager; `stop` kills them all).

    Args:
        node_configs: one ``--node-config`` dict per SuperNode (``partition-id``, ``memory-budget``...).
        workdir: folder for logs and the private ``FLWR_HOME`` (a temporary one if None).
        warm: run each node's ClientApp in one long-lived process (`fedkernels.flower.warm`, Flower's
            ``--isolation process``); False: Flower's default, a fresh ``flwr-clientapp`` process per message.
    """

    node_configs: list[dict]
    workdir: Path | None = None
    warm: bool = True
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    control_port: int = 0
    fleet_port: int = 0

    def __post_init__(self) -> None:
        self._tmp = None
        if self.workdir is None:
            self._tmp = tempfile.mkdtemp(prefix="fedkernels-flower-")
            self.workdir = Path(self._tmp)
        self.workdir = Path(self.workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.flwr_home = self.workdir / "flwr_home"
        self.env = dict(os.environ)
        self.env["FLWR_HOME"] = str(self.flwr_home)
        bins = [str(Path(sys.executable).parent), *_extra_bin_dirs()]
        self.env["PATH"] = os.pathsep.join([*bins, self.env.get("PATH", "")])  # flwr-serverapp/-clientapp
        self.env.setdefault("PYTHONUNBUFFERED", "1")

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen:
        logf = open(self.workdir / f"{name}.log", "wb")  # noqa: SIM115 - closed by the process' end
        proc = subprocess.Popen(args, env=self.env, stdout=logf, stderr=subprocess.STDOUT, cwd=self.workdir,
                                start_new_session=True)  # own process group: stop() also kills its children
        self.procs[name] = proc
        return proc

    def start(self) -> LocalDeployment:
        # flwr >= 1.41 serves the Runtime, Control and Fleet APIs over HTTP on one --host/--port
        self.control_port = self.fleet_port = free_port()
        link = self._spawn("superlink", [
            flwr_executable("flower-superlink"), "--insecure", "--host", "127.0.0.1", "--port", str(self.control_port),
            "--disable-runtime-dependency-installation",  # the app runs in this environment: no uv sync
        ])
        _wait_port(self.control_port, link, "flower-superlink")
        for i, nc in enumerate(self.node_configs):
            self.start_node(i, nc)
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        (self.flwr_home / "config.toml").write_text(
            '[superlink]\ndefault = "loopback"\n\n'
            f'[superlink.loopback]\naddress = "127.0.0.1:{self.control_port}"\ninsecure = true\n')
        return self

    def start_node(self, i: int, node_config: dict) -> subprocess.Popen:
        """SuperNode ``i`` (and, when ``warm``, its long-lived ClientApp process, named ``clientapp-<i>``)."""
        pairs = " ".join(f'{k}="{v}"' if isinstance(v, str) else f"{k}={v}" for k, v in node_config.items())
        runtime_port = free_port()
        node = self._spawn(f"supernode-{i}", [
            # warm: Flower's SuperNode with its idle waits capped (fedkernels.flower.fastnode), else the plain one
            *([sys.executable, "-m", "fedkernels.flower.fastnode"] if self.warm
              else [flwr_executable("flower-supernode")]),
            "--insecure", "--superlink", f"127.0.0.1:{self.fleet_port}",
            "--node-config", pairs, "--host", "127.0.0.1", "--port", str(runtime_port),
            *(["--isolation", "process"] if self.warm else []),
        ])
        if self.warm:
            self._spawn(f"clientapp-{i}", [
                sys.executable, "-m", "fedkernels.flower.warm", "--runtime-api-address", f"127.0.0.1:{runtime_port}",
                "--parent-pid", str(node.pid),
            ])
        return node

    def kill_node(self, i: int) -> None:
        """SIGKILL SuperNode ``i`` and everything it started (its running ClientApp)."""
        for name in (f"supernode-{i}", f"clientapp-{i}"):
            proc = self.procs.get(name)
            if proc is None:
                continue
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)

    def run(self, app_dir: str | Path, run_config: dict, timeout: float = 1800.0) -> subprocess.CompletedProcess:
        """``flwr run <app_dir> loopback --stream`` with ``run_config`` overrides; returns when the run ends."""
        pairs = " ".join(f'{k}="{v}"' if isinstance(v, str) else
                         f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in run_config.items())
        args = [flwr_executable("flwr"), "run", str(app_dir), "loopback", "--stream"]
        if pairs:
            args += ["--run-config", pairs]
        with open(self.workdir / "flwr-run.log", "wb") as logf:
            proc = subprocess.Popen(args, env=self.env, stdout=logf, stderr=subprocess.STDOUT, cwd=self.workdir,
                                    start_new_session=True)
            self.procs["flwr-run"] = proc
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self._kill(proc)
                raise
        out = (self.workdir / "flwr-run.log").read_text(errors="replace")
        return subprocess.CompletedProcess(args, proc.returncode, out, "")

    @staticmethod
    def _kill(proc: subprocess.Popen) -> None:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        # children (flwr-serverapp / flwr-clientapp) left in the group after the parent ended
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)

    def stop(self, wait_s: float = 15.0) -> None:
        """Kill every process started here (and their children), then wait until their groups are gone."""
        for name in reversed(list(self.procs)):
            self._kill(self.procs[name])
        deadline = time.monotonic() + wait_s
        while self.alive() and time.monotonic() < deadline:
            time.sleep(0.1)

    def alive(self) -> list[str]:
        """Names of the started processes whose process group still has a member."""
        out = []
        for name, proc in self.procs.items():
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                continue
            except PermissionError:
                pass
            out.append(name)
        return out

    def logs(self) -> str:
        parts = []
        for p in sorted(self.workdir.glob("*.log")):
            parts.append(f"===== {p.name}\n{p.read_text(errors='replace')[-6000:]}")
        return "\n".join(parts)

    def __enter__(self) -> LocalDeployment:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()


def node_configs_for(cfg: FederatedConfig, budgets: dict[int, int] | None = None) -> list[dict]:
    """One node per client partition; ``memory-budget`` in bytes when ``budgets`` is given."""
    out = []
    for cid in range(cfg.num_clients):
        nc: dict = {"partition-id": cid, "num-partitions": cfg.num_clients}
        if budgets is not None:
            nc["memory-budget"] = int(budgets[cid])
        out.append(nc)
    return out


def run_local_deployment(cfg: FederatedConfig, *, app_dir: str | Path | None = None, resume: bool = False,
                         round_timeout: float = 600.0, workdir: str | Path | None = None,
                         timeout: float = 3600.0) -> Path:
    """Run ``cfg`` on a SuperLink and ``cfg.num_clients`` SuperNodes on 127.0.0.1; returns the output folder.

    The config travels as a JSON file in ``workdir``; nodes hold partitions 0..N-1 with the config's budgets.
    """
    import json

    out = Path(cfg.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = Path(workdir) if workdir is not None else out / "flower"
    work.mkdir(parents=True, exist_ok=True)
    cfg_path = work / "federated_config.json"
    cfg_path.write_text(json.dumps({**cfg.to_dict(), "output_dir": str(out)}))
    with LocalDeployment(node_configs_for(cfg), workdir=work) as dep:
        res = dep.run(app_dir or example_app_dir(), {
            "config": str(cfg_path), "output-dir": str(out), "resume": resume, "round-timeout": float(round_timeout),
            "min-nodes": cfg.num_clients,
        }, timeout=timeout)
        if res.returncode != 0 or not (out / "summary.json").is_file():
            raise RuntimeError(f"flwr run failed (exit {res.returncode}); logs in {work}\n{dep.logs()[-4000:]}")
    return out


def run_in_simulation(cfg: FederatedConfig, *, resume: bool = False, round_timeout: float = 600.0,
                      num_cpus_per_client: float = 1.0) -> Path:
    """Run ``cfg`` in Flower's simulation engine (``run_simulation``, Ray): one virtual SuperNode per client."""
    try:
        import ray  # noqa: F401
    except ImportError as exc:
        raise ConfigError("Flower's simulation engine needs Ray: pip install 'flwr[simulation]' "
                          "(or use the Ray-free local deployment: fedkernels train --engine flower-local)") from exc
    from flwr.simulation import run_simulation

    from fedkernels.flower.client import make_client_app
    from fedkernels.flower.server import make_server_app

    out = Path(cfg.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    import json

    cfg_path = out / "federated_config.json"
    cfg_path.write_text(json.dumps({**cfg.to_dict(), "output_dir": str(out)}))
    from flwr.app import Context  # noqa: F401  (fail early with a clear error if flwr is broken)

    server_app = make_server_app()
    server_app_run_config = {"config": str(cfg_path), "output-dir": str(out), "resume": resume,
                             "round-timeout": float(round_timeout), "min-nodes": cfg.num_clients}
    _RUN_CONFIG.clear()
    _RUN_CONFIG.update(server_app_run_config)
    run_simulation(server_app=_with_run_config(server_app), client_app=make_client_app(),
                   num_supernodes=cfg.num_clients,
                   backend_config={"client_resources": {"num_cpus": num_cpus_per_client, "num_gpus": 0.0}})
    if not (out / "summary.json").is_file():
        raise RuntimeError(f"the Flower simulation ended without a summary in {str(out)!r}; see the log above")
    return out


_RUN_CONFIG: dict = {}


def _with_run_config(server_app):
    """`run_simulation` takes no run config: wrap the ServerApp so its context carries ours."""
    from flwr.serverapp import ServerApp

    wrapped = ServerApp()

    @wrapped.main()
    def main(grid, context):
        context.run_config.update(_RUN_CONFIG)
        return server_app._main(grid, context)

    return wrapped
