"""wrk as the load generator: one POST body, C keep-alive connections, requests/s and latency percentiles.

Every server is driven by the same binary with the same script (bench/wrk/post.lua), so the client's own cost is
the same for all of them. Any answer of 400 or more, or any socket error or timeout, fails the run loudly.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent / "wrk" / "post.lua"
RESULT_MARK = "BENCH_RESULT "
MAX_THREADS = 2  # one per core: more client threads would only take CPU from the server under test


class LoadError(RuntimeError):
    """wrk is missing, failed, or saw failed requests; the message carries its output."""


@dataclass(frozen=True)
class Load:
    """What one wrk run measured: latencies in milliseconds."""

    requests: int
    duration_s: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float

    @property
    def requests_per_s(self) -> float:
        return self.requests / self.duration_s


@dataclass(frozen=True)
class Target:
    """Where to send the load, with which headers beyond `Content-Type: application/json`."""

    url: str
    headers: dict[str, str] = field(default_factory=dict)


def require_wrk() -> str:
    path = shutil.which("wrk")
    if path is None:
        raise LoadError(
            "wrk is not installed: `apt-get install -y wrk` (Debian/Ubuntu, as root) or `make bench`, which does it"
        )
    return path


def run(target: Target, body: Path, *, connections: int, duration_s: int) -> Load:
    """POST `body` with `wrk -t min(C, 2) -c C -d D --latency`; raises LoadError on any failed request."""
    threads = min(connections, MAX_THREADS)
    command = [require_wrk(), "-t", str(threads), "-c", str(connections), "-d", f"{duration_s}s", "--latency"]
    command += ["-s", str(SCRIPT), target.url]
    headers = "\n".join(f"{name}: {value}" for name, value in target.headers.items())
    env = {**os.environ, "BENCH_BODY_FILE": str(body), "BENCH_HEADERS": headers}
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=duration_s + 60, check=False)
    if completed.returncode != 0:
        raise LoadError(f"wrk exited with {completed.returncode}:\n{completed.stdout}{completed.stderr}")
    return _parse(completed.stdout, target.url)


def _parse(output: str, url: str) -> Load:
    lines = [line for line in output.splitlines() if line.startswith(RESULT_MARK)]
    if not lines:
        raise LoadError(f"no {RESULT_MARK.strip()} line from wrk against {url}:\n{output}")
    figures = json.loads(lines[-1].removeprefix(RESULT_MARK))
    failed = {name: figures[name] for name in _FAILURES if figures[name]}
    if failed or not figures["requests"]:
        raise LoadError(f"failed requests against {url}: {failed or 'no request answered'}\n{output}")
    return Load(
        requests=figures["requests"],
        duration_s=figures["duration_us"] / 1e6,
        p50_ms=figures["p50_us"] / 1e3,
        p90_ms=figures["p90_us"] / 1e3,
        p99_ms=figures["p99_us"] / 1e3,
        max_ms=figures["max_us"] / 1e3,
    )


_FAILURES = ("bad_status", "connect_errors", "read_errors", "write_errors", "timeouts")
