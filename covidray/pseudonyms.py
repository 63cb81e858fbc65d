"""Keyed pseudonyms for patient identifiers: stable for one site key, irreversible without it."""

from __future__ import annotations

import hashlib
import hmac


def pseudonymize(patient_id: str, key: bytes) -> str:
    """HMAC-SHA256 of a patient identifier under the site's key (20 hex digits)."""
    return hmac.new(key, patient_id.encode("utf-8"), hashlib.sha256).hexdigest()[:20]
