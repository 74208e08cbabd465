"""Starting the ranks of a parallel generation (:mod:`svd_fast.diffusers.parallel`) and generating one video on them.

Two ways in: :func:`spawn` starts ``nproc`` local processes itself (``torch.multiprocessing``, a free TCP port on
127.0.0.1), or an existing launcher (``torchrun``, ``deepspeed``) already started them and set ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` (:func:`launched_world_size`). Either way each
rank joins the group with :func:`init_process_group` (NCCL on CUDA, gloo on CPU) and a collective timeout, so a
rank that dies makes the others fail instead of waiting forever.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import socket
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from svd_fast import checks, media
from svd_fast.diffusers import generation
from svd_fast.diffusers.parallel import MODES, check_world, parallelize
from svd_fast.diffusers.settings import OptionError

# Long enough for the ranks to load a full-size pipeline at different speeds before their first collective.
COLLECTIVE_TIMEOUT_S = 600.0
DEFAULT_NPROC = {"guidance": 2, "frames": 2, "guidance+frames": 4}


def launched_world_size(environ: Mapping[str, str] | None = None) -> int | None:
    """WORLD_SIZE set by a launcher (torchrun, deepspeed) when it started more than one rank, else None."""
    environ = os.environ if environ is None else environ
    try:
        size = int(environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return None
    return size if size > 1 and "RANK" in environ else None


def init_process_group(device: str, timeout_s: float = COLLECTIVE_TIMEOUT_S) -> None:
    """Join the group the environment describes (env://): NCCL for a CUDA ``device`` (this rank's LOCAL_RANK GPU), gloo otherwise."""
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo", init_method="env://", timeout=datetime.timedelta(seconds=timeout_s))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _rank_entry(rank: int, nproc: int, port: int, device: str, timeout_s: float, function: Callable, args: tuple) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))  # fmt: skip
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    init_process_group(device, timeout_s)
    try:
        function(*args)
    finally:
        dist.destroy_process_group()


def spawn(function: Callable, nproc: int, *args: Any, device: str = "cpu", timeout_s: float = COLLECTIVE_TIMEOUT_S) -> None:
    """Run ``function(*args)`` on ``nproc`` new local processes joined in one process group (``function`` must be
    importable by name). A rank that fails stops the others; the failure is raised here as RuntimeError with the
    failed rank's last error line."""
    try:
        mp.spawn(_rank_entry, args=(nproc, free_port(), device, timeout_s, function, args), nprocs=nproc, join=True)
    except mp.ProcessRaisedException as error:
        lines = [line for line in str(error).splitlines() if line.strip()]
        raise RuntimeError(f"rank {error.error_index} failed: {lines[-1].strip() if lines else 'no message'}") from None
    except mp.ProcessExitedException as error:
        raise RuntimeError(f"rank {error.error_index} exited with code {error.exit_code}") from None


def check_parallel(options: generation.GenerateOptions, mode: str, nproc: int | None, environ: Mapping[str, str] | None = None) -> int:
    """The number of ranks for checked ``options``: OptionError (naming parallel / nproc) for a combination that
    cannot run, before any model loads. Under a launcher the world size is the launcher's."""
    if mode not in MODES:
        raise OptionError("{parallel} must be one of {choices}, got {got!r}", choices=", ".join(MODES), got=mode)
    launched = launched_world_size(environ)
    if nproc is not None:
        try:
            checks.check("nproc", nproc, spelled="{nproc}")
        except checks.CheckError as error:
            raise OptionError(str(error)) from None
        if launched is not None and nproc != launched:
            raise OptionError("{nproc} {got} differs from the launcher's WORLD_SIZE {world}", "leave {nproc} out under torchrun or deepspeed",
                              got=nproc, world=launched)  # fmt: skip
    world = launched or nproc or DEFAULT_NPROC[mode]
    try:
        frame_parts = check_world(mode, world, spelled="{nproc}")
    except ValueError as error:
        raise OptionError(str(error)) from None
    if mode.startswith("guidance") and options.max_guidance <= 1:
        raise OptionError("{parallel} {mode} splits the classifier-free-guidance batch, but {max_guidance} is {got} (no guidance batch)",
                          "use --parallel frames, or a guidance above 1", mode=mode, got=options.max_guidance)  # fmt: skip
    active = options.window if options.frames > options.window else options.frames
    if active < frame_parts:
        raise OptionError("{parallel} {mode} on {world} ranks splits frames {parts} ways, more than the {got} frames of each UNet call",
                          "use fewer ranks (--nproc)", mode=mode, world=world, parts=frame_parts, got=active)  # fmt: skip
    if options.device.startswith("cuda") and launched is None and world > torch.cuda.device_count():
        raise OptionError("{nproc} {got} exceeds the {gpus} CUDA devices present", "one rank per GPU", got=world, gpus=torch.cuda.device_count())
    if options.cuda_graphs and frame_parts > 1:
        raise OptionError("{cuda_graphs} captures the UNet forward, inside which {parallel} {mode} exchanges frames",
                          "use --parallel guidance, or leave out --cuda-graphs", mode=mode)  # fmt: skip
    if not options.optimize:
        raise OptionError("{parallel} runs in svd_fast's fused sampling loop", "leave out --no-optimize")
    return world


def generate_on_rank(image: str | Path, out: str | Path, options: generation.GenerateOptions, mode: str,
                     on_written: Callable[[dict], None] | None = None) -> dict[str, Any] | None:  # fmt: skip
    """One video on this rank of an initialized process group (every rank calls it with the same arguments); rank
    0 writes ``out`` and returns the summary (and passes it to ``on_written``), the other ranks return None."""
    rank = dist.get_rank()
    options = dataclasses.replace(options, progress=options.progress and rank == 0)
    condition = media.load_image(image, max_size=(options.width, options.height))
    pipe = generation.pipeline_for(options)
    parallelize(pipe, mode)
    frames = generation.sample_video(pipe, condition, options, options.seed)
    summary = None
    if rank == 0:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        written = media.write_frames(frames, out, fps=options.fps, inputs=[image])
        summary = {"out": str(written), "frames": options.frames, "size": [options.height, options.width], "steps": options.steps,
                   "device": options.device, "dtype": options.dtype, "parallel": mode, "ranks": dist.get_world_size()}  # fmt: skip
        if on_written is not None:
            on_written(summary)
    dist.barrier()
    return summary


def generate_parallel(image: str | Path, out: str | Path, options: generation.GenerateOptions, mode: str, nproc: int | None = None,
                      on_written: Callable[[dict], None] | None = None) -> None:  # fmt: skip
    """``svd-fast generate --parallel``: check everything, then generate on this launcher's ranks, or on ``nproc``
    processes started here. ValueErrors (OptionError, ModelFolderError, MediaError) come before any model loads;
    a failed rank raises RuntimeError and nothing is written."""
    media.check_output(out, [image])
    options = generation.check_options(options)
    world = check_parallel(options, mode, nproc)
    media.load_image(image, max_size=(options.width, options.height))
    if launched_world_size() is not None:
        init_process_group(options.device)
        try:
            generate_on_rank(image, out, options, mode, on_written)
        finally:
            dist.destroy_process_group()
        return
    spawn(generate_on_rank, world, image, out, options, mode, on_written, device=options.device)
