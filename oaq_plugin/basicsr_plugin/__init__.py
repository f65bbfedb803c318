"""BasicSR adapter: registration, the OAQ model, its metrics and the checks of an option file before a run."""
