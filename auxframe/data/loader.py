"""Seeded, resumable training batches, made ahead of the step by DataLoader worker processes.

**Order.** :class:`PoolLoader` walks one pool of a split: the order of its examples is a pure function
of ``(seed, epoch)``, and the augmentation seed of each batch a pure function of ``(seed, epoch,
position)``, so a loader's whole state is two integers and a resumed run draws exactly the batches,
augmentations included, that the uninterrupted run would have drawn.

**Two stages.** A batch is made by ``dataset.fetch_batch(indices, seed)`` (reading, decoding,
per-image albumentations: JPEG datasets, NYUv2), then copied to the training device (pinned memory,
non-blocking), then finished there by ``dataset.finish_batch(images, labels, seed)`` (batched tensor
augmentation of the in-memory datasets, :mod:`auxframe.data.batched`). Both stages are pure functions
of the indices and the seed.

**Workers.** :class:`BatchStream` hands out the next batch of every pool of a training step at once.
With ``num_workers > 0`` a ``torch.utils.data.DataLoader`` fetches them in worker processes, ahead
of the step (``prefetch_factor`` steps per worker, persistent workers, pinned memory on CUDA). Its
sampler is the loaders' order itself, run ahead on a copy; each batch carries the loaders' state
after it, and the stream records that state only when the batch is handed out. So checkpoints hold
the state of the batches consumed, not of those prefetched, and resume is exact with any number of
workers (a plain DataLoader suffices: torchdata's StatefulDataLoader is not needed, since the
sampler's state is two integers per pool that the stream already knows). On a CPU device the
workers run ``finish_batch`` too (the same arithmetic on the same device, so the batches are
identical to those made in the main process); on a GPU it runs there after the copy.

**Several processes.** Under ``torchrun`` every process builds the same loaders with its ``rank``
and the ``world_size``: all walk the same seeded order of *global* batches of ``batch_size``
examples, and each takes its own contiguous slice of ``batch_size / world_size`` examples. The
union of the slices is the batch a single process would draw, so ``batch_size`` means the same
thing on one or many GPUs.
"""

from __future__ import annotations

import copy
import os
import time
from typing import Any, Iterator, Mapping

import numpy as np
import torch

from auxframe.data.base import ImageDataset
from auxframe.errors import AuxframeError, DataError

#: Worker processes per GPU process at most, by default (more rarely helps one GPU).
MAX_AUTO_WORKERS = 8


class PoolLoader(Iterator):
    """Batches of ``dataset[indices]``, reshuffled every epoch, forever.

    Iterating gives whole batches made in this process (``get_train_batch``); :class:`BatchStream`
    reads only the order (:meth:`next_spec`) and makes the batches in workers and on the device.

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
        self.name = name
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
        self.version = 0  # bumped by load_state_dict: a BatchStream reading this loader starts again
        self._order: torch.Tensor | None = None

    @property
    def batches_per_epoch(self) -> int:
        return len(self.indices) // self.batch_size

    def _make_order(self) -> torch.Tensor:
        if not self.shuffle:
            return self.indices
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return self.indices[torch.randperm(len(self.indices), generator=g)]

    def next_spec(self) -> tuple[torch.Tensor, int]:
        """Advance by one batch: its example indices (this rank's slice) and its augmentation seed."""
        if self.position + self.batch_size > len(self.indices):  # drop the ragged end of an epoch
            self.epoch += 1
            self.position = 0
            self._order = None
        if self._order is None:
            self._order = self._make_order()
        batch = self._order[self.position : self.position + self.batch_size][self.shard]
        # + shard start: under torchrun each rank's slice draws its own augmentations (rank 0: as one process)
        augment_seed = (self.seed * 1_000_003 + self.epoch) * 1_000_033 + self.position + self.shard.start
        self.position += self.batch_size
        return batch, augment_seed % 2**32

    def __next__(self) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        indices, seed = self.next_spec()
        return _finish(self.dataset, *_fetch(self.dataset, indices, seed), seed)

    def _consumed(self, epoch: int, position: int) -> None:
        """Record that the batches up to ``(epoch, position)`` were handed out (by a BatchStream)."""
        if epoch != self.epoch:
            self._order = None
        self.epoch, self.position = epoch, position

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seed = int(state["seed"])
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self._order = None
        self.version += 1


# -- the two stages (duck-typed: a task's own data need not subclass ImageDataset) ------------------
def _fetch(dataset: Any, indices: torch.Tensor, seed: int | None):
    fetch = getattr(dataset, "fetch_batch", None)
    if fetch is not None:
        return fetch(indices, seed)
    train_batch = getattr(dataset, "get_train_batch", None)
    if seed is not None and train_batch is not None:
        return train_batch(indices, seed)
    return dataset.get_batch(indices)


def _finish(dataset: Any, images, labels, seed: int | None):
    finish = getattr(dataset, "finish_batch", None)
    return finish(images, labels, seed) if finish is not None else (images, labels)


def _to_device(batch, device: torch.device):
    images, labels = batch
    return images.to(device, non_blocking=True), {k: v.to(device, non_blocking=True) for k, v in labels.items()}


# -- worker processes -------------------------------------------------------------------------------
class _Failure:
    """A project error raised in a worker, sent back whole so that the main process raises it as it was."""

    def __init__(self, exc: AuxframeError):
        self.type, self.message = type(exc), str(exc)


class _Fetch(torch.utils.data.Dataset):
    """What a worker runs: one item of the sampler (a step's specs) -> that step's batches."""

    def __init__(self, datasets: Mapping[str, Any], finish: bool):
        self.datasets, self.finish = dict(datasets), finish

    def __len__(self) -> int:  # the sampler is infinite; DataLoader never asks
        raise TypeError("a BatchStream's batches have no length")

    def __getitem__(self, item):
        states, specs = item
        batches = {}
        try:
            for key, (indices, seed) in specs.items():
                batch = _fetch(self.datasets[key], indices, seed)
                batches[key] = _finish(self.datasets[key], *batch, seed) if self.finish else batch
        except AuxframeError as exc:
            return _Failure(exc)
        return states, {k: s for k, (_, s) in specs.items()}, batches


def _worker_init(worker_id: int) -> None:
    """One OpenCV thread per worker (DataLoader already gives each worker one torch thread)."""
    try:
        import cv2

        cv2.setNumThreads(1)
    except ImportError:  # pragma: no cover - albumentations needs cv2, but a plugin's dataset may not
        pass


def _same(batch):
    return batch


class _TrainSpecs(torch.utils.data.Sampler):
    """The stream's loaders' order, run ahead on copies from the consumed state, forever."""

    def __init__(self, stream: "BatchStream"):
        self.stream = stream

    def __iter__(self):
        orders = {k: copy.copy(loader) for k, loader in self.stream.loaders.items()}
        while True:
            specs = {k: o.next_spec() for k, o in orders.items()}
            yield {k: (o.epoch, o.position) for k, o in orders.items()}, specs


class _EvalSpecs(torch.utils.data.Sampler):
    """Consecutive chunks of the indices the stream is set to, once."""

    def __init__(self):
        self.indices, self.batch_size = torch.zeros(0, dtype=torch.long), 1

    def __iter__(self):
        for start in range(0, len(self.indices), self.batch_size):
            yield {}, {"eval": (self.indices[start : start + self.batch_size], None)}


def default_num_workers(device: torch.device, processes_per_node: int = 1) -> int:
    """``train.num_workers = 'auto'``: worker processes per training process.

    On a GPU: one CPU core per process stays with the training loop, the rest fetch, at most
    :data:`MAX_AUTO_WORKERS` per process. On the CPU the training threads use every core, and workers
    would compete with them; measured on a 2-core machine (bench/README.md, "data path"), workers only
    pay for themselves when the batch costs more to make than to train on, so 'auto' gives 0 up to 4
    cores and one worker per 4 cores beyond.

    Args:
        device: the training device.
        processes_per_node: training processes on this machine (``LOCAL_WORLD_SIZE`` under torchrun).
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS, Windows
        cores = os.cpu_count() or 1
    per_process = max(1, cores // max(1, processes_per_node))
    if device.type == "cpu":
        return 0 if per_process <= 4 else per_process // 4
    return max(0, min(MAX_AUTO_WORKERS, per_process - 1))


class BatchStream(Iterator):
    """The next batch of each of several pools, finished on the training device, fetched ahead.

    Args:
        loaders: key -> :class:`PoolLoader`. Their state is always that of the batches this stream
            has handed out; ``load_state_dict`` on one of them makes the stream start again from it.
        device: the training device (batches come back on it).
        num_workers: DataLoader worker processes (0: each batch is made in this process when asked for).
        prefetch_factor: steps each worker has ready in advance.
        pin_memory: page-locked host memory for the copy (None: on CUDA devices).

    Attributes:
        wait_s: seconds spent waiting in ``next`` (for a batch and its finishing) since the last
            :meth:`pop_wait`.
        total_wait_s: the same since the stream was made.

    Example:
        >>> stream = BatchStream({"labeled": PoolLoader(data, split.labeled, 32, seed=0)}, torch.device("cpu"))
        >>> images, labels = next(stream)["labeled"]
    """

    def __init__(self, loaders: Mapping[str, PoolLoader], device: torch.device, num_workers: int = 0,
                 prefetch_factor: int = 2, pin_memory: bool | None = None):
        if int(num_workers) != num_workers or num_workers < 0:
            raise DataError(f"train.num_workers must be 'auto' or a whole number >= 0, got {num_workers!r}.")
        if int(prefetch_factor) != prefetch_factor or prefetch_factor < 1:
            raise DataError(f"train.prefetch_factor must be a whole number >= 1, got {prefetch_factor!r}.")
        self.loaders = dict(loaders)
        self.device = torch.device(device)
        self.num_workers, self.prefetch_factor = int(num_workers), int(prefetch_factor)
        self.pin_memory = self.device.type == "cuda" if pin_memory is None else bool(pin_memory)
        self.wait_s = self.total_wait_s = 0.0
        self._loader: torch.utils.data.DataLoader | None = None
        self._iterator = None
        self._versions: tuple[int, ...] = ()

    def __next__(self) -> dict[str, tuple[torch.Tensor, dict[str, torch.Tensor]]]:
        start = time.perf_counter()
        if self.num_workers == 0:
            out = {}
            for key, loader in self.loaders.items():
                indices, seed = loader.next_spec()
                batch = _to_device(_fetch(loader.dataset, indices, seed), self.device)
                out[key] = _finish(loader.dataset, *batch, seed)
        else:
            out = self._next_from_workers()
        waited = time.perf_counter() - start
        self.wait_s += waited
        self.total_wait_s += waited
        return out

    def _next_from_workers(self):
        versions = tuple(loader.version for loader in self.loaders.values())
        if self._iterator is None or versions != self._versions:
            self._versions = versions
            self._iterator = iter(self._dataloader())
        item = next(self._iterator)
        if isinstance(item, _Failure):
            raise item.type(item.message)
        states, seeds, batches = item
        for key, (epoch, position) in states.items():
            self.loaders[key]._consumed(epoch, position)
        finish_here = self.device.type != "cpu"
        out = {}
        for key, batch in batches.items():
            batch = _to_device(batch, self.device)
            out[key] = _finish(self.loaders[key].dataset, *batch, seeds[key]) if finish_here else batch
        return out

    def _dataloader(self) -> torch.utils.data.DataLoader:
        if self._loader is None:
            datasets = {k: loader.dataset for k, loader in self.loaders.items()}
            self._loader = _make_dataloader(_Fetch(datasets, finish=self.device.type == "cpu"), _TrainSpecs(self),
                                            self.num_workers, self.prefetch_factor, self.pin_memory)
        return self._loader

    def pop_wait(self) -> float:
        """Seconds spent waiting in ``next`` since the last call, and reset the count."""
        wait, self.wait_s = self.wait_s, 0.0
        return wait

    def close(self) -> None:
        """Stop the worker processes (they also stop when the stream is garbage-collected)."""
        _shutdown(self._iterator)
        self._iterator = self._loader = None


class EvalBatches:
    """Batches over a pool in order, once per call, made by persistent workers, finished on the device.

    Args:
        dataset: the dataset to read (evaluation form: ``fetch_batch(indices, None)``).
        device: the training device.
        num_workers: worker processes (0: in this process); started at the first call, kept.
        prefetch_factor: batches each worker has ready in advance.
        pin_memory: page-locked host memory for the copy (None: on CUDA devices).
    """

    def __init__(self, dataset: Any, device: torch.device, num_workers: int = 0, prefetch_factor: int = 2,
                 pin_memory: bool | None = None):
        self.dataset, self.device = dataset, torch.device(device)
        self.num_workers, self.prefetch_factor = int(num_workers), int(prefetch_factor)
        self.pin_memory = self.device.type == "cuda" if pin_memory is None else bool(pin_memory)
        self._specs = _EvalSpecs()
        self._loader: torch.utils.data.DataLoader | None = None
        self._iterator = None

    def __call__(self, indices: np.ndarray, batch_size: int) -> Iterator[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
        """The batches of ``dataset[indices]``, ``batch_size`` at a time, on the device."""
        idx = torch.as_tensor(np.asarray(indices), dtype=torch.long)
        if self.num_workers == 0:
            for start in range(0, len(idx), batch_size):
                batch = _to_device(_fetch(self.dataset, idx[start : start + batch_size], None), self.device)
                yield _finish(self.dataset, *batch, None)
            return
        self._specs.indices, self._specs.batch_size = idx, int(batch_size)
        if self._loader is None:
            self._loader = _make_dataloader(_Fetch({"eval": self.dataset}, finish=self.device.type == "cpu"),
                                            self._specs, self.num_workers, self.prefetch_factor, self.pin_memory)
        self._iterator = iter(self._loader)
        for item in self._iterator:
            if isinstance(item, _Failure):
                raise item.type(item.message)
            batch = _to_device(item[2]["eval"], self.device)
            yield batch if self.device.type == "cpu" else _finish(self.dataset, *batch, None)

    def close(self) -> None:
        """Stop the worker processes."""
        _shutdown(self._iterator)
        self._iterator = self._loader = None


def _make_dataloader(dataset: _Fetch, sampler, num_workers: int, prefetch_factor: int, pin_memory: bool):
    # batch_size=None: each sampler item is a whole step already. A private generator for the
    # workers' base seed: the DataLoader would otherwise draw it from torch's global RNG, so that the
    # training's own random numbers (dropout) would depend on when the workers started.
    return torch.utils.data.DataLoader(
        dataset, batch_size=None, sampler=sampler, num_workers=num_workers, collate_fn=_same,
        pin_memory=pin_memory, prefetch_factor=prefetch_factor, persistent_workers=True,
        worker_init_fn=_worker_init, generator=torch.Generator().manual_seed(0),
    )


def _shutdown(iterator) -> None:
    shutdown = getattr(iterator, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()


def iterate_once(dataset: ImageDataset, indices: np.ndarray, batch_size: int):
    """Batches over ``dataset[indices]`` in order, once, in this process, on the CPU (for evaluation)."""
    yield from EvalBatches(dataset, torch.device("cpu"))(indices, batch_size)
