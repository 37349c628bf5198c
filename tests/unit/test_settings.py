"""Settings: embedded defaults on a fresh checkout, KILN_ variables override, prod refuses the defaults."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from deploy.local import stack
from shared.errors import ConfigurationError
from shared.settings import Settings, build_settings
from shared.storage import open_object_store


def test_a_fresh_checkout_uses_sqlite_and_a_folder_under_the_data_dir(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    assert settings.resolved_database_url == f"sqlite:///{tmp_path.resolve() / 'kiln.db'}"
    assert settings.resolved_object_store == f"file://{tmp_path.resolve() / 'objects'}"


def test_kiln_variables_override_the_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KILN_DATABASE_URL", "postgresql+psycopg2://kiln@db/kiln")
    monkeypatch.setenv("KILN_OBJECT_STORE", "s3://models")
    monkeypatch.setenv("KILN_PREDICTOR_RECONCILE_S", "5")
    settings = Settings()
    assert settings.resolved_database_url == "postgresql+psycopg2://kiln@db/kiln"
    assert settings.resolved_object_store == "s3://models"
    assert settings.predictor_reconcile_s == 5


@pytest.mark.parametrize("variable", ["DATA_DIR", "LOCAL_STORES_DIR", "TRAINING_SCRIPTS_DIR", "PREDICTOR_METRICS_DIR"])
def test_a_folder_set_empty_is_as_if_unset(monkeypatch: pytest.MonkeyPatch, variable: str) -> None:
    """`KEY=` in an env file: an empty path was read as the working folder, and the secrets were written there."""
    unset = Settings()
    monkeypatch.setenv(f"KILN_{variable}", "")
    assert getattr(Settings(), variable.lower()) == getattr(unset, variable.lower())


def test_an_empty_environment_is_refused_not_taken_for_dev(monkeypatch: pytest.MonkeyPatch) -> None:
    """dev skips prod's checks of the secrets: only folders take an empty value as their default."""
    monkeypatch.setenv("KILN_ENV", "")
    with pytest.raises(ConfigurationError, match=r"^KILN_ENV: "):
        build_settings()


def test_dev_generates_an_admin_token_once_and_reuses_it(tmp_path: Path) -> None:
    first = build_settings(data_dir=tmp_path).admin_token.get_secret_value()
    second = build_settings(data_dir=tmp_path).admin_token.get_secret_value()
    assert len(first) >= 32 and first == second
    assert (tmp_path / "admin_token").stat().st_mode & 0o077 == 0


def test_a_settings_error_names_the_variable_and_never_quotes_a_value(monkeypatch: pytest.MonkeyPatch) -> None:
    """pydantic's own message quotes every setting read, the secret key's characters among them."""
    monkeypatch.delenv("KILN_ADMIN_TOKEN", raising=False)
    monkeypatch.setenv("KILN_ENV", "prod")
    monkeypatch.setenv("KILN_DATABASE_URL", "postgresql+psycopg2://kiln:db-Pa55@db/kiln")
    monkeypatch.setenv("KILN_SECRET_KEY", "q1w2e3r4t5y6u7i8o9p0a1s2d3f4g5h6j7k8l9z0x1c=")
    monkeypatch.setenv("KILN_METRICS_TOKEN", "PSECRETMETRICSTOKEN123")
    monkeypatch.setenv("KILN_SYNC_BATCH_SIZE", "-3")

    with pytest.raises(ConfigurationError) as raised:
        build_settings()

    assert str(raised.value) == "KILN_SYNC_BATCH_SIZE: Input should be greater than 0"
    monkeypatch.delenv("KILN_SYNC_BATCH_SIZE")
    with pytest.raises(ConfigurationError) as raised:
        build_settings()
    assert str(raised.value) == "KILN_ADMIN_TOKEN must be set when KILN_ENV=prod"


def test_prod_refuses_to_start_without_a_real_admin_token_and_database() -> None:
    with pytest.raises(ValidationError, match="KILN_ADMIN_TOKEN"):
        Settings(env="prod", database_url="postgresql+psycopg2://kiln@db/kiln")
    with pytest.raises(ValidationError, match="KILN_DATABASE_URL"):
        Settings(env="prod", admin_token="s3cret")


def test_store_networks_that_are_no_networks_are_refused_naming_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KILN_STORE_NETWORKS", "10.20.0.0/16, 10.0.0.0/33")
    with pytest.raises(ConfigurationError, match=re.escape("KILN_STORE_NETWORKS: '10.0.0.0/33' is not a network")):
        build_settings()


def test_every_path_is_made_absolute_for_processes_started_in_another_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    relative = Settings(
        data_dir=Path("kiln"),
        local_stores_dir=Path("stores"),
        database_url="sqlite:///db/kiln.db",
        object_store="file://objects",
    )
    remote = Settings(database_url="postgresql+psycopg2://kiln@db/kiln", object_store="s3://models")

    env = relative.with_absolute_paths().as_env()

    assert {name: env[name] for name in ("KILN_DATA_DIR", "KILN_LOCAL_STORES_DIR", "KILN_OBJECT_STORE")} == {
        "KILN_DATA_DIR": str(tmp_path / "kiln"),
        "KILN_LOCAL_STORES_DIR": str(tmp_path / "stores"),
        "KILN_OBJECT_STORE": f"file://{tmp_path / 'objects'}",
    }
    assert env["KILN_DATABASE_URL"] == f"sqlite:///{tmp_path / 'db/kiln.db'}"
    assert remote.with_absolute_paths().as_env()["KILN_DATABASE_URL"] == remote.database_url
    assert remote.with_absolute_paths().as_env()["KILN_OBJECT_STORE"] == "s3://models"


def test_kiln_up_hands_the_predictor_its_configured_metrics_folder_made_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The predictor runs in the repository: a relative folder put its workers' metrics there."""
    monkeypatch.chdir(tmp_path)
    settings = Settings(data_dir=tmp_path / "data", predictor_metrics_dir=Path("metrics"))
    assert stack.fresh_metrics_dir(settings) == tmp_path / "metrics"


@pytest.mark.parametrize("folder", ["why?", "hash#tag", "percent%41"])
def test_a_data_dir_whose_path_holds_url_characters_keeps_its_objects_there(tmp_path: Path, folder: str) -> None:
    store = open_object_store(Settings(data_dir=tmp_path / folder))

    store.put_bytes("orgs/acme/note", b"kept")

    assert (tmp_path / folder / "objects" / "orgs" / "acme" / "note").read_bytes() == b"kept"
    assert [path.name for path in tmp_path.iterdir()] == [folder]


@pytest.mark.parametrize("under", ["", "kiln"])
def test_a_data_dir_that_is_a_file_is_refused_naming_the_variable(tmp_path: Path, under: str) -> None:
    in_the_way = tmp_path / "kiln.txt"
    in_the_way.write_text("notes\n")
    with pytest.raises(ConfigurationError, match=r"^KILN_DATA_DIR: .*kiln\.txt.*a file is in the way$"):
        build_settings(data_dir=in_the_way / under)
    assert in_the_way.read_text() == "notes\n"


@pytest.mark.parametrize("value", ["inf", "1e300"])
def test_a_database_timeout_past_a_day_or_not_finite_is_refused_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, value: str
) -> None:
    monkeypatch.setenv("KILN_DATABASE_TIMEOUT_S", value)
    with pytest.raises(ConfigurationError, match=r"^KILN_DATABASE_TIMEOUT_S: "):
        build_settings(data_dir=tmp_path)


@pytest.mark.parametrize(("held", "words"), [(b"garbage\n", "holds no platform key"), (b"\xff\xfe", "is not text")])
def test_a_generated_secret_key_file_altered_since_is_named(tmp_path: Path, held: bytes, words: str) -> None:
    build_settings(data_dir=tmp_path)
    (tmp_path / "secret_key").write_bytes(held)
    with pytest.raises(ConfigurationError, match=f"^{re.escape(str(tmp_path / 'secret_key'))} {words}"):
        build_settings(data_dir=tmp_path)


@pytest.mark.parametrize(
    ("settings", "named"),
    [
        ({"object_store": "s3://Bad_Bucket!"}, "KILN_OBJECT_STORE names no valid bucket"),
        ({"object_store": "s3://models", "s3_endpoint": "http://127.0.0.1:9000"}, "KILN_S3_ENDPOINT: must be host"),
        ({"object_store": "s3://models", "s3_endpoint": "127.0.0.1:notaport"}, "KILN_S3_ENDPOINT: must be host"),
        ({"object_store": "s3://models", "s3_endpoint": "minio:9000/kiln"}, "KILN_S3_ENDPOINT: must be host"),
        ({"object_store": "ftp://models"}, "KILN_OBJECT_STORE: must be file://PATH or s3://BUCKET"),
        ({"redis_url": "127.0.0.1:6379"}, "KILN_REDIS_URL: must be a redis://, rediss:// or unix:// URL"),
    ],
)
def test_an_object_store_setting_the_sdk_refuses_is_named(tmp_path: Path, settings: dict[str, str], named: str) -> None:
    """Those the settings can tell are refused as they are read, before `kiln up` starts a process: they came as a
    traceback from each process as it opened the store."""
    with pytest.raises(ConfigurationError, match=f"^{named}"):
        open_object_store(build_settings(data_dir=tmp_path, **settings))


def test_an_object_folder_that_is_a_file_is_refused_naming_the_variable(tmp_path: Path) -> None:
    (tmp_path / "objects").write_text("notes\n")
    with pytest.raises(ConfigurationError, match=r"^KILN_OBJECT_STORE: .*objects cannot be a folder.*in the way$"):
        open_object_store(build_settings(data_dir=tmp_path, object_store=f"file://{tmp_path / 'objects'}"))


def test_the_readme_names_every_setting_with_its_default() -> None:
    rows = _readme_configuration_rows()
    assert {f"KILN_{name.upper()}" for name in Settings.model_fields} <= {name for names, _ in rows for name in names}
    compared = 0
    for names, defaults in rows:
        if len(defaults) != len(names):
            continue  # a default told in words ("empty", "unset")
        for name, written in zip(names, defaults, strict=True):
            default = Settings.model_fields[name.removeprefix("KILN_").lower()].default
            if written.startswith("$"):
                continue  # generated into the data folder at first start
            if isinstance(default, bool):
                assert written == str(default).lower(), name
            elif isinstance(default, int | float):
                assert float(written) == default, name
            else:
                assert written == str(default), name
            compared += 1
    assert compared > 25


def _readme_configuration_rows() -> list[tuple[list[str], list[str]]]:
    """The README's Configuration table: each row's variables, and the defaults written in code spans."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme[readme.index("\n## Configuration\n") :]
    section = section[: section.index("\n## ", 1)]
    rows = []
    for line in section.splitlines():
        if line.startswith("| `KILN_"):
            variables, defaults = line.strip("|").split("|")[:2]
            rows.append((re.findall(r"`(KILN_\w+)`", variables), re.findall(r"`([^`]*)`", defaults)))
    return rows
