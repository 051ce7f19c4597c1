"""Deterministic, shardable, resumable object sampling.

Every random choice the data pipeline makes for an item (which views are inputs, which are
supervision, the random background) is drawn from a generator seeded by
``(seed, epoch, object index)``. The sampler hands ``(object index, epoch)`` pairs to the
dataset, so results do not depend on the number of workers, on prefetching, or on which
process loads the item — the precondition for bit-identical resume.

:class:`ObjectSampler` subclasses ``DistributedSampler`` so Lightning uses it as is under DDP
(it shards by rank itself). :class:`ResumableDataLoader` implements ``state_dict`` /
``load_state_dict`` (Lightning's stateful-loader protocol): the state is the epoch and the
number of batches already yielded, and a restored loader skips those batches **at the sampler**
(no data is loaded for them) while ``len()`` stays the full epoch length, as Lightning expects.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

__all__ = ["ObjectSampler", "ResumableDataLoader", "item_generator"]


def item_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """The generator for every random choice about item ``index`` in ``epoch``."""
    return torch.Generator().manual_seed((seed * 1_000_003 + epoch) * 1_000_033 + index)


class ObjectSampler(DistributedSampler):
    """Yields ``(object_index, epoch)`` for this rank's shard of ``indices``.

    Args:
        indices: object indices of the split.
        num_replicas: world size (number of processes).
        rank: this process's global rank.
        shuffle: a fresh permutation per epoch (seeded by ``seed + epoch``).
        seed: sampler seed; identical on every rank.
        pad: repeat items so every rank gets the same count (training: keeps DDP steps in
            lock-step). Evaluation uses ``pad=False`` so no object is counted twice.
    """

    def __init__(self, indices: list[int], num_replicas: int = 1, rank: int = 0, shuffle: bool = True, seed: int = 0, pad: bool = True):
        super().__init__(range(len(indices)), num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=False)
        self.indices = list(indices)
        self.pad = pad
        self.skip = 0

    def _order(self) -> list[int]:
        n = len(self.indices)
        if self.shuffle:
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()
        else:
            perm = list(range(n))
        if self.pad and n:
            total = math.ceil(n / self.num_replicas) * self.num_replicas
            perm += (perm * math.ceil(total / n))[: total - n]
        return perm[self.rank :: self.num_replicas]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order = self._order()[self.skip :]
        self.skip = 0
        return iter([(self.indices[i], self.epoch) for i in order])

    def __len__(self) -> int:
        return len(self._order())


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` over an :class:`ObjectSampler` that can resume mid-epoch.

    Lightning re-instantiates loaders in some loops (``predict`` wraps the batch sampler to track
    indices); a copy built around another sampler behaves as a plain ``DataLoader`` (its order
    still comes from the wrapped :class:`ObjectSampler`), and only the training loader, whose
    sampler is the :class:`ObjectSampler` itself, carries resume state.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._yielded = 0
        self._resume_batches = 0
        self._resume_epoch = -1

    def __iter__(self):
        # Skip only within the epoch the state was saved in: a checkpoint taken after the last
        # batch of an epoch resumes at the next epoch (Lightning sets the new epoch first),
        # where nothing must be skipped.
        if not isinstance(self.sampler, ObjectSampler):
            yield from super().__iter__()
            return
        skip = self._resume_batches if int(self.sampler.epoch) == self._resume_epoch else 0
        self._resume_batches = 0
        self.sampler.skip = skip * (self.batch_size or 1)
        self._yielded = skip
        for batch in super().__iter__():
            self._yielded += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        if not isinstance(self.sampler, ObjectSampler):
            return {}
        return {"epoch": int(self.sampler.epoch), "batches": int(self._yielded)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if not state or not isinstance(self.sampler, ObjectSampler):
            return
        self.sampler.set_epoch(int(state["epoch"]))
        self._resume_epoch = int(state["epoch"])
        self._resume_batches = int(state["batches"])
