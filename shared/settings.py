"""Kiln's one configuration object, read from KILN_* variables once per process and passed down."""

from __future__ import annotations

import base64
import ipaddress
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from shared.crypto import platform_key
from shared.db.session import DATABASE_TIMEOUT_S
from shared.errors import ConfigurationError
from shared.schemas import problems

# The database drivers Kiln ships: `postgresql://` gets psycopg2 too (shared.db.session, with_shipped_driver).
SHIPPED_DRIVERS = frozenset({"postgresql", "postgresql+psycopg2", "sqlite", "sqlite+pysqlite"})
FILE_STORE = "file://"


class Settings(BaseSettings):
    """Every knob of every Kiln process. Defaults are the embedded ones, so a fresh checkout runs as is."""

    model_config = SettingsConfigDict(env_prefix="KILN_", extra="ignore", allow_inf_nan=False)

    env: Literal["dev", "prod"] = Field("dev", description="prod refuses embedded defaults for secrets.")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="Level of Kiln's own logs.")
    data_dir: Path = Field(Path(".kiln"), description="Where the embedded stack keeps its files.")
    database_url: str = Field("", description="SQLAlchemy URL; empty means a SQLite file under data_dir.")
    database_timeout_s: float = Field(
        DATABASE_TIMEOUT_S,
        ge=1,
        le=86_400,
        description="How long a process waits on a PostgreSQL server that stops answering: every process, for a peer "
        "that stops acknowledging; the api, the predictor, the trainer and the beats, for any answer (their "
        "statements are all short). Sync workers and migrations, whose statements may rightly run long, wait on a "
        "server that still acknowledges. An org's own databases: every wait of a training extraction; a sync "
        "store's, once its server answers no new connection either.",
    )
    redis_url: str = Field("redis://127.0.0.1:6379/0", description="Broker, pub/sub and caches.")
    object_store: str = Field("", description="file://PATH or s3://BUCKET; empty means data_dir/objects.")
    s3_endpoint: str = Field("127.0.0.1:9000", description="host:port of the S3 server (MinIO).")
    s3_access_key: str = ""
    s3_secret_key: SecretStr = SecretStr("")
    s3_secure: bool = Field(False, description="Use HTTPS to reach the S3 server.")
    s3_region: str = "us-east-1"
    admin_token: SecretStr = Field(SecretStr(""), description="Manages orgs; generated in dev when unset.")
    secret_key: SecretStr = Field(
        SecretStr(""), description="Base64 of 32 bytes that encrypt stored secrets; generated in dev when unset."
    )
    secret_key_retired: SecretStr = Field(
        SecretStr(""),
        description="Comma-separated keys KILN_SECRET_KEY replaced (base64 of 32 bytes each): what is stored under "
        "them still opens, until `kiln secrets rewrap` has moved it under KILN_SECRET_KEY.",
    )
    deploy_channel: str = Field("kiln:deployments", description="Redis pub/sub channel of deploy events.")
    max_upload_mb: int = Field(512, gt=0, description="Largest dataset upload accepted by the api.")
    max_dataset_mb: int = Field(
        2048, gt=0, description="Largest dataset the api accepts, as its columns take in memory once read."
    )
    outbox_interval_s: float = Field(1.0, gt=0, description="How often the api republishes pending events.")
    run_lease_s: float = Field(30.0, gt=0, description="How long a worker holds a run without renewing it.")
    run_max_attempts: int = Field(3, ge=1, description="Attempts of a run: the first and its automatic retries.")
    run_retry_backoff_s: float = Field(5.0, ge=0, description="Wait before the first retry; doubled each time.")
    worker_orgs: str = Field(
        "", description="Comma-separated orgs a worker is for; empty: every org that keeps no data on its premises."
    )
    beat_tick_s: float = Field(5.0, gt=0, description="How often beat looks for schedules that are due.")
    flower_user: str = Field("kiln", description="Flower's basic-auth user.")
    flower_password: SecretStr = Field(SecretStr(""), description="Flower's basic-auth password; generated in dev.")
    training_scripts_dir: Path = Field(
        Path("/etc/kiln/scripts"), description="The only folder an org's own training script may live in."
    )
    training_timeout_s: float = Field(3600.0, gt=0, description="Wall-clock limit of a training script.")
    training_cpu_s: int = Field(14400, gt=0, description="CPU-time limit of a training script.")
    training_memory_mb: int = Field(8192, gt=0, description="Address-space limit of a training script.")
    training_max_file_mb: int = Field(4096, gt=0, description="Largest file a training script may write.")
    training_max_open_files: int = Field(1024, gt=0, description="Open files a training script may hold.")
    training_disk_mb: int = Field(
        10240,
        gt=0,
        description="What a training script may write in its workspace, all files together (RLIMIT_FSIZE caps each "
        "one): measured while it runs, which stops it past this.",
    )
    training_network: Literal["none", "host"] = Field(
        "none",
        description="none: a training script runs in a network namespace of its own and reaches nothing; "
        "host: it shares the machine's network.",
    )
    training_filesystem: Literal["private", "host"] = Field(
        "private",
        description="private: a training script reads only the system's libraries, Python, Kiln's code and its own "
        "folder, and writes only in its workspace (Landlock); host: it reaches what the worker's user can.",
    )
    local_stores_dir: Path | None = Field(
        None,
        description="The folder of the orgs' SQLite files (data sources and sync stores), one sub-folder per org: "
        "an org's SQLite URL must name an existing file in <dir>/<org>/. Unset: data_dir/stores.",
    )
    store_networks: str = Field(
        "",
        description="Comma-separated networks (CIDR, 10.20.0.0/16) and host names an org's database server (data "
        "source, sync store) may be on; empty: anywhere, this machine included.",
    )
    sync_batch_size: int = Field(2000, gt=0, le=100_000, description="Records a sync job moves per transaction.")
    sync_purge_interval_s: float = Field(
        3600.0, gt=0, description="How often the sync beat purges synced records past their org's retention."
    )
    predictor_reconcile_s: float = Field(30.0, gt=0, description="Predictor's sweep of the deployments table.")
    predictor_key_cache_s: float = Field(30.0, ge=0, description="How long the predictor trusts a key lookup.")
    predictor_load_wait_s: float = Field(
        30.0,
        gt=0,
        description="How long a request waits for its org's model to load before a 503 (the load goes on), and a "
        "predictor starting waits for the deployed models before it is ready.",
    )
    predictor_memory_mb: float = Field(1024.0, gt=0, description="Budget of loaded models per predictor process.")
    predictor_record_flush_s: float = Field(1.0, gt=0, description="How often prediction records are written.")
    predictor_max_body_mb: float = Field(32.0, gt=0, description="Largest inference request body.")
    predictor_metrics_dir: Path | None = Field(
        None,
        description="A folder of the predictor's own, empty at its start, where its worker processes share their "
        "metrics; unset, /metrics shows the answering process's only.",
    )
    predictor_metrics_flush_s: float = Field(1.0, gt=0, description="How often a predictor worker shares its metrics.")
    metrics_token: SecretStr = Field(
        SecretStr(""),
        description="A bearer token that reads the api's and the predictor's /metrics and nothing else (Prometheus); "
        "unset, only the admin token does.",
    )

    @field_validator("store_networks")
    @classmethod
    def _networks_are_networks(cls, value: str) -> str:
        for entry in network_entries(value):
            if "/" in entry:
                try:
                    ipaddress.ip_network(entry)
                except ValueError:
                    raise ValueError(f"{entry!r} is not a network such as 10.20.0.0/16") from None
        return value

    @field_validator("data_dir", "training_scripts_dir", "local_stores_dir", "predictor_metrics_dir", mode="before")
    @classmethod
    def _empty_path_is_unset(cls, value: object, info: ValidationInfo) -> object:
        """A folder set empty (`KEY=` in an env file, compose's ${VAR:-}) is its default: read as a path, it was the
        working folder, and the data dir's secrets, the orgs' stores or the scripts folder went there. Only paths:
        an empty KILN_S3_REGION, say, means something (the bucket's own region)."""
        if value == "" and info.field_name is not None:
            return cls.model_fields[info.field_name].default
        return value

    @field_validator("object_store")
    @classmethod
    def _a_store_kiln_opens(cls, value: str) -> str:
        if value and not (value.startswith("file://") or (value.startswith("s3://") and len(value) > len("s3://"))):
            raise ValueError("must be file://PATH or s3://BUCKET")
        return value

    @field_validator("s3_endpoint")
    @classmethod
    def _a_host_and_port(cls, value: str) -> str:
        """The minio SDK's own check, made when a process opens the store, came as a traceback after the stack had
        started: a URL (http://minio:9000) is the usual slip."""
        refusal = ValueError("must be host[:port], such as minio:9000, with no scheme or path")
        parsed = urlsplit(f"//{value}")
        try:
            parsed.port  # noqa: B018 (reading it checks it)
        except ValueError:
            raise refusal from None
        if not parsed.hostname or parsed.path or parsed.query or parsed.fragment or "@" in value:
            raise refusal
        return value

    @field_validator("redis_url")
    @classmethod
    def _a_redis_url(cls, value: str) -> str:
        if not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must be a redis://, rediss:// or unix:// URL")
        return value

    @field_validator("secret_key")
    @classmethod
    def _a_platform_key(cls, value: SecretStr) -> SecretStr:
        if value.get_secret_value():  # empty: generated in dev, refused in prod
            platform_key(value.get_secret_value())
        return value

    @field_validator("secret_key_retired")
    @classmethod
    def _platform_keys(cls, value: SecretStr) -> SecretStr:
        for number, key in enumerate(_comma_separated(value.get_secret_value()), start=1):
            platform_key(key, variable=f"key {number}")
        return value

    @property
    def retired_secret_keys(self) -> tuple[str, ...]:
        return _comma_separated(self.secret_key_retired.get_secret_value())

    @property
    def store_network_entries(self) -> tuple[str, ...]:
        return network_entries(self.store_networks)

    @field_validator("database_url")
    @classmethod
    def _a_database_kiln_can_open(cls, url: str) -> str:
        """Checked here, once, rather than failing in each process as it connects (with a traceback naming a
        driver module); the value itself is never quoted, as it may hold a password."""
        if not url:
            return url
        try:
            driver = make_url(url).drivername
        except (ArgumentError, ValueError):
            raise ValueError(
                "is not a database URL such as postgresql+psycopg2://user:password@host:5432/kiln (the port a number, "
                "and any of @ : / ? # in the password %-quoted)"
            ) from None
        if driver not in SHIPPED_DRIVERS:
            raise ValueError(
                f"Kiln runs on PostgreSQL (postgresql+psycopg2://) or SQLite (sqlite:///PATH), not {driver}"
            )
        if _is_in_memory_sqlite(url):  # migrated in one connection, gone with it: every other process finds no tables
            raise ValueError(
                "names an in-memory SQLite database, private to the connection that opens it, while every Kiln "
                "process shares one database: name a file, sqlite:///PATH"
            )
        return url

    @model_validator(mode="after")
    def _refuse_embedded_secrets_in_prod(self) -> Settings:
        if self.env == "prod":
            if not self.admin_token.get_secret_value():
                raise ValueError("KILN_ADMIN_TOKEN must be set when KILN_ENV=prod")
            if not self.database_url:
                raise ValueError("KILN_DATABASE_URL must be set when KILN_ENV=prod")
            if not self.secret_key.get_secret_value():
                raise ValueError("KILN_SECRET_KEY must be set when KILN_ENV=prod")
            if not self.flower_password.get_secret_value():
                raise ValueError("KILN_FLOWER_PASSWORD must be set when KILN_ENV=prod")
        return self

    @model_validator(mode="after")
    def _current_key_is_not_retired(self) -> Settings:
        if self.secret_key.get_secret_value() in self.retired_secret_keys:
            raise ValueError("KILN_SECRET_KEY_RETIRED holds KILN_SECRET_KEY itself: list only the keys it replaced")
        return self

    def with_absolute_paths(self) -> Settings:
        """These settings with every path in them absolute, against the current folder: a process started in
        another folder (the stack's children run in the repository) then finds the same files."""
        update: dict[str, object] = {name: value.resolve() for name, value in self if isinstance(value, Path)}
        if self.database_url:
            update["database_url"] = _absolute_sqlite_url(self.database_url)
        if self.object_store.startswith(FILE_STORE):
            update["object_store"] = FILE_STORE + str(Path(self.object_store.removeprefix(FILE_STORE)).resolve())
        return self.model_copy(update=update)

    def as_env(self) -> dict[str, str]:
        """The explicitly chosen settings as KILN_* variables, for starting child processes with the same ones."""
        return {f"KILN_{name.upper()}": _env_value(getattr(self, name)) for name in sorted(self.model_fields_set)}

    @property
    def worker_org_ids(self) -> frozenset[str]:
        return frozenset(org.strip() for org in self.worker_orgs.split(",") if org.strip())

    @property
    def resolved_database_url(self) -> str:
        """KILN_DATABASE_URL, or the embedded file's URL: its path quoted, so that a ? # or % in it is the file's
        name, not the URL's query, fragment or an escape."""
        if self.database_url:
            return self.database_url
        embedded = URL.create("sqlite", database=str((self.data_dir / "kiln.db").resolve()))
        return embedded.render_as_string(hide_password=False)

    @property
    def resolved_local_stores_dir(self) -> Path:
        return (self.local_stores_dir or self.data_dir / "stores").resolve()

    @property
    def resolved_object_store(self) -> str:
        return self.object_store or f"{FILE_STORE}{(self.data_dir / 'objects').resolve()}"


def _is_in_memory_sqlite(url: str) -> bool:
    """Whether a database URL names an in-memory SQLite database: no file, `:memory:`, or a URI filename asking
    for memory."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return False
    database = str(parsed.database or "")
    return database in {"", ":memory:"} or database.startswith("file::memory:") or parsed.query.get("mode") == "memory"


def _absolute_sqlite_url(url: str) -> str:
    """A SQLite URL naming its file by an absolute path; any other URL as it is."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in {None, "", ":memory:"} or parsed.query:
        return url  # no file, or a URI filename (?uri=true): left to SQLite
    return parsed.set(database=str(Path(str(parsed.database)).resolve())).render_as_string(hide_password=False)


def _env_value(value: object) -> str:
    if isinstance(value, SecretStr):
        return value.get_secret_value()
    return str(value).lower() if isinstance(value, bool) else str(value)


def build_settings(**overrides: object) -> Settings:
    """Read the environment once; in dev, a missing admin token or secret key is generated into data_dir."""
    try:
        settings = Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as error:
        raise ConfigurationError(settings_problems(error)) from None
    generated = {
        name: SecretStr(_dev_secret(settings.data_dir, name, make))
        for name, make in (("admin_token", _new_token), ("secret_key", _new_key), ("flower_password", _new_token))
        if not getattr(settings, name).get_secret_value()
    }
    if "secret_key" in generated:
        _check_generated_key(settings.data_dir / "secret_key", generated["secret_key"])
    return settings.model_copy(update=generated) if generated else settings


def settings_for(process: str) -> Settings:
    """A service process's settings; if they are wrong, its exit, with one line naming the variable. SystemExit goes
    through what would have caught a ConfigurationError: Celery's signal dispatch (the beats then ran on Celery's
    defaults, saying nothing) and uvicorn's loading of the app's factory (a 40-line traceback)."""
    try:
        return build_settings()
    except ConfigurationError as error:
        raise SystemExit(f"{process}: {error.message}") from None


def _check_generated_key(path: Path, key: SecretStr) -> None:
    """A key file altered since it was made: named, rather than failing the first secret sealed or opened."""
    try:
        platform_key(key.get_secret_value())
    except ValueError as error:
        raise ConfigurationError(f"{path} holds no platform key ({error}): put back the key it held") from None


def _comma_separated(setting: str) -> tuple[str, ...]:
    return tuple(entry.strip() for entry in setting.split(",") if entry.strip())


def network_entries(setting: str) -> tuple[str, ...]:
    """KILN_STORE_NETWORKS as its entries: networks and host names, lower case."""
    return tuple(entry.strip().lower() for entry in setting.split(",") if entry.strip())


def settings_problems(error: ValidationError) -> str:
    """What is wrong with the settings, each problem naming its variable, never quoting a setting read."""
    return problems(error, named=lambda field: f"KILN_{field.upper()}")


def _new_token() -> str:
    return secrets.token_urlsafe(32)


def _new_key() -> str:
    return base64.b64encode(secrets.token_bytes(32)).decode()


def make_private_folder(path: Path) -> None:
    """A folder of Kiln's own files (secrets, the embedded database, objects) that only its owner can enter."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as error:
        raise _unusable_data_dir(path, error) from None


def _dev_secret(data_dir: Path, name: str, make: Callable[[], str]) -> str:
    """The secret kept in data_dir/name, made on first use, readable by its owner only."""
    path = data_dir / name
    make_private_folder(data_dir)
    try:
        if path.exists():
            return path.read_text().strip()
        value = make()
        path.write_text(value + "\n")
        path.chmod(0o600)
    except OSError as error:
        raise _unusable_data_dir(path, error) from None
    except UnicodeDecodeError:
        raise ConfigurationError(f"{path} is not text, so it holds no {name}: put back what it held") from None
    return value


def _unusable_data_dir(path: Path, error: OSError) -> ConfigurationError:
    reason = "a file is in the way" if isinstance(error, FileExistsError | NotADirectoryError) else error.strerror
    return ConfigurationError(f"KILN_DATA_DIR: Kiln cannot keep its files at {path}: {reason}")
