"""The publish ledger: which films' results the archive accepted, per ``scoring_version``.

``OUT/pacs/ledger/part-<digest>.parquet``, one file per accepted STOW-RS batch, written only
after the archive answered that it stored every object of those films (so nothing is in the
ledger that the archive did not accept). Rows: ``image_id``, ``scoring_version``, the keyed
hashes of the source's and the results' SOP Instance UIDs (never the UIDs), ``published_at``.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence
from datetime import UTC, datetime

import pyarrow as pa
from pydantic import BaseModel

from .. import storage

LEDGER_DIR = "pacs/ledger"
SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("scoring_version", pa.string(), nullable=False),
        pa.field("source_key", pa.string(), nullable=False),
        pa.field("sr_key", pa.string(), nullable=False),
        pa.field("sc_key", pa.string()),  # null: no overlay (out of scope)
        pa.field("published_at", pa.timestamp("us", tz="UTC"), nullable=False),
    ]
)


class Entry(BaseModel):
    image_id: str
    scoring_version: str
    source_key: str
    sr_key: str
    sc_key: str | None = None


def uid_key(uid: str, key: bytes) -> str:
    """A UID as the ledger keeps it: keyed hash (32 hex digits)."""
    return hmac.new(key, b"uid\0" + uid.encode(), hashlib.sha256).hexdigest()[:32]


def ledger_root(out: str) -> str:
    return storage.join(storage.normalize(out), LEDGER_DIR)


def published(out: str) -> set[tuple[str, str]]:
    """``(image_id, scoring_version)`` of every film whose results the archive accepted."""
    root = ledger_root(out)
    if not storage.exists(root):
        return set()
    files = [f for f in storage.walk_files(root) if f.endswith(".parquet")]
    done: set[tuple[str, str]] = set()
    for f in files:
        table = storage.read_parquet(f, columns=["image_id", "scoring_version"])
        done.update(zip(*(table.column(c).to_pylist() for c in table.column_names), strict=True))
    return done


def record(out: str, entries: Sequence[Entry]) -> str | None:
    """Write one ledger file for ``entries`` (atomic; its name from their keys)."""
    if not entries:
        return None
    now = datetime.now(UTC)
    rows = [{**e.model_dump(), "published_at": now} for e in entries]
    digest = hashlib.sha256(
        "\n".join(sorted(f"{e.image_id}\t{e.scoring_version}" for e in entries)).encode()
    ).hexdigest()[:24]
    uri = storage.join(ledger_root(out), f"part-{digest}.parquet")
    storage.write_parquet(pa.Table.from_pylist(rows, schema=SCHEMA), uri)
    return uri
