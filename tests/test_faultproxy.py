"""The fault proxy of tests/faultproxy.py does what it says, in front of a real moto S3 server.

No Ray; one moto server for the module, a fresh proxy per test. A few seconds in all.
"""

from __future__ import annotations

import http.client
import http.server
import logging
import socket
import sys
import threading
import time
from pathlib import Path

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import (
    ClientError,
    ConnectionClosedError,
    EndpointConnectionError,
    ResponseStreamingError,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))

from faultproxy import FaultProxy  # noqa: E402

BUCKET = "faultproxy"
NO_RETRY = Config(retries={"mode": "standard", "total_max_attempts": 1}, connect_timeout=2)


@pytest.fixture(scope="module")
def moto_url(s3_server: str) -> str:
    """The session's moto server (tests/conftest.py), with this module's bucket."""
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=BUCKET)
    return s3_server


@pytest.fixture
def proxy(moto_url):
    with FaultProxy(moto_url) as p:
        yield p


def client(proxy: FaultProxy, config: Config | None = NO_RETRY):
    return boto3.client("s3", endpoint_url=proxy.url, config=config)


def raw(proxy: FaultProxy, method: str, path: str, body: bytes | None = None, **kw):
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
    try:
        conn.request(method, path, body=body, **kw)
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


def test_pass_through_keep_alive_and_counters(proxy: FaultProxy) -> None:
    s3 = client(proxy)
    data = bytes(range(256)) * 400
    s3.put_object(Bucket=BUCKET, Key="a/obj", Body=data)
    for _ in range(5):
        assert s3.get_object(Bucket=BUCKET, Key="a/obj")["Body"].read() == data
    assert s3.head_object(Bucket=BUCKET, Key="a/obj")["ContentLength"] == len(data)
    assert [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix="a/")["Contents"]] == [
        "a/obj"
    ]
    stats = proxy.stats()
    assert stats["requests"] == {"PUT": 1, "GET": 6, "HEAD": 1}
    assert stats["faults"] == {} and stats["connections"] == 1  # one kept-alive connection
    proxy.reset_counters()
    assert proxy.stats() == {"requests": {}, "faults": {}, "connections": 0}


def test_s3fs_through_the_proxy(proxy: FaultProxy, monkeypatch) -> None:
    from covidray import storage

    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    uris = [f"s3://{BUCKET}/fs/{i}.bin" for i in range(4)]
    for i, uri in enumerate(uris):
        storage.write_bytes(uri, bytes([i]) * 5000)
    assert storage.read_many(uris) == [bytes([i]) * 5000 for i in range(4)]
    assert storage.size(uris[0]) == 5000
    assert proxy.stats()["requests"]["PUT"] == 4 and proxy.stats()["requests"]["GET"] >= 4


def test_chunked_both_ways(proxy: FaultProxy, moto_url: str) -> None:
    parts = [b"x" * 1000, b"y" * 3000, b"z"]
    status, _, _ = raw(proxy, "PUT", f"/{BUCKET}/chunked", body=iter(parts), encode_chunked=True)
    assert status == 200
    got = boto3.client("s3", endpoint_url=moto_url).get_object(Bucket=BUCKET, Key="chunked")
    assert got["Body"].read() == b"".join(parts)

    class Chunked(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for part in parts:
                self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
            self.wfile.write(b"0\r\n\r\n")

        def log_message(self, *args) -> None:
            pass

    upstream = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Chunked)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    try:
        with FaultProxy(f"http://127.0.0.1:{upstream.server_address[1]}") as p:
            status, headers, body = raw(p, "GET", "/any")
        assert (status, body, headers["Content-Length"]) == (200, b"".join(parts), "4001")
    finally:
        upstream.shutdown()
        upstream.server_close()


def test_http503_with_retry_after_and_duration(proxy: FaultProxy) -> None:
    proxy.set_fault("http503", retry_after=3)
    status, headers, body = raw(proxy, "GET", f"/{BUCKET}/missing")
    assert status == 503 and headers["Retry-After"] == "3" and b"<Code>SlowDown</Code>" in body
    proxy.reset_counters()
    s3 = client(proxy, Config(retries={"mode": "standard", "total_max_attempts": 3}))
    with pytest.raises(ClientError, match="SlowDown"):
        s3.put_object(Bucket=BUCKET, Key="never", Body=b"1")
    with pytest.raises(ClientError, match="503"):  # an answer to HEAD has no body ...
        s3.head_object(Bucket=BUCKET, Key="never")
    stats = proxy.stats()  # botocore tried 3 times each, on one kept-alive connection
    assert stats["faults"] == {"http503": 6} and stats["connections"] == 1
    proxy.set_fault("http503", duration=0.5)
    time.sleep(0.6)  # the window is over
    s3.put_object(Bucket=BUCKET, Key="later", Body=b"1")


def test_reset_share_and_method_filter(proxy: FaultProxy) -> None:
    s3 = client(proxy)
    proxy.set_fault("reset", methods=["GET"])
    s3.put_object(Bucket=BUCKET, Key="r", Body=b"r")  # PUTs pass
    with pytest.raises(ConnectionClosedError):
        s3.get_object(Bucket=BUCKET, Key="r")
    proxy.set_fault("reset", share=0.5, path_prefix=f"/{BUCKET}/r")
    failed = 0
    for _ in range(40):
        try:
            s3.get_object(Bucket=BUCKET, Key="r")["Body"].read()
        except ConnectionClosedError:
            failed += 1
    assert 8 <= failed <= 32
    assert proxy.stats()["faults"]["reset"] == failed + 1
    s3.head_bucket(Bucket=BUCKET)  # outside the path prefix: never reset (path is /BUCKET)


def test_slow(proxy: FaultProxy) -> None:
    s3 = client(proxy)
    s3.put_object(Bucket=BUCKET, Key="s", Body=b"s")
    proxy.set_fault("slow", delay=0.8)
    t0 = time.monotonic()
    assert s3.get_object(Bucket=BUCKET, Key="s")["Body"].read() == b"s"
    assert time.monotonic() - t0 >= 0.8
    quick = client(proxy, NO_RETRY.merge(Config(read_timeout=0.3)))
    with pytest.raises(Exception, match="Read timeout"):
        quick.get_object(Bucket=BUCKET, Key="s")


def put_expecting_100(proxy: FaultProxy, key: str, body: bytes, wait: float = 5) -> bytes:
    """A PUT with ``Expect: 100-continue`` as aiobotocore sends it; returns what came back."""
    head = f"PUT /{BUCKET}/{key} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=wait) as s:
        s.sendall(head.encode() + b"Expect: 100-continue\r\n\r\n")
        got = s.recv(100)
        if got != b"HTTP/1.1 100 Continue\r\n\r\n":
            return got
        s.sendall(body)
        return got + s.recv(1000)


def test_expect_100_continue_and_stall(proxy: FaultProxy) -> None:
    assert put_expecting_100(proxy, "e", b"abcd").split(b"\r\n\r\n")[1].startswith(b"HTTP/1.1 200")
    proxy.set_fault("drop_mid_body", methods=["PUT"])
    with pytest.raises(ConnectionError):  # reset, or broken pipe while sending
        put_expecting_100(proxy, "e", b"x" * 100000)
    proxy.set_fault("stall", delay=1.0)
    t0 = time.monotonic()
    with pytest.raises(ConnectionResetError):  # nothing for 1 s, then a reset
        put_expecting_100(proxy, "e", b"abcd")
    assert time.monotonic() - t0 >= 1.0
    with pytest.raises(Exception, match="Read timeout"):
        client(proxy, NO_RETRY.merge(Config(read_timeout=0.3))).get_object(Bucket=BUCKET, Key="e")
    assert proxy.stats()["faults"] == {"drop_mid_body": 1, "stall": 2}


def test_drop_mid_body(proxy: FaultProxy, moto_url: str) -> None:
    s3 = client(proxy)
    s3.put_object(Bucket=BUCKET, Key="d", Body=b"d" * 10000)
    proxy.set_fault("drop_mid_body", methods=["GET"])
    with pytest.raises(ResponseStreamingError, match="5000 bytes read, 5000 more expected"):
        s3.get_object(Bucket=BUCKET, Key="d")["Body"].read()
    proxy.set_fault("drop_mid_body", methods=["PUT"])
    with pytest.raises(ConnectionClosedError):
        s3.put_object(Bucket=BUCKET, Key="cut", Body=b"c" * 100000)
    direct = boto3.client("s3", endpoint_url=moto_url)
    with pytest.raises(ClientError, match="404"):
        direct.head_object(Bucket=BUCKET, Key="cut")  # nothing reached the server


def test_outage_refuses_then_recovers(proxy: FaultProxy) -> None:
    s3 = client(proxy)
    s3.put_object(Bucket=BUCKET, Key="o", Body=b"o")  # an open keep-alive connection
    proxy.set_fault("outage", duration=1.0)
    with pytest.raises(EndpointConnectionError):
        s3.get_object(Bucket=BUCKET, Key="o")
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", proxy.port), timeout=2).close()
    time.sleep(1.2)
    assert s3.get_object(Bucket=BUCKET, Key="o")["Body"].read() == b"o"
    assert proxy.stats()["faults"] == {"outage": 1}
    with pytest.raises(ValueError, match="unknown fault"):
        proxy.set_fault("flaky")
