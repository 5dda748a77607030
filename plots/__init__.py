"""plots: one module per figure; each reads result files only, never runs an experiment."""
