"""Not a test module: the scoring job's output files as tests write and read them.

:func:`to_table` builds a prediction table with the job's schema from plain columns (the job
itself builds its tables in ``covidray.score.stages``); :func:`read_lock` reads the lock a run
holds on its output, as stored.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from covidray import storage
from covidray.score.lock import LOCK_NAME, LockRecord
from covidray.score.results import SCHEMA


def to_table(columns: Mapping[str, Sequence[Any] | np.ndarray]) -> pa.Table:
    """Columns (lists or arrays; NaN floats become nulls) → a table with the job's schema;
    columns not given are null."""
    n = len(columns["uri"])
    arrays = []
    for field in SCHEMA:
        values = columns.get(field.name)
        if values is None:
            arrays.append(pa.nulls(n, field.type))
            continue
        if pa.types.is_floating(field.type):
            arr = np.asarray(values, dtype=np.float64)
            arrays.append(pa.array(arr, type=field.type, mask=np.isnan(arr)))
        else:
            vals = values.tolist() if isinstance(values, np.ndarray) else list(values)
            arrays.append(pa.array([_null(v) for v in vals], type=field.type))
    return pa.Table.from_arrays(arrays, schema=SCHEMA)


def _null(value: Any) -> Any:
    """NaN/NaT/NA (pandas' missing values) → None."""
    if value is None or isinstance(value, str | bytes):
        return value
    try:
        return None if value != value else value  # NaN and NaT differ from themselves
    except (TypeError, ValueError):  # pd.NA has no truth value
        return None


def read_lock(out: str) -> LockRecord | None:
    """The lock record ``out`` holds now, as stored (None: no lock)."""
    current = storage.read_versioned(storage.join(out, LOCK_NAME))
    return None if current is None else LockRecord.model_validate_json(current.data)
