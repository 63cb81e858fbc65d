"""The source-held-out study (issue 20; docs/source-study.md): today's recipe and each option
against source shortcuts, trained on a split that holds whole sources out; one table row per
variant and seed.

    .venv/bin/python bench/source_study.py --raw ../shared/data/cxr --work study \\
        --test-sources actualmed figure1 --seeds 0 1 --variants baseline
    .venv/bin/python bench/source_study.py --raw ../shared/data/cxr --work study \\
        --test-sources actualmed figure1 --seeds 0 --variants contrast acquisition group_dro \\
        adversary mixup
    .venv/bin/python bench/source_study.py --raw ../shared/data/cxr --work study \\
        --test-sources actualmed figure1 --seeds 0 1 --variants baseline \\
        --combo combined=contrast+acquisition

Each row is one ``covidray train`` run on the ingested, source-held-out dataset (ingested
once, with ``--split-test-sources``, under ``WORK``); its command line is in the table. A row
whose model directory is complete is read back, not trained again, so the study can be run a
few rows per session. The figures come from the run's own test report (``metrics.json``:
``separation``, see covidray.evaluation.external); the held-out films are scored once more to
give the paired bootstrap interval of each variant's held-out AUROC minus the baseline's of
the same seed. Writes ``WORK/study.json`` and ``WORK/study.md``: the table (rows of earlier
invocations on the same WORK stay in it) and step 5's decision per option (qualifies at the
first seed; confirmed over all seeds by the pooled paired difference). The last line is
``RESULT {json}``.

A smoke run on phantoms (three phantom sources, ``site-c`` held out) checks the plumbing in a
few minutes; its figures mean nothing:

    .venv/bin/python bench/source_study.py --phantoms 16 --work /tmp/study --epochs 1 \\
        --input-size 64 --seeds 0 --variants baseline mixup --train-args "--weights none"
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from covidray.dataset import load_rows  # noqa: E402
from covidray.evaluation.evaluate import predict_rows  # noqa: E402
from covidray.evaluation.external import paired_auroc_difference  # noqa: E402
from covidray.heldout import held_out_sources  # noqa: E402
from covidray.labels import CLASSES  # noqa: E402
from covidray.predict import Predictor  # noqa: E402
from covidray.synth import assign_sources, write_phantoms  # noqa: E402

# Each option at the value the study runs it with (covidray train flags).
# The baseline is today's default recipe with the options it could change pinned off, so that
# every row reruns as it ran should a default change: each command starts with its flags.
VARIANTS: dict[str, list[str]] = {
    "baseline": ["--contrast", "none", "--no-acquisition-augment"],
    "contrast": ["--contrast", "clahe"],
    "acquisition": ["--acquisition-augment"],
    "group_dro": ["--group-dro-step", "0.01"],
    "adversary": ["--source-adversary", "0.1"],
    "mixup": ["--mix", "mixup"],
    "cutmix": ["--mix", "cutmix"],
}
PHANTOM_SOURCES = ("site-a", "site-b", "site-c")
COLUMNS = (
    "variant",
    "seed",
    "held-out AUROC",
    "held-out + others' adult non-COVID AUROC",
    "Δ held-out AUROC vs baseline (paired)",
    "held-out COVID recall, argmax",
    "held-out COVID recall, 90 % val spec.",
    "adult non-COVID called COVID-19",
    "in-distribution accuracy",
    "in-distribution COVID recall",
    "wall s",
    "command",
)


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "covidray.cli", *args]


def run(cmd: list[str]) -> None:
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    print("$", shlex.join(cmd), flush=True)
    subprocess.run(cmd, check=True, env=env)


def dataset(args: argparse.Namespace) -> str:
    """The source-held-out dataset under WORK, ingested once."""
    held = args.test_sources or (["site-c"] if args.phantoms else [])
    if not held:
        raise SystemExit("--test-sources: name the sources to hold out")
    ds = args.work / f"ds-{'-'.join(sorted(held))}-{args.size}"
    if (ds / "manifest.parquet").exists():
        if sorted(held_out_sources(str(ds))) != sorted(held):
            raise SystemExit(f"{ds} holds out {held_out_sources(str(ds))}, not {held}")
        return str(ds)
    raw = args.raw
    if args.phantoms:
        raw = args.work / "phantoms"
        write_phantoms(str(raw), n_per_class=args.phantoms, seed=0, size=args.size)
        assign_sources(str(raw), PHANTOM_SOURCES)
    if raw is None:
        raise SystemExit("give --raw (e.g. ../shared/data/cxr) or --phantoms N")
    run(cli("ingest", str(raw), str(ds), "--size", str(args.size), "--split-test-sources", *held))
    return str(ds)


def train_command(
    args: argparse.Namespace, ds: str, variant: str, seed: int, out: Path
) -> list[str]:
    # every option off first (the baseline's pins), then the variant's: the last flag wins
    flags = VARIANTS["baseline"] + [
        f for part in variant.split("+") if part != "baseline" for f in VARIANTS[part]
    ]
    return cli(
        "train",
        "--data",
        ds,
        "--out",
        str(out),
        "--seed",
        str(seed),
        *(["--epochs", str(args.epochs)] if args.epochs else []),
        *(["--input-size", str(args.input_size)] if args.input_size else []),
        *shlex.split(args.train_args),
        *flags,
    )


def held_out_scores(model: str, ds: str) -> dict[str, Any]:
    """The calibrated covid probability of every held-out COVID-19 and adult non-COVID test
    film (the paired comparison's rows), by image id."""
    rows = load_rows(ds)
    held = held_out_sources(ds)
    test = rows[(rows["split"] == "test") & rows["source"].isin(held)]
    adult = test["age_group"].astype(str).str.lower() == "adult"
    test = test[(test["label"] == "covid") | adult].reset_index(drop=True)
    probs = predict_rows(Predictor.from_dir(model, device="cpu"), test).probs
    covid = CLASSES.index("covid")
    return {
        i: {"score": float(p[covid]), "covid": lab == "covid", "patient": pid}
        for i, p, lab, pid in zip(
            test["image_id"], probs, test["label"], test["patient_id"], strict=True
        )
    }


def fmt(value: float | None, ci: Any = None, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    text = f"{value:.{digits}f}"
    return text + (f" ({ci[0]:.2f}–{ci[1]:.2f})" if ci else "")


def rate(r: dict | None) -> str:
    return "n/a" if not r or r["value"] is None else f"{r['k']}/{r['n']} = {r['value']:.2f}"


def row_of(
    variant: str, seed: int, sep: dict, wall: float, cmd: list[str], delta: Any
) -> dict[str, Any]:
    held, plus = sep.get("held_out") or {}, sep.get("held_out_plus") or {}
    shown = [a if not a.startswith(sys.executable) else "python" for a in cmd]
    return {
        "variant": variant,
        "seed": seed,
        "held-out AUROC": fmt(held.get("auroc"), held.get("auroc_ci")),
        "held-out + others' adult non-COVID AUROC": fmt(plus.get("auroc"), plus.get("auroc_ci")),
        "Δ held-out AUROC vs baseline (paired)": "—" if delta is None else fmt(*delta),
        "held-out COVID recall, argmax": rate(held.get("covid_recall_argmax")),
        "held-out COVID recall, 90 % val spec.": rate(held.get("covid_recall_at_threshold")),
        "adult non-COVID called COVID-19": rate(plus.get("adult_non_covid_called_covid_argmax")),
        "in-distribution accuracy": rate(sep.get("in_distribution_accuracy")),
        "in-distribution COVID recall": rate(sep.get("in_distribution_covid_recall")),
        "wall s": f"{wall:.0f}",
        "command": f"`{shlex.join(shown)}`",
    }


def markdown(rows: list[dict[str, Any]], note: str) -> str:
    lines = [note, "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(str(r[c]) for c in COLUMNS) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _accuracy(r: dict[str, Any]) -> float | None:
    return (r["separation"].get("in_distribution_accuracy") or {}).get("value")


def paired_delta(
    scores: dict[tuple[str, int], dict[str, Any]], variant: str, seeds: list[int]
) -> Any:
    """The variant's held-out AUROC minus the baseline's, averaged over ``seeds`` (each seed
    paired with the baseline of the same seed), with its paired patient-level interval; None
    without both classes among the held-out films."""
    ids = sorted(scores["baseline", seeds[0]])
    first = scores["baseline", seeds[0]]
    y = np.array([first[i]["covid"] for i in ids])
    if not (y.any() and (~y).any()):
        return None
    return paired_auroc_difference(
        np.array([[scores[variant, s][i]["score"] for s in seeds] for i in ids]),
        np.array([[scores["baseline", s][i]["score"] for s in seeds] for i in ids]),
        y,
        np.array([first[i]["patient"] for i in ids]),
    )


def decide(
    results: list[dict[str, Any]], scores: dict[tuple[str, int], dict[str, Any]]
) -> list[dict[str, Any]]:
    """Step 5's rule. The option's run at the first baseline seed qualifies when its paired
    gain over that baseline exceeds the baselines' seed spread, its paired interval excludes
    0, and in-distribution accuracy drops by at most 0.02. With more seeds it is confirmed
    when the gain averaged over seeds (each paired with the baseline of its seed) still
    exceeds the spread and its pooled paired interval excludes 0."""
    base = {r["seed"]: r for r in results if r["variant"] == "baseline"}
    if not base:
        return []
    first = min(base)
    aucs = [r["separation"]["held_out"]["auroc"] for r in base.values()]
    spread = max(aucs) - min(aucs) if len(aucs) > 1 else None
    verdicts = []
    for variant in dict.fromkeys(r["variant"] for r in results if r["variant"] != "baseline"):
        runs = {r["seed"]: r for r in results if r["variant"] == variant and r["seed"] in base}
        if first not in runs or "delta_vs_baseline" not in runs[first]:
            continue
        gain, ci = runs[first]["delta_vs_baseline"]
        acc = [
            _accuracy(base[s]) - _accuracy(r)
            for s, r in runs.items()
            if _accuracy(r) is not None and _accuracy(base[s]) is not None
        ]
        drop = float(np.mean(acc)) if acc else None
        qualifies = bool(
            spread is not None
            and gain > spread
            and ci is not None
            and ci[0] > 0
            and drop is not None
            and drop <= 0.02
        )
        pooled = paired_delta(scores, variant, sorted(runs)) if len(runs) > 1 else None
        confirmed = (
            None
            if pooled is None
            else bool(qualifies and pooled[0] > spread and pooled[1] and pooled[1][0] > 0)
        )
        verdicts.append(
            {
                "variant": variant,
                "seeds": sorted(runs),
                "delta_first_seed": [gain, ci],
                "seed_spread": spread,
                "in_distribution_accuracy_drop": drop,
                "qualifies": qualifies,
                "pooled_delta": pooled,
                "confirmed": confirmed,
            }
        )
    return verdicts


def decision_markdown(verdicts: list[dict[str, Any]]) -> str:
    lines = [
        "| variant | seeds | Δ at the first seed (paired) | baseline seed spread | "
        "in-distribution accuracy drop (mean) | qualifies | mean Δ over seeds (pooled paired) "
        "| confirmed |",
        "|" + "---|" * 8,
    ]
    yes = {True: "**yes**", False: "no", None: "—"}
    for v in verdicts:
        pooled = v["pooled_delta"]
        lines.append(
            f"| {v['variant']} | {', '.join(map(str, v['seeds']))} | "
            f"{fmt(*v['delta_first_seed'])} | {fmt(v['seed_spread'])} | "
            f"{fmt(v['in_distribution_accuracy_drop'], digits=2)} | {yes[v['qualifies']]} | "
            f"{'—' if pooled is None else fmt(*pooled)} | {yes[v['confirmed']]} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--raw", type=Path, help="raw data folder, e.g. ../shared/data/cxr")
    ap.add_argument("--phantoms", type=int, default=0, help="smoke run: N phantoms per class")
    ap.add_argument("--work", type=Path, required=True, help="dataset, runs and the table")
    ap.add_argument("--test-sources", nargs="+", default=[], help="sources held out in test")
    ap.add_argument("--size", type=int, default=256, help="ingest's shorter side")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--variants", nargs="+", default=["baseline"])
    ap.add_argument("--combo", action="append", default=[], help="NAME=a+b: options together")
    ap.add_argument("--epochs", type=int, help="default: the recipe's")
    ap.add_argument("--input-size", type=int, help="default: the recipe's (320; 256 allowed)")
    ap.add_argument("--train-args", default="", help="more covidray train flags, every row")
    args = ap.parse_args(argv)

    combos = dict(c.split("=", 1) for c in args.combo)
    variants = [*args.variants, *combos]
    for v in variants:
        for part in combos.get(v, v).split("+"):
            if part not in VARIANTS:
                raise SystemExit(f"unknown variant {part!r}: choose {', '.join(VARIANTS)}")
    args.work.mkdir(parents=True, exist_ok=True)
    ds = dataset(args)

    # Rows of earlier invocations on the same WORK stay in the table unless run again here.
    earlier = args.work / "study.json"
    results: list[dict[str, Any]] = (
        json.loads(earlier.read_text())["runs"] if earlier.exists() else []
    )
    asked = {(v, s) for s in args.seeds for v in variants}
    results = [r for r in results if (r["variant"], r["seed"]) not in asked]
    for seed in args.seeds:
        for variant in variants:
            out = args.work / "runs" / f"{variant}-s{seed}"
            cmd = train_command(args, ds, combos.get(variant, variant), seed, out)
            timing = out / "wall_s.txt"
            if not (out / "model" / "metrics.json").exists():
                started = time.time()
                run(cmd)
                timing.write_text(f"{time.time() - started:.1f}\n")
            metrics = json.loads((out / "model" / "metrics.json").read_text())
            results.append(
                {
                    "variant": variant,
                    "seed": seed,
                    "wall_s": float(timing.read_text()) if timing.exists() else float("nan"),
                    "command": cmd,
                    "separation": metrics["test"]["separation"],
                }
            )
    order = {v: i for i, v in enumerate(dict.fromkeys(r["variant"] for r in results))}
    results.sort(key=lambda r: (r["variant"] != "baseline", order[r["variant"]], r["seed"]))
    scores = {
        (r["variant"], r["seed"]): held_out_scores(
            str(args.work / "runs" / f"{r['variant']}-s{r['seed']}" / "model"), ds
        )
        for r in results
    }

    rows = []
    for r in results:
        delta = None
        if ("baseline", r["seed"]) in scores and r["variant"] != "baseline":
            delta = paired_delta(scores, r["variant"], [r["seed"]])
            if delta is not None:
                r["delta_vs_baseline"] = delta
        rows.append(
            row_of(r["variant"], r["seed"], r["separation"], r["wall_s"], r["command"], delta)
        )

    load = os.getloadavg()
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    note = (
        f"Held out: {', '.join(held_out_sources(ds))}; {when}; "
        f"load average {load[0]:.1f} on {os.cpu_count()} CPUs"
        + ("; PHANTOMS (a smoke run: the figures mean nothing)" if args.phantoms else "")
    )
    verdicts = decide(results, scores)
    table = markdown(rows, note) + "\n" + decision_markdown(verdicts)
    (args.work / "study.md").write_text(table)
    (args.work / "study.json").write_text(
        json.dumps({"note": note, "runs": results, "decision": verdicts}, indent=1)
    )
    print(table)
    print("RESULT " + json.dumps({"table": str(args.work / "study.md"), "rows": len(rows)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
