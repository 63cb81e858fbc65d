"""Scoring throughput on the CPU: forward pass, our predict + Grad-CAM, a naive research-script
pipeline, and the full Ray Data job against a local (moto) S3 server, on the same images.

    .venv/bin/python bench/score.py [--n 512] [--batch-size 32] [--skip naive,job]

(a) forward: the model alone on pre-decoded uint8 batches (channels_last, inference_mode,
    torch threads = physical cores). RESULT key ``predict_img_s``.
(b) predict+CAM: ``Predictor.predict`` on the same batches (probabilities, labels, Grad-CAM,
    CAM summaries), same settings. ``predict_cam_img_s``.
(c) naive: the same weights in the default memory format, batch size 1, per-image PIL load and
    torchvision transforms, a pytorch-grad-cam ``GradCAM`` call and a second forward pass for
    the label. ``naive_img_s``.
(d) job: ``covidray score`` (Ray Data) with its defaults (one scoring actor with a thread
    per core; ``--job-workers``/``--job-threads`` to change that) reading the PNGs from moto S3 (a
    ThreadedMotoServer in this process) and writing predictions back, counted from the first
    image read to the last row written; Ray start and actor start + model load are printed
    separately. ``job_img_s``.

(a), (b) and (c) run interleaved, batch by batch in rotating order, so that a change in the
load of a shared machine affects them alike; (d) cannot be interleaved, so (b) is measured on
the job's images right before and right after it, and ``job_ratio`` is (d) over their mean.
Also shown: predict without CAM, and predict + CAM with bf16 autocast (not the default). The
load average is printed. Model: EfficientNet-B0 at 224, random weights with the head
re-initialised so logits are not ~0. The last line is ``RESULT {json}`` with the rates and
``cam_ratio`` (b/a), ``vs_naive`` (b/c), ``job_ratio`` (d/b).
"""

from __future__ import annotations

import os

# Before torch loads OpenMP: idle threads sleep instead of spinning. On a shared or
# oversubscribed CPU this is the difference between usable and 5-80x slower (measured here);
# on an idle machine it costs little. Set OMP_WAIT_POLICY=ACTIVE to compare.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import io
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from covidray import storage  # noqa: E402
from covidray.codec import u8_to_unit_tensor, unit_to_u8_tensor  # noqa: E402
from covidray.decode import decode_image  # noqa: E402
from covidray.modeldir import ModelCard, save_model_dir  # noqa: E402
from covidray.models import build_model  # noqa: E402
from covidray.predict import Predictor  # noqa: E402
from covidray.preprocess import to_model_input  # noqa: E402
from covidray.runtime.cluster import reexec_with_malloc_tunables  # noqa: E402
from covidray.runtime.threads import physical_cores  # noqa: E402

SHARED = REPO.parent / "shared" / "data" / "cxr"


def load_images(n: int, data: Path | None) -> tuple[list[bytes], str]:
    """``n`` PNG files' bytes: the real X-rays when present, else phantoms."""
    if data is not None and (data / "images").is_dir():
        paths = sorted((data / "images").rglob("*.png"))
        if len(paths) >= n:
            return [p.read_bytes() for p in paths[:n]], f"real X-rays ({data})"
    from covidray.synth import write_phantoms

    tmp = tempfile.mkdtemp(prefix="bench-phantoms-")
    write_phantoms(tmp, n_per_class=-(-n // 3), seed=0, size=256)
    paths = sorted(Path(tmp, "images").rglob("*.png"))[:n]
    return [p.read_bytes() for p in paths], "phantoms (256 px)"


def make_model(size: int) -> tuple[torch.nn.Module, ModelCard]:
    torch.manual_seed(0)
    model = build_model("efficientnet_b0", weights=None)
    for m in model.head.modules():
        if isinstance(m, torch.nn.Linear):
            torch.nn.init.normal_(m.weight, std=0.5)
            torch.nn.init.zeros_(m.bias)
    return model.eval(), ModelCard.for_model(model, size)


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


# ---------------------------------------------------------------------------- (a), (b), (c)


class Naive:
    """A research script: PIL + torchvision transforms, batch 1, pytorch-grad-cam, 2 passes."""

    def __init__(self, model: torch.nn.Module, size: int) -> None:
        from pytorch_grad_cam import GradCAM as LibGradCAM
        from torchvision import transforms

        self.net = build_model("efficientnet_b0", weights=None)
        self.net.load_state_dict(model.state_dict())
        self.net = self.net.eval().to(memory_format=torch.contiguous_format)
        self.tf = transforms.Compose([transforms.Resize((size, size)), transforms.ToTensor()])
        self.cam = LibGradCAM(model=self.net, target_layers=[self.net.target_layer])

    def __call__(self, blobs: list[bytes]) -> list[tuple[int, float]]:
        from PIL import Image

        out = []
        for data in blobs:
            img = Image.open(io.BytesIO(data)).convert("L")
            x = self.tf(img).unsqueeze(0)
            heatmap = self.cam(input_tensor=x, targets=None)  # explains the predicted class
            with torch.no_grad():
                probs = self.net(x).softmax(dim=1)  # a second pass for the label
            out.append((int(probs.argmax()), float(heatmap.mean())))
        return out


def interleaved(methods: dict, n_batches: int, label: str) -> dict[str, float]:
    """Seconds per method over all batches, measured batch by batch in rotating order.

    Every method runs on batch i before any runs on batch i + 1, so a change in the load of a
    shared machine hits all of them alike and their ratios stay meaningful.
    """
    total = dict.fromkeys(methods, 0.0)
    keys = list(methods)
    for i in range(n_batches):
        order = keys[i % len(keys) :] + keys[: i % len(keys)]
        for k in order:
            total[k] += timed(lambda k=k, i=i: methods[k](i))
        rates = ", ".join(f"{k} {i + 1} batches in {t:.1f} s" for k, t in total.items())
        print(f"  {label}: {rates}", flush=True)
    return total


def bench_inline(
    model: torch.nn.Module,
    card: ModelCard,
    batches: list[torch.Tensor],
    blob_batches: list[list[bytes]],
    naive: bool,
) -> dict[str, float]:
    """Seconds per method over all images, in two interleaved passes: (a) and the (b) variants
    together, then (b) against (c). The naive pipeline's allocations (PIL, OpenCV, batch-1
    tensors) slowed the forward pass that ran between them by a third here, so each ratio
    comes from a pass of its own; ``b`` is from the first pass, ``b_with_c`` the second."""
    predictor = Predictor(model, card, device="cpu", threads=physical_cores())
    net = predictor.model  # the same module: channels_last, eval
    bf16 = Predictor(model, card, device="cpu", threads=physical_cores(), amp=True)

    def forward(i: int) -> None:
        with torch.inference_mode():
            net(u8_to_unit_tensor(batches[i]).contiguous(memory_format=torch.channels_last))

    def ours(i: int) -> None:
        predictor.predict(batches[i], with_cam=True)

    methods = {
        "a": forward,
        "b": ours,
        "b_nocam": lambda i: predictor.predict(batches[i], with_cam=False),
        "b_bf16": lambda i: bf16.predict(batches[i], with_cam=True),
    }
    # Warm-up: oneDNN primitives for each batch shape, lazy imports.
    shapes = {0, len(batches) - 1} if len(batches[-1]) != len(batches[0]) else {0}
    for fn in methods.values():
        for i in sorted(shapes):
            fn(i)
    total = interleaved(methods, len(batches), "(a), (b)")
    if naive:
        lib = Naive(model, predictor.input_size)
        lib(blob_batches[0][:1])  # warm-up on one image
        pair = {"b_with_c": ours, "c": lambda i: lib(blob_batches[i])}
        total.update(interleaved(pair, len(batches), "(b), (c)"))
    return total


# ---------------------------------------------------------------------------- (d)


def bench_job(
    model: torch.nn.Module,
    card: ModelCard,
    blobs: list[bytes],
    batch_size: int,
    workers: int | None = None,
    threads: int | None = None,
) -> dict[str, float | str]:
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        os.environ.update(
            AWS_ENDPOINT_URL=endpoint,
            AWS_ACCESS_KEY_ID="bench",
            AWS_SECRET_ACCESS_KEY="bench",
            AWS_DEFAULT_REGION="us-east-1",
            AWS_EC2_METADATA_DISABLED="true",
            RAY_USAGE_STATS_ENABLED="0",
            RAY_AUTH_MODE="disabled",
        )
        os.environ.pop("RAY_ADDRESS", None)
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="bench")
        fs, _ = storage.filesystem("s3://bench")
        fs.pipe({f"bench/in/{i // 100:03d}/img{i:05d}.png": b for i, b in enumerate(blobs)})
        save_model_dir(model, card, "s3://bench/model")

        import ray

        from covidray.runtime.cluster import ensure_ray
        from covidray.score import ScoreConfig, run_score

        cores = physical_cores()
        t0 = time.perf_counter()
        ensure_ray(num_cpus=cores, log_to_driver=False)
        ray_start = time.perf_counter() - t0
        cfg = ScoreConfig(
            model="s3://bench/model",
            data="s3://bench/in",
            out="s3://bench/out",
            batch_size=batch_size,
            rows_per_file=256,
            workers=workers,
            threads=threads,
        )  # None: the job's defaults
        cpu0 = time.process_time()  # this process also runs the moto S3 server's threads
        result = run_score(cfg)
        driver_cpu = time.process_time() - cpu0
        ray.shutdown()
        assert result.n_scored == len(blobs) and result.n_errors == 0, result
        return {
            "img_s": result.img_per_s,
            "elapsed_s": result.elapsed_s,
            "ray_start_s": ray_start,
            "startup_s": result.startup_s,
            "wall_s": result.wall_s,
            "files": result.n_files,
            "driver_cpu_s": driver_cpu,
            "actors": f"{result.workers} actor(s) × {result.threads} thread(s)",
        }
    finally:
        server.stop()


def main(argv: list[str] | None = None) -> int:
    reexec_with_malloc_tunables()  # the Ray workers' allocator settings, here too
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=512, help="images (the job needs >= 512)")
    ap.add_argument(
        "--inline-n", type=int, default=None, help="images for (a)-(c): the first of --n"
    )
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--data", type=Path, default=SHARED)
    ap.add_argument("--skip", default="", help="comma list of parts to skip: naive,job")
    ap.add_argument("--job-workers", type=int, help="(d): scoring actors (default: the job's)")
    ap.add_argument("--job-threads", type=int, help="(d): threads per actor (default: the job's)")
    args = ap.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))

    cores = physical_cores()
    torch.set_num_threads(cores)
    load0 = os.getloadavg()
    print(
        f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} logical / {cores} "
        f"physical cores usable, torch {torch.__version__} ({torch.get_num_threads()} threads, "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}); "
        f"load average {load0[0]:.1f} {load0[1]:.1f} {load0[2]:.1f}",
        flush=True,
    )
    blobs, source = load_images(args.n, args.data)
    print(f"{len(blobs)} images: {source}", flush=True)
    model, card = make_model(args.size)
    t0 = time.perf_counter()
    torch.set_num_threads(1)  # as in the job's decode tasks
    decoded = torch.stack(
        [unit_to_u8_tensor(to_model_input(decode_image(b), args.size)) for b in blobs]
    )  # N x 1 x S x S uint8, as the job's decode stage makes them
    torch.set_num_threads(cores)
    print(
        f"decode + resize (1 thread, not part of (a)/(b)): "
        f"{len(blobs) / (time.perf_counter() - t0):.1f} img/s",
        flush=True,
    )

    n = min(args.inline_n or len(blobs), len(blobs))
    bs = args.batch_size
    blob_batches = [blobs[i : min(i + bs, n)] for i in range(0, n, bs)]
    print(f"(a) with (b), then (b) with (c), interleaved batch by batch on {n} images", flush=True)
    batches = list(torch.split(decoded[:n], bs))
    t = bench_inline(model, card, batches, blob_batches, "naive" not in skip)
    a, b, b_nocam, b_bf16 = (n / t[k] for k in ("a", "b", "b_nocam", "b_bf16"))
    c = n / t["c"] if "c" in t else float("nan")
    b_with_c = n / t["b_with_c"] if "b_with_c" in t else float("nan")

    job: dict[str, float | str] = {"img_s": float("nan")}
    b_adjacent = float("nan")
    if "job" not in skip:
        # The job cannot be interleaved: measure (b) on the job's images right before and
        # right after it, and compare the job with their mean.
        all_batches = list(torch.split(decoded, bs))
        again = Predictor(model, card, device="cpu", threads=cores)
        again.predict(all_batches[0])

        def b_rate() -> float:
            return len(blobs) / timed(lambda: [again.predict(x) for x in all_batches])

        before = b_rate()
        print(f"(b) on all {len(blobs)} images right before the job: {before:.1f} img/s")
        print(f"(d): Ray Data job on moto S3, {len(blobs)} images", flush=True)
        job = bench_job(model, card, blobs, bs, args.job_workers, args.job_threads)
        after = b_rate()
        print(f"(b) right after the job: {after:.1f} img/s", flush=True)
        b_adjacent = 0.5 * (before + after)
    d = job["img_s"]
    load1 = os.getloadavg()

    rows = [
        ("(a) forward pass only", a),
        ("(b) predict + Grad-CAM (Predictor)", b),
        ("    predict without CAM (for reference)", b_nocam),
        ("    predict + CAM, bf16 autocast (amp=True; not default)", b_bf16),
        ("(c) naive: PIL, batch 1, pytorch-grad-cam, 2 passes", c),  # vs (b) of its pass
        ("(d) Ray Data job, moto S3 (first read → last write)", d),
    ]
    print()
    print(f"{'pipeline':<56}{'img/s':>9}{'vs (b)':>9}")
    for name, v in rows:
        ref = b_with_c if name.startswith("(c)") else b
        print(f"{name:<56}{v:>9.1f}{v / ref:>9.2f}")
    job_ratio = d / b_adjacent
    print(
        f"(b)/(a) = {b / a:.3f}   (b)/(c) = {b_with_c / c:.2f} (in their own pass: (b) "
        f"{b_with_c:.1f} img/s)   (d)/(b adjacent) = {job_ratio:.3f}"
        f"   [(d)/(b interleaved) = {d / b:.3f}; the load changes between the two]"
    )
    if "job" not in skip:
        print(
            f"job: Ray start {job['ray_start_s']:.1f} s, actor start + model load "
            f"{job['startup_s']:.1f} s (excluded), scoring {job['elapsed_s']:.1f} s, "
            f"wall {job['wall_s']:.1f} s, {int(job['files'])} Parquet file(s), {job['actors']}"
        )
        print(
            f"     the bench process (moto S3 server + Ray Data driver) used "
            f"{job['driver_cpu_s']:.1f} CPU-s of the job's {job['wall_s']:.1f} s wall on "
            f"{os.cpu_count()} CPUs: on real S3 the server's share runs elsewhere"
        )
    print(
        f"load average before {load0[0]:.1f}, after {load1[0]:.1f} "
        f"(on {os.cpu_count()} logical CPUs)"
    )
    result = {
        "predict_img_s": round(a, 2),
        "predict_cam_img_s": round(b, 2),
        "naive_img_s": round(c, 2),
        "job_img_s": round(d, 2),
        "cam_ratio": round(b / a, 3),
        "vs_naive": round(b_with_c / c, 2),
        "job_ratio": round(job_ratio, 3),
    }
    result = {k: (None if v != v else v) for k, v in result.items()}  # NaN (skipped) → null
    print("RESULT " + json.dumps(result))
    return 0


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    sys.exit(main())
