"""DeepSpeed (ZeRO 0-3) trainer for the SVD UNet on video clips; the VAE and CLIP image encoder stay frozen.

One process per device (``deepspeed``/``torchrun`` launchers, or plain ``python`` for one process on a free
port). On a machine without CUDA it runs on the CPU with gloo. Every step is reproducible: noise, noise levels
and dropout come from a generator seeded by (seed, rank, micro-step), so a resumed run continues exactly as an
uninterrupted one. The phases live in their own modules: setup (checks, process group, engine), checkpoint
(atomic saves, safe resumes), step (one optimiser step), log (train_log.jsonl), ema (sharded fp32 EMA),
lora (peft adapters, ``trained_parameters: lora``) and validation (sample clips every ``validation.every`` steps);
each receives its section of the config (svd_fast.training.config).
"""

from __future__ import annotations

import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from svd_fast import _io
from svd_fast.training.checkpoint import (
    EMA_FILE,
    LATEST,
    STATE_FILE,
    load_checkpoint,
    read_complete,
    resolve_resume,
    save_checkpoint,
)
from svd_fast.training.config import DataSection, LoggingSection, TrainConfig
from svd_fast.training.ema import ShardedEMA, full_shapes, gather_full, local_master_fragments
from svd_fast.training.latents import PrecomputedClips
from svd_fast.training.log import TrainLog
from svd_fast.training.lora import add_lora, merge_lora, save_lora
from svd_fast.training.model_card import card_files
from svd_fast.training.run import apply_learning_rate, changed_settings, check_same_run, current_identity, new_identity, write_identity
from svd_fast.training.setup import CheckedInputs, Models, TrainInputError, build_models, check_inputs, resolve_device, setup_distributed
from svd_fast.training.step import ClipStream, StepRunner, restore_rng_state, rng_state
from svd_fast.training.tracking import Tracker
from svd_fast.training.validation import SamplingModel, Validator


@dataclass
class TrainResult:
    losses: list[float]  # mean loss per optimiser step (this process), from step 1 (including resumed history)
    steps: int
    checkpoint_dir: Path | None  # the last checkpoint written
    export_path: Path | None  # the exported diffusers pipeline folder (rank 0)
    log_path: Path
    kernel_status: str
    samples_per_second: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


def as_config(config: TrainConfig | dict[str, Any] | str | Path) -> TrainConfig:
    if isinstance(config, dict):
        return TrainConfig.from_dict(config)
    if isinstance(config, TrainConfig):
        return config
    return TrainConfig.from_file(config)


def open_dataset(data: DataSection, seed: int, rank: int, world_size: int, device: torch.device | None = None):
    """This rank's clips: precomputed features (``data.latents_dir``) or decoded videos (``data.path``): NVDEC
    decodes them on the GPU (``video_decoder: dali`` on a CUDA ``device``), DataLoader workers on the CPU
    (``num_workers`` > 0), or the training loop itself (``num_workers: 0``)."""
    if data.latents_dir is not None:
        return PrecomputedClips(data.latents_dir, data.shuffle, seed, rank, world_size)
    from svd_fast.data import VideoClipDataset, WorkerClips  # noqa: PLC0415 - defers av/cv2 (video decoding)

    cuda = device is not None and device.type == "cuda"
    nvdec = data.video_decoder == "dali" and cuda
    dataset = VideoClipDataset(
        data.path, num_frames=data.num_frames, size=(data.height, data.width), stride=data.stride,
        target_fps=data.target_fps, random_crop=data.random_crop, shuffle=data.shuffle, seed=seed,
        rank=rank, world_size=world_size, on_short=data.on_short, backend="auto" if nvdec else data.video_decoder,
        decode_device="cuda" if nvdec else "cpu",
    )
    if nvdec or data.num_workers == 0:
        return dataset
    return WorkerClips(dataset, data.num_workers, pin_memory=cuda, seed=seed * 1_000_003 + rank)


def sampling_model(config: TrainConfig) -> SamplingModel:
    """The pipeline validation samples the trained UNet in."""
    return SamplingModel(config.model, config.model_variant, config.use_svd_fast_kernels, config.peft_lora(), config.precision)


@dataclass
class TrainerState:
    """What a checkpoint adds to DeepSpeed's state, per rank."""

    step: int = 0
    micro_step: int = 0
    losses: list[float] = field(default_factory=list)
    data_epoch: int = 0
    data_position: int = 0


def train(config: TrainConfig | dict[str, Any] | str | Path) -> TrainResult:
    """Train (or resume) as ``config`` says; returns losses, the last checkpoint and the exported pipeline."""
    config = as_config(config)
    output_dir = Path(config.output_dir)
    config_dict = config.to_dict()
    try:  # everything cheap, before any model loads
        checked = check_inputs(config)
        resume_path = resolve_resume(config.resume_from, output_dir)
        identity, changes = run_identity(config, config_dict, resume_path, output_dir)
    except ValueError as error:
        raise TrainInputError(config.as_given(str(error))) from error
    device = resolve_device(config.device)
    rank, world_size = setup_distributed(device)
    if rank == 0:
        _io.claim_folder(output_dir, "train", name="output_dir:")
    # One lock per rank: every rank of a second run on the same folder finds its lock held and stops.
    with _io.lock(output_dir / f".svd-fast-lock-rank{rank}", "training run", output_dir, busy=OutputDirBusyError):
        return _train(config, config_dict, checked, resume_path, identity, changes, device, rank, world_size)


class OutputDirBusyError(_io.OutputBusyError, ValueError):
    """Another training run is writing the same output_dir (a ValueError: the config names a busy folder)."""


class NonFiniteLossError(RuntimeError):
    """The loss was not finite for max_nonfinite_steps steps in a row; the run stopped."""


def run_identity(config: TrainConfig, config_dict: dict[str, Any], resume_path: Path | None, output_dir: Path) -> tuple[dict, dict]:
    """This run's identity and the settings changed since ``resume_path`` (checked: see svd_fast.training.run)."""
    if resume_path is None:
        kept = current_identity(output_dir) if config.resume_from == LATEST else None  # every save was interrupted
        return kept or new_identity(config_dict), {}
    if config.resume_from == LATEST:
        check_same_run(resume_path, output_dir, config.allow_other_run)
    changes = changed_settings(resume_path, config_dict)
    return read_complete(resume_path).get("run") or current_identity(output_dir) or new_identity(config_dict), changes


def all_finite(loss: float) -> bool:
    finite = torch.tensor([1.0 if math.isfinite(loss) else 0.0])
    torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
    return bool(finite.item())


def _train(config: TrainConfig, config_dict: dict[str, Any], checked: CheckedInputs, resume_path: Path | None, identity: dict[str, Any],
           changes: dict[str, tuple[Any, Any]], device: torch.device, rank: int, world_size: int) -> TrainResult:
    output_dir = Path(config.output_dir)
    if rank == 0:
        write_identity(output_dir, identity)
    dataset = open_dataset(config.data, config.seed, rank, world_size, device)
    models = build_models(config, device, checked.deepspeed_config)
    engine = models.engine
    ema_device = torch.device("cpu") if config.deepspeed.offload_optimizer != "none" else None
    ema = ShardedEMA(engine.module, config.ema_decay, ema_device) if config.ema_decay > 0 else None

    checkpoint_root = output_dir / "checkpoints"
    if rank == 0:
        _io.write_json(output_dir / "train_config.json", config_dict, fsync=True)

    state = TrainerState()
    last_checkpoint: Path | None = None
    if resume_path is not None:
        saved, ema_state = load_checkpoint(engine, resume_path, rank)
        if saved["world_size"] != world_size:
            raise ValueError(f"resume_from: {resume_path} was written by {saved['world_size']} processes, this run has {world_size}")
        state = TrainerState(saved["step"], saved["micro_step"], list(saved["losses"]), saved["data_epoch"], saved["data_position"])
        restore_rng_state(saved["rng"])
        if "optimizer.learning_rate" in changes:
            apply_learning_rate(engine, config.optimizer.learning_rate)
        if ema is not None:
            if ema_state is None:
                raise ValueError(f"resume_from: {resume_path} has no EMA ({EMA_FILE.format(rank=rank)}) but ema_decay > 0")
            ema.load_state_dict(ema_state)
        last_checkpoint = resume_path
    stream = ClipStream(dataset, config.data.batch_size, state.data_epoch, state.data_position)
    runner = StepRunner(config, models, stream, device, rank, state.micro_step)
    logging = config.logging
    tracker = Tracker(logging.report_to, output_dir, identity["run_id"], config_dict) if rank == 0 and logging.report_to != "none" else None
    log = TrainLog(output_dir / "train_log.jsonl", state.step, list(logging.sigma_bins), world_size, device, rank, identity["run_id"], tracker)
    validation = config.validation
    validator = None
    if validation.every and rank == 0:
        validator = Validator(validation, config.data, config.seed, sampling_model(config), models.pipeline, device, output_dir,
                              checked.validation_images)  # fmt: skip

    def checkpoint() -> Path:
        files: dict[str, Any] = {STATE_FILE.format(rank=rank): {
            "step": state.step, "micro_step": runner.micro_step, "losses": state.losses, "data_epoch": stream.epoch,
            "data_position": stream.position, "world_size": world_size, "rng": rng_state(),
        }}
        if ema is not None:
            files[EMA_FILE.format(rank=rank)] = ema.state_dict()
        return save_checkpoint(engine, checkpoint_root, state.step, files, rank, {"run": identity, "config": config_dict},
                               keep=logging.keep_checkpoints, keep_every=logging.keep_every)

    samples_seen, start, nonfinite_in_a_row = 0, time.perf_counter(), 0
    progress = tqdm(total=config.max_steps, initial=state.step, desc="train", unit="step", disable=rank != 0)
    while state.step < config.max_steps:
        stats = runner.run()
        state.step += 1
        state.losses.append(stats.loss)
        samples_seen += stats.samples
        progress.set_postfix(loss=f"{stats.loss:.4f}", refresh=False)
        progress.update(1)
        finite = all_finite(stats.loss)
        nonfinite_in_a_row = 0 if finite else nonfinite_in_a_row + 1
        if nonfinite_in_a_row >= config.max_nonfinite_steps:
            log.record(state.step, stats, write=True)
            progress.close()
            kept = f"the last good checkpoint is {last_checkpoint}" if last_checkpoint is not None else "no checkpoint was saved"
            raise NonFiniteLossError(f"step {state.step}: the loss is {stats.loss} ({nonfinite_in_a_row} step(s) in a row, "
                                     f"max_nonfinite_steps: {config.max_nonfinite_steps}); training stopped, {kept} "
                                     "(lower optimizer.learning_rate, or raise max_nonfinite_steps where fp16 overflows skip steps)")
        if ema is not None and finite:
            ema.update(engine.module)
        extra = {}
        if validation.every and state.step % validation.every == 0:
            trained_state = trained_full_state(engine.module, ema)  # a collective: every rank takes part
            if validator is not None:
                extra["validation"] = validator.run(state.step, trained_state)
        write = state.step % logging.log_every == 0 or state.step == config.max_steps or bool(extra)
        log.record(state.step, stats, write=write, extra=extra)
        if logging.checkpoint_every and state.step % logging.checkpoint_every == 0 and finite:
            last_checkpoint = checkpoint()
    progress.close()
    if tracker is not None:
        tracker.close()
    elapsed = time.perf_counter() - start
    if (last_checkpoint is None or last_checkpoint.name != f"step_{state.step}") and nonfinite_in_a_row == 0:  # never lose the finished steps
        last_checkpoint = checkpoint()

    export_path = None
    if logging.export:
        cards = {kind: card_files(config, config_dict, kind) for kind in ("pipeline", "lora")} if rank == 0 else {}
        export_path = export_pipeline(models, ema, sampling_model(config), logging, output_dir / "pipeline", rank,
                                      extra_files=cards.get("pipeline"), lora_files=cards.get("lora"))
    torch.distributed.barrier()
    extra = {"lora": str(output_dir / "lora")} if export_path is not None and config.trained_parameters == "lora" else {}
    return TrainResult(
        losses=state.losses, steps=state.step, checkpoint_dir=last_checkpoint, export_path=export_path, log_path=log.path,
        kernel_status=models.kernel_status, samples_per_second=samples_seen * world_size / max(elapsed, 1e-9), extra=extra,
    )


def export_pipeline(models: Models, ema: ShardedEMA | None, base: SamplingModel, logging: LoggingSection, target: Path, rank: int,
                    extra_files: dict[str, bytes] | None = None, lora_files: dict[str, bytes] | None = None) -> Path:
    """Write a diffusers pipeline folder: the base pipeline's other components and the trained UNet, from the
    fp32 master weights (or their EMA, ``logging.export_ema``), and ``extra_files`` (name -> content: the model
    card) at its top, in the same atomic replace (``lora_files`` likewise beside the adapter). Frozen parameters keep the base pipeline's fp32 values. With LoRA adapters
    (``base.lora``) the adapter is also written on its own (``lora`` beside ``target``, see
    svd_fast.training.lora) and the pipeline's UNet has it merged. A collective."""
    state = trained_full_state(models.engine.module, ema if logging.export_ema else None)
    if rank == 0:
        from diffusers import UNetSpatioTemporalConditionModel  # noqa: PLC0415 - diffusers loads only when a model is built

        unet = UNetSpatioTemporalConditionModel.from_pretrained(base.model, subfolder="unet", variant=base.variant, dtype=torch.float32)
        if base.lora is not None:
            add_lora(unet, base.lora)
        _, unexpected = unet.load_state_dict(state, strict=False)
        if unexpected:
            raise RuntimeError(f"export: parameter names do not match the base UNet (unexpected {unexpected[:3]})")
        if base.lora is not None:
            def write_lora(staging: Path) -> None:
                save_lora(unet, base.lora, staging, base_model=base.model)
                for name, content in (lora_files or {}).items():
                    (staging / name).write_bytes(content)

            _io.replace_folder(target.with_name("lora"), "lora", write_lora, [base.model], name="lora export")
            merge_lora(unet)

        def write_pipeline(staging: Path) -> None:
            shutil.copytree(base.model, staging, ignore=shutil.ignore_patterns("unet", _io.MARKER), dirs_exist_ok=True)
            unet.save_pretrained(staging / "unet", safe_serialization=True)
            for name, content in (extra_files or {}).items():
                (staging / name).write_bytes(content)

        _io.replace_folder(target, "pipeline", write_pipeline, [base.model], name="pipeline export")
    return target


def trained_full_state(module: torch.nn.Module, ema: ShardedEMA | None) -> dict[str, torch.Tensor]:
    """The trained parameters' full fp32 tensors: the EMA's when given, else DeepSpeed's fp32 masters (never the
    16-bit module copies). A collective."""
    if ema is not None:
        return ema.full_state()
    return gather_full(local_master_fragments(module), full_shapes(module))
