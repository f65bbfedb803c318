"""One quantization run shared by every entry point (BasicSR, mmengine, the ``oaq`` CLI): below the
adapters, above the pipeline.

``run_experiment(model, calibration, test_sets, options, out_dir, logger, scale=...)`` is the whole run;
:class:`Experiment` is the same run in steps, for adapters whose framework owns the test loop.
"""
from .artifacts import (CROPS_DIR, HISTOGRAM_FILE, QUANTIZED_FILE, REPORT_FILE, RUN_NOTE_FILE, SENSITIVITY_FILE,
                        STATE_FILE, archive_existing, run_note)
from .calibration_data import calibration_source, warn_if_calibrating_on_test_sets
from .run import Experiment, ExperimentResult, TestSet, run_experiment
from .validation import DatasetTally, compare_outputs, summary_table

__all__ = [
    'CROPS_DIR', 'DatasetTally', 'Experiment', 'ExperimentResult', 'HISTOGRAM_FILE', 'QUANTIZED_FILE', 'REPORT_FILE',
    'RUN_NOTE_FILE', 'SENSITIVITY_FILE', 'STATE_FILE', 'TestSet', 'archive_existing', 'calibration_source',
    'compare_outputs', 'run_experiment', 'run_note', 'summary_table', 'warn_if_calibrating_on_test_sets',
]
