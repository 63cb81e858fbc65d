"""CycleGAN minority-class augmentation (Zhu et al. 2017; as used by Zebin et al. 2020).

``covidray gan train`` learns normal → covid (configurable) on the TRAIN split of a dataset
with Ray Train; ``covidray gan generate`` translates TRAIN-split normals into a synthetic
dataset (``synthetic=True`` rows, split train) that ``covidray train --augment-with`` adds.
"""

from .config import DomainFilter, GanConfig, GenerateConfig

__all__ = ["DomainFilter", "GanConfig", "GenerateConfig"]
