"""Grad-CAM in the prediction's forward pass: equivalence with pytorch-grad-cam on every
backbone, the detach-at-target mechanism (no parameter gradients, no graph below the target,
nothing left behind), class selection, batching, and the CAM summaries."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from covidray.codec import unit_to_u8_tensor
from covidray.explain import (
    CamResult,
    GradCAM,
    border_mask,
    cam_summary,
    colormap_lut,
    normalize_cam,
    overlay,
)
from covidray.models import BACKBONES, CxrClassifier, build_model
from covidray.synth import render_phantom

SIZE = {"vgg16": 128, "resnet50": 128, "efficientnet_b0": 128, "efficientnet_lite0": 128}


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _phantom_batch(size: int, kinds=("covid", "bacterial")) -> torch.Tensor:
    rng = np.random.default_rng(7)
    images = [render_phantom(k, rng, size)[0] for k in kinds]
    return torch.from_numpy(np.stack(images))[:, None].float() / 255.0


def _usable_model(backbone: str) -> CxrClassifier:
    """A model whose maps and logits are far from zero: Lite0 with its ImageNet weights; the
    others randomly initialised with BatchNorm statistics measured on phantoms (the default
    running statistics make random-init EfficientNet-B0 features ~1e-15). The head's last
    Linear is re-drawn from N(0, 0.5), then scaled so that the logits differ between classes
    by about 1."""
    torch.manual_seed(0)
    model = build_model(backbone, weights="imagenet" if backbone == "efficientnet_lite0" else None)
    if backbone != "efficientnet_lite0":
        bns = [m for m in model.modules() if isinstance(m, _BatchNorm)]
        for bn in bns:
            bn.reset_running_stats()
            bn.momentum = None  # cumulative average
        if bns:
            model.train()
            with torch.no_grad():
                model(_phantom_batch(96, ("covid", "bacterial", "viral", "normal")))
    last = model.head[-1]
    gen = torch.Generator().manual_seed(1)
    model.eval()
    with torch.no_grad():
        last.weight.copy_(torch.randn(last.weight.shape, generator=gen) * 0.5)
        last.bias.zero_()
        # Random-init VGG16 features are small: scale the logits to a spread of about 1.
        spread = model(_phantom_batch(96, ("covid", "normal"))).std(dim=1).mean()
        last.weight.div_(spread)
    return model


@pytest.fixture(scope="module")
def models() -> dict[str, CxrClassifier]:
    return {}


def _get(models: dict[str, CxrClassifier], backbone: str) -> CxrClassifier:
    if backbone not in models:
        models[backbone] = _usable_model(backbone)
    return models[backbone]


def _reference(model: nn.Module, x: torch.Tensor, classes: torch.Tensor):
    """pytorch-grad-cam (full backward): its raw map at the target layer, rebuilt from the
    activations and gradients it captured, and its upsampled, min-max normalized output."""
    pgc = pytest.importorskip("pytorch_grad_cam")  # PyPI: grad-cam
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    cam = pgc.GradCAM(model=model, target_layers=[model.target_layer])
    try:
        out = cam(input_tensor=x, targets=[ClassifierOutputTarget(int(c)) for c in classes])
        acts = cam.activations_and_grads.activations[0]
        grads = cam.activations_and_grads.gradients[0]
        raw = torch.relu((grads.mean(dim=(2, 3), keepdim=True) * acts).sum(dim=1))
        return raw, torch.from_numpy(out), cam.outputs.detach()
    finally:
        cam.activations_and_grads.release()
        model.zero_grad(set_to_none=True)


# --- equivalence with pytorch-grad-cam ----------------------------------------------------------
@pytest.mark.parametrize("backbone", BACKBONES)
def test_raw_maps_match_pytorch_grad_cam(models, backbone: str) -> None:
    model = _get(models, backbone)
    x = _phantom_batch(SIZE[backbone])
    ours = GradCAM(model)(x)
    requested = GradCAM(model)(x, class_idx=[2, 0])
    assert torch.equal(requested.class_idx, torch.tensor([2, 0]))
    assert torch.equal(ours.class_idx, ours.logits.argmax(1))
    assert ours.logits.std(dim=1).min() > 0.2, ours.logits  # logits not degenerate

    for res in (ours, requested):
        raw, up, logits = _reference(model, x, res.class_idx)
        torch.testing.assert_close(res.logits, logits, rtol=1e-5, atol=1e-5)
        assert res.raw.shape == raw.shape == (2, *res.raw.shape[-2:])
        # max |ours - theirs| / max(theirs) per image; a map that ReLU zeroes entirely (it
        # happens for a requested class) is measured against the batch's largest map.
        peak = raw.amax(dim=(1, 2))
        assert peak.max() > 1e-6, peak
        scale = torch.where(peak > 0, peak, peak.max())
        rel = ((res.raw - raw).abs().amax(dim=(1, 2)) / scale).max().item()
        assert rel <= 1e-4, f"{backbone}: max |ours - theirs| / max(theirs) = {rel:.2e}"
        # Upsampled maps: pytorch-grad-cam min-max normalizes (subtracts the minimum), ours
        # divides by the maximum (zero stays zero); compare after the same min-max scaling.
        lo = res.cam.amin(dim=(1, 2), keepdim=True)
        span = res.cam.amax(dim=(1, 2), keepdim=True) - lo
        ours_mm = (res.cam - lo) / torch.where(span > 0, span, torch.ones_like(span))
        assert up.shape == res.cam.shape == (2, *x.shape[-2:])
        assert (ours_mm - up).abs().max() <= 0.05


# --- the mechanism ------------------------------------------------------------------------------
def test_no_parameter_grads_no_graph_below_target_nothing_left_behind(models) -> None:
    model = _get(models, "efficientnet_lite0").train()  # mode is restored after the call
    model.zero_grad(set_to_none=True)
    target = model.target_layer
    seen: dict[str, tuple[bool, bool]] = {}

    def spy(name: str):
        def hook(module, args, output):
            seen[name] = (torch.is_grad_enabled(), output.requires_grad)

        return hook

    below = model.features.conv_stem.register_forward_hook(spy("below"))
    above = model.pool.register_forward_hook(spy("above"))
    try:
        assert torch.is_grad_enabled()
        res = GradCAM(model)(_phantom_batch(96))
    finally:
        below.remove()
        above.remove()
    assert seen["below"] == (False, False)  # no graph, no saved activations below the target
    assert seen["above"] == (True, True)
    assert all(p.grad is None for p in model.parameters())
    assert len(target._forward_hooks) == 0
    assert model.training and torch.is_grad_enabled()
    assert not res.logits.requires_grad and not res.raw.requires_grad
    model.eval()


def test_hooks_removed_and_state_restored_on_errors(models) -> None:
    model = _get(models, "efficientnet_lite0")
    cam = GradCAM(model)
    with pytest.raises(ValueError):  # fails in the model, before the target layer
        cam(torch.rand(1, 3, 64, 64))
    with pytest.raises(ValueError, match="class_idx"):  # fails after the forward
        cam(torch.rand(2, 1, 64, 64), class_idx=[0, 3])
    with pytest.raises(ValueError, match="entries"):
        cam(torch.rand(2, 1, 64, 64), class_idx=[0, 1, 2])
    assert len(model.target_layer._forward_hooks) == 0
    assert not model.training and torch.is_grad_enabled()
    assert all(p.grad is None for p in model.parameters())


def test_target_layer_arguments(models) -> None:
    model = _get(models, "resnet50")
    x = _phantom_batch(96)
    default = GradCAM(model)(x)
    by_name = GradCAM(model, "features.layer4")(x)
    by_module = GradCAM(model, model.features.layer4)(x)
    torch.testing.assert_close(by_name.raw, default.raw)
    torch.testing.assert_close(by_module.raw, default.raw)
    layer3 = GradCAM(model, "features.layer3")(x)
    assert layer3.raw.shape[-1] == 2 * default.raw.shape[-1]
    with pytest.raises(ValueError, match="no submodule"):
        GradCAM(model, "features.layer9")
    with pytest.raises(ValueError, match="not a submodule"):
        GradCAM(model, nn.ReLU())
    with pytest.raises(ValueError, match="target_layer"):
        GradCAM(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten()))


def test_class_idx_forms_and_batch_equals_single(models) -> None:
    model = _get(models, "efficientnet_b0")
    x = _phantom_batch(96, ("covid", "viral", "normal"))
    cam = GradCAM(model)
    batch = cam(x, class_idx=[0, 1, 2])
    assert torch.equal(batch.class_idx, torch.tensor([0, 1, 2]))
    torch.testing.assert_close(cam(x, class_idx=torch.tensor([0, 1, 2])).raw, batch.raw)
    scale = batch.raw.amax()
    for i in range(3):
        single = cam(x[i : i + 1], class_idx=i)
        assert single.class_idx.tolist() == [i]
        torch.testing.assert_close(single.raw[0], batch.raw[i], rtol=1e-4, atol=1e-4 * scale)
        torch.testing.assert_close(single.cam[0], batch.cam[i], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(single.logits[0], batch.logits[i], rtol=1e-4, atol=1e-4)
    same = cam(x, class_idx=1)
    assert same.class_idx.tolist() == [1, 1, 1]
    torch.testing.assert_close(same.raw[1], batch.raw[1])
    assert not torch.allclose(cam(x, class_idx=0).raw, cam(x, class_idx=2).raw)
    predicted = cam(x)
    torch.testing.assert_close(predicted.probs, predicted.logits.softmax(1))
    torch.testing.assert_close(predicted.score, predicted.probs.amax(1))


def test_cam_shapes_normalization_and_upsample_flag(models) -> None:
    model = _get(models, "efficientnet_lite0")
    x = _phantom_batch(96)
    res = GradCAM(model)(x)
    assert isinstance(res, CamResult)
    assert res.logits.shape == res.probs.shape == (2, 3)
    assert res.raw.shape == (2, 3, 3) and res.raw.dtype == torch.float32
    assert res.cam.shape == (2, 96, 96) and res.cam.dtype == torch.float32
    assert (res.raw >= 0).all()
    torch.testing.assert_close(res.cam.amax(dim=(1, 2)), torch.ones(2))
    assert res.cam.min() >= 0
    low = GradCAM(model)(x, upsample=False)
    torch.testing.assert_close(low.cam, normalize_cam(res.raw))
    zero = normalize_cam(torch.zeros(2, 4, 4))
    assert torch.equal(zero, torch.zeros(2, 4, 4))


def test_channels_last_and_grad_modes_of_the_caller(models) -> None:
    model = _get(models, "resnet50")
    x = _phantom_batch(96)
    ref = GradCAM(model)(x)
    model_cl = _usable_model("resnet50").to(memory_format=torch.channels_last)
    res = GradCAM(model_cl)(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(res.raw, ref.raw, rtol=1e-4, atol=1e-4 * ref.raw.amax())
    with torch.no_grad():
        in_no_grad = GradCAM(model)(x)
        assert not torch.is_grad_enabled()
    torch.testing.assert_close(in_no_grad.raw, ref.raw)
    with torch.inference_mode():
        in_inference = GradCAM(model)(x)
    torch.testing.assert_close(in_inference.raw, ref.raw)
    assert torch.is_grad_enabled()


def test_autocast_maps_in_float32(models) -> None:
    model = _get(models, "efficientnet_lite0")
    x = _phantom_batch(96)
    ref = GradCAM(model)(x, class_idx=[0, 1])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        res = GradCAM(model)(x, class_idx=[0, 1])
    assert res.raw.dtype == res.cam.dtype == res.probs.dtype == torch.float32
    assert (res.cam - ref.cam).abs().max() < 0.15


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(models, monkeypatch) -> None:
    # Compare float32 with float32: CUDA convolutions default to TF32 (10-bit mantissas) on
    # Ampere and later, which moves a 3 x 3 map by about 0.2 % of its maximum.
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    model = _get(models, "efficientnet_b0")
    x = _phantom_batch(96)
    ref = GradCAM(model)(x)
    gpu = _usable_model("efficientnet_b0").cuda()
    res = GradCAM(gpu)(x.cuda(), class_idx=ref.class_idx)
    assert res.cam.device.type == res.raw.device.type == res.class_idx.device.type == "cuda"
    scale = ref.raw.amax()
    torch.testing.assert_close(res.raw.cpu(), ref.raw, rtol=1e-3, atol=1e-3 * scale)


# --- summaries ----------------------------------------------------------------------------------
def test_cam_summary_on_hand_made_maps() -> None:
    h = w = 100
    frame = border_mask(h, w, 0.10)
    assert frame.sum().item() == 100 * 100 - 80 * 80
    border_only = frame.float()
    blob_y, blob_x = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    blob = torch.exp(-((blob_y - 49.5) ** 2 + (blob_x - 49.5) ** 2) / (2 * 8.0**2))
    corner = torch.zeros(h, w)
    corner[20, 70] = 1.0
    uniform = torch.ones(h, w)
    zero = torch.zeros(h, w)
    s = cam_summary(torch.stack([border_only, blob / blob.max(), corner, uniform, zero]))
    be = s["border_energy"]
    assert be[0].item() == pytest.approx(1.0)
    assert be[1].item() < 1e-3
    assert be[2].item() == 0.0
    assert be[3].item() == pytest.approx(0.36)
    assert be[4].item() == 0.0
    assert s["peak_y"][2].item() == pytest.approx(20.5 / 100)
    assert s["peak_x"][2].item() == pytest.approx(70.5 / 100)
    assert abs(s["peak_y"][1].item() - 0.5) <= 0.01 and abs(s["peak_x"][1].item() - 0.5) <= 0.01
    assert s["area"][0].item() == pytest.approx(0.36)
    assert s["area"][2].item() == pytest.approx(1e-4)
    assert s["area"][3].item() == 1.0 and s["area"][4].item() == 0.0
    # blob >= 0.5 is a disc of radius 8 * sqrt(2 ln 2) ~ 9.4 px: ~280 px
    assert 0.025 < s["area"][1].item() < 0.031
    single = cam_summary(corner)
    assert single["peak_x"].shape == (1,)


def test_to_uint8_and_overlay() -> None:
    cam = torch.tensor([[0.0, 0.5], [1.0, 1.2]])
    assert unit_to_u8_tensor(cam).tolist() == [[0, 128], [255, 255]]
    assert unit_to_u8_tensor(cam).dtype == torch.uint8
    image = np.full((8, 8), 100, dtype=np.uint8)
    heat = np.zeros((8, 8), dtype=np.float32)
    heat[2, 3] = 1.0
    out = overlay(image, heat, alpha=0.4)
    assert out.shape == (8, 8, 3) and out.dtype == np.uint8
    lut = colormap_lut("jet")
    assert tuple(lut[-1]) == (128, 0, 0) and tuple(lut[0]) == (0, 0, 128)  # dark red, dark blue
    expected_hot = np.rint(0.6 * 100 + 0.4 * lut[-1].astype(float))
    assert np.array_equal(out[2, 3], expected_hot)
    assert np.array_equal(overlay(image, heat, alpha=0.0), np.repeat(image[..., None], 3, -1))
    # a smaller map is resized to the image
    small = overlay(image, torch.ones(4, 4), alpha=1.0)
    assert (small == lut[-1]).all()
    assert overlay(image, heat, colormap="turbo").shape == (8, 8, 3)
