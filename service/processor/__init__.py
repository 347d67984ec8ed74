"""Request preprocessing: image bytes -> pixel crops, conversation -> prompt ids (Phi3VProcessor parity)."""

from service.processor.image import (
    CLIP_MEAN,
    CLIP_STD,
    CROP_SIZE,
    MAX_NUM_CROPS,
    TOKENS_PER_CROP,
    ImageDecodeError,
    ProcessedImage,
    decode_image,
    hd_image_size,
    num_image_tokens,
    preprocess_image,
)
from service.processor.prompt import ChatMessage, PromptBuilder, PromptError, validated_turns

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "CROP_SIZE",
    "MAX_NUM_CROPS",
    "TOKENS_PER_CROP",
    "ChatMessage",
    "ImageDecodeError",
    "ProcessedImage",
    "PromptBuilder",
    "PromptError",
    "decode_image",
    "hd_image_size",
    "num_image_tokens",
    "preprocess_image",
    "validated_turns",
]
