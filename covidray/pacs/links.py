"""The link table: image_id → the Study, Series and SOP Instance UIDs of the film it came from.

Publishing needs the real UIDs (results go back into the film's study); the dataset must not
hold them. The pull writes them here, to a Parquet file of its own (``--links``: a
``.parquet`` URI, or a folder that gets ``links.parquet``), outside the dataset; nothing else
reads or prints them. Rows are only ever added.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime

import pyarrow as pa
from pydantic import BaseModel

from .. import storage

LINKS_NAME = "links.parquet"
SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("study_uid", pa.string(), nullable=False),
        pa.field("series_uid", pa.string(), nullable=False),
        pa.field("sop_uid", pa.string(), nullable=False),
        pa.field("sop_class_uid", pa.string(), nullable=False),
        pa.field("linked_at", pa.timestamp("us", tz="UTC"), nullable=False),
    ]
)


class Link(BaseModel):
    """One film's place in the archive."""

    image_id: str
    study_uid: str
    series_uid: str
    sop_uid: str
    sop_class_uid: str


def links_uri(uri: str) -> str:
    """The table's file: ``uri`` itself when it ends in ``.parquet``, else ``uri/links.parquet``."""
    return uri if uri.endswith(".parquet") else storage.join(uri, LINKS_NAME)


def read_links(uri: str) -> dict[str, Link]:
    """image_id → :class:`Link` ({} when there is no table yet)."""
    path = links_uri(uri)
    if not storage.exists(path):
        return {}
    table = storage.read_parquet(path, columns=[n for n in SCHEMA.names if n != "linked_at"])
    return {row["image_id"]: Link(**row) for row in table.to_pylist()}


def add_links(uri: str, links: Iterable[Link]) -> int:
    """Append the links not in the table yet (one atomic write); how many were new."""
    path = links_uri(uri)
    known = read_links(uri)
    new = [link for link in links if link.image_id not in known]
    if not new:
        return 0
    now = datetime.now(UTC)
    rows = [*(k.model_dump() for k in known.values()), *(k.model_dump() for k in new)]
    stamps = (
        storage.read_parquet(path, columns=["linked_at"]).column(0).to_pylist() if known else []
    )
    table = pa.Table.from_pylist(
        [{**r, "linked_at": t} for r, t in zip(rows, [*stamps, *[now] * len(new)], strict=True)],
        schema=SCHEMA,
    )
    storage.write_parquet(table, path)
    return len(new)
