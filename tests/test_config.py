"""Configuration loading: defaults, overrides, and a one-line error for every mistake."""

from __future__ import annotations

import subprocess
from pathlib import Path

import certs
import pytest

from procmqtt import config
from procmqtt.config import loader
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


@pytest.mark.unit
def test_full_file(tmp_path, monkeypatch):
    monkeypatch.setenv("MQ_PW", "s3cret")
    cfg = load_text(
        tmp_path,
        """
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
""",
    )
    assert cfg.mqtt.host == "broker.example" and cfg.mqtt.port == 8883 and cfg.mqtt.protocol == "5"
    assert cfg.mqtt.password is not None and cfg.mqtt.password.value == "s3cret"
    assert [(s.topic_filter, s.qos) for s in cfg.mqtt.topics] == [
        ("sensors/+/temperature", 1),
        ("commands/#", 0),
        ("$share/g/jobs/#", 0),
    ]
    assert cfg.workers.count == 4 and cfg.workers.dispatch == "round_robin"
    assert cfg.app["anything"] == {"goes": [1, 2]}
    assert "s3cret" not in repr(cfg) and "s3cret" not in str(cfg.mqtt)


@pytest.mark.unit
def test_defaults_without_a_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = config.load(None)
    assert cfg.mqtt.host == config.DEFAULT_HOST and cfg.mqtt.port == config.DEFAULT_PORT
    assert cfg.workers.count == config.DEFAULT_WORKERS and cfg.mqtt.topics == ()


@pytest.mark.unit
def test_default_file_is_used_when_present(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "procmqtt.toml").write_text("[workers]\ncount = 3\n")
    assert config.load(None).workers.count == 3


@pytest.mark.unit
def test_password_file(tmp_path):
    (tmp_path / "pw").write_text("from-file\n")
    cfg = load_text(tmp_path, f'[mqtt]\nusername = "u"\npassword_file = "{tmp_path / "pw"}"\n')
    assert cfg.mqtt.password is not None and cfg.mqtt.password.value == "from-file"


@pytest.mark.parametrize(
    "text, expected",
    [
        ("[mqtt]\nhots = 'x'\n", "[mqtt] unknown key 'hots' (did you mean 'host'?)"),
        ("[mqt]\nhost = 'x'\n", "unknown key 'mqt' (did you mean 'mqtt'?)"),
        ("[workers]\ncuont = 2\n", "[workers] unknown key 'cuont' (did you mean 'count'?)"),
        ("[mqtt]\nport = 'x'\n", "[mqtt] port: expected an integer from 1 to 65535, got 'x'"),
        ("[mqtt]\nport = 70000\n", "[mqtt] port: expected an integer from 1 to 65535, got 70000"),
        ("[mqtt]\nprotocol = '4'\n", '[mqtt] protocol: expected one of "3.1.1", "5"'),
        ("[mqtt]\nclean_session = 1\n", "[mqtt] clean_session: expected true or false"),
        ("[mqtt.topics]\n'a/b' = { qos = 7 }\n", '[mqtt.topics] "a/b" qos: expected an integer from 0 to 2, got 7'),
        ("[mqtt.topics]\n'a/b' = { qso = 1 }\n", "unknown key 'qso' (did you mean 'qos'?)"),
        ("[mqtt.topics]\n'a/b' = 1\n", "expected a table like { qos = 1 }"),
        ("[mqtt.topics]\n'a/#/b' = {}\n", "'#' must be a whole level and the last one"),
        ("[mqtt.topics]\n'a/b+' = {}\n", "'+' must be a whole level"),
        ("[mqtt.topics]\n'$share/g' = {}\n", "$share/<group>/<filter>"),
        ("[workers]\ncount = -1\n", "[workers] count: expected an integer from 1 to 1024, got -1"),
        ("[workers]\ncount = true\n", "[workers] count: expected an integer"),
        ("[workers]\ndispatch = 'fastest'\n", '[workers] dispatch: expected one of "random", "round_robin"'),
        (
            "[workers]\ngraceful_timeout = -2\n",
            "[workers] graceful_timeout: expected a number of seconds from 0 to 1000000, got -2",
        ),
        ("[workers]\nretry_delay = nan\n", "[workers] retry_delay: expected a number of seconds from 0 to 1000000"),
        ("[workers]\nretry_max_delay = inf\n", "[workers] retry_max_delay: expected a number of seconds from 0"),
        ("[workers]\nretry_backoff = 0.5\n", "[workers] retry_backoff: expected a number from 1 to 1000, got 0.5"),
        ("[workers]\nretry_backoff = nan\n", "[workers] retry_backoff: expected a number from 1 to 1000"),
        (
            "[workers]\nretry_delay = 5\nretry_max_delay = 2\n",
            "[workers] retry_max_delay (2) must be at least retry_delay (5)",
        ),
        ("mqtt = 3\n", "[mqtt] must be a table"),
        ("[mqtt\n", "not valid TOML"),
        ("[mqtt]\npassword = 'a'\npassword_env = 'B'\n", "set only one of password, password_env, password_file"),
        (
            "[mqtt]\npassword_env = 'PROCMQTT_TEST_UNSET_VAR'\n",
            "environment variable PROCMQTT_TEST_UNSET_VAR is not set",
        ),
        ("[mqtt]\npassword_file = '/nonexistent/pw'\n", "password_file: cannot read /nonexistent/pw"),
    ],
)
@pytest.mark.unit
def test_mistakes_name_file_key_and_expectation(tmp_path, text, expected):
    assert expected in error_of(tmp_path, text)


@pytest.mark.unit
def test_missing_file():
    with pytest.raises(ConfigError, match=r"^/nonexistent/procmqtt.toml: no such configuration file$"):
        config.load("/nonexistent/procmqtt.toml")


@pytest.mark.unit
def test_password_never_in_errors(tmp_path):
    message = error_of(tmp_path, "[mqtt]\npassword = 'hunter2'\nport = 0\n")
    assert "hunter2" not in message


@pytest.mark.parametrize(
    "url, host, port, user",
    [
        ("mqtt://broker:1884", "broker", 1884, None),
        ("mqtt://svc@10.0.0.1", "10.0.0.1", 1883, "svc"),
        ("tcp://[::1]:1999", "::1", 1999, None),
        ("mqtts://broker", "broker", 8883, None),
        ("wss://svc@broker/ws", "broker", 443, "svc"),
    ],
)
@pytest.mark.unit
def test_broker_override(url, host, port, user):
    cfg = config.with_overrides(config.Config(), broker=url, workers=3)
    assert (cfg.mqtt.host, cfg.mqtt.port, cfg.mqtt.username, cfg.workers.count) == (host, port, user, 3)


@pytest.mark.parametrize(
    "url, expected",
    [
        ("mqtt://u:hunter2@host", "do not put a password in the URL"),
        ("http://host", "expected mqtt://, mqtts://, ws:// or wss:// followed by [user@]host[:port]"),
        ("mqtt://host:notaport", "expected mqtt://, mqtts://, ws:// or wss:// followed by [user@]host[:port]"),
        ("host:1883", "expected mqtt://, mqtts://, ws:// or wss:// followed by [user@]host[:port]"),
    ],
)
@pytest.mark.unit
def test_bad_broker_url(url, expected):
    with pytest.raises(ConfigError) as info:
        config.with_overrides(config.Config(), broker=url)
    assert expected in str(info.value) and "hunter2" not in str(info.value)


@pytest.mark.unit
def test_bad_worker_count_flag():
    with pytest.raises(ConfigError, match="--workers: expected an integer from 1 to 1024, got 0"):
        config.with_overrides(config.Config(), workers=0)


@pytest.mark.unit
def test_default_client_id_is_stable_and_app_specific():
    assert config.default_client_id("a:B") == config.default_client_id("a:B")
    assert config.default_client_id("a:B") != config.default_client_id("a:C")


@pytest.mark.unit
def test_dispatchers():
    from procmqtt.agent.dispatch import RandomDispatcher, RoundRobinDispatcher

    rr = RoundRobinDispatcher()
    assert [rr.choose([0, 1, 2]) for _ in range(5)] == [0, 1, 2, 0, 1]
    assert rr.choose([0, 2]) == 2 and rr.choose([0, 2]) == 0
    rnd = RandomDispatcher()
    assert {rnd.choose([3, 5]) for _ in range(200)} == {3, 5}


@pytest.mark.unit
def test_least_busy_dispatcher():
    from procmqtt.agent.dispatch import LeastBusyDispatcher

    load = {0: 2, 1: 0, 2: 1, 3: 0}
    lb = LeastBusyDispatcher()
    lb.attach(load.__getitem__)
    assert {lb.choose([0, 1, 2, 3]) for _ in range(200)} == {1, 3}  # the idle two, ties at random
    assert lb.choose([0, 2]) == 2 and lb.choose([0]) == 0


@pytest.mark.unit
def test_workers_are_not_capped_by_the_publish_buffer():
    """-w 64 (and up to 1,024) with the default publish_buffer: the agent queues past paho's ids."""
    assert config.with_overrides(config.from_mapping({}, "f.toml"), workers=64).workers.count == 64
    cfg = config.from_mapping({"mqtt": {"publish_buffer": 20_000}}, "f.toml")
    assert config.with_overrides(cfg, workers=1024).workers.count == 1024
    with pytest.raises(ConfigError, match=r"^--workers: expected"):
        config.with_overrides(cfg, workers=1025)


@pytest.mark.parametrize(
    "url, tls, transport, ws_path",
    [
        ("mqtt://b", False, "tcp", "/mqtt"),
        ("mqtts://b", True, "tcp", "/mqtt"),
        ("ws://b:9001", False, "websockets", "/mqtt"),
        ("wss://b/custom", True, "websockets", "/custom"),
    ],
)
@pytest.mark.unit
def test_broker_url_scheme_sets_tls_and_transport(url, tls, transport, ws_path):
    m = config.with_overrides(config.Config(), broker=url).mqtt
    assert (m.tls is not None, m.transport, m.ws_path) == (tls, transport, ws_path)


@pytest.fixture(scope="module")
def certificates(tmp_path_factory):
    return certs.make(tmp_path_factory.mktemp("certs"))


@pytest.mark.unit
def test_tls_will_birth_and_share_group_tables(certificates):
    ca = certificates.ca
    cfg = config.from_mapping(
        {
            "mqtt": {
                "share_group": "orders",
                "tls": {"ca_certs": str(ca)},
                "will": {"topic": "p/app", "payload": "offline", "qos": 1, "retain": True},
                "birth": {"topic": "p/app", "payload": "online"},
            }
        }
    )
    m = cfg.mqtt
    assert m.port == 8883 and m.tls.ca_certs == str(ca) and not m.tls.insecure
    assert (m.will.topic, m.will.payload, m.will.qos, m.will.retain) == ("p/app", "offline", 1, True)
    assert (m.birth.qos, m.birth.retain) == (0, False)
    assert m.wire_filter("a/#") == "$share/orders/a/#"
    assert m.wire_filter("$share/other/a") == "$share/other/a"


@pytest.mark.parametrize(
    "toml, expected",
    [
        ("[mqtt]\nshare_group = 'a/b'\n", "[mqtt] share_group: expected a non-empty name without '/', '+' or '#'"),
        ("[mqtt.will]\npayload = 'x'\n", "[mqtt.will] topic: required"),
        ("[mqtt.birth]\ntopic = 'a/+'\n", "[mqtt.birth] topic: expected a topic name to publish to"),
        ("[mqtt.tls]\nkeyfile = '/etc/hostname'\n", "[mqtt.tls] keyfile needs certfile"),
        ("[mqtt.tls]\ninsecure = 'yes'\n", "[mqtt.tls] insecure: expected true or false"),
        ("[mqtt.tls]\ncafile = 'x'\n", "[mqtt.tls] unknown key 'cafile'"),
        ("[mqtt]\ntransport = 'udp'\n", '[mqtt] transport: expected one of "tcp", "websockets"'),
    ],
)
@pytest.mark.unit
def test_broker_feature_mistakes(tmp_path, toml, expected):
    assert expected in error_of(tmp_path, toml)


@pytest.mark.timeout(10)
@pytest.mark.unit
def test_max_inflight_defaults_by_protocol_and_paho_leaves_it_to_the_agent():
    from procmqtt.agent.connection import make_client

    assert config.from_mapping({"mqtt": {}}).mqtt.inflight() == 1000
    assert config.from_mapping({"mqtt": {"protocol": "5"}}).mqtt.inflight() == 20
    mqtt = config.from_mapping({"mqtt": {"protocol": "5", "max_inflight": 7}}).mqtt
    assert mqtt.inflight() == 7
    assert make_client(mqtt, "c", 16).max_inflight_messages == 0  # applied by the agent: test_publish_limits.py
    with pytest.raises(ConfigError, match=r"\[mqtt\] max_inflight: expected an integer from 1 to 65535, got 0"):
        config.from_mapping({"mqtt": {"max_inflight": 0}})


# --- what used to escape as a traceback or an agent crash loop (issue 11, point 16) ----------------


@pytest.mark.unit
def test_binary_file_is_one_line_error(tmp_path):
    (tmp_path / "p.toml").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe")
    with pytest.raises(ConfigError) as info:
        config.load(str(tmp_path / "p.toml"))
    assert str(info.value) == f"{tmp_path / 'p.toml'}: not a TOML file: byte 0 is not UTF-8 text"


@pytest.mark.unit
def test_deeply_nested_toml_is_one_line_error(tmp_path):
    assert "nested too deeply" in error_of(tmp_path, "a = " + "[" * 100_000)


@pytest.mark.unit
def test_huge_file_is_refused_without_reading_it_all(tmp_path, monkeypatch):
    monkeypatch.setattr(loader, "MAX_FILE_BYTES", 100)  # where _read finds it
    assert error_of(tmp_path, "# " + "x" * 200 + "\n").endswith("not a configuration file: larger than 0 MiB")
    with pytest.raises(ConfigError, match="larger than"):
        config.load("/dev/zero")


@pytest.mark.parametrize("key", ["publish_timeout", "connect_timeout", "graceful_timeout", "timeout"])
@pytest.mark.parametrize("value", ["inf", "-inf", "nan", "1e300", "1e10"])
@pytest.mark.unit
def test_durations_must_be_finite_and_bounded(tmp_path, key, value):
    section = "mqtt" if key in ("publish_timeout", "connect_timeout") else "workers"
    message = error_of(tmp_path, f"[{section}]\n{key} = {value}\n")
    assert f"[{section}] {key}: expected a number of seconds from " in message and "to 1000000" in message


@pytest.mark.unit
def test_durations_at_the_bound_are_accepted(tmp_path):
    cfg = load_text(tmp_path, "[mqtt]\nconnect_timeout = 1000000\n[workers]\ntimeout = 0\n")
    assert cfg.mqtt.connect_timeout == 1_000_000 and cfg.workers.timeout == 0


@pytest.mark.parametrize(
    "key, value, expected",
    [
        ("client_id", "a" * 65_536, "[mqtt] client_id: expected at most 65,535 UTF-8 bytes (the MQTT limit)"),
        ("client_id", "é" * 40_000, "[mqtt] client_id: expected at most 65,535 UTF-8 bytes"),  # 80,000 bytes
        ("username", "u" * 70_000, "[mqtt] username: expected at most 65,535 UTF-8 bytes"),
        ("client_id", "a\x00b", "[mqtt] client_id: expected a string without NUL characters"),
        ("client_id", "a\udcffb", "[mqtt] client_id: expected valid UTF-8 text"),  # from the environment
        ("host", "h\x00", "[mqtt] host: expected a string without NUL characters"),
    ],
)
@pytest.mark.unit
def test_strings_that_go_on_the_wire_are_checked(key, value, expected):
    with pytest.raises(ConfigError) as info:
        config.from_mapping({"mqtt": {key: value}}, "f.toml")
    assert str(info.value).startswith(f"f.toml: {expected}") and len(str(info.value)) < 300


@pytest.mark.unit
def test_client_id_of_exactly_65535_bytes_is_accepted():
    assert len(config.from_mapping({"mqtt": {"client_id": "é" * 32_767 + "a"}}).mqtt.client_id) == 32_768


@pytest.mark.parametrize(
    "table, expected",
    [
        (
            {"will": {"topic": "t" * 65_536}},
            "[mqtt.will] topic: expected a topic name to publish to (a topic must be at most",
        ),
        ({"will": {"topic": "w", "payload": "p" * 65_536}}, "[mqtt.will] payload: expected at most 65,535 UTF-8 bytes"),
        ({"birth": {"topic": "b" * 65_536}}, "[mqtt.birth] topic: expected a topic name to publish to"),
        ({"birth": {"topic": "b\udcff"}}, "[mqtt.birth] topic: expected a topic name to publish to (valid UTF-8 text"),
        (
            {"share_group": "g" * 65_530, "topics": {"a/b": {}}},
            '[mqtt.topics] "a/b": expected a valid MQTT topic filter (a topic filter must be at most 65535 bytes)',
        ),
        ({"topics": {"a\udcff": {}}}, '[mqtt.topics] "a\udcff": expected a valid MQTT topic filter (valid UTF-8 text'),
        (
            {"topics": {"x" * 70_000: {}}},
            (
                f'[mqtt.topics] "{"x" * 57}...": expected a valid MQTT topic filter (a topic '
                "filter must be at most 65535 bytes)"
            ),
        ),
    ],
)
@pytest.mark.unit
def test_will_birth_and_filters_fit_the_wire(table, expected):
    with pytest.raises(ConfigError) as info:
        config.from_mapping({"mqtt": table}, "f.toml")
    assert str(info.value).startswith(f"f.toml: {expected}")


@pytest.mark.unit
def test_birth_payload_is_a_publish_not_a_connect_field():
    birth = config.from_mapping({"mqtt": {"birth": {"topic": "b", "payload": "x" * 100_000}}}).mqtt.birth
    assert birth is not None and len(birth.payload) == 100_000


@pytest.mark.parametrize(
    "value", [73217321, 7321.7321, True, ["hunter2"], {"x": "hunter2"}, "hunter2" * 10_000, "hunter2\udcff"]
)
@pytest.mark.unit
def test_password_of_any_wrong_kind_is_never_shown(value):
    with pytest.raises(ConfigError) as info:
        config.from_mapping({"mqtt": {"username": "u", "password": value}}, "f.toml")
    message = str(info.value)
    assert message.startswith("f.toml: [mqtt] password: expected ") and "(value not shown)" in message
    assert "hunter2" not in message and "7321" not in message and "True" not in message


@pytest.mark.unit
def test_password_from_a_file_or_variable_is_checked_and_not_shown(tmp_path):
    (tmp_path / "pw").write_text("hunter2" * 10_000)
    with pytest.raises(ConfigError) as info:
        config.from_mapping({"mqtt": {"password_file": str(tmp_path / "pw")}}, "f.toml")
    expected = f"f.toml: [mqtt] password_file: {tmp_path / 'pw'}: expected a password of at most"
    assert str(info.value).startswith(expected)
    assert "hunter2" not in str(info.value)
    with pytest.raises(ConfigError) as info:
        config.from_mapping({"mqtt": {"password_env": "PW"}}, "f.toml", environ={"PW": "hunter2\udcff"})
    assert "[mqtt] password_env: environment variable PW: expected a password of valid UTF-8" in str(info.value)
    assert "hunter2" not in str(info.value)


@pytest.mark.unit
def test_environment_values_are_checked_for_the_wire():
    with pytest.raises(ConfigError) as info:
        config.resolve("/dev/null", environ={"PROCMQTT_MQTT_CLIENT_ID": "x" * 70_000})
    assert str(info.value).startswith("PROCMQTT_MQTT_CLIENT_ID: expected at most 65,535 UTF-8 bytes")
    with pytest.raises(ConfigError) as info:
        config.resolve("/dev/null", environ={"PROCMQTT_MQTT_PASSWORD": "hunter2\udcff"})
    assert "hunter2" not in str(info.value) and "PROCMQTT_MQTT_PASSWORD: expected" in str(info.value)


def _tls_error(tmp_path: Path, **tls: str) -> str:
    lines = "".join(f'{key} = "{value}"\n' for key, value in tls.items())
    return error_of(tmp_path, f"[mqtt.tls]\n{lines}")


@pytest.mark.unit
def test_tls_files_must_be_certificates(tmp_path, certificates):
    (tmp_path / "notes.txt").write_text("not a certificate\n")
    assert _tls_error(tmp_path, ca_certs=tmp_path / "notes.txt").endswith(
        f"[mqtt.tls] ca_certs: {tmp_path / 'notes.txt'}: expected PEM certificates of the CAs to trust "
        "(NO_CERTIFICATE_OR_CRL_FOUND)"
    )
    assert "[mqtt.tls] ca_certs: " in _tls_error(tmp_path, ca_certs=tmp_path)  # a directory
    assert _tls_error(tmp_path, certfile=certificates.client_cert).endswith(  # no key anywhere
        f"[mqtt.tls] certfile: {certificates.client_cert}: expected a PEM client certificate with its private key "
        "(there, or in keyfile) (no PEM certificate and key found)"
    )
    assert "(KEY_VALUES_MISMATCH)" in _tls_error(
        tmp_path, certfile=certificates.client_cert, keyfile=certificates.server_key
    )
    cfg = load_text(
        tmp_path,
        f'[mqtt.tls]\nca_certs = "{certificates.ca}"\ncertfile = "{certificates.client_cert}"\n'
        f'keyfile = "{certificates.client_key}"\n',
    )
    assert cfg.mqtt.tls is not None and cfg.mqtt.tls.keyfile == str(certificates.client_key)


def test_encrypted_tls_key_is_refused_without_a_prompt(tmp_path, certificates):
    encrypted = tmp_path / "client-enc.key"
    subprocess.run(
        [
            "openssl",
            "pkey",
            "-in",
            str(certificates.client_key),
            "-aes256",
            "-passout",
            "pass:x",
            "-out",
            str(encrypted),
        ],
        check=True,
        capture_output=True,
        timeout=20,
    )
    message = _tls_error(tmp_path, certfile=certificates.client_cert, keyfile=encrypted)
    assert message.endswith(
        f"[mqtt.tls] keyfile: {encrypted}: the private key is encrypted; procmqtt needs it "
        "unencrypted (readable by its user only)"
    )


@pytest.mark.unit
def test_a_newline_or_escape_sequence_in_what_the_user_gave_stays_escaped(tmp_path):
    message = error_of(tmp_path, '[mqtt]\n"ho\\nst\\u001b[31m" = 1\n')  # error_of: one line
    assert "unknown key 'ho\\nst\\x1b[31m'" in message
    with pytest.raises(ConfigError) as info:
        config.resolve("/dev/null", environ={"PROCMQTT_MQTT_PASSWORD_ENV": "A\nB"})
    assert str(info.value) == "PROCMQTT_MQTT_PASSWORD_ENV: environment variable A\\nB is not set"
