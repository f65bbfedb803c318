"""Pipeline stages on top of the core: calibrate, search, finetune, export."""
