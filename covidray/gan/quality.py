"""How COVID-like are the synthetic images? A check with the project's own classifier.

No downloaded network (no Inception): features are a trained classifier's pooled backbone
features (``CxrClassifier.forward_features``), projected by a PCA fitted on the union of the
compared sets to ``dims`` (32) dimensions, since ~100 images make a full covariance singular.
Reported Fréchet distances (lower = closer):

* real covid ↔ synthetic covid (what the GAN achieved),
* real covid ↔ real domain-A images (normals: the distance before translation),
* real covid half ↔ other half (the noise floor of this sample size).

Plus the share of synthetic images the classifier labels covid. Fréchet distances of small sets
are biased upwards and depend on the set sizes: compare them with each other, not with
published FID values.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from pydantic import BaseModel

from ..dataset import load_images, load_rows
from ..labels import CLASSES, class_index
from ..predict import predict_probs
from .config import DomainFilter
from .data import domain_rows


def sqrtm_psd(m: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix (eigh; negatives clipped)."""
    m = 0.5 * (m + m.T)
    w, v = np.linalg.eigh(m)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(x1: np.ndarray, x2: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to the rows of ``x1`` and ``x2``.

    ``|μ1-μ2|² + tr(S1) + tr(S2) - 2 tr((S1^½ S2 S1^½)^½)``, the symmetric form of
    ``tr((S1 S2)^½)`` that stays PSD, so an eigendecomposition suffices.
    """
    x1, x2 = np.asarray(x1, np.float64), np.asarray(x2, np.float64)
    mu1, mu2 = x1.mean(0), x2.mean(0)
    s1 = np.atleast_2d(np.cov(x1, rowvar=False))
    s2 = np.atleast_2d(np.cov(x2, rowvar=False))
    r1 = sqrtm_psd(s1)
    cross = np.trace(sqrtm_psd(r1 @ s2 @ r1))
    d = float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2.0 * cross)
    return max(d, 0.0)


def pca_project(sets: list[np.ndarray], dims: int = 32) -> list[np.ndarray]:
    """Project every set onto the top ``dims`` principal axes of their union."""
    union = np.concatenate(sets).astype(np.float64)
    mean = union.mean(0)
    _, _, vt = np.linalg.svd(union - mean, full_matrices=False)
    axes = vt[: min(dims, vt.shape[0])]
    return [(s - mean) @ axes.T for s in sets]


@torch.no_grad()
def classifier_features(
    model: torch.nn.Module, images_u8: torch.Tensor, batch_size: int = 32
) -> np.ndarray:
    """Pooled backbone features ``(N, D)`` of cached uint8 images (model in eval mode)."""
    device = next(model.parameters()).device
    model.eval()
    out = []
    for start in range(0, len(images_u8), batch_size):
        x = images_u8[start : start + batch_size].to(device).float().div_(255.0)
        out.append(model.forward_features(x).float().cpu())
    return torch.cat(out).numpy()


class QualityReport(BaseModel):
    model_version: str
    dims: int
    n_real_b: int
    n_real_a: int
    n_synthetic: int
    fd_real_b_vs_synthetic: float
    fd_real_b_vs_real_a: float
    fd_real_b_halves: float
    synthetic_predicted_b: float  # share of synthetic images the classifier labels domain B
    real_a_predicted_b: float  # same share for the untranslated domain-A images
    predicted_classes: dict[str, int]  # synthetic images per predicted class


def quality_report(
    model_uri: str,
    data: str,
    synthetic: str,
    *,
    domain_a: str = "normal",
    domain_b: str = "covid",
    flt: DomainFilter | None = None,
    dims: int = 32,
    seed: int = 0,
) -> QualityReport:
    """Compare TRAIN-split real domain-B, real domain-A and the synthetic images (see module)."""
    from ..modeldir import load_model_dir

    model, card = load_model_dir(model_uri)
    size = card.preprocessing.input_size
    flt = flt or DomainFilter()
    rows = load_rows(data)
    real_b = domain_rows(rows, domain_b, flt)
    real_a = domain_rows(rows, domain_a, flt)
    synth = load_rows(synthetic)
    sets = {
        "b": load_images(list(real_b["uri"]), size),
        "a": load_images(list(real_a["uri"]), size),
        "s": load_images(list(synth["uri"]), size),
    }
    feats = {k: classifier_features(model, v) for k, v in sets.items()}
    fb, fa, fs = pca_project([feats["b"], feats["a"], feats["s"]], dims)
    perm = np.random.default_rng(seed).permutation(len(fb))
    half = len(fb) // 2
    tta = bool(card.tta_hflip)
    probs_s = predict_probs(model, sets["s"], tta_hflip=tta)
    probs_a = predict_probs(model, sets["a"], tta_hflip=tta)
    b_index = class_index(domain_b)
    pred_s = probs_s.argmax(1)
    return QualityReport(
        model_version=card.model_version,
        dims=fb.shape[1],
        n_real_b=len(fb),
        n_real_a=len(fa),
        n_synthetic=len(fs),
        fd_real_b_vs_synthetic=frechet_distance(fb, fs),
        fd_real_b_vs_real_a=frechet_distance(fb, fa),
        fd_real_b_halves=frechet_distance(fb[perm[:half]], fb[perm[half:]]),
        synthetic_predicted_b=float((pred_s == b_index).mean()),
        real_a_predicted_b=float((probs_a.argmax(1) == b_index).mean()),
        predicted_classes={c: int((pred_s == k).sum()) for k, c in enumerate(CLASSES)},
    )


def report_table(r: QualityReport) -> pd.DataFrame:
    """The report as a small two-column table (for printing)."""
    return pd.DataFrame(
        [
            ("FD real covid ↔ synthetic covid", f"{r.fd_real_b_vs_synthetic:.2f}"),
            ("FD real covid ↔ real normal (reference)", f"{r.fd_real_b_vs_real_a:.2f}"),
            ("FD real covid half ↔ half (noise floor)", f"{r.fd_real_b_halves:.2f}"),
            ("synthetic labelled covid", f"{r.synthetic_predicted_b:.1%}"),
            ("real normals labelled covid", f"{r.real_a_predicted_b:.1%}"),
        ],
        columns=["measure", "value"],
    )
