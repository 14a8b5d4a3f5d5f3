"""Fused kernels for echo-stream (Triton, with plain-torch references)."""
from .sdcm_attention import sdcm_attention, sdcm_attention_reference

__all__ = ["sdcm_attention", "sdcm_attention_reference"]
