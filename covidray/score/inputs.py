"""What a scoring run reads: a dataset's manifest rows, or the image files under a prefix.

Every item's size is known before its bytes are fetched where a listing is cheap: a prefix's
from its listing, a dataset's from a listing of its folder when more than one row in a thousand
is to be read (one LIST per thousand objects in place of a HEAD per image; otherwise the read
stage HEADs each image first). A manifest row whose ``uri`` would leave the dataset (absolute, a
URI, ``..`` climbing out: :mod:`covidray.datapaths`) is never read: it becomes a failed row with
the reason ``bad_path``, under the URI ``<manifest>#row=<i>``.
"""

from __future__ import annotations

import pyarrow as pa

from .. import storage
from ..datapaths import OutsideDataset, resolve_inside
from ..manifest import MANIFEST_NAME, manifest_base, read_manifest
from ..sidecars import is_sidecar
from . import results
from .config import ScoreConfig

ITEM_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string()),
        pa.field("uri", pa.string()),
        pa.field("patient_id", pa.string()),
        pa.field("study_day", pa.float32()),
        pa.field("study_date", pa.string()),
        pa.field("size", pa.int64()),
        # The DICOM header fields a dataset row keeps for the input gate's metadata layer
        # (ingest stores normalised PNGs, so the gate reads them here, not from the file).
        pa.field("view", pa.string()),  # a manifest's view position (a header's when read)
        pa.field("modality", pa.string()),
        pa.field("body_part", pa.string()),
        pa.field("error", pa.string()),  # set: not to be read (bad_path), a failed row
        pa.field("error_detail", pa.string()),
    ]
)
BAD_PATH = "bad_path"
GATE_COLUMNS = ("view", "modality", "body_part")


def is_dataset(uri: str) -> bool:
    if uri.endswith(".parquet"):
        return True
    return storage.exists(storage.join(uri, MANIFEST_NAME))


def list_inputs(cfg: ScoreConfig, done: set[str]) -> tuple[str, pa.Table, int]:
    """``(kind, items, n_skipped)``: the images to read, in a stable order.

    A dataset's rows already scored (``done``) are dropped here; a prefix's files are all
    listed (their image_id is only known after reading them).
    """
    if is_dataset(cfg.data):
        manifest = read_manifest(cfg.data)
        base = manifest_base(cfg.data)
        n = manifest.num_rows

        def col(name: str, typ: pa.DataType) -> list:
            if name not in manifest.schema.names:
                return [None] * n
            return manifest.column(name).cast(typ).to_pylist()

        ids = col("image_id", pa.string())
        keep = [i for i, image_id in enumerate(ids) if image_id not in done]
        uris = col("uri", pa.string())
        manifest_uri = (
            cfg.data if cfg.data.endswith(".parquet") else storage.join(base, MANIFEST_NAME)
        )
        resolved, errors, details = [], [], []
        for i in keep:
            try:
                resolved.append(resolve_inside(base, uris[i]))
                errors.append(None)
                details.append(None)
            except OutsideDataset as err:
                resolved.append(f"{manifest_uri}#row={i}")
                errors.append(BAD_PATH)
                details.append(f"uri: {err.reason}")
        sizes = _listed_sizes(base) if len(keep) > n // 1000 else {}
        cols = {
            "image_id": [ids[i] for i in keep],
            "uri": resolved,
            "size": [
                None if e else sizes.get(storage.filesystem(u)[1])
                for u, e in zip(resolved, errors, strict=True)
            ],
            "error": errors,
            "error_detail": details,
        }
        for name, typ in (
            ("patient_id", pa.string()),
            ("study_day", pa.float32()),
            ("study_date", pa.string()),
            *((name, pa.string()) for name in GATE_COLUMNS),
        ):
            values = col(name, typ)
            cols[name] = [values[i] for i in keep]
        table = pa.Table.from_pydict(cols, schema=ITEM_SCHEMA)
        return "manifest", table, n - len(keep)

    results.fresh_listing(cfg.data)
    fs, path = storage.filesystem(cfg.data)
    if not fs.isdir(path):
        raise FileNotFoundError(f"--data is neither a dataset nor a folder: {cfg.data}")
    out_path = storage.filesystem(cfg.out)[1].rstrip("/") + "/"
    found = fs.find(path, detail=True)
    uris, sizes = [], []
    for p in sorted(found):
        if is_sidecar(p, cfg.exclude_suffixes) or p.startswith(out_path):
            continue
        uris.append(storage.to_uri(p, cfg.data))
        sizes.append(found[p].get("size"))
    n = len(uris)
    table = pa.Table.from_pydict(
        {
            "image_id": [None] * n,
            "uri": uris,
            "patient_id": [None] * n,
            "study_day": [None] * n,
            "study_date": [None] * n,
            "view": [None] * n,
            "size": sizes,
            **{name: [None] * n for name in GATE_COLUMNS},
            "error": [None] * n,
            "error_detail": [None] * n,
        },
        schema=ITEM_SCHEMA,
    )
    return "prefix", table, 0


def _listed_sizes(base: str) -> dict[str, int]:
    """Filesystem path → size of every object under the dataset folder ``base``."""
    results.fresh_listing(base)
    fs, path = storage.filesystem(base)
    found = fs.find(path, detail=True)
    return {p: int(info["size"]) for p, info in found.items() if info.get("size") is not None}
