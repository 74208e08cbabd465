"""The forwards svd_fast.diffusers re-implements must still be the ones upstream ships.

A failure here means the installed diffusers changed one of them: re-read the upstream forward, update the
copy in svd_fast/diffusers (patching.py or temporal_transformer_block.py) and its hash in COPIED_FORWARDS.
"""

import hashlib
import importlib
import inspect

import pytest

from svd_fast.diffusers.patching import COPIED_FORWARDS


@pytest.mark.parametrize("qualified_name", sorted(COPIED_FORWARDS))
def test_copied_forward_matches_upstream(qualified_name: str) -> None:
    module_name, class_name, method_name = qualified_name.rsplit(".", 2)
    method = getattr(getattr(importlib.import_module(module_name), class_name), method_name)
    digest = hashlib.sha256(inspect.getsource(method).encode()).hexdigest()[: len(COPIED_FORWARDS[qualified_name])]
    assert digest == COPIED_FORWARDS[qualified_name], f"{qualified_name} changed upstream; re-read it and update the copy"


def test_kernel_packages_import_no_diffusers() -> None:
    import subprocess
    import sys

    code = (
        "import sys; import svd_fast, svd_fast.reference, svd_fast.triton, svd_fast.ops, svd_fast.nn, svd_fast.sampling;"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('diffusers', 'transformers'));"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"kernel packages imported {result.stdout.strip()} {result.stderr[-2000:]}"
