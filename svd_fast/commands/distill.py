"""`svd-fast distill`: latent consistency distillation of an SVD pipeline into a few-step student (config file
driven, DeepSpeed ZeRO like `svd-fast train`)."""

from __future__ import annotations

import argparse
import json

from svd_fast.commands.errors import UsageError
from svd_fast.commands.train import read_config, run_and_report

EXAMPLES = """examples:
  svd-fast make-tiny models/tiny-svd && svd-fast distill --config configs/distill_tiny_cpu.yaml
  svd-fast distill --config configs/distill_tiny_cpu.yaml --set max_steps=5 --set distill.teacher_solver=euler
  svd-fast distill --config configs/distill_tiny_cpu.yaml --set resume_from=latest
  svd-fast distill --plan-memory --config configs/distill_tiny_cpu.yaml --set precision=bf16 --json
  svd-fast generate --model runs/distill_tiny_cpu/pipeline --image cat.png --out cat.mp4   # 4 consistency steps
The config holds `svd-fast train`'s keys and sections (model: the teacher pipeline folder; data.path or
data.latents_dir; deepspeed, trained_parameters full | temporal | lora, logging, resume_from, validation) and the
section distill: num_train_timesteps, sigma_min, sigma_max, rho (the consistency grid), skip_steps, teacher_solver euler | ipndm-2,
teacher_min_guidance / teacher_max_guidance, loss pseudo-huber | l2, huber_c, target_ema_decay, student_steps.
Writes OUTPUT_DIR/train_log.jsonl, OUTPUT_DIR/checkpoints/step_N and OUTPUT_DIR/pipeline: a diffusers folder with
the student's UNet and svd_fast.json (sampler consistency, its scheduler config and step count)."""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "distill",
        help="distill an SVD pipeline into a few-step consistency model (DeepSpeed ZeRO)",
        description=__doc__,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", required=True, help="YAML or JSON distillation config (see configs/distill_tiny_cpu.yaml)")
    parser.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=JSON", help="override a config key (repeatable)")
    parser.add_argument("--plan-memory", action="store_true", help="print the per-GPU memory plan (no model allocated) instead of distilling")
    parser.add_argument("--gpus", type=int, default=1, help="with --plan-memory: number of GPUs (one process each)")
    parser.add_argument("--json", action="store_true", help="with --plan-memory: print the plan as JSON")
    parser.set_defaults(func=run)


def load_config(args: argparse.Namespace):
    """The config with the --set overrides, checked for types and values; a problem is a UsageError. Paths, the
    teacher and resumability are checked once, by distill() (TrainInputError), before any model loads."""
    from svd_fast.training.distill import DistillConfig  # noqa: PLC0415 - torch and deepspeed load only when the command runs

    return read_config(DistillConfig, args)


def run(args: argparse.Namespace) -> int:
    if args.plan_memory:
        from svd_fast.training.distill import plan_distill_memory  # noqa: PLC0415 - torch and deepspeed load only when the command runs

        config = load_config(args)
        if args.gpus < 1:
            raise UsageError(f"--gpus must be >= 1, got {args.gpus}")
        if config.precision == "fp32":
            raise UsageError("precision: the memory plan models mixed precision", "plan with --set precision=bf16")
        plan = plan_distill_memory(config, gpus=args.gpus)
        print(json.dumps(plan) if args.json else "\n".join(f"{key}: {value}" for key, value in plan.items()))
        return 0
    from svd_fast.training.distill import distill  # noqa: PLC0415 - torch and deepspeed load only when the command runs

    return run_and_report(distill, load_config(args), args.config)
