"""Fused EDM sampling ops for SVD's v-prediction denoiser: the public API.

* :func:`edm_euler_step`: classifier-free guidance per frame + v-prediction denoiser + Euler step,
  one pass over memory (reads x, uncond, cond; writes x_next, optionally the denoised estimate).
* :func:`edm_prepare_model_input`: c_in scaling + channel concat with the conditioning latents +
  CFG batch doubling (unconditional half first, with zero conditioning latents, as diffusers' pipeline).

Each checks its arguments, picks a backend (see :mod:`svd_fast.backends`) and runs it. The compiled
backends are torch ops (``torch.ops.svd_fast.edm_*`` from C++/CUDA, ``torch.ops.svd_fast.edm_*_triton``
from Triton); what each backend accepts is declared here to :mod:`svd_fast.backends`. Sampling only: no autograd formula is
registered and the outputs must not be differentiated.

Math runs in float32 for float32/float16/bfloat16 storage (float64 on the reference backend for
float64 input, used as ground truth in tests). Pass sigmas as Python floats (diffusers keeps its
sigmas on the CPU for the same reason: a CUDA scalar would cost a device sync per step).
"""

from __future__ import annotations

import math

import torch

from svd_fast import _extension, _triton, backends
from svd_fast.ops._library import extension_cuda_unavailable, extension_unavailable, triton_unavailable
from svd_fast.reference import edm_step as reference

EULER_OP_NAME = "edm_euler_step"
PREPARE_OP_NAME = "edm_prepare_model_input"
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
FLOAT32_MATH_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _compiled_euler_step(*args):
    return torch.ops.svd_fast.edm_euler_step(*args)


def _triton_euler_step(*args):
    return torch.ops.svd_fast.edm_euler_step_triton(*args)


def _compiled_prepare_model_input(*args):
    return torch.ops.svd_fast.edm_prepare_model_input(*args)


def _triton_prepare_model_input(*args):
    return torch.ops.svd_fast.edm_prepare_model_input_triton(*args)


# The compiled and Triton kernels compute in float32 and do not take float64 input.
for _op_name, _reference, _compiled, _triton_op in (
    (EULER_OP_NAME, reference.edm_euler_step, _compiled_euler_step, _triton_euler_step),
    (PREPARE_OP_NAME, reference.edm_prepare_model_input, _compiled_prepare_model_input, _triton_prepare_model_input),
):
    backends.register(_op_name, "reference", _reference, devices=("cpu", "cuda"), dtypes=SUPPORTED_DTYPES, priority={"cpu": 1, "cuda": 2})
    backends.register(_op_name, "cpu", _compiled, devices=("cpu",), dtypes=FLOAT32_MATH_DTYPES, priority={"cpu": 0}, probe=extension_unavailable)
    backends.register(_op_name, "cuda", _compiled, devices=("cuda",), dtypes=FLOAT32_MATH_DTYPES, priority={"cuda": 1}, probe=extension_cuda_unavailable)
    backends.register(_op_name, "triton", _triton_op, devices=("cuda", "cpu"), dtypes=FLOAT32_MATH_DTYPES, priority={"cuda": 0}, probe=triton_unavailable)

GuidanceLike = torch.Tensor | float | None


def edm_euler_step(
    x: torch.Tensor,
    model_out_uncond: torch.Tensor,
    model_out_cond: torch.Tensor | None,
    sigma: float,
    sigma_next: float,
    guidance: GuidanceLike,
    return_denoised: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """One Euler step of EDM v-prediction sampling with per-frame classifier-free guidance.

    ``x``: noisy latents (B, F, C, H, W) at noise level ``sigma`` (diffusers' latent layout).
    ``model_out_uncond`` / ``model_out_cond``: the raw UNet outputs of the unconditional and the
    conditional half, same shape as x; typically the two halves ``out.chunk(2)`` of the UNet's (2B, ...)
    output, read in place (no copy). With ``model_out_cond=None`` there is no guidance and
    ``model_out_uncond`` is used as the model output as is.
    ``guidance``: the weight w per frame, shape (F,), (B, F) or diffusers' (B, F, 1, 1, 1), or a float;
    only with ``model_out_cond``. guided = u + w * (c - u).
    Returns x_next (dtype of x), and the denoised estimate D too when ``return_denoised``:
        D = c_skip(sigma) * x + c_out(sigma) * guided,  x_next = x + (x - D) / sigma * (sigma_next - sigma).
    Not differentiable (sampling only).
    """
    _check_latents(EULER_OP_NAME, x, "x")
    _check_like(EULER_OP_NAME, x, model_out_uncond, "model_out_uncond")
    if model_out_cond is not None:
        _check_like(EULER_OP_NAME, x, model_out_cond, "model_out_cond")
    sigma = _as_float(EULER_OP_NAME, "sigma", sigma, minimum=0.0, inclusive=False)
    sigma_next = _as_float(EULER_OP_NAME, "sigma_next", sigma_next, minimum=0.0, inclusive=True)
    guidance_2d = _guidance_2d(x, model_out_cond, guidance)
    if not isinstance(return_denoised, bool):
        raise TypeError(f"{EULER_OP_NAME}: return_denoised must be a bool, got {type(return_denoised).__name__}")

    entry = backends.select_backend(EULER_OP_NAME, x)
    x_next, denoised = entry.implementation(x, model_out_uncond, model_out_cond, sigma, sigma_next, guidance_2d, return_denoised)
    return (x_next, denoised) if return_denoised else x_next


def edm_prepare_model_input(
    x: torch.Tensor, cond_latents: torch.Tensor, sigma: float, do_cfg: bool
) -> torch.Tensor:
    """The UNet input of one SVD sampling step, in one pass.

    ``x``: noisy latents (B, F, C, H, W) at noise level ``sigma``; ``cond_latents``: the conditioning
    frame's latents, (B, F, C_cond, H, W), (B, 1, C_cond, H, W) or (B, C_cond, H, W) (the last two are
    read once per frame without being repeated in memory), same dtype as x.
    Returns cat([c_in * x, cond_latents], dim=2), c_in = 1 / sqrt(sigma^2 + 1), of shape
    (B, F, C + C_cond, H, W); with ``do_cfg`` the batch is doubled to 2B, the unconditional half first
    with zero conditioning latents (the order of diffusers' StableVideoDiffusionPipeline).
    Not differentiable (sampling only).
    """
    _check_latents(PREPARE_OP_NAME, x, "x")
    cond = _broadcast_cond_latents(x, cond_latents)
    sigma = _as_float(PREPARE_OP_NAME, "sigma", sigma, minimum=0.0, inclusive=True)
    if not isinstance(do_cfg, bool):
        raise TypeError(f"{PREPARE_OP_NAME}: do_cfg must be a bool, got {type(do_cfg).__name__}")

    return backends.select_backend(PREPARE_OP_NAME, x).implementation(x, cond, sigma, do_cfg)


# --- argument checks ---------------------------------------------------------------------------


def _check_latents(op: str, t: object, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 5:
        raise ValueError(f"{op}: {name} must be 5-D (B, F, C, H, W), got shape {tuple(t.shape)}")
    if t.numel() == 0:
        raise ValueError(f"{op}: {name} must not be empty, got shape {tuple(t.shape)}")
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{op}: {name} dtype must be one of {SUPPORTED_DTYPES}, got {t.dtype}")


def _check_like(op: str, x: torch.Tensor, t: object, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.shape != x.shape:
        raise ValueError(f"{op}: {name} shape {tuple(t.shape)} must equal x shape {tuple(x.shape)}")
    if t.dtype != x.dtype:
        raise TypeError(f"{op}: {name} dtype {t.dtype} must equal x dtype {x.dtype}")
    if t.device != x.device:
        raise ValueError(f"{op}: {name} is on {t.device} but x is on {x.device}")


def _as_float(op: str, name: str, value: object, minimum: float, inclusive: bool) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{op}: {name} must be a number or a one-element tensor, got shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{op}: {name} must be a float, got {type(value).__name__}")
    value = float(value)
    ok = math.isfinite(value) and (value >= minimum if inclusive else value > minimum)
    if not ok:
        relation = ">=" if inclusive else ">"
        raise ValueError(f"{op}: {name} must be finite and {relation} {minimum}, got {value!r}")
    return value


def _guidance_2d(x: torch.Tensor, model_out_cond: torch.Tensor | None, guidance: GuidanceLike) -> torch.Tensor | None:
    """guidance as a float32 (B, F) tensor on x's device (a broadcast view when given per frame)."""
    batch, frames = x.shape[:2]
    if model_out_cond is None:
        if guidance is not None:
            raise ValueError(f"{EULER_OP_NAME}: guidance is only used with model_out_cond; pass guidance=None without it")
        return None
    if guidance is None:
        raise ValueError(f"{EULER_OP_NAME}: guidance is required when model_out_cond is given")
    if isinstance(guidance, (int, float)) and not isinstance(guidance, bool):
        if not math.isfinite(guidance):
            raise ValueError(f"{EULER_OP_NAME}: guidance must be finite, got {guidance!r}")
        return torch.full((batch, frames), float(guidance), dtype=torch.float32, device=x.device)
    if not isinstance(guidance, torch.Tensor):
        raise TypeError(f"{EULER_OP_NAME}: guidance must be a tensor or a float, got {type(guidance).__name__}")
    if guidance.device != x.device:
        raise ValueError(f"{EULER_OP_NAME}: guidance is on {guidance.device} but x is on {x.device}")
    shape = tuple(guidance.shape)
    if shape == (frames,):
        weights = guidance.unsqueeze(0).expand(batch, frames)
    elif shape in ((batch, frames), (batch, frames, 1, 1, 1)):
        weights = guidance.reshape(batch, frames)
    else:
        raise ValueError(
            f"{EULER_OP_NAME}: guidance must have shape (F,)=({frames},), (B, F)=({batch}, {frames}) or "
            f"(B, F, 1, 1, 1), one weight per frame, got {shape}"
        )
    # One small (B, F) reduction: the weights are read once per step, a NaN would poison every frame.
    if not bool(torch.isfinite(weights).all()):
        raise ValueError(f"{EULER_OP_NAME}: guidance must be finite, got {weights.tolist()}")
    return weights.to(torch.float32)


def _broadcast_cond_latents(x: torch.Tensor, cond_latents: object) -> torch.Tensor:
    op = PREPARE_OP_NAME
    if not isinstance(cond_latents, torch.Tensor):
        raise TypeError(f"{op}: cond_latents must be a torch.Tensor, got {type(cond_latents).__name__}")
    batch, frames, _channels, height, width = x.shape
    if cond_latents.dim() == 4:
        cond_latents = cond_latents.unsqueeze(1)
    shape = tuple(cond_latents.shape)
    if (
        cond_latents.dim() != 5
        or shape[0] != batch
        or shape[1] not in (1, frames)
        or shape[3:] != (height, width)
        or shape[2] == 0
    ):
        raise ValueError(
            f"{op}: cond_latents must have shape (B, F, C_cond, H, W), (B, 1, C_cond, H, W) or (B, C_cond, H, W) "
            f"with B={batch}, F={frames}, H={height}, W={width} from x, got {tuple(shape)}"
        )
    if cond_latents.dtype != x.dtype:
        raise TypeError(f"{op}: cond_latents dtype {cond_latents.dtype} must equal x dtype {x.dtype}")
    if cond_latents.device != x.device:
        raise ValueError(f"{op}: cond_latents is on {cond_latents.device} but x is on {x.device}")
    return cond_latents.expand(batch, frames, *shape[2:])


# --- torch.library registration: Triton ops, fake implementations of the C++ ops -----------------------


def _euler_step_fake(x, model_out_uncond, model_out_cond, sigma, sigma_next, guidance, return_denoised):
    denoised_shape = x.shape if return_denoised else (0,)
    return x.new_empty(x.shape), x.new_empty(denoised_shape)


def _prepare_model_input_fake(x, cond_latents, sigma, do_cfg):
    batch, frames, channels, height, width = x.shape
    out_batch = 2 * batch if do_cfg else batch
    return x.new_empty((out_batch, frames, channels + cond_latents.shape[2], height, width))


if _triton.available():
    from svd_fast.triton import edm_step as triton_edm_step

    _triton.register_op("svd_fast::edm_euler_step_triton", triton_edm_step.euler_step)
    _triton.register_op("svd_fast::edm_prepare_model_input_triton", triton_edm_step.prepare_model_input)
if _extension.unavailable_reason() is None:
    _extension.extension()  # loading svd_fast._C defines svd_fast::edm_euler_step / edm_prepare_model_input
    torch.library.register_fake("svd_fast::edm_euler_step")(_euler_step_fake)
    torch.library.register_fake("svd_fast::edm_prepare_model_input")(_prepare_model_input_fake)
