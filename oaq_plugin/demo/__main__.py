"""``python -m oaq_plugin.demo`` (what ``make demo`` runs)."""
import sys

from .runner import main

sys.exit(main())
