"""The ``oaq`` command: quantize any SR checkpoint with one command, print and compare run reports."""
