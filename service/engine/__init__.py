"""Per-worker engine: scheduler, paged KV cache, encoder cache, model runner, sampler."""

from .engine import Engine, EngineConfig, EngineStats, StepResult, StepTimings, check_fits
from .errors import RequestFailed, RequestRefused
from .pixels import PixelFile, PixelSource, TensorPixels
from .request import EngineRequest, FinishReason, ImageInput, RequestOutput, SamplingOptions, TokenOutput

__all__ = [
    "Engine",
    "EngineConfig",
    "EngineRequest",
    "EngineStats",
    "FinishReason",
    "ImageInput",
    "PixelFile",
    "PixelSource",
    "RequestFailed",
    "RequestOutput",
    "RequestRefused",
    "SamplingOptions",
    "StepResult",
    "StepTimings",
    "TensorPixels",
    "TokenOutput",
    "check_fits",
]
