"""A reusable corpus of odd, corrupt and hostile image files, built in memory.

Not a test module: tests import :func:`make_odd_files`. Good entries carry the expected
``decode_array`` output, computed here independently of ``covidray.decode`` (numpy formulas,
Pillow only for decoding JPEG and for the ITU-R 601-2 luminance), following the conventions in
``covidray/decode.py``. Bad entries carry the expected ``DecodeReason`` value.

Images are 64 wide x 48 high (non-square, so transposition mistakes show) and look like a
gradient with a bright disc. The DICOMs carry a realistic PatientID and PatientName
(:data:`DICOM_PATIENT_ID`, :data:`DICOM_PATIENT_NAME`) so tests can check they never leak.
"""

from __future__ import annotations

import io
import struct
import warnings
import zipfile
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image

H, W = 48, 64
DICOM_PATIENT_ID = "PAT-12345"
DICOM_PATIENT_NAME = "Doe^Jane"
# What covidray.dicom_meta.dicom_tags must return for the DICOMs built here (unless noted).
DICOM_TAGS = {
    "patient_id": DICOM_PATIENT_ID,
    "view": "PA",
    "sex": "F",
    "age": 45.0,
    "study_date": "2020-03-15",
    "modality": "DX",
    "body_part": "CHEST",
}


@dataclass(frozen=True)
class OddFile:
    name: str  # file name with extension, e.g. "truncated.png"
    data: bytes
    good: bool  # True if it must decode successfully
    reason: str | None  # expected DecodeReason value for bad ones
    reference: np.ndarray | None  # good ones: expected float32 H x W decode_array output

    def __repr__(self) -> str:  # readable pytest ids / failure messages
        status = "good" if self.good else self.reason
        return f"OddFile({self.name!r}, {len(self.data)} bytes, {status})"


# --------------------------------------------------------------------------------------------
# Pixel content and reference formulas
# --------------------------------------------------------------------------------------------


def scene(rng: np.random.Generator, h: int = H, w: int = W) -> np.ndarray:
    """Float64 h x w in [0, 1]: horizontal + vertical gradient, a bright disc, a little noise."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    img = 0.55 * x / max(w - 1, 1) + 0.2 * y / max(h - 1, 1)
    disc = (x - 0.7 * w) ** 2 + (y - 0.35 * h) ** 2 <= (0.22 * min(h, w)) ** 2
    img = np.where(disc, 0.95, img) + rng.normal(0.0, 0.02, (h, w))
    img[0, 0] = 0.0  # pin the extremes so every format uses its full range
    img[-1, -1] = 1.0
    return np.clip(img, 0.0, 1.0)


def to_u8(img: np.ndarray) -> np.ndarray:
    return np.round(img * 255).astype(np.uint8)


def ref_u8(u8: np.ndarray) -> np.ndarray:
    return (u8.astype(np.float64) / 255).astype(np.float32)


def ref_minmax(values: np.ndarray) -> np.ndarray:
    v = values.astype(np.float64)
    lo, hi = v.min(), v.max()
    if hi <= lo:
        return np.zeros(v.shape, np.float32)
    return ((v - lo) / (hi - lo)).astype(np.float32)


def luminance(rgb: np.ndarray) -> np.ndarray:
    """Pillow's ITU-R 601-2 luminance (uint8) of an uint8 RGB array."""
    return np.asarray(Image.fromarray(np.ascontiguousarray(rgb), "RGB").convert("L"))


def ref_composite(lum: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    return (lum.astype(np.float64) / 255 * alpha.astype(np.float64) / 255).astype(np.float32)


def window_linear(x: np.ndarray, center: float, width: float) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2.1 LINEAR window, normalised to [0, 1]."""
    return np.clip((x - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)


def rgb_scene(rng: np.random.Generator) -> np.ndarray:
    """uint8 H x W x 3: the scene tinted differently per channel."""
    g = scene(rng)
    rgb = np.stack([g, g**0.7, 1.0 - 0.6 * g], axis=-1)
    return to_u8(rgb)


# --------------------------------------------------------------------------------------------
# Encoders
# --------------------------------------------------------------------------------------------


def save(img: Image.Image, fmt: str, **params: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **params)
    return buf.getvalue()


def png_chunk(ctype: bytes, payload: bytes) -> bytes:
    return (
        struct.pack(">I", len(payload))
        + ctype
        + payload
        + struct.pack(">I", zlib.crc32(ctype + payload))
    )


def png_by_hand(width: int, height: int, idat: bytes, *, bit_depth: int = 8) -> bytes:
    """A grayscale PNG with a valid IHDR (and CRCs) for any declared size and any IDAT."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", idat)
        + png_chunk(b"IEND", b"")
    )


def png_chunks(data: bytes) -> list[tuple[int, bytes, int]]:
    """(offset, type, length) of each chunk of a PNG."""
    out, pos = [], 8
    while pos + 8 <= len(data):
        length = struct.unpack(">I", data[pos : pos + 4])[0]
        ctype = data[pos + 4 : pos + 8]
        out.append((pos, ctype, length))
        pos += 12 + length
    return out


def first_chunk(data: bytes, ctype: bytes) -> tuple[int, int]:
    return next((pos, length) for pos, t, length in png_chunks(data) if t == ctype)


def dicom_bytes(
    pixels: np.ndarray | None,
    *,
    photometric: str = "MONOCHROME2",
    bits_stored: int | None = None,
    frames: int | None = None,
    transfer_syntax: str | None = None,
    pixel_data: bytes | None = None,
    rows_cols: tuple[int, int] | None = None,
    **attrs: object,
) -> bytes:
    """An uncompressed (unless told) single-file DICOM made with pydicom, in memory.

    ``pixels``: H x W (x 3 for RGB) uint8/uint16/int16; None for a header-only object.
    ``pixel_data`` overrides the encoded pixel bytes (for broken files); ``attrs`` are set
    as DICOM keywords.
    """
    import pydicom
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    sop_class = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation
    sop_instance = generate_uid(entropy_srcs=[repr((photometric, bits_stored, frames, attrs))])
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = transfer_syntax or ExplicitVRLittleEndian
    ds = FileDataset(None, {}, file_meta=meta, preamble=b"\x00" * 128)
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_instance
    ds.PatientID = DICOM_PATIENT_ID
    ds.PatientName = DICOM_PATIENT_NAME
    ds.PatientSex = "F"
    ds.PatientAge = "045Y"
    ds.StudyDate = "20200315"
    ds.Modality = "DX"
    ds.ViewPosition = "PA"
    ds.BodyPartExamined = "CHEST"
    if pixels is not None:
        rgb = pixels.ndim == 3
        bits = pixels.dtype.itemsize * 8
        ds.Rows, ds.Columns = rows_cols or pixels.shape[:2]
        ds.SamplesPerPixel = 3 if rgb else 1
        if rgb:
            ds.PlanarConfiguration = 0
        ds.PhotometricInterpretation = photometric
        ds.BitsAllocated = bits
        ds.BitsStored = bits_stored or bits
        ds.HighBit = ds.BitsStored - 1
        ds.PixelRepresentation = 1 if pixels.dtype.kind == "i" else 0
        if frames is not None:
            ds.NumberOfFrames = frames
        ds.PixelData = pixel_data if pixel_data is not None else pixels.tobytes()
    with warnings.catch_warnings():  # deliberately invalid values (e.g. PatientAge "045")
        warnings.simplefilter("ignore")
        for keyword, value in attrs.items():
            setattr(ds, keyword, value)
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def _decoder_available(uid: str) -> bool:
    from pydicom.pixels import get_decoder

    try:
        return bool(get_decoder(uid).is_available)
    except NotImplementedError:
        return False


# --------------------------------------------------------------------------------------------
# The corpus
# --------------------------------------------------------------------------------------------


def _good(name: str, data: bytes, reference: np.ndarray) -> OddFile:
    ref = np.ascontiguousarray(reference, dtype=np.float32)
    return OddFile(name, data, True, None, ref)


def _bad(name: str, data: bytes, reason: str) -> OddFile:
    return OddFile(name, data, False, reason, None)


def good_files(rng: np.random.Generator) -> list[OddFile]:
    out: list[OddFile] = []
    g = scene(rng)
    u8 = to_u8(g)

    # --- PNG, every mode -------------------------------------------------------------------
    out.append(_good("gray8.png", save(Image.fromarray(u8, "L"), "PNG"), ref_u8(u8)))

    v16 = (1000 + np.round(g * 39000)).astype(np.uint16)  # 16-bit, range 1000..40000
    out.append(_good("gray16.png", save(Image.fromarray(v16), "PNG"), ref_minmax(v16)))
    const = np.full((H, W), 1234, np.uint16)
    out.append(_good("constant16.png", save(Image.fromarray(const), "PNG"), np.zeros((H, W))))

    rgb = rgb_scene(rng)
    out.append(_good("rgb.png", save(Image.fromarray(rgb, "RGB"), "PNG"), ref_u8(luminance(rgb))))

    alpha = to_u8(np.clip(1.2 - scene(rng), 0, 1))
    alpha[:4, :] = 0  # fully transparent rows must come out black
    rgba = np.dstack([rgb, alpha])
    out.append(
        _good(
            "rgba.png",
            save(Image.fromarray(rgba, "RGBA"), "PNG"),
            ref_composite(luminance(rgb), alpha),
        )
    )
    la = np.dstack([u8, alpha])
    out.append(_good("la.png", save(Image.fromarray(la, "LA"), "PNG"), ref_composite(u8, alpha)))

    palette = to_u8(rng.uniform(0, 1, (16, 3)))
    index = (g * 15.999).astype(np.uint8)
    pimg = Image.fromarray(index, "P")
    pimg.putpalette(palette.tobytes())
    palette_l = luminance(palette[None])[0]
    out.append(_good("palette.png", save(pimg, "PNG"), ref_u8(palette_l[index])))
    palpha = np.linspace(0, 255, 16).round().astype(np.uint8)
    out.append(
        _good(
            "palette_trns.png",
            save(pimg, "PNG", transparency=palpha.tobytes()),
            ref_composite(palette_l[index], palpha[index]),
        )
    )
    keyed = u8.copy()
    keyed[10:20, 5:25] = 77  # this exact grey is declared transparent (tRNS)
    out.append(
        _good(
            "gray8_trns.png",
            save(Image.fromarray(keyed, "L"), "PNG", transparency=77),
            ref_u8(np.where(keyed == 77, 0, keyed)),
        )
    )
    bilevel = g > 0.5
    out.append(_good("bilevel.png", save(Image.fromarray(bilevel), "PNG"), bilevel))
    out.append(
        _good(
            "one_pixel.png",
            save(Image.fromarray(np.full((1, 1), 200, np.uint8)), "PNG"),
            [[200 / 255]],
        )
    )
    # PNG with an eXIf chunk, orientation 8 (rotate 90 CCW to display).
    exif = Image.Exif()
    exif[0x0112] = 8
    out.append(
        _good(
            "exif_rot8.png",
            save(Image.fromarray(u8, "L"), "PNG", exif=exif.tobytes()),
            np.rot90(ref_u8(u8), k=1),
        )
    )

    # --- JPEG (lossy: reference = Pillow-decoded pixels, then the convention) ----------------
    jpg = save(Image.fromarray(u8, "L"), "JPEG", quality=90)
    out.append(_good("gray.jpg", jpg, ref_u8(np.asarray(Image.open(io.BytesIO(jpg))))))

    exif = Image.Exif()
    exif[0x0112] = 6  # stored 64x48, displayed 48x64 rotated 90 degrees clockwise
    jpg = save(Image.fromarray(u8, "L"), "JPEG", quality=90, exif=exif.tobytes())
    stored = np.asarray(Image.open(io.BytesIO(jpg)))
    out.append(_good("exif_rot6.jpg", jpg, np.rot90(ref_u8(stored), k=-1)))

    cmyk = np.dstack([255 - rgb, np.full((H, W), 30, np.uint8)])
    jpg = save(Image.fromarray(cmyk, "CMYK"), "JPEG", quality=92)
    decoded = Image.open(io.BytesIO(jpg))
    assert decoded.mode == "CMYK"
    out.append(_good("cmyk.jpg", jpg, ref_u8(np.asarray(decoded.convert("RGB").convert("L")))))

    # --- Other Pillow formats --------------------------------------------------------------
    out.append(_good("gray16.tif", save(Image.fromarray(v16), "TIFF"), ref_minmax(v16)))
    f32 = (g * 3000 - 500).astype(np.float32)
    f32[5, 5], f32[6, 6], f32[7, 7] = np.nan, np.inf, -np.inf  # NaN/-inf -> min, +inf -> max
    finite = np.where(np.isfinite(f32), f32, 0)
    lo, hi = finite[np.isfinite(f32)].min(), finite[np.isfinite(f32)].max()
    f_ref = ref_minmax(np.nan_to_num(f32.astype(np.float64), nan=lo, posinf=hi, neginf=lo))
    out.append(_good("float_nan.tif", save(Image.fromarray(f32, "F"), "TIFF"), f_ref))
    out.append(_good("rgb.bmp", save(Image.fromarray(rgb, "RGB"), "BMP"), ref_u8(luminance(rgb))))
    webp = save(Image.fromarray(rgb, "RGB"), "WEBP", lossless=True)
    out.append(_good("lossless.webp", webp, ref_u8(luminance(rgb))))

    # --- DICOM ---------------------------------------------------------------------------
    v12 = np.round(g * 4095).astype(np.uint16)  # 12 bits stored in 16
    mono1 = ref_minmax(v12)
    out.append(
        _good(
            "mono1.dcm",
            dicom_bytes(v12, photometric="MONOCHROME1", bits_stored=12),
            1 - mono1,
        )
    )
    center, width = 2000.0, 1500.0
    out.append(
        _good(
            "mono1_window.dcm",
            dicom_bytes(
                v12,
                photometric="MONOCHROME1",
                bits_stored=12,
                WindowCenter=center,
                WindowWidth=width,
            ),
            1 - ref_minmax(window_linear(v12.astype(np.float64), center, width)),
        )
    )
    slope, intercept = 2.0, -1024.0
    hu = v12.astype(np.float64) * slope + intercept  # -1024 .. 7166
    out.append(
        _good(
            "mono2_rescale.dcm",
            dicom_bytes(v12, bits_stored=12, RescaleSlope=slope, RescaleIntercept=intercept),
            ref_minmax(hu),
        )
    )
    # Window given in rescaled units: wrong if the rescale is skipped or applied after it.
    hc, hw = 1500.0, 3000.0
    out.append(
        _good(
            "mono2_rescale_window.dcm",
            dicom_bytes(
                v12,
                bits_stored=12,
                RescaleSlope=slope,
                RescaleIntercept=intercept,
                WindowCenter=hc,
                WindowWidth=hw,
            ),
            ref_minmax(window_linear(hu, hc, hw)),
        )
    )
    signed = np.round(g * 4000 - 1000).astype(np.int16)
    out.append(_good("signed16.dcm", dicom_bytes(signed), ref_minmax(signed)))
    out.append(_good("mono2_8bit.dcm", dicom_bytes(u8), ref_minmax(u8)))
    out.append(_good("rgb.dcm", dicom_bytes(rgb, photometric="RGB"), ref_u8(luminance(rgb))))
    out.append(_good("voilut.dcm", _voi_lut_dicom(v12), _voi_lut_reference(v12)))
    return out


_LUT_FIRST, _LUT_SIZE = 1000, 256


def _voi_lut_table() -> np.ndarray:
    return np.round(255 * (np.arange(_LUT_SIZE) / (_LUT_SIZE - 1)) ** 0.5).astype(np.uint16)


def _voi_lut_dicom(v12: np.ndarray) -> bytes:
    from pydicom.dataset import Dataset

    item = Dataset()
    item.add_new(0x00283002, "US", [_LUT_SIZE, _LUT_FIRST, 8])  # LUTDescriptor
    item.add_new(0x00283006, "US", _voi_lut_table().tolist())  # LUTData
    item.LUTExplanation = "SQRT"
    # A window too: the VOI LUT takes precedence over it.
    return dicom_bytes(
        v12, bits_stored=12, VOILUTSequence=[item], WindowCenter=3000.0, WindowWidth=10.0
    )


def _voi_lut_reference(v12: np.ndarray) -> np.ndarray:
    lut = _voi_lut_table()
    return ref_minmax(lut[np.clip(v12.astype(np.int64) - _LUT_FIRST, 0, _LUT_SIZE - 1)])


def bad_files(rng: np.random.Generator, base_png: bytes) -> list[OddFile]:
    out: list[OddFile] = []
    g = scene(rng)
    u8 = to_u8(g)
    png = base_png

    out.append(_bad("empty.png", b"", "empty"))
    noise = rng.bytes(4096)
    out.append(_bad("random.bin", b"\x01" + noise[1:], "not_an_image"))
    prose = (
        "Chest radiograph report. The lungs are clear. No pleural effusion or pneumothorax.\n"
        "Heart size is normal. Impression: no acute cardiopulmonary process.\n"
    ) * 20
    out.append(_bad("report.txt", prose.encode(), "not_an_image"))
    html = (
        "<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head>\n"
        "<body><h1>Not Found</h1><p>The requested URL was not found.</p></body></html>\n"
    )
    out.append(_bad("error_page.png", html.encode(), "not_an_image"))
    svg = '<svg xmlns="http://www.w3.org/2000/svg" width="64" height="48"><rect/></svg>'
    out.append(_bad("drawing.svg", svg.encode(), "not_an_image"))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr(zipfile.ZipInfo("xray.png", date_time=(2020, 3, 15, 0, 0, 0)), png)
    out.append(_bad("archive.zip", buf.getvalue(), "not_an_image"))
    pdf = b"%PDF-1.4\n1 0 obj << /Type /Catalog /Pages 2 0 R >> endobj\n" + rng.bytes(300)
    out.append(_bad("scan.pdf", pdf + b"\n%%EOF\n", "not_an_image"))
    out.append(_bad("gzip.png.gz", b"\x1f\x8b\x08\x00" + rng.bytes(200), "not_an_image"))

    # --- Truncated: the file ends before its structure does -----------------------------
    idat_pos, idat_len = first_chunk(png, b"IDAT")
    out.append(_bad("truncated.png", png[: idat_pos + 8 + idat_len // 2], "truncated"))
    out.append(_bad("truncated_header.png", png[:20], "truncated"))
    out.append(_bad("no_iend.png", png[:-12], "truncated"))
    jpg = save(Image.fromarray(u8, "L"), "JPEG", quality=90)
    out.append(_bad("truncated.jpg", jpg[: len(jpg) * 6 // 10], "truncated"))
    tif = save(Image.fromarray(u8, "L"), "TIFF")
    out.append(_bad("truncated.tif", tif[: len(tif) // 2], "truncated"))
    webp = save(Image.fromarray(u8, "L"), "WEBP", lossless=True)
    out.append(_bad("truncated.webp", webp[: len(webp) * 2 // 3], "truncated"))

    # --- Corrupt: recognised format, damaged content ------------------------------------
    bad_crc = bytearray(png)
    bad_crc[idat_pos + 8 + idat_len + 3] ^= 0x5A  # last byte of the IDAT CRC
    out.append(_bad("bad_idat_crc.png", bytes(bad_crc), "corrupt"))
    bad_ihdr = bytearray(png)
    bad_ihdr[8 + 8 + 13] ^= 0xFF  # first byte of the IHDR CRC
    out.append(_bad("bad_ihdr_crc.png", bytes(bad_ihdr), "corrupt"))
    # zlib stream whose first deflate block has the reserved type 3; chunk CRC kept valid.
    idat = bytearray(png[idat_pos + 8 : idat_pos + 8 + idat_len])
    idat[2] = 0xFF
    bad_zlib = png[:idat_pos] + png_chunk(b"IDAT", bytes(idat)) + png[idat_pos + 12 + idat_len :]
    out.append(_bad("bad_zlib.png", bad_zlib, "corrupt"))
    garbage = bytes(b if b != 0xFF else 0x00 for b in rng.bytes(2000))
    out.append(_bad("garbage_after_soi.jpg", b"\xff\xd8" + garbage, "corrupt"))
    gif_screen = b"GIF89a" + struct.pack("<HHBBB", W, H, 0, 0, 0)
    out.append(_bad("gif_no_image.gif", gif_screen + b";", "corrupt"))  # trailer, no frame

    # --- Too large: declared size checked before any pixel is decoded --------------------
    tiny = zlib.compress(b"\x00" * 64)
    out.append(_bad("huge_20000x20000.png", png_by_hand(20000, 20000, tiny), "too_large"))
    out.append(_bad("big_8000x8000.png", png_by_hand(8000, 8000, tiny), "too_large"))
    # Text after a GIF signature: the "screen size" reads as 25960 x 27756.
    out.append(_bad("gif_text_header.gif", b"GIF89a" + b"hello world, not a GIF", "too_large"))

    # --- Several frames -----------------------------------------------------------------
    frames = [Image.fromarray(np.roll(u8, 8 * k, axis=1), "L") for k in range(3)]
    out.append(
        _bad(
            "multipage.tif",
            save(frames[0], "TIFF", save_all=True, append_images=frames[1:]),
            "multiframe",
        )
    )
    out.append(
        _bad(
            "animated.gif",
            save(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100),
            "multiframe",
        )
    )

    # --- DICOM ---------------------------------------------------------------------------
    v12 = np.round(g * 4095).astype(np.uint16)
    stack = np.stack([v12, v12[::-1], v12[:, ::-1]])
    out.append(
        _bad(
            "multiframe.dcm",
            dicom_bytes(v12, bits_stored=12, frames=3, pixel_data=stack.tobytes()),
            "multiframe",
        )
    )
    out.append(_bad("no_pixels.dcm", dicom_bytes(None), "not_an_image"))
    whole = dicom_bytes(v12, bits_stored=12)
    out.append(_bad("truncated.dcm", whole[: len(whole) - v12.nbytes // 2], "truncated"))
    # Cut inside the header, 3 bytes into the value of the element holding PatientID.
    at = whole.index(DICOM_PATIENT_ID.encode()) + 3
    out.append(_bad("truncated_header.dcm", whole[:at], "truncated"))
    out.append(
        _bad("unknown_syntax.dcm", dicom_bytes(v12, transfer_syntax="1.2.3.4.5.6"), "unsupported")
    )
    out.append(
        _bad(
            "huge_10000x10000.dcm",
            dicom_bytes(v12, rows_cols=(10000, 10000)),
            "too_large",
        )
    )
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGLSLossless

    jls = dicom_bytes(
        v12,
        bits_stored=12,
        transfer_syntax=JPEGLSLossless,
        pixel_data=encapsulate([b"\xff\xd8\xff\xf7" + rng.bytes(500) + b"\xff\xd9"]),
    )
    # Without a JPEG-LS plugin it is UNSUPPORTED; with one, the junk frame is CORRUPT.
    out.append(
        _bad(
            "jpegls_no_decoder.dcm",
            jls,
            "corrupt" if _decoder_available(JPEGLSLossless) else "unsupported",
        )
    )
    out.append(_bad("dicm_then_garbage.dcm", b"\x00" * 128 + b"DICM" + b"\xff" * 300, "corrupt"))
    return out


def default_base_png(seed: int = 0) -> bytes:
    """The synthetic 8-bit grayscale PNG the corrupt variants are made from."""
    return save(Image.fromarray(to_u8(scene(np.random.default_rng(seed))), "L"), "PNG")


def make_odd_files(seed: int = 0, base_png: bytes | None = None) -> list[OddFile]:
    """Good and bad files; ``base_png`` (any valid PNG, e.g. a real X-ray) is what the damaged
    PNG variants (truncated, bad CRC, bad zlib, zipped, ...) are made from."""
    rng = np.random.default_rng(seed)
    base = base_png if base_png is not None else default_base_png(seed)
    files = good_files(rng) + bad_files(rng, base)
    names = [f.name for f in files]
    assert len(names) == len(set(names)), "odd file names must be unique"
    return files
