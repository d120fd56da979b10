"""The README's first command on Debian's own Python: `bash examples/demo.sh` makes .venv (PEP 668
refuses a system-wide pip install) and finds mosquitto in /usr/sbin off a normal user's PATH."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from harness import ROOT

DEBIAN_PYTHON = Path("/usr/bin/python3")


def _externally_managed() -> bool:
    if not DEBIAN_PYTHON.exists():
        return False
    out = subprocess.run(
        [str(DEBIAN_PYTHON), "-c", "import sysconfig; print(sysconfig.get_path('stdlib'))"],
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    ).stdout.strip()
    return bool(out) and (Path(out) / "EXTERNALLY-MANAGED").exists()


@pytest.mark.timeout(300)
@pytest.mark.skipif(not _externally_managed(), reason="no externally managed /usr/bin/python3 (Debian's) here")
@pytest.mark.skipif(not os.access("/usr/sbin/mosquitto", os.X_OK), reason="mosquitto is not in /usr/sbin")
def test_demo_script_on_debian_python_with_a_users_path(tmp_path: Path) -> None:
    checkout = tmp_path / "checkout"
    shutil.copytree(
        ROOT,
        checkout,
        ignore=shutil.ignore_patterns(".git", ".venv", "__pycache__", "*.egg-info", ".pytest_cache", "results"),
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYENV", "VIRTUAL_ENV", "PYTHON"))}
    env["PATH"] = "/usr/local/bin:/usr/bin:/bin"  # a normal user's: no /usr/sbin, no pyenv shims
    premise = subprocess.run(
        ["bash", "-c", "command -v python3; command -v mosquitto || true"],
        env=env,
        capture_output=True,
        text=True,
        timeout=10,
        check=True,
    ).stdout.split()
    assert premise == [str(DEBIAN_PYTHON)], premise
    result = subprocess.run(
        ["bash", "examples/demo.sh", "-w", "1", "--seconds", "2", "--rate", "50"],
        cwd=checkout,
        env=env,
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "lost 0" in result.stdout and "stopped gracefully" in result.stdout
    assert (checkout / ".venv" / "bin" / "python").exists()
