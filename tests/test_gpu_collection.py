"""`pytest -m gpu tests` collects on the GPU machine's image, which lacks some of the optional packages CI has.

bench/gpu_check.py's pytest stage is the project's one chance to run the gpu cases; a test module that imports
one of the image's missing packages at module level stops that collection. Here the collection runs with those
packages made unimportable (``sys.modules[name] = None``, as for a package that is not installed) and must
collect, without an error, exactly the gpu cases it collects with every package present.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# The GPU machine's image has torch, triton, numpy, transformers, ... but not these (diffusers travels with the job).
IMAGE_MISSING = ("av", "ray", "deepspeed", "nvidia.dali", "pytesseract", "scenedetect", "flash_attn")
BLOCKING_PLUGIN = f"""import sys

for name in {IMAGE_MISSING!r}:
    sys.modules[name] = None
"""


def _collect_gpu_cases(plugin_dir: Path, block: bool) -> subprocess.Popen:
    plugin = ["-p", "block_image_missing"] if block else []
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(plugin_dir), str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *plugin, "-m", "gpu", "tests"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


def _node_ids(output: str) -> set[str]:
    return {line for line in output.splitlines() if line.startswith("tests/") and "::" in line}


@pytest.mark.slow
def test_gpu_cases_collect_without_the_images_missing_packages(tmp_path: Path) -> None:
    (tmp_path / "block_image_missing.py").write_text(BLOCKING_PLUGIN)
    blocked, present = (_collect_gpu_cases(tmp_path, block) for block in (True, False))  # both run at once
    blocked_output, present_output = (process.communicate(timeout=900)[0] for process in (blocked, present))
    assert present.returncode == 0, present_output[-4000:]
    expected = _node_ids(present_output)
    assert expected, "no gpu case collected with every package present"
    assert blocked.returncode == 0, f"collection failed with {', '.join(IMAGE_MISSING)} missing:\n{blocked_output[-4000:]}"
    assert "error" not in blocked_output.strip().splitlines()[-1], blocked_output[-4000:]
    missing = sorted(expected - _node_ids(blocked_output))
    assert not missing, f"{len(missing)} of {len(expected)} gpu cases not collected without the image's missing packages: {missing[:10]}"
    assert _node_ids(blocked_output) == expected
