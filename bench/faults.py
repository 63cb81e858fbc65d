"""What today's storage code and scoring job survive when S3 misbehaves.

    .venv/bin/python bench/faults.py [--only storage|score] [--quick] [--outage-s 60]

A moto S3 server on 127.0.0.1 with the fault proxy of ``tests/faultproxy.py`` in front of it;
``AWS_ENDPOINT_URL`` points at the proxy before anything (Ray included) starts, so the driver
and every Ray worker go through it. Nothing in covidray is changed or configured: s3fs and
botocore run with the defaults the code uses today (printed first, read from the installed
versions).

(a) storage: ``storage.read_many`` of 20 objects of 16 KB, ``storage.write_bytes`` of one and
    ``storage.write_parquet`` of a small table, the three at once, per fault. Recorded: reads
    that came back as bytes or as an exception (and which), whether each write raised, whether
    its object exists afterwards (checked on moto directly), seconds, and the requests the proxy
    saw (attempts). "Permanent" faults last until the operations end: their time to failure is
    the retry budget.
(b) score: ``run_score`` over 24 phantoms ingested to ``s3://bench/ds`` (ingested through moto
    directly, 128 px), a Lite0 model with random weights at 64 px (saved to S3 directly), one
    scoring actor, read chunks and Parquet files of 8 rows. The fault starts when the proxy sees
    the first image GET (or the first prediction PUT), lasts ``--outage-s`` seconds or the
    whole run. Recorded: what run_score returned or raised, the rows in the output afterwards
    by error reason, images without a row (lost), then a rerun without faults: what it scored
    and what it skipped as already done.

Prints a table per part, the load average, and a last line ``RESULT {json}``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # faultproxy; covidray: installed, or PYTHONPATH

for _key, _value in {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AUTH_MODE": "disabled",
}.items():
    os.environ.setdefault(_key, _value)
os.environ.pop("AWS_PROFILE", None)
os.environ.pop("RAY_ADDRESS", None)

from faultproxy import FaultProxy  # noqa: E402

BUCKET = "bench"
DATA = f"s3://{BUCKET}/ds"
MODEL = f"s3://{BUCKET}/model"
N_OBJECTS, OBJECT_BYTES = 20, 16 * 1024
MODEL_SIZE = 64


def short(exc: BaseException | str, n: int = 160) -> str:
    """``Type: message`` on one line."""
    text = exc if isinstance(exc, str) else f"{type(exc).__name__}: {exc}"
    text = re.sub(r"\x1b\[[0-9;]*m", "", " ".join(text.split()))
    text = re.sub(r'"?https?://[^"\s]*"?', "URL", text)
    return text if len(text) <= n else text[: n - 1] + "…"


def root_cause(trace: str) -> str:
    """The last non-Ray exception line of a (Ray task's) traceback text."""
    found = re.findall(r"^((?:\w+\.)*\w+(?:Error|Exception)): (.*)$", trace, re.MULTILINE)
    found = [(t, m) for t, m in found if not t.startswith("ray.")]
    return f"{found[-1][0].rsplit('.', 1)[-1]}: {found[-1][1]}" if found else ""


def load() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


def timed(fn, cap_s: float) -> dict:
    """Run ``fn`` in a thread; its value or exception, and seconds (None: still running)."""
    box: dict = {}

    def run() -> None:
        t0 = time.monotonic()
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - recorded, not handled
            box["error"] = exc
            box["trace"] = traceback.format_exc()
        box["s"] = round(time.monotonic() - t0, 1)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(cap_s)
    if thread.is_alive():
        box["s"] = None
    return box


# ----------------------------------------------------------------------------- set-up


def start_ray() -> str:
    """A local Ray as covidray starts it (workers get this process's AWS_* settings); returns
    where a Ray worker imports covidray from."""
    import ray

    from covidray.runtime.cluster import ensure_ray

    ensure_ray(num_cpus=4, log_to_driver=False)

    @ray.remote(num_cpus=0)
    def where() -> str:
        import covidray

        return covidray.__file__

    return ray.get(where.remote())


def set_endpoint(url: str) -> None:
    os.environ["AWS_ENDPOINT_URL"] = url


def prepare(direct: str) -> dict:
    """Bucket, test objects, phantom dataset and model on moto, written without the proxy."""
    import boto3
    import torch

    from covidray import storage
    from covidray.config import IngestConfig
    from covidray.ingest import ingest
    from covidray.modeldir import ModelCard, save_model_dir
    from covidray.models import build_model
    from covidray.synth import write_phantoms

    set_endpoint(direct)
    boto3.client("s3", endpoint_url=direct).create_bucket(Bucket=BUCKET)
    for i in range(N_OBJECTS):
        storage.write_bytes(f"s3://{BUCKET}/objs/{i:02d}.bin", os.urandom(OBJECT_BYTES))
    with tempfile.TemporaryDirectory(prefix="faults-phantoms-") as raw:
        write_phantoms(raw, n_per_class=8, seed=0, size=128)
        ingested = ingest(IngestConfig(src=raw, dest=DATA, size=128))
    torch.manual_seed(0)
    model = build_model("efficientnet_lite0", weights=None)
    for m in model.head.modules():
        if isinstance(m, torch.nn.Linear):
            torch.nn.init.normal_(m.weight, std=0.5)
    card = save_model_dir(model, ModelCard.for_model(model, MODEL_SIZE), MODEL)
    return {"n_images": ingested.n_rows, "model_version": card.model_version}


def retry_settings() -> dict:
    """The effective retry and timeout settings of covidray's S3 filesystem (today's code)."""
    import botocore
    import botocore.configprovider as cp
    import s3fs

    from covidray import storage

    fs, _ = storage.filesystem(f"s3://{BUCKET}")
    cfg = fs.s3.meta.config
    legacy = json.loads((Path(botocore.__file__).parent / "data" / "_retry.json").read_text())[
        "retry"
    ]["__default__"]
    return {
        "s3fs": s3fs.__version__,
        "botocore": botocore.__version__,
        "s3fs_retries": fs.retries,
        "s3fs_backoff_s": [round(min(1.7**i * 0.1, 15), 3) for i in range(fs.retries)],
        "retry_mode": cfg.retries.get("mode", cp._DEFAULT_RETRY_MODE),
        "botocore_retries_config": cfg.retries,
        "legacy_max_attempts": legacy["max_attempts"],
        "legacy_delay": legacy["delay"],
        "connect_timeout_s": cfg.connect_timeout,
        "read_timeout_s": cfg.read_timeout,
        "max_pool_connections": cfg.max_pool_connections,
    }


# ----------------------------------------------------------------------------- (a) storage


STORAGE_CASES: list[tuple[str, dict]] = [
    ("ok", {}),
    ("503 all, 10 s", {"kind": "http503", "duration": 10}),
    ("503 all, 60 s", {"kind": "http503", "duration": 60}),
    ("503 all, permanent", {"kind": "http503"}),
    ("503 on 30 %", {"kind": "http503", "share": 0.3}),
    ("reset all, permanent", {"kind": "reset"}),
    ("reset 30 %", {"kind": "reset", "share": 0.3}),
    ("slow 2 s all", {"kind": "slow", "delay": 2}),
    ("slow 20 s all, 60 s", {"kind": "slow", "delay": 20, "duration": 60}),
    ("slow 20 s all, permanent", {"kind": "slow", "delay": 20}),
    ("drop mid-body all, permanent", {"kind": "drop_mid_body"}),
    ("drop mid-body GETs, permanent", {"kind": "drop_mid_body", "methods": ["GET"]}),
    ("drop mid-body 30 %", {"kind": "drop_mid_body", "share": 0.3}),
    ("outage {o} s", {"kind": "outage", "duration": "OUTAGE"}),
    # Requests arriving in the first second hang for 120 s, then get a reset; later ones pass.
    ("stall 120 s, 1st second", {"kind": "stall", "delay": 120, "duration": 1}),
    ("stall 120 s, PUTs of 1st second", {"kind": "stall", "delay": 120, "duration": 1,
                                         "methods": ["PUT"]}),
]  # fmt: skip


def storage_case(proxy: FaultProxy, direct: str, name: str, fault: dict, cap_s: float) -> dict:
    import boto3
    import pyarrow as pa

    from covidray import storage

    tag = "".join(c if c.isalnum() else "-" for c in name)
    uris = [f"s3://{BUCKET}/objs/{i:02d}.bin" for i in range(N_OBJECTS)]
    table = pa.table({"i": list(range(1000)), "s": [f"row {i}" for i in range(1000)]})
    ops = {
        "read_many": lambda: storage.read_many(uris),
        "write_bytes": lambda: storage.write_bytes(f"s3://{BUCKET}/w/{tag}.bin", b"w" * 20000),
        "write_parquet": lambda: storage.write_parquet(table, f"s3://{BUCKET}/w/{tag}.parquet"),
    }
    proxy.reset_counters()
    if fault:
        proxy.set_fault(**fault)
    boxes: dict[str, dict] = {}
    threads = [
        threading.Thread(target=lambda k=k, fn=fn: boxes.__setitem__(k, timed(fn, cap_s)))
        for k, fn in ops.items()
    ]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = round(time.monotonic() - t0, 1)
    stats = proxy.stats()
    proxy.clear()
    row: dict = {"case": name, "fault": fault, "wall_s": wall, "proxy": stats, "load": load()}
    r = boxes["read_many"]
    if r["s"] is None:
        row["read"] = f"still running after {cap_s:.0f} s"
    elif "error" in r:
        row["read"] = f"raised {short(r['error'])}"
    else:
        errs = Counter(type(x).__name__ for x in r["value"] if isinstance(x, Exception))
        first = next((x for x in r["value"] if isinstance(x, Exception)), None)
        n_ok = N_OBJECTS - sum(errs.values())
        row["read"] = f"{n_ok}/{N_OBJECTS} ok" + (
            f"; {dict(errs)}" + (f" e.g. {short(first, 120)}" if first else "") if errs else ""
        )
    row["read_s"] = r["s"]
    s3 = boto3.client("s3", endpoint_url=direct)
    for op, key in (("write_bytes", f"w/{tag}.bin"), ("write_parquet", f"w/{tag}.parquet")):
        b = boxes[op]
        try:
            s3.head_object(Bucket=BUCKET, Key=key)
            stored = "object stored"
        except Exception:  # noqa: BLE001 - 404
            stored = "no object"
        if b["s"] is None:
            outcome = f"still running after {cap_s:.0f} s"
        else:
            outcome = f"raised {short(b['error'], 120)}" if "error" in b else "ok"
        row[op] = f"{outcome}; {stored}"
        row[f"{op}_s"] = b["s"]
    return row


# ----------------------------------------------------------------------------- (b) score


def score_cases(outage_s: float) -> list[tuple[str, str, dict]]:
    """(name, trigger, fault): trigger ``image`` (first image GET) or ``put`` (first
    prediction PUT); the fault lasts its ``duration`` or until the run ends."""
    o = outage_s
    return [
        ("ok", "image", {}),
        (f"503 all, {o:.0f} s", "image", {"kind": "http503", "duration": o}),
        ("503 on 30 %", "image", {"kind": "http503", "share": 0.3}),
        ("reset 30 %", "image", {"kind": "reset", "share": 0.3}),
        ("slow 2 s all", "image", {"kind": "slow", "delay": 2}),
        (f"slow 20 s all, {o:.0f} s", "image", {"kind": "slow", "delay": 20, "duration": o}),
        ("drop mid-body, image GETs", "image", {"kind": "drop_mid_body", "methods": ["GET"]}),
        ("drop mid-body 30 %", "image", {"kind": "drop_mid_body", "share": 0.3}),
        ("drop mid-body, PUTs", "image", {"kind": "drop_mid_body", "methods": ["PUT"]}),
        (f"outage {o:.0f} s at 1st image GET", "image", {"kind": "outage", "duration": o}),
        (f"outage {o:.0f} s at 1st result PUT", "put", {"kind": "outage", "duration": o}),
        ("stall 120 s at 1st result PUT", "put", {"kind": "stall", "delay": 120, "duration": 1}),
    ]


def score_case(proxy: FaultProxy, n_images: int, name: str, trigger: str, fault, cap_s) -> dict:
    from covidray.score import ScoreConfig, read_predictions, run_score

    tag = "".join(c if c.isalnum() else "-" for c in name).strip("-")
    out = f"s3://{BUCKET}/scores/{tag}"
    prefix = f"/{BUCKET}/ds/images/" if trigger == "image" else f"/{BUCKET}/scores/{tag}/"
    method = "GET" if trigger == "image" else "PUT"
    fired: dict = {}

    def hook(m: str, path: str) -> None:
        if not fired and m == method and path.startswith(prefix):
            fired["t"] = time.monotonic()
            if fault:
                proxy.set_fault(**fault)

    cfg = ScoreConfig(
        model=MODEL, data=DATA, out=out, batch_size=8, rows_per_file=8, read_chunk=8,
        workers=1, threads=1,
    )  # fmt: skip
    proxy.reset_counters()
    proxy.on_request = hook
    t0 = time.monotonic()
    box = timed(lambda: run_score(cfg), cap_s)
    proxy.on_request = None
    proxy.clear()
    stats = proxy.stats()
    row: dict = {"case": name, "trigger": trigger, "fault": fault, "proxy": stats}
    row["fault_at_s"] = round(fired["t"] - t0, 1) if fired else None
    row["wall_s"] = box["s"]
    if box["s"] is None:
        row["run"] = f"still running after {cap_s:.0f} s"
        return row
    if "error" in box:
        cause = root_cause(box["trace"])
        row["run"] = f"raised {type(box['error']).__name__}" + (
            f" <- {short(cause, 120)}" * bool(cause)
        )
        row["trace"] = box["trace"][-3000:]
    else:
        r = box["value"]
        row["run"] = f"ok: scored {r.n_scored}, errors {r.n_errors} {r.error_reasons or ''}"
        row["result"] = r.model_dump()
    t = read_predictions(out).to_pandas()
    row["rows"] = len(t)
    row["rows_by_error"] = {
        str(k): int(v) for k, v in t["error"].fillna("-").value_counts().items()
    }
    details = Counter(str(d)[:90] for d in t["error_detail"].dropna())
    row["error_details"] = dict(details)
    row["lost"] = n_images - t["uri"].nunique()
    row["load"] = load()
    again = timed(lambda: run_score(cfg), cap_s)
    if again["s"] is None or "error" in again:
        row["rerun"] = "did not finish" if again["s"] is None else f"raised {short(again['error'])}"
    else:
        r2 = again["value"]
        final = read_predictions(out).to_pandas()
        row["rerun"] = (
            f"scored {r2.n_scored}, skipped {r2.n_skipped}, errors {r2.n_errors}; "
            f"predictions now {int(final['label'].notna().sum())}/{n_images}"
        )
    return row


# ----------------------------------------------------------------------------- main


def table(rows: list[dict], cols: list[str]) -> str:
    text = [[str(r.get(c, ""))[:90] for c in cols] for r in rows]
    widths = [max(len(c), *(len(t[i]) for t in text)) for i, c in enumerate(cols)]
    lines = [" | ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True))]
    lines.append("-+-".join("-" * w for w in widths))
    lines += [" | ".join(v.ljust(w) for v, w in zip(t, widths, strict=True)) for t in text]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", choices=["storage", "score"])
    parser.add_argument("--quick", action="store_true", help="skip the permanent slow-20 s case")
    parser.add_argument("--outage-s", type=float, default=60.0)
    parser.add_argument("--cases", default="", help="comma-separated substrings of case names")
    parser.add_argument("--cap-s", type=float, default=900.0, help="give up on an op after")
    args = parser.parse_args()
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    from moto.server import ThreadedMotoServer

    wanted = [c for c in args.cases.split(",") if c]
    picked = lambda name: not wanted or any(w in name for w in wanted)  # noqa: E731
    import covidray

    result: dict = {"load_start": load(), "covidray": covidray.__file__}
    print(f"covidray from {covidray.__file__}", flush=True)
    print(f"load average at start: {result['load_start']}", flush=True)
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    moto.start()
    host, port = moto.get_host_and_port()
    direct = f"http://{host}:{port}"
    try:
        with FaultProxy(direct) as proxy:
            t0 = time.monotonic()
            result["setup"] = prepare(direct)
            print(f"set-up {time.monotonic() - t0:.1f} s: {result['setup']}", flush=True)
            set_endpoint(proxy.url)  # from here on, everything goes through the proxy
            result["retry_settings"] = retry_settings()
            print("retry settings:", json.dumps(result["retry_settings"]), flush=True)
            if args.only in (None, "storage"):
                rows = []
                for name, fault in STORAGE_CASES:
                    fault = dict(fault)
                    if fault.get("duration") == "OUTAGE":
                        fault["duration"] = args.outage_s
                    name = name.format(o=f"{args.outage_s:.0f}")
                    if not picked(name) or (args.quick and name == "slow 20 s all, permanent"):
                        continue
                    rows.append(storage_case(proxy, direct, name, fault, args.cap_s))
                    r = rows[-1]
                    print(f"[storage] {name}: {json.dumps(r, default=str)}", flush=True)
                result["storage"] = rows
                cols = ["case", "read", "read_s", "write_bytes", "write_bytes_s"]
                cols += ["write_parquet", "write_parquet_s", "load"]
                print("\n(a) storage\n" + table(rows, cols), flush=True)
            if args.only in (None, "score"):
                t1 = time.monotonic()
                worker_src = start_ray()
                if worker_src != covidray.__file__:  # e.g. the worker's cwd is another checkout
                    raise SystemExit(f"Ray workers import {worker_src}, not {covidray.__file__}")
                print(f"Ray started in {time.monotonic() - t1:.1f} s", flush=True)
                rows = []
                n = result["setup"]["n_images"]
                for name, trigger, fault in score_cases(args.outage_s):
                    if not picked(name):
                        continue
                    rows.append(score_case(proxy, n, name, trigger, fault, args.cap_s))
                    r = {k: v for k, v in rows[-1].items() if k != "trace"}
                    print(f"[score] {name}: {json.dumps(r, default=str)}", flush=True)
                result["score"] = rows
                cols = ["case", "fault_at_s", "run", "wall_s", "rows_by_error", "lost", "rerun"]
                print("\n(b) score\n" + table(rows, cols + ["load"]), flush=True)
    finally:
        try:
            import ray

            ray.shutdown()
        finally:
            moto.stop()
    result["load_end"] = load()
    print(f"load average at end: {result['load_end']}")
    print("RESULT " + json.dumps(result, default=str))


if __name__ == "__main__":
    main()
