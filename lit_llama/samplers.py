"""Samplers whose order is a function of (seed, epoch) alone, so that a run can resume in the
middle of an epoch (lit_llama/resume.py) and the global batches do not depend on the device count.
"""

from __future__ import annotations

from typing import Any, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler


class EpochSampler(Sampler[int]):
    """Sample indices in an order that depends only on (seed, epoch), from any position in the epoch.

    With `num_replicas` > 1 each rank takes every num_replicas-th index of the permutation (padded by
    wrapping around, as DistributedSampler does), so the ranks see disjoint samples. `set_position`
    picks the epoch and how many of this rank's samples to skip. It is not called `set_epoch` on
    purpose: Fabric calls `set_epoch(number of iterations so far)` on every sampler it finds, which
    after a resume is not the epoch.
    """

    def __init__(self, num_samples: int, shuffle: bool = True, seed: int = 0, num_replicas: int = 1, rank: int = 0) -> None:
        if num_samples <= 0:
            raise ValueError("the training set is empty; prepare the data again with more records")
        self.num_samples = num_samples
        self.shuffle = shuffle
        self.seed = seed
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0
        self.start = 0
        # Handed to the DataLoader: it draws its workers' base seed from it on every iter(), which
        # would otherwise come from (and advance) the global RNG that dropout uses.
        self.loader_generator = torch.Generator().manual_seed(seed)

    def set_position(self, epoch: int, start: int = 0) -> None:
        """The next iteration yields epoch `epoch`'s order from this rank's `start`-th sample on."""
        self.epoch, self.start = epoch, start
        self.loader_generator.manual_seed(self.seed * 1_000_003 + epoch)

    def order(self, epoch: int) -> list[int]:
        """This rank's full index order for `epoch`."""
        if self.shuffle:
            # Seeded by (seed, epoch) only, never by a generator that advanced through earlier epochs.
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            indices = torch.randperm(self.num_samples, generator=g).tolist()
        else:
            indices = list(range(self.num_samples))
        per_rank = len(self)
        indices += indices[: per_rank * self.num_replicas - len(indices)]  # wrap so every rank gets per_rank
        return indices[self.rank:: self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        return iter(self.order(self.epoch)[self.start:])

    def __len__(self) -> int:
        return -(-self.num_samples // self.num_replicas)  # ceil: the full epoch, whatever the start

    def describe(self) -> dict[str, Any]:
        return {"num_samples": self.num_samples, "shuffle": self.shuffle, "seed": self.seed, "num_replicas": self.num_replicas}


def resumable_dataloader(
    fabric: Any, dataset: Dataset, batch_size: int, shuffle: bool, seed: int, collate_fn: Any = None
) -> DataLoader:
    """A training DataLoader over an `EpochSampler` (sharded over fabric's ranks), set up by fabric.

    `fit` finds the sampler, positions it at every epoch, and so can resume in the middle of one."""
    sampler = EpochSampler(len(dataset), shuffle=shuffle, seed=seed, num_replicas=fabric.world_size, rank=fabric.global_rank)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate_fn,
                        generator=sampler.loader_generator)
    # The sampler already shards by rank; Fabric's DistributedSampler wrapper would shard it again.
    return fabric.setup_dataloaders(loader, use_distributed_sampler=False)


def epoch_sampler(loader: Any) -> EpochSampler | None:
    """The EpochSampler behind a (Fabric-wrapped) DataLoader, or None."""
    inner = getattr(loader, "_dataloader", loader)
    for candidate in (getattr(inner, "sampler", None), getattr(getattr(inner, "batch_sampler", None), "sampler", None)):
        if isinstance(candidate, EpochSampler):
            return candidate
    return None



class MicroBatchSampler(EpochSampler):
    """An `EpochSampler` that deals whole micro-batches to the ranks in turn: micro-batch k of the
    epoch (samples k*m .. k*m+m-1 of its permutation, m = micro_batch_size) goes to rank
    k % num_replicas. The k-th global batch then holds the same micro-batches on any number of
    devices, and as the loss is a mean per micro-batch, averaged over the accumulation steps and
    (by DDP) over the ranks, N devices give the gradient that one device with N times the
    accumulation gives. (Dealing single samples, as DistributedSampler does, would regroup the
    samples into other micro-batches and change the per-micro-batch means.)

    One device sees the permutation itself, exactly as with `EpochSampler`; with several, the
    epoch is padded by wrapping around so every rank gets the same number of full micro-batches.
    """

    def __init__(self, num_samples: int, micro_batch_size: int, shuffle: bool = True, seed: int = 0,
                 num_replicas: int = 1, rank: int = 0) -> None:
        super().__init__(num_samples, shuffle=shuffle, seed=seed, num_replicas=num_replicas, rank=rank)
        self.micro_batch_size = micro_batch_size

    def order(self, epoch: int) -> list[int]:
        if self.shuffle:  # the permutation EpochSampler draws: seeded by (seed, epoch) only
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            indices = torch.randperm(self.num_samples, generator=g).tolist()
        else:
            indices = list(range(self.num_samples))
        if self.num_replicas == 1:
            return indices
        total = len(self) * self.num_replicas
        indices = (indices * -(-total // len(indices)))[:total]  # wrap around to fill the last global batch
        m, world = self.micro_batch_size, self.num_replicas
        return [i for start in range(self.rank * m, total, m * world) for i in indices[start:start + m]]

    def __len__(self) -> int:
        if self.num_replicas == 1:
            return self.num_samples
        per_rank_batches = -(-self.num_samples // (self.micro_batch_size * self.num_replicas))  # ceil
        return per_rank_batches * self.micro_batch_size

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "deal": f"micro-batches of {self.micro_batch_size}"}
