"""Recipe options against source shortcuts, all off by default (docs/source-study.md).

Every COVID-19 film of the public collections comes from a few sources, so a model can score by
recognising the source (DeGrave et al. 2021). Three of the options act on the loss of a batch:

- **mixup / cutmix** (:func:`mix_batch`): convex mixes (Zhang et al. 2018) or pasted boxes
  (Yun et al. 2019) of two films, the loss mixed in the same proportion;
- **group DRO** over the (source × label) cells of train (:class:`GroupDRO`, Sagawa et al.
  2020): the loss of the worst cells weighs more, with weights updated by exponentiated
  gradient ascent (step ``group_dro_step``);
- a **class-conditional source adversary** (:class:`SourceAdversary`, after Ganin et al. 2016
  and Li et al. 2018): per class, a classifier tells the source from the pooled features
  through a gradient reversal layer, so the backbone learns features that do not tell it.
  Only classes with two or more train sources take part (with Actualmed and Figure1 held out,
  COVID-19 keeps one source: the adversary acts on normal and pneumonia).

:class:`Objective` combines them; with every option off its loss is the plain label-smoothed
cross-entropy.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .config import TrainConfig

ADVERSARY_HIDDEN = 128


class SourceCells(NamedTuple):
    """The train set's sources (sorted) and which class has which: ``present[c, s]``."""

    sources: tuple[str, ...]
    present: np.ndarray  # (classes, sources) bool

    @classmethod
    def of(cls, labels: np.ndarray, sources: Sequence[str], num_classes: int) -> SourceCells:
        names = tuple(sorted({str(s) for s in sources}))
        present = np.zeros((num_classes, len(names)), dtype=bool)
        index = {s: i for i, s in enumerate(names)}
        for y, s in zip(labels, sources, strict=True):
            present[int(y), index[str(s)]] = True
        return cls(names, present)

    def index(self, sources: Sequence[str]) -> torch.Tensor:
        """Source indices of ``sources`` (each one of :attr:`sources`)."""
        where = {s: i for i, s in enumerate(self.sources)}
        return torch.as_tensor([where[str(s)] for s in sources], dtype=torch.long)


class _Reverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: float) -> torch.Tensor:  # type: ignore[override]
        ctx.weight = weight
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return -ctx.weight * grad, None


def grad_reverse(x: torch.Tensor, weight: float = 1.0) -> torch.Tensor:
    """Identity forward; the gradient times ``-weight`` backward (gradient reversal)."""
    return _Reverse.apply(x, weight)


class SourceAdversary(nn.Module):
    """Per class, a source classifier on the pooled features behind gradient reversal."""

    def __init__(self, num_features: int, cells: SourceCells, weight: float) -> None:
        super().__init__()
        self.num_classes, self.num_sources = cells.present.shape
        self.weight = weight
        self.net = nn.Sequential(
            nn.Linear(num_features, ADVERSARY_HIDDEN),
            nn.ReLU(),
            nn.Linear(ADVERSARY_HIDDEN, self.num_classes * self.num_sources),
        )
        present = torch.as_tensor(cells.present)
        self.register_buffer("present", present, persistent=False)
        self.register_buffer("active", present.sum(1) >= 2, persistent=False)

    def losses(self, features: torch.Tensor, y: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """Per-sample source cross-entropy within the sample's class (0 where the class has
        fewer than two sources); its gradient reaches ``features`` reversed."""
        z = self.net(grad_reverse(features.float(), self.weight))
        z = z.view(-1, self.num_classes, self.num_sources)[torch.arange(len(y)), y]
        z = z.masked_fill(~self.present[y], -1e4)
        return F.cross_entropy(z, s, reduction="none") * self.active[y]


class GroupDRO(nn.Module):
    """Weights ``q`` over the (label × source) cells; the loss is ``sum_g q_g * loss_g``."""

    def __init__(self, num_cells: int, step: float) -> None:
        super().__init__()
        self.step = step
        self.register_buffer("q", torch.full((num_cells,), 1.0 / num_cells))

    def forward(self, losses: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
        n = len(self.q)
        sums = torch.zeros(n, device=losses.device).index_add(0, cells, losses)
        counts = torch.bincount(cells, minlength=n).to(losses.device)
        means = sums / counts.clamp(min=1)
        with torch.no_grad():  # exponentiated gradient ascent on the cells of this batch
            total, seen_n = sums.detach().clone(), counts.clone()
            if dist.is_available() and dist.is_initialized():  # every worker's batch: one q
                dist.all_reduce(total)
                dist.all_reduce(seen_n)
            seen = seen_n > 0
            q = self.q.clone()
            q[seen] = q[seen] * torch.exp(self.step * total[seen] / seen_n[seen])
            self.q.copy_(q / q.sum())
        return (self.q * means).sum()


class Targets(NamedTuple):
    """A batch's labels and sources, with the second film's and its share ``1 - lam`` when
    the batch was mixed (``lam`` 1.0: not mixed)."""

    y: torch.Tensor
    s: torch.Tensor | None
    y2: torch.Tensor
    s2: torch.Tensor | None
    lam: float


def mix_batch(
    x: torch.Tensor, y: torch.Tensor, s: torch.Tensor | None, mode: str, alpha: float
) -> tuple[torch.Tensor, Targets]:
    """Mixup or cutmix of a batch with a permutation of itself (torch's global RNG, seeded per
    epoch); ``mode`` "none" returns it unchanged."""
    if mode == "none":
        return x, Targets(y, s, y, s, 1.0)
    lam = float(torch.distributions.Beta(alpha, alpha).sample())
    perm = torch.randperm(len(y), device=x.device)
    if mode == "mixup":
        mixed = lam * x + (1 - lam) * x[perm]
    elif mode == "cutmix":
        h, w = x.shape[-2:]
        cut = (1 - lam) ** 0.5
        ch, cw = int(round(h * cut)), int(round(w * cut))
        cy, cx = int(torch.randint(h, ())), int(torch.randint(w, ()))
        y0, y1 = max(cy - ch // 2, 0), min(cy + (ch + 1) // 2, h)
        x0, x1 = max(cx - cw // 2, 0), min(cx + (cw + 1) // 2, w)
        mixed = x.clone()
        mixed[..., y0:y1, x0:x1] = x[perm][..., y0:y1, x0:x1]
        lam = 1.0 - (y1 - y0) * (x1 - x0) / (h * w)  # the share actually kept
    else:
        raise ValueError(f"unknown mix mode {mode!r}")
    return mixed, Targets(y, s, y[perm], None if s is None else s[perm], lam)


class Objective(nn.Module):
    """The loss of a batch: label-smoothed cross-entropy, mixed like the batch, over group DRO
    cells when ``dro`` is set, plus the source adversary's when ``adversary`` is set."""

    def __init__(
        self,
        label_smoothing: float,
        *,
        mix: str = "none",
        mix_alpha: float = 0.4,
        dro: GroupDRO | None = None,
        adversary: SourceAdversary | None = None,
        num_sources: int = 0,
    ) -> None:
        super().__init__()
        self.label_smoothing = label_smoothing
        self.mix, self.mix_alpha = mix, mix_alpha
        self.dro, self.adversary, self.num_sources = dro, adversary, num_sources

    @property
    def needs_sources(self) -> bool:
        return self.dro is not None or self.adversary is not None

    def mixed(
        self, x: torch.Tensor, y: torch.Tensor, s: torch.Tensor | None
    ) -> tuple[torch.Tensor, Targets]:
        return mix_batch(x, y, s, self.mix, self.mix_alpha)

    @contextmanager
    def features_of(self, model: nn.Module) -> Iterator[list[torch.Tensor]]:
        """The pooled features of the forward passes run inside (for the adversary)."""
        kept: list[torch.Tensor] = []
        if self.adversary is None:
            yield kept
            return
        pool = getattr(model, "module", model).pool
        handle = pool.register_forward_hook(lambda m, a, out: kept.append(out))
        try:
            yield kept
        finally:
            handle.remove()

    def _ce(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, y, label_smoothing=self.label_smoothing, reduction="none")

    def forward(
        self, logits: torch.Tensor, t: Targets, features: torch.Tensor | None = None
    ) -> torch.Tensor:
        per_sample = t.lam * self._ce(logits, t.y)
        if t.lam < 1.0:
            per_sample = per_sample + (1 - t.lam) * self._ce(logits, t.y2)
        if self.dro is None:
            loss = per_sample.mean()
        else:  # a mixed film counts in the cell of its first film
            loss = self.dro(per_sample, t.y * self.num_sources + t.s)
        if self.adversary is not None:
            adv = t.lam * self.adversary.losses(features, t.y, t.s)
            if t.lam < 1.0:
                adv = adv + (1 - t.lam) * self.adversary.losses(features, t.y2, t.s2)
            loss = loss + adv.mean()
        return loss


def build_objective(cfg: TrainConfig, num_features: int, cells: SourceCells | None) -> Objective:
    """The :class:`Objective` of ``cfg`` (its ``mix``, ``group_dro_step`` and
    ``source_adversary`` fields); ``cells`` are needed by the last two."""
    dro_step, adv = cfg.group_dro_step, cfg.source_adversary
    if (dro_step or adv) and cells is None:
        raise ValueError("group DRO and the source adversary need the train rows' sources")
    n_classes, n_sources = (0, 0) if cells is None else cells.present.shape
    return Objective(
        cfg.label_smoothing,
        mix=cfg.mix,
        mix_alpha=cfg.mix_alpha,
        dro=GroupDRO(n_classes * n_sources, dro_step) if dro_step else None,
        adversary=SourceAdversary(num_features, cells, adv) if adv else None,
        num_sources=n_sources,
    )
