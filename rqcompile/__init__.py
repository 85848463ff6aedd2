"""rqcompile: KV-cache compression by block rotations + Lloyd-Max quantization."""

from rqcompile.config import RQConfig

__all__ = ["RQConfig"]
__version__ = "0.1.0"
