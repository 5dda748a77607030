"""Which contention policy a run's CPU optimizer uses: the ``contention`` setting, with "auto"
resolved against the machine profile's contention measurement. It decides; it must not pace.

"auto" is on only where ``offload-profile contention`` measured real DMA (a GPU) slowed by the
CPU optimizer stepping on the same node: below :data:`DMA_SHARE_WORTH_PACING` of its rate alone.
On, it caps the workers taking chunks while a copy moves data at half the pool (at least one);
the explicit knobs (``ContentionPolicy`` or a mapping) tune that.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path

from optim_cpu.contention import ContentionPolicy

# optim_cpu/contention.py's rule: below about 90% of the DMA's rate alone, the step starves it.
DMA_SHARE_WORTH_PACING = 0.9


@dataclass(frozen=True)
class ContentionChoice:
    """The policy the host step's scheduler gets (None: off) and why, for the session to show.

    >>> ContentionChoice(None, "off: contention='off'").on
    False
    """

    policy: ContentionPolicy | None
    reason: str

    @property
    def on(self) -> bool:
        return self.policy is not None


def default_profile_path() -> Path:
    """Where ``offload-profile`` writes by default: ``./offload-profile-<host>/profile.json``.

    >>> default_profile_path().name
    'profile.json'
    """
    return Path(f"offload-profile-{socket.gethostname()}") / "profile.json"


def choose_contention(
    setting: str | ContentionPolicy, *, threads: int, profile: str | Path | None = None
) -> ContentionChoice:
    """Resolve ``setting`` ("auto", "off" or a policy) for a pool of ``threads`` workers.

    "auto" reads ``profile`` (default :func:`default_profile_path`); no profile, an unreadable
    one, or one without a real-DMA contention measurement leaves pacing off, with the reason.

    >>> choose_contention("off", threads=8).policy is None
    True
    >>> choose_contention(ContentionPolicy(threads_during_dma=2), threads=8).policy
    ContentionPolicy(threads_during_dma=2, duty_cycle_during_dma=1.0)
    >>> choose_contention("auto", threads=8, profile="/no/such/profile.json").reason
    "off: no machine profile at /no/such/profile.json (run `offload-profile contention` on this machine's GPU)"
    """
    if isinstance(setting, ContentionPolicy):
        return ContentionChoice(setting, "as set")
    if setting == "off":
        return ContentionChoice(None, "off: contention='off'")
    path = Path(profile) if profile is not None else default_profile_path()
    share = _measured_dma_share(path)
    if isinstance(share, str):
        return ContentionChoice(None, f"off: {share}")
    if share >= DMA_SHARE_WORTH_PACING:
        return ContentionChoice(
            None,
            f"off: DMA kept {share:.0%} of its rate while the CPU optimizer stepped ({path}), "
            f"at least {DMA_SHARE_WORTH_PACING:.0%}: nothing to gain",
        )
    cap = max(1, threads // 2)
    return ContentionChoice(
        ContentionPolicy(threads_during_dma=cap),
        f"on: DMA fell to {share:.0%} of its rate while the CPU optimizer stepped ({path}); "
        f"{cap} of {threads} workers step while a copy moves data",
    )


def _measured_dma_share(path: Path) -> float | str:
    """The lowest ``dma_share_during_step`` over the profile's nodes, or why there is none."""
    if not path.is_file():
        return (
            f"no machine profile at {path} (run `offload-profile contention` on this machine's GPU)"
        )
    # Imported here: profilers sits beside offload, and only "auto" needs it.
    from profilers.machine_profile import load_profile

    try:
        loaded = load_profile(path)
    except (OSError, ValueError) as exc:
        return f"machine profile {path} unreadable ({exc})"
    shares = [
        rates.dma_share_during_step
        for rates in loaded.nodes.values()
        if rates.dma_share_during_step is not None
    ]
    if not shares:
        return (
            f"machine profile {path} has no contention measured with real DMA "
            "(`offload-profile contention` measures it where a GPU is present)"
        )
    return min(shares)
