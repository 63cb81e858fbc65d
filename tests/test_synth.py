"""Synthetic chest X-ray phantoms: rendering, lesion masks and the manifest.csv dataset."""

from __future__ import annotations

import csv
import io
import os
import time
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from covidray import synth
from covidray.labels import CLASSES
from covidray.manifest import CSV_COLUMNS
from covidray.synth import KINDS, render_phantom, write_phantoms

LESION_KINDS = ("covid", "bacterial", "viral")


def _render(kind: str, seed: int = 7, **kw):
    return render_phantom(kind, np.random.default_rng(seed), return_lungs=True, **kw)


@pytest.mark.parametrize("kind", KINDS)
def test_shapes_dtypes_and_determinism(kind):
    img, mask, lungs = _render(kind)
    assert img.shape == (256, 256) and img.dtype == np.uint8
    assert mask.shape == (256, 256) and mask.dtype == bool
    assert lungs.shape == (256, 256) and lungs.dtype == bool
    img2, mask2 = render_phantom(kind, np.random.default_rng(7))
    assert img.tobytes() == img2.tobytes()
    assert mask.tobytes() == mask2.tobytes()
    other, _ = render_phantom(kind, np.random.default_rng(8))
    assert other.tobytes() != img.tobytes()


def test_other_sizes():
    for size in (64, 224, 320):
        img, mask = render_phantom("covid", np.random.default_rng(1), size=size)
        assert img.shape == mask.shape == (size, size)
        assert mask.any()


def test_unknown_kind():
    with pytest.raises(ValueError, match="kind"):
        render_phantom("tuberculosis", np.random.default_rng(0))


def test_anatomy_intensities():
    img, _, lungs = _render("normal")
    assert 0.12 < lungs.mean() < 0.4  # two lung fields, a sizeable share of the image
    h, w = img.shape
    left, right = lungs[:, : w // 2].sum(), lungs[:, w // 2 :].sum()
    assert min(left, right) > 0.5 * max(left, right)  # two lungs, one each side
    assert 30 < np.median(img[lungs]) < 100  # dark lungs
    # the mediastinum/spine column between the lungs is bright
    assert np.median(img[h // 4 : h // 2, w // 2 - 6 : w // 2 + 6]) > 140
    # the heart sits on the image right (patient's left): more dense pixels right of midline
    lower = img[h // 2 : int(h * 0.72)]
    band_l = lower[:, w // 2 - w // 5 : w // 2 - 8]
    band_r = lower[:, w // 2 + 8 : w // 2 + w // 5]
    assert (band_r > 140).mean() > (band_l > 140).mean()
    assert img.std() > 25  # not a flat image


def test_normal_mask_empty():
    _, mask, _ = _render("normal")
    assert not mask.any()


@pytest.mark.parametrize("kind", LESION_KINDS)
@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_lesion_masks_tight_and_inside_lungs(kind, seed):
    img, mask, lungs = _render(kind, seed)
    share = mask.mean()
    assert 0.01 < share < 0.25, share
    assert share < 0.6 * lungs.mean()  # tight: clearly smaller than the lung fields
    assert not (mask & ~lungs).any()


@pytest.mark.parametrize("kind", LESION_KINDS)
@pytest.mark.parametrize("seed", [0, 5])
def test_lesion_is_visibly_brighter(kind, seed):
    # same generator state: same patient, pose and exposure; only the lesion differs
    img, mask, _ = _render(kind, seed)
    base, base_mask, _ = _render("normal", seed)
    assert not base_mask.any()
    diff = img.astype(np.float32) - base.astype(np.float32)
    inside = diff[mask].mean()
    outside = np.abs(diff[~mask]).mean()
    assert inside > 12, inside  # lesion contrast well above the noise (sigma ~4)
    assert inside > 4 * outside


def test_covid_is_bilateral_lower_and_peripheral():
    for seed in range(4):
        _, mask, lungs = _render("covid", seed)
        h, w = mask.shape
        assert mask[:, : w // 2].any() and mask[:, w // 2 :].any()  # both lungs
        ys, xs = np.nonzero(mask)
        lys, lxs = np.nonzero(lungs)
        assert ys.mean() > lys.mean()  # lower zones
        assert np.abs(xs - w / 2).mean() > np.abs(lxs - w / 2).mean()  # peripheral


def test_bacterial_is_one_lung():
    for seed in range(6):
        _, mask, _ = _render("bacterial", seed)
        w = mask.shape[1]
        sides = mask[:, : w // 2].sum(), mask[:, w // 2 :].sum()
        assert min(sides) < 0.02 * max(sides)


def test_viral_is_bilateral_perihilar():
    _, mask, lungs = _render("viral", 3)
    w = mask.shape[1]
    assert mask[:, : w // 2].any() and mask[:, w // 2 :].any()
    xs = np.nonzero(mask)[1]
    lxs = np.nonzero(lungs)[1]
    assert np.abs(xs - w / 2).mean() < np.abs(lxs - w / 2).mean()  # medial (perihilar)


def test_extent_scales_the_lesion():
    areas = [_render("covid", 3, extent=e)[1].sum() for e in (0.5, 1.0)]
    assert 0 < areas[0] < areas[1]


def test_render_speed():
    rng = np.random.default_rng(0)
    render_phantom("viral", rng)  # warm caches
    t0 = time.process_time()
    for i in range(12):
        render_phantom(KINDS[i % 4], rng)
    per_image = (time.process_time() - t0) / 12
    assert per_image < 0.1, per_image  # ~20-30 ms on one core; generous for loaded CI


def _read_manifest(path: str) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames or ()) == CSV_COLUMNS
        return list(reader)


def test_write_phantoms(tmp_path):
    dest = str(tmp_path / "phantoms")
    calls: list[int] = []
    manifest = write_phantoms(dest, n_per_class=6, seed=3, size=128, progress=calls.append)
    assert manifest == os.path.join(dest, "manifest.csv")
    rows = _read_manifest(manifest)
    assert len(rows) == 18
    assert calls == list(range(1, 19))
    assert Counter(r["label"] for r in rows) == {c: 6 for c in CLASSES}
    pneumonia = Counter(r["subtype"] for r in rows if r["label"] == "pneumonia")
    assert pneumonia == {"bacterial": 3, "viral": 3}
    assert {r["subtype"] for r in rows if r["label"] == "covid"} == {"covid19"}
    assert {r["subtype"] for r in rows if r["label"] == "normal"} == {"normal"}

    images = {r["image"] for r in rows}
    masks = {r["mask"] for r in rows}
    assert len(images) == len(masks) == 18
    assert not images & masks
    for r in rows:
        assert r["image"].startswith(f"images/{r['label']}/") and r["image"].endswith(".png")
        assert r["mask"].startswith(f"masks/{r['label']}/") and r["mask"].endswith("_mask.png")
        assert "\\" not in r["image"] + r["mask"]
        assert r["patient_id"].startswith(f"phantom:{r['label']}-")
        assert r["view"] in ("PA", "AP")
        assert r["age_group"] == "adult" and 25 <= int(r["age"]) <= 85
        assert r["sex"] in ("M", "F")
        assert r["source_repo"] == "covidray/synth"
        img = Image.open(os.path.join(dest, r["image"]))
        mask = Image.open(os.path.join(dest, r["mask"]))
        assert img.mode == "L" and mask.mode == "L"
        assert img.size == mask.size == (128, 128)
        m = np.asarray(mask)
        assert set(np.unique(m)) <= {0, 255}
        if r["label"] == "normal":
            assert not m.any()
        else:
            assert 0.01 < (m > 0).mean() < 0.25
    # every PNG on disk is in the manifest; masks only under masks/
    on_disk = {
        os.path.relpath(os.path.join(root, f), dest).replace(os.sep, "/")
        for root, _, files in os.walk(dest)
        for f in files
        if f.endswith(".png")
    }
    assert on_disk == images | masks
    assert all(p.startswith("masks/") for p in on_disk - images)

    # progression: some patient has several studies on different days
    days: dict[str, set[str]] = {}
    for r in rows:
        days.setdefault(r["patient_id"], set()).add(r["study_day"])
    series = {p: d for p, d in days.items() if len(d) >= 2}
    assert series, days
    assert all("" not in d for d in series.values())
    # single-study patients: one row each
    assert Counter(r["patient_id"] for r in rows if r["study_day"] == "").most_common(1)[0][1] == 1


def test_progression_series_changes_extent(tmp_path):
    dest = str(tmp_path / "p")
    manifest = write_phantoms(dest, n_per_class=5, seed=0, size=128)
    rows = [r for r in _read_manifest(manifest) if r["patient_id"] == "phantom:covid-0000"]
    assert [r["study_day"] for r in rows] == ["0", "4", "9"]
    areas = [(np.asarray(Image.open(os.path.join(dest, r["mask"]))) > 0).sum() for r in rows]
    assert areas[1] > areas[0] and areas[1] > areas[2]  # grows, then shrinks


def test_write_phantoms_deterministic_and_odd_split(tmp_path):
    a = write_phantoms(str(tmp_path / "a"), n_per_class=3, seed=11, size=64)
    b = write_phantoms(str(tmp_path / "b"), n_per_class=3, seed=11, size=64)
    ra, rb = _read_manifest(a), _read_manifest(b)
    assert ra == rb
    for r in ra:
        pa_ = (tmp_path / "a" / r["image"]).read_bytes()
        pb_ = (tmp_path / "b" / r["image"]).read_bytes()
        assert pa_ == pb_
    sub = Counter(r["subtype"] for r in ra if r["label"] == "pneumonia")
    assert sub == {"bacterial": 2, "viral": 1}  # odd N: bacterial gets the extra one
    assert len(ra) == 9


def test_write_phantoms_uses_storage(monkeypatch, tmp_path):
    """All writes go through covidray.storage (so DEST may be s3://)."""
    written: list[str] = []
    real = synth.storage.write_bytes

    def spy(uri, data):
        written.append(uri)
        real(uri, data)

    monkeypatch.setattr(synth.storage, "write_bytes", spy)
    write_phantoms(str(tmp_path / "s"), n_per_class=1, seed=0, size=64)
    # 3 images + 3 masks + manifest (write_text calls write_bytes)
    assert len(written) == 7
    assert written[-1].endswith("manifest.csv")


def test_bad_n_per_class(tmp_path):
    with pytest.raises(ValueError):
        write_phantoms(str(tmp_path), n_per_class=0)


def test_manifest_is_csv_text(tmp_path):
    manifest = write_phantoms(str(tmp_path / "m"), n_per_class=2, seed=1, size=64)
    text = open(manifest).read()
    rows = list(csv.reader(io.StringIO(text)))
    assert rows[0] == list(CSV_COLUMNS)
    assert len(rows) == 7
