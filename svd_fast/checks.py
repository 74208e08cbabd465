"""The one table of checks every user-controlled value passes before heavy work.

:data:`RULES` names each value (as the Python API and training configs spell it; a CLI option is the same name
with dashes) and its rule: a whole number or a number, the range the library can represent and the run can
use. :func:`check` applies a rule; the commands (svd_fast.commands, exit 2 with one line), the Python API and
``TrainConfig`` (ValueError naming the argument) all call it. Checks that need more than a value live here too:
the device string (parsed and available), a forced kernel backend against the device (before the model loads)
and the memory a generation needs against what the machine has (:func:`check_generation_memory`).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

SEED_END = 2**63  # torch.Generator.manual_seed takes a signed 64-bit integer


class CheckError(ValueError):
    """A value outside its rule; the message names the value as the caller spells it."""


@dataclass(frozen=True)
class Rule:
    low: float
    high: float
    integer: bool = False
    low_open: bool = False  # ``low`` itself is refused
    high_open: bool = False
    note: str = ""

    def describe(self) -> str:
        kind = "a whole number" if self.integer else "a finite number"
        return f"{kind} in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}{self.note}"


RULES: dict[str, Rule] = {
    "seed": Rule(0, SEED_END, integer=True, high_open=True),
    "frames": Rule(2, 1024, integer=True),
    "num_frames": Rule(2, 1024, integer=True),
    "validation_num_frames": Rule(2, 1024, integer=True),
    "steps": Rule(1, 1000, integer=True),
    "validation_inference_steps": Rule(1, 1000, integer=True),
    "unet_steps": Rule(1, 10**7, integer=True),
    "sample_steps": Rule(1, 1000, integer=True),
    "height": Rule(8, 8192, integer=True),
    "width": Rule(8, 8192, integer=True),
    "fps": Rule(1, 240, integer=True),
    "default_fps": Rule(1, 240, note=" (rounded to a whole conditioning fps)"),
    "target_fps": Rule(0, 240, low_open=True),
    "flow_fps": Rule(0, 240, low_open=True),
    "motion_bucket_id": Rule(0, 255, integer=True),
    "default_motion_bucket_id": Rule(0, 255),
    "noise_aug_strength": Rule(0, 10),
    "min_guidance": Rule(0, 100),
    "max_guidance": Rule(0, 100),
    "decode_chunk_size": Rule(1, 1024, integer=True),
    "cache_interval": Rule(1, 1000, integer=True),
    "stride": Rule(1, 10**4, integer=True),
    "actors": Rule(1, 4096, integer=True),
    "gpus": Rule(1, 4096, integer=True),
    "learning_rate": Rule(0, 1, low_open=True),
    "adam_eps": Rule(0, 1, low_open=True),
    "batch_size": Rule(1, 4096, integer=True),
}


def check(name: str, value: Any, *, spelled: str | None = None, allow_none: bool = True) -> Any:
    """``value`` under ``RULES[name]`` (None passes when ``allow_none``); CheckError naming ``spelled`` (default:
    ``name``) otherwise. Returns the value."""
    rule, label = RULES[name], spelled or name
    if value is None and allow_none:
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (rule.integer and not isinstance(value, int)):
        raise CheckError(f"{label} must be {rule.describe()}, got {value!r}")
    too_low = value <= rule.low if rule.low_open else value < rule.low
    too_high = value >= rule.high if rule.high_open else value > rule.high
    if (isinstance(value, float) and not math.isfinite(value)) or too_low or too_high:
        raise CheckError(f"{label} must be {rule.describe()}, got {value!r}")
    return value


MAX_SEEDS = 100


def _decimal(text: str) -> bool:
    return text.isascii() and text.isdigit()


def parse_seed_list(value: str, *, spelled: str = "seeds") -> list[int]:
    """``"0-4"``, ``"0,2,5"`` or a mix (``"0-2,7"``) -> distinct seeds in the order given, each under the seed rule."""
    seeds: list[int] = []
    for part in str(value).split(","):
        low, dash, high = part.strip().partition("-")
        if not _decimal(low) or (dash and not _decimal(high)):
            raise CheckError(f"{spelled} {value!r} is not a seed list (use N, N-M or N,M,...)")
        first, last = int(low), int(high) if dash else int(low)
        if last < first:
            raise CheckError(f"{spelled} {value!r}: the range {part.strip()} runs backwards (use N-M with N <= M)")
        if last - first >= MAX_SEEDS or len(seeds) + last - first + 1 > MAX_SEEDS:
            raise CheckError(f"{spelled} {value!r} names more than {MAX_SEEDS} seeds")
        for seed in range(first, last + 1):
            check("seed", seed, spelled=spelled)
            if seed in seeds:
                raise CheckError(f"{spelled} {value!r} names seed {seed} twice")
            seeds.append(seed)
    return seeds


def parse_device(value: str | None, *, spelled: str = "device") -> str:
    """``cpu``, ``cuda`` or ``cuda:N``, available on this machine (None: cuda when available, else cpu)."""
    import torch  # noqa: PLC0415 - torch loads only when a device is checked, so argument parsing stays light

    if value is None or value == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(value)
    except (RuntimeError, TypeError):
        raise CheckError(f"{spelled} {value!r} is not a device (use cpu, cuda or cuda:N)") from None
    if device.type == "cpu" and device.index in (None, 0):
        return "cpu"
    if device.type != "cuda":
        raise CheckError(f"{spelled} {value!r}: svd-fast runs on cpu or cuda, not {device.type}")
    if not torch.cuda.is_available():
        raise CheckError(f"{spelled} {value!r} but CUDA is not available here (use cpu)")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise CheckError(f"{spelled} {value!r} but this machine has {torch.cuda.device_count()} CUDA device(s)")
    return str(device)


def backend_unavailable_reason(backend: str, device: str, dtype: Any) -> str | None:
    """Why the forced kernel ``backend`` cannot run ops on ``device``/``dtype`` (None: it can, or "auto")."""
    import torch  # noqa: PLC0415 - torch loads only when a device is checked, so argument parsing stays light

    from svd_fast import backends, ops  # noqa: F401, PLC0415 - importing ops registers their backends

    if backend == "auto":
        return None
    for op in backends.registered_ops():
        entry = backends.entries(op).get(backend)
        if entry is None:
            continue
        reason = entry.rejection(torch.device(device), dtype, {limit.fact: 0 for limit in entry.limits})
        if reason is not None:
            return f"{op}: {reason}"
    return None


def available_memory(device: str) -> int:
    """Bytes free for this process: the CUDA device's free memory, else the machine's available RAM."""
    if device.startswith("cuda"):
        import torch  # noqa: PLC0415 - torch loads only when a device is checked, so argument parsing stays light

        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def generation_memory_estimate(frames: int, height: int, width: int, decode_chunk_size: int, bytes_per_value: int) -> int:
    """A lower bound on the activations one generation holds at once, from the shapes alone: the latents and
    their guidance copies (2 x 4 x 3 buffers of F x H/8 x W/8 x 4), the decoded video (F x 3 x H x W, fp32
    before conversion) and the VAE decoder's widest activation for one decode chunk (128 channels at full
    size, input and output of a layer)."""
    latent = frames * (height // 8) * (width // 8) * 4 * bytes_per_value
    video = frames * 3 * height * width * 4
    decoder = 2 * min(decode_chunk_size, frames) * 128 * height * width * bytes_per_value
    return 24 * latent + video + decoder


def check_generation_memory(frames: int, height: int, width: int, decode_chunk_size: int, dtype_bytes: int, device: str,
                            *, spelled: str = "frames x height x width") -> int:  # fmt: skip
    """CheckError when :func:`generation_memory_estimate` exceeds what ``device`` has; returns the estimate."""
    need = generation_memory_estimate(frames, height, width, decode_chunk_size, dtype_bytes)
    have = available_memory(device)
    if need > have:
        raise CheckError(f"{spelled} = {frames} x {height} x {width} needs at least {need / 2**30:.1f} GiB on {device} "
                         f"(estimate), {have / 2**30:.1f} GiB is available (fewer frames, a smaller size or a smaller decode chunk)")
    return need
