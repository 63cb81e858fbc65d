"""Synthetic chest X-ray phantoms with lesion masks (``covidray synth``).

The phantoms stand in for real radiographs when none are at hand: they let the whole pipeline
(ingest, training, serving, Grad-CAM) run end to end, and their lesion masks give the Grad-CAM
pointing game a ground truth.

Each image is an 8-bit PA/AP chest radiograph drawn from distance fields in normalised
coordinates (x to the image right, y down, both in [-1, 1]):

* body outline (soft tissue, brighter where the body is thicker), neck and shoulders;
* two lungs (dark, rounded trapezoids with a narrow apex, a convex lateral margin, costophrenic
  recesses and diaphragm domes below them; the patient's right dome sits higher);
* posterior and (fainter) anterior ribs as curved bands, clavicles, the spine with vertebral
  segmentation, the mediastinum with trachea and aortic knob;
* the heart: radiological convention, the patient faces the viewer, so the **patient's left is
  the image right**: the heart sits lower-middle, bulging into the image-right lung, and the
  gastric bubble lies under the image-right hemidiaphragm;
* faint vascular markings radiating from each hilum.

Anatomy varies per image (lung size and position, rotation of a few degrees, shift and scale,
rib spacing, heart size, brightness/contrast, noise). Lesions by kind:

* ``covid``: bilateral, peripheral, lower-zone ground-glass opacities (hazy blobs hugging the
  lateral margins of the lower half of both lungs);
* ``bacterial``: one lobar consolidation (dense, homogeneous, sharp at the fissure side, with
  air bronchograms) in a random lung and zone;
* ``viral``: a bilateral perihilar interstitial pattern (radial streaks and a reticular net);
* ``normal``: none.

The lesion mask is tight: pixels where the lesion's added opacity exceeds ``MASK_THRESHOLD`` of
its peak, restricted to the lung fields (for ``viral``, the perihilar envelope the streaks live
in). Images are deterministic for a given random generator state.

Output of :func:`write_phantoms` (the ``manifest.csv`` layout of the ingester)::

    DEST/manifest.csv
    DEST/images/<label>/<name>.png        8-bit grayscale
    DEST/masks/<label>/<name>_mask.png    8-bit, 0 or 255
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from . import storage
from .codec import encode_png
from .manifest import CSV_COLUMNS, CSV_NAME

KINDS: tuple[str, ...] = ("covid", "bacterial", "viral", "normal")
STYLES: tuple[str, ...] = ("a", "b")  # the default look, and another site's processing
SOURCE_REPO = "covidray/synth"
MASK_THRESHOLD = 0.2  # share of the lesion's peak opacity that counts as lesion
AP_SHARE = 0.2  # share of studies taken AP rather than PA (independent of the class)

# Progression series: every SERIES_EVERY-th patient of these subtypes gets several studies.
SERIES_EVERY = 5
SERIES_SUBTYPES = ("covid19", "bacterial")
# (study days, lesion extent per study): covid grows then shrinks; consolidations resolve.
_SERIES = {
    "covid19": (((0, 4, 9), (0.55, 1.0, 0.5)), ((0, 5), (0.6, 1.0))),
    "bacterial": (((0, 4, 9), (1.0, 0.75, 0.5)), ((0, 6), (1.0, 0.6))),
}

_KIND_OF_SUBTYPE = {
    "covid19": "covid",
    "bacterial": "bacterial",
    "viral": "viral",
    "normal": "normal",
}


# --- numerics -----------------------------------------------------------------------------------


def _gauss_taps(sigma_px: float) -> np.ndarray:
    r = max(1, int(math.ceil(3.0 * sigma_px)))
    w = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma_px) ** 2)
    return (w / w.sum()).astype(np.float32)


@lru_cache(maxsize=32)
def _gauss_transfer(shape: tuple[int, int], sigma_px: float) -> np.ndarray:
    """Fourier transfer function of a Gaussian blur for ``rfft2`` of ``shape``."""
    fy = np.fft.fftfreq(shape[0])[:, None]
    fx = np.fft.rfftfreq(shape[1])[None, :]
    g = np.exp(-2.0 * math.pi**2 * sigma_px**2 * (fx**2 + fy**2))
    g.setflags(write=False)
    return g


def _blur(img: np.ndarray, sigma_px: float, periodic: bool = False) -> np.ndarray:
    """Gaussian blur of a float image with reflected borders (or wrapped, ``periodic``).

    Small kernels are applied as separable shifted sums, large ones through the FFT.
    """
    img = img.astype(np.float32, copy=False)
    if sigma_px <= 0.05:
        return img.copy()
    sigma_px = round(float(sigma_px), 3)
    if periodic:
        g = _gauss_transfer(img.shape, sigma_px)
        return np.fft.irfft2(np.fft.rfft2(img) * g, s=img.shape).astype(np.float32)
    w = _gauss_taps(sigma_px)
    r = w.size // 2
    h, wd = img.shape
    p = np.pad(img, r, mode="reflect")
    if r <= 5:
        rows = w[0] * p[:, 0:wd]
        for i in range(1, w.size):
            rows += w[i] * p[:, i : i + wd]
        out = w[0] * rows[0:h]
        for i in range(1, w.size):
            out += w[i] * rows[i : i + h]
        return out
    g = _gauss_transfer(p.shape, sigma_px)
    out = np.fft.irfft2(np.fft.rfft2(p) * g, s=p.shape)
    return out[r : r + h, r : r + wd].astype(np.float32)


def _smooth_noise(rng: np.random.Generator, n: int, sigma_px: float) -> np.ndarray:
    """Gaussian noise blurred to ``sigma_px`` and rescaled to zero mean, unit deviation."""
    f = _blur(rng.standard_normal((n, n), dtype=np.float32), sigma_px, periodic=True)
    f -= f.mean()
    return f / (f.std() + 1e-6)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))


def _gauss(x: np.ndarray, y: np.ndarray, cx: float, cy: float, sx: float, sy: float) -> np.ndarray:
    return np.exp(-0.5 * (((x - cx) / sx) ** 2 + ((y - cy) / sy) ** 2))


def _rays(
    x: np.ndarray,
    y: np.ndarray,
    where: np.ndarray,
    hilum: tuple[float, float],
    angles: np.ndarray,
    weights: np.ndarray,
    decays: np.ndarray,
    width: float,
    meander: np.ndarray | None = None,
) -> np.ndarray:
    """Tapering line markings radiating from ``hilum`` along ``angles``, drawn where ``where``.

    Polar and vectorised: each pixel looks up the ray nearest to its (meandered) angle, so the
    cost does not grow with the number of rays. ``meander`` displaces pixels sideways (in
    normalised units) so the lines wiggle like vessels or septa.
    """
    out = np.zeros(x.shape, dtype=np.float32)
    dx, dy = x[where] - np.float32(hilum[0]), y[where] - np.float32(hilum[1])
    r = np.sqrt(dx * dx + dy * dy) + np.float32(1e-4)
    theta = np.arctan2(dy, dx)
    if meander is not None:
        theta += meander[where] / np.maximum(r, np.float32(0.08))
    two_pi = 2 * math.pi
    nb = 2048
    bins = (np.arange(nb) + 0.5) / nb * two_pi - math.pi
    diff = (bins[:, None] - angles[None, :] + math.pi) % two_pi - math.pi
    nearest = np.abs(diff).argmin(axis=1)
    k = nearest[((theta + math.pi) * (nb / two_pi)).astype(np.int64) % nb]
    dth = (theta - angles.astype(np.float32)[k] + np.float32(math.pi)) % np.float32(two_pi)
    dth -= np.float32(math.pi)
    perp = r * np.sin(dth)
    w = width * (0.45 + 0.55 * np.exp(-r / np.float32(0.25)))
    line = np.exp(-((perp / w) ** 2) - r / decays.astype(np.float32)[k])
    out[where] = line * weights.astype(np.float32)[k] * (np.abs(dth) < 1.2)
    return out


# --- anatomy ------------------------------------------------------------------------------------


@dataclass
class _Lung:
    side: int  # -1: image left (patient's right lung), +1: image right (patient's left lung)
    cx: float  # x of the lung's axis (medial edge at cx - side*hm, lateral at cx + side*hw)
    top: float  # y of the apex
    bottom: float  # y of the costophrenic angle
    hw: float  # lateral extent from the axis at the base
    hm: float  # medial extent from the axis
    hilum: tuple[float, float]
    u: np.ndarray  # lateral coordinate (positive towards the chest wall), relative to cx
    v: np.ndarray  # vertical coordinate, -1 at the apex, +1 at the costophrenic angle
    field: np.ndarray  # bool: this lung's field

    @property
    def hh(self) -> float:
        return 0.5 * (self.bottom - self.top)

    def lateral_edge(self, a: float | np.ndarray) -> float | np.ndarray:
        """Lateral extent from the axis at height ``a`` (0 apex, 1 base)."""
        a = np.clip(a, 0.0, 1.0)
        return self.hw * (0.7 + 0.3 * a) * np.sqrt(1.0 - (1.0 - a) ** 2.5)

    def point(self, a: float, u: float) -> tuple[float, float]:
        """Image coordinates of the point at height ``a`` and lateral offset ``u``."""
        return self.cx + self.side * u, self.top + a * (self.bottom - self.top)


@dataclass
class _Anatomy:
    x: np.ndarray  # patient coordinates of each pixel (after pose)
    y: np.ndarray
    image: np.ndarray  # float intensity before lesions, blur and noise
    lungs: np.ndarray  # bool lung fields
    lungs_soft: np.ndarray  # float, 0 outside and on the lung edge, ramps to 1 inside
    lung: tuple[_Lung, _Lung]
    px: float  # pixels per normalised unit


def _anatomy(arng: np.random.Generator, prng: np.random.Generator, n: int, view: str) -> _Anatomy:
    px = n / 2.0
    f32 = np.float32
    # Pose (positioning): rotation of a few degrees, shift, scale. Drawn from ``prng`` so that
    # follow-up studies of one patient keep the anatomy but not the positioning.
    rot = math.radians(prng.uniform(-4.0, 4.0))
    tx, ty = prng.uniform(-0.04, 0.04, size=2)
    sc = prng.uniform(0.95, 1.05)
    lin = (np.arange(n, dtype=f32) + 0.5) / n * 2.0 - 1.0
    gx, gy = np.meshgrid(lin, lin)
    cr, sr = f32(math.cos(rot) / sc), f32(math.sin(rot) / sc)
    gx, gy = gx - f32(tx), gy - f32(ty)
    x = gx * cr + gy * sr
    y = gy * cr - gx * sr
    ax = np.abs(x)

    # --- body: torso, shoulders sloping down from the neck
    bw = arng.uniform(0.84, 0.95)
    neck_w = arng.uniform(0.2, 0.26)
    shoulder = (
        -0.9 + arng.uniform(0.28, 0.38) * np.clip((ax - neck_w) / (1.0 - neck_w), 0, 1) ** 1.2
    )
    body = ((y > shoulder) & (ax < bw * (1.0 - 0.06 * np.clip(y - 0.4, 0, None)))) | (ax < neck_w)
    st = 100.0 + 55.0 * np.clip(1.0 - (x / (bw + 0.05)) ** 2, 0.0, 1.0) + 12.0 * (y < -0.55)
    img = np.where(body, st, f32(14.0)).astype(f32)

    # --- lungs: rounded trapezoids (narrow apex, convex lateral wall) above diaphragm domes
    lungs_list = []
    dome = np.zeros_like(x)
    for side in (-1, 1):
        cx = side * arng.uniform(0.29, 0.33)
        hw = arng.uniform(0.38, 0.44)
        hm = arng.uniform(0.16, 0.19)
        top = arng.uniform(-0.82, -0.74)
        bottom = arng.uniform(0.5, 0.6) + (0.05 if side == 1 else 0.0)  # right dome higher
        u = side * (x - cx)
        a = (y - top) / (bottom - top)
        ac = np.clip(a, 0.0, 1.0)
        round_ = np.sqrt(1.0 - (1.0 - ac) ** 2.5)
        lat = hw * (0.7 + 0.3 * ac) * round_
        med = hm * round_
        dh = arng.uniform(0.16, 0.24)
        dw = arng.uniform(0.42, 0.55) * (hw + hm)
        dome_s = bottom - dh * np.exp(-(((u - 0.1 * hw) / dw) ** 2))
        dome = np.where(side * x >= 0, dome_s, dome)
        field = (a > 0) & (u < lat) & (u > -med) & (y < dome_s) & (side * x > 0.02)
        hilum = (cx - side * 0.03, top + 0.48 * (bottom - top))
        lungs_list.append(
            _Lung(side, cx, top, bottom, hw, hm, hilum, u, (2 * a - 1).astype(f32), field)
        )

    # abdomen below the domes: as dense as the heart, fading into the lateral wall
    rib_edge = max(abs(lu.cx) + lu.hw for lu in lungs_list)
    abd = _sigmoid((y - dome) * px * 0.5) * _sigmoid((rib_edge + 0.03 - ax) * px * 0.15) * body
    abd_val = arng.uniform(165.0, 178.0)
    img = img + (abd_val - img) * abd

    # --- cardiomediastinal silhouette (patient's left = image right): upper mediastinum with
    # the aortic knob on the image right, the left ventricle bulging far into the image-right
    # lung and the right atrium a little into the image-left one, resting on the domes
    lv_w, ra_w = arng.uniform(0.34, 0.42), arng.uniform(0.17, 0.23)
    if view.upper() == "AP":  # AP projection magnifies the heart
        lv_w, ra_w = lv_w * 1.1, ra_w * 1.1
    hy = lungs_list[1].bottom - arng.uniform(0.18, 0.26)
    s_lv, s_ra = arng.uniform(0.17, 0.22), arng.uniform(0.14, 0.18)
    mw = arng.uniform(0.085, 0.1)
    knob = arng.uniform(0.05, 0.08) * np.exp(-(((y + 0.35) / 0.07) ** 2))
    lv = lv_w * np.exp(-0.5 * (np.minimum(y - hy, 0.0) / s_lv) ** 2)
    ra = ra_w * np.exp(-0.5 * ((y - hy + 0.02) / s_ra) ** 2)
    x_right = np.maximum(mw + knob, lv) + 0.01
    x_left = -np.maximum(mw + 0.012 * (y > -0.3), ra) + 0.01
    dense = (x < x_right) & (x > x_left)
    heart_val = arng.uniform(172.0, 186.0) + 6.0 * np.clip((y + 0.2) / 0.5, 0.0, 1.0) - 4.0
    img = np.where(dense, np.maximum(heart_val, img), img)

    lungs = np.zeros_like(body)
    for lung in lungs_list:
        lung.field &= ~dense
        lungs |= lung.field

    # --- lung parenchyma: dark, brighter towards hilum and base, with vascular markings
    lung_int = np.full_like(x, arng.uniform(42.0, 52.0))
    meander = 0.02 * _smooth_noise(arng, n, 6.0 * n / 256)
    for lung in lungs_list:
        glow = 30.0 * _gauss(x, y, *lung.hilum, 0.12, 0.18) + 12.0 * np.clip((lung.v + 1) / 2, 0, 1)
        k = 16
        angles = (0.0 if lung.side == 1 else math.pi) + arng.uniform(-1.5, 1.5, size=k)
        vessels = _rays(
            x,
            y,
            lung.field,
            lung.hilum,
            angles,
            arng.uniform(0.6, 1.0, k),
            arng.uniform(0.2, 0.45, k),
            0.016,
            meander,
        )
        lung_int = lung_int + np.where(lung.field, glow + 20.0 * vessels, 0.0)
    img = np.where(lungs, lung_int, img)

    # --- bones: spine, posterior and anterior ribs, clavicles
    spine_w = arng.uniform(0.06, 0.075)
    period = arng.uniform(0.12, 0.14)
    vert = 0.8 + 0.2 * np.cos(2 * math.pi * (y + arng.uniform(0, 1)) / period)
    img += 34.0 * _sigmoid((spine_w - ax) * px * 0.6) * vert * body

    sp = arng.uniform(0.135, 0.165)  # rib spacing
    y_first = arng.uniform(-0.92, -0.86)
    rib_amp = arng.uniform(34.0, 46.0)
    bend = arng.uniform(0.8, 1.0)
    # both sides at once: d is the distance from the midline, side parameters per pixel
    d = ax
    left_half = x < 0
    rib_w = np.where(left_half, *(abs(lu.cx) + lu.hw + 0.03 for lu in lungs_list))
    on_side = (d > 0.04) & (d < rib_w + 0.12)
    fade = _sigmoid((rib_w + 0.04 - d) * px * 0.2) * _sigmoid((d - 0.07) * px * 0.5)
    # posterior ribs: rise a little from the spine, then arch down laterally
    phase = (y - (-0.3 * d + bend * d * d) - y_first) * (1.0 / sp)
    k = np.round(phase)
    th = 0.05 + 0.025 * d
    t = (phase - k) * sp / (th / 2)
    t2 = t * t
    bones = np.sqrt(np.clip(1.0 - t2, 0.0, 1.0)) * (0.7 + 0.3 * t2) * ((k >= 0) & (k < 10))
    # anterior ribs: fainter, running down towards the midline from the lateral wall
    phase_a = (y + 0.5 * d - (y_first + 0.38)) * (1.0 / sp)
    k_a = np.round(phase_a)
    t_a = (phase_a - k_a) * (sp / 0.032)
    bones += 0.35 * np.clip(1.0 - t_a * t_a, 0.0, 1.0) * ((k_a >= 0) & (k_a < 6) & (d > 0.24))
    bones *= on_side * fade
    # clavicles: from the manubrium out and up towards the shoulders
    dc = d - 0.06
    clav_y = np.where(left_half, *arng.uniform(-0.77, -0.71, size=2))
    t_c = (y - (clav_y - 0.2 * dc + 0.1 * dc * dc)) * (1.0 / 0.034)
    bones += 1.4 * np.sqrt(np.clip(1.0 - t_c * t_c, 0.0, 1.0)) * ((dc > 0) & (d < 0.8))
    bones *= body * np.where(dense, 0.3, 1.0) * (1.0 - 0.7 * abd)
    img += rib_amp * bones

    # trachea (air column, darker) and gastric bubble under the image-right hemidiaphragm
    trachea = _sigmoid((0.036 - np.abs(x - 0.005)) * px * 0.6) * _sigmoid((-0.28 - y) * px * 0.3)
    img -= 45.0 * trachea * body
    left = lungs_list[1]
    gb_x, gb_y = left.cx + arng.uniform(0.0, 0.1), left.bottom + arng.uniform(0.02, 0.08)
    img -= arng.uniform(25.0, 50.0) * _gauss(x, y, gb_x, gb_y, 0.08, 0.045) * abd

    blur_l = _blur(lungs.astype(f32), 1.2 * n / 256)
    lungs_soft = np.clip(2.0 * blur_l - 1.0, 0.0, 1.0) * lungs
    return _Anatomy(x, y, img, lungs, lungs_soft, (lungs_list[0], lungs_list[1]), px)


# --- lesions ------------------------------------------------------------------------------------


def _covid(an: _Anatomy, rng: np.random.Generator, extent: float) -> tuple[np.ndarray, np.ndarray]:
    """Bilateral peripheral lower-zone ground-glass opacities."""
    x, y, n = an.x, an.y, an.x.shape[0]
    field = np.zeros_like(x)
    amp = rng.uniform(60.0, 78.0) * (0.6 + 0.4 * extent)
    for lung in an.lung:
        nblobs = int(rng.integers(2, 5))
        onsets = np.concatenate([[0.0], rng.uniform(0.3, 0.9, size=nblobs - 1)])
        for onset in onsets:
            a = rng.uniform(0.5, 0.92)  # lower half of the lung
            inset = rng.uniform(0.06, 0.12)  # hugging the lateral margin
            s = rng.uniform(0.065, 0.095) * (0.65 + 0.35 * extent)
            sy = s * rng.uniform(1.0, 1.5)
            weight = rng.uniform(0.75, 1.0)
            if onset > extent:
                continue
            bx, by = lung.point(a, float(lung.lateral_edge(a)) - inset)
            field = np.maximum(field, weight * _gauss(x, y, bx, by, s, sy))
    texture = 0.8 + 0.2 * _smooth_noise(rng, n, 2.5 * n / 256)
    opacity = amp * field * an.lungs_soft
    return opacity * texture, opacity


def _bacterial(
    an: _Anatomy, rng: np.random.Generator, extent: float
) -> tuple[np.ndarray, np.ndarray]:
    """A dense homogeneous lobar consolidation with air bronchograms."""
    x, y, n = an.x, an.y, an.x.shape[0]
    lung = an.lung[int(rng.integers(0, 2))]
    zone = rng.choice(["upper", "middle", "lower"], p=[0.3, 0.25, 0.45])
    u, v = lung.u / lung.hw, lung.v
    tilt = rng.uniform(0.15, 0.4)  # oblique fissure
    edge = an.px * lung.hh / 2.0  # sharp at the fissures (about 2 px)
    if zone == "upper":
        top, bottom, vc = -1.2, rng.uniform(-0.3, -0.1), rng.uniform(-0.6, -0.4)
    elif zone == "middle":
        top, bottom = rng.uniform(-0.35, -0.2), rng.uniform(0.2, 0.35)
        vc = rng.uniform(-0.1, 0.1)
    else:
        top, bottom, vc = rng.uniform(0.1, 0.3), 1.2, rng.uniform(0.45, 0.65)
    vv = v + tilt * u
    band = _sigmoid((vv - top) * edge) * _sigmoid((bottom - vv) * edge)
    # fill part of the lobe: a plateau around a centre inside the band
    uc = rng.uniform(0.1, 0.45)
    cxp, cyp = lung.point((vc - tilt * uc + 1) / 2, uc * lung.hw)
    s = rng.uniform(0.15, 0.2) * (0.55 + 0.45 * extent)
    plateau = np.clip(2.0 * _gauss(x, y, cxp, cyp, s, s * rng.uniform(0.8, 1.2)) - 0.2, 0.0, 1.0)
    field = band * plateau
    # air bronchograms: dark branching tubes from the hilum through the consolidation
    lx, ly = lung.hilum
    ang0 = math.atan2(cyp - ly, cxp - lx)
    k = 4
    angles = ang0 + rng.uniform(-0.5, 0.5, size=k)
    meander = 0.015 * _smooth_noise(rng, n, 5.0 * n / 256)
    bronchi = _rays(
        x, y, lung.field, lung.hilum, angles, np.ones(k), np.full(k, 1.5), 0.012, meander
    )
    amp = rng.uniform(100.0, 125.0) * (0.7 + 0.3 * extent)
    texture = 0.93 + 0.07 * _smooth_noise(rng, n, 3.0 * n / 256)
    opacity = amp * field * an.lungs_soft
    return opacity * texture * (1.0 - 0.45 * bronchi * field), opacity


def _viral(an: _Anatomy, rng: np.random.Generator, extent: float) -> tuple[np.ndarray, np.ndarray]:
    """A bilateral perihilar interstitial pattern: radial streaks and a reticular net."""
    x, y, n = an.x, an.y, an.x.shape[0]
    envelope = np.zeros_like(x)
    streaks = np.zeros_like(x)
    meander = 0.02 * _smooth_noise(rng, n, 4.0 * n / 256)
    for lung in an.lung:
        lx, ly = lung.hilum
        sx = rng.uniform(0.12, 0.15) * (0.7 + 0.3 * extent)
        sy = rng.uniform(0.17, 0.22) * (0.7 + 0.3 * extent)
        envelope = np.maximum(envelope, _gauss(x, y, lx + lung.side * 0.03, ly, sx, sy))
        k = 36
        angles = (0.0 if lung.side == 1 else math.pi) + rng.uniform(-1.7, 1.7, size=k)
        rays = _rays(
            x,
            y,
            lung.field,
            lung.hilum,
            angles,
            rng.uniform(0.6, 1.0, k),
            rng.uniform(0.3, 0.7, k),
            0.01,
            meander,
        )
        streaks = np.maximum(streaks, rays)
    # reticular net: zero crossings of band-passed noise
    bp = _smooth_noise(rng, n, 1.6 * n / 256) - 0.6 * _smooth_noise(rng, n, 4.0 * n / 256)
    net = np.exp(-((bp / 0.35) ** 2))
    amp = rng.uniform(55.0, 70.0) * (0.6 + 0.4 * extent)
    pattern = 0.3 + 0.5 * net + 0.6 * streaks
    region = envelope * an.lungs_soft
    return amp * region * pattern, region


_LESIONS = {"covid": _covid, "bacterial": _bacterial, "viral": _viral}


# --- rendering ----------------------------------------------------------------------------------


def _render(
    kind: str,
    seeds: tuple[int, int, int, int],
    size: int,
    extent: float = 1.0,
    view: str = "PA",
    style: str = "a",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Render from four seeds: (anatomy, pose, lesion, noise). Returns (image, mask, lungs).

    ``style`` "b" is another site's look (:data:`STYLES`): a brighter gamma and strong edge
    enhancement, as some vendors' processing gives; the anatomy and lesions are the same."""
    if style not in STYLES:
        raise ValueError(f"unknown phantom style {style!r}; expected one of {STYLES}")
    if kind not in KINDS:
        raise ValueError(f"unknown phantom kind {kind!r}; expected one of {KINDS}")
    if size < 32:
        raise ValueError(f"size must be at least 32, got {size}")
    arng, prng, lrng, nrng = (np.random.default_rng(s) for s in seeds)
    an = _anatomy(arng, prng, size, view)
    img = an.image
    mask = np.zeros((size, size), dtype=bool)
    if kind != "normal":
        added, extent_field = _LESIONS[kind](an, lrng, float(np.clip(extent, 0.05, 1.5)))
        img = img + added
        peak = float(extent_field.max())
        if peak > 0:
            mask = (extent_field > MASK_THRESHOLD * peak) & an.lungs
    img = _blur(img, 0.9 * size / 256)
    # exposure: brightness, contrast, gamma
    contrast = nrng.uniform(0.85, 1.15)
    bright = nrng.uniform(-12.0, 12.0)
    img = (img - 110.0) * contrast + 110.0 + bright
    img = 255.0 * (np.clip(img, 0.0, 255.0) / 255.0) ** nrng.uniform(0.9, 1.1)
    if style == "b":  # another site: brighter gamma, unsharp-mask edge enhancement
        img = 255.0 * (np.clip(img, 0.0, 255.0) / 255.0) ** 0.75
        img = img + 1.0 * (img - _blur(img, 3.0 * size / 256))
    # quantum (signal-dependent) noise plus fine film grain
    sigma = 1.5 + 0.3 * np.sqrt(np.clip(img, 0.0, None))
    img = img + sigma * nrng.standard_normal(img.shape, dtype=np.float32)
    img = img + 2.0 * _smooth_noise(nrng, size, 0.8 * size / 256)
    out = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    return out, mask, an.lungs.copy()


def _draw_seeds(rng: np.random.Generator) -> tuple[int, int, int, int]:
    s = rng.integers(0, 2**63 - 1, size=4)
    return int(s[0]), int(s[1]), int(s[2]), int(s[3])


def render_phantom(
    kind: str,
    rng: np.random.Generator,
    size: int = 256,
    *,
    extent: float = 1.0,
    view: str = "PA",
    return_lungs: bool = False,
):
    """Render one phantom of ``kind`` (covid, bacterial, viral or normal).

    Returns ``(image, mask)``: an 8-bit ``size×size`` image and a bool lesion mask (all False
    for ``normal``); with ``return_lungs=True`` also the bool lung-field mask. The anatomy,
    pose and noise come from sub-seeds drawn from ``rng`` independently of ``kind``, so two
    generators in the same state give the same patient and exposure for every kind: only the
    lesion differs. ``extent`` scales the lesion (used for progression series); ``view`` "AP"
    magnifies the heart.
    """
    image, mask, lungs = _render(kind, _draw_seeds(rng), size, extent=extent, view=view)
    return (image, mask, lungs) if return_lungs else (image, mask)


# --- dataset ------------------------------------------------------------------------------------


@dataclass
class _Study:
    label: str
    subtype: str
    name: str
    patient_id: str
    study_day: int | None
    extent: float
    seeds: tuple[int, int, int, int]
    view: str
    age: int
    sex: str


def _plan(n_per_class: int, seed: int) -> list[_Study]:
    rng = np.random.default_rng(seed)
    n_bact = (n_per_class + 1) // 2
    budgets = [
        ("covid", "covid19", n_per_class),
        ("pneumonia", "bacterial", n_bact),
        ("pneumonia", "viral", n_per_class - n_bact),
        ("normal", "normal", n_per_class),
    ]
    studies: list[_Study] = []
    next_patient = {"covid": 0, "pneumonia": 0, "normal": 0}
    for label, subtype, budget in budgets:
        left = budget
        k = 0  # patient index within this subtype
        while left > 0:
            p = next_patient[label]
            next_patient[label] += 1
            anat, _, lesion, _ = _draw_seeds(rng)
            age = int(rng.integers(25, 86))
            sex = "M" if rng.random() < 0.5 else "F"
            days: tuple[int | None, ...] = (None,)
            extents: tuple[float, ...] = (1.0,)
            if subtype in SERIES_SUBTYPES and k % SERIES_EVERY == 0 and left >= 2:
                option = _SERIES[subtype][(k // SERIES_EVERY) % 2]
                m = min(len(option[0]), left)
                days, extents = option[0][:m], option[1][:m]
            for day, extent in zip(days, extents, strict=True):
                _, pose, _, noise = _draw_seeds(rng)
                view = "AP" if rng.random() < AP_SHARE else "PA"
                name = f"phantom-{label}-{p:04d}" + ("" if day is None else f"-d{day:02d}")
                studies.append(
                    _Study(
                        label,
                        subtype,
                        name,
                        f"phantom:{label}-{p:04d}",
                        day,
                        extent,
                        (anat, pose, lesion, noise),
                        view,
                        age,
                        sex,
                    )
                )
            left -= len(days)
            k += 1
    return studies


def write_phantoms(
    dest: str,
    n_per_class: int,
    seed: int = 0,
    size: int = 256,
    progress: Callable[[int], None] | None = None,
    style: str = "a",
) -> str:
    """Write ``n_per_class`` phantoms per class (covid, pneumonia, normal) under ``dest``.

    ``dest`` is a local folder or an ``s3://`` prefix. Pneumonia is half bacterial, half viral
    (bacterial gets the odd one). Every ``SERIES_EVERY``-th covid and bacterial patient gets a
    progression series (2 or 3 studies on different ``study_day`` values, same patient). The
    manifest is written last, so a dataset with a manifest is complete. ``progress(k)`` is
    called after each image with the number of images written so far. ``style`` "b" renders
    another site's look (see :func:`_render`); its ``source`` is ``phantom-b``. Returns the URI
    of ``manifest.csv``.
    """
    if n_per_class < 1:
        raise ValueError(f"n_per_class must be at least 1, got {n_per_class}")
    studies = _plan(n_per_class, seed)
    storage.makedirs(dest)
    for label in sorted({s.label for s in studies}):
        storage.makedirs(storage.join(dest, "images", label))
        storage.makedirs(storage.join(dest, "masks", label))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for k, st in enumerate(studies, start=1):
        image, mask, _ = _render(
            _KIND_OF_SUBTYPE[st.subtype],
            st.seeds,
            size,
            extent=st.extent,
            view=st.view,
            style=style,
        )
        image_rel = f"images/{st.label}/{st.name}.png"
        mask_rel = f"masks/{st.label}/{st.name}_mask.png"
        storage.write_bytes(storage.join(dest, *image_rel.split("/")), encode_png(image))
        mask_png = encode_png(np.where(mask, 255, 0).astype(np.uint8))
        storage.write_bytes(storage.join(dest, *mask_rel.split("/")), mask_png)
        writer.writerow(
            {
                "image": image_rel,
                "label": st.label,
                "subtype": st.subtype,
                "patient_id": st.patient_id,
                "view": st.view,
                "age_group": "adult",
                "age": st.age,
                "sex": st.sex,
                "study_day": "" if st.study_day is None else st.study_day,
                "source_repo": SOURCE_REPO,
                "source": "phantom" if style == "a" else f"phantom-{style}",
                "mask": mask_rel,
            }
        )
        if progress is not None:
            progress(k)
    manifest = storage.join(dest, CSV_NAME)
    storage.write_text(manifest, buf.getvalue())
    return manifest


def assign_sources(dest: str, sources: Sequence[str]) -> dict[str, str]:
    """Spread the phantoms of ``dest`` (written by :func:`write_phantoms`) over ``sources``,
    patient by patient in turn (sorted ids), rewriting its manifest.csv: phantom data for
    source-held-out splits (``--split-test-sources``). Returns patient id → source."""
    uri = storage.join(dest, CSV_NAME)
    rows = list(csv.DictReader(io.StringIO(storage.read_text(uri))))
    patients = sorted({r["patient_id"] for r in rows})
    site = {p: sources[i % len(sources)] for i, p in enumerate(patients)}
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows({**r, "source": site[r["patient_id"]]} for r in rows)
    storage.write_text(uri, buf.getvalue())
    return site
