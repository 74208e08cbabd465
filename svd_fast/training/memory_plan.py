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
- vae_encode: the trainer's own encoding (svd_fast.training.objective.encode_posterior) of a batch, traced the
  same way with SVD's AutoencoderKLTemporalDecoder in the VAE's training dtype: every frame, ``data.vae_encode_chunk``
  at a time, when data is encoded on the fly; the conditioning frames only with precomputed latents.
- validation (with ``validation.every``): the sampling copies (UNet and VAE in the training precision, the image
  encoder when it lives on the CPU) plus the larger of one guided sampling step (the UNet's forward at batch 2,
  the validation frames) and diffusers' chunked decode (StableVideoDiffusionPipeline.decode_latents with
  ``validation.decode_chunk``), both traced.
- frozen_encoders: the VAE (SVD's temporal-decoder VAE, counted on the meta device) and CLIP image encoder the
  trainer keeps on the GPU in the training precision (with precomputed latents only the VAE).
- zero_buffers: DeepSpeed's reduce and all-gather (ZeRO 1-2) or reduce and prefetch buckets (ZeRO-3), 16-bit, at
  the config's sizes (DeepSpeed's defaults when unset) but never larger than the trained parameters; ZeRO-3 adds
  its gathered parameters, ``stage3_max_live_parameters`` of them (16-bit).
- cuda_context, nccl, workspaces: estimates, their sources at CUDA_CONTEXT_GIB, NCCL_GIB and WORKSPACES_GIB.
- fragmentation: FRAGMENTATION of the model states and of the step's largest transient (the caching allocator's
  reserved-but-unused blocks).
The transients (activations, vae_encode, validation) come one after another, so the peak holds the largest:
per_gpu_peak = model_states + ema + frozen_encoders + zero_buffers + cuda_context + nccl + workspaces
               + max(transients) + fragmentation.
"""

from __future__ import annotations

import functools
import weakref
from dataclasses import asdict, dataclass
from types import SimpleNamespace
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode, unset_fake_temporarily
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from svd_fast.training.activation_checkpointing import enable_activation_checkpointing
from svd_fast.training.config import DeepSpeedSection, TrainConfig
from svd_fast.training.deepspeed_import import import_deepspeed
from svd_fast.training.lora import add_lora
from svd_fast.training.objective import encode_posterior
from svd_fast.training.setup import COMPUTE_DTYPES, select_trained_parameters, vae_dtype

GIB = 2**30
# A CUDA 12 context with lazy module loading (PyTorch's default) and the kernels a training step loads: the usual
# nvidia-smi reading of a PyTorch process with nothing allocated is 0.3-0.6 GiB on A100/H100; the top is planned.
CUDA_CONTEXT_GIB = 0.6
# NCCL's buffers with more than one GPU: NCCL_BUFFSIZE (4 MiB, NCCL's documented default) per channel, per
# direction, for ring and tree, with up to 32 channels on an NVLink node: 4 MiB x 32 x 2 x 2.
NCCL_GIB = 0.5
# cuBLAS (PyTorch's CUBLAS_WORKSPACE_CONFIG default on Hopper, :4096:8 = 32 MiB) and cuDNN convolution workspaces
# (cudnn.benchmark off: the heuristics' algorithms for the VAE's and UNet's 3x3 convolutions; estimate).
WORKSPACES_GIB = 0.5 + 32 / 1024
# The caching allocator's reserved-but-unused memory (expandable_segments off): an estimate, checked by the first
# GPU run against train_log.jsonl's memory_reserved_mb and bench/gpu_check.py's train_memory stage.
FRAGMENTATION = 0.10
IMAGE_ENCODER_PARAMS = 632_076_800  # CLIPVisionModelWithProjection ViT-H/14 (svd_fast.diffusers.full_size.SVD_CLIP_CONFIG)
GUIDED_BATCH = 2  # validation samples with classifier-free guidance: the UNet sees the batch twice


@dataclass
class MemoryPlan:
    per_gpu_peak_gib: float
    model_states_gib: float
    ema_gib: float
    activations_gib: float
    vae_encode_gib: float
    validation_gib: float  # counted in the peak only with validate_every
    frozen_encoders_gib: float
    zero_buffers_gib: float
    cuda_context_gib: float
    nccl_gib: float
    workspaces_gib: float
    fragmentation_gib: float
    overhead_gib: float  # zero_buffers + cuda_context + nccl + workspaces + fragmentation
    target_gpu_gib: float | None
    margin: float | None  # 1 - per_gpu_peak / target_gpu_gib
    zero_stage: int
    gpus: int
    trained_params: int
    vae_params: int
    trained_parameters: str
    frames: int
    size: list[int]
    activation_checkpointing: str
    vae_encode_chunk: int
    validation: bool
    validation_decode_chunk: int

    def to_dict(self) -> dict:
        return asdict(self)


@functools.cache
def vae_parameter_count() -> int:
    """Parameters of SVD's VAE (AutoencoderKLTemporalDecoder: image encoder and temporal decoder), on the meta device."""
    from diffusers import AutoencoderKLTemporalDecoder  # noqa: PLC0415 - diffusers loads only when a model is built

    from svd_fast.diffusers.full_size import SVD_VAE_CONFIG  # noqa: PLC0415 - imports diffusers and transformers

    with torch.device("meta"):
        return sum(p.numel() for p in AutoencoderKLTemporalDecoder(**SVD_VAE_CONFIG).parameters())


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


def _built(build, dtype: torch.dtype) -> torch.nn.Module:
    """``build()`` with ``dtype`` as the default dtype (under FakeTensorMode: a .to() of fake parameters would swap them)."""
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        return build()
    finally:
        torch.set_default_dtype(default_dtype)


def traced_activation_bytes(unet_kwargs: dict, frames: int, latent_hw: tuple[int, int], batch: int, dtype: torch.dtype,
                            checkpointing: str, lora: Any = None) -> int:
    """Peak activation bytes of one forward + backward of the UNet, traced on fake tensors (parameters and
    inputs are made before tracking starts, so they are not counted). With ``lora`` (a peft LoraConfig) the
    adapters are injected and only they are trained, as in the trainer: frozen layers save no inputs for
    weight gradients."""
    from diffusers import UNetSpatioTemporalConditionModel  # noqa: PLC0415 - diffusers loads only when a model is built

    with FakeTensorMode():
        unet = _built(lambda: UNetSpatioTemporalConditionModel(**unet_kwargs).train(), dtype)
        if lora is not None:
            # peft moves new adapter weights with .to(), which fake parameters refuse: inject real (small)
            # adapter weights, then swap them for fake ones.
            with unset_fake_temporarily():
                add_lora(unet, lora)
            for module in unet.modules():
                for name, param in list(module._parameters.items()):  # noqa: SLF001 - replacing, not moving
                    if param is not None and not isinstance(param, FakeTensor):
                        module._parameters[name] = torch.nn.Parameter(torch.empty(param.shape, dtype=dtype))  # noqa: SLF001
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


def traced_sampling_step_bytes(unet_kwargs: dict, frames: int, latent_hw: tuple[int, int], batch: int, dtype: torch.dtype) -> int:
    """Peak bytes of one UNet forward without gradients (a sampling step at ``batch``, guided sampling's doubled
    batch), its inputs included, traced as :func:`traced_activation_bytes`."""
    from diffusers import UNetSpatioTemporalConditionModel  # noqa: PLC0415 - diffusers loads only when a model is built

    with FakeTensorMode():
        unet = _built(lambda: UNetSpatioTemporalConditionModel(**unet_kwargs).eval(), dtype)
        tracker = LiveBytesTracker()
        with torch.no_grad(), tracker:
            sample = torch.randn(batch, frames, unet.config.in_channels, *latent_hw, dtype=dtype)
            embeds = torch.randn(batch, 1, unet.config.cross_attention_dim, dtype=dtype)
            unet(sample, torch.ones(batch), encoder_hidden_states=embeds, added_time_ids=torch.randn(batch, 3, dtype=dtype), return_dict=False)
    return tracker.peak


def traced_vae_bytes(images: int, size: tuple[int, int], dtype: torch.dtype, chunk: int, decode: bool = False) -> int:
    """Peak bytes of SVD's VAE (in ``dtype``, traced as :func:`traced_activation_bytes`, the inputs included)
    encoding ``images`` fp32 images of ``size`` ``chunk`` at a time as the trainer does (encode_posterior), or with
    ``decode`` decoding ``images`` frames' latents ``chunk`` at a time as diffusers' pipeline does
    (StableVideoDiffusionPipeline.decode_latents, the fp32 video included)."""
    from diffusers import AutoencoderKLTemporalDecoder, StableVideoDiffusionPipeline  # noqa: PLC0415 - diffusers loads only when a model is built

    from svd_fast.diffusers.full_size import SVD_VAE_CONFIG  # noqa: PLC0415 - imports diffusers and transformers

    height, width = size
    with FakeTensorMode():
        vae = _built(lambda: AutoencoderKLTemporalDecoder(**SVD_VAE_CONFIG).eval(), dtype)
        tracker = LiveBytesTracker()
        with torch.no_grad(), tracker:
            if decode:
                latents = torch.randn(1, images, vae.config.latent_channels, height // 8, width // 8, dtype=dtype)
                StableVideoDiffusionPipeline.decode_latents(SimpleNamespace(vae=vae), latents, images, chunk)
            else:
                encode_posterior(torch.randn(images, 3, height, width), vae, chunk)
    return tracker.peak


_TRACES: dict[tuple[Any, str], int] = {}


def _traced(name: str, *args: Any) -> int:
    """``name``'s trace for ``args``, once per process (plans of configs that share a shape share their traces)."""
    key = (globals()[name], repr(args))
    if key not in _TRACES:
        _TRACES[key] = key[0](*args)
    return _TRACES[key]


def zero_buffer_bytes(config: TrainConfig, trained: int, total: int) -> int:
    """DeepSpeed's communication buckets (16-bit, at most the trained parameters each) and, for ZeRO-3, its
    gathered parameters (``stage3_max_live_parameters``, at most the whole model)."""
    if config.deepspeed.zero_stage == 0:
        return 0
    second = "stage3_prefetch_bucket_size" if config.deepspeed.zero_stage == 3 else "allgather_bucket_size"
    buckets = sum(min(config.zero_setting(name), trained) for name in ("reduce_bucket_size", second))
    live = min(config.zero_setting("stage3_max_live_parameters"), total) if config.deepspeed.zero_stage == 3 else 0
    return 2 * (buckets + live)


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
    dtype = COMPUTE_DTYPES[config.precision]
    vae_type = vae_dtype(config.precision, force_upcast=True)  # SVD's VAE config sets force_upcast
    size, latent_hw = (data.height, data.width), (data.height // 8, data.width // 8)
    activations = _traced("traced_activation_bytes", unet_kwargs, data.num_frames, latent_hw, data.batch_size, dtype,
                          config.activation_checkpointing, lora)
    # On the fly every frame is encoded, chunk by chunk; with precomputed latents only the conditioning frames.
    images = data.batch_size * (data.num_frames if data.latents_dir is None else 1)
    encode_chunk = config.encode_chunk() if data.latents_dir is None else images
    vae_encode = _traced("traced_vae_bytes", images, size, vae_type, encode_chunk)
    vae_params, clip_bytes = vae_parameter_count(), IMAGE_ENCODER_PARAMS * dtype.itemsize
    encoders = vae_params * vae_type.itemsize + (clip_bytes if data.latents_dir is None else 0)
    frames = config.validation_num_frames
    sampling = _traced("traced_sampling_step_bytes", unet_kwargs, frames, latent_hw, GUIDED_BATCH, dtype)
    decoding = _traced("traced_vae_bytes", frames, size, vae_type, config.decode_chunk(), True)
    copies = (total + frozen) * dtype.itemsize + vae_params * vae_type.itemsize + (clip_bytes if data.latents_dir is not None else 0)
    validation = copies + max(sampling, decoding)
    transient = max(activations, vae_encode, validation if config.validation.every else 0)
    zero_buffers = zero_buffer_bytes(config, total, total + frozen)
    nccl = NCCL_GIB * GIB if gpus > 1 else 0
    fragmentation = FRAGMENTATION * (model_states + transient)
    fixed = [CUDA_CONTEXT_GIB * GIB, nccl, WORKSPACES_GIB * GIB, zero_buffers, fragmentation]
    peak = round((model_states + ema + encoders + transient + sum(fixed)) / GIB, 2)
    target = config.target_gpu_gib
    gib = lambda value: round(value / GIB, 2)  # noqa: E731
    return MemoryPlan(
        per_gpu_peak_gib=peak, model_states_gib=gib(model_states), ema_gib=gib(ema), activations_gib=gib(activations),
        vae_encode_gib=gib(vae_encode), validation_gib=gib(validation), frozen_encoders_gib=gib(encoders),
        zero_buffers_gib=gib(zero_buffers), cuda_context_gib=CUDA_CONTEXT_GIB, nccl_gib=gib(nccl), workspaces_gib=round(WORKSPACES_GIB, 2),
        fragmentation_gib=gib(fragmentation), overhead_gib=gib(sum(fixed)), target_gpu_gib=target,
        margin=None if target is None else round(1 - peak / target, 3), zero_stage=deepspeed.zero_stage, gpus=gpus, trained_params=total,
        vae_params=vae_params, trained_parameters=config.trained_parameters, frames=data.num_frames, size=[data.height, data.width],
        activation_checkpointing=config.activation_checkpointing, vae_encode_chunk=encode_chunk,
        validation=bool(config.validation.every), validation_decode_chunk=config.decode_chunk(),
    )


def describe(plan: MemoryPlan) -> str:
    transient = "counted" if plan.validation else "not counted: validate_every is 0"
    rows = [
        ("model states (DeepSpeed estimator)", plan.model_states_gib),
        ("EMA (fp32, sharded like the masters)", plan.ema_gib),
        ("frozen VAE + CLIP (training precision)", plan.frozen_encoders_gib),
        ("ZeRO buckets + ZeRO-3 gathered parameters (config)", plan.zero_buffers_gib),
        ("CUDA context (estimate, CUDA_CONTEXT_GIB)", plan.cuda_context_gib),
        ("NCCL buffers (estimate, NCCL_BUFFSIZE x channels)", plan.nccl_gib),
        ("cuBLAS + cuDNN workspaces (estimate)", plan.workspaces_gib),
        ("allocator fragmentation (estimate, 10%)", plan.fragmentation_gib),
        ("transient, the largest of:", None),
        ("  activations (traced fwd+bwd, flash attention)", plan.activations_gib),
        (f"  vae_encode (traced, {plan.vae_encode_chunk} frames at a time)", plan.vae_encode_gib),
        (f"  validation (traced sampling + {plan.validation_decode_chunk}-frame decode; {transient})", plan.validation_gib),
    ]
    lines = [f"memory plan: {plan.frames}x{plan.size[0]}x{plan.size[1]}, ZeRO-{plan.zero_stage}, {plan.gpus} GPU(s), "
             f"{plan.trained_params / 1e9:.3f}B trained parameters ({plan.trained_parameters}), activation checkpointing {plan.activation_checkpointing}"]
    lines += [f"  {name:<70}" + ("" if value is None else f" {value:8.2f} GiB") for name, value in rows]
    lines.append(f"  {'per-GPU peak':<70} {plan.per_gpu_peak_gib:8.2f} GiB")
    if plan.target_gpu_gib is not None:
        lines.append(f"  {'target_gpu_gib (margin)':<70} {plan.target_gpu_gib:8.2f} GiB ({plan.margin:.0%})")
    return "\n".join(lines)
