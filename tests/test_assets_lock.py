"""The asset build lock: one builder of an assets folder at a time, and a killed builder does not leave it locked."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import filelock
import pytest

from zhjax.assets import _build_lock

REPO = Path(__file__).resolve().parents[1]
HOLD = "import sys, time; from pathlib import Path; from zhjax.assets import _build_lock\n" \
       "with _build_lock(Path(sys.argv[1])):\n    print('held', flush=True); time.sleep(600)\n"


def test_a_second_builder_waits_and_a_killed_builder_releases_the_lock(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    child = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert child.stdout.readline().strip() == "held"
        with pytest.raises(filelock.Timeout):
            with filelock.FileLock(tmp_path / ".lock", timeout=0.2):
                pass
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
        start = time.monotonic()
        with _build_lock(tmp_path):  # the dead process's lock is gone at once
            assert time.monotonic() - start < 5
    finally:
        child.kill()
        child.wait()
