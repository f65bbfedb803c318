"""BasicSR adapter: registration, the OAQ model, metrics and the test entry point."""
