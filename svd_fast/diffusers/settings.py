"""The one check of :func:`svd_fast.optimize`'s settings and the combinations they allow, shared by
``optimize`` itself and by :mod:`svd_fast.diffusers.generation` (and through it ``svd-fast generate``).

A problem is an :class:`OptionError`: a ValueError whose message names each setting through a spelling
function, so that the Python API says ``cuda_graphs`` and the command line ``--cuda-graphs`` for the same rule.
"""

from __future__ import annotations

import math
import string
from collections.abc import Callable
from typing import Any

import torch

from svd_fast.backends import BACKENDS
from svd_fast.diffusers.attention_processors import flash_attn_unavailable_reason
from svd_fast.sampling.samplers import SAMPLERS

# How the Python API writes a setting where its bare name would read wrong (the command line: --no-optimize, ...).
PYTHON_SPELLING = {"no_optimize": "optimize=False", "cuda_graphs": "cuda_graphs=True", "low_memory": "low_memory=True"}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
ATTENTION_CHOICES = ("auto", "sdpa", "flash-attn")


def python_name(name: str) -> str:
    return PYTHON_SPELLING.get(name, name)


class _Spelled(dict):
    """Format-map that spells every placeholder not given as a value (a setting's name)."""

    def __init__(self, spell: Callable[[str], str], values: dict[str, Any]) -> None:
        super().__init__(values)
        self.spell = spell

    def __missing__(self, key: str) -> str:
        return self.spell(key)


class OptionError(ValueError):
    """A bad setting. ``what`` and ``todo`` are templates: ``{name}`` is a setting's name, spelled by the
    caller (:meth:`render`); ``values`` fill the other placeholders. ``str()`` spells names as in Python."""

    def __init__(self, what: str, todo: str | None = None, **values: Any) -> None:
        self.what, self.todo, self.values = what, todo, values
        super().__init__(self.render())

    def render(self, spell: Callable[[str], str] | None = None, with_todo: bool = True) -> str:
        spell = spell or python_name
        text = string.Formatter().vformat(self.what, (), _Spelled(spell, self.values))
        if with_todo and self.todo:
            text += f" ({self.render_todo(spell)})"
        return text

    def render_todo(self, spell: Callable[[str], str] | None = None) -> str | None:
        spell = spell or python_name
        return None if self.todo is None else string.Formatter().vformat(self.todo, (), _Spelled(spell, self.values))


def require_positive(name: str, value: float | None, integer: bool = False) -> None:
    """``value`` is None or a finite number > 0 (a whole one with ``integer``)."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        raise OptionError("{" + name + "} must be a " + ("whole " if integer else "") + "number, got {got!r}", got=value)
    if not math.isfinite(value) or value <= 0:
        raise OptionError("{" + name + "} must be > 0, got {got!r}", got=value)


def require_in_range(name: str, value: float | None, low: float, high: float) -> None:
    """``value`` is None or a finite number in ``[low, high]``."""
    if value is None:
        return
    if not math.isfinite(value):
        raise OptionError("{" + name + "} must be a finite number, got {got!r}", got=value)
    if not low <= value <= high:
        raise OptionError("{" + name + "} must be in [{low}, {high}], got {got!r}", low=low, high=high, got=value)


def check_settings(
    *,
    backend: str = "auto",
    dtype: str | torch.dtype | None = None,
    device: str | None = None,
    low_memory: bool = False,
    attention: str = "auto",
    cuda_graphs: bool = False,
    sampler: str = "euler",
    cache_interval: int = 1,
    optimized: bool = True,
    fused_sampling: bool = True,
) -> torch.dtype | None:
    """Raise :class:`OptionError` for a bad value or combination of these settings; return ``dtype`` as a
    torch dtype. ``device`` None means CUDA when available. ``optimized``: the pipeline gets ``optimize``
    (False: the stock diffusers pipeline); ``fused_sampling``: ``optimize`` replaces its sampling (a pipeline
    with ``scheduler=True``)."""
    if backend not in BACKENDS + ("auto",):
        raise OptionError("{backend} must be 'auto' or one of {choices}, got {got!r}", choices=BACKENDS, got=backend)
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise OptionError("{dtype} must be one of {choices} or a torch.dtype, got {got!r}", choices=sorted(DTYPES), got=dtype)
        dtype = DTYPES[dtype]
    elif dtype is not None and not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a str or a torch.dtype, got {type(dtype).__name__}")
    on_cuda = torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"
    if dtype == torch.float16 and device is not None and not on_cuda:
        raise OptionError("{dtype} fp16 is not supported on the CPU", "use fp32 or bf16")
    if sampler not in SAMPLERS:
        raise OptionError("{sampler} must be one of {choices}, got {got!r}", choices=SAMPLERS, got=sampler)
    if isinstance(cache_interval, bool) or not isinstance(cache_interval, int) or cache_interval < 1:
        raise OptionError("{cache_interval} must be an int >= 1 (1: no caching), got {got!r}", got=cache_interval)
    if attention not in ATTENTION_CHOICES:
        raise OptionError("{attention} must be one of {choices}, got {got!r}", choices=ATTENTION_CHOICES, got=attention)
    if optimized and attention == "flash-attn":
        reason = flash_attn_unavailable_reason()
        if reason is not None:
            raise OptionError("{attention} flash-attn was asked for but {reason}", "use {attention} auto or sdpa", reason=reason)
    if (sampler != "euler" or cache_interval > 1) and not (optimized and fused_sampling):
        raise OptionError(
            "{sampler} and {cache_interval} need the optimized pipeline's fused sampling",
            "drop {no_optimize}" if not optimized else "pass a pipeline with scheduler=True",
        )
    if cuda_graphs:
        if not optimized:
            raise OptionError("{cuda_graphs} needs the optimized pipeline", "drop {no_optimize}")
        if device is None and not on_cuda:
            raise OptionError("{cuda_graphs} needs a CUDA device, and none is available")
        if not on_cuda:
            raise OptionError("{cuda_graphs} needs {device} cuda, got {got}", got=device)
        if low_memory:
            raise OptionError(
                "{cuda_graphs} cannot be combined with {low_memory}: CPU offload moves the weights between calls, "
                "which a captured graph cannot follow"
            )
        if cache_interval > 1:
            raise OptionError("{cache_interval} > 1 runs the UNet level by level and cannot be combined with {cuda_graphs}")
    return dtype


def resolve_attention(attention: str) -> str:
    """"flash-attn" or "sdpa" for a checked ``attention`` setting."""
    if attention == "auto":
        return "sdpa" if flash_attn_unavailable_reason() is not None else "flash-attn"
    return attention
