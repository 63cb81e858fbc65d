"""Synthetic studies as a modality writes them: phantom films as Part 10 CR and DX files
(preamble, file meta; 12 bits stored in 16, MONOCHROME1 and 2, realistic tags), plus objects
the pipeline must not score as chest films (a CT slice, a lateral CR, an abdomen film).

Identifiers carry markers (``MARKER`` in names, ids and accession numbers, ``UID_MARKER`` in
every UID) so that a test can look for them everywhere."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MARKER = "ZQXPACS"
UID_MARKER = "7391846205"  # in every UID: digits only, as UIDs are
UID_ROOT = f"1.2.826.0.1.3680043.8.498.{UID_MARKER}."
CR, DX, CT = (
    "1.2.840.10008.5.1.4.1.1.1",
    "1.2.840.10008.5.1.4.1.1.1.1",
    "1.2.840.10008.5.1.4.1.1.2",
)


@dataclass(frozen=True)
class Film:
    patient: int
    study: int  # per patient
    kind: str = "normal"  # phantom kind: covid, bacterial, viral, normal
    modality: str = "CR"  # CR, DX or CT
    photometric: str = "MONOCHROME2"
    view: str = "PA"
    body_part: str = "CHEST"
    date: str = "20210104"
    number: int = 1  # instance within the study
    seed: int = 0


def uid(*parts: object) -> str:
    from pydicom.uid import generate_uid

    return generate_uid(UID_ROOT, entropy_srcs=[repr(parts)])


def film_dataset(f: Film, size: int = 96):
    """The film as a pydicom FileDataset with a Part 10 preamble."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    from covidray.synth import render_phantom

    sop_class = {"CR": CR, "DX": DX, "CT": CT}[f.modality]
    study_uid = uid("study", f.patient, f.study)
    series_uid = uid("series", f.patient, f.study, f.modality, f.view)
    sop_uid = uid("sop", f.patient, f.study, f.number, f.modality, f.view)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, sop_uid
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
    ds.PatientName = f"{MARKER}^Patient{f.patient}"
    ds.PatientID = f"{MARKER}-{f.patient:04d}"
    ds.PatientBirthDate = "19600101"
    ds.PatientSex = "FM"[f.patient % 2]
    ds.PatientAge = f"{55 + f.patient:03d}Y"
    ds.AccessionNumber = f"{MARKER[:4]}{f.patient}{f.study:02d}"[:16]
    ds.StudyID = f"S{f.study}"
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = f.date
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "083000"
    ds.StudyDescription = "XR CHEST" if f.body_part == "CHEST" else "XR"
    ds.ReferringPhysicianName = "Doe^Jane"
    ds.Manufacturer = "covidray-tests"
    ds.InstitutionName = "Test Hospital"
    ds.Modality = f.modality
    ds.SeriesNumber = 1 + (f.view != "PA")
    ds.InstanceNumber = f.number
    ds.BodyPartExamined = f.body_part
    if f.modality != "CT":
        ds.ViewPosition = f.view
    ds.PatientOrientation = ["L", "F"] if f.modality != "CT" else ""
    image, _ = render_phantom(f.kind, np.random.default_rng(f.seed), size=size)
    noise = np.random.default_rng(f.seed + 1).integers(0, 16, image.shape)
    pixels = (image.astype(np.uint16) << 4) + noise.astype(np.uint16)  # 12 bits
    if f.photometric == "MONOCHROME1":
        pixels = 4095 - pixels
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = f.photometric
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    if f.modality == "CT":
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        ds.ImagePositionPatient = [0, 0, 0]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [0.7, 0.7]
        ds.SliceThickness = 1.0
        ds.KVP = 120
    else:
        ds.ImageType = ["ORIGINAL", "PRIMARY"]
        ds.ImagerPixelSpacing = [0.2, 0.2]
        ds.PresentationIntentType = "FOR PRESENTATION"
        ds.WindowCenter, ds.WindowWidth = 2048, 4096
    ds.PixelData = np.ascontiguousarray(pixels.astype("<u2")).tobytes()
    return ds


def upload(orthanc, films: list[Film], size: int = 96) -> list:
    """STOW-RS the films into the archive; their datasets."""
    datasets = [film_dataset(f, size) for f in films]
    orthanc.client().store_instances(datasets)
    return datasets


def night_one() -> list[Film]:
    """Two patients, two studies each on different dates, CR and DX, MONOCHROME1 and 2; a CT
    slice in one chest study; a lateral CR; an abdomen film."""
    return [
        Film(1, 1, "covid", "CR", "MONOCHROME1", date="20210104", seed=1),
        Film(1, 1, "normal", "CR", "MONOCHROME1", view="LL", date="20210104", number=2, seed=2),
        Film(1, 2, "covid", "DX", "MONOCHROME2", date="20210111", seed=3),
        Film(2, 1, "bacterial", "DX", "MONOCHROME2", date="20210105", seed=4),
        Film(2, 1, "normal", "CT", date="20210105", number=2, seed=5),
        Film(2, 2, "normal", "DX", "MONOCHROME1", body_part="ABDOMEN", date="20210120", seed=6),
        Film(3, 1, "viral", "CR", "MONOCHROME2", date="20210106", seed=7),
    ]


def night_two() -> list[Film]:
    """New studies arriving between two nightly runs."""
    return [
        Film(1, 3, "covid", "DX", "MONOCHROME2", date="20210201", seed=11),
        Film(4, 1, "normal", "CR", "MONOCHROME1", date="20210202", seed=12),
    ]
