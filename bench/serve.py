"""Endpoint throughput: the Serve application under a bounded load from 127.0.0.1, against the
offline Predictor on the same decoded images, in the same run.

    .venv/bin/python bench/serve.py [--n 64] [--concurrency 1 8 32] [--requests-per-client 12]

Model: the default, efficientnet_lite0 at its default input size (320), random weights (the
speed is the architecture's), Grad-CAM on. One model replica with a torch thread per core,
max_batch_size 16. For each concurrency the client (threads in this process, urllib, no
retries) posts the PNGs round robin; the table gives throughput, p50/p95/p99 latency and the
batch sizes the server formed: the images scored over the batches Serve counted
(``ray_serve_batches_processed`` on Ray's Prometheus exporter, its change during the phase).
Offline:
``Predictor.predict`` with CAM on the same images decoded once, in batches of 16. The client's
threads and the server share this machine's cores. The last line
is ``RESULT {json}`` with ``saturated_img_s`` (the best concurrency's), ``offline_img_s``,
``saturated_vs_offline`` and ``mean_batch_at_32``.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("RAY_metrics_report_interval_ms", "1000")  # metrics within a second

import argparse
import json
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from covidray.modeldir import ModelCard, read_card, save_model_dir  # noqa: E402
from covidray.models import build_model  # noqa: E402
from covidray.predict import Predictor  # noqa: E402
from covidray.preprocess import prepare_bytes  # noqa: E402
from covidray.runtime.cluster import free_port, reexec_with_malloc_tunables  # noqa: E402
from covidray.runtime.threads import physical_cores  # noqa: E402
from covidray.train.config import TrainConfig  # noqa: E402
from serving.client import run_load  # noqa: E402

SHARED = REPO.parent / "shared" / "data" / "cxr"
BATCH = 16


def images(n: int) -> tuple[list[bytes], str]:
    if (SHARED / "images").is_dir():
        paths = sorted((SHARED / "images").rglob("*.png"))[:n]
        if len(paths) == n:
            return [p.read_bytes() for p in paths], f"real X-rays ({SHARED})"
    from covidray.synth import write_phantoms

    tmp = tempfile.mkdtemp(prefix="bench-serve-")
    write_phantoms(tmp, n_per_class=-(-n // 3), seed=0, size=256)
    paths = sorted(Path(tmp, "images").rglob("*.png"))[:n]
    return [p.read_bytes() for p in paths], "phantoms (256 px)"


def default_model(folder: str) -> str:
    """The shipped architecture at its default input size, random weights."""
    cfg = TrainConfig(data="-", out="-")
    torch.manual_seed(0)
    model = build_model(cfg.backbone, weights=None, head=cfg.head)
    save_model_dir(
        model, ModelCard.for_model(model, cfg.input_size, tta_hflip=cfg.tta_hflip), folder
    )
    return folder


def offline(model_dir: str, blobs: list[bytes], rounds: int = 3) -> float:
    card = read_card(model_dir)
    decoded = np.stack([prepare_bytes(b, card.preprocessing) for b in blobs])[:, None]
    predictor = Predictor.from_dir(model_dir, device="cpu", threads=physical_cores())
    predictor.predict(decoded[:BATCH])  # warm-up
    t0 = time.perf_counter()
    for _ in range(rounds):
        for i in range(0, len(decoded), BATCH):
            predictor.predict(decoded[i : i + BATCH], with_cam=True)
    return rounds * len(decoded) / (time.perf_counter() - t0)


def batches_formed() -> float:
    """Serve's count of batches its model deployment ran (``ray_serve_batches_processed``),
    over every alive node. (The batch-size histogram's exported sum is approximate: Ray's
    exporter sums bucket midpoints; the count of batches is exact.)"""
    import ray

    total = 0.0
    for node in ray.nodes():
        if not node["Alive"]:
            continue
        url = f"http://127.0.0.1:{node['MetricsExportPort']}/metrics"
        with urllib.request.urlopen(url, timeout=10) as r:
            for line in r.read().decode().splitlines():
                if line.startswith("ray_serve_batches_processed"):
                    total += float(line.rsplit(" ", 1)[1])
    return total


def settled() -> float:
    """The batch count once three scrapes 1.5 s apart agree (Ray exports on an interval)."""
    seen: list[float] = []
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        seen.append(batches_formed())
        if len(seen) >= 3 and len(set(seen[-3:])) == 1:
            break
        time.sleep(1.5)
    return seen[-1]


def main(argv: list[str] | None = None) -> int:
    reexec_with_malloc_tunables()  # the Ray workers' allocator settings, here too
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=64, help="distinct images posted round robin")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--requests-per-client", type=int, default=12)
    args = ap.parse_args(argv)

    import ray
    from ray import serve

    from covidray.runtime.cluster import ensure_ray
    from serving.app import build_app

    cores = physical_cores()
    load0 = os.getloadavg()
    print(f"{cores} physical cores; load average {load0[0]:.1f} {load0[1]:.1f} {load0[2]:.1f}")
    blobs, source = images(args.n)
    print(f"{len(blobs)} images: {source}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        model_dir = default_model(os.path.join(tmp, "model"))
        card = read_card(model_dir)
        print(f"model: {card.backbone} at {card.preprocessing.input_size} px, CAM on", flush=True)
        offline_img_s = offline(model_dir, blobs)
        print(f"offline Predictor (batches of {BATCH}, {cores} threads): {offline_img_s:.1f} img/s")

        ensure_ray()
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = build_app(
            {
                "model": model_dir,
                "max_batch_size": BATCH,
                "min_replicas": 1,
                "max_replicas": 1,
                "threads": cores,
                "max_queued_requests": 256,
            }
        )
        serve.run(app, name="bench", route_prefix="/")
        url = f"http://127.0.0.1:{port}/v1/predict?cam=png"
        run_load(url, blobs[:8], concurrency=4, requests=16)  # warm-up
        rows = []
        for c in args.concurrency:
            n = c * args.requests_per_client
            before = settled()
            outcomes, wall = run_load(url, blobs, concurrency=c, requests=n)
            ok = [o for o in outcomes if o.status == 200]
            lat = np.array([o.latency_s for o in ok]) * 1000
            batches = settled() - before
            rows.append(
                {
                    "concurrency": c,
                    "requests": n,
                    "ok": len(ok),
                    "img_s": len(ok) / wall,
                    "p50_ms": float(np.percentile(lat, 50)) if len(lat) else None,
                    "p95_ms": float(np.percentile(lat, 95)) if len(lat) else None,
                    "p99_ms": float(np.percentile(lat, 99)) if len(lat) else None,
                    "batches": batches,
                    "mean_batch": len(ok) / batches if batches else None,
                }
            )
            r = rows[-1]
            print(
                f"concurrency {c:>3}: {r['ok']}/{n} ok, {r['img_s']:.1f} img/s, latency p50 "
                f"{r['p50_ms']:.0f} / p95 {r['p95_ms']:.0f} / p99 {r['p99_ms']:.0f} ms, "
                f"mean batch {r['mean_batch'] or 0:.1f}",
                flush=True,
            )
        serve.shutdown()
        ray.shutdown()
    saturated = max(r["img_s"] for r in rows)
    at32 = next((r["mean_batch"] for r in rows if r["concurrency"] == 32), None)
    result = {
        "rows": rows,
        "saturated_img_s": round(saturated, 2),
        "offline_img_s": round(offline_img_s, 2),
        "saturated_vs_offline": round(saturated / offline_img_s, 3),
        "mean_batch_at_32": None if at32 is None else round(at32, 2),
    }
    print("RESULT " + json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
