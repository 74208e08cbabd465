"""`svd-fast env`: what this installation runs with, for bug reports (like `diffusers-cli env` and `ds_report`):
package versions, CUDA, the compiled extension's build facts, and each kernel backend and optional component,
available or why not."""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import platform
import sys

# Distributions svd_fast imports (or may), in the order printed; DALI ships one wheel per CUDA major version.
DISTRIBUTIONS = (
    "torch", "triton", "diffusers", "transformers", "accelerate", "safetensors", "peft", "deepspeed",
    "nvidia-dali-cuda120", "nvidia-dali-cuda130", "flash-attn", "av", "opencv-python-headless", "ray", "pyarrow", "pandas",
)

EXAMPLES = """examples:
  svd-fast env             # paste into a bug report
  svd-fast env --json      # one JSON object (stdout holds nothing else)"""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("env", help="print versions, CUDA, the extension's build and which backends can run",
                                   description=__doc__, epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of lines")
    parser.set_defaults(func=run)


def versions() -> dict[str, str | None]:
    """distribution -> installed version (None: not installed); read from package metadata, nothing imported."""
    found: dict[str, str | None] = {}
    for name in DISTRIBUTIONS:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def report() -> dict[str, object]:
    import torch  # noqa: PLC0415 - the report needs torch; the command line's parsing does not

    from svd_fast import __version__, _extension, _triton  # noqa: PLC0415 - _extension and _triton import torch, loaded only when this runs
    from svd_fast.backends import BACKENDS  # noqa: PLC0415 - svd_fast.backends imports torch, loaded only when this runs

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    backend_reasons = {
        "reference": None,
        "cpu": _extension.unavailable_reason(),
        "cuda": _extension.cuda_unavailable_reason(),
        "triton": _triton.unavailable_reason(device),
    }
    installed = versions()
    dali = [name for name in ("nvidia-dali-cuda120", "nvidia-dali-cuda130") if installed[name]]
    return {
        "svd_fast": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "versions": installed,
        "cuda": {
            "available": cuda,
            "torch_built_with": torch.version.cuda,
            "devices": [torch.cuda.get_device_name(index) for index in range(torch.cuda.device_count())] if cuda else [],
        },
        "extension": _extension.build_info(),
        "backends": {name: {"available": backend_reasons[name] is None, "reason": backend_reasons[name]} for name in BACKENDS},
        "optional": {
            "flash_attn": ("installed" if cuda else "installed (runs on CUDA tensors only)") if installed["flash-attn"]
            else "not installed (pip install 'svd_fast[flash]')",
            "dali": f"{', '.join(dali)} installed" if dali else "not installed (pip install 'svd_fast[dali-cu12]' or '[dali-cu13]')",
            "deepspeed": "installed" if installed["deepspeed"] else "not installed (pip install 'svd_fast[train]')",
        },
    }


def _lines(facts: dict[str, object]) -> list[str]:
    lines = [f"svd_fast {facts['svd_fast']}, Python {facts['python']}, {facts['platform']}", "versions:"]
    lines += [f"  {name}: {version or 'not installed'}" for name, version in facts["versions"].items()]
    cuda = facts["cuda"]
    lines.append(f"CUDA: {'available: ' + ', '.join(cuda['devices']) if cuda['available'] else 'not available'} "
                 f"(torch built with CUDA {cuda['torch_built_with']})")
    lines.append("extension svd_fast._C: " + ", ".join(f"{key}={value}" for key, value in facts["extension"].items()))
    lines.append("kernel backends:")
    lines += [f"  {name}: {'available' if state['available'] else 'unavailable: ' + state['reason']}"
              for name, state in facts["backends"].items()]
    lines.append("optional components:")
    lines += [f"  {name}: {state}" for name, state in facts["optional"].items()]
    return lines


def run(args: argparse.Namespace) -> int:
    facts = report()
    print(json.dumps(facts) if args.json else "\n".join(_lines(facts)))
    return 0
