"""rqcompile: KV-cache compression by block rotations + Lloyd-Max quantization.

Public API: `apply` (compile a model with a compressed cache), `load` (run an exported artifact), the drop-in
transformers caches, `calibrate`, `key_sensitivity` (which layers' keys to widen), and `RQConfig`.
"""

from rqcompile.api import CompiledLM, apply
from rqcompile.cache import IsoQuantCache, PlanarQuantCache, RotorQuantCache, RQCache
from rqcompile.calibrate import Calibration, calibrate
from rqcompile.config import RQConfig
from rqcompile.sensitivity import KeySensitivity, key_sensitivity

__all__ = [
    "RQConfig",
    "apply",
    "CompiledLM",
    "load",
    "RQCache",
    "PlanarQuantCache",
    "IsoQuantCache",
    "RotorQuantCache",
    "Calibration",
    "calibrate",
    "KeySensitivity",
    "key_sensitivity",
]
__version__ = "0.1.0"


def load(path, **kwargs):
    """Load an exported artifact (AOTInductor or ONNX) as a runnable LM; see `rqcompile.runtime.loaded.load`.

    Imported lazily so that `import rqcompile` does not pull in onnxruntime or AOTInductor.
    """
    from rqcompile.runtime.loaded import load as _load

    return _load(path, **kwargs)
