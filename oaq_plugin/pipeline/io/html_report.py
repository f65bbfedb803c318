"""``report.html``: one self-contained page a person reads, made from ``oaq_report.json`` and the run's PNGs.

Everything is inline (figures as base64 data URIs, a few lines of CSS and of JavaScript to sort the
layer table), and the page's content security policy forbids loading anything else, so it opens the
same offline, from an e-mail attachment, or from an archived results folder.
"""
from __future__ import annotations

import base64
import html
import json
import math
import time
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple, Union

REPORT_JSON = 'oaq_report.json'
REPORT_HTML = 'report.html'
HISTOGRAMS_PNG = 'activation_histograms.png'
SENSITIVITY_PNG = 'layer_sensitivity.png'
CROPS_DIR = 'crops'

# Columns of the per-layer table: (report key, header, decimals or None for text).
LAYER_COLUMNS: Tuple[Tuple[str, str, Optional[int]], ...] = (
    ('name', 'layer', None), ('kind', 'kind', None), ('role', 'role', None), ('w_bits', 'W bits', 0),
    ('a_bits', 'A bits', 0), ('quantizer', 'activation quantizer', None), ('lower', 'lower bound', 4),
    ('breakpoint', 'breakpoint', 4), ('upper', 'upper bound', 4), ('outlier_fraction', 'outlier fraction', 5),
    ('w_clip', 'weight clip (mean)', 4), ('backend', 'backend', None),
)

_CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 24px auto; max-width: 1180px; padding: 0 16px; color: #1d232a; }
h1 { font-size: 22px; margin-bottom: 4px; } h2 { font-size: 18px; margin-top: 32px; border-bottom: 1px solid #ccd; }
.meta { color: #556; margin: 2px 0; }
table { border-collapse: collapse; margin: 8px 0; font-size: 13px; }
th, td { border: 1px solid #d5d8de; padding: 3px 8px; text-align: right; white-space: nowrap; }
th { background: #eef1f5; } td.text, th.text { text-align: left; }
table.sortable th { cursor: pointer; user-select: none; }
table.sortable th[data-order="ascending"]::after { content: " \\25B2"; }
table.sortable th[data-order="descending"]::after { content: " \\25BC"; }
.scroll { max-height: 560px; overflow: auto; display: inline-block; border: 1px solid #d5d8de; }
.scroll table { margin: 0; } .scroll th { position: sticky; top: 0; }
img { max-width: 100%; border: 1px solid #e3e5e9; }
figure { margin: 12px 0 20px; } figcaption { color: #445; font-size: 13px; }
.bar { background: #4a7bd0; height: 11px; display: inline-block; vertical-align: middle; }
.bar.first { background: #3c9a5f; } .bar.last { background: #c8493d; } .bar.upsampler { background: #8a5bc2; }
.worse { color: #b3261e; } .note { color: #556; font-size: 13px; max-width: 900px; }
"""

# Click a header to sort by that column; numbers (data-value) compare as numbers, empty cells go last.
_SORT_JS = """
document.querySelectorAll('table.sortable').forEach(function (table) {
  table.querySelectorAll('th').forEach(function (header, column) {
    header.addEventListener('click', function () {
      var ascending = header.getAttribute('data-order') !== 'ascending';
      table.querySelectorAll('th').forEach(function (h) { h.removeAttribute('data-order'); });
      header.setAttribute('data-order', ascending ? 'ascending' : 'descending');
      var body = table.tBodies[0];
      var rows = Array.prototype.slice.call(body.rows);
      function key(row) {
        var cell = row.cells[column];
        var raw = cell.hasAttribute('data-value') ? cell.getAttribute('data-value') : cell.textContent;
        var number = parseFloat(raw);
        return raw === '' ? null : (isNaN(number) ? raw : number);
      }
      rows.sort(function (a, b) {
        var x = key(a), y = key(b);
        if (x === null || y === null) { return (x === null) - (y === null); }
        var order = (typeof x === 'number' && typeof y === 'number') ? x - y : String(x).localeCompare(String(y));
        return ascending ? order : -order;
      });
      rows.forEach(function (row) { body.appendChild(row); });
    });
  });
});
"""

_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'"


def write_html_report(results_dir: Union[str, Path], report: Optional[Mapping[str, Any]] = None,
                      path: Optional[Union[str, Path]] = None) -> Path:
    """Write ``report.html`` for a results folder and return its path.

    Args:
        results_dir: The run's folder (``oaq_report.json``, ``activation_histograms.png``, ``crops/`` ...).
        report: The report dict; read from ``results_dir/oaq_report.json`` when not given.
        path: Where to write (default ``results_dir/report.html``).
    """
    results_dir = Path(results_dir)
    if report is None:
        report = json.loads((results_dir / REPORT_JSON).read_text())
    path = Path(path) if path is not None else results_dir / REPORT_HTML
    text = render_html(report, results_dir)
    temporary = path.with_name(f'.{path.name}.tmp')
    temporary.write_text(text, encoding='utf-8')
    temporary.replace(path)
    return path


def render_html(report: Mapping[str, Any], results_dir: Union[str, Path]) -> str:
    """The page, as a string: summary, per-layer table, layers left in float, figures, crops."""
    results_dir = Path(results_dir)
    sections = [
        _header(report),
        _section('Summary', summary_table_html(report) + _sizes_and_times(report)),
        _section('Layers', _layer_table(report)),
        _float_ops_section(report),
        _figure_section('Activation histograms', results_dir / HISTOGRAMS_PNG,
                        'Calibration inputs of the layers reaching furthest beyond their dense region (log scale): '
                        'the dense region is shaded, the bounds dashed.'),
        _sensitivity_section(report, results_dir),
        _crops_section(report, results_dir),
        f'<p class="note">{_escape(report.get("protocol_note", ""))}</p>',
        f'<p class="note">written {time.strftime("%Y-%m-%d %H:%M")} from {REPORT_JSON} in '
        f'{_escape(results_dir.name)}</p>',
    ]
    title = f'OAQ report: {report.get("name") or results_dir.name}'
    return ('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">'
            f'<title>{_escape(title)}</title><style>{_CSS}</style></head><body>\n'
            + '\n'.join(s for s in sections if s)
            + f'\n<script>{_SORT_JS}</script></body></html>\n')


# -- summary -----------------------------------------------------------------------------------------------
def metric_names(report: Mapping[str, Any]) -> List[str]:
    """The metric names the datasets report for both networks (``psnr``, ``ssim`` ...), in report order."""
    names: List[str] = []
    for metrics in (report.get('datasets') or {}).values():
        for name, value in (metrics.get('quant') or {}).items():
            if name not in names and _is_number(value):
                names.append(name)
    return names


def summary_rows(report: Mapping[str, Any]) -> Tuple[List[str], List[List[Any]]]:
    """``(header, rows)`` of the summary table: one row per dataset, values as numbers (None when absent).

    Each metric gets FP and quantized columns; PSNR also the gap (quantized - FP); then the fidelity PSNR
    (quantized vs FP output) and the mean Delta E.
    """
    names = metric_names(report)
    header = ['dataset', 'images']
    for name in names:
        shown = name.upper() if name in ('psnr', 'ssim') else name
        header += [f'FP {shown}', f'quantized {shown}'] + (['gap (dB)'] if 'psnr' in name.lower() else [])
    header += ['fidelity PSNR', 'ΔE']
    rows = []
    for dataset, metrics in (report.get('datasets') or {}).items():
        row: List[Any] = [dataset, metrics.get('num_images')]
        for name in names:
            fp, quant = (metrics.get('fp') or {}).get(name), (metrics.get('quant') or {}).get(name)
            fp, quant = (fp if _is_number(fp) else None), (quant if _is_number(quant) else None)
            row += [fp, quant]
            if 'psnr' in name.lower():
                row.append(quant - fp if fp is not None and quant is not None else None)
        row += [metrics.get('fidelity_psnr'), metrics.get('delta_e')]
        rows.append(row)
    return header, rows


def format_value(header: str, value: Any) -> str:
    """A summary cell as text: SSIM with 4 decimals, other numbers with 2, '-' when absent."""
    if value is None:
        return '-'
    if isinstance(value, bool) or not _is_number(value):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if not math.isfinite(value):
        return 'inf' if value > 0 else '-inf'
    return f'{value:.4f}' if 'ssim' in header.lower() else f'{value:.2f}'


def summary_table_html(report: Mapping[str, Any]) -> str:
    header, rows = summary_rows(report)
    if not rows:
        return '<p>No test set was validated.</p>'
    head = ''.join(f'<th class="{"text" if i == 0 else ""}">{_escape(h)}</th>' for i, h in enumerate(header))
    body = []
    for row in rows:
        cells = []
        for i, (name, value) in enumerate(zip(header, row)):
            css = 'text' if i == 0 else ('worse' if name.startswith('gap') and _is_number(value) and value < -0.5
                                        else '')
            cells.append(f'<td class="{css}">{_escape(format_value(name, value))}</td>')
        body.append('<tr>' + ''.join(cells) + '</tr>')
    return f'<table class="summary"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def _header(report: Mapping[str, Any]) -> str:
    config = report.get('config') or {}
    network = report.get('network_g') or (report.get('network') or {})
    model = report.get('model') or {}
    architecture = model.get('architecture') or network.get('type') or '?'
    lines = [f'<h1>{_escape(report.get("name") or "OAQ run")}</h1>']
    facts = [f'{architecture} x{model.get("scale") or report.get("scale") or "?"}',
             f'W{config.get("w_bits", "?")}A{config.get("a_bits", "?")}',
             f'activations: {config.get("act_quantizer", "?")} ({config.get("levels", "?")} levels)',
             f'protocol: {config.get("protocol", "?")}']
    lines.append(f'<p class="meta">{_escape(" · ".join(facts))}</p>')
    source = model.get('source') or report.get('pretrain_network_g')
    if source:
        lines.append(f'<p class="meta">checkpoint: {_escape(source)}</p>')
    calibration = report.get('calibration') or (config.get('calib') or {}).get('dataroot_lq')
    if calibration:
        lines.append(f'<p class="meta">calibration: {_escape(calibration)}</p>')
    return '\n'.join(lines)


def _sizes_and_times(report: Mapping[str, Any]) -> str:
    rows = []
    sizes = report.get('sizes_bytes') or {}
    if sizes.get('fp'):
        text = f'float {sizes["fp"] / 1024:.0f} KiB'
        if sizes.get('quant'):
            text += f', quantized {sizes["quant"] / 1024:.0f} KiB ({sizes["fp"] / sizes["quant"]:.1f}x smaller)'
        if sizes.get('quantized_pth'):
            text += f'; quantized.pth {sizes["quantized_pth"] / 1024:.0f} KiB'
        rows.append(('weights', text))
    timings = {k: v for k, v in (report.get('timings') or {}).items() if _is_number(v) and v > 0}
    if timings:
        rows.append(('time', ', '.join(f'{k[:-2] if k.endswith("_s") else k} {v:.1f} s' for k, v in timings.items())))
    macs = report.get('macs_by_bits') or {}
    if macs:
        shares = ', '.join(f'{label} {100 * entry.get("share", 0.0):.1f}%' for label, entry in macs.items()
                           if isinstance(entry, Mapping))
        total = report.get('total_macs')
        shape = report.get('macs_input_shape')
        where = (f'{total / 1e6:.1f} M per forward' if _is_number(total) else '') + \
            (f' of a {"x".join(map(str, shape))} input' if shape else '')
        rows.append(('multiply-adds', shares + (f' ({where})' if where else '')))
    memory = report.get('peak_memory') or {}
    if memory.get('cpu_peak_rss_mib'):
        text = f'{memory["cpu_peak_rss_mib"]:.0f} MiB resident'
        if memory.get('cuda_peak_allocated_mib'):
            text += f', {memory["cuda_peak_allocated_mib"]:.0f} MiB on the GPU'
        rows.append(('peak memory', text))
    backend = report.get('backend')
    if isinstance(backend, Mapping) and backend:
        counts: Dict[str, int] = {}
        for value in backend.values():
            counts[str(value)] = counts.get(str(value), 0) + 1
        rows.append(('backend', ', '.join(f'{name}: {count} layers' for name, count in counts.items())))
    if not rows:
        return ''
    body = ''.join(f'<tr><th class="text">{_escape(k)}</th><td class="text">{_escape(v)}</td></tr>' for k, v in rows)
    return f'<table class="facts">{body}</table>'


# -- layers ------------------------------------------------------------------------------------------------
def _layer_table(report: Mapping[str, Any]) -> str:
    layers = report.get('layers') or []
    if not layers:
        return '<p>No quantized layer.</p>'
    head = ''.join(f'<th class="{"text" if digits is None else ""}">{_escape(title)}</th>'
                   for _, title, digits in LAYER_COLUMNS)
    rows = []
    for layer in layers:
        cells = []
        for key, _, digits in LAYER_COLUMNS:
            value = layer.get(key)
            if digits is None:
                cells.append(f'<td class="text">{_escape("" if value is None else value)}</td>')
            elif _is_number(value) and math.isfinite(value):
                cells.append(f'<td data-value="{value!r}">{value:.{digits}f}</td>')
            else:
                cells.append('<td data-value=""></td>')
        rows.append('<tr>' + ''.join(cells) + '</tr>')
    return (f'<p class="note">{len(layers)} quantized layers and matmul operands; click a column to sort.</p>'
            f'<div class="scroll"><table class="sortable layers"><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table></div>')


def _float_ops_section(report: Mapping[str, Any]) -> str:
    entries = list(_float_op_entries(report.get('float_ops')))
    if not entries:
        return ''
    keys: List[str] = []
    for entry in entries:
        keys += [k for k in entry if k not in keys]
    head = ''.join(f'<th class="text">{_escape(k)}</th>' for k in keys)
    body = ''.join('<tr>' + ''.join(_float_op_cell(k, entry.get(k)) for k in keys) + '</tr>' for entry in entries)
    return _section('Left in float', f'<p class="note">Operations that run in floating point in the quantized '
                    f'network, with their multiply-adds per forward of the example input and the reason.</p>'
                    f'<div class="scroll"><table class="sortable float-ops">'
                    f'<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>')


def _float_op_entries(value: Any) -> Iterable[Dict[str, Any]]:
    # The report lists them as rows (dicts) or as {name: reason}; either is shown as a table.
    if isinstance(value, Mapping):
        rows = value.get('ops') if isinstance(value.get('ops'), list) else None
        if rows is None:
            for name, detail in value.items():
                yield {'name': name, **(dict(detail) if isinstance(detail, Mapping) else {'reason': detail})}
            return
        value = rows
    for item in value or []:
        yield dict(item) if isinstance(item, Mapping) else {'operation': item}


def _float_op_cell(key: str, value: Any) -> str:
    if key == 'share' and _is_number(value):
        return f'<td data-value="{value!r}">{100 * value:.2f}%</td>'
    if key == 'macs' and _is_number(value):
        return f'<td data-value="{value!r}">{value:,}</td>'
    return f'<td class="text">{_escape(_plain(value))}</td>'


def _plain(value: Any) -> str:
    if value is None:
        return ''
    if isinstance(value, (list, tuple)):
        return ', '.join(map(str, value))
    return str(value)


# -- figures -----------------------------------------------------------------------------------------------
def _figure_section(title: str, png: Path, caption: str) -> str:
    if not png.is_file():
        return ''
    return _section(title, _figure(png, caption))


def _figure(png: Path, caption: str) -> str:
    data = base64.b64encode(png.read_bytes()).decode('ascii')
    return (f'<figure><img alt="{_escape(png.name)}" src="data:image/png;base64,{data}">'
            f'<figcaption>{_escape(caption)}</figcaption></figure>')


def _sensitivity_section(report: Mapping[str, Any], results_dir: Path) -> str:
    sensitivity = report.get('layer_sensitivity')
    parts = []
    layers = (sensitivity or {}).get('layers') or []
    if layers:
        use_drop = all(_is_number(layer.get('drop')) for layer in layers)
        key = 'drop' if use_drop else 'psnr'
        values = [layer.get(key) for layer in layers]
        finite = [v for v in values if _is_number(v) and math.isfinite(v)]
        top = max(finite + [1e-9])
        rows = []
        for layer, value in zip(layers, values):
            finite_value = _is_number(value) and math.isfinite(value)
            width = 0.0 if not finite_value else max(value, 0.0) / top * 320
            label = f'{value:.3f}' if finite_value else 'unchanged'
            rows.append(f'<tr><td class="text">{_escape(layer.get("name"))}</td>'
                        f'<td class="text">{_escape(layer.get("role", ""))}</td>'
                        f'<td>W{layer.get("w_bits")}A{layer.get("a_bits")}</td>'
                        f'<td data-value="{value if finite_value else ""}">{label}</td>'
                        f'<td class="text"><span class="bar {_escape(layer.get("role", ""))}" '
                        f'style="width:{width:.1f}px"></span></td></tr>')
        what = ('PSNR drop (dB) with only this layer quantized' if use_drop
                else 'fidelity PSNR (dB) with only this layer quantized; lower = more sensitive')
        parts.append(f'<p class="note">{_escape(what)}, on calibration crops.</p><div class="scroll">'
                     f'<table class="sortable sensitivity"><thead><tr><th class="text">layer</th><th class="text">'
                     f'role</th><th>bits</th><th>{"drop" if use_drop else "PSNR"}</th><th class="text"></th></tr>'
                     f'</thead><tbody>{"".join(rows)}</tbody></table></div>')
    png = results_dir / SENSITIVITY_PNG
    if png.is_file():
        parts.append(_figure(png, 'Per-layer sensitivity in execution order.'))
    return _section('Layer sensitivity', ''.join(parts)) if parts else ''


def _crops_section(report: Mapping[str, Any], results_dir: Path) -> str:
    folder = results_dir / CROPS_DIR
    if not folder.is_dir():
        return ''
    parts = ['<p class="note">Centre crops: ground truth, the float (FP) output, the quantized output, and the '
             'absolute difference between the quantized and FP outputs (scaled to its maximum).</p>']
    datasets = report.get('datasets') or {}
    for dataset_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
        per_image = (datasets.get(dataset_dir.name) or {}).get('per_image') or {}
        pngs = sorted(dataset_dir.glob('*.png'))
        if not pngs:
            continue
        parts.append(f'<h3>{_escape(dataset_dir.name)}</h3>')
        for png in pngs:
            values = per_image.get(png.stem) or {}
            caption = ', '.join(f'{k.replace("_", " ")} {format_value(k, v)}' for k, v in values.items()
                                if _is_number(v))
            parts.append(_figure(png, f'{png.stem}: {caption}' if caption else png.stem))
    return _section('Crops', ''.join(parts)) if len(parts) > 1 else ''


# -- helpers -----------------------------------------------------------------------------------------------
def _section(title: str, content: str) -> str:
    return f'<section><h2>{_escape(title)}</h2>\n{content}</section>' if content else ''


def _escape(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)

