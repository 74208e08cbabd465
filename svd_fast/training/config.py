"""Training configuration: a flat dataclass read from YAML or JSON; every key and value is checked before any
model is loaded, and an error names the offending key."""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from svd_fast import checks
from svd_fast.training.deepspeed_json import adopt_deepspeed_values
from svd_fast.training.objective import ObjectiveConfig

PRECISIONS = ("fp32", "bf16", "fp16")
OPTIMIZERS = ("adamw_torch", "adamw_deepspeed")
OFFLOAD_DEVICES = ("none", "cpu")
ACTIVATION_CHECKPOINTING = ("none", "temporal", "resnets", "all")
TRAINED_PARAMETERS = ("full", "temporal", "lora")
# The attention projections LoRA may adapt: those of every diffusers Attention in the UNet (spatial and temporal
# transformer blocks, self- and cross-attention).
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
# DeepSpeed's defaults for the zero_optimization keys the config may set (deepspeed.runtime.zero.config).
DEEPSPEED_DEFAULTS = {
    "reduce_bucket_size": 500_000_000,
    "allgather_bucket_size": 500_000_000,
    "stage3_prefetch_bucket_size": 50_000_000,
    "stage3_max_live_parameters": 1_000_000_000,
    "stage3_max_reuse_distance": 1_000_000_000,
}


def default_vae_chunk(frames: int) -> int:
    """A quarter of the clip's frames (at least 1). The VAE's peak grows with the frames it holds at once
    (bf16 at 576x1024, traced: 0.70 GiB per frame to encode, 1.13 to decode) and so do the UNet's activations
    (0.63-0.74 GiB per frame with activation_checkpointing: all, its leanest mode, 9.3 GiB for a 25-frame
    guided sampling step): a quarter of the frames keeps encoding under the training step's activations and
    decoding under the sampling step's, at any size (svd-fast train --plan-memory shows the rows)."""
    return max(1, (frames + 3) // 4)


@dataclass
class TrainConfig:
    # Inputs and outputs
    model: str = ""  # base diffusers pipeline folder (UNet initialisation + frozen VAE/CLIP + exported components)
    model_variant: str | None = None  # e.g. "fp16": read the *.fp16.safetensors weights (fp16-only downloads), trained in fp32
    data: str | list[str] = ""  # folder, list of files, or a .parquet/.jsonl manifest (svd_fast.data)
    output_dir: str = "train_out"
    latents_dir: str | None = None  # an `svd-fast encode` output: train from precomputed features instead of `data`
    # Clips
    num_frames: int = 14
    # SVD's native size, the size `svd-fast generate` samples at by default.
    height: int = 576
    width: int = 1024
    stride: int | None = None
    target_fps: float | None = None
    random_crop: bool = False
    shuffle: bool = True
    on_short: str = "skip"
    video_decoder: str = "auto"  # "auto" | "pyav" | "dali" (the video decoding library; kernel backends are svd_fast.backends)
    default_fps: float = 7.0  # used when the data has no fps (the clip's fps after target_fps resampling wins)
    default_motion_bucket_id: float = 127.0  # used when the manifest has no motion_bucket_id column
    # Optimisation
    batch_size: int = 1  # per process, per micro-step
    gradient_accumulation_steps: int = 1
    max_steps: int = 100  # optimiser steps
    learning_rate: float = 3e-5
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    warmup_steps: int = 0
    gradient_clipping: float = 1.0
    optimizer: str = "adamw_torch"  # adamw_deepspeed: DeepSpeed's fused/CPU Adam (JIT-built; needed for offload)
    # DeepSpeed
    zero_stage: int = 2
    offload_optimizer: str = "none"
    offload_param: str = "none"  # ZeRO-3 only
    precision: str = "bf16"  # the UNet's compute dtype; DeepSpeed keeps fp32 master weights for bf16/fp16
    # ZeRO communication buckets and ZeRO-3's gathered parameters, in elements (None: DeepSpeed's default, DEEPSPEED_DEFAULTS):
    # each is GPU memory the plan counts (svd_fast.training.memory_plan).
    reduce_bucket_size: int | None = None
    allgather_bucket_size: int | None = None  # ZeRO 1-2
    stage3_prefetch_bucket_size: int | None = None
    stage3_max_live_parameters: int | None = None
    stage3_max_reuse_distance: int | None = None
    deepspeed_config: str | None = None  # a DeepSpeed JSON merged with the keys this config derives (conflicts are errors)
    trained_parameters: str = "full"  # full | temporal (only the layers SVD added to the image model, see TEMPORAL_PARAMETER) | lora
    # LoRA (trained_parameters: lora): adapters on the attention projections of every spatial and temporal transformer block
    lora_rank: int = 16
    lora_alpha: float | None = None  # scale alpha / rank; default: the rank (scale 1)
    lora_dropout: float = 0.0
    lora_target_modules: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    activation_checkpointing: str = "none"  # none | temporal | resnets | all (svd_fast.training.activation_checkpointing)
    use_svd_fast_kernels: bool = True
    # Frames the frozen VAE encodes at once in the training loop (data encoded on the fly), and decodes at once when
    # sampling validation clips; default: default_vae_chunk(num_frames).
    vae_encode_chunk: int | None = None
    validation_decode_chunk: int | None = None
    target_gpu_gib: float | None = None  # the GPU memory the config is made for: --plan-memory reports its margin (None: CPU configs)
    device: str = "auto"  # auto | cpu | cuda
    # EMA, logging, checkpoints, export
    ema_decay: float = 0.0  # 0 disables EMA
    log_every: int = 1
    checkpoint_every: int = 0  # 0: only at the end
    resume_from: str | None = None  # a checkpoint dir written by this trainer, or "latest" (in output_dir)
    allow_other_run: bool = False  # resume_from: latest may continue a checkpoint of another run in output_dir
    max_nonfinite_steps: int = 1  # stop after this many consecutive steps with a non-finite loss (fp16 overflows skip steps)
    export: bool = True
    # Validation samples (svd_fast.training.validation): every validate_every steps, one clip per held-out first frame
    validate_every: int = 0  # 0: never
    validation_images: list[str] = field(default_factory=list)  # image files (first frames held out of the training data)
    validation_num_frames: int | None = None  # default: num_frames
    validation_inference_steps: int = 25
    export_ema: bool = True  # export the EMA weights when EMA is on
    seed: int = 0
    # Objective
    p_mean: float = 0.7
    p_std: float = 1.6
    cond_aug_mean: float = -3.0
    cond_aug_std: float = 0.5
    drop_image_embedding: float = 0.1
    drop_both: float = 0.1
    drop_cond_latent: float = 0.1
    sigma_bins: list[float] = field(default_factory=lambda: [0.1, 1.0, 10.0])  # edges for sigma-binned loss

    def __post_init__(self) -> None:
        check_types(self)
        positive = ("num_frames", "height", "width", "batch_size", "gradient_accumulation_steps", "max_steps", "log_every",
                    "max_nonfinite_steps")
        for name in positive:
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        for name in ("vae_encode_chunk", "validation_decode_chunk", *DEEPSPEED_DEFAULTS):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.target_gpu_gib is not None and not self.target_gpu_gib > 0:
            raise ValueError(f"target_gpu_gib must be > 0, got {self.target_gpu_gib!r}")
        for name in ("warmup_steps", "checkpoint_every", "seed", "validate_every"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {getattr(self, name)!r}")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.weight_decay < 0 or self.gradient_clipping < 0:
            raise ValueError("weight_decay and gradient_clipping must be >= 0")
        if not (0.0 <= self.adam_beta1 < 1.0 and 0.0 <= self.adam_beta2 < 1.0):
            raise ValueError(f"adam_beta1/adam_beta2 must be in [0, 1), got {self.adam_beta1}, {self.adam_beta2}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"zero_stage must be 0, 1, 2 or 3, got {self.zero_stage!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, got {self.device!r}")
        if self.video_decoder not in ("auto", "pyav", "dali"):
            raise ValueError(f"video_decoder must be auto, pyav or dali, got {self.video_decoder!r}")
        for name in ("offload_optimizer", "offload_param"):
            if getattr(self, name) not in OFFLOAD_DEVICES:
                raise ValueError(f"{name} must be one of {OFFLOAD_DEVICES}, got {getattr(self, name)!r}")
        if self.offload_param != "none" and self.zero_stage != 3:
            raise ValueError("offload_param needs zero_stage: 3")
        if self.offload_optimizer != "none" and self.zero_stage < 1:
            raise ValueError("offload_optimizer needs zero_stage >= 1")
        if self.offload_optimizer != "none" and self.optimizer != "adamw_deepspeed":
            raise ValueError("offload_optimizer needs optimizer: adamw_deepspeed (DeepSpeed's CPU Adam)")
        if self.activation_checkpointing not in ACTIVATION_CHECKPOINTING:
            raise ValueError(f"activation_checkpointing must be one of {ACTIVATION_CHECKPOINTING}, got {self.activation_checkpointing!r}")
        if self.trained_parameters not in TRAINED_PARAMETERS:
            raise ValueError(f"trained_parameters must be one of {TRAINED_PARAMETERS}, got {self.trained_parameters!r}")
        if self.validation_inference_steps < 1 or (self.validation_num_frames is not None and self.validation_num_frames < 1):
            raise ValueError("validation_inference_steps and validation_num_frames must be positive integers, "
                             f"got {self.validation_inference_steps!r}, {self.validation_num_frames!r}")
        if self.validate_every and not self.validation_images:
            raise ValueError(f"validation_images: validate_every is {self.validate_every} but no validation images are given")
        if self.lora_rank < 1:
            raise ValueError(f"lora_rank must be a positive integer, got {self.lora_rank!r}")
        if self.lora_alpha is not None and not self.lora_alpha > 0:
            raise ValueError(f"lora_alpha must be > 0, got {self.lora_alpha!r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        unknown_targets = [name for name in self.lora_target_modules if name not in LORA_TARGETS]
        if unknown_targets or not self.lora_target_modules:
            raise ValueError(f"lora_target_modules must be a non-empty list of {list(LORA_TARGETS)}, got {self.lora_target_modules!r}")
        if self.stride is not None and self.stride < 1:
            raise ValueError(f"stride must be a positive integer, got {self.stride!r}")
        if self.stride is not None and self.target_fps is not None:
            raise ValueError("stride and target_fps: give one of them, not both")
        for name in ("target_fps", "default_fps"):
            if getattr(self, name) is not None and not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if self.height % 8 or self.width % 8:
            raise ValueError(f"height and width must be multiples of 8 (VAE downsampling), got {self.height}x{self.width}")
        if list(self.sigma_bins) != sorted(self.sigma_bins) or any(edge <= 0 for edge in self.sigma_bins):
            raise ValueError(f"sigma_bins must be increasing positive edges, got {self.sigma_bins!r}")
        self.objective()  # checks p_std, dropout probabilities
        for name in ("seed", "num_frames", "height", "width", "batch_size", "learning_rate", "adam_eps", "default_fps",
                     "default_motion_bucket_id", "target_fps", "stride", "validation_num_frames", "validation_inference_steps"):  # fmt: skip
            checks.check(name, getattr(self, name))

    def encode_chunk(self) -> int:
        """Frames the VAE encodes at once in the training loop."""
        return self.vae_encode_chunk or default_vae_chunk(self.num_frames)

    def decode_chunk(self) -> int:
        """Frames the VAE decodes at once when sampling a validation clip."""
        return self.validation_decode_chunk or default_vae_chunk(self.validation_num_frames or self.num_frames)

    def zero_setting(self, name: str) -> int:
        """A ZeRO bucket or live-parameter setting: the config's, else DeepSpeed's default."""
        value = getattr(self, name)
        return DEEPSPEED_DEFAULTS[name] if value is None else value

    def objective(self) -> ObjectiveConfig:
        return ObjectiveConfig(
            p_mean=self.p_mean,
            p_std=self.p_std,
            cond_aug_mean=self.cond_aug_mean,
            cond_aug_std=self.cond_aug_std,
            drop_image_embedding=self.drop_image_embedding,
            drop_both=self.drop_both,
            drop_cond_latent=self.drop_cond_latent,
        )

    def lora(self):
        """The peft LoraConfig of ``trained_parameters: lora``."""
        from peft import LoraConfig  # noqa: PLC0415 - peft loads only for LoRA training

        alpha = float(self.lora_rank if self.lora_alpha is None else self.lora_alpha)
        return LoraConfig(r=self.lora_rank, lora_alpha=alpha, lora_dropout=self.lora_dropout,
                          target_modules=list(self.lora_target_modules), init_lora_weights=True)  # fmt: skip

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """The config of the keys the user wrote; with ``deepspeed_config``, the keys they left out take that
        DeepSpeed JSON's values (svd_fast.training.deepspeed_json)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown config key(s) {unknown}; known keys: {sorted(known)}")
        return cls(**adopt_deepspeed_values(values))

    @classmethod
    def from_file(cls, path: str | Path) -> TrainConfig:
        return cls.from_dict(cls.read_file(path))

    @staticmethod
    def read_file(path: str | Path) -> dict[str, Any]:
        """The keys and values a YAML or JSON config file writes (unchecked)."""
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"config: file {str(path)!r} does not exist")
        text = path.read_text()
        if path.suffix.lower() == ".json":
            values = json.loads(text)
        else:
            import yaml  # noqa: PLC0415 - PyYAML loads only for a YAML config

            values = yaml.safe_load(text) or {}
        if not isinstance(values, dict):
            raise ValueError(f"config: {path} must hold a mapping of keys to values")
        return values

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _matches(value: Any, declared: Any) -> bool:
    """``value`` is an instance of the declared type; bool is not a number, an int is a float."""
    origin = typing.get_origin(declared)
    if declared is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, option) for option in typing.get_args(declared))
    if declared is type(None):
        return value is None
    if origin is list:
        (item,) = typing.get_args(declared)
        return isinstance(value, list) and all(_matches(element, item) for element in value)
    if isinstance(value, bool):
        return declared is bool
    if declared is float:
        return isinstance(value, (int, float))
    return isinstance(value, declared)


def check_types(config: TrainConfig) -> None:
    """Every value has its field's declared type, so ``max_steps: true`` or ``learning_rate: "1e-4"`` is an
    error naming the key rather than a silently different run."""
    hints = typing.get_type_hints(type(config))
    for item in dataclasses.fields(config):
        value = getattr(config, item.name)
        declared = hints[item.name]
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{item.name} must be a finite number, got {value!r}")
        if not _matches(value, declared):
            expected = declared.__name__ if isinstance(declared, type) else str(declared).replace("NoneType", "None")
            raise ValueError(f"{item.name} must be of type {expected}, got {value!r} ({type(value).__name__})")
