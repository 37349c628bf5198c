"""Object storage as a few primitives, with two backends: S3 (MinIO, through the `minio` SDK) and a local folder."""

from __future__ import annotations

import builtins
import contextlib
import fcntl
import hashlib
import io
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import BinaryIO, Protocol
from urllib.parse import urlparse

import urllib3
from minio import Minio
from minio.deleteobjects import DeleteObject
from minio.error import S3Error

from shared.cut_off import cut_off_when, never
from shared.errors import ArtifactIntegrityError, ConfigurationError, NotFound, Stopped, TransientError
from shared.schemas import OrgConfig
from shared.settings import FILE_STORE, Settings

CHUNK = 1024 * 1024
BUCKET_MADE_ALREADY = {"BucketAlreadyOwnedByYou", "BucketAlreadyExists"}
# The temporary files a folder store's writes go through, renamed into place once whole.
INCOMING = ".incoming-"


class ObjectStore(Protocol):
    """Keys are `/`-separated paths such as `orgs/acme/models/v…/model.onnx`."""

    def put_file(self, key: str, path: Path) -> None: ...
    def put_bytes(self, key: str, data: bytes) -> None: ...
    def get_bytes(self, key: str) -> bytes: ...
    def get_file(self, key: str, path: Path, *, should_stop: Callable[[], bool] = never) -> None:
        """Download to `path`, removed again if the download fails. `should_stop()` turning true cuts the download
        off within cut_off's STOP_CHECK_S, a wait on a store that stopped answering included: Stopped."""
        ...

    def exists(self, key: str) -> bool: ...
    def list(self, prefix: str) -> list[str]: ...
    def delete(self, key: str) -> None: ...
    def delete_prefix(self, prefix: str) -> builtins.list[str]:
        """Remove every object whose key starts with `prefix` (a folder: non-empty, ending in `/`) and return the
        keys removed, sorted. Raises TransientError, having removed what it could, if any object is left."""
        ...

    def check(self) -> None:
        """Raise if the store cannot be reached; readiness probes call it."""

    def url(self, key: str) -> str:
        """Where the object is, for a person to find it: `file:///PATH` or `s3://BUCKET/KEY`."""
        ...


class LocalObjectStore:
    """A folder. Writes go to a temporary file and are renamed into place, so a reader never sees half a file; the
    temporary file of a writer killed half-way is removed by the next write into its folder. With `create` False the
    folder is left to the first write to make: reading a folder that is not there finds nothing."""

    def __init__(self, root: Path, *, create: bool = True) -> None:
        self.root = root.resolve()
        if create:
            self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if not path.is_relative_to(self.root) or path == self.root:
            raise ValueError(f"object key escapes the store: {key!r}")
        return path

    def put_file(self, key: str, path: Path) -> None:
        with path.open("rb") as source:
            self._write(key, source)

    def put_bytes(self, key: str, data: bytes) -> None:
        self._write(key, io.BytesIO(data))

    def _write(self, key: str, source: BinaryIO) -> None:
        target = self._path(key)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            _remove_abandoned_writes(target.parent)
            handle, temp = _locked_incoming_file(target.parent)
        except OSError as error:
            raise _refused_write(key, error) from error
        try:
            with os.fdopen(handle, "wb") as sink:
                shutil.copyfileobj(source, sink, CHUNK)
                os.replace(temp, target)  # while still locked: the file is never seen unlocked under its own name
        except BaseException as error:
            temp.unlink(missing_ok=True)
            if isinstance(error, OSError):
                raise _refused_write(key, error) from error
            raise

    def get_bytes(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise NotFound(f"no object at {key}") from None

    def get_file(self, key: str, path: Path, *, should_stop: Callable[[], bool] = never) -> None:
        try:
            source = self._path(key).open("rb")
        except FileNotFoundError:
            raise NotFound(f"no object at {key}") from None
        with source:
            _write_whole(iter(partial(source.read, CHUNK), b""), path, should_stop)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str) -> list[str]:
        base = self.root / prefix
        folder = base if base.is_dir() else base.parent
        if not folder.is_dir():
            return []
        keys = (p.relative_to(self.root).as_posix() for p in folder.rglob("*") if p.is_file())
        return sorted(k for k in keys if k.startswith(prefix) and not Path(k).name.startswith(INCOMING))

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def delete_prefix(self, prefix: str) -> builtins.list[str]:
        """The folder goes whole: its objects, a write's leftover temporary file, the folders under it. Links are
        removed as links, never followed."""
        self._path(_folder_prefix(prefix))  # refuses a prefix that leaves the store
        folder = self.root / prefix.rstrip("/")
        if folder.is_symlink():
            folder.unlink()
            return []
        if not folder.is_dir():
            return []
        removed = self.list(prefix)
        for parent, folders, files in os.walk(folder, topdown=False):
            for name in files:
                os.unlink(os.path.join(parent, name))
            for name in folders:
                path = os.path.join(parent, name)
                if os.path.islink(path):
                    os.unlink(path)
                else:
                    os.rmdir(path)
        folder.rmdir()
        return removed

    def check(self) -> None:
        if not os.access(self.root, os.W_OK):
            raise OSError(f"object store folder is not writable: {self.root}")

    def url(self, key: str) -> str:
        return self._path(key).as_uri()


def _locked_incoming_file(folder: Path) -> tuple[int, Path]:
    """A new temporary file in `folder` for a write, locked (flock) by this process until the write ends. The lock
    goes with the process, however it ends (SIGKILL too): a file whose lock no one holds was abandoned."""
    while True:
        handle, name = tempfile.mkstemp(dir=folder, prefix=INCOMING)
        fcntl.flock(handle, fcntl.LOCK_EX)
        # Another writer may have found it unlocked, in the moment before the lock, and removed it: make another.
        if _same_file(handle, Path(name)):
            return handle, Path(name)
        os.close(handle)


def _remove_abandoned_writes(folder: Path) -> None:
    """Remove the temporary files in `folder` of writes whose process ended before finishing them (killed): a
    partial object, which no listing shows, but which would otherwise stay on disk for good."""
    for path in folder.glob(f"{INCOMING}*"):
        try:
            handle = os.open(path, os.O_RDONLY)
        except FileNotFoundError:  # finished (renamed into place) or removed meanwhile
            continue
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # being written
            pass
        else:
            path.unlink(missing_ok=True)
        finally:
            os.close(handle)


def _same_file(handle: int, path: Path) -> bool:
    try:
        named = path.stat()
    except FileNotFoundError:
        return False
    opened = os.fstat(handle)
    return (named.st_dev, named.st_ino) == (opened.st_dev, opened.st_ino)


class S3ObjectStore:
    """One bucket on an S3 server, reached through the `minio` SDK (MinIO in production, SeaweedFS in tests).

    An unreachable server raises TransientError, so a training run can tell an outage from a missing object.
    """

    def __init__(self, client: Minio, bucket: str, *, endpoint: str) -> None:
        self.client = client
        self.bucket = bucket
        self.endpoint = endpoint

    def ensure_bucket(self) -> None:
        with _reachable(self.endpoint):
            if self.client.bucket_exists(self.bucket):
                return
            try:
                self.client.make_bucket(self.bucket)
            except S3Error as error:
                # A first start runs every service at once: another made it since this one looked.
                if error.code not in BUCKET_MADE_ALREADY:
                    raise

    def put_file(self, key: str, path: Path) -> None:
        with _reachable(self.endpoint):
            self.client.fput_object(self.bucket, key, str(path))

    def put_bytes(self, key: str, data: bytes) -> None:
        with _reachable(self.endpoint):
            self.client.put_object(self.bucket, key, io.BytesIO(data), len(data))

    def get_bytes(self, key: str) -> bytes:
        with _reachable(self.endpoint), _missing_as_not_found(key):
            response = self.client.get_object(self.bucket, key)
            try:
                return response.read()
            finally:
                response.close()
                response.release_conn()

    def get_file(self, key: str, path: Path, *, should_stop: Callable[[], bool] = never) -> None:
        with _reachable(self.endpoint), _missing_as_not_found(key):
            response = self.client.get_object(self.bucket, key)
            try:
                with cut_off_when(should_stop, partial(_shut_down, response)):
                    _write_whole(response.stream(CHUNK), path, should_stop)
            except urllib3.exceptions.HTTPError as error:
                if should_stop():  # the read failed because it was cut off
                    raise Stopped(f"asked to stop while downloading {key}") from error
                raise
            finally:
                response.close()
                response.release_conn()

    def exists(self, key: str) -> bool:
        try:
            with _reachable(self.endpoint), _missing_as_not_found(key):
                self.client.stat_object(self.bucket, key)
        except NotFound:
            return False
        return True

    def list(self, prefix: str) -> list[str]:
        with _reachable(self.endpoint):
            objects = self.client.list_objects(self.bucket, prefix=prefix, recursive=True)
            return sorted(str(o.object_name) for o in objects)

    def delete(self, key: str) -> None:
        with _reachable(self.endpoint):
            self.client.remove_object(self.bucket, key)

    def delete_prefix(self, prefix: str) -> builtins.list[str]:
        """One multi-object delete per 1000 keys. The SDK's remove_objects is lazy: it sends nothing until its
        result, the objects it could not remove, is read; then the prefix is listed again to be sure."""
        keys = self.list(_folder_prefix(prefix))
        with _reachable(self.endpoint):
            errors = list(self.client.remove_objects(self.bucket, [DeleteObject(key) for key in keys]))
        left = self.list(prefix)
        if errors or left:
            reasons = "; ".join(f"{error.name}: {error.code} {error.message or ''}".strip() for error in errors[:5])
            raise TransientError(
                f"the object store at {self.endpoint} kept {len(left)} object(s) under {prefix}"
                + (f" ({reasons})" if reasons else "")
            )
        return keys

    def check(self) -> None:
        with _reachable(self.endpoint):
            if not self.client.bucket_exists(self.bucket):
                raise OSError(f"bucket {self.bucket!r} does not exist")

    def url(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"


MISSING_CODES = {"NoSuchKey", "NoSuchObject", "ResourceNotFound"}


def _folder_prefix(prefix: str) -> str:
    """A prefix that may be removed whole: a folder's, so that `orgs/a/models/v1/` never takes `…/v10/` along, and
    never the empty one, which is the whole store."""
    if not prefix.endswith("/") or not prefix.strip("/"):
        raise ValueError(f"a prefix to remove must name a folder, ending in '/': {prefix!r}")
    return prefix


def _shut_down(response: urllib3.BaseHTTPResponse) -> None:
    """End a read blocked on the response's socket, from another thread (close() would not). Once the whole body is
    read, urllib3 has handed the connection back to its pool, and refuses: the download has ended anyway."""
    with contextlib.suppress(RuntimeError, ValueError, OSError):
        response.shutdown()


def _write_whole(chunks: Iterator[bytes], path: Path, should_stop: Callable[[], bool]) -> None:
    """Write the chunks to `path`, looking between them whether to stop; a download that fails or stops leaves no
    file behind."""
    try:
        with path.open("wb") as file:
            for chunk in chunks:
                if should_stop():
                    raise Stopped(f"asked to stop while downloading to {path.name}")
                file.write(chunk)
    except BaseException:
        path.unlink(missing_ok=True)
        raise


@contextmanager
def _missing_as_not_found(key: str) -> Iterator[None]:
    try:
        yield
    except S3Error as error:
        if error.code in MISSING_CODES:
            raise NotFound(f"no object at {key}") from None
        raise


def _refused_write(key: str, error: OSError) -> TransientError:
    """The folder refused a write (its disk full, a folder made read-only or not a folder): as an S3 store out of
    reach, what a request answers 503 for and a run retries; the error's words, never the server's paths."""
    return TransientError(f"the object store cannot write {key}: {error.strerror or type(error).__name__}")


@contextmanager
def _reachable(endpoint: str) -> Iterator[None]:
    try:
        yield
    except (urllib3.exceptions.HTTPError, ConnectionError) as error:
        raise TransientError(f"the object store at {endpoint} is unreachable: {error}") from error


def open_object_store(settings: Settings) -> ObjectStore:
    """The store named by KILN_OBJECT_STORE: `file://PATH` or `s3://BUCKET`."""
    url = urlparse(settings.resolved_object_store)
    if url.scheme == "file":
        # What follows file:// is a path as it stands: a ? # or % in a folder's name is no query, fragment or escape.
        folder = Path(settings.resolved_object_store.removeprefix(FILE_STORE))
        try:
            return LocalObjectStore(folder)
        except OSError as error:
            reason = "a file is in the way" if isinstance(error, FileExistsError) else error.strerror
            raise ConfigurationError(f"KILN_OBJECT_STORE: {folder} cannot be a folder of objects: {reason}") from None
    if url.scheme == "s3":
        try:
            client = Minio(
                settings.s3_endpoint,
                access_key=settings.s3_access_key,
                secret_key=settings.s3_secret_key.get_secret_value(),
                secure=settings.s3_secure,
                region=settings.s3_region,
                http_client=_http_client(),
            )
        except ValueError as error:  # the minio SDK's own check of the endpoint: a path, a port that is no number
            raise ConfigurationError(f"KILN_S3_ENDPOINT is not host[:port]: {error}") from None
        store = S3ObjectStore(client, url.netloc, endpoint=settings.s3_endpoint)
        try:
            store.ensure_bucket()
        except ValueError as error:  # the SDK checks the bucket's name before asking the server
            raise ConfigurationError(f"KILN_OBJECT_STORE names no valid bucket ({url.netloc!r}): {error}") from None
        return store
    given = f"{url.scheme}://…" if url.scheme else "a path without file://"
    raise ConfigurationError(f"KILN_OBJECT_STORE must be file://PATH or s3://BUCKET, not {given}")


def org_data_store(settings: Settings, org_config: OrgConfig, *, central: ObjectStore) -> ObjectStore:
    """The object store that may hold an org's data (held-out rows, backups of its local stores): for an org that
    keeps its data on its premises (dataResidency "local"), a folder on this machine, `data_dir/premises`, since the
    machine that works with that data is on the premises too; for any other, the central one."""
    if org_config.data_residency == "local":
        return premises_store(settings)
    return central


def backup_stores(settings: Settings, *, central: ObjectStore) -> list[ObjectStore]:
    """Every store this machine sees that may hold an org's backups, whatever its dataResidency says today: an org
    that moved keeps the backups it took before where they were written then. The central store always, and this
    machine's premises folder when it holds one (looking never makes it)."""
    return [central, premises_store(settings)] if on_premises(settings) else [central]


def on_premises(settings: Settings) -> bool:
    """Whether this machine holds a premises folder: it is then on some org's premises."""
    return premises_store(settings).root.is_dir()


def premises_store(settings: Settings) -> LocalObjectStore:
    """This machine's folder for the data of the orgs that keep theirs on their premises (`data_dir/premises`). Only
    a write makes it: the folder being there says this machine is on some org's premises (`kiln secrets` counts the
    backups in it as that org's), so a listing or a lookup before a restore must not make it."""
    return LocalObjectStore(settings.data_dir / "premises", create=False)


def _http_client() -> urllib3.PoolManager:
    """The SDK's defaults wait five minutes on a server that does not answer; an outage should surface quickly."""
    return urllib3.PoolManager(
        timeout=urllib3.Timeout(connect=5, read=60),
        maxsize=10,
        retries=urllib3.Retry(total=3, backoff_factor=0.2, status_forcelist=[500, 502, 503, 504]),
    )


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as source:
        for block in iter(lambda: source.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def get_verified_bytes(store: ObjectStore, key: str, sha256: str) -> bytes:
    """Fetch an artifact and refuse it unless its sha256 matches the one recorded when it was written."""
    data = store.get_bytes(key)
    actual = hashlib.sha256(data).hexdigest()
    if actual != sha256:
        raise ArtifactIntegrityError(f"{key}: sha256 {actual} does not match the recorded {sha256}")
    return data
