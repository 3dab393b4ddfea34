"""Denoising networks."""

from difflab.models.context_unet import ContextUnet

__all__ = ["ContextUnet"]
