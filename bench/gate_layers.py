"""Which feature layers should the input gate look at? Fits the gate (Ledoit-Wolf Mahalanobis,
threshold at 5 % of the validation films) on each candidate layer of a trained model, and on
the combinations asked for, and reports for each: false rejections on the test split, overall
and by class and source (refusals that fall on sick patients or on one hospital are a bias),
and AUROC / rejection rate per kind of out-of-scope image (the same kinds as bench/trust.py).

    .venv/bin/python bench/gate_layers.py --model RUN/model --data DS \
        [--combo features.blocks.2,features.blocks.3,features.blocks.4] [--only pool] [--energy]

``--energy`` also measures the energy score of the logits as a gate layer: alone (its
threshold at the same validation rejection) and beside each candidate (either refuses; each
threshold at half the rejection, so that the pair refuses at most as many validation films).

``DS`` is the ingested ``../shared/data/cxr`` the model was trained on. Candidates: ``pool``
(the head's input, the default) and each stage of the trunk. One forward pass per image for
all layers. The last line is ``RESULT {json}``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from covidray.dataset import load_images, load_rows  # noqa: E402
from covidray.evaluation.evaluate import select_split  # noqa: E402
from covidray.evaluation.gate_eval import model_inputs, out_of_scope_sets  # noqa: E402
from covidray.evaluation.intervals import auroc, wilson  # noqa: E402
from covidray.gate import FEATURE_LAYER, VAL_REJECTION, energy, fit_gate, threshold_at  # noqa: E402
from covidray.modeldir import load_model_dir  # noqa: E402
from covidray.predict import Predictor, trunk_stages  # noqa: E402
from covidray.preprocess import contrast_method  # noqa: E402
from covidray.storage import read_bytes  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True, help="the ingested dataset (test split: in scope)")
    ap.add_argument("--ood", type=Path, default=REPO.parent / "shared" / "data" / "ood")
    ap.add_argument("--combo", action="append", default=[], help="comma-separated layers")
    ap.add_argument("--only", action="append", default=[], help="only these candidates")
    ap.add_argument("--energy", action="store_true", help="the energy score as a layer too")
    args = ap.parse_args(argv)

    model, card = load_model_dir(args.model)
    bare = card.model_copy(update={"calibration": None, "gate": None})
    # Convolutions followed by a BatchNorm are folded in the Predictor: not gate layers.
    convs = [n for n in trunk_stages(model) if isinstance(model.get_submodule(n), nn.Conv2d)]
    layers = [FEATURE_LAYER, *(n for n in trunk_stages(model) if n not in convs)]
    predictor = Predictor(model, bare, gate_layers=layers, copy=False)
    rows = load_rows(args.data)
    split = {s: select_split(rows, s) for s in ("train", "val", "test")}
    split["train"] = split["train"][~split["train"]["synthetic"].fillna(False).astype(bool)]
    prep = card.preprocessing

    candidates = [(n,) for n in layers] + [tuple(c.split(",")) for c in args.combo]
    if args.only:
        candidates = [c for c in candidates if "+".join(c) in args.only]
    unknown = sorted({n for cand in candidates for n in cand} - set(layers))
    if unknown:
        raise SystemExit(f"unknown layer(s) {unknown}; candidates: {', '.join(layers)}")
    dims: tuple[int, ...] = ()

    def features(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        nonlocal dims
        res = predictor.predict_many(images, 32, with_cam=False, return_features=True)
        dims = res.feature_dims or ()
        return res.features, res.logits

    def of_rows(part: object) -> tuple[np.ndarray, np.ndarray]:
        uris = list(part["uri"])  # type: ignore[index]
        contrast = contrast_method(prep.contrast)
        return features(
            load_images(uris, prep.input_size, shorter_side=prep.shorter_side, contrast=contrast)
        )

    train, val, test = (of_rows(split[s]) for s in ("train", "val", "test"))
    films = [read_bytes(u) for u in split["test"]["uri"]]
    kinds = out_of_scope_sets(films, args.ood)
    ood = {k: features(model_inputs(predictor, v)) for k, v in kinds.items() if v}

    starts = np.r_[0, np.cumsum(dims)]
    cols = {n: slice(int(starts[i]), int(starts[i + 1])) for i, n in enumerate(layers)}
    test_rows = split["test"].reset_index(drop=True)
    results = {}
    print(
        f"model {card.model_version}: {len(split['train'])} train, {len(split['val'])} val, "
        f"{len(films)} test films"
    )
    for cand in candidates:

        def pick(f: np.ndarray, cand: tuple[str, ...] = cand) -> np.ndarray:
            return np.concatenate([f[:, cols[n]] for n in cand], axis=1)

        sizes = tuple(dims[layers.index(n)] for n in cand)
        gate, stats = fit_gate(pick(train[0]), pick(val[0]), layers=cand, dims=sizes)

        def score(f: np.ndarray, gate=gate, stats=stats, pick=pick) -> np.ndarray:
            return gate.score(stats.distances(pick(f)))

        ins = score(test[0])
        refused = ins > gate.threshold
        by = {
            col: {
                str(v): [int(refused[test_rows[col] == v].sum()), int((test_rows[col] == v).sum())]
                for v in sorted(test_rows[col].dropna().unique())
            }
            for col in ("label", "source")
        }
        per_kind = {}
        for kind, (f, _) in ood.items():
            out = score(f)
            rejected = float(np.mean(out > gate.threshold))
            per_kind[kind] = {"auroc": auroc(ins, out), "rejected": rejected}
        name = "+".join(cand)
        results[name] = {
            "dims": [int(d) for d in gate.dims],
            "false_rejection_rate": float(refused.mean()),
            "false_rejection_interval": wilson(int(refused.sum()), len(refused)),
            "false_rejections_by": by,
            "kinds": per_kind,
        }
        if args.energy:
            results.update(with_energy(name, score, val, test, ood, score(val[0])))
        lat = per_kind.get("lateral", {})
        print(
            f"{name:<40} FRR {refused.mean():.3f}  "
            + " ".join(f"{c} {k}/{n}" for c, (k, n) in by["label"].items())
            + "  | "
            + " ".join(f"{k[:8]} {v['auroc']:.3f}/{v['rejected']:.2f}" for k, v in per_kind.items())
            + (f"  | laterals {lat['auroc']:.3f}" if lat else "")
        )
    print("(per kind: AUROC / share refused at the threshold)")
    print("RESULT " + json.dumps({"model": card.model_version, "layers": results}))
    return 0


def with_energy(
    name: str,
    score: object,
    val: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    ood: dict[str, tuple[np.ndarray, np.ndarray]],
    val_scores: np.ndarray,
) -> dict[str, dict]:
    """The energy score alone (threshold at the validation rejection) and beside the layer
    ``name`` (either refuses, each threshold at half of it): false rejections on test, the
    validation films refused, and per kind AUROC (energy alone) and share refused."""
    out = {}
    e_val, e_test = energy(val[1]), energy(test[1])
    e_thr = threshold_at(e_val, VAL_REJECTION)
    half = VAL_REJECTION / 2
    m_thr, e_half = threshold_at(val_scores, half), threshold_at(e_val, half)
    m_test = score(test[0])  # type: ignore[operator]
    for label, refuse in (
        ("energy", lambda m, e: e > e_thr),
        (f"{name} | energy", lambda m, e: (m > m_thr) | (e > e_half)),
    ):
        refused = refuse(m_test, e_test)
        val_refused = float(refuse(val_scores, e_val).mean())
        kinds = {}
        for kind, (f, logits) in ood.items():
            e = energy(logits)
            kinds[kind] = {
                "auroc": auroc(e_test, e) if label == "energy" else None,
                "rejected": float(refuse(score(f), e).mean()),  # type: ignore[operator]
            }
        out[label] = {
            "false_rejection_rate": float(refused.mean()),
            "false_rejection_interval": wilson(int(refused.sum()), len(refused)),
            "val_rejection": val_refused,
            "kinds": kinds,
        }
        print(
            f"{label:<40} FRR {refused.mean():.3f} (val {val_refused:.3f})  | "
            + " ".join(
                f"{k[:8]} {v['auroc'] if v['auroc'] is not None else float('nan'):.3f}/"
                f"{v['rejected']:.2f}"
                for k, v in kinds.items()
            )
        )
    return out


if __name__ == "__main__":
    sys.exit(main())
