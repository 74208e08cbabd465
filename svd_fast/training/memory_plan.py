"""Per-GPU memory plan of a training config, without a GPU and without allocating the model.

Accounting rules (all per GPU, GiB = 2**30 bytes):
- model_states: DeepSpeed's own estimators (estimate_zero2_model_states_mem_needs for ZeRO 0-2,
  estimate_zero3_model_states_mem_needs for ZeRO-3) for the UNet's parameter count (counted on the meta
  device): 16-bit parameters, gradients, fp32 masters and Adam moments, sharded as the stage shards them and
  with the config's optimizer / parameter offload. For ZeRO-0/1 this is ZeRO-2's figure (a lower bound: they do
  not shard gradients).
- ema: 4 bytes per trained parameter, divided by the number of GPUs when ZeRO shards the fp32 masters (the
  EMA follows their partitioning, svd_fast.training.ema); 0 with the optimizer offloaded (the EMA is on the CPU).
- activations: the peak of one forward + backward of the real full-size UNet (diffusers'
  UNetSpatioTemporalConditionModel with SVD's config) at the config's frames, resolution, batch, precision
  and activation checkpointing (with ``trained_parameters: lora`` the adapters injected and only they trained; full
  and temporal trace every parameter as trained, an upper bound for temporal), traced on fake tensors (torch's FakeTensorMode) with op-level accounting
  (:class:`LiveBytesTracker`: peak bytes of the storages alive, parameters and inputs excluded; torch's
  MemTracker agrees within 5% on the tiny UNet but is ~10x slower). Gradients are dropped as soon as they are accumulated (hooked),
  because DeepSpeed moves them into its buckets (part of model_states). Fake CPU tensors route
  scaled_dot_product_attention to the flash kernel, so attention stores q, k, v, output and a logsumexp, as
  flash / memory-efficient attention does on a GPU, never an N x N score matrix.
- frozen_encoders: the VAE and CLIP image encoder the trainer keeps on the GPU (fp32) to encode each batch
  (with precomputed latents, ``latents_dir``, only the VAE: it still encodes the conditioning frame).
- overhead: CUDA context and library workspaces (CUDA_CONTEXT_GIB), DeepSpeed's communication buffers
  (reduce / all-gather buckets for ZeRO 1-2, reduce + prefetch buckets for ZeRO-3, at DeepSpeed's defaults,
  16-bit) and an allocator margin (ALLOCATOR_MARGIN of activations and model states, for fragmentation).
per_gpu_peak = model_states + ema + activations + frozen_encoders + overhead.
"""

from __future__ import annotations

import weakref
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode, unset_fake_temporarily
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from svd_fast.training.activation_checkpointing import enable_activation_checkpointing
from svd_fast.training.config import DeepSpeedSection, TrainConfig
from svd_fast.training.deepspeed_import import import_deepspeed
from svd_fast.training.lora import add_lora
from svd_fast.training.setup import select_trained_parameters

GIB = 2**30
CUDA_CONTEXT_GIB = 0.75
ALLOCATOR_MARGIN = 0.10
REDUCE_BUCKET_ELEMENTS = 5e8  # DeepSpeed's default reduce_bucket_size
ALLGATHER_BUCKET_ELEMENTS = 5e8  # default allgather_bucket_size (ZeRO 1-2)
PREFETCH_BUCKET_ELEMENTS = 5e7  # default stage3_prefetch_bucket_size
VAE_PARAMS = 83_653_863  # AutoencoderKLTemporalDecoder of SVD
IMAGE_ENCODER_PARAMS = 632_076_800  # CLIPVisionModelWithProjection ViT-H/14


@dataclass
class MemoryPlan:
    per_gpu_peak_gib: float
    model_states_gib: float
    ema_gib: float
    activations_gib: float
    frozen_encoders_gib: float
    overhead_gib: float
    zero_stage: int
    gpus: int
    trained_params: int
    trained_parameters: str
    frames: int
    size: list[int]
    activation_checkpointing: str

    def to_dict(self) -> dict:
        return asdict(self)


def parameter_counts(unet_kwargs: dict, trained_parameters: str, lora: Any = None) -> tuple[int, int, int]:
    """(trained parameters, frozen parameters, largest module's own trained parameters) of the UNet, built on
    the meta device (with the LoRA adapters of ``lora``, a peft LoraConfig, for ``trained_parameters: lora``)."""
    from diffusers import UNetSpatioTemporalConditionModel  # noqa: PLC0415 - diffusers loads only when a model is built

    with torch.device("meta"):
        unet = UNetSpatioTemporalConditionModel(**unet_kwargs)
        trained = select_trained_parameters(unet, trained_parameters, lora)
    frozen = sum(p.numel() for p in unet.parameters()) - trained
    largest = max(sum(p.numel() for p in module.parameters(recurse=False) if p.requires_grad) for module in unet.modules())
    return trained, frozen, largest


def model_states_bytes(deepspeed: DeepSpeedSection, total: int, largest: int, gpus: int, frozen: int = 0) -> int:
    """DeepSpeed's estimate for the trained parameters, plus the frozen ones' 16-bit copies (ZeRO-3 shards them)."""
    import_deepspeed()  # its import logs to stdout otherwise, before --json output
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs  # noqa: PLC0415 - deepspeed (slow import) loads only when training runs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs  # noqa: PLC0415 - deepspeed (slow import) loads only when training runs

    offload = deepspeed.offload_optimizer != "none"
    if deepspeed.zero_stage == 3:
        _, gpu, _ = estimate_zero3_model_states_mem_needs(total, largest, num_gpus_per_node=gpus, cpu_offload=offload,
                                                          cpu_offload_params=deepspeed.offload_param != "none")
        return int(gpu) + (0 if deepspeed.offload_param != "none" else 2 * frozen // gpus)
    _, gpu = estimate_zero2_model_states_mem_needs(total, num_gpus_per_node=gpus if deepspeed.zero_stage else 1, cpu_offload=offload)
    return int(gpu) + 2 * frozen


class LiveBytesTracker(TorchDispatchMode):
    """Peak bytes of the tensor storages created inside the mode and still alive (op-level accounting: each new
    storage counts once, views are free, a storage stops counting when it is freed)."""

    def __init__(self) -> None:
        super().__init__()
        self.current = 0
        self.peak = 0

    def _freed(self, nbytes: int) -> None:
        self.current -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            if getattr(storage, "svd_fast_counted", False):
                continue
            storage.svd_fast_counted = True
            nbytes = storage.nbytes()
            self.current += nbytes
            self.peak = max(self.peak, self.current)
            weakref.finalize(storage, self._freed, nbytes)
        return out


def traced_activation_bytes(unet_kwargs: dict, frames: int, latent_hw: tuple[int, int], batch: int, dtype: torch.dtype,
                            checkpointing: str, lora: Any = None) -> int:
    """Peak activation bytes of one forward + backward of the UNet, traced on fake tensors (parameters and
    inputs are made before tracking starts, so they are not counted). With ``lora`` (a peft LoraConfig) the
    adapters are injected and only they are trained, as in the trainer: frozen layers save no inputs for
    weight gradients."""
    from diffusers import UNetSpatioTemporalConditionModel  # noqa: PLC0415 - diffusers loads only when a model is built

    with FakeTensorMode():
        # Built in ``dtype``: a .to() of fake parameters would swap them.
        default_dtype = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            unet = UNetSpatioTemporalConditionModel(**unet_kwargs).train()
            if lora is not None:
                # peft moves new adapter weights with .to(), which fake parameters refuse: inject real (small)
                # adapter weights, then swap them for fake ones.
                with unset_fake_temporarily():
                    add_lora(unet, lora)
                for module in unet.modules():
                    for name, param in list(module._parameters.items()):  # noqa: SLF001 - replacing, not moving
                        if param is not None and not isinstance(param, FakeTensor):
                            module._parameters[name] = torch.nn.Parameter(torch.empty(param.shape, dtype=dtype))  # noqa: SLF001
        finally:
            torch.set_default_dtype(default_dtype)
        enable_activation_checkpointing(unet, checkpointing)
        for param in (p for p in unet.parameters() if p.requires_grad):
            param.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None))
        height, width = latent_hw
        sample = torch.randn(batch, frames, unet.config.in_channels, height, width, dtype=dtype)
        embeds = torch.randn(batch, 1, unet.config.cross_attention_dim, dtype=dtype)
        time_ids = torch.randn(batch, 3, dtype=dtype)
        tracker = LiveBytesTracker()
        with tracker:
            out = unet(sample, torch.ones(batch), encoder_hidden_states=embeds, added_time_ids=time_ids, return_dict=False)[0]
            out.float().square().mean().backward()
    return tracker.peak


def plan_memory(config: TrainConfig, gpus: int = 1, unet_kwargs: dict | None = None) -> MemoryPlan:
    """The plan for ``config`` on ``gpus`` GPUs (one process each). ``unet_kwargs`` replaces SVD's UNet config
    (the CPU validation uses a small one)."""
    if gpus < 1:
        raise ValueError(f"gpus must be >= 1, got {gpus}")
    if config.precision == "fp32":
        raise ValueError("precision: the memory plan models mixed precision (DeepSpeed's estimators assume 16-bit parameters); use bf16 or fp16")
    data, deepspeed = config.data, config.deepspeed
    unet_kwargs = {"num_frames": data.num_frames} if unet_kwargs is None else unet_kwargs
    lora = config.peft_lora()
    total, frozen, largest = parameter_counts(unet_kwargs, config.trained_parameters, lora)
    model_states = model_states_bytes(deepspeed, total, largest, gpus, frozen)
    sharded = deepspeed.zero_stage >= 1 and gpus > 1
    on_gpu = config.ema_decay > 0 and deepspeed.offload_optimizer == "none"  # with the optimizer offloaded the EMA is on the CPU
    ema = 4 * total / (gpus if sharded else 1) if on_gpu else 0
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[config.precision]
    activations = traced_activation_bytes(unet_kwargs, data.num_frames, (data.height // 8, data.width // 8),
                                          data.batch_size, dtype, config.activation_checkpointing, lora)
    encoders = 4 * (VAE_PARAMS + (IMAGE_ENCODER_PARAMS if data.latents_dir is None else 0))
    if deepspeed.zero_stage == 3:
        buffers = 2 * (REDUCE_BUCKET_ELEMENTS + PREFETCH_BUCKET_ELEMENTS)
    elif deepspeed.zero_stage >= 1:
        buffers = 2 * (REDUCE_BUCKET_ELEMENTS + ALLGATHER_BUCKET_ELEMENTS)
    else:
        buffers = 0
    overhead = CUDA_CONTEXT_GIB * GIB + buffers + ALLOCATOR_MARGIN * (activations + model_states)
    parts = [model_states, ema, activations, encoders, overhead]
    return MemoryPlan(
        per_gpu_peak_gib=round(sum(parts) / GIB, 2), model_states_gib=round(model_states / GIB, 2), ema_gib=round(ema / GIB, 2),
        activations_gib=round(activations / GIB, 2), frozen_encoders_gib=round(encoders / GIB, 2),
        overhead_gib=round(overhead / GIB, 2), zero_stage=deepspeed.zero_stage, gpus=gpus, trained_params=total,
        trained_parameters=config.trained_parameters,
        frames=data.num_frames, size=[data.height, data.width], activation_checkpointing=config.activation_checkpointing,
    )


def describe(plan: MemoryPlan) -> str:
    rows = [("model states (DeepSpeed estimator)", plan.model_states_gib), ("EMA (fp32, sharded like the masters)", plan.ema_gib),
            ("activations (traced fwd+bwd, flash attention)", plan.activations_gib), ("frozen VAE + CLIP (fp32)", plan.frozen_encoders_gib),
            ("overhead (CUDA context, comm buckets, allocator margin)", plan.overhead_gib)]
    lines = [f"memory plan: {plan.frames}x{plan.size[0]}x{plan.size[1]}, ZeRO-{plan.zero_stage}, {plan.gpus} GPU(s), "
             f"{plan.trained_params / 1e9:.3f}B trained parameters ({plan.trained_parameters}), activation checkpointing {plan.activation_checkpointing}"]
    lines += [f"  {name:<58} {value:8.2f} GiB" for name, value in rows]
    lines.append(f"  {'per-GPU peak':<58} {plan.per_gpu_peak_gib:8.2f} GiB")
    return "\n".join(lines)

