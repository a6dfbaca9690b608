"""Test helpers: tiny random VLMs of every supported family, test images and videos."""

from .tiny import FAMILIES, VIDEO_FAMILIES, build_tiny, make_image, make_video, save_tiny, tiny_tokenizer

__all__ = ["FAMILIES", "VIDEO_FAMILIES", "build_tiny", "save_tiny", "make_image", "make_video", "tiny_tokenizer"]
