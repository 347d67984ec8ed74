"""VisionChat: a gRPC serving system for Phi-3.5-vision-instruct."""

__version__ = "0.1.0"
