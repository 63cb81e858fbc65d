"""Calibration and input-gate figures of a trained model (docs/gate.md's tables): ECE before
and after calibration on the test split with bootstrap intervals, the gate's false rejections
by reason, class and source, the view check's cross-validated figures, and per kind of
out-of-scope image the AUROC of the image distance and the share refused by the gate (the
distance, then the view check), with how many the view check refused.

    .venv/bin/python bench/trust.py --model RUN/model --data DS [--ood ../shared/data/ood]

``DS`` is the ingested ``../shared/data/cxr`` the model was trained on (its test split is the
in-scope set). The last line is ``RESULT {json}``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from covidray.dataset import load_rows  # noqa: E402
from covidray.evaluation.evaluate import evaluate_rows, select_split  # noqa: E402
from covidray.evaluation.gate_eval import evaluate_gate, out_of_scope_sets  # noqa: E402
from covidray.evaluation.intervals import wilson  # noqa: E402
from covidray.predict import Predictor  # noqa: E402
from covidray.storage import read_bytes  # noqa: E402


def _interval(i: tuple[float, float] | None) -> str:
    return "–" if i is None else f"{i[0]:.3f}–{i[1]:.3f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True, help="the ingested dataset (test split: in scope)")
    ap.add_argument("--ood", type=Path, default=REPO.parent / "shared" / "data" / "ood")
    ap.add_argument("--split", default="test")
    args = ap.parse_args(argv)

    predictor = Predictor.from_dir(args.model)
    rows = select_split(load_rows(args.data), args.split)
    report = evaluate_rows(predictor, rows)
    out = report.outputs
    print(
        f"model {predictor.model_version} (scoring {predictor.scoring_version}), "
        f"{args.split} split, n = {report.n}"
    )
    print(f"calibration: {out.calibration['method']}, T = {out.calibration['temperature']:.3f}")
    print(
        f"ECE before {out.ece_uncalibrated:.3f} ({_interval(out.ece_uncalibrated_interval)}), "
        f"after {report.ece:.3f} ({_interval(out.ece_interval)}); labels changed: "
        f"{out.labels_changed_by_calibration}; accuracy {report.accuracy:.3f}"
    )
    if out.ece_if_calibrated:
        print(
            "ECE a perfectly calibrated model with these predictions shows on as many films: "
            f"median {out.ece_if_calibrated[0]:.3f}, 95th percentile {out.ece_if_calibrated[1]:.3f}"
        )

    films = [read_bytes(u) for u in rows["uri"]]
    kinds = out_of_scope_sets(films, args.ood)
    gate = evaluate_gate(predictor, films, kinds)
    print(
        f"gate threshold {gate.threshold:.2f}; false rejections on {args.split}: "
        f"{gate.false_rejection_rate:.3f} ({_interval(gate.false_rejection_interval)}), "
        f"n = {gate.n_in_scope}"
    )
    print(
        "  by reason: "
        + (", ".join(f"{r} {n}" for r, n in out.rejections_by_reason.items()) or "none")
    )
    by = out.false_rejections_by
    for column in ("label", "source"):
        if column in by:
            print(
                f"  refused by {column}: "
                + ", ".join(
                    f"{v} {k}/{n} ({_interval(wilson(k, n))})" for v, (k, n) in by[column].items()
                )
            )
    view = predictor.card.view_check
    if view is not None:
        print(
            f"view check over {', '.join(view.feature_layers)} ({view.fitted_on}), "
            "cross-validated by patient: "
            + ", ".join(f"{k.replace('_', ' ')} {a}/{b}" for k, (a, b) in view.cv.items())
        )
    layers = gate.feature_layers
    print(f"gate layers: {', '.join(layers)}; threshold at {gate.threshold:.2f}")
    print(
        f"{'kind':<18}{'n':>4}  {'AUROC':>6} (95 % CI)      energy  refused (95 % CI)      by view"
    )
    for kind, k in gate.kinds.items():
        per_layer = (
            "  " + " ".join(f"{v:.3f}" for v in k.layer_auroc.values()) if len(layers) > 1 else ""
        )
        print(
            f"{kind:<18}{k.n:>4}  {k.auroc:6.3f} ({_interval(k.auroc_interval)})  "
            f"{k.energy_auroc:6.3f}  {k.rejection_rate:.3f} ({_interval(k.rejection_interval)})"
            f"  {k.refused_by_view:>3}" + per_layer
        )
    result = {
        "ece": report.ece,
        "ece_uncalibrated": out.ece_uncalibrated,
        "ece_if_calibrated": out.ece_if_calibrated,
        "labels_changed": out.labels_changed_by_calibration,
        "false_rejections_by": out.false_rejections_by,
        "rejections_by_reason": out.rejections_by_reason,
        "view_check": None if view is None else view.model_dump(mode="json"),
        "gate": gate.model_dump(),
    }
    print("RESULT " + json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
