"""Curation: cut detection, optical flow, OCR, CLIP scores, filters, manifest/resume, bad input, Ray, CLI."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from utils import requires_cuda

from svd_fast.curation import (
    CurationConfig,
    CurationRequestError,
    apply_filters,
    curate,
    detect_cuts,
    mean_flow_magnitude,
    motion_bucket_id,
    optical_flow,
    parse_filter,
    pipeline,
    text_coverage,
)
from svd_fast.curation import manifest as manifest_module
from svd_fast.curation.cuts import sample_by_time
from svd_fast.curation.flow import dali_unavailable_reason, to_gray
from svd_fast.curation.ocr import tesseract_unavailable_reason
from svd_fast.data import VideoDecodeError, decode_all_frames, probe_video
from svd_fast.data.synthetic import scenes_with_cuts, translating_texture, write_video

requires_tesseract = pytest.mark.skipif(tesseract_unavailable_reason() is not None, reason=f"OCR unavailable: {tesseract_unavailable_reason()}")
NO_OCR = CurationConfig(ocr=False)


# ---------------------------------------------------------------- cut detection


@pytest.mark.parametrize("scene_lengths", [[12, 10, 14], [9, 30, 8, 11]])
def test_hard_cuts_found_exactly(scene_lengths: list[int]) -> None:
    frames, cuts = scenes_with_cuts(scene_lengths, 48, 64, shift=(0, 1))
    assert detect_cuts(frames, min_scene_frames=6) == cuts


def test_hard_cuts_found_exactly_after_encoding(tmp_path: Path) -> None:
    frames, cuts = scenes_with_cuts([12, 10, 14], 64, 96, shift=(1, 1))
    path = write_video(tmp_path / "cuts.mp4", frames, fps=8)  # lossy h264: the detector must survive compression
    assert detect_cuts(decode_all_frames(path, max_side=96)) == cuts


def test_cuts_agree_with_pyscenedetect(tmp_path: Path) -> None:
    """Cross-check against the field's tool (optional: `pip install --no-deps scenedetect`)."""
    scenedetect = pytest.importorskip("scenedetect", reason="PySceneDetect is an optional cross-check, not installed")
    frames, cuts = scenes_with_cuts([30, 20, 26], 72, 128, shift=(1, 1))
    path = write_video(tmp_path / "cuts.mp4", frames, fps=24)
    scenes = scenedetect.detect(str(path), scenedetect.ContentDetector(threshold=27.0, min_scene_len=8))
    reference = [start.frame_num for start, _end in scenes[1:]]
    assert reference == cuts
    assert detect_cuts(decode_all_frames(path, max_side=96)) == reference


def test_transition_rates_are_in_time_not_frames() -> None:
    times = np.concatenate([np.arange(60) / 30, 2 + np.arange(20) / 5])  # 30 fps, then 5 fps
    assert sample_by_time(times, 1.0).tolist() == [0, 30, 60, 65, 70, 75]


def test_detect_cuts_bad_input() -> None:
    with pytest.raises(ValueError, match="frames"):
        detect_cuts(np.zeros((4, 8, 8), np.uint8))
    with pytest.raises(ValueError, match="threshold"):
        detect_cuts(np.zeros((4, 8, 8, 3), np.uint8), threshold=0)
    with pytest.raises(ValueError, match="times"):
        detect_cuts(np.zeros((4, 8, 8, 3), np.uint8), times=[0.0, 1.0])


# ---------------------------------------------------------------- optical flow


@pytest.mark.parametrize("backend", ["opencv", "torch"])
@pytest.mark.parametrize("shift", [(0.0, 2.0), (1.0, -3.0), (3.0, 4.0)])
def test_flow_matches_translation(shift: tuple[float, float], backend: str) -> None:
    frames = translating_texture(3, 96, 160, shift)
    assert mean_flow_magnitude(frames, backend) == pytest.approx(math.hypot(*shift), rel=0.10)
    field = optical_flow(*to_gray(frames[:2]).split(1), backend=backend)
    assert field.shape == (1, 2, 96, 160) and field.dtype == torch.float32
    assert float(field[0, 0].median()) == pytest.approx(shift[1], abs=0.05)  # channel 0 is dx
    assert float(field[0, 1].median()) == pytest.approx(shift[0], abs=0.05)


def test_torch_flow_is_batched_consistently() -> None:
    frames = to_gray(translating_texture(5, 48, 64, (1, 2)))
    batched = optical_flow(frames[:-1], frames[1:], "torch")
    single = torch.cat([optical_flow(frames[i : i + 1], frames[i + 1 : i + 2], "torch") for i in range(4)])
    torch.testing.assert_close(batched, single, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", ["opencv", "torch"])
def test_static_clip_has_no_flow(backend: str) -> None:
    assert mean_flow_magnitude(translating_texture(4, 48, 64, (0, 0)), backend) < 0.01


def test_flow_bad_input() -> None:
    with pytest.raises(ValueError, match="first and second"):
        optical_flow(torch.zeros(1, 8, 8), torch.zeros(1, 8, 9))
    with pytest.raises(ValueError, match="backend"):
        optical_flow(torch.zeros(1, 8, 8), torch.zeros(1, 8, 8), backend="nvof")
    with pytest.raises(ValueError, match="at least 2 frames"):
        mean_flow_magnitude(np.zeros((1, 8, 8, 3), np.uint8))
    if dali_unavailable_reason():
        with pytest.raises(RuntimeError, match="dali"):
            optical_flow(torch.zeros(1, 8, 8), torch.zeros(1, 8, 8), backend="dali")


@requires_cuda
def test_auto_flow_on_cuda_is_torch_and_stays_on_device() -> None:
    frames = to_gray(translating_texture(2, 96, 160, (1.0, 2.0)), "cuda")
    field = optical_flow(frames[:1], frames[1:])
    assert field.device.type == "cuda"
    torch.testing.assert_close(field.cpu(), optical_flow(frames[:1].cpu(), frames[1:].cpu(), "torch"), atol=1e-3, rtol=1e-3)


def test_flow_backend_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="flow_backend"):
        CurationConfig(flow_backend="nvof")
    if dali_unavailable_reason():
        with pytest.raises(CurationRequestError, match="dali"):
            curate([], tmp_path / "m.parquet", CurationConfig(flow_backend="dali"))


def test_motion_bucket_mapping() -> None:
    assert motion_bucket_id(0.0, 2.0) == 0
    assert motion_bucket_id(0.125, 2.0) == 128  # a quarter diagonal per second is the middle of the range
    assert motion_bucket_id(10.0, 2.0) == 255
    assert motion_bucket_id(0.01, 2.0) < motion_bucket_id(0.02, 2.0)
    with pytest.raises(ValueError, match="finite"):
        motion_bucket_id(float("nan"), 2.0)


# ---------------------------------------------------------------- OCR


def _text_frame(height: int = 192, width: int = 320) -> np.ndarray:
    from PIL import Image, ImageDraw, ImageFont

    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=40)
    draw.text((10, 20), "HELLO WORLD", fill="black", font=font)
    draw.text((10, 100), "BIG TEXT", fill="black", font=font)
    return np.array(image)


@requires_tesseract
def test_ocr_coverage_text_vs_textureless() -> None:
    assert text_coverage(_text_frame()) > 0.1
    assert text_coverage(np.full((192, 320, 3), 128, np.uint8)) == 0.0
    with pytest.raises(ValueError, match="frame"):
        text_coverage(np.zeros((8, 8), np.uint8))


# ---------------------------------------------------------------- filters


def test_filters_thresholds_and_percentiles() -> None:
    table = pd.DataFrame({"score": [float(i) for i in range(8)] + [None], "error": [None] * 8 + ["cuts: broken"]})
    filtered, removed = apply_filters(table, [parse_filter("score:bottom=25"), parse_filter("score<=6")])
    assert filtered["keep"].tolist() == [False, False, True, True, True, True, True, False, False]
    assert removed["error"] == 1 and removed["score_bottom25pct"] == 2 and removed["score_le6"] == 1 and removed["kept"] == 5
    assert filtered["pass_score_le6"].isna().tolist()[-1]  # no score: no verdict
    with pytest.raises(ValueError, match="expected COLUMN"):
        parse_filter("score ~ 3")
    with pytest.raises(ValueError, match="no column"):
        apply_filters(table, [parse_filter("missing>=1")])


# ---------------------------------------------------------------- pipeline, manifest, resume, bad input


@pytest.fixture(scope="module")
def video_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[int]]:
    folder = tmp_path_factory.mktemp("videos")
    frames, cuts = scenes_with_cuts([12, 10, 14], 64, 96, shift=(0, 1))
    write_video(folder / "cuts.mp4", frames, fps=8, lossless=True)
    write_video(folder / "static.mp4", translating_texture(16, 64, 96, (0, 0)), fps=8, lossless=True)
    return folder, cuts


def _add_bad_files(folder: Path) -> None:
    (folder / "garbage.mp4").write_bytes(b"\x00\x01not a video" * 50)
    (folder / "empty.mp4").write_bytes(b"")
    (folder / "notes.txt").write_text("hello")
    good = (folder / "cuts.mp4").read_bytes()
    (folder / "truncated_header.mp4").write_bytes(good[len(good) // 2 :])  # moov/ftyp gone: corrupt container


def test_manifest_rows_scores_and_schema(video_dir: tuple[Path, list[int]], tmp_path: Path) -> None:
    folder, cuts = video_dir
    out = tmp_path / "m.parquet"
    summary = curate(folder, out, NO_OCR, filters=["flow_mean_norm>=0.001"])
    table = pd.read_parquet(out)
    assert set(manifest_module.SCHEMA.names) <= set(table.columns)
    moving = table[table["source"].str.endswith("cuts.mp4")].sort_values("clip_index")
    assert moving["start_frame"].tolist() == [0, *cuts] and moving["end_frame"].tolist() == [*cuts, 36]
    assert moving["start_time"].tolist() == pytest.approx([0, cuts[0] / 8, cuts[1] / 8])
    # 8 fps sampled at 2 FPS = every 4th frame; the texture moves 1 px/frame -> 4 px per flow step.
    assert moving["flow_mean_px"].tolist() == pytest.approx([4.0] * 3, rel=0.10)
    assert not moving["static"].any() and moving["pass_flow_mean_norm_ge0.001"].all()
    static = table[table["source"].str.endswith("static.mp4")]
    assert static["static"].all() and not static["keep"].any() and (static["motion_bucket_id"] == 0).all()
    assert table["source"].map(lambda source: Path(source).is_absolute()).all()
    assert moving["flow_px_per_second"].tolist() == pytest.approx([8.0] * 3, rel=0.10)
    assert (table["width"] == 96).all() and (table["fps"] == 8).all()
    assert table["skipped"].str.contains("ocr: disabled").all() and table["skipped"].str.contains("clip: no model given").all()
    assert summary["removed_by_filter"]["flow_mean_norm_ge0.001"] == 1 and summary["clips"] == 4


def test_short_clip_flow_is_rescaled_to_half_a_second(tmp_path: Path) -> None:
    frames, cuts = scenes_with_cuts([12, 3], 64, 96, shift=(0, 1))  # the last scene is shorter than one 2-FPS step
    write_video(tmp_path / "short.mp4", frames, fps=8, lossless=True)
    curate(tmp_path, tmp_path / "m.parquet", NO_OCR)
    table = pd.read_parquet(tmp_path / "m.parquet").sort_values("clip_index")
    assert table["start_frame"].tolist() == [0, *cuts]
    # 1 px/frame at 8 fps is 4 px per 0.5 s for both clips, whatever frame step each could use.
    assert table["flow_mean_px"].tolist() == pytest.approx([4.0, 4.0], rel=0.10)


def test_codec_motion_vector_prefilter(video_dir: tuple[Path, list[int]], tmp_path: Path) -> None:
    folder, _ = video_dir
    curate(folder, tmp_path / "m.parquet", NO_OCR)
    table = pd.read_parquet(tmp_path / "m.parquet")
    moving, static = table[table["source"].str.endswith("cuts.mp4")], table[table["source"].str.endswith("static.mp4")]
    assert (moving["codec_mv_mean_px"] > 0.5).all() and (moving["flow_backend"] == "opencv").all()
    assert (static["codec_mv_mean_px"] == 0).all() and (static["flow_backend"] == "codec-motion-vectors").all()
    assert static["static"].all() and (static["flow_mean_px"] == 0).all() and static["static_reason"].str.startswith("codec").all()
    curate(folder, tmp_path / "dense.parquet", CurationConfig(ocr=False, codec_static_prefilter=False))
    dense = pd.read_parquet(tmp_path / "dense.parquet")
    dense_static = dense[dense["source"].str.endswith("static.mp4")]
    assert dense_static["static"].all() and (dense_static["flow_backend"] == "opencv").all() and (dense_static["flow_mean_px"] < 0.05).all()


def test_bad_files_recorded_and_run_continues(video_dir: tuple[Path, list[int]], tmp_path: Path) -> None:
    folder = tmp_path / "mixed"
    folder.mkdir()
    for name in ("cuts.mp4", "static.mp4"):
        (folder / name).write_bytes((video_dir[0] / name).read_bytes())
    _add_bad_files(folder)
    listing = tmp_path / "list.txt"
    listing.write_text("".join(f"mixed/{path.name}\n" for path in sorted(folder.iterdir())) + "mixed/does_not_exist.mp4\n")
    curate(listing, tmp_path / "m.parquet", NO_OCR)
    table = pd.read_parquet(tmp_path / "m.parquet")
    errors = table.set_index(table["source"].map(lambda source: Path(source).name))["error"]
    for name in ("garbage.mp4", "empty.mp4", "notes.txt", "truncated_header.mp4", "does_not_exist.mp4"):
        assert isinstance(errors[name], str) and errors[name].startswith("analyse:"), name
    assert "file is empty" in errors["empty.mp4"] and "file does not exist" in errors["does_not_exist.mp4"]
    assert (table[table["error"].isna()]["clip_index"] >= 0).sum() == 4  # the good files are complete
    with pytest.raises(VideoDecodeError):
        probe_video(folder / "notes.txt")


def test_resume_skips_finished_files_and_survives_interruption(video_dir: tuple[Path, list[int]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder, _ = video_dir
    out = tmp_path / "m.parquet"
    real_stage = pipeline.stage_analyse
    calls: list[str] = []

    def interrupted_after_first_file(item: dict, config: CurationConfig | None = None) -> dict:
        calls.append(item["path"])
        if len(calls) == 2:
            raise KeyboardInterrupt  # the process dies in the middle of the second file
        return real_stage(item, config)

    monkeypatch.setattr(pipeline, "stage_analyse", interrupted_after_first_file)
    with pytest.raises(KeyboardInterrupt):
        curate(folder, out, NO_OCR)
    assert len(list(manifest_module.parts_dir(out).glob("*.parquet"))) == 1  # the first file's work is kept
    assert not list(manifest_module.parts_dir(out).glob(".*"))  # no temporary file left behind
    monkeypatch.setattr(pipeline, "stage_analyse", real_stage)
    summary = curate(folder, out, NO_OCR)
    assert summary["files_processed"] == 1 and summary["files_skipped_finished"] == 1

    def must_not_run(*args: object, **kwargs: object) -> dict:
        raise AssertionError("a finished file was processed again")

    monkeypatch.setattr(pipeline, "stage_analyse", must_not_run)
    again = curate(folder, out, NO_OCR, filters=["flow_mean_norm:bottom=50"])
    assert again["files_processed"] == 0 and again["clips"] == 4
    assert "pass_flow_mean_norm_bottom50pct" in pd.read_parquet(out).columns  # filters re-applied without recomputing


@requires_tesseract
def test_ocr_stage_in_pipeline(tmp_path: Path) -> None:
    text = np.repeat(_text_frame(192, 320)[None], 6, axis=0)
    write_video(tmp_path / "text.mp4", text, fps=4, lossless=True)
    write_video(tmp_path / "plain.mp4", np.full((6, 192, 320, 3), 90, np.uint8), fps=4, lossless=True)
    curate(tmp_path, tmp_path / "m.parquet", CurationConfig(drop_static=False), filters=["ocr_coverage<=0.05"])
    table = pd.read_parquet(tmp_path / "m.parquet")
    by_name = {Path(row.source).name: row for row in table.itertuples()}
    assert by_name["text.mp4"].ocr_coverage > 0.1 and not by_name["text.mp4"].keep
    assert by_name["plain.mp4"].ocr_coverage == 0.0 and by_name["plain.mp4"].keep


# ---------------------------------------------------------------- CLIP


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """A tiny random CLIPModel with a 54-token character tokenizer, the same model without a tokenizer, and a head."""
    import json
    import shutil

    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    torch.manual_seed(0)
    text = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "num_hidden_layers": 1, "vocab_size": 54}
    config = CLIPConfig(
        text_config={**text, "bos_token_id": 52, "eos_token_id": 53, "pad_token_id": 53},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "num_hidden_layers": 1, "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )
    folder = tmp_path_factory.mktemp("clip")
    CLIPModel(config).save_pretrained(folder / "bare")
    shutil.copytree(folder / "bare", folder / "model")
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {**{c: i for i, c in enumerate(letters)}, **{c + "</w>": 26 + i for i, c in enumerate(letters)}, "<|startoftext|>": 52, "<|endoftext|>": 53}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt")).save_pretrained(folder / "model")
    head = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    torch.save(head.state_dict(), folder / "head.pt")
    return folder / "model", folder / "bare", folder / "head.pt"


def test_clip_scores_in_pipeline(video_dir: tuple[Path, list[int]], tiny_clip: tuple[Path, Path, Path], tmp_path: Path) -> None:
    from transformers import CLIPModel, CLIPTokenizer

    from svd_fast.curation.clip_scores import ClipScorer

    model_path, bare_path, head_path = tiny_clip
    folder, _ = video_dir
    config = CurationConfig(ocr=False, clip_model=str(model_path), aesthetic_head=str(head_path))
    listing = tmp_path / "list.txt"
    listing.write_text(f"{folder / 'cuts.mp4'}\ta red ball\n")
    curate(listing, tmp_path / "m.parquet", config, filters=["aesthetic_score:bottom=50"])
    table = pd.read_parquet(tmp_path / "m.parquet")
    assert len(table) == 3 and table["clip_embedding"].map(len).eq(16).all()
    assert table["aesthetic_score"].notna().all() and table["clip_text_similarity"].notna().all()
    # Recompute clip 0 independently: transformers' model, our head, CLIP preprocessing of the key frames.
    model = CLIPModel.from_pretrained(str(model_path)).eval()
    head = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    head.load_state_dict(torch.load(head_path))
    tokens = CLIPTokenizer.from_pretrained(str(model_path))(["a red ball"], return_tensors="pt")
    frames = torch.as_tensor(decode_all_frames(folder / "cuts.mp4")[[0, 5, 11]]).permute(0, 3, 1, 2).float() / 255
    pixels = torch.nn.functional.interpolate(frames, size=(32, 48), mode="bicubic", antialias=True)[..., 8:40]
    mean, std = torch.tensor([0.48145466, 0.4578275, 0.40821073]), torch.tensor([0.26862954, 0.26130258, 0.27577711])
    pixels = (pixels - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    with torch.no_grad():
        images = torch.nn.functional.normalize(model.get_image_features(pixel_values=pixels).pooler_output, dim=-1)
        text = torch.nn.functional.normalize(model.get_text_features(**tokens).pooler_output, dim=-1)
        expected_aesthetic = float(head(images).mean())
        expected_similarity = float((images @ text[0]).mean())
    first = table.sort_values("clip_index").iloc[0]
    assert first["aesthetic_score"] == pytest.approx(expected_aesthetic, rel=1e-4, abs=1e-5)
    assert first["clip_text_similarity"] == pytest.approx(expected_similarity, rel=1e-4, abs=1e-5)
    assert np.linalg.norm(first["clip_embedding"]) == pytest.approx(1.0, rel=1e-4)
    assert table["keep"].sum() == 2  # bottom 50% of 3 scores removes the lowest one
    bare = ClipScorer(bare_path, None, "cpu")
    assert bare.tokenizer is None and "no tokenizer" in bare.tokenizer_missing_reason
    assert bare.score(decode_all_frames(folder / "cuts.mp4")[:3], "a red ball")["clip_text_similarity"] is None
    with pytest.raises(ValueError, match="last layer must output 1"):
        torch.save(torch.nn.Linear(16, 2).state_dict(), tmp_path / "bad_head.pt")
        ClipScorer(bare_path, tmp_path / "bad_head.pt", "cpu")


# ---------------------------------------------------------------- Ray and CLI


def test_ray_path_matches_local(video_dir: tuple[Path, list[int]], tmp_path: Path) -> None:
    ray = pytest.importorskip("ray")
    folder, _ = video_dir
    bad = tmp_path / "in"
    bad.mkdir()
    for name in ("cuts.mp4", "static.mp4"):
        (bad / name).write_bytes((folder / name).read_bytes())
    (bad / "garbage.mp4").write_bytes(b"junk" * 100)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        summary = curate(bad, tmp_path / "ray.parquet", NO_OCR, ray_address="local")
    finally:
        ray.shutdown()
    curate(bad, tmp_path / "local.parquet", NO_OCR)
    columns = ["source", "clip_index", "start_frame", "end_frame", "flow_mean_px", "static", "error"]
    ray_table = pd.read_parquet(tmp_path / "ray.parquet")[columns].sort_values(["source", "clip_index"]).reset_index(drop=True)
    local_table = pd.read_parquet(tmp_path / "local.parquet")[columns].sort_values(["source", "clip_index"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(ray_table, local_table)
    assert summary["files_processed"] == 3 and summary["clips"] == 4


def test_cli_end_to_end(video_dir: tuple[Path, list[int]], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from svd_fast.commands import curate as curate_command

    parser = argparse.ArgumentParser(prog="svd-fast")
    curate_command.add_parser(parser.add_subparsers(dest="command"))
    out = tmp_path / "cli.parquet"
    args = parser.parse_args(["curate", "--input", str(video_dir[0]), "--out", str(out), "--no-ocr", "--filter", "flow_mean_norm>=0.001"])
    assert args.func(args) == 0
    assert '"kept": 3' in capsys.readouterr().out
    assert pd.read_parquet(out)["keep"].sum() == 3
    with pytest.raises(SystemExit):
        parser.parse_args(["curate", "--out", str(out)])  # --input is required
    assert "examples:" in curate_command.EXAMPLES


# ---------------------------------------------------------------- OCR text gate


def _photo(name: str, height: int = 480, width: int = 854) -> np.ndarray:
    import cv2
    from skimage import data

    image = getattr(data, name)()
    image = np.stack([image] * 3, axis=-1) if image.ndim == 2 else image[..., :3]
    return np.ascontiguousarray(cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA))


def _caption(background: np.ndarray, scale: float, band: bool = False) -> np.ndarray:
    """Two lines drawn with cv2.putText at font ``scale``: dark on a light background, else white, on a darkened band
    (as subtitles are) when ``band``."""
    import cv2

    frame = background.copy()
    thickness = max(1, round(scale * 2))
    light = float(frame.mean()) > 200
    line_height = int(34 * scale)
    if band:
        bottom = 30 + int(line_height * 3.0)
        frame[10:bottom] = (frame[10:bottom] * 0.35).astype(np.uint8)
    for index, line in enumerate(("BREAKING NEWS TODAY", "Call 555 0199 now")):
        origin = (20, 30 + line_height + index * int(line_height * 1.6))
        cv2.putText(frame, line, origin, cv2.FONT_HERSHEY_SIMPLEX, scale, (20, 20, 20) if light else (255, 255, 255), thickness, cv2.LINE_AA)
    return frame


@requires_tesseract
@pytest.mark.parametrize("background", ["plain", "noise", "astronaut", "coffee"])
@pytest.mark.parametrize("scale", [0.8, 1.5, 3.0])
def test_ocr_gate_matches_ungated_coverage(background: str, scale: float) -> None:
    """Gated coverage (Tesseract on candidate crops only) equals whole-frame Tesseract's within 0.01 + 10%, for
    text 12-60 px high on a plain page, on noise and on photos (text on a darkened band, as subtitles are)."""
    if background == "plain":
        frame = _caption(np.full((480, 854, 3), 235, np.uint8), scale)
    elif background == "noise":
        frame = _caption(np.random.default_rng(0).normal(110, 12, (480, 854, 3)).clip(0, 255).astype(np.uint8), scale)
    else:
        frame = _caption(_photo(background), scale, band=True)
    ungated = text_coverage(frame, gate=False)
    gated = text_coverage(frame)
    assert ungated > 0.01  # the reference reads the text
    if background in ("plain", "noise"):
        assert gated == pytest.approx(ungated, abs=0.01, rel=0.1)
    else:
        # On photos the crops can read words that whole-frame layout analysis misses, never fewer; and never more
        # than the same text covers on a plain page.
        page = text_coverage(_caption(np.full((480, 854, 3), 235, np.uint8), scale), gate=False)
        assert ungated * 0.9 - 0.01 <= gated <= page * 1.1 + 0.01


@requires_tesseract
@pytest.mark.parametrize("name", ["astronaut", "coffee", "chelsea", "camera", "rocket", "brick", "grass", "gravel", "texture", "uniform"])
def test_ocr_gate_photos_without_text(name: str) -> None:
    if name == "texture":
        frame = translating_texture(1, 480, 854, seed=3)[0]
    elif name == "uniform":
        frame = np.full((480, 854, 3), 128, np.uint8)
    else:
        frame = _photo(name)
    assert text_coverage(frame) < 0.01


@requires_tesseract
def test_ocr_gate_skips_tesseract_without_candidates(monkeypatch: pytest.MonkeyPatch) -> None:
    from svd_fast.curation import ocr

    calls: list[tuple[int, ...]] = []
    read = ocr._read_words

    def counted(image: np.ndarray, min_confidence: float) -> list:
        calls.append(image.shape)
        return read(image, min_confidence)

    monkeypatch.setattr(ocr, "_read_words", counted)
    text_free = [np.full((480, 854, 3), 90, np.uint8), translating_texture(1, 480, 854, seed=5)[0], _photo("chelsea"), _photo("brick")]
    assert all(ocr.text_candidate_boxes(frame) == [] for frame in text_free)
    assert ocr.text_coverages(text_free) == [0.0] * len(text_free)
    assert calls == []
    # Text in some of them: one Tesseract call for all frames, on an image smaller than one frame per text frame.
    frames = [*text_free, _caption(_photo("astronaut"), 1.5, band=True), _caption(np.full((480, 854, 3), 235, np.uint8), 0.8)]
    coverages = ocr.text_coverages(frames)
    assert len(calls) == 1 and calls[0][0] * calls[0][1] < 2 * 480 * 854
    assert coverages[:4] == [0.0] * 4 and min(coverages[4:]) > 0.01
