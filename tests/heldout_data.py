"""Phantoms from two sources, for the source-held-out tests."""

from __future__ import annotations

import csv
from pathlib import Path

from covidray.synth import assign_sources, write_phantoms


def two_sources(raw: Path, n_per_class: int = 12) -> None:
    """Phantoms whose patients are spread over ``site-b``, ``site-a``, ``site-a`` in turn,
    every third film of ``site-a`` not COVID-19 a child's; one ``site-b`` patient has a film
    from ``site-a`` too (a patient seen at both)."""
    write_phantoms(str(raw), n_per_class=n_per_class, seed=0, size=64)
    site = assign_sources(str(raw), ["site-b", "site-a", "site-a"])
    with open(raw / "manifest.csv") as fh:
        rows = list(csv.DictReader(fh))
    for i, r in enumerate(rows):
        if r["source"] == "site-a" and r["label"] != "covid" and i % 3 == 1:
            r["age_group"] = "child"
    shared = next(p for p in sorted(site) if site[p] == "site-b")
    next(r for r in rows if r["source"] == "site-a")["patient_id"] = shared
    with open(raw / "manifest.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
