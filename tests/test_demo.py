"""The README's main job, `offload demo`, end to end as a user runs it (small sizes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys


def test_offload_demo_profiles_places_and_fine_tunes(tmp_path):
    profile_dir = tmp_path / "profile"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "offload.tools.cli",
            "demo",
            "--steps",
            "2",
            "--seq",
            "32",
            "--buffer",
            "8MiB",
            "--profile-out",
            str(profile_dir),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    assert "placed buffer" in out and "node0:" in out
    assert "tiny Llama under offload.enable()" in out
    assert "largest loss difference plain vs offload: 0.00e+00" in out
    profile = json.loads((profile_dir / "profile.json").read_text())
    assert profile["schema"].startswith("offload-profile/")
