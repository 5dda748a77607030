"""experiments: one script per experiment of the paper; results land under experiments/results."""
