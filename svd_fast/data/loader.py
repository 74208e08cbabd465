"""Clip decoding in DataLoader worker processes, in the order an in-process iteration gives.

A worker decodes whole sources (each file in one pass, as :class:`VideoClipDataset` does) and sends one item per
source: its clips and the errors met. Worker ``w`` of ``W`` takes the sources at positions ``w, w + W, ...`` of the
rank's list and PyTorch's DataLoader collects items from its workers round-robin, so the items arrive in source
order; every source sends an item, even one without usable clips, which keeps that alignment. Crops are drawn per
source (:meth:`VideoClipDataset.source_rng`), so the clips and their order are those of ``num_workers=0`` whatever
the number of workers, and a resumed run (which skips the clips already seen) continues exactly.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from svd_fast.data.dataset import VideoClipDataset


class _SourceItems(torch.utils.data.IterableDataset):
    """(clips, errors) per source of this worker's share; the epoch is shared memory, so persistent workers see
    the epoch the training process sets."""

    def __init__(self, dataset: VideoClipDataset) -> None:
        super().__init__()
        self.dataset = dataset
        self.epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    def __iter__(self) -> Iterator[tuple[list[dict[str, Any]], list[tuple[str, str]]]]:
        worker = torch.utils.data.get_worker_info()
        workers, worker_id = (1, 0) if worker is None else (worker.num_workers, worker.id)
        self.dataset.set_epoch(int(self.epoch))
        for position, source in enumerate(self.dataset.rank_sources()):
            if position % workers != worker_id:
                continue
            clips = list(self.dataset.source_clips(source, self.dataset.source_rng(position)))
            errors = list(self.dataset.errors)
            self.dataset.errors.clear()
            yield clips, errors


def _as_sent(item: Any) -> Any:
    """The item as the worker made it (DataLoader's default would turn tuples into lists and numpy scalars of
    manifest columns into tensors): samples equal to those of an in-process iteration."""
    return item


class WorkerClips:
    """The clips of ``dataset`` decoded by ``num_workers`` persistent DataLoader worker processes (``pin_memory``:
    page-locked tensors, for fast copies to a CUDA device). Iterates like ``dataset`` (same clips, same order) and
    offers what the trainer uses of it: :meth:`set_epoch`, :attr:`sources` and :attr:`errors`.

    Memory: up to two sources' clips per worker are decoded ahead (PyTorch's prefetch_factor); a long file is
    better given as several manifest rows (``start_frame``/``end_frame``), as ``svd-fast curate`` writes them.
    Workers are seeded from ``seed`` by a generator of their own, which leaves the process's RNG untouched
    (its state is part of a checkpoint).
    """

    def __init__(self, dataset: VideoClipDataset, num_workers: int, pin_memory: bool = False, seed: int = 0) -> None:
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1 for WorkerClips (0 iterates the dataset itself), got {num_workers}")
        self.dataset = dataset
        self.sources = dataset.sources
        self.errors = dataset.errors
        self._items = _SourceItems(dataset)
        self.loader = torch.utils.data.DataLoader(
            self._items, batch_size=None, num_workers=num_workers, persistent_workers=True, pin_memory=pin_memory,
            generator=torch.Generator().manual_seed(seed), collate_fn=_as_sent,
        )

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)
        self._items.epoch.fill_(epoch)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for clips, errors in self.loader:
            self.errors.extend(errors)
            yield from clips
