"""The codec: per-group quantisation with stochastic rounding, packed into bytes (the reference).

`reference` is the pure jax.numpy codec (grouping, per-group code, special groups: see its
docstring); `formulas` is the arithmetic it shares step for step with the Pallas kernels in
`jact.kernels`, and `hashing` the counter-based rounding noise. The kernels import this package,
never the reverse; `jact.quantization` chooses between the two implementations.
"""

from jact.codec.reference import (
    FLOAT_DTYPES, GROUP_SIZE_QUANTUM, METADATA_BITS_PER_GROUP, MIN_RANGE, PACKED_BITS, ROUNDINGS,
    SUPPORTED_BITS, Layout, QuantizedArray, check_bits, check_float_dtype, check_group_size,
    check_rounding, dequantize, exact_at_one_bit, payload_nbytes, quantize, rounding_variance,
    stored_nbytes)

__all__ = [
    "FLOAT_DTYPES", "GROUP_SIZE_QUANTUM", "METADATA_BITS_PER_GROUP", "MIN_RANGE", "PACKED_BITS", "ROUNDINGS",
    "SUPPORTED_BITS", "Layout", "QuantizedArray", "check_bits", "check_float_dtype", "check_group_size",
    "check_rounding", "dequantize", "exact_at_one_bit", "payload_nbytes", "quantize", "rounding_variance",
    "stored_nbytes",
]
