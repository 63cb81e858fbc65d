"""Reading state dicts: torchvision's ImageNet checkpoints (cache first, network only when
allowed) and state dicts at a path or object-storage URI, with integrity checks.

Every failure to get usable tensors out of a file is a :class:`WeightsError` with a message a
person can act on, never a bare pickle or zip traceback. Nothing here unpickles arbitrary
objects: ``.pt``/``.pth`` files are read with ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import posixpath
import re
from collections.abc import Mapping
from urllib.parse import urlparse

import torch
from torchvision.models import WeightsEnum

from .. import storage

OFFLINE_ENV = "COVIDRAY_OFFLINE"
_TRUE = ("1", "true", "yes", "on")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
# Wrappers that training checkpoints commonly put around the state dict.
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model")


class WeightsError(RuntimeError):
    """Weights could not be read, verified or loaded."""


class WeightsNotFoundError(WeightsError, FileNotFoundError):
    """The weights file or object does not exist."""


class WeightsUnavailableError(WeightsError):
    """Pretrained weights are neither cached nor downloadable (offline, or download failed)."""


def offline_default() -> bool:
    """True when ``$COVIDRAY_OFFLINE`` is set to 1/true/yes/on: never touch the network."""
    return os.environ.get(OFFLINE_ENV, "").strip().lower() in _TRUE


def hub_checkpoint_dir() -> str:
    """Where torch.hub caches checkpoints: ``torch.hub.get_dir()/checkpoints`` (follows
    ``$TORCH_HOME``)."""
    return os.path.join(torch.hub.get_dir(), "checkpoints")


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def verify_sha256(data: bytes, expected: str | None, source: str) -> None:
    """Raise :class:`WeightsError` when ``expected`` is given and differs from the data's."""
    if expected is None:
        return
    want = expected.strip().lower()
    if not _SHA256.match(want):
        raise ValueError(f"weights_sha256 must be 64 hex digits, got {expected!r}")
    got = sha256_hex(data)
    if got != want:
        raise WeightsError(
            f"sha256 mismatch for weights {source}: expected {want}, got {got}. "
            "The file is not the one that was pinned (changed, truncated or corrupted)."
        )


def _looks_like_safetensors(data: bytes) -> bool:
    # 8-byte little-endian header size, then a JSON header starting with '{'.
    return len(data) >= 9 and data[8:9] == b"{"


def _unwrap(obj: object, source: str) -> dict[str, torch.Tensor]:
    if isinstance(obj, Mapping) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        for key in _WRAPPER_KEYS:
            if isinstance(obj.get(key), Mapping):
                return _unwrap(obj[key], source)
    if not isinstance(obj, Mapping) or not obj:
        raise WeightsError(
            f"weights {source} hold a {type(obj).__name__}, not a state dict (a mapping of "
            f"parameter names to tensors, possibly under one of {_WRAPPER_KEYS})"
        )
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise WeightsError(
            f"weights {source} are not a plain state dict: entries {bad[:5]!r} are not tensors"
        )
    return dict(obj)


def state_dict_from_bytes(
    data: bytes, source: str = "<bytes>", sha256: str | None = None
) -> dict[str, torch.Tensor]:
    """Parse a state dict from ``.pt``/``.pth`` (torch.save, weights_only) or safetensors bytes.

    The format is picked by the ``source`` suffix or by sniffing the safetensors header.
    Tensors land on the CPU.
    """
    verify_sha256(data, sha256, source)
    if source.lower().endswith(".safetensors") or _looks_like_safetensors(data):
        from safetensors.torch import load as load_safetensors

        try:
            obj: object = load_safetensors(data)
        except Exception as e:  # safetensors raises its own SafetensorError and others
            raise WeightsError(
                f"weights {source} are not a readable safetensors file (corrupted or "
                f"truncated?): {_first_line(e)}"
            ) from e
        return _unwrap(obj, source)
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise WeightsError(
            f"weights {source} were refused by torch.load(weights_only=True): the file holds "
            "Python objects other than tensors and plain containers, so it is not a plain state "
            "dict (nothing in it was executed; re-save it with "
            f"torch.save(model.state_dict(), path)). Detail: {_unpickling_detail(e)}"
        ) from e
    except Exception as e:  # zip errors (RuntimeError), EOFError, ValueError, ...
        raise WeightsError(
            f"weights {source} are not a readable PyTorch state dict (corrupted or truncated "
            f"file?): {type(e).__name__}: {_first_line(e)}"
        ) from e
    return _unwrap(obj, source)


def load_state_dict_uri(uri: str, sha256: str | None = None) -> dict[str, torch.Tensor]:
    """Read a state dict from a local path, ``file://`` or ``s3://`` URI (see :mod:`storage`)."""
    try:
        data = storage.read_bytes(uri)
    except FileNotFoundError as e:
        raise WeightsNotFoundError(f"weights file not found: {uri}") from e
    except IsADirectoryError as e:
        raise WeightsError(f"weights {uri} is a folder, not a .pt/.pth/.safetensors file") from e
    return state_dict_from_bytes(data, uri, sha256)


def imagenet_file(weights: WeightsEnum) -> tuple[str, str, str]:
    """``(file_name, url, directory)`` of a torchvision checkpoint in the torch.hub cache."""
    url = weights.url
    return posixpath.basename(urlparse(url).path), url, hub_checkpoint_dir()


def load_imagenet_state_dict(
    weights: WeightsEnum, offline: bool | None = None, sha256: str | None = None
) -> dict[str, torch.Tensor]:
    """torchvision's ImageNet state dict for ``weights`` (e.g. ``ResNet50_Weights.IMAGENET1K_V1``).

    Read from ``torch.hub.get_dir()/checkpoints/<file name>`` when cached. Otherwise download
    it there (hash prefix checked, as torch.hub does) unless ``offline`` (default:
    ``$COVIDRAY_OFFLINE``), in which case no network access is attempted and a
    :class:`WeightsUnavailableError` names the file, its URL and the folder to put it in.
    """
    if offline is None:
        offline = offline_default()
    name, url, directory = imagenet_file(weights)
    path = os.path.join(directory, name)
    how_to = (
        f"Put the file {name!r} into {directory!r} (download it from {url}, e.g. "
        f"`curl -L --create-dirs -o {path} {url}`); the folder follows $TORCH_HOME."
    )
    if not os.path.isfile(path):
        if offline:
            raise WeightsUnavailableError(
                f"ImageNet weights {weights} are not cached and offline mode is on "
                f"(${OFFLINE_ENV}). {how_to}"
            )
        try:
            os.makedirs(directory, exist_ok=True)
            match = torch.hub.HASH_REGEX.search(name)
            torch.hub.download_url_to_file(
                url, path, hash_prefix=match.group(1) if match else None, progress=False
            )
        except Exception as e:
            raise WeightsUnavailableError(
                f"could not download ImageNet weights {weights}: {type(e).__name__}: "
                f"{_first_line(e)}. {how_to}"
            ) from e
    try:
        return load_state_dict_uri(path, sha256)
    except WeightsError as e:
        if isinstance(e, WeightsNotFoundError):
            raise
        raise WeightsError(f"{e} Delete the cached file {path} to download it again.") from e


def _unpickling_detail(e: BaseException) -> str:
    text = str(e)
    for pattern in (r"Unsupported global: GLOBAL (\S+)", r"WeightsUnpickler error: ([^\n]+)"):
        found = re.search(pattern, text)
        if found:
            return f"unsupported object {found[1]}" if "GLOBAL" in pattern else found[1]
    return _first_line(e)


def _first_line(e: BaseException) -> str:
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip()  # no ANSI colour codes
    return text.splitlines()[0] if text else type(e).__name__
