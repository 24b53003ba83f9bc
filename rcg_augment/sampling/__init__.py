"""Samplers, kept apart from the networks: DDIM for the RDM, parallel decoding for MAGE."""

from .diffusion import DDIMSampler, NoiseSchedule
from .maskgit import apply_guidance, guidance_scale, keep_source_tokens, mask_ratio, maskgit_decode

__all__ = ["DDIMSampler", "NoiseSchedule", "apply_guidance", "guidance_scale", "keep_source_tokens", "mask_ratio",
           "maskgit_decode"]
