"""User tools around the runtime: the `offload` CLI (demo, doctor, plan, report, topology), the
run record and the live dashboard. The runtime never imports from here; tools subscribe to it.
"""
