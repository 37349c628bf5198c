"""The TrainingConfig clients send (DESIGN §4), validated the same way by the api and by the trainer."""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator
from pydantic.alias_generators import to_camel


class CamelModel(BaseModel):
    """camelCase on the wire, snake_case in Python; unknown fields, non-finite numbers and text no store or answer
    can hold (unfit_text) are refused."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        allow_inf_nan=False,
        frozen=True,
        strict=True,
    )

    @field_validator("*")
    @classmethod
    def _storable_text(cls, value: Any) -> Any:
        # Runs on every field after its own type is checked: list items, mapping keys and values and the members of
        # union-typed fields too, which no str constraint of pydantic's reaches.
        problem = unfit_text(value)
        if problem is not None:
            raise ValueError(problem)
        return value


def repeated(names: Iterable[str]) -> list[str]:
    """The names given more than once, sorted. Counted once each: a list's count() per name took a request of
    40,000 names 30 s."""
    return sorted(name for name, times in Counter(names).items() if times > 1)


NUL = "\x00"
MAX_NESTING = 32
"""How deep the lists and objects in a field may nest (an org's config is three deep): deeper is refused unwalked."""
_SURROGATE = re.compile("[\ud800-\udfff]")


def unfit_text(value: Any, *, max_nesting: int = MAX_NESTING) -> str | None:
    """Why `value` (text, or lists and mappings of it, keys included) cannot be stored and answered as JSON, or None.

    - a NUL character: PostgreSQL stores none in text or JSONB, and the INSERT failed as a 500;
    - a lone UTF-16 surrogate (a \\ud800-\\udfff escape without its pair): it is no character and UTF-8 has no
      bytes for it, so SQLite stored it and every answer holding it failed as a 500, the audit trail's for good;
    - lists and objects nested deeper than `max_nesting`: walking them (here, merging a config patch) recursively
      exhausted the stack, a RecursionError and a 500 from about 400 levels on.

    The reason says where inside `value` the text is. The walk keeps a stack of its own, so that no nesting the JSON
    parser takes can exhaust Python's.
    """
    pending: list[tuple[Any, int, str]] = [(value, 0, "")]
    while pending:
        item, depth, where = pending.pop()
        if isinstance(item, str):
            problem = _unfit_characters(item)
            if problem is not None:
                return f"{problem} (at {where})" if where else problem
        elif isinstance(item, dict | list | tuple) and depth >= max_nesting:
            return f"must not nest lists and objects more than {max_nesting} deep"
        elif isinstance(item, dict):
            for key, member in item.items():
                named = f"{where}.{_printable(key)}" if where else _printable(key)
                pending.extend([(key, depth + 1, f"the name {named}"), (member, depth + 1, named)])
        elif isinstance(item, list | tuple):
            pending.extend((member, depth + 1, f"{where}[{index}]") for index, member in enumerate(item))
    return None


def _unfit_characters(text: str) -> str | None:
    if NUL in text:
        return f"must not contain the NUL character {NUL!r}"
    if not text.isascii() and _SURROGATE.search(text):
        return "must not contain a lone surrogate (\\ud800 to \\udfff, not half of a pair): it is no character"
    return None


def _printable(key: Any) -> str:
    """A mapping key as a reason may quote it."""
    return str(printable(str(key)))


def printable(value: Any) -> Any:
    """`value` (text, or lists and mappings of it) with each lone surrogate written as its escape (the six characters
    \\ud800), which UTF-8 can carry: for answers quoting what a client sent, or what was stored before such text
    was refused. Other values are returned as they are."""
    if isinstance(value, str):
        return value if value.isascii() else value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, dict):
        return {printable(key): printable(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [printable(item) for item in value]
    return value


def holds_nul(value: Any) -> bool:
    """Whether a NUL character is in the text, or in any key or value of the lists and mappings, it holds (walked
    with a stack of its own, as unfit_text is)."""
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, str) and NUL in item:
            return True
        if isinstance(item, dict):
            pending.extend([*item.keys(), *item.values()])
        elif isinstance(item, list | tuple):
            pending.extend(item)
    return False


def problems(error: ValidationError, *, named: Callable[[str], str] = str) -> str:
    """What is wrong, in one line, each problem naming its field (as `named` spells it). pydantic's own text runs
    over several lines and quotes the input, which may hold secrets."""
    found = []
    for problem in error.errors(include_url=False, include_input=False, include_context=False):
        field = ".".join(str(part) for part in problem["loc"])
        message = problem["msg"].removeprefix("Value error, ")
        found.append(f"{named(field)}: {message}" if field else message)
    return "; ".join(found)


ClassValue = str | int | float | bool
"""A target value as JSON carries it, and so a class of a model."""

CLASS_INTEGERS = (-(2**63), 2**64 - 1)
"""The integers a class can be: a target column's integers are 64 bits, signed or unsigned (a uint64 column trains,
and its classes of 2^63 and more are answered as UINT64), and JSON encoders (orjson) write no larger ones."""
MAX_CLASS_LENGTH = 200
"""The longest text class: a recorded prediction's label (predictions.label) is text of at most 200 characters."""
MAX_COLUMN_NAME_LENGTH = 200
"""The longest target column name: a model version records it (model_versions.target_column) in 200 characters."""


def unfit_class(value: ClassValue | None) -> str | None:
    """Why a class a client names (positiveClass, normalClass) is no class a model can have, or None."""
    if isinstance(value, int) and not isinstance(value, bool) and not CLASS_INTEGERS[0] <= value <= CLASS_INTEGERS[1]:
        return "an integer class is a 64-bit integer of the target column, signed or unsigned (-2^63 to 2^64-1)"
    if isinstance(value, str) and len(value) > MAX_CLASS_LENGTH:
        return f"a text class has at most {MAX_CLASS_LENGTH} characters, as a prediction records it as its label"
    return None


def one_class_value(value: Any, name: str) -> Any:
    """`value` if it is one class value (or None), for a field's mode="before" check: checked before the ClassValue
    union is, which would otherwise name each of its types as a field of its own (`positiveClass.str`, ….int)."""
    if value is None or isinstance(value, str | int) or (isinstance(value, float) and math.isfinite(value)):
        return value
    raise ValueError(f"{name} must be one class value, as the data holds it: a string, number or boolean")


def same_class(value: ClassValue, given: ClassValue) -> bool:
    """Equal as JSON values: Python's True == 1 would match a boolean class to a number, and back."""
    same_kind = isinstance(value, bool) == isinstance(given, bool) and isinstance(value, str) == isinstance(given, str)
    return same_kind and value == given


BINARY_METRICS = ("binary_logloss", "binary_error", "auc")
MULTICLASS_METRICS = ("multi_logloss", "multi_error", "auc_mu")


class Hyperparameters(CamelModel):
    """LightGBM parameters under the names seed clients use; each is range-checked before a run is queued."""

    num_leaves: int = Field(31, ge=2, le=131072)
    learning_rate: float = Field(0.1, gt=0, le=1)
    feature_fraction: float = Field(1.0, gt=0, le=1)
    bagging_fraction: float = Field(1.0, gt=0, le=1)
    bagging_freq: int = Field(0, ge=0, le=1000)
    min_data_in_leaf: int = Field(20, ge=0, le=1_000_000)
    max_depth: int = Field(-1, ge=-1, le=256)
    num_iterations: int = Field(100, ge=1, le=10_000)
    objective: Literal["binary", "multiclass"] = "binary"
    metric: Literal["binary_logloss", "binary_error", "auc", "multi_logloss", "multi_error", "auc_mu"] | None = None
    verbosity: int = Field(-1, ge=-1, le=2)
    early_stopping_rounds: int | None = Field(None, ge=1, le=10_000)
    is_unbalance: bool = False
    scale_pos_weight: float | None = Field(None, gt=0, le=1_000_000)
    lambda_l1: float = Field(0.0, ge=0, le=1_000_000)
    lambda_l2: float = Field(0.0, ge=0, le=1_000_000)
    seed: int | None = Field(None, ge=0, le=2**31 - 1)

    @field_validator("max_depth")
    @classmethod
    def _depth_is_unlimited_or_positive(cls, value: int) -> int:
        if value == 0:
            raise ValueError("maxDepth is -1 (no limit) or at least 1")
        return value

    # The checks across fields sit on the later field of each pair, so that a refusal names it.
    @field_validator("metric")
    @classmethod
    def _metric_goes_with_objective(cls, metric: str | None, info: ValidationInfo) -> str | None:
        objective = info.data.get("objective", "binary")
        allowed = BINARY_METRICS if objective == "binary" else MULTICLASS_METRICS
        if metric is not None and metric not in allowed:
            raise ValueError(
                f"metric {metric!r} does not go with objective {objective!r}: use one of {', '.join(allowed)}"
            )
        return metric

    @field_validator("is_unbalance", "scale_pos_weight")
    @classmethod
    def _reweighing_is_binary_and_single(cls, value: bool | float | None, info: ValidationInfo) -> bool | float | None:
        if value in (None, False):
            return value
        if info.data.get("objective", "binary") != "binary":
            raise ValueError("isUnbalance and scalePosWeight apply to the binary objective only")
        if info.field_name == "scale_pos_weight" and info.data.get("is_unbalance"):
            raise ValueError("isUnbalance and scalePosWeight both reweigh the classes: give one of them")
        return value

    def to_lightgbm(self) -> dict[str, Any]:
        """The same settings under LightGBM's own parameter names; unset options are left to LightGBM."""
        params: dict[str, Any] = {
            "num_leaves": self.num_leaves,
            "learning_rate": self.learning_rate,
            "feature_fraction": self.feature_fraction,
            "bagging_fraction": self.bagging_fraction,
            "bagging_freq": self.bagging_freq,
            "min_data_in_leaf": self.min_data_in_leaf,
            "max_depth": self.max_depth,
            "num_iterations": self.num_iterations,
            "objective": self.objective,
            "metric": self.metric or ("binary_logloss" if self.objective == "binary" else "multi_logloss"),
            "verbosity": self.verbosity,
            "lambda_l1": self.lambda_l1,
            "lambda_l2": self.lambda_l2,
        }
        optional = {
            "early_stopping_round": self.early_stopping_rounds,
            "scale_pos_weight": self.scale_pos_weight,
            "seed": self.seed,
            "is_unbalance": self.is_unbalance or None,
        }
        params.update({name: value for name, value in optional.items() if value is not None})
        return params


ISO_8601_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
"""How an ISO 8601 date or date-time begins: YYYY-MM-DD."""


class DataRange(CamelModel):
    # Not strict, so that ISO 8601 text (JSON's only way to give a date) is parsed; _iso_8601_text keeps the rest of
    # lax parsing out.
    start_date: datetime = Field(strict=False)
    end_date: datetime = Field(strict=False)

    @field_validator("start_date", "end_date", mode="before")
    @classmethod
    def _iso_8601_text(cls, value: Any, info: ValidationInfo) -> Any:
        # Lax parsing read a number, or text of digits ("20240101"), as Unix epoch seconds: another JSON type
        # converted, and a date read as a moment of 1970. Stored configs hold text written by to_wire, so pass.
        if isinstance(value, str) and ISO_8601_DATE.match(value):
            return value
        name = to_camel(info.field_name or "date")
        raise ValueError(
            f'{name} must be an ISO 8601 date or date-time as text, such as "2024-01-01" or "2024-01-01T00:00:00Z"'
        )

    @field_validator("start_date", "end_date")
    @classmethod
    def _as_utc(cls, value: datetime, info: ValidationInfo) -> datetime:
        try:
            return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
        except OverflowError:
            # pydantic turns only ValueError into a validation error; an OverflowError escaped as a 500.
            name = to_camel(info.field_name or "date")
            raise ValueError(f"{name} is outside the years 1 to 9999 in UTC") from None

    @field_validator("end_date")
    @classmethod
    def _end_not_before_start(cls, end: datetime, info: ValidationInfo) -> datetime:
        start = info.data.get("start_date")
        if start is not None and end < start:
            raise ValueError("endDate is before startDate")
        return end


class TrainingConfig(CamelModel):
    data_range: DataRange | None = None
    dataset_id: str | None = None
    hyperparameters: Hyperparameters = Hyperparameters()
    validation_split: float = Field(0.2, gt=0, lt=1)
    target_column: str = Field(min_length=1)
    feature_columns: list[str] = Field(min_length=1)
    positive_class: ClassValue | None = Field(
        None,
        description="binary: the target value score, precision and recall are about (default: the one sorting last)",
    )

    @field_validator("feature_columns")
    @classmethod
    def _features_unique_and_not_the_target(cls, value: list[str], info: ValidationInfo) -> list[str]:
        # Checked here, not as the items' min_length: pydantic's constrained text refuses a lone surrogate as "unable
        # to parse raw data", before _storable_text can say what it is.
        unnamed = [str(index) for index, name in enumerate(value) if not name]
        if unnamed:
            raise ValueError(f"item {unnamed[0]} is empty: a feature is a column of the dataset, and each has a name")
        twice = repeated(value)
        if twice:
            raise ValueError(f"feature columns named more than once: {', '.join(twice)}")
        target = info.data.get("target_column")
        if target in value:
            raise ValueError(f"targetColumn {target!r} is also in featureColumns")
        return value

    @field_validator("positive_class", mode="before")
    @classmethod
    def _one_class_value(cls, value: Any) -> Any:
        return one_class_value(value, "positiveClass")

    @field_validator("positive_class")
    @classmethod
    def _positive_class_is_binary(cls, value: ClassValue | None, info: ValidationInfo) -> ClassValue | None:
        hyperparameters = info.data.get("hyperparameters")
        if value is not None and hyperparameters is not None and hyperparameters.objective != "binary":
            raise ValueError("a positive class applies to the binary objective only")
        return value

    def to_wire(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


class TrainingConfigInput(TrainingConfig):
    """A TrainingConfig as the api takes it (a submission, a schedule). TrainingConfig reads what is stored, which
    may predate these checks: refusing it there would fail a queued run, or every schedule beat fires at once."""

    target_column: str = Field(min_length=1, max_length=MAX_COLUMN_NAME_LENGTH)

    @field_validator("positive_class")
    @classmethod
    def _a_class_a_model_can_have(cls, value: ClassValue | None) -> ClassValue | None:
        problem = unfit_class(value)
        if problem is not None:
            raise ValueError(problem)
        return value


class GateOverrides(CamelModel):
    """An org's own thresholds for the DESIGN §8 gates; unset ones keep the defaults."""

    min_accuracy: float | None = Field(None, ge=0, le=1)
    min_precision: float | None = Field(None, ge=0, le=1)
    min_recall: float | None = Field(None, ge=0, le=1)
    max_model_mb: float | None = Field(None, gt=0)
    max_parity_diff: float | None = Field(None, gt=0, le=1)


LIMIT_MAXIMA = {
    "cpuS": 365 * 24 * 3600,  # a year of CPU time: the longest timeoutS, 7 days, on 52 cores
    "memoryMb": 1_048_576,  # 1 TiB of address space
    "maxFileMb": 1_048_576,  # 1 TiB
    "maxOpenFiles": 1_048_576,  # Linux's default fs.nr_open: no process may open more
    "diskMb": 1_048_576,  # 1 TiB
}
"""The largest per-org limits the api takes. Unbounded, a limit the trainer's setrlimit cannot hold (memoryMb
10^24) was accepted, and every run of the org then failed with an OverflowError."""


class TrainingPolicy(CamelModel):
    """How an org's runs execute: an operator-installed script instead of the built-in one, and the limits.

    As stored: the api takes what TrainingPolicyInput does, whose limits have maxima (LIMIT_MAXIMA)."""

    script_path: str | None = Field(None, description="a script under the workers' KILN_TRAINING_SCRIPTS_DIR")
    timeout_s: float | None = Field(None, gt=0, le=7 * 24 * 3600)
    cpu_s: int | None = Field(None, gt=0)
    memory_mb: int | None = Field(None, gt=0)
    max_file_mb: int | None = Field(None, gt=0)
    max_open_files: int | None = Field(None, ge=16)
    disk_mb: int | None = Field(None, gt=0)

    def limit_overrides(self) -> dict[str, float]:
        """The limits set, each held at its maximum: one stored before the api refused larger ones still runs."""
        limits: dict[str, float] = self.model_dump(by_alias=True, exclude_none=True, exclude={"script_path"})
        return {name: min(value, LIMIT_MAXIMA.get(name, value)) for name, value in limits.items()}


class TrainingPolicyInput(TrainingPolicy):
    """A TrainingPolicy as the api takes it: each limit at most its LIMIT_MAXIMA."""

    cpu_s: int | None = Field(None, gt=0, le=LIMIT_MAXIMA["cpuS"])
    memory_mb: int | None = Field(None, gt=0, le=LIMIT_MAXIMA["memoryMb"])
    max_file_mb: int | None = Field(None, gt=0, le=LIMIT_MAXIMA["maxFileMb"])
    max_open_files: int | None = Field(None, ge=16, le=LIMIT_MAXIMA["maxOpenFiles"])
    disk_mb: int | None = Field(None, gt=0, le=LIMIT_MAXIMA["diskMb"])


class PredictionPolicy(CamelModel):
    """Whether the predictor keeps a record of every answered row, and how it grades risk."""

    record: bool = False
    risk_bands: tuple[float, float] = Field(
        (0.3, 0.7), description="a risk below the first is low, below the second medium, else high", strict=False
    )
    normal_class: ClassValue | None = Field(
        None,
        description="multiclass: the class that means all is well (e.g. 'none'); risk = 1 - its probability. "
        "Without it a multiclass answer has no riskLevel; a binary model's risk is its positive class's probability",
    )

    @field_validator("normal_class", mode="before")
    @classmethod
    def _one_class_value(cls, value: Any) -> Any:
        return one_class_value(value, "normalClass")

    @field_validator("risk_bands")
    @classmethod
    def _ascending_inside_zero_one(cls, bands: tuple[float, float]) -> tuple[float, float]:
        low, high = bands
        if not 0 < low < high < 1:
            raise ValueError("riskBands must be two scores with 0 < low < high < 1")
        return bands


class PredictionPolicyInput(PredictionPolicy):
    """A PredictionPolicy as the api takes it: its normalClass is a class a model can have."""

    @field_validator("normal_class")
    @classmethod
    def _a_class_a_model_can_have(cls, value: ClassValue | None) -> ClassValue | None:
        problem = unfit_class(value)
        if problem is not None:
            raise ValueError(problem)
        return value


class OrgConfig(CamelModel):
    data_residency: Literal["central", "local"] = Field(
        "central", description="local: only workers started for this org (KILN_WORKER_ORGS) take its runs"
    )
    max_concurrent_trainings: int = Field(1, ge=1, le=1000, description="runs at once, across every worker")
    submissions_per_minute: int = Field(60, ge=1, le=100_000, description="training submissions accepted a minute")
    gates: GateOverrides = GateOverrides()
    training: TrainingPolicy = TrainingPolicy()
    predictions: PredictionPolicy = PredictionPolicy()
    retention_days: int = Field(
        2555,
        ge=1,
        le=36_500,
        description="days a synced record is kept after its last change, and a prediction record (medical: 7 years)",
    )


class OrgConfigInput(OrgConfig):
    """An OrgConfig as the api takes it. OrgConfig reads what is stored, which may predate these checks: refusing it
    there would stop the org, and every worker that lists the orgs, rather than one request."""

    training: TrainingPolicyInput = TrainingPolicyInput()
    predictions: PredictionPolicyInput = PredictionPolicyInput()
