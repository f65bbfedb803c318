"""Write the shipped BasicSR option files (``options/*.yml`` and ``options/zoo/*.yml``) from one place.

The ``oaq:`` section of every file names its preset (``preset: default`` or ``preset: paper``) and holds that
preset's values with the run's defaults plus the overrides below, written out in full so that BasicSR's
``--force_yml oaq:finetune:enabled=false`` style overrides reach every key. The title line of each file says
which preset it uses.
Run from the repository root: ``python tools/make_option_files.py`` (``--check`` only compares).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Dict

import yaml

from oaq_plugin.archs.zoo import ZOO, ZooEntry
from oaq_plugin.config import OAQOptions

ROOT = Path(__file__).resolve().parents[1]
SHARED = '../shared'
# How each file's title line names its preset (oaq_plugin.config.PRESETS).
PRESET_TITLES = {
    'default': 'preset default (the recommended recipe; the values below are its values, written out)',
    'paper': "preset paper (the paper's pipeline exactly; the values below are its values, written out)",
}
REGISTER_LINE = 'oaq_register: !!python/name:oaq_plugin.register  # registers the plugin while BasicSR parses this file'


def metrics(scale: int) -> Dict[str, Any]:
    return {
        'psnr': {'type': 'calculate_psnr', 'crop_border': scale, 'test_y_channel': True},
        'ssim': {'type': 'calculate_ssim', 'crop_border': scale, 'test_y_channel': True},
    }


def oaq_section(calib_root: str, preset: str = 'default', **overrides: Any) -> Dict[str, Any]:
    """The ``oaq:`` section: ``preset``'s values (and the run's defaults) with ``overrides``, in full."""
    options = OAQOptions.from_dict({'preset': preset}).to_dict()
    options['calib']['dataroot_lq'] = calib_root
    for key, value in overrides.items():
        if isinstance(value, dict):
            options[key].update(value)
        else:
            options[key] = value
    OAQOptions.from_dict(options)
    return options


def document(name: str, model_type: str, scale: int, datasets: Dict[str, Any], network: Dict[str, Any],
             weights: str, param_key: Any, oaq: Dict[str, Any]) -> Dict[str, Any]:
    return {
        'name': name,
        'model_type': model_type,
        'scale': scale,
        'num_gpu': 'auto',
        'manual_seed': 0,
        'datasets': datasets,
        'network_g': network,
        'path': {'pretrain_network_g': weights, 'strict_load_g': True, 'param_key_g': param_key},
        'val': {'save_img': False, 'suffix': None, 'pbar': True, 'metrics': metrics(scale)},
        'oaq': oaq,
    }


def basicsr_sets(scale: int) -> Dict[str, Any]:
    """BasicSR's standard benchmark layout (datasets/Set5/GTmod12, LRbicx4)."""
    return {f'test_{i}': {'name': name, 'type': 'PairedImageDataset', 'dataroot_gt': f'datasets/{name}/GTmod12',
                          'dataroot_lq': f'datasets/{name}/LRbicx{scale}', 'io_backend': {'type': 'disk'}}
            for i, name in enumerate(('Set5', 'Set14'), 1)}


def shared_sets(scale: int) -> Dict[str, Any]:
    """Set5/Set14 as laid out in the shared folder (HR/, LR_bicubic/X<s>/<name>x<s>.png)."""
    return {f'test_{i}': {'name': name, 'type': 'PairedImageDataset',
                          'dataroot_gt': f'{SHARED}/data/benchmark/{name}/HR',
                          'dataroot_lq': f'{SHARED}/data/benchmark/{name}/LR_bicubic/X{scale}',
                          'filename_tmpl': f'{{}}x{scale}', 'io_backend': {'type': 'disk'}}
            for i, name in enumerate(('Set5', 'Set14'), 1)}


def main_files() -> Dict[str, Dict[str, Any]]:
    div2k = 'datasets/DIV2K/DIV2K_train_LR_bicubic/X4'
    files = {
        'oaq_edsr_x4.yml': document(
            'OAQ_EDSR_Mx4_W4A4', 'OAQModel', 4, basicsr_sets(4),
            {'type': 'EDSR', 'num_in_ch': 3, 'num_out_ch': 3, 'num_feat': 64, 'num_block': 16, 'upscale': 4,
             'res_scale': 1, 'img_range': 255.0, 'rgb_mean': [0.4488, 0.4371, 0.4040]},
            'experiments/pretrained_models/EDSR_Mx4_f64b16_DIV2K_official-0c287733.pth', 'params',
            oaq_section(div2k, calib={'num_images': 100})),
        'oaq_edsr_x4_paper.yml': document(
            'OAQ_EDSR_Mx4_W4A4_paper', 'OAQModel', 4, basicsr_sets(4),
            {'type': 'EDSR', 'num_in_ch': 3, 'num_out_ch': 3, 'num_feat': 64, 'num_block': 16, 'upscale': 4,
             'res_scale': 1, 'img_range': 255.0, 'rgb_mean': [0.4488, 0.4371, 0.4040]},
            'experiments/pretrained_models/EDSR_Mx4_f64b16_DIV2K_official-0c287733.pth', 'params',
            oaq_section(div2k, preset='paper', calib={'num_images': 100})),
        'oaq_rrdb_x4.yml': document(
            'OAQ_RRDBNet_PSNR_x4_W4A4', 'OAQModel', 4, basicsr_sets(4),
            {'type': 'RRDBNet', 'num_in_ch': 3, 'num_out_ch': 3, 'num_feat': 64, 'num_block': 23,
             'num_grow_ch': 32},
            'experiments/pretrained_models/ESRGAN_PSNR_SRx4_DF2K_official-150ff491.pth', 'params',
            oaq_section(div2k, calib={'num_images': 100})),
        'oaq_swinir_x4.yml': document(
            'OAQ_SwinIR_classical_x4_W4A4', 'OAQSwinIRModel', 4, basicsr_sets(4),
            {'type': 'SwinIR', 'upscale': 4, 'in_chans': 3, 'img_size': 64, 'window_size': 8, 'img_range': 1.0,
             'depths': [6] * 6, 'embed_dim': 180, 'num_heads': [6] * 6, 'mlp_ratio': 2,
             'upsampler': 'pixelshuffle', 'resi_connection': '1conv'},
            'experiments/pretrained_models/001_classicalSR_DF2K_s64w8_SwinIR-M_x4.pth', 'params',
            oaq_section(div2k, calib={'num_images': 100, 'patch_size': 64}, quantize_attention=True)),
        'oaq_srvgg_x4.yml': document(
            'OAQ_SRVGGNetCompact_x4_W4A4', 'OAQModel', 4, shared_sets(4),
            dict(ZOO['srvgg_x4'].network_options()), f"{SHARED}/{ZOO['srvgg_x4'].weight_path}", 'params',
            oaq_section(f'{SHARED}/data/calib/SunHays80/LR_bicubic/X4')),
    }
    return files


def zoo_file(entry: ZooEntry) -> Dict[str, Any]:
    return document(
        f'OAQ_zoo_{entry.key}_W4A4', 'OAQModel', entry.scale, shared_sets(entry.scale),
        dict(entry.network_options()), f'{SHARED}/{entry.weight_path}', entry.param_key,
        oaq_section(f'{SHARED}/data/calib/SunHays80/LR_bicubic/X{entry.scale}'))


def render(options: Dict[str, Any], title: str) -> str:
    body = yaml.safe_dump(options, sort_keys=False, default_flow_style=False, width=110)
    return (f'{REGISTER_LINE}\n# {title}\n# Generated by tools/make_option_files.py; paths are relative to the '
            'repository root.\n\n' + body)


def all_files() -> Dict[Path, str]:
    files = {}
    for name, options in main_files().items():
        files[ROOT / 'options' / name] = render(options, f'{options["network_g"]["type"]} x{options["scale"]}: '
                                                f'W4A4, {PRESET_TITLES[options["oaq"]["preset"]]}')
    for entry in ZOO.values():
        options = zoo_file(entry)
        files[ROOT / 'options' / 'zoo' / f'{entry.key}.yml'] = render(
            options, f'{entry.key}: W4A4, {PRESET_TITLES[options["oaq"]["preset"]]}; calibrated on SunHays80')
    return files


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--check', action='store_true', help='only report files that differ')
    args = parser.parse_args(argv)
    stale = []
    for path, text in all_files().items():
        if not path.exists() or path.read_text() != text:
            stale.append(path)
            if not args.check:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(text)
    for path in stale:
        print(('stale: ' if args.check else 'wrote: ') + str(path.relative_to(ROOT)))
    return 1 if (args.check and stale) else 0


if __name__ == '__main__':
    sys.exit(main())
