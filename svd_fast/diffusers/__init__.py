"""svd_fast's integration with diffusers: everything that knows diffusers lives here.

* :mod:`.patching`: ``optimize`` / ``restore`` / ``describe`` for a StableVideoDiffusionPipeline;
* :mod:`.temporal_transformer_block`: the frame-major drop-in for diffusers' TemporalBasicTransformerBlock;
* :mod:`.attention_processors`: the single-token cross-attention shortcut and flash-attn self-attention;
* :mod:`.scheduler`: the drop-in scheduler with the fused EDM Euler step;
* :mod:`.settings`: the one check of optimize()'s settings, shared with generation and the CLI;
* :mod:`.denoising_loop`, :mod:`.step_cache`: the fused denoising loop (multistep samplers) and step caching;
* :mod:`.cuda_graph`: CUDA-graph capture of the UNet forward;
* :mod:`.generation`, :mod:`.generation_batch`: the one pipeline loader, image-to-video generation and the
  resumable batch runner behind ``svd-fast generate``;
* :mod:`.loading`, :mod:`.tiny`, :mod:`.full_size`: the model-folder check, the tiny architecture-true test
  pipeline and the random full-size SVD / SVD-XT pipelines for benchmarks.

diffusers is imported here once; the supported range is checked on that import. The kernel packages
(svd_fast.reference, .triton, .ops, .nn) never import this package.
"""

from __future__ import annotations

import warnings

import diffusers
from packaging.version import Version

# The oldest diffusers whose SVD modules match the forwards copied in .patching (tests/test_diffusers_drift.py
# fails when they change), and the first release not yet tested.
MIN_DIFFUSERS = Version("0.30.0")
UNTESTED_FROM = Version("0.43.0")

_installed = Version(diffusers.__version__)
if _installed < MIN_DIFFUSERS:
    raise ImportError(
        f"svd_fast.diffusers needs diffusers>={MIN_DIFFUSERS}, found {diffusers.__version__} (pip install -U 'diffusers>={MIN_DIFFUSERS}')"
    )
if _installed.release >= UNTESTED_FROM.release:
    warnings.warn(
        f"svd_fast.diffusers is tested with diffusers<{UNTESTED_FROM}, found {diffusers.__version__}; "
        "optimize() checks each module it patches, but report any mismatch",
        stacklevel=2,
    )
