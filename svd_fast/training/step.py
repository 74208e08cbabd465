"""One optimiser step: batches from a resumable clip stream, the objective's randomness from a generator seeded
by (seed, rank, micro-step), gradient accumulation, and the per-step statistics the log reports. The RNG state
of the process is captured and restored with the trainer state, so a resumed run continues bit-exactly."""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from svd_fast.training.config import DataSection, TrainConfig
from svd_fast.training.latents import stack_features
from svd_fast.training.objective import ObjectiveConfig, TrainingBatch, edm_loss, encode_batch, sample_batch


class ClipStream:
    """Endless batches from a clip dataset with a resumable position (epoch, samples consumed in it)."""

    def __init__(self, dataset, batch_size: int, epoch: int = 0, position: int = 0) -> None:
        self.dataset = dataset
        self.batch_size = batch_size
        self.epoch = epoch
        self.position = position
        self._iterator = self._start()

    def _start(self) -> Iterator[dict[str, Any]]:
        self.dataset.set_epoch(self.epoch)
        iterator = iter(self.dataset)
        # Resuming: clips are drawn deterministically per epoch, so skipping reaches the same place.
        for _ in range(self.position):
            next(iterator)
        return iterator

    def _next_sample(self) -> dict[str, Any]:
        for _ in range(2):
            try:
                sample = next(self._iterator)
                self.position += 1
                return sample
            except StopIteration:
                if self.position == 0:
                    errors = "; ".join(f"{path}: {reason}" for path, reason in self.dataset.errors[:5])
                    raise ValueError(f"data: no usable clips in {self.dataset.sources!r} ({errors or 'no clips'})") from None
                self.epoch, self.position = self.epoch + 1, 0
                self._iterator = self._start()
        raise ValueError("data: no usable clips")

    def next_batch(self) -> list[dict[str, Any]]:
        return [self._next_sample() for _ in range(self.batch_size)]

    def first_batch_agreed(self) -> list[dict[str, Any]]:
        """The first batch, with the outcome agreed by all ranks: a rank without usable clips must not leave
        the others waiting in a collective forever."""
        error: ValueError | None = None
        try:
            samples = self.next_batch()
        except ValueError as caught:
            error, samples = caught, []
        failed = torch.tensor([0 if error is None else 1])
        torch.distributed.all_reduce(failed)
        if error is not None:
            raise error
        if failed.item():
            raise ValueError(f"data: {failed.item()} rank(s) have no usable clips (fewer video files than processes?)")
        return samples


def conditioning_values(samples: list[dict[str, Any]], data: DataSection) -> tuple[torch.Tensor, torch.Tensor]:
    """The samples' fps and motion bucket ids, the data section's defaults where the data has none."""
    fps = torch.tensor([float(s.get("fps") or data.default_fps) for s in samples])
    motion = torch.tensor([float(data.default_motion_bucket_id if s.get("motion_bucket_id") is None else s["motion_bucket_id"])
                           for s in samples])
    return fps, motion


def make_batch(samples: list[dict[str, Any]], data: DataSection, objective: ObjectiveConfig, pipe, device: torch.device,
               generator: torch.Generator) -> TrainingBatch:
    """Decoded clips are encoded here; precomputed features (``svd-fast encode``) only sampled, with the same draws."""
    fps, motion = conditioning_values(samples, data)
    if "posterior_mean" in samples[0]:
        return sample_batch(stack_features(samples, device), fps, motion, pipe.vae, objective, generator)
    pixels = torch.stack([s["pixel_values"] for s in samples]).to(device)
    return encode_batch(pixels, fps, motion, pipe.vae, pipe.image_encoder, pipe.feature_extractor, objective, generator, data.encode_chunk())


def sigma_bin_names(edges: list[float]) -> list[str]:
    bounds = [0.0, *edges, math.inf]
    return [f"sigma_{lo:g}-{hi:g}" for lo, hi in zip(bounds[:-1], bounds[1:])]


def rng_state() -> dict[str, Any]:
    """The process's RNG states as tensors and plain Python values (loadable with weights_only=True)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


@dataclass
class StepStats:
    loss: float  # this rank's mean loss over the accumulated micro-steps
    lr: float  # the rate this step's update used
    samples: int
    bin_sums: torch.Tensor
    bin_counts: torch.Tensor


class StepRunner:
    """Runs optimiser steps; ``micro_step`` seeds each micro-step's noise and is part of the trainer state."""

    def __init__(self, config: TrainConfig, models, stream: ClipStream, device: torch.device, rank: int, micro_step: int = 0) -> None:
        self.config = config
        self.models = models
        self.stream = stream
        self.device = device
        self.rank = rank
        self.micro_step = micro_step
        self.objective: ObjectiveConfig = config.objective
        self.edges = torch.tensor(list(config.logging.sigma_bins))
        self._first_batch = True

    def _next_samples(self) -> list[dict[str, Any]]:
        if self._first_batch:
            self._first_batch = False
            return self.stream.first_batch_agreed()
        return self.stream.next_batch()

    def run(self) -> StepStats:
        config, engine, pipe = self.config, self.models.engine, self.models.pipeline
        bins = len(self.edges) + 1
        stats = StepStats(loss=0.0, lr=engine.get_lr()[0], samples=0, bin_sums=torch.zeros(bins), bin_counts=torch.zeros(bins))
        accumulation = config.optimizer.gradient_accumulation_steps
        for _ in range(accumulation):
            generator = torch.Generator().manual_seed(config.seed * 1_000_003 + self.rank * 7_919 + self.micro_step)
            batch = make_batch(self._next_samples(), config.data, self.objective, pipe, self.device, generator)
            loss, per_sample = edm_loss(engine, batch, self.models.compute_dtype)
            engine.backward(loss)
            engine.step()
            self.micro_step += 1
            stats.loss += loss.item() / accumulation
            per_sample = per_sample.float().cpu()
            which = torch.bucketize(batch.sigma.float().cpu(), self.edges)
            stats.bin_sums.index_add_(0, which, per_sample)
            stats.bin_counts.index_add_(0, which, torch.ones_like(per_sample))
            stats.samples += batch.latents.shape[0]
        return stats
