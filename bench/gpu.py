"""The CUDA paths of the default model, timed and checked against the CPU: the Predictor
(channels_last, autocast bf16, BatchNorm folded, Grad-CAM in the same pass) and a training step
of the recipe (autocast, channels_last, kornia augmentation on the GPU).

    python bench/gpu.py [--batch 64] [--steps 20]

Model: efficientnet_lite0 at its default input size (320), random weights with the head
scaled (speed is the architecture's). Checks: the CUDA probabilities equal the CPU float32
ones to 2e-2 (bf16) and the maps' peaks agree. Without CUDA it says so and times the CPU only.
The last line is ``RESULT {json}``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from covidray.modeldir import ModelCard  # noqa: E402
from covidray.models import build_model  # noqa: E402
from covidray.predict import Predictor  # noqa: E402
from covidray.train.config import TrainConfig  # noqa: E402
from covidray.train.loop import build_training, train_one_epoch  # noqa: E402


def timed(fn, repeats: int, device: torch.device) -> float:
    """Seconds per call after two warm-up calls."""
    for _ in range(2):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / repeats


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    print(f"torch {torch.__version__}, device {torch.cuda.get_device_name(0) if cuda else 'cpu'}")
    cfg = TrainConfig(data="-", out="-", weights=None, batch_size=32)
    size = cfg.input_size
    torch.manual_seed(0)
    model = build_model(cfg.backbone, weights=None, head=cfg.head).eval()
    for m in model.head.modules():
        if isinstance(m, torch.nn.Linear):
            torch.nn.init.normal_(m.weight, std=0.5)
    card = ModelCard.for_model(model, size, tta_hflip=True)
    x = (torch.rand(args.batch, 1, size, size) * 255).to(torch.uint8)

    cpu = Predictor(model, card, device="cpu")
    ref = cpu.predict(x[:8])
    result: dict[str, object] = {"device": str(device), "input_size": size, "batch": args.batch}
    if cuda:
        gpu = Predictor(model, card, device="cuda")
        got = gpu.predict(x[:8])
        diff = float(abs(got.probs - ref.probs).max())
        peaks = float(
            (got.cam_raw.reshape(8, -1).argmax(1) == ref.cam_raw.reshape(8, -1).argmax(1)).mean()
        )
        print(f"CUDA vs CPU: max |Δp| {diff:.4f} (bf16 autocast), CAM peaks agree {peaks:.2f}")
        assert diff < 2e-2, diff
        result.update(max_prob_diff=diff, cam_peak_agreement=peaks, amp=str(gpu.amp_dtype))
        xg = x.to("cuda")
        for name, with_cam in (("predict_cam", True), ("predict", False)):
            s = timed(lambda w=with_cam: gpu.predict(xg, with_cam=w), args.steps, device)
            result[f"{name}_img_s"] = round(args.batch / s, 1)
            print(f"{name}: {args.batch / s:.0f} img/s (batch {args.batch})")
        fp32 = Predictor(model, card, device="cuda", amp=False)
        s = timed(lambda: fp32.predict(xg, with_cam=True), args.steps, device)
        result["predict_cam_fp32_img_s"] = round(args.batch / s, 1)
        print(f"predict_cam fp32: {args.batch / s:.0f} img/s")
    s = timed(lambda: cpu.predict(x[:16], with_cam=True), 3, torch.device("cpu"))
    result["cpu_predict_cam_img_s"] = round(16 / s, 1)
    print(f"CPU predict_cam: {16 / s:.1f} img/s")

    steps = 8
    parts = build_training(cfg, steps, device)
    parts.model.to(device)
    train_x = (torch.rand(steps * cfg.batch_size, 1, size, size) * 255).to(torch.uint8)
    train_y = torch.randint(0, 3, (len(train_x),))
    batches = list(torch.arange(len(train_x)).split(cfg.batch_size))
    train_one_epoch(parts, batches[:2], train_x, train_y, device)  # warm-up
    t0 = time.perf_counter()
    loss, seen = train_one_epoch(parts, batches, train_x, train_y, device)
    step_s = (time.perf_counter() - t0) / len(batches)
    result["train_step_s"] = round(step_s, 4)
    result["train_img_s"] = round(cfg.batch_size / step_s, 1)
    print(
        f"train step (batch {cfg.batch_size}, {size} px, amp {cuda}): {step_s * 1000:.0f} ms, "
        f"{cfg.batch_size / step_s:.0f} img/s, loss {loss / seen:.3f}"
    )
    print("RESULT " + json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
