"""The demo's curation and UNet training: svd_fast.curation.curate over the training clips, then
svd_fast.training.train (DeepSpeed ZeRO-2, the SVD objective) on the kept clips, conditioned on the first frame
and on the motion_bucket_id curation assigned."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

import numpy as np

from svd_fast.demo.world import ClipSpec


def curate_clips(clips: Path, manifest: Path) -> dict[str, Any]:
    """Curate ``clips`` into ``manifest``: cuts split the reels into scenes, the motion score gives each scene
    its motion_bucket_id, and static scenes are marked keep=False (the paper's finding: they teach no motion)."""
    from svd_fast.curation import CurationConfig, curate  # noqa: PLC0415 - torch and OpenCV load only when curation runs

    # The demo's frames hold no text. The codec prefilter is off: a 4 px disk moving 0.5 px/frame on a 32x32 frame
    # leaves the frame's mean codec motion vector near 0 px (under its 0.1 px threshold), so it called most slow
    # scenes static. The texture gate is off too: the faint backgrounds fall under min_texture in some scenes,
    # but the disk is always in view, so every frame is measurable. Dense flow decides what is static.
    config = CurationConfig(ocr=False, codec_static_prefilter=False, min_texture=0.0)
    result = curate(clips, manifest, config=config, filters=[f"flow_mean_norm>={config.static_threshold}"])
    return {key: value for key, value in result.items() if key != "config"}


def join_ground_truth(manifest: Path, specs: list[ClipSpec]):
    """The manifest's rows with each scene's ground truth (colour, speed) beside what curation measured.
    Scenes are matched by file and order: the n-th clip curation found in a file is scene n."""
    import pandas as pd  # noqa: PLC0415 - pandas loads only for manifests

    table = pd.read_parquet(manifest)
    truth = pd.DataFrame([spec.to_row() for spec in specs])
    truth["file"] = truth["name"].str.split("#").str[0]
    truth["clip_index"] = truth["name"].str.split("#").str[1].fillna("0").astype(int)
    table["file"] = table["source"].map(lambda path: Path(path).name)
    return table.merge(truth[["file", "clip_index", "colour", "speed", "speed_px"]], on=["file", "clip_index"], how="left")


def motion_buckets(joined) -> dict[str, Any]:
    """What curation's motion score made of the two speeds: per speed, the median motion_bucket_id of the kept
    clips (the demo generates at these), their ranges, and how often a fast clip's bucket is above a slow
    clip's (1.0: the score separates the speeds perfectly)."""
    kept = joined[joined["keep"].astype(bool)]
    per_speed = {speed: kept.loc[kept["speed"] == speed, "motion_bucket_id"].to_numpy(dtype=float) for speed in ("slow", "fast")}
    if not all(len(values) for values in per_speed.values()):
        raise RuntimeError(f"curation kept no clips of some speed: {({k: len(v) for k, v in per_speed.items()})}")
    slow, fast = per_speed["slow"], per_speed["fast"]
    ordered = (fast[:, None] > slow[None, :]).mean() + 0.5 * (fast[:, None] == slow[None, :]).mean()
    return {
        "low": int(np.median(slow)),
        "high": int(np.median(fast)),
        "slow_range": [int(slow.min()), int(slow.max())],
        "fast_range": [int(fast.min()), int(fast.max())],
        "fast_above_slow_fraction": round(float(ordered), 4),
        "kept_clips": {"slow": len(slow), "fast": len(fast)},
        "dropped": joined.loc[~joined["keep"].astype(bool), "speed"].value_counts().to_dict(),
    }


def train_unet(base_model: Path, manifest: Path, output_dir: Path, settings: dict[str, Any], seed: int):
    """Train the UNet of ``base_model`` on the manifest's kept clips with svd_fast.training.train under
    DeepSpeed ZeRO-2; returns its TrainResult (losses, exported pipeline folder)."""
    from svd_fast.training import TrainConfig, train  # noqa: PLC0415 - torch and deepspeed load only when training runs

    # A single-process run on a shared machine: a free port, so another training there cannot collide with it.
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(probe.getsockname()[1])
    values = {key: value for key, value in settings.items() if key != "cpu"}
    config = TrainConfig.from_dict(
        {**values, "model": str(base_model), "output_dir": str(output_dir), "precision": "fp32", "seed": seed,
         "device": "cpu" if settings.get("cpu") else "auto"},
        {"data.path": str(manifest), "data.shuffle": True, "deepspeed.zero_stage": 2, "logging.log_every": 10},
    )  # fmt: skip
    return train(config)
