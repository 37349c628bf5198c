"""How long a deploy takes to reach every predictor replica (process x uvicorn worker).

A keep-alive connection stays with the worker that accepted it, so one connection per worker asks each replica
which version it serves; connections are opened until every worker of a process holds one (which worker holds
which connection is read from /proc: bench/sockets.py).

The clock starts when the deploy call's response has arrived and stops when the last replica answers the new
version in `X-Model-Version`; each connection asks every `poll_s`, so the figure is late by at most that much.
"""

from __future__ import annotations

import http.client
import threading
import time
from dataclasses import dataclass

import httpx
import orjson

from bench import sockets

MAX_CONNECTIONS_PER_PROCESS = 64


class ReplicaError(RuntimeError):
    """A replica could not be reached, or never served the deployed version."""


@dataclass(frozen=True)
class Predictor:
    """One predictor process: where it listens and its process group (the uvicorn supervisor's pid)."""

    url: str
    pgid: int
    workers: int


class Probe:
    """One keep-alive connection to one predictor worker, asking which version it serves."""

    def __init__(self, predictor: Predictor, path: str, body: bytes, key: str) -> None:
        host, _, port = predictor.url.removeprefix("http://").partition(":")
        self.connection = http.client.HTTPConnection(host, int(port), timeout=10)
        self.path = path
        self.body = body
        self.headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
        self.server_port = int(port)

    def version(self) -> str:
        self.connection.request("POST", self.path, body=self.body, headers=self.headers)
        response = self.connection.getresponse()
        content = response.read()
        if response.status != http.HTTPStatus.OK:
            raise ReplicaError(f"predict answered {response.status}: {content[:300]!r}")
        return response.headers.get("X-Model-Version", "")

    @property
    def client_port(self) -> int:
        sock = self.connection.sock
        if sock is None:
            raise ReplicaError("the probe is not connected")
        return int(sock.getsockname()[1])

    def close(self) -> None:
        self.connection.close()


def probes_for(predictor: Predictor, org: str, key: str, row: dict[str, float]) -> list[Probe]:
    """One connected probe per worker of `predictor`; the connections that landed on a covered worker are closed."""
    body = orjson.dumps({"rows": [row]})
    opened: list[Probe] = []
    by_worker: dict[int, Probe] = {}
    try:
        while len(by_worker) < predictor.workers and len(opened) < MAX_CONNECTIONS_PER_PROCESS:
            probe = Probe(predictor, f"/v1/orgs/{org}/predict", body, key)
            opened.append(probe)
            probe.version()
            by_worker.setdefault(sockets.holder(predictor.pgid, probe.server_port, probe.client_port), probe)
    finally:
        chosen = list(by_worker.values()) if len(by_worker) == predictor.workers else []
        for probe in opened:
            if probe not in chosen:
                probe.close()
    if not chosen:
        raise ReplicaError(
            f"{len(opened)} connections to {predictor.url} reached only {len(by_worker)} of its "
            f"{predictor.workers} workers"
        )
    return chosen


def time_to_every_replica(
    api: httpx.Client, org: str, version: str, probes: list[Probe], *, poll_s: float, timeout_s: float
) -> float:
    """Deploy `version` through the api; seconds from its response until every probe answers it."""
    seen: list[float | None] = [None] * len(probes)
    failures: list[BaseException] = []
    stop = threading.Event()
    threads = [
        threading.Thread(target=_poll, args=(probe, version, poll_s, stop, seen, index, failures), daemon=True)
        for index, probe in enumerate(probes)
    ]
    for thread in threads:
        thread.start()
    try:
        response = api.post(f"/v1/orgs/{org}/deployments", json={"version": version})
        answered = time.perf_counter()
        if response.status_code != httpx.codes.CREATED:
            raise ReplicaError(f"deploy answered {response.status_code}: {response.text[:300]}")
        for thread in threads:
            thread.join(timeout=max(0.0, answered + timeout_s - time.perf_counter()))
    finally:
        stop.set()
    if failures:
        raise ReplicaError(f"a replica failed while deploying {version}: {failures[0]!r}")
    if any(moment is None for moment in seen):
        raise ReplicaError(f"{seen.count(None)} of {len(seen)} replicas did not serve {version} within {timeout_s} s")
    return max(moment for moment in seen if moment is not None) - answered


def _poll(
    probe: Probe,
    version: str,
    poll_s: float,
    stop: threading.Event,
    seen: list[float | None],
    index: int,
    failures: list[BaseException],
) -> None:
    try:
        while not stop.is_set():
            if probe.version() == version:
                seen[index] = time.perf_counter()
                return
            stop.wait(poll_s)
    except Exception as error:  # reported by the caller, which fails the benchmark
        failures.append(error)
