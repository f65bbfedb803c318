"""Random LR patches for calibration and finetuning, drawn reproducibly from a pool of images."""
from __future__ import annotations

from typing import Callable, Iterable, List, Sequence, Union

import torch

from ...errors import DataError

ImageLoader = Callable[[], torch.Tensor]


class PatchSource:
    """A pool of LR images (C, H, W) from which seeded random patches are cut.

    Images are tensors, or callables returning one (loaded on demand, so the pool's memory does
    not grow with the number of images). Patches larger than an image are cut at the image size
    instead, and a batch is made of patches of one common size.

    Args:
        images: Tensors (C, H, W) or loaders.
        names: Optional names for messages.
    """

    def __init__(self, images: Sequence[Union[torch.Tensor, ImageLoader]], names: Sequence[str] = ()) -> None:
        if len(images) == 0:
            raise DataError('the calibration pool is empty: no image to draw patches from')
        self.images = list(images)
        self.names = list(names) or [f'image {i}' for i in range(len(images))]

    def __len__(self) -> int:
        return len(self.images)

    def image(self, index: int) -> torch.Tensor:
        item = self.images[index]
        return item() if callable(item) else item

    @classmethod
    def from_batches(cls, batches: Iterable[torch.Tensor]) -> 'PatchSource':
        """A pool whose images are the samples of the given (N, C, H, W) batches."""
        images: List[torch.Tensor] = []
        for batch in batches:
            images.extend(batch[i] for i in range(batch.shape[0]))
        return cls(images)

    def batch(self, batch_size: int, patch_size: int, generator: torch.Generator, augment: bool = False
              ) -> torch.Tensor:
        """``batch_size`` random patches (with random flips/rotations when ``augment``)."""
        picks = torch.randint(0, len(self.images), (batch_size,), generator=generator).tolist()
        images = [self.image(i) for i in picks]
        size = min([patch_size] + [min(img.shape[-2:]) for img in images])
        patches = []
        for img in images:
            top = int(torch.randint(0, img.shape[-2] - size + 1, (1,), generator=generator))
            left = int(torch.randint(0, img.shape[-1] - size + 1, (1,), generator=generator))
            patch = img[..., top:top + size, left:left + size]
            if augment:
                if int(torch.randint(0, 2, (1,), generator=generator)):
                    patch = patch.flip(-1)
                if int(torch.randint(0, 2, (1,), generator=generator)):
                    patch = patch.flip(-2)
                patch = torch.rot90(patch, int(torch.randint(0, 4, (1,), generator=generator)), dims=(-2, -1))
            patches.append(patch)
        return torch.stack(patches).contiguous()

    def batches(self, num_batches: int, batch_size: int, patch_size: int, seed: int) -> List[torch.Tensor]:
        """A fixed, seeded list of calibration batches."""
        generator = torch.Generator().manual_seed(seed)
        return [self.batch(batch_size, patch_size, generator) for _ in range(num_batches)]
