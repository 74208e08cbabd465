"""A UNet state dict from a ``.safetensors`` file over a pipeline's UNet, strictly (AnimateLCM-SVD-xt ships its
weights as a plain UNetSpatioTemporalConditionModel state dict).

:func:`check_unet_weights` compares the file's tensor names and shapes with the UNet that the model folder's
``unet/config.json`` describes, reading only the file's header and building the UNet on the meta device, so a
mismatch is reported before any model loads; :func:`load_unet_weights` then loads the tensors.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

SHOWN = 3  # names listed per kind of mismatch


class UNetWeightsError(ValueError):
    """The file is not a state dict of this UNet (one line: what is wrong and the first few names)."""


def check_weights_file(path: str | Path) -> None:
    """Raise UNetWeightsError unless ``path`` is a readable .safetensors file (its header only is read)."""
    _file_shapes(Path(path))


def _file_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    from safetensors import SafetensorError, safe_open  # noqa: PLC0415 - safetensors loads only when this runs

    if path.suffix != ".safetensors":
        raise UNetWeightsError(f"{path}: expected a .safetensors file")
    if not path.is_file():
        raise UNetWeightsError(f"{path}: no such file")
    try:
        with safe_open(str(path), framework="pt") as file:
            return {name: tuple(file.get_slice(name).get_shape()) for name in file.keys()}
    except (OSError, ValueError, SafetensorError) as error:
        raise UNetWeightsError(f"{path}: not a readable safetensors file ({error})") from None


def _mismatch(path: Path, expected: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]]) -> str | None:
    missing = [name for name in expected if name not in found]
    unexpected = [name for name in found if name not in expected]
    wrong = [f"{name} {found[name]} != {expected[name]}" for name in expected if name in found and found[name] != expected[name]]
    parts = []
    for label, names in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
        if names:
            more = f" and {len(names) - SHOWN} more" if len(names) > SHOWN else ""
            parts.append(f"{len(names)} {label} ({', '.join(names[:SHOWN])}{more})")
    return f"{path}: not a state dict of this model's UNet: {'; '.join(parts)}" if parts else None


def check_unet_weights(path: str | Path, unet_config: dict[str, Any] | str | Path) -> None:
    """Raise UNetWeightsError unless ``path`` holds exactly the state dict of the UNet of ``unet_config`` (its
    config dict, or a model folder holding unet/config.json)."""
    import torch  # noqa: PLC0415 - torch loads only when this runs
    from diffusers import UNetSpatioTemporalConditionModel  # noqa: PLC0415 - diffusers loads only when this runs

    if not isinstance(unet_config, dict):
        unet_config = json.loads((Path(unet_config) / "unet" / "config.json").read_text())
    found = _file_shapes(Path(path))
    with torch.device("meta"):
        unet = UNetSpatioTemporalConditionModel.from_config(unet_config)
    expected = {name: tuple(tensor.shape) for name, tensor in unet.state_dict().items()}
    message = _mismatch(Path(path), expected, found)
    if message is not None:
        raise UNetWeightsError(message)


def load_unet_weights(unet: Any, path: str | Path) -> Any:
    """Load the state dict in ``path`` over ``unet`` (strict; keeps the UNet's dtype and device)."""
    from safetensors.torch import load_file  # noqa: PLC0415 - safetensors loads only when this runs

    path = Path(path)
    state = load_file(str(path))
    message = _mismatch(path, {name: tuple(t.shape) for name, t in unet.state_dict().items()}, {name: tuple(t.shape) for name, t in state.items()})
    if message is not None:
        raise UNetWeightsError(message)
    unet.load_state_dict(state, strict=True)
    return unet
