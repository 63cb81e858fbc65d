"""The model directory: card contents, version hash, verified safetensors loading (no pickle)."""

from __future__ import annotations

import hashlib
import json
import os
import pickle

import numpy as np
import pytest
import torch

from covidray import storage
from covidray.evaluation.metrics import evaluate_predictions
from covidray.modeldir import (
    CARD_NAME,
    WEIGHTS_NAME,
    ModelCard,
    ModelLoadError,
    code_version,
    load_model_dir,
    read_card,
    save_model_dir,
)
from covidray.models import build_model


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model("efficientnet_lite0", weights=None).eval()


def _report():
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(3), size=12)
    y = np.arange(12) % 3
    import pandas as pd

    groups = pd.DataFrame({"source": ["a", "b"] * 6, "age_group": ["adult"] * 12})
    return evaluate_predictions(probs, y, groups)


def _save(model, uri, **fields):
    card = ModelCard.for_model(model, 64, tta_hflip=True, training_data_hash="ab" * 32, **fields)
    return save_model_dir(model, card, uri, {"val": _report(), "test": _report()})


def test_card_and_version_hash(model, tmp_path):
    uri = str(tmp_path / "model")
    card = _save(model, uri, training_config={"epochs": 3})
    names = sorted(os.listdir(uri))
    assert names == sorted(
        [WEIGHTS_NAME, CARD_NAME, "metrics.json", "confusion.png", "per_class.md"]
    )
    digest = hashlib.sha256((tmp_path / "model" / WEIGHTS_NAME).read_bytes()).hexdigest()
    assert card.weights_sha256 == digest and card.model_version == digest[:12]

    on_disk = json.loads((tmp_path / "model" / CARD_NAME).read_text())
    assert on_disk["model_version"] == digest[:12]
    assert on_disk["backbone"] == "efficientnet_lite0"
    assert on_disk["classes"] == ["covid", "pneumonia", "normal"] and on_disk["num_classes"] == 3
    assert on_disk["architecture"] == model.config
    pre = on_disk["preprocessing"]
    assert pre["input_size"] == 64 and pre["channels"] == "gray→3 replicated"
    assert pre["resize"] == "squash bilinear antialias"
    assert pre["normalization"] == {"mean": [0.5] * 3, "std": [0.5] * 3}
    assert set(on_disk["metrics"]) == {"val", "test"}
    assert json.loads((tmp_path / "model" / "metrics.json").read_text()) == on_disk["metrics"]
    assert on_disk["metrics"]["test"] == _report().to_json()
    assert on_disk["training_config"] == {"epochs": 3}
    assert on_disk["code_version"].startswith("0.") and "+" in on_disk["code_version"]
    assert (tmp_path / "model" / "confusion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "## test split" in (tmp_path / "model" / "per_class.md").read_text()
    assert read_card(uri) == card

    # Same weights -> same version; different weights -> different version.
    assert _save(model, str(tmp_path / "again")).model_version == card.model_version
    other = build_model("efficientnet_lite0", weights=None)
    with torch.no_grad():
        other.head[-1].bias.add_(1.0)
    other.load_state_dict({**model.state_dict(), "head.3.bias": other.head[-1].bias})
    assert _save(other, str(tmp_path / "other")).model_version != card.model_version


def test_code_version_format():
    v = code_version()
    assert v.startswith("0.1.0+") and (v.endswith("+unknown") or "+git." in v)


@torch.no_grad()
def _logits(model, x: torch.Tensor) -> torch.Tensor:
    return model(x)  # the fixture and loaded models are in eval mode


def test_round_trip_predictions_equal(model, tmp_path, monkeypatch):
    uri = str(tmp_path / "model")
    _save(model, uri)
    x = torch.rand(3, 1, 64, 64)
    before = _logits(model, x)

    # Loading must not unpickle anything.
    def no_pickle(*args, **kwargs):
        raise AssertionError("load_model_dir used pickle")

    monkeypatch.setattr(pickle, "loads", no_pickle)
    monkeypatch.setattr(pickle, "load", no_pickle)
    monkeypatch.setattr(pickle, "Unpickler", no_pickle)
    monkeypatch.setattr(torch, "load", no_pickle)
    loaded, card = load_model_dir(uri)
    assert not loaded.training
    assert card.tta_hflip is True
    assert torch.equal(_logits(loaded, x), before)


def test_corrupted_weights_are_refused(model, tmp_path):
    uri = str(tmp_path / "model")
    card = _save(model, uri)
    path = tmp_path / "model" / WEIGHTS_NAME
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped bit pattern deep inside a tensor
    path.write_bytes(bytes(data))
    with pytest.raises(ModelLoadError, match="does not match its model card") as err:
        load_model_dir(uri)
    assert card.model_version in str(err.value) and "corrupted" in str(err.value)

    path.write_bytes(bytes(data[:1000]))  # truncated
    with pytest.raises(ModelLoadError, match="does not match its model card"):
        load_model_dir(uri)

    path.unlink()
    with pytest.raises(ModelLoadError, match=f"no {WEIGHTS_NAME}"):
        load_model_dir(uri)


def test_bad_card_and_missing_dir(model, tmp_path):
    with pytest.raises(ModelLoadError, match="not a model directory"):
        load_model_dir(str(tmp_path / "nothing"))
    uri = str(tmp_path / "model")
    _save(model, uri)
    card_path = tmp_path / "model" / CARD_NAME
    card_path.write_text(card_path.read_text()[:-20])
    with pytest.raises(ModelLoadError, match="not a valid model card"):
        load_model_dir(uri)


def test_weights_not_fitting_the_architecture(model, tmp_path):
    """A consistent card + weights for another architecture: refused, not half-loaded."""
    uri = str(tmp_path / "model")
    card = _save(model, uri)
    wrong = card.model_copy(update={"architecture": {**card.architecture, "head": "linear"}})
    (tmp_path / "model" / CARD_NAME).write_text(wrong.model_dump_json())
    with pytest.raises(ModelLoadError, match="do not fit"):
        load_model_dir(uri)


def test_s3_model_dir(model, s3_bucket):
    uri = f"{s3_bucket}/models/m1"
    card = _save(model, uri)
    assert storage.exists(storage.join(uri, WEIGHTS_NAME))
    loaded, loaded_card = load_model_dir(uri)
    assert loaded_card.model_version == card.model_version
    x = torch.rand(2, 1, 64, 64)
    assert torch.equal(_logits(loaded, x), _logits(model, x))
