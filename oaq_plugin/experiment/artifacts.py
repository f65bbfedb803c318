"""What a run writes, and where: the one place its file names are defined.

A results folder holds ``oaq_report.json``, ``quantized.pth`` (and ``quantized.onnx`` when asked),
``activation_histograms.png``, ``layer_sensitivity.png`` (when asked), ``crops/<test set>/<image>.png`` and
``run.txt`` (one line saying which variant the folder holds, so that an archived folder still says it). An
interrupted run's state, ``oaq_resume_state.pth``, lives where the adapter puts it (outside folders that a
rerun archives).
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Optional, Union

from ..config import OAQOptions
from ..pipeline.run import stage_names

REPORT_FILE = 'oaq_report.json'
QUANTIZED_FILE = 'quantized.pth'
# Written next to QUANTIZED_FILE with oaq.export.onnx (or the onnxruntime backend).
ONNX_FILE = 'quantized.onnx'
HISTOGRAM_FILE = 'activation_histograms.png'
SENSITIVITY_FILE = 'layer_sensitivity.png'
CROPS_DIR = 'crops'
RUN_NOTE_FILE = 'run.txt'
STATE_FILE = 'oaq_resume_state.pth'

PathLike = Union[str, os.PathLike]


def crop_path(out_dir: PathLike, test_set: str, image: str) -> Path:
    """Where the crop figure of one validated image goes."""
    return Path(out_dir) / CROPS_DIR / test_set / f'{image}.png'


def run_note(options: OAQOptions, name: Optional[str] = None, preset: Optional[str] = None) -> str:
    """One line naming the variant a results folder holds: bits, activation quantizer, stages, backend.

    Example: ``oaq_srvgg_x4: W4A4 dual_region/paper, protocol full, stages calibrate+search, backend auto``.
    """
    method = options.method
    stages = ['calibrate'] + [stage for stage in stage_names()[1:] if getattr(method, stage).enabled]
    quantizer = method.act_quantizer + (f'/{method.levels}' if method.act_quantizer == 'dual_region' else '')
    parts = [f'W{method.w_bits}A{method.a_bits} {quantizer}'] + ([f'preset {preset}'] if preset else [])
    parts += [f'protocol {method.protocol}', f"stages {'+'.join(stages)}", f'backend {options.run.backend}']
    return (f'{name}: ' if name else '') + ', '.join(parts)


def write_run_note(out_dir: PathLike, note: str) -> Path:
    """Write ``run.txt`` (the note and the time the run started) into ``out_dir``, which must exist."""
    path = Path(out_dir) / RUN_NOTE_FILE
    path.write_text(f"{note} (started {time.strftime('%Y-%m-%d %H:%M:%S')})\n")
    return path


def archive_existing(out_dir: PathLike) -> Optional[Path]:
    """Move an existing results folder aside as ``<name>_archived_<time>`` (BasicSR's rule); never overwrite.

    Returns the archive's path, or ``None`` when there was nothing to move.
    """
    out = Path(out_dir)
    if not out.exists():
        return None
    stamp = time.strftime('%Y%m%d_%H%M%S')
    archived = out.with_name(f'{out.name}_archived_{stamp}')
    counter = 1
    while archived.exists():
        archived = out.with_name(f'{out.name}_archived_{stamp}_{counter}')
        counter += 1
    out.rename(archived)
    return archived
