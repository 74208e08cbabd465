"""The "dali" backend of :func:`svd_fast.curation.flow.optical_flow`: NVIDIA's optical-flow engine (untested here)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def dali_unavailable_reason() -> str | None:
    """None when DALI's optical flow can run here, else why not."""
    if not torch.cuda.is_available():
        return "no CUDA device"
    if torch.cuda.get_device_capability() < (7, 5):
        return "the GPU has no optical-flow engine (needs Turing or newer)"
    try:
        import nvidia.dali  # noqa: F401, PLC0415 - DALI loads only when this runs
    except ImportError:
        return "nvidia-dali is not installed"
    return None


def dali_flow(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """DALI's fn.optical_flow per pair (output grid 4x4 in input pixels), upsampled to (N, 2, H, W)."""
    from nvidia.dali import fn, pipeline_def, types  # noqa: PLC0415 - DALI loads only when this runs

    height, width = first.shape[-2:]
    pairs = (torch.stack([first, second], dim=1) * 255).round().to(torch.uint8).unsqueeze(-1).expand(-1, -1, -1, -1, 3).cpu().numpy()

    @pipeline_def(batch_size=len(pairs), num_threads=2, device_id=torch.cuda.current_device())
    def flow_pipeline():
        video = fn.external_source(source=lambda: [np.ascontiguousarray(pair) for pair in pairs], layout="FHWC", dtype=types.UINT8, batch=True)
        return fn.optical_flow(video.gpu(), output_grid=4, preset=0.0)

    pipe = flow_pipeline()
    pipe.build()
    (output,) = pipe.run()
    grid = torch.from_numpy(np.stack([np.asarray(sample)[0] for sample in output.as_cpu()])).permute(0, 3, 1, 2).float()
    return F.interpolate(grid, size=(height, width), mode="bilinear", align_corners=False).to(first.device)
