"""rqcompile: KV-cache compression by block rotations + Lloyd-Max quantization."""

from rqcompile.cache import IsoQuantCache, PlanarQuantCache, RotorQuantCache, RQCache
from rqcompile.calibrate import Calibration, calibrate
from rqcompile.config import RQConfig

__all__ = [
    "RQConfig",
    "RQCache",
    "PlanarQuantCache",
    "IsoQuantCache",
    "RotorQuantCache",
    "Calibration",
    "calibrate",
]
__version__ = "0.1.0"


def load(path, **kwargs):
    """Load an exported artifact (AOTInductor or ONNX) as a runnable LM; see `rqcompile.runtime.loaded.load`."""
    from rqcompile.runtime.loaded import load as _load

    return _load(path, **kwargs)

from rqcompile.api import CompiledLM, apply  # noqa: E402

__all__ += ["apply", "CompiledLM"]
