"""A small concurrent HTTP client for the endpoint: the load generator of ``bench/serve.py``
and of the replica-kill test. Standard library only (threads and urllib)."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Outcome:
    """One request as the client saw it (after ``retries`` extra attempts at most)."""

    status: int  # HTTP status of the last attempt; 0 when no answer came back
    latency_s: float  # first attempt's start to last attempt's end
    attempts: int
    retry_after: str | None = None
    body: dict[str, Any] | None = None
    error: str | None = None  # a transport error (timeout, reset)
    statuses: list[int] = field(default_factory=list)  # every attempt's status


def post_image(
    url: str,
    data: bytes,
    content_type: str = "image/png",
    *,
    token: str | None = None,
    timeout: float = 60,
    retries: int = 0,
) -> Outcome:
    """POST one image; a 503 (or a dropped connection) is retried up to ``retries`` times
    after its Retry-After (at most 2 s here)."""
    headers = {"Content-Type": content_type}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    start, statuses = time.perf_counter(), []
    for attempt in range(retries + 1):
        status, retry_after, body, error = _once(url, data, headers, timeout)
        statuses.append(status)
        if status not in (0, 503) or attempt == retries:
            break
        time.sleep(min(2.0, float(retry_after or 1)))
    return Outcome(
        status, time.perf_counter() - start, len(statuses), retry_after, body, error, statuses
    )


def _once(
    url: str, data: bytes, headers: dict[str, str], timeout: float
) -> tuple[int, str | None, dict[str, Any] | None, str | None]:
    request = urllib.request.Request(url, data=data, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return r.status, None, json.loads(r.read() or b"null"), None
    except urllib.error.HTTPError as err:
        try:
            body = json.loads(err.read() or b"null")
        except ValueError:
            body = None
        return err.code, err.headers.get("Retry-After"), body, None
    except (OSError, ValueError) as err:  # refused, reset, timed out
        return 0, None, None, f"{type(err).__name__}: {err}"


def run_load(
    url: str,
    images: Sequence[bytes],
    *,
    concurrency: int,
    requests: int,
    token: str | None = None,
    timeout: float = 60,
    retries: int = 0,
) -> tuple[list[Outcome], float]:
    """``requests`` POSTs of ``images`` (round robin) from ``concurrency`` threads;
    returns the outcomes and the wall time."""
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        futures = [
            pool.submit(
                post_image,
                url,
                images[i % len(images)],
                token=token,
                timeout=timeout,
                retries=retries,
            )
            for i in range(requests)
        ]
        outcomes = [f.result() for f in futures]
    return outcomes, time.perf_counter() - start
