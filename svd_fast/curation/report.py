"""`svd-fast curate --report DIR`: a page for curators tuning thresholds by looking.

``DIR/index.html`` with its PNGs (matplotlib, no display needed): histograms of the motion score
(flow_mean_norm), motion_bucket_id, OCR text coverage and aesthetic score, kept and dropped stacked; the
count of clips kept and dropped by reason (an error, the first filter a clip failed, or static); and contact
sheets of kept and dropped clips (first, middle and last frame of each, decoded by seeking). Every file is
written to a temporary name in ``DIR`` and renamed, so a reader never sees half a page or image.
"""

from __future__ import annotations

import html
import io
from pathlib import Path

import numpy as np
import pandas as pd

from svd_fast import _io
from svd_fast.data.decode import decode_frames_at_times

HISTOGRAMS = {
    "flow_mean_norm": "motion score (flow_mean_norm: mean flow per 0.5 s / frame diagonal)",
    "motion_bucket_id": "motion_bucket_id (0..255)",
    "ocr_coverage": "OCR text coverage (share of the frame)",
    "aesthetic_score": "aesthetic score",
}
CONTACT_SHEET_CLIPS = 24  # clips per contact sheet (the first ones, in manifest order)
THUMBNAIL_SIDE = 160


def drop_reasons(table: pd.DataFrame) -> pd.Series:
    """Per row: "kept", or why it was dropped: "error", the first filter it failed (``pass_<name>`` False), "static"."""
    filters = [column for column in table.columns if column.startswith("pass_")]
    reasons = []
    for _, row in table.iterrows():
        if bool(row.get("keep", False)):
            reasons.append("kept")
        elif isinstance(row.get("error"), str) and row["error"]:
            reasons.append("error")
        else:
            failed = [column[len("pass_"):] for column in filters if not pd.isna(row[column]) and not bool(row[column])]
            reasons.append(failed[0] if failed else "static" if bool(row.get("static")) else "dropped")
    return pd.Series(reasons, index=table.index, dtype=object)


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def _histogram(values_kept: np.ndarray, values_dropped: np.ndarray, title: str) -> bytes:
    from matplotlib.figure import Figure  # noqa: PLC0415 - only the report needs matplotlib

    figure = Figure(figsize=(5, 3.2))
    axes = figure.add_subplot()
    both = np.concatenate([values_kept, values_dropped])
    bins = np.histogram_bin_edges(both, bins=min(30, max(5, len(both)))) if both.size and np.ptp(both) > 0 else 10
    axes.hist([values_kept, values_dropped], bins=bins, stacked=True, label=["kept", "dropped"], color=["#3a7d44", "#b23a48"])
    axes.set_title(title, fontsize=9)
    axes.set_ylabel("clips")
    axes.legend(fontsize=8)
    figure.tight_layout()
    return _png(figure)


def _counts_chart(counts: pd.Series) -> bytes:
    from matplotlib.figure import Figure  # noqa: PLC0415 - matplotlib loads only when this runs

    figure = Figure(figsize=(5, 0.6 + 0.4 * len(counts)))
    axes = figure.add_subplot()
    axes.barh(list(counts.index), list(counts.values), color=["#3a7d44" if name == "kept" else "#b23a48" for name in counts.index])
    axes.invert_yaxis()
    axes.set_xlabel("clips")
    figure.tight_layout()
    return _png(figure)


def _contact_sheet(rows: pd.DataFrame) -> bytes:
    """One row per clip: its first, middle and last frames, titled with the file, clip and scores."""
    from matplotlib.figure import Figure  # noqa: PLC0415 - matplotlib loads only when this runs


    figure = Figure(figsize=(7.5, 0.4 + 1.9 * len(rows)))
    for position, row in enumerate(rows.itertuples()):
        step = 1.0 / row.fps if row.fps and row.fps > 0 else 0.0
        times = [row.start_time, (row.start_time + row.end_time) / 2, max(row.start_time, row.end_time - step)]
        try:
            frames = decode_frames_at_times(row.source, times, max_side=THUMBNAIL_SIDE)
        except Exception as error:  # noqa: BLE001 - an unreadable file is shown as such, the page still renders
            frames, note = None, f"cannot decode: {type(error).__name__}"
        else:
            note = ""
        for column in range(3):
            axes = figure.add_subplot(len(rows), 3, 3 * position + column + 1)
            axes.set_axis_off()
            if frames is not None and column < len(frames):
                axes.imshow(frames[column])
            if column == 0:
                flow = "-" if pd.isna(row.flow_mean_norm) else f"{row.flow_mean_norm:.2g}"
                axes.set_title(f"{Path(row.source).name} #{row.clip_index}  motion {flow}  {row.reason} {note}", fontsize=7, loc="left")
    figure.tight_layout()
    return _png(figure)


def write_report(manifest_path: str | Path, folder: str | Path) -> Path:
    """Write ``folder/index.html`` and its PNGs for the manifest at ``manifest_path``, the folder swapped in whole
    (svd_fast._io.replace_folder: never over a folder svd-fast did not write); returns the page's path."""
    table = pd.read_parquet(manifest_path)
    table = table.assign(reason=drop_reasons(table), keep=table["keep"].fillna(False).astype(bool) if "keep" in table else False)
    clips = table[table["clip_index"] >= 0]
    images: dict[str, tuple[str, bytes]] = {}  # file name -> (caption, PNG)
    for column, title in HISTOGRAMS.items():
        values = pd.to_numeric(clips.get(column), errors="coerce") if column in clips else pd.Series(dtype=float)
        present = values.notna()
        if not present.any():
            continue
        kept = clips["keep"] & present
        images[f"hist_{column}.png"] = (title, _histogram(values[kept].to_numpy(float), values[present & ~clips["keep"]].to_numpy(float), title))
    counts = table["reason"].value_counts()
    images["counts.png"] = ("clips kept and dropped, by reason", _counts_chart(counts))
    for name, chosen in (("kept", clips[clips["keep"]]), ("dropped", clips[~clips["keep"]])):
        if len(chosen):
            images[f"contact_{name}.png"] = (f"{name} clips: first, middle, last frame ({min(len(chosen), CONTACT_SHEET_CLIPS)} of {len(chosen)})",
                                             _contact_sheet(chosen.head(CONTACT_SHEET_CLIPS)))
    page = _page(Path(manifest_path), table, counts, images)

    def write(staging: Path) -> None:
        for name, (_, png) in images.items():
            (staging / name).write_bytes(png)
        (staging / "index.html").write_text(page, encoding="utf-8")

    return _io.replace_folder(folder, "report", write, [manifest_path], name="--report") / "index.html"


def _page(manifest_path: Path, table: pd.DataFrame, counts: pd.Series, images: dict[str, tuple[str, bytes]]) -> str:
    rows = "".join(f'<tr><td>{html.escape(str(reason))}</td><td class="count" data-reason="{html.escape(str(reason))}">{count}</td></tr>' for reason, count in counts.items())
    figures = "".join(f'<figure><img src="{name}" alt="{html.escape(caption)}"><figcaption>{html.escape(caption)}</figcaption></figure>' for name, (caption, _) in images.items())
    kept = int(table["keep"].sum())
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>svd-fast curation report: {html.escape(manifest_path.name)}</title>
<style>body{{font-family:sans-serif;margin:1.5em}} figure{{display:inline-block;vertical-align:top;margin:0.5em}} img{{max-width:100%}}
table{{border-collapse:collapse}} td,th{{border:1px solid #ccc;padding:0.2em 0.6em}} td.count{{text-align:right}}</style></head>
<body><h1>Curation report</h1>
<p>Manifest <code>{html.escape(str(manifest_path))}</code>: <span id="rows">{len(table)}</span> rows,
<span id="kept">{kept}</span> kept, <span id="dropped">{len(table) - kept}</span> dropped.</p>
<table id="reasons"><tr><th>verdict</th><th>rows</th></tr>{rows}</table>
{figures}
</body></html>
"""
