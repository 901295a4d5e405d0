"""Moved to `mu.model.quantize` (the model layer owns its inference kernels); kept so old imports work."""

from mu.model.quantize import (QUANT_MODES, Int4Linear, Int8Linear, Int8WeightOnlyLinear, quantize_,  # noqa: F401
                               quantize_int4_, quantize_int8_, quantize_int8_weight_only_)
