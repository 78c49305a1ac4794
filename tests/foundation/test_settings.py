"""Settings: env and TOML, validated at start, errors that name the variable."""

from __future__ import annotations

import subprocess
from pathlib import Path

import msgspec
import pytest

from hpcgate.settings import SettingsError, load_settings
from tests.support.procs import child_env, hpcgate_cmd


class Example(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    port: int = 8000
    ratio: float = 0.5
    names: tuple[str, ...] = ()
    database_url: str = "postgresql://x"


def test_defaults_when_nothing_is_set() -> None:
    assert load_settings(Example, "gateway", env={}) == Example()


def test_env_values_are_converted() -> None:
    env = {"HPCGATE_GATEWAY_PORT": "9001", "HPCGATE_GATEWAY_NAMES": "a, b", "HPCGATE_DATABASE_URL": "pg://y"}
    got = load_settings(Example, "gateway", env=env)
    assert got == Example(port=9001, names=("a", "b"), database_url="pg://y")


def test_list_accepts_json_array() -> None:
    got = load_settings(Example, "gateway", env={"HPCGATE_GATEWAY_NAMES": '["x,y", "z"]'})
    assert got.names == ("x,y", "z")


def test_malformed_value_names_the_variable() -> None:
    with pytest.raises(SettingsError, match=r"HPCGATE_GATEWAY_PORT.*int"):
        load_settings(Example, "gateway", env={"HPCGATE_GATEWAY_PORT": "abc"})


def test_unknown_variable_in_own_section_is_rejected() -> None:
    with pytest.raises(SettingsError, match="HPCGATE_GATEWAY_PROT"):
        load_settings(Example, "gateway", env={"HPCGATE_GATEWAY_PROT": "1"})


def test_unknown_section_is_rejected() -> None:
    with pytest.raises(SettingsError, match="HPCGATE_GATEWEY_PORT"):
        load_settings(Example, "gateway", env={"HPCGATE_GATEWEY_PORT": "1"})


def test_other_sections_are_ignored() -> None:
    assert load_settings(Example, "gateway", env={"HPCGATE_SIM_PORT": "abc"}) == Example()


def test_toml_file_then_env_then_overrides(tmp_path: Path) -> None:
    cfg = tmp_path / "hpcgate.toml"
    cfg.write_text('database_url = "pg://file"\n[gateway]\nport = 7000\nratio = 0.25\n[sim]\nport = 1\n')
    env = {"HPCGATE_CONFIG": str(cfg), "HPCGATE_GATEWAY_RATIO": "0.75"}
    got = load_settings(Example, "gateway", env=env, overrides={"names": ["o"], "port": None})
    assert got == Example(port=7000, ratio=0.75, names=("o",), database_url="pg://file")


def test_toml_errors_name_the_key(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[gateway]\nport = 'x'\n")
    with pytest.raises(SettingsError, match=r"\[gateway\] port"):
        load_settings(Example, "gateway", env={"HPCGATE_CONFIG": str(cfg)})
    cfg.write_text("[gateway]\nporrt = 1\n")
    with pytest.raises(SettingsError, match="porrt"):
        load_settings(Example, "gateway", env={"HPCGATE_CONFIG": str(cfg)})
    cfg.write_text("[gateway\n")
    with pytest.raises(SettingsError, match="not valid TOML"):
        load_settings(Example, "gateway", env={"HPCGATE_CONFIG": str(cfg)})


def test_missing_config_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="cannot read"):
        load_settings(Example, "gateway", env={"HPCGATE_CONFIG": str(tmp_path / "nope.toml")})


@pytest.mark.parametrize(
    ("command", "variable"),
    [(["gateway"], "HPCGATE_GATEWAY_PORT"), (["db", "version"], "HPCGATE_DATABASE_URL")],
)
def test_bad_setting_stops_the_process_with_exit_2(command: list[str], variable: str) -> None:
    value = "abc" if variable.endswith("PORT") else "42"
    proc = subprocess.run(
        hpcgate_cmd(*command), env=child_env(**{variable: value}), capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert variable in lines[0]
