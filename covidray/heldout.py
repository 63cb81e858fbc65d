"""Source-held-out splits: every film of the named sources in test, the rest split as usual.

A site validating on multi-site data holds whole sources out, so that the test figures say how
the model does on a hospital it never trained on (DeGrave et al. 2021: a model can score by
recognising the source). The held-out sources are recorded in the manifest's Parquet metadata
(:data:`HELD_OUT_KEY`), so that ``evaluate`` reports them apart.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import pyarrow as pa

from . import storage
from .manifest import MANIFEST_NAME, read_manifest

HELD_OUT_KEY = b"covidray.test_sources"


def hold_out(
    splits: Sequence[str | None],
    patient_ids: Sequence[str],
    sources: Sequence[str | None],
    test_sources: Sequence[str],
) -> list[str | None]:
    """``splits`` with every labelled row of a patient who has a film of ``test_sources`` moved
    to test (so no patient is in two splits); every other row keeps its split."""
    held = set(test_sources)
    if not held:
        return list(splits)
    missing = sorted(held - set(sources))
    if missing:
        found = ", ".join(sorted({str(s) for s in sources}))
        raise ValueError(f"--split-test-sources: no film of {missing} (sources: {found})")
    patients = {p for p, s in zip(patient_ids, sources, strict=True) if s in held}
    return [
        "test" if split is not None and pid in patients else split
        for split, pid in zip(splits, patient_ids, strict=True)
    ]


def with_held_out(table: pa.Table, test_sources: Sequence[str]) -> pa.Table:
    """``table`` with the held-out sources in its schema metadata (unchanged for none)."""
    if not test_sources:
        return table
    meta = dict(table.schema.metadata or {})
    meta[HELD_OUT_KEY] = json.dumps(sorted(test_sources)).encode()
    return table.replace_schema_metadata(meta)


def held_out_sources(data: str) -> tuple[str, ...]:
    """The sources a dataset (folder or manifest.parquet) holds out in test; () for none."""
    meta = read_manifest(data).schema.metadata or {}
    raw = meta.get(HELD_OUT_KEY)
    return tuple(json.loads(raw)) if raw else ()


def refuse_stored_splits(dest: str, test_sources: Sequence[str]) -> None:
    """A held-out split needs a new DEST: stored splits would keep held-out patients in train."""
    if test_sources and storage.exists(storage.join(dest, MANIFEST_NAME)):
        raise ValueError(
            "--split-test-sources needs a new DEST: this one has stored splits, which would keep "
            "held-out patients in train"
        )
