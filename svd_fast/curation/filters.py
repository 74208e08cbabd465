"""Filters over manifest scores: thresholds (``flow_mean_norm>=0.002``) or "drop the bottom/top p%"
(``aesthetic_score:bottom=12.5``, ``ocr_coverage:top=25``), as in the SVD paper's 12.5/25/50 % cuts.

A filter is applied to rows that have the score; a row whose stage was skipped or failed keeps verdict
None for that filter (not removed by it). Rows with an error are always removed (reported as "error").
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
import pandas as pd

_THRESHOLD = re.compile(r"^(?P<column>\w+)\s*(?P<op>>=|<=|>|<)\s*(?P<value>[-+0-9.eE]+)$")
_PERCENT = re.compile(r"^(?P<column>\w+)\s*:\s*(?P<side>bottom|top)\s*=\s*(?P<percent>[0-9.]+)%?$")


@dataclass(frozen=True)
class Filter:
    """One filter; ``name`` is its manifest column (``pass_<name>``) and its key in the summary."""

    column: str
    kind: str  # ">=", "<=", ">", "<", "bottom", "top"
    value: float

    @property
    def name(self) -> str:
        if self.kind in ("bottom", "top"):
            return f"{self.column}_{self.kind}{self.value:g}pct"
        suffix = {">=": "ge", "<=": "le", ">": "gt", "<": "lt"}[self.kind]
        return f"{self.column}_{suffix}{self.value:g}"


def parse_filter(spec: str) -> Filter:
    """Parse ``COLUMN>=X``, ``COLUMN<=X``, ``COLUMN>X``, ``COLUMN<X``, ``COLUMN:bottom=P`` or ``COLUMN:top=P``."""
    spec = spec.strip()
    match = _THRESHOLD.match(spec)
    if match:
        return Filter(match["column"], match["op"], float(match["value"]))
    match = _PERCENT.match(spec)
    if match:
        percent = float(match["percent"])
        if not 0 <= percent < 100:
            raise ValueError(f"filter {spec!r}: percent must be in [0, 100), got {percent}")
        return Filter(match["column"], match["side"], percent)
    raise ValueError(f"filter {spec!r}: expected COLUMN>=X, COLUMN<=X, COLUMN:bottom=P or COLUMN:top=P (e.g. aesthetic_score:bottom=12.5)")


def apply_filters(manifest: pd.DataFrame, filters: list[Filter]) -> tuple[pd.DataFrame, dict[str, int]]:
    """Add ``pass_<filter>`` columns and ``keep``; returns the table and {filter name: clips it removed}.

    Percentile cut-offs are computed over the rows that have the score and no error.
    """
    table = manifest.copy()
    has_error = table["error"].notna() & (table["error"] != "")
    summary: dict[str, int] = {"error": int(has_error.sum())}
    keep = ~has_error
    for spec in filters:
        if spec.column not in table.columns:
            raise ValueError(f"filter {spec.name}: no column {spec.column!r} in the manifest (columns: {sorted(table.columns)})")
        values = pd.to_numeric(table[spec.column], errors="coerce")
        scored = values.notna() & ~has_error
        if spec.kind in ("bottom", "top"):
            if scored.any():
                cutoff = float(np.percentile(values[scored], spec.value if spec.kind == "bottom" else 100 - spec.value))
            else:
                cutoff = math.nan
            passed = values >= cutoff if spec.kind == "bottom" else values <= cutoff
            if spec.value == 0:
                passed = pd.Series(True, index=table.index)
        else:
            passed = {">=": values >= spec.value, "<=": values <= spec.value, ">": values > spec.value, "<": values < spec.value}[spec.kind]
        verdict = pd.Series(pd.NA, index=table.index, dtype="boolean")
        verdict[scored] = passed[scored]
        table[f"pass_{spec.name}"] = verdict
        removed = scored & ~passed
        summary[spec.name] = int((removed & keep).sum())  # counted in order: each clip is charged to its first failing filter
        keep = keep & ~removed
    table["keep"] = keep
    summary["kept"] = int(keep.sum())
    summary["total"] = len(table)
    return table, summary
