"""The HTTP endpoint end to end: a real Serve application on the test session's Ray, real HTTP
on 127.0.0.1, real metrics scraped from Ray's Prometheus exporter."""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import os
import socket
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
from oddfiles import dicom_bytes, make_odd_files
from PIL import Image
from serveproc import covidray_serve

from covidray.calibration import Calibration
from covidray.codec import decode_png_u8, encode_png
from covidray.gate import fit_gate
from covidray.labels import CLASSES
from covidray.modeldir import ModelCard, save_model_dir
from covidray.models import build_model
from covidray.runtime.cluster import free_port
from covidray.synth import render_phantom
from serving.api import BatchResponse, Error, Prediction
from serving.client import run_load

SIZE = 64  # model input
SIDE = 128  # the card's shorter side: the data the model "was trained on" was ingested at 128
TOKEN = "t0ken-for-tests"


def tiny_model_dir(uri: str, seed: int = 0, contrast: str = "none", head_std: float = 0.5) -> str:
    """Lite0 with random weights (head scaled up so the classes differ), flip TTA, the
    ``contrast`` normalisation in its card."""
    torch.manual_seed(seed)
    model = build_model("efficientnet_lite0", weights=None)
    for m in model.head.modules():
        if isinstance(m, torch.nn.Linear):
            torch.nn.init.normal_(m.weight, std=head_std)
    card = ModelCard.for_model(model, SIZE, SIDE, tta_hflip=True, contrast=contrast)
    # Calibrated, and gated with a threshold nothing exceeds (the gate's own tests are
    # elsewhere): every path below must apply both the same way.
    features = np.random.default_rng(seed).normal(size=(64, model.num_features))
    gate, stats = fit_gate(features, features[:16])
    card = card.model_copy(
        update={
            "calibration": Calibration(temperature=1.6),
            "gate": gate.model_copy(update={"threshold": 1e12}),
        }
    )
    save_model_dir(model, card, uri, gate_stats=stats.to_bytes())
    return uri


def png(arr: np.ndarray) -> bytes:
    return encode_png(arr)


def full_resolution_films() -> dict[str, tuple[bytes, str]]:
    """Phantoms at full resolution (not square, up to 768 px) and a 16-bit DICOM."""
    rng = np.random.default_rng(7)
    films = {}
    for i, kind in enumerate(("covid", "bacterial", "viral", "normal")):
        img = render_phantom(kind, rng, 768)[0]
        films[f"film{i}.png"] = (png(img[: 768 - 96 * i, 40:]), "image/png")
    base = render_phantom("covid", rng, 640)[0].astype(np.uint16)
    v12 = np.clip(base * 16 + rng.integers(0, 16, base.shape), 0, 4095).astype(np.uint16)
    films["film16.dcm"] = (dicom_bytes(v12[:, 60:], bits_stored=12), "application/dicom")
    return films


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return tiny_model_dir(str(tmp_path_factory.mktemp("serve-model")))


@pytest.fixture(scope="module")
def clahe_model_dir(tmp_path_factory) -> str:
    # A small head: probabilities away from 0 and 1, so that they show any input change.
    return tiny_model_dir(
        str(tmp_path_factory.mktemp("serve-clahe")), contrast="clahe", head_std=0.05
    )


@pytest.fixture(scope="module")
def films() -> dict[str, tuple[bytes, str]]:
    return full_resolution_films()


@pytest.fixture(scope="module")
def token_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("secret") / "token"
    path.write_text(TOKEN + "\n")
    return str(path)


APP = {"max_batch_size": 8, "threads": 1, "num_cpus": 0.5, "ingress_num_cpus": 0.25}


@pytest.fixture(scope="module")
def serve_url(ray_cluster, model_dir, token_file):
    """Three applications on one Serve instance (127.0.0.1): the endpoint with a token, a
    two-replica one for the replica kill, and a tight one (batch 1, queue 1) for overload."""
    from ray import serve

    from serving.app import build_app

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    common = {**APP, "model": model_dir}
    apps = {
        "main": {**common, "api_token_file": token_file, "max_body_bytes": 4 * 2**20},
        "kill": {**common, "min_replicas": 2, "max_replicas": 2},
        "tight": {
            **common,
            "max_batch_size": 1,
            "max_replicas": 1,
            "max_queued_requests": 1,
            "batch_wait_timeout_s": 0.05,
        },
    }
    for name, args in apps.items():
        serve.run(build_app(args), name=name, route_prefix=f"/{name}")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


def auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKEN}"}


def post(url: str, data: bytes, ctype: str = "image/png", **kw) -> requests.Response:
    headers = {"Content-Type": ctype, **auth(), **kw.pop("headers", {})}
    return requests.post(url, data=data, headers=headers, timeout=60, **kw)


# --------------------------------------------------------------------------------- the API


def test_predict_schema_and_cam(serve_url, films):
    url = f"{serve_url}/main/v1/predict"
    data, ctype = films["film0.png"]
    r = post(url, data, ctype)
    assert r.status_code == 200, r.text
    p = Prediction.model_validate(r.json())
    assert r.headers["X-Request-ID"] == p.request_id
    assert set(p.probabilities) == set(CLASSES)
    assert sum(p.probabilities.values()) == pytest.approx(1.0, abs=1e-5)
    assert p.label == max(p.probabilities, key=p.probabilities.get)
    assert p.cam is not None and p.cam.explains == p.label
    raw = decode_png_u8(base64.b64decode(p.cam.png_base64))
    assert raw.shape == p.cam.shape == (2, 2)  # Lite0's last feature map at 64 px
    assert raw.max() == 255 and 0 <= p.affected_area <= 1
    assert p.timing_ms.model > 0 and p.timing_ms.decode > 0 and p.timing_ms.queue >= 0
    assert p.in_scope is True and p.gate_reason is None and p.ood_score > 0

    other = next(c for c in CLASSES if c != p.label)
    r = post(f"{url}?cam=array&class={other}", data, ctype)
    q = Prediction.model_validate(r.json())
    assert q.cam.explains == other and np.asarray(q.cam.array).shape == (2, 2)
    assert q.probabilities == pytest.approx(p.probabilities, abs=1e-6)
    assert Prediction.model_validate(post(f"{url}?cam=none", data).json()).cam is None

    files = {"file": ("film0.png", data, "image/png")}
    r = requests.post(url, files=files, headers=auth(), timeout=60)  # multipart
    assert r.status_code == 200, r.text
    assert r.json()["probabilities"] == pytest.approx(p.probabilities, abs=1e-6)
    assert requests.get(f"{serve_url}/main/openapi.json", timeout=30).json()["paths"]


def test_auth_probes_and_model_card(serve_url, films, model_dir):
    url = f"{serve_url}/main/v1/predict"
    data = films["film1.png"][0]
    r = requests.post(url, data=data, headers={"Content-Type": "image/png"}, timeout=30)
    assert r.status_code == 401 and r.headers["WWW-Authenticate"] == "Bearer"
    assert Error.model_validate(r.json()).reason == "unauthorized"
    bad = {"Content-Type": "image/png", "Authorization": "Bearer wrong"}
    assert requests.post(url, data=data, headers=bad, timeout=30).status_code == 401
    assert requests.get(f"{serve_url}/main/v1/model", timeout=30).status_code == 401
    assert requests.get(f"{serve_url}/main/healthz", timeout=30).json()["status"] == "ok"
    ready = requests.get(f"{serve_url}/main/readyz", timeout=30).json()
    assert ready["status"] == "ready" and ready["model_version"]
    card = requests.get(f"{serve_url}/main/v1/model", headers=auth(), timeout=30).json()
    assert card["model_version"] == ready["model_version"]
    assert model_dir not in str(card)


def test_size_type_and_decode_errors(serve_url, films):
    url = f"{serve_url}/main/v1/predict"
    chunked = requests.post(
        url, data=iter([films["film0.png"][0]]), headers={"Content-Type": "image/png", **auth()}
    )
    assert chunked.status_code == 411 and chunked.json()["reason"] == "length_required"
    big = post(url, b"\0" * (4 * 2**20 + 1))
    assert big.status_code == 413 and big.json()["reason"] == "too_large"
    assert post(url, b"hello", "text/plain").status_code == 415
    cut = films["film0.png"][0][:5000]
    r = post(url, cut)
    assert r.status_code == 422 and r.json()["reason"] == "truncated"
    assert post(f"{url}?class=lungs", films["film0.png"][0]).status_code == 422


def test_batch_with_good_and_corrupt_images(serve_url, films):
    good = films["film2.png"][0]
    files = [
        ("file", ("a.png", good, "image/png")),
        ("file", ("b.png", good[: len(good) // 2], "image/png")),
        ("file", ("c.dcm", films["film16.dcm"][0], "application/dicom")),
        ("file", ("d.txt", b"not an image at all", "text/plain")),
    ]
    r = requests.post(f"{serve_url}/main/v1/predict:batch", files=files, headers=auth())
    assert r.status_code == 200, r.text
    items = BatchResponse.model_validate(r.json()).items
    assert [i.index for i in items] == [0, 1, 2, 3]
    assert items[0].prediction and items[2].prediction
    assert items[1].error.reason == "truncated" and items[3].error.reason == "not_an_image"
    single = Prediction.model_validate(post(f"{serve_url}/main/v1/predict", good).json())
    assert items[0].prediction.probabilities == pytest.approx(single.probabilities, abs=1e-6)


def test_odd_files_never_5xx(serve_url):
    for f in make_odd_files(0):
        r = post(f"{serve_url}/main/v1/predict", f.data, "application/dicom")
        assert r.status_code < 500, (f.name, r.status_code, r.text)
        if f.good:
            assert r.status_code == 200, (f.name, r.text)
        else:
            assert r.status_code == 422 and r.json()["reason"] == f.reason, (f.name, r.text)


def test_overload_answers_503_with_retry_after(serve_url, films):
    outcomes, _ = run_load(
        f"{serve_url}/tight/v1/predict", [films["film3.png"][0]], concurrency=48, requests=96
    )
    statuses = {o.status for o in outcomes}
    assert statuses <= {200, 503}, statuses
    refused = [o for o in outcomes if o.status == 503]
    assert refused and any(o.status == 200 for o in outcomes)
    assert all(o.retry_after == "1" for o in refused)


def test_replica_kill_loses_at_most_what_one_retry_recovers(serve_url, films):
    """Two replicas under load; one is killed. Without retries some requests in flight get 503
    (never a hang); with one retry after Retry-After at least 99 % succeed."""
    import ray
    from ray.util.state import list_actors

    url = f"{serve_url}/kill/v1/predict"
    images = [films[f"film{i}.png"][0] for i in range(4)]

    # The session's own cluster, by address: without one the state API looks for "the" Ray of
    # this machine and fails (or picks another's) when another Ray runs beside it.
    gcs = ray.get_runtime_context().gcs_address

    def replicas() -> list:
        alive = list_actors(address=gcs, filters=[("state", "=", "ALIVE")])
        return [a for a in alive if a.class_name == "ServeReplica:kill:CxrModel"]

    assert len(replicas()) == 2

    def load_and_kill(retries: int) -> list:
        import threading

        victim = replicas()[0]
        timer = threading.Timer(
            3.0, lambda: ray.kill(ray.get_actor(victim.name, namespace="serve"))
        )
        timer.start()
        outcomes, _ = run_load(
            url, images, concurrency=8, requests=200, retries=retries, timeout=60
        )
        timer.join()
        return outcomes

    plain = load_and_kill(retries=0)
    assert all(o.status in (200, 503) for o in plain), {o.status for o in plain}
    assert all(o.retry_after for o in plain if o.status == 503)
    time.sleep(15)  # Serve replaces the killed replica
    retried = load_and_kill(retries=1)
    ok = sum(o.status == 200 for o in retried) / len(retried)
    print(
        f"replica kill: {sum(o.status == 200 for o in plain)}/{len(plain)} ok without retry, "
        f"{ok:.3f} with one retry"
    )
    assert ok >= 0.99


# ---------------------------------------------------------------------------- metrics


def _scrape() -> str:
    import ray

    port = next(n["MetricsExportPort"] for n in ray.nodes() if n["Alive"])
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        return r.read().decode()


def _value(text: str, name: str, *tags: str) -> float:
    """The sum of ``name``'s samples whose labels include every ``tags`` (``'k="v"'``)."""
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name)
        and not line.startswith("#")
        and all(t in line.rsplit(" ", 1)[0] for t in tags)
    )


def test_every_answer_is_counted_by_label_or_refusal_reason(serve_url, films):
    """``covidray_predictions`` counts every 200: by predicted class, and the images the gate
    refused by reason, those refused by their DICOM header (answered before the model) too."""
    name = "ray_covidray_predictions_total"
    pixels = np.arange(128 * 128, dtype=np.uint16).reshape(128, 128)
    ct = dicom_bytes(pixels, Modality="CT")
    before = _scrape()
    expected: dict[tuple[str, str], int] = {}
    for data, ctype in (
        (films["film0.png"][0], "image/png"),
        (ct, "application/dicom"),
        (ct, "application/dicom"),
        (films["film2.png"][0], "image/png"),
    ):
        r = post(f"{serve_url}/main/v1/predict?cam=none", data, ctype)
        assert r.status_code == 200, r.text
        p = Prediction.model_validate(r.json())
        key = (p.label or "out_of_scope", p.gate_reason or "none")
        expected[key] = expected.get(key, 0) + 1
    assert expected[("out_of_scope", "modality:CT")] == 2

    def tags(key: tuple[str, str]) -> tuple[str, str]:
        return (f'label="{key[0]}"', f'reason="{key[1]}"')

    deadline = time.monotonic() + 120  # Ray exports on an interval
    while True:
        text = _scrape()
        short = {
            k: n
            for k, n in expected.items()
            if _value(text, name, *tags(k)) - _value(before, name, *tags(k)) < n
        }
        if not short:
            break
        assert time.monotonic() < deadline, f"not counted: {short}"
        time.sleep(3)


def test_metrics_on_rays_prometheus_endpoint(serve_url, films):
    for name in ("film0.png", "film1.png"):
        post(f"{serve_url}/main/v1/predict", films[name][0])
    post(f"{serve_url}/main/v1/predict", b"garbage bytes")
    wanted = (
        "ray_covidray_predictions_total",
        "ray_covidray_model_time_ms_count",
        "ray_covidray_decode_errors_total",
        "ray_serve_num_http_requests_total",
        "ray_serve_actual_batch_size_count",
    )
    deadline = time.monotonic() + 120  # Ray exports on an interval
    while True:
        text = _scrape()
        missing = [n for n in wanted if _value(text, n) <= 0]
        if not missing:
            break
        assert time.monotonic() < deadline, f"never exported: {missing}"
        time.sleep(3)
    assert 'reason="not_an_image"' in text


def test_listens_on_loopback_only(serve_url):
    """The Serve proxy and Ray's metrics exporter refuse this host's other addresses."""
    import ray

    others = {
        ip
        for *_, addr in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET)
        for ip in [addr[0]]
        if not ip.startswith("127.")
    }
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:  # the address of the default route (a UDP "connect" sends nothing)
            probe.connect(("192.0.2.1", 9))
            others.add(probe.getsockname()[0])
        except OSError:
            pass
    others = {ip for ip in others if not ip.startswith("127.")}
    if not others:
        pytest.skip("this host has no address besides loopback")
    metrics_port = next(n["MetricsExportPort"] for n in ray.nodes() if n["Alive"])
    serve_port = int(serve_url.rsplit(":", 1)[1])
    for ip in others:
        for port in (serve_port, metrics_port):
            with socket.socket() as s:
                s.settimeout(2)
                assert s.connect_ex((ip, port)) != 0, f"{ip}:{port} answers"


# ------------------------------------------------------------- one preprocessing path


@pytest.mark.parametrize("app", ["main", "clahe"])
def test_endpoint_score_and_evaluate_agree_on_raw_films(
    app, serve_url, films, model_dir, clahe_model_dir, tmp_path
):
    """Full-resolution phantoms and a 16-bit DICOM: the endpoint, ``covidray score`` on the
    raw files and ``evaluate`` after ingest give the same probabilities (1e-4); also for a
    model whose card asks for CLAHE (the one preprocessing path applies it everywhere)."""
    from covidray.config import IngestConfig
    from covidray.dataset import load_rows
    from covidray.evaluation.evaluate import predict_rows
    from covidray.ingest import ingest
    from covidray.predict import Predictor
    from covidray.score import ScoreConfig, read_predictions, run_score

    raw = tmp_path / "raw"
    raw.mkdir()
    with open(raw / "manifest.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["image", "label", "patient_id"])
        for i, (name, (data, _)) in enumerate(sorted(films.items())):
            (raw / name).write_bytes(data)
            w.writerow([name, CLASSES[i % 3], f"p:{i}"])
    ids = {hashlib.sha256(d).hexdigest(): n for n, (d, _) in films.items()}

    if app == "clahe":  # deployed for this test alone: the session's Ray has 4 CPUs
        from ray import serve

        from serving.app import build_app

        serve.run(build_app({**APP, "model": clahe_model_dir}), name=app, route_prefix=f"/{app}")
    endpoint, unequal = {}, []  # unequal: how far CLAHE moves each film's probabilities
    for image_id, name in ids.items():
        data, ctype = films[name]
        r = post(f"{serve_url}/{app}/v1/predict?cam=none", data, ctype)
        assert r.status_code == 200, r.text
        endpoint[image_id] = [r.json()["probabilities"][c] for c in CLASSES]

    if app == "clahe":
        serve.delete(app)  # its CPUs back for the scoring job's actors
        # Without CLAHE the same model would answer otherwise: agreement below is no accident.
        from covidray.preprocess import prepare_bytes

        predictor = Predictor.from_dir(clahe_model_dir, device="cpu", threads=1)
        prep = predictor.card.preprocessing
        plain = prep.model_copy(update={"contrast": "none"})
        for data, _ in films.values():
            both = np.stack([prepare_bytes(data, prep), prepare_bytes(data, plain)])[:, None]
            probs = predictor.predict_many(both, 2, with_cam=False).probs
            unequal.append(float(np.abs(probs[0] - probs[1]).max()))
    model = model_dir if app == "main" else clahe_model_dir
    out = tmp_path / "scores"
    run_score(ScoreConfig(model=model, data=str(raw), out=str(out), read_chunk=8))
    rows = read_predictions(str(out)).to_pylist()
    scored = {r["image_id"]: [r[f"prob_{c}"] for c in CLASSES] for r in rows if r["image_id"]}
    assert scored.keys() == endpoint.keys()
    assert app == "main" or min(unequal) > 1e-3

    ds = tmp_path / "ds"
    ingest(IngestConfig(src=str(raw), dest=str(ds), size=SIDE))
    rows = load_rows(str(ds))
    res = predict_rows(Predictor.from_dir(model, device="cpu", threads=1), rows)
    evaluated = dict(zip(rows["image_id"], res.probs.tolist(), strict=True))
    assert evaluated.keys() == endpoint.keys()
    for image_id in endpoint:
        np.testing.assert_allclose(scored[image_id], endpoint[image_id], atol=1e-4)
        np.testing.assert_allclose(evaluated[image_id], endpoint[image_id], atol=1e-4)


# ------------------------------------------------------------------- covidray serve


def test_covidray_serve_runs_locally_and_stops_on_ctrl_c(model_dir, films):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "COVIDRAY_API_TOKEN")}
    args = ["--model", model_dir, "--port", str(port), "--replicas", "1", "--threads", "1"]
    with covidray_serve([*args, "--num-cpus", "0.5", "--max-batch-size", "4"], env) as printed:
        assert f"http://127.0.0.1:{port}" in printed, printed[-2000:]
        r = requests.post(
            f"http://127.0.0.1:{port}/v1/predict",
            data=films["film0.png"][0],
            headers={"Content-Type": "image/png"},
            timeout=60,
        )
        assert r.status_code == 200, r.text
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0  # nothing listens any more


# ------------------------------------------------------------------------ unit tests


def test_config_and_token(monkeypatch, tmp_path):
    from serving.config import API_TOKEN_ENV, ServingConfig, api_token

    cfg = ServingConfig(model="m", max_batch_size=12)
    assert cfg.max_ongoing_requests == 24  # a batch can fill: Serve's default 5 would cap it
    assert cfg.ingress_max_ongoing_requests >= cfg.max_ongoing_requests * cfg.max_replicas
    with pytest.raises(ValueError):
        ServingConfig(model="m", min_replicas=3, max_replicas=2)
    monkeypatch.delenv(API_TOKEN_ENV, raising=False)
    assert api_token(cfg) is None
    monkeypatch.setenv(API_TOKEN_ENV, "from-env")
    assert api_token(cfg) == "from-env"
    (tmp_path / "t").write_text("from-file\n")
    assert api_token(cfg.model_copy(update={"api_token_file": str(tmp_path / "t")})) == "from-file"


def test_card_redaction():
    from serving.deployments import REDACTED, redact

    card = {
        "training_config": {"data": "demo-output/ds", "out": "s3://b/run", "weights": "imagenet"},
        "training": {"run_path": "/tmp/x", "history": [{"sample_uri": "s3://b/s.png"}]},
        "backbone": "efficientnet_lite0",
    }
    out = redact(card)
    assert out["training_config"] == {"data": REDACTED, "out": REDACTED, "weights": "imagenet"}
    assert out["training"]["run_path"] == REDACTED
    assert out["training"]["history"][0]["sample_uri"] == REDACTED
    assert out["backbone"] == "efficientnet_lite0"


def test_decoded_image_round_trip():
    """The raw map PNG the API returns is what the nightly job stores (same codec)."""
    img = Image.fromarray(np.arange(16, dtype=np.uint8).reshape(4, 4) * 16)
    buf = io.BytesIO()
    img.save(buf, "PNG")
    assert (
        decode_png_u8(encode_png(decode_png_u8(buf.getvalue()))).tolist()
        == np.asarray(img).tolist()
    )


def test_serve_config_file_is_a_valid_serve_config():
    """serving/config.yaml: Serve's own schema accepts it, its import path resolves, its args
    are a ServingConfig (what `serve run`, `serve deploy` and the RayService all read)."""
    import importlib

    import yaml
    from ray.serve.schema import ServeDeploySchema

    from serving.config import ServingConfig

    raw = yaml.safe_load((Path(__file__).resolve().parents[1] / "serving/config.yaml").read_text())
    schema = ServeDeploySchema.model_validate(raw)
    (app,) = schema.applications
    module, _, name = app.import_path.partition(":")
    assert callable(getattr(importlib.import_module(module), name))
    ServingConfig.model_validate(app.args)
    assert schema.http_options.host == "127.0.0.1"


def test_dicom_header_out_of_scope_never_reaches_the_model(serve_url):
    """A CT or lateral DICOM is answered from its header: in_scope false, a reason, no scores."""
    pixels = np.arange(128 * 128, dtype=np.uint16).reshape(128, 128)
    for attrs, reason in (
        (dict(Modality="CT"), "modality:CT"),
        (dict(ViewPosition="LL"), "view:LL"),
    ):
        r = post(f"{serve_url}/main/v1/predict", dicom_bytes(pixels, **attrs), "application/dicom")
        assert r.status_code == 200, r.text
        p = Prediction.model_validate(r.json())
        assert (p.in_scope, p.gate_reason, p.label, p.probabilities) == (False, reason, None, None)
        assert p.timing_ms.model == 0
