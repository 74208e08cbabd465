"""Training configuration in sections, one per component, as sgm's configs are laid out: ``data``, ``optimizer``,
``deepspeed``, ``lora``, ``validation``, ``objective`` and ``logging`` (checkpoints and export), beside the run's
own keys (model, output_dir, seed, precision, trained_parameters, ...). Each phase receives its section. Read
from YAML or JSON; every key and value is checked before any model is loaded, and an error names the key as
``section.key``. The flat layout of earlier releases still loads (:mod:`svd_fast.training.config_layout`)."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from svd_fast import checks
from svd_fast.training.config_layout import Layout, as_given, build_sections, sectioned
from svd_fast.training.deepspeed_json import adopt_deepspeed_values
from svd_fast.training.objective import ObjectiveConfig
from svd_fast.training.tracking import REPORT_TO

PRECISIONS = ("fp32", "bf16", "fp16")
OPTIMIZERS = ("adamw_torch", "adamw_deepspeed", "adamw8bit")
OFFLOAD_DEVICES = ("none", "cpu")
ACTIVATION_CHECKPOINTING = ("none", "temporal", "resnets", "all")
TRAINED_PARAMETERS = ("full", "temporal", "lora")
# The attention projections LoRA may adapt: those of every diffusers Attention in the UNet (spatial and temporal
# transformer blocks, self- and cross-attention).
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
# Cross-attention (attn2) attends to one key, the image embedding: its softmax is 1 whatever the query and key, so
# the gradients of attn2's to_q and to_k are exactly zero. Adapters there could never learn: to_q/to_k adapt attn1 only.
SELF_ATTENTION_ONLY = ("to_q", "to_k")
# The layers SVD added to the image model (what `trained_parameters: temporal` trains, and `lora.layers: temporal` adapts).
TEMPORAL_PARAMETER = re.compile(r"temporal_transformer_blocks|temporal_res_block|time_mixer|time_pos_embed")
LORA_LAYERS = ("all", "temporal", "spatial")
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
class Section:
    """A config section: its values are type-checked and range-checked on construction, errors name
    ``NAME.key``."""

    NAME: ClassVar[str] = ""

    def __post_init__(self) -> None:
        check_types(self, f"{self.NAME}.")
        self.check()

    def check(self) -> None:
        """Range checks of this section's values (ValueError naming ``NAME.key``)."""

    def key(self, name: str) -> str:
        return f"{self.NAME}.{name}"

    def require(self, condition: bool, name: str, rule: str) -> None:
        if not condition:
            raise ValueError(f"{self.key(name)} must be {rule}, got {getattr(self, name)!r}")

    def rule(self, *names: str, rule: str | None = None) -> None:
        """``names`` under their svd_fast.checks rule (``rule``: the rule of another name)."""
        for name in names:
            checks.check(rule or name, getattr(self, name), spelled=self.key(name))


@dataclass
class DataSection(Section):
    """The clips (svd_fast.data) or precomputed features, their geometry and the per-process batch."""

    NAME: ClassVar[str] = "data"
    path: str | list[str] = ""  # folder, list of files, or a .parquet/.jsonl manifest (svd_fast.data)
    latents_dir: str | None = None  # an `svd-fast encode` output: train from precomputed features instead of `path`
    num_frames: int = 14
    # SVD's native size, the size `svd-fast generate` samples at by default.
    height: int = 576
    width: int = 1024
    batch_size: int = 1  # per process, per micro-step (DeepSpeed's train_micro_batch_size_per_gpu)
    stride: int | None = None
    target_fps: float | None = None
    random_crop: bool = False
    shuffle: bool = True
    on_short: str = "skip"
    video_decoder: str = "auto"  # "auto" | "pyav" | "dali" (the video decoding library; kernel backends are svd_fast.backends)
    # DataLoader worker processes decoding clips on the CPU (0: decoded in the training loop); the same clips in the
    # same order for any value (svd_fast.data.loader). Unused with latents_dir and with video_decoder: dali on CUDA
    # (NVDEC decodes in the training process).
    num_workers: int = 2
    default_fps: float = 7.0  # used when the data has no fps (the clip's fps after target_fps resampling wins)
    default_motion_bucket_id: float = 127.0  # used when the manifest has no motion_bucket_id column
    # Frames the frozen VAE encodes at once in the training loop (data encoded on the fly); default:
    # default_vae_chunk(num_frames).
    vae_encode_chunk: int | None = None

    def check(self) -> None:
        for name in ("num_frames", "height", "width", "batch_size"):
            self.require(getattr(self, name) >= 1, name, "a positive integer")
        self.require(self.stride is None or self.stride >= 1, "stride", "a positive integer")
        if self.stride is not None and self.target_fps is not None:
            raise ValueError("data.stride and data.target_fps: give one of them, not both")
        for name in ("target_fps", "default_fps"):
            self.require(getattr(self, name) is None or getattr(self, name) > 0, name, "> 0")
        self.require(self.video_decoder in ("auto", "pyav", "dali"), "video_decoder", "auto, pyav or dali")
        self.require(self.num_workers >= 0, "num_workers", "an integer >= 0")
        self.require(self.vae_encode_chunk is None or self.vae_encode_chunk >= 1, "vae_encode_chunk", "a positive integer")
        if self.height % 8 or self.width % 8:
            raise ValueError(f"data.height and data.width must be multiples of 8 (VAE downsampling), got {self.height}x{self.width}")
        self.rule("num_frames", "height", "width", "batch_size", "default_fps", "default_motion_bucket_id", "target_fps", "stride")

    def sources(self) -> list[str]:
        return [self.path] if isinstance(self.path, str) else list(self.path)

    def encode_chunk(self) -> int:
        """Frames the VAE encodes at once in the training loop."""
        return self.vae_encode_chunk or default_vae_chunk(self.num_frames)


@dataclass
class OptimizerSection(Section):
    """AdamW, its warmup, gradient accumulation and clipping."""

    NAME: ClassVar[str] = "optimizer"
    name: str = "adamw_torch"  # adamw_deepspeed: DeepSpeed's fused/CPU Adam (JIT-built; needed for offload); adamw8bit: bitsandbytes' 8-bit AdamW
    learning_rate: float = 3e-5
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    warmup_steps: int = 0
    gradient_accumulation_steps: int = 1
    gradient_clipping: float = 1.0

    def check(self) -> None:
        self.require(self.name in OPTIMIZERS, "name", f"one of {OPTIMIZERS}")
        self.require(self.learning_rate > 0, "learning_rate", "> 0")
        for name in ("weight_decay", "gradient_clipping"):
            self.require(getattr(self, name) >= 0, name, ">= 0")
        for name in ("adam_beta1", "adam_beta2"):
            self.require(0.0 <= getattr(self, name) < 1.0, name, "in [0, 1)")
        self.require(self.warmup_steps >= 0, "warmup_steps", "an integer >= 0")
        self.require(self.gradient_accumulation_steps >= 1, "gradient_accumulation_steps", "a positive integer")
        self.rule("learning_rate", "adam_eps")


@dataclass
class DeepSpeedSection(Section):
    """ZeRO stage and offload, and a user's DeepSpeed JSON merged with the keys the config derives."""

    NAME: ClassVar[str] = "deepspeed"
    zero_stage: int = 2
    offload_optimizer: str = "none"
    offload_param: str = "none"  # ZeRO-3 only
    config: str | None = None  # a DeepSpeed JSON merged with the keys this config derives (conflicts are errors)
    # ZeRO communication buckets and ZeRO-3's gathered parameters, in elements (None: DeepSpeed's default, DEEPSPEED_DEFAULTS):
    # each is GPU memory the plan counts (svd_fast.training.memory_plan).
    reduce_bucket_size: int | None = None
    allgather_bucket_size: int | None = None  # ZeRO 1-2
    stage3_prefetch_bucket_size: int | None = None
    stage3_max_live_parameters: int | None = None
    stage3_max_reuse_distance: int | None = None

    def check(self) -> None:
        self.require(self.zero_stage in (0, 1, 2, 3), "zero_stage", "0, 1, 2 or 3")
        for name in DEEPSPEED_DEFAULTS:
            self.require(getattr(self, name) is None or getattr(self, name) >= 1, name, "a positive integer")
        for name in ("offload_optimizer", "offload_param"):
            self.require(getattr(self, name) in OFFLOAD_DEVICES, name, f"one of {OFFLOAD_DEVICES}")
        if self.offload_param != "none" and self.zero_stage != 3:
            raise ValueError("deepspeed.offload_param needs deepspeed.zero_stage: 3")
        if self.offload_optimizer != "none" and self.zero_stage < 1:
            raise ValueError("deepspeed.offload_optimizer needs deepspeed.zero_stage >= 1")


@dataclass
class LoraSection(Section):
    """Adapters on the attention projections of every spatial and temporal transformer block (``trained_parameters: lora``)."""

    NAME: ClassVar[str] = "lora"
    rank: int = 16
    alpha: float | None = None  # scale alpha / rank; default: the rank (scale 1)
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: list(LORA_TARGETS))  # to_q/to_k: self-attention (attn1) only
    layers: str = "all"  # all | temporal (the layers SVD added: motion LoRAs) | spatial (the image model's layers)

    def check(self) -> None:
        self.require(self.rank >= 1, "rank", "a positive integer")
        self.require(self.alpha is None or self.alpha > 0, "alpha", "> 0")
        self.require(0.0 <= self.dropout < 1.0, "dropout", "in [0, 1)")
        cross = [name for name in self.target_modules if name in {f"attn2.{target}" for target in SELF_ATTENTION_ONLY}]
        if cross:
            raise ValueError(f"lora.target_modules: {cross} are refused: cross-attention attends to one image token, so their "
                             "gradient is exactly zero (to_q/to_k adapt self-attention, attn1, only; to_v and to_out.0 adapt both)")
        self.require(self.layers in LORA_LAYERS, "layers", f"one of {LORA_LAYERS}")
        known = all(name in LORA_TARGETS for name in self.target_modules)
        self.require(known and bool(self.target_modules), "target_modules", f"a non-empty list of {list(LORA_TARGETS)}")

    def peft_config(self):
        """This section as a peft LoraConfig."""
        from peft import LoraConfig  # noqa: PLC0415 - peft loads only for LoRA training

        alpha = float(self.rank if self.alpha is None else self.alpha)
        return LoraConfig(r=self.rank, lora_alpha=alpha, lora_dropout=self.dropout,
                          target_modules=lora_target_pattern(self.target_modules, self.layers), init_lora_weights=True)  # fmt: skip


@dataclass
class ValidationSection(Section):
    """Sample clips every ``every`` steps, one per held-out first frame (svd_fast.training.validation)."""

    NAME: ClassVar[str] = "validation"
    every: int = 0  # 0: never
    images: list[str] = field(default_factory=list)  # image files (first frames held out of the training data)
    num_frames: int | None = None  # default: data.num_frames
    inference_steps: int = 25
    decode_chunk: int | None = None  # frames the VAE decodes at once (default: default_vae_chunk(num_frames))

    def check(self) -> None:
        self.require(self.decode_chunk is None or self.decode_chunk >= 1, "decode_chunk", "a positive integer")
        self.require(self.every >= 0, "every", "an integer >= 0")
        self.require(self.inference_steps >= 1, "inference_steps", "a positive integer")
        self.require(self.num_frames is None or self.num_frames >= 1, "num_frames", "a positive integer")
        if self.every and not self.images:
            raise ValueError(f"validation.images: validation.every is {self.every} but no validation images are given")
        self.rule("num_frames", rule="validation_num_frames")
        self.rule("inference_steps", rule="validation_inference_steps")


@dataclass
class LoggingSection(Section):
    """train_log.jsonl, checkpoints and the exported pipeline."""

    NAME: ClassVar[str] = "logging"
    log_every: int = 1
    sigma_bins: list[float] = field(default_factory=lambda: [0.1, 1.0, 10.0])  # edges for the sigma-binned loss
    checkpoint_every: int = 0  # 0: only at the end
    export: bool = True
    export_ema: bool = True  # export the EMA weights when EMA is on
    keep_checkpoints: int | None = None  # keep the N newest checkpoints (None: all); the one `latest` names is never deleted
    keep_every: int = 0  # also keep every checkpoint whose step is a multiple of K (0: none beyond keep_checkpoints)
    report_to: str = "none"  # none | tensorboard | wandb (svd_fast.training.tracking; train_log.jsonl is always written)

    def check(self) -> None:
        self.require(self.log_every >= 1, "log_every", "a positive integer")
        self.require(self.checkpoint_every >= 0, "checkpoint_every", "an integer >= 0")
        self.require(self.keep_checkpoints is None or self.keep_checkpoints >= 1, "keep_checkpoints", "a positive integer (or null: keep all)")
        self.require(self.keep_every >= 0, "keep_every", "an integer >= 0")
        self.require(self.report_to in REPORT_TO, "report_to", f"one of {REPORT_TO}")
        edges = list(self.sigma_bins)
        self.require(edges == sorted(edges) and all(edge > 0 for edge in edges), "sigma_bins", "increasing positive edges")


@dataclass
class TrainConfig:
    model: str = ""  # base diffusers pipeline folder (UNet initialisation + frozen VAE/CLIP + exported components)
    model_variant: str | None = None  # e.g. "fp16": read the *.fp16.safetensors weights (fp16-only downloads), trained in fp32
    output_dir: str = "train_out"
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    max_steps: int = 100  # optimiser steps
    precision: str = "bf16"  # the UNet's compute dtype; DeepSpeed keeps fp32 master weights for bf16/fp16
    trained_parameters: str = "full"  # full | temporal (the layers SVD added to the image model, see TEMPORAL_PARAMETER) | lora
    activation_checkpointing: str = "none"  # none | temporal | resnets | all (svd_fast.training.activation_checkpointing)
    use_svd_fast_kernels: bool = True
    target_gpu_gib: float | None = None  # the GPU memory the config is made for: --plan-memory reports its margin (None: CPU configs)
    ema_decay: float = 0.0  # 0 disables EMA
    resume_from: str | None = None  # a checkpoint dir written by this trainer, or "latest" (in output_dir)
    allow_other_run: bool = False  # resume_from: latest may continue a checkpoint of another run in output_dir
    max_nonfinite_steps: int = 1  # stop after this many consecutive steps with a non-finite loss (fp16 overflows skip steps)
    data: DataSection = field(default_factory=DataSection)
    optimizer: OptimizerSection = field(default_factory=OptimizerSection)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)
    lora: LoraSection = field(default_factory=LoraSection)
    validation: ValidationSection = field(default_factory=ValidationSection)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    logging: LoggingSection = field(default_factory=LoggingSection)

    def __post_init__(self) -> None:
        check_types(self)
        check_types(self.objective, "objective.")
        for name in ("max_steps", "max_nonfinite_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.target_gpu_gib is not None and not self.target_gpu_gib > 0:
            raise ValueError(f"target_gpu_gib must be > 0, got {self.target_gpu_gib!r}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        choices = {"precision": PRECISIONS, "device": ("auto", "cpu", "cuda"), "activation_checkpointing": ACTIVATION_CHECKPOINTING,
                   "trained_parameters": TRAINED_PARAMETERS}  # fmt: skip
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.deepspeed.offload_optimizer != "none" and self.optimizer.name != "adamw_deepspeed":
            raise ValueError("deepspeed.offload_optimizer needs optimizer.name: adamw_deepspeed (DeepSpeed's CPU Adam)")
        checks.check("seed", self.seed)

    @property
    def validation_num_frames(self) -> int:
        return self.validation.num_frames or self.data.num_frames

    def encode_chunk(self) -> int:
        """Frames the VAE encodes at once in the training loop."""
        return self.data.encode_chunk()

    def decode_chunk(self) -> int:
        """Frames the VAE decodes at once when sampling a validation clip."""
        return self.validation.decode_chunk or default_vae_chunk(self.validation_num_frames)

    def zero_setting(self, name: str) -> int:
        """A ZeRO bucket or live-parameter setting: the config's, else DeepSpeed's default."""
        value = getattr(self.deepspeed, name)
        return DEEPSPEED_DEFAULTS[name] if value is None else value

    def peft_lora(self):
        """The peft LoraConfig of ``trained_parameters: lora``, else None."""
        return self.lora.peft_config() if self.trained_parameters == "lora" else None

    def as_given(self, message: str) -> str:
        """``message`` naming the keys as the user wrote them (flat names of the old layout: config_layout)."""
        return as_given(message, getattr(self, "given_as", {}))

    @classmethod
    def from_dict(cls, values: dict[str, Any], overrides: dict[str, Any] | None = None) -> TrainConfig:
        """The config of the keys the user wrote (sectioned, or flat as earlier releases wrote them), with
        ``overrides`` (``section.key`` -> value, as ``--set`` gives them) applied; with ``deepspeed.config``, the
        keys they left out take that DeepSpeed JSON's values (svd_fast.training.deepspeed_json)."""
        return cls.from_layout(sectioned(values, cls, overrides))

    @classmethod
    def from_layout(cls, layout: Layout) -> TrainConfig:
        try:
            values = adopt_deepspeed_values(layout.values)
            config = cls(**build_sections(cls, values))
        except ValueError as error:
            raise ValueError(as_given(str(error), layout.given_as)) from None
        config.given_as = layout.given_as
        return config

    @classmethod
    def from_file(cls, path: str | Path, overrides: dict[str, Any] | None = None) -> TrainConfig:
        return cls.from_dict(cls.read_file(path), overrides)

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


def lora_target_pattern(targets: list[str], layers: str = "all") -> str:
    """peft's ``target_modules`` as a regular expression (peft full-matches it against each module name): ``targets``
    on every attention, except to_q/to_k of cross-attention (:data:`SELF_ATTENTION_ONLY`), in ``layers``."""
    projections = [rf"attn1\.{re.escape(name)}" if name in SELF_ATTENTION_ONLY else rf"attn[12]\.{re.escape(name)}" for name in targets]
    temporal = TEMPORAL_PARAMETER.pattern
    where = {"all": "", "temporal": rf"(?=.*(?:{temporal}))", "spatial": rf"(?!.*(?:{temporal}))"}[layers]
    return rf"{where}.*\.(?:{'|'.join(projections)})"


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


def check_types(config: Any, prefix: str = "") -> None:
    """Every value has its field's declared type, so ``max_steps: true`` or ``learning_rate: "1e-4"`` is an
    error naming the key (``prefix`` + name) rather than a silently different run."""
    hints = typing.get_type_hints(type(config))
    for item in dataclasses.fields(config):
        value = getattr(config, item.name)
        declared = hints[item.name]
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{prefix}{item.name} must be a finite number, got {value!r}")
        if not _matches(value, declared):
            expected = declared.__name__ if isinstance(declared, type) else str(declared).replace("NoneType", "None")
            raise ValueError(f"{prefix}{item.name} must be of type {expected}, got {value!r} ({type(value).__name__})")
