"""Data: labelled image sources, and the synthetic-variant cache built from them."""

from .sources import BUILTIN_SOURCES, ImageSource, SourceError, open_source, pil_to_tensor

__all__ = ["BUILTIN_SOURCES", "ImageSource", "SourceError", "open_source", "pil_to_tensor"]
