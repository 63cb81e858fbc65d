"""Model builders, Grad-CAM target layers, freezing, weight loading (no network access)."""

from __future__ import annotations

import hashlib
import io
import os
import pickle

import pytest
import torch
import torch.nn.functional as F
import torchvision.models as tvm
from torch import nn

from covidray.models import (
    BACKBONES,
    LITE0_STAGE_REPEATS,
    CxrClassifier,
    WeightsError,
    WeightsNotFoundError,
    WeightsUnavailableError,
    build_model,
    efficientnet_b0,
    efficientnet_lite0,
    lite0_state_dict,
    lite0_weights_path,
    load_imagenet_state_dict,
    rename_lite0_key,
    resnet50,
    timm_lite0_imagenet,
    vgg16,
)
from covidray.models.lite0 import create_timm_lite0

FEATURES = {"vgg16": 512, "resnet50": 2048, "efficientnet_b0": 1280, "efficientnet_lite0": 1280}


@pytest.fixture(scope="module")
def models() -> dict[str, CxrClassifier]:
    torch.manual_seed(0)
    return {b: build_model(b) for b in BACKBONES}


def _sha(path: os.PathLike[str]) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


@pytest.mark.parametrize("backbone", BACKBONES)
def test_forward_shapes_and_target_layer(models: dict[str, CxrClassifier], backbone: str) -> None:
    model = models[backbone].eval()
    x = torch.rand(2, 1, 64, 64)
    seen: list[torch.Tensor] = []
    handle = model.target_layer.register_forward_hook(lambda m, i, o: seen.append(o))
    try:
        with torch.no_grad():
            feats = model.forward_features(x)
            logits = model(x)
    finally:
        handle.remove()
    assert logits.shape == (2, 3)
    assert feats.shape == (2, FEATURES[backbone]) == (2, model.num_features)
    assert any(m is model.target_layer for m in model.modules())
    assert len(seen) == 2 and seen[0].ndim == 4 and seen[0].shape[:2] == (2, model.num_features)
    assert model.backbone_name == backbone and len(model.normalization) == 2
    with torch.no_grad():  # forward == head(forward_features), deterministic in eval mode
        assert torch.allclose(model.head(feats), logits)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_hook_can_replace_target_output(models: dict[str, CxrClassifier], backbone: str) -> None:
    """Detach-at-target Grad-CAM: a hook swaps the output for a leaf that gets gradients."""
    model = models[backbone].eval()
    leaf: list[torch.Tensor] = []

    def hook(module: nn.Module, inputs: object, output: torch.Tensor) -> torch.Tensor:
        leaf.append(output.detach().requires_grad_(True))
        return leaf[0]

    handle = model.target_layer.register_forward_hook(hook)
    try:
        logits = model(torch.rand(1, 1, 64, 64))
        logits[0, 1].backward()
    finally:
        handle.remove()
        model.zero_grad(set_to_none=True)
    assert leaf[0].grad is not None and leaf[0].grad.shape == leaf[0].shape


def test_vgg_target_is_relu_and_not_modified_inplace(models: dict[str, CxrClassifier]) -> None:
    model = models["vgg16"].eval()
    assert model.target_layer is model.features[29]
    assert isinstance(model.features[28], nn.Conv2d)
    assert isinstance(model.target_layer, nn.ReLU) and not model.target_layer.inplace
    kept: list[tuple[torch.Tensor, torch.Tensor]] = []
    handle = model.target_layer.register_forward_hook(lambda m, i, o: kept.append((o, o.clone())))
    try:
        with torch.no_grad():
            model(torch.rand(2, 1, 64, 64))
    finally:
        handle.remove()
    out, snapshot = kept[0]
    assert out.min() >= 0
    assert torch.equal(out, snapshot)  # nothing downstream wrote into the hooked tensor
    # The conv before it must not be overwritten either (ReLU 29 used to be inplace).
    assert not any(getattr(m, "inplace", False) for m in list(model.features)[28:])


def test_target_layers_and_normalization() -> None:
    assert build_model("resnet50").target_layer_name == "features.layer4"
    b0 = build_model("efficientnet_b0")
    assert b0.target_layer is b0.features[-1]
    lite = build_model("efficientnet_lite0")
    assert lite.target_layer is lite.features.bn2
    assert lite.normalization == ((0.5,) * 3, (0.5,) * 3)
    assert b0.normalization[0] == pytest.approx((0.485, 0.456, 0.406))
    # mean/std are buffers (they follow .to(device)) but not part of the state dict.
    assert "mean" not in b0.state_dict() and b0.mean.shape == (1, 3, 1, 1)


def test_grayscale_is_replicated_and_normalized() -> None:
    model = build_model("efficientnet_lite0").eval()
    x = torch.rand(1, 1, 32, 32)
    assert torch.allclose(model.normalize(x), (x.expand(-1, 3, -1, -1) - 0.5) / 0.5)
    with pytest.raises(ValueError, match="B x 1 x H x W"):
        model(torch.rand(1, 3, 32, 32))
    rgb = build_model("efficientnet_lite0", in_channels=3).eval()
    rgb.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.allclose(rgb(x.expand(-1, 3, -1, -1)), model(x), atol=1e-6)


def test_heads_and_builder_functions() -> None:
    paper = vgg16(num_classes=3)
    assert [type(m) for m in paper.head] == [nn.Linear, nn.ReLU, nn.Dropout, nn.Linear]
    assert paper.head[0].out_features == 64 and paper.head[2].p == 0.5
    linear = resnet50(num_classes=5, head="linear")
    assert [type(m) for m in linear.head] == [nn.Dropout, nn.Linear]
    assert linear.head[0].p == 0.2 and linear.head[1].out_features == 5
    assert efficientnet_b0().backbone_name == "efficientnet_b0"
    assert efficientnet_lite0(freeze="backbone").freeze_policy == "backbone"
    assert linear.config == {
        "backbone": "resnet50",
        "num_classes": 5,
        "head": "linear",
        "in_channels": 1,
    }
    with pytest.raises(ValueError, match="unknown backbone"):
        build_model("alexnet")
    with pytest.raises(ValueError, match="unknown head"):
        build_model("vgg16", head="mlp")


def _trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_freeze_policies(models: dict[str, CxrClassifier], backbone: str) -> None:
    model = models[backbone]
    total = sum(p.numel() for p in model.parameters())
    head = sum(p.numel() for p in model.head.parameters())
    blocks = model.blocks()
    # The freeze units cover the whole trunk, each parameter exactly once.
    unit_params = [id(p) for unit in blocks for m in unit for p in m.parameters()]
    assert sorted(unit_params) == sorted(id(p) for p in model.features.parameters())

    model.set_freeze("backbone")
    assert _trainable(model) == head
    assert all(p.requires_grad for p in model.head.parameters())
    model.train()
    bns = [m for m in model.features.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert all(not m.training for m in bns) and model.head.training

    model.set_freeze("top:1")
    top = sum(p.numel() for m in blocks[-1] for p in m.parameters())
    assert _trainable(model) == head + top
    model.train()
    assert all(m.training for m in blocks[-1])
    assert all(not m.training for m in blocks[0])
    frozen_bns = [m for m in bns if not any(p.requires_grad for p in m.parameters())]
    assert all(not m.training for m in frozen_bns)

    trainable = [_trainable(model.set_freeze(f"top:{n}")) for n in range(len(blocks) + 1)]
    assert trainable == sorted(trainable) and trainable[0] == head and trainable[-1] == total

    model.set_freeze("none")
    model.train()
    assert _trainable(model) == total and all(m.training for m in model.modules())
    model.eval()
    assert not any(m.training for m in model.modules())
    for bad in ("top:99", "top:x", "partial"):
        with pytest.raises(ValueError):
            model.set_freeze(bad)


def test_frozen_bn_keeps_running_stats(models: dict[str, CxrClassifier]) -> None:
    model = models["efficientnet_lite0"].set_freeze("top:1").train()
    try:
        frozen, trained = model.features.bn1, model.features.bn2
        before = frozen.running_mean.clone(), trained.running_mean.clone()
        model(torch.rand(2, 1, 64, 64))
        assert torch.equal(frozen.running_mean, before[0])
        assert not torch.equal(trained.running_mean, before[1])
    finally:
        model.set_freeze("none").eval()


# --- EfficientNet-Lite0 ImageNet weights --------------------------------------------------------
def test_lite0_keys_load_strictly() -> None:
    state = lite0_state_dict()
    model = create_timm_lite0()
    result = model.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert len(state) == len(model.state_dict())
    assert sum(LITE0_STAGE_REPEATS) == 16
    assert rename_lite0_key("_blocks.0._project_conv.weight") == "blocks.0.0.conv_pw.weight"
    assert rename_lite0_key("_blocks.15._bn2.bias") == "blocks.6.0.bn3.bias"
    assert rename_lite0_key("_blocks.3._expand_conv.weight") == "blocks.2.0.conv_pw.weight"
    assert rename_lite0_key("_bn1.running_var") == "bn2.running_var"
    assert os.path.isfile(lite0_weights_path())


def _squash(img: object, size: int = 224) -> torch.Tensor:
    x = torch.as_tensor(img).permute(2, 0, 1)[None].float()
    x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False) / 255.0
    return (x - 0.5) / 0.5


def test_lite0_imagenet_photos() -> None:
    skimage_data = pytest.importorskip("skimage.data")
    model = timm_lite0_imagenet().eval()
    x = torch.cat([_squash(skimage_data.chelsea()), _squash(skimage_data.coffee())])
    with torch.no_grad():
        probs = model(x).softmax(dim=-1)
    assert probs.argmax(dim=-1).tolist() == [285, 967]  # Egyptian cat, espresso
    assert probs[0, 285].item() == pytest.approx(0.768, abs=0.02)
    assert probs[1, 967].item() == pytest.approx(0.900, abs=0.02)
    # The same weights in timm's non-tf_ variant (symmetric padding, BN eps 1e-5) load too but
    # predict differently: with this preprocessing it gives 0.52 on the cat (0.906 on coffee,
    # so only the cat tells the variants apart).
    import timm

    other = timm.create_model("efficientnet_lite0", pretrained=False)
    other.load_state_dict(lite0_state_dict(), strict=True)
    with torch.no_grad():
        p_other = other.eval()(x[:1]).softmax(dim=-1)[0, 285].item()
    assert abs(p_other - 0.768) > 0.1


def test_lite0_classifier_imagenet_trunk() -> None:
    model = build_model("efficientnet_lite0", weights="imagenet")
    reference = lite0_state_dict()
    assert torch.equal(model.features.conv_head.weight, reference["conv_head.weight"])
    assert torch.equal(model.features.bn2.running_var, reference["bn2.running_var"])
    assert model.weights_source == "imagenet"


# --- weights from a path or URI -----------------------------------------------------------------
def test_full_state_dict_roundtrip_with_sha256(tmp_path) -> None:
    torch.manual_seed(1)
    src = build_model("efficientnet_lite0").eval()
    path = tmp_path / "model.pt"
    torch.save(src.state_dict(), path)
    dst = build_model("efficientnet_lite0", weights=path, weights_sha256=_sha(path)).eval()
    x = torch.rand(1, 1, 64, 64)
    with torch.no_grad():
        assert torch.equal(dst(x), src(x))
    with pytest.raises(WeightsError, match="sha256 mismatch"):
        build_model("efficientnet_lite0", weights=path, weights_sha256="0" * 64)


def test_safetensors_and_wrapped_checkpoint(tmp_path) -> None:
    from safetensors.torch import save_file

    src = build_model("efficientnet_lite0", head="linear")
    save_file(src.state_dict(), str(tmp_path / "m.safetensors"))
    dst = build_model("efficientnet_lite0", head="linear", weights=tmp_path / "m.safetensors")
    assert torch.equal(dst.head[1].weight, src.head[1].weight)
    # {"model": state_dict} with DDP "module." prefixes.
    wrapped = {"epoch": 3, "model": {f"module.{k}": v for k, v in src.state_dict().items()}}
    torch.save(wrapped, tmp_path / "ckpt.pt")
    dst = build_model("efficientnet_lite0", head="linear", weights=str(tmp_path / "ckpt.pt"))
    assert torch.equal(dst.features.conv_stem.weight, src.features.conv_stem.weight)
    # The paper head does not fit a linear-head checkpoint: a clear error, not a traceback.
    with pytest.raises(WeightsError, match="do not fit"):
        build_model("efficientnet_lite0", weights=tmp_path / "m.safetensors")


def test_backbone_only_state_dict(tmp_path) -> None:
    torch.manual_seed(2)
    timm_model = create_timm_lite0()
    torch.save(timm_model.state_dict(), tmp_path / "timm.pth")  # with its 1000-class classifier
    model = build_model("efficientnet_lite0", weights=tmp_path / "timm.pth")
    assert torch.equal(
        model.features.blocks[3][0].conv_dw.weight, timm_model.blocks[3][0].conv_dw.weight
    )
    # A torchvision-named backbone state dict into the wrong backbone: clear error.
    torch.save(tvm.efficientnet_b0().state_dict(), tmp_path / "b0.pth")
    with pytest.raises(WeightsError, match="efficientnet_lite0 backbone"):
        build_model("efficientnet_lite0", weights=tmp_path / "b0.pth")


def test_corrupted_and_unsafe_files(tmp_path) -> None:
    good = tmp_path / "good.pt"
    torch.save(build_model("efficientnet_lite0").state_dict(), good)
    data = good.read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(data[: len(data) // 2])
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"this is not a checkpoint" * 10)
    for bad in (truncated, garbage):
        with pytest.raises(WeightsError, match="not a readable PyTorch state dict") as err:
            build_model("efficientnet_lite0", weights=bad)
        assert str(bad) in str(err.value)
    bad_st = tmp_path / "bad.safetensors"
    bad_st.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(WeightsError, match="safetensors"):
        build_model("efficientnet_lite0", weights=bad_st)

    # An arbitrary pickled object: weights_only refuses it, nothing is executed.
    unsafe = tmp_path / "unsafe.pt"
    buf = io.BytesIO()
    torch.save({"weights": torch.zeros(1), "obj": _Payload()}, buf)
    unsafe.write_bytes(buf.getvalue())
    with pytest.raises(WeightsError, match=r"weights_only=True.*unsupported object .*_Payload"):
        build_model("efficientnet_lite0", weights=unsafe)
    legacy = tmp_path / "legacy.pth"
    legacy.write_bytes(pickle.dumps(_Payload(), protocol=2))
    with pytest.raises(WeightsError):
        build_model("efficientnet_lite0", weights=legacy)

    not_a_dict = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), not_a_dict)
    with pytest.raises(WeightsError, match="not a state dict"):
        build_model("efficientnet_lite0", weights=not_a_dict)
    with pytest.raises(WeightsNotFoundError):
        build_model("efficientnet_lite0", weights=tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="64 hex"):
        build_model("efficientnet_lite0", weights=good, weights_sha256="abc")


class _Payload:
    """A picklable non-tensor object that weights_only loading must refuse."""


def test_weights_from_s3(s3_bucket: str, tmp_path) -> None:
    from covidray import storage

    src = build_model("efficientnet_lite0")
    buf = io.BytesIO()
    torch.save(src.state_dict(), buf)
    uri = f"{s3_bucket}/models/lite0.pt"
    storage.write_bytes(uri, buf.getvalue())
    sha = hashlib.sha256(buf.getvalue()).hexdigest()
    dst = build_model("efficientnet_lite0", weights=uri, weights_sha256=sha)
    assert torch.equal(dst.head[0].weight, src.head[0].weight)
    with pytest.raises(WeightsNotFoundError):
        build_model("efficientnet_lite0", weights=f"{s3_bucket}/models/none.pt")


# --- torchvision ImageNet weights, offline ------------------------------------------------------
def test_imagenet_offline_error_names_file_and_dir(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    directory = os.path.join(str(tmp_path), "hub", "checkpoints")
    with pytest.raises(WeightsUnavailableError) as err:
        load_imagenet_state_dict(tvm.VGG16_Weights.IMAGENET1K_V1, offline=True)
    msg = str(err.value)
    assert "vgg16-397923af.pth" in msg and directory in msg
    assert "https://download.pytorch.org/models/vgg16-397923af.pth" in msg

    monkeypatch.setenv("COVIDRAY_OFFLINE", "1")
    with pytest.raises(WeightsUnavailableError, match="resnet50-0676ba61.pth"):
        build_model("resnet50", weights="imagenet")  # IMAGENET1K_V1
    with pytest.raises(WeightsUnavailableError, match="resnet50-11ad3fa6.pth"):
        build_model("resnet50", weights="imagenet:IMAGENET1K_V2")
    assert not os.path.isdir(directory) or not os.listdir(directory)  # nothing downloaded


def test_imagenet_from_cache(tmp_path, monkeypatch) -> None:
    """A cached torchvision checkpoint (full model, classifier keys ignored) fills the trunk."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setenv("COVIDRAY_OFFLINE", "1")
    directory = tmp_path / "hub" / "checkpoints"
    directory.mkdir(parents=True)
    torch.manual_seed(3)
    reference = tvm.efficientnet_b0()
    torch.save(reference.state_dict(), directory / "efficientnet_b0_rwightman-7f5810bc.pth")
    model = build_model("efficientnet_b0", weights="imagenet", freeze="top:2")
    assert torch.equal(
        model.features[4][0].block[1][0].weight, reference.features[4][0].block[1][0].weight
    )
    assert model.weights_source == "imagenet" and model.freeze_policy == "top:2"
