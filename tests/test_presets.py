"""Presets: ``preset: paper`` is the paper's pipeline and nothing beyond it, ``default`` the defaults; any key
given explicitly overrides the preset."""
from __future__ import annotations

import pytest

from oaq_plugin.config import PRESETS, ConfigError, OAQConfig, OAQOptions
from oaq_plugin.pipeline.run import STAGES


def _enabled(config):
    return [stage.name for stage in STAGES if stage.enabled(config)]


def test_default_preset_is_the_defaults():
    assert OAQConfig(preset='default') == OAQConfig() == OAQConfig.from_dict({'preset': 'default'})
    assert OAQConfig().preset == 'default' and PRESETS['default'] == {}


def test_paper_preset_is_the_papers_pipeline_and_nothing_beyond():
    config = OAQConfig.from_dict({'preset': 'paper'})
    assert config == OAQConfig(preset='paper')
    assert (config.act_quantizer, config.levels, config.weight_granularity, config.weight_grid, config.protocol,
            config.end_bits) == ('dual_region', 'paper', 'tensor', 'paper', 'full', 8)
    assert _enabled(config) == ['calibrate', 'finetune']
    assert not config.integer_lattice
    calib, finetune = config.calib, config.finetune
    assert (calib.batch_size, calib.patch_size, calib.ema_beta, calib.percentile, calib.breakpoint_stat) == \
        (16, 96, 0.9, 99.0, 'signed')
    assert (finetune.mode, finetune.epochs, finetune.iters_per_epoch, finetune.batch_size, finetune.patch_size,
            finetune.lr, finetune.lr_decay, finetune.lr_mode, finetune.rec_weight, finetune.sen_weight) == \
        ('sensitivity', 10, 50, 2, 96, 1e-3, 0.9, 'absolute', 5.0, 10.0)
    # Today's defaults differ from it (so the preset is doing the work).
    assert _enabled(OAQConfig()) != _enabled(config) and OAQConfig().weight_granularity == 'channel'


def test_explicit_keys_override_the_preset_key_by_key():
    config = OAQConfig.from_dict({'preset': 'paper', 'weight_granularity': 'channel',
                                  'finetune': {'epochs': 2}, 'search': {'enabled': True}})
    assert config.weight_granularity == 'channel' and config.levels == 'paper'
    # The finetune section is merged: the preset's `enabled: true` stays beside the given epochs.
    assert config.finetune.enabled and config.finetune.epochs == 2 and config.finetune.iters_per_epoch == 50
    assert config.search.enabled
    # A value equal to the dataclass default still counts as given.
    assert OAQConfig(preset='paper', search={'enabled': True}).search.enabled
    assert OAQConfig(preset='paper', finetune={'enabled': False}).finetune.enabled is False
    # A whole section given as a config object is taken as it is.
    from oaq_plugin.config import FinetuneConfig
    assert not OAQConfig(preset='paper', finetune=FinetuneConfig()).finetune.enabled


def test_a_preset_round_trips_and_splits_from_a_section():
    config = OAQConfig.from_dict({'preset': 'paper', 'w_bits': 8})
    assert OAQConfig.from_dict(config.to_dict()) == config
    options = OAQOptions.from_dict({'preset': 'paper', 'backend': 'fake'})
    assert options.method == OAQConfig(preset='paper') and options.run.backend == 'fake'
    assert options.to_dict()['preset'] == 'paper'


def test_an_unknown_preset_names_the_closest():
    with pytest.raises(ConfigError, match=r"oaq.preset: unknown value 'papr' \(did you mean 'paper'\?\)"):
        OAQConfig.from_dict({'preset': 'papr'})
    with pytest.raises(ConfigError, match='oaq.preset'):
        OAQConfig(preset=3)


def test_every_preset_names_only_valid_keys():
    for name, values in PRESETS.items():
        config = OAQConfig.from_dict({'preset': name})
        for key, value in values.items():
            if isinstance(value, dict):
                assert {k: getattr(getattr(config, key), k) for k in value} == value
            else:
                assert getattr(config, key) == value
