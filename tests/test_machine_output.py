"""Scriptable output: `--json` and JSON summaries are the whole of stdout (DeepSpeed's and the progress lines go
to stderr, also when DeepSpeed picks its accelerator itself), the command line parses and prints --help without
importing torch, `svd-fast --version` and `svd-fast env`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from svd_fast.data import synthetic

REPO = Path(__file__).resolve().parents[1]


def _run(*args: str, cwd: Path = REPO, code: str | None = None) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key not in ("DS_ACCELERATOR", "TRITON_INTERPRET")}
    env["PYTHONPATH"] = str(REPO)
    command = [sys.executable, "-c", code] if code else [sys.executable, "-m", "svd_fast.cli", *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_plan_memory_json_is_all_of_stdout_without_a_preset_accelerator() -> None:
    proc = _run("train", "--plan-memory", "--config", "configs/train_svd_xt_25x576x1024_8gpu_zero2.yaml", "--gpus", "8", "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    plan = json.loads(proc.stdout)
    assert plan["per_gpu_peak_gib"] > plan["model_states_gib"] > 0


def test_curate_summary_is_all_of_stdout(tmp_path: Path) -> None:
    (tmp_path / "videos").mkdir()
    synthetic.write_video(tmp_path / "videos" / "pan.mp4", synthetic.translating_texture(12, 48, 64, (0, 1)), fps=8)
    proc = _run("curate", "--input", str(tmp_path / "videos"), "--out", str(tmp_path / "m.parquet"), "--no-ocr")
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(proc.stdout)
    assert summary["files"] == 1 and summary["files_failed"] == 0
    assert "pan.mp4" in proc.stderr  # the progress bar names the file done, on stderr


PARSE_WITHOUT_TORCH = """
import contextlib, io, sys
from svd_fast.cli import COMMANDS, build_parser, main
parser = build_parser()
for command in COMMANDS:
    with contextlib.redirect_stdout(io.StringIO()) as text, contextlib.suppress(SystemExit):
        main([command.replace("_", "-"), "--help"])
    assert "usage:" in text.getvalue(), command
parser.parse_args(["train", "--config", "c.yaml", "--deepspeed_config", "ds.json", "--plan-memory", "--json"])
parser.parse_args(["generate", "--model", "m", "--image", "i.png", "--out", "o.mp4"])
heavy = sorted(name for name in ("torch", "numpy", "diffusers", "deepspeed", "triton") if name in sys.modules)
print(",".join(heavy) or "none")
"""


def test_parsing_and_help_import_no_torch() -> None:
    proc = _run(code=PARSE_WITHOUT_TORCH)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "none"


def test_names_spelled_out_for_parsing_match_the_library() -> None:
    from svd_fast.backends import BACKENDS
    from svd_fast.commands.generate import BACKEND_NAMES

    assert BACKEND_NAMES == BACKENDS


def test_version_and_env() -> None:
    import svd_fast

    version = _run("--version")
    assert version.returncode == 0 and version.stdout.strip() == f"svd-fast {svd_fast.__version__}"
    report = _run("env", "--json")
    assert report.returncode == 0, report.stderr[-2000:]
    facts = json.loads(report.stdout)
    import torch

    assert facts["versions"]["torch"] == torch.__version__
    assert facts["cuda"]["available"] == torch.cuda.is_available()
    assert facts["backends"]["reference"] == {"available": True, "reason": None}
    from svd_fast import _extension

    assert facts["extension"] == json.loads(json.dumps(_extension.build_info()))
    if not torch.cuda.is_available():
        assert not facts["backends"]["cuda"]["available"] and facts["backends"]["cuda"]["reason"]
    text = _run("env")
    assert text.returncode == 0 and "kernel backends:" in text.stdout and "reference: available" in text.stdout

