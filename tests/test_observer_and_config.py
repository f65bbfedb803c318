"""Calibration statistics (bounded, EMA, mergeable) and the self-validating config."""
from __future__ import annotations

import math

import pytest
import torch

from oaq_plugin import ConfigError, OAQConfig
from oaq_plugin.quant import ActivationObserver, histogram_quantile
from oaq_plugin.quant.observer import STATISTICS_VALUES, all_finite, statistics_stride


def test_histogram_quantile_matches_exact_quantile():
    torch.manual_seed(0)
    x = torch.randn(16, 64, 32, 32) * 10
    x.view(-1)[:500] = -250.0
    for q in (0.01, 0.5, 0.99):
        exact = float(torch.quantile(x.reshape(-1)[::7], q))
        approx = histogram_quantile(x, q)
        width = float(x.max() - x.min()) / 4096
        assert abs(exact - approx) < 0.2 + 2 * width, (q, exact, approx)


@pytest.mark.parametrize('large', [False, True])
def test_batch_record_matches_exact_statistics(large):
    # A skewed batch with a long positive tail, like a layer input after an activation; the large one is
    # read through the strided subset, the small one whole.
    generator = torch.Generator().manual_seed(1)
    shape = (4, 32, 96, 96) if large else (2, 8, 24, 24)
    x = torch.randn(shape, generator=generator).mul(0.4).sub(0.3)
    x = torch.where(x > 0, x * 6, x)
    assert (x.numel() > STATISTICS_VALUES) == large
    observer = ActivationObserver(percentile=99.0)
    observer.observe(x)
    record = observer.records[0]
    flat = x.reshape(-1)[::3] if large else x.reshape(-1)
    exact_low, exact_high = (float(v) for v in torch.quantile(flat, torch.tensor([0.01, 0.99])))
    exact_abs = float(torch.quantile(flat.abs(), 0.99))
    tolerance = 0.01 * float(x.max() - x.min())
    assert record.minimum == float(x.min()) and record.maximum == float(x.max())
    assert abs(record.quantile_low - exact_low) < tolerance
    assert abs(record.quantile_high - exact_high) < tolerance
    assert abs(record.quantile_abs - exact_abs) < tolerance
    exact_std = float(x.reshape(shape[0], -1).std(dim=1, unbiased=False).sum())
    assert abs(record.std_sum - exact_std) < 0.01 * exact_std


def test_statistics_stride_is_a_prime_above_the_budget():
    assert statistics_stride(STATISTICS_VALUES) == 1
    stride = statistics_stride(9 * STATISTICS_VALUES + 1)
    assert stride >= 10 and all(stride % d for d in range(2, stride))


@pytest.mark.parametrize('bad', [float('nan'), float('inf'), -float('inf')])
def test_all_finite_sees_one_bad_value(bad):
    x = torch.zeros(3, 5, 7)
    assert all_finite(x) and all_finite(torch.empty(0))
    x[2, 4, 6] = bad
    assert not all_finite(x)


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


# -- the method's config and the run's options --------------------------------------------------------
def test_sections_may_be_given_as_mappings_to_the_constructor():
    config = OAQConfig(w_bits=8, a_bits=8, search={'enabled': False}, calib=None)
    assert config.search.enabled is False and config.search.grid_size == 16
    assert config.calib == OAQConfig().calib
    assert config == OAQConfig.from_dict({'w_bits': 8, 'a_bits': 8, 'search': {'enabled': False}})
    with pytest.raises(ConfigError, match=r"oaq\.search: unknown key 'enabeld' \(did you mean 'enabled'\?\)"):
        OAQConfig(search={'enabeld': False})
    with pytest.raises(ConfigError, match=r'oaq\.search: expected a mapping of options \(or a SearchConfig\), got list'):
        OAQConfig(search=[1])


def test_one_parser_splits_the_section_into_method_and_run():
    from oaq_plugin.config import RUN_OPTION_KEYS, OAQOptions, RunOptions
    section = OAQOptions().to_dict()
    assert {'backend', 'resume', 'tile', 'analysis'} <= set(RUN_OPTION_KEYS) and set(RUN_OPTION_KEYS) <= set(section)
    section.update(w_bits=8, backend='reference', tile={'size': 64, 'pad': 8})
    options = OAQOptions.from_dict(section)
    assert options.method.w_bits == 8 and not hasattr(options.method, 'backend')
    assert options.run == RunOptions(backend='reference', tile={'size': 64, 'pad': 8})
    assert options.to_dict() == section and list(options.to_dict()) == list(section)
    with pytest.raises(ConfigError, match=r"oaq\.tile is a run option .*not part of the method's config"):
        OAQConfig.from_dict({'tile': {'size': 64}})
    with pytest.raises(ConfigError, match=r"unknown key 'tiles' \(did you mean 'tile'\?\)"):
        OAQOptions.from_dict({'tiles': {}})


def test_kernel_is_read_as_backend_with_a_warning():
    from oaq_plugin.config import OAQOptions
    with pytest.warns(FutureWarning, match=r'oaq\.kernel is deprecated: it is now called oaq\.backend'):
        options = OAQOptions.from_dict({'kernel': 'reference'})
    assert options.run.backend == 'reference'
    with pytest.raises(ConfigError, match="both 'backend' and its deprecated old name 'kernel'"):
        OAQOptions.from_dict({'kernel': 'reference', 'backend': 'fake'})
    with pytest.raises(ConfigError, match=r"oaq\.backend: unknown value 'triton2'"):
        OAQOptions.from_dict({'backend': 'triton2'})


def test_every_default_and_choice_list_is_defined_once():
    from pathlib import Path

    from oaq_plugin import backends, config
    from oaq_plugin.quant import DualRegionQuantizer, WeightQuantizer, weight
    from oaq_plugin.quant.activation import ActivationQuantizer
    calib = config.CalibConfig()
    observer = ActivationObserver()
    assert (observer.percentile, observer.sample_size, observer.seed) == (calib.percentile, calib.sample_size, calib.seed)
    quantizer = DualRegionQuantizer(4)
    assert (quantizer.levels, quantizer.breakpoint_stat) == (OAQConfig().levels, calib.breakpoint_stat)
    assert ActivationQuantizer.initialize.__defaults__ == (calib.ema_beta,)
    assert (WeightQuantizer(4).granularity, WeightQuantizer(4).grid_kind) == (OAQConfig().weight_granularity,
                                                                             OAQConfig().weight_grid)
    assert backends.BACKENDS is config.BACKENDS and weight.WEIGHT_GRIDS is config.WEIGHT_GRIDS
    package = Path(config.__file__).parent
    for literal in ('99.0', '65536', "('paper', 'zero')", "('channel', 'tensor')", "'reference', 'fake'"):
        files = sorted(p.relative_to(package).as_posix() for p in package.rglob('*.py') if literal in p.read_text())
        assert files == ['config.py'], (literal, files)


def test_dead_code_is_gone():
    from oaq_plugin.quant.activation import ActivationQuantizer
    from oaq_plugin.quant.dual_region import DualRegionQuantizer
    assert not hasattr(ActivationQuantizer, 'reset_observer')
    assert '_load_from_state_dict' not in DualRegionQuantizer.__dict__
    import oaq_plugin.pipeline.resume as resume
    assert not hasattr(resume, 'RESULT_NEUTRAL_KEYS')
