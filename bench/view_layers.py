"""Which feature layers should the gate's view check look at? Fits the view check (class-
balanced L2 logistic regression, L2 chosen by patient-grouped cross-validation) on each
candidate layer of a trained model, and on the combinations asked for, and reports the
out-of-fold figures (folds by patient): laterals caught, frontal films of the view set and
of the training split refused.

    .venv/bin/python bench/view_layers.py --model RUN/model --data DS --views VIEWS \
        [--combo pool,features.blocks.4]

``DS`` is the ingested ``../shared/data/cxr`` the model was trained on (its training split's
films are frontal), ``VIEWS`` the ingested ``../shared/data/views``. The ``../shared/data/ood``
laterals are not read: they are an evaluation set. The last line is ``RESULT {json}``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from covidray.dataset import load_rows, load_view_rows  # noqa: E402
from covidray.gate import FEATURE_LAYER  # noqa: E402
from covidray.modeldir import load_model_dir  # noqa: E402
from covidray.posthoc import raw_outputs, view_training_set  # noqa: E402
from covidray.predict import select_layers, trunk_stages  # noqa: E402
from covidray.viewcheck import fit_view_check  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True, help="the ingested dataset (train split: frontal)")
    ap.add_argument("--views", required=True, help="the ingested view dataset")
    ap.add_argument("--combo", action="append", default=[], help="comma-separated layers")
    args = ap.parse_args(argv)

    model, card = load_model_dir(args.model)
    convs = [n for n in trunk_stages(model) if isinstance(model.get_submodule(n), nn.Conv2d)]
    layers = (FEATURE_LAYER, *(n for n in trunk_stages(model) if n not in convs))
    rows = load_rows(args.data)
    train = rows[(rows["split"] == "train") & ~rows["synthetic"].fillna(False).astype(bool)]
    train = train.reset_index(drop=True)
    views = load_view_rows(args.views)
    run = {"gate_layers": layers}
    t0 = time.perf_counter()
    out_train, out_views = (
        raw_outputs(model, card, train, **run),
        raw_outputs(model, card, views, **run),
    )
    print(f"features of {len(train)} + {len(views)} films in {time.perf_counter() - t0:.0f} s")
    candidates = [(n,) for n in layers] + [tuple(c.split(",")) for c in args.combo]
    results = {}
    print(f"{'layers':<40} {'l2':>6}  laterals  view-set frontals  other frontals")
    for cand in candidates:
        part = cand
        x, lateral, patients, in_view = view_training_set(
            train,
            select_layers(out_train.features, layers, out_train.feature_dims, part),
            views,
            select_layers(out_views.features, layers, out_views.feature_dims, part),
        )
        check, _ = fit_view_check(x, lateral, patients, in_view, layers=cand)
        cv = check.cv
        results[",".join(cand)] = {"l2": check.l2, **cv}
        (a, b), (c, d), (e, f) = (
            cv["laterals_refused"],
            cv["view_set_frontals_refused"],
            cv["other_frontals_refused"],
        )
        print(f"{','.join(cand):<40} {check.l2:>6g}  {a:>3}/{b:<4}  {c:>3}/{d:<13}  {e:>3}/{f}")
    print("RESULT " + json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
