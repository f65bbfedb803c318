"""The tables ``oaq report`` and ``oaq compare`` print, read back from results folders' ``oaq_report.json``."""
from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any, Dict, List, Mapping, Sequence, Tuple

from ..errors import DataError
from ..pipeline.io.html_report import REPORT_JSON, format_value, summary_rows

# Timings that are not part of quantizing (validation is measured per test set).
_NOT_QUANTIZING = ('validate_s',)


def read_report(results_dir: Path) -> Dict[str, Any]:
    """The report of a results folder; one line when it is not one."""
    results_dir = Path(results_dir)
    path = results_dir / REPORT_JSON
    if not results_dir.is_dir():
        raise DataError(f'no results folder {results_dir}')
    if not path.is_file():
        raise DataError(f'{results_dir} holds no {REPORT_JSON}: not the folder of a finished run')
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DataError(f'{path} is not a readable report ({error})') from None


def text_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain-text table with aligned columns (first column left, the rest right)."""
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    lines = ['  '.join(str(cell).ljust(w) if i == 0 else str(cell).rjust(w)
                       for i, (cell, w) in enumerate(zip(row, widths))) for row in [header, *rows]]
    lines.insert(1, '  '.join('-' * w for w in widths))
    return '\n'.join(lines)


def model_label(report: Mapping[str, Any]) -> str:
    """``RCAN x2``: the architecture and scale, from the CLI's ``model`` entry or an option file's ``network_g``."""
    model = report.get('model') or {}
    network = report.get('network_g') or report.get('network') or {}
    architecture = model.get('architecture') or network.get('type') or '?'
    if not model and network.get('type') == 'Spandrel' and network.get('checkpoint'):
        architecture = f"Spandrel {Path(str(network['checkpoint'])).name}"  # an option file's spandrel checkpoint
    scale = model.get('scale') or report.get('scale') or network.get('upscale') or network.get('scale')
    return f'{architecture} x{scale}' if scale else str(architecture)


def bits_label(report: Mapping[str, Any]) -> str:
    config = report.get('config') or {}
    label = f'W{config.get("w_bits", "?")}A{config.get("a_bits", "?")}'
    return label + (' (float ends)' if config.get('protocol') == 'float_ends' else '')


def preset_label(report: Mapping[str, Any]) -> str:
    """The run's preset as the CLI recorded it (with its --set overrides), else the config's."""
    return str(report.get('preset') or (report.get('config') or {}).get('preset') or '-')


def quantize_seconds(report: Mapping[str, Any]) -> float:
    timings = report.get('timings') or {}
    return float(sum(v for k, v in timings.items() if k not in _NOT_QUANTIZING and isinstance(v, (int, float))))


def report_summary(results_dir: Path) -> str:
    """What ``oaq report`` prints: the run, then one row per test set, then sizes and time."""
    report = read_report(results_dir)
    config = report.get('config') or {}
    lines = [f'{report.get("name") or Path(results_dir).name}: {model_label(report)}, {bits_label(report)}, '
             f'{config.get("act_quantizer", "?")} activations, preset {preset_label(report)}']
    header, rows = summary_rows(report)
    if rows:
        lines += ['', text_table(header, [[format_value(h, v) for h, v in zip(header, row)] for row in rows])]
    else:
        lines.append('no test set was validated')
    sizes = report.get('sizes_bytes') or {}
    facts = []
    if sizes.get('fp') and sizes.get('quant'):
        facts.append(f'weights {sizes["fp"] / 1024:.0f} KiB float -> {sizes["quant"] / 1024:.0f} KiB quantized')
    facts.append(f'quantized in {quantize_seconds(report):.1f} s')
    float_ops = report.get('float_ops')
    if float_ops:
        facts.append(f'{len(float_ops)} operations left in float (listed in the report)')
    lines += ['', '; '.join(facts)]
    for name in ('report.html', 'quantized.pth'):
        if (Path(results_dir) / name).is_file():
            lines.append(f'{name}: {Path(results_dir) / name}')
    return '\n'.join(lines)


def compare_rows(results_dirs: Sequence[Path]) -> Tuple[List[str], List[List[str]]]:
    """One row per run: run, model, bits, preset, then per test set PSNR, SSIM, gap, Delta E, then size, time."""
    reports = [(Path(d), read_report(Path(d))) for d in results_dirs]
    datasets: List[str] = []
    for _, report in reports:
        datasets += [name for name in (report.get('datasets') or {}) if name not in datasets]
    header = ['run', 'model', 'bits', 'preset']
    for name in datasets:
        header += [f'{name} PSNR', f'{name} SSIM', f'{name} gap', f'{name} ΔE']
    header += ['size KiB', 'time s']
    rows = []
    for folder, report in reports:
        row = [report.get('name') or folder.name, model_label(report), bits_label(report), preset_label(report)]
        for name in datasets:
            metrics = (report.get('datasets') or {}).get(name) or {}
            quant, fp = metrics.get('quant') or {}, metrics.get('fp') or {}
            psnr, ssim = _metric(quant, 'psnr'), _metric(quant, 'ssim')
            gap = psnr - _metric(fp, 'psnr') if psnr is not None and _metric(fp, 'psnr') is not None else None
            row += [format_value('psnr', psnr), format_value('ssim', ssim), format_value('gap', gap),
                    format_value('delta_e', metrics.get('delta_e'))]
        size = (report.get('sizes_bytes') or {}).get('quant')
        row += [f'{size / 1024:.0f}' if size else '-', f'{quantize_seconds(report):.1f}']
        rows.append(row)
    return header, rows


def _metric(metrics: Mapping[str, Any], name: str) -> Any:
    value = metrics.get(name)
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) else None


def compare_table(results_dirs: Sequence[Path], fmt: str = 'markdown') -> str:
    """The comparison as a markdown table (the row a leaderboard pastes) or CSV."""
    header, rows = compare_rows(results_dirs)
    if fmt == 'csv':
        stream = io.StringIO()
        writer = csv.writer(stream, lineterminator='\n')
        writer.writerow(header)
        writer.writerows(rows)
        return stream.getvalue().rstrip('\n')
    lines = ['| ' + ' | '.join(header) + ' |', '|' + '|'.join('---' if i < 4 else '---:' for i in range(len(header))) + '|']
    lines += ['| ' + ' | '.join(row) + ' |' for row in rows]
    return '\n'.join(lines)
