"""Testing aids for alq-core and every backend that must match it.

* :mod:`alq_core.testing.reference`: slow, obviously-correct loop implementations;
* :mod:`alq_core.testing.strategies`: hypothesis strategies (needs ``hypothesis``);
* :mod:`alq_core.testing.assertions`: comparison helpers with informative messages.
"""

from .assertions import assert_payloads_equal, assert_quantized_equal
from .reference import reference_pack, reference_quantize, reference_unpack

__all__ = [
    "assert_payloads_equal",
    "assert_quantized_equal",
    "reference_pack",
    "reference_quantize",
    "reference_unpack",
]
