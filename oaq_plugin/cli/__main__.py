"""``python -m oaq_plugin.cli``: the ``oaq`` command."""
from .main import entry_point

entry_point()
