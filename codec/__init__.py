"""featcodec: quantization codecs for neural-network feature maps (numpy only)."""

from __future__ import annotations

from .api import (decode, decode_qtensor, dequantize, encode, encode_qtensor, inspect, methods,
                  quantize)
from .errors import FormatError, MissingExtraError
from .qconv import qconv2d
from .qtensor import QTensor

__version__ = "0.1.0"

__all__ = sorted([
    "FormatError",
    "MissingExtraError",
    "QTensor",
    "__version__",
    "decode",
    "decode_qtensor",
    "dequantize",
    "encode",
    "encode_qtensor",
    "inspect",
    "methods",
    "qconv2d",
    "quantize",
])
