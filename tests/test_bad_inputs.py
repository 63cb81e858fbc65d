"""Issue 13, item 3: one bad input never stops ingest.

Every per-file problem becomes a row of ``errors.parquet``: metadata that the manifest cannot
hold (``inf``, integers beyond int32, out-of-range ages, overlong or control-character text,
unknown vocabulary; each with the column and the problem, never the value), an exception
nobody foresaw, and a Ray task that fails as a whole (its input does not unpickle, its worker
dies): its files are retried one per task and only the one at fault is lost.
"""

from __future__ import annotations

import io
import operator
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from covidray import storage
from covidray.config import IngestConfig
from covidray.ingest import _run_ray, ingest
from covidray.layouts import SourceItem, scan
from covidray.manifest import read_manifest


def png(seed: int, size: int = 40) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


LONG_ID = "patient-" + "x" * 1000
# (column values, expected detail prefix or None for a good row)
ROWS: list[tuple[dict[str, str], str | None]] = [
    ({}, None),
    ({"orig_width": "inf"}, "orig_width: not a finite number"),
    ({"orig_height": "3000000000"}, "orig_height: outside [1, 2147483647]"),
    ({"orig_width": "12.5"}, "orig_width: not a whole number"),
    ({"age": "1e6"}, "age: outside [0, 130]"),
    ({"age": "-4"}, "age: outside"),
    ({"study_day": "1e300"}, "study_day: outside"),
    ({"patient_id": LONG_ID}, "patient_id: longer than 256"),
    ({"sex": "F\x07"}, "sex: contains a control character"),
    ({"age_group": "martian"}, "age_group: not one of"),
    ({"note": "y" * 5000}, "note: longer than 4096"),
    ({"orig_width": "640", "age": "40", "study_day": "-3"}, None),
]
COLUMNS = ("image", "label", "patient_id", "age", "age_group", "sex", "study_day")
COLUMNS += ("orig_width", "orig_height", "note")


def write_source(root: Path) -> str:
    src = root / "src"
    (src / "images").mkdir(parents=True)
    lines = [",".join(COLUMNS)]
    for i, (values, _) in enumerate(ROWS):
        (src / "images" / f"{i}.png").write_bytes(png(i))
        row = {"image": f"images/{i}.png", "label": "normal", "patient_id": f"p{i}", **values}
        lines.append(",".join(row.get(c, "") for c in COLUMNS))
    (src / "manifest.csv").write_text("\n".join(lines) + "\n")
    return str(src)


def check_result(dest: str, result) -> None:
    rows = read_manifest(dest).to_pylist()
    good = [i for i, (_, want) in enumerate(ROWS) if want is None]
    assert sorted(r["patient_id"] for r in rows) == [f"p{i}" for i in good]
    errors = storage.read_parquet(storage.join(dest, "errors.parquet")).to_pylist()
    by_name = {Path(e["source_uri"]).name: e for e in errors}
    for i, (values, want) in enumerate(ROWS):
        if want is None:
            continue
        error = by_name[f"{i}.png"]
        assert error["reason"] == "bad_metadata", error
        assert error["detail"].startswith(want), error["detail"]
        for value in values.values():  # the column and the problem, never the value
            assert value not in error["detail"]
    assert result.n_rows == len(good) and result.error_reasons == {"bad_metadata": 10}
    last = [r for r in rows if r["patient_id"] == f"p{len(ROWS) - 1}"][0]
    assert (last["orig_width"], last["age"], last["study_day"]) == (640, 40.0, -3.0)


def test_bad_metadata_rows_become_errors(tmp_path: Path) -> None:
    src = write_source(tmp_path)
    dest = str(tmp_path / "ds")
    check_result(dest, ingest(IngestConfig(src=src, dest=dest, size=32)))


@pytest.mark.usefixtures("ray_cluster")
def test_bad_metadata_rows_become_errors_in_ray_tasks(tmp_path: Path) -> None:
    src = write_source(tmp_path)
    dest = str(tmp_path / "ds")
    cfg = IngestConfig(src=src, dest=dest, size=32, parallel_threshold=0, chunk_size=3)
    check_result(dest, ingest(cfg))


def test_check_row_types() -> None:
    from covidray.rowcheck import BadMetadata, check_row

    check_row({"age": 3, "orig_width": 10.0, "synthetic": True, "label": None})
    for row, column in (
        ({"age": True}, "age"),
        ({"age": "12"}, "age"),
        ({"orig_width": float("nan")}, "orig_width"),
        ({"orig_width": 0}, "orig_width"),
        ({"synthetic": 1}, "synthetic"),
        ({"view": 7}, "view"),
        ({"label": "Covid"}, "label"),
        ({"source_uri": "s3://b/" + "k" * 5000}, "source_uri"),
    ):
        with pytest.raises(BadMetadata) as err:
            check_row(row)
        assert err.value.column == column
    check_row({"note": "line one\nline two\ttab"}, extra_columns=["note"])


# --------------------------------------------------------------------- a Ray task that fails


class Poison:
    """Pickles fine, fails to unpickle (ZeroDivisionError): a task input that breaks the task
    itself, outside any per-file handling."""

    def __reduce__(self):
        return (operator.truediv, (1, 0))


@pytest.mark.usefixtures("ray_cluster")
def test_a_failed_ray_task_loses_only_its_bad_file(tmp_path: Path) -> None:
    src = tmp_path / "src"
    for i in range(6):
        (src / "normal").mkdir(parents=True, exist_ok=True)
        (src / "normal" / f"{i}.png").write_bytes(png(i))
    items = scan(str(src)).items
    assert len(items) == 6
    poisoned = SourceItem(items[1].uri, meta={**items[1].meta, "poison": Poison()})
    items = [items[0], poisoned, *items[2:]]
    cfg = IngestConfig(src=str(src), dest=str(tmp_path / "ds"), size=32, chunk_size=3)
    results = _run_ray(items, cfg.dest, cfg, None, None)
    assert len(results) == 6
    assert ["row" in r for r in results] == [True, False, True, True, True, True]
    assert results[1]["error"]["reason"] == "failed"
    assert results[1]["error"]["detail"].startswith("RayTaskError")  # the type, no path


@pytest.mark.usefixtures("ray_cluster")
def test_map_chunks_on_error_isolates_a_dead_worker() -> None:
    from covidray.runtime.cluster import map_chunks

    def work(chunk: list[int]) -> list[int]:
        if 13 in chunk:
            os._exit(1)  # the worker process dies (an OOM kill, a segfault in a decoder)
        return [2 * x for x in chunk]

    out = map_chunks(
        work, [[1, 2], [13], [3]], max_retries=0, on_error=lambda chunk, err: [type(err).__name__]
    )
    assert out[:2] == [2, 4] and out[3] == 6
    assert "Worker" in out[2] or "Died" in out[2], out[2]
    from ray.exceptions import RayError

    with pytest.raises(RayError):  # without on_error the run fails, as before
        map_chunks(work, [[13]], max_retries=0)
