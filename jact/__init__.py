"""jact: Activation Compressed Training for JAX and Flax.

Autodiff keeps the forward pass's residuals alive until the backward pass needs them, and they
dominate training memory. jact stores them compressed (1-8 bits per value, per-group scale,
stochastic rounding) and restores them in the backward pass, as composable function transforms.
"""

from jact import memory, nnx, policies
from jact._context import use_policy
from jact.codec import QuantizedArray
from jact.decorator import compress
from jact.flax import compressed
from jact.info import ResidualInfo, ResidualTable
from jact.introspect import residuals
from jact.quantization import dequantize, quantize
from jact.recalibration import Recalibration
from jact.sensitivity import calibrate
from jact.transform import clear_caches, remat_compress

__version__ = "0.1.0"

__all__ = [
    "QuantizedArray", "Recalibration", "ResidualInfo", "ResidualTable", "calibrate", "clear_caches", "compress", "compressed",
    "dequantize", "memory", "nnx", "policies", "quantize", "remat_compress", "residuals", "use_policy",
]
