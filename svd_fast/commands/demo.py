"""`svd-fast demo`: the whole system, end to end, on the embedded tiny model and generated sample clips.

Stages: write sample clips -> curate them (cuts, motion, OCR; drop static clips) -> train the tiny,
architecture-true SVD with DeepSpeed ZeRO on the curated clips -> generate a clip from a sample's first
frame with the optimized sampler -> write the video, manifest, loss plot and summary.json (stage
timings, which kernel backend ran each op). Minutes on a 2-core CPU; faster on a GPU.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

EXAMPLES = """examples:
  svd-fast demo --out demo_out                 # default: about 3 minutes on a 2-core CPU
  svd-fast demo --out demo_out --train-steps 60 --sample-steps 10
outputs in OUT: samples/ (input clips), manifest.parquet, model/ (tiny base), train/ (checkpoints, log),
  trained pipeline in train/pipeline/, loss.png, first_frame.png, generated.mp4, summary.json"""

SAMPLE_FPS = 8
SAMPLE_FRAMES = 32  # 4 s per clip: curation's 2 FPS flow sees 8 frames per clip


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="run curation -> training -> generation on the embedded tiny model",
        description=__doc__,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", type=Path, default=Path("demo_out"), help="output folder (default: demo_out)")
    parser.add_argument("--train-steps", type=int, default=40, help="training steps (default: 40)")
    parser.add_argument("--sample-steps", type=int, default=8, help="sampling steps for generation (default: 8)")
    parser.add_argument("--seed", type=int, default=0, help="seed for data, weights and sampling (default: 0)")
    parser.set_defaults(func=run)


class StageTimer:
    """Times named stages and prints progress lines, so a user sees where the demo is."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        print(f"[svd-fast demo] {name} ...", flush=True)
        started = time.perf_counter()
        yield
        self.seconds[name] = round(time.perf_counter() - started, 2)
        print(f"[svd-fast demo] {name} done in {self.seconds[name]:.1f} s", flush=True)


def write_samples(folder: Path, seed: int) -> list[Path]:
    """Four clips with known content: two moving textures, a static scene (which curation should drop)
    and a clip with a hard cut (which curation should split)."""
    from svd_fast.data import synthetic  # noqa: PLC0415

    folder.mkdir(parents=True, exist_ok=True)
    size = (96, 128)
    clips: dict[str, Any] = {
        "pan_right.mp4": synthetic.translating_texture(SAMPLE_FRAMES, *size, shift=(0.0, 2.0), seed=seed),
        "pan_down.mp4": synthetic.translating_texture(SAMPLE_FRAMES, *size, shift=(1.5, 0.0), seed=seed + 1),
        "static.mp4": synthetic.translating_texture(SAMPLE_FRAMES, *size, shift=(0.0, 0.0), seed=seed + 2),
        "two_scenes.mp4": synthetic.scenes_with_cuts([SAMPLE_FRAMES // 2, SAMPLE_FRAMES // 2], *size, shift=(1.0, 1.0))[0],
    }
    return [synthetic.write_video(folder / name, frames, fps=SAMPLE_FPS, codec="h264") for name, frames in clips.items()]


def plot_losses(losses: list[float], path: Path) -> Path:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    figure, axis = plt.subplots(figsize=(6, 3.5), dpi=100)
    steps = range(1, len(losses) + 1)
    axis.plot(steps, losses, marker=".", linewidth=0.8, alpha=0.5, label="per step (one random noise level each)")
    # Each step draws its own noise level, so single losses jump by 10x: a running mean shows the trend.
    window = max(1, min(8, len(losses) // 4))
    running = [sum(losses[max(0, i - window + 1) : i + 1]) / len(losses[max(0, i - window + 1) : i + 1]) for i in range(len(losses))]
    axis.plot(steps, running, linewidth=2, label=f"running mean of {window}")
    axis.legend(fontsize=8)
    axis.set_xlabel("training step")
    axis.set_ylabel("EDM loss (weighted)")
    axis.set_yscale("log")
    axis.set_title("svd-fast demo: tiny SVD training loss")
    axis.grid(True, alpha=0.3)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.train_steps < 1 or args.sample_steps < 1:
        print("svd-fast demo: error: --train-steps and --sample-steps must be >= 1")
        return 2
    import torch  # noqa: PLC0415

    import svd_fast  # noqa: PLC0415
    from svd_fast import _extension  # noqa: PLC0415

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    timer = StageTimer()
    summary: dict[str, Any] = {
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "extension": _extension.build_info(),
    }

    with timer.stage("write sample clips"):
        samples = write_samples(out / "samples", args.seed)
    with timer.stage("curate"):
        summary["curation"] = curate_samples(out / "samples", out / "manifest.parquet")
    with timer.stage("write tiny base model"):
        from svd_fast.diffusers.tiny import save_tiny_pipeline  # noqa: PLC0415

        base_model = save_tiny_pipeline(out / "model", seed=args.seed)
    with timer.stage("train (DeepSpeed ZeRO)"):
        training = train_tiny(base_model, out / "manifest.parquet", out, args.train_steps, args.seed)
        summary["training"] = training
        plot_losses(training["losses"], out / "loss.png")
    with timer.stage("generate"):
        summary["generation"] = generate_clip(Path(training["export_dir"]), samples[0], out, args.sample_steps, args.seed)

    summary["stage_seconds"] = timer.seconds
    summary["backends_used"] = svd_fast.backends_used()
    summary["outputs"] = sorted(str(path.relative_to(out)) for path in out.iterdir())
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    print(json.dumps({"stage_seconds": timer.seconds, "backends_used": summary["backends_used"]}, indent=2))
    print(f"[svd-fast demo] outputs in {out}/ (video: generated.mp4, loss plot: loss.png, summary.json)")
    return 0


def curate_samples(samples: Path, manifest: Path) -> dict[str, Any]:
    from svd_fast.curation import CurationConfig, curate  # noqa: PLC0415

    # Static scenes teach no motion (the paper's finding): drop clips whose mean flow is near zero.
    config = CurationConfig(ocr=True)
    result = curate(samples, manifest, config=config, filters=[f"flow_mean_norm>={config.static_threshold}"])
    return {key: value for key, value in result.items() if key != "config"}


def train_tiny(base_model: Path, manifest: Path, out: Path, steps: int, seed: int) -> dict[str, Any]:
    """Fine-tune the tiny model on the curated clips with DeepSpeed ZeRO-2 (one process; all GPUs under
    the `deepspeed` launcher), then export a diffusers-format pipeline."""
    from svd_fast.diffusers.tiny import TINY_HEIGHT, TINY_NUM_FRAMES, TINY_WIDTH  # noqa: PLC0415
    from svd_fast.training import train  # noqa: PLC0415

    result = train(
        {
            "model": str(base_model),
            "data": str(manifest),  # the curated manifest: rejected clips are left out
            "output_dir": str(out / "train"),
            "num_frames": TINY_NUM_FRAMES,
            "height": TINY_HEIGHT,
            "width": TINY_WIDTH,
            "max_steps": steps,
            "learning_rate": 1e-3,
            "warmup_steps": 2,
            "zero_stage": 2,
            "precision": "fp32",
            "ema_decay": 0.9,
            "checkpoint_every": max(steps // 2, 1),
            "seed": seed,
        }
    )
    return {
        "steps": result.steps,
        "losses": [round(float(loss), 6) for loss in result.losses],
        "samples_per_second": result.samples_per_second,
        "kernels": result.kernel_status,
        "checkpoint_dir": str(result.checkpoint_dir),
        "export_dir": str(result.export_path),
        "log": str(result.log_path),
    }


def generate_clip(model: Path, sample: Path, out: Path, steps: int, seed: int) -> dict[str, Any]:
    """Animate the first frame of a sample clip with the trained model and the optimized sampler."""
    from PIL import Image  # noqa: PLC0415

    from svd_fast.commands.generate import generate  # noqa: PLC0415
    from svd_fast.data.video import decode_frames  # noqa: PLC0415
    from svd_fast.diffusers.tiny import TINY_NUM_FRAMES  # noqa: PLC0415

    first_frame = out / "first_frame.png"
    Image.fromarray(decode_frames(sample, [0])[0]).save(first_frame)
    return generate(model, first_frame, out / "generated.mp4", frames=TINY_NUM_FRAMES, steps=steps, fps=SAMPLE_FPS, seed=seed)
