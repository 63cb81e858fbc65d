"""Issue 13, item 6: paths read from a dataset's metadata stay inside the dataset.

``manifest.csv``'s ``image`` and ``mask`` and ``manifest.parquet``'s ``uri`` may not be absolute,
point into another bucket (or storage) or climb out with ``..``: such rows are errors with the
reason ``bad_path``, and the file they name is never read. Each case on local storage and on a
moto S3 server; in every case a real file sits where the path points, so that following it
would succeed.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from covidray import storage
from covidray.config import IngestConfig
from covidray.ingest import ingest
from covidray.manifest import read_manifest, to_table


def png(seed: int, size: int = 48) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def mask_png(size: int = 48) -> bytes:
    img = np.zeros((size, size), np.uint8)
    img[10:20, 10:20] = 255
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(params=["local", "s3"])
def place(request, tmp_path: Path) -> dict[str, str]:
    """``root`` (datasets go under it), ``outside`` (a folder beside the dataset, same storage),
    ``other`` (S3: another bucket; local: a ``file://`` URI of a folder elsewhere) and
    ``local_abs`` (an absolute local folder outside the dataset, which an S3 dataset must not
    reach either). Every one of them holds real files."""
    local_abs = tmp_path / "elsewhere"
    local_abs.mkdir()
    if request.param == "local":
        other = tmp_path / "other"
        other.mkdir()
        return {
            "root": str(tmp_path / "root"),
            "outside": str(tmp_path / "root" / "outside"),
            "other": f"file://{other}",
            "local_abs": str(local_abs),
        }
    import uuid

    import boto3

    bucket = request.getfixturevalue("s3_bucket")
    other = f"test-other-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=request.getfixturevalue("s3_server")).create_bucket(
        Bucket=other
    )
    return {
        "root": f"{bucket}/root",
        "outside": f"{bucket}/root/outside",
        "other": f"s3://{other}",
        "local_abs": str(local_abs),
    }


def put(uri: str, data: bytes) -> None:
    if uri.startswith("file://"):
        Path(uri[len("file://") :]).write_bytes(data)
    else:
        storage.write_bytes(uri, data)


def test_resolve_inside_cases() -> None:
    from covidray.datapaths import OutsideDataset, resolve_inside

    for base in ("/data/ds", "s3://b/ds"):
        assert resolve_inside(base, "images/ab/x.png") == storage.join(base, "images/ab/x.png")
        assert resolve_inside(base, "a/../b.png") == storage.join(base, "b.png")
    cases = {
        "/etc/passwd": "absolute",
        "C:\\x.png": "absolute",
        "../x.png": "climbs",
        "images/../../x.png": "climbs",
        "..\\..\\x.png": "climbs",
        "s3://b/ds/images/x.png": "URI",
        "s3://other/x.png": "another bucket",
        "file:///etc/passwd": "URI",
        "": "empty",
        "a\x00.png": "control",
    }
    for rel, reason in cases.items():
        with pytest.raises(OutsideDataset, match=reason):
            resolve_inside("s3://b/ds", rel)


# --------------------------------------------------------------------- manifest.csv (ingest)


def test_ingest_manifest_csv_paths_stay_inside(place: dict[str, str]) -> None:
    src = storage.join(place["root"], "src")
    inside = {f"images/{i}.png": png(i) for i in range(6)}
    inside["masks/m.png"] = mask_png()
    for rel, data in inside.items():
        storage.write_bytes(storage.join(src, rel), data)
    # Real files where the bad paths point: following them would work.
    storage.write_bytes(storage.join(place["outside"], "x.png"), png(100))
    storage.write_bytes(storage.join(place["outside"], "m.png"), mask_png())
    Path(place["local_abs"], "x.png").write_bytes(png(101))
    Path(place["local_abs"], "m.png").write_bytes(mask_png())
    put(f"{place['other']}/x.png", png(102))
    put(f"{place['other']}/m.png", mask_png())
    abs_inside = storage.join(src, "images/5.png")  # inside, but written absolute
    rows = [
        ("images/0.png", "masks/m.png", "fine"),
        ("images/sub/../1.png", "", "fine"),  # .. that stays inside
        ("../outside/x.png", "", "image: climbs"),
        (f"{place['local_abs']}/x.png", "", "image: absolute"),
        (f"{place['other']}/x.png", "", "image: "),
        (abs_inside, "", "image: "),
        ("images/2.png", "../outside/m.png", "mask: climbs"),
        ("images/3.png", f"{place['local_abs']}/m.png", "mask: absolute"),
        ("images/4.png", f"{place['other']}/m.png", "mask: "),
    ]
    lines = ["image,label,patient_id,mask"]
    lines += [f"{img},covid,p{i},{mask}" for i, (img, mask, _) in enumerate(rows)]
    storage.write_text(storage.join(src, "manifest.csv"), "\n".join(lines) + "\n")

    dest = storage.join(place["root"], "ds")
    result = ingest(IngestConfig(src=src, dest=dest, size=32))
    assert result.layout == "manifest"
    kept = read_manifest(dest).to_pylist()
    assert sorted(r["patient_id"] for r in kept) == ["p0", "p1"]
    assert [r for r in kept if r["patient_id"] == "p0"][0]["mask_uri"]
    errors = storage.read_parquet(storage.join(dest, "errors.parquet")).to_pylist()
    bad = {e["source_uri"].rsplit("#L", 1)[-1]: e for e in errors if e["reason"] == "bad_path"}
    for line, (_, _, expect) in enumerate(rows, start=2):
        if expect == "fine":
            continue
        assert str(line) in bad, (line, errors)
        detail = bad[str(line)]["detail"]
        assert detail.startswith(expect), detail
        assert place["local_abs"] not in detail and "outside" not in detail  # no path echoed
    assert len(bad) == 7 and result.n_rows == 2


# --------------------------------------------------------------------- manifest.parquet (score)


def _dataset_with_bad_uris(place: dict[str, str]) -> tuple[str, dict[str, str]]:
    """A dataset whose manifest.parquet has two good rows and one row per bad kind of uri;
    returns its folder and ``{image_id: expected outcome}``."""
    ds = storage.join(place["root"], "ds")
    storage.write_bytes(storage.join(ds, "images/good0.png"), png(0))
    storage.write_bytes(storage.join(ds, "images/good1.png"), png(1))
    storage.write_bytes(storage.join(place["outside"], "x.png"), png(2))
    Path(place["local_abs"], "x.png").write_bytes(png(3))
    other = f"{place['other']}/x.png"
    put(other, png(4))
    uris = {
        "good0": ("images/good0.png", None),
        "good1": ("images/x/../good1.png", None),
        "climb": ("../outside/x.png", "climbs"),
        "abs": (f"{place['local_abs']}/x.png", "absolute"),
        "other": (other, "another bucket" if other.startswith("s3://") else "URI"),
        "absinside": (storage.join(ds, "images/good0.png"), "URI|absolute"),
    }
    rows = [
        {
            "image_id": f"{name:0<64}"[:64],
            "uri": uri,
            "label": "covid",
            "patient_id": f"p-{name}",
            "source": "t",
            "split": "train",
            "synthetic": False,
            "width": 48,
            "height": 48,
        }
        for name, (uri, _) in uris.items()
    ]
    storage.write_parquet(to_table(rows), storage.join(ds, "manifest.parquet"))
    return ds, {f"{n:0<64}"[:64]: why for n, (_, why) in uris.items()}


def _read_stage(cfg, items: pa.Table) -> pa.Table:
    from covidray.score.stages import read_decode

    batch = {
        name: np.array(items.column(name).to_pylist(), dtype=object) for name in items.schema.names
    }
    return read_decode(batch, **read_kwargs(read_decode, cfg.decode.max_bytes, cfg))


def read_kwargs(read_decode, max_bytes: int, cfg) -> dict:
    """read_decode's keyword arguments (``shorter_side`` where the function takes it)."""
    import inspect

    kwargs = {
        "size": 32,
        "done": frozenset(),
        "max_bytes": max_bytes,
        "max_pixels": cfg.decode.max_pixels,
        "pseudonym_key": None,
    }
    if "shorter_side" in inspect.signature(read_decode).parameters:
        kwargs["shorter_side"] = None
    return kwargs


def test_score_manifest_uri_stays_inside(place: dict[str, str]) -> None:
    from covidray.score import ScoreConfig
    from covidray.score.inputs import list_inputs

    ds, expected = _dataset_with_bad_uris(place)
    cfg = ScoreConfig(model="unused", data=ds, out=storage.join(place["root"], "scores"))
    kind, items, _ = list_inputs(cfg, set())
    assert kind == "manifest" and items.num_rows == len(expected)
    out = _read_stage(cfg, items).to_pylist()
    by_id = {r["image_id"]: r for r in out}
    for image_id, why in expected.items():
        row = by_id[image_id]
        if why is None:
            assert row["error"] is None and row["status"] == "pending", row
            continue
        assert row["error"] == "bad_path" and row["status"] == "failed", row
        assert any(w in row["error_detail"] for w in why.split("|")), row["error_detail"]
        assert row["uri"].endswith(tuple(f"#row={i}" for i in range(6)))  # not the bad path
        assert place["local_abs"] not in row["error_detail"]


def test_training_rows_refuse_paths_outside(place: dict[str, str]) -> None:
    from covidray.dataset import load_rows

    ds, _ = _dataset_with_bad_uris(place)
    with pytest.raises(ValueError, match="outside the dataset") as err:
        load_rows(ds)
    assert place["local_abs"] not in str(err.value)


def test_report_thumbnails_ignore_paths_outside(place: dict[str, str]) -> None:
    import pandas as pd

    from covidray.report.progression import _with_manifest

    ds, expected = _dataset_with_bad_uris(place)
    df = pd.DataFrame({"image_id": list(expected), "uri": ["x"] * len(expected)})
    for col in ("patient_id", "study_day", "study_date"):
        df[col] = None
    df["image_uri"] = df["uri"]
    out = _with_manifest(df, ds).set_index("image_id")["image_uri"]
    for image_id, why in expected.items():
        if why is None:
            assert out[image_id].startswith(storage.normalize(ds)), out[image_id]
        else:
            assert not isinstance(out[image_id], str) or out[image_id] == "x", out[image_id]
