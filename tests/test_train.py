"""Training: config, sampling and sharding, a 2-worker Ray Train run, and a real worker kill
with resume from S3 checkpoints (one shared run, through the CLI). Tiny phantom data (8 per
class at 64 px), random init."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import signal
import uuid

import numpy as np
import pytest
from viewfilms import write_view_set

from covidray import storage
from covidray.augment import AugmentConfig
from covidray.config import IngestConfig, load_config
from covidray.dataset import load_rows, shard_indices, training_data_hash
from covidray.ingest import ingest
from covidray.manifest import read_manifest, to_table
from covidray.synth import write_phantoms
from covidray.train.config import TrainConfig
from covidray.train.data import EpochSampler, sample_weights
from covidray.train.loop import build_training, lr_lambda, train_one_epoch

TINY = {
    "weights": None,
    "input_size": 64,
    "batch_size": 4,
    "eval_batch_size": 16,
    "augment": AugmentConfig(rotation_deg=5, shift=0.05),
}


@pytest.fixture(scope="module")
def phantom_raw(tmp_path_factory) -> str:
    raw = str(tmp_path_factory.mktemp("phantoms"))
    write_phantoms(raw, n_per_class=8, seed=0, size=64)
    return raw


@pytest.fixture(scope="module")
def phantom_ds(phantom_raw, tmp_path_factory) -> str:
    dest = str(tmp_path_factory.mktemp("ds"))
    ingest(IngestConfig(src=phantom_raw, dest=dest, size=64))
    return dest


# ----------------------------------------------------------------------------- unit


def test_config_yaml_and_none_weights(tmp_path):
    path = tmp_path / "train.yaml"
    path.write_text(
        "data: s3://b/ds\nout: /tmp/o\nweights: none\nepochs: 3\naugment:\n  hflip: false\n"
    )
    cfg = load_config(TrainConfig, str(path), workers=2)
    assert cfg.weights is None and cfg.epochs == 3 and cfg.workers == 2
    assert cfg.augment.hflip is False and cfg.backbone == "efficientnet_lite0"
    assert TrainConfig(data="d", out="o").weights == "imagenet"
    assert cfg.freeze == "none"  # nothing pretrained to keep frozen
    assert TrainConfig(data="d", out="o").freeze == "top:6"  # lite0 default: stem + 2 stages
    assert TrainConfig(data="d", out="o", backbone="vgg16").freeze == "none"
    assert TrainConfig(data="d", out="o", freeze="backbone").freeze == "backbone"
    with pytest.raises(ValueError, match="unknown backbone"):
        TrainConfig(data="d", out="o", backbone="alexnet")
    with pytest.raises(ValueError, match="extra"):
        TrainConfig(data="d", out="o", epoch=3)
    with pytest.raises(ValueError, match="top:N|freeze|N must"):
        TrainConfig(data="d", out="o", freeze="top:99")


def test_sample_weights_balance():
    labels = np.array([0] * 60 + [1] * 30 + [2] * 10)
    sources = np.array(["a"] * 50 + ["b"] * 10 + ["a"] * 30 + ["c"] * 10)
    for mode in ("class", "class_source"):
        w = sample_weights(labels, sources, mode, source_power=1.0)
        assert w.sum() == pytest.approx(1.0)
        for c in range(3):
            assert w[labels == c].sum() == pytest.approx(1 / 3)
    w = sample_weights(labels, sources, "class_source", source_power=1.0)
    assert w[:50].sum() == pytest.approx(w[50:60].sum())  # both sources of class 0 equal
    w_half = sample_weights(labels, sources, "class_source", source_power=0.5)
    share_b = w_half[50:60].sum() / w_half[:60].sum()
    assert share_b == pytest.approx(math.sqrt(10) / (math.sqrt(10) + math.sqrt(50)))
    assert np.allclose(sample_weights(labels, sources, "none"), 0.01)


def test_shards_partition_and_equal_steps():
    n, world = 23, 3
    shards = [shard_indices(n, r, world, seed=5) for r in range(world)]
    assert sorted(np.concatenate(shards).tolist()) == list(range(n))
    assert np.array_equal(shards[0], shard_indices(n, 0, world, seed=5))  # deterministic
    w = np.full(n, 1 / n)
    steps = [EpochSampler(w[s], n, world, 4, seed=1) for s in shards]
    assert len({s.steps for s in steps}) == 1
    batches = steps[1].batches(epoch=2, rank=1)
    assert len(batches) == steps[1].steps and all(len(b) == 4 for b in batches)
    assert all(int(b.max()) < len(shards[1]) for b in batches)
    again = steps[1].batches(epoch=2, rank=1)  # the same epoch replays identically (resume)
    assert all((a == b).all() for a, b in zip(batches, again, strict=True))


def test_lr_schedule_warmup_then_cosine():
    cfg = TrainConfig(data="d", out="o", epochs=10, warmup_epochs=1, min_lr_ratio=0.1)
    f = lr_lambda(cfg, steps_per_epoch=10)
    assert f(0) < f(5) < f(9) <= 1.0
    assert f(10) == pytest.approx(1.0)
    assert f(55) < f(20)
    assert f(100) == pytest.approx(0.1)


def test_train_one_epoch_updates_weights():
    import torch

    cfg = TrainConfig(data="d", out="o", **{**TINY, "input_size": 32})
    device = torch.device("cpu")
    parts = build_training(cfg, steps_per_epoch=2, device=device)
    model, optimizer, scheduler = parts.model, parts.optimizer, parts.scheduler
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randint(0, 256, (8, 1, 32, 32), dtype=torch.uint8)
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    steps: list[tuple[int, int, int]] = []
    batches = [torch.arange(0, 4), torch.arange(4, 8)]
    loss_sum, seen = train_one_epoch(
        parts,
        batches,
        x,
        y,
        device,
        hook=lambda **kw: steps.append((kw["epoch"], kw["step"], kw["rank"])),
        epoch=3,
        rank=0,
    )
    assert seen == 8 and math.isfinite(loss_sum) and loss_sum > 0
    assert steps == [(3, 0, 0), (3, 1, 0)]
    assert optimizer.state_dict()["state"] and scheduler.last_epoch == 2
    changed = [
        k
        for k, v in model.state_dict().items()
        if v.is_floating_point() and not torch.equal(v, before[k])
    ]
    assert any("head" in k for k in changed) and len(changed) > len(before) // 2


def test_rows_hash_and_augment_with(phantom_ds, tmp_path):
    rows = load_rows(phantom_ds)
    assert set(rows["split"]) == {"train", "val", "test"}
    assert all(os.path.isabs(u) and os.path.exists(u) for u in rows["uri"])
    h = training_data_hash(rows)
    assert h == training_data_hash(rows.sample(frac=1.0, random_state=1))  # order-free
    flipped = rows.copy()
    i = flipped.index[flipped["split"] == "train"][0]
    flipped.loc[i, "label"] = "normal" if flipped.loc[i, "label"] != "normal" else "covid"
    assert training_data_hash(flipped) != h
    test_only = rows[rows["split"] == "test"]
    assert training_data_hash(rows.drop(test_only.index)) == h  # test rows are not training data

    # Synthetic rows: added to TRAIN only; one derived from a test image must be dropped.
    table = read_manifest(phantom_ds).to_pylist()
    test_row = next(r for r in table if r["split"] == "test")
    train_row = next(r for r in table if r["split"] == "train")
    synth = []
    for k, src in enumerate((train_row, test_row)):
        synth.append(
            {
                **src,
                "image_id": f"synthetic{k}",
                "uri": f"images/synthetic{k}.png",  # inside its own dataset, as gan writes
                "patient_id": f"gan-{k}",
                "split": "val",
                "synthetic": True,
                "source_image_id": src["image_id"],
                "label": "covid",
            }
        )
    for k, src in enumerate((train_row, test_row)):
        data = storage.read_bytes(os.path.join(phantom_ds, src["uri"]))
        storage.write_bytes(str(tmp_path / "synth" / "images" / f"synthetic{k}.png"), data)
    storage.write_parquet(to_table(synth), str(tmp_path / "synth" / "manifest.parquet"))
    both = load_rows(phantom_ds, str(tmp_path / "synth"))
    added = both[both["image_id"].str.startswith("synthetic")]
    assert list(added["image_id"]) == ["synthetic0"] and list(added["split"]) == ["train"]
    assert len(both) == len(rows) + 1


# ----------------------------------------------------------------------------- Ray Train


def test_checkpoint_dir_private_per_process(s3_bucket, tmp_path):
    """All workers of a restarted group hold copies of one Checkpoint; Ray's as_directory()
    gives them one shared download folder, downloaded again over a worker still reading it.
    checkpoint_dir gives each process its own copy (and reads a local checkpoint in place)."""
    import pickle

    from ray.train import Checkpoint

    from covidray.runtime.train import checkpoint_dir

    payload = os.urandom(1 << 20)
    storage.write_bytes(f"{s3_bucket}/ckpt/state.pt", payload)
    fs, path = storage.pyarrow_filesystem(f"{s3_bucket}/ckpt")
    ckpt = Checkpoint(path, filesystem=fs)
    twin = pickle.loads(pickle.dumps(ckpt))  # what each worker receives
    with checkpoint_dir(ckpt) as a, checkpoint_dir(twin) as b:
        assert a != b
        assert open(os.path.join(a, "state.pt"), "rb").read() == payload
        assert open(os.path.join(b, "state.pt"), "rb").read() == payload
    assert not os.path.exists(a) and not os.path.exists(b)
    (tmp_path / "state.pt").write_bytes(payload)
    with checkpoint_dir(Checkpoint.from_directory(str(tmp_path))) as d:
        assert d == str(tmp_path)
    assert (tmp_path / "state.pt").exists()


def _kill_once(marker: str):
    """A step hook: at epoch 2, step 1 of rank 1, once (marker in S3), SIGKILL this worker."""

    def hook(*, epoch: int, step: int, rank: int) -> None:
        if (epoch, step, rank) != (2, 1, 1) or storage.exists(marker):
            return
        import ray.train

        ray.train.get_all_reported_checkpoints()  # the epoch-1 checkpoint is registered
        storage.write_text(marker, str(os.getpid()))
        os.kill(os.getpid(), signal.SIGKILL)

    return hook


@pytest.fixture(scope="module")
def killed_run(ray_cluster, s3_server, phantom_raw, tmp_path_factory) -> dict:
    """One 2-worker ``covidray train`` run (CLI, data and output on moto S3) whose rank-1 worker
    is SIGKILLed in epoch 2; Ray Train restarts the group from the epoch-1 S3 checkpoint.

    Shared by the tests below: a Ray Train run costs about a minute of worker start-up on two
    cores, whatever the data. The fault drill goes in through ``run_training``'s
    ``step_hook`` (the CLI has no flag for it); everything else is the CLI's own path.
    """
    import boto3

    import covidray.train.trainer
    from covidray.cli import main

    bucket = f"s3://train-killed-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=bucket[5:])
    data, out, views = f"{bucket}/ds", f"{bucket}/run", f"{bucket}/views"
    ingest(IngestConfig(src=phantom_raw, dest=data, size=64))
    drawn = write_view_set(tmp_path_factory.mktemp("views-raw"))
    ingest(IngestConfig(src=drawn, dest=views, size=64))
    marker = f"{bucket}/killed-once"
    yaml_path = tmp_path_factory.mktemp("train-cfg") / "train.yaml"
    yaml_path.write_text(
        "max_failures: 1\neval_batch_size: 16\naugment:\n  rotation_deg: 5\n  shift: 0.05\n"
    )
    argv = ["train", "--data", data, "--out", out, "--weights", "none", "--epochs", "4"]
    argv += ["--workers", "2", "--input-size", "64", "--batch-size", "4", "--seed", "3"]
    argv += ["--config", str(yaml_path), "--views", views]

    real_run_training = covidray.train.trainer.run_training
    runs: list[tuple[TrainConfig, object]] = []
    seen: list[dict] = []

    def with_fault_drill(cfg: TrainConfig, on_epoch=None):
        def both(metrics: dict) -> None:
            seen.append(metrics)
            on_epoch(metrics)  # the CLI's epoch lines

        result = real_run_training(cfg, on_epoch=both, step_hook=_kill_once(marker))
        runs.append((cfg, result))
        return result

    stdout = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(stdout):
        mp.setattr(covidray.train.trainer, "run_training", with_fault_drill)
        rc = main(argv)
    assert rc == 0, stdout.getvalue()[-3000:]
    ((cfg, result),) = runs
    summary = json.loads(stdout.getvalue().strip().splitlines()[-1])
    return {
        "bucket": bucket,
        "data": data,
        "out": out,
        "marker": marker,
        "cfg": cfg,
        "result": result,
        "summary": summary,
        "seen": seen,
    }


def test_two_worker_training_and_model_dir(killed_run, capsys):
    from covidray.cli import main
    from covidray.evaluation.evaluate import evaluate_model
    from covidray.modeldir import load_model_dir

    data, out, summary = killed_run["data"], killed_run["out"], killed_run["summary"]
    cfg = killed_run["cfg"]  # the CLI flags and the YAML file made it into the config
    assert (cfg.workers, cfg.epochs, cfg.seed, cfg.input_size, cfg.batch_size) == (2, 4, 3, 64, 4)
    assert cfg.weights is None and cfg.max_failures == 1 and cfg.augment.rotation_deg == 5
    model_uri = summary["model_uri"]
    assert model_uri == f"{out}/model"
    for name in ("weights.safetensors", "model_card.json", "metrics.json"):
        assert storage.exists(f"{model_uri}/{name}")
    assert storage.exists(f"{model_uri}/confusion.png")
    assert storage.exists(f"{model_uri}/per_class.md")

    model, card = load_model_dir(model_uri)
    assert card.model_version == summary["model_version"]
    assert card.training["workers"] == 2 and card.training["epochs_run"] == 4
    assert card.training["restarts"] == 1
    assert card.training_config["seed"] == 3 and card.training_config["weights"] is None
    history = card.training["history"]
    assert [h["epoch"] for h in history] == [0, 1, 2, 3]
    for epoch in history:
        for key in ("train_loss", "val_loss", "val_macro_f1", "val_accuracy"):
            assert math.isfinite(epoch[key])
    assert history[0]["adam_step"] > 0 and history[0]["start_epoch"] == 0
    assert not history[0]["resumed"]
    for split in ("val", "test"):
        m = card.metrics[split]
        assert m["n"] > 0 and math.isfinite(m["accuracy"]) and math.isfinite(m["macro_f1"])
    assert card.training_data_hash == training_data_hash(load_rows(data))
    # Fitted at the end of training: the gate's view check (--views) and the CAM scale.
    assert cfg.views == f"{killed_run['bucket']}/views"
    assert card.view_check is not None and card.view_check.stats_sha256
    assert card.view_check.cv["laterals_refused"][1] == 6
    assert storage.exists(f"{model_uri}/view.safetensors")
    assert card.cam_covid_scale is not None and card.cam_covid_scale > 0

    # The loaded model reproduces the predictions the trainer scored: the same labels, hence
    # identical counts and rates; probabilities may differ in the last float32 digits (the
    # final evaluation ran in a Ray task with its own thread count), so ECE to 1e-6.
    def rounded(value: object) -> object:  # the separation figures' AUROC and threshold
        if isinstance(value, dict):
            return {k: rounded(v) for k, v in value.items()}
        if isinstance(value, list):
            return [rounded(v) for v in value]
        return round(value, 5) if isinstance(value, float) else value

    def same_report(got: dict, want: dict) -> bool:
        got, want = dict(got), dict(want)
        same_sep = rounded(got.pop("separation")) == rounded(want.pop("separation"))
        return (
            same_sep and got.pop("ece") == pytest.approx(want.pop("ece"), abs=1e-6) and got == want
        )

    report = evaluate_model(model_uri, data, "test")
    assert same_report(report.to_json(), card.metrics["test"])
    assert main(["evaluate", "--model", model_uri, "--data", data, "--format", "json"]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) == 1 and same_report(json.loads(printed[0]), card.metrics["test"])
    assert model.config["backbone"] == "efficientnet_lite0"


def test_worker_killed_resumes_from_s3_checkpoint(killed_run):
    result, seen, cfg = killed_run["result"], killed_run["seen"], killed_run["cfg"]
    bucket = killed_run["bucket"]

    killed_pid = int(storage.read_text(killed_run["marker"]))
    with pytest.raises(ProcessLookupError):
        os.kill(killed_pid, 0)  # the worker process really died
    assert [h["epoch"] for h in result.history] == [0, 1, 2, 3]
    first, resumed = result.history[1], result.history[2]
    assert not first["resumed"] and resumed["resumed"]
    assert resumed["start_epoch"] == first["epoch"] + 1 == 2
    steps = result.history[0]["adam_step"]
    assert steps > 1
    assert resumed["adam_step_at_start"] == first["adam_step"] == 2 * steps  # optimizer restored
    assert result.history[-1]["adam_step"] == 4 * steps
    assert result.history[-1]["lr"] < first["lr"]  # scheduler restored and stepping on
    assert any(m.get("event") == "failure" for m in seen)
    assert [m["epoch"] for m in seen if "epoch" in m] == [0, 1, 2, 3]

    assert result.model_uri == f"{bucket}/run/model"
    assert storage.exists(f"{bucket}/run/model/weights.safetensors")
    assert result.run_path.startswith(f"{bucket}/run/ray/")  # checkpoints went to S3
    checkpoints = [u for u in storage.walk_files(result.run_path) if u.endswith("state.pt")]
    assert 1 <= len(checkpoints) <= cfg.num_to_keep


@pytest.mark.usefixtures("ray_cluster")
def test_same_data_and_seed_give_the_same_model_version(phantom_ds, tmp_path, capsys):
    """Two runs of ``covidray train`` on the same data with the same seed (and the same thread
    count, as on one machine) write bit-identical weights: the same ``model_version``. The
    card records what else the weights depend on (library versions, threads, CPU)."""
    from covidray.cli import main
    from covidray.modeldir import read_card

    versions = []
    for run in ("a", "b"):
        argv = ["train", "--data", phantom_ds, "--out", str(tmp_path / run), "--weights", "none"]
        argv += ["--epochs", "2", "--input-size", "64", "--batch-size", "4", "--seed", "5"]
        assert main(argv) == 0
        summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        versions.append(summary["model_version"])
    assert versions[0] == versions[1]
    env = read_card(str(tmp_path / "a" / "model")).training["environment"]
    assert env["torch_threads"] >= 1 and env["torch"].startswith(("2.", "3."))
    assert {"timm", "kornia", "numpy", "pillow", "cpu_capability"} <= set(env)
