"""Python client library and CLI for the VisionChat gRPC service (Phi-3.5-vision-instruct)."""

from .aio import AsyncVisionChatClient
from .errors import RpcErrorInfo, describe_rpc_error
from .requests import DEFAULT_CHUNK_SIZE, PreparedRequest, prepare_request
from .results import ResultAccumulator, StreamProtocolError
from .sync import VisionChatClient
from .types import ChatResult, Delta, ImageSource, Timings, TokenCount, TokenLogprob, Usage, Video, VideoInfo

__all__ = [
    "AsyncVisionChatClient",
    "ChatResult",
    "DEFAULT_CHUNK_SIZE",
    "Delta",
    "ImageSource",
    "PreparedRequest",
    "ResultAccumulator",
    "RpcErrorInfo",
    "StreamProtocolError",
    "Timings",
    "TokenCount",
    "TokenLogprob",
    "Usage",
    "Video",
    "VideoInfo",
    "VisionChatClient",
    "describe_rpc_error",
    "prepare_request",
]
