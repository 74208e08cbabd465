"""One Ray Data actor pool over a list of jobs, shared by the commands that scale out per item
(`svd-fast generate --input ... --ray`, `svd-fast encode --ray`)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any


def rows_from_actors(
    jobs: list[dict], actor_class: type, constructor_kwargs: Callable[[bool], dict[str, Any]], address: str, actors: int | None
) -> Iterator[dict]:
    """Run ``actor_class(**constructor_kwargs(cluster_has_gpus))`` on each job over a pool of Ray actors (one GPU
    each where the cluster has GPUs, else one CPU each) and yield each result row as it arrives.

    ``address`` "local" starts a local cluster with ``actors`` CPUs (at least 2); any other value joins the running
    one. A cluster started here is shut down afterwards; one that was already running is left as it was.
    ``actors`` None: one per GPU, or 2 on a cluster without GPUs."""
    import ray  # noqa: PLC0415 - optional dependency, slow import

    started_here = not ray.is_initialized()
    if started_here:
        if address == "local":
            ray.init(num_cpus=max(2, actors or 2), include_dashboard=False, log_to_driver=False)
        else:
            ray.init(address="auto", include_dashboard=False)
    try:
        cluster_gpus = int(ray.cluster_resources().get("GPU", 0))
        pool = actors or cluster_gpus or 2
        dataset = ray.data.from_items(jobs).map(
            actor_class, fn_constructor_kwargs=constructor_kwargs(cluster_gpus > 0), concurrency=min(pool, len(jobs)),
            num_gpus=1 if cluster_gpus else 0, num_cpus=1,
        )  # fmt: skip
        for row in dataset.iter_rows():  # streamed: each row arrives as soon as its job is done
            yield dict(row)
    finally:
        if started_here:
            ray.shutdown()
