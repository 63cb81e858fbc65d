"""``build_app``: the Serve application (``serving/config.yaml``'s import path)."""

from __future__ import annotations

from typing import Any

from ray.serve import Application

from covidray.runtime.train import worker_env

from .config import ServingConfig
from .deployments import CxrModel, Ingress


def build_app(args: dict[str, Any]) -> Application:
    """The ingress bound to an autoscaled, batched model deployment (``args``: the fields of
    :class:`~serving.config.ServingConfig`)."""
    cfg = ServingConfig.model_validate(args)
    dumped = cfg.model_dump(mode="json")
    backpressure = {"status_code": 503, "retry_after_s": cfg.retry_after_s}
    model = CxrModel.options(
        autoscaling_config={
            "min_replicas": cfg.min_replicas,
            "initial_replicas": max(1, cfg.min_replicas),
            "max_replicas": cfg.max_replicas,
            "target_ongoing_requests": cfg.target_ongoing_requests,
        },
        max_ongoing_requests=cfg.max_ongoing_requests,
        max_queued_requests=cfg.max_queued_requests,
        backpressure_config=backpressure,
        # The workers' environment (allocator, OpenMP wait policy, storage settings).
        ray_actor_options={
            "num_cpus": cfg.num_cpus,
            "num_gpus": cfg.num_gpus,
            "runtime_env": worker_env(),
        },
    ).bind(dumped)
    return Ingress.options(
        num_replicas=cfg.ingress_replicas,
        max_ongoing_requests=cfg.ingress_max_ongoing_requests,
        max_queued_requests=cfg.max_queued_requests,
        backpressure_config=backpressure,
        ray_actor_options={"num_cpus": cfg.ingress_num_cpus, "runtime_env": worker_env()},
    ).bind(model, dumped)
