"""covidray.predict.Predictor: shapes, probabilities, Grad-CAM fields, batch = single, TTA."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tinymodels import tiny_lite0

from covidray.codec import decode_png_u8, encode_png
from covidray.labels import CLASSES
from covidray.modeldir import ModelCard, save_model_dir
from covidray.models import build_model
from covidray.predict import BatchPrediction, Predictor, fold_batchnorm
from covidray.runtime.threads import physical_cores

SIZE = 64


def tiny_model(seed: int = 0) -> torch.nn.Module:
    return tiny_lite0(seed, bias=True)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    uri = str(tmp_path_factory.mktemp("model"))
    model = tiny_model()
    save_model_dir(model, ModelCard.for_model(model, SIZE), uri)
    return uri


@pytest.fixture(scope="module")
def predictor(model_dir) -> Predictor:
    return Predictor.from_dir(model_dir, device="cpu", threads=1)


def images(n: int, seed: int = 0, size: int = SIZE) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    y, x = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    base = 0.3 + 0.4 * x
    out = base + 0.3 * torch.rand((n, 1, size, size), generator=g)
    return out.clamp(0, 1)


def test_batch_shapes_probs_and_cam_fields(predictor: Predictor) -> None:
    x = images(5)
    res = predictor.predict(x)
    assert isinstance(res, BatchPrediction) and len(res) == 5
    assert res.probs.shape == (5, 3) and res.probs.dtype == np.float32
    np.testing.assert_allclose(res.probs.sum(axis=1), 1.0, atol=1e-5)
    assert res.labels == [CLASSES[i] for i in res.probs.argmax(axis=1)]
    assert res.model_version == predictor.model_version and len(res.model_version) == 12
    assert res.cam_raw is not None and res.cam_raw.dtype == np.uint8
    assert res.cam_raw.shape[0] == 5 and res.cam_raw.shape[1:] == (2, 2)  # 64 px / 32
    # normalized per image: the hottest cell is 255 (unless the whole map is zero)
    assert set(res.cam_raw.reshape(5, -1).max(axis=1).tolist()) <= {0, 255}
    for name in ("cam_area", "cam_peak_y", "cam_peak_x", "cam_border_energy"):
        values = getattr(res, name)
        assert values.shape == (5,) and np.all((values >= 0) & (values <= 1)), name
    np.testing.assert_array_equal(res.cam_class_idx, res.probs.argmax(axis=1))
    one = res[2]
    assert one.label == res.labels[2] and one.prob(one.label) == pytest.approx(res.probs[2].max())
    d = one.to_dict()
    assert set(d["probs"]) == set(CLASSES) and d["cam"]["class"] == one.label


def test_same_result_batch_vs_single(predictor: Predictor) -> None:
    x = images(4, seed=1)
    batch = predictor.predict(x)
    for i in range(4):
        single = predictor.predict(x[i : i + 1])
        np.testing.assert_allclose(single.probs[0], batch.probs[i], atol=1e-5)
        assert single.labels[0] == batch.labels[i]
        assert np.abs(single.cam_raw[0].astype(int) - batch.cam_raw[i].astype(int)).max() <= 1
        np.testing.assert_allclose(single.cam_area[0], batch.cam_area[i], atol=1e-3)
        np.testing.assert_allclose(
            single.cam_border_energy[0], batch.cam_border_energy[i], atol=1e-4
        )


def test_inputs_uint8_lists_and_other_sizes(predictor: Predictor) -> None:
    x = images(3, seed=2)
    ref = predictor.predict(x)
    u8 = (x * 255).round().to(torch.uint8)
    quantized = predictor.predict(u8.float() / 255).probs  # uint8 means 0..255
    np.testing.assert_allclose(predictor.predict(u8).probs, quantized, atol=1e-5)
    np.testing.assert_allclose(predictor.predict(u8.numpy()[:, 0]).probs, quantized, atol=1e-5)
    listed = predictor.predict([x[i] for i in range(3)])
    np.testing.assert_allclose(listed.probs, ref.probs, atol=1e-5)
    # Any size: squash-resized to the card's input size.
    mixed = predictor.predict([images(1, 3, 100)[0], images(1, 4, 48)[0][0]])
    assert mixed.probs.shape == (2, 3) and mixed.cam_raw.shape == (2, 2, 2)
    with pytest.raises(ValueError, match="1×H×W"):
        predictor.predict([torch.rand(3, 64, 64)])


def test_without_cam_and_explaining_another_class(predictor: Predictor) -> None:
    x = images(3, seed=5)
    plain = predictor.predict(x, with_cam=False)
    assert plain.cam_raw is None and plain.cam_area is None
    np.testing.assert_allclose(plain.probs, predictor.predict(x).probs, atol=1e-5)
    res = predictor.predict(x, class_idx=0)
    np.testing.assert_array_equal(res.cam_class_idx, [0, 0, 0])
    assert res.labels == plain.labels  # the label stays the prediction
    assert predictor.predict([x[0, 0]])[0].label == plain.labels[0]  # one H×W image


def test_flip_tta_averages_logits_then_calibrates(tmp_path) -> None:
    from covidray.calibration import Calibration

    model = tiny_model(seed=3)
    card = ModelCard.for_model(model, SIZE, tta_hflip=True)
    saved = save_model_dir(model, card, str(tmp_path / "raw"))
    p = Predictor.from_dir(str(tmp_path / "raw"), device="cpu", threads=1)
    assert p.tta_hflip and p.model_version == saved.model_version
    x = images(3, seed=6)
    with torch.no_grad():
        z = 0.5 * (model(x) + model(x.flip(-1)))
    res = p.predict(x)
    np.testing.assert_allclose(res.logits, z.numpy(), atol=1e-4)
    np.testing.assert_allclose(res.probs, z.softmax(1).numpy(), atol=1e-5)
    np.testing.assert_array_equal(res.cam_class_idx, z.argmax(1).numpy())
    assert res.in_scope.all() and res.ood_score is None  # no gate fitted

    warm = card.model_copy(update={"calibration": Calibration(temperature=2.5)})
    hot = save_model_dir(model, warm, str(tmp_path / "cal"))
    q = Predictor.from_dir(str(tmp_path / "cal"), device="cpu", threads=1)
    cal = q.predict(x)
    np.testing.assert_allclose(cal.probs, (z / 2.5).softmax(1).numpy(), atol=1e-5)
    assert cal.labels == res.labels  # a temperature never changes the predicted class
    assert hot.scoring_version != saved.scoring_version  # ... but changes the outputs' key
    assert hot.model_version == saved.model_version


def test_memory_format_does_not_change_results(model_dir) -> None:
    a = Predictor.from_dir(model_dir, device="cpu", threads=1, channels_last=True)
    b = Predictor.from_dir(model_dir, device="cpu", threads=1, channels_last=False)
    assert a.model.features.conv_stem.weight.is_contiguous(memory_format=torch.channels_last)
    x = images(2, seed=7)
    ra, rb = a.predict(x), b.predict(x)
    np.testing.assert_allclose(ra.probs, rb.probs, atol=1e-5)
    np.testing.assert_allclose(ra.cam_area, rb.cam_area, atol=1e-3)


def test_batchnorm_folding_keeps_results_and_the_callers_model() -> None:
    torch.manual_seed(1)
    model = build_model("efficientnet_b0", weights=None).eval()
    for m in model.modules():  # non-trivial statistics, so that folding has work to do
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    card = ModelCard.for_model(model, SIZE, model_version="b0")
    n_bn = sum(type(m) is torch.nn.BatchNorm2d for m in model.modules())
    folded = Predictor(model, card, device="cpu", threads=1)
    plain = Predictor(model, card, device="cpu", threads=1, fold_bn=False)
    assert folded.folded == n_bn > 40 and plain.folded == 0
    assert sum(type(m) is torch.nn.BatchNorm2d for m in folded.model.modules()) == 0
    # The caller's model is untouched (copy=True): same modules, default memory format.
    assert sum(type(m) is torch.nn.BatchNorm2d for m in model.modules()) == n_bn
    assert model.features[0][0].weight.is_contiguous()
    x = images(3, seed=9)
    a, b = folded.predict(x), plain.predict(x)
    np.testing.assert_allclose(a.probs, b.probs, atol=1e-5)
    assert np.abs(a.cam_raw.astype(int) - b.cam_raw.astype(int)).max() <= 1
    assert fold_batchnorm(folded.model) == 0  # nothing left to fold


def test_cam_png_roundtrip_and_threads(predictor: Predictor) -> None:
    cam = predictor.predict(images(1)).cam_raw[0]
    png = encode_png(cam)
    assert png.startswith(b"\x89PNG") and len(png) < 200
    np.testing.assert_array_equal(decode_png_u8(png), cam)
    assert predictor.threads == 1 and torch.get_num_threads() == 1
    assert 1 <= physical_cores() <= (torch.multiprocessing.cpu_count() or 1)
    torch.set_num_threads(physical_cores())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_amp_channels_last(model_dir) -> None:
    p = Predictor.from_dir(model_dir)  # device and AMP chosen at run time
    assert p.device.type == "cuda" and p.amp
    cpu = Predictor.from_dir(model_dir, device="cpu", threads=1)
    x = images(4, seed=8)
    np.testing.assert_allclose(p.predict(x).probs, cpu.predict(x).probs, atol=3e-2)
