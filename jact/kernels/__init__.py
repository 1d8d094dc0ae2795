"""Pallas kernels for the codec: fused quantise+pack and unpack+dequantise.

`quantize_pallas` / `dequantize_pallas` take the arguments of `jact.codec.quantize` /
`jact.codec.dequantize` (the reference) and return bitwise the same results, in one pass over memory each. They
run compiled on GPU (Pallas' Triton backend) and interpreted elsewhere; `supports` says which
dtypes, bit widths and group sizes they handle (the rest stays on the jnp reference).
"""

from jact.kernels.pallas_codec import dequantize_pallas, quantize_pallas, supports

__all__ = ["dequantize_pallas", "quantize_pallas", "supports"]
