"""Training: the EDM objective against a direct computation, the DeepSpeed trainer (1 and 2 processes, ZeRO-2/3),
exact resume, export to a diffusers folder, and config / data errors. CPU, tiny model, few steps."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from training_fixtures import tiny_config, workdir_fixture

from svd_fast.commands.errors import UsageError
from svd_fast.data.synthetic import translating_texture, write_video
from svd_fast.diffusers.tiny import TINY_HEIGHT, TINY_NUM_FRAMES, TINY_WIDTH, tiny_pipeline
from svd_fast.training import ObjectiveConfig, TrainConfig, edm_loss, encode_batch, train

REPO = Path(__file__).resolve().parents[1]


workdir = workdir_fixture("training")


# ----------------------------------------------------------------------------------------------- objective
def _direct_loss(unet, x, cond_latent, image_embeds, time_ids, sigma, noise) -> torch.Tensor:
    """The loss written out from the formulas in SVD_NOTES.md, independent of svd_fast.sampling."""
    frames = x.shape[1]
    losses = []
    for i in range(x.shape[0]):
        s = float(sigma[i])
        noisy = x[i : i + 1] + s * noise[i : i + 1]
        c_in, c_skip, c_out = 1 / (s * s + 1) ** 0.5, 1 / (s * s + 1), -s / (s * s + 1) ** 0.5
        cond = cond_latent[i : i + 1, None].expand(1, frames, -1, -1, -1)
        out = unet(torch.cat([c_in * noisy, cond], dim=2), torch.tensor([0.25 * np.log(s)]),
                   encoder_hidden_states=image_embeds[i : i + 1], added_time_ids=time_ids[i : i + 1]).sample
        denoised = c_skip * noisy + c_out * out
        losses.append((s * s + 1) / (s * s) * ((denoised - x[i : i + 1]) ** 2).mean())
    return torch.stack(losses).mean()


def test_objective_matches_pipeline_conditioning_and_direct_loss() -> None:
    pipe = tiny_pipeline(seed=1)
    # Pixel values on the uint8 grid, so the pipeline's PIL path sees exactly the same image.
    frames_u8 = translating_texture(TINY_NUM_FRAMES, TINY_HEIGHT, TINY_WIDTH, seed=3)
    pixels = torch.from_numpy(frames_u8).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
    pixels = torch.stack([pixels, pixels.flip(0)])  # batch of 2, different first frames
    fps, motion = torch.tensor([8.0, 25.0]), torch.tensor([127.0, 40.0])
    config = ObjectiveConfig(drop_image_embedding=0.0, drop_both=0.0, drop_cond_latent=0.0)
    batch = encode_batch(pixels, fps, motion, pipe.vae, pipe.image_encoder, pipe.feature_extractor, config, torch.Generator().manual_seed(0))

    from PIL import Image

    for i in range(2):
        first_u8 = frames_u8[0] if i == 0 else frames_u8[-1]
        expected_embeds = pipe._encode_image(Image.fromarray(first_u8), "cpu", 1, False)
        torch.testing.assert_close(batch.image_embeds[i : i + 1], expected_embeds, atol=1e-5, rtol=1e-4)
        sigma_aug = float(batch.added_time_ids[i, 2])
        expected_ids = pipe._get_add_time_ids(int(fps[i]) - 1, int(motion[i]), sigma_aug, torch.float32, 1, 1, False)
        torch.testing.assert_close(batch.added_time_ids[i : i + 1], expected_ids)
    # Noise augmentation strength: ln s_aug ~ N(-3, 0.5^2) -> within 6 std devs.
    assert torch.all((batch.added_time_ids[:, 2].log() + 3.0).abs() < 3.0)
    # Replay the generator: targets are posterior samples * scaling factor; the conditioning latent is the
    # pipeline's _encode_vae_image (mode, unscaled) of the first frame plus s_aug * noise.
    replay = torch.Generator().manual_seed(0)
    posterior = pipe.vae.encode(pixels.flatten(0, 1)).latent_dist
    eps = torch.randn(posterior.mean.shape, generator=replay)
    expected_latents = ((posterior.mean + posterior.std * eps) * pipe.vae.config.scaling_factor).unflatten(0, (2, TINY_NUM_FRAMES))
    torch.testing.assert_close(batch.latents, expected_latents, atol=1e-5, rtol=1e-5)
    sigma_aug = torch.exp(-3.0 + 0.5 * torch.randn(2, generator=replay))
    torch.testing.assert_close(batch.added_time_ids[:, 2], sigma_aug)
    augmented = pixels[:, 0] + sigma_aug.view(-1, 1, 1, 1) * torch.randn(pixels[:, 0].shape, generator=replay)
    with torch.no_grad():
        expected_cond = pipe._encode_vae_image(augmented, "cpu", 1, False)
    torch.testing.assert_close(batch.cond_latent, expected_cond, atol=1e-5, rtol=1e-5)

    loss, per_sample = edm_loss(pipe.unet, batch)
    with torch.no_grad():
        direct = _direct_loss(pipe.unet, batch.latents, batch.cond_latent, batch.image_embeds, batch.added_time_ids, batch.sigma, batch.noise)
    torch.testing.assert_close(loss.detach(), direct, rtol=1e-5, atol=1e-6)
    assert per_sample.shape == (2,)

    # Dropping both conditionings equals the direct loss with zeroed image embedding and conditioning latent.
    drop_all = ObjectiveConfig(drop_image_embedding=0.0, drop_both=1.0, drop_cond_latent=0.0)
    dropped = encode_batch(pixels, fps, motion, pipe.vae, pipe.image_encoder, pipe.feature_extractor, drop_all, torch.Generator().manual_seed(0))
    assert dropped.drop_image.all() and dropped.drop_latent.all()
    with torch.no_grad():
        loss_dropped, _ = edm_loss(pipe.unet, dropped)
        direct_dropped = _direct_loss(pipe.unet, dropped.latents, torch.zeros_like(dropped.cond_latent), torch.zeros_like(dropped.image_embeds),
                                      dropped.added_time_ids, dropped.sigma, dropped.noise)
    torch.testing.assert_close(loss_dropped, direct_dropped, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(loss_dropped, loss.detach())


def test_noise_level_distribution() -> None:
    pipe = tiny_pipeline(seed=0)
    pixels = torch.zeros(64, 1, 3, 32, 32)
    config = ObjectiveConfig(p_mean=0.7, p_std=1.6, drop_image_embedding=0.25, drop_both=0.25, drop_cond_latent=0.25)
    batch = encode_batch(pixels, torch.full((64,), 7.0), torch.full((64,), 127.0), pipe.vae, pipe.image_encoder, pipe.feature_extractor, config, torch.Generator().manual_seed(0))
    log_sigma = batch.sigma.log()
    assert abs(log_sigma.mean().item() - 0.7) < 4 * 1.6 / 8  # 4 standard errors
    assert 0.9 < log_sigma.std().item() / 1.6 < 1.1 + 0.3
    only_image = batch.drop_image & ~batch.drop_latent
    only_latent = batch.drop_latent & ~batch.drop_image
    both = batch.drop_image & batch.drop_latent
    for group in (only_image, only_latent, both):
        assert 4 <= int(group.sum()) <= 30  # expected 16 of 64


# -------------------------------------------------------------------------------------------------- trainer
def test_loss_decreases_when_overfitting_one_clip(workdir: Path) -> None:
    # A narrow noise-level distribution and no dropout make the per-step loss comparable across steps.
    objective = {"p_mean": 0.0, "p_std": 0.05, "drop_image_embedding": 0.0, "drop_both": 0.0, "drop_cond_latent": 0.0}
    result = train(tiny_config(workdir, "overfit", max_steps=12, objective=objective, use_svd_fast_kernels=False,
                               **{"optimizer.learning_rate": 2e-3}))
    assert len(result.losses) == 12 and all(np.isfinite(result.losses))
    assert np.mean(result.losses[-3:]) < 0.7 * np.mean(result.losses[:3]), result.losses
    records = [json.loads(line) for line in result.log_path.read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 13))
    assert all(r["samples_per_s"] > 0 and r["memory_mb"] > 0 and r["sigma_binned_loss"] for r in records)
    assert all(r["memory_reserved_mb"] is None for r in records)  # no caching allocator on the CPU


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run_two_processes(workdir: Path, values: dict, expect_success: bool = True) -> list:
    config_path = Path(values["output_dir"] + ".json")
    config_path.write_text(json.dumps(values))
    port = str(_free_port())
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=port, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
        procs.append(subprocess.Popen([sys.executable, "-m", "svd_fast.train", "--config", str(config_path)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = [proc.communicate(timeout=900) for proc in procs]  # generous: CI machines are shared
    if not expect_success:
        return [(proc.returncode, stderr) for proc, (_, stderr) in zip(procs, outputs)]
    for proc, (_, stderr) in zip(procs, outputs):
        assert proc.returncode == 0, stderr[-3000:]
    return [json.loads(stdout.strip().splitlines()[-1]) for stdout, _ in outputs]


def test_two_process_zero2_and_zero3_agree(workdir: Path) -> None:
    # Two clips so each rank gets its own file.
    write_video(workdir / "data" / "clip2.mp4", translating_texture(TINY_NUM_FRAMES, TINY_HEIGHT, TINY_WIDTH, shift=(1.0, 0.0), seed=5), fps=8)
    try:
        common = {"max_steps": 2, "logging.export": True, "ema_decay": 0.5, "use_svd_fast_kernels": False}
        zero2 = _run_two_processes(workdir, tiny_config(workdir, "zero2", **{"deepspeed.zero_stage": 2, **common}))
        zero3 = _run_two_processes(workdir, tiny_config(workdir, "zero3", **{"deepspeed.zero_stage": 3, "logging.export_ema": False, **common}))
    finally:
        (workdir / "data" / "clip2.mp4").unlink()
    for rank in range(2):
        # Same data, seeds and initial weights: the first step's loss is identical, later ones agree to fp32 rounding.
        assert zero2[rank]["losses"][0] == pytest.approx(zero3[rank]["losses"][0], rel=1e-6)
        assert zero2[rank]["losses"] == pytest.approx(zero3[rank]["losses"], rel=1e-4)
    assert zero2[0]["losses"] != zero2[1]["losses"]  # ranks saw different clips / noise
    from diffusers import UNetSpatioTemporalConditionModel

    base = UNetSpatioTemporalConditionModel.from_pretrained(workdir / "tiny", subfolder="unet")
    trained = UNetSpatioTemporalConditionModel.from_pretrained(workdir / "zero3" / "pipeline", subfolder="unet")
    change = max((a - b).abs().max().item() for a, b in zip(base.parameters(), trained.parameters()))
    assert change > 1e-4  # the gathered ZeRO-3 parameters were trained, not the initial ones


def test_resume_is_bit_exact_and_export_loads(workdir: Path) -> None:
    # Clips decoded by DataLoader workers (a new epoch every step: one clip), as the default num_workers does.
    common = {"max_steps": 4, "ema_decay": 0.7, "logging.export": True, "logging.export_ema": False, "use_svd_fast_kernels": False,
              "data.num_workers": 2}
    full = train(tiny_config(workdir, "full", **{"logging.checkpoint_every": 2, **common}))
    resumed = train(tiny_config(workdir, "resumed", resume_from=str(workdir / "full" / "checkpoints" / "step_2"), **common))
    assert resumed.losses == full.losses  # exact: same noise, data position, optimizer and scheduler state
    from safetensors.torch import load_file

    weights_full = load_file(workdir / "full" / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors")
    weights_resumed = load_file(workdir / "resumed" / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors")
    assert weights_full.keys() == weights_resumed.keys()
    assert all(torch.equal(weights_full[key], weights_resumed[key]) for key in weights_full)
    ema_full = torch.load(workdir / "full" / "checkpoints" / "step_4" / "ema_rank0.pt", weights_only=True)
    ema_resumed = torch.load(workdir / "resumed" / "checkpoints" / "step_4" / "ema_rank0.pt", weights_only=True)
    assert ema_full["updates"] == ema_resumed["updates"] == 4
    assert all(torch.equal(ema_full["values"][key], ema_resumed["values"][key]) for key in ema_full["values"])
    # "latest" resumes from the newest checkpoint in output_dir; nothing is left to do at max_steps.
    again = train(tiny_config(workdir, "full", resume_from="latest", **common))
    assert again.losses == full.losses

    from diffusers import StableVideoDiffusionPipeline
    from PIL import Image

    pipe = StableVideoDiffusionPipeline.from_pretrained(full.export_path)
    image = Image.fromarray(translating_texture(1, TINY_HEIGHT, TINY_WIDTH)[0])
    video = pipe(image, height=TINY_HEIGHT, width=TINY_WIDTH, num_frames=TINY_NUM_FRAMES, num_inference_steps=2,
                 decode_chunk_size=TINY_NUM_FRAMES, output_type="pt", generator=torch.Generator().manual_seed(0)).frames
    assert video.shape == (1, TINY_NUM_FRAMES, 3, TINY_HEIGHT, TINY_WIDTH) and torch.isfinite(video).all()


# ----------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"optimizer.learning_rte": 1e-4}, r"optimizer\.learning_rte"),
        ({"learning_rte": 1e-4}, "learning_rte"),
        ({"deepspeed.zero_stage": 5}, r"deepspeed\.zero_stage"),
        ({"precision": "fp8"}, "precision"),
        ({"max_steps": 0}, "max_steps"),
        ({"deepspeed.offload_param": "cpu", "deepspeed.zero_stage": 2}, r"deepspeed\.offload_param"),
        ({"deepspeed.offload_optimizer": "cpu"}, r"deepspeed\.offload_optimizer needs optimizer\.name"),
        ({"objective.drop_both": 0.6, "objective.drop_image_embedding": 0.6}, r"objective\.drop_"),
        ({"data.height": 60}, r"data\.height"),
        ({"ema_decay": 1.0}, "ema_decay"),
        ({"data": 3}, r"data \(now data\.path\) must be of type"),
        ({"lora": 3}, "lora must be a mapping"),
        ({"data.num_workers": -1}, r"data\.num_workers"),
    ],
)
def test_config_errors_name_the_key(workdir: Path, overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TrainConfig.from_dict(tiny_config(workdir, "bad", **overrides))


def test_runtime_errors_before_heavy_work(workdir: Path) -> None:
    with pytest.raises(ValueError, match="fp16"):
        train(tiny_config(workdir, "bad", precision="fp16", device="cpu"))
    with pytest.raises(ValueError, match="resume_from"):
        train(tiny_config(workdir, "bad", resume_from=str(workdir / "no_such_checkpoint")))
    with pytest.raises(ValueError, match="resume_from"):
        train(tiny_config(workdir, "never_ran", resume_from="latest"))
    with pytest.raises(ValueError, match="model"):
        train(tiny_config(workdir, "bad", model=str(workdir / "missing_model")))
    with pytest.raises(ValueError, match="config"):
        TrainConfig.from_file(workdir / "missing.yaml")


def test_data_without_usable_clips(workdir: Path, tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("no videos here")
    with pytest.raises(ValueError, match="no video files"):
        train(tiny_config(workdir, "bad", **{"data.path": str(tmp_path)}))
    (tmp_path / "broken.mp4").write_bytes(b"\x00not a video" * 10)
    write_video(tmp_path / "short.mp4", translating_texture(3, TINY_HEIGHT, TINY_WIDTH), fps=8)  # < num_frames
    with pytest.raises(ValueError, match="none of the first 2 videos holds a clip of 8 frames"):
        train(tiny_config(workdir, "bad", **{"data.path": str(tmp_path)}))


def test_bf16_accumulation_checkpointing_warmup_and_cli(workdir: Path) -> None:
    import argparse

    from svd_fast.commands import train as train_command

    config_path = workdir / "cli.json"
    config_path.write_text(json.dumps(tiny_config(workdir, "cli")))
    parser = argparse.ArgumentParser()
    train_command.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["train", "--config", str(config_path), "--set", "precision=bf16", "--set", "optimizer.gradient_accumulation_steps=2",
                              "--set", "activation_checkpointing=all", "--set", "optimizer.warmup_steps=4", "--set", "max_steps=2"])
    assert args.func(args) == 0
    records = [json.loads(line) for line in (workdir / "cli" / "train_log.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in records] == pytest.approx([1e-3 * 1 / 4, 1e-3 * 2 / 4])  # linear warmup
    assert all(np.isfinite(r["loss"]) for r in records)
    with pytest.raises(UsageError, match="KEY=VALUE"):
        train_command.parse_overrides(["max_steps"])


def test_two_processes_one_without_clips_fail_together(workdir: Path) -> None:
    # One video file, two ranks: rank 1's shard is empty. Both must stop with the reason, not hang.
    results = _run_two_processes(workdir, tiny_config(workdir, "one_file", max_steps=1), expect_success=False)
    assert all(code != 0 for code, _ in results)
    assert any("no usable clips" in stderr for _, stderr in results)
