"""`svd-fast train`: image-to-video fine-tuning of the SVD UNet with DeepSpeed ZeRO (config file driven)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from svd_fast.commands.errors import UsageError, require

EXAMPLES = """examples:
  svd-fast make-tiny models/tiny-svd && svd-fast train --config configs/train_tiny_cpu.yaml
  svd-fast train --config configs/train_tiny_cpu.yaml --set max_steps=5 --set precision='"bf16"' --set optimizer.learning_rate=1e-4
  svd-fast train --config configs/train_tiny_cpu.yaml --set resume_from='"latest"'
  deepspeed --num_gpus 8 --module svd_fast.train --config configs/train_svd_xt_25x576x1024_8gpu_zero2.yaml   # multi-GPU
  deepspeed --num_gpus 8 --module svd_fast.train --config configs/train_svd_xt_25x576x1024_8gpu_zero2.yaml --deepspeed_config ds.json
  torchrun --nproc_per_node 8 -m svd_fast.train --config configs/train_svd_xt_25x576x1024_8gpu_zero3.yaml
  DS_ACCELERATOR=cpu deepspeed --num_gpus 2 --module svd_fast.train --config configs/train_tiny_cpu.yaml   # 2 CPU processes
  svd-fast train --plan-memory --config configs/train_svd_xt_25x576x1024_8gpu_zero3.yaml --gpus 8 --json
This command runs one process (several GPUs: use a launcher as above). The config has sections (data, optimizer,
deepspeed, lora, validation, objective, logging; see configs/); --set takes section.key=VALUE or a top-level key,
values are JSON (strings quoted); flat keys of the old layout still load, with a deprecation note. Unknown keys, wrongly typed or impossible values, missing paths and an unwritable output_dir are rejected before
any model loads. Writes OUTPUT_DIR/train_log.jsonl, OUTPUT_DIR/checkpoints/step_N (DeepSpeed + trainer state,
complete when complete.json is there; checkpoints/latest names the newest complete one) and OUTPUT_DIR/pipeline
(a diffusers folder; with trained_parameters: lora its UNet has the adapter merged, and OUTPUT_DIR/lora holds the
adapter alone, pytorch_lora_weights.safetensors in diffusers' LoRA format, read by svd_fast.training.lora.load_lora).
resume_from: "latest" resumes from the newest complete checkpoint. --deepspeed_config ds.json (DeepSpeed's own
argument; or the config key deepspeed.config): the JSON's values apply where the config is silent (batch size,
accumulation, clipping, ZeRO stage and offload, precision, AdamW); a key both set differently is an error."""


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
    add_deepspeed_arguments(parser)
    parser.add_argument("--plan-memory", action="store_true",
                        help="print the per-GPU memory plan of the config (no GPU, no model allocated) instead of training")
    parser.add_argument("--gpus", type=int, default=1, help="with --plan-memory: number of GPUs (one process each)")
    parser.add_argument("--json", action="store_true", help="with --plan-memory: print the plan as JSON")
    parser.set_defaults(func=run)


def add_deepspeed_arguments(parser: argparse.ArgumentParser) -> None:
    """DeepSpeed's own training-script arguments (``deepspeed.add_config_arguments``), so a launch line written
    for any DeepSpeed script works here."""
    parser.add_argument("--deepspeed_config", "--deepspeed-config", default=None, metavar="DS_JSON",
                        help="a DeepSpeed JSON config: its values apply where the training config is silent")
    parser.add_argument("--deepspeed", action="store_true",
                        help="accepted for DeepSpeed launch lines (training always runs under DeepSpeed)")


def parse_overrides(items: list[str]) -> dict[str, object]:
    values: dict[str, object] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--set expects KEY=VALUE, got {item!r}", "e.g. --set max_steps=5")
        try:
            values[key] = json.loads(raw)
        except json.JSONDecodeError:
            values[key] = raw  # bare strings need no quotes
    return values


def load_config(args: argparse.Namespace):
    """The config file with the --set overrides, checked for types and values; every problem is a UsageError
    naming the key. Paths, writability and resumability are checked once, by train() (TrainInputError)."""
    from svd_fast.training import TrainConfig  # noqa: PLC0415 - keep `svd-fast --help` fast

    return read_config(TrainConfig, args)


def read_config(config_class, args: argparse.Namespace):
    """``config_class`` (TrainConfig or DistillConfig) from ``--config`` with the ``--set`` overrides (``section.key``,
    or a flat key of the old layout) and DeepSpeed's ``--deepspeed_config``; a problem is a UsageError naming the key."""
    from svd_fast.training.config_layout import sectioned  # noqa: PLC0415 - keep `svd-fast --help` fast (imports torch)

    overrides = parse_overrides(args.overrides)
    try:
        layout = sectioned(config_class.read_file(args.config), config_class, overrides)
        launcher_json = getattr(args, "deepspeed_config", None)
        if launcher_json is not None:
            written = layout.values["deepspeed"].get("config")
            if written is not None and Path(written).resolve() != Path(launcher_json).resolve():
                raise UsageError(f"--deepspeed_config {launcher_json} and the config's deepspeed.config {written} differ",
                                 "give one of them")
            layout.values["deepspeed"]["config"] = launcher_json
        return config_class.from_layout(layout)
    except ValueError as error:
        raise UsageError(str(error), f"fix {args.config} or the --set values") from None


def plan(args: argparse.Namespace) -> int:
    from svd_fast.training.memory_plan import describe, plan_memory  # noqa: PLC0415 - torch and diffusers load only when the command runs

    config = load_config(args)  # a plan needs neither the model nor the data
    require("gpus", args.gpus)
    if config.precision == "fp32":
        raise UsageError("precision: the memory plan models mixed precision (DeepSpeed's estimators assume 16-bit parameters)",
                         "plan with --set precision=bf16")
    result = plan_memory(config, gpus=args.gpus)
    print(json.dumps(result.to_dict()) if args.json else describe(result))
    return 0


def run(args: argparse.Namespace) -> int:
    from svd_fast.training import train  # noqa: PLC0415 - torch and deepspeed load only when training runs

    if getattr(args, "plan_memory", False):
        return plan(args)
    return run_and_report(train, load_config(args), args.config)


def run_and_report(run_training, config, config_path: str) -> int:
    """Run ``run_training(config)`` (train or distill), report its input errors as one line and print its result as
    JSON on stdout."""
    from svd_fast.training.setup import TrainInputError  # noqa: PLC0415 - torch and deepspeed load only when training runs

    try:
        result = run_training(config)
    except TrainInputError as error:  # found by the run's checks, before any model loaded
        raise UsageError(str(error), f"fix {config_path} or the --set values") from None
    print(json.dumps({
        "steps": result.steps,
        "losses": result.losses,
        "samples_per_second": result.samples_per_second,
        "checkpoint": str(result.checkpoint_dir),
        "export": str(result.export_path) if result.export_path else None,
        **result.extra,
        "log": str(result.log_path),
        "svd_fast_kernels": result.kernel_status,
    }))
    return 0
