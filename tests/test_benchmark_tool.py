"""tools/benchmark.py: the rungs' option dicts are valid configs, and the table renders every record kind."""
from __future__ import annotations

import pytest

from oaq_plugin import OAQConfig
from tiny_sr import load_tool


@pytest.fixture(scope='module')
def benchmark():
    return load_tool('benchmark')


def test_every_rung_is_a_valid_config_with_the_requested_finetuning(benchmark):
    args = benchmark.parse_args(['--ft-iters', '30', '--ft-epochs', '4', '--ft-patch', '40'])
    for rung in benchmark.RUNGS:
        config = OAQConfig.from_dict(benchmark.rung_config(rung, args))
        if config.finetune.enabled:
            assert config.finetune.epochs == 4 and config.finetune.iters_per_epoch == 7
            assert config.finetune.patch_size == 40
    assert OAQConfig.from_dict(benchmark.rung_config('full_w3a3', args)).w_bits == 3
    assert OAQConfig.from_dict(benchmark.rung_config('minmax', args)).act_quantizer == 'minmax'
    rounding = OAQConfig.from_dict(benchmark.rung_config('full_rounding_zero', args))
    assert rounding.rounding.enabled and rounding.weight_grid == 'zero' and rounding.finetune.enabled
    blocks = OAQConfig.from_dict(benchmark.rung_config('full_recon', args))
    assert blocks.reconstruction.enabled and not blocks.rounding.enabled and blocks.finetune.enabled
    # Rungs named by their stages keep them whatever the defaults: no distillation unless named.
    assert not blocks.distillation.enabled
    assert not OAQConfig.from_dict(benchmark.rung_config('dual', args)).distillation.enabled
    assert OAQConfig.from_dict(benchmark.rung_config('default', args)).distillation.enabled
    # The lattice rungs are the default recipe with the lattice on, nothing else changed.
    for plain, lattice in (('default', 'default_lattice'), ('default_w8a8', 'default_w8a8_lattice')):
        expected = OAQConfig.from_dict(benchmark.rung_config(plain, args)).replace(integer_lattice=True)
        assert OAQConfig.from_dict(benchmark.rung_config(lattice, args)) == expected
    # The rung table is not changed by building a config from it.
    assert benchmark.RUNGS['full'][1]['finetune'] == {'enabled': True, 'mode': 'sensitivity'}


def test_markdown_renders_fp_quantized_and_failed_records(benchmark):
    metrics = {'psnr': 30.0, 'ssim': 0.9, 'delta_e': 3.0}
    records = [
        {'model': 'imdn_x4', 'rung': 'fp', 'label': 'FP32', 'metrics': {'Set5': metrics},
         'timings': {'validate_s': 1.0}, 'peak_rss_mb': 900.0},
        {'model': 'imdn_x4', 'rung': 'full', 'label': 'W4A4 full',
         'metrics': {'Set5': {**metrics, 'fidelity_psnr': 35.0}},
         'timings': {'calibrate_s': 10.0, 'search_s': 5.0, 'rounding_s': 7.0, 'reconstruction_s': 9.0,
                      'distillation_s': 30.0, 'finetune_s': 20.0, 'validate_s': 1.0},
         'distillation': {'iterations': 400, 'student_vs_fp': 1.5},
         'finetune': {'iterations': 10, 'seconds_per_iteration': 2.0, 'fp_iteration_s': 1.0, 'student_vs_fp': 2.0},
         'peak_rss_mb': 1000.0},
        {'model': 'pan_x4', 'rung': 'dual', 'error': 'RuntimeError: boom', 'wall_s': 3.0},
    ]
    payload = {'environment': {'date': 'd', 'machine': 'm', 'torch': 't', 'threads': 2, 'command': 'c'},
               'sets': ['Set5'], 'ft_iters': 10, 'ft_patch': None, 'records': records}
    rows = [line for line in benchmark.markdown(payload) if line.startswith('| ')][1:]
    assert len(rows) == 3
    assert '35.00' in rows[1] and '| 5 | 7 | 9 | 30 (400, 1.50x) | 20 (10, 2.00x) |' in rows[1]
    assert 'failed: RuntimeError: boom' in rows[2]
