"""Each configuration key is declared once (``procmqtt/config/schema.py``); these tests hold every
place that derives from it to the declaration: the dataclasses, the environment variables, the
reload sets, the table of docs/configuration.md, and config's independence from the runtime modules."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import textwrap

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

import pytest
from harness import ROOT

from procmqtt import config
from procmqtt.config import reference, reload, schema
from procmqtt.config.checks import subtable
from procmqtt.config.schema import KEYS, REQUIRED, Reload

pytestmark = pytest.mark.timeout(30)

SECTION_CLASSES = {
    "mqtt": config.MqttConfig,
    "workers": config.WorkersConfig,
    "metrics": config.MetricsConfig,
    "mqtt.tls": config.TlsConfig,
    "mqtt.will": config.Announcement,
    "mqtt.birth": config.Announcement,
    "mqtt.topics": config.Subscription,
}


@pytest.mark.unit
def test_the_configuration_page_holds_exactly_the_rendered_reference_table():
    """Regenerate with ``python3 -m procmqtt.config.reference --write docs/configuration.md``."""
    page = (ROOT / "docs" / "configuration.md").read_text()
    assert page.count(reference.BEGIN) == 1 and page.count(reference.END) == 1
    stale = "docs/configuration.md's table is stale: python3 -m procmqtt.config.reference --write docs/configuration.md"
    assert reference.block() in page, stale
    assert reference.replaced(page) == page
    assert reference.BEGIN not in (ROOT / "README.md").read_text()  # one table, on the site


@pytest.mark.unit
def test_the_table_has_one_row_per_key_with_its_variable_default_and_reload():
    table = reference.render()
    assert len(table.splitlines()) == 2 + len(KEYS) + 1  # header, rule, keys, [app]
    assert (
        "| `[mqtt] port` | an integer from 1 to 65535 | 1883, 8883 with [mqtt.tls] | `PROCMQTT_MQTT_PORT` "
        "| agent restarts |"
    ) in table
    assert "| `[workers] count` | an integer from 1 to 1024 | `1` | `PROCMQTT_WORKERS_COUNT` | new workers |" in table
    assert "| `[mqtt.tls] insecure` | true or false | `false` | file only | agent restarts |" in table
    assert (
        "| `[metrics] port` | an integer from 1 to 65535 | unset | `PROCMQTT_METRICS_PORT` | procmqtt restart |"
        in table
    )


@pytest.mark.parametrize("section", list(SECTION_CLASSES))
@pytest.mark.unit
def test_every_dataclass_field_is_a_declared_key_with_its_default(section):
    fields = {
        f.name: f.default for f in dataclasses.fields(SECTION_CLASSES[section]) if f.name != "topic_filter"
    }  # a [mqtt.topics] entry's name, not a key
    declared = {k.name: k.default for k in schema.keys(section) if k.field}
    assert list(fields) == list(declared)  # same keys, same order (check prints them in this order)
    assert fields == {name: dataclasses.MISSING if d is REQUIRED else d for name, d in declared.items()}


@pytest.mark.unit
def test_every_declared_key_is_checked_by_the_loader():
    for key in KEYS:
        table = config._SECTIONS.get(key.section) or schema.SUBTABLES[key.section]
        assert table[key.name] is key.check


@pytest.mark.unit
def test_each_key_has_its_variable_and_only_those():
    assert {k.env for k in KEYS if k.env} == set(config.env_variables())
    assert {k.name for k in KEYS if k.check is subtable} == {"topics", "tls", "will", "birth"}


@pytest.mark.unit
def test_reload_classification_is_as_before():
    """The sets reload.py had written out, now derived from each key's ``reload``."""
    assert {"topics", "publish_buffer", "publish_timeout"} == reload.LIVE_MQTT_KEYS
    assert reload.AGENT_WORKERS_KEYS == (
        "dispatch",
        "order_key",  # issue 13: read by the agent's ledger, like dispatch
        "prefetch",
        "graceful_timeout",
        "max_attempts",
        "on_error",
        "retry_delay",
        "retry_backoff",
        "retry_max_delay",
        "dead_letter_topic",
    )
    assert {"mqtt", "workers", "app", "source"} == reload.RELOADED_SECTIONS
    assert {k.reload for k in KEYS if k.section == "metrics"} == {Reload.RESTART}


@pytest.mark.unit
def test_secrets_are_declared():
    assert [(k.section, k.name) for k in KEYS if k.secret] == [("mqtt", "password")]
    assert schema.PASSWORD_KEYS == ("password", "password_env", "password_file")


@pytest.mark.unit
def test_runtime_modules_use_the_names_config_declares():
    from procmqtt.agent.dispatch import DISPATCHERS
    from procmqtt.ipc.shared import MAX_SLOTS

    assert set(DISPATCHERS) == set(config.DISPATCH_MODES)
    assert MAX_SLOTS == config.MAX_SLOTS and config.SECTIONS["workers"]["count"](MAX_SLOTS + 1)


def test_importing_config_loads_no_runtime_module():
    """config sits below agent, worker, supervisor and ipc: they import it, never the reverse.

    ``procmqtt/__init__`` imports the worker API, so the parent package is stood in for by a bare
    module: what is loaded is what config's own modules import. (``config.reload`` builds the
    agent's subscribe records and imports ``ipc.channel``; the supervisor is its only user.)
    """
    code = textwrap.dedent(f"""
        import importlib, pkgutil, sys, types
        package = types.ModuleType("procmqtt")
        package.__path__ = [{str(ROOT / "procmqtt")!r}]
        sys.modules["procmqtt"] = package
        import procmqtt.config
        for module in pkgutil.iter_modules(procmqtt.config.__path__):
            if module.name != "reload":
                importlib.import_module("procmqtt.config." + module.name)
        runtime = ("procmqtt.agent", "procmqtt.worker", "procmqtt.supervisor", "procmqtt.ipc")
        print(sorted(m for m in sys.modules if m.startswith(runtime)))
    """)
    result = subprocess.run(
        [sys.executable, "-c", code], check=False, capture_output=True, text=True, cwd=ROOT, timeout=20
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


@pytest.mark.unit
def test_the_configuration_pages_example_loads():
    """The example above the table sets only declared keys, with values they accept."""
    page = (ROOT / "docs" / "configuration.md").read_text()
    section = page[: page.index(reference.BEGIN)]
    example = tomllib.loads(section.split("```toml\n")[1].split("```")[0])
    del example["mqtt"]["tls"]  # its files do not exist here; [mqtt.tls] keys are checked by the loader
    cfg = config.from_mapping(example, "docs/configuration.md", environ={"MQTT_PASSWORD": "pw"})
    assert cfg.mqtt.share_group == "orders" and cfg.workers.count == 4 and cfg.mqtt.will is not None


@pytest.mark.unit
def test_the_reload_section_names_every_workers_key_that_restarts_the_agent() -> None:
    """docs/operations.md's "Reload (SIGHUP)" lists these by hand; the declarations decide them."""
    from procmqtt.config.reload import AGENT_KEYS

    page = (ROOT / "docs" / "operations.md").read_text()
    section = page[page.index("restarts the agent gracefully when a setting it reads at start changed") :]
    section = section[: section.index("The old agent stops as on")]
    missing = [key for key in AGENT_KEYS["workers"] if f"`{key}`" not in section]
    assert not missing, f"docs/operations.md's reload section does not name: {missing}"
