"""Config files read onto an argparse parser: every error kind is one line naming file and key;
values go through the flags' own checks; the command line overrides the file."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from wgjit.config import ConfigFileError, read


class _Bad(Exception):
    pass


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise _Bad(f"--idle-timeout {text!r} is not a number of seconds") from None
    if value <= 0:
        raise _Bad(f"--idle-timeout {text} is not a positive number of seconds")
    return value


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    p.add_argument("--interface", "-i")
    p.add_argument("--idle-timeout", type=_seconds, default=300.0)
    p.add_argument("--queue-num", type=int, default=None)
    p.add_argument("--mode", choices=("auto", "hold"), default="auto")
    p.add_argument("--debug", action="store_true")
    p.add_argument("--config")
    return p


def _read(tmp_path: Path, text: str) -> dict[str, object]:
    path = tmp_path / "gateway.toml"
    path.write_text(text)
    return read(str(path), _parser()).values


def _error(tmp_path: Path, text: str | bytes) -> str:
    path = tmp_path / "gateway.toml"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    with pytest.raises(ConfigFileError) as e:
        read(str(path), _parser())
    message = str(e.value)
    assert "\n" not in message
    prefix = f"{path}: "
    assert message.startswith(prefix)
    return message[len(prefix) :]


def test_values_by_either_spelling(tmp_path: Path) -> None:
    values = _read(tmp_path, 'interface = "wg0"\nidle-timeout = 600\nqueue_num = 7\n'
                             'mode = "hold"\ndebug = true\n')  # fmt: skip
    assert values == {"interface": "wg0", "idle_timeout": 600.0, "queue_num": 7, "mode": "hold",
                      "debug": True}  # fmt: skip
    assert _read(tmp_path, "debug = false\nidle_timeout = 1.5\n") == {
        "debug": False, "idle_timeout": 1.5}  # fmt: skip


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("idel_timeout = 300\n", "idel_timeout: unknown setting (did you mean idle_timeout?)"),
        ("colour = 1\n", "colour: unknown setting"),
        ("config = 'other.toml'\n", "config: unknown setting"),
        ("help = true\n", "help: unknown setting"),
        ("idle_timeout = 'soon'\n", "idle_timeout: 'soon' is not a number of seconds"),
        ("idle_timeout = -1\n", "idle_timeout: -1 is not a positive number of seconds"),
        ("idle_timeout = true\n", "idle_timeout: expected a number or a string, not true/false"),
        ("idle_timeout = [1]\n", "idle_timeout: expected a number or a string, not an array"),
        ("idle_timeout = 1979-05-27\n",
         "idle_timeout: expected a number or a string, not a date or time"),
        ("queue_num = 1.5\n", "queue_num: invalid literal for int() with base 10: '1.5'"),
        ("interface = 5\n", "interface: expected a string, not a number"),
        ("[interface]\nname = 'wg0'\n", "interface: expected a string, not a table"),
        ("mode = 'fast'\n", "mode: 'fast' is not one of auto, hold"),
        ("debug = 'yes'\n", "debug: expected true or false, not a string"),
        ("debug = 1\n", "debug: expected true or false, not a number"),
        ("idle_timeout = 300\nidle-timeout = 301\n",
         "idle-timeout: set twice (as idle_timeout and idle-timeout)"),
        ("idle_timeout = \n", "not valid TOML: Invalid value (at line 1, column 16)"),
        ("idle_timeout = 300\nidle_timeout = 301\n",
         "not valid TOML: Cannot overwrite a value (at line 2, column 19)"),
    ],
)  # fmt: skip
def test_each_error_kind_is_one_line_naming_the_key(tmp_path: Path, text: str, error: str) -> None:
    assert _error(tmp_path, text) == error


def test_unreadable_files(tmp_path: Path) -> None:
    assert _error(tmp_path, b"mode = '\xff'\n") == "not valid TOML: not UTF-8 text"
    with pytest.raises(ConfigFileError, match=r"missing.toml: cannot read: No such file"):
        read(str(tmp_path / "missing.toml"), _parser())
    with pytest.raises(ConfigFileError, match=r": cannot read: Is a directory"):
        read(str(tmp_path), _parser())


def test_blame_names_the_key_only_if_the_file_gave_the_value(tmp_path: Path) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text("idle_timeout = 100\n")
    fc = read(str(path), _parser())
    message = "--idle-timeout 100 is below WireGuard's 180 s session lifetime"
    from_file = argparse.Namespace(idle_timeout=100.0)
    assert fc.blame(message, from_file) == (
        f"{path}: idle_timeout: 100 is below WireGuard's 180 s session lifetime")  # fmt: skip
    overridden = argparse.Namespace(idle_timeout=90.0)
    assert fc.blame(message, overridden) == message
    assert fc.blame("--mode is bad", from_file) == "--mode is bad"
