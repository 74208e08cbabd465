"""`svd-fast curate --report DIR` opened in a real headless browser (Debian's chromium): every image renders
(natural size > 0) and the counts on the page match the manifest."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from svd_fast import _io
from svd_fast.data import synthetic

CHROMIUM = next((path for name in ("chromium", "chromium-browser", "google-chrome") if (path := shutil.which(name))), None)
# After load, each image's natural size is written into the DOM, which --dump-dom then prints.
PROBE = """<script>window.addEventListener("load", () => { for (const image of document.images) {
  image.setAttribute("data-natural", image.naturalWidth + "x" + image.naturalHeight); } });</script>"""


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A curated folder: a fast pan (filtered out), a still grainy shot (static), a slow pan (kept); and its report."""
    folder = tmp_path_factory.mktemp("report")
    videos = folder / "videos"
    videos.mkdir()
    synthetic.write_video(videos / "pan.mp4", synthetic.translating_texture(36, 64, 96, (0, 2), seed=1), fps=12)
    synthetic.write_video(videos / "still.mp4", synthetic.add_grain(synthetic.still_shot(synthetic.random_texture(64, 96, 2, seed=2), 36), 4 / 255), fps=12)
    synthetic.write_video(videos / "slow.mp4", synthetic.translating_texture(36, 64, 96, (1, 0), seed=3), fps=12)
    manifest, page_folder = folder / "m.parquet", folder / "page"
    command = [sys.executable, "-m", "svd_fast.cli", "curate", "--input", str(videos), "--out", str(manifest), "--no-ocr",
               "--filter", "flow_px_per_second<=18", "--report", str(page_folder)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr
    return manifest, page_folder


def test_report_files_and_counts_match_the_manifest(report: tuple[Path, Path]) -> None:
    manifest, folder = report
    table = pd.read_parquet(manifest)
    page = (folder / "index.html").read_text()
    assert f'<span id="rows">{len(table)}</span>' in page and f'<span id="kept">{int(table["keep"].sum())}</span>' in page
    for name in re.findall(r'<img src="([^"]+)"', page):
        assert (folder / name).stat().st_size > 0
    assert {"hist_flow_mean_norm.png", "hist_motion_bucket_id.png", "counts.png", "contact_kept.png", "contact_dropped.png"} <= set(re.findall(r'<img src="([^"]+)"', page))
    assert [path.name for path in folder.glob(".*")] == [_io.MARKER]  # svd-fast's mark, no temporary file left behind


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary on PATH (Debian: apt-get install chromium)")
def test_report_renders_in_headless_chromium(report: tuple[Path, Path], tmp_path: Path) -> None:
    manifest, folder = report
    probe_page = folder / "probe.html"
    probe_page.write_text((folder / "index.html").read_text().replace("</body>", PROBE + "</body>"))
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--allow-file-access-from-files", f"--user-data-dir={tmp_path}",
               "--virtual-time-budget=10000", "--dump-dom", probe_page.as_uri()]
    dom = subprocess.run(command, capture_output=True, text=True, timeout=300).stdout
    images = re.findall(r"<img[^>]*>", dom)
    assert images, dom[:2000]
    for image in images:
        natural = re.search(r'data-natural="(\d+)x(\d+)"', image)
        assert natural and int(natural[1]) > 0 and int(natural[2]) > 0, image
    table = pd.read_parquet(manifest)
    counts = dict(re.findall(r'data-reason="([^"]+)">(\d+)<', dom))
    assert sum(map(int, counts.values())) == len(table)
    assert int(counts.get("kept", 0)) == int(table["keep"].sum()) >= 1
    assert int(counts.get("static", 0)) == int((~table["keep"] & table["static"].fillna(False).astype(bool) & ~table.filter(like="pass_").eq(False).any(axis=1)).sum()) >= 1
    assert int(counts.get("flow_px_per_second_le18", 0)) == int((table["pass_flow_px_per_second_le18"] == False).sum()) >= 1  # noqa: E712
    assert np.isfinite(table["flow_mean_norm"]).all()
