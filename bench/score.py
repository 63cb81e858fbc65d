"""Scoring throughput on the CPU: forward pass, our predict + Grad-CAM, a naive research-script
pipeline, and the full Ray Data job reading a moto S3 server and reading a local folder, on the
same images, for each model of ``--models`` (default: the default model, efficientnet_lite0 at
320 px, then EfficientNet-B0 at 224 px).

    .venv/bin/python bench/score.py [--n 512] [--batch-size 32] [--models lite0:320,b0:224]
                                    [--skip naive,job,local,bf16]

(a) forward: the model alone on pre-decoded uint8 batches (channels_last, inference_mode,
    torch threads = physical cores). RESULT key ``predict_img_s``.
(b) predict+CAM: ``Predictor.predict`` on the same batches (probabilities, labels, Grad-CAM,
    CAM summaries), same settings, BatchNorm folded. ``predict_cam_img_s``; the same without
    folding (``fold_bn=False``) is ``predict_cam_nofold_img_s``.
(c) naive: the same weights in the default memory format, batch size 1, per-image PIL load and
    torchvision transforms, a pytorch-grad-cam ``GradCAM`` call and a second forward pass for
    the label. ``naive_img_s``.
(d) job: ``covidray score`` (Ray Data) with its defaults (one scoring actor with a thread per
    core; ``--job-workers``/``--job-threads`` to change that) reading the PNGs from a moto S3
    server (a process of its own, whose CPU time is measured) and writing predictions back,
    counted from the first image read to the last row written. ``job_img_s``.
(d') the same job reading the PNGs from a local folder and writing there. ``job_local_img_s``.

(a), (b) and (c) run interleaved, batch by batch in rotating order, so that a change in the
load of a shared machine affects them alike; the jobs cannot be interleaved, so (b) is measured
on the job's images right before and right after each job, and ``job_ratio`` (S3) and
``job_ratio_local`` are the job over the mean of its two. On S3 the server runs on the same
two cores: ``s3_server_cpu_ms_per_image`` and ``s3_server_cpu_share`` (its CPU seconds over
the job's elapsed time × logical CPUs) say how much of the machine it took. Also shown: predict
without CAM, and predict + CAM with bf16 autocast (not the default). Random weights with the
head re-initialised so logits are not ~0. The last line is ``RESULT {json}``: the default
model's figures at the top level, every model's under ``models``.
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


ALIASES = {"lite0": "efficientnet_lite0", "b0": "efficientnet_b0"}


def make_model(backbone: str, size: int) -> tuple[torch.nn.Module, ModelCard]:
    torch.manual_seed(0)
    model = build_model(backbone, weights=None)
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

        self.net = build_model(model.backbone_name, weights=None)
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
    bf16: bool = True,
) -> tuple[dict[str, float], int]:
    """Seconds per method over all images, in two interleaved passes: (a) and the (b) variants
    together, then (b) against (c). The naive pipeline's allocations (PIL, OpenCV, batch-1
    tensors) slowed the forward pass that ran between them by a third here, so each ratio
    comes from a pass of its own; ``b`` is from the first pass, ``b_with_c`` the second."""
    predictor = Predictor(model, card, device="cpu", threads=physical_cores())
    net = predictor.model  # the same module: channels_last, eval, BatchNorm folded
    amp = Predictor(model, card, device="cpu", threads=physical_cores(), amp=True)
    nofold = Predictor(model, card, device="cpu", threads=physical_cores(), fold_bn=False)
    print(f"  BatchNorm layers folded: {predictor.folded}", flush=True)

    def forward(i: int) -> None:
        with torch.inference_mode():
            net(u8_to_unit_tensor(batches[i]).contiguous(memory_format=torch.channels_last))

    def ours(i: int) -> None:
        predictor.predict(batches[i], with_cam=True)

    methods = {
        "a": forward,
        "b": ours,
        "b_nocam": lambda i: predictor.predict(batches[i], with_cam=False),
        "b_nofold": lambda i: nofold.predict(batches[i], with_cam=True),
    }
    if bf16:  # ~20x slower than fp32 on a CPU without bf16 units: half the bench's time here
        methods["b_bf16"] = lambda i: amp.predict(batches[i], with_cam=True)
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
    return total, predictor.folded


# ---------------------------------------------------------------------------- (d)


class S3Server:
    """A moto S3 server in a process of its own on 127.0.0.1, so that its CPU time can be read
    (``/proc/<pid>/stat``) apart from the job's."""

    def __init__(self) -> None:
        import socket
        import subprocess

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.endpoint = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError("the moto server did not start") from None
                time.sleep(0.2)

    def cpu_s(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


def run_job(
    data: str, model: str, out: str, batch_size: int, workers: int | None, threads: int | None
) -> dict[str, float | str]:
    from covidray.score import ScoreConfig, run_score

    cfg = ScoreConfig(
        model=model,
        data=data,
        out=out,
        batch_size=batch_size,
        rows_per_file=256,
        workers=workers,
        threads=threads,
    )  # None: the job's defaults
    cpu0 = time.process_time()
    result = run_score(cfg)
    driver_cpu = time.process_time() - cpu0
    assert result.n_errors == 0 and result.n_scored > 0, result
    return {
        "img_s": result.img_per_s,
        "n": result.n_scored,
        "elapsed_s": result.elapsed_s,
        "startup_s": result.startup_s,
        "wall_s": result.wall_s,
        "files": result.n_files,
        "driver_cpu_s": driver_cpu,
        "actors": f"{result.workers} actor(s) × {result.threads} thread(s)",
    }


def bench_jobs(
    tag: str,
    model: torch.nn.Module,
    card: ModelCard,
    blobs: list[bytes],
    decoded: torch.Tensor,
    batch_size: int,
    s3: S3Server,
    workers: int | None,
    threads: int | None,
    skip: set[str],
) -> dict[str, dict]:
    """(d) on S3 and (d') on a local folder, each between two measures of (b) on its images."""
    bs = batch_size
    all_batches = list(torch.split(decoded, bs))
    again = Predictor(model, card, device="cpu", threads=physical_cores())
    again.predict(all_batches[0])

    def b_rate() -> float:
        return len(blobs) / timed(lambda: [again.predict(x) for x in all_batches])

    out: dict[str, dict] = {}
    rates = [b_rate()]
    print(f"(b) on all {len(blobs)} images before the jobs: {rates[-1]:.1f} img/s", flush=True)
    if "job" not in skip:
        fs, _ = storage.filesystem("s3://bench")
        fs.pipe({f"bench/{tag}/in/{i // 100:03d}/img{i:05d}.png": b for i, b in enumerate(blobs)})
        save_model_dir(model, card, f"s3://bench/{tag}/model")
        print(f"(d): Ray Data job on moto S3, {len(blobs)} images", flush=True)
        cpu0 = s3.cpu_s()
        job = run_job(
            f"s3://bench/{tag}/in", f"s3://bench/{tag}/model", f"s3://bench/{tag}/out", bs,
            workers, threads,
        )  # fmt: skip
        job["server_cpu_s"] = s3.cpu_s() - cpu0
        rates.append(b_rate())
        job["b_adjacent"] = 0.5 * (rates[-2] + rates[-1])
        print(f"(b) right after the S3 job: {rates[-1]:.1f} img/s", flush=True)
        out["s3"] = job
    if "local" not in skip:
        root = Path(tempfile.mkdtemp(prefix=f"bench-score-{tag}-"))
        for i, b in enumerate(blobs):
            path = root / "in" / f"{i // 100:03d}" / f"img{i:05d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b)
        save_model_dir(model, card, str(root / "model"))
        print(f"(d'): Ray Data job on a local folder, {len(blobs)} images", flush=True)
        job = run_job(
            str(root / "in"), str(root / "model"), str(root / "out"), bs, workers, threads
        )
        rates.append(b_rate())
        job["b_adjacent"] = 0.5 * (rates[-2] + rates[-1])
        print(f"(b) right after the local job: {rates[-1]:.1f} img/s", flush=True)
        out["local"] = job
    return out


def bench_model(
    backbone: str, size: int, blobs: list[bytes], args, skip: set[str], s3: S3Server | None
) -> dict:
    tag = f"{backbone}-{size}".replace("_", "-")
    print(f"\n=== {backbone} at {size} px ===", flush=True)
    cores = physical_cores()
    model, card = make_model(backbone, size)
    t0 = time.perf_counter()
    torch.set_num_threads(1)  # as in the job's decode tasks
    decoded = torch.stack(
        [unit_to_u8_tensor(to_model_input(decode_image(b), size)) for b in blobs]
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
    t, folded = bench_inline(
        model, card, batches, blob_batches, "naive" not in skip, "bf16" not in skip
    )
    a, b, b_nocam, b_nofold = (n / t[k] for k in ("a", "b", "b_nocam", "b_nofold"))
    b_bf16 = n / t["b_bf16"] if "b_bf16" in t else float("nan")
    c = n / t["c"] if "c" in t else float("nan")
    b_with_c = n / t["b_with_c"] if "b_with_c" in t else float("nan")
    jobs = {} if s3 is None and "local" in skip else bench_jobs(
        tag, model, card, blobs, decoded, bs, s3, args.job_workers, args.job_threads, skip
    )  # fmt: skip
    nan = float("nan")
    s3_job, local_job = jobs.get("s3", {}), jobs.get("local", {})
    d = s3_job.get("img_s", nan)
    d_local = local_job.get("img_s", nan)
    rows = [
        ("(a) forward pass only", a),
        ("(b) predict + Grad-CAM (Predictor)", b),
        ("    predict + CAM without BatchNorm folding", b_nofold),
        ("    predict without CAM (for reference)", b_nocam),
        ("    predict + CAM, bf16 autocast (amp=True; not default)", b_bf16),
        ("(c) naive: PIL, batch 1, pytorch-grad-cam, 2 passes", c),  # vs (b) of its pass
        ("(d) Ray Data job, moto S3 (first read → last write)", d),
        ("(d') Ray Data job, local folder", d_local),
    ]
    print(f"\n{backbone} at {size} px, {folded} BatchNorm layers folded")
    print(f"{'pipeline':<56}{'img/s':>9}{'vs (b)':>9}")
    for name, v in rows:
        ref = b_with_c if name.startswith("(c)") else b
        if name.startswith("(d)"):
            ref = s3_job.get("b_adjacent", nan)
        elif name.startswith("(d')"):
            ref = local_job.get("b_adjacent", nan)
        print(f"{name:<56}{v:>9.1f}{v / ref:>9.2f}")
    job_ratio = d / s3_job.get("b_adjacent", nan)
    job_ratio_local = d_local / local_job.get("b_adjacent", nan)
    print(
        f"(b)/(a) = {b / a:.3f}   (b)/(c) = {b_with_c / c:.2f} (in their own pass: (b) "
        f"{b_with_c:.1f} img/s)   (d)/(b adjacent) = {job_ratio:.3f}   "
        f"(d')/(b adjacent) = {job_ratio_local:.3f}   folding: (b)/(b unfolded) = "
        f"{b / b_nofold:.3f}"
    )
    server_ms = server_share = nan
    for name, job in (("S3", s3_job), ("local", local_job)):
        if not job:
            continue
        print(
            f"{name} job: actor start + model load {job['startup_s']:.1f} s (excluded), "
            f"scoring {job['elapsed_s']:.1f} s, wall {job['wall_s']:.1f} s, "
            f"{int(job['files'])} Parquet file(s), {job['actors']}; the bench process (Ray Data "
            f"driver) used {job['driver_cpu_s']:.1f} CPU-s"
        )
    if s3_job:
        server_ms = 1000 * s3_job["server_cpu_s"] / s3_job["n"]
        server_share = s3_job["server_cpu_s"] / (s3_job["elapsed_s"] * (os.cpu_count() or 1))
        print(
            f"     the moto S3 server used {s3_job['server_cpu_s']:.1f} CPU-s during the S3 job: "
            f"{server_ms:.1f} ms per image, {100 * server_share:.0f} % of the {os.cpu_count()} "
            "CPUs over its scoring time (on real S3 that share runs elsewhere)"
        )
    result = {
        "backbone": backbone,
        "input_size": size,
        "folded_bn": folded,
        "predict_img_s": round(a, 2),
        "predict_cam_img_s": round(b, 2),
        "predict_cam_nofold_img_s": round(b_nofold, 2),
        "naive_img_s": round(c, 2),
        "job_img_s": round(d, 2),
        "job_local_img_s": round(d_local, 2),
        "cam_ratio": round(b / a, 3),
        "fold_gain": round(b / b_nofold, 3),
        "vs_naive": round(b_with_c / c, 2),
        "job_ratio": round(job_ratio, 3),
        "job_ratio_local": round(job_ratio_local, 3),
        "s3_server_cpu_ms_per_image": round(server_ms, 2),
        "s3_server_cpu_share": round(server_share, 3),
    }
    return {k: (None if v != v else v) for k, v in result.items()}  # NaN (skipped) → null


def main(argv: list[str] | None = None) -> int:
    reexec_with_malloc_tunables()  # the Ray workers' allocator settings, here too
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=512, help="images (the jobs need >= 512)")
    ap.add_argument(
        "--inline-n", type=int, default=None, help="images for (a)-(c): the first of --n"
    )
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument(
        "--models",
        default="efficientnet_lite0:320,efficientnet_b0:224",
        help="backbone:input_size, comma-separated (lite0 and b0 are short names); the first "
        "is reported at the top level of RESULT",
    )
    ap.add_argument("--data", type=Path, default=SHARED)
    ap.add_argument("--skip", default="", help="comma list of parts to skip: naive,job,local,bf16")
    ap.add_argument("--job-workers", type=int, help="(d): scoring actors (default: the job's)")
    ap.add_argument("--job-threads", type=int, help="(d): threads per actor (default: the job's)")
    args = ap.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))
    models = []
    for spec in args.models.split(","):
        name, size = spec.split(":")
        models.append((ALIASES.get(name, name), int(size)))

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

    s3 = None
    jobs = not {"job", "local"} <= skip
    try:
        if "job" not in skip:
            import boto3

            s3 = S3Server()
            os.environ.update(
                AWS_ENDPOINT_URL=s3.endpoint,
                AWS_ACCESS_KEY_ID="bench",
                AWS_SECRET_ACCESS_KEY="bench",
                AWS_DEFAULT_REGION="us-east-1",
                AWS_EC2_METADATA_DISABLED="true",
            )
            boto3.client("s3", endpoint_url=s3.endpoint).create_bucket(Bucket="bench")
        if jobs:  # one Ray for every job; workers get the S3 settings set above
            from covidray.runtime.cluster import ensure_ray

            os.environ.update(RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled")
            os.environ.pop("RAY_ADDRESS", None)
            t0 = time.perf_counter()
            ensure_ray(num_cpus=cores, log_to_driver=False)
            print(f"Ray started in {time.perf_counter() - t0:.1f} s", flush=True)
        results = [bench_model(name, size, blobs, args, skip, s3) for name, size in models]
    finally:
        if jobs:
            import ray

            ray.shutdown()
        if s3 is not None:
            s3.stop()
    load1 = os.getloadavg()
    print(
        f"\nload average before {load0[0]:.1f}, after {load1[0]:.1f} "
        f"(on {os.cpu_count()} logical CPUs)"
    )
    top = dict(results[0])
    top["models"] = {f"{r['backbone']}@{r['input_size']}": r for r in results}
    print("RESULT " + json.dumps(top))
    return 0


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    sys.exit(main())
