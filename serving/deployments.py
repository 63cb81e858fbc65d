"""The two Serve deployments: ``CxrModel`` (a Predictor behind ``@serve.batch``) and
``Ingress`` (FastAPI: auth, size and type checks, decoding off the event loop, answers).

A request's image is decoded in the ingress, in a thread pool, with the library's one
preprocessing path (``covidray.preprocess.prepare_bytes``: the model card's shorter-side
normalisation, then the square resize), so a bad file is answered there and never takes a
batch slot. Good images go to the model deployment as 8-bit ``S×S`` arrays and are batched
with whatever else arrives within ``batch_wait_timeout_s``.
"""

# No "from __future__ import annotations": FastAPI reads these signatures at run time.

import asyncio
import base64
import hmac
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray import serve
from ray.exceptions import RayActorError, TaskCancelledError
from ray.serve.context import _get_serve_request_context
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.util import metrics

from covidray import __version__
from covidray.codec import encode_png
from covidray.decode import DecodeError, is_dicom
from covidray.dicom_meta import dicom_tags
from covidray.gate import metadata_reason
from covidray.labels import CLASSES
from covidray.modeldir import read_card
from covidray.preprocess import prepare_bytes

from .api import (
    IMAGE_TYPES,
    BatchItem,
    BatchResponse,
    Cam,
    CamFormat,
    Error,
    Health,
    ModelInfo,
    Prediction,
    Timing,
)
from .config import ServingConfig, api_token

log = logging.getLogger("covidray.serving")

ClassName = Literal["covid", "pneumonia", "normal"]
assert tuple(ClassName.__args__) == CLASSES  # type: ignore[attr-defined]
UNAVAILABLE = (BackPressureError, DeploymentUnavailableError, RayActorError, TaskCancelledError)


# --- the model deployment ------------------------------------------------------------------


@dataclass(frozen=True)
class _Item:
    pixels: np.ndarray  # S×S uint8
    class_idx: int | None  # the class the map explains; None: the predicted one
    queued_at: float


@serve.deployment
class CxrModel:
    """One Predictor per replica; requests are scored in batches of up to max_batch_size."""

    def __init__(self, args: dict[str, Any]) -> None:
        from covidray.predict import Predictor

        cfg = ServingConfig.model_validate(args)
        self.predictor = Predictor.from_dir(
            cfg.model, device=cfg.device, threads=cfg.threads, amp=cfg.amp
        )
        self._idle = asyncio.Event()
        self._idle.set()
        self.infer.set_max_batch_size(cfg.max_batch_size)
        self.infer.set_batch_wait_timeout_s(cfg.batch_wait_timeout_s)
        size = self.predictor.input_size
        # Warm-up: one full batch, so the first request does not pay the kernels' set-up.
        self.predictor.predict(np.zeros((cfg.max_batch_size, 1, size, size), np.uint8))
        self.model_ms = metrics.Histogram(
            "covidray_model_time_ms",
            "Model time per batch (forward pass and Grad-CAM), ms.",
            boundaries=[5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000],
        )

    async def ready(self) -> str:
        """The model version, once this replica has loaded and warmed up its model."""
        return self.predictor.model_version

    async def score(self, pixels: np.ndarray, class_idx: int | None) -> dict[str, Any]:
        item = _Item(pixels, class_idx, time.perf_counter())
        # Serve forms a batch as requests arrive, not when the model is free: under load that
        # makes many small batches queued behind the one running. Requests that arrive while a
        # batch runs wait here instead, and join the batch queue together when it ends.
        await self._idle.wait()
        return await self.infer(item)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.02)
    async def infer(self, items: list[_Item]) -> list[dict[str, Any]]:
        self._idle.clear()
        started = time.perf_counter()
        try:
            res = await asyncio.to_thread(self._predict, items)
        finally:
            self._idle.set()
        model_ms = (time.perf_counter() - started) * 1000
        self.model_ms.observe(model_ms)
        out = []
        for i, item in enumerate(items):
            out.append(
                {
                    "probs": res.probs[i].tolist(),
                    "label": res.labels[i],
                    "classes": list(res.classes),
                    "model_version": res.model_version,
                    "scoring_version": res.scoring_version,
                    "in_scope": bool(res.in_scope[i]),
                    "gate_reason": res.gate_reason[i],
                    "ood_score": None if res.ood_score is None else float(res.ood_score[i]),
                    "cam_class": res.classes[int(res.cam_class_idx[i])],
                    "cam_raw": res.cam_raw[i],
                    "cam_area": float(res.cam_area[i]),
                    "cam_peak_y": float(res.cam_peak_y[i]),
                    "cam_peak_x": float(res.cam_peak_x[i]),
                    "cam_border_energy": float(res.cam_border_energy[i]),
                    "queue_ms": (started - item.queued_at) * 1000,
                    "model_ms": model_ms,
                }
            )
        return out

    def _predict(self, items: list[_Item]) -> Any:
        """One forward pass with Grad-CAM for the batch; a second CAM pass only for the images
        whose caller asked for a class other than the predicted one."""
        x = np.stack([it.pixels for it in items])[:, None]
        res = self.predictor.predict(x, with_cam=True)
        wanted = [
            it.class_idx if it.class_idx is not None else int(np.argmax(res.probs[i]))
            for i, it in enumerate(items)
        ]
        redo = [i for i, c in enumerate(wanted) if c != int(res.cam_class_idx[i])]
        if redo:
            again = self.predictor.predict(
                x[redo], with_cam=True, class_idx=[wanted[i] for i in redo]
            )
            for j, i in enumerate(redo):
                for name in (
                    "cam_raw",
                    "cam_area",
                    "cam_peak_y",
                    "cam_peak_x",
                    "cam_border_energy",
                ):
                    getattr(res, name)[i] = getattr(again, name)[j]
                res.cam_class_idx[i] = again.cam_class_idx[j]
        return res


# --- the ingress ---------------------------------------------------------------------------

api = FastAPI(
    title="covidray",
    version=__version__,
    description="Chest X-ray scoring (COVID-19, pneumonia, normal) with Grad-CAM. Research "
    "software, not a medical device. Send one image as the raw body (image/png, image/jpeg, "
    "application/dicom, ...) or as a multipart file.",
)


class ApiError(Exception):
    """An answer other than 200, with a machine-readable reason."""

    def __init__(
        self, status: int, reason: str, detail: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(detail)
        self.status, self.reason, self.detail, self.headers = status, reason, detail, headers


def _request_id(request: Request) -> str:
    return getattr(request.state, "request_id", "") or uuid.uuid4().hex


@api.middleware("http")
async def _with_request_id(request: Request, call_next: Any) -> Any:
    """The request id Serve's proxy assigned (and returns as ``X-Request-ID``), for the body
    and the logs."""
    request.state.request_id = _get_serve_request_context().request_id or uuid.uuid4().hex
    return await call_next(request)


@api.exception_handler(ApiError)
async def _api_error(request: Request, err: ApiError) -> JSONResponse:
    body = Error(request_id=_request_id(request), reason=err.reason, detail=err.detail)
    log.info("request %s: %d %s", body.request_id, err.status, err.reason)
    return JSONResponse(body.model_dump(), status_code=err.status, headers=err.headers)


@api.exception_handler(RequestValidationError)
async def _bad_request(request: Request, err: RequestValidationError) -> JSONResponse:
    detail = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
    return await _api_error(request, ApiError(422, "bad_request", detail[:300]))


ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": Error, "description": text}
    for code, text in (
        (401, "missing or wrong bearer token"),
        (411, "no Content-Length"),
        (413, "body larger than the configured limit"),
        (415, "content type not taken"),
        (422, "undecodable or unsupported image, or a bad parameter"),
        (503, "overloaded or no model replica; retry after Retry-After seconds"),
    )
}
IMAGE_BODY = {
    "requestBody": {
        "content": {
            **{t: {"schema": {"type": "string", "format": "binary"}} for t in IMAGE_TYPES},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {"file": {"type": "string", "format": "binary"}},
                }
            },
        },
        "required": True,
    }
}


def _gated(data: bytes) -> str | None:
    """The input gate's metadata layer: why a DICOM header says out of scope, or None."""
    if not is_dicom(data):
        return None
    try:
        return metadata_reason(dicom_tags(data))
    except DecodeError:
        return None  # an unreadable header: the decoder will say what is wrong


def _prediction(
    request_id: str, out: dict[str, Any], cam: CamFormat, decode_ms: float
) -> Prediction:
    raw: np.ndarray = out["cam_raw"]
    cam_out = None
    if cam != CamFormat.none:
        cam_out = Cam(
            explains=out["cam_class"],
            shape=(int(raw.shape[0]), int(raw.shape[1])),
            png_base64=base64.b64encode(encode_png(raw)).decode() if cam == CamFormat.png else None,
            array=raw.astype(int).tolist() if cam == CamFormat.array else None,
            peak_y=out["cam_peak_y"],
            peak_x=out["cam_peak_x"],
            border_energy=out["cam_border_energy"],
        )
    return Prediction(
        request_id=request_id,
        label=out["label"],
        probabilities=dict(zip(out["classes"], out["probs"], strict=True)),
        model_version=out["model_version"],
        scoring_version=out["scoring_version"],
        cam=cam_out,
        affected_area=out["cam_area"],
        timing_ms=Timing(decode=decode_ms, queue=out["queue_ms"], model=out["model_ms"]),
        in_scope=out["in_scope"],
        gate_reason=out["gate_reason"],
        ood_score=out["ood_score"],
    )


REDACTED = "<redacted>"
# Card fields that hold storage locations (training_config, training, GAN history).
PATH_KEYS = frozenset({"data", "out", "augment_with", "run_path", "sample_uri", "weights"})


def redact(value: Any, key: str = "") -> Any:
    """A card with every storage URI and file path replaced (training data, run folders)."""
    if isinstance(value, dict):
        return {k: redact(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v, key) for v in value]
    if not isinstance(value, str):
        return value
    named = key in PATH_KEYS and value.split(":", 1)[0] != "imagenet"
    if named or "://" in value or value.startswith(("/", "~")):
        return REDACTED
    return value


# Serve copies the class when it is decorated: everything it calls is defined above it.
@serve.deployment
@serve.ingress(api)
class Ingress:
    """HTTP in front of the model deployment; see the module docstring."""

    def __init__(self, model: Any, args: dict[str, Any]) -> None:
        self.cfg = ServingConfig.model_validate(args)
        self.model = model
        card = read_card(self.cfg.model)
        self.preprocessing = card.preprocessing
        self.model_version = card.model_version
        self.scoring_version = card.scoring_version
        self.card = redact(card.model_dump(mode="json"))
        self.token = api_token(self.cfg)
        self.pool = ThreadPoolExecutor(self.cfg.decode_threads, thread_name_prefix="decode")
        self.decode_errors = metrics.Counter(
            "covidray_decode_errors", "Images refused by the decoder, by reason.", ("reason",)
        )
        # Every answer, here where all of them pass: those the DICOM header refuses never reach
        # the model deployment.
        self.predictions = metrics.Counter(
            "covidray_predictions",
            "Images answered, by predicted class (label), or label out_of_scope and the input "
            "gate's reason (reason; none when in scope).",
            tag_keys=("label", "reason"),
        )

    # --- checks ------------------------------------------------------------------------
    def _authorize(self, request: Request) -> None:
        if self.token is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            given.strip().encode(), self.token.encode()
        ):
            raise ApiError(
                401,
                "unauthorized",
                "a valid bearer token is required",
                {"WWW-Authenticate": "Bearer"},
            )

    async def _body(self, request: Request) -> tuple[str, bytes | list[bytes]]:
        """``(content type, raw body or multipart files)`` after the size and type checks."""
        length = request.headers.get("content-length")
        if length is None:
            raise ApiError(411, "length_required", "send a Content-Length (no chunked uploads)")
        if not length.isdigit():
            raise ApiError(422, "bad_request", "Content-Length is not a number")
        if int(length) > self.cfg.max_body_bytes:
            raise ApiError(
                413, "too_large", f"body over the limit of {self.cfg.max_body_bytes} bytes"
            )
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind == "multipart/form-data":
            form = await request.form(max_files=self.cfg.max_batch_images + 1)
            files = [await f.read() for _, f in form.multi_items() if hasattr(f, "read")]
            return kind, files
        if kind not in IMAGE_TYPES:
            raise ApiError(
                415,
                "unsupported_media_type",
                f"content type {kind or 'none'!r}; send one of {', '.join(IMAGE_TYPES)} "
                "or multipart/form-data",
            )
        body = await request.body()
        if len(body) > self.cfg.max_body_bytes:
            raise ApiError(413, "too_large", f"body over the limit of {self.cfg.max_body_bytes}")
        return kind, body

    # --- one image ---------------------------------------------------------------------
    async def _decode(self, data: bytes) -> tuple[np.ndarray | None, float, str | None]:
        """``(model input, ms, None)``, or ``(None, ms, reason)`` when the DICOM header puts
        the image out of scope (then no pixel is decoded)."""
        t0 = time.perf_counter()
        loop = asyncio.get_running_loop()
        reason = await loop.run_in_executor(self.pool, _gated, data)
        if reason is not None:
            return None, (time.perf_counter() - t0) * 1000, reason
        try:
            pixels = await loop.run_in_executor(self.pool, prepare_bytes, data, self.preprocessing)
        except DecodeError as err:
            self.decode_errors.inc(tags={"reason": err.reason.value})
            raise ApiError(422, err.reason.value, err.detail) from None
        except Exception as err:  # an odd file nobody foresaw: still the client's input
            self.decode_errors.inc(tags={"reason": "decode_failed"})
            raise ApiError(422, "decode_failed", type(err).__name__) from None
        return pixels, (time.perf_counter() - t0) * 1000, None

    async def _score(
        self, request_id: str, data: bytes, cam: CamFormat, class_idx: int | None
    ) -> Prediction:
        """One image's answer (a prediction, in scope or not), counted; errors raise."""
        prediction = await self._answer(request_id, data, cam, class_idx)
        self.predictions.inc(
            tags={
                "label": prediction.label or "out_of_scope",
                "reason": prediction.gate_reason or "none",
            }
        )
        return prediction

    async def _answer(
        self, request_id: str, data: bytes, cam: CamFormat, class_idx: int | None
    ) -> Prediction:
        pixels, decode_ms, reason = await self._decode(data)
        if pixels is None:
            log.info("request %s: out of scope (%s)", request_id, reason)
            return Prediction(
                request_id=request_id,
                label=None,
                probabilities=None,
                model_version=self.model_version,
                scoring_version=self.scoring_version,
                timing_ms=Timing(decode=decode_ms, queue=0.0, model=0.0),
                in_scope=False,
                gate_reason=reason,
            )
        try:
            out = await asyncio.wait_for(
                self.model.score.remote(pixels, class_idx), timeout=self.cfg.model_timeout_s
            )
        except (TimeoutError, *UNAVAILABLE) as err:
            raise ApiError(
                503,
                "unavailable",
                f"no model replica could take the image ({type(err).__name__})",
                {"Retry-After": str(self.cfg.retry_after_s)},
            ) from None
        log.info(
            "request %s: %s in %.0f ms",
            request_id,
            out["label"] or out["gate_reason"],
            out["model_ms"],
        )
        return _prediction(request_id, out, cam, decode_ms)

    # --- routes ------------------------------------------------------------------------
    @api.post(
        "/v1/predict",
        response_model=Prediction,
        responses=ERRORS,
        openapi_extra=IMAGE_BODY,
        summary="Score one chest X-ray",
    )
    async def predict(
        self,
        request: Request,
        cam: CamFormat = Query(CamFormat.png, description="the Grad-CAM map: none, png, array"),
        explain: ClassName | None = Query(
            None, alias="class", description="the class the map explains (default: predicted)"
        ),
    ) -> Prediction:
        self._authorize(request)
        _, body = await self._body(request)
        if isinstance(body, list):
            if len(body) != 1:
                raise ApiError(422, "bad_request", f"expected one file, got {len(body)}")
            body = body[0]
        class_idx = None if explain is None else CLASSES.index(explain)
        return await self._score(request.state.request_id, body, cam, class_idx)

    @api.post(
        "/v1/predict:batch",
        response_model=BatchResponse,
        responses=ERRORS,
        summary="Score several chest X-rays (multipart files), one result or error each",
    )
    async def predict_batch(
        self,
        request: Request,
        cam: CamFormat = Query(CamFormat.png),
        explain: ClassName | None = Query(None, alias="class"),
    ) -> BatchResponse:
        self._authorize(request)
        kind, files = await self._body(request)
        if kind != "multipart/form-data":
            raise ApiError(415, "unsupported_media_type", "send the images as multipart files")
        if not 1 <= len(files) <= self.cfg.max_batch_images:
            raise ApiError(
                422, "bad_request", f"send 1 to {self.cfg.max_batch_images} files, not {len(files)}"
            )
        rid = request.state.request_id
        class_idx = None if explain is None else CLASSES.index(explain)
        results = await asyncio.gather(
            *(self._score(rid, f, cam, class_idx) for f in files), return_exceptions=True
        )
        items = []
        for i, res in enumerate(results):
            if isinstance(res, ApiError):
                items.append(
                    BatchItem(
                        index=i, error=Error(request_id=rid, reason=res.reason, detail=res.detail)
                    )
                )
            elif isinstance(res, BaseException):
                raise res
            else:
                items.append(BatchItem(index=i, prediction=res))
        return BatchResponse(request_id=rid, items=items)

    @api.get("/healthz", response_model=Health, summary="The process is alive (no auth)")
    async def healthz(self) -> Health:
        return Health(status="ok")

    @api.get(
        "/readyz",
        response_model=Health,
        responses={503: {"model": Error}},
        summary="A model replica is loaded and warmed up (no auth)",
    )
    async def readyz(self) -> Health:
        try:
            version = await asyncio.wait_for(self.model.ready.remote(), timeout=5)
        except (TimeoutError, *UNAVAILABLE):
            raise ApiError(
                503,
                "not_ready",
                "no model replica is ready yet",
                {"Retry-After": str(self.cfg.retry_after_s)},
            ) from None
        return Health(status="ready", model_version=version)

    @api.get("/v1/model", response_model=ModelInfo, responses=ERRORS, summary="The model card")
    async def model_info(self, request: Request) -> ModelInfo:
        self._authorize(request)
        return ModelInfo(model_version=self.model_version, card=self.card)
