import pytest
from alq_core import METHODS, QuantizerConfig


def test_registry_has_the_paper_methods_in_order_then_the_empirical_ones():
    paper = ["fp32", "qsgd", "qsgdinf", "nuqsgd", "trn", "alq", "alq-n", "amq", "amq-n"]
    assert list(METHODS) == [*paper, "alq-e", "alq-einf"]
    assert (METHODS["alq-e"].norm, METHODS["alq-einf"].norm) == ("l2", "linf")
    assert len({s.wire_id for s in METHODS.values()}) == len(METHODS)


@pytest.mark.parametrize(
    ("method", "norm", "clip", "code_bits", "levels"),
    [
        ("qsgd", "l2", None, 3, 8),
        ("qsgdinf", "linf", None, 3, 8),
        ("nuqsgd", "l2", None, 3, 8),
        ("trn", "linf", 2.5, 2, 3),
        ("alq", "l2", None, 3, 8),
        ("amq-n", "l2", None, 3, 8),
    ],
)
def test_method_defaults(method, norm, clip, code_bits, levels):
    c = QuantizerConfig(method, bits=3)
    assert (c.norm, c.clip, c.code_bits, c.num_levels) == (norm, clip, code_bits, levels)


def test_overrides_win_over_method_defaults():
    c = QuantizerConfig("trn", clip=None, norm="l2")
    assert c.clip is None and c.norm == "l2"
    assert QuantizerConfig("qsgd", clip=1.5).clip == 1.5


def test_config_is_frozen():
    c = QuantizerConfig()
    with pytest.raises(AttributeError):
        c.bits = 4  # type: ignore[misc]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"method": "sgd"}, r"`method` must be one of fp32, qsgd.*got 'sgd'"),
        ({"bits": 0}, r"`bits` must be an integer in 1\.\.8; got 0"),
        ({"bits": 9}, r"`bits` must be an integer in 1\.\.8; got 9"),
        ({"bits": 3.0}, r"`bits` must be an integer in 1\.\.8; got 3\.0"),
        ({"bits": True}, r"`bits` must be an integer"),
        ({"bucket_size": 0}, r"`bucket_size` must be an integer in 1\.\.\d+; got 0"),
        ({"norm": "l1"}, r"`norm` must be 'auto', 'l2' or 'linf'; got 'l1'"),
        ({"tail": "drop"}, r"`tail` must be 'quantize' or 'full'; got 'drop'"),
        ({"clip": -1.0}, r"`clip` must be a positive number.*got -1\.0"),
        ({"clip": float("nan")}, r"`clip` must be a positive number"),
        ({"method": "fp32", "clip": 2.5}, r"`clip` applies to quantized methods only; 'fp32'.*clip=2\.5 would be ignored"),
        ({"nonfinite": "ignore"}, r"`nonfinite` must be 'raise' or 'propagate'; got 'ignore'"),
    ],
)
def test_validation_messages(kwargs, match):
    with pytest.raises(ValueError, match=match):
        QuantizerConfig(**kwargs)


def test_bucket_accounting():
    c = QuantizerConfig("qsgd", bucket_size=10)
    assert (c.num_buckets(25), c.num_quantized(25)) == (3, 25)
    f = QuantizerConfig("qsgd", bucket_size=10, tail="full")
    assert (f.num_buckets(25), f.num_quantized(25)) == (2, 20)
    assert (f.num_buckets(20), f.num_quantized(20)) == (2, 20)  # a full last bucket is quantized
    assert QuantizerConfig("fp32").num_quantized(25) == 0
