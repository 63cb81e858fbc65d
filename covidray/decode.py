"""Image bytes -> float32 pixels in [0, 1]: the one decoder every other module goes through.

Conventions (one meaning for "decoded correctly"):

* Formats: PNG, JPEG, BMP, TIFF, WEBP, GIF, PPM/PGM, JPEG 2000 (through Pillow) and DICOM
  (through pydicom, recognised by ``DICM`` at offset 128).
* EXIF orientation (or XMP ``tiff:Orientation``) is applied first, as
  ``PIL.ImageOps.exif_transpose`` would.
* 8-bit data is divided by 255. 16-bit, 32-bit integer and float data is scaled by the image's own
  minimum and maximum (a constant image gives zeros). In float data, NaN and -inf count as the
  minimum and +inf as the maximum.
* Alpha (LA, RGBA, PA, P or L/RGB with a ``tRNS`` transparency) is composited onto black:
  ``value = luminance/255 * alpha/255``.
* Colour becomes Pillow's ITU-R 601-2 luminance: ``convert('L')`` for RGB,
  ``convert('RGB').convert('L')`` for CMYK, palette and other colour modes.
* DICOM: the modality LUT (rescale slope/intercept), then the VOI LUT or window when the dataset
  has a valid one (an invalid one, e.g. width < 1, is ignored), then min-max scaling;
  MONOCHROME1 is inverted afterwards (``1 - value``). RGB DICOMs are treated like RGB images
  (8-bit: luminance / 255; deeper: float luminance, min-max scaled). pydicom's
  ``apply_modality_lut``/``apply_voi_lut`` define the result; the common case (integer pixels,
  positive rescale slope, LINEAR window) takes an equivalent float32 shortcut.
* Only single images: multi-frame DICOMs and multi-page TIFF, animated GIF/PNG/WEBP are refused
  (MULTIFRAME); an MPO (camera JPEG with extra preview frames) gives its first, main picture.

Every failure caused by the input bytes raises :class:`DecodeError` with a :class:`DecodeReason`;
details never quote header values from the file (no patient data in logs).
"""

from __future__ import annotations

import contextlib
import enum
import io
import logging
import re
import threading
import warnings
import zlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageFile

from .codec import u8_to_unit

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "DecodeError",
    "DecodeReason",
    "decode_array",
    "decode_image",
    "is_dicom",
]

DEFAULT_MAX_PIXELS = 50_000_000  # about 7000 x 7000


class DecodeReason(enum.StrEnum):
    """Why bytes could not be decoded (a ``str``: ``DecodeReason.EMPTY == "empty"``)."""

    EMPTY = "empty"  # zero bytes
    NOT_AN_IMAGE = "not_an_image"  # no supported format recognises the bytes / no pixel data
    TRUNCATED = "truncated"  # the file ends before its own structure does (cut short)
    CORRUPT = "corrupt"  # recognised format, but damaged: bad CRC, bad zlib/JPEG stream, ...
    TOO_LARGE = "too_large"  # width * height above max_pixels (checked from the header)
    MULTIFRAME = "multiframe"  # more than one frame / page
    UNSUPPORTED = "unsupported"  # valid but not decodable here (no codec, odd pixel layout)


class DecodeError(ValueError):
    """Bad input bytes. ``str(e)`` is ``"<reason>: <detail>"``."""

    def __init__(self, reason: DecodeReason | str, detail: str) -> None:
        self.reason = DecodeReason(reason)
        self.detail = detail
        super().__init__(f"{self.reason.value}: {detail}")

    def __reduce__(self) -> tuple[Any, ...]:  # picklable (Ray ships exceptions between workers)
        return (type(self), (self.reason, self.detail))


_R = DecodeReason

# Formats Pillow may try. Restricting them keeps text and random bytes from being "recognised"
# by magic-less formats (TGA, SPIDER, ...), and makes open() faster.
_PIL_FORMATS = ("PNG", "JPEG", "TIFF", "BMP", "WEBP", "GIF", "PPM", "JPEG2000")

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Signatures of the formats we decode. Bytes that start like one of these but fail are
# TRUNCATED or CORRUPT; anything else that fails is NOT_AN_IMAGE.
_SIGNATURES = (
    (_PNG_SIGNATURE, "PNG"),
    (b"\xff\xd8", "JPEG"),  # SOI
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"\x00\x00\x00\x0cjP  ", "JPEG2000"),
    (b"\xff\x4f\xff\x51", "JPEG2000"),  # raw codestream
)

_ORIENTATION_TAG = 0x0112
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_HIGH_DEPTH_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I", "F"})
_PIXEL_DATA_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


# pydicom logs (besides warning) about odd values, sometimes quoting them: patient data. While
# this module decodes on a thread, that thread's pydicom records are dropped; other callers'
# records, and other threads', pass untouched.
_inside = threading.local()


class _DropWhileDecoding(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(_inside, "depth", 0)


_filtered_loggers: set[str] = set()
_loggers_seen = [-1]  # the number of loggers when they were last looked through


def _filter_pydicom_loggers() -> None:
    """Put the filter on ``pydicom`` and each of its child loggers (``pydicom.pixels.…``, made
    as pydicom imports its modules): a logger's filters never see its children's records.
    Called again after pydicom's imports; cheap when no logger was added since."""
    loggers = logging.root.manager.loggerDict
    if len(loggers) == _loggers_seen[0]:
        return
    _loggers_seen[0] = len(loggers)
    names = [n for n in list(loggers) if n.split(".")[0] == "pydicom"]
    for name in ["pydicom", *names]:
        if name not in _filtered_loggers:
            logger = logging.getLogger(name)
            if not any(isinstance(f, _DropWhileDecoding) for f in logger.filters):
                logger.addFilter(_DropWhileDecoding())
            _filtered_loggers.add(name)


_filter_pydicom_loggers()


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Swallow warnings (Pillow's DecompressionBombWarning, bad EXIF, pydicom's value checks)
    and this thread's pydicom log records: odd files are reported through DecodeError only."""
    _filter_pydicom_loggers()
    _inside.depth = getattr(_inside, "depth", 0) + 1
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        _inside.depth -= 1


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def is_dicom(data: bytes) -> bool:
    """True if ``data`` has the DICOM Part 10 preamble (``DICM`` at offset 128)."""
    return len(data) >= 132 and bytes(data[128:132]) == b"DICM"


def decode_array(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode image bytes into a C-contiguous float32 ``H x W`` array in [0, 1].

    Raises :class:`DecodeError` for anything wrong with the bytes; ``max_pixels`` bounds
    ``width * height`` and is checked from the header before any pixel is decoded. (Pillow keeps
    its own cap, 2 * ``PIL.Image.MAX_IMAGE_PIXELS``, for non-DICOM files: above it, TOO_LARGE
    whatever ``max_pixels`` says.) Raises RuntimeError if ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES``
    was set to True somewhere in the process, since cut files would then decode half grey.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise TypeError(f"decode_array expects bytes, got {type(data).__name__}")
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        # Pillow (also inside pydicom) would pad a cut file with grey instead of failing. That
        # is a setting of this process, not a fault of the image: fail loudly, reject nothing.
        raise RuntimeError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True; decoding needs False")
    if len(data) == 0:
        raise DecodeError(_R.EMPTY, "no bytes")
    with quiet():
        if is_dicom(data):
            out = _decode_dicom(data, max_pixels)
        else:
            out = _decode_pillow(data, max_pixels)
    return np.ascontiguousarray(out, dtype=np.float32)


def decode_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> torch.Tensor:
    """Decode image bytes into a float32 tensor ``1 x H x W`` in [0, 1] (see decode_array)."""
    return torch.from_numpy(decode_array(data, max_pixels=max_pixels))[None]


# --------------------------------------------------------------------------------------------
# Pillow path
# --------------------------------------------------------------------------------------------


def _decode_pillow(data: bytes, max_pixels: int) -> np.ndarray:
    is_png = bytes(data[:8]) == _PNG_SIGNATURE
    try:
        img = Image.open(io.BytesIO(data), formats=_PIL_FORMATS)
    except Image.DecompressionBombError:
        raise DecodeError(_R.TOO_LARGE, "image header declares too many pixels") from None
    except Exception as exc:  # UnidentifiedImageError, OSError, SyntaxError, ValueError, ...
        raise _failure(data, exc, None, "header") from None

    opened = img
    try:
        width, height = img.size
        if width <= 0 or height <= 0:
            raise DecodeError(_R.CORRUPT, f"{img.format} header declares a {width}x{height} image")
        if width * height > max_pixels:
            raise DecodeError(
                _R.TOO_LARGE, f"{width}x{height} {img.format} exceeds max_pixels={max_pixels}"
            )
        if is_png:
            problem = _check_png(memoryview(data))
            if problem is not None:
                raise DecodeError(*problem)
        if img.format != "MPO" and getattr(img, "n_frames", 1) > 1:
            raise DecodeError(_R.MULTIFRAME, f"{img.format} has {img.n_frames} frames")
        _load(img, data)
        img = _exif_transpose(img)
        return _pil_to_array(img)
    except (DecodeError, MemoryError):
        raise
    except Exception as exc:  # anything unexpected from Pillow: short, traceback-free detail
        raise DecodeError(_R.UNSUPPORTED, f"{opened.format} {opened.mode}: {_short(exc)}") from None
    finally:
        opened.close()


def _load(img: Image.Image, data: bytes) -> None:
    """Decode all pixels, turning Pillow's errors into TRUNCATED or CORRUPT."""
    try:
        img.load()
    except Image.DecompressionBombError:
        raise DecodeError(_R.TOO_LARGE, "image declares too many pixels") from None
    except Exception as exc:
        raise _failure(data, exc, img.format or "image", "pixel data") from None


def _failure(data: bytes, exc: Exception, kind: str | None, part: str) -> DecodeError:
    """Classify a Pillow failure: the file's own structure says whether it was cut short."""
    if isinstance(exc, ValueError) and "too large" in str(exc).lower():
        return DecodeError(_R.TOO_LARGE, f"image metadata too large ({_short(exc)})")
    head = bytes(data[:16])
    kind = kind or next((k for sig, k in _SIGNATURES if head.startswith(sig)), None)
    if kind is None and head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        kind = "WEBP"
    if kind is None:
        return DecodeError(_R.NOT_AN_IMAGE, "bytes are not a supported image format")
    if kind == "PNG":
        problem = _check_png(memoryview(data))
        if problem is not None:
            return DecodeError(*problem)
        # Every chunk is complete and intact: the content itself is bad.
        return DecodeError(_R.CORRUPT, f"PNG {part} is damaged ({_short(exc)})")
    if kind in ("JPEG", "MPO"):
        reason = _jpeg_structure(data)
    elif kind == "WEBP":
        reason = _R.TRUNCATED if int.from_bytes(data[4:8], "little") + 8 > len(data) else None
    elif kind == "TIFF":
        reason = _tiff_structure(data)
    else:
        reason = None
    if reason is None:
        cut = isinstance(exc, EOFError) or "truncated" in str(exc).lower()
        reason = _R.TRUNCATED if cut else _R.CORRUPT
    if reason == _R.TRUNCATED:
        return DecodeError(reason, f"{kind} file ends inside its {part}")
    return DecodeError(reason, f"{kind} {part} is damaged ({_short(exc)})")


def _jpeg_structure(buf: bytes) -> DecodeReason:
    """Walk JPEG markers from SOI: TRUNCATED if the data ends before EOI, else CORRUPT.

    Only run after Pillow failed, so its Python loop over the entropy-coded data costs
    nothing on good files.
    """
    n = len(buf)
    pos = 2
    while True:
        if pos >= n:
            return _R.TRUNCATED
        if buf[pos] != 0xFF:
            return _R.CORRUPT  # a marker was expected
        while pos < n and buf[pos] == 0xFF:  # fill bytes
            pos += 1
        if pos >= n:
            return _R.TRUNCATED
        marker = buf[pos]
        pos += 1
        if marker == 0xD9:  # EOI: the file is complete, its content is bad
            return _R.CORRUPT
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # TEM, RSTn: no length
            continue
        if marker in (0x00, 0xD8):
            return _R.CORRUPT
        if pos + 2 > n:
            return _R.TRUNCATED
        length = int.from_bytes(buf[pos : pos + 2], "big")
        if length < 2:
            return _R.CORRUPT
        pos += length
        if pos > n:
            return _R.TRUNCATED
        if marker == 0xDA:  # SOS: entropy-coded data runs to the next real marker
            while True:
                pos = buf.find(b"\xff", pos)
                if pos < 0 or pos + 1 >= n:
                    return _R.TRUNCATED
                following = buf[pos + 1]
                if following == 0x00 or 0xD0 <= following <= 0xD7:
                    pos += 2  # stuffed byte or restart marker
                elif following == 0xFF:
                    pos += 1
                else:
                    break


def _tiff_structure(buf: bytes) -> DecodeReason | None:
    """TRUNCATED if the first IFD of a classic TIFF lies beyond the end of the data."""
    if len(buf) < 8:
        return _R.TRUNCATED
    order = "little" if buf[:2] == b"II" else "big"
    offset = int.from_bytes(buf[4:8], order)
    if offset + 2 > len(buf):
        return _R.TRUNCATED
    entries = int.from_bytes(buf[offset : offset + 2], order)
    return _R.TRUNCATED if offset + 2 + 12 * entries + 4 > len(buf) else None


def _check_png(buf: memoryview) -> tuple[DecodeReason, str] | None:
    """Walk a PNG's chunks: verify every CRC and that the file reaches IEND.

    Pillow skips the CRCs of image data chunks, so without this a flipped bit in IDAT could
    decode into silently wrong pixels.
    """
    n = len(buf)
    pos = 8
    while True:
        if pos + 12 > n:
            return _R.TRUNCATED, "PNG ends before its IEND chunk"
        length = int.from_bytes(buf[pos : pos + 4], "big")
        ctype = bytes(buf[pos + 4 : pos + 8])
        if length > 0x7FFFFFFF or not ctype.isalpha():
            return _R.CORRUPT, "PNG chunk header is damaged"
        end = pos + 12 + length
        name = ctype.decode("ascii")
        if end > n:
            return _R.TRUNCATED, f"PNG {name} chunk is cut short"
        if zlib.crc32(buf[pos + 4 : end - 4]) != int.from_bytes(buf[end - 4 : end], "big"):
            return _R.CORRUPT, f"PNG {name} chunk fails its CRC check"
        if ctype == b"IEND":
            return None
        pos = end


def _exif_transpose(img: Image.Image) -> Image.Image:
    """Apply the EXIF/XMP orientation like ImageOps.exif_transpose, without the extra copy."""
    try:
        orientation = img.getexif().get(_ORIENTATION_TAG, 1)
    except Exception:  # unreadable EXIF: nothing to go by, keep the stored orientation
        return img
    method = _TRANSPOSE.get(orientation) if isinstance(orientation, int) else None
    return img if method is None else img.transpose(method)


def _pil_to_array(img: Image.Image) -> np.ndarray:
    mode = img.mode
    if mode == "1":
        return np.asarray(img, dtype=np.float32)  # bool -> 0 / 1, same as convert('L') / 255
    if mode in _HIGH_DEPTH_MODES:
        return _minmax(np.asarray(img))
    if mode in ("L", "RGB", "P") and "transparency" in img.info:  # tRNS: a real alpha channel
        img = img.convert("LA" if mode == "L" else "RGBA")
        mode = img.mode
    if mode == "L":
        return u8_to_unit(np.asarray(img))
    if mode in ("RGB", "RGBX"):
        return u8_to_unit(np.asarray(img.convert("L")))
    if mode in ("LA", "La"):
        la = np.asarray(img if mode == "LA" else img.convert("LA"))
        return _composite(la[..., 0], la[..., 1])
    if mode in ("RGBA", "RGBa", "PA"):
        rgba = img if mode == "RGBA" else img.convert("RGBA")
        return _composite(np.asarray(rgba.convert("L")), np.asarray(rgba.getchannel("A")))
    # P without transparency, CMYK, YCbCr, LAB, HSV, ...
    return u8_to_unit(np.asarray(img.convert("RGB").convert("L")))


def _composite(lum: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Luminance over black: lum/255 * alpha/255 (the product is exact in float32)."""
    out = lum.astype(np.float32)
    out *= alpha
    out /= 65025.0
    return out


def _minmax(arr: np.ndarray) -> np.ndarray:
    """Scale by the array's own minimum and maximum to [0, 1]; constant -> zeros."""
    if arr.dtype.kind == "f":
        arr = arr.astype(np.float64, copy=False)  # float32 ranges can overflow max - min
        finite = np.isfinite(arr)
        if not finite.all():
            if not finite.any():
                return np.zeros(arr.shape, np.float32)
            lo, hi = arr[finite].min(), arr[finite].max()
            arr = np.nan_to_num(arr, nan=lo, posinf=hi, neginf=lo)
    elif arr.dtype.kind == "b":
        arr = arr.view(np.uint8)
    lo, hi = arr.min(), arr.max()
    if not hi > lo:
        return np.zeros(arr.shape, np.float32)
    if arr.dtype.kind in "iu" and arr.dtype.itemsize <= 2:  # exact in float32
        out = arr.astype(np.float32)
        out -= int(lo)
        out /= float(int(hi) - int(lo))
        return out
    lo, hi = float(lo), float(hi)
    return ((arr - lo) / (hi - lo)).astype(np.float32)


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    text = re.sub(r"<[^>]*object at 0x[0-9a-f]+>", "data", text)
    return text[:160]


# --------------------------------------------------------------------------------------------
# DICOM path
# --------------------------------------------------------------------------------------------


def read_dicom(data: bytes, *, stop_before_pixels: bool) -> Any:
    """pydicom's dataset, or DecodeError. pydicom reads a cut file without complaint (it keeps
    short values and stops at the end), so truncation is looked for explicitly."""
    import struct

    import pydicom

    _filter_pydicom_loggers()  # loggers its import made
    from pydicom.dataelem import RawDataElement

    if len(data) < 144:  # preamble, DICM and not even the file meta group length
        raise DecodeError(_R.TRUNCATED, "DICOM file ends inside its file meta information")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=stop_before_pixels)
        except (EOFError, struct.error):
            raise DecodeError(_R.TRUNCATED, "DICOM file ends inside a data element") from None
        except Exception as exc:  # pydicom messages may quote element values: type only
            raise DecodeError(
                _R.CORRUPT, f"DICOM header could not be parsed ({type(exc).__name__})"
            ) from None
    meta_length = ds.file_meta.get("FileMetaInformationGroupLength")
    meta_end = 144 + meta_length if isinstance(meta_length, int) else 132
    if meta_end > len(data):
        raise DecodeError(_R.TRUNCATED, "DICOM file ends inside its file meta information")
    if "TransferSyntaxUID" not in ds.file_meta and len(ds) == 0:
        raise DecodeError(_R.CORRUPT, "DICOM preamble present but no data elements could be read")
    if any("end of file" in str(w.message).lower() for w in caught):
        raise DecodeError(_R.TRUNCATED, "DICOM file ends before a sequence or item delimiter")
    last_end = meta_end
    try:
        elements = list(ds.elements())  # converts sequences, which may fail on damage
    except Exception as exc:
        raise DecodeError(
            _R.CORRUPT, f"DICOM header element unreadable ({type(exc).__name__})"
        ) from None
    for elem in elements:
        if not isinstance(elem, RawDataElement) or elem.length == 0xFFFFFFFF:
            continue
        if isinstance(elem.value, bytes) and len(elem.value) < elem.length:
            raise DecodeError(_R.TRUNCATED, "DICOM file ends inside a data element")
        last_end = max(last_end, elem.value_tell + elem.length)
    # pydicom silently drops a last element header cut to fewer than its 8 bytes.
    if 0 < len(data) - last_end < 8:
        raise DecodeError(_R.TRUNCATED, "DICOM file ends inside a data element header")
    if len(ds) == 0:
        if last_end == len(data):
            raise DecodeError(_R.TRUNCATED, "DICOM file ends after its file meta information")
        raise DecodeError(_R.CORRUPT, "DICOM preamble present but no data elements could be read")
    return ds


def _decode_dicom(data: bytes, max_pixels: int) -> np.ndarray:
    try:
        return _decode_dicom_dataset(data, max_pixels)
    except (DecodeError, MemoryError):
        raise
    except Exception as exc:  # a damaged header pydicom trips over; never quote values
        raise DecodeError(
            _R.CORRUPT, f"DICOM header element unreadable ({type(exc).__name__})"
        ) from None


def _decode_dicom_dataset(data: bytes, max_pixels: int) -> np.ndarray:
    ds = read_dicom(data, stop_before_pixels=False)
    if not any(k in ds for k in _PIXEL_DATA_KEYWORDS):
        raise DecodeError(
            _R.NOT_AN_IMAGE, "DICOM file has no pixel data (not an image object, or cut before it)"
        )
    try:
        frames = int(ds.get("NumberOfFrames") or 1)
        rows, cols = int(ds.Rows), int(ds.Columns)
    except Exception:
        raise DecodeError(
            _R.CORRUPT, "DICOM Rows/Columns/NumberOfFrames missing or invalid"
        ) from None
    if frames > 1:
        raise DecodeError(_R.MULTIFRAME, f"DICOM has {frames} frames")
    if rows <= 0 or cols <= 0:
        raise DecodeError(_R.CORRUPT, f"DICOM declares a {cols}x{rows} image")
    if rows * cols > max_pixels:
        raise DecodeError(_R.TOO_LARGE, f"{cols}x{rows} DICOM exceeds max_pixels={max_pixels}")

    tsyntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    _require_decoder(tsyntax)
    try:
        arr = ds.pixel_array
    except NotImplementedError:
        raise DecodeError(
            _R.UNSUPPORTED, f"DICOM pixel layout not supported ({_ts(tsyntax)})"
        ) from None
    except Exception as exc:
        text = str(exc).lower()
        if isinstance(exc, EOFError) or any(w in text for w in ("less than", "truncat", "short")):
            raise DecodeError(_R.TRUNCATED, "DICOM pixel data is shorter than declared") from None
        raise DecodeError(
            _R.CORRUPT, f"DICOM pixel data could not be decoded ({type(exc).__name__})"
        ) from None

    try:
        return _dicom_to_unit(arr, ds)
    except (DecodeError, MemoryError):
        raise
    except Exception as exc:
        raise DecodeError(
            _R.UNSUPPORTED, f"DICOM pixel values could not be mapped ({type(exc).__name__})"
        ) from None


def _require_decoder(tsyntax: Any) -> None:
    """UNSUPPORTED, naming the transfer syntax, when no installed plugin can decode it."""
    if tsyntax is None:
        return
    try:
        compressed = tsyntax.is_compressed
    except Exception:  # not a transfer syntax pydicom knows (or not even a single UID)
        raise DecodeError(_R.UNSUPPORTED, "unknown transfer syntax") from None
    if not compressed:
        return
    from pydicom.pixels import get_decoder

    _filter_pydicom_loggers()

    try:
        available = get_decoder(tsyntax).is_available
    except NotImplementedError:
        available = False
    if not available:
        raise DecodeError(_R.UNSUPPORTED, f"no decoder installed for {_ts(tsyntax)}")


def _ts(tsyntax: Any) -> str:
    if tsyntax is None:
        return "unknown transfer syntax"
    name = getattr(tsyntax, "name", "")
    if name and name != str(tsyntax):
        return f"transfer syntax {name} ({tsyntax})"
    return f"transfer syntax {tsyntax}"


def _dicom_to_unit(arr: np.ndarray, ds: Any) -> np.ndarray:
    from pydicom.pixels import apply_color_lut

    photometric = str(ds.get("PhotometricInterpretation") or "MONOCHROME2").strip().upper()
    if photometric == "PALETTE COLOR" and arr.ndim == 2:
        arr = apply_color_lut(arr, ds)
    if arr.ndim == 3:
        if arr.shape[-1] != 3:
            raise DecodeError(_R.UNSUPPORTED, f"DICOM with {arr.shape[-1]} samples per pixel")
        if arr.dtype == np.uint8:  # 8-bit RGB: like an RGB image
            return u8_to_unit(
                np.asarray(Image.fromarray(np.ascontiguousarray(arr), "RGB").convert("L"))
            )
        rgb = arr.astype(np.float64)
        return _minmax(rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114)
    if arr.ndim != 2:
        raise DecodeError(_R.UNSUPPORTED, f"DICOM pixel array has shape {arr.shape}")

    out = _mono_fast(arr, ds, photometric)
    if out is None:
        out = _mono_pydicom(arr, ds)
    if photometric == "MONOCHROME1":
        np.subtract(1.0, out, out=out)
    return out


def _mono_pydicom(arr: np.ndarray, ds: Any) -> np.ndarray:
    """Modality LUT, VOI LUT or window (pydicom), then min-max: the reference pipeline."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    arr = apply_modality_lut(arr, ds)
    try:
        arr = apply_voi_lut(_clip_to_voi_lut(arr, ds), ds)
    except (ValueError, TypeError, IndexError, KeyError, AttributeError):
        pass  # invalid VOI LUT / window (e.g. width < 1): documented as ignored
    return _minmax(np.asarray(arr))


def _mono_fast(arr: np.ndarray, ds: Any, photometric: str) -> np.ndarray | None:
    """The same result as _mono_pydicom for the common case (integer pixels, rescale with a
    positive slope, LINEAR window or none), in float32 and several times faster; None when the
    case is not covered.

    Min-max scaling makes any increasing affine map irrelevant, so the rescale only matters
    through the window, and pydicom's output range (y_min..y_max) not at all.
    """
    if arr.dtype.kind not in "iu" or arr.dtype.itemsize > 2:
        return None
    if ds.get("ModalityLUTSequence") or ds.get("VOILUTSequence"):
        return None
    try:
        slope, intercept = 1.0, 0.0
        if "RescaleSlope" in ds and "RescaleIntercept" in ds:
            slope, intercept = float(ds.RescaleSlope), float(ds.RescaleIntercept)
        window = None
        if ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None:
            if str(ds.get("VOILUTFunction") or "LINEAR").strip().upper() != "LINEAR":
                return None
            window = _first_value(ds.WindowCenter), _first_value(ds.WindowWidth)
    except (TypeError, ValueError, AttributeError, IndexError):
        return None
    if not (slope > 0 and np.isfinite(slope) and np.isfinite(intercept)):
        return None
    if window is None or not np.isfinite(window).all():
        return _minmax(arr) if window is None else None
    center, width = window
    if width < 1 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
        return _minmax(arr)  # pydicom refuses such a window; it is ignored
    # Stored value nearest the window's centre: subtracting it (exact for 16-bit integers)
    # before scaling keeps float32 precise near the window whatever the offsets.
    info = np.iinfo(arr.dtype)
    k = min(max(round(((center - 0.5) - intercept) / slope), info.min), info.max)
    if width == 1:  # LINEAR with width 1 is a threshold
        return _minmax((arr.astype(np.float32) * slope + intercept > center - 0.5).view(np.uint8))
    t = arr.astype(np.float32)
    t -= k
    t *= slope / (width - 1)
    t += (k * slope + intercept - (center - 0.5)) / (width - 1) + 0.5
    np.clip(t, 0.0, 1.0, out=t)
    lo, hi = float(t.min()), float(t.max())
    if not hi > lo:
        return np.zeros(t.shape, np.float32)
    if lo != 0.0 or hi != 1.0:
        t -= lo
        t /= hi - lo
    return t


def _first_value(value: Any) -> float:
    """A DS value, or the first of several (WindowCenter/Width may hold one per VOI)."""
    if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
        value = value[0]
    return float(value)


def _clip_to_voi_lut(arr: np.ndarray, ds: Any) -> np.ndarray:
    """Clip values into the input range of the VOI LUT that apply_voi_lut will use.

    Semantically a no-op (values outside the range map to the first/last entry either way), but
    pydicom 3.0 computes ``value - first_mapped`` in the LUT's own dtype, so with an 8-bit LUT
    any value more than 255 above the first mapped one wraps around to a wrong entry.
    """
    seq = ds.get("VOILUTSequence")
    if not seq:
        return arr
    item = seq[0]
    descriptor = item.get("LUTDescriptor")
    if descriptor is None or item.get("LUTData") is None:
        return arr  # not a usable LUT: apply_voi_lut falls back to the window
    entries = int(descriptor[0]) or 2**16
    first = int(descriptor[1])
    if first >= 2**15 and ds.get("PixelRepresentation") == 1:
        first -= 2**16  # descriptor read as US although the pixels are signed
    lo, hi = first, first + entries - 1
    if arr.dtype.kind in "iu":  # keep the bounds representable in the array's dtype
        info = np.iinfo(arr.dtype)
        lo, hi = min(max(lo, info.min), info.max), min(max(hi, info.min), info.max)
    return np.clip(arr, lo, hi)
