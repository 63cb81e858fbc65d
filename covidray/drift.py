"""Drift, night by night: does what arrives still look like what the model was calibrated on?

An :class:`OutputMix` counts a set of answers: how many images the input gate refused, by
reason, and the predicted classes of the others. The validation split's mix is the reference:
``evaluate`` computes it with the Predictor that ships (calibrated, gated) and the model card
keeps it as ``drift_reference`` (written with the calibration; it changes no output, so it is
not part of ``scoring_version``). Each nightly run's mix is compared with it
(:func:`compare`): a share is *shifted* when the reference's share lies outside the run's
Wilson 95 % interval, so a small night is not flagged for noise alone.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping

from pydantic import BaseModel, ConfigDict

from .evaluation.intervals import wilson

REFUSED, LABEL = "refused", "label"


class OutputMix(BaseModel):
    """Counts of a set of answers: ``n`` images, ``refused`` by the input gate per reason (of
    ``n``), ``labels``: predicted classes of the images in scope (of ``n - sum(refused)``)."""

    model_config = ConfigDict(extra="forbid")

    n: int = 0
    refused: dict[str, int] = {}
    labels: dict[str, int] = {}
    split: str | None = None  # what the images were: "val" for a model card's reference

    @classmethod
    def of(
        cls, labels: Iterable[str | None], reasons: Iterable[str | None], split: str | None = None
    ) -> OutputMix:
        """The mix of answers given as a predicted label (None when refused) and a gate reason
        (None when in scope) per image."""
        n, refused, classes = 0, Counter[str](), Counter[str]()
        for label, reason in zip(labels, reasons, strict=True):
            n += 1
            if reason is not None:
                refused[str(reason)] += 1
            elif label is not None:
                classes[str(label)] += 1
        return cls(n=n, refused=dict(refused), labels=dict(classes), split=split)

    @classmethod
    def from_counts(
        cls, n: int, refused: Mapping[str, int], labels: Mapping[str, int]
    ) -> OutputMix:
        return cls(n=n, refused=dict(refused), labels=dict(labels))

    @property
    def n_in_scope(self) -> int:
        return self.n - sum(self.refused.values())

    def share(self, kind: str, key: str) -> tuple[int, int]:
        """``(count, denominator)`` of a refusal reason (of all) or a class (of those in scope)."""
        if kind == REFUSED:
            return self.refused.get(key, 0), self.n
        return self.labels.get(key, 0), self.n_in_scope


class DriftLine(BaseModel):
    """One share of a run next to the reference's."""

    kind: str  # refused | label
    key: str  # the reason or the class
    count: int
    of: int
    share: float | None  # None: nothing to divide by
    interval: tuple[float, float] | None  # Wilson 95 % of the run's share
    reference: float | None  # the validation split's share; None without a reference
    shifted: bool  # the reference lies outside the run's interval


def compare(run: OutputMix, reference: OutputMix | None) -> list[DriftLine]:
    """The run's refusal shares (every reason) and class mix (every class) beside the
    reference's, reasons and classes of either side included."""
    ref = reference or OutputMix()
    lines = []
    for kind, keys in (
        (REFUSED, sorted(set(run.refused) | set(ref.refused))),
        (LABEL, sorted(set(run.labels) | set(ref.labels))),
    ):
        for key in keys:
            k, n = run.share(kind, key)
            rk, rn = ref.share(kind, key)
            share = k / n if n else None
            interval = wilson(k, n)
            ref_share = rk / rn if reference is not None and rn else None
            shifted = (
                interval is not None
                and ref_share is not None
                and not interval[0] <= ref_share <= interval[1]
            )
            lines.append(
                DriftLine(
                    kind=kind,
                    key=key,
                    count=k,
                    of=n,
                    share=share,
                    interval=interval,
                    reference=ref_share,
                    shifted=shifted,
                )
            )
    return lines
