"""CIFAR data: every source into one cached uint8 tensor, batched augmentation on the device, loaders."""

from .augment import AugmentConfig, BatchAugment
from .cache import Dataset, channel_stats, load_dataset, split_validation
from .loader import TensorLoader
from .sources import SAMPLE_FILE, SAMPLE_NAME, DataError, num_classes_of, resolve_source

__all__ = [
    "AugmentConfig",
    "BatchAugment",
    "DataError",
    "Dataset",
    "SAMPLE_FILE",
    "SAMPLE_NAME",
    "TensorLoader",
    "channel_stats",
    "load_dataset",
    "num_classes_of",
    "resolve_source",
    "split_validation",
]
