"""The recipe options against source shortcuts (docs/source-study.md), each shown to act in
training: contrast normalisation in the one preprocessing path, acquisition augmentation,
group DRO, the class-conditional source adversary, mixup and cutmix. Tiny models, few steps."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from heldout_data import two_sources
from PIL import Image
from tinymodels import tiny_lite0

from covidray.augment import JpegBlocks, build_augmentation
from covidray.config import AugmentConfig, IngestConfig
from covidray.dataset import load_images, load_rows, shard_indices
from covidray.ingest import ingest
from covidray.modeldir import ModelCard
from covidray.preprocess import CONTRAST, check_card, normalize_contrast, prepare_array
from covidray.train.config import TrainConfig
from covidray.train.loop import build_training, load_worker_data, train_one_epoch
from covidray.train.robust import SourceCells, grad_reverse, mix_batch

CPU = torch.device("cpu")
PLAIN = AugmentConfig(rotation_deg=0, shift=0, hflip=False, gamma=None, contrast=None)
# every recipe option off unless a test turns it on, whatever the defaults
TINY = {
    "weights": None,
    "input_size": 32,
    "batch_size": 4,
    "augment": PLAIN,
    "contrast": "none",
    "acquisition_augment": False,
}


def _cfg(**kw) -> TrainConfig:
    return TrainConfig(data="d", out="o", **{**TINY, **kw})


def _batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, SourceCells]:
    """8 films: covid from one source, pneumonia and normal from two each."""
    x = torch.randint(
        0, 256, (8, 1, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    y = torch.tensor([0, 1, 2, 0, 1, 2, 1, 2])
    sources = ["a", "a", "a", "a", "b", "b", "a", "b"]
    cells = SourceCells.of(y.numpy(), sources, 3)
    return x, y, cells.index(sources), cells


def _inputs_seen(
    cfg: TrainConfig, cells: SourceCells | None = None, steps: int = 1
) -> list[torch.Tensor]:
    """The batches the model saw in ``steps`` optimizer steps of ``cfg`` on :func:`_batch`."""
    x, y, s, batch_cells = _batch()
    parts = build_training(cfg, steps_per_epoch=steps, device=CPU, cells=cells or batch_cells)
    seen: list[torch.Tensor] = []
    parts.model.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()))
    torch.manual_seed(0)
    batches = [torch.arange(0, 8)] * steps
    train_one_epoch(parts, batches, x, y, CPU, train_s=s)
    return seen


def test_options_off_by_default() -> None:
    # none of them held on a second held-out configuration (docs/source-study.md)
    cfg = TrainConfig(data="d", out="o")
    assert (cfg.contrast, cfg.acquisition_augment, cfg.mix) == ("none", False, "none")
    assert cfg.group_dro_step == 0 and cfg.source_adversary == 0
    x = _batch()[0].float() / 255
    seen = _inputs_seen(_cfg())
    assert torch.equal(seen[0], x)  # no option: the model sees the (unaugmented) films


# ------------------------------------------------------------------ contrast normalisation


def test_contrast_in_the_one_preprocessing_path(tmp_path: Path) -> None:
    film = np.clip(np.random.default_rng(0).normal(0.4, 0.05, (80, 96)), 0, 1).astype(np.float32)
    plain = prepare_array(film, 32, None)
    clahe = prepare_array(film, 32, None, "clahe")
    equal = prepare_array(film, 32, None, "equalize")
    assert np.array_equal(normalize_contrast(plain, "clahe"), clahe)
    assert plain.std() < 0.5 * clahe.std() and plain.std() < 0.5 * equal.std()
    # the card records it; a card with a method this code does not apply is refused
    card = ModelCard.for_model(tiny_lite0(), 32, 64, contrast="clahe")
    assert card.preprocessing.contrast == CONTRAST["clahe"]
    check_card(card.preprocessing)
    other = card.preprocessing.model_copy(update={"contrast": "clahe clip 9"})
    with pytest.raises(ValueError, match="contrast normalisation"):
        check_card(other)
    assert ModelCard.for_model(tiny_lite0(), 32, 64).preprocessing.contrast == "none"


def test_contrast_applied_in_training(tmp_path: Path) -> None:
    raw, data = tmp_path / "raw", tmp_path / "ds"
    two_sources(raw)
    ingest(IngestConfig(src=str(raw), dest=str(data), size=64))
    cfg = TrainConfig(data=str(data), out=str(tmp_path / "o"), **{**TINY, "contrast": "clahe"})
    worker = load_worker_data(cfg, rank=0, world=1)
    rows = load_rows(str(data))
    train = rows[rows["split"] == "train"].reset_index(drop=True)
    shard = shard_indices(len(train), 0, 1, cfg.seed)
    plain = load_images([train["uri"][i] for i in shard], 32)
    expected = [normalize_contrast(p[0].numpy(), "clahe") for p in plain]
    assert np.array_equal(worker.train_x[:, 0].numpy(), np.stack(expected))
    assert not torch.equal(worker.train_x, plain)


# ---------------------------------------------------------------- acquisition augmentation


def test_jpeg_blocks_match_a_real_codec() -> None:
    rng = np.random.default_rng(0)
    img = np.uint8(
        np.clip(
            np.add.outer(np.arange(64), np.arange(64)) * 2 + rng.normal(0, 10, (64, 64)), 0, 255
        )
    )
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=50)
    pil = np.asarray(Image.open(buf)).astype(float)
    ours = JpegBlocks((50.0, 50.0), p=1.0)(torch.from_numpy(img / 255.0).float()[None, None])
    ours = ours[0, 0].numpy() * 255
    assert np.abs(ours - img).mean() > 3  # it does change the film
    assert np.abs(ours - pil).mean() < 1.0  # as Pillow's JPEG at quality 50 does


def test_acquisition_augmentation_applied_in_training() -> None:
    names = [type(m).__name__ for m in build_augmentation(PLAIN, acquisition=True)]
    assert {
        "RandomGaussianBlur",
        "RandomSharpness",
        "DownUp",
        "RandomGaussianNoise",
        "JpegBlocks",
    } <= set(names)
    x = _batch()[0].float() / 255
    seen = _inputs_seen(_cfg(acquisition_augment=True), steps=3)
    changed = [(s - x).abs().amax(dim=(1, 2, 3)) > 1e-3 for s in seen]
    assert torch.stack(changed).float().mean() > 0.5
    assert all(float(s.min()) >= 0 and float(s.max()) <= 1 for s in seen)


# ------------------------------------------------------------------------ mixup / cutmix


def test_mixup_and_cutmix_applied_in_training() -> None:
    x = _batch()[0].float() / 255
    (mixed,) = _inputs_seen(_cfg(mix="mixup"))
    assert not torch.equal(mixed, x)
    # each film is lam * x_i + (1 - lam) * x_j: one lam for the batch
    torch.manual_seed(0)
    again, t = mix_batch(x, torch.zeros(8, dtype=torch.long), None, "mixup", 0.4)
    assert torch.allclose(again, mixed, atol=1e-6) and 0 < t.lam < 1
    (cut,) = _inputs_seen(_cfg(mix="cutmix"))
    same = (cut == x).all(dim=1).float().mean()
    assert 0 < same < 1  # a box of other films was pasted in


def test_cutmix_share_is_the_kept_area() -> None:
    x = torch.arange(2 * 16 * 16, dtype=torch.float32).view(2, 1, 16, 16)
    torch.manual_seed(3)
    out, t = mix_batch(x, torch.tensor([0, 1]), None, "cutmix", 1.0)
    kept = (out == x).float().mean().item()
    assert t.lam == pytest.approx(kept) and set(t.y2.tolist()) == {0, 1}


# ------------------------------------------------------------------------------ group DRO


def test_group_dro_applied_in_training() -> None:
    x, y, s, cells = _batch()
    parts = build_training(_cfg(group_dro_step=0.5), steps_per_epoch=3, device=CPU, cells=cells)
    q0 = parts.objective.dro.q.clone()
    assert torch.allclose(q0, torch.full_like(q0, 1 / 6))  # 3 classes x 2 sources
    train_one_epoch(parts, [torch.arange(0, 8)] * 3, x, y, CPU, train_s=s)
    q = parts.objective.dro.q
    present = torch.as_tensor(cells.present.flatten())
    assert q.sum().item() == pytest.approx(1.0)
    # the cell no film of the batch is in loses weight; the others move apart by their losses
    assert (q[~present] < q0[~present]).all() and q[present].std() > 1e-3
    with pytest.raises(ValueError, match="train_s"):
        train_one_epoch(parts, [torch.arange(0, 8)], x, y, CPU)


# -------------------------------------------------------------------- source adversary


def test_gradient_reversal() -> None:
    v = torch.ones(3, requires_grad=True)
    (grad_reverse(v, 0.5) * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    assert v.grad.tolist() == [-0.5, -1.0, -1.5]


def test_source_adversary_applied_in_training() -> None:
    x, y, s, cells = _batch()
    assert cells.present.sum(1).tolist() == [1, 2, 2]  # covid: one source, inactive
    runs = {}
    for weight in (0.0, 1.0):
        torch.manual_seed(0)
        parts = build_training(
            _cfg(source_adversary=weight), steps_per_epoch=2, device=CPU, cells=cells
        )
        adversary = parts.objective.adversary
        before = None if adversary is None else [p.clone() for p in adversary.parameters()]
        train_one_epoch(parts, [torch.arange(0, 8)] * 2, x, y, CPU, train_s=s)
        runs[weight] = parts.model.state_dict()
        if adversary is not None:  # trained by the same optimizer
            assert any(
                not torch.equal(a, b) for a, b in zip(before, adversary.parameters(), strict=True)
            )
            feats = torch.randn(8, parts.model.num_features)
            losses = adversary.losses(feats, y, s)
            assert (losses[y == 0] == 0).all() and (losses[y != 0] > 0).all()
    # the reversed gradient reached the backbone: its weights moved otherwise
    moved = [
        k
        for k, v in runs[1.0].items()
        if v.is_floating_point() and not torch.equal(v, runs[0.0][k])
    ]
    assert any(k.startswith("features.") for k in moved)
