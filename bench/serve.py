"""What serving through Kiln costs: the predictor against MLServer and against a bare FastAPI + onnxruntime app.

    .venv/bin/python bench/serve.py [--rounds 3] [--json figures.json]      (or `make bench`)

One model, made by the platform (bench/tenant.py: 100k AI4I-rule rows, 100 trees of 31 leaves, deployed through
the api), served in the same run on 127.0.0.1 by:

- predictor: the stack's predictor as production runs it (uvicorn --factory, 2 workers, org key auth, V2 infer);
- mlserver:  MLServer 1.7.1 + mlserver-lightgbm on the same version's model.txt, over the same V2 JSON protocol,
             at its best (parallel inference workers off, OMP_NUM_THREADS=1, no access log, metrics or gzip);
- bare:      bench/bare_app.py, FastAPI with one onnxruntime session and nothing else, 2 workers: the floor.

Each is driven by wrk (bench/wrk/post.lua, `-t min(C, 2) -c C --latency`) with the same JSON body: single rows at
concurrency 1, 8 and 32, and 1000-row batches at 1 and 8; a short warm-up run precedes every measured one, and a
single failed request fails the benchmark. Before any load, the three must give the same probabilities. With
`--rounds N` every case is measured N times, servers interleaved, and each figure is the median of its N.

The machine is shared: before each measured run the bench waits (up to `--quiet-wait` s) for other processes to
leave the CPU, and the `others` column says how many cores others (or the hypervisor) took during the run
(bench/noise.py). Figures with `others` above 0.15 are flagged: they understate every server.

Also measured: rows/s of onnxruntime in this process on the same 1000-row batch, with the predictor's session
options (one thread, sequential), and the time from a deploy call's response until every predictor replica (two
processes x two workers) answers the new version (bench/replicas.py), over several deploys alternating two versions.
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np

from bench import bodies, loadgen, noise, replicas, servers, sockets, tenant
from bench.bare_app import open_session
from bench.serve_report import (
    BARE,
    MLSERVER,
    PREDICTOR,
    PREDICTOR_BINARY,
    QUIET_CORES,
    SERVERS,
    Case,
    InProcess,
    Measured,
    Results,
    Run,
    as_json,
    print_report,
)
from deploy.local import ai4i, stack
from shared.settings import build_settings

SETTLE_S = 0.5  # between two deploys, so that each starts from a quiet predictor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=8, help="seconds of load per measured run")
    parser.add_argument("--warmup", type=int, default=2, help="seconds of load before each measured run")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32], help="single-row concurrencies")
    parser.add_argument("--batch-concurrency", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--batch-rows", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=1, help="measure every case this many times; report medians")
    parser.add_argument("--deploys", type=int, default=10)
    parser.add_argument("--poll-ms", type=float, default=5.0, help="how often each replica is asked its version")
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=20.0,
        help="before each measured run, wait up to this many seconds for other processes to leave the CPU",
    )
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args()
    # SIGTERM (a CI timeout, `kill`) unwinds like Ctrl-C, so that every process this started is stopped.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    loadgen.require_wrk()
    servers.ensure_mlserver_venv()
    results = run(args)
    print_report(results)
    if args.json:
        args.json.write_text(json.dumps(as_json(results), indent=2) + "\n")
        print(f"\nfigures written to {args.json}")


@dataclass(frozen=True)
class Started:
    """The servers under test: where to send each its load, where each listens (process group, port), the
    predictor processes, and the process groups whose CPU is ours."""

    targets: dict[str, loadgen.Target]
    listeners: dict[str, tuple[int, int]]
    predictors: list[replicas.Predictor]
    groups: set[int]


def run(args: argparse.Namespace) -> Results:
    with tempfile.TemporaryDirectory(prefix="kiln-bench-serve-") as name:
        folder = Path(name)
        settings = build_settings(data_dir=folder / "kiln")
        print("starting the stack, training two versions ...", flush=True)
        running = stack.start(settings, ports={"api": 0, "predictor": 0, "flower": 0}, timeout_s=180, grace_s=5)
        try:
            made = tenant.prepare(running, settings, folder)
            with servers.Processes(folder / "logs", grace_s=5) as processes:
                started = start_servers(running, made, processes, folder)
                return measure(args, running, made, started, folder)
        finally:
            stack.stop(settings.data_dir, grace_s=5)


def start_servers(running: stack.Stack, made: tenant.Tenant, processes: servers.Processes, folder: Path) -> Started:
    print("starting MLServer, the bare app and a second predictor ...", flush=True)
    stack_predictor = servers.Launched.of(running.pids["predictor"])
    second_url, second_pid = servers.start_predictor(processes, stack_predictor, "predictor2")
    mlserver_url = servers.start_mlserver(processes, made.model_txt, folder / "mlserver")
    bare_url = servers.start_bare(processes, stack_predictor, made.model_onnx)
    key = {"Authorization": f"Bearer {made.key}"}
    predictor = (running.pids["predictor"], _port(running.predictor))
    return Started(
        targets={
            PREDICTOR: loadgen.Target(f"{running.predictor}/v2/models/{made.org}/infer", key),
            MLSERVER: loadgen.Target(f"{mlserver_url}/v2/models/{servers.MLSERVER_MODEL}/infer"),
            BARE: loadgen.Target(f"{bare_url}/v2/models/{made.org}/infer"),
        },
        listeners={
            PREDICTOR: predictor,
            PREDICTOR_BINARY: predictor,
            MLSERVER: (processes.started["mlserver"].pid, _port(mlserver_url)),
            BARE: (processes.started["bare"].pid, _port(bare_url)),
        },
        predictors=[
            replicas.Predictor(running.predictor, running.pids["predictor"], stack_predictor.workers),
            replicas.Predictor(second_url, second_pid, stack_predictor.workers),
        ],
        groups={*running.pids.values(), *(process.pid for process in processes.started.values())},
    )


def measure(
    args: argparse.Namespace, running: stack.Stack, made: tenant.Tenant, started: Started, folder: Path
) -> Results:
    batch = bodies.rows(args.batch_rows)
    requests = _requests(started, batch, folder)
    answers = {
        server: bodies.positive_scores(target.url, target.headers, body)
        for (server, size), (target, body) in requests.items()
        if size == len(batch)
    }
    bodies.check_same_answers(answers, reference=PREDICTOR)
    cases = [Case(1, c) for c in args.concurrency] + [Case(args.batch_rows, c) for c in args.batch_concurrency]
    keys = [(case, server) for case in cases for server in SERVERS if (server, case.rows) in requests]
    runs: dict[tuple[Case, str], list[Run]] = {key: [] for key in keys}
    for round_number in range(1, args.rounds + 1):
        print(f"round {round_number} of {args.rounds}", flush=True)
        for case, server in keys:
            target, body = requests[server, case.rows]
            runs[case, server].append(_measure_case(started, server, case, target, body, args))
    loads = {key: Measured(measured) for key, measured in runs.items()}
    noise.wait_for_quiet(started.groups, threshold_cores=QUIET_CORES, max_wait_s=args.quiet_wait)
    with noise.watch(started.groups) as others:
        inprocess = inprocess_rows_per_s(made.model_onnx, batch)
    print(f"  in-process onnxruntime {inprocess:,.0f} rows/s  (others: {others.cores:.2f} cores)", flush=True)
    visibility = deploy_visibility(running, made, started.predictors, batch[0], args)
    replica_count = sum(predictor.workers for predictor in started.predictors)
    return Results(loads, InProcess(inprocess, others.cores), visibility, replica_count)


def _requests(started: Started, batch: np.ndarray, folder: Path) -> dict[tuple[str, int], tuple[loadgen.Target, Path]]:
    """(target, body) by (server, rows): JSON for every server and size, binary tensors for the predictor's batch."""
    requests = {}
    for size, features in ((1, batch[:1]), (len(batch), batch)):
        body = bodies.write_json(folder / f"rows-{size}.json", features)
        requests.update({(server, size): (target, body) for server, target in started.targets.items()})
    binary, header_length = bodies.write_binary(folder / f"rows-{len(batch)}.bin", batch)
    headers = {
        **started.targets[PREDICTOR].headers,
        "Content-Type": "application/octet-stream",
        bodies.HEADER_LENGTH: str(header_length),
    }
    requests[PREDICTOR_BINARY, len(batch)] = (loadgen.Target(started.targets[PREDICTOR].url, headers), binary)
    return requests


def _measure_case(
    started: Started, server: str, case: Case, target: loadgen.Target, body: Path, args: argparse.Namespace
) -> Run:
    loadgen.run(target, body, connections=case.concurrency, duration_s=args.warmup)
    noise.wait_for_quiet(started.groups, threshold_cores=QUIET_CORES, max_wait_s=args.quiet_wait)
    split: list[int] = []
    sampler = threading.Timer(
        args.duration / 2, lambda: split.extend(sockets.connections_per_worker(*started.listeners[server]))
    )
    with noise.watch(started.groups) as others:
        sampler.start()
        try:
            load = loadgen.run(target, body, connections=case.concurrency, duration_s=args.duration)
        finally:
            sampler.cancel()
            sampler.join()
    result = Run(load, others.cores, split)
    print(
        f"  {case.name:<34} {server:<16} {load.requests_per_s:>9,.0f} req/s  p50 {load.p50_ms:6.2f} ms"
        f"  p99 {load.p99_ms:6.2f} ms  connections per worker {result.split_text}  others {others.cores:.2f} cores",
        flush=True,
    )
    return result


def _port(url: str) -> int:
    return int(url.rpartition(":")[2])


def inprocess_rows_per_s(model_onnx: Path, batch: np.ndarray, seconds: float = 5.0, rounds: int = 5) -> float:
    """Median rows/s over `rounds` stretches of running the batch back to back, after a warm-up."""
    session = open_session(str(model_onnx))
    for _ in range(20):
        session.run(["probabilities"], {"input": batch})
    rates = []
    for _ in range(rounds):
        started, done = time.perf_counter(), 0
        while time.perf_counter() - started < seconds / rounds:
            session.run(["probabilities"], {"input": batch})
            done += len(batch)
        rates.append(done / (time.perf_counter() - started))
    return statistics.median(rates)


def deploy_visibility(
    running: stack.Stack,
    made: tenant.Tenant,
    predictors: list[replicas.Predictor],
    row: np.ndarray,
    args: argparse.Namespace,
) -> list[float]:
    """Seconds from each deploy's response to every replica serving it, deploys alternating the two versions."""
    named = {name: round(float(value), 1) for name, value in zip(ai4i.FEATURES, row, strict=True)}
    probes = [probe for predictor in predictors for probe in replicas.probes_for(predictor, made.org, made.key, named)]
    try:
        serving = {probe.version() for probe in probes}
        if serving != {made.versions[0]}:
            raise RuntimeError(f"before the first deploy the replicas serve {serving}, not {made.versions[0]}")
        with httpx.Client(base_url=running.api, headers={"Authorization": f"Bearer {made.key}"}, timeout=30) as api:
            return [
                _one_deploy(api, made, probes, made.versions[(index + 1) % 2], args) for index in range(args.deploys)
            ]
    finally:
        for probe in probes:
            probe.close()


def _one_deploy(
    api: httpx.Client, made: tenant.Tenant, probes: list[replicas.Probe], version: str, args: argparse.Namespace
) -> float:
    time.sleep(SETTLE_S)
    seconds = replicas.time_to_every_replica(api, made.org, version, probes, poll_s=args.poll_ms / 1e3, timeout_s=30)
    print(f"  deploy {version}: every replica serves it {seconds * 1e3:.0f} ms after the response", flush=True)
    return seconds


if __name__ == "__main__":
    main()
