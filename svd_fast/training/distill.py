"""`svd-fast distill`: latent consistency distillation of an SVD pipeline (the teacher) into a few-step student,
under DeepSpeed ZeRO exactly as :mod:`svd_fast.training.trainer` trains (same config keys, data sources, atomic
checkpoints and resume, validation, export).

The student starts as the teacher's UNet (its ``trained_parameters``: full, temporal or LoRA adapters); the target
network is a frozen copy whose trained parameters follow the student's as an EMA (``target_ema_decay``); the
teacher is a frozen copy of the original UNet. The objective is :mod:`svd_fast.training.distill_objective`. The
export is a diffusers folder that stock diffusers loads (the teacher's scheduler entry, a diffusers class) with the
student's UNet, plus ``svd_fast.json`` beside model_index.json: sampler "consistency", the scheduler config and the
step count, which ``svd-fast generate --model OUT`` reads (:mod:`svd_fast.diffusers.sampling_settings`).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from diffusers import UNetSpatioTemporalConditionModel
from tqdm.auto import tqdm

from svd_fast import _io
from svd_fast.diffusers.consistency_scheduler import SVDConsistencyScheduler
from svd_fast.sampling.consistency import check_consistency_config
from svd_fast.training.checkpoint import EMA_FILE, STATE_FILE, load_checkpoint, resolve_resume, safe_load, save_checkpoint
from svd_fast.training.config import OptimizerSection, Section, TrainConfig, ValidationSection
from svd_fast.training.distill_objective import DISTANCES, TEACHER_SOLVERS, consistency_distillation_loss
from svd_fast.training.ema import ShardedEMA
from svd_fast.training.log import TrainLog
from svd_fast.training.lora import add_lora
from svd_fast.training.memory_plan import parameter_counts, plan_memory
from svd_fast.training.objective import ObjectiveConfig
from svd_fast.training.run import apply_learning_rate, write_identity
from svd_fast.training.setup import (
    CheckedInputs,
    TrainInputError,
    apply_svd_fast_kernels,
    build_models,
    check_inputs,
    resolve_device,
    setup_distributed,
)
from svd_fast.training.step import ClipStream, StepRunner, StepStats, make_batch, restore_rng_state, rng_state
from svd_fast.training.trainer import (
    NonFiniteLossError,
    OutputDirBusyError,
    TrainerState,
    TrainResult,
    all_finite,
    export_pipeline,
    open_dataset,
    run_identity,
    sampling_model,
    trained_full_state,
)
from svd_fast.training.validation import Validator

TARGET_FILE = "target_rank{rank}.pt"
SAMPLING_SETTINGS_FILE = "svd_fast.json"


@dataclass
class DistillSection(Section):
    """The distillation's own keys: the consistency grid, the teacher's solver and guidance, the loss, the target
    network's EMA and the student's step count."""

    NAME: ClassVar[str] = "distill"
    num_train_timesteps: int = 40  # the consistency grid (and the exported scheduler's num_train_timesteps)
    sigma_min: float = 0.002
    sigma_max: float = 700.0
    rho: float = 7.0
    skip_steps: int = 4  # k of the skipping schedule: the teacher steps from sigma_i to sigma_{i+k}
    teacher_solver: str = "ipndm-2"  # euler | ipndm-2 (two teacher calls per step, second order)
    teacher_min_guidance: float = 1.0  # the teacher's per-frame guidance, first to last frame (1: no CFG)
    teacher_max_guidance: float = 1.0
    loss: str = "pseudo-huber"  # pseudo-huber | l2
    huber_c: float | None = None  # default 0.00054 * sqrt(latent elements per sample)
    target_ema_decay: float = 0.95
    student_steps: int = 4  # the student's sampling steps: validation and the exported svd_fast.json

    def check(self) -> None:
        try:
            check_consistency_config(self.scheduler_config(), where="distill config")
        except ValueError as error:
            raise ValueError(str(error).replace("distill config: ", "distill.")) from None
        limit = self.num_train_timesteps
        self.require(1 <= self.skip_steps < limit, "skip_steps", f"in [1, distill.num_train_timesteps - 1 = {limit - 1}]")
        self.require(self.teacher_solver in TEACHER_SOLVERS, "teacher_solver", f"one of {TEACHER_SOLVERS}")
        self.require(self.loss in DISTANCES, "loss", f"one of {DISTANCES}")
        self.require(self.huber_c is None or self.huber_c > 0, "huber_c", "> 0")
        self.require(0.0 <= self.target_ema_decay < 1.0, "target_ema_decay", "in [0, 1)")
        if not 0 <= self.teacher_min_guidance <= self.teacher_max_guidance:
            raise ValueError(f"distill.teacher_min_guidance ({self.teacher_min_guidance}) and distill.teacher_max_guidance "
                             f"({self.teacher_max_guidance}) must satisfy 0 <= min <= max")
        self.require(1 <= self.student_steps <= limit, "student_steps", f"in [1, distill.num_train_timesteps = {limit}]")

    def scheduler_config(self) -> dict[str, Any]:
        """The student's consistency scheduler config (AnimateLCM-SVD-xt's keys)."""
        return {"num_train_timesteps": self.num_train_timesteps, "sigma_min": self.sigma_min, "sigma_max": self.sigma_max,
                "sigma_data": 1.0, "s_noise": 1.0, "rho": self.rho, "clip_denoised": False}

    def sampling_settings(self) -> dict[str, Any]:
        """What ``svd_fast.json`` records for ``svd-fast generate``."""
        return {"sampler": "consistency", "scheduler": "SVDConsistencyScheduler", "scheduler_config": self.scheduler_config(),
                "num_inference_steps": self.student_steps, "min_guidance": 1.0, "max_guidance": 1.0}


@dataclass
class DistillConfig(TrainConfig):
    """TrainConfig's keys and sections (``model`` is the teacher) plus the ``distill`` section. Conditioning
    dropout is off: the student learns the guided teacher, whose unconditional branch the teacher itself provides."""

    output_dir: str = "distill_out"
    optimizer: OptimizerSection = field(default_factory=lambda: OptimizerSection(learning_rate=1e-5))
    validation: ValidationSection = field(default_factory=lambda: ValidationSection(inference_steps=4))
    objective: ObjectiveConfig = field(default_factory=lambda: ObjectiveConfig(drop_image_embedding=0.0, drop_both=0.0, drop_cond_latent=0.0))
    distill: DistillSection = field(default_factory=DistillSection)

    def __post_init__(self) -> None:
        super().__post_init__()
        limit = self.distill.num_train_timesteps
        if self.validation.inference_steps > limit:
            raise ValueError(f"validation.inference_steps must be <= distill.num_train_timesteps ({limit}), "
                             f"got {self.validation.inference_steps!r}")
        dropped = [name for name in ("drop_image_embedding", "drop_both", "drop_cond_latent") if getattr(self.objective, name)]
        if dropped:
            raise ValueError(f"objective.{dropped[0]} must be 0 for distillation (the student learns the guided teacher; the "
                             "teacher's guidance is distill.teacher_min_guidance/distill.teacher_max_guidance)")


def check_teacher(model: str) -> None:
    """The teacher folder is a diffusers StableVideoDiffusionPipeline (read from model_index.json, nothing loaded)."""
    index = Path(model) / "model_index.json"
    try:
        class_name = json.loads(index.read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError):
        raise ValueError(f"model: {model!r} has no readable model_index.json (not a diffusers pipeline folder)") from None
    if class_name != "StableVideoDiffusionPipeline":
        raise ValueError(f"model: the teacher must be a StableVideoDiffusionPipeline, {str(index)!r} says {class_name!r}")


def as_distill_config(config: DistillConfig | dict[str, Any] | str | Path) -> DistillConfig:
    if isinstance(config, DistillConfig):
        return config
    if isinstance(config, dict):
        return DistillConfig.from_dict(config)
    return DistillConfig.from_file(config)


def frozen_unet(config: DistillConfig, device: torch.device, dtype: torch.dtype, lora: bool) -> torch.nn.Module:
    """The teacher's UNet, frozen, with svd_fast's kernels as the student has them (and LoRA adapters for the target)."""
    unet = UNetSpatioTemporalConditionModel.from_pretrained(config.model, subfolder="unet")
    apply_svd_fast_kernels(unet, config.use_svd_fast_kernels)
    if lora:
        add_lora(unet, config.peft_lora())
    return unet.to(device, dtype).eval().requires_grad_(False)


class TargetNetwork:
    """The frozen target: its trained parameters are an EMA of the student's (their compute copies, gathered
    under ZeRO-3)."""

    def __init__(self, module: torch.nn.Module, student: torch.nn.Module, decay: float, zero_stage: int) -> None:
        self.module = module
        self.decay = decay
        self.zero_stage = zero_stage
        own = dict(module.named_parameters())
        self.pairs = [(own[name], param) for name, param in student.named_parameters() if param.requires_grad]
        self.update(student, decay=0.0)  # starts equal to the student

    @torch.no_grad()
    def update(self, student: torch.nn.Module, decay: float | None = None) -> None:
        weight = 1.0 - (self.decay if decay is None else decay)
        params = [source for _, source in self.pairs]
        if self.zero_stage == 3:
            import deepspeed  # noqa: PLC0415 - DeepSpeed loads only when this runs

            with deepspeed.zero.GatheredParameters(params):
                for mine, source in self.pairs:
                    mine.lerp_(source.to(mine.dtype), weight)
            return
        for mine, source in self.pairs:
            mine.lerp_(source.to(mine.dtype), weight)

    def state_dict(self) -> dict[str, torch.Tensor]:
        names = {id(p): n for n, p in self.module.named_parameters()}
        return {names[id(mine)]: mine.detach().cpu() for mine, _ in self.pairs}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        _, unexpected = self.module.load_state_dict(state, strict=False)
        if unexpected:
            raise ValueError(f"resume_from: the target network's saved parameters do not match ({unexpected[:3]})")


class DistillStepRunner(StepRunner):
    """StepRunner with the consistency distillation loss in place of the EDM loss."""

    def __init__(self, config: DistillConfig, models, stream, device, rank, micro_step, teacher, target: TargetNetwork) -> None:
        super().__init__(config, models, stream, device, rank, micro_step)
        self.teacher, self.target = teacher, target

    def run(self) -> StepStats:
        config, engine, pipe = self.config.distill, self.models.engine, self.models.pipeline
        bins = len(self.edges) + 1
        stats = StepStats(loss=0.0, lr=engine.get_lr()[0], samples=0, bin_sums=torch.zeros(bins), bin_counts=torch.zeros(bins))
        accumulation = self.config.optimizer.gradient_accumulation_steps
        for _ in range(accumulation):
            generator = torch.Generator().manual_seed(self.config.seed * 1_000_003 + self.rank * 7_919 + self.micro_step)
            batch = make_batch(self._next_samples(), self.config.data, self.objective, pipe, self.device, generator)
            batch_size, frames = batch.latents.shape[:2]
            index = torch.randint(0, config.num_train_timesteps - config.skip_steps, (batch_size,), generator=generator)
            guidance = None
            if config.teacher_max_guidance > 1:
                ramp = torch.linspace(config.teacher_min_guidance, config.teacher_max_guidance, frames)
                guidance = ramp.to(self.device).expand(batch_size, frames)
            loss, per_sample, sigma = consistency_distillation_loss(
                engine, self.target.module, self.teacher, batch, index, num_train_timesteps=config.num_train_timesteps,
                skip_steps=config.skip_steps, schedule=(config.sigma_min, config.sigma_max, config.rho),
                solver=config.teacher_solver, guidance=guidance, kind=config.loss, huber_c=config.huber_c,
                dtype=self.models.compute_dtype,
            )  # fmt: skip
            engine.backward(loss)
            engine.step()
            self.micro_step += 1
            stats.loss += loss.item() / accumulation
            which = torch.bucketize(sigma.float().cpu(), self.edges)
            stats.bin_sums.index_add_(0, which, per_sample.float().cpu())
            stats.bin_counts.index_add_(0, which, torch.ones(batch_size))
            stats.samples += batch_size
        self.target.update(engine.module)
        return stats


def distill(config: DistillConfig | dict[str, Any] | str | Path) -> TrainResult:
    """Distill (or resume) as ``config`` says; returns losses, the last checkpoint and the exported student.

    The same input checks, output-folder claim and lock, run identity and resume rules as train()."""
    config = as_distill_config(config)
    output_dir = Path(config.output_dir)
    config_dict = config.to_dict()
    try:  # everything cheap, before any model loads
        checked = check_inputs(config)
        check_teacher(config.model)
        resume_path = resolve_resume(config.resume_from, output_dir)
        identity, changes = run_identity(config, config_dict, resume_path, output_dir)
    except ValueError as error:
        raise TrainInputError(config.as_given(str(error))) from error
    device = resolve_device(config.device)
    rank, world_size = setup_distributed(device)
    if rank == 0:
        _io.claim_folder(output_dir, "train", name="output_dir:")
    with _io.lock(output_dir / f".svd-fast-lock-rank{rank}", "distillation run", output_dir, busy=OutputDirBusyError):
        return _distill(config, config_dict, checked, resume_path, identity, changes, device, rank, world_size)


def _distill(config: DistillConfig, config_dict: dict[str, Any], checked: CheckedInputs, resume_path: Path | None,
             identity: dict[str, Any], changes: dict[str, tuple[Any, Any]], device: torch.device, rank: int, world_size: int) -> TrainResult:
    output_dir = Path(config.output_dir)
    if rank == 0:
        write_identity(output_dir, identity)
    dataset = open_dataset(config.data, config.seed, rank, world_size, device)
    models = build_models(config, device, checked.deepspeed_config)
    engine = models.engine
    lora = config.trained_parameters == "lora"
    teacher = frozen_unet(config, device, models.compute_dtype, lora=False)
    target = TargetNetwork(frozen_unet(config, device, models.compute_dtype, lora=lora), engine.module, config.distill.target_ema_decay,
                           config.deepspeed.zero_stage)  # fmt: skip
    ema_device = torch.device("cpu") if config.deepspeed.offload_optimizer != "none" else None
    ema = ShardedEMA(engine.module, config.ema_decay, ema_device) if config.ema_decay > 0 else None
    if rank == 0:
        _io.write_json(output_dir / "distill_config.json", config_dict, fsync=True)

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
        target.load_state_dict(safe_load(resume_path / TARGET_FILE.format(rank=rank), map_location=device))
        if ema is not None and ema_state is not None:
            ema.load_state_dict(ema_state)
        last_checkpoint = resume_path
    stream = ClipStream(dataset, config.data.batch_size, state.data_epoch, state.data_position)
    runner = DistillStepRunner(config, models, stream, device, rank, state.micro_step, teacher, target)
    log = TrainLog(output_dir / "train_log.jsonl", state.step, list(config.logging.sigma_bins), world_size, device, rank, identity["run_id"])
    validator = None
    if config.validation.every and rank == 0:
        validator = Validator(config.validation, config.data, config.seed, sampling_model(config), models.pipeline, device, output_dir,
                              checked.validation_images, scheduler=SVDConsistencyScheduler.from_config(config.distill.scheduler_config()),
                              call_options={"min_guidance_scale": 1.0, "max_guidance_scale": 1.0})

    def checkpoint() -> Path:
        files: dict[str, Any] = {
            STATE_FILE.format(rank=rank): {
                "step": state.step, "micro_step": runner.micro_step, "losses": state.losses, "data_epoch": stream.epoch,
                "data_position": stream.position, "world_size": world_size, "rng": rng_state(),
            },
            TARGET_FILE.format(rank=rank): target.state_dict(),
        }  # fmt: skip
        if ema is not None:
            files[EMA_FILE.format(rank=rank)] = ema.state_dict()
        return save_checkpoint(engine, output_dir / "checkpoints", state.step, files, rank, {"run": identity, "config": config_dict})

    samples_seen, start, nonfinite_in_a_row = 0, time.perf_counter(), 0
    progress = tqdm(total=config.max_steps, initial=state.step, desc="distill", unit="step", disable=rank != 0)
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
                                     f"max_nonfinite_steps: {config.max_nonfinite_steps}); distillation stopped, {kept} (lower learning_rate)")
        if ema is not None and finite:
            ema.update(engine.module)
        extra = {}
        if config.validation.every and state.step % config.validation.every == 0:
            trained_state = trained_full_state(engine.module, ema)  # a collective: every rank takes part
            if validator is not None:
                extra["validation"] = validator.run(state.step, trained_state)
        log.record(state.step, stats, write=state.step % config.logging.log_every == 0 or state.step == config.max_steps or bool(extra),
                   extra=extra)  # fmt: skip
        if config.logging.checkpoint_every and state.step % config.logging.checkpoint_every == 0 and finite:
            last_checkpoint = checkpoint()
    progress.close()
    elapsed = time.perf_counter() - start
    if (last_checkpoint is None or last_checkpoint.name != f"step_{state.step}") and nonfinite_in_a_row == 0:
        last_checkpoint = checkpoint()
    export_path = None
    if config.logging.export:
        settings = json.dumps(config.distill.sampling_settings(), indent=2).encode()
        export_path = export_pipeline(models, ema, sampling_model(config), config.logging, output_dir / "pipeline", rank,
                                      extra_files={SAMPLING_SETTINGS_FILE: settings})
    torch.distributed.barrier()
    return TrainResult(
        losses=state.losses, steps=state.step, checkpoint_dir=last_checkpoint, export_path=export_path, log_path=log.path,
        kernel_status=models.kernel_status, samples_per_second=samples_seen * world_size / max(elapsed, 1e-9),
    )


def plan_distill_memory(config: DistillConfig, gpus: int = 1, unet_kwargs: dict | None = None) -> dict[str, Any]:
    """train's memory plan plus the frozen teacher and target UNets (16-bit, full on every GPU)."""
    plan = plan_memory(config, gpus=gpus, unet_kwargs=unet_kwargs).to_dict()
    trained, frozen, _ = parameter_counts(unet_kwargs or {"num_frames": config.data.num_frames}, config.trained_parameters, config.peft_lora())
    copies = 2 * 2 * (trained + frozen) / 2**30
    plan["teacher_and_target_gib"] = round(copies, 2)
    plan["per_gpu_peak_gib"] = round(plan["per_gpu_peak_gib"] + copies, 2)
    if plan["target_gpu_gib"] is not None:
        plan["margin"] = round(1 - plan["per_gpu_peak_gib"] / plan["target_gpu_gib"], 3)
    return plan
