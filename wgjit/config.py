"""Config files: a TOML file (stdlib tomllib) whose keys are a command's long flags, read
onto that command's argparse parser. The file's values become the parser's defaults, so the
command line overrides them and every value goes through the flag's own check: validation
lives in one place, the parser.

A key is a flag without its leading dashes, with `-` or `_` (`idle-timeout` or
`idle_timeout`); a flag that takes no value is `true` or `false`. Errors are one line that
names the file and the key: `gateway.toml: idle_timeout: 'soon' is not a number of seconds`.
This module knows no command; it must not open stores or devices.
"""

from __future__ import annotations

import argparse
import difflib
import tomllib
from dataclasses import dataclass, field
from typing import Any

from wgjit.errors import WgjitError

# flags that make no sense in a file (the file itself, argparse's own)
NOT_IN_FILES = frozenset({"config", "help", "version"})


class ConfigFileError(WgjitError):
    """A config file that cannot be used; the message is one line naming file and key."""


@dataclass
class FileConfig:
    path: str
    values: dict[str, Any] = field(default_factory=dict)  # dest -> checked value
    keys: dict[str, str] = field(default_factory=dict)  # dest -> the key as written
    flags: dict[str, str] = field(default_factory=dict)  # option string -> dest

    def blame(self, message: str, args: argparse.Namespace) -> str:
        """A later check's message about a flag (`--idle-timeout 100 is below ...`) named
        after the file's key instead, if that value came from the file."""
        flag, _, rest = message.partition(" ")
        dest = self.flags.get(flag)
        if dest is None or dest not in self.values or not rest:
            return message
        if getattr(args, dest, None) != self.values[dest]:
            return message  # the command line overrode it: the flag is to blame
        return f"{self.path}: {self.keys[dest]}: {rest}"


def settable(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """The parser's flags a file may set, by key (both spellings)."""
    out: dict[str, argparse.Action] = {}
    for action in parser._actions:  # argparse has no public list of a parser's actions
        longs = [s for s in action.option_strings if s.startswith("--")]
        if not longs or action.dest in NOT_IN_FILES or action.dest == argparse.SUPPRESS:
            continue
        if isinstance(action, argparse._HelpAction | argparse._VersionAction):
            continue
        for s in longs:
            out[s[2:]] = action
            out[s[2:].replace("-", "_")] = action
    return out


def read(path: str, parser: argparse.ArgumentParser) -> FileConfig:
    """Read and check `path` against `parser`'s flags; ConfigFileError if anything is wrong."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise ConfigFileError(f"{path}: cannot read: {e.strerror or e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigFileError(f"{path}: not valid TOML: {e}") from None
    except UnicodeDecodeError:
        raise ConfigFileError(f"{path}: not valid TOML: not UTF-8 text") from None
    return check(path, data, parser)


def check(path: str, data: dict[str, Any], parser: argparse.ArgumentParser) -> FileConfig:
    options = settable(parser)
    out = FileConfig(path)
    for action in options.values():
        for s in action.option_strings:
            out.flags[s] = action.dest
    for key, value in data.items():
        if key not in options:
            hint = difflib.get_close_matches(key, sorted(options), n=1)
            why = f" (did you mean {hint[0]}?)" if hint else ""
            raise ConfigFileError(f"{path}: {key}: unknown setting{why}")
        action = options[key]
        if action.dest in out.values:
            raise ConfigFileError(
                f"{path}: {key}: set twice (as {out.keys[action.dest]} and {key})"
            )
        try:
            out.values[action.dest] = _value(action, value)
        except _Bad as e:
            raise ConfigFileError(f"{path}: {key}: {e}") from None
        out.keys[action.dest] = key
    return out


class _Bad(Exception):
    pass


_TOML_TYPES = {bool: "true/false", int: "a number", float: "a number", str: "a string",
               list: "an array", dict: "a table"}  # fmt: skip


def _kind(value: object) -> str:
    return _TOML_TYPES.get(type(value), "a date or time")


def _value(action: argparse.Action, value: object) -> Any:
    if action.nargs == 0:  # store_true and friends: a switch
        if not isinstance(value, bool):
            raise _Bad(f"expected true or false, not {_kind(value)}")
        return action.const if value else action.default
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        want = "a string" if action.type is None else "a number or a string"
        raise _Bad(f"expected {want}, not {_kind(value)}")
    if action.type is None and not isinstance(value, str):
        raise _Bad(f"expected a string, not {_kind(value)}")
    text = str(value)
    converted: Any = text
    if callable(action.type):
        try:
            converted = action.type(text)
        except Exception as e:  # the flag's own check, whatever it raises: its message
            raise _Bad(_without_flag(str(e), action)) from None
    if action.choices is not None and converted not in action.choices:
        choices = ", ".join(map(str, action.choices))
        raise _Bad(f"{text!r} is not one of {choices}")
    return converted


def _without_flag(message: str, action: argparse.Action) -> str:
    """`--idle-timeout 'x' is not ...` -> `'x' is not ...`: the key is named already."""
    for s in action.option_strings:
        if message.startswith(s + " "):
            return message[len(s) + 1 :]
        if message.startswith(s + ": "):
            return message[len(s) + 2 :]
    return message or "bad value"
