#!/usr/bin/env python
"""One table of the default recipe (or any rungs) from the ``benchmark.json`` files of several
``tools/benchmark.py`` runs, and which rows no longer match today's configuration.

Usage::

    python tools/recipe_table.py docs/bench/a.json docs/bench/b.json [--rungs default default_w8a8 paper]

Runs of one network on several days, machines or thread counts end up in several files. This reads them
all, keeps for each (network, rung) the record of the last file that has it, takes each network's gap from
its FP32 record, and prints one markdown row per record: Set5/Set14 PSNR/SSIM, gap, Delta E, fidelity,
distillation steps, seconds per stage, the whole run, peak RSS, and the file, date and torch threads it
came from. A record whose configuration differs from what its rung runs today is marked with the options
that differ (the ones the benchmark's command line sets, finetuning length and crop, are not compared, nor
options added after the record), so a table never passes a row of an older default off as today's.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark import MODELS, RUNGS, rung_config  # noqa: E402

# The options ``tools/benchmark.py`` takes from its command line rather than from the rung.
COMMAND_LINE_KEYS = {('finetune', 'epochs'), ('finetune', 'iters_per_epoch'), ('finetune', 'patch_size')}
STAGES = ('calibrate', 'search', 'reconstruction', 'distillation', 'finetune')


def payloads(path: Path) -> List[dict]:
    """The benchmark payloads of a file: one ``benchmark.json``, or several gathered as ``{'runs': [...]}``."""
    data = json.loads(Path(path).read_text())
    return data['runs'] if 'runs' in data else [data]


def load_records(paths: List[Path]) -> Dict[Tuple[str, str], dict]:
    """``(model, rung) -> record`` over ``paths`` in order (a later file or run replaces an earlier record);
    each record gains ``source`` (file name), ``date`` and ``threads`` from its run."""
    chosen: Dict[Tuple[str, str], dict] = {}
    for path in paths:
        for payload in payloads(path):
            env = payload.get('environment', {})
            for record in payload.get('records', []):
                if 'error' in record:
                    continue
                chosen[(record['model'], record['rung'])] = {
                    **record, 'source': Path(path).name, 'date': env.get('date', '')[:10],
                    'threads': env.get('threads')}
    return chosen


def differences(recorded: dict, today: dict, prefix: Tuple[str, ...] = ()) -> List[str]:
    """``key: recorded (now today)`` for every option whose recorded value is not today's, nested keys dotted.
    A stage off both then and now is not compared. Options the record does not have were added after it
    was measured and are not compared either (a record of an old default differs in the option that
    changed), except a whole stage that runs today: the record was measured without it."""
    if recorded.get('enabled') is False and today.get('enabled') is False:
        return []
    found = []
    for key in sorted(set(recorded) | set(today)):
        path = prefix + (key,)
        if path in COMMAND_LINE_KEYS:
            continue
        if key not in recorded:
            if isinstance(today[key], dict) and today[key].get('enabled'):
                found.append(f"{'.'.join(path)}: not in the record (now enabled)")
            continue
        old, new = recorded[key], today.get(key, '(no longer an option)')
        if isinstance(old, dict) and isinstance(new, dict):
            found += differences(old, new, path)
        elif old != new:
            found.append(f"{'.'.join(path)}: {old} (now {new})")
    return found


def stale_options(record: dict) -> List[str]:
    """The options of ``record`` that differ from what its rung runs with today's defaults."""
    from oaq_plugin import OAQConfig
    if record['rung'] not in RUNGS or 'config' not in record:
        return []
    args = argparse.Namespace(ft_iters=1, ft_epochs=1, ft_patch=None)
    today = OAQConfig.from_dict(rung_config(record['rung'], args)).to_dict()
    return differences(record['config'], today)


def _set_cells(record: dict, fp: Optional[dict], name: str) -> List[str]:
    metrics = record['metrics'].get(name)
    if metrics is None:
        return ['', '', '', '']
    gap = ''
    if fp is not None and name in fp['metrics']:
        gap = f"{fp['metrics'][name]['psnr'] - metrics['psnr']:.2f}"
    fidelity = f"{metrics['fidelity_psnr']:.2f}" if 'fidelity_psnr' in metrics else ''
    return [f"{metrics['psnr']:.2f} / {metrics['ssim']:.4f}", gap, f"{metrics['delta_e']:.3f}", fidelity]


def table(records: Dict[Tuple[str, str], dict], rungs: List[str], sets: List[str]) -> List[str]:
    """Markdown lines: the table, then one note per row whose configuration is not today's."""
    header = ['model', 'configuration', 'distillation steps']
    for name in sets:
        header += [f'{name} PSNR / SSIM', f'{name} gap', f'{name} ΔE', f'{name} fidelity']
    header += [' / '.join(STAGES) + ' s', 'whole run min', 'peak RSS MiB', 'measured']
    lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
    notes = []
    models = [m for m in MODELS if any(key[0] == m for key in records)]
    for model in models:
        fp = records.get((model, 'fp'))
        for rung in rungs:
            record = records.get((model, rung))
            if record is None:
                continue
            timings = record.get('timings', {})
            seconds = ' / '.join(f"{timings.get(f'{stage}_s', 0.0):.0f}" for stage in STAGES)
            steps = record.get('distillation', {}).get('iterations', '')
            cells = [model, record['label'], str(steps)]
            for name in sets:
                cells += _set_cells(record, fp, name)
            cells += [seconds, f"{record.get('wall_s', 0.0) / 60:.1f}", f"{record['peak_rss_mb']:.0f}",
                      f"{record['date']}, {record['threads']} thread(s), {record['source']}"]
            lines.append('| ' + ' | '.join(cells) + ' |')
            stale = stale_options(record)
            if stale:
                notes.append(f"- {model}, {record['label']}: not today's configuration: " + '; '.join(stale))
    return lines + ([''] + notes if notes else [])


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('files', nargs='+', type=Path, help='benchmark.json files, oldest first')
    parser.add_argument('--rungs', nargs='+', default=['default', 'default_w8a8', 'paper'], choices=list(RUNGS))
    parser.add_argument('--sets', nargs='+', default=['Set5', 'Set14'])
    args = parser.parse_args(argv)
    missing = [str(p) for p in args.files if not p.is_file()]
    if missing:
        print(f"recipe_table: no such file: {', '.join(missing)}", file=sys.stderr)
        return 2
    print('\n'.join(table(load_records(args.files), args.rungs, args.sets)))
    return 0


if __name__ == '__main__':
    sys.exit(main())
