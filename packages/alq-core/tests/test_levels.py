import numpy as np
import pytest
from alq_core import (
    QuantizerConfig,
    default_levels,
    exponential_levels,
    quantile_levels,
    ternary_levels,
    uniform_levels,
    validate_levels,
)
from scipy import stats


def test_uniform_three_bits():
    np.testing.assert_array_equal(
        uniform_levels(3), np.array([-7, -5, -3, -1, 1, 3, 5, 7], dtype=np.float32) / np.float32(7)
    )


def test_exponential_three_bits_half():
    expected = [-1, -0.5, -0.25, -0.125, 0.125, 0.25, 0.5, 1]
    np.testing.assert_array_equal(exponential_levels(3, 0.5), np.array(expected, dtype=np.float32))


@pytest.mark.parametrize("bits", range(1, 9))
def test_families_have_2_to_the_bits_levels_and_no_zero(bits):
    for table in (uniform_levels(bits), exponential_levels(bits, 0.7)):
        assert table.dtype == np.float32 and table.shape == (2**bits,)
        assert table[0] == -1 and table[-1] == 1 and np.all(np.diff(table) > 0)
        assert 0.0 not in table
        np.testing.assert_array_equal(table, -table[::-1])


def test_one_bit_is_sign():
    np.testing.assert_array_equal(uniform_levels(1), [-1, 1])
    np.testing.assert_array_equal(exponential_levels(1, 0.3), [-1, 1])


def test_ternary():
    np.testing.assert_array_equal(ternary_levels(), [-1, 0, 1])


def test_quantile_levels_follow_the_ppf_with_forced_ends():
    dist = stats.truncnorm(-10, 10, loc=0, scale=0.1)
    table = quantile_levels(2, dist.ppf)
    np.testing.assert_allclose(table[1:3], dist.ppf([1 / 3, 2 / 3]), rtol=1e-6)
    assert table[0] == -1 and table[-1] == 1


def test_default_levels():
    np.testing.assert_array_equal(default_levels(QuantizerConfig("alq", bits=3)), exponential_levels(3, 0.5))
    with pytest.raises(ValueError, match="'fp32' method has no level table"):
        default_levels(QuantizerConfig("fp32"))


@pytest.mark.parametrize(
    ("levels", "match"),
    [
        ([1.0], r"1-D array of 2\.\.256 values; got shape \(1,\)"),
        ([[-1.0, 1.0]], r"1-D array"),
        ([-1.0, np.nan, 1.0], r"must be finite"),
        ([-0.5, 1.0], r"start at -1 and end at 1; got first=-0\.5"),
        ([-1.0, 0.5, 0.2, 1.0], r"strictly increasing"),
        ([-1.0, 0.1, 0.1 + 1e-12, 1.0], r"strictly increasing in float32"),
        (["a", "b"], r"real numbers"),
    ],
)
def test_validate_levels_rejects(levels, match):
    with pytest.raises(ValueError, match=match):
        validate_levels(levels)


def test_validate_levels_count():
    with pytest.raises(ValueError, match="expected 8 levels for this configuration; got 4"):
        validate_levels(uniform_levels(2), num_levels=8)


@pytest.mark.parametrize("p", [0.0, 1.0, -0.2, 1.5])
def test_exponential_rejects_bad_multiplier(p):
    with pytest.raises(ValueError, match=r"`p` must be a multiplier in the open interval \(0, 1\)"):
        exponential_levels(3, p)
