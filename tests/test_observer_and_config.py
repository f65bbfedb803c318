"""Calibration statistics (bounded, EMA, mergeable) and the self-validating config."""
from __future__ import annotations

import math

import pytest
import torch

from oaq_plugin import ConfigError, OAQConfig
from oaq_plugin.quant import ActivationObserver, histogram_quantile


def test_histogram_quantile_matches_exact_quantile():
    torch.manual_seed(0)
    x = torch.randn(16, 64, 32, 32) * 10
    x.view(-1)[:500] = -250.0
    for q in (0.01, 0.5, 0.99):
        exact = float(torch.quantile(x.reshape(-1)[::7], q))
        approx = histogram_quantile(x, q)
        width = float(x.max() - x.min()) / 4096
        assert abs(exact - approx) < 0.2 + 2 * width, (q, exact, approx)


def test_ema_first_batch_sets_then_smooths():
    observer = ActivationObserver()
    observer.observe(torch.tensor([[0.0, 10.0]]))
    observer.observe(torch.tensor([[0.0, 20.0]]))
    stats = observer.stats(beta=0.9)
    assert math.isclose(stats.maximum, 0.9 * 10 + 0.1 * 20)
    assert stats.num_batches == 2


def test_sample_is_bounded():
    observer = ActivationObserver(sample_size=4096)
    for _ in range(40):
        observer.observe(torch.randn(4, 8, 32, 32))
    assert observer.sample().numel() <= 4096
    assert len(observer.records) == 40


def test_merge_in_any_order_equals_single_process():
    torch.manual_seed(0)
    batches = [torch.randn(2, 4, 8, 8) * (i + 1) for i in range(6)]
    single = ActivationObserver()
    for i, b in enumerate(batches):
        single.observe(b, i)
    ranks = [ActivationObserver(), ActivationObserver()]
    for i, b in enumerate(batches):
        ranks[i % 2].observe(b, i)
    ranks[1].merge([ranks[0].state_dict()])
    assert ranks[1].stats() == single.stats()
    assert torch.equal(ranks[1].sample(), single.sample())


def test_config_defaults_and_round_trip():
    config = OAQConfig()
    assert (config.w_bits, config.a_bits, config.act_quantizer, config.levels) == (4, 4, 'dual_region', 'paper')
    assert config.calib.ema_beta == 0.9 and config.finetune.rec_weight == 5.0 and config.finetune.sen_weight == 10.0
    assert OAQConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize('options,fragment', [
    ({'w_bit': 4}, "did you mean 'w_bits'"),
    ({'calib': {'batchsize': 4}}, "did you mean 'batch_size'"),
    ({'a_bits': 9}, 'outside the valid range'),
    ({'w_bits': 1}, 'outside the valid range'),
    ({'act_quantizer': 'dual-region'}, "did you mean 'dual_region'"),
    ({'levels': 'pwql'}, "did you mean 'pwlq'"),
    ({'w_bits': '4'}, 'expected an integer'),
    ({'finetune': {'enabled': 'yes'}}, 'expected true or false'),
    ({'quantize_attention': 'yes'}, 'expected true or false'),
    ({'quantize_atention': True}, "did you mean 'quantize_attention'"),
    ({'calib': [1, 2]}, 'expected a mapping'),
    ({'layer_bits': {'head.*': 12}}, 'bits must be integers'),
    ({'layer_bits': {'head.*': 'half'}}, "expected bits"),
])
def test_config_errors_name_the_key(options, fragment):
    with pytest.raises(ConfigError) as info:
        OAQConfig.from_dict(options)
    assert fragment in str(info.value)
