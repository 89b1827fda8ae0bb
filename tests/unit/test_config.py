"""Settings: layering order, every problem reported at once, secrets never shown."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from config import ConfigError, Secret, load_settings
from config.loader import unknown_env_warnings


def test_defaults() -> None:
    s = load_settings(environ={})
    assert s.bind == "0.0.0.0:2470"
    assert s.plc_url == "https://plc.directory"
    assert s.allow_insecure_hosts is False
    assert s.replay_window_hours == 72.0
    assert s.effective_database_url() == "sqlite:///data/relay.sqlite"


def test_layers_defaults_file_env_cli(tmp_path: Path) -> None:
    cfg = tmp_path / "relay.toml"
    cfg.write_text('bind = "127.0.0.1:1000"\nplc_url = "http://file.example"\nlog_level = "debug"\n')
    env = {"SKYRELAY_PLC_URL": "http://env.example", "SKYRELAY_BIND": "127.0.0.1:2000", "DATABASE_URL": "sqlite:///x"}
    s = load_settings(config_file=cfg, environ=env, overrides={"bind": "127.0.0.1:3000"})
    assert s.log_level == "debug"  # file beats default
    assert s.plc_url == "http://env.example"  # env beats file
    assert s.bind == "127.0.0.1:3000"  # CLI beats env
    assert s.database_url == "sqlite:///x"


def test_types_are_converted() -> None:
    env = {
        "SKYRELAY_ALLOW_INSECURE_HOSTS": "yes",
        "SKYRELAY_MAX_FRAME_BYTES": "1_000",
        "SKYRELAY_CRAWL_HOSTS": "a.example, b.example,",
        "SKYRELAY_DATA_DIR": "/tmp/relay",
    }
    s = load_settings(environ=env)
    assert s.allow_insecure_hosts is True
    assert s.max_frame_bytes == 1000
    assert s.crawl_hosts == ("a.example", "b.example")
    assert s.data_dir == Path("/tmp/relay")


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    cfg = tmp_path / "relay.toml"
    cfg.write_text('bnid = "x"\n')
    env = {"SKYRELAY_MAX_FRAME_BYTES": "lots", "SKYRELAY_LOG_LEVEL": "loud", "DATABASE_URL": "mysql://x"}
    with pytest.raises(ConfigError) as info:
        load_settings(config_file=cfg, environ=env, overrides={"bind": "nope", "allow_insecure_hosts": "maybe"})
    text = str(info.value)
    assert len(info.value.problems) == 6, info.value.problems
    assert "did you mean 'bind'" in text
    assert "max_frame_bytes" in text and "log_level" in text and "database_url" in text
    assert "allow_insecure_hosts" in text


def test_unknown_env_variables_warn_with_a_hint() -> None:
    warnings = unknown_env_warnings({"SKYRELAY_BIDN": "x", "SKYRELAY_BIND": "y", "HOME": "/"})
    assert len(warnings) == 1
    assert "SKYRELAY_BIND" in warnings[0]


def test_secrets_never_show(tmp_path: Path) -> None:
    s = load_settings(
        environ={
            "SKYRELAY_ADMIN_PASSWORD": "hunter2-hunter2",
            "DATABASE_URL": "postgresql://relay:topsecret@db.example/relay",
        }
    )
    assert isinstance(s.admin_password, Secret)
    assert s.admin_password.reveal() == "hunter2-hunter2"
    assert "hunter2-hunter2" not in repr(s)
    public = s.public_dict()
    assert "hunter2-hunter2" not in str(public) and "topsecret" not in str(public)
    assert public["database_url"] == "postgresql://relay:****@db.example/relay"
    with pytest.raises(ConfigError) as info:
        load_settings(environ={"SKYRELAY_ADMIN_PASSWORD": "hunter2-hunter2", "SKYRELAY_BIND": "bad"})
    assert "hunter2-hunter2" not in str(info.value)


def test_cli_exits_2_on_invalid_config(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "web.cli", "config", "--bind", "nope", "--log-level", "loud"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert proc.returncode == 2
    assert "bind" in proc.stderr and "log_level" in proc.stderr


def test_cli_help_and_config_print(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "web.cli", "--help"], capture_output=True, text=True, timeout=60, check=True
    )
    assert "serve" in out.stdout
    shown = subprocess.run(
        [sys.executable, "-m", "web.cli", "config", "--bind", "127.0.0.1:9"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        cwd=tmp_path,
    )
    assert '"bind": "127.0.0.1:9"' in shown.stdout
