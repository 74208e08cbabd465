"""Dataset curation (SVD paper Sec. 3 / App. C): one decoding pass per file for transitions (cuts, fades,
dissolves) at three frame rates and the 2-FPS optical-flow motion score with motion_bucket_id; OCR text
and CLIP embeddings / aesthetics / caption similarity on key frames; filters by threshold or bottom-p%;
a resumable Parquet manifest, locally or as Ray Data stages."""

from svd_fast.curation.cuts import Transition, detect_transitions, scenes_from_transitions
from svd_fast.curation.filters import Filter, apply_filters, parse_filter
from svd_fast.curation.flow import mean_flow_magnitude, motion_bucket_id, optical_flow, texture_level
from svd_fast.curation.manifest import ManifestBusyError
from svd_fast.curation.ocr import text_coverage
from svd_fast.curation.pipeline import ClipStage, CurationConfig, CurationRequestError, curate, list_inputs, stage_analyse, stage_ocr

__all__ = [
    "ClipStage", "CurationConfig", "CurationRequestError", "Filter", "ManifestBusyError", "Transition", "apply_filters", "curate",
    "detect_transitions", "list_inputs", "mean_flow_magnitude", "motion_bucket_id", "optical_flow", "parse_filter",
    "scenes_from_transitions", "stage_analyse", "stage_ocr", "text_coverage", "texture_level",
]
