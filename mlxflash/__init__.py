"""mlxflash: run language models larger than memory, with the FFN streamed from the SSD
("LLM in a flash", Apple 2024), on MLX and mlx-lm."""

from __future__ import annotations

from .errors import BundleError, ConvertError, MlxflashError, UsageError
from .format.convert import convert
from .loader import load
from .serve.generate import Response, generate, stream_generate
from .serve.session import Session, session

__all__ = [
    "load",
    "generate",
    "stream_generate",
    "session",
    "Session",
    "convert",
    "Response",
    "MlxflashError",
    "BundleError",
    "ConvertError",
    "UsageError",
]
__version__ = "0.1.0"
