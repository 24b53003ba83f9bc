"""Data: labelled image sources, and the synthetic-variant cache built from them."""

from .build import BuildLockedError, BuildSummary, StaleCacheError, build_synthetic
from .contact_sheet import cache_contact_sheet, contact_sheet
from .datasets import (
    FewShotAugmentedDataset,
    ShotVariantDataset,
    SyntheticDataset,
    load_synthetic,
    read_manifest,
)
from .sources import BUILTIN_SOURCES, ImageSource, SourceError, open_source, pil_to_tensor

__all__ = ["BUILTIN_SOURCES", "BuildLockedError", "BuildSummary", "FewShotAugmentedDataset", "ImageSource",
           "ShotVariantDataset", "SourceError", "StaleCacheError", "SyntheticDataset", "build_synthetic",
           "cache_contact_sheet", "contact_sheet", "load_synthetic", "open_source", "pil_to_tensor", "read_manifest"]
