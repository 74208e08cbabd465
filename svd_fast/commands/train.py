"""`svd-fast train`: image-to-video fine-tuning of the SVD UNet with DeepSpeed ZeRO (config file driven)."""

from __future__ import annotations

import argparse
import json

EXAMPLES = """examples:
  svd-fast make-tiny models/tiny-svd && svd-fast train --config configs/train_tiny_cpu.yaml
  svd-fast train --config configs/train_tiny_cpu.yaml --set max_steps=5 --set precision='"bf16"'
  svd-fast train --config configs/train_tiny_cpu.yaml --set resume_from='"latest"'
  deepspeed --num_gpus 8 -m svd_fast.train --config configs/train_svd_zero2.yaml          # multi-GPU
  torchrun --nproc_per_node 8 -m svd_fast.train --config configs/train_svd_zero3_offload.yaml
This command runs one process (several GPUs: use a launcher as above). --set values are JSON (strings quoted);
unknown keys and impossible values are rejected before any model loads. Writes OUTPUT_DIR/train_log.jsonl,
OUTPUT_DIR/checkpoints/step_N (DeepSpeed + trainer state) and OUTPUT_DIR/pipeline (a diffusers folder)."""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="fine-tune the SVD UNet on video clips with DeepSpeed ZeRO",
        description=__doc__,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", required=True, help="YAML or JSON training config (see configs/)")
    parser.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=JSON", help="override a config key (repeatable)")
    parser.set_defaults(func=run)


def parse_overrides(items: list[str]) -> dict[str, object]:
    values: dict[str, object] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        try:
            values[key] = json.loads(raw)
        except json.JSONDecodeError:
            values[key] = raw  # bare strings need no quotes
    return values


def run(args: argparse.Namespace) -> int:
    from svd_fast.training import TrainConfig, train  # noqa: PLC0415 - keep `svd-fast --help` fast

    values = TrainConfig.from_file(args.config).to_dict()
    values.update(parse_overrides(args.overrides))
    result = train(TrainConfig.from_dict(values))
    print(json.dumps({
        "steps": result.steps,
        "losses": result.losses,
        "samples_per_second": result.samples_per_second,
        "checkpoint": str(result.checkpoint_dir),
        "export": str(result.export_path) if result.export_path else None,
        "log": str(result.log_path),
        "svd_fast_kernels": result.kernel_status,
    }))
    return 0
