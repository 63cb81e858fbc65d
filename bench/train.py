"""Ray Train overhead: an epoch on 1 Ray Train worker against the same epoch in a plain loop.

    .venv/bin/python bench/train.py [--data DIR] [--backbone efficientnet_lite0]
        [--weights imagenet] [--epochs 2] [--batch-size 16] [--input-size 224] [--threads N]

Both sides run the library's own training step, ``covidray.train.loop.train_one_epoch``, on one
``TrainConfig``, with the same data shard, model, optimizer, schedule, seeds and torch threads:

plain  in this process, without Ray: ``load_worker_data`` (rank 0 of 1), ``build_training``,
       then per epoch ``train_one_epoch`` (timed: wall and CPU seconds) and the validation
       pass ``predict_probs`` (timed separately).
ray    ``run_training`` with ``workers=1``: a real ``TorchTrainer`` run (checkpoints, metrics
       reports, then the final evaluation and model directory, which are not timed). Per-epoch
       ``train_s`` (``train_one_epoch`` alone), ``epoch_s`` (train + validation) and their CPU
       seconds come back in ``TrainResult.history``.

The plain loop runs first by default, before Ray is started (``--order ray-first`` swaps
them); Ray is shut down as soon as its run ends. Epoch 1 pays warm-up (oneDNN primitives,
allocator growth), so the last epoch is the timed one; every epoch is shown. ``ratio`` is Ray's
train seconds over the plain loop's for the timed epoch (1.0: no overhead); ``epoch_ratio``
compares train + validation. On a shared machine run it more than once; the load average is
printed.

Data: ``--data`` (an ingested dataset, or a raw folder, which is ingested into a temporary
folder first); else ``../shared/data/cxr`` when present, ingested; else phantoms
(``--phantoms`` per class, also the way to force phantoms), synthesized and ingested. The last
line is ``RESULT {json}``.
"""

from __future__ import annotations

import os

# Before torch loads OpenMP: idle threads sleep instead of spinning (the Ray workers get the
# same through covidray.runtime.train.worker_env, which forwards this process's value).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import math
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from covidray import storage  # noqa: E402
from covidray.config import IngestConfig  # noqa: E402
from covidray.ingest import ingest  # noqa: E402
from covidray.predict import predict_probs  # noqa: E402
from covidray.runtime.cluster import reexec_with_malloc_tunables  # noqa: E402
from covidray.runtime.threads import threads_per_worker  # noqa: E402
from covidray.train.config import TrainConfig  # noqa: E402
from covidray.train.loop import (  # noqa: E402
    build_training,
    epoch_seed,
    load_worker_data,
    train_one_epoch,
)

SHARED = REPO.parent / "shared" / "data" / "cxr"


def prepare_data(args: argparse.Namespace, work: str) -> tuple[str, str]:
    """``(dataset folder, description)``: an ingested dataset the training can read."""
    if args.data and storage.exists(storage.join(args.data, "manifest.parquet")):
        return args.data, args.data
    dest = os.path.join(work, "dataset")
    t0 = time.perf_counter()
    if args.data or (args.phantoms is None and (SHARED / "manifest.csv").exists()):
        src = args.data or str(SHARED)
        size = max(256, args.input_size)
        what = f"{src} (ingested at {size} px)"
    else:
        from covidray.synth import write_phantoms

        src = os.path.join(work, "phantoms")
        size = max(64, args.input_size)
        write_phantoms(src, args.phantoms or 40, seed=0, size=size)
        what = f"phantoms, {args.phantoms or 40} per class at {size} px"
    # Ingest in this process (no Ray tasks): Ray must not be running before the plain loop.
    result = ingest(IngestConfig(src=src, dest=dest, size=size, parallel_threshold=10**9))
    print(
        f"data: {what}: {result.n_rows} images in {time.perf_counter() - t0:.0f} s -> {dest}",
        flush=True,
    )
    return dest, what


def run_plain(cfg: TrainConfig, device: torch.device) -> dict[str, Any]:
    """The training step loop in this process, as one Ray Train worker of one would run it."""
    cuda = device.type == "cuda"
    torch.set_num_threads(cfg.torch_threads or threads_per_worker(1))
    t0 = time.perf_counter()
    data = load_worker_data(cfg, rank=0, world=1)
    load_s = time.perf_counter() - t0
    parts = build_training(cfg, data.sampler.steps, device)
    model = parts.model.to(device)  # what prepare_model does for one worker
    epochs = []
    for epoch in range(cfg.epochs):
        torch.manual_seed(epoch_seed(cfg.seed, epoch, 0))
        t, cpu = time.perf_counter(), time.process_time()
        loss_sum, seen = train_one_epoch(
            parts, data.sampler.batches(epoch, 0), data.train_x, data.train_y, device, epoch=epoch
        )
        train_s, train_cpu_s = time.perf_counter() - t, time.process_time() - cpu
        t_val = time.perf_counter()
        predict_probs(
            model,
            data.val_x,
            batch_size=cfg.eval_batch_size,
            tta_hflip=cfg.tta_hflip,
            device=device,
            autocast=cuda,
        )
        val_s = time.perf_counter() - t_val
        epochs.append(
            {
                "train_s": train_s,
                "train_cpu_s": train_cpu_s,
                "epoch_s": train_s + val_s,
                "train_loss": loss_sum / max(1, seen),
                "images": seen,
            }
        )
        print(f"plain epoch {epoch + 1}/{cfg.epochs}: train {train_s:.2f} s", flush=True)
    return {"epochs": epochs, "data_load_s": load_s}


def run_ray(cfg: TrainConfig) -> dict[str, Any]:
    """``run_training`` with one worker; per-epoch metrics from its history."""
    import ray

    from covidray.cli.render import epoch_printer, train_epoch_line
    from covidray.train.trainer import run_training

    t0 = time.perf_counter()
    try:
        result = run_training(cfg, on_epoch=epoch_printer(cfg.epochs, train_epoch_line))
    finally:
        ray.shutdown()
    wall_s = time.perf_counter() - t0
    history = sorted(result.history, key=lambda h: h["epoch"])
    steps = [h["adam_step"] - h["adam_step_at_start"] for h in history[:1]]
    steps += [b["adam_step"] - a["adam_step"] for a, b in zip(history, history[1:], strict=False)]
    epochs = [
        {
            "train_s": h["train_s"],
            "train_cpu_s": h["train_cpu_s"],
            "epoch_s": h["epoch_s"],
            "epoch_cpu_s": h["epoch_cpu_s"],
            "train_loss": h["train_loss"],
            "images": n * cfg.batch_size,
        }
        for h, n in zip(history, steps, strict=True)
    ]
    return {
        "epochs": epochs,
        "data_load_s": history[0]["data_load_s"],
        "wall_s": wall_s,
    }


def print_table(cfg: TrainConfig, plain: dict[str, Any], ray_: dict[str, Any]) -> None:
    """Measures as rows, epochs as columns."""
    heads = [
        f"epoch {e + 1}" + (" (timed)" if e == cfg.epochs - 1 else "") for e in range(cfg.epochs)
    ]
    pairs = list(zip(plain["epochs"], ray_["epochs"], strict=True))

    def side(name: str, key: str, fmt: str = ".2f") -> list[tuple[str, list[float], str]]:
        return [
            (f"plain loop: {name}", [p[key] for p, _ in pairs], fmt),
            (f"Ray Train, 1 worker: {name}", [r[key] for _, r in pairs], fmt),
        ]

    def ratio(name: str, key: str) -> tuple[str, list[float], str]:
        return (f"ratio ray/plain ({name})", [r[key] / p[key] for p, r in pairs], ".3f")

    for e in plain["epochs"] + ray_["epochs"]:
        e["img_s"] = e["images"] / e["train_s"]
    rows = [
        *side("train s", "train_s"),
        ratio("train", "train_s"),
        *side("train + val s", "epoch_s"),
        ratio("train + val", "epoch_s"),
        *side("images/s", "img_s", ".1f"),
        *side("train CPU s", "train_cpu_s"),
        *side("train loss", "train_loss", ".4f"),
    ]
    width = max(len(row[0]) for row in rows) + 2
    col = max(12, *(len(h) + 2 for h in heads))
    print()
    print(f"{'':<{width}}" + "".join(f"{h:>{col}}" for h in heads))
    for name, values, fmt in rows:
        print(f"{name:<{width}}" + "".join(f"{v:>{col}{fmt}}" for v in values))


def main(argv: list[str] | None = None) -> int:
    reexec_with_malloc_tunables()  # the Ray workers' allocator settings, here too
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", help="ingested dataset or raw folder (default: shared X-rays)")
    p.add_argument("--phantoms", type=int, help="use N phantoms per class instead of real data")
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument("--weights", default="imagenet", help='"imagenet", a path, or "none"')
    p.add_argument("--epochs", type=int, default=2, help="the last one is timed")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--input-size", type=int, default=224)
    p.add_argument("--threads", type=int, help="torch threads, both sides (default: all CPUs)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--order", choices=("plain-first", "ray-first"), default="plain-first")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = p.parse_args(argv)

    use_gpu = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if use_gpu else "cpu")
    threads = args.threads or threads_per_worker(1)
    work = tempfile.mkdtemp(prefix="bench-train-")
    load0 = os.getloadavg()
    try:
        data, data_what = prepare_data(args, work)
        cfg = TrainConfig(
            data=data,
            out=os.path.join(work, "out"),
            backbone=args.backbone,
            weights=args.weights,
            epochs=args.epochs,
            batch_size=args.batch_size,
            input_size=args.input_size,
            workers=1,
            use_gpu=use_gpu,
            torch_threads=threads,
            max_failures=0,  # a failure fails the bench instead of timing a resumed run
            run_name="bench",
        )
        print(
            f"{cfg.backbone} ({cfg.weights or 'random init'}, freeze {cfg.freeze}) at "
            f"{cfg.input_size} px, batch {cfg.batch_size}, {cfg.epochs} epoch(s), "
            f"{threads} torch thread(s), {device.type}; order: {args.order}",
            flush=True,
        )
        if args.order == "plain-first":
            plain = run_plain(cfg, device)
            ray_ = run_ray(cfg)
        else:
            ray_ = run_ray(cfg)
            plain = run_plain(cfg, device)
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    load1 = os.getloadavg()

    print_table(cfg, plain, ray_)
    timed = cfg.epochs - 1
    p_t, r_t = plain["epochs"][timed], ray_["epochs"][timed]
    images = p_t["images"]
    if r_t["images"] != images:
        print(f"WARNING: images per epoch differ: plain {images}, Ray {r_t['images']}")
    print(
        f"\n{'plain loop ran first' if args.order == 'plain-first' else 'Ray ran first'}; "
        f"data load (decode once): plain {plain['data_load_s']:.1f} s, Ray worker "
        f"{ray_['data_load_s']:.1f} s; run_training wall {ray_['wall_s']:.1f} s (Ray start, "
        f"workers, epochs, final evaluation)"
    )
    print(
        f"load average before {load0[0]:.1f}, after {load1[0]:.1f} "
        f"(on {os.cpu_count()} logical CPUs); data: {data_what}"
    )

    def r(x: float, nd: int = 3) -> float | None:
        return round(x, nd) if math.isfinite(x) else None

    import ray

    result = {
        "ray_epoch_s": r(r_t["train_s"]),
        "plain_epoch_s": r(p_t["train_s"]),
        "ratio": r(r_t["train_s"] / p_t["train_s"]),
        "ray_epoch_full_s": r(r_t["epoch_s"]),
        "plain_epoch_full_s": r(p_t["epoch_s"]),
        "epoch_ratio": r(r_t["epoch_s"] / p_t["epoch_s"]),
        "ray_img_s": r(images / r_t["train_s"], 2),
        "plain_img_s": r(images / p_t["train_s"], 2),
        "ray_epochs_train_s": [r(e["train_s"]) for e in ray_["epochs"]],
        "plain_epochs_train_s": [r(e["train_s"]) for e in plain["epochs"]],
        "ray_train_cpu_s": r(r_t["train_cpu_s"]),
        "plain_train_cpu_s": r(p_t["train_cpu_s"]),
        "timed_epoch": timed + 1,
        "images": images,
        "backbone": cfg.backbone,
        "weights": cfg.weights,
        "input_size": cfg.input_size,
        "batch_size": cfg.batch_size,
        "threads": threads,
        "device": device.type,
        "order": args.order,
        "ray_wall_s": r(ray_["wall_s"], 1),
        "torch_version": torch.__version__,
        "ray_version": ray.__version__,
        "python": platform.python_version(),
        "load_avg": [r(load0[0], 2), r(load1[0], 2)],
    }
    print("RESULT " + json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
