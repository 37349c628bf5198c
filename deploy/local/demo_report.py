"""How `kiln demo` shows what happened: the run, its metrics and gates, predictions beside the truth, the URLs."""

from __future__ import annotations

from typing import Any

from deploy.local import ai4i
from deploy.local.stack import Stack

METRICS = ("accuracy", "precision", "recall", "auc")
SHOWN_FEATURES = ("rotational_speed", "torque", "tool_wear")


def print_model(run: dict[str, Any], model: dict[str, Any]) -> None:
    print(f"\nrun {run['runId']} {run['status']}: version {run['version']}")
    metrics = model.get("metrics") or {}
    print("  metrics on the held-out split: " + ", ".join(_metric(name, metrics.get(name)) for name in METRICS))
    validation = model.get("validation") or {}
    print(f"  validation gates: {'all passed' if validation.get('passed') else 'FAILED'}")
    for gate in validation.get("gates") or []:
        print("    " + _gate(gate))
    if validation.get("serving"):
        print(_serving(validation["serving"]))


def print_predictions(samples: list[dict[str, Any]], answer: dict[str, Any]) -> None:
    print(f"\npredictions of version {answer['version']} on rows whose outcome is known:")
    header = ("speed rpm", "torque Nm", "wear min", "failed", "failure", "score", "label", "risk")
    print("  " + "  ".join(f"{title:>9}" for title in header))
    for row, prediction in zip(samples, answer["predictions"], strict=True):
        cells = [
            *(f"{row[name]:9.1f}" for name in SHOWN_FEATURES),
            f"{row[ai4i.TARGET]:>9}",
            f"{row['failure_type']:>9}",
            f"{prediction['score']:9.4f}",
            f"{prediction['label']!s:>9}",
            f"{prediction['riskLevel']:>9}",
        ]
        print("  " + "  ".join(cells))


def print_urls(running: Stack) -> None:
    print("\nwhere to look:")
    print(f"  api docs   {running.api}/docs")
    print(f"  predictor  {running.predictor}/v2/health/ready")
    print(f"  flower     {running.flower}  (user {running.flower_user}, password {running.flower_password})")


def _metric(name: str, value: object) -> str:
    return f"{name} {value:.3f}" if isinstance(value, float) else f"{name} {value}"


def _gate(gate: dict[str, Any]) -> str:
    verdict = "PASS" if gate.get("passed") else "FAIL"
    value, threshold = _number(gate.get("value")), _number(gate.get("threshold"))
    return f"{verdict}  {gate.get('name', '?'):<14} {value:>10}   threshold {threshold}"


def _serving(serving: dict[str, Any]) -> str:
    return (
        f"  serving cost: single row p50 {_number(serving.get('latency_p50_ms'))} ms, "
        f"p99 {_number(serving.get('latency_p99_ms'))} ms; {_number(serving.get('batch_rows_per_s'))} rows/s in batches"
    )


def _number(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
