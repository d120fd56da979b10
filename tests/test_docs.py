"""The documentation's code blocks work as printed, so they cannot drift from the code.

Every Python block of README.md and docs/ defines every name it uses (ruff's pyflakes rules), is
imported as a module, and each ``Worker`` subclass it defines passes procmqtt's load-time checks
(``WorkerHarness`` runs them, as ``procmqtt run`` would); a ``test_*`` function in a block is run.
Every TOML block loads through the real configuration loader. A block whose first line is
``# name.py`` is saved under that name, so a later block may import it (the testing guide imports
the routes guide's ``app.py``). A block that is only an excerpt (``self.publish(...)`` outside a
class) is preceded by ``<!-- docs-test: excerpt -->`` and is only compiled. README's quick start
is run end to end against a private Mosquitto by tests/test_readme.py.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

import pytest
from harness import ROOT

from procmqtt import Worker, config
from procmqtt.testing import WorkerHarness

pytestmark = pytest.mark.timeout(30)

EXCERPT = "<!-- docs-test: excerpt -->"
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.DOTALL | re.MULTILINE)
NAMED = re.compile(r"# ([a-z_][a-z_0-9]*)\.py\n")


@dataclass(frozen=True)
class Block:
    page: str
    line: int
    lang: str
    code: str
    excerpt: bool

    @property
    def where(self) -> str:
        return f"{self.page}:{self.line}"

    @property
    def module(self) -> str:
        named = NAMED.match(self.code)
        if named:
            return named.group(1)
        return "docs_block_" + re.sub(r"\W", "_", self.page) + f"_{self.line}"


def pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def blocks(lang: str) -> Iterator[Block]:
    for path in pages():
        text = path.read_text()
        for match in FENCE.finditer(text):
            if match.group(1) != lang:
                continue
            before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
            line = text.count("\n", 0, match.start()) + 1
            yield Block(str(path.relative_to(ROOT)), line, lang, match.group(2), before == EXCERPT)


PYTHON = list(blocks("python"))
TOML = list(blocks("toml"))


@pytest.mark.unit
def test_the_pages_hold_the_blocks_this_checks() -> None:
    """A change to the fences or the markers must not leave this test checking nothing."""
    where = {b.page for b in PYTHON}
    assert {"README.md", "docs/guide/worker.md", "docs/guide/routes.md", "docs/guide/testing.md"} <= where
    assert {"README.md", "docs/configuration.md"} <= {b.page for b in TOML}
    assert sum(not b.excerpt for b in PYTHON) >= 5 and any(b.excerpt for b in PYTHON)


@pytest.mark.unit
@pytest.mark.parametrize("block", PYTHON, ids=lambda b: b.where)
def test_every_python_block_compiles(block: Block) -> None:
    compile(block.code, block.where, "exec")


def test_every_python_block_defines_the_names_it_uses(tmp_path: Path) -> None:
    """An undefined name (``connect_somewhere()``) or a missing import fails here, in any function."""
    for block in PYTHON:
        if not block.excerpt:
            (tmp_path / (re.sub(r"\W", "_", block.where) + ".py")).write_text(block.code)
    found = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--isolated", "--no-cache", "--select", "F", "--output-format",
         "concise", str(tmp_path)],
        capture_output=True, text=True, timeout=20, check=False,
    )  # fmt: skip
    assert found.returncode == 0, found.stdout + found.stderr


def runnable_here(block: Block) -> bool:
    """Tracing's examples need the ``otel`` extra (``.ci/run`` installs it); without it, as with a
    plain ``pip install -e '.[test]'``, they are only compiled and linted, like an excerpt."""
    return "otel" not in block.code or importlib.util.find_spec("opentelemetry") is not None


def load(block: Block) -> list[type[Worker]]:
    """Import the block as a module (its directory is on sys.path); the Worker subclasses it defines."""
    module = importlib.import_module(block.module)
    return [
        cls
        for cls in vars(module).values()
        if inspect.isclass(cls) and issubclass(cls, Worker) and cls is not Worker and cls.__module__ == module.__name__
    ]


@pytest.mark.unit
@pytest.mark.parametrize("scope", ["README.md", "docs/"])
def test_every_python_block_imports_and_its_workers_pass_the_load_checks(
    scope: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """README's blocks and the site's are separate programs (both have an ``app.py``). Tracing's
    examples need an exporter; the user picks one with ``OTEL_TRACES_EXPORTER``, the test none."""
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "none")
    chosen = [b for b in PYTHON if b.page.startswith(scope) and not b.excerpt and runnable_here(b)]
    names = [b.module for b in chosen]
    assert len(names) == len(set(names)), f"two blocks saved under one name in {scope}: {names}"
    for block in chosen:
        (tmp_path / f"{block.module}.py").write_text(block.code)
        sys.modules.pop(block.module, None)  # an ``app`` another test imported is not this one
    sys.path.insert(0, str(tmp_path))
    try:
        ran = 0
        for block in chosen:
            for cls in load(block):
                WorkerHarness(cls)  # the route and return-annotation checks procmqtt run makes
            for name, function in vars(sys.modules[block.module]).items():
                if name.startswith("test_") and callable(function):
                    function()
                    ran += 1
        assert ran >= (1 if scope == "docs/" else 0)  # the testing guide's example test ran
    finally:
        sys.path.remove(str(tmp_path))
        importlib.invalidate_caches()
        for name in names:
            sys.modules.pop(name, None)


@pytest.mark.unit
@pytest.mark.parametrize("block", TOML, ids=lambda b: b.where)
def test_every_toml_block_loads_through_the_configuration_loader(block: Block) -> None:
    mapping = tomllib.loads(block.code)
    tls = mapping.get("mqtt", {}).get("tls")
    if tls is not None:  # its certificate files are the reader's; each [mqtt.tls] key is checked
        assert set(tls) <= {"ca_certs", "certfile", "keyfile", "insecure"}, tls
        del mapping["mqtt"]["tls"]
    config.from_mapping(mapping, block.where, environ={"MQTT_PASSWORD": "pw"})


@pytest.mark.unit
def test_readme_links_reach_files_of_the_checkout() -> None:
    """The site's links are checked by ``mkdocs build --strict``; README's (read on GitHub) here."""
    readme = (ROOT / "README.md").read_text()
    targets = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", readme)
    assert targets
    missing = [t for t in targets if "://" not in t and not (ROOT / t).exists()]
    assert not missing, f"README links to files that do not exist: {missing}"


@pytest.mark.unit
def test_the_readme_test_command_is_the_one_ci_runs() -> None:
    readme = (ROOT / "README.md").read_text()
    shown = re.search(r"The test command itself.*?```sh\n(.*?)\n```", readme, re.DOTALL)
    assert shown, "README shows the test command"
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    assert ci[-1] == shown.group(1) == ".venv/bin/python -m pytest -n 2"
