"""Stock diffusers habits after svd_fast.optimize: a saved pipeline loads in stock diffusers (a fresh process
without svd_fast), a scheduler swapped in after optimize() samples exactly as stock diffusers does with it, and
an fp16-only folder (``*.fp16.safetensors``, as the Hub's repositories are usually downloaded) loads with a
variant."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, EulerAncestralDiscreteScheduler, EulerDiscreteScheduler
from PIL import Image

import svd_fast
from svd_fast.diffusers.tiny import TINY_HEIGHT, TINY_NUM_FRAMES, TINY_WIDTH, tiny_pipeline

LOAD_WITH_STOCK_DIFFUSERS = """
import json, sys
from diffusers import StableVideoDiffusionPipeline
pipe = StableVideoDiffusionPipeline.from_pretrained(sys.argv[1])
loaded = sorted(name for name in sys.modules if name.split(".")[0] == "svd_fast")
print(json.dumps({"scheduler": type(pipe.scheduler).__name__, "svd_fast_modules": loaded,
                  "unet_params": sum(p.numel() for p in pipe.unet.parameters())}))
"""


@pytest.fixture(scope="module")
def image() -> Image.Image:
    return Image.fromarray((np.random.default_rng(0).random((TINY_HEIGHT, TINY_WIDTH, 3)) * 255).astype(np.uint8))


def _latents(pipe, image: Image.Image) -> torch.Tensor:
    return pipe(image, height=TINY_HEIGHT, width=TINY_WIDTH, num_frames=TINY_NUM_FRAMES, num_inference_steps=3,
                generator=torch.Generator().manual_seed(0), output_type="latent").frames


def test_saved_optimized_pipeline_loads_in_stock_diffusers(tmp_path: Path) -> None:
    pipe = svd_fast.optimize(tiny_pipeline(seed=0), backend="reference")
    pipe.save_pretrained(tmp_path / "saved", safe_serialization=True)
    index = json.loads((tmp_path / "saved" / "model_index.json").read_text())
    assert index["_class_name"] == "StableVideoDiffusionPipeline"
    assert index["scheduler"] == ["diffusers", "EulerDiscreteScheduler"]
    # A fresh interpreter that never imports svd_fast (not on its path either).
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", LOAD_WITH_STOCK_DIFFUSERS, str(tmp_path / "saved")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    loaded = json.loads(proc.stdout.strip().splitlines()[-1])
    assert loaded == {"scheduler": "EulerDiscreteScheduler", "svd_fast_modules": [],
                      "unet_params": sum(p.numel() for p in pipe.unet.parameters())}


@pytest.mark.parametrize("scheduler_class", [EulerAncestralDiscreteScheduler, DDIMScheduler])
def test_scheduler_swapped_after_optimize_samples_as_stock(image: Image.Image, scheduler_class: type) -> None:
    stock = tiny_pipeline(seed=0)
    stock.scheduler = scheduler_class.from_config(stock.scheduler.config)
    expected = _latents(stock, image)

    pipe = svd_fast.optimize(tiny_pipeline(seed=0), backend="reference")
    pipe.scheduler = scheduler_class.from_config(pipe.scheduler.config)
    with pytest.warns(UserWarning, match=f"{scheduler_class.__name__}; running diffusers' denoising loop"):
        swapped = _latents(pipe, image)
    # The UNet and VAE keep svd_fast's kernels: the same fp32 math in another order (test_optimize's bound), far
    # below the O(0.1) difference of running svd_fast's Euler step on this scheduler's sigmas.
    relative = ((swapped - expected).norm() / expected.norm()).item()
    assert relative < 1e-4, relative

    # Back to the Euler scheduler: the fused loop runs again (no warning) and matches stock Euler.
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    euler = tiny_pipeline(seed=0)
    fused = _latents(pipe, image)
    assert ((fused - _latents(euler, image)).norm() / fused.norm()).item() < 1e-4


def test_fused_only_settings_refuse_an_unsupported_scheduler(image: Image.Image) -> None:
    pipe = svd_fast.optimize(tiny_pipeline(seed=0), backend="reference", sampler="ipndm-2")
    pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)
    with pytest.raises(ValueError, match=r"EulerAncestralDiscreteScheduler.*sampler='ipndm-2'"):
        _latents(pipe, image)


def test_fp16_only_folder_loads_with_variant(tmp_path: Path, image: Image.Image, capsys) -> None:
    from svd_fast.cli import main

    folder = tmp_path / "svd-fp16"
    tiny_pipeline(seed=0, dtype=torch.float16).save_pretrained(folder, variant="fp16", safe_serialization=True)
    weights = sorted(path.name for path in folder.rglob("*.safetensors"))
    assert weights and all(name.endswith(".fp16.safetensors") for name in weights), weights
    image.save(tmp_path / "first.png")
    capsys.readouterr()
    common = ["generate", "--model", str(folder), "--image", str(tmp_path / "first.png"), "--frames", "2", "--steps", "1",
              "--device", "cpu", "--dtype", "fp32", "--backend", "reference"]
    assert main([*common, "--out", str(tmp_path / "without.gif")]) == 2  # no plain weights: one line, not a traceback
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("svd-fast generate: error: --model: could not load")
    assert main([*common, "--variant", "fp16", "--out", str(tmp_path / "with.gif")]) == 0
    with Image.open(tmp_path / "with.gif") as gif:
        assert gif.n_frames == 2 and gif.size == (TINY_WIDTH, TINY_HEIGHT)
