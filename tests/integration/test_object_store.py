"""The ObjectStore contract, held by both backends: S3 through the minio SDK (SeaweedFS here) and a local folder."""

from __future__ import annotations

import fcntl
import hashlib
import secrets
import time
from pathlib import Path

import pytest
from minio import Minio
from pydantic import SecretStr

from shared.errors import ArtifactIntegrityError, NotFound, Stopped, TransientError
from shared.settings import Settings
from shared.storage import LocalObjectStore, ObjectStore, S3ObjectStore, get_verified_bytes, open_object_store
from tests.support.proxy import FreezableLink
from tests.support.servers import S3Server, free_port


@pytest.fixture(params=["s3", "local"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ObjectStore:
    if request.param == "local":
        return open_object_store(Settings(object_store=f"file://{tmp_path / 'objects'}"))
    server: S3Server = request.getfixturevalue("s3_server")
    settings = Settings(
        object_store="s3://kiln-" + secrets.token_hex(4),
        s3_endpoint=server.endpoint,
        s3_access_key=server.access_key,
        s3_secret_key=SecretStr(server.secret_key),
    )
    return open_object_store(settings)


def test_the_url_picks_the_backend(store: ObjectStore, request: pytest.FixtureRequest) -> None:
    expected = S3ObjectStore if "s3" in request.node.callspec.id else LocalObjectStore
    assert isinstance(store, expected)


def test_bytes_and_files_round_trip(store: ObjectStore, tmp_path: Path) -> None:
    store.put_bytes("orgs/a/models/v1/metrics.json", b'{"accuracy": 0.9}')
    source = tmp_path / "model.onnx"
    source.write_bytes(b"\x08\x01" * 1000)
    store.put_file("orgs/a/models/v1/model.onnx", source)
    assert store.get_bytes("orgs/a/models/v1/metrics.json") == b'{"accuracy": 0.9}'
    target = tmp_path / "copy.onnx"
    store.get_file("orgs/a/models/v1/model.onnx", target)
    assert target.read_bytes() == source.read_bytes()


def test_list_exists_and_delete(store: ObjectStore) -> None:
    for name in ("orgs/a/x.json", "orgs/a/y/z.json", "orgs/ab/other.json"):
        store.put_bytes(name, b"{}")
    assert store.list("orgs/a/") == ["orgs/a/x.json", "orgs/a/y/z.json"]
    assert store.exists("orgs/a/x.json") and not store.exists("orgs/a/missing.json")
    store.delete("orgs/a/x.json")
    assert store.list("orgs/a/") == ["orgs/a/y/z.json"]


def test_a_missing_object_is_not_found(store: ObjectStore, tmp_path: Path) -> None:
    with pytest.raises(NotFound):
        store.get_bytes("orgs/a/nothing")
    with pytest.raises(NotFound):
        store.get_file("orgs/a/nothing", tmp_path / "nothing")


def test_a_verified_read_refuses_bytes_whose_digest_changed(store: ObjectStore) -> None:
    store.put_bytes("orgs/a/model.onnx", b"original")
    digest = hashlib.sha256(b"original").hexdigest()
    assert get_verified_bytes(store, "orgs/a/model.onnx", digest) == b"original"
    store.put_bytes("orgs/a/model.onnx", b"tampered")
    with pytest.raises(ArtifactIntegrityError):
        get_verified_bytes(store, "orgs/a/model.onnx", digest)


def test_a_local_key_cannot_escape_the_folder(tmp_path: Path) -> None:
    store = LocalObjectStore(tmp_path / "objects")
    with pytest.raises(ValueError, match="escapes"):
        store.put_bytes("../outside.txt", b"x")


def test_s3_refuses_a_wrong_secret(s3_server: S3Server) -> None:
    client = Minio(s3_server.endpoint, access_key=s3_server.access_key, secret_key="wrong", secure=False)
    store = S3ObjectStore(client, "kiln-test", endpoint=s3_server.endpoint)
    with pytest.raises(Exception, match=r"SignatureDoesNotMatch|AccessDenied"):
        store.check()


def test_a_bucket_another_process_made_after_this_one_looked_is_taken_as_made(
    s3_server: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every service makes the bucket as it starts, and on a first start they all start at once."""
    settings = Settings(
        object_store="s3://kiln-" + secrets.token_hex(4),
        s3_endpoint=s3_server.endpoint,
        s3_access_key=s3_server.access_key,
        s3_secret_key=SecretStr(s3_server.secret_key),
    )
    open_object_store(settings).put_bytes("made-first", b"kept")
    monkeypatch.setattr(Minio, "bucket_exists", lambda _client, _bucket: False)  # looked before the other made it

    store = open_object_store(settings)

    assert store.get_bytes("made-first") == b"kept"


def test_an_unreachable_s3_server_is_a_transient_error_not_a_missing_object() -> None:
    settings = Settings(
        object_store="s3://kiln",
        s3_endpoint=f"127.0.0.1:{free_port()}",
        s3_access_key="k",
        s3_secret_key=SecretStr("s"),
    )
    with pytest.raises(TransientError, match="unreachable"):
        open_object_store(settings)


def test_deleting_a_prefix_removes_every_object_under_it_and_nothing_beside_it(store: ObjectStore) -> None:
    inside = ["orgs/a/models/v1/holdout.parquet", "orgs/a/models/v1/model.onnx", "orgs/a/models/v1/deep/x.json"]
    beside = ["orgs/a/models/v10/model.onnx", "orgs/a/models/v1.json", "orgs/b/models/v1/model.onnx"]
    for key in inside + beside:
        store.put_bytes(key, b"x")

    removed = store.delete_prefix("orgs/a/models/v1/")

    assert removed == sorted(inside)
    assert store.list("orgs/a/models/v1/") == []
    assert not any(store.exists(key) for key in inside)
    assert all(store.exists(key) for key in beside)
    assert store.delete_prefix("orgs/a/models/v1/") == []  # again: nothing left, and no error


def test_deleting_a_prefix_of_more_than_one_request_removes_them_all(store: ObjectStore) -> None:
    """remove_objects sends 1000 keys a request, and only as its result is read."""
    keys = [f"orgs/a/models/v1/part-{i:04d}" for i in range(1005)]
    for key in keys:
        store.put_bytes(key, b"")

    assert store.delete_prefix("orgs/a/models/v1/") == keys
    assert store.list("orgs/a/") == []


@pytest.mark.parametrize("prefix", ["", "/", "orgs/a/models/v1", "orgs/a/models/v1/model.onnx"])
def test_a_prefix_that_is_no_folder_is_refused_and_nothing_is_removed(store: ObjectStore, prefix: str) -> None:
    store.put_bytes("orgs/a/models/v1/model.onnx", b"x")
    store.put_bytes("orgs/a/models/v10/model.onnx", b"x")

    with pytest.raises(ValueError, match="must name a folder"):
        store.delete_prefix(prefix)

    assert store.list("orgs/") == ["orgs/a/models/v1/model.onnx", "orgs/a/models/v10/model.onnx"]


def test_a_folder_store_removes_a_prefix_folder_whole(tmp_path: Path) -> None:
    """A write cut off leaves a temporary file, which holds the same bytes: it goes too, and so does the folder."""
    store = LocalObjectStore(tmp_path / "objects")
    store.put_bytes("orgs/a/models/v1/holdout.parquet", b"rows")
    leftover = tmp_path / "objects/orgs/a/models/v1/.incoming-abc"
    leftover.write_bytes(b"rows")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_bytes(b"keep")
    (tmp_path / "objects/orgs/a/models/v1/link").symlink_to(outside)

    assert store.delete_prefix("orgs/a/models/v1/") == ["orgs/a/models/v1/holdout.parquet"]

    assert not (tmp_path / "objects/orgs/a/models/v1").exists()
    assert (tmp_path / "objects/orgs/a/models").is_dir()
    assert (outside / "keep.txt").read_bytes() == b"keep"
    with pytest.raises(ValueError, match="escapes"):
        store.delete_prefix("../")


def test_a_folder_store_write_removes_what_a_killed_writer_left_and_leaves_a_running_one_alone(tmp_path: Path) -> None:
    """A writer killed half-way leaves its temporary file, no longer locked: never listed, and removed by the next
    write into its folder. One whose writer still runs holds its lock (flock), and stays."""
    store = LocalObjectStore(tmp_path / "objects")
    folder = tmp_path / "objects/orgs/a/backups"
    folder.mkdir(parents=True)
    (folder / ".incoming-killed").write_bytes(b"half a backup")
    (folder / ".incoming-running").write_bytes(b"half a backup")

    with (folder / ".incoming-running").open("rb") as running:
        fcntl.flock(running, fcntl.LOCK_EX)
        listed = store.list("orgs/a/")
        store.put_bytes("orgs/a/backups/b.json", b"{}")
        left = sorted(path.name for path in folder.iterdir())

    assert listed == []
    assert left == [".incoming-running", "b.json"]
    assert store.list("orgs/a/") == ["orgs/a/backups/b.json"]


def test_a_download_asked_to_stop_stops_and_leaves_no_file(store: ObjectStore, tmp_path: Path) -> None:
    """Between chunks: the second look at `should_stop` says stop, and what was written is removed."""
    store.put_bytes("orgs/a/datasets/d1/data.parquet", secrets.token_bytes(3 * 1024 * 1024))
    looks: list[bool] = []

    def stop_after_the_first_chunk() -> bool:
        looks.append(len(looks) >= 1)
        return looks[-1]

    target = tmp_path / "data.parquet"
    with pytest.raises(Stopped):
        store.get_file("orgs/a/datasets/d1/data.parquet", target, should_stop=stop_after_the_first_chunk)
    assert not target.exists()


def test_a_download_from_an_s3_server_that_stopped_answering_is_cut_off_when_asked_to_stop(
    s3_server: S3Server, tmp_path: Path
) -> None:
    """Mid-download the link freezes: the read blocked on it ends as soon as the download is asked to stop, not at
    the client's read timeout (60 s); a cancelled training is promised to end within 5 s."""
    settings = Settings(
        object_store="s3://kiln-" + secrets.token_hex(4),
        s3_endpoint=s3_server.endpoint,
        s3_access_key=s3_server.access_key,
        s3_secret_key=SecretStr(s3_server.secret_key),
    )
    open_object_store(settings).put_bytes("orgs/a/big", secrets.token_bytes(64 * 1024 * 1024))
    host, port = s3_server.endpoint.rsplit(":", 1)
    link = FreezableLink((host, int(port)))
    linked = open_object_store(settings.model_copy(update={"s3_endpoint": f"127.0.0.1:{link.port}"}))
    asked: list[float] = []

    def stop_a_moment_after_the_link_froze() -> bool:
        if not asked:
            link.freeze()  # the first chunk is in: the rest of the body stays in the link
            asked.append(time.monotonic() + 0.5)
        return time.monotonic() > asked[0]

    try:
        outcome = link.outcome_within(
            10, lambda: linked.get_file("orgs/a/big", tmp_path / "big", should_stop=stop_a_moment_after_the_link_froze)
        )
    finally:
        link.close()
    assert isinstance(outcome, Stopped), outcome
    assert not (tmp_path / "big").exists()
