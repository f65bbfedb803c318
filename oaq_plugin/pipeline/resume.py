"""Interrupt and resume: SIGINT/SIGTERM only ask the pipeline to stop at its next safe point, where it
writes its state to a file from which a rerun continues to the same final parameters.

A state file holds plain data only (loaded with ``weights_only=True``), written atomically with a sha256
digest like the quantized checkpoints: the stage in progress and how far it got, the quantized model's
``state_dict``, every activation quantizer's calibration statistics, the stage's own state (finetuning:
optimizer, learning rates, crop generator), the global torch CPU generator, the reports of finished
stages, the timings so far, the config and fingerprints of the float weights and the calibration
batches; a resume with a different config, network or data is refused.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import threading
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from ..config import OAQConfig
from ..errors import ConfigError, DataError, Interrupted, signal_name
from ..quant.activation import activation_quantizers
from ..quant.observer import BatchStats, ObservedStats
from .io.export import payload_digest, read_verified, save_atomically

logger = logging.getLogger('oaq_plugin')

STATE_FORMAT = 'oaq_plugin.pipeline_state'
# 2: the reports of finished stages under one key, ``reports``, by stage name.
STATE_VERSION = 2
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
# The stage of a run stopped after its last stage (resuming it only restores the result).
DONE = 'done'

PathLike = Union[str, os.PathLike]
# Returns a stage's state so far; called only when the run stops there.
Snapshot = Callable[[], Dict[str, Any]]
# Where a stage may stop: called with the stage's snapshot; saves the run and raises when a stop was asked for.
SafePoint = Callable[[Snapshot], None]


class StopRequest:
    """A flag the pipeline reads at its safe points, set by a signal handler or by code."""

    def __init__(self) -> None:
        self.signum: Optional[int] = None

    def set(self, signum: int = signal.SIGINT) -> None:
        """Ask for a stop; ``signum`` decides the exit code a CLI reports (the first request wins)."""
        if self.signum is None:
            self.signum = int(signum)

    def is_set(self) -> bool:
        return self.signum is not None


@contextlib.contextmanager
def stop_on_signals(request: Optional[StopRequest] = None,
                    signals: Sequence[int] = STOP_SIGNALS) -> Iterator[StopRequest]:
    """Within the block, SIGINT and SIGTERM set ``request`` instead of stopping the process.

    A second signal stops at once (``KeyboardInterrupt``, nothing saved), for when the next safe point is
    too far away. The previous handlers are restored on exit. Python runs signal handlers in the main
    thread only, so elsewhere nothing is installed and only code sets the request.
    """
    request = request if request is not None else StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return
    previous: Dict[int, Any] = {}

    def restore() -> None:
        for signum, handler in previous.items():
            # None: the previous handler was not installed from Python; the default is the closest.
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)

    def handler(signum: int, frame: Any) -> None:
        if request.is_set():
            restore()
            raise KeyboardInterrupt
        request.set(signum)
        logger.warning('OAQ: %s received: stopping at the next safe point to save the state '
                       '(send it again to stop at once, without saving)', signal_name(signum))

    for signum in signals:
        previous[signum] = signal.signal(signum, handler)
    try:
        yield request
    finally:
        restore()


def save_state(path: PathLike, state: Mapping[str, Any]) -> Path:
    """Write a pipeline state (plain data) atomically, with its format tag and sha256 digest."""
    payload = dict(state, format=STATE_FORMAT, format_version=STATE_VERSION)
    payload['sha256'] = payload_digest(payload)
    return save_atomically(payload, path)


def load_state(path: PathLike) -> Dict[str, Any]:
    """The verified contents of a state file written by :func:`save_state`."""
    return read_verified(path, 'resume state', STATE_FORMAT, STATE_VERSION, advice='; delete it to start afresh')


def quantizer_state(qmodel: nn.Module) -> Dict[str, Any]:
    """The model's ``state_dict`` and what it does not hold: each quantizer's calibration statistics."""
    statistics = {}
    for name, quantizer in activation_quantizers(qmodel):
        observer = quantizer.observer
        observed = quantizer.observed
        statistics[name] = {
            'records': [dataclasses.asdict(r) for r in observer.records],
            'samples': {int(i): v.cpu() for i, v in observer.samples.items()},
            'observed': None if observed is None else dataclasses.asdict(observed),
        }
    model = {key: value.detach().cpu().clone() for key, value in qmodel.state_dict().items()}
    return {'model': model, 'statistics': statistics}


def restore_quantizer_state(qmodel: nn.Module, state: Mapping[str, Any]) -> None:
    """Put a :func:`quantizer_state` back into a freshly converted model of the same network and config."""
    try:
        qmodel.load_state_dict(state['model'])
    except RuntimeError as error:
        raise DataError(f'the resume state does not fit this quantized network: {error}') from None
    statistics = state['statistics']
    quantizers = dict(activation_quantizers(qmodel))
    if set(statistics) != set(quantizers):
        raise DataError('the resume state does not fit this quantized network: its activation quantizers differ')
    for name, quantizer in quantizers.items():
        entry = statistics[name]
        quantizer.observer.load_state_dict({
            'records': [BatchStats(**record) for record in entry['records']],
            'samples': {int(i): v for i, v in entry['samples'].items()},
        })
        quantizer.observed = None if entry['observed'] is None else ObservedStats(**entry['observed'])


def fingerprints(model: nn.Module, batches: Sequence[torch.Tensor]) -> Dict[str, str]:
    """sha256 digests of the float network's weights and of the calibration batches."""
    return {'float_weights': payload_digest({'state': dict(model.state_dict())}),
            'calibration_batches': payload_digest({'batches': list(batches)})}


def _differences(saved: Any, current: Any, where: str) -> List[str]:
    if isinstance(saved, Mapping) and isinstance(current, Mapping):
        found = []
        for key in list(saved) + [k for k in current if k not in saved]:
            if key not in current or key not in saved:
                found.append(f'{where}.{key} is only in the {"saved" if key in saved else "current"} options')
            else:
                found += _differences(saved[key], current[key], f'{where}.{key}')
        return found
    return [] if saved == current else [f'{where} was {saved!r}, is {current!r}']


class PipelineCheckpoint:
    """The state file of one pipeline run: the state to resume from, and saving at safe points.

    Args:
        path: The state file.
        config: The run's config.
        model: The float network (for its fingerprint).
        batches: The calibration batches (for their fingerprint).
        stop: The stop request the safe points read (a new one by default).
    """

    def __init__(self, path: PathLike, config: OAQConfig, model: nn.Module, batches: Sequence[torch.Tensor],
                 stop: Optional[StopRequest] = None) -> None:
        self.path = Path(path)
        self.config = config
        self.stop = stop if stop is not None else StopRequest()
        self.fingerprints = fingerprints(model, batches)

    def signals(self) -> contextlib.AbstractContextManager:
        """The block in which SIGINT/SIGTERM set this checkpoint's stop request."""
        return stop_on_signals(self.stop)

    def load(self) -> Optional[Dict[str, Any]]:
        """The saved state, or ``None`` when there is none; refused when it belongs to another run."""
        if not self.path.is_file():
            logger.info('OAQ: no saved state at %s: starting from the beginning', self.path)
            return None
        state = load_state(self.path)
        changed = _differences(state['options'], self.config.to_dict(), 'oaq')
        if changed:
            shown = '; '.join(changed[:3]) + (f' (and {len(changed) - 3} more)' if len(changed) > 3 else '')
            raise ConfigError(f'cannot resume from {self.path}: the options changed since it was saved ({shown}); '
                              'run with the options of the interrupted run, or delete the file to start afresh')
        for what, digest in self.fingerprints.items():
            if state['fingerprints'].get(what) != digest:
                raise DataError(f"cannot resume from {self.path}: the {what.replace('_', ' ')} differ from the "
                                'interrupted run; use the same ones, or delete the file to start afresh')
        logger.info('OAQ: resuming from %s (stage %s)', self.path, state['stage'])
        return state

    def check(self, qmodel: nn.Module, stage: str, progress: Snapshot,
              context: Callable[[], Dict[str, Any]]) -> None:
        """At a safe point: when a stop was requested, save the state and raise :class:`Interrupted`.

        Args:
            qmodel: The quantized model being built.
            stage: The name of the stage in progress (:data:`DONE` after the last one).
            progress: Returns the stage's own state (how far it got), called only when stopping.
            context: Returns the pipeline's state beside it (timings, reports of finished stages).
        """
        if not self.stop.is_set():
            return
        state = {'stage': stage, 'progress': progress(), 'options': self.config.to_dict(),
                 'fingerprints': dict(self.fingerprints), 'signal': self.stop.signum,
                 'rng': torch.get_rng_state(), **context(), **quantizer_state(qmodel)}
        save_state(self.path, state)
        logger.info('OAQ: stopped during %s; state saved to %s', stage, self.path)
        raise Interrupted(self.path, self.stop.signum)

    def discard(self) -> None:
        """Delete the state file: the run is complete."""
        if self.path.is_file():
            self.path.unlink()
