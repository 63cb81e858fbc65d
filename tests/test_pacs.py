"""The PACS round trip against a real Orthanc (DICOMweb plugin), through the CLI.

Synthetic studies go in over STOW-RS (:mod:`pacs_studies`); ``covidray ingest`` pulls them,
``covidray score`` scores them, ``covidray publish`` stores an SR per film and an overlay per
in-scope film, which are read back over QIDO/WADO and parsed with highdicom. Then the nightly
pipeline: only new studies, never its own results; Orthanc killed during a pull and during a
publish; a lock taken over during a run; wrong credentials and URLs. Identifiers carry markers
that must appear nowhere but the link table.
"""

from __future__ import annotations

import json
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from orthanc import PASSWORD, USER, Orthanc, installed
from pacs_studies import MARKER, UID_MARKER, night_one, night_two, upload
from tinymodels import save_tiny_model

from covidray.cli import main
from covidray.labels import CLASSES
from covidray.pacs.client import PASSWORD_ENV, USER_ENV
from covidray.pacs.ledger import uid_key
from covidray.pacs.publish import derived_uid

pytestmark = pytest.mark.skipif(
    not installed(), reason="Orthanc not installed: run scripts/install_orthanc.sh (make test)"
)
KEY = "pacs-site-key"
SR_CLASS, SC_CLASS = "1.2.840.10008.5.1.4.1.1.88.33", "1.2.840.10008.5.1.4.1.1.7"
IN_SCOPE_NIGHT_ONE = 4  # of 6 CR/DX films: a lateral CR and an abdomen film are refused


@pytest.fixture
def orthanc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    server = Orthanc(tmp_path / "orthanc").start()
    monkeypatch.setenv(USER_ENV, USER)
    monkeypatch.setenv(PASSWORD_ENV, PASSWORD)
    monkeypatch.setenv("COVIDRAY_PSEUDONYM_KEY", KEY)
    monkeypatch.setenv("COVIDRAY_LOG_DIR", str(tmp_path / "logs"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    uri = str(tmp_path_factory.mktemp("pacs-model") / "model")
    save_tiny_model(uri, seed=3, size=64)
    return uri


class Site:
    """The folders of one site: dataset, link table, scores."""

    def __init__(self, root: Path, orthanc: Orthanc, model: str) -> None:
        self.data, self.out = str(root / "data"), str(root / "out")
        self.links = str(root / "links" / "links.parquet")
        self.orthanc, self.model = orthanc, model

    def ingest(self, *extra: str) -> int:
        return main(["ingest", self.orthanc.url, self.data, "--links", self.links,
                     "--size", "64", *extra])  # fmt: skip

    def score(self) -> int:
        return main(["score", "--model", self.model, "--data", self.data, "--out", self.out])

    def publish(self, *extra: str) -> int:
        return main(["publish", "--scores", self.out, "--data", self.data, "--links",
                     self.links, "--to", self.orthanc.url, *extra])  # fmt: skip

    def nightly(self, *extra: str) -> int:
        return main(["nightly", "--source", self.orthanc.url, "--data", self.data, "--links",
                     self.links, "--model", self.model, "--out", self.out, "--size", "64",
                     *extra])  # fmt: skip

    def predictions(self) -> dict[str, dict]:
        from covidray.score.results import read_predictions

        return {r["image_id"]: r for r in read_predictions(self.out, dedupe=True).to_pylist()}

    def links_table(self) -> dict[str, dict]:
        return {r["image_id"]: r for r in pq.read_table(self.links).to_pylist()}

    def ledger(self) -> list[dict]:
        root = Path(self.out) / "pacs" / "ledger"
        return [r for f in sorted(root.glob("*.parquet")) for r in pq.read_table(f).to_pylist()]


def take(capsys, seen: list[str]) -> str:
    """stdout since the last call; stdout and stderr (the console) kept in ``seen``."""
    out, err = capsys.readouterr()
    seen += [out, err]
    return out


def json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def results_in_archive(orthanc: Orthanc) -> dict[str, list]:
    """SOP class → the result datasets (SRs and Secondary Captures) in the archive."""
    client = orthanc.client()
    found: dict[str, list] = {SR_CLASS: [], SC_CLASS: []}
    for study in client.search_for_studies():
        suid = study["0020000D"]["Value"][0]
        for inst in client.search_for_instances(study_instance_uid=suid):
            cls = inst["00080016"]["Value"][0]
            if cls in found:
                found[cls].append(
                    client.retrieve_instance(
                        suid, inst["0020000E"]["Value"][0], inst["00080018"]["Value"][0]
                    )
                )
    return found


def check_results(site: Site, n_films: int, n_in_scope: int) -> None:
    """One SR per pulled film with the prediction row's codes and probabilities, references
    right; one overlay per in-scope film, none for the refused ones."""
    import highdicom as hd

    from covidray.pacs.sr import FINDING_CODES

    links, preds = site.links_table(), site.predictions()
    by_sop = {link["sop_uid"]: link for link in links.values()}
    found = results_in_archive(site.orthanc)
    srs, scs = found[SR_CLASS], found[SC_CLASS]
    assert len(srs) == n_films == len(links)
    referenced = []
    for ds in srs:
        report = hd.sr.ComprehensiveSR.from_dataset(ds).content
        (group,) = report.get_image_measurement_groups()
        (source,) = group.source_images
        sop = source.referenced_sop_instance_uid
        referenced.append(sop)
        link = by_sop[sop]
        assert ds.StudyInstanceUID == link["study_uid"]
        row = preds[link["image_id"]]
        assert ds.SOPInstanceUID == derived_uid(sop, row["scoring_version"], "sr")
        assert ds.ContentQualification == "RESEARCH"
        evaluations = {q.name.value: q.value for q in group.get_qualitative_evaluations()}
        measured = {m.name.value: m.value for m in group.get_measurements()}
        assert evaluations["gate-verdict"].value == (
            "in-scope" if row["in_scope"] else "out-of-scope"
        )
        if row["in_scope"]:
            assert evaluations["404684003"].value == FINDING_CODES[row["label"]][0]
            for c in CLASSES:
                assert abs(measured[f"prob-{c}"] - row[f"prob_{c}"]) < 1e-6
        else:
            kind = row["gate_reason"].split(":")[0].replace("_", "-")
            assert evaluations["gate-reason"].value == kind
            assert "404684003" not in evaluations
    assert sorted(referenced) == sorted(by_sop)  # one SR per film, each film once
    assert len(scs) == n_in_scope
    in_scope = {link["sop_uid"] for i, link in links.items() if preds[i]["in_scope"]}
    version = next(iter(preds.values()))["scoring_version"]
    assert {ds.SOPInstanceUID for ds in scs} == {derived_uid(s, version, "sc") for s in in_scope}
    for ds in scs:
        assert ds.PhotometricInterpretation == "RGB" and ds.BurnedInAnnotation == "YES"
        assert ds.pixel_array.shape[2] == 3 and ds.PatientName.family_name == MARKER


def assert_private(site: Site, since: float, *texts: str) -> None:
    """No marker outside the link table: Parquet values anywhere under data and out, file
    names, the console, log files."""
    blobs = list(texts)
    for root in (site.data, site.out):
        for path in Path(root).rglob("*"):
            blobs.append(str(path))
            if path.suffix == ".parquet":
                table = pq.read_table(path)
                blobs.append(json.dumps(table.drop_columns(
                    [c for c in table.column_names if c.startswith("cam_")]).to_pylist(),
                    default=str))  # fmt: skip
    for log in (Path(site.data).parent / "logs").glob("*.log"):
        if log.stat().st_mtime >= since:
            blobs.append(log.read_text(errors="replace"))
    for blob in blobs:
        assert MARKER not in blob and UID_MARKER not in blob
        assert MARKER[:4] not in blob  # the accession numbers' marker


def test_wrong_password_or_url_is_one_line_before_any_work(orthanc, tmp_path, capsys):
    upload(orthanc, night_one()[:1])
    site = Site(tmp_path, orthanc, "unused")
    bad = [
        ("wrong password", {PASSWORD_ENV: "nope"}, orthanc.url, "refused the credentials"),
        ("wrong path", {}, orthanc.url.replace("/dicom-web", "/nothing"), "not a DICOMweb"),
        ("wrong port", {}, orthanc.url.replace(str(orthanc.port), "9"), "cannot reach"),
    ]
    mp = pytest.MonkeyPatch()
    for _, env, url, says in bad:
        for k, v in env.items():
            mp.setenv(k, v)
        for argv in (
            ["ingest", url, site.data, "--links", site.links],
            ["publish", "--scores", site.out, "--data", site.data, "--links", site.links,
             "--to", url],
        ):  # fmt: skip
            assert main(argv) == 2
            out, err = capsys.readouterr()
            lines = [ln for ln in (out + err).splitlines() if ln.startswith("error:")]
            assert len(lines) == 1 and says in lines[0] and "Traceback" not in err, lines
        mp.undo()
    assert not Path(site.data).exists() and not Path(site.links).exists()


def test_pull_score_publish_then_nightly(ray_cluster, orthanc, model, tmp_path, capsys):
    t0, seen = time.time(), []
    upload(orthanc, night_one())
    site = Site(tmp_path, orthanc, model)
    assert site.ingest() == 0
    pulled = json_lines(take(capsys, seen))[-1]
    assert (pulled["n_rows"], pulled["not_retrieved"]) == (6, {"CT": 1})
    manifest = pq.read_table(Path(site.data) / "manifest.parquet").to_pylist()
    assert {(r["modality"], r["view"], r["body_part"]) for r in manifest} >= {
        ("CR", "LL", "CHEST"), ("DX", "PA", "ABDOMEN"), ("CR", "PA", "CHEST")}  # fmt: skip
    assert all(r["study_date"] < "2021" for r in manifest)  # shifted back, never the real one
    assert site.score() == 0
    assert site.publish() == 0
    published = json_lines(take(capsys, seen))[-1]
    assert (published["n_published"], published["n_sr"], published["n_sc"]) == (6, 6, 4)
    preds = site.predictions()
    assert {r["gate_reason"] for r in preds.values() if not r["in_scope"]} == {
        "view:LL", "body_part:ABDOMEN"}  # fmt: skip
    check_results(site, 6, IN_SCOPE_NIGHT_ONE)
    assert len(site.ledger()) == 6

    upload(orthanc, night_two())  # two new studies
    assert site.nightly() == 0
    night = json_lines(take(capsys, seen))[-1]
    assert night["pull"]["n_rows"] == 2 and night["pull"]["n_skipped"] == 6
    assert night["pull"]["not_retrieved"] == {"CT": 1, "SR": 6, "OT": 4}  # never its own
    assert (night["score"]["n_scored"], night["publish"]["n_published"]) == (2, 2)
    assert site.nightly() == 0  # nothing new
    again = json_lines(take(capsys, seen))[-1]
    assert (again["pull"]["n_rows"], again["pull"]["n_skipped"]) == (0, 8)
    assert (again["score"]["n_scored"], again["publish"]["n_published"]) == (0, 0)
    check_results(site, 8, IN_SCOPE_NIGHT_ONE + 2)
    assert_private(site, t0, *seen)


def test_orthanc_killed_during_pull_and_during_publish(ray_cluster, orthanc, model, tmp_path,
                                                       capsys):  # fmt: skip
    t0, seen = time.time(), []
    upload(orthanc, night_one())
    site = Site(tmp_path, orthanc, model)
    orthanc.crash_on("GET", "/series/", nth=3)  # the third WADO-RS retrieval
    assert site.ingest("--archive-requests", "1") == 0
    pulled = json_lines(take(capsys, seen))[-1]
    assert orthanc.crashed()
    assert pulled["n_rows"] == 2 and pulled["n_retry"] == 4
    errors = pq.read_table(Path(site.data) / "errors.parquet").to_pylist()
    assert {e["reason"] for e in errors} == {"unreachable"} and len(errors) == 4
    orthanc.restart()
    orthanc.crash_on("POST", "/dicom-web/studies", nth=2)  # the second STOW-RS request
    store = ("--store-batch", "1", "--store-retries", "1", "--store-retry-wait-s", "0.1")
    rc = site.nightly(*store)  # pulls the retry rows, scores all six, publishes one film
    take(capsys, seen)
    assert rc != 0 and orthanc.crashed()
    lines = [ln for ln in seen[-1].splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "stopped answering" in lines[0]
    assert pq.read_table(Path(site.data) / "errors.parquet").num_rows == 0  # retried
    orthanc.restart()
    (entry,) = site.ledger()  # the first film only: nothing the archive did not accept
    (sr,) = results_in_archive(orthanc)[SR_CLASS]
    assert entry["sr_key"] == uid_key(sr.SOPInstanceUID, KEY.encode())

    assert site.nightly() == 0  # the rest
    night = json_lines(take(capsys, seen))[-1]
    assert (night["pull"]["n_rows"], night["score"]["n_scored"]) == (0, 0)
    assert (night["publish"]["n_published"], night["publish"]["n_in_ledger"]) == (5, 1)
    check_results(site, 6, IN_SCOPE_NIGHT_ONE)
    assert site.nightly("--store-batch", "2") == 0
    assert json_lines(take(capsys, seen))[-1]["publish"]["n_published"] == 0
    check_results(site, 6, IN_SCOPE_NIGHT_ONE)  # exactly one SR per film
    assert_private(site, t0, *seen)


def test_a_run_whose_lock_is_taken_over_stops(ray_cluster, orthanc, model, tmp_path, capsys):
    from covidray.score.lock import LOCK_NAME, LockRecord

    upload(orthanc, night_one())
    site = Site(tmp_path, orthanc, model)
    codes: list[int] = []
    run = threading.Thread(
        target=lambda: codes.append(site.nightly("--lock-stale-after-s", "1")), daemon=True
    )
    run.start()
    deadline = time.monotonic() + 120
    while not Path(site.links).exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    now = datetime.now(UTC)
    intruder = LockRecord(run_id="f" * 32, started_at=now, heartbeat_at=now, stale_after_s=600)
    (Path(site.out) / LOCK_NAME).write_text(intruder.model_dump_json())  # another run took it
    run.join(timeout=180)
    assert codes == [2]
    errors = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "took this output's lock over" in errors[0]
    assert site.ledger() == [] and results_in_archive(orthanc)[SR_CLASS] == []
    assert json.loads((Path(site.out) / LOCK_NAME).read_text())["run_id"] == "f" * 32
