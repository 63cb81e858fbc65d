"""covidray.decode against the odd-file corpus (tests/oddfiles.py) and hand-made DICOMs."""

from __future__ import annotations

import io
import pickle
import sys
import time
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

sys.path.insert(0, str(Path(__file__).resolve().parent))

from oddfiles import (  # noqa: E402
    DICOM_PATIENT_ID,
    DICOM_PATIENT_NAME,
    DICOM_TAGS,
    OddFile,
    dicom_bytes,
    make_odd_files,
    png_by_hand,
    save,
)

from covidray.decode import (  # noqa: E402
    DEFAULT_MAX_PIXELS,
    DecodeError,
    DecodeReason,
    decode_array,
    decode_image,
    is_dicom,
)
from covidray.dicom_meta import dicom_tags  # noqa: E402

SEEDS = (0, 1)
CORPUS = {seed: make_odd_files(seed) for seed in SEEDS}
GOOD = [pytest.param(f, id=f"s{s}-{f.name}") for s in SEEDS for f in CORPUS[s] if f.good]
BAD = [pytest.param(f, id=f"s{s}-{f.name}") for s in SEEDS for f in CORPUS[s] if not f.good]
SHARED_CXR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cxr" / "images"


def _tolerance(f: OddFile) -> float:
    # JPEG references are Pillow-decoded pixels, so exact too; allow one grey level anyway.
    return 1 / 255 + 1e-6 if f.name.endswith(".jpg") else 1e-6


def _gradient_dicom(values: np.ndarray, **kw: object) -> bytes:
    return dicom_bytes(values, bits_stored=12, **kw)


# --------------------------------------------------------------------------------------------
# The corpus itself
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
def test_corpus_shape(seed: int) -> None:
    files = CORPUS[seed]
    assert len(files) >= 24
    assert sum(not f.good for f in files) >= 20
    assert len({f.name for f in files}) == len(files)
    reasons = {r.value for r in DecodeReason}
    for f in files:
        assert isinstance(f.data, bytes) and "." in f.name
        if f.good:
            assert f.reason is None and f.reference is not None
            assert f.reference.dtype == np.float32 and f.reference.ndim == 2
            assert 0.0 <= f.reference.min() and f.reference.max() <= 1.0
        else:
            assert f.reason in reasons and f.reference is None
    expected_bad = {
        "empty.png", "random.bin", "report.txt", "error_page.png", "archive.zip",
        "truncated.png", "truncated.jpg", "huge_20000x20000.png", "bad_idat_crc.png",
        "bad_zlib.png", "garbage_after_soi.jpg", "multiframe.dcm", "no_pixels.dcm", "scan.pdf",
    }  # fmt: skip
    assert expected_bad <= {f.name for f in files if not f.good}


def test_corpus_is_deterministic() -> None:
    again = make_odd_files(0)
    assert [(f.name, f.data) for f in again] == [(f.name, f.data) for f in CORPUS[0]]


def test_reference_luminance_is_itu_601() -> None:
    """The corpus's luminance (Pillow) is the documented formula, to within rounding."""
    from oddfiles import luminance

    rgb = np.random.default_rng(3).integers(0, 256, (50, 40, 3), dtype=np.uint8)
    r, g, b = (rgb[..., i].astype(np.float64) for i in range(3))
    formula = r * 299 / 1000 + g * 587 / 1000 + b * 114 / 1000
    assert np.abs(luminance(rgb) - formula).max() <= 1.0


# --------------------------------------------------------------------------------------------
# Good files decode to their references
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("f", GOOD)
def test_good_file_decodes_to_reference(f: OddFile) -> None:
    out = decode_array(f.data)
    assert isinstance(out, np.ndarray)
    assert out.dtype == np.float32
    assert out.shape == f.reference.shape
    assert out.flags.c_contiguous and out.flags.writeable
    assert not np.isnan(out).any()
    assert out.min() >= 0.0 and out.max() <= 1.0
    np.testing.assert_allclose(out, f.reference, rtol=0, atol=_tolerance(f))


@pytest.mark.parametrize("f", GOOD)
def test_good_file_as_tensor(f: OddFile) -> None:
    t = decode_image(f.data)
    assert isinstance(t, torch.Tensor)
    assert t.dtype == torch.float32
    assert tuple(t.shape) == (1, *f.reference.shape)
    assert t.is_contiguous()
    np.testing.assert_allclose(t[0].numpy(), f.reference, rtol=0, atol=_tolerance(f))


def test_bytes_like_inputs() -> None:
    f = next(f for f in CORPUS[0] if f.name == "gray8.png")
    d = next(f for f in CORPUS[0] if f.name == "mono1.dcm")
    for g in (f, d):
        for data in (bytearray(g.data), memoryview(g.data)):
            np.testing.assert_array_equal(decode_array(data), g.reference)


def test_non_bytes_is_a_type_error() -> None:
    with pytest.raises(TypeError):
        decode_array("gray8.png")  # type: ignore[arg-type]


def test_orientation_is_applied() -> None:
    files = {f.name: f for f in CORPUS[0]}
    for name in ("exif_rot6.jpg", "exif_rot8.png"):
        out = decode_array(files[name].data)
        assert out.shape == (64, 48)  # stored 64 wide x 48 high, displayed rotated


# --------------------------------------------------------------------------------------------
# Bad files raise DecodeError with the expected reason
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("f", BAD)
def test_bad_file_raises_expected_reason(f: OddFile) -> None:
    with pytest.raises(DecodeError) as info:
        decode_array(f.data)
    err = info.value
    assert isinstance(err, ValueError)
    assert err.reason == DecodeReason(f.reason)
    assert str(err) == f"{f.reason}: {err.detail}"
    assert err.detail and len(err.detail) < 300 and "\n" not in err.detail
    assert "Traceback" not in err.detail and "object at 0x" not in err.detail
    assert DICOM_PATIENT_ID not in str(err) and "Doe" not in str(err)
    with pytest.raises(DecodeError) as info2:
        decode_image(f.data)
    assert info2.value.reason == err.reason


@pytest.mark.parametrize("f", BAD)
def test_bad_file_is_silent(f: OddFile, capfd: pytest.CaptureFixture[str]) -> None:
    """No warning and no output escapes, whatever the input."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(DecodeError):
            decode_array(f.data)
    assert [str(w.message) for w in caught] == []
    out, err = capfd.readouterr()
    assert out == "" and err == ""


def _make_corpus_from(base: bytes) -> dict[str, OddFile]:
    return {f.name: f for f in make_odd_files(0, base_png=base) if not f.good}


def _real_xray() -> bytes | None:
    found = sorted(SHARED_CXR.glob("*/*.png"))[:1] if SHARED_CXR.is_dir() else []
    return found[0].read_bytes() if found else None


@pytest.mark.parametrize("kind", ["rgb_200x150", "real_xray"])
def test_damaged_variants_of_another_base_png(kind: str) -> None:
    if kind == "real_xray":
        base = _real_xray()
        if base is None:
            pytest.skip("no real X-ray next to the project")
    else:
        rgb = np.random.default_rng(5).integers(0, 256, (150, 200, 3), dtype=np.uint8)
        base = save(Image.fromarray(rgb, "RGB"), "PNG")
    decode_array(base)  # the base itself is fine
    bad = _make_corpus_from(base)
    for name in ("truncated.png", "no_iend.png", "bad_idat_crc.png", "bad_zlib.png"):
        with pytest.raises(DecodeError) as info:
            decode_array(bad[name].data)
        assert info.value.reason == bad[name].reason, name


def test_load_truncated_images_flag_is_respected_not_changed() -> None:
    truncated = next(f for f in CORPUS[0] if f.name == "truncated.jpg")
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    max_pixels = Image.MAX_IMAGE_PIXELS
    with pytest.raises(DecodeError):
        decode_array(truncated.data)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    assert Image.MAX_IMAGE_PIXELS == max_pixels


def test_load_truncated_images_set_elsewhere_fails_loudly(monkeypatch: pytest.MonkeyPatch) -> None:
    """Another library flipping the global must neither give half-grey images nor make every
    file look bad: it is a process misconfiguration, so RuntimeError (not DecodeError)."""
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    for name in ("truncated.jpg", "gray8.png"):
        data = next(f for f in CORPUS[0] if f.name == name).data
        with pytest.raises(RuntimeError, match="LOAD_TRUNCATED_IMAGES"):
            decode_array(data)


# --------------------------------------------------------------------------------------------
# Size limits
# --------------------------------------------------------------------------------------------


def test_max_pixels_is_configurable() -> None:
    img = save(Image.fromarray(np.full((100, 100), 7, np.uint8)), "PNG")
    with pytest.raises(DecodeError) as info:
        decode_array(img, max_pixels=5000)
    assert info.value.reason == DecodeReason.TOO_LARGE
    with pytest.raises(DecodeError):
        decode_image(img, max_pixels=9999)
    assert decode_array(img, max_pixels=10_000).shape == (100, 100)
    assert DEFAULT_MAX_PIXELS == 50_000_000


def test_max_pixels_dicom() -> None:
    dcm = _gradient_dicom(np.zeros((48, 64), np.uint16))
    with pytest.raises(DecodeError) as info:
        decode_array(dcm, max_pixels=48 * 64 - 1)
    assert info.value.reason == DecodeReason.TOO_LARGE
    assert decode_array(dcm, max_pixels=48 * 64).shape == (48, 64)


def test_too_large_never_decodes_pixels(monkeypatch: pytest.MonkeyPatch) -> None:
    """Declared size is refused from the header: no pixel decoding, no big allocation."""
    import pydicom.dataset

    def no_pixels(*args: object, **kwargs: object) -> None:
        raise AssertionError("pixels decoded for an oversized image")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_pixels)
    monkeypatch.setattr(pydicom.dataset.Dataset, "pixel_array", property(no_pixels))
    files = {f.name: f for f in CORPUS[0]}
    for name in ("huge_20000x20000.png", "big_8000x8000.png", "huge_10000x10000.dcm"):
        start = time.perf_counter()
        with pytest.raises(DecodeError) as info:
            decode_array(files[name].data)
        assert info.value.reason == DecodeReason.TOO_LARGE, name
        assert time.perf_counter() - start < 1.0


def test_pillow_bomb_warning_and_error_do_not_escape() -> None:
    """10000^2 is above Pillow's MAX_IMAGE_PIXELS (it warns), 20000^2 above twice that (it
    raises). Neither the warning nor Pillow's exception may escape; both are TOO_LARGE. Pillow's
    own cap also applies when max_pixels is raised above it (documented)."""
    tiny = zlib.compress(b"\x00" * 16)
    cases = [(10_000, DEFAULT_MAX_PIXELS), (20_000, DEFAULT_MAX_PIXELS), (20_000, 10**9)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for side, limit in cases:
            with pytest.raises(DecodeError) as info:
                decode_array(png_by_hand(side, side, tiny), max_pixels=limit)
            assert info.value.reason == DecodeReason.TOO_LARGE, (side, limit)
    assert caught == []


# --------------------------------------------------------------------------------------------
# DICOM specifics
# --------------------------------------------------------------------------------------------


def _ramp12() -> np.ndarray:
    """48 x 64 uint16 ramp covering 0..4095 exactly once at each end."""
    return np.linspace(0, 4095, 48 * 64).round().astype(np.uint16).reshape(48, 64)


def test_monochrome1_maximum_is_black() -> None:
    v = _ramp12()
    v[10, 20] = 4095
    v[0, 0] = 0
    mono1 = decode_array(_gradient_dicom(v, photometric="MONOCHROME1"))
    mono2 = decode_array(_gradient_dicom(v, photometric="MONOCHROME2"))
    assert mono1[10, 20] == pytest.approx(0.0, abs=1e-6)  # max stored value -> black
    assert mono1[0, 0] == pytest.approx(1.0, abs=1e-6)  # min stored value -> white
    assert mono2[10, 20] == pytest.approx(1.0, abs=1e-6)
    np.testing.assert_allclose(mono1, 1.0 - mono2, atol=1e-6)
    # Left to right the stored values grow, so MONOCHROME1 gets darker.
    assert mono1[:, 0].mean() > mono1[:, -1].mean()


def test_window_saturates_outside_and_is_linear_inside() -> None:
    v = _ramp12()
    center, width = 2000.0, 1001.0  # window [1500, 2500]
    out = decode_array(_gradient_dicom(v, WindowCenter=center, WindowWidth=width))
    low, high = v < 1400, v > 2600
    assert low.any() and high.any()
    assert np.all(out[low] == 0.0)
    assert np.all(out[high] == 1.0)
    inside = (v > 1600) & (v < 2400)
    expected = (v[inside] - (center - 0.5)) / (width - 1) + 0.5
    np.testing.assert_allclose(out[inside], expected, atol=1e-6)
    # Without the window the same pixels are a plain min-max ramp.
    plain = decode_array(_gradient_dicom(v))
    np.testing.assert_allclose(plain, v / 4095.0, atol=1e-6)


def test_window_on_monochrome1_inverts_after_windowing() -> None:
    v = _ramp12()
    out = decode_array(
        _gradient_dicom(v, photometric="MONOCHROME1", WindowCenter=2000.0, WindowWidth=1001.0)
    )
    assert np.all(out[v > 2600] == 0.0) and np.all(out[v < 1400] == 1.0)


def test_invalid_window_is_ignored() -> None:
    v = _ramp12()
    out = decode_array(_gradient_dicom(v, WindowCenter=2000.0, WindowWidth=0.0))
    np.testing.assert_allclose(out, v / 4095.0, atol=1e-6)


def test_rescale_applies_before_window() -> None:
    v = _ramp12()
    # Window in rescaled units [0, 1000] = stored [512, 1012] with slope 2, intercept -1024.
    out = decode_array(
        _gradient_dicom(
            v, RescaleSlope=2.0, RescaleIntercept=-1024.0, WindowCenter=500.5, WindowWidth=1001.0
        )
    )
    assert np.all(out[v < 500] == 0.0) and np.all(out[v > 1030] == 1.0)
    mid = (v > 600) & (v < 900)
    np.testing.assert_allclose(out[mid], (2.0 * v[mid] - 1024.0) / 1000.0, atol=1e-6)


def test_fast_mono_path_matches_pydicom_pipeline() -> None:
    """The float32 shortcut for rescale + LINEAR window gives pydicom's pipeline result."""
    import pydicom

    from covidray.decode import _mono_fast, _mono_pydicom

    rng = np.random.default_rng(7)
    covered = 0
    for trial in range(120):
        dtype = [np.uint16, np.int16, np.uint8][trial % 3]
        info = np.iinfo(dtype)
        bits = 8 if dtype == np.uint8 else int(rng.choice([12, 16]))
        lo = 0 if info.min == 0 else -(2 ** (bits - 1))
        hi = 2**bits - 1 if info.min == 0 else 2 ** (bits - 1) - 1
        v = rng.integers(lo, hi + 1, (24, 32)).astype(dtype)
        kw: dict[str, object] = {}
        slope, intercept = 1.0, 0.0
        if trial % 4:
            slope = float(rng.choice([1.0, 0.5, 2.5, 0.01]))
            intercept = float(rng.choice([0.0, -1024.0, 3.7]))
            kw.update(RescaleSlope=slope, RescaleIntercept=intercept)
        if trial % 5:
            center = float(rng.uniform(lo, hi)) * slope + intercept
            width = float(rng.choice([0.5, 1.0, 2.0, 37.0, rng.uniform(1, (hi - lo) * slope)]))
            kw.update(WindowCenter=round(center, 3), WindowWidth=round(width, 3))
            if trial % 7 == 0:
                kw.update(VOILUTFunction="LINEAR")
        ds = pydicom.dcmread(io.BytesIO(dicom_bytes(v, bits_stored=bits, **kw)))
        arr = ds.pixel_array
        fast = _mono_fast(arr, ds, "MONOCHROME2")
        assert fast is not None, kw
        covered += 1
        assert fast.dtype == np.float32
        np.testing.assert_allclose(fast, _mono_pydicom(arr, ds), atol=2e-6, err_msg=str(kw))
    assert covered == 120


def test_dicom_tags() -> None:
    broken_header = {"dicm_then_garbage.dcm": "corrupt", "truncated_header.dcm": "truncated"}
    for f in CORPUS[0]:
        if not f.name.endswith(".dcm"):
            continue
        if f.name in broken_header:
            with pytest.raises(DecodeError) as info:
                dicom_tags(f.data)
            assert info.value.reason == broken_header[f.name]
        else:  # header-only read: fine for files whose pixel data is cut, huge or missing
            assert dicom_tags(f.data) == DICOM_TAGS, f.name


def test_dicom_tags_do_not_decode_pixels(monkeypatch: pytest.MonkeyPatch) -> None:
    import pydicom.dataset

    def no_pixels(*args: object) -> None:
        raise AssertionError("dicom_tags touched pixel data")

    monkeypatch.setattr(pydicom.dataset.Dataset, "pixel_array", property(no_pixels))
    huge = next(f for f in CORPUS[0] if f.name == "huge_10000x10000.dcm")
    assert dicom_tags(huge.data)["patient_id"] == DICOM_PATIENT_ID


@pytest.mark.parametrize(
    ("age", "years"),
    [
        ("045Y", 45.0),
        ("006M", 0.5),
        ("003W", 21 / 365.25),
        ("010D", 10 / 365.25),
        ("045", 45.0),
        ("", None),
        ("abcY", None),
    ],
)
def test_dicom_age_parsing(age: str, years: float | None) -> None:
    tags = dicom_tags(_gradient_dicom(_ramp12(), PatientAge=age))
    if years is None:
        assert tags["age"] is None
    else:
        assert tags["age"] == pytest.approx(years)


def test_dicom_tags_missing_and_invalid_fields() -> None:
    data = _gradient_dicom(
        _ramp12(),
        ViewPosition="",
        PatientSex="",
        StudyDate="20201350",
        PatientID="",
        BodyPartExamined="",
    )
    tags = dicom_tags(data)
    assert tags == {
        "patient_id": None,
        "view": None,
        "sex": None,
        "age": 45.0,
        "study_date": None,
        "modality": "DX",
        "body_part": None,
    }
    legacy = dicom_tags(_gradient_dicom(_ramp12(), StudyDate="1999.12.31", ViewPosition="AP"))
    assert legacy["study_date"] == "1999-12-31" and legacy["view"] == "AP"


def test_dicom_tags_refuses_non_dicom() -> None:
    png = next(f for f in CORPUS[0] if f.name == "gray8.png")
    with pytest.raises(DecodeError) as info:
        dicom_tags(png.data)
    assert info.value.reason == DecodeReason.NOT_AN_IMAGE
    with pytest.raises(DecodeError) as info:
        dicom_tags(b"")
    assert info.value.reason == DecodeReason.EMPTY


def test_is_dicom() -> None:
    kinds = {f.name: is_dicom(f.data) for f in CORPUS[0]}
    assert all(v for k, v in kinds.items() if k.endswith(".dcm"))
    assert not any(v for k, v in kinds.items() if not k.endswith(".dcm"))
    assert not is_dicom(b"DICM") and not is_dicom(b"")


def test_patient_data_never_in_errors() -> None:
    for f in CORPUS[0]:
        if f.name.endswith(".dcm") and not f.good:
            with pytest.raises(DecodeError) as info:
                decode_array(f.data)
            text = str(info.value) + repr(info.value)
            assert DICOM_PATIENT_ID not in text and DICOM_PATIENT_NAME not in text


# --------------------------------------------------------------------------------------------
# The error type
# --------------------------------------------------------------------------------------------


def test_decode_error_type() -> None:
    assert DecodeReason.EMPTY == "empty" and isinstance(DecodeReason.TRUNCATED, str)
    err = DecodeError(DecodeReason.TRUNCATED, "PNG IDAT chunk is cut short")
    assert isinstance(err, ValueError)
    assert str(err) == "truncated: PNG IDAT chunk is cut short"
    back = pickle.loads(pickle.dumps(err))
    assert (back.reason, back.detail, str(back)) == (err.reason, err.detail, str(err))
    assert DecodeError("empty", "x").reason is DecodeReason.EMPTY
    with pytest.raises(DecodeError) as info:
        decode_array(b"")
    assert info.value.reason == DecodeReason.EMPTY


def test_threads_decode_consistently() -> None:
    good = [f for f in CORPUS[0] if f.good]
    bad = [f for f in CORPUS[0] if not f.good]

    def one(f: OddFile) -> str | np.ndarray:
        try:
            return decode_array(f.data)
        except DecodeError as e:
            return e.reason.value

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, (good + bad) * 4))
    for f, r in zip((good + bad) * 4, results, strict=True):
        if f.good:
            np.testing.assert_allclose(r, f.reference, atol=_tolerance(f))
        else:
            assert r == f.reason, f.name


def test_16bit_png_uses_its_own_range() -> None:
    v = np.array([[1000, 2000], [30000, 40000]], np.uint16)
    out = decode_array(save(Image.fromarray(v), "PNG"))
    np.testing.assert_allclose(out, (v - 1000.0) / 39000.0, atol=1e-7)


def test_pydicom_log_records_are_dropped_while_decoding(caplog: pytest.LogCaptureFixture) -> None:
    """pydicom logs odd values, sometimes quoting them; none of that may reach the logs."""
    long_id = "PAT-12345-" + "9" * 60  # longer than LO allows: pydicom complains on reading
    data = _gradient_dicom(_ramp12(), PatientID=long_id)
    caplog.clear()
    with caplog.at_level("DEBUG", logger="pydicom"):
        assert dicom_tags(data)["patient_id"] == long_id
        decode_array(data)
        for f in CORPUS[0]:
            if f.name.endswith(".dcm"):
                try:
                    decode_array(f.data)
                except DecodeError:
                    pass
    assert [r for r in caplog.records if r.name.startswith("pydicom")] == []
    # Outside our calls pydicom's own logging is untouched.
    import pydicom.config

    with caplog.at_level("WARNING", logger="pydicom"):
        pydicom.config.logger.warning("outside decode")
    assert any(r.getMessage() == "outside decode" for r in caplog.records)


# --------------------------------------------------------------------------------------------
# Robustness: every cut point, random byte damage
# --------------------------------------------------------------------------------------------

_SWEPT = ("gray8.png", "gray16.png", "gray.jpg", "exif_rot6.jpg", "gray16.tif", "lossless.webp")


@pytest.mark.parametrize("name", _SWEPT)
def test_every_prefix_of_an_image_is_truncated(name: str) -> None:
    """Cut anywhere after its signature, a file is TRUNCATED: never decoded, never CORRUPT."""
    data = next(f for f in CORPUS[0] if f.name == name).data
    signature = 8 if name.endswith(".png") else 12 if name.endswith(".webp") else 4
    for cut in range(signature, len(data)):
        with pytest.raises(DecodeError) as info:
            decode_array(data[:cut])
        assert info.value.reason == DecodeReason.TRUNCATED, (name, cut, str(info.value))


@pytest.mark.parametrize("name", ["mono1.dcm", "rgb.dcm", "voilut.dcm"])
def test_every_prefix_of_a_dicom_fails_cleanly(name: str) -> None:
    """Cut inside an element: TRUNCATED. Cut exactly between two header elements the rest is a
    valid header-only dataset, reported as NOT_AN_IMAGE (the detail says it may be cut)."""
    data = next(f for f in CORPUS[0] if f.name == name).data
    for cut in range(132, len(data)):
        with pytest.raises(DecodeError) as info:
            decode_array(data[:cut])
        err = info.value
        assert err.reason in (DecodeReason.TRUNCATED, DecodeReason.NOT_AN_IMAGE), (cut, str(err))
        if err.reason == DecodeReason.NOT_AN_IMAGE:
            assert "cut" in err.detail


def test_random_damage_never_escapes() -> None:
    """Byte flips: either a valid decode or a DecodeError, nothing else. DICOM flips go into
    the header (the first 900 bytes), where pydicom is most fragile; dicom_tags too."""
    rng = np.random.default_rng(1234)
    for f in (f for f in CORPUS[0] if f.good):
        dicom = f.name.endswith(".dcm")
        lo, hi = (128, min(len(f.data), 900)) if dicom else (0, len(f.data))
        for _ in range(60 if dicom else 30):
            damaged = bytearray(f.data)
            for _ in range(int(rng.integers(1, 6))):
                damaged[int(rng.integers(lo, hi))] = int(rng.integers(0, 256))
            if dicom:
                try:
                    dicom_tags(bytes(damaged))
                except DecodeError:
                    pass
            try:
                out = decode_array(bytes(damaged))
            except DecodeError as e:
                assert e.detail and "\n" not in e.detail and DICOM_PATIENT_ID not in e.detail
                continue
            assert out.dtype == np.float32 and out.ndim == 2 and out.flags.c_contiguous
            assert not np.isnan(out).any() and out.min() >= 0.0 and out.max() <= 1.0
