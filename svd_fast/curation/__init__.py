"""Dataset curation (SVD paper Sec. 3 / App. C): cut detection at 3 frame rates, optical-flow motion
filter with motion_bucket_id, OCR text filter, CLIP embeddings / aesthetics / caption similarity, filters
by threshold or bottom-p%, a resumable Parquet manifest, locally or as Ray Data stages."""

from svd_fast.curation.cuts import detect_cuts, scenes_from_cuts
from svd_fast.curation.filters import Filter, apply_filters, parse_filter
from svd_fast.curation.flow import lucas_kanade_flow, mean_flow_magnitude, motion_bucket_id
from svd_fast.curation.ocr import text_coverage
from svd_fast.curation.pipeline import ClipStage, CurationConfig, curate, list_inputs, stage_cuts, stage_flow, stage_ocr

__all__ = [
    "ClipStage", "CurationConfig", "Filter", "apply_filters", "curate", "detect_cuts", "list_inputs",
    "lucas_kanade_flow", "mean_flow_magnitude", "motion_bucket_id", "parse_filter", "scenes_from_cuts",
    "stage_cuts", "stage_flow", "stage_ocr", "text_coverage",
]
