"""Compile-level report of every Triton and CUDA kernel at SVD and SVD-XT's real shapes, without a GPU.

    python bench/kernel_report.py [--json PATH] [--targets sm_90 sm_80] [--no-cuda]

Triton: each op's launcher runs on meta tensors under svd_fast._triton.recorded_launches(), so the
kernels, grids, block sizes and warps are exactly what a GPU run would launch; each configuration is
compiled ahead of time (triton.compile with a GPUTarget) and its cubin read with cuobjdump (Triton's
wheel ships it). CUDA: kernels/*.cu compiled with ``nvcc -Xptxas -v`` for the same targets.

Per row: the Triton version (``triton``), registers, spill bytes (local memory), shared bytes, theoretical
occupancy at the launch's block size (registers, shared memory and threads against the target's per-SM
limits), grid, min_bytes (compulsory bytes the launch reads and writes: every distinct tensor argument once),
idle_lanes (the share of a program's lanes holding no element: tile padding, or more threads than elements), for
kernels without loops sass_per_element (static SASS instructions one thread runs / elements one thread
handles), and:

* residency: resident_programs per SM (the occupancy limit in programs) and bytes_in_flight_per_sm =
  resident programs x the bytes one program moves (min_bytes / programs: these kernels issue their loads
  before any use). Little's law says how much must be in flight to keep memory busy: bandwidth x loaded
  latency / SMs = 4.8e12 B/s x 700e-9 s / 132 = 25,455 bytes per SM on an H200 (H100: 3.35e12 x 700e-9 / 132
  = 17,765), NEEDED_BYTES_PER_SM.
* tensor-core work (temporal attention): mma_per_position = static HMMA/HGMMA instructions one warp runs x
  warps / positions per program (no loops: each runs once), against mma_needed_per_position, what the padded
  products need at the instruction's shape (m16n8k16 for float16): anything above it is warps repeating the
  same product.

Must run with the Triton interpreter off (TRITON_INTERPRET unset or 0).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
if os.environ.get("TRITON_INTERPRET", "0") == "1":
    sys.exit("kernel_report.py compiles for GPU targets: run it with TRITON_INTERPRET unset or 0")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

from svd_fast import _triton  # noqa: E402
from svd_fast.triton import edm_step as triton_edm_step  # noqa: E402
from svd_fast.triton import group_norm as triton_group_norm  # noqa: E402
from svd_fast.triton import group_norm_backward as triton_group_norm_backward  # noqa: E402
from svd_fast.triton import temporal_attention as triton_temporal_attention  # noqa: E402

# Per-SM limits (CUDA C Programming Guide, compute capabilities table).
TARGETS = {
    "sm_90": {"capability": 90, "regs": 65536, "threads": 2048, "warps": 64, "blocks": 32, "smem_sm": 233472, "smem_block": 232448},
    "sm_80": {"capability": 80, "regs": 65536, "threads": 2048, "warps": 64, "blocks": 32, "smem_sm": 167936, "smem_block": 166912},
}
RESERVED_SMEM_PER_BLOCK = 1024  # the driver's per-block reservation since sm_80
# Bytes in flight per SM that keep an H200's memory busy (module docstring): 4.8 TB/s x 700 ns / 132 SMs.
NEEDED_BYTES_PER_SM = math.ceil(4.8e12 * 700e-9 / 132)
DTYPE = torch.float16
TRITON_TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}

# SVD's UNet at 576x1024 (latents 72x128) with CFG batch 2: (height, width, channels) per level; the
# up path also normalises concatenated skip channels (e.g. 640 and 960 at the top level).
UNET_LEVELS = ((72, 128, (320, 640, 960)), (36, 64, (640, 1280, 1920)), (18, 32, (1280, 2560)), (9, 16, (1280, 2560)))
# The temporal VAE decoder at 576x1024, decode_chunk_size 14: (height, width, channels).
VAE_DECODER_LEVELS = ((72, 128, 512), (144, 256, 512), (288, 512, 512), (576, 1024, 256), (576, 1024, 128))
MODELS = {"SVD": 14, "SVD-XT": 25}
CFG_BATCH = 2
GROUPS = 32
HEAD_DIM = 64


def _meta(*shape: int, dtype: torch.dtype = DTYPE) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device="meta")


def group_norm_cases() -> Iterator[tuple[str, str, Callable[[], object]]]:
    for model, frames in MODELS.items():
        for height, width, channel_list in UNET_LEVELS:
            for channels in channel_list:
                x = _meta(CFG_BATCH * frames, channels, height, width)
                weight, bias = _meta(channels), _meta(channels)
                # Temporal resnets normalise the permuted (B, C, F, H, W) view of the same activations.
                permuted = x.unflatten(0, (CFG_BATCH, frames)).permute(0, 2, 1, 3, 4)
                for layout, tensor in (("4d", x), ("5d-permuted", permuted)):
                    shape = f"{model} UNet {layout} {tuple(tensor.shape)}"
                    yield "group_norm_silu", shape, functools.partial(
                        triton_group_norm.forward, tensor, GROUPS, weight, bias, 1e-5, True
                    )
        if model == "SVD":
            for height, width, channels in VAE_DECODER_LEVELS:
                x = _meta(frames, channels, height, width)
                shape = f"VAE decoder {tuple(x.shape)}"
                yield "group_norm_silu", shape, functools.partial(
                    triton_group_norm.forward, x, GROUPS, _meta(channels), _meta(channels), 1e-6, True
                )
    x = _meta(CFG_BATCH * 14, 320, 72, 128)
    y, mean, rstd = _meta(*x.shape), _meta(x.shape[0], GROUPS, dtype=torch.float32), _meta(x.shape[0], GROUPS, dtype=torch.float32)
    yield "group_norm_silu_backward", f"SVD UNet 4d {tuple(x.shape)}", functools.partial(
        triton_group_norm_backward.backward, y, x, mean, rstd, _meta(320), _meta(320), GROUPS, True
    )


def temporal_attention_cases() -> Iterator[tuple[str, str, Callable[[], object]]]:
    for model, frames in MODELS.items():
        for height, width, channel_list in UNET_LEVELS:
            channels = channel_list[0]
            heads = channels // HEAD_DIM
            # Distinct tensors, so that min_bytes counts each of them.
            q, k, v, out, grad_out = (_meta(CFG_BATCH * frames, height * width, channels) for _ in range(5))
            shape = f"{model} (B*F={CFG_BATCH * frames}, S={height * width}, heads={heads}, D={HEAD_DIM})"
            yield "temporal_attention", shape, functools.partial(
                triton_temporal_attention.forward, q, k, v, frames, heads, HEAD_DIM**-0.5
            )
            if height == 72:
                lse = _meta(CFG_BATCH * frames, height * width, heads, dtype=torch.float32)
                yield "temporal_attention_backward", shape, functools.partial(
                    triton_temporal_attention.backward, grad_out, q, k, v, out, lse, frames, heads, HEAD_DIM**-0.5
                )


def edm_step_cases() -> Iterator[tuple[str, str, Callable[[], object]]]:
    for model, frames in MODELS.items():
        x = _meta(1, frames, 4, 72, 128)
        raw = _meta(2, frames, 4, 72, 128)
        uncond, cond = raw.chunk(2)
        guidance = _meta(1, frames, dtype=torch.float32)
        shape = f"{model} latents {tuple(x.shape)}"
        yield "edm_euler_step", shape, functools.partial(
            triton_edm_step.euler_step, x, uncond, cond, 1.0, 0.5, guidance, False
        )
        cond_latents = _meta(1, 1, 4, 72, 128).expand(1, frames, 4, 72, 128)
        yield "edm_prepare_model_input", shape, functools.partial(
            triton_edm_step.prepare_model_input, x, cond_latents, 1.0, True
        )


def _distinct_bytes(tensor: torch.Tensor) -> int:
    """Bytes of the distinct elements a view addresses (broadcast dimensions counted once)."""
    elements = math.prod(size for size, stride in zip(tensor.shape, tensor.stride()) if stride != 0)
    return elements * tensor.element_size()


def _signature(launch: _triton.Launch) -> tuple[dict, dict, dict, dict]:
    """Triton signature, constexprs, attributes and options of a recorded launch, as the JIT specializes it
    on a GPU (pointers from torch are 16-byte aligned; ints divisible by 16 and ints equal to 1 specialized)."""
    fn = launch.kernel
    names = fn.arg_names
    options = {key: launch.kwargs[key] for key in ("num_warps", "num_stages") if key in launch.kwargs}
    constexprs = {key: value for key, value in launch.kwargs.items() if key not in options}
    signature: dict[str, str] = {}
    attrs: dict[tuple[int, ...], list] = {}
    for index, (name, value) in enumerate(zip(names, launch.args)):
        if isinstance(value, torch.Tensor):
            signature[name] = "*" + TRITON_TYPES[value.dtype]
            attrs[(index,)] = [["tt.divisibility", 16]]
        elif isinstance(value, bool):
            signature[name] = "i1"
        elif isinstance(value, int):
            if value == 1:
                signature[name] = "constexpr"
                constexprs[name] = 1
                continue
            signature[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
            if value % 16 == 0:
                attrs[(index,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            raise TypeError(f"{fn.__name__}: argument {name} of type {type(value).__name__} is not handled")
    for name in names[len(launch.args):]:
        signature[name] = "constexpr"
    return signature, constexprs, attrs, options


def _tool(name: str) -> str:
    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    return str(bundled) if bundled.exists() else (shutil.which(name) or name)


_compiled: dict[tuple[str, str], dict] = {}


def _compile_triton(key: str, launch: _triton.Launch, target: str) -> dict:
    """Compile once per distinct (kernel, signature, constexprs, attributes, options) and target."""
    if (key, target) not in _compiled:
        _compiled[key, target] = _compile_triton_uncached(launch, target)
    return _compiled[key, target]


def _compile_triton_uncached(launch: _triton.Launch, target: str) -> dict:
    signature, constexprs, attrs, options = _signature(launch)
    source = triton.compiler.ASTSource(launch.kernel, signature, constexprs, attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", TARGETS[target]["capability"], 32), options=options)
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "kernel.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        usage = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", str(cubin)], capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([_tool("cuobjdump"), "--dump-sass", str(cubin)], capture_output=True, text=True, check=True).stdout
    resources = _parse_resource_usage(usage)
    instructions = [line for line in sass.splitlines() if re.match(r"\s+/\*[0-9a-f]{4}\*/\s+\S", line)]
    has_loop = any(_is_backward_branch(line) for line in instructions)
    mma = [match.group(1) for line in instructions if (match := re.search(r"\b(HG?MMA\.\w+)", line))]
    return {
        "mma_instructions": len(mma),
        "mma_shapes": sorted(set(mma)),
        "registers": resources["REG"],
        "spill_bytes": resources["LOCAL"],
        "shared_bytes": resources["SHARED"] + compiled.metadata.shared,
        "num_warps": compiled.metadata.num_warps,
        "sass_instructions": len(instructions),
        "has_loop": has_loop,
    }


def _is_backward_branch(line: str) -> bool:
    match = re.match(r"\s+/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?BRA\s+(?:\S+\s+)?`?\(?\.?L?_?x?_?(0x[0-9a-f]+)", line)
    return bool(match) and int(match.group(2), 16) < int(match.group(1), 16)


def _parse_resource_usage(text: str) -> dict[str, int]:
    found = {key: int(value) for key, value in re.findall(r"\b(REG|SHARED|LOCAL|STACK):(\d+)", text)}
    return {key: found.get(key, 0) for key in ("REG", "SHARED", "LOCAL", "STACK")}


def occupancy(target: str, registers: int, shared_bytes: int, threads_per_block: int) -> float:
    """Theoretical occupancy: resident warps per SM / the SM's maximum, from the three per-SM limits."""
    warps_per_block = math.ceil(threads_per_block / 32)
    return round(resident_blocks(target, registers, shared_bytes, threads_per_block) * warps_per_block / TARGETS[target]["warps"], 4)


def resident_blocks(target: str, registers: int, shared_bytes: int, threads_per_block: int) -> int:
    """Blocks (programs) resident per SM: the tightest of the block, thread, register and shared-memory limits."""
    limits = TARGETS[target]
    warps_per_block = math.ceil(threads_per_block / 32)
    registers_per_warp = math.ceil(max(registers, 1) * 32 / 256) * 256
    blocks = min(
        limits["blocks"],
        limits["threads"] // (warps_per_block * 32),
        limits["regs"] // (registers_per_warp * warps_per_block),
    )
    if shared_bytes:
        blocks = min(blocks, limits["smem_sm"] // (shared_bytes + RESERVED_SMEM_PER_BLOCK))
    return blocks


def mma_needed_per_position(kernel: str, frames_pad: int, head_dim_pad: int, mma_shape: str) -> int | None:
    """Tensor-core instructions the padded products of one temporal-attention position need at the SASS
    instruction's shape (HMMA.16816: m16 n8 k16; HMMA.1688: m16 n8 k8). Forward: scores [F, D] x [D, F] and
    output [F, F] x [F, D]; backward: scores, grad_v, grad_prob, grad_q and grad_k, the same two shapes."""
    shape = re.match(r"HG?MMA\.(16)(8)(\d+)", mma_shape)
    if shape is None:
        return None
    m, n, k = (int(group) for group in shape.groups())
    scores = (frames_pad // m) * (frames_pad // n) * (head_dim_pad // k)  # [F, D] x [D, F]
    values = (frames_pad // m) * (head_dim_pad // n) * (frames_pad // k)  # [F, F] x [F, D]
    if kernel == "forward_kernel":
        return scores + values
    if kernel == "backward_kernel":
        return 2 * scores + 3 * values  # scores, grad_prob; grad_v, grad_q, grad_k
    return None


def _elements_per_program(launch: _triton.Launch) -> int | None:
    kwargs = launch.kwargs
    if "BLOCK_S" in kwargs:
        return kwargs["BLOCK_G"] * kwargs["BLOCK_C"] * kwargs["BLOCK_S"]
    if "POSITIONS" in kwargs:  # the one-pass group, not its padding
        return kwargs["D"] * kwargs["FRAMES"] * kwargs["POSITIONS"]
    if "BLOCK" in kwargs and launch.kernel.__name__ != "_combine_stats_kernel":
        return kwargs["BLOCK"]
    if "BLOCK_P" in kwargs:
        return kwargs["BLOCK_P"] * kwargs["F"] * kwargs["D"]
    return None


def _idle_lane_fraction(launch: _triton.Launch, elements: int | None, threads: int) -> float | None:
    """Share of a program's lanes that compute no element: padding of its power-of-two tile (GroupNorm's masked
    position tail, or the one-pass group padded to BLOCK), or threads beyond the tile's elements."""
    kwargs = launch.kwargs
    if elements is None:
        return None
    lanes, valid = elements, elements
    if "EVEN_S" in kwargs and not kwargs["EVEN_S"]:
        positions = launch.args[launch.kernel.arg_names.index("positions")]
        valid = elements * positions // (triton.cdiv(positions, kwargs["BLOCK_S"]) * kwargs["BLOCK_S"])
    elif "POSITIONS" in kwargs:
        lanes = kwargs["BLOCK"]
    return round(1.0 - valid / max(lanes, threads), 4)


def triton_rows(targets: list[str]) -> list[dict]:
    rows = []
    for cases in (group_norm_cases, temporal_attention_cases, edm_step_cases):
        for op, shape, call in cases():
            with _triton.recorded_launches() as launches:
                call()
            for launch in launches:
                signature, constexprs, attrs, options = _signature(launch)
                key = json.dumps([launch.kernel.__name__, signature, constexprs, sorted(attrs), options], default=str)
                for target in targets:
                    compiled = _compile_triton(key, launch, target)
                    elements = _elements_per_program(launch)
                    threads = compiled["num_warps"] * 32
                    blocks = resident_blocks(target, compiled["registers"], compiled["shared_bytes"], threads)
                    min_bytes = sum(_distinct_bytes(t) for t in {id(a): a for a in launch.args if isinstance(a, torch.Tensor)}.values())
                    programs = math.prod(launch.grid)
                    rows.append({
                        "kernel": f"{op}:{launch.kernel.__name__.strip('_')}",
                        "backend": "triton",
                        "triton": triton.__version__,
                        "target": target,
                        "shape": shape,
                        "registers": compiled["registers"],
                        "spill_bytes": compiled["spill_bytes"],
                        "shared_bytes": compiled["shared_bytes"],
                        "occupancy": occupancy(target, compiled["registers"], compiled["shared_bytes"], threads),
                        "resident_programs": blocks,
                        "bytes_in_flight_per_sm": round(blocks * min_bytes / programs),
                        "grid": list(launch.grid),
                        "num_warps": compiled["num_warps"],
                        "min_bytes": min_bytes,
                        "idle_lanes": _idle_lane_fraction(launch, elements, threads),
                        "sass_per_element": (
                            # Each thread runs every static instruction once and handles elements / threads elements.
                            round(compiled["sass_instructions"] * threads / elements, 1)
                            if elements and not compiled["has_loop"]
                            else None
                        ),
                        **_mma_columns(launch, compiled),
                    })  # fmt: skip
    return rows


def _mma_columns(launch: _triton.Launch, compiled: dict) -> dict:
    """Tensor-core work per temporal-attention position: what the SASS runs and what the products need."""
    kwargs, name = launch.kwargs, launch.kernel.__name__.strip("_")
    if "BLOCK_P" not in kwargs or compiled["has_loop"] or not compiled["mma_shapes"]:
        return {"block_p": kwargs.get("BLOCK_P"), "mma_per_position": None, "mma_needed_per_position": None}
    return {
        "block_p": kwargs["BLOCK_P"],
        "mma_per_position": compiled["mma_instructions"] * compiled["num_warps"] / kwargs["BLOCK_P"],
        "mma_needed_per_position": mma_needed_per_position(name, kwargs["F_PAD"], kwargs["D_PAD"], compiled["mma_shapes"][0]),
    }


def _nvcc() -> str | None:
    candidates = [shutil.which("nvcc"), os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")]
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


def cuda_rows(targets: list[str]) -> tuple[list[dict], list[str]]:
    """Registers, spills and shared memory of every kernel in kernels/*.cu from ``nvcc -Xptxas -v``; block
    size from the file's ``kThreads`` (occupancy is left empty where the file declares none)."""
    from torch.utils.cpp_extension import include_paths

    nvcc = _nvcc()
    if nvcc is None:
        return [], ["nvcc not found: no CUDA rows"]
    rows, problems = [], []
    with tempfile.TemporaryDirectory() as tmp:
        stub = Path(tmp) / "include" / "c10" / "cuda" / "impl"
        stub.mkdir(parents=True)
        # What a CUDA build of torch generates; a CPU torch lacks it.
        (stub / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
        for source in sorted((ROOT / "kernels").glob("*.cu")):
            threads = re.search(r"constexpr\s+int\s+kThreads\s*=\s*(\d+)", source.read_text())
            command = [
                nvcc, "-c", str(source), "-o", os.path.join(tmp, source.stem + ".o"), "-std=c++20", "-O3",
                "--expt-relaxed-constexpr", "-Xptxas", "-v", "-DSVD_FAST_WITH_CUDA=1",
                f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
                "-I", str(ROOT / "csrc"), "-I", str(ROOT / "kernels"), "-I", str(Path(tmp) / "include"),
                *(flag for path in include_paths() for flag in ("-I", path)),
                *(f"-gencode=arch=compute_{TARGETS[t]['capability']},code={t}" for t in targets),
            ]  # fmt: skip
            result = subprocess.run(command, capture_output=True, text=True)
            if result.returncode != 0:
                problems.append(f"{source.name}: nvcc failed: {result.stderr[-2000:]}")
                continue
            for row in _parse_ptxas_verbose(result.stderr, source.stem):
                row["occupancy"] = (
                    occupancy(row["target"], row["registers"], row["shared_bytes"], int(threads.group(1))) if threads else None
                )
                rows.append(row)
    return rows, problems


def _parse_ptxas_verbose(text: str, stem: str) -> list[dict]:
    rows, current = [], None
    for line in text.splitlines():
        function = re.search(r"Compiling entry function '(\S+)' for '(sm_\d+)'", line)
        if function:
            demangled = subprocess.run(["c++filt", function.group(1)], capture_output=True, text=True).stdout.strip()
            name = demangled.removeprefix("void ").replace("(anonymous namespace)::", "").split("(")[0]
            current = {
                "kernel": f"{stem}:{name}", "backend": "cuda", "triton": None, "target": function.group(2),
                "shape": "all (block size fixed per kernel)", "registers": 0, "spill_bytes": 0, "shared_bytes": 0,
                "grid": None, "min_bytes": None, "sass_per_element": None,
            }  # fmt: skip
            rows.append(current)
            continue
        if current is None:
            continue
        spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if spill:
            current["spill_bytes"] = int(spill.group(1)) + int(spill.group(2))
        used = re.search(r"Used (\d+) registers", line)
        if used:
            current["registers"] = int(used.group(1))
            smem = re.search(r"(\d+) bytes smem", line)
            current["shared_bytes"] = int(smem.group(1)) if smem else 0
    return rows


def compiler_versions() -> dict[str, str]:
    versions = {"torch": torch.__version__, "triton": triton.__version__}
    for name, tool in (("ptxas", _tool("ptxas")), ("nvcc", _nvcc())):
        if tool:
            output = subprocess.run([tool, "--version"], capture_output=True, text=True).stdout
            release = re.search(r"release [\d.]+, V[\d.]+", output)
            versions[name] = release.group(0) if release else output.strip().splitlines()[-1:][0] if output else "unknown"
    return versions


def print_table(rows: list[dict], target: str = "sm_90") -> None:
    columns = ("kernel", "backend", "triton", "shape", "registers", "spill_bytes", "shared_bytes", "occupancy", "num_warps", "block_p",
               "resident_programs", "bytes_in_flight_per_sm", "mma_per_position", "mma_needed_per_position", "grid",
               "min_bytes", "idle_lanes", "sass_per_element")  # fmt: skip
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        if row["target"] == target:
            print("| " + " | ".join("" if row.get(c) is None else str(row[c]) for c in columns) + " |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, help="write the rows (and compiler versions) here")
    parser.add_argument("--targets", nargs="+", default=["sm_90", "sm_80"], choices=sorted(TARGETS))
    parser.add_argument("--no-cuda", action="store_true", help="skip the nvcc compiles of kernels/*.cu")
    args = parser.parse_args(argv)
    versions = compiler_versions()
    rows = triton_rows(args.targets)
    problems: list[str] = []
    if not args.no_cuda:
        cuda, problems = cuda_rows(args.targets)
        rows += cuda
    for row in rows:
        row["compilers"] = versions
    print(f"compilers: {versions}")
    for target in args.targets:
        print(f"\n## {target}\n")
        print_table(rows, target)
    for problem in problems:
        print(f"problem: {problem}", file=sys.stderr)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=1))
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
