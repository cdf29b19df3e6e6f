"""Settings from the environment and settings.conf."""

from __future__ import annotations

import pytest

from fedmount.arvados.settings import Settings, SettingsError

TOKEN = "v2/zzzzz-gj3su-000000000000001/" + "s3cr3t" * 8


def test_environment_only(tmp_path):
    env = {"ARVADOS_API_HOST": "api.zzzzz.example:8443", "ARVADOS_API_TOKEN": TOKEN}
    s = Settings.from_environment(env, settings_file=str(tmp_path / "none.conf"))
    assert s.api_host == "api.zzzzz.example:8443" and s.token.text == TOKEN
    assert s.insecure is False and s.ca_file is None


def test_a_v1_token_is_accepted(tmp_path):
    secret = "3kg6k6lzmp9kj5cpkcoxie963cmvjahbt2fod9zru30k1jqdmi"
    env = {"ARVADOS_API_HOST": "api.zzzzz.example", "ARVADOS_API_TOKEN": secret}
    s = Settings.from_environment(env, settings_file=str(tmp_path / "none.conf"))
    assert s.token.is_v1 and s.token.text == secret


def test_settings_file_and_environment_wins(tmp_path):
    conf = tmp_path / "settings.conf"
    conf.write_text(
        "# comment\n\nARVADOS_API_HOST=file.example\n"
        f"ARVADOS_API_TOKEN = {TOKEN}\nARVADOS_API_HOST_INSECURE=yes\n"
    )
    s = Settings.from_environment({}, settings_file=str(conf))
    assert (s.api_host, s.token.text, s.insecure) == ("file.example", TOKEN, True)
    s = Settings.from_environment(
        {"ARVADOS_API_HOST": "env.example", "ARVADOS_API_HOST_INSECURE": "0"}, str(conf)
    )
    assert (s.api_host, s.insecure) == ("env.example", False)


def test_xdg_config_home(tmp_path):
    (tmp_path / "arvados").mkdir()
    (tmp_path / "arvados" / "settings.conf").write_text(
        f"ARVADOS_API_HOST=x.example\nARVADOS_API_TOKEN={TOKEN}\n"
    )
    assert Settings.from_environment({"XDG_CONFIG_HOME": str(tmp_path)}).api_host == "x.example"


@pytest.mark.parametrize(
    "value, expected", [("1", True), ("true", True), ("T", True), ("", False), ("no", False)]
)
def test_insecure_flag(tmp_path, value, expected):
    env = {"ARVADOS_API_HOST": "h", "ARVADOS_API_TOKEN": TOKEN, "ARVADOS_API_HOST_INSECURE": value}
    assert Settings.from_environment(env, str(tmp_path / "x")).insecure is expected


def test_host_scheme_is_stripped(tmp_path):
    env = {"ARVADOS_API_HOST": "https://h.example:443/", "ARVADOS_API_TOKEN": TOKEN}
    assert Settings.from_environment(env, str(tmp_path / "x")).api_host == "h.example:443"


@pytest.mark.parametrize(
    "env, words",
    [
        ({}, "ARVADOS_API_HOST and ARVADOS_API_TOKEN not set"),
        ({"ARVADOS_API_HOST": "h"}, "ARVADOS_API_TOKEN not set"),
        ({"ARVADOS_API_TOKEN": TOKEN}, "ARVADOS_API_HOST not set"),
        (
            {"ARVADOS_API_HOST": "h", "ARVADOS_API_TOKEN": "nonsense"},
            "ARVADOS_API_TOKEN: not an Arvados token",
        ),
    ],
)
def test_missing_or_bad_settings_say_what_to_set(tmp_path, env, words):
    with pytest.raises(SettingsError) as info:
        Settings.from_environment(env, str(tmp_path / "settings.conf"))
    assert words in str(info.value) and "\n" not in str(info.value)
    assert "s3cr3t" not in str(info.value)


def test_ca_bundle_from_environment(tmp_path):
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    base = {"ARVADOS_API_HOST": "h", "ARVADOS_API_TOKEN": TOKEN}
    conf = str(tmp_path / "x")
    assert Settings.from_environment({**base, "REQUESTS_CA_BUNDLE": str(ca)}, conf).ca_file == str(ca)
    assert Settings.from_environment({**base, "SSL_CERT_FILE": str(ca)}, conf).ca_file == str(ca)
    with pytest.raises(SettingsError, match="does not exist"):
        Settings.from_environment({**base, "SSL_CERT_FILE": str(tmp_path / "nope.pem")}, conf)


def test_keep_services_override(tmp_path):
    base = {"ARVADOS_API_HOST": "h", "ARVADOS_API_TOKEN": TOKEN}
    conf = str(tmp_path / "x")
    env = {**base, "ARVADOS_KEEP_SERVICES": "http://10.0.0.1:25107 https://keep.example/"}
    assert Settings.from_environment(env, conf).keep_services == (
        "http://10.0.0.1:25107/",
        "https://keep.example/",
    )
    proxy = Settings.from_environment({**base, "ARVADOS_KEEP_PROXY": "https://p.example"}, conf)
    assert proxy.keep_services == ("https://p.example/",)
    assert Settings.from_environment(base, conf).keep_services == ()
    with pytest.raises(SettingsError, match="not an http"):
        Settings.from_environment({**base, "ARVADOS_KEEP_SERVICES": "keep.example:25107"}, conf)
