"""One place that turns a URI into a filesystem, and reads and writes through it.

A URI is a local path, ``file://...`` or ``s3://bucket/prefix``. S3 settings come from the
standard AWS configuration (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``,
``AWS_PROFILE``, ``AWS_DEFAULT_REGION``), so the same code talks to AWS, MinIO or a local test
server. Writers never expose a half-written object under its final name: local files are
written to a temporary sibling and renamed; S3 objects only appear when their upload completes.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import io
import logging
import os
import posixpath
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from typing import IO, NamedTuple, TypeVar

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

log = logging.getLogger(__name__)
T = TypeVar("T")

# AWS settings that say where and how to connect, never who: forwarded to Ray workers in
# their runtime env (which Ray's dashboard and state API show). Keys and session tokens are
# not forwarded: workers find credentials themselves (their environment, the instance or pod
# identity, a mounted credentials file).
AWS_SETTINGS = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_PROFILE",
    "AWS_CONFIG_FILE",
    "AWS_SHARED_CREDENTIALS_FILE",
    "AWS_CA_BUNDLE",
    "AWS_EC2_METADATA_DISABLED",
    "AWS_STS_REGIONAL_ENDPOINTS",
    "AWS_ROLE_ARN",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_RETRY_MODE",
    "AWS_MAX_ATTEMPTS",
)


def scheme(uri: str) -> str:
    """Return ``s3`` or ``file`` for a URI or plain path."""
    if "://" in uri:
        proto = uri.split("://", 1)[0].lower()
        if proto in ("s3", "s3a"):
            return "s3"
        if proto == "file":
            return "file"
        raise ValueError(
            f"unsupported URI scheme {proto!r} in {uri!r} (use a path, file:// or s3://)"
        )
    return "file"


def is_remote(uri: str) -> bool:
    return scheme(uri) != "file"


def aws_settings() -> dict[str, str]:
    """This process's non-secret AWS settings (:data:`AWS_SETTINGS`), to forward to workers."""
    return {k: os.environ[k] for k in AWS_SETTINGS if os.environ.get(k)}


def _s3_options() -> dict:
    opts: dict = {}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    client_kwargs: dict = {}
    if endpoint:
        client_kwargs["endpoint_url"] = endpoint
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        client_kwargs["region_name"] = region
    if client_kwargs:
        opts["client_kwargs"] = client_kwargs
    if os.environ.get("AWS_PROFILE"):
        opts["profile"] = os.environ["AWS_PROFILE"]
    return opts


@functools.lru_cache(maxsize=8)
def _s3_filesystem(settings: tuple[tuple[str, str], ...]) -> fsspec.AbstractFileSystem:
    """One S3 filesystem (and connection pool) per set of AWS settings of this process."""
    del settings  # the cache key: a change of endpoint or keys gives a new filesystem
    return fsspec.filesystem("s3", skip_instance_cache=True, **_s3_options())


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """Return ``(fs, path)`` for ``uri``; ``path`` is what ``fs`` expects (no scheme)."""
    if scheme(uri) == "s3":
        settings = tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("AWS_")))
        return _s3_filesystem(settings), uri.split("://", 1)[1].rstrip("/")
    path = uri[len("file://") :] if uri.startswith("file://") else uri
    return fsspec.filesystem("file"), os.path.abspath(os.path.expanduser(path))


def normalize(uri: str) -> str:
    """Canonical form of a URI: absolute local paths, no trailing slash."""
    if scheme(uri) == "s3":
        return "s3://" + uri.split("://", 1)[1].rstrip("/")
    return filesystem(uri)[1]


def to_uri(fs_path: str, like: str) -> str:
    """Turn a path returned by ``fs`` back into a URI of the same kind as ``like``."""
    return f"s3://{fs_path}" if scheme(like) == "s3" else fs_path


def join(base: str, *parts: str) -> str:
    """Join URI parts with ``/`` (also for local paths)."""
    if scheme(base) == "s3":
        return posixpath.join(base.rstrip("/"), *[p.strip("/") for p in parts])
    return os.path.join(base, *parts)


def parent(uri: str) -> str:
    if scheme(uri) == "s3":
        return posixpath.dirname(uri.rstrip("/"))
    return os.path.dirname(os.path.abspath(uri[7:] if uri.startswith("file://") else uri))


def basename(uri: str) -> str:
    return (
        posixpath.basename(uri.rstrip("/"))
        if scheme(uri) == "s3"
        else os.path.basename(uri.rstrip(os.sep))
    )


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.exists(path)


def isdir(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.isdir(path)


class TooLarge(ValueError):
    """An object larger than the caller's ``max_bytes``, refused before (or instead of) reading
    it. The message gives the sizes only, never the name."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"object of {size} bytes is larger than the limit of {limit} bytes")
        self.size, self.limit = size, limit


def read_bytes(uri: str, max_bytes: int | None = None) -> bytes:
    """The whole object. With ``max_bytes``, its size is checked before any byte is fetched (a
    HEAD, then a ranged GET, on S3; ``fstat`` locally): :class:`TooLarge` if larger. (Without,
    s3fs's ``cat_file`` HEADs before its GET too, to decide on a chunked download.)"""
    if max_bytes is not None:
        data = read_many([uri], max_bytes=max_bytes)[0]
        if isinstance(data, Exception):
            raise data
        return data
    fs, path = filesystem(uri)
    return fs.cat_file(path)


def _read_local(uri: str, max_bytes: int | None) -> bytes:
    if max_bytes is None:
        return read_bytes(uri)
    with open(filesystem(uri)[1], "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size > max_bytes:
            raise TooLarge(size, max_bytes)
        data = f.read(max_bytes + 1)  # bounded even if the file grows meanwhile
    if len(data) > max_bytes:
        raise TooLarge(len(data), max_bytes)
    return data


def read_many(
    uris: Iterable[str],
    max_concurrency: int = 32,
    *,
    max_bytes: int | None = None,
    sizes: Sequence[int | None] | None = None,
) -> list[bytes | Exception]:
    """Read many whole objects, in order; a failed read comes back as its exception.

    S3 objects are fetched concurrently on the filesystem's event loop (at most
    ``max_concurrency`` GETs in flight): the latencies overlap without a thread per request.
    Names are taken literally (no glob expansion). Local files are read one after another.

    ``max_bytes`` bounds memory before any byte is fetched: an object whose size (``sizes``,
    e.g. from a listing; else a HEAD on S3 or ``fstat`` locally) exceeds it comes back as
    :class:`TooLarge` without being read.
    """
    uris = list(uris)
    known: list[int | None] = list(sizes) if sizes is not None else [None] * len(uris)
    out: list[bytes | Exception] = [b""] * len(uris)
    remote = []
    for i, uri in enumerate(uris):
        if max_bytes is not None and known[i] is not None and known[i] > max_bytes:
            out[i] = TooLarge(int(known[i]), max_bytes)
        elif scheme(uri) == "s3":
            remote.append(i)
        else:
            try:
                out[i] = _read_local(uri, max_bytes)
            except Exception as exc:  # missing, permission, ...: this file's result
                out[i] = exc
    if remote:
        import asyncio

        from fsspec.asyn import sync

        fs, _ = filesystem(uris[remote[0]])
        gate = asyncio.Semaphore(max_concurrency)

        async def one(path: str, size: int | None) -> bytes:
            async with gate:
                if max_bytes is None:
                    return await fs._cat_file(path)  # s3fs HEADs first, for its own reasons
                if size is None:
                    size = int((await fs._info(path))["size"])
                if size > max_bytes:
                    raise TooLarge(size, max_bytes)
                if size == 0:
                    return b""
                # A ranged GET: no second HEAD, and bounded even if the object was replaced by
                # a larger one since its size was taken.
                data = await fs._cat_file(path, start=0, end=max_bytes + 1)
            if len(data) > max_bytes:
                raise TooLarge(len(data), max_bytes)
            return data

        async def gather() -> list:
            jobs = [one(filesystem(uris[i])[1], known[i]) for i in remote]
            return await asyncio.gather(*jobs, return_exceptions=True)

        for i, data in zip(remote, sync(fs.loop, gather), strict=True):
            out[i] = data
    return out


def size(uri: str) -> int:
    fs, path = filesystem(uri)
    return int(fs.size(path))


@contextmanager
def open_write(uri: str, mode: str = "wb") -> Iterator[IO]:
    """Open ``uri`` for writing; the object appears under its name only once complete."""
    fs, path = filesystem(uri)
    if scheme(uri) == "s3":
        # An S3 object becomes visible only when its PUT completes. Buffer the content and PUT it
        # only if the writer finishes: a writer that fails part-way leaves no object behind.
        buf = io.BytesIO() if "b" in mode else io.StringIO()
        yield buf
        data = buf.getvalue()
        _put(fs, path, data if isinstance(data, bytes) else data.encode("utf-8"))
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_bytes(uri: str, data: bytes, *, retry_s: float = 0.0) -> None:
    """Write ``data`` to ``uri`` atomically; through transient storage errors (an outage, 503s,
    resets, timeouts) again and again for ``retry_s`` seconds (:func:`retry_transient`)."""

    def once() -> None:
        with open_write(uri) as f:
            f.write(data)

    retry_transient(once, retry_s, "write")


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode("utf-8"))


def read_text(uri: str) -> str:
    return read_bytes(uri).decode("utf-8")


def makedirs(uri: str) -> None:
    """Create a local folder; a no-op on S3, where prefixes need no creation."""
    if scheme(uri) == "file":
        fs, path = filesystem(uri)
        fs.makedirs(path, exist_ok=True)


def walk_files(uri: str) -> list[str]:
    """All files under the folder ``uri`` (recursively), as full URIs, sorted."""
    fs, path = filesystem(uri)
    if not fs.isdir(path):
        raise FileNotFoundError(f"not a folder: {uri}")
    found = fs.find(path)
    return sorted(to_uri(p, uri) for p in found if not posixpath.basename(p).startswith("."))


def read_parquet(uri: str, columns: Iterable[str] | None = None) -> pa.Table:
    """Read one Parquet file, or a folder of them (a partitioned dataset)."""
    fs, path = filesystem(uri)
    if fs.isdir(path):
        return pq.read_table(path, filesystem=fs, columns=list(columns) if columns else None)
    with fs.open(path, "rb") as f:
        return pq.read_table(f, columns=list(columns) if columns else None)


def write_parquet(table: pa.Table, uri: str, *, retry_s: float = 0.0) -> None:
    """Write ``table`` as one Parquet object, atomically (``retry_s``: see :func:`write_bytes`)."""
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    write_bytes(uri, buf.getvalue(), retry_s=retry_s)


def pyarrow_filesystem(uri: str) -> tuple[pa.fs.FileSystem, str]:
    """A pyarrow filesystem over the same fsspec filesystem (for Ray Data and datasets)."""
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    fs, path = filesystem(uri)
    return PyFileSystem(FSSpecHandler(fs)), path


# ------------------------------------------------------------------ conditional writes (locks)
# Create only if absent; replace or remove only if unchanged since read. On S3 these are
# conditional requests (PUT with If-None-Match: * or If-Match: <ETag>, DELETE with If-Match),
# which AWS S3, MinIO and moto honour: the server decides, so two writers cannot both win. Local
# files: creation with O_EXCL; replacing and removing move the file aside first (an atomic
# rename), then check it is the version that was read (see _set_aside).


class ObjectChanged(Exception):
    """A conditional write found the object created, changed or removed by someone else."""


class Versioned(NamedTuple):
    data: bytes
    version: str  # S3: the ETag; local: the content's sha256
    modified: float  # seconds since the epoch (storage's clock)


def read_versioned(uri: str) -> Versioned | None:
    """The object, its version and modification time; None when it does not exist."""
    fs, path = filesystem(uri)
    try:
        if scheme(uri) == "s3":
            bucket, key, _ = fs.split_path(path)
            # HEAD, then GET: if the object changes in between, the data is newer than the
            # version, and a conditional write with that version fails (safe side).
            head = fs.call_s3("head_object", Bucket=bucket, Key=key)
            data = fs.cat_file(path)
            return Versioned(data, head["ETag"], head["LastModified"].timestamp())
        with open(path, "rb") as f:
            data = f.read()
            modified = os.fstat(f.fileno()).st_mtime
    except FileNotFoundError:
        return None
    return Versioned(data, hashlib.sha256(data).hexdigest(), modified)


def create_exclusive(uri: str, data: bytes) -> str:
    """Write ``data`` to ``uri`` only if nothing is there (else FileExistsError); its version."""
    fs, path = filesystem(uri)
    if scheme(uri) == "s3":
        out = fs.pipe_file(path, data, mode="create")  # If-None-Match: *
        return out["ETag"]
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    return hashlib.sha256(data).hexdigest()


def replace_if(uri: str, data: bytes, version: str) -> str:
    """Overwrite ``uri`` with ``data`` only if it is still at ``version``; the new version.
    Raises :class:`ObjectChanged` otherwise (also when it was removed)."""
    fs, path = filesystem(uri)
    if scheme(uri) == "s3":
        try:
            out = fs.pipe_file(path, data, IfMatch=version)
        except FileNotFoundError as err:
            raise ObjectChanged("removed") from err
        except OSError as err:
            if err.errno == errno.EINVAL:  # s3fs's translation of 412 Precondition Failed
                raise ObjectChanged("changed") from err
            raise
        return out["ETag"]
    aside = _set_aside(path, version)
    try:
        return create_exclusive(path, data)
    except FileExistsError as err:
        raise ObjectChanged("created meanwhile") from err
    finally:
        os.unlink(aside)


def remove_if(uri: str, version: str) -> bool:
    """Remove ``uri`` only if it is still at ``version``; whether it was removed."""
    fs, path = filesystem(uri)
    if scheme(uri) == "s3":
        bucket, key, _ = fs.split_path(path)
        try:
            fs.call_s3("delete_object", Bucket=bucket, Key=key, IfMatch=version)
        except FileNotFoundError:
            return False
        except OSError as err:
            if err.errno == errno.EINVAL:
                return False
            raise
        fs.invalidate_cache(path)
        return True
    try:
        os.unlink(_set_aside(path, version))
    except ObjectChanged:
        return False
    return True


def _set_aside(path: str, version: str) -> str:
    """Rename the local file ``path`` to a hidden sibling and return that name, if its content
    is at ``version``; otherwise put it back and raise :class:`ObjectChanged`.

    The rename is atomic, so of two processes only one moves a given file. What remains is a
    narrow race: if a process moves aside a file that is newer than ``version`` (it changed
    since that process read it), the file is briefly absent before it is put back, and a third
    process creating it in that window wins over its holder; a lock's holder notices at its
    next heartbeat (:mod:`covidray.score.lock`)."""
    aside = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{uuid.uuid4().hex}")
    try:
        os.rename(path, aside)
    except FileNotFoundError as err:
        raise ObjectChanged("removed") from err
    with open(aside, "rb") as f:
        if hashlib.sha256(f.read()).hexdigest() == version:
            return aside
    with suppress(FileExistsError):
        os.link(aside, path)  # put it back, unless a new file took its place meanwhile
    os.unlink(aside)
    raise ObjectChanged("changed")


# ------------------------------------------------------------------ transient errors, retries
# s3fs and botocore retry a few times within 3-14 s (docs/faults.md); an outage of a minute
# outlasts that. Writes that must not be lost retry on top, for a budget of their own.

PUT_TIMEOUT_S = 120.0  # one PUT attempt, plus PUT_S_PER_MB per MB of payload
PUT_S_PER_MB = 10.0
BACKOFF_S = (1.0, 15.0)  # first and longest pause between attempts
_TRANSIENT_ERRNOS = frozenset(
    {
        errno.EBUSY,  # s3fs: 503 SlowDown / Service Unavailable
        errno.EIO,  # s3fs: an S3 error code it does not know (500 InternalError, ...)
        errno.EAGAIN,
        errno.ETIMEDOUT,
        errno.ECONNRESET,
        errno.ECONNREFUSED,
        errno.ECONNABORTED,
        errno.EPIPE,
        errno.ENETDOWN,
        errno.ENETUNREACH,
        errno.EHOSTUNREACH,
        getattr(errno, "EREMOTEIO", errno.EIO),
    }
)
_PERMANENT = (
    PermissionError,
    FileNotFoundError,
    FileExistsError,
    IsADirectoryError,
    NotADirectoryError,
)


class StorageUnavailable(OSError):
    """Storage kept failing with transient errors for a whole retry budget."""


def is_transient(err: BaseException) -> bool:
    """Whether ``err`` is storage trouble that may pass (a refused, reset or cut connection, a
    timeout, 5xx or SlowDown) rather than a refusal that will not (permission, no such bucket,
    a bad request) or a bug."""
    if isinstance(err, (StorageUnavailable, *_PERMANENT)):
        return False
    if isinstance(err, TimeoutError):  # asyncio's and fsspec's too
        return True
    if isinstance(err, OSError):
        return err.errno is None or err.errno in _TRANSIENT_ERRNOS
    from botocore.exceptions import ConnectionError as BotoConnectionError
    from botocore.exceptions import HTTPClientError

    if isinstance(err, BotoConnectionError | HTTPClientError):  # refused, closed, timed out
        return True
    try:
        import aiohttp
    except ImportError:  # pragma: no cover - s3fs depends on it
        return False
    return isinstance(err, aiohttp.ClientError)  # e.g. ClientPayloadError: a body cut short


def retry_transient(fn: Callable[[], T], budget_s: float, what: str = "storage call") -> T:
    """``fn()``; after a transient error (:func:`is_transient`), again with a growing pause
    (1, 2, 4, ... 15 s) until ``budget_s`` seconds have passed, then
    :class:`StorageUnavailable`. Other errors, and any error with no budget, raise at once."""
    deadline = time.monotonic() + budget_s
    pause, attempts = BACKOFF_S[0], 0
    while True:
        attempts += 1
        try:
            return fn()
        except Exception as err:
            if budget_s <= 0 or not is_transient(err):
                raise
            left = deadline - time.monotonic()
            if left <= 0:
                raise StorageUnavailable(
                    f"{what}: storage still failing after {attempts} attempts in "
                    f"{budget_s:.0f} s ({type(err).__name__})"
                ) from err
            log.warning("%s failed (%s); retrying in %.0f s", what, type(err).__name__, pause)
            time.sleep(min(pause, left))
            pause = min(2 * pause, BACKOFF_S[1])


def _put(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """One S3 PUT, bounded in time: the S3 client sends ``Expect: 100-continue`` and waits for
    the answer with no timeout, so a server gone silent would hold the writer for ever."""
    import asyncio

    from fsspec.asyn import sync

    timeout = PUT_TIMEOUT_S + PUT_S_PER_MB * len(data) / 1e6
    sync(fs.loop, lambda: asyncio.wait_for(fs._pipe_file(path, data), timeout))
