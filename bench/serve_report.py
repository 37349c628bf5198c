"""bench/serve.py's figures: the table, the ratios against their targets, and the same as JSON."""

from __future__ import annotations

import os
import statistics
from dataclasses import dataclass
from typing import Any

from bench.loadgen import Load

PREDICTOR, PREDICTOR_BINARY, MLSERVER, BARE = "predictor", "predictor binary", "mlserver", "bare"
SERVERS = (PREDICTOR, PREDICTOR_BINARY, MLSERVER, BARE)  # binary tensors: the predictor's batches only
# Other processes using more than this many cores during a measurement make its figures suspect.
QUIET_CORES = 0.15


@dataclass(frozen=True)
class Case:
    rows: int
    concurrency: int

    @property
    def name(self) -> str:
        return f"{'single row' if self.rows == 1 else f'{self.rows}-row batch'}, concurrency {self.concurrency}"


@dataclass(frozen=True)
class Run:
    """One wrk run; the cores others on the machine used meanwhile (bench/noise.py); how wrk's connections were
    spread over the server's workers halfway through (bench/sockets.py), most loaded first."""

    load: Load
    others_cores: float
    split: list[int]

    @property
    def split_text(self) -> str:
        return "/".join(map(str, self.split)) or "?"


@dataclass(frozen=True)
class Measured:
    """A case on a server over every round: each figure is the median of the rounds'."""

    runs: list[Run]

    @property
    def requests_per_s(self) -> float:
        return statistics.median(run.load.requests_per_s for run in self.runs)

    @property
    def p50_ms(self) -> float:
        return statistics.median(run.load.p50_ms for run in self.runs)

    @property
    def p99_ms(self) -> float:
        return statistics.median(run.load.p99_ms for run in self.runs)

    @property
    def others_cores(self) -> float:
        return max(run.others_cores for run in self.runs)

    @property
    def splits(self) -> str:
        return " ".join(run.split_text for run in self.runs)


@dataclass(frozen=True)
class InProcess:
    rows_per_s: float
    others_cores: float


@dataclass(frozen=True)
class Results:
    loads: dict[tuple[Case, str], Measured]
    inprocess: InProcess
    visibility_s: list[float]
    replicas: int


@dataclass(frozen=True)
class Verdict:
    """A ratio of the predictor's against its target; `floor` is the same ratio for the bare app, where it has one:
    what the least FastAPI + onnxruntime app reaches, on the same machine in the same run."""

    what: str
    value: float
    target: str
    passed: bool
    floor: float | None = None


def verdicts(results: Results) -> list[Verdict]:
    found = []
    for case in sorted({case for case, _ in results.loads}, key=lambda c: (c.rows, c.concurrency)):
        predictor, mlserver, bare = (results.loads[case, server] for server in (PREDICTOR, MLSERVER, BARE))
        if case.rows == 1:
            found += _single_row_verdicts(case, predictor, mlserver, bare)
            continue
        inprocess = results.inprocess.rows_per_s / case.rows
        ratio, floor = predictor.requests_per_s / inprocess, bare.requests_per_s / inprocess
        found.append(Verdict(f"{case.name}: rows/s / in-process rows/s", ratio, ">= 0.85", ratio >= 0.85, floor))
        binary = results.loads.get((case, PREDICTOR_BINARY))
        if binary is not None:
            ratio = binary.requests_per_s / inprocess
            found.append(Verdict("  the same, binary tensors", ratio, ">= 0.85", ratio >= 0.85))
    worst_ms = max(results.visibility_s) * 1e3
    what = f"deploy visible on all {results.replicas} replicas, worst ms"
    found.append(Verdict(what, worst_ms, "<= 250", worst_ms <= 250))
    return found


def _single_row_verdicts(case: Case, predictor: Measured, mlserver: Measured, bare: Measured) -> list[Verdict]:
    versus_mlserver = predictor.requests_per_s / mlserver.requests_per_s
    p99_ratio = predictor.p99_ms / mlserver.p99_ms
    versus_bare = predictor.requests_per_s / bare.requests_per_s
    floor_rps, floor_p99 = bare.requests_per_s / mlserver.requests_per_s, bare.p99_ms / mlserver.p99_ms
    return [
        Verdict(f"{case.name}: req/s / MLServer's", versus_mlserver, ">= 4", versus_mlserver >= 4, floor_rps),
        Verdict(f"{case.name}: p99 / MLServer's", p99_ratio, "<= 0.25", p99_ratio <= 0.25, floor_p99),
        Verdict(f"{case.name}: req/s / bare app's", versus_bare, ">= 0.90", versus_bare >= 0.90),
    ]


def print_report(results: Results) -> None:
    header = f"{'case':<34} {'server':<16} {'req/s':>9} {'rows/s':>11} {'p50 ms':>8} {'p99 ms':>8} {'others':>7}"
    print(f"\n{header}  connections per worker")
    for (case, server), measured in results.loads.items():
        rps = measured.requests_per_s
        print(
            f"{case.name:<34} {server:<16} {rps:>9,.0f} {rps * case.rows:>11,.0f} {measured.p50_ms:>8.2f}"
            f" {measured.p99_ms:>8.2f} {measured.others_cores:>7.2f}  {measured.splits}"
        )
    inprocess = results.inprocess
    print(f"\nin-process onnxruntime, 1000-row batches, one thread: {inprocess.rows_per_s:,.0f} rows/s")
    print(
        f"deploy -> every replica ({results.replicas}) answers the new version: median "
        f"{statistics.median(results.visibility_s) * 1e3:.0f} ms, max {max(results.visibility_s) * 1e3:.0f} ms"
        f" ({', '.join(f'{s * 1e3:.0f}' for s in results.visibility_s)})"
    )
    print(f"\n{'ratio':<58} {'predictor':>9} {'bare':>6}  target")
    for verdict in verdicts(results):
        word = "PASS" if verdict.passed else "FAIL"
        floor = "" if verdict.floor is None else f"{verdict.floor:.2f}"
        print(f"{verdict.what:<58} {verdict.value:>9.2f} {floor:>6}  {verdict.target:<8} {word}")
    _warn_if_noisy(results)


def _warn_if_noisy(results: Results) -> None:
    worst = max([m.others_cores for m in results.loads.values()] + [results.inprocess.others_cores])
    if worst > QUIET_CORES:
        print(
            f"\nWARNING: other processes on this machine used up to {worst:.2f} cores during the measurements "
            "(column `others`): those figures understate every server; run again on a quiet machine."
        )


def as_json(results: Results) -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "cases": [_case_json(case, server, measured) for (case, server), measured in results.loads.items()],
        "inprocess_onnxruntime_rows_per_s": round(results.inprocess.rows_per_s),
        "deploy_visibility_ms": {
            "replicas": results.replicas,
            "each": [round(s * 1e3, 1) for s in results.visibility_s],
            "median": round(statistics.median(results.visibility_s) * 1e3, 1),
            "max": round(max(results.visibility_s) * 1e3, 1),
        },
        "targets": [
            {
                "what": v.what,
                "predictor": round(v.value, 3),
                "bare": None if v.floor is None else round(v.floor, 3),
                "target": v.target,
                "pass": v.passed,
            }
            for v in verdicts(results)
        ],
    }


def _case_json(case: Case, server: str, measured: Measured) -> dict[str, Any]:
    return {
        "server": server,
        "rows": case.rows,
        "concurrency": case.concurrency,
        "requests_per_s": round(measured.requests_per_s, 1),
        "rows_per_s": round(measured.requests_per_s * case.rows),
        "p50_ms": measured.p50_ms,
        "p99_ms": measured.p99_ms,
        "others_cores": round(measured.others_cores, 2),
        "rounds": [_run_json(run) for run in measured.runs],
    }


def _run_json(run: Run) -> dict[str, Any]:
    load = run.load
    return {
        "requests_per_s": round(load.requests_per_s, 1),
        "p50_ms": load.p50_ms,
        "p90_ms": load.p90_ms,
        "p99_ms": load.p99_ms,
        "max_ms": load.max_ms,
        "requests": load.requests,
        "others_cores": round(run.others_cores, 2),
        "connections_per_worker": run.split,
    }
