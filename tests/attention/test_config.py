"""DilatedAttentionConfig validation: every invalid configuration raises ValueError naming the value."""

import pytest

from longnet_megatron.attention import DilatedAttentionConfig


@pytest.mark.parametrize(
    ("w", "r", "kwargs", "message"),
    [
        ((), (), {}, "segment_lengths is empty"),
        ((16, 32), (1,), {}, "segment_lengths has 2 entries but dilation_rates has 1"),
        ((16, 0), (1, 1), {}, "segment_lengths[1]=0"),
        ((16, -32), (1, 2), {}, "segment_lengths[1]=-32"),
        ((16, 32.0), (1, 2), {}, "segment_lengths[1]=32.0"),
        ((16, 32), (1, 0), {}, "dilation_rates[1]=0"),
        ((16, 32), (1, True), {}, "dilation_rates[1]=True"),
        ((4, 8), (1, 9), {}, "dilation_rates[1]=9 is larger than segment_lengths[1]=8"),
        ((32, 16), (1, 2), {}, "segment_lengths[1]=16 is not larger than segment_lengths[0]=32"),
        ((16, 16), (1, 2), {}, "segment_lengths[1]=16 is not larger"),
        ((16, 32), (2, 4), {}, "dilation_rates=(2, 4) has no rate 1"),
        ((16,), (1,), {"softmax_scale": 0.0}, "softmax_scale=0.0"),
        ((16,), (1,), {"softmax_scale": float("nan")}, "softmax_scale=nan"),
        ((16,), (1,), {"causal": "yes"}, "causal='yes'"),
    ],
)
def test_invalid_config_names_the_value(w, r, kwargs, message):
    with pytest.raises(ValueError) as err:
        DilatedAttentionConfig(w, r, **kwargs)
    assert message in str(err.value)


def test_valid_ragged_config_is_accepted():
    cfg = DilatedAttentionConfig.paper()
    assert cfg.patterns == ((2048, 1), (4096, 2), (8192, 4), (16384, 6), (32768, 12))


def test_geometric_sequence_and_cap():
    cfg = DilatedAttentionConfig.geometric(2048, 5)
    assert cfg.segment_lengths == (2048, 4096, 8192, 16384, 32768)
    assert cfg.dilation_rates == (1, 2, 4, 8, 16)
    capped = DilatedAttentionConfig.geometric(2048, 20, max_segment=8192)
    assert capped.segment_lengths == (2048, 4096, 8192)
    with pytest.raises(ValueError, match="max_segment=100"):
        DilatedAttentionConfig.geometric(2048, 3, max_segment=100)
    with pytest.raises(ValueError, match="ratio=1"):
        DilatedAttentionConfig.geometric(2048, 3, ratio=1)


def test_dict_round_trip_and_unknown_keys():
    cfg = DilatedAttentionConfig([8, 24], [1, 5], causal=False, softmax_scale=0.5)
    assert DilatedAttentionConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown dilated attention keys \\['window'\\]"):
        DilatedAttentionConfig.from_dict({**cfg.to_dict(), "window": 3})
    with pytest.raises(ValueError, match="missing \\['dilation_rates'\\]"):
        DilatedAttentionConfig.from_dict({"segment_lengths": [4]})


def test_scale_default_is_inverse_sqrt_head_dim():
    assert DilatedAttentionConfig((4,), (1,)).scale_for(64) == pytest.approx(0.125)
    assert DilatedAttentionConfig((4,), (1,), softmax_scale=0.3).scale_for(64) == 0.3
