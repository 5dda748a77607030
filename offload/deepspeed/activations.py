"""Our activation offload under a DeepSpeed engine: layer-input checkpoints (or every large saved
tensor) of ``engine.module`` go to host blocks of this rank's allocator. It must not touch ZeRO.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from allocators.tiered import TieredAllocator
from offload.runtime.activation_offload import ActivationOffloader, find_layers
from offload.runtime.checkpoint_offload import LayerCheckpointing
from offload.runtime.host_memory import HostMemory
from offload.runtime.streams import CopyStreams

ActivationMode = Literal["off", "all", "checkpoint"]


@dataclass
class DeepSpeedActivations:
    """The hooks that offload a DeepSpeed engine's activations; :meth:`remove` takes them off."""

    offloader: ActivationOffloader
    checkpointing: LayerCheckpointing | None

    def remove(self) -> None:
        """Take the hooks off and give the host blocks back."""
        self.offloader.remove()
        if self.checkpointing is not None:
            self.checkpointing.remove()


def offload_activations(
    engine: Any,
    allocator: TieredAllocator,
    mode: ActivationMode = "checkpoint",
    *,
    min_nbytes: int = 1 << 20,
    prefetch_layers: int = 1,
) -> DeepSpeedActivations:
    """Offload ``engine.module``'s activations into ``allocator`` (class ``activations``).

    ``checkpoint`` runs each decoder layer under activation checkpointing and offloads the
    layer inputs (the paper's mode); ``all`` offloads every saved tensor of ``min_nbytes`` or more.

    >>> acts = offload_activations(run.engine, run.placement.allocator)  # doctest: +SKIP
    >>> acts.offloader.offloaded_nbytes  # doctest: +SKIP
    """
    if mode not in ("all", "checkpoint"):
        raise ValueError(f"activations = {mode!r}: write 'checkpoint', 'all' (or 'off' to skip)")
    model = engine.module
    layers = find_layers(model)
    checkpointing = LayerCheckpointing(layers) if mode == "checkpoint" and layers else None
    offloader = ActivationOffloader(
        model,
        HostMemory(allocator.topology, allocator=allocator),
        CopyStreams(engine.device),
        min_nbytes=min_nbytes,
        prefetch_layers=prefetch_layers,
        layers=layers,
    )
    return DeepSpeedActivations(offloader, checkpointing)
