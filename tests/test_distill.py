"""`svd-fast distill`: the consistency distillation objective against a float64 implementation written from its
formulas (with small linear stand-in networks, so every term is checked exactly), the loss falling as a student
learns a fixed target, and the DeepSpeed run on the tiny pipeline: resume, export loaded by stock diffusers, the
svd_fast.json that `svd-fast generate` reads, bad input."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from training_fixtures import tiny_config, with_keys, workdir_fixture

from svd_fast.cli import main
from svd_fast.diffusers.tiny import TINY_HEIGHT, TINY_NUM_FRAMES, TINY_WIDTH, tiny_pipeline
from svd_fast.training.distill import DistillConfig, distill
from svd_fast.training.distill_objective import consistency_distillation_loss, karras_grid
from svd_fast.training.objective import TrainingBatch

workdir = workdir_fixture("distill")
SCHEDULE = (0.002, 700.0, 7.0)


class LinearStandIn(torch.nn.Module):
    """out = a * noisy_part + b * cond_part + c * timestep + d * embedding mean (a UNet's call signature)."""

    def __init__(self, a: float, b: float, c: float, d: float) -> None:
        super().__init__()
        self.weights = torch.nn.Parameter(torch.tensor([a, b, c, d], dtype=torch.float64))

    def forward(self, model_input, timestep, encoder_hidden_states, added_time_ids, return_dict=False):
        a, b, c, d = self.weights.to(model_input.dtype)
        shape = (-1, 1, 1, 1, 1)
        out = a * model_input[:, :, :2] + b * model_input[:, :, 2:] + c * timestep.view(shape) + d * encoder_hidden_states.mean(dim=(1, 2)).view(shape)
        return (out,)


def _batch(batch_size: int = 3, frames: int = 4) -> TrainingBatch:
    g = torch.Generator().manual_seed(0)
    return TrainingBatch(
        latents=torch.randn(batch_size, frames, 2, 3, 3, generator=g), cond_latent=torch.randn(batch_size, 2, 3, 3, generator=g),
        image_embeds=torch.randn(batch_size, 1, 5, generator=g) + 1, added_time_ids=torch.randn(batch_size, 3, generator=g),
        sigma=torch.ones(batch_size), noise=torch.randn(batch_size, frames, 2, 3, 3, generator=g),
        drop_image=torch.zeros(batch_size, dtype=torch.bool), drop_latent=torch.zeros(batch_size, dtype=torch.bool),
    )  # fmt: skip


def _reference_loss(student, target, teacher, batch, index, n, k, solver, guidance, kind):
    """float64, per sample, from the formulas of svd_fast.training.distill_objective's docstring."""
    s_min, s_max, rho = SCHEDULE

    def karras(position: float) -> float:
        return (s_max ** (1 / rho) + position * (s_min ** (1 / rho) - s_max ** (1 / rho))) ** rho

    def denoise(model, x, sigma, row, weights=None):
        cond = batch.cond_latent[row : row + 1].double().unsqueeze(1).expand(-1, x.shape[1], -1, -1, -1)
        embeds, ids = batch.image_embeds[row : row + 1].double(), batch.added_time_ids[row : row + 1].double()
        timestep = torch.tensor([0.25 * math.log(sigma)], dtype=torch.float64)
        scaled = x / math.sqrt(sigma**2 + 1)
        out = model(torch.cat([scaled, cond], dim=2), timestep, embeds, ids)[0]
        if weights is not None:
            uncond = model(torch.cat([scaled, torch.zeros_like(cond)], dim=2), timestep, torch.zeros_like(embeds), ids)[0]
            out = uncond + weights[None, :, None, None, None] * (out - uncond)
        return x / (sigma**2 + 1) - sigma / math.sqrt(sigma**2 + 1) * out

    losses = []
    for row in range(batch.latents.shape[0]):
        i = int(index[row])
        s_hi, s_lo, s_mid = karras(i / (n - 1)), karras((i + k) / (n - 1)), karras((i + k / 2) / (n - 1))
        x_hi = batch.latents[row : row + 1].double() + s_hi * batch.noise[row : row + 1].double()
        with torch.no_grad():
            d_hi = (x_hi - denoise(teacher, x_hi, s_hi, row, guidance)) / s_hi
            if solver == "euler":
                x_lo = x_hi + (s_lo - s_hi) * d_hi
            else:
                x_mid = x_hi + (s_mid - s_hi) * d_hi
                d_mid = (x_mid - denoise(teacher, x_mid, s_mid, row, guidance)) / s_mid
                x_lo = x_mid + (s_lo - s_mid) * (3 * d_mid - d_hi) / 2
            wanted = denoise(target, x_lo, s_lo, row)
        difference = denoise(student, x_hi, s_hi, row) - wanted
        if kind == "l2":
            losses.append(difference.square().mean())
        else:
            c = 0.00054 * math.sqrt(difference.numel())
            losses.append(torch.sqrt(difference.square().sum() + c * c) - c)
    return torch.stack(losses)


@pytest.mark.parametrize(("solver", "kind", "guided"), [("euler", "l2", False), ("ipndm-2", "pseudo-huber", True), ("ipndm-2", "l2", False)])
def test_objective_matches_float64_formulas(solver: str, kind: str, guided: bool) -> None:
    student, target, teacher = LinearStandIn(0.9, 0.1, 0.05, 0.2), LinearStandIn(0.8, 0.2, -0.05, 0.1), LinearStandIn(0.7, 0.3, 0.1, -0.2)
    batch = _batch()
    n, k = 12, 3
    index = torch.tensor([0, 4, 8])  # the top of the grid, the middle, and i + k = N - 1 (sigma_min)
    guidance = torch.linspace(1.0, 2.5, 4) if guided else None
    loss, per_sample, sigma = consistency_distillation_loss(
        student, target, teacher, batch, index, num_train_timesteps=n, skip_steps=k, schedule=SCHEDULE, solver=solver,
        guidance=None if guidance is None else guidance.expand(3, 4), kind=kind,
    )  # fmt: skip
    expected = _reference_loss(student, target, teacher, batch, index, n, k, solver, guidance.double() if guided else None, kind)
    # fp32 arithmetic against float64 on O(1)..O(700) latents: relative 1e-5.
    torch.testing.assert_close(per_sample.double(), expected.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sigma.double(), karras_grid(n, *SCHEDULE)[index], rtol=1e-6, atol=0)
    loss.backward()
    assert student.weights.grad is not None and teacher.weights.grad is None and target.weights.grad is None


def test_student_learns_the_target() -> None:
    """Small normalised gradient steps of the student (the tiny UNet) against a fixed teacher/target lower the
    distillation loss at every step (first order: the steps are short enough for curvature not to undo that)."""
    pipe = tiny_pipeline(seed=0)
    teacher = copy.deepcopy(pipe.unet).eval().requires_grad_(False)
    student = pipe.unet.train()
    params = [p for p in student.parameters() if p.requires_grad]
    g = torch.Generator().manual_seed(1)
    batch = TrainingBatch(
        latents=torch.randn(1, 2, 4, 8, 8, generator=g), cond_latent=torch.randn(1, 4, 8, 8, generator=g),
        image_embeds=torch.randn(1, 1, 64, generator=g), added_time_ids=torch.tensor([[6.0, 127.0, 0.02]]),
        sigma=torch.ones(1), noise=torch.randn(1, 2, 4, 8, 8, generator=g), drop_image=torch.zeros(1, dtype=torch.bool),
        drop_latent=torch.zeros(1, dtype=torch.bool),
    )  # fmt: skip
    losses = []
    for _ in range(4):
        loss, _, _ = consistency_distillation_loss(
            student, teacher, teacher, batch, torch.tensor([20]), num_train_timesteps=40, skip_steps=4, schedule=SCHEDULE,
            solver="euler", guidance=None, kind="l2",
        )  # fmt: skip
        grads = torch.autograd.grad(loss, params)
        norm = torch.sqrt(sum(grad.square().sum() for grad in grads))
        with torch.no_grad():
            for param, grad in zip(params, grads):
                param.sub_(grad, alpha=3e-3 / norm.item())
        losses.append(loss.item())
    assert all(later < earlier for earlier, later in zip(losses, losses[1:])), losses


# --- the DeepSpeed run on the tiny pipeline --------------------------------------------------------------------------


def _config(workdir: Path, out: str, **overrides) -> dict:
    """The tiny distillation config; ``overrides``: ``section.key`` or a top-level key -> value."""
    values = tiny_config(workdir, out, use_svd_fast_kernels=True, distill={"num_train_timesteps": 8, "skip_steps": 2,
                         "teacher_solver": "ipndm-2", "student_steps": 2}, **{"optimizer.learning_rate": 1e-4})  # fmt: skip
    return with_keys(values, overrides)


def test_distill_resumes_exactly_and_exports_a_consistency_pipeline(workdir: Path) -> None:
    full = distill(_config(workdir, "full", max_steps=4, **{"logging.checkpoint_every": 2, "logging.export": True}))
    assert len(full.losses) == 4 and all(np.isfinite(full.losses)) and min(full.losses) > 0
    resumed = distill(_config(workdir, "resumed", max_steps=4, resume_from=str(workdir / "full" / "checkpoints" / "step_2"),
                              **{"logging.export": False}))
    assert resumed.losses == full.losses  # same data, noise, grid indices, optimiser and target network state
    target_full = torch.load(workdir / "full" / "checkpoints" / "step_4" / "target_rank0.pt", weights_only=True)
    target_resumed = torch.load(workdir / "resumed" / "checkpoints" / "step_4" / "target_rank0.pt", weights_only=True)
    assert target_full.keys() == target_resumed.keys() and all(torch.equal(target_full[k], target_resumed[k]) for k in target_full)

    settings = json.loads((full.export_path / "svd_fast.json").read_text())
    assert settings["sampler"] == "consistency" and settings["num_inference_steps"] == 2
    assert settings["scheduler_config"]["num_train_timesteps"] == 8
    from diffusers import StableVideoDiffusionPipeline
    from PIL import Image

    from svd_fast.data.synthetic import translating_texture

    pipe = StableVideoDiffusionPipeline.from_pretrained(full.export_path)  # stock diffusers, no svd_fast involved
    image = Image.fromarray(translating_texture(1, TINY_HEIGHT, TINY_WIDTH)[0])
    video = pipe(image, height=TINY_HEIGHT, width=TINY_WIDTH, num_frames=TINY_NUM_FRAMES, num_inference_steps=2,
                 decode_chunk_size=TINY_NUM_FRAMES, output_type="pt", generator=torch.Generator().manual_seed(0)).frames
    assert video.shape == (1, TINY_NUM_FRAMES, 3, TINY_HEIGHT, TINY_WIDTH) and torch.isfinite(video).all()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"distill.skip_steps": 8}, r"distill\.skip_steps"),
        ({"distill.teacher_solver": "heun"}, r"distill\.teacher_solver"),
        ({"distill.loss": "l1"}, r"distill\.loss"),
        ({"objective.drop_both": 0.1}, r"objective\.drop_both"),
        ({"distill.sigma_min": 0.0}, r"distill\.sigma_min"),
        ({"distill.student_steps": 9}, r"distill\.student_steps"),
        ({"distill.target_ema_decay": 1.0}, r"distill\.target_ema_decay"),
        ({"distill.teacher_min_guidance": 2.0}, r"distill\.teacher_min_guidance"),
        ({"distill.skip_stpes": 2}, r"distill\.skip_stpes"),
        ({"validation.inference_steps": 9}, r"validation\.inference_steps must be <= distill\.num_train_timesteps"),
    ],
)
def test_config_errors_name_the_key(workdir: Path, overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DistillConfig.from_dict(_config(workdir, "bad", **overrides))


def test_cli_bad_input_is_one_line_before_models_load(workdir: Path, tmp_path: Path, capsys) -> None:
    not_svd = tmp_path / "not_svd"
    not_svd.mkdir()
    (not_svd / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    cases = [
        ({"model": str(not_svd)}, "must be a StableVideoDiffusionPipeline"),
        ({"distill.skip_steps": 0}, "distill.skip_steps"),
        ({"unknown_key": 1}, "unknown_key"),
    ]
    for overrides, message in cases:
        config = tmp_path / "config.json"
        config.write_text(json.dumps(_config(workdir, "cli_bad", **overrides)))
        assert main(["distill", "--config", str(config)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("svd-fast distill: error: ") and message in err[0], err
    assert not (workdir / "cli_bad" / "checkpoints").exists()
