"""Parallel generation (svd_fast.diffusers.parallel) equals the single-process result: each mode on gloo ranks
started by svd_fast's own launcher, an uneven frame split, the full-size UNet, and the failure paths."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from parallel_workers import die_on_rank_one, save_full_size_step, save_tiny_latents, tiny_image, tiny_latents

import svd_fast
from svd_fast.diffusers.parallel import check_world, parallelize, split_sizes
from svd_fast.diffusers.parallel_launch import free_port, spawn
from svd_fast.diffusers.tiny import save_tiny_pipeline, tiny_pipeline

# The parity tolerance of the optimized pipeline against diffusers' (tests/test_optimize.py): relative L2 of latents.
TOLERANCE = 1e-4


def _relative_error(result: torch.Tensor, reference: torch.Tensor) -> float:
    return ((result - reference).norm() / reference.norm()).item()


@pytest.mark.parametrize(
    ("mode", "ranks", "frames", "sampler", "cache_interval"),
    [
        ("guidance", 2, 8, "euler", 1),
        ("frames", 2, 8, "dpmpp-2m", 2),
        ("frames", 3, 8, "ipndm-2", 1),  # uneven: 3, 3, 2 frames
        ("guidance+frames", 4, 5, "euler", 1),  # 2 CFG halves x (3, 2) frames
        ("frames", 2, 6, "consistency", 1),
    ],
)
def test_parallel_latents_equal_single_process(mode, ranks, frames, sampler, cache_interval, tmp_path) -> None:
    reference, _ = tiny_latents(None, frames, sampler, cache_interval)
    spawn(save_tiny_latents, ranks, str(tmp_path), mode, frames, sampler, cache_interval, 3.0)
    for rank in range(ranks):
        saved = torch.load(tmp_path / f"rank{rank}.pt")
        assert _relative_error(saved["latents"], reference) < TOLERANCE, rank
        assert saved["sent"] > 0  # counted by the collectives


@pytest.mark.slow
def test_full_size_unet_step_on_two_ranks(tmp_path) -> None:
    """One call of the random full-size SVD UNet (about 6 GiB per rank in fp32) at a 16 x 16 latent, frames split."""
    spawn(save_full_size_step, 2, str(tmp_path), "frames", 4, 16)
    saved = torch.load(tmp_path / "step.pt")
    assert _relative_error(saved["result"], saved["reference"]) < TOLERANCE


def test_splits_and_world_sizes() -> None:
    assert split_sizes(8, 3) == [3, 3, 2]
    assert split_sizes(25, 8) == [4, 3, 3, 3, 3, 3, 3, 3]
    assert check_world("guidance+frames", 6) == 3
    for mode, world, fragment in [("guidance", 3, "must be 2"), ("guidance+frames", 5, "must be even"), ("frames", 1, ">= 2"),
                                  ("pipeline", 2, "must be one of")]:  # fmt: skip
        with pytest.raises(ValueError, match=fragment):
            check_world(mode, world)


def test_parallelize_needs_a_process_group() -> None:
    pipe = svd_fast.optimize(tiny_pipeline(seed=0))
    with pytest.raises(ValueError, match="not initialized"):
        parallelize(pipe, "frames")


def test_guidance_mode_without_guidance_fails_every_rank(tmp_path) -> None:
    with pytest.raises(RuntimeError, match="rank [01] failed: .*classifier-free-guidance batch"):
        spawn(save_tiny_latents, 2, str(tmp_path), "guidance", 4, "euler", 1, 1.0)
    assert not list(tmp_path.iterdir())


def test_a_rank_that_dies_stops_the_others() -> None:
    with pytest.raises(RuntimeError, match="rank 1 exited with code 3"):
        spawn(die_on_rank_one, 2, 3, timeout_s=30)


def _cli(*arguments: str, env: dict | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "svd_fast.cli", *arguments]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("parallel_cli")
    tiny_image().save(root / "cat.png")
    return save_tiny_pipeline(root / "tiny"), root / "cat.png"


def test_cli_spawns_ranks_and_rank_zero_writes(tiny_folder, tmp_path) -> None:
    model, image = tiny_folder
    out = tmp_path / "frames"
    result = _cli("generate", "--model", str(model), "--image", str(image), "--out", str(out), "--steps", "1", "--frames", "4",
                  "--parallel", "frames", "--nproc", "2")  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert len(list(out.glob("*.png"))) == 4
    assert json.loads(result.stdout.strip().splitlines()[-1])["parallel"] == {"mode": "frames", "ranks": 2}


def test_cli_under_torchrun(tiny_folder, tmp_path) -> None:
    model, image = tiny_folder
    out = tmp_path / "frames"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
               "-m", "svd_fast.cli", "generate", "--model", str(model), "--image", str(image), "--out", str(out),
               "--steps", "1", "--frames", "4", "--parallel", "guidance"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert len(list(out.glob("*.png"))) == 4
