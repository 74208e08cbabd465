"""The prepared GPU check: one job for a short slot on a fresh GPU machine with no network.

    bash bench/gpu_check.sh --out DIR [--dry-run]          (installs carried wheels, then runs this)
    python bench/gpu_check.py --out DIR [--dry-run] [--budget SECONDS] [--only STAGE ...]

Stages run in order of value, each in its own process group under a time box (a hang or a crash of one
stage is recorded, its whole process group is killed, and the next stage runs): preflight, build,
correctness, ops, pytest, unet_step, train_memory, end_to_end, vae_decode, optical_flow. Stages write their records
and bulky files under the git-ignored WORK folder (build/gpu_check/); a stage that fails, however it
fails, keeps the partial results it wrote as it went. DIR receives exactly three files: gpu_report.json,
gpu_report.md (also printed at the end) and gpu_check_files.tar.gz (every stage record and log), so that
the results fit what comes back from the GPU machine. ``--dry-run`` runs the same on a CPU machine:
stages that need CUDA are skipped with their reason, correctness and ops run at tiny shapes, so CI
proves the script itself works.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import tarfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Per-stage records, partial results and logs: under build/ (git-ignored), packed into one tarball in DIR.
WORK_DIR = ROOT / "build" / "gpu_check"
TARBALL = "gpu_check_files.tar.gz"
# Carried wheels are installed here by gpu_check.sh before Python starts (outside DIR and WORK).
SITE_DIR = Path(os.environ.get("SVD_FAST_GPU_SITE", "/tmp/svd_fast_gpu_site"))
# Seconds per stage on the GPU machine, most valuable first: 420 s together, which leaves the rest of the
# job's 8 minutes (bench/gpu_check.sh) to the wheel install and the packing of the results.
BUDGETS = {
    "preflight": 15,
    "build": 65,
    "correctness": 35,
    "ops": 50,
    "pytest": 50,
    "unet_step": 90,
    "train_memory": 45,
    "end_to_end": 50,
    "vae_decode": 15,
    "optical_flow": 5,
}
STAGE_SECONDS = sum(BUDGETS.values())
# Seconds kept after the stages for merging and packing the report.
PACKING_SECONDS = 15
NEEDS_CUDA = {"build", "unet_step", "train_memory", "end_to_end", "vae_decode"}
# The training shape the train_memory stage measures: the one-GPU LoRA config's.
TRAIN_MEMORY_CONFIG = ROOT / "configs" / "train_svd_xt_lora_1gpu.yaml"
# A dry run's ops stage runs under the Triton interpreter, so that a CPU exercises the launch-plan variants.
DRY_RUN_INTERPRETED = {"ops"}
# End to end at a few steps (25 do not fit the box); the per-step time and its extrapolation are reported.
END_TO_END_STEPS = 4
FULL_STEPS = 25
PYTEST_KEYS = ("passed", "failed", "skipped", "errors")
REPORT_KEYS = (
    "device", "torch", "triton", "copy_gbs", "stages", "pytest", "correctness", "ops", "fastest_plans",
    "unet_step_ms", "train_memory", "end_to_end_s", "peak_reserved_gib", "vae_decode", "optical_flow_engine",
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


def stage_preflight(work: Path, dry_run: bool) -> dict:
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
    nvcc = shutil.which("nvcc")
    facts["nvcc"] = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1] if nvcc else None
    home = cuda_home()
    facts["cuda_home"] = str(home) if home else None
    # What bench/gpu_check.sh installed (or skipped because the image has the package) before Python started.
    facts["wheels_installed"] = os.environ.get("SVD_FAST_GPU_WHEELS_INSTALLED", "").split()
    facts["wheels_skipped"] = os.environ.get("SVD_FAST_GPU_WHEELS_SKIPPED", "").split()
    facts["wheel_install_error"] = os.environ.get("SVD_FAST_GPU_WHEEL_ERROR") or None
    for module in ("diffusers", "PIL", "nvidia.dali", "deepspeed", "av", "flash_attn"):
        facts[f"has_{module}"] = _installed(module)
    return facts


def cuda_home() -> Path | None:
    """The CUDA toolkit of the ``nvcc`` on PATH, else $CUDA_HOME. nvcc's own dry run names its toolkit
    (``TOP=``): the nvcc on PATH may be a wrapper script outside the toolkit (e.g. /usr/local/bin/nvcc)."""
    nvcc = shutil.which("nvcc")
    if nvcc:
        dry = subprocess.run([nvcc, "-dryrun", "-E", "-x", "cu", os.devnull], capture_output=True, text=True, timeout=30)
        top = re.search(r"^#\$ TOP=(\S+)", dry.stdout + dry.stderr, flags=re.MULTILINE)
        return Path(top.group(1)).resolve() if top else Path(nvcc).resolve().parent.parent
    return Path(os.environ["CUDA_HOME"]) if os.environ.get("CUDA_HOME") else None


def _installed(module: str) -> bool:
    """Whether ``module`` is found on the path (the carried wheels' folder included), without importing it."""
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:
        return False


def _seconds_left() -> float:
    """Seconds left in this stage's time box (set by the driver)."""
    return float(os.environ.get("SVD_FAST_GPU_CHECK_DEADLINE", time.time() + 3600)) - time.time()


def stage_build(work: Path, dry_run: bool) -> dict:
    _require_cuda(dry_run)
    home = cuda_home()
    if home is None:
        raise RuntimeError("no nvcc on PATH and no CUDA_HOME: cannot build the CUDA kernels")
    env = {**os.environ, "TORCH_CUDA_ARCH_LIST": "9.0", "MAX_JOBS": str(os.cpu_count() or 4), "SVD_FAST_BUILD_CUDA": "1",
           "CUDA_HOME": str(home)}  # fmt: skip
    # Same process group as this stage: the driver's group kill on timeout stops the compilers too.
    result = subprocess.run(
        [sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=max(1.0, _seconds_left() - 5),
    )  # fmt: skip
    (work / "build.log").write_text(result.stdout + result.stderr)
    if result.returncode != 0:
        raise RuntimeError(f"build failed (CUDA_HOME={home}):\n{result.stderr[-3000:]}")
    check = subprocess.run(
        [sys.executable, "-c", "import svd_fast._C as C; print(C.built_with_cuda())"], cwd=ROOT, capture_output=True, text=True
    )
    if check.stdout.strip() != "True":
        raise RuntimeError(f"svd_fast._C was built without CUDA kernels: {check.stdout} {check.stderr[-1000:]}")
    return {"built_with_cuda": True, "cuda_home": str(home)}


def stage_pytest(work: Path, dry_run: bool) -> dict:
    env = dict(os.environ)
    if dry_run:
        env["SVD_FAST_GPU_TESTS_MUST_RUN"] = "0"
    tests = ["tests/test_group_norm.py", "tests/test_temporal_attention.py", "tests/test_edm_step.py",
             "tests/test_gpu_test_path.py"] if dry_run else ["tests"]  # fmt: skip
    log = work / "pytest.log"
    # Verbose, one line per case, so that a run cut short by the time box still yields its counts; a module
    # that cannot be imported on the image is counted as an error while every other module still runs.
    with log.open("w") as stream:
        process = subprocess.Popen(
            [sys.executable, "-m", "pytest", "-m", "gpu", "-v", "-p", "no:cacheprovider", "-rfEs",
             "--continue-on-collection-errors", *tests],
            cwd=ROOT, env=env, stdout=stream, stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            returncode = process.wait(timeout=max(1.0, _seconds_left() - 3))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            returncode = None
    counts = pytest_counts(log.read_text())
    if returncode is None:
        raise StageFailure(f"pytest -m gpu cut short by the time box: {counts} so far; see gpu_check/pytest.log in the tarball", {"pytest": counts})
    if returncode not in (0, 5) or counts["failed"] or counts["errors"]:  # 5: nothing selected
        raise StageFailure(f"pytest -m gpu: {counts}; see gpu_check/pytest.log in the tarball", {"pytest": counts})
    return {"pytest": counts}


def pytest_counts(log: str) -> dict[str, int]:
    """passed / failed / skipped / errors from ``pytest -v -rE`` output. Errors are test ids with an ERROR
    result line (setup or teardown) or an ``ERROR path`` summary line (a module that failed to collect),
    each counted once; a run cut short before its summary still counts the collection errors announced
    in its header (``collected N items / K errors``)."""
    outcomes = re.findall(r"^(\S+::\S+) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)", log, flags=re.MULTILINE)
    errors = {test for test, outcome in outcomes if outcome == "ERROR"}
    errors |= set(re.findall(r"^ERROR (\S+)", log, flags=re.MULTILINE))
    collection = re.search(r"collected \d+ items? / (\d+) errors?", log)
    collection_errors = int(collection.group(1)) if collection else 0
    return {
        "passed": sum(o in ("PASSED", "XPASS") for _, o in outcomes),
        "failed": sum(o == "FAILED" for _, o in outcomes),
        "skipped": sum(o in ("SKIPPED", "XFAIL") for _, o in outcomes),
        "errors": max(len(errors), collection_errors),
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
        # The UNet's top-level resnets (SVD-XT, CFG batch 2), a deep level (the one-pass plan's) and the VAE decoder
        # at decode_chunk_size=25 (> 2^31 elements).
        "group_norm": [(50, 320, 72, 128), (50, 1280, 18, 32), (25, 256, 576, 1024)],
        "group_norm_5d": (2, 320, 25, 72, 128),  # the temporal resnets' permuted view
        "attention": (2, 25, 9216, 5, 64),  # (B, F, S, heads, D): 18,432 positions x 25 frames
        "edm": (1, 25, 4, 72, 128),
    }


def stage_correctness(work: Path, dry_run: bool) -> dict:
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


# Launch-plan variants the ops stage times (through each Triton module's launch_plan_override), so that one
# GPU job can set the defaults: temporal attention (BLOCK_P positions per program, warps) and GroupNorm's
# two-pass tile size in elements, or its one-pass plan (timed where the group fits it).
ATTENTION_PLANS = ((1, 4), (2, 2), (1, 1), (4, 4))
GROUP_NORM_TILES = (4096, 8192)
GROUP_NORM_PLANS = tuple((f"tile={tile}", {"tile_elements": tile, "one_pass": False}) for tile in GROUP_NORM_TILES) + (
    ("one-pass", {"one_pass": True}),
)
# Rotating input sets hold together at least this many bytes (3x an H200's 60 MB L2), at least 2 sets, so that
# repeated calls read memory, not the cache.
ROTATION_BYTES = 180 * 2**20


def _input_sets(make: Callable[[], tuple], set_bytes: int, device) -> list[tuple]:
    count = 2 if device.type != "cuda" else min(8, max(2, -(-ROTATION_BYTES // max(set_bytes, 1))))
    return [make() for _ in range(count)]


def time_rotating(fn: Callable[..., object], input_sets: list[tuple], device, repeats: int) -> float:
    """Median ms of ``fn(*inputs)``, each call on the next of ``input_sets`` (one warm-up call per set)."""
    calls = iter(range(10**9))
    return time_ms(lambda: fn(*input_sets[next(calls) % len(input_sets)]), device, repeats, warmup=len(input_sets))


def _triton_available(op_name: str, x, **facts) -> bool:
    from svd_fast import backends

    return backends.unavailable_reasons(op_name, x, **facts)["triton"] is None


def fastest_plans(rows: list[dict]) -> list[dict]:
    """Per (op, shape): the fastest timed launch plan, beside the default plan's time."""
    best: dict[tuple[str, str], dict] = {}
    for row in rows:
        if row.get("plan") is None:
            continue
        key = (row["op"], str(row["shape"]))
        entry = best.setdefault(key, {"op": row["op"], "shape": row["shape"], "plan": None, "ms": float("inf"),
                                      "default_plan": None, "default_ms": None})  # fmt: skip
        if row["ms"] < entry["ms"]:
            entry.update(plan=row["plan"], ms=row["ms"])
        if row["default_plan"]:
            entry.update(default_plan=row["plan"], default_ms=row["ms"])
    return list(best.values())


def stage_ops(work: Path, dry_run: bool) -> dict:
    """Each op against diffusers' path (or torch's), every available backend, and the Triton backend at every
    launch-plan variant, in one process on rotating inputs. Bandwidth is reported twice: over the compulsory
    bytes (each input read once, each output written once: % of the copy bandwidth is the headroom left)
    and over the bytes the kernel's design moves (two-pass GroupNorm reads x twice: 3N where 2N are compulsory;
    the one-pass plan moves the 2N)."""
    torch = _torch()
    import torch.nn.functional as F

    from svd_fast import backends
    from svd_fast.ops import edm_euler_step, group_norm, temporal_attention
    from svd_fast.triton import group_norm as triton_group_norm
    from svd_fast.triton import temporal_attention as triton_attention

    device = _device(dry_run)
    copy_gbs = copy_bandwidth_gbs(device)
    shapes = correctness_shapes(dry_run)
    if dry_run:
        # The interpreter runs each program in Python: the fewest programs that still span several per group.
        shapes.update(group_norm=[(1, 32, 4, 8), (1, 32, 2, 4)], group_norm_5d=(1, 32, 2, 4, 8))
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    repeats = 20 if device.type == "cuda" else 1
    rows: list[dict] = []
    partial = {"copy_gbs": copy_gbs, "ops": rows}

    def record(op, shape, backend, ms, compulsory_bytes, designed_bytes, baseline, baseline_ms, plan=None, default_plan=False):
        gbs = compulsory_bytes / (ms * 1e-3) / 1e9
        rows.append({"op": op, "shape": list(shape), "dtype": str(dtype).replace("torch.", ""), "backend": backend,
                     "plan": plan, "default_plan": default_plan, "ms": round(ms, 4), "compulsory_bytes": compulsory_bytes,
                     "gbs": round(gbs, 1), "pct_of_copy": round(100 * gbs / copy_gbs, 1), "designed_bytes": designed_bytes,
                     "designed_gbs": round(designed_bytes / (ms * 1e-3) / 1e9, 1) if designed_bytes else None,
                     "baseline": baseline, "baseline_ms": round(baseline_ms, 4)})  # fmt: skip
        _write_partial(work, partial)

    # The top level (two-pass: its groups are too large for one program) and a deep level (one-pass by default).
    gn_shapes = [(shape, shape) for shape in shapes["group_norm"][:2]]
    batch, channels, frames, height, width = shapes["group_norm_5d"]
    gn_shapes.append(((batch * frames, channels, height, width), list(shapes["group_norm_5d"]) + ["permuted"]))
    for shape, label in gn_shapes:

        def make_group_norm_inputs(shape=shape, label=label):
            x = torch.randn(shape, device=device, dtype=dtype)
            if "permuted" in label:
                x = x.unflatten(0, (batch, frames)).permute(0, 2, 1, 3, 4)
            return x, torch.rand(x.shape[1], device=device, dtype=dtype) + 0.5, torch.randn(x.shape[1], device=device, dtype=dtype)

        inputs = _input_sets(make_group_norm_inputs, 2 * torch.Size(shape).numel() * dtype.itemsize, device)
        x = inputs[0][0]
        element_bytes = x.numel() * x.element_size()
        baseline_ms = time_rotating(lambda x, w, b: F.silu(F.group_norm(x, 32, w, b)), inputs, device, repeats)

        def run_group_norm(x, w, b):
            return group_norm(x, 32, w, b, 1e-5, "silu")

        for backend in _available_backends("group_norm", x):
            with backends.use_backend(backend):
                ms = time_rotating(run_group_norm, inputs, device, repeats)
            record("group_norm_silu", label, backend, ms, 2 * element_bytes, None, "torch group_norm + silu", baseline_ms)
        if _triton_available("group_norm", x):
            interpreted = _triton_interpreting()
            default = triton_group_norm.launch_plan(tuple(x.shape), 32, interpreted)
            default_tile = triton_group_norm.INTERPRETER_TILE_ELEMENTS if interpreted else triton_group_norm.GPU_TILE_ELEMENTS
            default_name = "one-pass" if default.one_pass else f"tile={default_tile}"
            for name, override in GROUP_NORM_PLANS:
                with triton_group_norm.launch_plan_override(**override):
                    if triton_group_norm.launch_plan(tuple(x.shape), 32, interpreted).one_pass != override["one_pass"]:
                        continue  # the group does not fit one program
                    with backends.use_backend("triton"):
                        ms = time_rotating(run_group_norm, inputs, device, repeats)
                # Designed traffic: one-pass reads x and writes y; two-pass reads x twice (statistics, normalize).
                record("group_norm_silu", label, "triton", ms, 2 * element_bytes, (2 if override["one_pass"] else 3) * element_bytes,
                       "torch group_norm + silu", baseline_ms, plan=name, default_plan=name == default_name)  # fmt: skip
        del inputs, x

    attention_shapes = [shapes["attention"]] + ([] if dry_run else [(2, 14, 9216, 5, 64)])
    for attention_shape in attention_shapes:
        batch, frames, positions, heads, head_dim = attention_shape

        def make_attention_inputs(batch=batch, frames=frames, positions=positions, heads=heads, head_dim=head_dim):
            return tuple(torch.randn(batch * frames, positions, heads * head_dim, device=device, dtype=dtype) for _ in range(3))

        inputs = _input_sets(make_attention_inputs, 3 * batch * frames * positions * heads * head_dim * dtype.itemsize, device)
        q = inputs[0][0]
        # q, k, v read once, out written once (lse, 1/D of that, left out).
        compulsory = 4 * q.numel() * q.element_size()
        baseline_ms = time_rotating(lambda q, k, v, f=frames, h=heads: _diffusers_attention(q, k, v, f, h), inputs, device, repeats)

        def run_attention(q, k, v, frames=frames, heads=heads):
            return temporal_attention(q, k, v, frames, heads)

        for backend in _available_backends("temporal_attention", q, num_frames=frames, head_dim=head_dim):
            with backends.use_backend(backend):
                ms = time_rotating(run_attention, inputs, device, repeats)
            record("temporal_attention", attention_shape, backend, ms, compulsory, None, "diffusers permute + SDPA + permute", baseline_ms)
        if _triton_available("temporal_attention", q, num_frames=frames, head_dim=head_dim):
            default = triton_attention.launch_plan(tuple(q.shape), frames, heads)
            for block_p, warps in ATTENTION_PLANS:
                with backends.use_backend("triton"), triton_attention.launch_plan_override(block_p, warps):
                    ms = time_rotating(run_attention, inputs, device, repeats)
                record("temporal_attention", attention_shape, "triton", ms, compulsory, compulsory, "diffusers permute + SDPA + permute",
                       baseline_ms, plan=f"BLOCK_P={block_p}, warps={warps}",
                       default_plan=(block_p, warps) == (default.block_p, default.num_warps))  # fmt: skip
        del inputs, q

    shape = shapes["edm"]
    inputs = _input_sets(lambda: tuple(torch.randn(shape, device=device, dtype=dtype) for _ in range(3)), 3 * torch.Size(shape).numel() * dtype.itemsize, device)
    x = inputs[0][0]
    guidance = torch.linspace(1.0, 3.0, shape[1], device=device)
    baseline_ms = time_rotating(lambda x, uncond, cond: _torch_edm_step(x, uncond, cond, 1.5, 1.2, guidance), inputs, device, repeats)
    for backend in _available_backends("edm_euler_step", x):
        with backends.use_backend(backend):
            ms = time_rotating(lambda x, uncond, cond: edm_euler_step(x, uncond, cond, 1.5, 1.2, guidance), inputs, device, repeats)
        record("edm_euler_step", shape, backend, ms, 4 * x.numel() * x.element_size(), None, "diffusers eager arithmetic", baseline_ms)
    return {"copy_gbs": copy_gbs, "ops": rows, "fastest_plans": fastest_plans(rows)}


def _triton_interpreting() -> bool:
    from svd_fast import _triton

    return _triton.interpreting()


def _unet_inputs(unet, frames: int, device):
    torch = _torch()
    dtype = torch.float16
    sample = torch.randn(2, frames, 8, 72, 128, device=device, dtype=dtype)
    context = torch.randn(2, 1, unet.config.cross_attention_dim, device=device, dtype=dtype)
    time_ids = torch.tensor([[6.0, 127.0, 0.02]] * 2, device=device, dtype=dtype)
    timestep = torch.tensor(0.6, device=device, dtype=dtype)
    return sample, timestep, context, time_ids


def stage_unet_step(work: Path, dry_run: bool) -> dict:
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
    partial: dict[str, object] = {"unet_step_ms": results}
    variants = [("optimized", {}), ("optimized_cuda", {"backend": "cuda"}), ("optimized_cuda_graphs", {"cuda_graphs": True})]
    build = stage_status(work, "build")
    if build != "ok":
        # Forcing the CUDA backend needs the CUDA kernels: without them that variant would only time an error.
        variants = [variant for variant in variants if variant[0] != "optimized_cuda"]
        partial.setdefault("errors", {})["optimized_cuda"] = f"skipped: the build stage did not succeed ({build})"

    def step():
        return unet(*inputs).sample

    with torch.inference_mode():
        results["eager"] = round(time_ms(step, device, repeats=5), 2)
        _write_partial(work, partial)
        for key, options in variants:
            svd_fast.optimize(unet, **options)
            try:
                results[key] = round(time_ms(step, device, repeats=5), 2)
            except Exception as error:  # noqa: BLE001 - one variant's failure must not lose the others
                results[key] = None
                partial.setdefault("errors", {})[key] = repr(error)[:500]
            finally:
                svd_fast.restore(unet)
            _write_partial(work, partial)
    return partial


def stage_train_memory(work: Path, dry_run: bool) -> dict:
    """One forward + backward of the full-size SVD-XT UNet at the one-GPU LoRA config's shape (frames, size,
    batch, adapters, activation checkpointing), bf16, without DeepSpeed (gradients dropped once accumulated, as
    DeepSpeed takes them into its buckets): the peak reserved memory above the weights, against the memory
    plan's activation row for that config (traced after the measurement, on this machine's CPU)."""
    _require_cuda(dry_run)
    torch = _torch()
    from diffusers import UNetSpatioTemporalConditionModel

    from svd_fast.training import TrainConfig, memory_plan
    from svd_fast.training.activation_checkpointing import enable_activation_checkpointing
    from svd_fast.training.setup import select_trained_parameters

    config = TrainConfig.from_file(TRAIN_MEMORY_CONFIG)
    data, device, dtype = config.data, torch.device("cuda"), torch.bfloat16
    lora = config.peft_lora()
    with torch.device(device):
        unet = UNetSpatioTemporalConditionModel(num_frames=data.num_frames)
    select_trained_parameters(unet, config.trained_parameters, lora)
    unet.to(device, dtype).train()
    enable_activation_checkpointing(unet, config.activation_checkpointing)
    for param in (p for p in unet.parameters() if p.requires_grad):
        param.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None))
    batch, latent_hw = data.batch_size, (data.height // 8, data.width // 8)
    torch.cuda.synchronize(device)
    weights_reserved, weights_allocated = torch.cuda.memory_reserved(device), torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    sample = torch.randn(batch, data.num_frames, unet.config.in_channels, *latent_hw, device=device, dtype=dtype)
    embeds = torch.randn(batch, 1, unet.config.cross_attention_dim, device=device, dtype=dtype)
    time_ids = torch.tensor([[6.0, 127.0, 0.02]] * batch, device=device, dtype=dtype)
    begin = time.perf_counter()
    out = unet(sample, torch.ones(batch, device=device), encoder_hidden_states=embeds, added_time_ids=time_ids, return_dict=False)[0]
    out.float().square().mean().backward()
    torch.cuda.synchronize(device)
    gib = 2**30
    result: dict[str, object] = {
        "config": TRAIN_MEMORY_CONFIG.name, "shape": [batch, data.num_frames, data.height, data.width],
        "activation_checkpointing": config.activation_checkpointing, "step_s": round(time.perf_counter() - begin, 2),
        "weights_gib": round(weights_allocated / gib, 2),
        "peak_reserved_gib": round((torch.cuda.max_memory_reserved(device) - weights_reserved) / gib, 2),
        "peak_allocated_gib": round((torch.cuda.max_memory_allocated(device) - weights_allocated) / gib, 2),
        "planned_activations_gib": None,
    }  # fmt: skip
    _write_partial(work, {"train_memory": result})
    del unet, out
    planned = memory_plan.traced_activation_bytes({"num_frames": data.num_frames}, data.num_frames, latent_hw, batch, dtype,
                                                  config.activation_checkpointing, lora)  # fmt: skip
    result["planned_activations_gib"] = round(planned / gib, 2)
    result["reserved_over_planned"] = round(result["peak_reserved_gib"] * gib / planned, 3)
    return {"train_memory": result}


def stage_status(work: Path, name: str) -> str:
    """Status of an earlier stage of this run ("missing" when it has no record)."""
    path = work / "stages" / f"{name}.json"
    return json.loads(path.read_text())["status"] if path.exists() else "missing"


def _write_partial(work: Path, results: dict) -> None:
    """Results so far, kept however the stage ends (time box, exception, crash)."""
    path = work / "stages" / f"{os.environ['SVD_FAST_GPU_CHECK_STAGE']}.partial.json"
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(results))
    os.replace(temporary, path)


def stage_end_to_end(work: Path, dry_run: bool) -> dict:
    """SVD-XT 576x1024 at END_TO_END_STEPS steps, eager then optimized. The time per step is taken between
    the ends of the first and the last step (so the first step's warm-up and compilation stay out of it);
    the 25-step figure adds the missing steps at that rate to the measured total."""
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
    keys = ("eager", "optimized")
    seconds: dict[str, float | None] = dict.fromkeys(keys)
    per_step: dict[str, float | None] = dict.fromkeys(keys)
    extrapolated: dict[str, float | None] = dict.fromkeys(keys)
    peak: dict[str, float | None] = dict.fromkeys(keys)
    partial = {"end_to_end_s": seconds, "end_to_end_steps": END_TO_END_STEPS, "end_to_end_s_per_step": per_step,
               f"end_to_end_s_at_{FULL_STEPS}_steps": extrapolated, "peak_reserved_gib": peak}  # fmt: skip
    for key in keys:
        if key == "optimized":
            svd_fast.optimize(pipe)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        step_ends: list[float] = []

        def on_step_end(pipeline, step, timestep, tensors, step_ends=step_ends):
            torch.cuda.synchronize(device)
            step_ends.append(time.perf_counter())
            return tensors

        begin = time.perf_counter()
        pipe(image, height=576, width=1024, num_frames=NUM_FRAMES["svd-xt"], num_inference_steps=END_TO_END_STEPS,
             decode_chunk_size=8, output_type="pt", callback_on_step_end=on_step_end)  # fmt: skip
        torch.cuda.synchronize(device)
        total = time.perf_counter() - begin
        seconds[key] = round(total, 2)
        per_step[key] = round((step_ends[-1] - step_ends[0]) / (len(step_ends) - 1), 3)
        extrapolated[key] = round(total + (FULL_STEPS - END_TO_END_STEPS) * per_step[key], 1)
        # Reserved, not allocated: CUDA-graph pools and the caching allocator's blocks are what a user must fit.
        peak[key] = round(torch.cuda.max_memory_reserved(device) / 2**30, 2)
        _write_partial(work, partial)
    return partial


def stage_vae_decode(work: Path, dry_run: bool) -> dict:
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
            _write_partial(work, {"vae_decode": rows})
    return {"vae_decode": rows}


def stage_optical_flow(work: Path, dry_run: bool) -> dict:
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
    "train_memory": stage_train_memory,
    "end_to_end": stage_end_to_end,
    "vae_decode": stage_vae_decode,
    "optical_flow": stage_optical_flow,
}


def run_stage(name: str, work: Path, dry_run: bool) -> int:
    """Body of one stage process: writes WORK/stages/NAME.json with status, seconds, error and results."""
    begin = time.perf_counter()
    record: dict[str, object] = {"status": "ok", "error": None, "results": {}}
    try:
        record["results"] = STAGES[name](work, dry_run)
    except Skipped as reason:
        record.update(status="skipped", error=str(reason))
    except StageFailure as failure:
        record.update(status="failed", error=str(failure), results=failure.results)
    except Exception as error:  # noqa: BLE001 - a stage's failure is recorded, the next stage still runs
        record.update(status="failed", error="".join(traceback.format_exception(error))[-3000:])
    record["seconds"] = round(time.perf_counter() - begin, 1)
    _write_json(work / "stages" / f"{name}.json", record)
    return 0 if record["status"] != "failed" else 1


# --- driver --------------------------------------------------------------------------------------


def _write_json(path: Path, value: object) -> None:
    """Atomic: a reader (the driver, the packer) never sees half a record."""
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(value, indent=1))
    os.replace(temporary, path)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


# Seconds to wait for a killed process group to be gone (a dying CUDA process still holds device memory).
KILL_WAIT_SECONDS = 20


def _kill_group(group: int) -> None:
    """SIGKILL every process of ``group``, then wait until none of them runs (at most KILL_WAIT_SECONDS), so
    that the next stage starts on a free GPU."""
    try:
        os.killpg(group, signal.SIGKILL)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + KILL_WAIT_SECONDS
    while _group_members(group) and time.monotonic() < deadline:
        time.sleep(0.05)


def _group_members(group: int) -> list[int]:
    """Processes of ``group`` that have not exited (zombies excluded), from /proc."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, _parent, process_group = stat.read_text().rsplit(")", 1)[1].split()[:3]
        except (OSError, ValueError):
            continue
        if int(process_group) == group and state != "Z":
            members.append(int(stat.parent.name))
    return members


def run_stage_process(work: Path, name: str, command: list[str], limit: float, env: dict[str, str]) -> dict:
    """Run one stage's ``command`` as the leader of its own process group under a time box of ``limit``
    seconds. The whole group is killed when the box runs out (the build's compilers and pytest's workers
    with it) and when the stage ends (nothing it started outlives it). The stage's record is written
    however it ended, merged with the partial results it wrote as it went; returns the record."""
    begin = time.monotonic()
    stage_env = {**env, "SVD_FAST_GPU_CHECK_STAGE": name, "SVD_FAST_GPU_CHECK_DEADLINE": str(time.time() + limit)}
    process = subprocess.Popen(command, cwd=ROOT, env=stage_env, start_new_session=True)
    timed_out = False
    try:
        process.wait(timeout=limit)
    except subprocess.TimeoutExpired:
        timed_out = True
    _kill_group(process.pid)
    process.wait()
    path = work / "stages" / f"{name}.json"
    if timed_out:
        record = {"status": "failed", "error": f"timed out after {limit:.0f} s (its process group was killed)"}
    elif path.exists():
        record = _read_json(path) or {"status": "failed", "error": "the stage's record is unreadable"}
    else:
        record = {"status": "failed", "error": f"the stage process died without a report (exit status {process.returncode})"}
    partial = _read_json(work / "stages" / f"{name}.partial.json")
    record["results"] = {**partial, **(record.get("results") or {})}
    record["seconds"] = round(time.monotonic() - begin, 1)
    _write_json(path, record)
    return record


def drive(out: Path, work: Path, dry_run: bool, budget: float, only: list[str] | None) -> dict:
    """Every stage (or ``only`` these) within ``budget`` seconds, then DIR's three files."""
    shutil.rmtree(work, ignore_errors=True)
    (work / "stages").mkdir(parents=True)
    job_deadline = os.environ.get("SVD_FAST_GPU_JOB_DEADLINE")
    if job_deadline:
        # The job's wall limit (bench/gpu_check.sh) counts the wheel install before and the packing after.
        budget = min(budget, float(job_deadline) - time.time() - PACKING_SECONDS)
    deadline = time.monotonic() + budget
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}  # fmt: skip
    if dry_run:
        env["TRITON_INTERPRET"] = env.get("TRITON_INTERPRET", "0")
    for name in STAGES:
        if only and name not in only:
            continue
        if dry_run and name in NEEDS_CUDA:
            _write_stage(work, name, "skipped", 0.0, "needs a CUDA device (dry run)")
            continue
        limit = min(BUDGETS[name] * (3 if dry_run else 1), deadline - time.monotonic())
        if limit < 3:
            _write_stage(work, name, "skipped", 0.0, f"no time left in the {budget:.0f} s budget")
            continue
        command = [sys.executable, str(Path(__file__).resolve()), "--out", str(out), "--work", str(work), "--stage", name]
        print(f"[gpu_check] {name} (time box {limit:.0f} s)", flush=True)
        stage_env = {**env, "TRITON_INTERPRET": "1"} if dry_run and name in DRY_RUN_INTERPRETED else env
        run_stage_process(work, name, command + (["--dry-run"] if dry_run else []), limit, stage_env)
    report = merge(work)
    package(out, work, report)
    return report


def _write_stage(work: Path, name: str, status: str, seconds: float, error: str, results: dict | None = None) -> None:
    _write_json(work / "stages" / f"{name}.json", {"status": status, "seconds": round(seconds, 1), "error": error, "results": results or {}})


# Files larger than this enter the tarball as their last bytes only (the tarball must stay far under the
# 16 MiB a file that comes back from the GPU machine may have).
TARBALL_FILE_BYTES = 4 * 2**20


def package(out: Path, work: Path, report: dict) -> None:
    """DIR's three files: gpu_report.json, gpu_report.md and one tarball of WORK (stage records, logs)."""
    import io

    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / "gpu_report.json", report)
    temporary = out / "gpu_report.md.tmp"
    temporary.write_text(markdown(report))
    os.replace(temporary, out / "gpu_report.md")
    temporary = out / f"{TARBALL}.tmp"
    with tarfile.open(temporary, "w:gz") as tar:
        for path in sorted(p for p in work.rglob("*") if p.is_file()):
            name = f"gpu_check/{path.relative_to(work)}"
            data = path.read_bytes()
            if len(data) > TARBALL_FILE_BYTES:
                data = data[-TARBALL_FILE_BYTES:]
                name += ".tail"
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), int(path.stat().st_mtime)
            tar.addfile(info, io.BytesIO(data))
    os.replace(temporary, out / TARBALL)


def merge(work: Path) -> dict:
    report: dict[str, object] = {
        "device": None, "torch": None, "triton": None, "copy_gbs": None, "stages": {},
        "pytest": dict.fromkeys(PYTEST_KEYS, 0), "correctness": [], "ops": [], "fastest_plans": [],
        "unet_step_ms": dict.fromkeys(("eager", "optimized", "optimized_cuda", "optimized_cuda_graphs")), "train_memory": None,
        "end_to_end_s": {"eager": None, "optimized": None}, "peak_reserved_gib": {"eager": None, "optimized": None},
        "vae_decode": [], "optical_flow_engine": None, "variant_errors": {},
    }  # fmt: skip
    for name in STAGES:
        record = _read_json(work / "stages" / f"{name}.json")
        if not record:
            continue
        report["stages"][name] = {key: record.get(key) for key in ("status", "seconds", "error")}
        results = record.get("results") or {}
        if name == "preflight":
            report.update(device=results.get("device"), torch=results.get("torch"), triton=results.get("triton"))
            report["preflight"] = results
            continue
        if results.get("errors"):
            report["variant_errors"][name] = results["errors"]
        report.update({key: value for key, value in results.items() if key != "errors"})
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
    lines += ["", "| op | shape | backend | plan | ms | compulsory GB/s | % of copy | designed GB/s | baseline | baseline ms |",
              "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    lines += [f"| {r['op']} | {r['shape']} | {r['backend']} | {r.get('plan') or ''} | {r['ms']} | {r['gbs']} | {r['pct_of_copy']} | "
              f"{'' if r.get('designed_gbs') is None else r['designed_gbs']} | {r['baseline']} | {r['baseline_ms']} |" for r in report["ops"]]  # fmt: skip
    if report["fastest_plans"]:
        lines += ["", "Fastest launch plan per shape (set the defaults from these):", "", "| op | shape | plan | ms | default plan | default ms |", "|---|---|---|---|---|---|"]
        lines += [f"| {r['op']} | {r['shape']} | {r['plan']} | {r['ms']} | {r['default_plan']} | {r['default_ms']} |" for r in report["fastest_plans"]]
    steps = report.get("end_to_end_steps")
    end_to_end = (
        f"SVD-XT end to end s at {steps} steps: {report['end_to_end_s']}; s per step: {report.get('end_to_end_s_per_step')}; "
        f"extrapolated to {FULL_STEPS} steps: {report.get(f'end_to_end_s_at_{FULL_STEPS}_steps')}"
        if steps else f"SVD-XT end to end s: {report['end_to_end_s']}"
    )  # fmt: skip
    lines += ["", f"UNet step ms (25 frames, 576x1024, fp16, batch 2): {report['unet_step_ms']}",
              f"training step memory (one-GPU LoRA config, bf16; GiB above the weights, plan's activation row): {report['train_memory']}",
              f"{end_to_end}; peak reserved GiB: {report['peak_reserved_gib']}",
              f"VAE decode: {report['vae_decode']}", f"optical-flow engine: {report['optical_flow_engine']}"]  # fmt: skip
    if report["variant_errors"]:
        lines.append(f"variants that failed or were skipped: {report['variant_errors']}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="receives gpu_report.json, gpu_report.md and one tarball")
    parser.add_argument("--work", type=Path, default=WORK_DIR, help="stage records and logs (emptied first)")
    parser.add_argument("--dry-run", action="store_true", help="CPU machine: skip CUDA stages, tiny shapes")
    parser.add_argument("--budget", type=float, default=STAGE_SECONDS, help="seconds for all stages together")
    parser.add_argument("--stage", choices=sorted(STAGES), help=argparse.SUPPRESS)
    parser.add_argument("--only", nargs="+", choices=sorted(STAGES), help="run these stages only")
    args = parser.parse_args(argv)
    out, work = args.out.resolve(), args.work.resolve()
    if args.stage:
        return run_stage(args.stage, work, args.dry_run)
    report = drive(out, work, args.dry_run, args.budget, args.only)
    print((out / "gpu_report.md").read_text())
    return 0 if all(stage["status"] != "failed" for stage in report["stages"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
