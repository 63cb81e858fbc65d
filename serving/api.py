"""The HTTP API's request and response models (FastAPI publishes them at ``/docs``)."""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from covidray.labels import CLASSES

# Content types /v1/predict takes as a raw body (multipart/form-data takes a file part).
IMAGE_TYPES = (
    "image/png",
    "image/jpeg",
    "image/tiff",
    "image/bmp",
    "image/webp",
    "application/dicom",
)


class CamFormat(StrEnum):
    none = "none"
    png = "png"
    array = "array"


class Cam(BaseModel):
    """The Grad-CAM map as the nightly job stores it: the raw map at the target layer's
    resolution, 8 bits, 0 = no evidence, 255 = the image's maximum."""

    model_config = ConfigDict(populate_by_name=True)

    explains: str = Field(description="the class the map explains")
    shape: tuple[int, int] = Field(description="height, width of the raw map")
    png_base64: str | None = Field(None, description="cam=png: an 8-bit grayscale PNG")
    array: list[list[int]] | None = Field(None, description="cam=array: rows of 0..255")
    peak_y: float = Field(description="peak row, as a fraction of the image height")
    peak_x: float = Field(description="peak column, as a fraction of the image width")
    border_energy: float = Field(
        description="share of the map's mass in the outer 10 % of the film (high: a likely "
        "shortcut such as a marker or a label)"
    )


class Timing(BaseModel):
    decode: float = Field(description="ms decoding and resizing, in the ingress")
    queue: float = Field(description="ms waiting for a batch slot")
    model: float = Field(description="ms of the batch's model call")


class Prediction(BaseModel):
    """One image's answer."""

    model_config = ConfigDict(protected_namespaces=())

    request_id: str
    label: str | None = Field(description="predicted class; null when the input gate refuses")
    probabilities: dict[str, float] | None = Field(
        description=f"calibrated, one per class: {', '.join(CLASSES)}; null when the image was "
        "refused from its DICOM header, before any pixel reached the model"
    )
    model_version: str
    scoring_version: str
    cam: Cam | None = None
    affected_area: float | None = Field(
        None, description="share of the film where the map is at least half its maximum"
    )
    timing_ms: Timing
    in_scope: bool | None = Field(
        None, description="the input gate's verdict: a frontal chest X-ray the model is for"
    )
    gate_reason: str | None = None
    ood_score: float | None = None


class Error(BaseModel):
    """A refused request or image: a machine-readable reason and a short detail."""

    request_id: str
    reason: str = Field(description="e.g. not_an_image, truncated, too_large, unauthorized")
    detail: str


class BatchItem(BaseModel):
    """One image of a batch request: a prediction or an error, never both."""

    index: int
    prediction: Prediction | None = None
    error: Error | None = None


class BatchResponse(BaseModel):
    request_id: str
    items: list[BatchItem]


class Health(BaseModel):
    status: str
    model_version: str | None = None


class ModelInfo(BaseModel):
    """The served model's card, with storage URIs and training paths redacted."""

    model_config = ConfigDict(protected_namespaces=())

    model_version: str
    card: dict[str, Any]
