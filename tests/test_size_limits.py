"""Issue 13, item 4: memory is bounded before bytes are fetched.

Manifest inputs to ``score`` (size unknown from the manifest), ingest's mask reads, training's
data load and the report's thumbnails check an object's size before its GET. Each path gets an
object larger than its limit on a moto S3 server behind the fault proxy of
``tests/faultproxy.py`` (no faults: it only records the requests), and the proxy must see no
GET of that object.
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from covidray import storage
from covidray.config import DecodeConfig, IngestConfig
from covidray.manifest import to_table

sys.path.insert(0, str(Path(__file__).resolve().parent))

from faultproxy import FaultProxy  # noqa: E402
from test_data_paths import read_kwargs  # noqa: E402

LIMIT = 20_000


def png(seed: int, size: int) -> bytes:
    """Noise compresses badly: 40 px ≈ 1.7 KB, 200 px ≈ 40 KB."""
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


SMALL, BIG = png(1, 40), png(2, 200)
assert len(SMALL) < LIMIT < len(BIG)


@pytest.fixture
def proxied(s3_server, monkeypatch):
    """Requests seen by a pass-through proxy in front of moto, as (method, "/bucket/key");
    this process's S3 traffic goes through it."""
    with FaultProxy(s3_server) as proxy:
        seen: list[tuple[str, str]] = []
        proxy.on_request = lambda method, path: seen.append((method, path))
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        yield seen


def gets(seen: list[tuple[str, str]], uri: str) -> int:
    key = "/" + uri.split("://", 1)[1]
    return sum(1 for method, path in seen if method == "GET" and path == key)


def test_read_many_checks_sizes_first(s3_bucket: str, proxied, tmp_path: Path) -> None:
    small, big = f"{s3_bucket}/small.png", f"{s3_bucket}/big.png"
    storage.write_bytes(small, SMALL)
    storage.write_bytes(big, BIG)
    out = storage.read_many([small, big, f"{s3_bucket}/missing"], max_bytes=LIMIT)
    assert out[0] == SMALL
    assert isinstance(out[1], storage.TooLarge) and out[1].size == len(BIG)
    assert isinstance(out[2], FileNotFoundError)
    assert gets(proxied, big) == 0 and gets(proxied, small) == 1
    # Sizes from a listing: no HEAD at all, one (ranged) GET for the small one.
    proxied.clear()
    out = storage.read_many([small, big], max_bytes=LIMIT, sizes=[len(SMALL), len(BIG)])
    assert out[0] == SMALL and isinstance(out[1], storage.TooLarge)
    assert [m for m, _ in proxied] == ["GET"]
    # A size that lies (the object was replaced since it was listed): still bounded.
    out = storage.read_many([big], max_bytes=LIMIT, sizes=[100])
    assert isinstance(out[0], storage.TooLarge)
    # Local files: the same, from fstat.
    (tmp_path / "big.png").write_bytes(BIG)
    (tmp_path / "empty").write_bytes(b"")
    local = storage.read_many([str(tmp_path / "big.png"), str(tmp_path / "empty")], max_bytes=LIMIT)
    assert isinstance(local[0], storage.TooLarge) and local[1] == b""
    with pytest.raises(storage.TooLarge):
        storage.read_bytes(big, max_bytes=LIMIT)
    assert storage.read_bytes(big) == BIG  # no limit asked for: as before


def _dataset(ds: str) -> None:
    rows = []
    for name, data in (("small", SMALL), ("big", BIG)):
        storage.write_bytes(storage.join(ds, f"images/{name}.png"), data)
        rows.append(
            {
                "image_id": name * 8,
                "uri": f"images/{name}.png",
                "label": "normal",
                "patient_id": name,
                "source": "t",
                "split": "train",
                "synthetic": False,
                "width": 40,
                "height": 40,
            }
        )
    storage.write_parquet(to_table(rows), storage.join(ds, "manifest.parquet"))


@pytest.mark.parametrize("listed", [True, False])
def test_score_manifest_inputs(s3_bucket: str, proxied, monkeypatch, listed: bool) -> None:
    from covidray.score import ScoreConfig
    from covidray.score import inputs as score_inputs
    from covidray.score.stages import read_decode

    ds = f"{s3_bucket}/ds"
    _dataset(ds)
    if not listed:  # a big manifest with few new rows: no listing, a HEAD before each GET
        monkeypatch.setattr(score_inputs, "_listed_sizes", lambda base: {})
    cfg = ScoreConfig(
        model="unused", data=ds, out=f"{s3_bucket}/out", decode=DecodeConfig(max_bytes=LIMIT)
    )
    _, items, _ = score_inputs.list_inputs(cfg, set())
    batch = {n: np.array(items.column(n).to_pylist(), dtype=object) for n in items.schema.names}
    proxied.clear()
    out = read_decode(batch, **read_kwargs(read_decode, LIMIT, cfg)).to_pylist()
    by_id = {r["image_id"]: r for r in out}
    assert by_id["small" * 8]["error"] is None
    assert (by_id["big" * 8]["error"], by_id["big" * 8]["status"]) == ("too_large", "failed")
    assert gets(proxied, f"{ds}/images/big.png") == 0
    assert gets(proxied, f"{ds}/images/small.png") == 1


def test_ingest_mask(s3_bucket: str, proxied, tmp_path: Path) -> None:
    from covidray.ingest import ingest

    src = f"{s3_bucket}/src"
    storage.write_bytes(f"{src}/images/a.png", SMALL)
    storage.write_bytes(f"{src}/images/b.png", png(3, 40))
    storage.write_bytes(f"{src}/masks/a.png", BIG)
    storage.write_bytes(f"{src}/masks/b.png", png(4, 40))
    storage.write_text(
        f"{src}/manifest.csv",
        "image,label,patient_id,mask\nimages/a.png,covid,p1,masks/a.png\n"
        "images/b.png,covid,p2,masks/b.png\n",
    )
    dest = str(tmp_path / "ds")
    result = ingest(IngestConfig(src=src, dest=dest, size=32, decode=DecodeConfig(max_bytes=LIMIT)))
    errors = storage.read_parquet(storage.join(dest, "errors.parquet")).to_pylist()
    assert [(Path(e["source_uri"]).name, e["reason"]) for e in errors] == [("a.png", "too_large")]
    assert errors[0]["detail"].startswith("mask:")
    assert result.n_rows == 1
    assert gets(proxied, f"{src}/masks/a.png") == 0 and gets(proxied, f"{src}/masks/b.png") == 1


def test_training_load(s3_bucket: str, proxied) -> None:
    from covidray.dataset import load_images

    small, big = f"{s3_bucket}/t/small.png", f"{s3_bucket}/t/big.png"
    storage.write_bytes(small, SMALL)
    storage.write_bytes(big, BIG)
    assert load_images([small], 32, max_bytes=LIMIT).shape == (1, 1, 32, 32)
    with pytest.raises(storage.TooLarge):
        load_images([small, big], 32, max_bytes=LIMIT)
    assert gets(proxied, big) == 0


def test_report_thumbnail(s3_bucket: str, proxied) -> None:
    from covidray.codec import encode_png
    from covidray.report.progression import thumbnail_png

    small, big = f"{s3_bucket}/r/small.png", f"{s3_bucket}/r/big.png"
    storage.write_bytes(small, SMALL)
    storage.write_bytes(big, BIG)
    cam = encode_png(np.full((7, 7), 128, np.uint8))
    assert thumbnail_png(small, cam, 32, max_bytes=LIMIT)[1] is True
    png_bytes, had_image = thumbnail_png(big, cam, 32, max_bytes=LIMIT)
    assert had_image is False and png_bytes.startswith(b"\x89PNG")  # the map alone
    assert gets(proxied, big) == 0
