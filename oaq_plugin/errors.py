"""Errors a user can act on. Adapters print these as one line (no traceback unless --debug)."""
from __future__ import annotations

import difflib
import os
import signal
import sys
from typing import Callable, Iterable, Union


class OAQError(Exception):
    """Base class: a problem the user can fix (bad option, missing file, unsupported layer)."""


class ConfigError(OAQError, ValueError):
    """An invalid ``oaq`` option: unknown key, wrong type, value out of range."""


class DataError(OAQError):
    """Calibration or checkpoint data that is missing, corrupt or unusable."""


class NumericalError(OAQError):
    """NaN/Inf met during calibration or finetuning; names the layer where it appeared."""


class UnsupportedLayerError(OAQError):
    """A layer the requested backend or conversion cannot handle."""


class Interrupted(OAQError):
    """The run stopped on SIGINT/SIGTERM at a safe point, after saving its state to ``state_path``.

    Args:
        state_path: The file a rerun resumes from.
        signum: The signal that asked for the stop; the exit code of a CLI is ``128 + signum``.
    """

    def __init__(self, state_path: Union[str, os.PathLike], signum: int) -> None:
        self.state_path = str(state_path)
        self.signum = int(signum)
        super().__init__(f'interrupted by {signal_name(self.signum)}; state saved to {self.state_path}; run again '
                         'with resume on (run_pipeline resume=True, oaq.resume: true or --auto_resume) to continue')

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def signal_name(signum: int) -> str:
    """``SIGINT`` for 2, and so on; the number for a signal without a name here."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f'signal {signum}'


def closest(name: str, candidates: Iterable[str]) -> str:
    """A ' (did you mean X?)' suffix for the closest candidate, or '' when none is close."""
    match = difflib.get_close_matches(str(name), list(candidates), n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else ''


def exit_code_of(action: Callable[[], int], *, prog: str, resume_hint: str, debug: bool = False) -> int:
    """Run a command-line ``action`` and turn what a user can act on into one line on stderr and an exit code.

    Args:
        action: The command; its return value is the exit code when it succeeds.
        prog: What the lines start with (``oaq_plugin``, ``oaq quantize``).
        resume_hint: How to continue an interrupted run (``rerun with --auto_resume``).
        debug: Re-raise errors, with their traceback, instead of printing one line.

    Returns:
        The action's code; 2 for an :class:`OAQError` or a missing file; ``128 + signal`` for an interrupted run.
    """
    try:
        return action()
    except Interrupted as stop:
        print(f'{prog}: interrupted; state saved to {stop.state_path}; {resume_hint} to continue', file=sys.stderr)
        return stop.exit_code
    except KeyboardInterrupt:
        print(f'{prog}: interrupted', file=sys.stderr)
        return 128 + signal.SIGINT
    except (OAQError, FileNotFoundError) as error:
        if debug:
            raise
        print(f'{prog}: error: {error}', file=sys.stderr)
        return 2
