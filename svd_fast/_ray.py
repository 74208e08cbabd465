"""Ray sessions and the one Ray Data actor pool, for the jobs that scale out per item: batch generation
(:mod:`svd_fast.diffusers.generation_batch`), ``svd-fast encode`` and curation (:mod:`svd_fast.curation.pipeline`).

One meaning of ``address`` everywhere: "local" starts a Ray instance in this process's machine; any other
value ("auto", "ray://host:port", "host:port") joins that cluster. A session started here is shut down when
it ends; one that was already running (``ray.init`` called by the caller) is used and left as it was.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any


@contextlib.contextmanager
def ray_session(address: str, num_cpus: int | None = None) -> Iterator[Any]:
    """The ``ray`` module with a session open; ``num_cpus`` sizes a local one (None: every core)."""
    import ray  # noqa: PLC0415 - optional dependency, slow import

    started_here = not ray.is_initialized()
    if started_here:
        if address == "local":
            ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
        else:
            ray.init(address=address, include_dashboard=False)
    try:
        yield ray
    finally:
        if started_here:
            ray.shutdown()


def cluster_gpus(ray: Any) -> int:
    return int(ray.cluster_resources().get("GPU", 0))


def rows_from_actors(
    jobs: list[dict], actor_class: type, constructor_kwargs: Callable[[bool], dict[str, Any]], address: str, actors: int | None
) -> Iterator[dict]:
    """Run ``actor_class(**constructor_kwargs(cluster_has_gpus))`` on each job over a pool of Ray actors (one GPU
    each where the cluster has GPUs, else one CPU each) and yield each result row as it arrives.

    A local session gets ``actors`` CPUs (at least 2). ``actors`` None: one per GPU, or 2 on a cluster without GPUs."""
    with ray_session(address, num_cpus=max(2, actors or 2)) as ray:
        gpus = cluster_gpus(ray)
        pool = actors or gpus or 2
        dataset = ray.data.from_items(jobs).map(
            actor_class, fn_constructor_kwargs=constructor_kwargs(gpus > 0), concurrency=min(pool, len(jobs)),
            num_gpus=1 if gpus else 0, num_cpus=1,
        )  # fmt: skip
        for row in dataset.iter_rows():  # streamed: each row arrives as soon as its job is done
            yield dict(row)
