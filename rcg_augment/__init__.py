"""rcg-augment: RCG (representation-conditioned generation) as a data-augmentation plugin."""

from importlib.metadata import PackageNotFoundError, version

from .label_filter import PrototypeFilter, reconstruct_with_labels
from .pipeline import PIPELINE_PRESETS, PipelineConfig, RCGPipeline
from .representation import RepresentationAugment
from .settings import GenerationSettings
from .transforms import RCGAugment

try:
    __version__ = version("rcg-augment")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0+unknown"

__all__ = ["PIPELINE_PRESETS", "GenerationSettings", "PipelineConfig", "PrototypeFilter", "RCGAugment", "RCGPipeline",
           "RepresentationAugment", "__version__", "reconstruct_with_labels"]
