"""The split is stable as the data grows: ingest, add 20 patients, ingest again."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

from covidray.config import IngestConfig
from covidray.ingest import ingest
from covidray.manifest import read_manifest
from covidray.synth import write_phantoms


def _patients(dataset: Path) -> dict[str, str]:
    table = read_manifest(str(dataset)).select(["patient_id", "split"]).to_pylist()
    return {r["patient_id"]: r["split"] for r in table}


def test_reingest_with_new_patients_keeps_every_old_patient(tmp_path: Path) -> None:
    raw, extra, ds = tmp_path / "raw", tmp_path / "extra", tmp_path / "ds"
    write_phantoms(str(raw), n_per_class=8, seed=0, size=64)
    ingest(IngestConfig(src=str(raw), dest=str(ds), size=64))
    before = _patients(ds)

    write_phantoms(str(extra), n_per_class=9, seed=1, size=64)  # 27 images, 20+ patients
    with open(extra / "manifest.csv") as fh:
        new_rows = list(csv.DictReader(fh))
    new_ids = set()
    for row in new_rows:
        for key in ("image", "mask"):
            src = extra / row[key]
            row[key] = "new/" + row[key]
            (raw / row[key]).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src, raw / row[key])
        row["patient_id"] = "new-" + row["patient_id"]
        new_ids.add(row["patient_id"])
    with open(raw / "manifest.csv", "a", newline="") as fh:
        csv.DictWriter(fh, fieldnames=list(new_rows[0])).writerows(new_rows)
    assert len(new_ids) >= 20

    ingest(IngestConfig(src=str(raw), dest=str(ds), size=64))
    after = _patients(ds)
    assert {p: after[p] for p in before} == before
    assert new_ids <= after.keys()
