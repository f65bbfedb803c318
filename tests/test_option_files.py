"""The shipped option files: generated from one place, complete, and valid for OAQConfig."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

from oaq_plugin import OAQConfig, OAQOptions

ROOT = Path(__file__).resolve().parents[1]
FILES = sorted((ROOT / 'options').glob('*.yml')) + sorted((ROOT / 'options' / 'zoo').glob('*.yml'))


def test_option_files_match_their_generator():
    sys.path.insert(0, str(ROOT / 'tools'))
    from make_option_files import all_files
    expected = all_files()
    assert set(expected) == set(FILES)
    for path, text in expected.items():
        assert path.read_text() == text, f'{path} is stale: run python tools/make_option_files.py'


@pytest.mark.parametrize('path', FILES, ids=lambda p: p.name)
def test_option_file_is_complete_and_valid(path):
    text = path.read_text()
    assert text.startswith('oaq_register: !!python/name:oaq_plugin.register')
    options = yaml.load(text, Loader=yaml.UnsafeLoader)
    section = OAQOptions.from_dict(options['oaq'])
    config = section.method
    assert options['oaq'] == section.to_dict(), 'every oaq key is spelled out, so --force_yml can reach it'
    assert options['model_type'] in ('OAQModel', 'OAQSwinIRModel')
    assert config.calib.dataroot_lq and 'Set5' not in config.calib.dataroot_lq and 'Set14' not in config.calib.dataroot_lq
    for metric in options['val']['metrics'].values():
        assert metric['test_y_channel'] is True and metric['crop_border'] == options['scale']


# Keys a shipped file may set apart from its preset: where its data is, and SwinIR's attention switch.
FILE_OWN_KEYS = {'calib', 'quantize_attention'}


@pytest.mark.parametrize('path', FILES, ids=lambda p: p.name)
def test_option_file_states_its_preset_and_holds_its_values(path):
    text = path.read_text()
    options = yaml.load(text, Loader=yaml.UnsafeLoader)
    preset = options['oaq']['preset']
    assert f'preset {preset}' in text.splitlines()[1], 'the title line names the preset'
    written = OAQOptions.from_dict(options['oaq']).method.to_dict()
    expected = OAQConfig.from_dict({'preset': preset}).to_dict()
    differing = {key for key in expected if written[key] != expected[key]}
    assert differing <= FILE_OWN_KEYS, f'{path.name} departs from preset {preset!r} in {sorted(differing)}'


def test_a_paper_preset_file_ships():
    presets = {yaml.load(path.read_text(), Loader=yaml.UnsafeLoader)['oaq']['preset'] for path in FILES}
    assert presets == {'default', 'paper'}
