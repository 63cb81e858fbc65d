"""The PACS round trip's speed: films per second for pull, score and publish, alone and as the
nightly pipeline, against a local Orthanc (Debian's orthanc + orthanc-dicomweb).

    .venv/bin/python bench/pacs.py [--films 24] [--film-size 512] [--input-size 224]

Orthanc runs as in the tests (``tests/orthanc.py``: 127.0.0.1, authentication on); synthetic
CR/DX phantom films (``tests/pacs_studies.py``, 12 bits in 16) go in over STOW-RS. A Lite0 with
random weights at ``--input-size`` scores them on the CPU (one local Ray). Measured:

1. each step alone on one set of films: ``pull`` (QIDO + WADO-RS + ingest), ``score``
   (Ray Data job, model load included), ``publish`` (metadata, SR, overlay SC, STOW-RS);
2. ``nightly``: the three as one run on a second set (in a second Orthanc), under the
   output's lock;
3. where publish's time goes: metadata retrieval, SR build, overlay + SC build, STOW-RS.

Target: publishing adds at most 25 % to the per-film time of pull + score. Prints a table,
the load average (``uptime``), and a last line ``RESULT {json}``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # orthanc, pacs_studies, tinymodels
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from orthanc import PASSWORD, USER, Orthanc, installed  # noqa: E402
from pacs_studies import Film, film_dataset  # noqa: E402


def films(n: int, first_patient: int) -> list[Film]:
    kinds = ("covid", "bacterial", "viral", "normal")
    return [
        Film(
            first_patient + i // 2,
            1 + i % 2,
            kinds[i % 4],
            "CR" if i % 3 else "DX",
            "MONOCHROME1" if i % 2 else "MONOCHROME2",
            date=f"202103{1 + i % 28:02d}",
            seed=1000 * first_patient + i,
        )
        for i in range(n)
    ]


def upload(orthanc: Orthanc, batch: list[Film], size: int) -> None:
    client = orthanc.client()
    for i in range(0, len(batch), 8):
        client.store_instances([film_dataset(f, size) for f in batch[i : i + 8]])


def timed(fn, *args, **kwargs):
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0


def breakdown(cfg, n: int) -> dict[str, float]:
    """Seconds per film for each part of publishing, measured on the films just published
    (re-sent: the archive keeps one copy)."""
    from covidray.pacs import publish as pub
    from covidray.pacs.capture import build_sc, overlay_image
    from covidray.pacs.client import Archive
    from covidray.pacs.links import read_links
    from covidray.pacs.sr import build_sr
    from covidray.score.results import read_predictions

    archive = Archive(cfg.to)
    links = read_links(cfg.links)
    rows = [r for r in read_predictions(cfg.scores).to_pylist() if r["image_id"] in links][:n]
    films_ = pub.film_uris(cfg.data)
    parts = {"metadata": 0.0, "sr": 0.0, "overlay_sc": 0.0, "stow": 0.0}
    objects = []
    for row in rows:
        link = links[row["image_id"]]
        src, dt = timed(pub.source_metadata, archive, link)
        parts["metadata"] += dt
        v = row["scoring_version"]
        sr, dt = timed(
            build_sr, src, row, series_uid=pub.derived_uid(link.study_uid, v, "sr-series"),
            sop_uid=pub.derived_uid(link.sop_uid, v, "sr"),
            tracking_uid=pub.derived_uid(link.sop_uid, v, "tracking"),
            observer_uid=pub.derived_uid(pub.OBSERVER), instance_number=1,
        )  # fmt: skip
        parts["sr"] += dt
        objects.append(sr)
        if row["in_scope"] and row["cam_png"]:
            t0 = time.perf_counter()
            png = Path(films_[row["image_id"]]).read_bytes()
            sc = build_sc(
                src, overlay_image(png, row["cam_png"]),
                series_uid=pub.derived_uid(link.study_uid, v, "sc-series"),
                sop_uid=pub.derived_uid(link.sop_uid, v, "sc"), instance_number=1,
            )  # fmt: skip
            sc.BurnedInAnnotation = "YES"
            parts["overlay_sc"] += time.perf_counter() - t0
            objects.append(sc)
    for i in range(0, len(objects), 2 * cfg.store_batch):
        _, dt = timed(pub.store, archive, cfg, objects[i : i + 2 * cfg.store_batch])
        parts["stow"] += dt
    return {k: round(v / max(len(rows), 1), 4) for k, v in parts.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--films", type=int, default=24)
    parser.add_argument("--film-size", type=int, default=512, help="film side in pixels")
    parser.add_argument("--input-size", type=int, default=224, help="model input size")
    parser.add_argument("--ingest-size", type=int, default=256, help="ingest --size")
    args = parser.parse_args()
    if not installed():
        print("Orthanc not installed: run scripts/install_orthanc.sh as root")
        return 2
    from tinymodels import save_tiny_model

    from covidray.config import IngestConfig
    from covidray.pacs.config import NightlyConfig, PublishConfig
    from covidray.pacs.nightly import run_nightly
    from covidray.pacs.publish import publish
    from covidray.pacs.pull import pull
    from covidray.runtime.cluster import ensure_ray
    from covidray.score.config import ScoreConfig
    from covidray.score.job import run_score

    os.environ.update(
        COVIDRAY_DICOMWEB_USER=USER,
        COVIDRAY_DICOMWEB_PASSWORD=PASSWORD,
        COVIDRAY_PSEUDONYM_KEY="bench-key",
    )
    root = Path(tempfile.mkdtemp(prefix="bench-pacs-"))
    orthanc = Orthanc(root / "orthanc").start()
    second = Orthanc(root / "orthanc-nightly").start()  # the nightly run's own archive
    try:
        ensure_ray(num_cpus=max(2, os.cpu_count() or 2), log_to_driver=False)
        model = str(root / "model")
        save_tiny_model(model, seed=0, size=args.input_size)
        n = args.films
        upload(orthanc, films(n, 1), args.film_size)
        a = {k: str(root / "a" / k) for k in ("data", "out")}
        links = str(root / "a-links.parquet")
        pulled, t_pull = timed(
            pull,
            IngestConfig(src=orthanc.url, dest=a["data"], links=links, size=args.ingest_size),
        )
        scored, t_score = timed(run_score, ScoreConfig(model=model, data=a["data"], out=a["out"]))
        pub_cfg = PublishConfig(scores=a["out"], data=a["data"], links=links, to=orthanc.url)
        published, t_publish = timed(publish, pub_cfg)
        parts = breakdown(pub_cfg, n)

        upload(second, films(n, 1000), args.film_size)  # a second set for the nightly run
        b = {k: str(root / "b" / k) for k in ("data", "out")}
        steps: dict[str, float] = {}
        last = [time.perf_counter()]

        def on_step(name: str, _result) -> None:
            now = time.perf_counter()
            steps[name] = now - last[0]
            last[0] = now

        night_cfg = NightlyConfig(
            source=second.url, data=b["data"], links=str(root / "b-links.parquet"),
            model=model, out=b["out"], size=args.ingest_size,
        )  # fmt: skip
        t0 = time.perf_counter()
        last[0] = t0
        night, t_night = timed(run_nightly, night_cfg, on_step)
    finally:
        orthanc.stop()
        second.stop()
    per = {
        "pull": t_pull / n,
        "score": t_score / n,
        "publish": t_publish / n,
        "nightly": t_night / n,
        **{f"nightly_{k}": v / n for k, v in steps.items()},
    }
    overhead = per["publish"] / (per["pull"] + per["score"])
    night_overhead = steps.get("publish", 0) / (steps.get("pull", 0) + steps.get("score", 1e-9))
    print(f"{'step':<18}{'s/film':>10}{'films/s':>10}")
    for k, v in per.items():
        print(f"{k:<18}{v:>10.3f}{1 / v if v else 0:>10.2f}")
    print(
        f"publish adds {100 * overhead:.0f} % to pull + score alone, "
        f"{100 * night_overhead:.0f} % in the nightly run (target: at most 25 %)"
    )
    print("publish, s/film by part:", json.dumps(parts))
    load = os.getloadavg()
    print(f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {os.cpu_count()} CPUs")
    result = {
        "films": n,
        "film_size": args.film_size,
        "input_size": args.input_size,
        "s_per_film": {k: round(v, 4) for k, v in per.items()},
        "publish_overhead": round(overhead, 3),
        "nightly_publish_overhead": round(night_overhead, 3),
        "publish_parts_s_per_film": parts,
        "pulled": pulled.n_rows,
        "scored": scored.n_scored + scored.n_out_of_scope,
        "published": published.n_published,
        "nightly_published": night.publish.n_published,
        "loadavg": load,
    }
    print("RESULT " + json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
