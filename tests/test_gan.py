"""CycleGAN augmentation: networks, image pool, Fréchet distance, a 2-worker Ray Train run with
S3 checkpoints and resume, and generation of a synthetic TRAIN-only dataset. Tiny phantoms."""

from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import pytest
import torch

from covidray import storage
from covidray.config import IngestConfig
from covidray.dataset import load_rows
from covidray.gan.config import DomainFilter, GanConfig
from covidray.gan.data import UnpairedSampler, domain_rows, steps_per_epoch
from covidray.gan.losses import ImagePool
from covidray.gan.model import linear_decay
from covidray.gan.networks import PatchDiscriminator, ResnetGenerator, receptive_field
from covidray.gan.quality import frechet_distance, pca_project, sqrtm_psd
from covidray.ingest import ingest
from covidray.manifest import read_manifest
from covidray.synth import write_phantoms

# ----------------------------------------------------------------------------- networks


def test_generator_preserves_size_and_patchgan_shape():
    g = ResnetGenerator(1, 1, ngf=8, n_blocks=2)
    for size in (64, 96):
        y = g(torch.randn(2, 1, size, size))
        assert y.shape == (2, 1, size, size) and y.abs().max() <= 1.0  # tanh
    d = PatchDiscriminator(1, ndf=8)
    assert receptive_field(d) == 70
    assert d(torch.randn(1, 1, 64, 64)).shape == (1, 1, 6, 6)
    assert d(torch.randn(1, 1, 256, 256)).shape == (1, 1, 30, 30)  # as in Zhu et al.


def test_patchgan_sees_exactly_70x70():
    # Instance norm mixes the whole image; without it the gradient of one output unit shows
    # its receptive field directly.
    d = PatchDiscriminator(1, ndf=4, norm="none")
    x = torch.randn(1, 1, 128, 128, requires_grad=True)
    d(x)[0, 0, 7, 7].backward()
    rows, cols = np.nonzero(x.grad[0, 0].abs().numpy() > 0)
    assert rows.max() - rows.min() + 1 == 70 and cols.max() - cols.min() + 1 == 70


# ----------------------------------------------------------------------------- pool, schedule


def test_image_pool_semantics():
    assert torch.equal(ImagePool(0).query(torch.ones(3, 1, 2, 2)), torch.ones(3, 1, 2, 2))
    pool = ImagePool(4, seed=1)
    first = torch.arange(4.0).view(4, 1, 1, 1)
    assert torch.equal(pool.query(first), first) and len(pool) == 4  # filling: returned as is
    returned = []
    for k in range(50):
        new = torch.full((1, 1, 1, 1), 100.0 + k)
        out = pool.query(new)
        assert out.shape == new.shape and len(pool) == 4
        returned.append(float(out))
    history = [(k, r) for k, r in enumerate(returned) if r != 100.0 + k]
    assert 10 < len(history) < 40  # about half come from the history ...
    assert all(r < 100.0 + k for k, r in history)  # ... and only ever from the past
    initial = [r for r in returned if r < 100]
    assert len(set(initial)) == len(initial)  # a stored image leaves the pool when returned

    state = pool.state_dict()
    twin = ImagePool(4, seed=99)
    twin.load_state_dict(state)
    x = torch.full((3, 1, 1, 1), 7.0)
    assert torch.equal(pool.query(x), twin.query(x))  # restored images and rng


def test_linear_decay_and_steps():
    f = linear_decay(100, 0.5)
    assert f(0) == f(49) == 1.0 and f(50) == 1.0 and f(75) == pytest.approx(0.5)
    assert f(99) == pytest.approx(0.02) and f(100) == 0.0
    assert steps_per_epoch(10, 30, world=2, batch_size=1, epochs=3, iterations=None) == 15
    assert steps_per_epoch(10, 30, world=2, batch_size=1, epochs=3, iterations=1000) == 334
    s = UnpairedSampler(5, 7, batch_size=2, steps=4, seed=0)
    a = s.batches(1, 0, s.generator(1, 0))
    b = s.batches(1, 0, s.generator(1, 0))
    assert len(a) == 4 and all(torch.equal(x[0], y[0]) for x, y in zip(a, b, strict=True))
    assert sorted(torch.cat([x[0] for x in a])[:5].tolist()) == [0, 1, 2, 3, 4]


def test_domain_filter():
    import pandas as pd

    rows = pd.DataFrame(
        {
            "image_id": list("abcdef"),
            "label": ["normal"] * 4 + ["covid"] * 2,
            "split": ["train", "train", "val", "train", "train", "test"],
            "synthetic": [False, False, False, True, False, False],
            "age_group": ["adult", "child", "adult", "adult", "adult", "adult"],
            "source": ["nih", "kaggle", "nih", "cyclegan", "ieee", "ieee"],
            "view": ["PA", None, "AP", "PA", "AP", "PA"],
        }
    )
    assert list(domain_rows(rows, "normal", DomainFilter())["image_id"]) == ["a"]
    assert list(domain_rows(rows, "normal", DomainFilter(age_group="any"))["image_id"]) == [
        "a",
        "b",
    ]
    assert domain_rows(rows, "covid", DomainFilter(view="pa")).empty
    with pytest.raises(ValueError, match="same rows"):
        GanConfig(data="d", out="o", domain_b="normal")
    with pytest.raises(ValueError, match="unknown class"):
        GanConfig(data="d", out="o", domain_b="flu")


# ----------------------------------------------------------------------------- Fréchet


def test_frechet_distance_sanity():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 6))
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-6)
    y = rng.normal(size=(300, 6))
    near, far = frechet_distance(x, y), frechet_distance(x, y + 2.0)
    assert near < 0.5 and far > near + 20  # shift of 2 in 6 dims adds ~24
    wide = frechet_distance(x, y * 3.0)
    assert wide > near + 10
    m = np.cov(rng.normal(size=(50, 5)), rowvar=False)
    r = sqrtm_psd(m)
    assert np.allclose(r @ r, m, atol=1e-8)
    try:
        from scipy.linalg import sqrtm
    except ImportError:
        pass
    else:  # the textbook formula with scipy's general sqrtm agrees
        s1, s2 = np.cov(x, rowvar=False), np.cov(y * 3.0, rowvar=False)
        ref = ((x.mean(0) - 3 * y.mean(0)) ** 2).sum() + np.trace(s1 + s2)
        ref -= 2 * np.trace(sqrtm(s1 @ s2).real)
        assert wide == pytest.approx(ref, rel=1e-6)
    a, b = pca_project([x, y + 1.0], dims=3)
    assert a.shape == (300, 3) and b.shape == (300, 3)


# ----------------------------------------------------------------------------- Ray Train


@pytest.fixture(scope="module")
def phantom_raw(tmp_path_factory) -> str:
    raw = str(tmp_path_factory.mktemp("gan-phantoms"))
    write_phantoms(raw, n_per_class=6, seed=1, size=64)
    return raw


TINY_YAML = "ngf: 8\nn_blocks: 2\nndf: 8\nsize: 64\npool_size: 3\ntorch_threads: 1\n"


def test_gan_trains_resumes_and_generates(ray_cluster, phantom_raw, s3_bucket, tmp_path, capsys):
    from covidray.cli import main
    from covidray.gan.train import run_gan_training
    from covidray.modeldir import load_generator

    data = f"{s3_bucket}/ds"
    ingest(IngestConfig(src=phantom_raw, dest=data, size=64))
    out = f"{s3_bucket}/gan"
    cfg = GanConfig(
        data=data,
        out=out,
        size=64,
        ngf=8,
        n_blocks=2,
        ndf=8,
        pool_size=3,
        epochs=1,
        iterations=2,
        workers=2,
        torch_threads=1,
        run_name="smoke",
    )
    seen: list[dict] = []
    first = run_gan_training(cfg, on_epoch=seen.append)
    (h0,) = first.history
    assert h0["start_epoch"] == 0 and not h0["resumed"] and h0["world_size"] == 2
    assert h0["step"] == 2 and first.total_steps == 2
    for key in ("loss_g", "loss_g_gan", "loss_cycle", "loss_identity", "loss_d_a", "loss_d_b"):
        assert math.isfinite(h0[key]) and h0[key] > 0
    assert [m["epoch"] for m in seen] == [0]
    ckpts = [u for u in storage.walk_files(first.run_path) if u.endswith("gan_state.pt")]
    assert ckpts and all(u.startswith(f"{s3_bucket}/gan/ray/smoke/") for u in ckpts)
    assert storage.exists(f"{out}/samples/epoch_001.png")

    # Same run name and out, one more epoch (CLI + YAML): resumes at checkpoint epoch + 1.
    yaml_path = tmp_path / "gan.yaml"
    yaml_path.write_text(TINY_YAML + "iterations: 4\n")
    argv = ["gan", "train", "--data", data, "--out", out, "--from", "normal", "--to", "covid"]
    argv += ["--epochs", "2", "--workers", "2", "--run-name", "smoke", "--config", str(yaml_path)]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    model, card = load_generator(out)
    history = card.training["history"]
    assert [h["epoch"] for h in history] == [0, 1]
    assert history[1]["resumed"] and history[1]["start_epoch"] == 1
    assert history[1]["step_at_start"] == 2 and history[1]["step"] == 4  # optimizer state kept
    assert summary["generator_version"] == card.generator_version
    weights = storage.read_bytes(f"{out}/generator.safetensors")
    assert card.generator_version == hashlib.sha256(weights).hexdigest()[:12]
    assert card.size == 64 and card.domain_a == "normal" and card.filter_a["age_group"] == ["adult"]
    assert storage.exists(f"{out}/samples/epoch_002.png")
    assert model(torch.zeros(1, 1, 64, 64)).shape == (1, 1, 64, 64)

    # Generate more images than there are TRAIN normals: sources reused with a crop.
    synth = f"{s3_bucket}/synth"
    n = 7
    argv = ["gan", "generate", "--model", out, "--data", data, "--n", str(n), "--out", synth]
    assert main(argv) == 0
    capsys.readouterr()
    rows = read_manifest(synth).to_pylist()
    real = read_manifest(data).to_pandas()
    by_id = real.set_index("image_id")
    train_normals = set(real[(real["split"] == "train") & (real["label"] == "normal")]["image_id"])
    held_out = set(real[real["split"] != "train"]["image_id"])
    assert len(rows) == n and len(storage.walk_files(f"{synth}/images")) == n
    assert len(train_normals) < n
    for r in rows:
        assert r["synthetic"] is True and r["split"] == "train" and r["source"] == "cyclegan"
        assert r["label"] == "covid" and r["subtype"] == "covid19"
        assert r["generator_version"] == card.generator_version
        assert r["source_image_id"] in train_normals and r["source_image_id"] not in held_out
        src = by_id.loc[r["source_image_id"]]
        assert r["patient_id"] == f"gan:{src['patient_id']}"
        assert (r["width"], r["height"]) == (src["width"], src["height"])
        png = storage.read_bytes(f"{synth}/{r['uri']}")
        assert not r["uri"].startswith(("/", "s3://"))
        assert hashlib.sha256(png).hexdigest() == r["image_id"]
    assert len({r["image_id"] for r in rows}) == n

    both = load_rows(data, synth)  # what `covidray train --augment-with` adds: TRAIN only
    added = both[both["synthetic"].astype(bool)]
    assert len(added) == n and set(added["split"]) == {"train"}
