"""The storage layer against a local folder and a real S3 protocol server (moto)."""

from __future__ import annotations

import os

import pyarrow as pa
import pytest

from covidray import storage


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "root")
    return request.getfixturevalue("s3_bucket") + "/prefix"


def test_roundtrip_bytes_text_parquet(root: str) -> None:
    storage.write_bytes(storage.join(root, "a/b.bin"), b"\x00\x01")
    storage.write_text(storage.join(root, "c.txt"), "héllo")
    table = pa.table({"x": [1, 2, 3]})
    storage.write_parquet(table, storage.join(root, "t.parquet"))
    assert storage.read_bytes(storage.join(root, "a/b.bin")) == b"\x00\x01"
    assert storage.read_text(storage.join(root, "c.txt")) == "héllo"
    assert storage.read_parquet(storage.join(root, "t.parquet")).equals(table)
    files = storage.walk_files(root)
    assert [storage.basename(f) for f in files] == ["b.bin", "c.txt", "t.parquet"]
    assert all(storage.scheme(f) == storage.scheme(root) for f in files)
    assert storage.size(storage.join(root, "a/b.bin")) == 2


def test_read_many_keeps_order_literal_names_and_per_file_errors(root: str) -> None:
    names = [f"img{i}.png" for i in range(40)] + ["odd [1]*?.png"]  # glob characters, literally
    for i, name in enumerate(names):
        storage.write_bytes(storage.join(root, name), f"data-{i}".encode())
    uris = [storage.join(root, n) for n in names]
    missing = storage.join(root, "missing.png")
    got = storage.read_many([*uris[:20], missing, *uris[20:]], max_concurrency=4)
    assert got[:20] == [f"data-{i}".encode() for i in range(20)]
    assert isinstance(got[20], FileNotFoundError)
    assert got[21:] == [f"data-{i}".encode() for i in range(20, 41)]
    assert storage.read_many([]) == []


def test_failed_write_leaves_nothing_under_final_name(root: str) -> None:
    target = storage.join(root, "out/partial.bin")
    with pytest.raises(RuntimeError):
        with storage.open_write(target) as f:
            f.write(b"half")
            raise RuntimeError("writer crashed")
    assert not storage.exists(target)
    if storage.scheme(root) == "file":
        assert os.listdir(os.path.dirname(target)) == []  # no temp file left behind


def test_s3_settings_come_from_environment(s3_bucket: str, monkeypatch) -> None:
    storage.write_bytes(f"{s3_bucket}/k", b"v")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    with pytest.raises(Exception):  # noqa: B017 - any connection error will do
        storage.read_bytes(f"{s3_bucket}/k")


def test_uri_helpers() -> None:
    assert storage.scheme("s3://b/p") == "s3"
    assert storage.scheme("/tmp/x") == "file"
    assert storage.scheme("file:///tmp/x") == "file"
    with pytest.raises(ValueError):
        storage.scheme("gs://b/p")
    assert storage.join("s3://b/p/", "x", "/y") == "s3://b/p/x/y"
    assert storage.parent("s3://b/p/m.parquet") == "s3://b/p"
