"""Held-out fidelity of quantized zoo models: option variants, and weights-only / activations-only splits.

Usage::

    python tools/heldout_fidelity.py [--model imdn_x4] [--base w8a8|default] [--json PATH] [--no-split] \
        [--per-layer] ["{python dict of oaq overrides}" ...]

Calibrates on the first 60 SunHays80 LR images (6 batches of 16 crops, 96 px) and measures fidelity
PSNR-Y (crop = scale) of the quantized output against the float output on 128-px centre crops of the
other 20 SunHays80 images: a held-out signal, so option choices made with it never see a test set.
Each variant is its overrides on a base: ``--base w8a8`` (the default of this tool) is W8A8 with the search,
block reconstruction and distillation disabled (calibration only, what the tool's earlier tables measured), ``--base
default`` is ``OAQConfig()`` (today's recipe); any key, a preset, any stage or any
reconstruction lever can be overridden, e.g.
``"{'w_bits': 4, 'a_bits': 4, 'reconstruction': {'enabled': True, 'group_siblings': True}}"``.
Sections are merged key by key into the base's. ``--per-layer`` adds, per quantized layer, the fidelity gained
with only its activations or only its weights left unquantized: where the error of a variant comes from.
Every variant's numbers, its whole config, its seconds per stage, the conv pairs channel equalization
scaled and the reports of block reconstruction and distillation (whether each was kept, its errors before
and after) go to a JSON file (``--json``; by default ``docs/bench/heldout_<model>_<time>.json``), rewritten
after each variant.
Variants that differ only in their distillation settings share the stages before distillation (run once;
each variant then distils its own copy, with the same result as a whole run).
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import copy
import dataclasses
import datetime
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple

from oaq_plugin.compat import install_basicsr_compat

install_basicsr_compat()

import numpy as np  # noqa: E402
import torch  # noqa: E402
from basicsr.metrics.psnr_ssim import calculate_psnr  # noqa: E402

from oaq_plugin import run_pipeline  # noqa: E402
from oaq_plugin.archs.zoo import ZOO, build_zoo_model  # noqa: E402
from oaq_plugin.config import OAQConfig  # noqa: E402
from oaq_plugin.paths import shared_root  # noqa: E402
from oaq_plugin.pipeline.io.images import read_image  # noqa: E402
from oaq_plugin.pipeline.io.patches import PatchSource  # noqa: E402
from oaq_plugin.pipeline.stages.base import StageContext  # noqa: E402
from oaq_plugin.pipeline.stages.distillation import DistillationStage  # noqa: E402
from oaq_plugin.quant import quant_layers  # noqa: E402

CALIBRATION_IMAGES = 60
HELD_OUT_CROP = 128
ROOT = Path(__file__).resolve().parents[1]
# The bases variants are given on: this tool's historical W8A8, calibration only (no search, no
# reconstruction and no distillation, as when its first tables were measured), and today's defaults.
BASES: Dict[str, Dict[str, Any]] = {'w8a8': {'w_bits': 8, 'a_bits': 8, 'search': {'enabled': False},
                                             'reconstruction': {'enabled': False},
                                             'distillation': {'enabled': False}},
                                    'default': {}}


def centre_crop(image: torch.Tensor, size: int) -> torch.Tensor:
    _, h, w = image.shape
    top, left = max(0, (h - size) // 2), max(0, (w - size) // 2)
    return image[:, top:top + size, left:left + size]


def to_uint8(tensor: torch.Tensor) -> np.ndarray:
    return (tensor.squeeze(0).clamp(0, 1).permute(1, 2, 0).numpy()[:, :, ::-1] * 255.0).round().astype(np.uint8)


def merged(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> Dict[str, Any]:
    """``base`` with ``overrides``, sections merged key by key."""
    out = copy.deepcopy(dict(base))
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = {**out[key], **value}
        else:
            out[key] = copy.deepcopy(value)
    return out


@contextlib.contextmanager
def bypassed(quantizers: Iterable[torch.nn.Module]) -> Iterator[None]:
    """While active, each of ``quantizers`` passes its input through unquantized."""
    quantizers = list(quantizers)
    for quantizer in quantizers:
        quantizer.forward = lambda value: value
    try:
        yield
    finally:
        for quantizer in quantizers:
            del quantizer.forward


def per_layer_costs(qmodel: torch.nn.Module, fidelity, everything: float, log=print) -> List[Dict[str, Any]]:
    """For each quantized layer, the fidelity gained by leaving only its activations (input) or only its weights
    unquantized, the rest of the network as quantized: where the error comes from. Largest gains first."""
    rows = []
    for name, layer in quant_layers(qmodel):
        for part, quantizer in (('activations', layer.act_quantizer), ('weights', layer.weight_quantizer)):
            with bypassed([quantizer]):
                gain = fidelity(qmodel) - everything
            rows.append({'layer': name, 'unquantized': part, 'gain_db': gain})
            log(f'  {name} {part} unquantized: {gain:+.3f} dB')
    return sorted(rows, key=lambda row: -row['gain_db'])


def _quantized(model: torch.nn.Module, calibration: PatchSource, config: OAQConfig, shared_runs: Dict[str, Any]
               ) -> Tuple[torch.nn.Module, Dict[str, float], Dict[str, Any]]:
    """``(qmodel, seconds per stage, report dicts)`` of the pipeline under ``config``.

    Variants that differ only in their distillation settings (with finetuning, the one stage after it,
    off) share the stages before it: those run once, with distillation off, and each variant distils its
    own copy of that model, as the pipeline would have (the stage draws its crops from its own seeds).
    ``quantize_seconds`` of such a variant counts the shared stages once, in the first variant only.
    """
    if not config.distillation.enabled or config.finetune.enabled:
        result = run_pipeline(model, calibration, config)
        return result.model, dict(result.timings), {**result.report_dicts(), 'equalization': _pairs(result)}
    earlier = config.to_dict()
    earlier['distillation'] = {'enabled': False}
    key = json.dumps(earlier, sort_keys=True)
    if key not in shared_runs:
        shared_runs[key] = run_pipeline(model, calibration, OAQConfig.from_dict(earlier))
    base = shared_runs[key]
    qmodel = copy.deepcopy(base.model)
    start = time.perf_counter()
    report = DistillationStage().run(StageContext(qmodel=qmodel, batches=[], config=config, float_model=model,
                                                  source=calibration))
    timings = {**base.timings, 'distillation_s': time.perf_counter() - start}
    return qmodel, timings, {**base.report_dicts(), 'distillation': report.to_dict(), 'equalization': _pairs(base)}


def _pairs(result: Any) -> List[Dict[str, Any]]:
    """The conv pairs channel equalization scaled in a pipeline result."""
    return [dataclasses.asdict(pair) for pair in result.equalized]


def measure(model: torch.nn.Module, calibration: PatchSource, held_out: Sequence[torch.Tensor], scale: int,
            variants: Sequence[Mapping[str, Any]], base: Mapping[str, Any], split: bool = True,
            per_layer: bool = False, log=print, on_record=None) -> List[Dict[str, Any]]:
    """Quantize ``model`` once per variant and measure the fidelity PSNR-Y of its output against the float
    output on ``held_out`` inputs; with ``split``, also with only the weights or only the activations
    quantized (the other quantizers bypassed for a while, so the split costs no second quantization); with
    ``per_layer``, also each layer's share (:func:`per_layer_costs`).

    Returns one record per variant: the overrides, the whole config, ``fidelity`` (``all`` and, with
    ``split``, ``weights_only`` and ``activations_only``), seconds per stage and in all, and with
    ``per_layer`` the ``per_layer`` rows. ``on_record`` is called with the records so far after each variant
    (so a long run that is stopped keeps what it measured).
    """
    with torch.no_grad():
        references = [to_uint8(model(x)) for x in held_out]

    def fidelity(net: torch.nn.Module) -> float:
        with torch.no_grad():
            return float(np.mean([calculate_psnr(to_uint8(net(x)), ref, scale, test_y_channel=True)
                                  for x, ref in zip(held_out, references)]))

    records = []
    shared_runs: Dict[str, Any] = {}
    for extra in variants:
        config = OAQConfig.from_dict(merged(base, extra))
        start = time.perf_counter()
        qmodel, timings, reports = _quantized(model, calibration, config, shared_runs)
        seconds = time.perf_counter() - start
        scores = {'all': fidelity(qmodel)}
        log(f'{extra} all {scores["all"]:.3f}  ({seconds:.0f} s)')
        if split:
            with bypassed(layer.act_quantizer for _, layer in quant_layers(qmodel)):
                scores['weights_only'] = fidelity(qmodel)
            log(f'{extra} weights only {scores["weights_only"]:.3f}')
            with bypassed(layer.weight_quantizer for _, layer in quant_layers(qmodel)):
                scores['activations_only'] = fidelity(qmodel)
            log(f'{extra} activations only {scores["activations_only"]:.3f}')
        record = {'overrides': extra, 'config': config.to_dict(), 'fidelity_psnr_y': scores,
                  'stage_seconds': timings, 'quantize_seconds': seconds,
                  'equalization': reports.get('equalization'), 'reconstruction': reports.get('reconstruction'),
                  'distillation': reports.get('distillation')}
        if per_layer:
            record['per_layer'] = per_layer_costs(qmodel, fidelity, scores['all'], log)
        records.append(record)
        if on_record is not None:
            on_record(records)
    return records


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--model', default='imdn_x4', choices=sorted(ZOO))
    parser.add_argument('--base', default='w8a8', choices=sorted(BASES),
                        help='what the variants override: w8a8 (W8A8, search and reconstruction off) or default '
                             '(OAQConfig())')
    parser.add_argument('--no-split', action='store_true', help='skip the weights-only / activations-only rows')
    parser.add_argument('--per-layer', action='store_true',
                        help="also each layer's share: the fidelity gained with only its activations or only its "
                             'weights left unquantized (two evaluations per layer)')
    parser.add_argument('--json', help='where to write the results (default: docs/bench/heldout_<model>_<time>.json)')
    parser.add_argument('variants', nargs='*', help='python dicts of oaq overrides (default: one, empty)')
    args = parser.parse_args(argv)
    overrides = [ast.literal_eval(text) for text in args.variants] or [{}]
    for extra in overrides:
        OAQConfig.from_dict(merged(BASES[args.base], extra))  # refuse a bad variant before any work
    shared = shared_root()
    scale = ZOO[args.model].scale
    model = build_zoo_model(args.model, shared)
    files = sorted((shared / f'data/calib/SunHays80/LR_bicubic/X{scale}').glob('*.png'))
    calibration = PatchSource([read_image(p) for p in files[:CALIBRATION_IMAGES]])
    held_out = [centre_crop(read_image(p), HELD_OUT_CROP)[None] for p in files[CALIBRATION_IMAGES:]]
    print(f'{args.model}: fidelity PSNR-Y vs FP on {len(held_out)} held-out SunHays80 crops', flush=True)
    stamp = datetime.datetime.now().strftime('%Y%m%d-%H%M%S')
    path = Path(args.json) if args.json else ROOT / 'docs' / 'bench' / f'heldout_{args.model}_{stamp}.json'
    path.parent.mkdir(parents=True, exist_ok=True)
    header = {
        'command': 'python tools/heldout_fidelity.py ' + ' '.join(
            f'"{a}"' if (' ' in a or '{' in a) else a for a in (argv if argv is not None else sys.argv[1:])),
        'model': args.model, 'base': args.base, 'torch_threads': torch.get_num_threads(),
        'machine': f'{platform.machine()} {platform.processor() or platform.platform()}',
        'calibration': f'SunHays80 LR x{scale} images 1-{CALIBRATION_IMAGES}',
        'held_out': (f'SunHays80 LR x{scale} images {CALIBRATION_IMAGES + 1}-{len(files)}, '
                     f'{HELD_OUT_CROP}-px centre crops'),
        'metric': 'fidelity PSNR-Y (quantized vs float output, crop = scale, uint8)'}

    def write(records: List[Dict[str, Any]]) -> None:
        partial = path.with_name(path.name + '.partial')
        partial.write_text(json.dumps({**header, 'variants': records}, indent=1) + '\n')
        partial.replace(path)

    measure(model, calibration, held_out, scale, overrides, BASES[args.base], split=not args.no_split,
            per_layer=args.per_layer, log=lambda line: print(line, flush=True), on_record=write)
    print(f'wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}', flush=True)
    return 0


if __name__ == '__main__':
    sys.exit(main())
