"""DeepSpeed (ZeRO 0-3) trainer for the SVD UNet on video clips; the VAE and CLIP image encoder stay frozen.

One process per device (``deepspeed``/``torchrun`` launchers, or plain ``python`` for one process: the
distributed environment variables get single-process defaults). On a machine without CUDA it runs on the CPU
with gloo. Every step is reproducible: noise, noise levels and dropout come from a generator seeded by
(seed, rank, micro-step), so a resumed run continues exactly as an uninterrupted one.
"""

from __future__ import annotations

import base64
import json
import logging
import math
import os
import random
import resource
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from svd_fast.training.config import TrainConfig
from svd_fast.training.objective import edm_loss, encode_batch

LOGGER = logging.getLogger(__name__)
STATE_FILE = "trainer_state_rank{rank}.json"
EMA_FILE = "ema.pt"


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


def resolve_device(config: TrainConfig) -> torch.device:
    if config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ValueError("device: 'cuda' requested but CUDA is not available")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def setup_distributed(device: torch.device) -> tuple[int, int]:
    """Single-process defaults for the launcher's variables, DeepSpeed's CPU accelerator without CUDA, and the
    process group (gloo on CPU, nccl on CUDA). Returns (rank, world_size)."""
    for name, default in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29511")):
        os.environ.setdefault(name, default)
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed  # noqa: PLC0415 - heavy; imported after DS_ACCELERATOR is set

    # DeepSpeed's CPU comm backend JIT-compiles its shared-memory all-reduce op (deepspeed_shm_comm) on the first
    # init_distributed (~40 s of g++ per fresh cache). gloo does our reductions, so mark that op unusable.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="gloo" if device.type == "cpu" else "nccl")
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def deepspeed_config(config: TrainConfig) -> dict[str, Any]:
    zero: dict[str, Any] = {"stage": config.zero_stage}
    if config.offload_optimizer != "none":
        zero["offload_optimizer"] = {"device": config.offload_optimizer, "pin_memory": torch.cuda.is_available()}
    if config.offload_param != "none":
        zero["offload_param"] = {"device": config.offload_param, "pin_memory": torch.cuda.is_available()}
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": config.batch_size,
        "gradient_accumulation_steps": config.gradient_accumulation_steps,
        "gradient_clipping": config.gradient_clipping,
        "zero_optimization": zero,
        "bf16": {"enabled": config.precision == "bf16"},
        "fp16": {"enabled": config.precision == "fp16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if config.optimizer == "adamw_deepspeed":
        ds["optimizer"] = {
            "type": "AdamW",
            "params": {
                "lr": config.learning_rate,
                "betas": [config.adam_beta1, config.adam_beta2],
                "eps": config.adam_eps,
                "weight_decay": config.weight_decay,
            },
        }
    else:
        ds["zero_allow_untested_optimizer"] = True
    return ds


def apply_svd_fast_kernels(unet: torch.nn.Module, enabled: bool) -> str:
    if not enabled:
        return "disabled by config (use_svd_fast_kernels: false)"
    try:
        from svd_fast.diffusers.patching import optimize  # noqa: PLC0415 - optional, written separately
    except ImportError as error:
        status = f"not applied: svd_fast.diffusers.patching.optimize unavailable ({error})"
        LOGGER.warning(status)
        return status
    try:
        optimize(unet)
    except Exception as error:  # noqa: BLE001 - training works with the stock modules; say why
        status = f"not applied: optimize(unet) failed ({type(error).__name__}: {error})"
        LOGGER.warning(status)
        return status
    return "applied"


class ClipStream:
    """Endless batches from a VideoClipDataset with a resumable position (epoch, samples consumed in it)."""

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


class EMA:
    """fp32 exponential moving average of the UNet parameters, full copies on every rank (ZeRO-3 gathers
    each step: simple and exact, at the cost of one all-gather per step)."""

    def __init__(self, module: torch.nn.Module, decay: float, zero3: bool) -> None:
        self.decay = decay
        self.zero3 = zero3
        self.shadow = {name: value.float().clone() for name, value in self._full_params(module).items()}

    def _full_params(self, module: torch.nn.Module) -> dict[str, torch.Tensor]:
        if not self.zero3:
            return {name: p.detach() for name, p in module.named_parameters()}
        import deepspeed  # noqa: PLC0415

        with deepspeed.zero.GatheredParameters(list(module.parameters())):
            return {name: p.detach().clone() for name, p in module.named_parameters()}

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        for name, value in self._full_params(module).items():
            self.shadow[name].lerp_(value.float(), 1.0 - self.decay)


def _encode_rng_state() -> dict[str, Any]:
    numpy_state = np.random.get_state()
    state = {
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
        "python": json.loads(json.dumps(random.getstate())),
        "numpy": [numpy_state[0], numpy_state[1].tolist(), *numpy_state[2:]],
    }
    if torch.cuda.is_available():
        state["cuda"] = base64.b64encode(torch.cuda.get_rng_state().numpy().tobytes()).decode()
    return state


def _restore_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["torch"])), dtype=torch.uint8))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy_state = state["numpy"]
    np.random.set_state((numpy_state[0], np.array(numpy_state[1], dtype=np.uint32), *numpy_state[2:]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["cuda"])), dtype=torch.uint8))


def _resolve_resume(config: TrainConfig) -> Path | None:
    if config.resume_from is None:
        return None
    if config.resume_from == "latest":
        root = Path(config.output_dir) / "checkpoints"
        marker = root / "latest"
        if not marker.is_file():
            raise ValueError(f"resume_from: 'latest' but {marker} does not exist (no checkpoint in output_dir)")
        return root / marker.read_text().strip()
    path = Path(config.resume_from)
    if not (path / STATE_FILE.format(rank=0)).is_file():
        raise ValueError(f"resume_from: {str(path)!r} is not a checkpoint of this trainer (no {STATE_FILE.format(rank=0)})")
    return path


def _memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # peak RSS (KiB on Linux)


def _collate(samples: list[dict[str, Any]], config: TrainConfig, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    pixels = torch.stack([s["pixel_values"] for s in samples]).to(device)
    fps = torch.tensor([float(s.get("fps") or config.default_fps) for s in samples])
    motion = torch.tensor([float(s.get("motion_bucket_id", config.default_motion_bucket_id)) for s in samples])
    return pixels, fps, motion


def _first_batch_checked(stream: ClipStream) -> list[dict[str, Any]]:
    """The first batch, with the outcome agreed by all ranks: a rank without usable clips must not leave the
    others waiting in a collective forever."""
    error: ValueError | None = None
    try:
        samples = stream.next_batch()
    except ValueError as caught:
        error, samples = caught, []
    failed = torch.tensor([0 if error is None else 1])
    torch.distributed.all_reduce(failed)
    if error is not None:
        raise error
    if failed.item():
        raise ValueError(f"data: {failed.item()} rank(s) have no usable clips (fewer video files than processes?)")
    return samples


def _sigma_bin_names(edges: list[float]) -> list[str]:
    bounds = [0.0, *edges, math.inf]
    return [f"sigma_{lo:g}-{hi:g}" for lo, hi in zip(bounds[:-1], bounds[1:])]


def train(config: TrainConfig | dict[str, Any] | str | Path) -> TrainResult:
    """Train (or resume) as ``config`` says; returns losses, the last checkpoint and the exported pipeline."""
    if isinstance(config, dict):
        config = TrainConfig.from_dict(config)
    elif not isinstance(config, TrainConfig):
        config = TrainConfig.from_file(config)
    # Everything cheap is checked before models load.
    if not config.model or not Path(config.model).is_dir():
        raise ValueError(f"model: {config.model!r} is not a diffusers pipeline folder")
    device = resolve_device(config)
    if device.type == "cpu" and config.precision == "fp16":
        raise ValueError("precision: fp16 is unsupported on the CPU (DeepSpeed's CPU accelerator); use bf16 or fp32")
    resume_path = _resolve_resume(config)
    from svd_fast.data.video import VideoClipDataset  # noqa: PLC0415

    rank, world_size = setup_distributed(device)
    dataset = VideoClipDataset(
        config.data, num_frames=config.num_frames, size=(config.height, config.width), stride=config.stride,
        target_fps=config.target_fps, random_crop=config.random_crop, shuffle=config.shuffle, seed=config.seed,
        rank=rank, world_size=world_size, on_short=config.on_short, backend=config.data_backend,
    )

    import deepspeed  # noqa: PLC0415
    from diffusers import StableVideoDiffusionPipeline  # noqa: PLC0415

    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.manual_seed(config.seed)
    pipe = StableVideoDiffusionPipeline.from_pretrained(config.model, dtype=torch.float32)
    vae, image_encoder, unet = pipe.vae.to(device).eval(), pipe.image_encoder.to(device).eval(), pipe.unet
    vae.requires_grad_(False)
    image_encoder.requires_grad_(False)
    kernel_status = apply_svd_fast_kernels(unet, config.use_svd_fast_kernels)
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()

    ds_config = deepspeed_config(config)
    optimizer = None
    if config.optimizer == "adamw_torch":
        # torch's AdamW: no DeepSpeed op to JIT-build (FusedAdam/CPUAdam compile on first use).
        optimizer = torch.optim.AdamW(
            unet.parameters(), lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2),
            eps=config.adam_eps, weight_decay=config.weight_decay,
        )
    warmup = config.warmup_steps

    def make_scheduler(opt: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / warmup) if warmup else 1.0)

    engine, _, _, _ = deepspeed.initialize(
        model=unet, model_parameters=[p for p in unet.parameters() if p.requires_grad] if optimizer is None else None,
        optimizer=optimizer, lr_scheduler=make_scheduler, config=ds_config,
    )
    compute_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[config.precision]
    ema = EMA(engine.module, config.ema_decay, config.zero_stage == 3) if config.ema_decay > 0 else None

    output_dir = Path(config.output_dir)
    checkpoint_root = output_dir / "checkpoints"
    log_path = output_dir / "train_log.jsonl"
    if rank == 0:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "train_config.json").write_text(json.dumps(config.to_dict(), indent=2, default=str))

    step, micro_step, losses = 0, 0, []
    epoch, position = 0, 0
    last_checkpoint: Path | None = None
    if resume_path is not None:
        load_path, _ = engine.load_checkpoint(str(resume_path.parent), tag=resume_path.name)
        if load_path is None:
            raise ValueError(f"resume_from: DeepSpeed found no checkpoint in {resume_path}")
        state_file = resume_path / STATE_FILE.format(rank=rank)
        if not state_file.is_file():
            raise ValueError(f"resume_from: {state_file} missing (was the checkpoint written with {world_size} processes?)")
        state = json.loads(state_file.read_text())
        step, micro_step, losses = state["step"], state["micro_step"], state["losses"]
        epoch, position = state["data_epoch"], state["data_position"]
        _restore_rng_state(state["rng"])
        if ema is not None:
            ema.shadow = torch.load(resume_path / EMA_FILE, map_location="cpu", weights_only=True)
        last_checkpoint = resume_path
    stream = ClipStream(dataset, config.batch_size, epoch, position)
    objective = config.objective()
    bin_names = _sigma_bin_names(list(config.sigma_bins))
    edges = torch.tensor(list(config.sigma_bins))

    def save_checkpoint() -> Path:
        tag = f"step_{step}"
        engine.save_checkpoint(str(checkpoint_root), tag=tag)
        path = checkpoint_root / tag
        state = {
            "step": step, "micro_step": micro_step, "losses": losses, "data_epoch": stream.epoch,
            "data_position": stream.position, "world_size": world_size, "rng": _encode_rng_state(),
        }
        (path / STATE_FILE.format(rank=rank)).write_text(json.dumps(state))
        if ema is not None and rank == 0:
            torch.save(ema.shadow, path / EMA_FILE)
        torch.distributed.barrier()
        return path

    samples_seen, start, first_batch = 0, time.perf_counter(), True
    interval_start, interval_samples = start, 0
    progress = tqdm(total=config.max_steps, initial=step, desc="train", unit="step", disable=rank != 0)
    while step < config.max_steps:
        step_loss = 0.0
        step_lr = engine.get_lr()[0]  # the rate this step's update uses (the scheduler advances after it)
        bin_sums = torch.zeros(len(bin_names))
        bin_counts = torch.zeros(len(bin_names))
        for _ in range(config.gradient_accumulation_steps):
            pixels, fps, motion = _collate(_first_batch_checked(stream) if first_batch else stream.next_batch(), config, device)
            first_batch = False
            generator = torch.Generator().manual_seed(config.seed * 1_000_003 + rank * 7_919 + micro_step)
            batch = encode_batch(pixels, fps, motion, vae, image_encoder, pipe.feature_extractor, objective, generator)
            loss, per_sample = edm_loss(engine, batch, compute_dtype)
            engine.backward(loss)
            engine.step()
            micro_step += 1
            step_loss += loss.item() / config.gradient_accumulation_steps
            which = torch.bucketize(batch.sigma.float().cpu(), edges)
            bin_sums.index_add_(0, which, per_sample.float().cpu())
            bin_counts.index_add_(0, which, torch.ones_like(per_sample.float().cpu()))
            samples_seen += pixels.shape[0]
            interval_samples += pixels.shape[0]
        step += 1
        losses.append(step_loss)
        progress.set_postfix(loss=f"{step_loss:.4f}", refresh=False)
        progress.update(1)
        if ema is not None:
            ema.update(engine.module)
        if step % config.log_every == 0 or step == config.max_steps:
            mean_loss = torch.tensor([step_loss])
            torch.distributed.all_reduce(mean_loss)
            now = time.perf_counter()
            record = {
                "step": step,
                "loss": mean_loss.item() / world_size,
                "lr": step_lr,
                "samples_per_s": interval_samples * world_size / max(now - interval_start, 1e-9),
                "memory_mb": _memory_mb(device),
                "sigma_binned_loss": {name: (s / c).item() for name, s, c in zip(bin_names, bin_sums, bin_counts) if c > 0},
            }
            interval_start, interval_samples = now, 0
            if rank == 0:
                with log_path.open("a") as log:
                    log.write(json.dumps(record) + "\n")
        if config.checkpoint_every and step % config.checkpoint_every == 0:
            last_checkpoint = save_checkpoint()
    progress.close()
    elapsed = time.perf_counter() - start
    if last_checkpoint is None or last_checkpoint.name != f"step_{step}":  # never lose the finished steps
        last_checkpoint = save_checkpoint()

    export_path = None
    if config.export:
        export_path = export_pipeline(engine.module, ema, config, output_dir / "pipeline", rank)
    torch.distributed.barrier()
    return TrainResult(
        losses=losses, steps=step, checkpoint_dir=last_checkpoint, export_path=export_path, log_path=log_path,
        kernel_status=kernel_status, samples_per_second=samples_seen * world_size / max(elapsed, 1e-9),
    )


def export_pipeline(module: torch.nn.Module, ema: EMA | None, config: TrainConfig, target: Path, rank: int) -> Path:
    """Write a diffusers pipeline folder: the base pipeline's other components, the trained (EMA or raw) UNet."""
    use_ema = ema is not None and config.export_ema
    if use_ema:
        state = ema.shadow
    elif config.zero_stage == 3:
        import deepspeed  # noqa: PLC0415

        with deepspeed.zero.GatheredParameters(list(module.parameters())):  # collective: every rank takes part
            state = {name: p.detach().float().cpu().clone() for name, p in module.named_parameters()}
    else:
        state = {name: p.detach().float().cpu() for name, p in module.named_parameters()}
    if rank == 0:
        from diffusers import UNetSpatioTemporalConditionModel  # noqa: PLC0415

        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(config.model, target, ignore=shutil.ignore_patterns("unet"))
        unet = UNetSpatioTemporalConditionModel.from_pretrained(config.model, subfolder="unet")
        missing, unexpected = unet.load_state_dict({k: v.cpu() for k, v in state.items()}, strict=False)
        missing_params = [key for key in missing if key in dict(unet.named_parameters())]
        if unexpected or missing_params:
            raise RuntimeError(f"export: parameter names do not match the base UNet (missing {missing_params[:3]}, unexpected {unexpected[:3]})")
        unet.save_pretrained(target / "unet", safe_serialization=True)
    return target
