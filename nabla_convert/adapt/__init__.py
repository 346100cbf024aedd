"""adapt: short fine-tunes of converted NABLA checkpoints (distillation from the dense teacher, flow matching)."""

from nabla_convert.adapt.data import DataError, LatentDataset, TimestepSampler, write_latent_shard
from nabla_convert.adapt.run import run_folder
from nabla_convert.adapt.settings import AdaptError, AdaptSettings
from nabla_convert.adapt.trainer import adapt

__all__ = [
    "AdaptError",
    "AdaptSettings",
    "DataError",
    "LatentDataset",
    "TimestepSampler",
    "adapt",
    "run_folder",
    "write_latent_shard",
]
