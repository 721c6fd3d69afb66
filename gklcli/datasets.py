"""What gkl knows about each dataset without reading it: classes, split sizes, statistics, input size.

One table, read by the data loaders, the evaluation guards, model loading and export, the GPU-hour
estimates and the models' input normalisation. It imports no torch (the recipe and plan layer uses it).

* `train`/`test` count the images of the standard splits (digits: gkl's fixed split of scikit-learn's
  1,797 images; ImageNet and ImageNet-LT: the test set is ImageNet's 50,000 validation images).
* `mean`/`std` are the per-channel statistics of [0, 1] images that the models of this dataset
  normalise with (RobustBench's constants for CIFAR); None where gkl has none for the dataset.
* `image_size` is the side of the models' input: fixed for CIFAR, the default of the recipe key
  `data.image_size` (ImageNet crops) or `data.digits.image_size` (digits, upsampled from 8×8).

Datasets without fixed facts (`npz`, `synthetic`) take theirs from the recipe.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from gklcli.errors import GKLError

Channels = tuple[float, float, float]


@dataclass(frozen=True)
class DatasetFacts:
    name: str
    classes: int
    train: int
    test: int
    image_size: int
    mean: Optional[Channels] = None
    std: Optional[Channels] = None

    @property
    def stats(self) -> Optional[tuple[Channels, Channels]]:
        """(mean, std), or None where the dataset has no statistics."""
        return None if self.mean is None or self.std is None else (self.mean, self.std)


_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

DATASETS: dict[str, DatasetFacts] = {
    f.name: f
    for f in (
        DatasetFacts("cifar10", 10, 50000, 10000, 32, (0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)),
        DatasetFacts("cifar100", 100, 50000, 10000, 32, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
        DatasetFacts("imagenet", 1000, 1281167, 50000, 224, _IMAGENET_MEAN, _IMAGENET_STD),
        DatasetFacts("imagenet-lt", 1000, 115846, 50000, 224),
        DatasetFacts("digits", 10, 1397, 400, 16),
    )
}


def facts(name: str) -> DatasetFacts:
    """The facts of dataset `name`; a GKLError naming the known datasets for any other name."""
    try:
        return DATASETS[name]
    except KeyError:
        raise GKLError(f"dataset {name!r}: no fixed facts (known: {', '.join(DATASETS)})") from None
