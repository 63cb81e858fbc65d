"""The DICOM Structured Report of one film's result, built with highdicom's TID 1500 classes.

A Comprehensive SR holding a Measurement Report (TID 1500) with one measurement group that
references the source film (``SourceImageForMeasurementGroup``) and carries the algorithm's
identification (``AlgorithmIdentification``: ``covidray``, the ``model_version``, the
``scoring_version`` as a parameter):

- qualitative evaluations: the input gate's verdict (in / out of scope) and, when out of
  scope, its reason; for in-scope films the finding (the predicted class) as a SNOMED CT code;
- measurements: each class probability (unit UCUM ``1``), for every film the model saw.

The "research software, not for diagnosis" statement has no place in TID 1500: it is a text
content item of the report's root container (why the SR is a Comprehensive SR, which allows
TEXT items), the series description, and ``ContentQualification`` RESEARCH. Codes no standard
names (a class probability, the gate's verdict and reasons) are in the private coding scheme
``99COVIDRAY`` (:data:`PRIVATE_CODES`, docs/pacs.md).
"""

from __future__ import annotations

import math
from typing import Any

from ..labels import CLASSES

SCHEME = "99COVIDRAY"
DISCLAIMER_TEXT = "covidray is research software, not for diagnosis"
SERIES_DESCRIPTION = "covidray result - research use, not for diagnosis"
MANUFACTURER = "covidray"
SR_SERIES_NUMBER = 9901
SC_SERIES_NUMBER = 9902

# (value, scheme, meaning): SNOMED CT where a concept exists.
FINDING_CODES: dict[str, tuple[str, str, str]] = {
    "covid": ("840539006", "SCT", "COVID-19"),
    "pneumonia": ("233604007", "SCT", "Pneumonia"),
    "normal": ("281900007", "SCT", "No abnormality detected"),
}
PROCEDURE = ("399208008", "SCT", "Plain chest X-ray")
UNIT = ("1", "UCUM", "no units")
PRIVATE_CODES: dict[str, tuple[str, str, str]] = {
    **{f"prob_{c}": (f"prob-{c}", SCHEME, f"Probability of class {c}") for c in CLASSES},
    "gate_verdict": ("gate-verdict", SCHEME, "Input gate verdict"),
    "in_scope": ("in-scope", SCHEME, "In scope (frontal chest film)"),
    "out_of_scope": ("out-of-scope", SCHEME, "Out of scope"),
    "gate_reason": ("gate-reason", SCHEME, "Input gate reason"),
    "disclaimer": ("intended-use", SCHEME, "Intended use"),
    **{
        f"reason_{kind}": (kind.replace("_", "-"), SCHEME, f"Refused on {text}")
        for kind, text in (
            ("modality", "the DICOM modality"),
            ("body_part", "the body part examined"),
            ("view", "the view position"),
            ("ood_image", "the image (unlike the training films)"),
            ("other", "another reason"),
        )
    },
}


def code(triple: tuple[str, str, str]) -> Any:
    import highdicom as hd

    return hd.sr.CodedConcept(value=triple[0], scheme_designator=triple[1], meaning=triple[2])


def reason_code(reason: str) -> Any:
    """A gate reason (``modality:CT``, ``ood_image``) as a private code whose meaning names
    the value too (``Refused on the DICOM modality: CT``)."""
    kind, _, value = reason.partition(":")
    value_, scheme, meaning = PRIVATE_CODES.get(f"reason_{kind}", PRIVATE_CODES["reason_other"])
    text = f"{meaning}: {value}" if value else meaning
    return code((value_, scheme, text[:64]))


def build_sr(
    source: Any,
    prediction: dict[str, Any],
    *,
    series_uid: str,
    sop_uid: str,
    tracking_uid: str,
    observer_uid: str,
    instance_number: int,
) -> Any:
    """The SR of one film: ``source`` is its metadata (a pydicom Dataset without pixels),
    ``prediction`` its prediction row (label, in_scope, gate_reason, prob_*, model_version,
    scoring_version)."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    in_scope = bool(prediction.get("in_scope"))
    evaluations = [
        hd.sr.QualitativeEvaluation(
            name=code(PRIVATE_CODES["gate_verdict"]),
            value=code(PRIVATE_CODES["in_scope" if in_scope else "out_of_scope"]),
        )
    ]
    if not in_scope:
        evaluations.append(
            hd.sr.QualitativeEvaluation(
                name=code(PRIVATE_CODES["gate_reason"]),
                value=reason_code(str(prediction.get("gate_reason") or "other")),
            )
        )
    elif prediction.get("label") in FINDING_CODES:
        evaluations.append(
            hd.sr.QualitativeEvaluation(
                name=codes.SCT.Finding, value=code(FINDING_CODES[prediction["label"]])
            )
        )
    algorithm = hd.sr.AlgorithmIdentification(
        name=MANUFACTURER,
        version=str(prediction["model_version"])[:64],
        parameters=[f"scoring_version={prediction['scoring_version']}"],
    )
    measurements = [
        hd.sr.Measurement(
            name=code(PRIVATE_CODES[f"prob_{c}"]),
            value=float(prediction[f"prob_{c}"]),
            unit=code(UNIT),
            algorithm_id=algorithm,
        )
        for c in CLASSES
        if prediction.get(f"prob_{c}") is not None and not math.isnan(prediction[f"prob_{c}"])
    ]
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=tracking_uid, identifier="covidray chest film result"
        ),
        algorithm_id=algorithm,
        measurements=measurements or None,
        qualitative_evaluations=evaluations,
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(source)],
    )
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=observer_uid, name=MANUFACTURER, manufacturer_name=MANUFACTURER
        ),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=code(PROCEDURE),
        imaging_measurements=[group],
    )
    report[0].ContentSequence.append(
        hd.sr.TextContentItem(
            name=code(PRIVATE_CODES["disclaimer"]),
            value=DISCLAIMER_TEXT,
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
        )
    )
    return hd.sr.ComprehensiveSR(
        evidence=[source],
        content=report[0],
        series_instance_uid=series_uid,
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=sop_uid,
        instance_number=instance_number,
        manufacturer=MANUFACTURER,
        is_complete=True,
        series_description=SERIES_DESCRIPTION,
        content_qualification="RESEARCH",
    )
