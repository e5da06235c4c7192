"""Training-time augmentation of image minibatches on the device: random translation and flip.

As in the ffcv CIFAR-10 example that the datamodels/KLoM ResNet-9 recipe follows, an image x (C, H, W)
is mirrored left-right with probability 1/2 and shifted by up to p pixels on each axis, the uncovered
border filled with 0 (the dataset mean, since inputs are normalised):

    out[:, i, j] = x̃[:, i + dy - p, j + dx - p]   (0 outside the image),  dy, dx uniform in {0, …, 2p},

where x̃ is x or its mirror image. One step of one model draws `batch_size` codes (flip, dy, dx) from
the model's own generator, seeded by `augment_seed(seed)`, whatever its batch's length, so the one-model
and the batched trainer augment each model's batches identically. The images are moved with two
gathers over the padded batch: no per-image Python loop.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .errors import DmmError


class AugmentError(DmmError):
    """Augmentation asked of inputs it cannot apply to; the message names the fix."""


def augment_seed(seed: int) -> int:
    """The augmentation seed of a model: the third word of the seed sequence whose first two are
    `engine.derive_seeds(seed)` (initialisation, data order)."""
    return int(np.random.SeedSequence(int(seed)).generate_state(3)[2])


@dataclass(frozen=True)
class Augmentation:
    translate: int  # p: the largest shift in pixels on each axis
    flip: bool      # mirror left-right with probability 1/2

    @classmethod
    def from_recipe(cls, recipe, input_shape) -> "Augmentation | None":
        """The recipe's augmentation for inputs of `input_shape`, None when it has none."""
        if not recipe.augment_flip and recipe.augment_translate == 0:
            return None
        shape = tuple(input_shape)
        if len(shape) != 3:
            raise AugmentError(f"augmentation (augment_flip, augment_translate) needs image inputs (C, H, W); "
                               f"these are {shape}: turn it off in the recipe")
        if recipe.augment_translate >= min(shape[1:]):
            raise AugmentError(f"augment_translate {recipe.augment_translate} must be smaller than the image "
                               f"({shape[1]}×{shape[2]}); lower it")
        return cls(recipe.augment_translate, recipe.augment_flip)

    @property
    def num_codes(self) -> int:
        return (2 if self.flip else 1) * (2 * self.translate + 1) ** 2

    def generator(self, seed: int) -> torch.Generator:
        """The CPU generator of the model with this (model) seed."""
        return torch.Generator().manual_seed(augment_seed(seed))

    def draw(self, generator: torch.Generator, n: int) -> torch.Tensor:
        """n codes (int64) for one step, each naming (flip, dy, dx)."""
        return torch.randint(self.num_codes, (n,), generator=generator)

    def decode(self, codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(flip bool, dy, dx) of each code."""
        flips = 2 if self.flip else 1
        side = 2 * self.translate + 1
        shift = codes // flips
        return (codes % flips).bool(), shift // side, shift % side

    def __call__(self, x: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """Augment the images x (N, C, H, W) with codes (N,) on x's device."""
        n, c, h, w = x.shape
        p = self.translate
        flip, dy, dx = self.decode(codes)
        rows = dy.view(n, 1) + torch.arange(h, device=x.device)  # rows of the padded image, (N, H)
        cols = dx.view(n, 1) + torch.arange(w, device=x.device)
        cols = torch.where(flip.view(n, 1), w + 2 * p - 1 - cols, cols)  # mirror: read the row backwards
        padded = F.pad(x, (p, p, p, p))
        out = padded.gather(2, rows.view(n, 1, h, 1).expand(n, c, h, w + 2 * p))
        return out.gather(3, cols.view(n, 1, 1, w).expand(n, c, h, w))
