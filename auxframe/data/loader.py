"""Infinite, seeded, resumable batches from one pool of a split.

The order of examples is a pure function of ``(seed, epoch)``, so a loader's whole state is two
integers: a resumed run draws exactly the batches the uninterrupted run would have drawn.
Training batches come from ``dataset.get_train_batch(indices, seed)`` (train-time augmentation,
seeded by the loader's seed, epoch and position, so augmentation resumes exactly too);
:func:`iterate_once`, for evaluation, reads ``get_batch`` (no augmentation).

Under ``torchrun`` every process builds the same loader with its ``rank`` and the ``world_size``:
all processes walk the same seeded order of *global* batches of ``batch_size`` examples, and each
takes its own contiguous slice of ``batch_size / world_size`` examples. The union of the slices is
the batch a single process would draw, so ``batch_size`` means the same thing on one or many GPUs.
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np
import torch

from auxframe.data.base import ImageDataset
from auxframe.errors import DataError


class PoolLoader(Iterator):
    """Batches of ``dataset[indices]``, reshuffled every epoch, forever.

    Args:
        dataset: the dataset to read.
        indices: which examples form the pool.
        batch_size: examples per batch; a pool smaller than this gives whole-pool batches.
        seed: seeds the shuffling (together with the epoch number).
        shuffle: shuffle every epoch (False: fixed order).
        name: the pool's name, for error messages.
        rank: this process's rank; it draws the ``rank``-th slice of every global batch.
        world_size: number of processes; must divide the (global) batch size.

    Raises:
        DataError: the pool is empty, the batch size is not positive, or the batch does not split
            evenly over ``world_size`` processes.
    """

    def __init__(
        self,
        dataset: ImageDataset,
        indices: np.ndarray,
        batch_size: int,
        seed: int,
        shuffle: bool = True,
        name: str = "pool",
        rank: int = 0,
        world_size: int = 1,
    ):
        if len(indices) == 0:
            raise DataError(f"the '{name}' pool is empty; tasks that read it cannot draw batches.")
        if batch_size < 1:
            raise DataError(f"batch size for pool '{name}' must be >= 1, got {batch_size}.")
        self.dataset = dataset
        self.indices = torch.as_tensor(np.asarray(indices), dtype=torch.long)
        self.batch_size = min(int(batch_size), len(self.indices))
        self.seed = int(seed)
        self.shuffle = shuffle
        if self.batch_size % world_size:
            raise DataError(
                f"the '{name}' pool's batch of {self.batch_size} examples does not split evenly over "
                f"{world_size} processes. The batch size is the global batch (each process gets batch / "
                f"processes); make it a multiple of {world_size} (train.batch_size or train.pool_batch_sizes)"
                + (f", or note that the pool has only {len(self.indices)} examples." if self.batch_size < batch_size else ".")
            )
        self.shard = slice(rank * self.batch_size // world_size, (rank + 1) * self.batch_size // world_size)
        self.epoch = 0
        self.position = 0
        self._order = self._make_order()

    @property
    def batches_per_epoch(self) -> int:
        return len(self.indices) // self.batch_size

    def _make_order(self) -> torch.Tensor:
        if not self.shuffle:
            return self.indices
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return self.indices[torch.randperm(len(self.indices), generator=g)]

    def __next__(self) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if self.position + self.batch_size > len(self._order):  # drop the ragged end of an epoch
            self.epoch += 1
            self.position = 0
            self._order = self._make_order()
        batch = self._order[self.position : self.position + self.batch_size][self.shard]
        # + shard start: under torchrun each rank's slice draws its own augmentations (rank 0: as one process)
        augment_seed = (self.seed * 1_000_003 + self.epoch) * 1_000_033 + self.position + self.shard.start
        self.position += self.batch_size
        return _train_batch(self.dataset, batch, augment_seed % 2**32)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seed = int(state["seed"])
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self._order = self._make_order()


def _train_batch(dataset: ImageDataset, indices: torch.Tensor, seed: int):
    """A training batch, augmented where the dataset augments (``get_train_batch``), else ``get_batch``."""
    train_batch = getattr(dataset, "get_train_batch", None)
    return train_batch(indices, seed) if train_batch is not None else dataset.get_batch(indices)


def iterate_once(dataset: ImageDataset, indices: np.ndarray, batch_size: int):
    """Batches over ``dataset[indices]`` in order, once (for evaluation)."""
    idx = torch.as_tensor(np.asarray(indices), dtype=torch.long)
    for start in range(0, len(idx), batch_size):
        yield dataset.get_batch(idx[start : start + batch_size])
