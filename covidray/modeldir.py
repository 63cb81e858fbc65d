"""Model directories: what training writes and serving, evaluation and generation load
(local or s3://). Weights are safetensors (no pickle); a JSON card describes them.

A classifier::

    <uri>/weights.safetensors   CxrClassifier state dict
    <uri>/model_card.json       ModelCard: architecture, preprocessing, metrics, provenance
    <uri>/metrics.json          evaluation reports (EvalReport.to_json) per split
    <uri>/confusion.png         confusion matrix of the test split (val when there is none)
    <uri>/per_class.md          per-class and subgroup tables per split
    <uri>/reliability.png       reliability diagram before and after calibration (when fitted)
    <uri>/gate.safetensors      the input gate's feature statistics (when fitted)
    <uri>/view.safetensors      the gate's view check (when fitted with a view dataset)

A CycleGAN generator::

    <uri>/generator.safetensors ResnetGenerator state dict
    <uri>/generator.json        GeneratorCard: architecture, domains, resolution, provenance

The version (``model_version``, ``generator_version``) is the first 12 hex digits of the
weights file's sha256; loading verifies the full digest, so a changed or corrupted weights
file is refused with :class:`ModelLoadError`. A classifier's ``scoring_version`` hashes
everything that changes its outputs besides the weights too (preprocessing, flip TTA,
calibration, the gate and its statistics, the view check and its parameters, the fixed
Grad-CAM scale, :data:`SCORING_SCHEME`): the nightly job keys its rows by it. The view check and
the CAM scale enter the hash only when set, so a card from before them keeps its version.
The card is written last: a directory with a card is complete.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from . import __version__, storage
from .calibration import UNCALIBRATED, Calibration
from .drift import OutputMix
from .gate import Gate
from .labels import CLASSES
from .prepcard import LEGACY_PREPROCESSING, Preprocessing, describe
from .viewcheck import ViewCheck, ViewCheckField

if TYPE_CHECKING:
    import torch

    from .evaluation.metrics import EvalReport
    from .gan.networks import ResnetGenerator
    from .models import CxrClassifier

WEIGHTS_NAME = "weights.safetensors"
CARD_NAME = "model_card.json"
METRICS_NAME = "metrics.json"
CONFUSION_NAME = "confusion.png"
PER_CLASS_NAME = "per_class.md"
RELIABILITY_NAME = "reliability.png"
CARD_SCHEMA_VERSION = 2
# Bump when the code turns the same card and weights into different outputs (2: flip TTA
# averages logits, then calibration and the input gate apply).
SCORING_SCHEME = 2
GENERATOR_WEIGHTS = "generator.safetensors"
GENERATOR_CARD = "generator.json"


class ModelLoadError(RuntimeError):
    """A model directory could not be read, verified or loaded."""


class ModelCard(BaseModel):
    """Everything needed to rebuild, trust and reproduce a trained model."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    schema_version: int = CARD_SCHEMA_VERSION
    model_version: str = ""  # first 12 hex of sha256(weights.safetensors); set when saved
    weights_sha256: str = ""
    backbone: str
    classes: list[str] = Field(default_factory=lambda: list(CLASSES))
    num_classes: int
    head: str
    architecture: dict[str, Any]  # keyword arguments of covidray.models.build_model
    preprocessing: Preprocessing
    tta_hflip: bool = False  # average with the mirrored image at inference
    training_data_hash: str | None = None  # see covidray.train.data.training_data_hash
    metrics: dict[str, Any] = Field(default_factory=dict)  # split -> EvalReport.to_json()
    training: dict[str, Any] = Field(default_factory=dict)  # best epoch, history, wall time
    training_config: dict[str, Any] | None = None
    calibration: Calibration | None = None  # None: a card from before calibration (T = 1)
    gate: Gate | None = None  # the input gate's image layer; None: not fitted
    view_check: ViewCheck | None = ViewCheckField  # the gate's frontal/lateral check
    # Fixed Grad-CAM scale of the COVID class (99th pct of its raw maps on val); None: unfitted
    cam_covid_scale: float | None = None
    # What the shipped Predictor answers on the validation split (refusals by reason, class
    # mix): the nightly job's drift reference. Changes no output: not in scoring_version.
    drift_reference: OutputMix | None = None
    lineage: list[dict[str, Any]] = Field(default_factory=list)  # parent models, nearest first
    created_at: str = Field(default_factory=lambda: datetime.now(UTC).isoformat())
    code_version: str = Field(default_factory=lambda: code_version())

    @property
    def effective_calibration(self) -> Calibration:
        """The card's calibration, or temperature 1 for a card written before it."""
        return self.calibration or UNCALIBRATED

    @property
    def scoring_version(self) -> str:
        """12 hex digits over the weights and every card field that changes outputs."""
        payload = {
            "scheme": SCORING_SCHEME,
            "weights": self.weights_sha256,
            "classes": self.classes,
            # No contrast normalisation hashes as before the field existed.
            "preprocessing": self.preprocessing.model_dump(
                mode="json", exclude={"contrast"} if self.preprocessing.contrast == "none" else None
            ),
            "tta_hflip": self.tta_hflip,
            "calibration": self.effective_calibration.model_dump(
                mode="json", include={"method", "temperature", "scale", "bias"}
            ),
            "gate": None if self.gate is None else self.gate.model_dump(mode="json"),
        }
        # Later parts hash only when present: the versions of cards without them stay.
        if self.view_check is not None:
            payload["view_check"] = self.view_check.model_dump(mode="json")
        if self.cam_covid_scale is not None:
            payload["cam_covid_scale"] = self.cam_covid_scale
        blob = json.dumps(payload, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]

    @classmethod
    def for_model(
        cls,
        model: CxrClassifier,
        input_size: int,
        shorter_side: int = LEGACY_PREPROCESSING["shorter_side"],
        contrast: str = "none",
        **fields: Any,
    ) -> ModelCard:
        """A card describing ``model``'s architecture and preprocessing (``shorter_side``: of
        the ingested data it was trained on)."""
        mean, std = model.normalization
        return cls(
            backbone=model.backbone_name,
            classes=list(CLASSES[: model.num_classes]),
            num_classes=model.num_classes,
            head=model.head_type,
            architecture=dict(model.config),
            preprocessing=Preprocessing(
                input_size=input_size,
                normalization={"mean": list(mean), "std": list(std)},
                **describe(shorter_side, contrast),
            ),
            **fields,
        )


def code_version() -> str:
    """``covidray.__version__`` plus the git commit of the source tree, when there is one, and
    ``.dirty`` when tracked files differ from it (the commit alone would not reproduce)."""
    here = os.path.dirname(os.path.abspath(__file__))

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=here, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()

    try:
        commit = git("rev-parse", "--short=12", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no", "--", "."))
    except (OSError, subprocess.SubprocessError):
        commit, dirty = "", False
    if not commit:
        return f"{__version__}+unknown"
    return f"{__version__}+git.{commit}" + (".dirty" if dirty else "")


def weights_bytes(model: torch.nn.Module) -> bytes:
    """The model's state dict as safetensors bytes (CPU, contiguous; DDP prefix stripped)."""
    from safetensors.torch import save

    inner = getattr(model, "module", model)
    state = {k: v.detach().cpu().contiguous() for k, v in inner.state_dict().items()}
    return save(state, metadata={"format": "pt"})


def _versioned(data: bytes) -> dict[str, str]:
    digest = hashlib.sha256(data).hexdigest()
    return {"weights_sha256": digest, "version": digest[:12]}


def _read_verified(uri: str, name: str, sha256: str) -> bytes:
    """The bytes of ``<uri>/<name>``, which must have the card's ``sha256``."""
    path = storage.join(uri, name)
    try:
        data = storage.read_bytes(path)
    except FileNotFoundError:
        raise ModelLoadError(f"model directory {uri} has no {name}") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != sha256:
        raise ModelLoadError(
            f"{path} does not match its model card: sha256 {digest[:12]}… but the card expects "
            f"{sha256[:12]}…. The weights file is corrupted, truncated or was replaced; "
            "re-copy the whole directory."
        )
    return data


def save_model_dir(
    model: torch.nn.Module,
    card: ModelCard,
    uri: str,
    reports: dict[str, EvalReport] | None = None,
    *,
    gate_stats: bytes | None = None,
    view_stats: bytes | None = None,
    reliability_png: bytes | None = None,
) -> ModelCard:
    """Write a model directory at ``uri``; returns the card as saved (with model_version).

    ``reports`` (split -> EvalReport) go into metrics.json, per_class.md, confusion.png (test,
    else val) and the card's ``metrics``, the val report's answers into ``drift_reference``;
    ``gate_stats`` (``GateStats.to_bytes()``, with ``card.gate`` set) into gate.safetensors and
    ``view_stats`` (``ViewWeights.to_bytes()``, with ``card.view_check`` set) into
    view.safetensors, their digests into the card.
    """
    data = weights_bytes(model)
    v = _versioned(data)
    digest = v["weights_sha256"]
    metrics = dict(card.metrics)
    reports = reports or {}
    metrics.update({split: r.to_json() for split, r in reports.items()})
    update: dict[str, Any] = {
        "model_version": v["version"],
        "weights_sha256": digest,
        "metrics": metrics,
    }
    val = reports.get("val")
    if val is not None and val.outputs is not None and val.outputs.answers is not None:
        update["drift_reference"] = val.outputs.answers.model_copy(update={"split": "val"})
    if gate_stats is not None:
        if card.gate is None:
            raise ValueError("gate statistics without a gate in the card")
        sha = hashlib.sha256(gate_stats).hexdigest()
        update["gate"] = card.gate.model_copy(update={"stats_sha256": sha})
    if view_stats is not None:
        if card.view_check is None:
            raise ValueError("view check parameters without a view check in the card")
        sha = hashlib.sha256(view_stats).hexdigest()
        update["view_check"] = card.view_check.model_copy(update={"stats_sha256": sha})
    card = card.model_copy(update=update)
    ModelCard.model_validate(card.model_dump())  # fail before writing anything
    storage.makedirs(uri)
    storage.write_bytes(storage.join(uri, WEIGHTS_NAME), data)
    if gate_stats is not None:
        storage.write_bytes(storage.join(uri, card.gate.stats_file), gate_stats)
    if view_stats is not None:
        storage.write_bytes(storage.join(uri, card.view_check.stats_file), view_stats)
    if reliability_png is not None:
        storage.write_bytes(storage.join(uri, RELIABILITY_NAME), reliability_png)
    storage.write_text(storage.join(uri, METRICS_NAME), json.dumps(metrics, indent=2) + "\n")
    if reports:
        from .evaluation.artifacts import confusion_png, per_class_table_markdown

        main = "test" if "test" in reports else next(iter(reports))
        buf = io.BytesIO()
        confusion_png(reports[main], buf, title=f"{card.backbone} {digest[:12]} ({main})")
        storage.write_bytes(storage.join(uri, CONFUSION_NAME), buf.getvalue())
        md = [f"# {card.backbone} model {digest[:12]}\n"]
        for split, report in reports.items():
            md += [f"## {split} split\n", per_class_table_markdown(report)]
        storage.write_text(storage.join(uri, PER_CLASS_NAME), "\n".join(md))
    storage.write_text(storage.join(uri, CARD_NAME), card.model_dump_json(indent=2) + "\n")
    return card


def read_card(uri: str) -> ModelCard:
    """The model card of the model directory ``uri``."""
    path = storage.join(uri, CARD_NAME)
    try:
        text = storage.read_text(path)
    except FileNotFoundError:
        raise ModelLoadError(f"not a model directory: {path} does not exist") from None
    try:
        return ModelCard.model_validate_json(text)
    except ValidationError as e:
        raise ModelLoadError(f"{path} is not a valid model card: {e}") from None


def read_gate_stats(uri: str, card: ModelCard) -> bytes | None:
    """The verified bytes of the gate's statistics file, or None without a gate."""
    if card.gate is None:
        return None
    return _read_verified(uri, card.gate.stats_file, card.gate.stats_sha256)


def read_view_stats(uri: str, card: ModelCard) -> bytes | None:
    """The verified bytes of the view check's parameters, or None without a view check."""
    if card.view_check is None:
        return None
    return _read_verified(uri, card.view_check.stats_file, card.view_check.stats_sha256)


def load_model_dir(
    uri: str, device: str | torch.device | None = None
) -> tuple[CxrClassifier, ModelCard]:
    """Load the model directory ``uri``: verified weights (safetensors, no pickle), eval mode.

    Raises :class:`ModelLoadError` when the card is missing or invalid, or the weights are
    missing, differ from the card's sha256, or do not fit the architecture.
    """
    from safetensors.torch import load

    from .models import build_model

    card = read_card(uri)
    path = storage.join(uri, WEIGHTS_NAME)
    if card.weights_sha256[:12] != card.model_version:
        raise ModelLoadError(
            f"{path} does not match its model card: model_version {card.model_version} is not "
            f"the card's sha256 {card.weights_sha256[:12]}…"
        )
    data = _read_verified(uri, WEIGHTS_NAME, card.weights_sha256)
    try:
        state = load(data)
    except Exception as e:  # safetensors' own error types
        raise ModelLoadError(f"{path} is not a readable safetensors file: {e}") from None
    try:
        model = build_model(**card.architecture, weights=None)
        model.load_state_dict(state, strict=True)
    except Exception as e:
        raise ModelLoadError(f"weights in {uri} do not fit {card.architecture}: {e}") from e
    model.eval()
    if device is not None:
        model.to(device)
    return model, card


class GeneratorCard(BaseModel):
    """What a saved CycleGAN generator is: architecture, domains, resolution, provenance."""

    model_config = ConfigDict(extra="forbid")

    generator_version: str = ""  # first 12 hex of sha256(generator.safetensors)
    weights_sha256: str = ""
    architecture: dict[str, Any]  # ResnetGenerator keyword arguments
    size: int  # square resolution the generator was trained at
    domain_a: str
    domain_b: str
    filter_a: dict[str, Any]
    filter_b: dict[str, Any]
    config: dict[str, Any] = Field(default_factory=dict)  # the GanConfig of the run
    training: dict[str, Any] = Field(default_factory=dict)
    created_at: str = Field(default_factory=lambda: datetime.now(UTC).isoformat())
    code_version: str = ""


def save_generator(generator: torch.nn.Module, card: GeneratorCard, uri: str) -> GeneratorCard:
    """Write weights then card (a folder with a card is complete); returns the saved card."""
    data = weights_bytes(generator)
    v = _versioned(data)
    card = card.model_copy(
        update={
            "generator_version": v["version"],
            "weights_sha256": v["weights_sha256"],
            "code_version": card.code_version or code_version(),
        }
    )
    storage.makedirs(uri)
    storage.write_bytes(storage.join(uri, GENERATOR_WEIGHTS), data)
    storage.write_text(storage.join(uri, GENERATOR_CARD), card.model_dump_json(indent=2) + "\n")
    return card


def load_generator(
    uri: str, device: torch.device | str = "cpu"
) -> tuple[ResnetGenerator, GeneratorCard]:
    """Load a saved generator (eval mode); the weights must match the card's sha256."""
    from safetensors.torch import load

    from .gan.networks import ResnetGenerator

    path = storage.join(uri, GENERATOR_CARD)
    try:
        card = GeneratorCard.model_validate_json(storage.read_text(path))
    except FileNotFoundError:
        raise ModelLoadError(f"not a generator directory: {path} does not exist") from None
    except ValidationError as e:
        raise ModelLoadError(f"{path} is not a valid generator card: {e}") from None
    data = _read_verified(uri, GENERATOR_WEIGHTS, card.weights_sha256)
    generator = ResnetGenerator(**card.architecture)
    generator.load_state_dict(load(data))
    return generator.to(device).eval(), card
