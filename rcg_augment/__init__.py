"""rcg-augment: RCG (representation-conditioned generation) as a data-augmentation plugin."""

from importlib.metadata import PackageNotFoundError, version

from .pipeline import PIPELINE_PRESETS, PipelineConfig, RCGPipeline
from .representation import RepresentationAugment
from .transforms import RCGAugment

try:
    __version__ = version("rcg-augment")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0+unknown"

__all__ = ["PIPELINE_PRESETS", "PipelineConfig", "RCGAugment", "RCGPipeline", "RepresentationAugment", "__version__"]
