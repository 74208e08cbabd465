"""The curation manifest: one row per clip (or one error row per unreadable file), stored as Parquet.

Resumability: each input file's rows are written to ``<manifest>.parts/<file_key>.parquet`` as soon as the
file is finished (written to a temporary name in the same folder, then renamed, so a part is either complete
or absent). A rerun skips files whose part exists and reads back with this schema; an unreadable, 0-byte or
wrong-schema part is redone. ``file_key`` hashes the file's absolute path, size, modification time and the
SHA-1 of its first and last MiB, and the settings that affect its rows, so a changed file or a rerun with
other settings is processed again. The manifest itself is the merge of the parts plus filter verdicts.

One run at a time per manifest: :func:`lock` holds ``<manifest>.lock`` (an OS lock, released even when the
process is killed) and clears the temporary files a killed run left behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

SCHEMA = pa.schema(
    [
        ("source", pa.string()),
        ("file_key", pa.string()),
        ("clip_index", pa.int32()),  # -1 on a file-level error row
        ("start_frame", pa.int64()),
        ("end_frame", pa.int64()),  # exclusive
        ("start_time", pa.float64()),
        ("end_time", pa.float64()),
        ("num_frames", pa.int64()),
        ("fps", pa.float64()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("codec", pa.string()),
        ("caption", pa.string()),
        ("codec_mv_mean_px", pa.float64()),  # mean codec motion-vector length (cheap "moving at all?" signal)
        ("flow_mean_px", pa.float64()),  # source px per 0.5 s (see svd_fast.curation.analysis)
        ("flow_mean_norm", pa.float64()),
        ("flow_px_per_second", pa.float64()),
        ("flow_px_per_second_each", pa.list_(pa.float64())),
        ("motion_bucket_id", pa.int32()),
        ("static", pa.bool_()),
        ("static_reason", pa.string()),
        ("flow_backend", pa.string()),
        ("ocr_coverage", pa.float64()),
        ("clip_embedding", pa.list_(pa.float32())),
        ("aesthetic_score", pa.float64()),
        ("clip_text_similarity", pa.float64()),
        ("skipped", pa.string()),  # "stage: reason; ..." for stages that did not run
        ("error", pa.string()),
    ]
)


TEMPORARY_MARK = ".partial-"
EDGE_BYTES = 1 << 20


def file_key(path: str | Path, settings: str = "") -> str:
    """Identity of a file's rows: path, size, mtime and head/tail hash of the content, and ``settings``."""
    path = Path(path).resolve()
    digest = hashlib.sha1(f"{path}|{settings}".encode())
    try:
        stat = path.stat()
        digest.update(f"|{stat.st_size}|{stat.st_mtime_ns}|".encode())
        with open(path, "rb") as handle:
            digest.update(handle.read(EDGE_BYTES))
            if stat.st_size > EDGE_BYTES:
                handle.seek(max(EDGE_BYTES, stat.st_size - EDGE_BYTES))
                digest.update(handle.read())
    except OSError as error:
        digest.update(f"|unreadable {error.errno}".encode())
    return digest.hexdigest()[:24]


def part_is_complete(manifest_path: str | Path, key: str) -> bool:
    """The part exists and reads back with this manifest's schema; anything else is removed, to be redone."""
    path = part_path(manifest_path, key)
    if not path.is_file():
        return False
    try:
        if pq.read_schema(path).equals(SCHEMA, check_metadata=False):
            return True
    except (OSError, pa.ArrowException):
        pass
    path.unlink(missing_ok=True)
    return False


def atomic_write(target: Path, write) -> Path:
    """Call ``write(temporary)`` on a temporary file beside ``target``, then rename it to ``target``."""
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}{TEMPORARY_MARK}")
    os.close(handle)
    try:
        write(temporary)
        os.replace(temporary, target)
    finally:
        Path(temporary).unlink(missing_ok=True)
    return target


@contextlib.contextmanager
def lock(manifest_path: str | Path) -> Iterator[None]:
    """Hold ``<manifest>.lock`` for one run; raise :class:`ManifestBusyError` when another process holds it."""
    manifest_path = Path(manifest_path)
    manifest_path.parent.mkdir(parents=True, exist_ok=True)
    lock_path = manifest_path.with_name(manifest_path.name + ".lock")
    with open(lock_path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            raise ManifestBusyError(f"another curate run (pid {handle.read().strip() or '?'}) is writing {manifest_path}") from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        # A killed run leaves its temporary files (mkstemp creates them before writing): nobody else can own them now.
        leftovers = [*manifest_path.parent.glob(f".{manifest_path.name}{TEMPORARY_MARK}*"), *parts_dir(manifest_path).glob(f".*{TEMPORARY_MARK}*")]
        for leftover in leftovers:
            leftover.unlink(missing_ok=True)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class ManifestBusyError(RuntimeError):
    """Another process is writing the same manifest."""


def parts_dir(manifest_path: str | Path) -> Path:
    manifest_path = Path(manifest_path)
    return manifest_path.with_name(manifest_path.name + ".parts")


def part_path(manifest_path: str | Path, key: str) -> Path:
    return parts_dir(manifest_path) / f"{key}.parquet"


def write_part(manifest_path: str | Path, key: str, rows: list[dict]) -> Path:
    """Write one file's rows atomically (temporary file + rename)."""
    table = pa.Table.from_pylist([{name: row.get(name) for name in SCHEMA.names} for row in rows], schema=SCHEMA)
    return atomic_write(part_path(manifest_path, key), lambda temporary: pq.write_table(table, temporary))


def read_parts(manifest_path: str | Path, keys: list[str]) -> pd.DataFrame:
    """The rows of the given files' parts (missing parts are left out), in ``keys`` order."""
    tables = [pq.read_table(path) for key in keys if (path := part_path(manifest_path, key)).is_file()]
    if not tables:
        return SCHEMA.empty_table().to_pandas()
    return pa.concat_tables(tables).to_pandas()


def write_manifest(manifest_path: str | Path, table: pd.DataFrame) -> Path:
    return atomic_write(Path(manifest_path), lambda temporary: table.to_parquet(temporary, index=False))
