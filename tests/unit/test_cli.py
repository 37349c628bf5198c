"""The `kiln` command's refusals that need no server: what the operator reads, and the exit code."""

from __future__ import annotations

from pathlib import Path

import pytest

from deploy.local.cli import main


@pytest.fixture(autouse=True)
def own_data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Embedded defaults in a data dir of the test's own, whatever the environment running the tests sets."""
    for name in ("KILN_DATABASE_URL", "KILN_OBJECT_STORE", "KILN_REDIS_URL", "KILN_ENV"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("KILN_DATA_DIR", str(tmp_path / "kiln"))


def exit_code_of(*args: str) -> int | str | None:
    with pytest.raises(SystemExit) as exited:
        main(list(args))
    return exited.value.code


@pytest.mark.parametrize(
    ("args", "refusal"),
    [
        (["demo", "--rows", "0"], "argument --rows: must be at least 1, not 0"),
        (["demo", "--rows", "-5"], "argument --rows: must be at least 1, not -5"),
        (["demo", "--seed", "-1"], "argument --seed: must be at least 0, not -1"),
        (["up", "--api-port", "70000"], "argument --api-port: a port is 0 to 65535 (0: any free one), not 70000"),
        (["up", "--flower-port", "-1"], "argument --flower-port: a port is 0 to 65535 (0: any free one), not -1"),
        (["down", "--grace", "-1"], "argument --grace: must be at least 0 seconds, not -1"),
        (["down", "--grace", "nan"], "argument --grace: 'nan' is not a number of seconds"),
        (["up", "--timeout", "-0.5"], "argument --timeout: must be at least 0 seconds, not -0.5"),
        (["demo", "--timeout", "inf"], "argument --timeout: 'inf' is not a number of seconds"),
        (["demo", "--grace", "soon"], "argument --grace: 'soon' is not a number of seconds"),
    ],
)
def test_a_number_out_of_range_is_refused_before_anything_starts(
    args: list[str], refusal: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert exit_code_of(*args) == 2
    assert capsys.readouterr().err.splitlines()[-1] == f"kiln {args[0]}: error: {refusal}"
    assert not (tmp_path / "kiln").exists()  # nothing was started, not even the dev secrets made


def test_an_object_store_kiln_cannot_open_is_named_in_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("KILN_OBJECT_STORE", "ftp://objects.example")

    assert exit_code_of("backups", "acme") == 1
    assert (
        capsys.readouterr().err == "kiln backups: KILN_OBJECT_STORE must be file://PATH or s3://BUCKET, not ftp://…\n"
    )
