"""The training loop and what it owns: run folder, checkpoints, signals, non-finite guard, optimiser, losses, sampling, export of trained layers."""
