"""The four networks of RCG, each a plain ``nn.Module`` configured by a dataclass."""

from .encoder import ENCODER_PRESETS, EncoderConfig, RepresentationEncoder, normalize_representation
from .mage import MAGE, MAGE_PRESETS, MAGEConfig
from .rdm import RDM_PRESETS, RDMConfig, RepresentationDenoiser
from .tokenizer import TOKENIZER_PRESETS, TokenizerConfig, VQTokenizer

__all__ = [
    "ENCODER_PRESETS", "EncoderConfig", "MAGE", "MAGEConfig", "MAGE_PRESETS", "RDMConfig", "RDM_PRESETS",
    "RepresentationDenoiser", "RepresentationEncoder", "TOKENIZER_PRESETS", "TokenizerConfig", "VQTokenizer",
    "normalize_representation",
]
