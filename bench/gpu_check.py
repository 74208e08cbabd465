"""The prepared GPU check: one command for a short slot on a fresh GPU machine with no network.

    python bench/gpu_check.py --out DIR [--dry-run] [--budget SECONDS]

Stages run in order of value, each in its own process under a time box (so a hang or a crash of one
stage is recorded and the next still runs): preflight, build, correctness, ops, pytest, unet_step,
end_to_end, vae_decode, optical_flow. Each stage writes DIR/stages/NAME.json; the driver merges them
into DIR/gpu_report.json and DIR/gpu_report.md (printed at the end). ``--dry-run`` runs the same on a
CPU machine: stages that need CUDA are skipped with their reason, correctness and ops run at tiny shapes,
so CI proves the script itself works. bench/gpu_check.sh is the shell entry point.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import time
import traceback
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WHEEL_DIR = ROOT / ".whl"
# Carried wheels install here, outside DIR (whose files are copied back from the GPU machine).
SITE_DIR = Path(os.environ.get("SVD_FAST_GPU_SITE", "/tmp/svd_fast_gpu_site"))
# Seconds per stage on the GPU machine, most valuable first; together <= 6 minutes with the driver's overhead.
BUDGETS = {
    "preflight": 15,
    "build": 90,
    "correctness": 45,
    "ops": 40,
    "pytest": 50,
    "unet_step": 45,
    "end_to_end": 45,
    "vae_decode": 20,
    "optical_flow": 5,
}
NEEDS_CUDA = {"build", "unet_step", "end_to_end", "vae_decode"}
REPORT_KEYS = (
    "device", "torch", "triton", "copy_gbs", "stages", "pytest", "correctness", "ops",
    "unet_step_ms", "end_to_end_s", "peak_reserved_gib", "vae_decode", "optical_flow_engine",
)  # fmt: skip


class Skipped(Exception):
    """A stage that cannot run here (the reason is recorded)."""


# --- helpers used inside stage processes -------------------------------------------------------


def _torch():
    import torch

    return torch


def _device(dry_run: bool):
    torch = _torch()
    if torch.cuda.is_available() and not dry_run:
        return torch.device("cuda")
    return torch.device("cpu")


def _require_cuda(dry_run: bool) -> None:
    if dry_run or not _torch().cuda.is_available():
        raise Skipped("needs a CUDA device" + (" (dry run)" if dry_run else " (none present)"))


def _sync(device) -> None:
    if device.type == "cuda":
        _torch().cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device, repeats: int = 10, warmup: int = 2) -> float:
    """Median milliseconds of ``fn`` (CUDA events on a GPU, wall clock on a CPU)."""
    torch = _torch()
    for _ in range(warmup):
        fn()
    _sync(device)
    samples = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
        else:
            begin = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - begin) * 1e3)
    samples.sort()
    return samples[len(samples) // 2]


def copy_bandwidth_gbs(device) -> float:
    """Device-to-device copy bandwidth, counting read + write bytes."""
    torch = _torch()
    numel = (256 if device.type == "cuda" else 8) * 2**20
    source = torch.empty(numel, dtype=torch.float32, device=device).uniform_()
    target = torch.empty_like(source)
    ms = time_ms(lambda: target.copy_(source), device, repeats=10 if device.type == "cuda" else 3)
    return round(2 * source.numel() * 4 / (ms * 1e-3) / 1e9, 1)


def _available_backends(op_name: str, x, **facts) -> list[str]:
    from svd_fast import backends

    wanted = ("reference", "triton", "cuda") if x.device.type == "cuda" else ("reference", "cpu")
    reasons = backends.unavailable_reasons(op_name, x, **facts)
    return [name for name in wanted if reasons[name] is None]


# --- stages --------------------------------------------------------------------------------------


def stage_preflight(out: Path, dry_run: bool) -> dict:
    torch = _torch()
    facts: dict[str, object] = {
        "python": platform.python_version(),
        "python_h": (Path(sysconfig.get_paths()["include"]) / "Python.h").exists(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu (no CUDA device)",
    }
    try:
        import triton

        facts["triton"] = triton.__version__
    except ImportError as error:
        facts["triton"] = f"missing ({error})"
    nvcc = shutil.which("nvcc") or next((p for p in ("/usr/local/cuda/bin/nvcc",) if os.access(p, os.X_OK)), None)
    facts["nvcc"] = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1] if nvcc else None
    wheels = sorted(WHEEL_DIR.glob("*.whl"))
    facts["wheels"] = [wheel.name for wheel in wheels]
    if wheels and not dry_run:
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--find-links", str(WHEEL_DIR), "--no-deps",
             "--target", str(SITE_DIR), *map(str, wheels)],
            check=True, timeout=60,
        )  # fmt: skip
        facts["wheels_installed_to"] = str(SITE_DIR)
    for module in ("diffusers", "nvidia.dali", "deepspeed", "av", "flash_attn"):
        facts[f"has_{module}"] = _installed(module)
    return facts


def _installed(module: str) -> bool:
    """Whether ``module`` is found on the path (the carried wheels' folder included), without importing it."""
    import importlib.util

    if str(SITE_DIR) not in sys.path:
        sys.path.append(str(SITE_DIR))
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:
        return False


def stage_build(out: Path, dry_run: bool) -> dict:
    _require_cuda(dry_run)
    env = {**os.environ, "TORCH_CUDA_ARCH_LIST": "9.0", "MAX_JOBS": "16", "SVD_FAST_BUILD_CUDA": "1",
           "CUDA_HOME": os.environ.get("CUDA_HOME", "/usr/local/cuda")}  # fmt: skip
    result = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=ROOT, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"build failed:\n{result.stderr[-3000:]}")
    check = subprocess.run(
        [sys.executable, "-c", "import svd_fast._C as C; print(C.built_with_cuda())"], cwd=ROOT, capture_output=True, text=True
    )
    if check.stdout.strip() != "True":
        raise RuntimeError(f"svd_fast._C was built without CUDA kernels: {check.stdout} {check.stderr[-1000:]}")
    return {"built_with_cuda": True}


def stage_pytest(out: Path, dry_run: bool) -> dict:
    env = dict(os.environ)
    if dry_run:
        env["SVD_FAST_GPU_TESTS_MUST_RUN"] = "0"
    tests = ["tests/test_group_norm.py", "tests/test_temporal_attention.py", "tests/test_edm_step.py",
             "tests/test_gpu_test_path.py"] if dry_run else ["tests"]  # fmt: skip
    log = out / "pytest.log"
    # Verbose, one line per case, so that a run cut short by the time box still yields its counts.
    with log.open("w") as stream:
        process = subprocess.Popen(
            [sys.executable, "-m", "pytest", "-m", "gpu", "-v", "-p", "no:cacheprovider", "-rfEs", *tests],
            cwd=ROOT, env=env, stdout=stream, stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            returncode = process.wait(timeout=float(os.environ.get("SVD_FAST_GPU_CHECK_SECONDS", "3600")) - 3)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            returncode = None
    counts = _pytest_counts(log.read_text())
    if returncode is None:
        raise StageFailure(f"pytest -m gpu cut short by the time box: {counts} so far; see pytest.log", {"pytest": counts})
    if returncode not in (0, 5) or counts["failed"]:  # 5: nothing selected
        raise StageFailure(f"pytest -m gpu: {counts}; see pytest.log", {"pytest": counts})
    return {"pytest": counts}


def _pytest_counts(log: str) -> dict[str, int]:
    """passed / failed (errors included) / skipped from ``pytest -v`` result lines."""
    import re

    outcomes = re.findall(r"::\S+ (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)", log)
    return {
        "passed": sum(o in ("PASSED", "XPASS") for o in outcomes),
        "failed": sum(o in ("FAILED", "ERROR") for o in outcomes),
        "skipped": sum(o in ("SKIPPED", "XFAIL") for o in outcomes),
    }


class StageFailure(RuntimeError):
    """A failed stage that still has results to report."""

    def __init__(self, message: str, results: dict) -> None:
        super().__init__(message)
        self.results = results


def _allowed(own_error: float, dtype, magnitude: float, reduction_length: int = 1) -> float:
    """The tests' rule, imported from tests/utils.py."""
    sys.path.insert(0, str(ROOT / "tests"))
    from utils import allowed_error

    return allowed_error(own_error, dtype, magnitude, reduction_length)


def _check(rows: list, op: str, shape, dtype, backend: str, error: float, tolerance: float, failure: str | None = None) -> None:
    rows.append({"op": op, "shape": list(shape), "dtype": str(dtype).replace("torch.", ""), "backend": backend,
                 "max_abs_err": error, "tolerance": tolerance, "ok": failure is None and bool(error <= tolerance),
                 "error": failure})  # fmt: skip


def _run(backend: str, fn: Callable[[], object]) -> tuple[object, str | None]:
    """``fn()`` on ``backend``, or its error (one backend's failure must not hide the others' results)."""
    from svd_fast import backends

    try:
        with backends.use_backend(backend):
            return fn(), None
    except Exception as error:  # noqa: BLE001 - recorded in the report
        return None, repr(error)[:500]


def correctness_shapes(dry_run: bool) -> dict:
    if dry_run:
        return {"group_norm": [(4, 64, 8, 16)], "group_norm_5d": (2, 64, 3, 8, 16), "attention": (2, 3, 16, 2, 64), "edm": (1, 3, 4, 8, 16)}
    return {
        # The UNet's top-level resnets (SVD-XT, CFG batch 2) and the VAE decoder at decode_chunk_size=25 (> 2^31 elements).
        "group_norm": [(50, 320, 72, 128), (25, 256, 576, 1024)],
        "group_norm_5d": (2, 320, 25, 72, 128),  # the temporal resnets' permuted view
        "attention": (2, 25, 9216, 5, 64),  # (B, F, S, heads, D): 18,432 positions x 25 frames
        "edm": (1, 25, 4, 72, 128),
    }


def stage_correctness(out: Path, dry_run: bool) -> dict:
    torch = _torch()
    import torch.nn.functional as F

    from svd_fast.ops import edm_euler_step, group_norm, temporal_attention
    from svd_fast.reference import edm_step as reference_edm
    from svd_fast.reference import group_norm as reference_gn
    from svd_fast.reference import temporal_attention as reference_attention

    device = _device(dry_run)
    shapes = correctness_shapes(dry_run)
    dtype = torch.float16
    rows: list[dict] = []
    generator = torch.Generator(device=device).manual_seed(0)

    def group_norm_case(x, label_shape):
        channels = x.shape[1]
        weight = (torch.rand(channels, device=device, generator=generator) + 0.5).to(dtype)
        bias = torch.randn(channels, device=device, generator=generator).to(dtype)
        for backend in _available_backends("group_norm", x):
            y, failure = _run(backend, lambda: group_norm(x, 32, weight, bias, 1e-5, "silu"))
            if failure:
                _check(rows, "group_norm_silu", label_shape, dtype, backend, float("nan"), float("nan"), failure)
                continue
            # Per sample: GroupNorm is per sample, and float64 copies of the largest input would need 30 GB.
            error = own = magnitude = 0.0
            for n in range(x.shape[0]):
                truth = reference_gn.group_norm(x[n : n + 1].double(), 32, weight.double(), bias.double(), 1e-5, True)
                error = max(error, (y[n : n + 1].double() - truth).abs().max().item())
                torch_y = F.silu(F.group_norm(x[n : n + 1], 32, weight, bias, 1e-5))
                own = max(own, (torch_y.double() - truth).abs().max().item())
                magnitude = max(magnitude, truth.abs().max().item())
                del truth, torch_y
            _check(rows, "group_norm_silu", label_shape, dtype, backend, error, _allowed(own, dtype, magnitude, x[0].numel() // 32))
            del y

    for shape in shapes["group_norm"]:
        x = (torch.randn(shape, device=device, generator=generator, dtype=torch.float32) + 1.0).to(dtype)
        group_norm_case(x, shape)
        del x
    batch, channels, frames, height, width = shapes["group_norm_5d"]
    flat = (torch.randn(batch * frames, channels, height, width, device=device, generator=generator) + 1.0).to(dtype)
    group_norm_case(flat.unflatten(0, (batch, frames)).permute(0, 2, 1, 3, 4), list(shapes["group_norm_5d"]) + ["permuted"])
    del flat

    batch, frames, positions, heads, head_dim = shapes["attention"]
    q, k, v = (torch.randn(batch * frames, positions, heads * head_dim, device=device, generator=generator).to(dtype) for _ in range(3))
    truth = reference_attention.temporal_attention(q.double(), k.double(), v.double(), frames, heads, head_dim**-0.5)
    magnitude = truth.abs().max().item()
    own = (_diffusers_attention(q, k, v, frames, heads).double() - truth).abs().max().item()
    for backend in _available_backends("temporal_attention", q, num_frames=frames, head_dim=head_dim):
        got, failure = _run(backend, lambda: temporal_attention(q, k, v, frames, heads))
        error = float("nan") if failure else (got.double() - truth).abs().max().item()
        _check(rows, "temporal_attention", shapes["attention"], dtype, backend, error, _allowed(own, dtype, magnitude, head_dim + frames), failure)

    shape = shapes["edm"]
    x, uncond, cond = (torch.randn(shape, device=device, generator=generator).to(dtype) for _ in range(3))
    guidance = torch.linspace(1.0, 3.0, shape[1], device=device)
    truth, _ = reference_edm.edm_euler_step(x.double(), uncond.double(), cond.double(), 1.5, 1.2, guidance.double().expand(shape[0], -1), False)
    own = (_torch_edm_step(x, uncond, cond, 1.5, 1.2, guidance).double() - truth).abs().max().item()
    for backend in _available_backends("edm_euler_step", x):
        got, failure = _run(backend, lambda: edm_euler_step(x, uncond, cond, 1.5, 1.2, guidance))
        error = float("nan") if failure else (got.double() - truth).abs().max().item()
        _check(rows, "edm_euler_step", shape, dtype, backend, error, _allowed(own, dtype, truth.abs().max().item()), failure)
    failed = [row for row in rows if not row["ok"]]
    if failed:
        raise StageFailure(f"{len(failed)} correctness case(s) over tolerance", {"correctness": rows})
    return {"correctness": rows}


def _diffusers_attention(q, k, v, frames: int, heads: int):
    """diffusers' temporal attention path: (B*F, S, C) -> (B*S, heads, F, D) -> SDPA -> back."""
    from bench_temporal_attention import diffusers_path

    return diffusers_path(q, k, v, frames, heads)


def _torch_edm_step(x, uncond, cond, sigma: float, sigma_next: float, guidance):
    """diffusers' arithmetic in the storage dtype: guidance, v-prediction denoiser, Euler step."""
    guided = uncond + guidance.to(x.dtype)[None, :, None, None, None] * (cond - uncond)
    c_skip, c_out = 1 / (sigma**2 + 1), -sigma / (sigma**2 + 1) ** 0.5
    denoised = c_skip * x + c_out * guided
    return x + (x - denoised) / sigma * (sigma_next - sigma)


def stage_ops(out: Path, dry_run: bool) -> dict:
    torch = _torch()
    import torch.nn.functional as F

    from svd_fast import backends
    from svd_fast.ops import edm_euler_step, group_norm, temporal_attention

    device = _device(dry_run)
    copy_gbs = copy_bandwidth_gbs(device)
    shapes = correctness_shapes(dry_run)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    repeats = 20 if device.type == "cuda" else 2
    rows: list[dict] = []

    def record(op, shape, backend, ms, min_bytes, baseline, baseline_ms):
        gbs = min_bytes / (ms * 1e-3) / 1e9
        rows.append({"op": op, "shape": list(shape), "dtype": str(dtype).replace("torch.", ""), "backend": backend,
                     "ms": round(ms, 4), "gbs": round(gbs, 1), "pct_of_copy": round(100 * gbs / copy_gbs, 1),
                     "baseline": baseline, "baseline_ms": round(baseline_ms, 4)})  # fmt: skip

    gn_shapes = [(shape, shape) for shape in shapes["group_norm"][:1]]
    batch, channels, frames, height, width = shapes["group_norm_5d"]
    gn_shapes.append(((batch * frames, channels, height, width), list(shapes["group_norm_5d"]) + ["permuted"]))
    for shape, label in gn_shapes:
        x = torch.randn(shape, device=device, dtype=dtype)
        if "permuted" in label:
            x = x.unflatten(0, (batch, frames)).permute(0, 2, 1, 3, 4)
        weight, bias = torch.ones(x.shape[1], device=device, dtype=dtype), torch.zeros(x.shape[1], device=device, dtype=dtype)
        baseline_ms = time_ms(lambda x=x, w=weight, b=bias: F.silu(F.group_norm(x, 32, w, b)), device, repeats)
        for backend in _available_backends("group_norm", x):
            with backends.use_backend(backend):
                ms = time_ms(lambda x=x, w=weight, b=bias: group_norm(x, 32, w, b, 1e-5, "silu"), device, repeats)
            # Compulsory traffic: read x once, write y once.
            record("group_norm_silu", label, backend, ms, 2 * x.numel() * x.element_size(), "torch group_norm + silu", baseline_ms)
        del x

    batch, frames, positions, heads, head_dim = shapes["attention"]
    q, k, v = (torch.randn(batch * frames, positions, heads * head_dim, device=device, dtype=dtype) for _ in range(3))
    baseline_ms = time_ms(lambda: _diffusers_attention(q, k, v, frames, heads), device, repeats)
    for backend in _available_backends("temporal_attention", q, num_frames=frames, head_dim=head_dim):
        with backends.use_backend(backend):
            ms = time_ms(lambda: temporal_attention(q, k, v, frames, heads), device, repeats)
        record("temporal_attention", shapes["attention"], backend, ms, 4 * q.numel() * q.element_size(),
               "diffusers permute + SDPA + permute", baseline_ms)  # fmt: skip

    shape = shapes["edm"]
    x, uncond, cond = (torch.randn(shape, device=device, dtype=dtype) for _ in range(3))
    guidance = torch.linspace(1.0, 3.0, shape[1], device=device)
    baseline_ms = time_ms(lambda: _torch_edm_step(x, uncond, cond, 1.5, 1.2, guidance), device, repeats)
    for backend in _available_backends("edm_euler_step", x):
        with backends.use_backend(backend):
            ms = time_ms(lambda: edm_euler_step(x, uncond, cond, 1.5, 1.2, guidance), device, repeats)
        record("edm_euler_step", shape, backend, ms, 4 * x.numel() * x.element_size(), "diffusers eager arithmetic", baseline_ms)
    return {"copy_gbs": copy_gbs, "ops": rows}


def _unet_inputs(unet, frames: int, device):
    torch = _torch()
    dtype = torch.float16
    sample = torch.randn(2, frames, 8, 72, 128, device=device, dtype=dtype)
    context = torch.randn(2, 1, unet.config.cross_attention_dim, device=device, dtype=dtype)
    time_ids = torch.tensor([[6.0, 127.0, 0.02]] * 2, device=device, dtype=dtype)
    timestep = torch.tensor(0.6, device=device, dtype=dtype)
    return sample, timestep, context, time_ids


def stage_unet_step(out: Path, dry_run: bool) -> dict:
    _require_cuda(dry_run)
    torch = _torch()
    from diffusers import UNetSpatioTemporalConditionModel

    import svd_fast

    device = torch.device("cuda")
    frames = 25
    with torch.device(device):
        unet = UNetSpatioTemporalConditionModel(num_frames=frames).to(torch.float16).eval()
    inputs = _unet_inputs(unet, frames, device)
    results: dict[str, float | None] = dict.fromkeys(("eager", "optimized", "optimized_cuda", "optimized_cuda_graphs"))
    partial = {"unet_step_ms": results}

    def step():
        return unet(*inputs).sample

    with torch.inference_mode():
        results["eager"] = round(time_ms(step, device, repeats=5), 2)
        _write_partial(out, partial)
        for key, options in (("optimized", {}), ("optimized_cuda", {"backend": "cuda"}), ("optimized_cuda_graphs", {"cuda_graphs": True})):
            svd_fast.optimize(unet, **options)
            try:
                results[key] = round(time_ms(step, device, repeats=5), 2)
            except Exception as error:  # noqa: BLE001 - one variant's failure must not lose the others
                results[key] = None
                partial.setdefault("errors", {})[key] = repr(error)[:500]
            finally:
                svd_fast.restore(unet)
            _write_partial(out, partial)
    return partial


def _write_partial(out: Path, results: dict) -> None:
    """Results so far, kept if the stage is killed by its time box."""
    (out / "stages" / f"{os.environ['SVD_FAST_GPU_CHECK_STAGE']}.partial.json").write_text(json.dumps(results))


def stage_end_to_end(out: Path, dry_run: bool) -> dict:
    _require_cuda(dry_run)
    torch = _torch()
    import numpy as np
    from PIL import Image

    import svd_fast
    from svd_fast.diffusers.full_size import NUM_FRAMES, random_full_size_pipeline

    device = torch.device("cuda")
    pipe = random_full_size_pipeline("svd-xt", device=device)
    pipe.set_progress_bar_config(disable=True)
    image = Image.fromarray((np.random.default_rng(0).random((576, 1024, 3)) * 255).astype(np.uint8))
    seconds: dict[str, float | None] = {"eager": None, "optimized": None}
    peak: dict[str, float | None] = {"eager": None, "optimized": None}
    partial = {"end_to_end_s": seconds, "peak_reserved_gib": peak}
    for key in ("eager", "optimized"):
        if key == "optimized":
            svd_fast.optimize(pipe)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        begin = time.perf_counter()
        pipe(image, height=576, width=1024, num_frames=NUM_FRAMES["svd-xt"], num_inference_steps=25, decode_chunk_size=8, output_type="pt")
        torch.cuda.synchronize(device)
        seconds[key] = round(time.perf_counter() - begin, 2)
        # Reserved, not allocated: CUDA-graph pools and the caching allocator's blocks are what a user must fit.
        peak[key] = round(torch.cuda.max_memory_reserved(device) / 2**30, 2)
        _write_partial(out, partial)
    return partial


def stage_vae_decode(out: Path, dry_run: bool) -> dict:
    _require_cuda(dry_run)
    torch = _torch()
    from diffusers import AutoencoderKLTemporalDecoder

    import svd_fast
    from svd_fast.diffusers.full_size import SVD_VAE_CONFIG

    device = torch.device("cuda")
    with torch.device(device):
        vae = AutoencoderKLTemporalDecoder(**SVD_VAE_CONFIG).to(torch.float16).eval()
    svd_fast.optimize(vae)
    frames = 25
    latents = torch.randn(frames, 4, 72, 128, device=device, dtype=torch.float16)
    rows: list[dict] = []
    with torch.inference_mode():
        for chunk in (8, 14, 25):
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            begin = time.perf_counter()
            for start in range(0, frames, chunk):
                piece = latents[start : start + chunk]
                vae.decode(piece, num_frames=piece.shape[0])
            torch.cuda.synchronize(device)
            rows.append({"decode_chunk_size": chunk, "seconds": round(time.perf_counter() - begin, 3),
                         "peak_reserved_gib": round(torch.cuda.max_memory_reserved(device) / 2**30, 2)})  # fmt: skip
            _write_partial(out, {"vae_decode": rows})
    return {"vae_decode": rows}


def stage_optical_flow(out: Path, dry_run: bool) -> dict:
    probe: dict[str, object] = {"dali_installed": _installed("nvidia.dali")}
    smi = shutil.which("nvidia-smi")
    if smi is None:
        probe["nvidia_smi"] = "not found"
    else:
        text = subprocess.run([smi, "-q"], capture_output=True, text=True, timeout=20).stdout
        probe["ofa_lines"] = [line.strip() for line in text.splitlines() if "OFA" in line or "Optical Flow" in line]
    return {"optical_flow_engine": probe}


STAGES: dict[str, Callable[[Path, bool], dict]] = {
    "preflight": stage_preflight,
    "build": stage_build,
    "correctness": stage_correctness,
    "ops": stage_ops,
    "pytest": stage_pytest,
    "unet_step": stage_unet_step,
    "end_to_end": stage_end_to_end,
    "vae_decode": stage_vae_decode,
    "optical_flow": stage_optical_flow,
}


def run_stage(name: str, out: Path, dry_run: bool) -> int:
    """Body of one stage process: writes DIR/stages/NAME.json with status, seconds, error and results."""
    begin = time.perf_counter()
    record: dict[str, object] = {"status": "ok", "error": None, "results": {}}
    try:
        record["results"] = STAGES[name](out, dry_run)
    except Skipped as reason:
        record.update(status="skipped", error=str(reason))
    except StageFailure as failure:
        record.update(status="failed", error=str(failure), results=failure.results)
    except Exception as error:  # noqa: BLE001 - a stage's failure is recorded, the next stage still runs
        record.update(status="failed", error="".join(traceback.format_exception(error))[-3000:])
    record["seconds"] = round(time.perf_counter() - begin, 1)
    (out / "stages" / f"{name}.json").write_text(json.dumps(record, indent=1))
    return 0 if record["status"] != "failed" else 1


# --- driver --------------------------------------------------------------------------------------


def drive(out: Path, dry_run: bool, budget: float, only: list[str] | None) -> dict:
    (out / "stages").mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + budget
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), str(SITE_DIR), os.environ.get("PYTHONPATH")) if p)}  # fmt: skip
    if dry_run:
        env["TRITON_INTERPRET"] = env.get("TRITON_INTERPRET", "0")
    for name in STAGES:
        if only and name not in only:
            continue
        if dry_run and name in NEEDS_CUDA:
            _write_stage(out, name, "skipped", 0.0, "needs a CUDA device (dry run)")
            continue
        remaining = deadline - time.monotonic()
        limit = min(BUDGETS[name] * (3 if dry_run else 1), remaining)
        if limit < 3:
            _write_stage(out, name, "skipped", 0.0, f"no time left in the {budget:.0f} s budget")
            continue
        begin = time.perf_counter()
        command = [sys.executable, str(Path(__file__).resolve()), "--out", str(out), "--stage", name] + (["--dry-run"] if dry_run else [])
        print(f"[gpu_check] {name} (time box {limit:.0f} s)", flush=True)
        try:
            stage_env = {**env, "SVD_FAST_GPU_CHECK_STAGE": name, "SVD_FAST_GPU_CHECK_SECONDS": str(limit)}
            subprocess.run(command, cwd=ROOT, env=stage_env, timeout=limit)
        except subprocess.TimeoutExpired:
            partial = out / "stages" / f"{name}.partial.json"
            results = json.loads(partial.read_text()) if partial.exists() else {}
            _write_stage(out, name, "failed", time.perf_counter() - begin, f"timed out after {limit:.0f} s", results)
        if not (out / "stages" / f"{name}.json").exists():
            _write_stage(out, name, "failed", time.perf_counter() - begin, "the stage process died without a report")
    report = merge(out)
    (out / "gpu_report.json").write_text(json.dumps(report, indent=1))
    (out / "gpu_report.md").write_text(markdown(report))
    return report


def _write_stage(out: Path, name: str, status: str, seconds: float, error: str, results: dict | None = None) -> None:
    record = {"status": status, "seconds": round(seconds, 1), "error": error, "results": results or {}}
    (out / "stages" / f"{name}.json").write_text(json.dumps(record, indent=1))


def merge(out: Path) -> dict:
    report: dict[str, object] = {
        "device": None, "torch": None, "triton": None, "copy_gbs": None, "stages": {},
        "pytest": {"passed": 0, "failed": 0, "skipped": 0}, "correctness": [], "ops": [],
        "unet_step_ms": dict.fromkeys(("eager", "optimized", "optimized_cuda", "optimized_cuda_graphs")),
        "end_to_end_s": {"eager": None, "optimized": None}, "peak_reserved_gib": {"eager": None, "optimized": None},
        "vae_decode": [], "optical_flow_engine": None,
    }  # fmt: skip
    for name in STAGES:
        path = out / "stages" / f"{name}.json"
        if not path.exists():
            continue
        record = json.loads(path.read_text())
        report["stages"][name] = {key: record[key] for key in ("status", "seconds", "error")}
        results = record.get("results") or {}
        if name == "preflight":
            report.update(device=results.get("device"), torch=results.get("torch"), triton=results.get("triton"))
            report["preflight"] = results
        else:
            report.update({key: value for key, value in results.items() if key in REPORT_KEYS or key == "errors"})
    return report


def markdown(report: dict) -> str:
    lines = [f"# GPU check: {report['device']}", "",
             f"torch {report['torch']}, triton {report['triton']}, copy bandwidth {report['copy_gbs']} GB/s", "",
             "| stage | status | seconds | error |", "|---|---|---|---|"]  # fmt: skip
    for name, stage in report["stages"].items():
        error = (stage["error"] or "").strip().splitlines()
        lines.append(f"| {name} | {stage['status']} | {stage['seconds']} | {error[-1][:160] if error else ''} |")
    lines += ["", f"pytest -m gpu: {report['pytest']}", "", "| op | shape | dtype | backend | max abs err | tolerance | ok |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['op']} | {r['shape']} | {r['dtype']} | {r['backend']} | {r['max_abs_err']:.3g} | {r['tolerance']:.3g} | {r['ok']} |" for r in report["correctness"]]
    lines += ["", "| op | shape | backend | ms | GB/s | % of copy | baseline | baseline ms |", "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['op']} | {r['shape']} | {r['backend']} | {r['ms']} | {r['gbs']} | {r['pct_of_copy']} | {r['baseline']} | {r['baseline_ms']} |" for r in report["ops"]]
    lines += ["", f"UNet step ms (25 frames, 576x1024, fp16, batch 2): {report['unet_step_ms']}",
              f"SVD-XT end to end s (25 steps): {report['end_to_end_s']}; peak reserved GiB: {report['peak_reserved_gib']}",
              f"VAE decode: {report['vae_decode']}", f"optical-flow engine: {report['optical_flow_engine']}", ""]  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--dry-run", action="store_true", help="CPU machine: skip CUDA stages, tiny shapes")
    parser.add_argument("--budget", type=float, default=345.0, help="seconds for all stages together")
    parser.add_argument("--stage", choices=sorted(STAGES), help=argparse.SUPPRESS)
    parser.add_argument("--only", nargs="+", choices=sorted(STAGES), help="run these stages only")
    args = parser.parse_args(argv)
    out = args.out.resolve()
    if args.stage:
        return run_stage(args.stage, out, args.dry_run)
    report = drive(out, args.dry_run, args.budget, args.only)
    print((out / "gpu_report.md").read_text())
    return 0 if all(stage["status"] != "failed" for stage in report["stages"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
