"""Connecting to Ray: an existing cluster when ``RAY_ADDRESS`` says so, else a local one."""

from __future__ import annotations

import os

from . import storage


def worker_runtime_env() -> dict:
    """Runtime env for tasks and actors: forward this process's AWS settings to workers."""
    env = storage.aws_env()
    return {"env_vars": env} if env else {}


def ensure_ray(num_cpus: int | None = None) -> None:
    """Initialise Ray once: join ``RAY_ADDRESS`` if set, otherwise start a local cluster."""
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    kwargs: dict = {"ignore_reinit_error": True, "log_to_driver": True}
    if address:
        ray.init(address=address, runtime_env=worker_runtime_env() or None, **kwargs)
    else:
        ray.init(
            num_cpus=num_cpus,
            include_dashboard=False,
            runtime_env=worker_runtime_env() or None,
            **kwargs,
        )
