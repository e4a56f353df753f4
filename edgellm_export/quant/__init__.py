"""Pre-quantized checkpoints: metadata -> per-linear plan, cross-checked against the tensors."""
