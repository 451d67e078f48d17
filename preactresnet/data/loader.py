"""A loader over tensors that already sit on the training device: no workers, no per-image Python.

Training: a fresh seeded shuffle every epoch, full batches only (the last partial one is dropped),
sharded by rank. Evaluation: every image exactly once, in order, split into contiguous shards.
The shuffle and the augmentation draw from generators seeded by (seed, epoch, rank), and the
position inside an epoch is part of `state_dict()`, so a resumed run sees the same batches.
With `alternate_flip`, each image is mirrored on alternate epochs, starting from a seeded coin per
image (airbench's derandomized flip): every image is seen both ways in any two epochs in a row.
"""

from __future__ import annotations

import inspect
from typing import Callable, Iterator

import torch


def _epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    return (seed * 1_000_003 + epoch * 7_919 + rank * 104_729) % (2**63 - 1)


class TensorLoader:
    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        *,
        train: bool,
        transform: Callable[[torch.Tensor, torch.Generator | None], torch.Tensor],
        device: torch.device | str = "cpu",
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        alternate_flip: bool = False,
    ):
        if batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        self.device = torch.device(device)
        self.images, self.labels = images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)
        self.batch_size, self.train, self.transform = batch_size, train, transform
        self._takes_seed = "seed" in inspect.signature(transform).parameters
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch = 0
        self.batch = 0  # batches of the current epoch already handed out
        self.generator = torch.Generator(device=self.device)
        self.flip_start = None  # per image: mirrored in even epochs? (a pure function of the seed)
        if alternate_flip and train:
            coins = torch.rand(len(self.labels), generator=torch.Generator().manual_seed(_epoch_seed(seed, -1)))
            self.flip_start = (coins < 0.5).to(self.device)
        self.set_epoch(0)
        if train and len(self.labels) // world_size < batch_size:
            raise ValueError(
                f"batch size {batch_size} is larger than the {len(self.labels) // world_size} training "
                "images each process has; lower --batch-size"
            )

    @property
    def num_samples(self) -> int:
        """Images this rank sees per epoch."""
        n = len(self.labels)
        if self.train:
            return (n // self.world_size) // self.batch_size * self.batch_size
        base, extra = divmod(n, self.world_size)
        return base + (1 if self.rank < extra else 0)

    def __len__(self) -> int:
        if self.train:
            return self.num_samples // self.batch_size
        return -(-self.num_samples // self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Start `epoch` from its first batch (its shuffle and augmentation are fixed by the seed).
        The epoch's order is made and moved to the device here, once, not inside the timed steps."""
        self.epoch = epoch
        self.batch = 0
        self.generator.manual_seed(_epoch_seed(self.seed, epoch, self.rank))
        self._order = self._indices().to(self.device)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch": self.batch, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict, generator: bool = True) -> None:
        """The saved position; generator=False (another device type's state) re-seeds the epoch's stream."""
        self.set_epoch(int(state["epoch"]))
        self.batch = int(state["batch"])
        if generator:
            self.generator.set_state(state["generator"].cpu())  # generator states are CPU byte tensors

    def _indices(self) -> torch.Tensor:
        n = len(self.labels)
        if not self.train:
            base, extra = divmod(n, self.world_size)
            start = self.rank * base + min(self.rank, extra)
            return torch.arange(start, start + self.num_samples)
        # Same permutation on every rank (seeded by epoch only), then every rank takes its stride.
        g = torch.Generator().manual_seed(_epoch_seed(self.seed, self.epoch))
        perm = torch.randperm(n, generator=g)
        per_rank = n // self.world_size
        return perm[: per_rank * self.world_size][self.rank :: self.world_size][: self.num_samples]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if not self.train:
            self.batch = 0  # evaluation always covers the whole split
        idx = self._order
        for b in range(self.batch, len(self)):
            sel = idx[b * self.batch_size : (b + 1) * self.batch_size]
            if not self.train:
                x = self.transform(self.images[sel], None)
            else:
                extra = {}
                if self.flip_start is not None:
                    extra["flip"] = self.flip_start[sel] ^ bool(self.epoch % 2)
                if self._takes_seed:  # a host-side seed for what Python decides per batch: no device read
                    extra["seed"] = f"{self.seed}:{self.epoch}:{self.rank}:{b}"
                x = self.transform(self.images[sel], self.generator, **extra)
            self.batch = b + 1
            yield x, self.labels[sel]
