"""The servers bench/serve.py compares, started as process groups and stopped whatever happens.

- a second predictor process beside the stack's: the same command line and environment, read from /proc;
- MLServer 1.7.1 with its LightGBM runtime, in a venv of its own (.bench/mlserver-venv), tuned to its best:
  parallel inference workers off, one OpenMP thread, no access log, no metrics server, no gzip middleware;
- the bare FastAPI + onnxruntime app (bench/bare_app.py), under the predictor's uvicorn options (workers, access
  log): whatever deploy/local/stack.py gives the predictor, the floor gets too.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from deploy.local.launch import REPO_ROOT, http_ok
from deploy.local.processes import pick_port, spawn, stop_groups, wait_until

MLSERVER_VENV = REPO_ROOT / ".bench" / "mlserver-venv"
MLSERVER_PACKAGES = ("mlserver==1.7.1", "mlserver-lightgbm==1.7.1", "uvloop==0.21.0")  # uvloop: see MEASURED.md
MLSERVER_MODEL = "ai4i"
PROC = Path("/proc")
READY_TIMEOUT_S = 120.0


class Processes:
    """Process groups started for one benchmark; leaving the `with` block stops them all (Ctrl-C included)."""

    def __init__(self, logs: Path, *, grace_s: float) -> None:
        self.logs = logs
        self.grace_s = grace_s
        self.started: dict[str, subprocess.Popen[bytes]] = {}
        self.ports: set[int] = set()

    def __enter__(self) -> Processes:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        stop_groups([process.pid for process in self.started.values()], grace_s=self.grace_s)

    def port(self) -> int:
        chosen = pick_port(0, taken=self.ports)
        self.ports.add(chosen)
        return chosen

    def start(self, name: str, command: Sequence[str], env: Mapping[str, str], ready_url: str) -> int:
        """Spawn `command` as its own process group and wait until `ready_url` answers 200; returns its pid."""
        process = spawn(command, env=env, cwd=REPO_ROOT, log_path=self.log(name))
        self.started[name] = process
        wait_until(http_ok(ready_url), name=name, processes=self.started, logs=self.log, timeout_s=READY_TIMEOUT_S)
        return process.pid

    def log(self, name: str) -> Path:
        return self.logs / f"{name}.log"


@dataclass(frozen=True)
class Launched:
    """A uvicorn server as started: its command line and environment, read back from /proc."""

    command: list[str]
    env: dict[str, str]

    @classmethod
    def of(cls, pid: int) -> Launched:
        command = (PROC / str(pid) / "cmdline").read_bytes().decode().split("\0")[:-1]
        pairs = (entry.partition("=") for entry in (PROC / str(pid) / "environ").read_bytes().decode().split("\0"))
        return cls(command, {name: value for name, _, value in pairs if name})

    @property
    def workers(self) -> int:
        return int(_option(self.command, "--workers", "1"))

    def with_options(self, **options: str) -> list[str]:
        """The command with `--factory`, `--port` ... set to new values."""
        command = list(self.command)
        for name, value in options.items():
            command[command.index(f"--{name}") + 1] = value
        return command


def start_predictor(processes: Processes, stack_predictor: Launched, name: str) -> tuple[str, int]:
    """Another predictor process: the stack's own command line and environment, on another port.

    Returns its URL and pid (the leader of its process group).
    """
    port = processes.port()
    command = stack_predictor.with_options(port=str(port))
    url = f"http://127.0.0.1:{port}"
    return url, processes.start(name, command, stack_predictor.env, url + "/v2/health/ready")


def start_bare(processes: Processes, stack_predictor: Launched, model_onnx: Path) -> str:
    """bench/bare_app.py under the predictor's uvicorn options (workers, access log ...), on another port."""
    port = processes.port()
    command = stack_predictor.with_options(factory="bench.bare_app:create_app", port=str(port))
    env = {**os.environ, "BARE_MODEL_PATH": str(model_onnx), "PYTHONUNBUFFERED": "1"}
    url = f"http://127.0.0.1:{port}"
    processes.start("bare", command, env, url + "/docs")
    return url


def start_mlserver(processes: Processes, model_txt: Path, folder: Path) -> str:
    """MLServer on free HTTP, gRPC and metrics ports, serving `model_txt` as MLSERVER_MODEL."""
    http_port, grpc_port, metrics_port = processes.port(), processes.port(), processes.port()
    settings = {
        "host": "127.0.0.1",
        "http_port": http_port,
        "grpc_port": grpc_port,
        "metrics_port": metrics_port,
        "metrics_endpoint": None,
        "parallel_workers": 0,
        "debug": False,
        "gzip_enabled": False,
    }
    model_settings = {
        "name": MLSERVER_MODEL,
        "implementation": "mlserver_lightgbm.LightGBMModel",
        "parameters": {"uri": str(model_txt.resolve()), "version": "v1"},
    }
    (folder / MLSERVER_MODEL).mkdir(parents=True, exist_ok=True)
    (folder / "settings.json").write_text(json.dumps(settings, indent=2))
    (folder / MLSERVER_MODEL / "model-settings.json").write_text(json.dumps(model_settings, indent=2))
    env = {
        "PATH": f"{MLSERVER_VENV / 'bin'}:{os.environ.get('PATH', '')}",
        "HOME": os.environ.get("HOME", str(folder)),
        "OMP_NUM_THREADS": "1",
        "MLSERVER_PARALLEL_WORKERS": "0",
    }
    url = f"http://127.0.0.1:{http_port}"
    command = [str(MLSERVER_VENV / "bin" / "mlserver"), "start", str(folder)]
    processes.start("mlserver", command, env, f"{url}/v2/models/{MLSERVER_MODEL}/ready")
    return url


def ensure_mlserver_venv() -> None:
    """Create .bench/mlserver-venv once (python3 -m venv, then pip install the pinned packages); reuse it after."""
    marker = MLSERVER_VENV / ".installed"
    if marker.exists() and marker.read_text() == " ".join(MLSERVER_PACKAGES):
        return
    print(f"creating {MLSERVER_VENV} with {', '.join(MLSERVER_PACKAGES)} (once) ...", flush=True)
    subprocess.run(["python3", "-m", "venv", "--clear", str(MLSERVER_VENV)], check=True)
    pip = [str(MLSERVER_VENV / "bin" / "pip"), "install", "--quiet", "--disable-pip-version-check"]
    subprocess.run([*pip, *MLSERVER_PACKAGES], check=True)
    marker.write_text(" ".join(MLSERVER_PACKAGES))


def _option(command: list[str], name: str, default: str) -> str:
    return command[command.index(name) + 1] if name in command else default
