"""``python -m oaq_plugin.demo``: four quantization runs of the demo EDSR through BasicSR, one table.

Each run is exactly ``python -m oaq_plugin.test -opt oaq_plugin/demo/options/<run>.yml`` (a separate
process, as a user would type it, so that each run gets BasicSR's own log file); the table is read
back from the runs' ``results/<run>/oaq_report.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from ..pipeline.run import stage_names
from . import demo_data, network, sample_images

OPTIONS_DIR = Path(__file__).resolve().parent / 'options'
RESULTS = Path('results')
DATASET = 'skimage_held_out_x2'


@dataclass(frozen=True)
class DemoRun:
    """One row of the table: a label and the option file that produces it."""

    label: str
    name: str

    @property
    def option_file(self) -> Path:
        return OPTIONS_DIR / f'{self.name}.yml'

    @property
    def results_dir(self) -> Path:
        return RESULTS / self.name


RUNS = (
    DemoRun('W8A8 MinMax', 'oaq_demo_W8A8_minmax'),
    DemoRun('W8A8 dual-region', 'oaq_demo_W8A8_dual_region'),
    DemoRun('W4A4 MinMax', 'oaq_demo_W4A4_minmax'),
    DemoRun('W4A4 dual-region', 'oaq_demo_W4A4_dual_region'),
)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog='python -m oaq_plugin.demo', description=(
        'Quantize a small EDSR (x2) at W8A8 and W4A4 with MinMax and dual-region activations through '
        "BasicSR and compare them with the float network on scikit-image's sample images."))
    parser.add_argument('--only', nargs='+', metavar='RUN', choices=[run.name for run in RUNS],
                        help='run only these (default: all four)')
    parser.add_argument('--images', nargs='+', metavar='IMAGE', choices=sample_images.HELD_OUT_IMAGES,
                        help='validate on these held-out images only (default: all of them)')
    parser.add_argument('--verbose', action='store_true', help="show BasicSR's log of each run as it runs")
    return parser.parse_args(argv)


def prune_archives(run: DemoRun) -> List[Path]:
    """Remove archives of ``run`` older than the one BasicSR is about to make from the last run.

    BasicSR renames an existing ``results/<name>`` to ``<name>_archived_<time>`` before a run; keeping
    only that one means a rerun never piles up folders, and the previous results stay comparable.
    """
    removed = []
    for archive in sorted(RESULTS.glob(f'{run.name}_archived_*')):
        if archive.is_dir():
            shutil.rmtree(archive)
            removed.append(archive)
    return removed


def run_one(run: DemoRun, verbose: bool) -> float:
    """Run one option file through BasicSR in a child process; returns its wall time in seconds."""
    command = [sys.executable, '-m', 'oaq_plugin.test', '-opt', str(run.option_file)]
    start = time.perf_counter()
    if verbose:
        completed = subprocess.run(command, check=False)
        output = ''
    else:
        completed = subprocess.run(command, check=False, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   text=True)
        output = completed.stdout
    seconds = time.perf_counter() - start
    if not verbose and run.results_dir.is_dir():
        (run.results_dir / 'console.log').write_text(output)
    if completed.returncode != 0:
        tail = '\n'.join(output.splitlines()[-30:])
        raise RuntimeError(f'{run.label} failed (exit code {completed.returncode}): {" ".join(command)}\n{tail}')
    return seconds


def read_report(run: DemoRun) -> Dict:
    path = run.results_dir / 'oaq_report.json'
    if not path.is_file():
        raise RuntimeError(f'{run.label} finished without writing {path}')
    return json.loads(path.read_text())


def table(rows: List[List[str]], header: List[str]) -> str:
    widths = [max(len(row[i]) for row in rows + [header]) for i in range(len(header))]
    lines = ['  '.join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in [header] + rows]
    lines.insert(1, '  '.join('-' * w for w in widths))
    return '\n'.join(lines)


def summary(runs: Sequence[DemoRun], reports: Dict[str, Dict], wall: Dict[str, float]) -> str:
    """The comparison table: the float network, then one row per run."""
    header = ['', 'PSNR-Y', 'SSIM-Y', 'fidelity PSNR', 'ΔE', 'quantize s', 'run s', 'weights KiB']
    first = reports[runs[0].name]
    fp = first['datasets'][DATASET]['fp']
    rows = [['FP (float32)', f'{fp["psnr"]:.2f}', f'{fp["ssim"]:.4f}', '-', '-', '-', '-',
             f'{first["sizes_bytes"]["fp"] / 1024:.0f}']]
    for run in runs:
        report = reports[run.name]
        metrics = report['datasets'][DATASET]
        timings = report['timings']
        quantize_s = sum(timings.get(f'{stage}_s', 0.0) for stage in stage_names())
        rows.append([run.label, f'{metrics["quant"]["psnr"]:.2f}', f'{metrics["quant"]["ssim"]:.4f}',
                     f'{metrics["fidelity_psnr"]:.2f}', f'{metrics["delta_e"]:.3f}', f'{quantize_s:.1f}',
                     f'{wall[run.name]:.1f}', f'{report["sizes_bytes"]["quant"] / 1024:.0f}'])
    return table(rows, header)


def protocol_lines(runs: Sequence[DemoRun], reports: Dict[str, Dict]) -> List[str]:
    """What the rows share (protocol, levels, weights) and how they differ (search), from their reports."""
    config = reports[runs[0].name]['config']
    ends = f"W{config['end_bits']}A{config['end_bits']}"
    protocol = (f"fully-quantized protocol: first, last and upsampler convs at {ends}, the other convs at the "
                f"row's bits" if config['protocol'] == 'full' else 'first, last and upsampler convs left in float')
    lines = [f"{protocol}; {config['levels']} dual-region levels; weights {config['weight_granularity']}-wise, "
             f"{config['weight_grid']} grid; calibration {config['calib']['num_batches']} batches of "
             f"{config['calib']['batch_size']} LR patches of {config['calib']['patch_size']} px"]
    searched = [run.label for run in runs if reports[run.name]['config']['search']['enabled']]
    plain = [run.label for run in runs if not reports[run.name]['config']['search']['enabled']]
    finetuned = [run.label for run in runs if reports[run.name]['config']['finetune']['enabled']]
    if searched:
        search = next(reports[run.name]['config']['search'] for run in runs if run.label == searched[0])
        what = [key for key in ('breakpoint', 'act_clip', 'weight_clip', 'level_split') if search[key]]
        lines.append(f"per-layer search of {', '.join(what) or 'nothing'} (grid {search['grid_size']}, "
                     f"{search['refine_rounds']} refinement, {search['num_samples']} samples) for: "
                     f"{', '.join(searched)}")
    if plain:
        lines.append(f"no search (calibrated ranges as they are) for: {', '.join(plain)}")
    lines.append(f"finetuning for: {', '.join(finetuned)}" if finetuned else 'no finetuning')
    return lines


def machine_line() -> str:
    """When and where the numbers were measured (the quantized runs use the same device as this)."""
    import platform

    import torch

    device = (torch.cuda.get_device_name(0) if torch.cuda.is_available()
              else f'CPU ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)')
    return (f"measured {time.strftime('%Y-%m-%d %H:%M')} on {device}, {platform.python_implementation()} "
            f"{platform.python_version()}, torch {torch.__version__}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    runs = [run for run in RUNS if not args.only or run.name in args.only]
    test_images = tuple(args.images or sample_images.HELD_OUT_IMAGES)
    start = time.perf_counter()
    try:
        import skimage  # noqa: F401
    except ImportError:
        print('oaq_plugin.demo: the demo images come from scikit-image: pip install scikit-image', file=sys.stderr)
        return 2

    try:
        written = demo_data.write_demo_data(test_images=test_images)
    except (OSError, ValueError) as error:
        print(f'oaq_plugin.demo: cannot prepare the demo data: {error}', file=sys.stderr)
        return 2
    root = demo_data.DATA_ROOT
    print(f"demo data {'written to' if written else 'reused from'} {root}: test set "
          f"({', '.join(test_images)}; held out from training), calibration LR images "
          f"({', '.join(sample_images.CALIBRATION_IMAGES)}; training images)", flush=True)

    reports: Dict[str, Dict] = {}
    wall: Dict[str, float] = {}
    for index, run in enumerate(runs, 1):
        pruned = prune_archives(run)
        previous = run.results_dir.is_dir()
        print(f'[{index}/{len(runs)}] {run.label}: python -m oaq_plugin.test -opt {run.option_file}', flush=True)
        try:
            wall[run.name] = run_one(run, args.verbose)
            reports[run.name] = read_report(run)
        except RuntimeError as error:
            print(f'oaq_plugin.demo: {error}', file=sys.stderr)
            return 1
        notes = [f'{wall[run.name]:.1f}s']
        archives = sorted(RESULTS.glob(f'{run.name}_archived_*'))
        if previous and archives:
            notes.append(f'the previous results were moved to {archives[-1]}')
        if pruned:
            notes.append(f'{len(pruned)} older archive(s) removed')
        print(f'      done: {"; ".join(notes)}', flush=True)

    first = reports[runs[0].name]
    net = first['network_g']
    lines = [
        f"EDSR x{net['upscale']} ({net['num_feat']} features, {net['num_block']} residual blocks; weights "
        f"{network.WEIGHTS_PATH.name}, trained by tools/train_demo_model.py on {len(sample_images.TRAIN_IMAGES)} "
        f"scikit-image samples)",
        f"validated on {first['datasets'][DATASET]['num_images']} held-out images ({', '.join(test_images)}); "
        f"PSNR-Y/SSIM-Y vs ground truth, crop {sample_images.SCALE}; fidelity PSNR (Y) and CIE76 ΔE "
        f"of the quantized vs the float output",
        *protocol_lines(runs, reports),
        machine_line(),
        '',
        summary(runs, reports, wall),
    ]
    summary_path = RESULTS / 'oaq_demo_summary.txt'
    summary_path.write_text('\n'.join(lines) + '\n')
    print()
    print('\n'.join(lines))
    print()
    print(f"reports: {', '.join(str(run.results_dir / 'oaq_report.json') for run in runs)}")
    print('each results/<run>/ also holds quantized.pth, activation_histograms.png, crops/ (ground truth, FP, '
          "quantized side by side) and BasicSR's log")
    print(f'this table: {summary_path}; option files (copy them to start your own): {OPTIONS_DIR}')
    print(f'total {time.perf_counter() - start:.0f}s')
    return 0
