"""Scoring throughput on the CPU: forward pass, our predict + Grad-CAM, a naive research-script
pipeline, and the full Ray Data job reading a local folder and a moto S3 server, on the same
images, for each model of ``--models`` (default: the default model, efficientnet_lite0 at 320 px
with the flip TTA that training ships, then EfficientNet-B0 at 224 px).

    .venv/bin/python bench/score.py [--rounds 3] [--n 512] [--models lite0:320,b0:224,RUN/model]
                                    [--skip naive,job,local,bf16]

The arms, each measured in every round:

(a) forward: the model alone on pre-decoded uint8 batches (channels_last, inference_mode,
    torch threads = physical cores). ``predict_img_s``.
(b) predict+CAM: ``Predictor.predict`` on the same batches (probabilities, labels, Grad-CAM, CAM
    summaries; the card's flip TTA, calibration, input gate and view check), BatchNorm folded.
    ``predict_cam_img_s``; the same without folding (``fold_bn=False``) is
    ``predict_cam_nofold_img_s``, without CAM ``predict_nocam_img_s``.
(c) naive: the same weights in the default memory format, batch size 1, per-image PIL load and
    torchvision transforms, a pytorch-grad-cam ``GradCAM`` call and a second forward pass for
    the label. ``naive_img_s``. Slow, so it runs on the first ``--slow-n`` images (as does the
    bf16 arm, (b) with bf16 autocast, not the CPU default).
(d') job, local: ``covidray score`` (Ray Data) with its defaults (one scoring actor with a
    thread per core; ``--job-workers``/``--job-threads`` to change that) reading the PNGs from
    a local folder and writing there, counted from the first image read to the last row
    written (actor start and model load excluded). ``job_local_img_s``.
(d) job, S3: the same reading from and writing to a moto S3 server (a process of its own, whose
    CPU time is measured: on real S3 that work runs elsewhere). ``job_img_s``.

How it is measured. ``--rounds`` rounds (default 3); in each, every arm runs as one block, the
order rotating from round to round, so a change of load on a shared machine hits every arm
alike. Every block starts with one untimed batch of its own: a process that sat idle for a
second or more (here: while the other arm ran) pays for its first batch again, because this
machine's VM hands freed memory back to its host (virtio-balloon free-page reporting) and the
next batch page-faults it in (0.2 s of kernel time per batch of 32 becomes 1.5-1.9 s; (b) at a
third of its speed after a 4 s pause, measured). Interleaving (b) and (c) batch by batch, as
this bench did before, measured (b) only in that state. Each job runs between two blocks of (b)
on the job's own images.

How each ratio is formed, per round, then summarised over rounds (median, min, max):
``cam_ratio`` = (b)/(a); ``fold_gain`` = (b)/(b unfolded); ``vs_naive`` = (b)/(c);
``job_ratio_local`` = (d') over the mean of the (b) blocks right before and after it;
``job_ratio`` = (d) likewise. Each job also reports where its time went
(``ScoreResult.stage_s``: list, fetch, decode, model, encode, write) and how busy its actor was.

A ``--models`` entry is ``backbone:size`` (random weights, head re-initialised so logits are not
~0, the card's TTA as training ships it) or a trained model directory (its own card: gate and
view check included). The machine line (CPU model, cores, load before and after, torch threads,
OpenMP wait policy, allocator setting) is printed first and is in RESULT (``machine``); the last
line is ``RESULT {json}``: the first model's figures at the top level, every model's under
``models``; every rate and ratio as ``{median, min, max, rounds}``.
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
from covidray.codec import u8_to_unit_tensor  # noqa: E402
from covidray.decode import decode_array  # noqa: E402
from covidray.modeldir import ModelCard, load_model_dir, read_card, save_model_dir  # noqa: E402
from covidray.models import build_model  # noqa: E402
from covidray.predict import Predictor  # noqa: E402
from covidray.preprocess import contrast_method, prepare_array  # noqa: E402
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
    """Random weights (head re-initialised so logits are not ~0), and a card with the flip TTA
    as training ships it (``TrainConfig.tta_hflip``): the default model's compute."""
    from covidray.train.config import TrainConfig

    torch.manual_seed(0)
    model = build_model(backbone, weights=None)
    for m in model.head.modules():
        if isinstance(m, torch.nn.Linear):
            torch.nn.init.normal_(m.weight, std=0.5)
            torch.nn.init.zeros_(m.bias)
    tta = TrainConfig.model_fields["tta_hflip"].default
    return model.eval(), ModelCard.for_model(model, size, tta_hflip=tta)


def model_source(spec: str, work: Path) -> tuple[str, Path]:
    """``(label, local model directory)`` for a ``--models`` entry: a trained model directory
    as it is, or ``backbone:size`` saved with random weights under ``work``."""
    if Path(spec).is_dir():
        card = read_card(spec)
        return f"{card.backbone}@{card.preprocessing.input_size} ({card.model_version})", Path(spec)
    name, size = spec.split(":")
    backbone = ALIASES.get(name, name)
    model, card = make_model(backbone, int(size))
    out = work / f"{backbone}-{size}"
    save_model_dir(model, card, str(out))
    return f"{backbone}@{size}", out


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
        "stage_s": result.stage_s,
        "actor_busy": result.actor_busy,
        "n": result.n_scored + result.n_out_of_scope,  # through the model, gated or not
        "elapsed_s": result.elapsed_s,
        "startup_s": result.startup_s,
        "wall_s": result.wall_s,
        "files": result.n_files,
        "driver_cpu_s": driver_cpu,
        "actors": f"{result.workers} actor(s) × {result.threads} thread(s)",
    }


# ---------------------------------------------------------------------------- rounds


def summary(values: list[float]) -> dict[str, float | int | None]:
    """Median, min and max over rounds (None where the arm was skipped)."""
    vals = [v for v in values if v == v]
    if not vals:
        return {"median": None, "min": None, "max": None, "rounds": 0}
    return {
        "median": round(float(np.median(vals)), 3),
        "min": round(min(vals), 3),
        "max": round(max(vals), 3),
        "rounds": len(vals),
    }


def block_rate(fn, batches: list, n_images: int) -> float:
    """img/s of ``fn`` over ``batches``, after one untimed batch (see the module docstring:
    the first batch after a pause pays the VM's page faults again)."""
    fn(batches[0])
    return n_images / timed(lambda: [fn(x) for x in batches])


def machine(load: tuple[float, float, float] | None = None) -> dict:
    """What the figures were measured on."""
    cpu = platform.processor() or platform.machine()
    fields: dict[str, str] = {}
    try:  # the first processor's fields: a VM's "AMD EPYC" says nothing of the generation
        for line in Path("/proc/cpuinfo").read_text().split("\n\n")[0].splitlines():
            key, _, value = line.partition(":")
            fields[key.strip()] = value.strip()
    except OSError:
        pass
    flags = set(fields.get("flags", "").split())
    load = load or os.getloadavg()
    return {
        "cpu": fields.get("model name", cpu),
        # family/model/stepping: 25/17 is AMD Zen 4, which has bf16 vector units
        "cpu_id": "/".join(fields.get(k, "?") for k in ("cpu family", "model", "stepping")),
        "isa": [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags],
        "logical_cpus": os.cpu_count(),
        "physical_cores": physical_cores(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES"),
        "load_before": [round(x, 2) for x in load],
    }


def bench_model(label: str, src: Path, blobs: list[bytes], args, skip: set[str], s3) -> dict:
    """Every arm of one model, ``args.rounds`` rounds; see the module docstring."""
    print(f"\n=== {label} ===", flush=True)
    cores = physical_cores()
    model, card = load_model_dir(str(src))
    pp = card.preprocessing
    size = int(pp.input_size)
    contrast = contrast_method(pp.contrast)
    t0 = time.perf_counter()
    decoded = torch.from_numpy(
        np.stack([prepare_array(decode_array(b), size, pp.shorter_side, contrast) for b in blobs])
    )[:, None]  # N x 1 x S x S uint8, as the job's decode stage makes them
    print(
        f"decode + resize (1 process, not part of (a)/(b)): "
        f"{len(blobs) / (time.perf_counter() - t0):.1f} img/s",
        flush=True,
    )
    bs = args.batch_size
    n = min(args.inline_n, len(blobs))
    slow_n = min(args.slow_n, n)
    batches = list(torch.split(decoded[:n], bs))
    slow = list(torch.split(decoded[:slow_n], bs))
    slow_blobs = [blobs[i : min(i + bs, slow_n)] for i in range(0, slow_n, bs)]
    job_batches = list(torch.split(decoded, bs))

    predictor = Predictor.from_dir(str(src), device="cpu", threads=cores)
    nofold = Predictor.from_dir(str(src), device="cpu", threads=cores, fold_bn=False)
    net = predictor.model  # the same module: channels_last, eval, BatchNorm folded
    print(
        f"BatchNorm layers folded: {predictor.folded}; flip TTA: {card.tta_hflip}; gate: "
        f"{card.gate is not None}; view check: {getattr(card, 'view_check', None) is not None}",
        flush=True,
    )

    def forward(x: torch.Tensor) -> None:
        with torch.inference_mode():
            net(u8_to_unit_tensor(x).contiguous(memory_format=torch.channels_last))

    arms: dict[str, tuple] = {
        "a": (forward, batches, n),
        "b": (lambda x: predictor.predict(x, with_cam=True), batches, n),
        "b_nocam": (lambda x: predictor.predict(x, with_cam=False), batches, n),
        "b_nofold": (lambda x: nofold.predict(x, with_cam=True), batches, n),
    }
    if "bf16" not in skip:  # 20x slower than fp32 without bf16 units; faster on Zen 4 (avx512_bf16)
        amp = Predictor.from_dir(str(src), device="cpu", threads=cores, amp=True)
        arms["b_bf16"] = (lambda x: amp.predict(x, with_cam=True), slow, slow_n)
    if "naive" not in skip:
        lib = Naive(model, size)
        arms["c"] = (lib, slow_blobs, slow_n)
    jobs = [k for k in ("local", "s3") if k not in skip and not (k == "s3" and s3 is None)]
    dirs = stage_job_inputs(label, src, blobs, jobs, s3)

    rates: dict[str, list[float]] = {k: [] for k in arms}
    job_runs: dict[str, list[dict]] = {k: [] for k in jobs}
    keys = list(arms)
    for r in range(args.rounds):
        order = keys[r % len(keys) :] + keys[: r % len(keys)]
        for k in order:
            fn, bats, count = arms[k]
            rates[k].append(block_rate(fn, bats, count))
        line = ", ".join(f"{k} {rates[k][-1]:.1f}" for k in keys)
        print(f"  round {r + 1}/{args.rounds}, img/s: {line}", flush=True)
        if not jobs:
            continue
        b_rates = [block_rate(arms["b"][0], job_batches, len(blobs))]
        for kind in jobs if r % 2 == 0 else jobs[::-1]:
            data, model_uri, out = dirs[kind]
            cpu0 = s3.cpu_s() if kind == "s3" else 0.0
            job = run_job(
                data, model_uri, f"{out}/round{r}", bs, args.job_workers, args.job_threads
            )
            b_rates.append(block_rate(arms["b"][0], job_batches, len(blobs)))
            job["b_adjacent"] = 0.5 * (b_rates[-2] + b_rates[-1])
            job["ratio"] = job["img_s"] / job["b_adjacent"]
            if kind == "s3":
                job["server_cpu_s"] = s3.cpu_s() - cpu0
            job_runs[kind].append(job)
            print(
                f"  round {r + 1}: job {kind} {job['img_s']:.1f} img/s, (b) around it "
                f"{b_rates[-2]:.1f} / {b_rates[-1]:.1f}, ratio {job['ratio']:.3f}; actor busy "
                f"{job['actor_busy']:.0%}; seconds by stage {job['stage_s']}",
                flush=True,
            )
    return report(label, predictor.folded, rates, job_runs)


def stage_job_inputs(
    label: str, src: Path, blobs: list[bytes], jobs: list[str], s3
) -> dict[str, tuple[str, str, str]]:
    """The job's images and model, as ``(data, model, out)`` for each of ``jobs``."""
    tag = "".join(c if c.isalnum() else "-" for c in label)
    files = {f"in/{i // 100:03d}/img{i:05d}.png": b for i, b in enumerate(blobs)}
    model_files = {p.name: p.read_bytes() for p in src.iterdir() if p.is_file()}
    dirs: dict[str, tuple[str, str, str]] = {}
    if "local" in jobs:
        root = Path(tempfile.mkdtemp(prefix=f"bench-score-{tag}-"))
        for rel, data in files.items():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(data)
        dirs["local"] = (str(root / "in"), str(src), str(root / "out"))
    if "s3" in jobs:
        fs, _ = storage.filesystem("s3://bench")
        fs.pipe({f"bench/{tag}/{rel}": data for rel, data in files.items()})
        fs.pipe({f"bench/{tag}/model/{name}": data for name, data in model_files.items()})
        dirs["s3"] = (f"s3://bench/{tag}/in", f"s3://bench/{tag}/model", f"s3://bench/{tag}/out")
    return dirs


def row(text: str, s: dict, digits: int) -> str:
    """A table line: median, min and max."""
    return f"{text:<56}" + "".join(
        f"{s[k]:>{w}.{digits}f}" for k, w in (("median", 9), ("min", 8), ("max", 8))
    )


RATIOS = {  # name: (numerator, denominator) arms of the same round
    "cam_ratio": ("b", "a"),
    "fold_gain": ("b", "b_nofold"),
    "vs_naive": ("b", "c"),
}


def report(label: str, folded: int, rates: dict, job_runs: dict) -> dict:
    """Print the model's table; its RESULT entry."""
    rounds = len(next(iter(rates.values())))
    nan = float("nan")
    result: dict = {"model": label, "folded_bn": folded, "rounds": rounds}
    names = {
        "a": ("(a) forward pass only", "predict_img_s"),
        "b": ("(b) predict + Grad-CAM (Predictor)", "predict_cam_img_s"),
        "b_nofold": ("    predict + CAM without BatchNorm folding", "predict_cam_nofold_img_s"),
        "b_nocam": ("    predict without CAM (for reference)", "predict_nocam_img_s"),
        "b_bf16": ("    predict + CAM, bf16 autocast (not default)", "predict_cam_bf16_img_s"),
        "c": ("(c) naive: PIL, batch 1, pytorch-grad-cam, 2 passes", "naive_img_s"),
    }
    print(f"\n{label}, {folded} BatchNorm layers folded, {rounds} round(s)")
    print(f"{'pipeline':<56}{'median':>9}{'min':>8}{'max':>8}  img/s")
    for k, (text, key) in names.items():
        if k in rates:
            s = summary(rates[k])
            result[key] = s
            print(row(text, s, 1))
    for kind, text, key in (
        ("local", "(d') Ray Data job, local folder", "job_local_img_s"),
        ("s3", "(d) Ray Data job, moto S3", "job_img_s"),
    ):
        if job_runs.get(kind):
            s = summary([j["img_s"] for j in job_runs[kind]])
            result[key] = s
            print(row(text, s, 1))
    print(f"\n{'ratio (per round, then over rounds)':<56}{'median':>9}{'min':>8}{'max':>8}")
    for name, (num, den) in RATIOS.items():
        if num in rates and den in rates:
            s = summary([x / y for x, y in zip(rates[num], rates[den], strict=True)])
            result[name] = s
            print(row(f"{name} = ({num})/({den})", s, 3))
    for kind, name in (("local", "job_ratio_local"), ("s3", "job_ratio")):
        runs = job_runs.get(kind) or []
        if not runs:
            continue
        s = summary([j["ratio"] for j in runs])
        result[name] = s
        arm = "(d)" if kind == "s3" else "(d')"
        text = f"{name} = {arm}/(b around it)"
        print(row(text, s, 3))
        stages = {k: summary([j["stage_s"].get(k, nan) for j in runs]) for k in runs[0]["stage_s"]}
        busy = summary([j["actor_busy"] for j in runs])
        n = runs[0]["n"]
        result[f"{name}_stages_s"] = {k: v["median"] for k, v in stages.items()}
        result[f"{name}_actor_busy"] = busy
        result[f"{name}_elapsed_s"] = summary([j["elapsed_s"] for j in runs])
        result[f"{name}_startup_s"] = summary([j["startup_s"] for j in runs])
        elapsed, startup = result[f"{name}_elapsed_s"], result[f"{name}_startup_s"]
        print(
            f"    {kind} job, medians over rounds: scoring {elapsed['median']:.1f} s for {n} "
            f"images (startup {startup['median']:.1f} s, excluded); "
            "seconds by stage, summed over batches: "
            + ", ".join(f"{k} {v['median']:.2f}" for k, v in stages.items())
            + f"; actor busy {busy['median']:.0%}; {runs[0]['actors']}"
        )
        if kind == "s3":
            cpu = summary([j["server_cpu_s"] for j in runs])
            share = summary(
                [j["server_cpu_s"] / (j["elapsed_s"] * (os.cpu_count() or 1)) for j in runs]
            )
            result["s3_server_cpu_ms_per_image"] = round(1000 * cpu["median"] / n, 2)
            result["s3_server_cpu_share"] = share["median"]
            print(
                f"    the moto S3 server used {cpu['median']:.1f} CPU-s per job (median): "
                f"{1000 * cpu['median'] / n:.1f} ms per image, {100 * share['median']:.0f} % of "
                f"the {os.cpu_count()} CPUs over its scoring time (on real S3 that runs elsewhere)"
            )
    return result


def main(argv: list[str] | None = None) -> int:
    reexec_with_malloc_tunables()  # the Ray workers' allocator settings, here too
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=512, help="images (the jobs' input)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of every arm (>= 3 for spreads)")
    ap.add_argument(
        "--inline-n",
        type=int,
        default=128,
        help="images per block of (a) and (b): the first of --n",
    )
    ap.add_argument(
        "--slow-n", type=int, default=32, help="images per block of (c) and bf16: the first of --n"
    )
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument(
        "--models",
        default="efficientnet_lite0:320,efficientnet_b0:224",
        help="comma-separated backbone:input_size (lite0 and b0 are short names; random "
        "weights) or trained model directories; the first is reported at the top level",
    )
    ap.add_argument("--data", type=Path, default=SHARED)
    ap.add_argument("--skip", default="", help="comma list of parts to skip: naive,job,local,bf16")
    ap.add_argument("--job-workers", type=int, help="(d): scoring actors (default: the job's)")
    ap.add_argument("--job-threads", type=int, help="(d): threads per actor (default: the job's)")
    args = ap.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))

    cores = physical_cores()
    torch.set_num_threads(cores)
    info = machine()
    print(
        f"machine: {info['cpu']} (family/model/stepping {info['cpu_id']}; "
        f"{' '.join(info['isa'])}), {info['logical_cpus']} logical / {cores} physical cores, "
        f"torch {info['torch']} ({info['torch_threads']} threads, OMP_WAIT_POLICY="
        f"{info['omp_wait_policy']}, GLIBC_TUNABLES={info['glibc_tunables']}); load average "
        + " ".join(f"{x:.2f}" for x in info["load_before"]),
        flush=True,
    )
    blobs, source = load_images(args.n, args.data)
    print(f"{len(blobs)} images: {source}; {args.rounds} rounds", flush=True)
    work = Path(tempfile.mkdtemp(prefix="bench-score-models-"))
    sources = [model_source(spec.strip(), work) for spec in args.models.split(",")]

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
        results = [bench_model(label, src, blobs, args, skip, s3) for label, src in sources]
    finally:
        if jobs:
            import ray

            ray.shutdown()
        if s3 is not None:
            s3.stop()
    load1 = os.getloadavg()
    info["load_after"] = [round(x, 2) for x in load1]
    print(
        f"\nload average before {info['load_before'][0]:.2f}, after {load1[0]:.2f} "
        f"(on {os.cpu_count()} logical CPUs)"
    )
    top = dict(results[0])
    top["machine"] = info
    top["models"] = {r["model"]: r for r in results}
    print("RESULT " + json.dumps(top))
    return 0


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    sys.exit(main())
