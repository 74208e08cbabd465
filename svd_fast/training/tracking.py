"""Experiment tracking (``logging.report_to: tensorboard | wandb | none``): every record train_log.jsonl gets (loss, lr,
loss by sigma bin, memory, throughput) also goes to TensorBoard (event files in ``output_dir/tensorboard``) or
Weights & Biases (a run in ``output_dir/wandb``; ``WANDB_MODE=offline`` works without an account), with the
validation clips (wandb: the videos; TensorBoard: each clip's first frame, as its add_video needs moviepy). train_log.jsonl stays the record of the run. Rank 0 reports."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

REPORT_TO = ("none", "tensorboard", "wandb")
# logging.report_to / optimizer.name value -> (the module it imports, the pyproject extra that installs it)
OPTIONAL_PACKAGES = {
    ("logging.report_to", "tensorboard"): ("tensorboard", "tensorboard"),
    ("logging.report_to", "wandb"): ("wandb", "wandb"),
    ("optimizer.name", "adamw8bit"): ("bitsandbytes", "bitsandbytes"),
}


def check_packages(config) -> None:
    """The optional package a config's ``logging.report_to`` or ``optimizer.name`` needs is installed (ValueError naming the key
    and the extra that installs it), before any model loads."""
    for (key, value), (module, extra) in OPTIONAL_PACKAGES.items():
        section, _, name = key.partition(".")
        if getattr(getattr(config, section), name) == value and importlib.util.find_spec(module) is None:
            raise ValueError(f"{key}: {value} needs the {module} package, which is not installed (pip install 'svd_fast[{extra}]')")


def _scalars(record: dict[str, Any]) -> dict[str, float]:
    scalars = {f"train/{name}": float(record[name]) for name in ("loss", "lr", "samples_per_s", "memory_mb") if name in record}
    scalars |= {f"train/loss_sigma_{name}": float(value) for name, value in record.get("sigma_binned_loss", {}).items()}
    return scalars


class Tracker:
    """Sends each logged record to ``report_to``'s backend; ``close`` flushes it."""

    def __init__(self, report_to: str, output_dir: Path, run_id: str, config_dict: dict[str, Any]) -> None:
        self.report_to = report_to
        self._writer = None
        self._run = None
        if report_to == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter  # noqa: PLC0415 - defers tensorboard (optional extra)

            self._writer = SummaryWriter(log_dir=str(output_dir / "tensorboard"))
            self._writer.add_text("config", f"run {run_id}\n\n" + "\n".join(f"    {key}: {value!r}" for key, value in sorted(config_dict.items())))
        elif report_to == "wandb":
            import wandb  # noqa: PLC0415 - defers wandb (optional extra)

            (output_dir / "wandb").mkdir(parents=True, exist_ok=True)
            self._run = wandb.init(dir=str(output_dir), id=run_id.replace(":", "-"), resume="allow", config=config_dict,
                                   project="svd-fast", name=output_dir.name)

    def log(self, record: dict[str, Any]) -> None:
        step = record["step"]
        scalars = _scalars(record)
        videos = [Path(path) for path in record.get("validation", [])]
        if self._writer is not None:
            for name, value in scalars.items():
                self._writer.add_scalar(name, value, step)
            for index, path in enumerate(videos):  # add_video would need moviepy: the clip's first frame instead
                frame = path.with_suffix(".png")
                if frame.is_file():
                    self._writer.add_image(f"validation/image_{index}", _image(frame), step, dataformats="HWC")
        if self._run is not None:
            import wandb  # noqa: PLC0415 - defers wandb (optional extra)

            media = {f"validation/image_{index}": wandb.Video(str(path), format="mp4") for index, path in enumerate(videos)}
            self._run.log({**scalars, **media}, step=step)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        if self._run is not None:
            self._run.finish()


def _image(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))
