"""What a run reads and writes: images, calibration patches, quantized checkpoints, reports, figures."""
