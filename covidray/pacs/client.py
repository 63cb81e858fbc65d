"""The archive: a DICOMweb client (``dicomweb-client``) with the site's credentials and TLS
settings, whose errors never carry a URL, a UID or a response body.

Credentials come from the environment only: HTTP basic (``COVIDRAY_DICOMWEB_USER`` and
``COVIDRAY_DICOMWEB_PASSWORD``) or a bearer token (``COVIDRAY_DICOMWEB_TOKEN``, or a file named
by ``COVIDRAY_DICOMWEB_TOKEN_PATH``). TLS certificates are always verified, against the system
CAs or a ``ca_bundle``. ``dicomweb-client`` logs UIDs at INFO and ``requests``' exceptions
quote URLs with UIDs in them: its loggers are quieted, and every failure of a call made
through :meth:`Archive.call` becomes :class:`ArchiveUnavailable` (worth another try: no
connection, a timeout, 408/429/5xx) or :class:`ArchiveRefused` (any other HTTP status), with
the status code and the exception's type only.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import urlsplit

import requests
from requests.adapters import HTTPAdapter

from .fields import is_dicomweb

USER_ENV, PASSWORD_ENV = "COVIDRAY_DICOMWEB_USER", "COVIDRAY_DICOMWEB_PASSWORD"
TOKEN_ENV, TOKEN_PATH_ENV = "COVIDRAY_DICOMWEB_TOKEN", "COVIDRAY_DICOMWEB_TOKEN_PATH"
TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})
T = TypeVar("T")

for _name in ("dicomweb_client", "highdicom", "urllib3.connectionpool"):
    logging.getLogger(_name).setLevel(logging.ERROR)  # they log UIDs and URLs


class ArchiveError(ValueError):
    """The archive cannot be used at all (credentials refused, unreachable, not DICOMweb): the
    command stops before any work, in one line (exit 2)."""


class ArchiveUnavailable(Exception):
    """One request failed in a way another try may not (no connection, timeout, 5xx)."""

    def __init__(self, what: str) -> None:
        super().__init__(what)
        self.what = what


class ArchiveRefused(Exception):
    """The archive answered a request with an HTTP error status that is no outage."""

    def __init__(self, status: int) -> None:
        super().__init__(f"HTTP {status}")
        self.status = status


def http_url(url: str) -> str:
    """``dicomweb+https://host/path`` → ``https://host/path``."""
    if not is_dicomweb(url):
        raise ValueError("an archive URL starts with dicomweb+https:// or dicomweb+http://")
    return url.split("+", 1)[1].rstrip("/")


def where(url: str) -> str:
    """The archive's scheme, host and port (never its path: it may hold UIDs)."""
    parts = urlsplit(http_url(url))
    return f"{parts.scheme}://{parts.netloc.rsplit('@', 1)[-1]}"


def credentials() -> tuple[str, Any] | None:
    """``("basic", (user, password))``, ``("bearer", token)`` or None, from the environment."""
    user, password = os.environ.get(USER_ENV), os.environ.get(PASSWORD_ENV)
    if user or password:
        if not (user and password):
            raise ArchiveError(f"set both {USER_ENV} and {PASSWORD_ENV}, or neither")
        return "basic", (user, password)
    token = os.environ.get(TOKEN_ENV)
    path = os.environ.get(TOKEN_PATH_ENV)
    if not token and path:
        try:
            with open(path, encoding="utf-8") as f:
                token = f.read().strip()
        except OSError as err:
            raise ArchiveError(
                f"{TOKEN_PATH_ENV}: cannot read the token file ({err.strerror})"
            ) from None
    return ("bearer", token) if token else None


def session(ca_bundle: str | None, pool: int) -> requests.Session:
    """A requests session with the environment's credentials; TLS verified (``ca_bundle``:
    the CAs to verify against)."""
    s = requests.Session()
    s.verify = ca_bundle or True
    s.trust_env = False  # no proxy or netrc settings from the environment: only ours
    adapter = HTTPAdapter(pool_connections=1, pool_maxsize=max(pool, 1), max_retries=0)
    s.mount("https://", adapter)
    s.mount("http://", adapter)
    creds = credentials()
    if creds is not None:
        kind, value = creds
        if kind == "basic":
            s.auth = value
        else:
            s.headers["Authorization"] = f"Bearer {value}"
    return s


def classify(err: BaseException) -> ArchiveUnavailable | ArchiveRefused | None:
    """What a requests/dicomweb-client exception means, without its text (None: not one)."""
    if isinstance(err, ArchiveUnavailable | ArchiveRefused):
        return err
    if isinstance(err, requests.HTTPError):
        status = err.response.status_code if err.response is not None else 0
        if status in TRANSIENT_STATUS:
            return ArchiveUnavailable(f"HTTP {status}")
        return ArchiveRefused(status)
    if isinstance(err, requests.exceptions.SSLError):
        return ArchiveRefused(0)
    if isinstance(err, requests.RequestException | ConnectionError | TimeoutError):
        return ArchiveUnavailable(type(err).__name__)
    return None


class Archive:
    """One DICOMweb archive (``dicomweb+https://HOST/PATH``)."""

    def __init__(
        self, url: str, *, ca_bundle: str | None = None, timeout_s: float = 30.0, pool: int = 4
    ) -> None:
        from dicomweb_client.api import DICOMwebClient

        self.where = where(url)
        self.ca_bundle = ca_bundle
        if ca_bundle and not os.path.isfile(ca_bundle):
            raise ArchiveError("--ca-bundle: no such file")
        self.client = DICOMwebClient(
            http_url(url), session=session(ca_bundle, pool), timeout=timeout_s
        )
        self.client.set_http_retry_params(retry=False)  # ours: retry rows, STOW retries

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``fn(*args, **kwargs)`` (a client method) with its failures scrubbed."""
        try:
            return fn(*args, **kwargs)
        except Exception as err:
            known = classify(err)
            if known is None:
                raise
            raise known from None

    def check(self) -> None:
        """One QIDO-RS query before any work: :class:`ArchiveError` in one line when the
        credentials are refused or the archive cannot be reached."""
        try:
            self.call(self.client.search_for_studies, limit=1)
        except ArchiveRefused as err:
            if err.status in (401, 403):
                raise ArchiveError(
                    f"the archive at {self.where} refused the credentials (HTTP {err.status}); "
                    f"check {USER_ENV}/{PASSWORD_ENV} or {TOKEN_ENV}"
                ) from None
            if err.status == 0:
                raise ArchiveError(
                    f"the archive at {self.where} failed TLS verification (see --ca-bundle)"
                ) from None
            raise ArchiveError(
                f"the archive at {self.where} is not a DICOMweb service at that path "
                f"(HTTP {err.status} to a QIDO-RS query)"
            ) from None
        except ArchiveUnavailable as err:
            raise ArchiveError(f"cannot reach the archive at {self.where} ({err.what})") from None
        except ValueError:  # an answer that is no DICOM JSON
            raise ArchiveError(
                f"the archive at {self.where} did not answer a QIDO-RS query with DICOM JSON"
            ) from None
