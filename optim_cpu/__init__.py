"""optim_cpu: CPU optimizers over host-resident fp32 state, and a scheduler that keeps their
memory traffic out of the way of the GPU's DMA.
"""
