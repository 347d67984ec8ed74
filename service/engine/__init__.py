"""Per-worker engine: scheduler, paged KV cache, model runner, sampler."""

from .engine import Engine, EngineConfig, EngineStats, check_fits
from .errors import RequestFailed, RequestRefused
from .request import EngineRequest, FinishReason, ImagePayload, RequestOutput, SamplingOptions, TokenOutput

__all__ = [
    "Engine",
    "EngineConfig",
    "EngineRequest",
    "EngineStats",
    "FinishReason",
    "ImagePayload",
    "RequestFailed",
    "RequestOutput",
    "RequestRefused",
    "SamplingOptions",
    "TokenOutput",
    "check_fits",
]
