"""The manifest schema and the patient-level stratified split."""

from __future__ import annotations

from collections import Counter

import numpy as np

from covidray.config import SplitConfig
from covidray.manifest import CORE_COLUMNS, split_by_patient, to_table


def _cohort(seed: int = 1):
    rng = np.random.default_rng(seed)
    pids, labels, ages = [], [], []
    for label, n_patients in (("covid", 40), ("pneumonia", 60), ("normal", 70)):
        for p in range(n_patients):
            age = "adult" if label == "covid" or p % 3 == 0 else "child"
            for _ in range(int(rng.integers(1, 4)) if label == "covid" else 1):
                pids.append(f"{label}:{p}")
                labels.append(label)
                ages.append(age)
    pids.append("unlabelled:1")
    labels.append(None)
    ages.append(None)
    return pids, labels, [[a] for a in ages]


def test_no_patient_in_two_splits_and_fractions() -> None:
    pids, labels, strata = _cohort()
    splits = split_by_patient(pids, labels, strata)
    per_patient: dict[str, set] = {}
    for pid, split in zip(pids, splits, strict=True):
        per_patient.setdefault(pid, set()).add(split)
    assert all(len(s) == 1 for s in per_patient.values())
    assert splits[-1] is None  # unlabelled rows are not split
    # Patients are drawn independently: the shares of ~170 patients are within a few points.
    first = {pid: split for pid, split in zip(pids, splits, strict=True) if split}
    counts = Counter(first.values())
    n = sum(counts.values())
    assert abs(counts["train"] / n - 0.70) < 0.07
    assert abs(counts["val"] / n - 0.15) < 0.06
    assert abs(counts["test"] / n - 0.15) < 0.06
    # every (label, age group) stratum is present in every split
    for label in ("covid", "pneumonia", "normal"):
        for age in ("adult", "child"):
            present = {
                s
                for s, lab, st in zip(splits, labels, strata, strict=True)
                if lab == label and st[0] == age
            }
            if present:
                assert present == {"train", "val", "test"}, (label, age, present)


def test_split_is_deterministic_and_order_independent() -> None:
    pids, labels, strata = _cohort()
    a = split_by_patient(pids, labels, strata, SplitConfig(seed=0))
    b = split_by_patient(pids, labels, strata, SplitConfig(seed=0))
    assert a == b
    order = np.random.default_rng(5).permutation(len(pids))
    shuffled = split_by_patient(
        [pids[i] for i in order], [labels[i] for i in order], [strata[i] for i in order]
    )
    assert [shuffled[list(order).index(i)] for i in range(len(pids))] == a
    c = split_by_patient(pids, labels, strata, SplitConfig(seed=1))
    assert c != a


def test_to_table_types_and_extras() -> None:
    row = {
        "image_id": "ab",
        "uri": "images/ab.png",
        "label": "covid",
        "patient_id": "x:1",
        "source": "x",
        "synthetic": False,
        "width": 3,
        "height": 4,
        "age": 40.0,
        "license_note": "cc",
    }
    table = to_table([row], extra_columns=["license_note"])
    assert table.schema.names[: len(CORE_COLUMNS)] == list(CORE_COLUMNS)
    assert table.column("license_note").to_pylist() == ["cc"]
    assert table.column("split").to_pylist() == [None]


def test_growing_the_data_never_moves_a_patient() -> None:
    """New patients, another row order, a second ingest with the stored splits: nobody moves."""
    pids, labels, strata = _cohort()
    before = dict(zip(pids, split_by_patient(pids, labels, strata), strict=True))
    more = [f"new:{i}" for i in range(20)]
    grown = split_by_patient(pids + more, labels + ["covid"] * 20, strata + [["adult"]] * 20)
    assert dict(zip(pids, grown[: len(pids)], strict=True)) == before
    # A stored split wins over the draw (a manifest from an older version of the rule).
    flipped = {p: ("test" if s == "train" else "train") for p, s in before.items() if s}
    kept = split_by_patient(pids, labels, strata, known=flipped)
    assert all(flipped[p] == s for p, s in zip(pids, kept, strict=True) if s)
