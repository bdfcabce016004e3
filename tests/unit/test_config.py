"""Configuration: TOML + environment, validated once, errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from relay.config import MIN_REQUEST_BUDGET, ConfigError, load_config
from relay.tools.cli import main


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def test_defaults_without_file() -> None:
    config = load_config(environ={})
    assert config.gateway.port == 8000
    assert config.budget.default_request_budget == 500_000
    assert config.redis.effective_url == "redis://127.0.0.1:6379/0"


def test_repo_config_file_is_valid() -> None:
    config = load_config(Path(__file__).parents[2] / "config.toml", environ={})
    assert config.gateway.overflow_policy == "drop_oldest"
    assert config.budget.warning_threshold == 0.8


def test_file_then_environment_precedence(tmp_path: Path) -> None:
    path = write(tmp_path, '[gateway]\nport = 9000\nhost = "0.0.0.0"\n')
    config = load_config(path, environ={"RELAY_GATEWAY_PORT": "9100"})
    assert config.gateway.port == 9100
    assert config.gateway.host == "0.0.0.0"


def test_relay_config_variable_chooses_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[history]\nmax_events = 7\n")
    assert load_config(environ={"RELAY_CONFIG": str(path)}).history.max_events == 7


def test_env_key_with_underscores(tmp_path: Path) -> None:
    env = {"RELAY_GATEWAY_SEND_QUEUE_MAX": "12", "RELAY_REDIS_URL": "redis://h:1/2"}
    config = load_config(environ=env)
    assert config.gateway.send_queue_max == 12
    assert config.redis.url == "redis://h:1/2"


def test_bad_value_in_file_names_the_key(tmp_path: Path) -> None:
    path = write(tmp_path, '[gateway]\nport = "eighty"\n')
    with pytest.raises(ConfigError) as err:
        load_config(path, environ={})
    assert "gateway.port" in str(err.value)
    assert str(path) in str(err.value)


def test_bad_value_in_environment_names_the_variable() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(environ={"RELAY_GATEWAY_PORT": "abc"})
    assert "gateway.port" in str(err.value)
    assert "RELAY_GATEWAY_PORT" in str(err.value)


def test_unknown_key_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path, "[gateway]\nprot = 1\n")
    with pytest.raises(ConfigError, match=r"gateway\.prot: unknown key"):
        load_config(path, environ={})


def test_unknown_section_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="gatway: unknown key"):
        load_config(write(tmp_path, "[gatway]\nport = 1\n"), environ={})


def test_invalid_toml_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(write(tmp_path, "[gateway\n"), environ={})


def test_missing_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.toml", environ={})


def test_budget_floor_is_applied() -> None:
    config = load_config(environ={"RELAY_BUDGET_DEFAULT_REQUEST_BUDGET": "500"})
    assert config.budget.default_request_budget == MIN_REQUEST_BUDGET


@pytest.mark.parametrize(
    ("env", "key"),
    [
        ({"RELAY_GATEWAY_OVERFLOW_POLICY": "explode"}, "gateway.overflow_policy"),
        ({"RELAY_BUDGET_WARNING_THRESHOLD": "1.5"}, "budget.warning_threshold"),
        ({"RELAY_REDIS_URL": "http://x"}, "redis.url"),
        ({"RELAY_REDIS_TENANT": "a b"}, "redis.tenant"),
        ({"RELAY_GATEWAY_SEND_QUEUE_MAX": "0"}, "gateway.send_queue_max"),
    ],
)
def test_each_invalid_value_names_its_key(env: dict[str, str], key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(environ=env)


def test_cli_exits_2_and_names_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path, "[gateway]\nport = -1\n")
    assert main(["gateway", "--config", str(path)]) == 2
    assert "gateway.port" in capsys.readouterr().err
