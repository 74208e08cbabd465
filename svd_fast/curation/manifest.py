"""The curation manifest: one row per clip (or one error row per unreadable file), stored as Parquet.

Resumability: each input file's rows are written to ``<manifest>.parts/<file_key>.parquet`` as soon as the
file is finished (written to a temporary name, then renamed, so a part is either complete or absent). A
rerun skips files whose part exists; the manifest itself is the merge of the parts plus filter verdicts.
``file_key`` hashes the absolute path, size and modification time, so a changed file is processed again.
"""

from __future__ import annotations

import hashlib
import os
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
        ("flow_mean_px", pa.float64()),
        ("flow_mean_norm", pa.float64()),
        ("motion_bucket_id", pa.int32()),
        ("static", pa.bool_()),
        ("flow_backend", pa.string()),
        ("ocr_coverage", pa.float64()),
        ("clip_embedding", pa.list_(pa.float32())),
        ("aesthetic_score", pa.float64()),
        ("clip_text_similarity", pa.float64()),
        ("skipped", pa.string()),  # "stage: reason; ..." for stages that did not run
        ("error", pa.string()),
    ]
)


def file_key(path: str | Path) -> str:
    path = Path(path).resolve()
    try:
        stat = path.stat()
        identity = f"{path}|{stat.st_size}|{stat.st_mtime_ns}"
    except OSError:
        identity = f"{path}|missing"
    return hashlib.sha1(identity.encode()).hexdigest()[:20]


def parts_dir(manifest_path: str | Path) -> Path:
    manifest_path = Path(manifest_path)
    return manifest_path.with_name(manifest_path.name + ".parts")


def part_path(manifest_path: str | Path, key: str) -> Path:
    return parts_dir(manifest_path) / f"{key}.parquet"


def write_part(manifest_path: str | Path, key: str, rows: list[dict]) -> Path:
    """Write one file's rows atomically (temporary file + rename)."""
    target = part_path(manifest_path, key)
    target.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist([{name: row.get(name) for name in SCHEMA.names} for row in rows], schema=SCHEMA)
    temporary = target.with_suffix(f".tmp{os.getpid()}")
    pq.write_table(table, temporary)
    os.replace(temporary, target)
    return target


def read_parts(manifest_path: str | Path, keys: list[str]) -> pd.DataFrame:
    """The rows of the given files' parts (missing parts are left out), in ``keys`` order."""
    tables = [pq.read_table(path) for key in keys if (path := part_path(manifest_path, key)).is_file()]
    if not tables:
        return SCHEMA.empty_table().to_pandas()
    return pa.concat_tables(tables).to_pandas()


def write_manifest(manifest_path: str | Path, table: pd.DataFrame) -> Path:
    manifest_path = Path(manifest_path)
    manifest_path.parent.mkdir(parents=True, exist_ok=True)
    temporary = manifest_path.with_name(manifest_path.name + f".tmp{os.getpid()}")
    table.to_parquet(temporary, index=False)
    os.replace(temporary, manifest_path)
    return manifest_path
