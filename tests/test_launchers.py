"""Launch lines: every documented `deepspeed`/`torchrun` line parses with the launcher's own parser, the real
`deepspeed` launcher (``--module svd_fast.train``, 1 and 2 local CPU processes, gloo) and `torchrun` (2 processes)
train the tiny model for two steps, and DeepSpeed's own ``--deepspeed_config``/``--deepspeed``/``--local_rank``
arguments are accepted (the JSON's values apply where the training config is silent; a conflict is one line)."""

from __future__ import annotations

import json
import os
import re
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from training_fixtures import tiny_config, tiny_workdir

from svd_fast.training import TrainConfig
from svd_fast.training.setup import build_deepspeed_config

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
LAUNCH_TIMEOUT_S = 900  # generous: CI machines are shared


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tiny_workdir(tmp_path_factory.mktemp("launchers"), clip_frames=(8, 8))  # one clip per rank


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _write_config(workdir: Path, out: str, **overrides) -> Path:
    values = tiny_config(workdir, out, device="cpu", use_svd_fast_kernels=False, **overrides)
    path = workdir / f"{out}.json"
    path.write_text(json.dumps(values))
    return path


def _launch(command: list[str], workdir: Path) -> list[dict]:
    # No accelerator is preset for the training processes beyond what a CPU user sets: DS_ACCELERATOR=cpu tells the
    # deepspeed launcher to count CPU "devices" (--num_gpus N starts N processes).
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO),
               PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    proc = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith('{"steps"')]
    assert results, proc.stdout[-2000:]
    return results


def _documented_lines(launcher: str) -> list[tuple[str, str]]:
    """(where, line) for every `launcher ...svd_fast.train...` line in README.md, configs/, the train epilog and
    svd_fast/train.py's docstring."""
    from svd_fast.commands.train import EXAMPLES

    texts = {"README.md": (REPO / "README.md").read_text(), "train --help": EXAMPLES,
             "svd_fast/train.py": (REPO / "svd_fast" / "train.py").read_text()}
    texts.update({f"configs/{path.name}": path.read_text() for path in (REPO / "configs").glob("*.yaml")})
    found = []
    for where, text in texts.items():
        for match in re.finditer(rf"(?:^|[`#:]\s*|\s\s)((?:[A-Z_]+=\S+ )*{launcher} [^`\n]*svd_fast\.train[^`\n]*)", text, re.MULTILINE):
            line = match.group(1).split("  #")[0].strip()
            found.append((where, line))
    return found


def test_every_documented_launch_line_parses() -> None:
    from deepspeed.launcher.runner import parse_args as parse_deepspeed_args
    from torch.distributed.run import get_args_parser as torchrun_parser

    from svd_fast.train import build_parser

    deepspeed_lines, torchrun_lines = _documented_lines("deepspeed"), _documented_lines("torchrun")
    assert len(deepspeed_lines) >= 5 and len(torchrun_lines) >= 2, (deepspeed_lines, torchrun_lines)
    for where, line in deepspeed_lines + torchrun_lines:
        words = [word for word in shlex.split(line.replace("...", "C")) if "=" not in word or word.startswith("-")]
        launcher, rest = words[0], words[1:]
        if launcher == "deepspeed":
            parsed = parse_deepspeed_args(rest)  # argparse exits on an unknown flag such as `-m`
            assert parsed.module and parsed.user_script == "svd_fast.train", (where, line)
            script_args = parsed.user_args
        else:
            parsed = torchrun_parser().parse_args(rest)
            assert parsed.module and parsed.training_script == "svd_fast.train", (where, line)
            script_args = parsed.training_script_args
        build_parser().parse_args(["--local_rank=0", *script_args])


@pytest.mark.slow
def test_deepspeed_launcher_one_process_with_deepspeed_config(workdir: Path) -> None:
    config = _write_config(workdir, "ds1")  # silent on accumulation and clipping: ds.json decides
    (workdir / "ds.json").write_text(json.dumps({"gradient_accumulation_steps": 2, "gradient_clipping": 0.5,
                                                 "steps_per_print": 100, "zero_optimization": {"reduce_bucket_size": 1_000_000}}))
    (result,) = _launch([str(BIN / "deepspeed"), "--num_gpus", "1", "--master_port", str(_free_port()), "--module", "svd_fast.train",
                         "--config", str(config), "--deepspeed", "--deepspeed_config", "ds.json"], workdir)
    assert result["steps"] == 2
    written = json.loads((workdir / "ds1" / "train_config.json").read_text())
    assert written["optimizer"]["gradient_accumulation_steps"] == 2 and written["optimizer"]["gradient_clipping"] == 0.5
    assert written["deepspeed"]["config"] == "ds.json"
    assert len((workdir / "ds1" / "train_log.jsonl").read_text().splitlines()) == 2


@pytest.mark.slow
def test_deepspeed_launcher_two_processes(workdir: Path) -> None:
    config = _write_config(workdir, "ds2")
    results = _launch([str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(_free_port()), "--module", "svd_fast.train",
                       "--config", str(config)], workdir)
    assert len(results) == 2 and all(result["steps"] == 2 for result in results)
    assert results[0]["losses"] != results[1]["losses"]  # two ranks, two clips
    assert sorted(path.name for path in (workdir / "ds2" / "checkpoints" / "step_2").glob("trainer_state_rank*.pt")) == \
        ["trainer_state_rank0.pt", "trainer_state_rank1.pt"]


@pytest.mark.slow
def test_torchrun_two_processes(workdir: Path) -> None:
    config = _write_config(workdir, "torchrun2")
    results = _launch([str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(_free_port()), "-m", "svd_fast.train",
                       "--config", str(config)], workdir)
    assert len(results) == 2 and all(result["steps"] == 2 for result in results)


def test_deepspeed_json_fills_what_the_config_leaves_out(workdir: Path, tmp_path: Path) -> None:
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({
        "train_micro_batch_size_per_gpu": 2, "train_batch_size": 8, "gradient_clipping": 0.25, "bf16": {"enabled": False},
        "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu", "pin_memory": True}},
        "optimizer": {"type": "AdamW", "params": {"lr": 2e-4, "betas": [0.8, 0.95], "eps": 1e-6, "weight_decay": 0.01}},
        "wall_clock_breakdown": True,
    }))
    config = TrainConfig.from_dict({"deepspeed": {"config": str(ds)}, "max_steps": 3})
    optimizer = config.optimizer
    assert (config.data.batch_size, optimizer.gradient_accumulation_steps, optimizer.gradient_clipping) == (2, 4, 0.25)
    assert (config.deepspeed.zero_stage, config.deepspeed.offload_optimizer, config.precision, optimizer.name) == (3, "cpu", "fp32", "adamw_deepspeed")
    assert (optimizer.learning_rate, optimizer.adam_beta1, optimizer.adam_beta2, optimizer.adam_eps, optimizer.weight_decay) == (2e-4, 0.8, 0.95, 1e-6, 0.01)
    merged = build_deepspeed_config(config)
    assert merged["wall_clock_breakdown"] is True and merged["zero_optimization"]["offload_optimizer"]["pin_memory"] is True
    assert merged["train_batch_size"] == 8
    # What the config writes wins over nothing, and differs from the JSON: one error naming both.
    with pytest.raises(ValueError, match=r"gradient_clipping=0.25 \(the config gives 1.0\)"):
        build_deepspeed_config(TrainConfig.from_dict({"deepspeed": {"config": str(ds)}, "optimizer": {"gradient_clipping": 1.0}}))
    with pytest.raises(ValueError, match=r"train_batch_size=8"):
        build_deepspeed_config(TrainConfig.from_dict({"deepspeed": {"config": str(ds)}, "optimizer": {"gradient_accumulation_steps": 1}}))
    ds.write_text(json.dumps({"scheduler": {"type": "WarmupLR"}}))
    with pytest.raises(ValueError, match="scheduler"):
        build_deepspeed_config(TrainConfig.from_dict({"deepspeed": {"config": str(ds)}}))


def test_launcher_arguments_conflict_is_one_line(workdir: Path, tmp_path: Path, capsys) -> None:
    from svd_fast.train import main

    (tmp_path / "clip.json").write_text(json.dumps({"gradient_clipping": 0.5}))
    config = _write_config(workdir, "conflict", **{"optimizer.gradient_clipping": 1.0})
    values = json.loads(config.read_text())
    assert main(["--local_rank=0", "--config", str(config), "--deepspeed", "--deepspeed_config", str(tmp_path / "clip.json")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("svd-fast train: error: deepspeed.config:") and "gradient_clipping=0.5" in err
    values["deepspeed"]["config"] = str(tmp_path / "other.json")
    config.write_text(json.dumps(values))
    assert main(["--config", str(config), "--deepspeed_config", str(tmp_path / "clip.json")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "differ" in err
    assert main(["--config", str(config), "--no-such-flag"]) == 2
    assert capsys.readouterr().err.count("\n") == 1
