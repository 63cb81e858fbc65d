"""Site fine-tuning: a model trained on one phantom style, fine-tuned on a few films of a second
style (another site's processing), beats training from scratch with the same epochs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from viewfilms import write_view_set

from covidray.config import IngestConfig, SplitConfig
from covidray.evaluation.evaluate import evaluate_model
from covidray.ingest import ingest
from covidray.modeldir import ModelCard, read_card, save_model_dir
from covidray.synth import write_phantoms
from covidray.train.config import TrainConfig
from covidray.train.loop import build_training, epoch_seed, load_worker_data, train_one_epoch

SIZE = 64


def _dataset(root: Path, name: str, n: int, seed: int, style: str, split_seed: int = 0) -> str:
    """Phantoms of ``style``, ingested; ``split_seed`` is one whose keyed-hash split puts
    patients of every class in train and val (so few patients leave it to chance)."""
    raw, ds = root / f"{name}-raw", root / name
    write_phantoms(str(raw), n_per_class=n, seed=seed, size=SIZE, style=style)
    split = SplitConfig(seed=split_seed)
    ingest(
        IngestConfig(src=str(raw), dest=str(ds), size=SIZE, parallel_threshold=10**9, split=split)
    )
    return str(ds)


def _train_parent(data: str, out: str) -> str:
    """The parent: the recipe's own training steps in this process (no Ray needed)."""
    cfg = TrainConfig(data=data, out=out, input_size=SIZE, epochs=10, batch_size=8, lr=1e-3)
    torch.set_num_threads(2)
    worker = load_worker_data(cfg, rank=0, world=1)
    parts = build_training(cfg, worker.sampler.steps, torch.device("cpu"))
    for epoch in range(cfg.epochs):
        torch.manual_seed(epoch_seed(cfg.seed, epoch, 0))
        batches = worker.sampler.batches(epoch, 0)
        train_one_epoch(parts, batches, worker.train_x, worker.train_y, torch.device("cpu"))
    model = parts.model.eval()
    card = ModelCard.for_model(model, SIZE, SIZE, tta_hflip=True)
    save_model_dir(model, card, out)
    return out


@pytest.mark.usefixtures("ray_cluster")
def test_fine_tuning_beats_scratch_on_another_site(tmp_path: Path) -> None:
    from covidray.train.trainer import run_training

    site_a = _dataset(tmp_path, "site-a", 30, seed=0, style="a")
    site_b = _dataset(tmp_path, "site-b", 6, seed=1, style="b", split_seed=8)
    held_out = _dataset(tmp_path, "site-b-eval", 12, seed=2, style="b")
    parent = _train_parent(site_a, str(tmp_path / "parent"))
    views = str(tmp_path / "views")
    ingest(IngestConfig(src=write_view_set(tmp_path / "views-raw"), dest=views, size=SIZE))

    common = {"data": site_b, "epochs": 4, "batch_size": 8, "eval_batch_size": 16}
    tuned = run_training(
        TrainConfig(**common, out=str(tmp_path / "tuned"), init_from=parent, views=views)
    )
    scratch = run_training(TrainConfig(**common, out=str(tmp_path / "scratch"), input_size=SIZE))

    card = read_card(tuned.model_uri)
    assert card.lineage[0]["model_version"] == read_card(parent).model_version
    assert card.preprocessing.input_size == SIZE and card.calibration is not None
    assert card.gate is not None and card.training_config["lr"] == 3e-5  # the fine-tune recipe
    # Refitted on the new weights at the end of fine-tuning: the view check and the CAM scale.
    assert card.view_check is not None and card.cam_covid_scale is not None
    f1_tuned = evaluate_model(tuned.model_uri, held_out, "all").macro_f1
    f1_scratch = evaluate_model(scratch.model_uri, held_out, "all").macro_f1
    print(f"macro-F1 on held-out site-b films: fine-tuned {f1_tuned:.3f}, scratch {f1_scratch:.3f}")
    assert f1_tuned >= f1_scratch + 0.1


def test_fine_tuning_refuses_data_ingested_at_another_size(tmp_path: Path) -> None:
    from covidray.train.trainer import run_training

    a = _dataset(tmp_path, "a", 4, seed=0, style="a", split_seed=122)
    parent = _train_parent(a, str(tmp_path / "p"))
    raw = tmp_path / "b-raw"
    write_phantoms(str(raw), n_per_class=4, seed=1, size=128, style="b")
    other = tmp_path / "b"
    ingest(IngestConfig(src=str(raw), dest=str(other), size=96, parallel_threshold=10**9))
    with pytest.raises(ValueError, match="re-ingest them with --size 64"):
        run_training(TrainConfig(data=str(other), out=str(tmp_path / "o"), init_from=parent))
