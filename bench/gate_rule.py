"""The image distance's layer(s) and threshold rule, re-tuned with the view check in place.

With lateral films left to the view check, the distance is still there for CT slices,
photographs, screenshots, other body parts and inverted or rotated films. This bench fits the
distance on each candidate layer (set) at each share of validation films its threshold may
refuse, and reports, for each, the refusals (distance or view check) of the synthetic
out-of-scope kinds, which are all made here: scikit-image's photographs and screenshots,
forearm phantoms, text screens, and inverted and rotated copies of the VALIDATION films. The
choice is made on these and on the validation split only: neither the test split nor
``../shared/data/ood`` is read (they are measured once, afterwards, by bench/trust.py).

    .venv/bin/python bench/gate_rule.py --model RUN/model --data DS --views VIEWS \
        [--layers pool --layers pool,features.blocks.5] [--rejection 0.05 --rejection 0.01]

The view check is fitted here as ``covidray calibrate --views VIEWS`` fits it (same features,
same code). One forward pass per film for every layer. The last line is ``RESULT {json}``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from covidray.dataset import load_rows, load_view_rows  # noqa: E402
from covidray.evaluation.evaluate import select_split  # noqa: E402
from covidray.evaluation.gate_eval import (  # noqa: E402
    PHOTOGRAPHS,
    SCREENSHOTS,
    made_negatives,
    model_inputs,
    skimage_images,
)
from covidray.evaluation.intervals import wilson  # noqa: E402
from covidray.gate import fit_gate  # noqa: E402
from covidray.modeldir import load_model_dir  # noqa: E402
from covidray.posthoc import view_training_set  # noqa: E402
from covidray.predict import Predictor, select_layers  # noqa: E402
from covidray.storage import read_bytes  # noqa: E402
from covidray.viewcheck import default_view_layers, fit_view_check  # noqa: E402

LAYER_SETS = ("pool", "features.blocks.5", "features.blocks.6", "pool,features.blocks.5")
REJECTIONS = (0.05, 0.03, 0.02, 0.01)
# Thresholds on ood_score itself (the distance standardised by its mean and spread on val)
SCORES = (2.0, 3.0, 4.0, 6.0, 8.0, 12.0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True, help="the ingested dataset the model trained on")
    ap.add_argument("--views", required=True, help="the ingested view dataset")
    ap.add_argument("--layers", action="append", default=[], help="comma-separated layers")
    ap.add_argument("--rejection", action="append", type=float, default=[])
    ap.add_argument("--cache", type=Path, help="features saved here (npz), reused when present")
    args = ap.parse_args(argv)

    model, card = load_model_dir(args.model)
    sets = [tuple(s.split(",")) for s in (args.layers or LAYER_SETS)]
    view_layers = default_view_layers(card.backbone)
    layers = tuple(dict.fromkeys([*view_layers, *(n for s in sets for n in s)]))
    bare = card.model_copy(update={"calibration": None, "gate": None, "view_check": None})
    predictor = Predictor(model, bare, gate_layers=layers, copy=False)
    rows = load_rows(args.data)
    train = select_split(rows, "train")
    train = train[~train["synthetic"].fillna(False).astype(bool)].reset_index(drop=True)
    val = select_split(rows, "val")
    views = load_view_rows(args.views)

    def outputs(images: list) -> tuple[np.ndarray, tuple[int, ...]]:
        batch = model_inputs(predictor, images)
        res = predictor.predict_many(batch, 32, with_cam=False, return_features=True)
        return res.features, res.feature_dims

    if args.cache is not None and args.cache.exists():
        saved = np.load(args.cache)
        f_train, f_val, f_views = (saved[k] for k in ("train", "val", "views"))
        dims = tuple(int(d) for d in saved["dims"])
        f_kinds = {k[5:]: saved[k] for k in saved.files if k.startswith("kind.")}
    else:
        from covidray.decode import decode_array

        val_bytes = [read_bytes(u) for u in val["uri"]]
        f_train, dims = outputs([read_bytes(u) for u in train["uri"]])
        f_val, _ = outputs(val_bytes)
        val_u8 = [(decode_array(b) * 255).round().astype("uint8") for b in val_bytes]
        kinds = {
            "photograph": skimage_images(PHOTOGRAPHS),
            "screenshot": skimage_images(SCREENSHOTS),
            **made_negatives(val_u8[:20], seed=1),
        }
        f_kinds = {k: outputs(v)[0] for k, v in kinds.items() if v}
        f_views = outputs([read_bytes(u) for u in views["uri"]])[0]
        if args.cache is not None:
            np.savez(
                args.cache,
                train=f_train,
                val=f_val,
                views=f_views,
                dims=np.array(dims),
                **{f"kind.{k}": v for k, v in f_kinds.items()},
            )
    check, view = fit_view_check(
        *view_training_set(
            train,
            select_layers(f_train, layers, dims, view_layers),
            views,
            select_layers(f_views, layers, dims, view_layers),
        ),
        layers=view_layers,
    )
    print(f"view check: {check.fitted_on}, l2 {check.l2}, cross-validated {check.cv}")

    def lateral(features: np.ndarray) -> np.ndarray:
        p = view.lateral_probability(select_layers(features, layers, dims, view_layers))
        return p > check.threshold

    results = []
    head = " ".join(f"{k[:12]:>12}" for k in f_kinds)
    print(f"{'layers':<22} {'rule':>5} {'value':>6} {'val refused':>12}  {head}")
    for chosen in sets:
        part = chosen
        d = tuple(dims[layers.index(n)] for n in chosen)
        rules = [("val", r) for r in args.rejection or REJECTIONS]
        rules += [("score", k) for k in SCORES]
        for rule, r in rules:
            gate, stats = fit_gate(
                select_layers(f_train, layers, dims, part),
                select_layers(f_val, layers, dims, part),
                layers=chosen,
                dims=d,
                rejection=r if rule == "val" else REJECTIONS[0],
            )
            if rule == "score":
                gate = gate.model_copy(update={"threshold": r})

            def refused(features: np.ndarray, gate=gate, stats=stats, part=part) -> np.ndarray:
                mine = select_layers(features, layers, dims, part)
                return (gate.score(stats.distances(mine)) > gate.threshold) | lateral(features)

            val_refused = int(refused(f_val).sum())
            rates = {k: float(refused(f).mean()) for k, f in f_kinds.items()}
            results.append(
                {
                    "layers": chosen,
                    "rule": rule,
                    "value": r,
                    "val_refused": [val_refused, len(f_val)],
                    "val_refused_interval": wilson(val_refused, len(f_val)),
                    "kinds": rates,
                    "min_kind": min(rates.values()),
                }
            )
            cells = " ".join(f"{v:12.3f}" for v in rates.values())
            print(
                f"{','.join(chosen):<22} {rule:>5} {r:6.3g} "
                f"{val_refused:>5}/{len(f_val):<6}  {cells}",
                flush=True,
            )
    print("RESULT " + json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
