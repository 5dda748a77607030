"""What the kernel says about a mapping's memory policy, read from /proc/self/numa_maps: how tests
check what mbind set without a get_mempolicy wrapper the library itself never needs."""


def policy_of(addr: int) -> str:
    """The policy of the mapping holding ``addr``, as numa_maps writes it ("bind:0", "prefer:0")."""
    found = "no mapping"
    with open("/proc/self/numa_maps") as maps:
        for line in maps:  # sorted by start address: the last start at or below addr holds it
            start, policy = line.split()[:2]
            if int(start, 16) <= addr:
                found = policy
    return found
