"""One place that turns a URI into a filesystem, and reads and writes through it.

A URI is a local path, ``file://...`` or ``s3://bucket/prefix``. S3 settings come from the
standard AWS configuration (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``,
``AWS_PROFILE``, ``AWS_DEFAULT_REGION``), so the same code talks to AWS, MinIO or a local test
server. Writers never expose a half-written object under its final name: local files are
written to a temporary sibling and renamed; S3 objects only appear when their upload completes.
"""

from __future__ import annotations

import functools
import io
import os
import posixpath
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import IO

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

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


def resolve(base: str, uri: str) -> str:
    """Resolve ``uri`` (absolute, or relative to the folder ``base``) to a full URI."""
    if "://" in uri or os.path.isabs(uri):
        return uri
    return join(base, uri)


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


def read_bytes(uri: str) -> bytes:
    """The whole object: one GET on S3 (no HEAD first)."""
    fs, path = filesystem(uri)
    return fs.cat_file(path)


def read_many(uris: Iterable[str], max_concurrency: int = 32) -> list[bytes | Exception]:
    """Read many whole objects, in order; a failed read comes back as its exception.

    S3 objects are fetched concurrently on the filesystem's event loop (at most
    ``max_concurrency`` GETs in flight): the latencies overlap without a thread per request.
    Names are taken literally (no glob expansion). Local files are read one after another.
    """
    uris = list(uris)
    out: list[bytes | Exception] = [b""] * len(uris)
    remote = [i for i, u in enumerate(uris) if scheme(u) == "s3"]
    for i in (i for i, u in enumerate(uris) if scheme(u) != "s3"):
        try:
            out[i] = read_bytes(uris[i])
        except Exception as exc:  # missing, permission, ...: this file's result
            out[i] = exc
    if remote:
        import asyncio

        from fsspec.asyn import sync

        fs, _ = filesystem(uris[remote[0]])
        gate = asyncio.Semaphore(max_concurrency)

        async def one(path: str) -> bytes:
            async with gate:
                return await fs._cat_file(path)

        async def gather() -> list:
            paths = [filesystem(uris[i])[1] for i in remote]
            return await asyncio.gather(*(one(p) for p in paths), return_exceptions=True)

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
        fs.pipe_file(path, data if isinstance(data, bytes) else data.encode("utf-8"))
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


def write_bytes(uri: str, data: bytes) -> None:
    with open_write(uri) as f:
        f.write(data)


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


def remove(uri: str, recursive: bool = False) -> None:
    fs, path = filesystem(uri)
    if fs.exists(path):
        fs.rm(path, recursive=recursive)


def read_parquet(uri: str, columns: Iterable[str] | None = None) -> pa.Table:
    """Read one Parquet file, or a folder of them (a partitioned dataset)."""
    fs, path = filesystem(uri)
    if fs.isdir(path):
        return pq.read_table(path, filesystem=fs, columns=list(columns) if columns else None)
    with fs.open(path, "rb") as f:
        return pq.read_table(f, columns=list(columns) if columns else None)


def write_parquet(table: pa.Table, uri: str) -> None:
    """Write ``table`` as one Parquet object, atomically."""
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    write_bytes(uri, buf.getvalue())


def pyarrow_filesystem(uri: str) -> tuple[pa.fs.FileSystem, str]:
    """A pyarrow filesystem over the same fsspec filesystem (for Ray Data and datasets)."""
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    fs, path = filesystem(uri)
    return PyFileSystem(FSSpecHandler(fs)), path
