"""``optimize`` / ``restore``: svd_fast's kernels in a diffusers Stable Video Diffusion pipeline, in place.

What is patched (weights and state_dict keys stay the diffusers ones):

* every ResnetBlock2D / TemporalResnetBlock whose activation is SiLU: norm1+SiLU and norm2+SiLU run
  as one fused GroupNorm+SiLU (the block's forward is replaced on the instance, because diffusers also
  applies ``nonlinearity`` to the time embedding, so the activation module itself must stay);
* ``conv_norm_out`` + ``conv_act`` pairs (UNet output head, VAE encoder and temporal decoder heads):
  the norm becomes :class:`svd_fast.nn.FusedGroupNorm` with fused SiLU sharing the parameters, the SiLU an
  identity;
* the GroupNorm of every attention that has one (the VAE encoder's and temporal decoder's mid-block attention):
  :class:`svd_fast.nn.FusedGroupNorm` without activation, sharing the parameters, so that every GroupNorm of the
  VAE decode runs svd_fast's kernels;
* every cross-attention (spatial and temporal transformer blocks): SVD's context is one token, so
  attention is exactly ``to_out(to_v(ctx))`` (:class:`svd_fast.diffusers.attention_processors.SingleTokenCrossAttnProcessor`);
* every TemporalBasicTransformerBlock: :class:`svd_fast.diffusers.FusedTemporalBasicTransformerBlock`, which
  keeps the frame-major layout (no permute copies) and attends over frames with the fused
  ``temporal_attention`` op (the block object is swapped; its submodules are shared);
* the pipeline's denoising loop: the pipeline's class becomes the subclass from
  :mod:`svd_fast.diffusers.denoising_loop` whose ``__call__`` runs the fused input preparation, guidance and step
  (Euler, a second-order multistep sampler: ``sampler="ipndm-2"`` or ``"dpmpp-2m"``, or consistency sampling),
  optionally with step caching; the scheduler stays the pipeline's own diffusers scheduler (save_pretrained names
  it; consistency sampling needs an :class:`~svd_fast.diffusers.consistency_scheduler.SVDConsistencyScheduler`),
  and a scheduler the fused loop does not reproduce, swapped in later, runs diffusers' own loop;
* spatial self-attention: flash-attn (:class:`svd_fast.diffusers.attention_processors.FlashAttnSelfAttnProcessor`) when it
  is installed, else diffusers' default PyTorch SDPA (which itself picks the flash / cuDNN kernels on GPU);
* optionally (``cuda_graphs=True``) the UNet forward, captured as a CUDA graph and replayed
  (:class:`svd_fast.diffusers.cuda_graph.CUDAGraphedForward`).

:func:`restore` undoes each of these. ``dtype`` and ``channels_last`` (the 2-D convolutions' weights) convert
weights and are not undone. Each undo step is data, ``(function, *objects)``, not a closure: ``copy.deepcopy`` of
an optimized model copies the objects with it, so restoring the copy restores the copy, never the original.
"""

from __future__ import annotations

import logging
import types
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
from diffusers import EulerDiscreteScheduler, StableVideoDiffusionPipeline
from diffusers.models.attention import TemporalBasicTransformerBlock
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0
from diffusers.models.resnet import ResnetBlock2D, TemporalResnetBlock
from torch import nn

from svd_fast import backends
from svd_fast.diffusers.attention_processors import FlashAttnSelfAttnProcessor, SingleTokenCrossAttnProcessor
from svd_fast.diffusers.consistency_scheduler import SVDConsistencyScheduler
from svd_fast.diffusers.cuda_graph import DEFAULT_MAX_CAPTURES, CUDAGraphedForward
from svd_fast.diffusers.denoising_loop import fuse_denoising_loop, pop_attribute
from svd_fast.diffusers.settings import check_settings, resolve_attention
from svd_fast.diffusers.temporal_transformer_block import FusedTemporalBasicTransformerBlock, unsupported_reason
from svd_fast.nn.group_norm import FusedGroupNorm
from svd_fast.ops.group_norm import group_norm

LOGGER = logging.getLogger(__name__)

_UNDO_ATTRIBUTE = "_svd_fast_undo"
_REPORT_ATTRIBUTE = "_svd_fast_report"

# The diffusers forwards that this module re-implements (the _fused_* forwards and the fused temporal
# block), with the sha256 prefix of their source in the tested diffusers release:
# tests/test_diffusers_drift.py fails when upstream changes one, so the copy is re-read before release.
COPIED_FORWARDS: dict[str, str] = {
    "diffusers.models.resnet.ResnetBlock2D.forward": "e3f38e1722955caf",
    "diffusers.models.resnet.TemporalResnetBlock.forward": "05a7bbf4a3c8ad01",
    "diffusers.models.attention.TemporalBasicTransformerBlock.forward": "7eafa694dd59e03e",
    # denoising_loop.FusedDenoisingLoop.__call__ and step_cache.CachedUNetStep follow these two:
    "diffusers.pipelines.stable_video_diffusion.pipeline_stable_video_diffusion.StableVideoDiffusionPipeline.__call__": "dc8bf70786247eee",
    "diffusers.models.unets.unet_spatio_temporal_condition.UNetSpatioTemporalConditionModel.forward": "968edca6b909fb45",
}


def _silu_norm(norm: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    return group_norm(x, norm.num_groups, norm.weight, norm.bias, norm.eps, activation="silu")


def _fused_resnet2d_forward(self, input_tensor: torch.Tensor, temb: torch.Tensor | None, *args, **kwargs) -> torch.Tensor:
    """diffusers' ResnetBlock2D.forward (default time-embedding norm, no up/down-sampling) with fused norms."""
    hidden_states = self.conv1(_silu_norm(self.norm1, input_tensor))
    if self.time_emb_proj is not None:
        if not self.skip_time_act:
            temb = self.nonlinearity(temb)
        temb = self.time_emb_proj(temb)[:, :, None, None]
    if temb is not None:
        hidden_states = hidden_states + temb
    hidden_states = self.conv2(self.dropout(_silu_norm(self.norm2, hidden_states)))
    if self.conv_shortcut is not None:
        input_tensor = self.conv_shortcut(input_tensor)
    return (input_tensor + hidden_states) / self.output_scale_factor


def _fused_temporal_resnet_forward(self, input_tensor: torch.Tensor, temb: torch.Tensor | None) -> torch.Tensor:
    """diffusers' TemporalResnetBlock.forward with fused norms."""
    hidden_states = self.conv1(_silu_norm(self.norm1, input_tensor))
    if self.time_emb_proj is not None:
        temb = self.time_emb_proj(self.nonlinearity(temb))[:, :, :, None, None].permute(0, 2, 1, 3, 4)
        hidden_states = hidden_states + temb
    hidden_states = self.conv2(self.dropout(_silu_norm(self.norm2, hidden_states)))
    if self.conv_shortcut is not None:
        input_tensor = self.conv_shortcut(input_tensor)
    return input_tensor + hidden_states


def _is_silu(module: nn.Module | None) -> bool:
    return isinstance(module, nn.SiLU)


def _resnet_block_patch(module: nn.Module) -> Callable[..., torch.Tensor] | None:
    """The fused forward for ``module`` when it is a resblock configuration we reproduce exactly, else None."""

    norms_ok = isinstance(getattr(module, "norm1", None), nn.GroupNorm) and isinstance(getattr(module, "norm2", None), nn.GroupNorm)
    if not norms_ok or not _is_silu(getattr(module, "nonlinearity", None)):
        return None
    if isinstance(module, TemporalResnetBlock):
        return _fused_temporal_resnet_forward
    if isinstance(module, ResnetBlock2D) and module.upsample is None and module.downsample is None:
        if module.time_embedding_norm == "default":
            return _fused_resnet2d_forward
    return None


def _with_backend(forward: Callable[..., torch.Tensor], backend: str) -> Callable[..., torch.Tensor]:
    if backend == "auto":
        return forward

    def forced(self, *args, **kwargs):
        with backends.use_backend(backend):
            return forward(self, *args, **kwargs)

    return forced


def _patch_modules(root: nn.Module, backend: str, undo: list[tuple], report: Counter) -> None:

    for module in root.modules():
        fused_forward = _resnet_block_patch(module)
        if fused_forward is not None and "forward" not in vars(module):
            module.forward = types.MethodType(_with_backend(fused_forward, backend), module)
            undo.append((pop_attribute, module, "forward"))
            report[f"{type(module).__name__} (GroupNorm+SiLU fused)"] += 1
        norm, act = getattr(module, "conv_norm_out", None), getattr(module, "conv_act", None)
        if type(norm) is nn.GroupNorm and _is_silu(act):
            fused = FusedGroupNorm.from_torch(norm, activation="silu")
            if backend != "auto":
                fused.forward = types.MethodType(_with_backend(type(fused).forward, backend), fused)
            module.conv_norm_out, module.conv_act = fused, nn.Identity()
            undo.append((_set, module, {"conv_norm_out": norm, "conv_act": act}))
            report["conv_norm_out+conv_act (GroupNorm+SiLU fused)"] += 1
        if isinstance(module, Attention) and type(module.group_norm) is nn.GroupNorm:
            fused = FusedGroupNorm.from_torch(module.group_norm)
            if backend != "auto":
                fused.forward = types.MethodType(_with_backend(type(fused).forward, backend), fused)
            undo.append((_set, module, {"group_norm": module.group_norm}))
            module.group_norm = fused
            report["attention group_norm (svd_fast GroupNorm)"] += 1


def _patch_cross_attention(root: nn.Module, undo: list[tuple], report: Counter) -> None:


    for module in root.modules():
        if isinstance(module, Attention) and module.is_cross_attention:
            original = module.processor
            module.set_processor(SingleTokenCrossAttnProcessor(original))
            undo.append((_set_processor, module, original))
            report["cross-attention -> single-token shortcut to_out(to_v(ctx))"] += 1


def _patch_temporal_blocks(root: nn.Module, backend: str, undo: list[tuple], report: Counter) -> None:

    for parent in list(root.modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, TemporalBasicTransformerBlock):
                continue
            reason = unsupported_reason(child)
            if reason is not None:
                LOGGER.warning("svd_fast.optimize: temporal block %s left as it is: %s", name, reason)
                report["TemporalBasicTransformerBlock left unfused (see log)"] += 1
                continue
            fused = FusedTemporalBasicTransformerBlock.from_diffusers(child)
            if backend != "auto":
                fused.forward = types.MethodType(_with_backend(type(fused).forward, backend), fused)
            setattr(parent, name, fused)
            undo.append((setattr, parent, name, child))
            report["TemporalBasicTransformerBlock -> frame-major fused temporal attention"] += 1


def _patch_self_attention(root: nn.Module, undo: list[tuple], report: Counter) -> None:
    """flash-attn for every self-attention still on diffusers' default processor, except the temporal
    attentions that the fused temporal blocks compute themselves."""


    fused_temporal = {id(m.attn1) for m in root.modules() if isinstance(m, FusedTemporalBasicTransformerBlock)}
    for module in root.modules():
        if not isinstance(module, Attention) or module.is_cross_attention or id(module) in fused_temporal:
            continue
        if type(module.processor) in (AttnProcessor, AttnProcessor2_0):
            original = module.processor
            module.set_processor(FlashAttnSelfAttnProcessor(original))
            undo.append((_set_processor, module, original))
            report["self-attention -> flash-attn"] += 1


def _capture_cuda_graphs(unet: nn.Module, max_captures: int, undo: list[tuple], report: Counter) -> None:

    unet.forward = CUDAGraphedForward(unet.forward, max_captures)
    undo.append((pop_attribute, unet, "forward"))
    report["UNet forward -> CUDA graph capture and replay"] += 1


def _set(module: nn.Module, attributes: dict[str, nn.Module]) -> None:
    for name, value in attributes.items():
        setattr(module, name, value)


def _set_processor(module: nn.Module, processor: Any) -> None:
    module.set_processor(processor)


def _set_chunking(previous: list[tuple[nn.Module, int | None, int]]) -> None:
    for module, size, dim in previous:
        module.set_chunk_feed_forward(chunk_size=size, dim=dim)


def _is_pipeline(target: Any) -> bool:
    return hasattr(target, "unet") and hasattr(target, "vae") and hasattr(target, "scheduler")


def _has_patch_targets(module: nn.Module) -> bool:
    return any(isinstance(m, (ResnetBlock2D, TemporalResnetBlock, TemporalBasicTransformerBlock, Attention)) for m in module.modules())


def _patched_by_svd_fast(module: nn.Module) -> bool:
    """Whether some submodule already carries one of optimize()'s patches (e.g. the UNet of an optimized
    pipeline): patching it again would wrap processors twice."""
    for m in module.modules():
        if isinstance(m, (FusedTemporalBasicTransformerBlock, FusedGroupNorm)) or isinstance(
            getattr(m, "processor", None), (SingleTokenCrossAttnProcessor, FlashAttnSelfAttnProcessor)
        ):
            return True
        if _resnet_block_patch(m) is not None and "forward" in vars(m):
            return True
    return False


def _check_target(target: Any, scheduler: bool) -> bool:
    """Raise TypeError/ValueError for what optimize() cannot patch; True for a pipeline, False for a module."""
    is_pipeline = _is_pipeline(target)
    if is_pipeline:
        if not isinstance(target, StableVideoDiffusionPipeline):
            raise TypeError(f"optimize: target must be a StableVideoDiffusionPipeline, got {type(target).__name__}")
        if scheduler and not isinstance(target.scheduler, SVDConsistencyScheduler):
            config = target.scheduler.config
            if not isinstance(target.scheduler, EulerDiscreteScheduler) or config.get("prediction_type") != "v_prediction":
                raise ValueError(
                    f"optimize: the fused sampling needs SVD's v-prediction EulerDiscreteScheduler or an "
                    f"SVDConsistencyScheduler, but the pipeline has {type(target.scheduler).__name__} "
                    f"(prediction_type={config.get('prediction_type')!r}); pass scheduler=False to keep it and patch only the models"
                )
        models = (target.unet, target.vae)
    elif isinstance(target, nn.Module):
        if not _has_patch_targets(target):
            raise TypeError(
                f"optimize: {type(target).__name__} holds no diffusers resblock, attention or temporal transformer block "
                "to optimize; pass a StableVideoDiffusionPipeline, its UNet or its VAE"
            )
        models = (target,)
    else:
        raise TypeError(f"optimize: expected a StableVideoDiffusionPipeline or a torch.nn.Module, got {type(target).__name__}")
    for model in models:
        if _patched_by_svd_fast(model):
            raise ValueError(
                f"optimize: {type(model).__name__} is already optimized (as part of its pipeline or on its own); "
                "call svd_fast.restore on what was optimized first"
            )
    return is_pipeline


def _enable_forward_chunking(unet: nn.Module, undo: list[tuple], report: Counter) -> None:
    """Feed-forward chunking over the batch dimension; undone by giving each block back its own setting
    (diffusers has no disable_forward_chunking for this UNet)."""
    blocks = [m for m in unet.modules() if hasattr(m, "set_chunk_feed_forward")]
    previous = [(m, getattr(m, "_chunk_size", None), getattr(m, "_chunk_dim", 0)) for m in blocks]
    for block in blocks:
        block.set_chunk_feed_forward(chunk_size=1, dim=0)
    undo.append((_set_chunking, previous))
    report["UNet feed-forward chunking"] += 1


def _settings(**settings: Any) -> dict[str, Any]:
    return {key: str(value) if isinstance(value, torch.dtype) else value for key, value in settings.items()}


def optimize(
    target: Any,
    backend: str = "auto",
    dtype: str | torch.dtype | None = None,
    channels_last: bool = False,
    low_memory: bool = False,
    scheduler: bool = True,
    attention: str = "auto",
    cuda_graphs: bool = False,
    sampler: str = "auto",
    cache_interval: int = 1,
    cuda_graph_cache: int = DEFAULT_MAX_CAPTURES,
) -> Any:
    """Patch ``target`` (a StableVideoDiffusionPipeline, or a bare UNet / VAE / any module holding diffusers
    resblocks) in place with svd_fast's kernels and return it. Undo with :func:`restore`.

    The target is checked before anything changes, and an exception partway undoes every patch made so far.
    Optimizing an optimized target with the same arguments returns it unchanged; with other arguments it
    is a ValueError (restore first).

    ``backend``: "auto" or one of svd_fast.backends.BACKENDS, forced for every patched op.
    ``dtype``: "fp16"/"bf16"/"fp32" or a torch dtype to convert the weights to (not undone).
    ``channels_last``: convert the UNet (and VAE) convolutions' memory format (not undone).
    ``low_memory``: feed-forward chunking in the UNet, and model CPU offload when CUDA is present.
    ``scheduler``: fused sampling (pipelines only): the fused denoising loop (input preparation, guidance and step
    as svd_fast ops). Needs SVD's v-prediction EulerDiscreteScheduler or an SVDConsistencyScheduler.
    ``attention``: spatial self-attention through "flash-attn" (the optional package; an error if it is not
    installed), "sdpa" (diffusers' default, PyTorch's scaled_dot_product_attention), or "auto" (flash-attn
    when installed, else SDPA).
    ``cuda_graphs``: capture the UNet forward as a CUDA graph per input shape and replay it (inference on
    CUDA; needs a CUDA device; not with ``low_memory``, whose offload moves weights between calls).
    ``cuda_graph_cache``: with ``cuda_graphs``, how many input shapes stay captured (least recently used
    evicted; each capture keeps about one forward's activations on the device).
    ``sampler``: "auto" (the default: "consistency" when the pipeline's scheduler is an
    :class:`~svd_fast.diffusers.consistency_scheduler.SVDConsistencyScheduler`, else "euler"), "consistency" (few-step
    consistency sampling, :mod:`svd_fast.sampling.consistency`, for AnimateLCM-SVD-xt and ``svd-fast distill``
    students; an Euler pipeline gets AnimateLCM-SVD-xt's scheduler config), "euler" (SVD's, the stock result), "ipndm-2" (second-order Adams-Bashforth in sigma: at 15
    steps the ODE accuracy of Euler at 25) or "dpmpp-2m" (DPM-Solver++(2M)); one UNet call per step each, see
    :mod:`svd_fast.sampling.samplers` and bench/RESULTS.md. Pipelines with ``scheduler`` only.
    ``cache_interval``: N > 1 runs the full UNet every N-th step only and, in between, just its outermost
    level on the deep features kept from the last full step (DeepCache; faster, and a small deviation from
    the uncached result, see :mod:`svd_fast.diffusers.step_cache`). 1: off.
    """
    is_pipeline = _is_pipeline(target)
    dtype = check_settings(
        backend=backend, dtype=dtype, low_memory=low_memory, attention=attention, cuda_graphs=cuda_graphs,
        sampler=sampler, cache_interval=cache_interval, fused_sampling=is_pipeline and scheduler,
    )  # fmt: skip
    if isinstance(cuda_graph_cache, bool) or not isinstance(cuda_graph_cache, int) or cuda_graph_cache < 1:
        raise ValueError(f"optimize: cuda_graph_cache must be a positive integer, got {cuda_graph_cache!r}")
    settings = _settings(
        backend=backend, dtype=dtype, channels_last=channels_last, low_memory=low_memory, scheduler=scheduler,
        attention=attention, cuda_graphs=cuda_graphs, sampler=sampler, cache_interval=cache_interval,
        cuda_graph_cache=cuda_graph_cache,
    )  # fmt: skip
    if getattr(target, _UNDO_ATTRIBUTE, None):
        if getattr(target, _REPORT_ATTRIBUTE, {}).get("settings") == settings:
            return target
        raise ValueError("optimize: target is already optimized with other arguments; call svd_fast.restore(target) first")
    attention = resolve_attention(attention)
    _check_target(target, scheduler)
    if sampler == "auto":
        sampler = "consistency" if is_pipeline and scheduler and isinstance(target.scheduler, SVDConsistencyScheduler) else "euler"
    undo: list[tuple] = []
    report: Counter = Counter()
    try:
        _apply(target, is_pipeline, backend, dtype, channels_last, low_memory, scheduler, attention, cuda_graphs, sampler, cache_interval,
               cuda_graph_cache, undo, report)
    except BaseException:
        _run_undo(undo)
        raise
    setattr(target, _UNDO_ATTRIBUTE, undo)
    setattr(target, _REPORT_ATTRIBUTE, {"backend": backend, "attention": attention, "patched": dict(report), "settings": settings})
    LOGGER.info("svd_fast.optimize: %s", dict(report))
    return target


def _apply(target, is_pipeline, backend, dtype, channels_last, low_memory, scheduler, attention, cuda_graphs, sampler, cache_interval,
           cuda_graph_cache, undo, report) -> None:
    models = [target.unet, target.vae] if is_pipeline else [target]
    if dtype is not None:
        target.to(dtype=dtype)
    for model in models:
        if channels_last:  # 2-D convolutions only: the temporal layers' 5-D weights have no channels-last format
            for conv in model.modules():
                if isinstance(conv, nn.Conv2d):
                    conv.to(memory_format=torch.channels_last)
        _patch_modules(model, backend, undo, report)
        _patch_cross_attention(model, undo, report)
        _patch_temporal_blocks(model, backend, undo, report)
        if attention == "flash-attn":
            _patch_self_attention(model, undo, report)
    if is_pipeline and scheduler:
        fuse_denoising_loop(target, backend, sampler, cache_interval, undo, report)
    if low_memory:
        _enable_forward_chunking(target.unet if is_pipeline else target, undo, report)
        if is_pipeline and torch.cuda.is_available():
            target.enable_model_cpu_offload()
            undo.append((target.remove_all_hooks,))
            report["model CPU offload"] += 1
    if cuda_graphs:
        _capture_cuda_graphs(target.unet if is_pipeline else target, cuda_graph_cache, undo, report)


def _run_undo(undo: list[tuple]) -> None:
    for function, *objects in reversed(undo):
        function(*objects)


def restore(target: Any) -> Any:
    """Undo :func:`optimize` on ``target`` (modules, forwards and scheduler return to the originals)."""
    undo = getattr(target, _UNDO_ATTRIBUTE, None)
    if not undo:
        raise ValueError("restore: target was not optimized by svd_fast.optimize")
    _run_undo(undo)
    delattr(target, _UNDO_ATTRIBUTE)
    delattr(target, _REPORT_ATTRIBUTE)
    return target


def describe(target: Any) -> dict[str, Any]:
    """What :func:`optimize` patched in ``target``: backend, self-attention path, a count per kind of patch
    and the arguments it was called with ({} if not optimized)."""
    return dict(getattr(target, _REPORT_ATTRIBUTE, {}))
