"""Connecting to Ray and the environment of every process it starts for covidray.

``ensure_ray`` joins ``RAY_ADDRESS`` when set (a cluster, or the cluster a submitted job runs
on) and starts a local Ray of its own otherwise: never one it finds on the machine (Ray's
``ray.init()`` without an address joins the last ``ray start`` it finds there). Every task,
actor and Train worker gets :func:`worker_runtime_env`: the *non-secret* storage settings of
this process (endpoint, region, profile name; never keys or tokens, which Ray's dashboard and
state API would show) and the allocator tunables. Credentials reach workers the way they reach
any process on the node: its own environment, the instance or pod identity, or a mounted file.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from .. import storage

T = TypeVar("T")
R = TypeVar("R")

# glibc's malloc hands a large tensor's memory back to the kernel when it is freed, and the
# next step faults it in again page by page. With transparent huge pages for malloc'd memory
# (glibc >= 2.35; older or other C libraries ignore the setting) that mostly stops (the README
# has the measured effect). Read when a process starts: so it is passed to Ray's workers.
MALLOC_TUNABLES = {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
# Set by Ray's job manager in a submitted job's driver: the job's config, its runtime env too.
JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"
# Ray resolves a node address of 127.0.0.1 to the machine's routable address (and binds its
# metrics exporter and servers to every interface) unless this is off; it is read when Ray is
# imported. Off, a local Ray is the single-machine Ray that macOS and Windows get by default.
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def reexec_with_malloc_tunables() -> None:
    """Restart this process (same interpreter and argv) with :data:`MALLOC_TUNABLES` unless
    ``GLIBC_TUNABLES`` is set. For benchmarks, whose in-process baselines must run with the
    allocator settings of the Ray workers they are compared with."""
    if "GLIBC_TUNABLES" not in os.environ:
        sys.stdout.flush()
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **MALLOC_TUNABLES})


def job_env_vars() -> dict[str, str]:
    """The ``env_vars`` of the runtime env this process's job was submitted with ({} outside
    a submitted job). Ray gives them to every worker of the job already."""
    raw = os.environ.get(JOB_CONFIG_ENV)
    if not raw:
        return {}
    try:
        env = (json.loads(raw).get("runtime_env") or {}).get("env_vars") or {}
    except (ValueError, AttributeError):
        return {}
    return {str(k): str(v) for k, v in env.items()}


def worker_runtime_env(extra: dict[str, str] | None = None) -> dict:
    """Runtime env for tasks, actors and Train workers: this process's non-secret storage
    settings (:func:`covidray.storage.aws_settings`), the malloc tunables (unless
    ``GLIBC_TUNABLES`` is set here already), plus ``extra``; less any variable the submitted
    job's own runtime env sets (Ray refuses to merge the same key twice, and the job's value
    reaches the workers anyway)."""
    tunables = {} if "GLIBC_TUNABLES" in os.environ else MALLOC_TUNABLES
    env = {**tunables, **storage.aws_settings(), **(extra or {})}
    job = job_env_vars()
    return {"env_vars": {k: v for k, v in env.items() if k not in job}}


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago on ``host``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def ensure_ray(num_cpus: int | None = None, *, log_to_driver: bool = True) -> None:
    """Initialise Ray once: join ``RAY_ADDRESS`` if set, otherwise start a local cluster of
    this process's own (``address="local"``: without it Ray joins the cluster whose address the
    last ``ray start`` on this machine recorded, someone else's).

    A local cluster lives on 127.0.0.1 (node address, metrics exporter, dashboard): the
    embedded default serves this machine only. Its dashboard takes a free port, and its
    workers are told that port (``RAY_API_SERVER_ADDRESS``). Ray Train's placement-group
    cleaner polls Ray's state API every second; without the dashboard it warns on every poll,
    and with a second Ray on the same machine it cannot tell which one it belongs to and may
    remove a live run's placement group (killing its workers).
    """
    address = os.environ.get("RAY_ADDRESS")
    if not address and "ray" not in sys.modules:
        for key, value in LOOPBACK_ENV.items():
            os.environ.setdefault(key, value)
    import ray

    from .logs import ray_started  # a command's output routing: Ray's output to its log file

    if ray.is_initialized():
        ray_started()
        return
    kwargs: dict = {"ignore_reinit_error": True, "log_to_driver": log_to_driver}
    if address:
        ray.init(address=address, runtime_env=worker_runtime_env(), **kwargs)
        ray_started()
        return
    port = free_port()
    ray.init(
        address="local",
        num_cpus=num_cpus,
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        dashboard_port=port,
        runtime_env=worker_runtime_env({"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"}),
        **kwargs,
    )
    ray_started()


def cluster_has_gpus() -> bool:
    """Whether the connected Ray cluster has at least one GPU."""
    import ray

    return ray.cluster_resources().get("GPU", 0) >= 1


def map_chunks(
    fn: Callable[..., list[R]],
    chunks: Sequence[Sequence[T]],
    *args: Any,
    progress: Callable[[int, int], None] | None = None,
    max_retries: int = 2,
    on_error: Callable[[Sequence[T], Exception], list[R]] | None = None,
) -> list[R]:
    """``fn(chunk, *args)`` for every chunk as a one-CPU Ray task with the workers' env,
    concatenated in chunk order; ``progress(items done, items total)`` as chunks finish.

    A task that fails (its exception, or its worker died ``max_retries + 1`` times) raises
    here, unless ``on_error(chunk, error)`` gives that chunk's results instead."""
    import ray

    ensure_ray()
    task = ray.remote(num_cpus=1, max_retries=max_retries)(fn).options(
        runtime_env=worker_runtime_env()
    )
    pending = {task.remote(chunk, *args): len(chunk) for chunk in chunks}
    order = list(pending)
    chunk_of = dict(zip(order, chunks, strict=True))
    total = sum(pending.values())
    results: dict[Any, list[R]] = {}
    done = 0
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        for ref in ready:
            try:
                results[ref] = ray.get(ref)
            except Exception as err:  # RayTaskError, WorkerCrashedError, ...
                if on_error is None:
                    raise
                results[ref] = on_error(chunk_of[ref], err)
            done += pending.pop(ref)
            if progress:
                progress(done, total)
    return [r for ref in order for r in results[ref]]


def call_on_worker(
    fn: Callable[..., R],
    *args: Any,
    num_gpus: int = 0,
    runtime_env: dict | None = None,
    near_driver: bool = False,
) -> R:
    """Run ``fn(*args)`` once in a one-CPU Ray task (``num_gpus`` GPUs; on the driver's node
    when ``near_driver``, e.g. to write a local folder) and return its result."""
    import ray

    options: dict[str, Any] = {
        "num_cpus": 1,
        "num_gpus": num_gpus,
        "runtime_env": runtime_env or worker_runtime_env(),
        "max_retries": 1,
    }
    if near_driver:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        node = ray.get_runtime_context().get_node_id()
        options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node, soft=True)
    return ray.get(ray.remote(fn).options(**options).remote(*args))
