"""TFDS builders for local corpora (array_record files, no TensorFlow)."""

from diffusion_text.data.builders.token_blocks import TokenBlocks

__all__ = ["TokenBlocks"]
