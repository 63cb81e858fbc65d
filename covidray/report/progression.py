"""The disease-progression report (``covidray report``): one self-contained HTML file.

For every patient with two or more studies (distinct ``study_day``, or ``study_date`` where no
day is known) the report shows a timeline of the COVID probability and the affected area of
the COVID-class map on the model's fixed scale (``cam_covid_area``, comparable between
studies; :mod:`covidray.explain.fixed`), and thumbnails of the heatmap overlays (the image with
its per-image ``cam_png`` map) next to that fixed-scale map. A cohort section gives the class
counts, the distribution of the probabilities and the
flagged studies: maps whose mass sits in the image border ("likely shortcut": markers, text,
collimation edges; DeGrave et al. 2021) and images that could not be scored. A drift section
shows, run by run (the nightly job's records, ``OUT/runs/``), the share refused by each reason
and the predicted class mix next to the validation split's (:mod:`covidray.drift`).

Everything is embedded: figures are matplotlib (Agg) PNGs and thumbnails PNGs, both as
``data:`` URIs; no script, style sheet or image is fetched from anywhere. Patients appear only
under the pseudonymous ``patient_id`` of the manifest; image paths are never printed (raw file
names can carry names), images are referred to by the first digits of their ``image_id``.
"""

from __future__ import annotations

import base64
import html
import io
import math
import re
from collections import Counter
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict

from .. import storage
from ..config import DecodeConfig
from ..datapaths import OutsideDataset, resolve_inside
from ..drift import LABEL
from ..labels import CLASSES
from ..score.results import read_predictions, read_run_records
from .config import ReportConfig

LOCALISATION_CAVEAT = (
    "The localisation of the shipped backbone has not been validated against lesion masks on "
    "real films: its maps were checked only on synthetic phantoms (the pointing game). Read "
    "the maps and their areas as where the model looked, not as the extent of disease."
)
FIXED_SCALE_NOTE = (
    "COVID-19 map (model scale): the COVID-19 class's Grad-CAM divided by a constant of the "
    "model (the 99th percentile of its values on the validation split) and clipped to [0, 1]; "
    "its area (share at or above 0.5) is what the timelines plot, comparable between studies "
    "and independent of the predicted label. The overlays show the map of the predicted class, "
    "normalised to its own maximum: fine within one film, not comparable between films."
)
NO_FIXED_SCALE = (
    "No model-scale COVID-19 map for every study here (the model card has no cam_covid_scale, "
    "or the images were scored before it): the area plotted is the per-image map's, which is "
    "not comparable between studies."
)


class ReportSummary(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    out: str
    model_version: str | None
    n_images: int
    n_errors: int
    n_out_of_scope: int = 0
    n_patients: int  # with two or more studies
    n_flagged: int


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


def load_scores(cfg: ReportConfig) -> tuple[pd.DataFrame, str | None]:
    """The rows of one model version (latest per image), with manifest metadata filled in."""
    table = read_predictions(cfg.scores, dedupe=True)
    version = cfg.model_version
    if version is None and table.num_rows:
        latest = table.group_by("model_version").aggregate([("scored_at", "max")])
        order = np.argsort(latest.column("scored_at_max").to_numpy())
        version = latest.column("model_version")[int(order[-1])].as_py()
    if version is not None:
        table = table.filter(pc.field("model_version") == version)
    df = table.drop_columns(["run_date"]).to_pandas()
    # Images only through the dataset's manifest (cfg.data), by image_id: the stored ``uri``
    # may be a source path kept for a research set, or no path at all (image:<image_id>).
    df["image_uri"] = None
    if cfg.data:
        df = _with_manifest(df, cfg.data)
    return df.reset_index(drop=True), version


def _with_manifest(df: pd.DataFrame, data: str) -> pd.DataFrame:
    from ..manifest import manifest_base, read_manifest

    manifest = read_manifest(data)
    base = manifest_base(data)
    cols = [
        c
        for c in ("image_id", "uri", "patient_id", "study_day", "study_date")
        if c in manifest.schema.names
    ]
    m = manifest.select(cols).to_pandas().drop_duplicates("image_id").set_index("image_id")
    known = df["image_id"].map(lambda i: isinstance(i, str) and i in m.index)
    for col in ("patient_id", "study_day", "study_date"):
        if col in m.columns:
            fill = df.loc[known, "image_id"].map(m[col])
            df.loc[known, col] = df.loc[known, col].where(df.loc[known, col].notna(), fill)
    df.loc[known, "image_uri"] = df.loc[known, "image_id"].map(
        lambda i: _image_uri(base, m.at[i, "uri"])
    )
    return df


def _image_uri(base: str, rel: Any) -> str | None:
    """The manifest's image; None (the map alone) for a path that would leave the dataset."""
    try:
        return resolve_inside(base, rel)
    except OutsideDataset:
        return None


def _study_key(row: pd.Series) -> tuple[str, Any] | None:
    if _present(row.get("study_day")):
        return ("day", float(row["study_day"]))
    if _present(row.get("study_date")):
        return ("date", str(row["study_date"]))
    return None


def _present(v: Any) -> bool:
    return v is not None and not (isinstance(v, float) and math.isnan(v)) and v is not pd.NA


def progression_patients(df: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Scored rows of each patient with ≥ 2 distinct studies, in study order."""
    ok = df[df["error"].isna() & df["patient_id"].notna()].copy()
    if ok.empty:
        return {}
    ok["study_key"] = ok.apply(_study_key, axis=1)
    ok = ok[ok["study_key"].notna()]
    out: dict[str, pd.DataFrame] = {}
    for pid, rows in ok.groupby("patient_id", sort=True):
        if rows["study_key"].nunique() < 2:
            continue
        rows = rows.assign(t=_times(rows)).sort_values(["t", "image_id"], kind="stable")
        out[str(pid)] = rows
    return out


def _times(rows: pd.DataFrame) -> pd.Series:
    """Study time in days: ``study_day``, else days since the patient's first dated study."""
    days = pd.to_numeric(rows["study_day"], errors="coerce")
    if days.notna().all():
        return days.astype(float)
    dates = pd.to_datetime(rows["study_date"], errors="coerce")
    if dates.notna().all():
        return (dates - dates.min()).dt.days.astype(float)
    return days.astype(float)  # mixed: rows without a day sort last


# --------------------------------------------------------------------------------------------
# Rendering helpers
# --------------------------------------------------------------------------------------------


def _png_data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _figure_png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return buf.getvalue()


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def has_fixed_scale(rows: pd.DataFrame) -> bool:
    """Whether every row has the COVID-class map on the model's fixed scale (its area)."""
    return "cam_covid_area" in rows and bool(rows["cam_covid_area"].notna().all())


def timeline_png(rows: pd.DataFrame, is_date: bool) -> bytes:
    """COVID probability and the affected area over study time (points per image, line per
    study). The area is the COVID-class map's on the model's fixed scale where every image has
    one (comparable between studies, whatever the label); else the per-image map's."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 2.6))
    t = rows["t"].to_numpy(dtype=float)
    fixed = has_fixed_scale(rows)
    area = "cam_covid_area" if fixed else "cam_area"
    label = "COVID-19 map area (model scale)" if fixed else "CAM area (per image, not comparable)"
    values = rows.assign(area=pd.to_numeric(rows[area], errors="coerce"))
    mean = values.groupby("t")[["prob_covid", "area"]].mean()
    ax.plot(mean.index, mean["prob_covid"], "-", color="#c0392b", lw=2, label="P(COVID-19)")
    ax.plot(t, rows["prob_covid"], "o", color="#c0392b", ms=5)
    ax.plot(mean.index, mean["area"], "--", color="#2471a3", lw=2, label=label)
    ax.plot(t, values["area"], "s", color="#2471a3", ms=4)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("days since first dated study" if is_date else "study day")
    ax.set_ylabel("probability / area")
    ax.set_xticks(sorted(set(t.tolist())))
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8, frameon=False, ncols=2)
    return _figure_png(fig)


def histogram_png(df: pd.DataFrame) -> bytes:
    """Distribution of each class probability over the scored images."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 2.8))
    bins = np.linspace(0.0, 1.0, 21)
    colors = {"covid": "#c0392b", "pneumonia": "#d68910", "normal": "#1e8449"}
    for cls in CLASSES:
        values = df[f"prob_{cls}"].dropna().to_numpy(dtype=float)
        ax.hist(values, bins=bins, histtype="step", lw=2, color=colors.get(cls), label=cls)
    ax.set_xlabel("probability")
    ax.set_ylabel("images")
    ax.legend(fontsize=8, frameon=False)
    ax.grid(alpha=0.3)
    return _figure_png(fig)


def thumbnail_png(
    image_uri: str | None,
    cam_png: bytes | None,
    height: int,
    max_bytes: int = DecodeConfig().max_bytes,
) -> tuple[bytes, bool]:
    """The image with its map (jet, alpha 0.4), ``height`` px high; ``(png, had_image)``.

    The map covers the whole film (the model saw it squashed to a square), so it is stretched
    over the image at its own aspect ratio. Without a readable image, or for one larger than
    ``max_bytes`` (checked before its bytes are fetched), the map alone.
    """
    import torch
    from PIL import Image

    from ..codec import decode_png_u8, encode_png, unit_to_u8
    from ..decode import decode_array
    from ..explain import colormap_lut, overlay

    cam = decode_png_u8(cam_png).astype(np.float32) / 255.0 if cam_png else None
    gray = None
    if image_uri:
        try:
            img = decode_array(storage.read_bytes(image_uri, max_bytes=max_bytes))
            h, w = img.shape
            width = max(1, round(height * w / h))
            small = Image.fromarray(img, mode="F").resize((width, height), Image.Resampling.BOX)
            gray = unit_to_u8(np.asarray(small))
        except Exception:  # missing or undecodable: show the map alone
            gray = None
    if gray is not None and cam is not None:
        rgb = overlay(gray, torch.from_numpy(cam), alpha=0.4)
    elif gray is not None:
        rgb = np.repeat(gray[..., None], 3, axis=2)
    else:
        m = cam if cam is not None else np.zeros((1, 1), np.float32)
        up = torch.nn.functional.interpolate(
            torch.from_numpy(m)[None, None],
            size=(height, height),
            mode="bilinear",
            align_corners=False,
        )[0, 0].numpy()
        rgb = colormap_lut("jet")[np.rint(np.clip(up, 0, 1) * 255).astype(np.intp)]
    return encode_png(rgb, optimize=True), gray is not None


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _fmt(v: Any, digits: int = 2) -> str:
    return f"{float(v):.{digits}f}" if _present(v) else "–"


def _study_label(row: pd.Series) -> str:
    parts = []
    if _present(row.get("study_day")):
        parts.append(f"day {float(row['study_day']):g}")
    if _present(row.get("study_date")):
        parts.append(str(row["study_date"]))
    return " · ".join(parts) or "time unknown"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "-", text).strip("-") or "patient"


def _table(headers: list[str], rows: list[list[str]], cls: str = "") -> str:
    head = "".join(f"<th>{h}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:2rem auto;
max-width:1100px;padding:0 1rem;color:#1c2833;line-height:1.4}
h1{font-size:1.6rem;margin-bottom:.2rem}h2{border-bottom:2px solid #d5d8dc;padding-bottom:.2rem;
margin-top:2rem}h3{margin-bottom:.3rem}.meta{color:#566573;font-size:.9rem}
table{border-collapse:collapse;margin:.5rem 0;font-size:.9rem}
th,td{border:1px solid #d5d8dc;padding:.25rem .6rem;text-align:left}th{background:#f4f6f7}
td.num{text-align:right}section.patient{border:1px solid #d5d8dc;border-radius:6px;
padding:.5rem 1rem 1rem;margin:1rem 0}.thumbs{display:flex;flex-wrap:wrap;gap:.6rem}
figure{margin:0;text-align:center;font-size:.8rem}figure img{border:1px solid #aab7b8;display:block}
.flag{color:#a04000;font-weight:600}.note{color:#566573;font-size:.85rem}
"""


# --------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------


def render_report(
    df: pd.DataFrame,
    version: str | None,
    cfg: ReportConfig,
    runs: list[dict[str, Any]] | None = None,
) -> tuple[str, int, int]:
    """``(html, n_patients, n_flagged)`` for the rows of one model version; ``runs``: the
    nightly job's records of that version (drift, run by run)."""
    gated = out_of_scope(df)
    scored = df[df["error"].isna() & ~gated]
    errors = df[df["error"].notna()]
    flagged = scored[scored["cam_border_energy"] >= cfg.shortcut_threshold]
    patients = progression_patients(df[~gated])
    now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(cfg.title)}</title><style>{_CSS}</style></head><body>",
        f"<header><h1>{_e(cfg.title)}</h1>",
        f'<p class="meta">Model version <code>{_e(version or "none")}</code> · '
        f"{len(df)} image(s), {int(gated.sum())} out of scope, {len(errors)} error(s) · "
        f"generated {now}</p>",
        '<p class="note">Research software, not a medical device. Grad-CAM shows where the model '
        "looked, not where disease is; maps in the border of the film suggest a shortcut.</p>",
        f'<p class="note caveat">{_e(LOCALISATION_CAVEAT)}</p>',
        "</header>",
    ]
    parts.append(_cohort_section(df, scored, errors, flagged, cfg))
    parts.append(_out_of_scope_section(df[gated]))
    parts.append(_drift_section(runs or []))
    parts.append(f'<section id="patients"><h2>Patients with several studies ({len(patients)})</h2>')
    if not patients:
        parts.append('<p class="note">No patient has two or more studies with a known time.</p>')
    for pid, rows in patients.items():
        parts.append(_patient_section(pid, rows, cfg))
    parts.append("</section>")
    parts.append(
        '<footer class="note"><p>Probabilities are the model\'s softmax outputs. CAM area: share '
        "of the map at or above half its maximum. Border energy: share of the map's mass in the "
        f"outer 10% of the film; flagged at ≥ {cfg.shortcut_threshold:g}. {_e(FIXED_SCALE_NOTE)}"
        "</p></footer>"
    )
    parts.append("</body></html>")
    return "\n".join(parts), len(patients), len(flagged)


def _cohort_section(
    df: pd.DataFrame,
    scored: pd.DataFrame,
    errors: pd.DataFrame,
    flagged: pd.DataFrame,
    cfg: ReportConfig,
) -> str:
    counts = Counter(scored["label"].dropna())
    rows = [
        [
            _e(c),
            f'<span class="num">{counts.get(c, 0)}</span>',
            _fmt(scored[f"prob_{c}"].mean(), 3) if len(scored) else "–",
        ]
        for c in CLASSES
    ]
    rows.append(
        ["out of scope", f'<span class="num">{len(df) - len(scored) - len(errors)}</span>', ""]
    )
    rows.append(["errors", f'<span class="num">{len(errors)}</span>', ""])
    rows.append(["<b>total</b>", f'<span class="num"><b>{len(df)}</b></span>', ""])
    out = [
        '<section id="cohort"><h2>Cohort summary</h2>',
        "<h3>Predicted classes</h3>",
        _table(["class", "images", "mean probability"], rows, "counts"),
    ]
    if len(scored):
        out += [
            "<h3>Distribution of probabilities</h3>",
            f'<img class="histogram" alt="histogram of class probabilities" '
            f'src="{_png_data_uri(histogram_png(scored))}">',
        ]
    out.append(
        f'<h3 id="flagged">Flagged: likely shortcut ({len(flagged)})</h3>'
        f'<p class="note">Border energy ≥ {cfg.shortcut_threshold:g}.</p>'
    )
    if len(flagged):
        fl = flagged.sort_values("cam_border_energy", ascending=False).head(cfg.max_table_rows)
        out.append(
            _table(
                ["image", "patient", "study", "label", "P(COVID-19)", "border energy", "flag"],
                [
                    [
                        f"<code>{_e(str(r.image_id)[:12])}</code>",
                        _e(r.patient_id if _present(r.patient_id) else "–"),
                        _e(_study_label(pd.Series(r._asdict()))),
                        _e(r.label),
                        _fmt(r.prob_covid),
                        _fmt(r.cam_border_energy),
                        '<span class="flag">likely shortcut</span>',
                    ]
                    for r in fl.itertuples()
                ],
                "flagged",
            )
        )
    reasons = Counter(errors["error"])
    summary = ", ".join(f"{_e(k)} {v}" for k, v in sorted(reasons.items()))
    out.append(f'<h3 id="errors">Errors ({len(errors)})</h3>')
    if len(errors):
        out.append(f'<p class="note">{summary}</p>')
        out.append(
            _table(
                ["image", "error", "detail"],
                [
                    [
                        f"<code>{_e(str(r.image_id)[:12]) if _present(r.image_id) else '–'}</code>",
                        f'<span class="flag">{_e(r.error)}</span>',
                        _e(r.error_detail),
                    ]
                    for r in errors.head(cfg.max_table_rows).itertuples()
                ],
                "errors",
            )
        )
    out.append("</section>")
    return "\n".join(out)


def out_of_scope(df: pd.DataFrame) -> pd.Series:
    """Rows the input gate refused (``in_scope`` false; absent in files from before the gate)."""
    if "in_scope" not in df:
        return pd.Series(False, index=df.index)
    return df["error"].isna() & df["in_scope"].eq(False)


def _out_of_scope_section(gated: pd.DataFrame) -> str:
    """Counts of the images the input gate refused, by reason (they keep their row)."""
    out = [f'<section id="out-of-scope"><h2>Out of scope ({len(gated)})</h2>']
    out.append(
        '<p class="note">Not a frontal chest X-ray by its DICOM header or the image gate: scored '
        "and kept, but given no label and left out of the counts and timelines above.</p>"
    )
    if len(gated):
        reasons = Counter(gated["gate_reason"].fillna("unknown"))
        out.append(
            _table(
                ["reason", "images"],
                [[_e(k), f'<span class="num">{v}</span>'] for k, v in reasons.most_common()],
                "out-of-scope",
            )
        )
    out.append("</section>")
    return "\n".join(out)


def _drift_section(runs: list[dict[str, Any]]) -> str:
    """One row per nightly run: its shares refused by reason and its class mix (of the images
    in scope), and the model card's validation split below; ⚠ where the validation share lies
    outside the run's Wilson 95 % interval."""
    out = [
        f'<section id="drift"><h2>Drift, run by run ({len(runs)})</h2>',
        '<p class="note">Share of each run\'s images refused by the input gate, per reason, and '
        "predicted class mix of those in scope, next to the validation split the model was "
        "calibrated on. ⚠: the validation share lies outside the run's Wilson 95 % interval; "
        "what arrives no longer looks like what the model was trained on.</p>",
    ]
    if not runs:
        out.append('<p class="note">No run records (outputs written before them).</p>')
        out.append("</section>")
        return "\n".join(out)
    keys = sorted({(d["kind"], d["key"]) for r in runs for d in r["drift"]}, key=lambda k: k)
    headers = ["run date", "images"] + [
        f"{'class' if kind == LABEL else 'refused'}: {key}" for kind, key in keys
    ]
    rows = []
    for r in runs:
        lines = {(d["kind"], d["key"]): d for d in r["drift"]}
        cells = [
            _e(r["run_date"]),
            f'<span class="num">{r["n_scored"] + r["n_out_of_scope"]}</span>',
        ]
        for k in keys:
            d = lines.get(k)
            share = None if d is None else d["share"]
            mark = ' <span class="flag">⚠</span>' if d is not None and d["shifted"] else ""
            cells.append(f"{_pct(share)}{mark}")
        rows.append(cells)
    ref = next((r["drift_reference"] for r in reversed(runs) if r.get("drift_reference")), None)
    if ref is not None:
        n_in = ref["n"] - sum(ref["refused"].values())
        cells = [f"<b>validation ({_e(ref.get('split') or 'val')})</b>", str(ref["n"])]
        for kind, key in keys:
            if kind == LABEL:
                cells.append(_pct(ref["labels"].get(key, 0) / n_in if n_in else None))
            else:
                cells.append(_pct(ref["refused"].get(key, 0) / ref["n"] if ref["n"] else None))
        rows.append(cells)
    else:
        out.append('<p class="note">The model card has no validation reference.</p>')
    out.append(_table(headers, rows, "drift"))
    out.append("</section>")
    return "\n".join(out)


def _pct(share: float | None) -> str:
    return "–" if share is None else f"{100 * share:.1f} %"


def _patient_section(pid: str, rows: pd.DataFrame, cfg: ReportConfig) -> str:
    is_date = not pd.to_numeric(rows["study_day"], errors="coerce").notna().all()
    n_studies = rows["study_key"].nunique()
    out = [
        f'<section class="patient" id="patient-{_e(_slug(pid))}" data-patient-id="{_e(pid)}">',
        f"<h3>Patient {_e(pid)}</h3>",
        f'<p class="meta">{n_studies} studies, {len(rows)} image(s)</p>',
        f'<img class="timeline" alt="timeline of patient {_e(pid)}" '
        f'src="{_png_data_uri(timeline_png(rows, is_date))}">',
    ]
    if not has_fixed_scale(rows):
        out.append(f'<p class="note">{_e(NO_FIXED_SCALE)}</p>')
    out.append('<div class="thumbs">')
    for r in rows.head(cfg.max_thumbs).itertuples():
        png, had_image = thumbnail_png(r.image_uri, r.cam_png, cfg.thumb_size)
        flag = (
            '<br><span class="flag">likely shortcut</span>'
            if _present(r.cam_border_energy) and r.cam_border_energy >= cfg.shortcut_threshold
            else ""
        )
        missing = "" if had_image else '<br><span class="note">image not available</span>'
        covid_png = getattr(r, "cam_covid_png", None)
        covid_img, covid_area = "", ""
        if isinstance(covid_png, bytes):
            fixed_png, _ = thumbnail_png(r.image_uri, covid_png, cfg.thumb_size)
            covid_img = f'<img alt="COVID-19 map (model scale)" src="{_png_data_uri(fixed_png)}">'
            covid_area = f" · COVID area {_fmt(getattr(r, 'cam_covid_area', None))}"
        out.append(
            f'<figure class="thumb" data-image-id="{_e(r.image_id)}">'
            f'<img alt="Grad-CAM overlay" src="{_png_data_uri(png)}">{covid_img}'
            f"<figcaption>{_e(_study_label(pd.Series(r._asdict())))}<br>{_e(r.label)} · "
            f"P(COVID) {_fmt(r.prob_covid)} · area {_fmt(r.cam_area)}{covid_area}{flag}{missing}"
            "</figcaption></figure>"
        )
    if len(rows) > cfg.max_thumbs:
        out.append(f'<p class="note">{len(rows) - cfg.max_thumbs} more image(s) not shown.</p>')
    out.append("</div></section>")
    return "\n".join(out)


def build_report(cfg: ReportConfig) -> ReportSummary:
    """Read the predictions, render the report and write it to ``cfg.out``."""
    df, version = load_scores(cfg)
    runs = [r for r in read_run_records(cfg.scores) if r.get("model_version") == version]
    text, n_patients, n_flagged = render_report(df, version, cfg, runs)
    storage.write_text(cfg.out, text)
    return ReportSummary(
        out=cfg.out,
        model_version=version,
        n_images=len(df),
        n_errors=int(df["error"].notna().sum()),
        n_out_of_scope=int(out_of_scope(df).sum()),
        n_patients=n_patients,
        n_flagged=n_flagged,
    )


__all__ = [
    "ReportConfig",
    "ReportSummary",
    "build_report",
    "histogram_png",
    "load_scores",
    "progression_patients",
    "render_report",
    "thumbnail_png",
    "timeline_png",
]
