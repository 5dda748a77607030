"""The step simulator: per-phase times of a training or decode step predicted from tier rates
(step, compute, traffic, rates, decode). Predictions only; every figure it gives is simulated.
"""
