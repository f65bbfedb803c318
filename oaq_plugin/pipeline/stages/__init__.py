"""The pipeline stages, one file each, and their common shape (``base.py``); ``pipeline/run.py`` lists them
in the order a run applies them: calibrate, search, learned rounding, block reconstruction, distillation,
finetune."""
