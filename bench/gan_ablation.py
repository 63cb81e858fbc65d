"""Does CycleGAN augmentation help? Train the classifier with and without the synthetic images.

    nice -n 19 python bench/gan_ablation.py --data /tmp/gan-cxr-ds --synthetic /tmp/gan-synth \\
        --out /tmp/gan-ablation [--epochs 30] [--threads 1] [--quality]

Both arms use ``covidray.train.run_training`` with default ``TrainConfig`` settings (seed,
schedule, balancing), differing only in ``augment_with``; both are scored on the same real
test split. An arm whose model directory already exists is not retrained (and a killed arm
resumes from its Ray Train checkpoint: the run names are fixed). ``--quality`` adds the
Fréchet-distance check of covidray.gan.quality with the baseline classifier. Prints a table and
a last line ``RESULT {json}``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

ARMS = ("baseline", "augmented")


def test_metrics(report: dict[str, Any]) -> dict[str, float]:
    """COVID recall, COVID F1, macro-F1 and accuracy of an EvalReport.to_json()."""
    return {
        "covid_recall": float(report["covid_recall"]),
        "covid_f1": float(report["per_class"]["covid"]["f1"]),
        "macro_f1": float(report["macro_f1"]),
        "accuracy": float(report["accuracy"]),
        "n": int(report["n"]),
    }


def run_arm(arm: str, args: argparse.Namespace) -> dict[str, Any]:
    """Train one arm (or reuse its finished model directory); its test metrics and model."""
    from covidray import storage
    from covidray.modeldir import CARD_NAME, load_model_dir
    from covidray.train import TrainConfig, run_training

    out = storage.join(args.out, arm)
    model_uri = storage.join(out, "model")
    t0 = time.perf_counter()
    if not storage.exists(storage.join(model_uri, CARD_NAME)):
        overrides: dict[str, Any] = {"run_name": arm, "seed": args.seed}
        if args.epochs is not None:
            overrides["epochs"] = args.epochs
        if args.threads is not None:
            overrides["torch_threads"] = args.threads
        cfg = TrainConfig(
            data=args.data,
            out=out,
            augment_with=args.synthetic if arm == "augmented" else None,
            **overrides,
        )
        run_training(cfg)
    _, card = load_model_dir(model_uri)
    return {
        "model_uri": model_uri,
        "model_version": card.model_version,
        "epochs_run": card.training.get("epochs_run"),
        "best_epoch": card.training.get("best_epoch"),
        "train_counts": card.training.get("counts"),
        "wall_s": card.training.get("wall_s", time.perf_counter() - t0),
        "test": test_metrics(card.metrics["test"]),
        "val": test_metrics(card.metrics["val"]),
    }


def table(results: dict[str, dict[str, Any]]) -> str:
    keys = ("covid_recall", "covid_f1", "macro_f1", "accuracy")
    lines = [f"{'test split':<12}" + "".join(f"{k:>14}" for k in keys)]
    for arm, r in results.items():
        lines.append(f"{arm:<12}" + "".join(f"{r['test'][k]:>14.3f}" for k in keys))
    if len(results) == 2:
        delta = [results["augmented"]["test"][k] - results["baseline"]["test"][k] for k in keys]
        lines.append(f"{'Δ':<12}" + "".join(f"{d:>+14.3f}" for d in delta))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default="/tmp/gan-cxr-ds", help="ingested dataset")
    p.add_argument("--synthetic", default="/tmp/gan-synth", help="`covidray gan generate` out")
    p.add_argument("--out", default="/tmp/gan-ablation")
    p.add_argument("--epochs", type=int, help="default: TrainConfig's")
    p.add_argument("--threads", type=int, help="torch threads per worker")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", choices=ARMS, help="train just one arm")
    p.add_argument("--quality", action="store_true", help="Fréchet check with the baseline")
    args = p.parse_args(argv)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

    from covidray.manifest import read_manifest

    need_synth = args.only != "baseline" or args.quality
    n_synth = read_manifest(args.synthetic).num_rows if need_synth else None
    results = {arm: run_arm(arm, args) for arm in ARMS if args.only in (None, arm)}
    print(f"synthetic images: {n_synth} ({args.synthetic})")
    print(table(results))
    payload: dict[str, Any] = {"n_synthetic": n_synth, "arms": results}
    if args.quality and "baseline" in results:
        from covidray.gan.quality import quality_report, report_table

        q = quality_report(results["baseline"]["model_uri"], args.data, args.synthetic)
        print(report_table(q).to_string(index=False))
        payload["quality"] = q.model_dump()
    print("RESULT " + json.dumps(payload))
    return 0


if __name__ == "__main__":
    sys.exit(main())
