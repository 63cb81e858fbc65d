"""``covidray serve``: the application on a local Ray (or ``RAY_ADDRESS``'s), until Ctrl-C."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable

from .config import ServingConfig

APP_NAME = "covidray"


def run_local(
    cfg: ServingConfig, host: str, port: int, on_ready: Callable[[str], None] | None = None
) -> None:
    """Start Serve's HTTP proxy on ``host:port``, deploy the application, call
    ``on_ready(url)`` and block until SIGINT or SIGTERM; then remove the application, stop
    Serve and, for a Ray started here, Ray itself."""
    import ray
    from ray import serve

    from covidray.runtime.cluster import ensure_ray

    from .app import build_app

    started_ray = not ray.is_initialized()
    ensure_ray()
    stop = threading.Event()
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(build_app(cfg.model_dump(mode="json")), name=APP_NAME, route_prefix="/")
        if on_ready is not None:
            on_ready(f"http://{host}:{port}")
        stop.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        serve.shutdown()
        if started_ray:
            ray.shutdown()
