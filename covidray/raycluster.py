"""Connecting to Ray: an existing cluster when ``RAY_ADDRESS`` says so, else a local one."""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

from . import storage

# glibc's malloc hands a large tensor's memory back to the kernel when it is freed, and the
# next step faults it in again page by page: about 200k page faults per training step of
# lite0 at 256 px here. With transparent huge pages for malloc'd memory (glibc >= 2.35; older
# or other C libraries ignore the setting) that drops to a few thousand and a step gets about
# 12 % faster. Read when a process starts: so it is passed to Ray's worker processes.
MALLOC_TUNABLES = {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}


def reexec_with_malloc_tunables() -> None:
    """Restart this process (same interpreter and argv) with :data:`MALLOC_TUNABLES` unless
    ``GLIBC_TUNABLES`` is set. For benchmarks, whose in-process baselines must run with the
    allocator settings of the Ray workers they are compared with."""
    if "GLIBC_TUNABLES" not in os.environ:
        sys.stdout.flush()
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **MALLOC_TUNABLES})


def worker_runtime_env(extra: dict[str, str] | None = None) -> dict:
    """Runtime env for tasks and actors: this process's AWS settings, the malloc tunables
    (unless ``GLIBC_TUNABLES`` is set here already), plus ``extra``."""
    tunables = {} if "GLIBC_TUNABLES" in os.environ else MALLOC_TUNABLES
    return {"env_vars": {**tunables, **storage.aws_env(), **(extra or {})}}


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago on ``host``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def ensure_ray(num_cpus: int | None = None, *, log_to_driver: bool = True) -> None:
    """Initialise Ray once: join ``RAY_ADDRESS`` if set, otherwise start a local cluster.

    A local cluster gets a loopback-only dashboard on a free port, and its workers are told
    that port (``RAY_API_SERVER_ADDRESS``). Ray Train's placement-group cleaner polls Ray's
    state API every second; without the dashboard it warns on every poll, and with a second
    Ray on the same machine it cannot tell which one it belongs to and may remove a live
    run's placement group (killing its workers).
    """
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    kwargs: dict = {"ignore_reinit_error": True, "log_to_driver": log_to_driver}
    if address:
        ray.init(address=address, runtime_env=worker_runtime_env(), **kwargs)
        return
    port = free_port()
    ray.init(
        num_cpus=num_cpus,
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        dashboard_port=port,
        runtime_env=worker_runtime_env({"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"}),
        **kwargs,
    )


@contextlib.contextmanager
def checkpoint_dir(checkpoint: Any) -> Iterator[str]:
    """A local folder holding a Ray Train checkpoint's files, private to this process.

    ``Checkpoint.as_directory()`` downloads a remote checkpoint into a folder named after the
    checkpoint's id, shared by every process on the node that holds a copy of the same
    Checkpoint object, as all workers of a restarted group do. It downloads whenever no other
    process is downloading at that moment: a worker arriving after another's download has
    finished downloads again into the same folder, rewriting the files the first one may still
    be reading (``torch.load``: "PytorchStreamReader failed reading file ... file read failed"),
    and the last one out deletes the folder. Here each process downloads its own copy, removed
    on exit; a local checkpoint is read in place, as Ray does.
    """
    import pyarrow.fs

    if isinstance(checkpoint.filesystem, pyarrow.fs.LocalFileSystem):
        yield checkpoint.path
        return
    with tempfile.TemporaryDirectory(prefix="covidray-restore-") as tmp:
        yield checkpoint.to_directory(tmp)


def report_with_checkpoint(
    metrics: dict[str, Any], save: Callable[[str], None] | None, prefix: str = "covidray-ckpt-"
) -> None:
    """``ray.train.report`` from a Train worker; ``save(folder)`` (rank 0 only, others pass
    None) writes the checkpoint's files into a temporary folder that Ray then persists."""
    import ray.train

    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        checkpoint = None
        if save is not None:
            save(tmp)
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=checkpoint)
