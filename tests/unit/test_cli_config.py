"""`wgjit gateway --config FILE` and `wgjit check-config FILE` on the real gateway parser:
every gateway flag can be set in the file, flags override it, every bad key or value is one
line naming file and key (exit 1), a good file is reported without starting anything."""

from __future__ import annotations

from pathlib import Path

import pytest

from wgjit.cli import _parse_args, build_parser, main


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture
def conf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.delenv("WGJIT_STORE", raising=False)
    return tmp_path / "gateway.toml"


GOOD = """\
interface = "wg0"
store = "sqlite:///var/lib/wgjit/other.db"
gateway-id = "gw-a"
idle_timeout = 600
sweep_interval = 15.5
mode = "hold"
queue_num = 7
backend = "uapi"
capture_interface = "eth0"
log_format = "json"
debug = true
adopt_empty_store = false
metrics_listen = "127.0.0.1:9586"
on_install = "sh -c 'ip route replace \\"$WGJIT_ALLOWED_IPS\\" dev \\"$WGJIT_INTERFACE\\"'"
on_evict = "true"
hook_timeout = 3
workers = 3
"""


def test_every_setting_from_the_file(conf: Path) -> None:
    conf.write_text(GOOD)
    args = _parse_args(build_parser(), ["gateway", "--config", str(conf)])
    assert (args.interface, args.store, args.gateway_id) == (
        "wg0", "sqlite:///var/lib/wgjit/other.db", "gw-a")  # fmt: skip
    assert (args.idle_timeout, args.sweep_interval, args.mode, args.queue_num) == (
        600.0, 15.5, "hold", 7)  # fmt: skip
    assert (args.backend, args.capture_interface, args.log_format, args.debug) == (
        "uapi", "eth0", "json", True)  # fmt: skip
    assert args.adopt_empty_store is False and args.metrics_listen == "127.0.0.1:9586"
    assert args.on_install == ["sh", "-c", 'ip route replace "$WGJIT_ALLOWED_IPS" dev '
                               '"$WGJIT_INTERFACE"']  # fmt: skip
    assert args.on_evict == ["true"] and args.hook_timeout == 3.0
    assert args.workers == 3


def test_flags_override_the_file_and_the_store_comes_from_flag_env_file(
    conf: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    conf.write_text(GOOD)
    argv = ["gateway", "--config", str(conf), "--idle-timeout", "900", "-i", "wg9",
            "--mode", "invert"]  # fmt: skip
    args = _parse_args(build_parser(), argv)
    assert (args.idle_timeout, args.interface, args.mode, args.queue_num) == (
        900.0, "wg9", "invert", 7)  # fmt: skip
    monkeypatch.setenv("WGJIT_STORE", "sqlite:///from/env.db")
    assert _parse_args(build_parser(), argv).store == "sqlite:///from/env.db"
    for flags in (["--store", "sqlite:///flag.db", *argv], [*argv, "--store", "sqlite:///flag.db"]):
        assert _parse_args(build_parser(), flags).store == "sqlite:///flag.db"


def test_check_config_good_file(conf: Path, capsys: pytest.CaptureFixture[str]) -> None:
    conf.write_text(GOOD)
    rc, out, err = run(capsys, "check-config", str(conf))
    assert (rc, err) == (0, "")
    assert out.startswith(f"{conf}: ok (17 settings: interface, store, gateway-id,")
    conf.write_text("# nothing set: every default\n")
    rc, out, err = run(capsys, "check-config", str(conf))
    assert (rc, out, err) == (0, f"{conf}: ok (0 settings: none)\n", "")


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("idle_timout = 300", "idle_timout: unknown setting (did you mean idle_timeout?)"),
        ("verbose = true", "verbose: unknown setting"),
        ("config = 'x.toml'", "config: unknown setting"),
        ("idle_timeout = 'soon'", "idle_timeout: 'soon' is not a number of seconds"),
        ("idle_timeout = nan", "idle_timeout: nan is not a finite positive number of seconds"),
        ("idle_timeout = 100",
         "idle_timeout: 100 is below WireGuard's 180 s session lifetime: peers with live "
         "sessions would be evicted; use >= 180 (default 300)"),
        ("queue_num = 70000", "queue_num: 70000 is out of range; use 0-65535"),
        ("queue_num = 1.5", "queue_num: '1.5' is not a whole number; use 0-65535"),
        ("mode = 'fast'", "mode: 'fast' is not one of auto, hold, replay, invert"),
        ("workers = 65", "workers: 65 is out of range; use 0-64"),
        ("workers = -1", "workers: -1 is out of range; use 0-64"),
        ("workers = 'many'", "workers: 'many' is not a whole number; use 0-64"),
        ("debug = 'yes'", "debug: expected true or false, not a string"),
        ("interface = 0", "interface: expected a string, not a number"),
        ("hook_timeout = 0", "hook_timeout: 0 is not a finite positive number of seconds"),
        ("on_install = ''", "on_install: empty command"),
        ("on_evict = 'sh -c \"x'", "on_evict: 'sh -c \"x': No closing quotation"),
        ("on_install = 'wgjit-no-such-hook --x'",
         "on_install: 'wgjit-no-such-hook': no such executable program (PATH or an absolute"
         " path)"),
        ("idle_timeout = 300\nidle-timeout = 300",
         "idle-timeout: set twice (as idle_timeout and idle-timeout)"),
        ("idle_timeout 300", "not valid TOML: Expected '=' after a key in a key/value pair "
         "(at line 1, column 14)"),
    ],
)  # fmt: skip
def test_each_bad_file_is_one_line_naming_the_key(
    conf: Path, capsys: pytest.CaptureFixture[str], text: str, error: str
) -> None:
    conf.write_text(text + "\n")
    for argv in (["check-config", str(conf)], ["gateway", "--config", str(conf), "-i", "wg0"]):
        rc, out, err = run(capsys, *argv)
        assert (rc, out, err) == (1, "", f"wgjit: error: {conf}: {error}\n"), argv


def test_a_flag_that_overrides_a_bad_file_value_is_blamed_as_a_flag(
    conf: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    conf.write_text("idle_timeout = 600\n")
    rc, _, err = run(capsys, "gateway", "--config", str(conf), "-i", "wg0", "--idle-timeout", "60")
    assert rc == 1 and err.startswith("wgjit: error: --idle-timeout 60 is below"), err


def test_missing_file_and_missing_interface(
    conf: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc, out, err = run(capsys, "check-config", str(conf))
    assert (rc, out) == (1, "")
    assert err == f"wgjit: error: {conf}: cannot read: No such file or directory\n"
    conf.write_text("idle_timeout = 600\n")
    for argv in (["gateway"], ["gateway", "--config", str(conf)]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
        _, err = capsys.readouterr()
        assert err.count("\n") == 1
        assert err.startswith("wgjit: error: the following arguments are required: --interface")


def test_hook_flags(capsys: pytest.CaptureFixture[str], conf: Path) -> None:
    args = _parse_args(build_parser(), ["gateway", "-i", "wg0", "--on-install",
                                        "sh -c 'echo \"$WGJIT_PEER\"'"])  # fmt: skip
    assert args.on_install == ["sh", "-c", 'echo "$WGJIT_PEER"'] and args.on_evict is None
    assert args.hook_timeout == 10.0
    rc, out, err = run(capsys, "gateway", "-i", "wg0", "--on-evict", "wgjit-no-such-hook")
    assert (rc, out) == (1, "")
    assert err == ("wgjit: error: --on-evict 'wgjit-no-such-hook': no such executable program"
                   " (PATH or an absolute path)\n")  # fmt: skip
