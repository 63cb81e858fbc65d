"""Worker environment of the Ray processes the library starts."""

from __future__ import annotations

import os

import pytest

from covidray.raycluster import MALLOC_TUNABLES, worker_runtime_env


def test_runtime_env_carries_malloc_tunables_unless_set(monkeypatch) -> None:
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    env = worker_runtime_env({"X": "1"})["env_vars"]
    expected = {**MALLOC_TUNABLES, "AWS_ENDPOINT_URL": "http://127.0.0.1:9", "X": "1"}
    assert expected.items() <= env.items()
    assert all(k in expected or k.startswith("AWS_") for k in env)
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=2")  # the operator's choice wins
    assert "GLIBC_TUNABLES" not in worker_runtime_env()["env_vars"]


@pytest.mark.usefixtures("ray_cluster")
def test_ray_workers_start_with_the_tunables() -> None:
    import ray

    @ray.remote(num_cpus=0)
    def tunables() -> str | None:
        return os.environ.get("GLIBC_TUNABLES")

    expected = os.environ.get("GLIBC_TUNABLES") or MALLOC_TUNABLES["GLIBC_TUNABLES"]
    assert ray.get(tunables.remote()) == expected
