"""The training runtime under offload.enable(): streams, placed host memory, activation and
checkpoint offload, gradients landing on the host and the host optimizer step, and the patches
that route clip_grad_norm_ and optimizer.step to it. Knows nothing of the CLI or of reports.
"""
