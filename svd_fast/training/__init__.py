"""Image-to-video training of the SVD UNet with DeepSpeed ZeRO (objective, config, trainer)."""

from svd_fast.training.config import TrainConfig
from svd_fast.training.objective import ObjectiveConfig, TrainingBatch, edm_loss, encode_batch
from svd_fast.training.trainer import TrainResult, as_config, train

__all__ = ["ObjectiveConfig", "TrainConfig", "TrainResult", "TrainingBatch", "as_config", "edm_loss", "encode_batch", "train"]
