"""Configuration precedence: defaults < TOML < environment (PROCMQTT_<SECTION>_<KEY>) < command line."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from harness import ROOT

from procmqtt import config
from procmqtt.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

pytestmark = pytest.mark.timeout(30)

CLEAN_ENV = {k: v for k, v in os.environ.items() if not k.startswith("PROCMQTT_")}

# key: (TOML literal, environment text, the value the environment gives)
SAMPLES: dict[str, tuple[str, str, object]] = {
    "mqtt.host": ('"from-file"', "from-env", "from-env"),
    "mqtt.port": ("1884", "1885", 1885),
    "mqtt.client_id": ('"file-id"', "12345", "12345"),  # digits stay a string for a string key
    "mqtt.username": ('"file-user"', "env-user", "env-user"),
    "mqtt.keepalive": ("30", "45", 45),
    "mqtt.protocol": ('"3.1.1"', "5", "5"),
    "mqtt.clean_session": ("false", "true", True),
    "mqtt.session_expiry": ("10", "20", 20),
    "mqtt.publish_buffer": ("100", "200", 200),
    "mqtt.publish_timeout": ("5", "2.5", 2.5),
    "workers.count": ("2", "3", 3),
    "workers.dispatch": ('"random"', "round_robin", "round_robin"),
    "workers.prefetch": ("4", "8", 8),
    "workers.graceful_timeout": ("10", "0.5", 0.5),
    "workers.timeout": ("60", "0", 0),
    "workers.max_attempts": ("2", "5", 5),
    "workers.on_error": ('"ack"', "retry", "retry"),
    "workers.dead_letter_topic": ('"dead/file"', "dead/env", "dead/env"),
    "workers.max_messages": ("10", "20", 20),
    "workers.max_messages_jitter": ("1", "2", 2),
    "workers.max_memory_mb": ("100", "200", 200),
}


def variable(key: str) -> str:
    return "PROCMQTT_" + key.replace(".", "_").upper()


def value_of(cfg: config.Config, key: str) -> object:
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


def toml_file(tmp_path: Path, text: str) -> str:
    path = tmp_path / "p.toml"
    path.write_text(text)
    return str(path)


@pytest.mark.unit
def test_every_scalar_key_has_a_variable():
    expected = {variable(k) for k in SAMPLES} | {
        "PROCMQTT_MQTT_PASSWORD",
        "PROCMQTT_MQTT_PASSWORD_ENV",
        "PROCMQTT_MQTT_PASSWORD_FILE",
    }
    assert expected <= set(config.env_variables())
    assert "PROCMQTT_MQTT_TOPICS" not in config.env_variables()  # a table: TOML only
    assert not [v for v in config.env_variables() if v.startswith("PROCMQTT_APP_")]


@pytest.mark.unit
def test_a_key_added_to_the_schema_gets_a_variable(monkeypatch):
    """Another section ([metrics]) or key ([workers] concurrency) needs no code here."""
    monkeypatch.setitem(config._SECTIONS, "metrics", {"port": config._integer(1, 65535), "host": config._text})
    monkeypatch.setitem(config._WORKERS_KEYS, "concurrency", config._integer(1, 1000))
    values, origins = config.from_environ(
        {"PROCMQTT_METRICS_PORT": "9464", "PROCMQTT_METRICS_HOST": "0.0.0.0", "PROCMQTT_WORKERS_CONCURRENCY": "8"}
    )
    assert values == {"metrics": {"host": "0.0.0.0", "port": 9464}, "workers": {"concurrency": 8}}
    assert origins["metrics.port"] == "PROCMQTT_METRICS_PORT"
    with pytest.raises(ConfigError, match=r"^PROCMQTT_METRICS_PORT: expected an integer from 1 to 65535, got '0'$"):
        config.from_environ({"PROCMQTT_METRICS_PORT": "0"})


@pytest.mark.parametrize("key", list(SAMPLES))
@pytest.mark.unit
def test_precedence_key_by_key(tmp_path, key):
    section, name = key.split(".")
    file_text, env_text, env_value = SAMPLES[key]
    path = toml_file(tmp_path, f"[{section}]\n{name} = {file_text}\n")
    from_file = tomllib.loads(f"v = {file_text}")["v"]

    defaults = config.resolve(None, environ={})
    assert value_of(defaults, key) == value_of(config.Config(), key)
    assert key not in defaults.origins

    only_file = config.resolve(path, environ={})
    assert value_of(only_file, key) == from_file and only_file.origins[key] == path

    with_env = config.resolve(path, environ={variable(key): env_text})
    assert value_of(with_env, key) == env_value and with_env.origins[key] == variable(key)
    assert type(value_of(with_env, key)) is type(env_value)

    only_env = config.resolve(None, environ={variable(key): env_text})
    assert value_of(only_env, key) == env_value


@pytest.mark.unit
def test_command_line_wins_over_environment_and_file(tmp_path):
    path = toml_file(tmp_path, '[mqtt]\nhost = "file"\nport = 1884\nusername = "fu"\n[workers]\ncount = 2\n')
    env = {"PROCMQTT_WORKERS_COUNT": "3", "PROCMQTT_MQTT_HOST": "env", "PROCMQTT_MQTT_PORT": "1885"}
    cfg = config.resolve(path, environ=env)
    assert (cfg.workers.count, cfg.mqtt.host, cfg.mqtt.port, cfg.mqtt.username) == (3, "env", 1885, "fu")
    cfg = config.resolve(path, environ=env, workers=4, broker="mqtt://cli-user@cli:1886")
    assert (cfg.workers.count, cfg.mqtt.host, cfg.mqtt.port, cfg.mqtt.username) == (4, "cli", 1886, "cli-user")
    assert cfg.origins["workers.count"] == "--workers" and cfg.origins["mqtt.host"] == "--broker"


def test_command_line_precedence_through_the_real_command(tmp_path):
    """The same chain as ``run`` resolves it, read back from ``--print-config``."""
    path = toml_file(tmp_path, "[workers]\ncount = 2\nprefetch = 5\n")

    def printed(*args: str, env: dict[str, str]) -> dict:
        result = subprocess.run(
            [sys.executable, "-m", "procmqtt", "run", "tests/apps.py:Recorder", "-c", path, "--print-config", *args],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=20,
            env={**CLEAN_ENV, **env},
            check=False,
        )
        assert result.returncode == 0, result.stderr
        return tomllib.loads(result.stdout)

    assert printed(env={})["workers"]["count"] == 2
    assert printed(env={"PROCMQTT_WORKERS_COUNT": "3"})["workers"]["count"] == 3
    shown = printed("-w", "4", env={"PROCMQTT_WORKERS_COUNT": "3", "PROCMQTT_WORKERS_PREFETCH": "7"})
    assert shown["workers"]["count"] == 4 and shown["workers"]["prefetch"] == 7


@pytest.mark.unit
def test_password_from_environment_replaces_any_form_in_the_file(tmp_path, monkeypatch):
    path = toml_file(tmp_path, '[mqtt]\nusername = "u"\npassword_env = "SOME_UNSET_VARIABLE_X"\n')
    cfg = config.resolve(path, environ={"PROCMQTT_MQTT_PASSWORD": "env-secret"})
    assert cfg.mqtt.password == config.Secret("env-secret")
    assert cfg.origins["mqtt.password"] == "PROCMQTT_MQTT_PASSWORD"
    assert "env-secret" not in repr(cfg)
    path = toml_file(tmp_path, '[mqtt]\npassword = "file-secret"\n')
    assert config.resolve(path, environ={}).mqtt.password == config.Secret("file-secret")
    cfg = config.resolve(path, environ={"PROCMQTT_MQTT_PASSWORD_ENV": "MY_PW", "MY_PW": "indirect"})
    assert cfg.mqtt.password == config.Secret("indirect")
    assert cfg.origins["mqtt.password"] == "PROCMQTT_MQTT_PASSWORD_ENV (password_env)"


@pytest.mark.parametrize(
    "env, expected",
    [
        ({"PROCMQTT_WORKERS_COUNT": "x"}, "PROCMQTT_WORKERS_COUNT: expected an integer from 1 to 1024, got 'x'"),
        ({"PROCMQTT_WORKERS_COUNT": "0"}, "PROCMQTT_WORKERS_COUNT: expected an integer from 1 to 1024, got '0'"),
        ({"PROCMQTT_WORKERS_COUNT": "2.5"}, "PROCMQTT_WORKERS_COUNT: expected an integer from 1 to 1024, got '2.5'"),
        ({"PROCMQTT_MQTT_PORT": "70000"}, "PROCMQTT_MQTT_PORT: expected an integer from 1 to 65535, got '70000'"),
        ({"PROCMQTT_MQTT_CLEAN_SESSION": "yes"}, "PROCMQTT_MQTT_CLEAN_SESSION: expected true or false, got 'yes'"),
        (
            {"PROCMQTT_WORKERS_DISPATCH": "fastest"},
            'PROCMQTT_WORKERS_DISPATCH: expected one of "random", "round_robin"',
        ),
        (
            {"PROCMQTT_WORKERS_GRACEFUL_TIMEOUT": "-1"},
            "PROCMQTT_WORKERS_GRACEFUL_TIMEOUT: expected a number of seconds from 0 to 1000000",
        ),
        ({"PROCMQTT_WORKERS_DEAD_LETTER_TOPIC": "dead/#"}, "PROCMQTT_WORKERS_DEAD_LETTER_TOPIC: expected a topic name"),
        (
            {"PROCMQTT_MQTT_PASSWORD_ENV": "NOT_SET_ANYWHERE"},
            "PROCMQTT_MQTT_PASSWORD_ENV: environment variable NOT_SET_ANYWHERE is not set",
        ),
        (
            {"PROCMQTT_MQTT_PASSWORD": "a", "PROCMQTT_MQTT_PASSWORD_FILE": "/f"},
            "set only one of PROCMQTT_MQTT_PASSWORD, PROCMQTT_MQTT_PASSWORD_FILE",
        ),
    ],
)
@pytest.mark.unit
def test_bad_values_name_the_variable(env, expected):
    with pytest.raises(ConfigError) as info:
        config.resolve(None, environ=env)
    assert str(info.value).startswith(expected) and "\n" not in str(info.value)


@pytest.mark.unit
def test_publish_buffer_times_workers_is_not_capped():
    """It was, at paho's 16-bit message ids; the agent queues what paho cannot number (outbox.py)."""
    cfg = config.resolve(None, environ={"PROCMQTT_MQTT_PUBLISH_BUFFER": "30000", "PROCMQTT_WORKERS_COUNT": "300"})
    assert (cfg.mqtt.publish_buffer, cfg.workers.count) == (30000, 300)


@pytest.mark.parametrize("text, value", [("true", True), ("1", True), ("FALSE", False), ("0", False)])
@pytest.mark.unit
def test_booleans(text, value):
    assert config.resolve(None, environ={"PROCMQTT_MQTT_CLEAN_SESSION": text}).mqtt.clean_session is value


@pytest.mark.parametrize(
    "name, message",
    [
        (
            "PROCMQTT_MQTT_HOTS",
            "PROCMQTT_MQTT_HOTS: not a procmqtt setting, ignored (did you mean PROCMQTT_MQTT_HOST?)",
        ),
        ("PROCMQTT_WORKERS_CUONT", "(did you mean PROCMQTT_WORKERS_COUNT?)"),
        ("PROCMQTT_MQTT_TOPICS", "PROCMQTT_MQTT_TOPICS: ignored; [mqtt.topics] is set in the configuration file only"),
        ("PROCMQTT_APP_ALERT_ABOVE", "PROCMQTT_APP_ALERT_ABOVE: ignored; [app] is set in the configuration file only"),
    ],
)
@pytest.mark.unit
def test_unknown_variables_warn_with_the_nearest_name(caplog, name, message):
    with caplog.at_level(logging.WARNING, logger="procmqtt.config"):
        cfg = config.resolve(None, environ={name: "s3cret-value"})
    assert cfg == config.Config()
    assert len(caplog.messages) == 1 and message in caplog.messages[0]
    assert "s3cret-value" not in caplog.text


@pytest.mark.unit
def test_other_variables_are_left_alone(caplog):
    env = {"PROCMQTT_LOG_FORMAT": "json", "PROCMQTT_SOMETHING_ELSE": "1", "MQTT_HOST": "x"}
    with caplog.at_level(logging.WARNING):
        assert config.resolve(None, environ=env) == config.Config()
    assert caplog.messages == []


@pytest.mark.unit
def test_config_file_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "procmqtt.toml").write_text("[workers]\ncount = 2\n")
    other = toml_file(tmp_path, "[workers]\ncount = 3\n")
    flag = str(tmp_path / "flag.toml")
    Path(flag).write_text("[workers]\ncount = 4\n")
    assert config.resolve(None, environ={}).workers.count == 2
    assert config.resolve(None, environ={"PROCMQTT_CONFIG": other}).workers.count == 3
    assert config.resolve(flag, environ={"PROCMQTT_CONFIG": other}).workers.count == 4  # -c wins
    with pytest.raises(ConfigError, match=r"^PROCMQTT_CONFIG: /nonexistent.toml: no such configuration file$"):
        config.resolve(None, environ={"PROCMQTT_CONFIG": "/nonexistent.toml"})


@pytest.mark.unit
def test_a_mistake_in_the_file_still_names_the_file(tmp_path):
    path = toml_file(tmp_path, "[workers]\ncount = 0\n")
    with pytest.raises(ConfigError, match=r"p.toml: \[workers\] count: expected an integer from 1 to 1024, got 0"):
        config.resolve(path, environ={"PROCMQTT_MQTT_HOST": "h"})
    # a file value the environment replaces is not checked: the environment wins
    assert config.resolve(path, environ={"PROCMQTT_WORKERS_COUNT": "2"}).workers.count == 2


def test_run_reports_a_bad_variable_like_a_bad_file():
    result = subprocess.run(
        [sys.executable, "-m", "procmqtt", "run", "tests/apps.py:Recorder"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=20,
        check=False,
        env={**CLEAN_ENV, "PROCMQTT_WORKERS_COUNT": "x", "PROCMQTT_MQTT_PASSWORD": "hunter2"},
    )
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "procmqtt: error: PROCMQTT_WORKERS_COUNT: expected an integer from 1 to 1024, got 'x'"
    ]
