"""Everything before the first step: cheap input checks (before any model loads), the device and process
group, the DeepSpeed config (the config's own keys merged with a user's DeepSpeed JSON), the models and the
DeepSpeed engine."""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from svd_fast import _io
from svd_fast.data.clips import clip_frame_indices, sources_from
from svd_fast.data.decode import probe_video
from svd_fast.training.activation_checkpointing import enable_activation_checkpointing
from svd_fast.training.config import DEEPSPEED_DEFAULTS, TEMPORAL_PARAMETER, DataSection, DeepSpeedSection, OptimizerSection, TrainConfig
from svd_fast.training.deepspeed_import import import_deepspeed
from svd_fast.training.deepspeed_json import read_deepspeed_json, without_auto, world_size
from svd_fast.training.latents import check_latents_dir, model_identity
from svd_fast.training.tracking import check_packages
from svd_fast.training.validation import load_validation_images

# The layers SVD added to the image model: temporal attention and resnets, their blends with the spatial path,
# and the frame-position embedding (temporal-only fine-tunes train these and freeze the rest).
LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
PROBED_SOURCES = 8  # videos whose frame count is read before the model loads


class TrainInputError(ValueError):
    """A problem with the config's inputs that :func:`check_inputs` (or the resume check) found before any model
    loaded: the command line reports it as a user error."""


@dataclass(frozen=True)
class CheckedInputs:
    """What :func:`check_inputs` had to read or build anyway, handed on so that nothing is done twice."""

    deepspeed_config: dict[str, Any]
    validation_images: list


def check_inputs(config: TrainConfig) -> CheckedInputs:
    """Every check that needs no model: paths exist, the output folder is writable, the device and precision
    go together, the validation images read, a user DeepSpeed JSON merges cleanly. Raises ValueError naming
    the key; returns the DeepSpeed config and the validation images."""
    check_packages(config)
    if not config.model or not Path(config.model).is_dir():
        raise ValueError(f"model: {config.model!r} is not a diffusers pipeline folder")
    data = config.data
    if data.latents_dir is not None:
        check_latents_dir(Path(data.latents_dir), latents_settings(data, config.model))
    else:
        sources = data.sources()
        if not sources or not all(sources):
            raise ValueError("data.path: no data path given (a folder, a list of video files or a manifest)")
        missing = [source for source in sources if not Path(source).exists()]
        if missing:
            raise ValueError(f"data.path: {missing[0]!r} does not exist")
        check_data(data)
    check_output_dir(config.output_dir, [config.model, *data.sources()])
    images = []
    if config.validation.every:
        images = load_validation_images(config.validation, data)
    device = resolve_device(config.device)
    if device.type == "cpu" and config.precision == "fp16":
        raise ValueError("precision: fp16 is unsupported on the CPU (DeepSpeed's CPU accelerator); use bf16 or fp32")
    return CheckedInputs(deepspeed_config=build_deepspeed_config(config), validation_images=images)


def check_data(data: DataSection) -> None:
    """The data lists videos (a manifest is readable), and one of the first :data:`PROBED_SOURCES` videos holds a
    clip of ``num_frames`` frames (with stride/target_fps), so a config the data cannot serve fails here, naming
    the video or manifest, not in the first step."""

    try:
        sources = sources_from(data.path)
    except (OSError, ValueError, KeyError) as error:  # pyarrow's ArrowInvalid is a ValueError
        raise ValueError(f"data.path: {data.path!r} is not a readable video folder, list or manifest ({type(error).__name__}: {error})") from None
    if not sources:
        raise ValueError(f"data.path: no video files in {data.path!r} (a folder of videos, a list of them or a curate manifest)")
    unreadable, longest = [], 0
    for source in sources[:PROBED_SOURCES]:
        try:
            info = probe_video(source.path)
        except (OSError, ValueError) as error:  # VideoDecodeError is a ValueError
            unreadable.append(f"{source.path} ({error})")
            continue
        if data.on_short == "pad" or clip_frame_indices(info.num_frames, info.fps, data.num_frames, data.stride, data.target_fps,
                                                        source.start_frame, source.end_frame):  # fmt: skip
            return
        longest = max(longest, info.num_frames)
    if len(unreadable) == min(len(sources), PROBED_SOURCES):
        raise ValueError(f"data.path: the first {len(unreadable)} video(s) cannot be read, e.g. {unreadable[0]}")
    raise ValueError(f"data.num_frames: none of the first {min(len(sources), PROBED_SOURCES)} videos holds a clip of {data.num_frames} "
                     f"frames (the longest has {longest} frames); lower data.num_frames, data.stride or data.target_fps, or set "
                     "data.on_short: pad")


def latents_settings(data: DataSection, model: str) -> dict[str, Any]:
    """The config keys precomputed latents must have been encoded with."""
    return {"num_frames": data.num_frames, "height": data.height, "width": data.width, "model_identity": model_identity(model)}


def check_output_dir(output_dir: str, inputs: list[str]) -> None:
    """``output_dir`` is new, empty or an earlier training run's (never a folder of the user's, the current folder
    or one of the ``inputs``' folders) and writable, and the exports it will replace are svd-fast's."""
    folder = Path(output_dir)
    try:
        _io.check_output_folder(folder, "train", inputs, name="output_dir:", replaced=False)
        for kind in ("pipeline", "lora"):
            if (folder / kind).exists():
                _io.check_output_folder(folder / kind, kind, inputs, name=f"output_dir: its {kind} export")
    except _io.OutputPathError as error:
        raise ValueError(str(error)) from None
    _check_writable(folder)


def _check_writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-check-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise ValueError(f"output_dir: {str(folder)!r} is not writable ({error.strerror or error})") from None


def resolve_device(device: str) -> torch.device:
    """The training device of the config key ``device`` (auto | cpu | cuda) for this process."""
    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ValueError("device: 'cuda' requested but CUDA is not available")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def setup_distributed(device: torch.device) -> tuple[int, int]:
    """The process group (gloo on CPU, nccl on CUDA) and DeepSpeed's CPU accelerator without CUDA. Without a
    launcher this is a one-process group on a free port, so several single-process runs on one machine never
    collide. Returns (rank, world_size)."""
    if not any(name in os.environ for name in ("WORLD_SIZE", "RANK")):
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    os.environ.setdefault("LOCAL_RANK", os.environ["RANK"])
    for name in LAUNCHER_VARIABLES:
        if name not in os.environ:
            raise ValueError(f"launcher: {name} is not set (RANK/WORLD_SIZE given without the rest of the rendezvous)")
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    deepspeed = import_deepspeed()  # after DS_ACCELERATOR is set

    # DeepSpeed's CPU comm backend JIT-compiles its shared-memory all-reduce op (deepspeed_shm_comm) on the first
    # init_distributed (~40 s of g++ per fresh cache). gloo does our reductions, so mark that op unusable.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="gloo" if device.type == "cpu" else "nccl")
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def derived_deepspeed_config(deepspeed: DeepSpeedSection, optimizer: OptimizerSection, batch_size: int, precision: str) -> dict[str, Any]:
    """The DeepSpeed keys the config's ``deepspeed`` and ``optimizer`` sections, the per-process batch size and the
    precision determine."""
    zero: dict[str, Any] = {"stage": deepspeed.zero_stage}
    if deepspeed.offload_optimizer != "none":
        zero["offload_optimizer"] = {"device": deepspeed.offload_optimizer}
    if deepspeed.offload_param != "none":
        zero["offload_param"] = {"device": deepspeed.offload_param}
    for name in DEEPSPEED_DEFAULTS:
        if getattr(deepspeed, name) is not None:
            zero[name] = getattr(deepspeed, name)
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": batch_size,
        "gradient_accumulation_steps": optimizer.gradient_accumulation_steps,
        "gradient_clipping": optimizer.gradient_clipping,
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},
    }
    if optimizer.name == "adamw_deepspeed":
        ds["optimizer"] = {
            "type": "AdamW",
            "params": {
                "lr": optimizer.learning_rate,
                "betas": [optimizer.adam_beta1, optimizer.adam_beta2],
                "eps": optimizer.adam_eps,
                "weight_decay": optimizer.weight_decay,
            },
        }
    else:
        ds["zero_allow_untested_optimizer"] = True
    return ds


def _merge(derived: dict[str, Any], user: dict[str, Any], where: str, conflicts: list[str]) -> dict[str, Any]:
    merged = dict(user)
    for key, value in derived.items():
        if key not in user:
            merged[key] = value
        elif isinstance(value, dict) and isinstance(user[key], dict):
            merged[key] = _merge(value, user[key], f"{where}{key}.", conflicts)
        elif user[key] != value:
            conflicts.append(f"{where}{key}={json.dumps(user[key])} (the config gives {json.dumps(value)})")
    return merged


def build_deepspeed_config(config: TrainConfig) -> dict[str, Any]:
    """The config's DeepSpeed keys, merged with ``deepspeed.config`` (a JSON file) when given: keys only the
    JSON sets are kept (e.g. communication or offload tuning); a key both set differently is an error, so the
    run never silently differs from either file. Logging and pinning defaults apply where the JSON is silent."""
    optimizer = config.optimizer
    derived = derived_deepspeed_config(config.deepspeed, optimizer, config.data.batch_size, config.precision)
    merged = derived
    if config.deepspeed.config is not None:
        path = config.deepspeed.config
        user = without_auto(read_deepspeed_json(path))
        if "scheduler" in user:
            raise ValueError(f"deepspeed.config: {path!r} sets 'scheduler'; the learning-rate schedule is the training "
                             "config's optimizer.warmup_steps, remove it from the JSON")
        if "optimizer" in user and "optimizer" not in derived:
            raise ValueError(f"deepspeed.config: {path!r} sets 'optimizer' but the training config says optimizer.name: "
                             f"{optimizer.name} (remove one of them)")
        expected_total = config.data.batch_size * optimizer.gradient_accumulation_steps * world_size()
        if user.get("train_batch_size", expected_total) != expected_total:
            raise ValueError(f"deepspeed.config: {path!r} conflicts with the training config: train_batch_size="
                             f"{user['train_batch_size']} (data.batch_size x optimizer.gradient_accumulation_steps x {world_size()} "
                             f"processes gives {expected_total})")
        conflicts: list[str] = []
        merged = _merge(derived, user, "", conflicts)
        if conflicts:
            raise ValueError(f"deepspeed.config: {path!r} conflicts with the training config: {'; '.join(conflicts)}")
        checkpoint = merged.get("checkpoint")
        if isinstance(checkpoint, dict) and checkpoint.get("load_universal"):
            raise ValueError(f"deepspeed.config: {path!r} sets checkpoint.load_universal, whose loader unpickles "
                             "(torch.load(weights_only=False)) and can run code from the checkpoint; remove it and resume from "
                             "a checkpoint this trainer wrote")
        if isinstance(merged.get("nebula"), dict) and merged["nebula"].get("enabled"):
            raise ValueError(f"deepspeed.config: {path!r} enables nebula, a checkpoint engine without weights-only loading; remove it")
    merged.setdefault("steps_per_print", 10**9)
    merged.setdefault("wall_clock_breakdown", False)
    for name in ("offload_optimizer", "offload_param"):
        if name in merged["zero_optimization"]:
            merged["zero_optimization"][name].setdefault("pin_memory", torch.cuda.is_available())
    return merged


def apply_svd_fast_kernels(unet: torch.nn.Module, enabled: bool) -> str:
    """Patch the UNet with svd_fast's kernels; asked for and failing is an error, not a silent fallback."""
    if not enabled:
        return "disabled by config (use_svd_fast_kernels: false)"
    from svd_fast.diffusers.patching import optimize  # noqa: PLC0415 - imports diffusers

    try:
        optimize(unet)
    except Exception as error:
        raise RuntimeError(f"use_svd_fast_kernels: optimize(unet) failed ({type(error).__name__}: {error}); "
                           "set use_svd_fast_kernels: false to train with the stock modules") from error
    return "applied"


def select_trained_parameters(unet: torch.nn.Module, trained: str, lora: Any = None) -> int:
    """Freeze what ``trained`` (full | temporal | lora) leaves out; with ``lora`` (a peft LoraConfig,
    ``TrainConfig.peft_lora()``) inject the adapters and train only them. Returns the number of trained parameters."""
    if trained == "lora":
        from svd_fast.training.lora import add_lora  # noqa: PLC0415 - imports peft

        if lora is None:
            raise ValueError("trained_parameters: lora needs the LoraConfig (TrainConfig.peft_lora())")
        return add_lora(unet, lora)
    for name, param in unet.named_parameters():
        param.requires_grad_(trained == "full" or bool(TEMPORAL_PARAMETER.search(name)))
    return sum(p.numel() for p in unet.parameters() if p.requires_grad)


COMPUTE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def vae_dtype(precision: str, force_upcast: bool) -> torch.dtype:
    """The frozen VAE's dtype: the training precision, except fp16 for a VAE whose config says it overflows in
    fp16 (``force_upcast``, as SVD's does: diffusers' pipeline upcasts it to fp32 too)."""
    return torch.float32 if precision == "fp16" and force_upcast else COMPUTE_DTYPES[precision]


def build_optimizer(optimizer: OptimizerSection, parameters: list[torch.nn.Parameter]) -> torch.optim.Optimizer | None:
    """torch's AdamW for ``optimizer.name: adamw_torch`` (no DeepSpeed op to JIT-build: FusedAdam/CPUAdam compile on
    first use), bitsandbytes' block-wise 8-bit AdamW for ``adamw8bit`` (2 bytes of optimizer state per trained
    parameter instead of 8); None for ``adamw_deepspeed``, which DeepSpeed builds from the derived config."""
    if optimizer.name == "adamw8bit":
        from bitsandbytes.optim import AdamW8bit  # noqa: PLC0415 - defers bitsandbytes (optional extra)

        return AdamW8bit(parameters, lr=optimizer.learning_rate, betas=(optimizer.adam_beta1, optimizer.adam_beta2),
                         eps=optimizer.adam_eps, weight_decay=optimizer.weight_decay)  # fmt: skip
    if optimizer.name != "adamw_torch":
        return None
    return torch.optim.AdamW(parameters, lr=optimizer.learning_rate, betas=(optimizer.adam_beta1, optimizer.adam_beta2),
                             eps=optimizer.adam_eps, weight_decay=optimizer.weight_decay)  # fmt: skip


def warmup_schedule(warmup: int):
    """DeepSpeed's ``lr_scheduler`` argument: a linear warmup over ``warmup`` steps, then constant."""

    def make_scheduler(opt: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / warmup) if warmup else 1.0)

    return make_scheduler


@dataclass
class Models:
    pipeline: Any  # the base StableVideoDiffusionPipeline (frozen VAE, image encoder, feature extractor)
    engine: Any  # the DeepSpeed engine around the UNet
    kernel_status: str
    compute_dtype: torch.dtype


def build_models(config: TrainConfig, device: torch.device, deepspeed_config: dict[str, Any]) -> Models:
    deepspeed = import_deepspeed()
    from diffusers import StableVideoDiffusionPipeline  # noqa: PLC0415 - diffusers loads only when a model is built

    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.manual_seed(config.seed)
    pipe = StableVideoDiffusionPipeline.from_pretrained(config.model, dtype=torch.float32, variant=config.model_variant)
    compute_dtype = COMPUTE_DTYPES[config.precision]
    # The frozen encoders run in the training precision (the UNet's compute dtype): half the memory of fp32 for
    # their weights and the VAE's activations (the memory plan's frozen_encoders and vae_encode rows).
    pipe.vae.to(device, vae_dtype(config.precision, pipe.vae.config.force_upcast)).eval().requires_grad_(False)
    pipe.image_encoder.to(dtype=compute_dtype).eval().requires_grad_(False)
    if config.data.latents_dir is None:  # with precomputed latents the image encoder is not used in the loop
        pipe.image_encoder.to(device)
    unet = pipe.unet
    kernel_status = apply_svd_fast_kernels(unet, config.use_svd_fast_kernels)
    enable_activation_checkpointing(unet, config.activation_checkpointing)
    select_trained_parameters(unet, config.trained_parameters, config.peft_lora())
    unet.train()
    trained = [p for p in unet.parameters() if p.requires_grad]
    optimizer = build_optimizer(config.optimizer, trained)
    engine, _, _, _ = deepspeed.initialize(
        model=unet, model_parameters=trained if optimizer is None else None, optimizer=optimizer,
        lr_scheduler=warmup_schedule(config.optimizer.warmup_steps), config=deepspeed_config,
    )
    return Models(pipeline=pipe, engine=engine, kernel_status=kernel_status, compute_dtype=compute_dtype)
