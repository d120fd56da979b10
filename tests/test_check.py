"""``procmqtt check``: what ``run`` would do, with secrets masked, without touching the broker."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from harness import run_cli

from procmqtt import config, logs
from procmqtt.cli import check
from procmqtt.cli import main as cli
from procmqtt.errors import AppError
from procmqtt.worker import routes
from procmqtt.worker.routes import Route

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

pytestmark = pytest.mark.timeout(30)

CONFIG = """
[mqtt]
host = "127.0.0.1"
port = 1
username = "svc"
password = "file-pw-hunter2"
[mqtt.topics]
"sensors/+/temperature" = { qos = 1 }
"commands/#" = {}
[workers]
count = 2
[app]
alert_above = 30.0
db = { url = "postgres://db/x", password = "db-pw-hunter2" }
api_token = "token-hunter2"
"""


@pytest.fixture
def config_file(tmp_path: Path) -> str:
    path = tmp_path / "app.toml"
    path.write_text(CONFIG)
    return str(path)


def test_check_lists_subscriptions_and_prints_the_configuration(config_file):
    # port 1: nothing listens there, and check must not try
    result = run_cli(
        "check", "tests/apps.py:Recorder", "-c", config_file, "-w", "3", env={"PROCMQTT_MQTT_HOST": "broker.invalid"}
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "app: tests/apps.py:Recorder (class apps.Recorder)" in out
    assert "broker: broker.invalid:1 (not contacted by check)" in out
    assert "from the environment and command line: --workers, PROCMQTT_MQTT_HOST" in out
    rows = [line.split() for line in out.split("subscriptions (2):\n")[1].split("\n\n")[0].splitlines()]
    assert rows == [
        ["FILTER", "QOS", "REACHES"],
        ["sensors/+/temperature", "1", "on_message"],
        ["commands/#", "0", "on_message"],
    ]
    printed = tomllib.loads(out[out.index("# effective configuration") :])
    assert printed["workers"]["count"] == 3 and printed["mqtt"]["host"] == "broker.invalid"
    assert printed["mqtt"]["topics"] == {"sensors/+/temperature": {"qos": 1}, "commands/#": {"qos": 0}}
    assert 'host = "broker.invalid"  # PROCMQTT_MQTT_HOST' in out and "count = 3  # --workers" in out


def test_check_masks_secrets_from_the_file_and_the_environment(config_file, tmp_path):
    result = run_cli("check", "tests/apps.py:Recorder", "-c", config_file)
    assert result.returncode == 0, result.stderr
    assert "hunter2" not in result.stdout + result.stderr
    printed = tomllib.loads(result.stdout[result.stdout.index("# effective configuration") :])
    assert printed["mqtt"]["password"] == "********"
    assert printed["app"]["db"] == {"url": "postgres://db/x", "password": "********"}
    assert printed["app"]["api_token"] == "********" and printed["app"]["alert_above"] == 30.0

    env = {"PROCMQTT_MQTT_PASSWORD": "env-pw-s3cret"}
    for command in (
        ("check", "tests/apps.py:Recorder", "-c", config_file),
        ("run", "tests/apps.py:Recorder", "-c", config_file, "--print-config"),
    ):
        result = run_cli(*command, env=env)
        assert result.returncode == 0, result.stderr
        assert "s3cret" not in result.stdout + result.stderr and "hunter2" not in result.stdout
        assert 'password = "********"  # PROCMQTT_MQTT_PASSWORD' in result.stdout


@pytest.mark.parametrize(
    "app, config_text, env, code",
    [
        ("tests/apps.py:Missing", "", {}, 3),
        ("tests/apps.py:NotAWorker", "", {}, 3),
        ("no_such_module:App", "", {}, 3),
        ("tests/apps.py:Recorder", "[mqtt]\nhots = 'x'\n", {}, 2),
        ("tests/apps.py:Recorder", "[workers]\ncount = 0\n", {}, 2),
        ("tests/apps.py:Recorder", "", {"PROCMQTT_WORKERS_COUNT": "many"}, 2),
        ("tests/apps.py:Recorder", "", {"PROCMQTT_LOG_FORMAT": "xml"}, 2),
        ("tests/apps.py:Recorder", '[workers]\norder_key = "sensors/{device"\n', {}, 2),
    ],
)
def test_check_fails_like_run(tmp_path, app, config_text, env, code):
    path = tmp_path / "c.toml"
    path.write_text(config_text)
    checked = run_cli("check", app, "-c", str(path), env=env)
    ran = run_cli("run", app, "-c", str(path), env=env)  # fails before any fork, so it returns at once
    assert checked.returncode == ran.returncode == code
    assert checked.stderr == ran.stderr and len(checked.stderr.splitlines()) == 1
    assert checked.stderr.startswith("procmqtt: error: ") and checked.stdout == ""


def test_check_key_of_prints_the_order_key(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[workers]\ndispatch = "ordered"\norder_key = "sensors/{device}/#"\n')
    app = ("tests/apps.py:Recorder", "-c", str(path))
    result = run_cli("check", *app, "--key-of", "sensors/d1/temp", "--key-of", "x/y")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        'sensors/d1/temp -> sensors/d1/#  # order_key = "sensors/{device}/#"',
        'x/y -> x/y  # order_key = "sensors/{device}/#"',
    ]
    bad = run_cli("check", *app, "--key-of", "a/+")
    assert bad.returncode == 2 and len(bad.stderr.splitlines()) == 1 and "--key-of 'a/+'" in bad.stderr


def test_check_help():
    result = run_cli("check", "--help")
    assert result.returncode == 0 and "--log-format" in result.stdout and "broker" in result.stdout


# --- routes: unit tests with routes_of stood in for (it returns () until the routes work lands) -----

ROUTES = (
    Route("sensors/{device}/temperature", "sensors/+/temperature", 1, "temperature", ("device",)),
    Route("logs/#", "logs/#", 0, "logs", ()),
    Route("commands/#", "commands/#", 1, "command", ()),
)


@pytest.mark.unit
def test_subscriptions_show_what_each_filter_reaches():
    cfg = config.from_mapping(
        {"mqtt": {"topics": {"sensors/+/temperature": {"qos": 1}, "commands/#": {"qos": 0}, "other": {}}}}
    )
    rows = {r.topic_filter: (r.qos, r.reaches) for r in check.subscriptions(cfg, ROUTES)}
    assert rows == {
        "sensors/+/temperature": (1, ("on_message", "temperature (sensors/{device}/temperature)")),
        "commands/#": (1, ("on_message [qos 0]", "command")),
        "other": (0, ("on_message",)),
        "logs/#": (0, ("logs",)),
    }


@pytest.mark.unit
def test_check_lists_routes_from_routes_of(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(logs, "setup", lambda *a, **k: None)  # keep pytest's own log handlers
    seen = []
    monkeypatch.setattr(routes, "routes_of", lambda app: seen.append(app) or ROUTES)
    path = tmp_path / "c.toml"
    path.write_text('[mqtt.topics]\n"sensors/+/temperature" = { qos = 1 }\n')
    assert cli.main(["check", "tests/apps.py:Recorder", "-c", str(path)]) == 0
    out = capsys.readouterr().out
    assert [app.__name__ for app in seen] == ["Recorder"]
    table = out.split("subscriptions (3):\n")[1].split("\n\n")[0]
    assert [line.split(None, 2) for line in table.splitlines()] == [
        ["FILTER", "QOS", "REACHES"],
        ["sensors/+/temperature", "1", "on_message, temperature (sensors/{device}/temperature)"],
        ["logs/#", "0", "logs"],
        ["commands/#", "1", "command"],
    ]


@pytest.mark.unit
def test_a_bad_route_stops_check_with_its_code(monkeypatch, capsys):
    class BadRoute(AppError):
        exit_code = 2

    def routes_of(app):
        raise BadRoute("Recorder.temperature: route 'a/#/b': '#' must be the last level")

    monkeypatch.setattr(logs, "setup", lambda *a, **k: None)
    monkeypatch.setattr(routes, "routes_of", routes_of)
    assert cli.main(["check", "tests/apps.py:Recorder", "-c", "/dev/null"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == "procmqtt: error: Recorder.temperature: route 'a/#/b': '#' must be the last level\n"


@pytest.mark.unit
def test_no_subscriptions_is_said_plainly():
    assert "none" in check.render_subscriptions([])


@pytest.mark.parametrize(
    "value, text",
    [
        ('a"b\\c\n', '"a\\"b\\\\c\\n"'),
        (True, "true"),
        (3, "3"),
        (2.5, "2.5"),
        ([1, "x"], '[1, "x"]'),
        ({}, "{}"),
        ({"a b": 1}, '{ "a b" = 1 }'),
        (config.Secret("pw"), '"********"'),
    ],
)
@pytest.mark.unit
def test_values_render_as_toml(value, text):
    assert check._toml(value) == text
    assert tomllib.loads(f"v = {text}")["v"] == (value if not isinstance(value, config.Secret) else "********")


@pytest.mark.unit
def test_app_secrets_are_masked_at_any_depth():
    cfg = config.from_mapping(
        {"app": {"secrets": {"db": "p1", "list": ["p2"]}, "clientSecret": "p3", "password_hint": 4, "plain": "visible"}}
    )
    text = check.render_config(cfg)
    assert not [p for p in ("p1", "p2", "p3", "= 4") if p in text] and '"visible"' in text
    assert tomllib.loads(text)["app"]["secrets"] == {"db": "********", "list": ["********"]}


def test_check_prints_broker_feature_tables_and_the_shared_filters(tmp_path: Path):
    path = tmp_path / "features.toml"
    path.write_text(
        '[mqtt]\npassword = "pw-hunter2"\nusername = "svc"\nshare_group = "g"\n'
        '[mqtt.tls]\ninsecure = true\n[mqtt.will]\ntopic = "presence/x"\npayload = "offline"\n'
        '[mqtt.topics]\n"a/#" = { qos = 1 }\n'
    )
    result = run_cli("check", "tests/apps.py:Recorder", "-c", str(path))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "hunter2" not in out and 'password = "********"' in out
    assert "$share/g/a/#" in out.split("# effective configuration")[0]  # what the broker is asked for
    printed = tomllib.loads(out.split("# effective configuration")[1].split("\n", 1)[1])
    assert printed["mqtt"]["tls"]["insecure"] is True and printed["mqtt"]["port"] == 8883
    assert printed["mqtt"]["will"] == {"topic": "presence/x", "payload": "offline", "qos": 0, "retain": False}


@pytest.mark.timeout(10)
@pytest.mark.parametrize("protocol, window", [("3.1.1", 1000), ("5", 20)])
@pytest.mark.unit
def test_the_max_inflight_in_effect_is_printed_not_left_unset(protocol, window):
    text = check.render_config(config.from_mapping({"mqtt": {"protocol": protocol}}))
    assert f"max_inflight = {window}  # default for MQTT {protocol}" in text
    assert tomllib.loads(text)["mqtt"]["max_inflight"] == window
    text = check.render_config(config.from_mapping({"mqtt": {"protocol": protocol, "max_inflight": 7}}))
    assert tomllib.loads(text)["mqtt"]["max_inflight"] == 7


@pytest.mark.unit
@pytest.mark.parametrize("middleware", [[], ["procmqtt:SlowLog"]])
def test_the_printed_configuration_loads_back_as_the_same(middleware: list[str]) -> None:
    """An empty ``[workers] middleware`` list once printed as a ``[workers.middleware]`` table (the
    subscriptions' form), which loads back as an error."""
    cfg = config.from_mapping({"workers": {"middleware": middleware}, "mqtt": {"topics": {"a/#": {"qos": 1}}}})
    printed = tomllib.loads(check.render_config(cfg))
    assert printed["workers"]["middleware"] == middleware
    back = config.from_mapping(printed)
    assert back.workers == cfg.workers and back.mqtt.topics == cfg.mqtt.topics
