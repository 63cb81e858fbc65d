"""Source-held-out splits (``--split-test-sources``): every held-out film in test, no patient in
two splits, the keyed split of the other sources unchanged, refusal on a DEST with splits."""

from __future__ import annotations

from pathlib import Path

import pytest
from heldout_data import two_sources

from covidray.config import IngestConfig, SplitConfig
from covidray.heldout import held_out_sources
from covidray.ingest import ingest
from covidray.manifest import read_manifest


def _rows(ds: Path) -> list[dict]:
    return read_manifest(str(ds)).select(["patient_id", "source", "split"]).to_pylist()


def test_held_out_sources_in_test_rest_unchanged(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    two_sources(raw)
    ingest(IngestConfig(src=str(raw), dest=str(tmp_path / "plain"), size=64))
    cfg = IngestConfig(
        src=str(raw),
        dest=str(tmp_path / "held"),
        size=64,
        split=SplitConfig(test_sources=("site-b",)),
    )
    ingest(cfg)
    plain, held = _rows(tmp_path / "plain"), _rows(tmp_path / "held")
    assert held_out_sources(str(tmp_path / "held")) == ("site-b",)
    assert held_out_sources(str(tmp_path / "plain")) == ()

    assert {r["split"] for r in held if r["source"] == "site-b"} == {"test"}
    by_patient: dict[str, set[str]] = {}
    for r in held:
        by_patient.setdefault(r["patient_id"], set()).add(r["split"])
    assert all(len(s) == 1 for s in by_patient.values())  # no patient in two splits
    b_patients = {r["patient_id"] for r in held if r["source"] == "site-b"}
    before = {r["patient_id"]: r["split"] for r in plain}
    after = {r["patient_id"]: r["split"] for r in held}
    rest = set(before) - b_patients
    assert rest and {p: after[p] for p in rest} == {p: before[p] for p in rest}
    # the patient with a film at both sites: both films held out with the patient
    assert any(
        r["source"] == "site-a" and r["patient_id"] in b_patients and r["split"] == "test"
        for r in held
    )
    # held-out films that the plain split had put in train or val moved
    assert any(before[p] != "test" for p in b_patients)


def test_refused_on_dest_with_stored_splits(tmp_path: Path) -> None:
    raw, ds = tmp_path / "raw", tmp_path / "ds"
    two_sources(raw)
    ingest(IngestConfig(src=str(raw), dest=str(ds), size=64))
    manifest = (ds / "manifest.parquet").read_bytes()
    cfg = IngestConfig(
        src=str(raw), dest=str(ds), size=64, split=SplitConfig(test_sources=("site-b",))
    )
    with pytest.raises(ValueError, match="needs a new DEST"):
        ingest(cfg)
    assert (ds / "manifest.parquet").read_bytes() == manifest


def test_unknown_source_refused(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    two_sources(raw)
    cfg = IngestConfig(
        src=str(raw),
        dest=str(tmp_path / "ds"),
        size=64,
        split=SplitConfig(test_sources=("site-c",)),
    )
    with pytest.raises(ValueError, match="no film of"):
        ingest(cfg)
