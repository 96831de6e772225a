"""On-disk formats: activation stores, bit-packed connection masks and the correlation cache."""

from stores.activations import ActivationStore, StoreError, StoreMetadata, create_store
from stores.cache import CacheError, CorrelationCache, Stats, moved_rows, specificity
from stores.masks import MaskError, PackedMask

__all__ = [
    "ActivationStore",
    "CacheError",
    "CorrelationCache",
    "MaskError",
    "PackedMask",
    "Stats",
    "StoreError",
    "StoreMetadata",
    "create_store",
    "moved_rows",
    "specificity",
]
