"""Fields the DICOMweb options of ``covidray ingest``, ``publish`` and ``nightly`` share, and
the checks of archive URLs, date windows and link-table locations (no heavy imports: the
config modules use them)."""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import AfterValidator, Field

from .. import storage
from ..pseudonyms import parse_date

SCHEMES = ("dicomweb+http://", "dicomweb+https://")
DEFAULT_MODALITIES = ("CR", "DX")
_DATE_RANGE = re.compile(r"(\d{8})?-(\d{8})?|\d{8}")


def is_dicomweb(uri: str | None) -> bool:
    """Whether ``uri`` names a DICOMweb archive (``dicomweb+http(s)://HOST/PATH``)."""
    return bool(uri) and str(uri).lower().startswith(SCHEMES)


def archive_url(value: str) -> str:
    if not is_dicomweb(value):
        raise ValueError("an archive URL starts with dicomweb+https:// or dicomweb+http://")
    return value


def _modalities(values: list[str]) -> list[str]:
    out = [v.strip().upper() for value in values for v in str(value).split(",") if v.strip()]
    if not out or any(not re.fullmatch(r"[A-Z0-9]{1,16}", v) for v in out):
        raise ValueError("modalities are DICOM codes such as CR and DX")
    return list(dict.fromkeys(out))


def _date_range(value: str | None) -> str | None:
    if value is None:
        return None
    text = value.strip()
    if not _DATE_RANGE.fullmatch(text) or text == "-":
        raise ValueError("a study-date window is YYYYMMDD-YYYYMMDD (either end may be left open)")
    for part in filter(None, text.split("-")):
        if parse_date(part) is None:
            raise ValueError(f"{part} is not a date")
    return text


def outside(links: str, data: str) -> bool:
    """Whether ``links`` lies outside the dataset folder ``data`` (UIDs never enter it)."""
    a, b = storage.normalize(links), storage.normalize(data)
    return a != b and not a.startswith(b.rstrip("/") + "/")


ArchiveUrl = Annotated[str, AfterValidator(archive_url)]
Modalities = Annotated[
    list[str],
    AfterValidator(_modalities),
    Field(
        default_factory=lambda: list(DEFAULT_MODALITIES),
        description="DICOMweb source: pull studies with this modality (repeat the flag for "
        "several; default CR and DX); only CR and DX images are retrieved",
    ),
]
StudyDate = Annotated[
    str | None,
    AfterValidator(_date_range),
    Field(
        None,
        description="DICOMweb source: study dates YYYYMMDD-YYYYMMDD (the archive's real dates; "
        "either end open)",
    ),
]
CaBundle = Annotated[
    str | None,
    Field(None, description="PEM file of the CA(s) the archive's TLS certificate is checked on"),
]
ArchiveRequests = Annotated[
    int, Field(4, ge=1, le=64, description="archive requests at a time (WADO-RS retrievals)")
]
ArchiveTimeout = Annotated[
    float, Field(30.0, gt=0, description="seconds to wait for one archive request")
]
Links = Annotated[
    str | None,
    Field(
        None,
        description="link table (image_id → Study/Series/SOP Instance UIDs; local or s3://, "
        "never inside the dataset): required with a DICOMweb source",
    ),
]
