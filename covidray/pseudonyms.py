"""Keyed pseudonyms for identifiers: stable for one site key, irreversible without it.

With a site key (``COVIDRAY_PSEUDONYM_KEY``) nothing that identifies a patient leaves the
process as given: patient ids become :func:`patient_pseudonym`; study dates move back by a
keyed number of days per patient (:func:`shift_date`: the same for every study of a patient,
whenever it arrives, so intervals survive and dates do not); source paths, which in PACS
exports often hold record numbers, become :func:`source_ref` (a site holding the key can
still find a file by hashing its path); error details keep the exception's type and reason
only (:func:`safe_detail`).
"""

from __future__ import annotations

import hashlib
import hmac
from datetime import date, datetime, timedelta

PATIENT_PREFIX = "psn:"
SOURCE_PREFIX = "ref:"
MAX_SHIFT_DAYS = 3650  # dates move back by 1 … 3650 days
_DATE_FORMATS = ("%Y-%m-%d", "%Y%m%d", "%Y/%m/%d", "%d.%m.%Y", "%B %d, %Y", "%b %d, %Y")


def pseudonymize(patient_id: str, key: bytes) -> str:
    """HMAC-SHA256 of a patient identifier under the site's key (20 hex digits)."""
    return hmac.new(key, patient_id.encode("utf-8"), hashlib.sha256).hexdigest()[:20]


def patient_pseudonym(patient_id: str, key: bytes) -> str:
    """A layout's patient id (``ieee8023:123``, ``folder:person7``, a manifest's own) as
    stored under a key: ``psn:<20 hex>``."""
    return PATIENT_PREFIX + pseudonymize(patient_id, key)


def source_ref(uri: str, key: bytes) -> str:
    """A source path as stored under a key: ``ref:<20 hex>`` of the full URI."""
    return SOURCE_PREFIX + pseudonymize("source\0" + uri, key)


def date_shift_days(patient: str, key: bytes) -> int:
    """How many days (1 … :data:`MAX_SHIFT_DAYS`) every study date of ``patient`` (its stored,
    pseudonymous id) moves back: keyed, and the same for all of the patient's studies."""
    digest = hmac.new(key, b"study-date\0" + patient.encode("utf-8"), hashlib.sha256).digest()
    return 1 + int.from_bytes(digest[:8], "big") % MAX_SHIFT_DAYS


def parse_date(value: str) -> date | None:
    """An ISO date (or datetime), DICOM's ``YYYYMMDD`` and a few written forms; None else."""
    text = value.strip()
    try:
        return datetime.fromisoformat(text).date()
    except ValueError:
        pass
    for fmt in _DATE_FORMATS:
        try:
            return datetime.strptime(text, fmt).date()
        except ValueError:
            continue
    return None


def shift_date(value: str | None, patient: str | None, key: bytes) -> str | None:
    """``value`` moved back by the patient's keyed shift, as ISO ``YYYY-MM-DD``. A date that
    cannot be read, or one without a patient to key it on, is dropped (None), never kept."""
    if not value or not patient:
        return None
    parsed = parse_date(str(value))
    if parsed is None:
        return None
    return (parsed - timedelta(days=date_shift_days(patient, key))).isoformat()


def safe_detail(err: BaseException, reason: str) -> str:
    """An error detail without the exception's text (which can hold paths and names)."""
    return f"{type(err).__name__}: {reason}"
