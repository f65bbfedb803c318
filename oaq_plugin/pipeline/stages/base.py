"""The shape of a pipeline stage (a name, whether a config enables it, ``run(context) -> report``), the
context it runs in, the base of stage reports, and the resumable unit-by-unit loop several stages share."""
from __future__ import annotations

import contextlib
import time
import typing
from dataclasses import dataclass, fields
from typing import AbstractSet, Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Type, Union

import torch
from torch import nn
from tqdm import tqdm

from ...config import OAQConfig
from ...errors import DataError
from ..capture.layer_capture import first_samples
from ..io.patches import PatchSource
from ..resume import SafePoint, Snapshot


def no_safe_point(snapshot: Snapshot) -> None:
    """The safe point of a run that cannot be interrupted: it never stops, so nothing is ever saved."""


@dataclass
class StageContext:
    """What a stage runs on, and how it reports where it may stop.

    Attributes:
        qmodel: The quantized model being built (changed in place).
        batches: The calibration batches (N, C, H, W).
        config: The method's configuration.
        float_model: The float network (finetuning's teacher; not modified).
        source: The calibration pool random crops are drawn from (finetuning).
        progress: Show progress bars.
        saved: The stage's own state saved at the safe point a run stopped at (``None``: start afresh).
        safe_point: Called where the stage may stop, with a function returning the stage's state so far
            (what ``saved`` holds on resume); it may save the run and stop it by raising.
        calib_shard: ``(rank, world_size)`` of a distributed calibration.
    """

    qmodel: nn.Module
    batches: Sequence[torch.Tensor]
    config: OAQConfig
    float_model: Optional[nn.Module] = None
    source: Optional[PatchSource] = None
    progress: bool = False
    saved: Optional[Dict[str, Any]] = None
    safe_point: SafePoint = no_safe_point
    calib_shard: Optional[Tuple[int, int]] = None


class Record:
    """A dataclass whose dict form is derived from its fields (records nested in lists or dicts included)
    plus :meth:`derived` values; :meth:`from_dict` reads the fields back and ignores the derived keys."""

    def derived(self) -> Dict[str, Any]:
        """Values computed from the fields that the dict form carries too (recomputed, never read back)."""
        return {}

    def to_dict(self) -> Dict[str, Any]:
        data = {f.name: _plain(getattr(self, f.name)) for f in fields(self)}
        data.update(self.derived())
        return data

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> 'Record':
        """The record of :meth:`to_dict`."""
        hints = typing.get_type_hints(cls)
        return cls(**{f.name: _typed(hints[f.name], data[f.name]) for f in fields(cls) if f.init and f.name in data})


def _plain(value: Any) -> Any:
    if isinstance(value, Record):
        return value.to_dict()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _typed(hint: Any, value: Any) -> Any:
    """``value`` (plain data) as the annotated type: records rebuilt, containers copied."""
    origin, arguments = typing.get_origin(hint), typing.get_args(hint)
    if origin is Union:
        if value is None:
            return None
        hint = next(a for a in arguments if a is not type(None))
        origin, arguments = typing.get_origin(hint), typing.get_args(hint)
    if isinstance(hint, type) and issubclass(hint, Record):
        return hint.from_dict(value)
    if origin is list:
        return [_typed(arguments[0] if arguments else Any, v) for v in value]
    if origin is dict:
        return {k: _typed(arguments[1] if arguments else Any, v) for k, v in value.items()}
    return value


class StageReport(Record):
    """What a stage did; saved with the resume state and written to ``oaq_report.json`` under its stage name."""

    def summary(self) -> str:
        """A short table for logs."""
        raise NotImplementedError


class UnitReport(StageReport):
    """The report of a stage that works unit by unit (layers or blocks): an entry per finished unit, in the
    field named by ``ENTRIES``, each with ``name`` and ``reduction``; and ``seconds``."""

    ENTRIES = 'layers'
    seconds: float

    @property
    def entries(self) -> List[Any]:
        return getattr(self, self.ENTRIES)


class Stage:
    """One step of the pipeline; the runner (:mod:`oaq_plugin.pipeline.run`) calls the enabled ones in order.

    Attributes:
        name: Its key in timings (``<name>_s``), reports and the resume state; by default also its
            config section, whose ``enabled`` switches it.
        report_type: The class of its report (``None`` when it makes none).
    """

    name: str = ''
    report_type: Optional[Type[StageReport]] = None

    def enabled(self, config: OAQConfig) -> bool:
        return bool(getattr(config, self.name).enabled)

    def run(self, context: StageContext) -> Optional[StageReport]:
        raise NotImplementedError


def calibration_samples(batches: Sequence[torch.Tensor], count: int, what: str) -> torch.Tensor:
    """The first ``count`` samples of the calibration batches, which ``what`` (a stage, for the message) needs."""
    samples = first_samples(batches, count)
    if samples is None:
        raise DataError(f'{what} needs calibration samples, and the calibration batches are empty')
    return samples


# A unit of work: its name, and the function doing it that returns the unit's report entry.
Unit = Tuple[str, Callable[[], Any]]


def unit_by_unit(context: StageContext, report: UnitReport,
                 units: Callable[[AbstractSet[str]], Tuple[int, Iterator[Unit]]], desc: str, unit: str) -> UnitReport:
    """Run a stage's units in order with the model in eval mode, going on from the report saved at the
    stage's last safe point.

    Args:
        context: The stage's context; ``context.saved``, when set, is ``{'report': <report so far>}``.
        report: The stage's empty report; the saved entries and seconds go into it.
        units: Called with the names of the finished units; returns the number of units in all and a
            generator of the remaining ones (closed when the loop ends, however it ends).
        desc: The progress bar's label.
        unit: What a unit is (``layer``, ``block``), for the progress bar.

    Before each unit the safe point is offered the report so far. A unit's result depends only on the
    model as the earlier units left it, so a resumed loop ends as an uninterrupted one would.
    """
    start = time.perf_counter()
    previous_seconds = 0.0
    if context.saved is not None:
        saved = type(report).from_dict(context.saved['report'])
        setattr(report, report.ENTRIES, list(saved.entries))
        previous_seconds = saved.seconds
    finished = {entry.name for entry in report.entries}
    qmodel = context.qmodel
    was_training = qmodel.training
    qmodel.eval()
    bar = None
    try:
        total, pending = units(finished)
        bar = tqdm(total=total, initial=len(finished), desc=desc, unit=unit, disable=not context.progress,
                   leave=False)
        with contextlib.closing(pending):
            for name, work in pending:
                report.seconds = previous_seconds + time.perf_counter() - start
                context.safe_point(lambda: {'report': report.to_dict()})
                entry = work()
                report.entries.append(entry)
                bar.update(1)
                bar.set_postfix({unit: name, 'gain': f'{100 * entry.reduction:.0f}%'})
    finally:
        if bar is not None:
            bar.close()
        qmodel.train(was_training)
    report.seconds = previous_seconds + time.perf_counter() - start
    return report


@contextlib.contextmanager
def only_trained(model: nn.Module, trained: Sequence[torch.Tensor]) -> Iterator[None]:
    """While active, no parameter of ``model`` but ``trained`` asks for gradients (a float PReLU, a weight
    clip not being trained, would otherwise collect them)."""
    keep = {id(p) for p in trained}
    others = [p for p in model.parameters() if id(p) not in keep and p.requires_grad]
    for p in others:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in others:
            p.requires_grad_(True)
