"""Configuration loading: defaults, overrides, and a one-line error for every mistake."""

from __future__ import annotations

from pathlib import Path

import pytest

from procmqtt import config
from procmqtt.errors import ConfigError

pytestmark = pytest.mark.timeout(10)


def load_text(tmp_path: Path, text: str) -> config.Config:
    path = tmp_path / "p.toml"
    path.write_text(text)
    return config.load(str(path))


def error_of(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as info:
        load_text(tmp_path, text)
    message = str(info.value)
    assert "\n" not in message and message.startswith(str(tmp_path / "p.toml"))
    return message


def test_full_file(tmp_path, monkeypatch):
    monkeypatch.setenv("MQ_PW", "s3cret")
    cfg = load_text(tmp_path, """
[mqtt]
host = "broker.example"
port = 8883
client_id = "orders"
username = "svc"
password_env = "MQ_PW"
keepalive = 30
protocol = "5"
[mqtt.topics]
"sensors/+/temperature" = { qos = 1 }
"commands/#" = { qos = 0 }
"$share/g/jobs/#" = {}
[workers]
count = 4
dispatch = "round_robin"
[app]
anything = { goes = [1, 2] }
""")
    assert cfg.mqtt.host == "broker.example" and cfg.mqtt.port == 8883 and cfg.mqtt.protocol == "5"
    assert cfg.mqtt.password is not None and cfg.mqtt.password.value == "s3cret"
    assert [(s.topic_filter, s.qos) for s in cfg.mqtt.topics] == [
        ("sensors/+/temperature", 1), ("commands/#", 0), ("$share/g/jobs/#", 0)]
    assert cfg.workers.count == 4 and cfg.workers.dispatch == "round_robin"
    assert cfg.app["anything"] == {"goes": [1, 2]}
    assert "s3cret" not in repr(cfg) and "s3cret" not in str(cfg.mqtt)


def test_defaults_without_a_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = config.load(None)
    assert cfg.mqtt.host == config.DEFAULT_HOST and cfg.mqtt.port == config.DEFAULT_PORT
    assert cfg.workers.count == config.DEFAULT_WORKERS and cfg.mqtt.topics == ()


def test_default_file_is_used_when_present(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "procmqtt.toml").write_text("[workers]\ncount = 3\n")
    assert config.load(None).workers.count == 3


def test_password_file(tmp_path):
    (tmp_path / "pw").write_text("from-file\n")
    cfg = load_text(tmp_path, f'[mqtt]\nusername = "u"\npassword_file = "{tmp_path / "pw"}"\n')
    assert cfg.mqtt.password is not None and cfg.mqtt.password.value == "from-file"


@pytest.mark.parametrize("text, expected", [
    ("[mqtt]\nhots = 'x'\n", "[mqtt] unknown key 'hots' (did you mean 'host'?)"),
    ("[mqt]\nhost = 'x'\n", "unknown key 'mqt' (did you mean 'mqtt'?)"),
    ("[workers]\ncuont = 2\n", "[workers] unknown key 'cuont' (did you mean 'count'?)"),
    ("[mqtt]\nport = 'x'\n", "[mqtt] port: expected an integer from 1 to 65535, got 'x'"),
    ("[mqtt]\nport = 70000\n", "[mqtt] port: expected an integer from 1 to 65535, got 70000"),
    ("[mqtt]\nprotocol = '4'\n", '[mqtt] protocol: expected one of "3.1.1", "5"'),
    ("[mqtt]\nclean_session = 1\n", "[mqtt] clean_session: expected true or false"),
    ("[mqtt.topics]\n'a/b' = { qos = 7 }\n", '[mqtt.topics] "a/b" qos: expected an integer from 0 to 2, got 7'),
    ("[mqtt.topics]\n'a/b' = { qso = 1 }\n", "unknown key 'qso' (did you mean 'qos'?)"),
    ("[mqtt.topics]\n'a/b' = 1\n", 'expected a table like { qos = 1 }'),
    ("[mqtt.topics]\n'a/#/b' = {}\n", "'#' must be a whole level and the last one"),
    ("[mqtt.topics]\n'a/b+' = {}\n", "'+' must be a whole level"),
    ("[mqtt.topics]\n'$share/g' = {}\n", "$share/<group>/<filter>"),
    ("[workers]\ncount = -1\n", "[workers] count: expected an integer from 1 to 1024, got -1"),
    ("[workers]\ncount = true\n", "[workers] count: expected an integer"),
    ("[workers]\ndispatch = 'fastest'\n", '[workers] dispatch: expected one of "random", "round_robin"'),
    ("[workers]\ngraceful_timeout = -2\n", "[workers] graceful_timeout: expected a number >= 0"),
    ("mqtt = 3\n", "[mqtt] must be a table"),
    ("[mqtt\n", "not valid TOML"),
    ("[mqtt]\npassword = 'a'\npassword_env = 'B'\n", "set only one of password, password_env, password_file"),
    ("[mqtt]\npassword_env = 'PROCMQTT_TEST_UNSET_VAR'\n", "environment variable PROCMQTT_TEST_UNSET_VAR is not set"),
    ("[mqtt]\npassword_file = '/nonexistent/pw'\n", "password_file: cannot read /nonexistent/pw"),
])
def test_mistakes_name_file_key_and_expectation(tmp_path, text, expected):
    assert expected in error_of(tmp_path, text)


def test_missing_file():
    with pytest.raises(ConfigError, match=r"^/nonexistent/procmqtt.toml: no such configuration file$"):
        config.load("/nonexistent/procmqtt.toml")


def test_password_never_in_errors(tmp_path):
    message = error_of(tmp_path, "[mqtt]\npassword = 'hunter2'\nport = 0\n")
    assert "hunter2" not in message


@pytest.mark.parametrize("url, host, port, user", [
    ("mqtt://broker:1884", "broker", 1884, None),
    ("mqtt://svc@10.0.0.1", "10.0.0.1", 1883, "svc"),
    ("tcp://[::1]:1999", "::1", 1999, None),
    ("mqtts://broker", "broker", 8883, None),
    ("wss://svc@broker/ws", "broker", 443, "svc"),
])
def test_broker_override(url, host, port, user):
    cfg = config.with_overrides(config.Config(), broker=url, workers=3)
    assert (cfg.mqtt.host, cfg.mqtt.port, cfg.mqtt.username, cfg.workers.count) == (host, port, user, 3)


@pytest.mark.parametrize("url, expected", [
    ("mqtt://u:hunter2@host", "do not put a password in the URL"),
    ("http://host", "expected mqtt://, mqtts://, ws:// or wss:// followed by [user@]host[:port]"),
    ("mqtt://host:notaport", "expected mqtt://, mqtts://, ws:// or wss:// followed by [user@]host[:port]"),
    ("host:1883", "expected mqtt://, mqtts://, ws:// or wss:// followed by [user@]host[:port]"),
])
def test_bad_broker_url(url, expected):
    with pytest.raises(ConfigError) as info:
        config.with_overrides(config.Config(), broker=url)
    assert expected in str(info.value) and "hunter2" not in str(info.value)


def test_bad_worker_count_flag():
    with pytest.raises(ConfigError, match="--workers: expected an integer from 1 to 1024, got 0"):
        config.with_overrides(config.Config(), workers=0)


def test_default_client_id_is_stable_and_app_specific():
    assert config.default_client_id("a:B") == config.default_client_id("a:B")
    assert config.default_client_id("a:B") != config.default_client_id("a:C")


def test_dispatchers():
    from procmqtt.dispatch import RandomDispatcher, RoundRobinDispatcher
    rr = RoundRobinDispatcher()
    assert [rr.choose([0, 1, 2]) for _ in range(5)] == [0, 1, 2, 0, 1]
    assert rr.choose([0, 2]) == 2 and rr.choose([0, 2]) == 0
    rnd = RandomDispatcher()
    assert {rnd.choose([3, 5]) for _ in range(200)} == {3, 5}


def test_workers_are_not_capped_by_the_publish_buffer():
    """-w 64 (and up to 1,024) with the default publish_buffer: the agent queues past paho's ids."""
    assert config.with_overrides(config.from_mapping({}, "f.toml"), workers=64).workers.count == 64
    cfg = config.from_mapping({"mqtt": {"publish_buffer": 20_000}}, "f.toml")
    assert config.with_overrides(cfg, workers=1024).workers.count == 1024
    with pytest.raises(ConfigError, match=r"^--workers: expected"):
        config.with_overrides(cfg, workers=1025)


@pytest.mark.parametrize("url, tls, transport, ws_path", [
    ("mqtt://b", False, "tcp", "/mqtt"),
    ("mqtts://b", True, "tcp", "/mqtt"),
    ("ws://b:9001", False, "websockets", "/mqtt"),
    ("wss://b/custom", True, "websockets", "/custom"),
])
def test_broker_url_scheme_sets_tls_and_transport(url, tls, transport, ws_path):
    m = config.with_overrides(config.Config(), broker=url).mqtt
    assert (m.tls is not None, m.transport, m.ws_path) == (tls, transport, ws_path)


def test_tls_will_birth_and_share_group_tables(tmp_path):
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    cfg = config.from_mapping({"mqtt": {
        "share_group": "orders", "tls": {"ca_certs": str(ca)},
        "will": {"topic": "p/app", "payload": "offline", "qos": 1, "retain": True},
        "birth": {"topic": "p/app", "payload": "online"}}})
    m = cfg.mqtt
    assert m.port == 8883 and m.tls.ca_certs == str(ca) and not m.tls.insecure
    assert (m.will.topic, m.will.payload, m.will.qos, m.will.retain) == ("p/app", "offline", 1, True)
    assert (m.birth.qos, m.birth.retain) == (0, False)
    assert m.wire_filter("a/#") == "$share/orders/a/#"
    assert m.wire_filter("$share/other/a") == "$share/other/a"


@pytest.mark.parametrize("toml, expected", [
    ("[mqtt]\nshare_group = 'a/b'\n", "[mqtt] share_group: expected a non-empty name without '/', '+' or '#'"),
    ("[mqtt.will]\npayload = 'x'\n", "[mqtt.will] topic: required"),
    ("[mqtt.birth]\ntopic = 'a/+'\n", "[mqtt.birth] topic: expected a topic name to publish to"),
    ("[mqtt.tls]\nkeyfile = '/etc/hostname'\n", "[mqtt.tls] keyfile needs certfile"),
    ("[mqtt.tls]\ninsecure = 'yes'\n", "[mqtt.tls] insecure: expected true or false"),
    ("[mqtt.tls]\ncafile = 'x'\n", "[mqtt.tls] unknown key 'cafile'"),
    ("[mqtt]\ntransport = 'udp'\n", "[mqtt] transport: expected one of \"tcp\", \"websockets\""),
])
def test_broker_feature_mistakes(tmp_path, toml, expected):
    assert expected in error_of(tmp_path, toml)


@pytest.mark.timeout(10)
def test_max_inflight_defaults_by_protocol_and_paho_leaves_it_to_the_agent():
    from procmqtt.connection import make_client
    assert config.from_mapping({"mqtt": {}}).mqtt.inflight() == 1000
    assert config.from_mapping({"mqtt": {"protocol": "5"}}).mqtt.inflight() == 20
    mqtt = config.from_mapping({"mqtt": {"protocol": "5", "max_inflight": 7}}).mqtt
    assert mqtt.inflight() == 7
    assert make_client(mqtt, "c", 16).max_inflight_messages == 0  # applied by the agent: test_publish_limits.py
    with pytest.raises(ConfigError, match=r"\[mqtt\] max_inflight: expected an integer from 1 to 65535, got 0"):
        config.from_mapping({"mqtt": {"max_inflight": 0}})
