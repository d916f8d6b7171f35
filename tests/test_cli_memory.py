"""The console script re-executes heavy commands once with glibc settings that keep freed memory."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from attribution.memory import GLIBC_ENV, wants_reexec

GLIBC = sys.platform == "linux" and platform.libc_ver()[0] == "glibc"


def test_only_heavy_commands_without_the_settings_reexec():
    assert wants_reexec(["run", "--corpus", "x"], {}) is GLIBC
    assert wants_reexec(["experiment", "copyright"], {}) is GLIBC
    assert not wants_reexec(["report", "runs/x"], {})  # light commands start directly
    assert not wants_reexec([], {})
    assert not wants_reexec(["run"], dict(GLIBC_ENV))  # already re-executed: never loops
    assert not wants_reexec(["run"], {"ATTRIBUTION_MALLOC": "default"})


@pytest.mark.skipif(not GLIBC, reason="glibc only")
def test_reexec_replaces_the_process_with_the_settings_in_its_environment(tmp_path):
    (tmp_path / "probe.py").write_text(
        "import os, sys\nprint(sys.argv[1:], os.environ['MALLOC_MMAP_MAX_'], os.environ['MALLOC_TRIM_THRESHOLD_'])\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in GLIBC_ENV}
    env["PYTHONPATH"] = f"{tmp_path}{os.pathsep}{env.get('PYTHONPATH', '')}"
    code = "from attribution.memory import reexec_with_reusing_malloc as r; r(['run', '--x'], module='probe'); print('not replaced')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    assert (
        out.stdout.split("\n")[0]
        == f"['run', '--x'] {GLIBC_ENV['MALLOC_MMAP_MAX_']} {GLIBC_ENV['MALLOC_TRIM_THRESHOLD_']}"
    )


def test_console_script_keeps_its_name_after_reexec():
    exe = Path(sys.executable).with_name("attribution")
    if not exe.is_file():
        pytest.skip("console script not installed next to this interpreter")
    out = subprocess.run([str(exe), "run", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("Usage: attribution run")
