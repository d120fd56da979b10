"""The README's quick start (also the site's home page), run exactly as printed: app.py,
procmqtt.toml, the procmqtt command and the mosquitto_sub / mosquitto_pub lines, against a private
Mosquitto.

Only the broker's address is added (``--broker`` on the command line, ``-h``/``-p`` for the
clients), as a reader would point them at their own broker.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from harness import ROOT, Mosquitto, Procmqtt, wait_until

pytestmark = pytest.mark.timeout(60)


QUICKSTART = ("<!-- --8<-- [start:quickstart] -->", "<!-- --8<-- [end:quickstart] -->")  # docs/index.md includes it


def opening() -> dict[str, str]:
    """The code blocks and the stated outcome of the README's quick start (between its markers)."""
    text = (ROOT / "README.md").read_text()
    start, end = (text.index(marker) for marker in QUICKSTART)
    intro = text[start:end]
    assert '--8<-- "README.md:quickstart"' in (ROOT / "docs" / "index.md").read_text()
    blocks = re.findall(r"```(\w+)\n(.*?)```", intro, re.DOTALL)
    python = [code for lang, code in blocks if lang == "python"]
    toml = [code for lang, code in blocks if lang == "toml"]
    shell = [code for lang, code in blocks if lang == "sh"]
    assert len(python) == 1 and len(toml) == 1 and len(shell) == 2, blocks
    assert python[0].startswith("# app.py\n") and toml[0].startswith("# procmqtt.toml")
    log_line = re.search(r"logs `(\[worker-\d+\] INFO [^`]*)`", intro)
    printed = re.search(r"`mosquitto_sub` prints as `([^`]*)`", intro)
    assert log_line and printed, "the README states what the example does"
    return {
        "app.py": python[0],
        "procmqtt.toml": toml[0],
        "run": shell[0],
        "clients": shell[1],
        "log": log_line.group(1),
        "printed": printed.group(1),
    }


def command(block: str, program: str) -> list[str]:
    lines = [line for line in block.splitlines() if line.startswith(program + " ")]
    assert len(lines) == 1, f"one {program} line in {block!r}"
    words = shlex.split(lines[0], comments=True)
    return words[:-1] if words[-1] == "&" else words


class ReadmeRun(Procmqtt):
    """``procmqtt run`` in the example's directory, so that ``app:MyWorker`` and ./procmqtt.toml are found."""

    def __init__(self, directory: Path, argv: list[str]) -> None:
        self.log_path = directory / "procmqtt.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - kept open for the process, as in Procmqtt
        env = {**{k: v for k, v in os.environ.items() if not k.startswith("PROCMQTT_")}, "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen(
            argv, stdout=self._log, stderr=subprocess.STDOUT, cwd=directory, env=env, start_new_session=True
        )


def test_readme_opening_example_runs_as_printed(tmp_path, broker: Mosquitto, runs):
    example = opening()
    directory = tmp_path / "example"
    directory.mkdir()
    (directory / "app.py").write_text(example["app.py"])
    (directory / "procmqtt.toml").write_text(example["procmqtt.toml"])
    run_argv = command(example["run"], "procmqtt")
    assert run_argv[:2] == ["procmqtt", "run"]
    run = ReadmeRun(directory, [sys.executable, "-m", *run_argv, "--broker", broker.url])
    runs.append(run)
    run.ready()
    workers = int(run_argv[run_argv.index("-w") + 1])
    run.wait_for_log(r"\[supervisor\] INFO started worker \d", count=workers)

    address = ["-h", "127.0.0.1", "-p", str(broker.port)]
    sub = subprocess.Popen(
        [
            "stdbuf",
            "-oL",
            *command(example["clients"], "mosquitto_sub"),
            *address,
            "-d",
            "-C",
            "1",
            "-W",
            "30",
        ],  # stdbuf: a line at a time into the pipe
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    printed: list[str] = []
    reader = threading.Thread(target=lambda: printed.extend(sub.stdout or ()), daemon=True)  # line by line
    reader.start()
    try:
        # -d traces the protocol: publish only once the subscription is in place
        wait_until(lambda: any("received SUBACK" in line for line in printed), 10, "mosquitto_sub subscribed")
        pub = subprocess.run(
            [*command(example["clients"], "mosquitto_pub"), *address],
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        )
        assert pub.returncode == 0, pub.stderr
        wait_until(
            lambda: f"{example['printed']}\n" in printed,
            20,
            f"mosquitto_sub printing {example['printed']!r}, seen {printed}",
        )
    finally:
        sub.kill()
        sub.wait()
    said = re.fullmatch(r"\[worker-\d+\] (.*)", example["log"])  # whichever worker got it
    assert said is not None
    run.wait_for_log(r"\[worker-\d+\] " + re.escape(said.group(1)), 10)
    assert run.stop() == 0
