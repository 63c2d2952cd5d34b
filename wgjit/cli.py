"""Command line: parses arguments, calls the store/device/gateway layers, prints results.

No policy lives here. Every expected failure becomes one line `wgjit: error: ...` on stderr and
exit status 1 (2 for usage errors), with the store unchanged.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import math
import os
import re
import socket
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NoReturn

from wgjit import __version__
from wgjit.addr import format_networks, parse_networks
from wgjit.clientconf import (
    DEFAULT_PORT,
    ConfigInputError,
    parse_allowed,
    parse_dns,
    parse_endpoint,
)
from wgjit.config import FileConfig
from wgjit.config import read as read_config_file
from wgjit.device import BACKENDS, open_device
from wgjit.errors import WgjitError
from wgjit.events import EventLog
from wgjit.files import check_target, private_file, write_private_bytes
from wgjit.gateway.core import (
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_MAX_CLOCK_SKEW,
    DEFAULT_RELEASE_WINDOW,
    DEFAULT_SOURCE_LIMIT,
    DEFAULT_SWEEP_INTERVAL,
    FALLBACK_RELEASE_RATE,
    MAX_SOURCE_LIMIT,
    MAX_WORKERS,
    ConfigError,
    GatewayConfig,
)
from wgjit.gateway.lock import acquire as acquire_lock
from wgjit.keys import PrivateKey, PublicKey
from wgjit.service import (
    DEFAULT_CLIENT_ALLOWED_IPS,
    ConfigOptions,
    ConfigPlan,
    PeerService,
    iso,
    mark_time,
    peer_dict,
    plan_config,
    render_qr_png,
)
from wgjit.store import (
    DEFAULT_STORE_URL,
    KEEP,
    PEER_STATES,
    Peer,
    Store,
    StoreError,
    open_store,
)
from wgjit.store.pool import parse_pool
from wgjit.store.urls import redact, scrub

# --workers: one verify worker per core this process may run on
DEFAULT_WORKERS = min(len(os.sched_getaffinity(0)), MAX_WORKERS)


class CLIError(WgjitError):
    pass


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: `wgjit: error: ...` and the help to read, exit 2."""

    # the subcommands' parsers by name, where a config file needs them (`gateway`)
    commands: dict[str, argparse.ArgumentParser]

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"wgjit: error: {message} (see `{self.prog} --help`)\n")


# Value checks run as argparse `type=` functions. They raise CLIError, which argparse does not
# catch (it only catches ValueError/TypeError/ArgumentTypeError), so main() prints it as one
# line with exit status 1, like every other bad value.


def _int_range(flag: str, lo: int, hi: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text.strip())
        except ValueError:
            raise CLIError(f"{flag} {text!r} is not a whole number; use {lo}-{hi}") from None
        if not lo <= value <= hi:
            raise CLIError(f"{flag} {value} is out of range; use {lo}-{hi}")
        return value

    return parse


def _seconds(flag: str) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text.strip())
        except ValueError:
            raise CLIError(f"{flag} {text!r} is not a number of seconds") from None
        if not math.isfinite(value) or value <= 0:
            raise CLIError(f"{flag} {text.strip()} is not a finite positive number of seconds")
        return value

    return parse


def _rate(flag: str) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text.strip())
        except ValueError:
            raise CLIError(f"{flag} {text!r} is not a number per second") from None
        if not math.isfinite(value) or value < 0:
            raise CLIError(f"{flag} {text.strip()} must be a finite number >= 0 (0: no limit)")
        return value

    return parse


def _hook(flag: str) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        from wgjit.gateway.hooks import HookError, parse_command

        try:
            return parse_command(text)
        except HookError as e:
            raise CLIError(f"{flag} {e}") from None

    return parse


def _store(args: argparse.Namespace, *, create: bool = False) -> Store:
    """Only commands that add peers (and `store init`/`migrate`) create a store: any other
    command on a missing store fails, naming the path and `wgjit store init`."""
    return open_store(args.store, create=create)


def _service(store: Store) -> PeerService:
    return PeerService(store)


_iso = iso
_mark_time = mark_time


_RELATIVE = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw])")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def _when(flag: str, *, never: bool = False) -> Callable[[str], float | None]:
    """`--expires WHEN`: ISO 8601 (a time without offset is local time) or a duration from
    now (`90m`, `12h`, `30d`, `2w`); `never` (where allowed) clears it. Must be in the future."""

    def parse(text: str) -> float | None:
        t = text.strip()
        if never and t.lower() == "never":
            return None
        m = _RELATIVE.fullmatch(t.lower())
        if m:
            # to the whole second: an export writes it exactly, so re-importing it is a no-op
            at = float(math.ceil(time.time() + float(m.group(1)) * _UNIT_S[m.group(2)]))
        else:
            try:
                dt = datetime.datetime.fromisoformat(t)
            except ValueError:
                raise CLIError(
                    f"{flag} {t!r} is neither ISO 8601 (2027-01-31 or 2027-01-31T18:00:00Z)"
                    f" nor a duration like 30d, 12h, 90m{' nor never' if never else ''}"
                ) from None
            if dt.tzinfo is None:
                dt = dt.astimezone()  # local time, as the operator's clock shows it
            at = dt.timestamp()
        if not math.isfinite(at) or at <= time.time():
            raise CLIError(
                f"{flag} {t} is not in the future; to refuse the peer now use"
                " `wgjit peer disable NAME`"
            )
        return at

    return parse


def cmd_peer_add(args: argparse.Namespace) -> int:
    auto = args.allowed_ips.strip().lower() == "auto"
    if auto and args.allow_overlap:
        raise CLIError("--allowed-ips auto takes a free address: drop --allow-overlap")
    if not auto:
        parse_networks(args.allowed_ips)  # a bad list is that error, before anything else
    public = PublicKey.from_b64(args.public_key) if args.public_key else None
    # every client-config input is checked before anything is written to the store
    plan = _config_plan(args, have_private=public is None)
    # a store without a pool cannot allocate: `auto` never creates one (it would stay empty)
    with _store(args, create=not auto) as store:
        added = _service(store).add(
            args.name,
            allowed_ips=args.allowed_ips,
            public_key=public,
            preshared_key=args.preshared_key,
            allow_overlap=args.allow_overlap,
            expires_at=args.expires,
        )
    peer, private = added.peer, added.private_key
    if peer.handshake_hwm is not None:
        _note_kept_mark(peer)
    if private is None and args.output is None:
        print(
            f"added peer {peer.name} ({peer.public_key.b64()})"
            f" allowed-ips {format_networks(peer.allowed_ips)}"
        )
        print(
            f"wgjit: note: `wgjit peer config {peer.name}` prints its client config (gateway"
            " key, endpoint, preshared key; its owner fills in the private key)",
            file=sys.stderr,
        )
        return 0
    _emit_config(args, plan, peer, private)
    return 0


def _note_kept_mark(peer: Peer) -> None:
    """Say that the peer's key was used before and keeps its replay mark (a retired key)."""
    assert peer.handshake_hwm is not None
    print(
        f"wgjit: note: key was used before; its replay mark from"
        f" {_mark_time(peer.handshake_hwm)} is kept (initiations up to then stay refused;"
        " `wgjit peer reset-replay` clears it)",
        file=sys.stderr,
    )


# store-wide defaults (`wgjit store set-defaults`): option name -> the args attribute it fills
DEFAULT_OPTIONS = {
    "endpoint": "endpoint",
    "dns": "dns",
    "mtu": "mtu",
    "persistent-keepalive": "persistent_keepalive",
    "client-allowed-ips": "client_allowed_ips",
    "pool": "pool",
}
_INT_OPTIONS = {
    "mtu": _int_range("--mtu", 576, 65535),
    "persistent-keepalive": _int_range("--persistent-keepalive", 1, 65535),
}


def _stored_defaults(args: argparse.Namespace) -> dict[str, str]:
    """The store's defaults for client configs (flags win over them). A store that does not
    exist yet has none (`peer add` creates it later; other commands then fail opening it,
    naming the fix)."""
    try:
        with _store(args) as store:
            return store.get_defaults()
    except StoreError:
        return {}


def _checked_default(key: str, value: str) -> str:
    """A defaults value as the store keeps it: checked like its flag; CLIError if bad."""
    try:
        if key == "endpoint":
            parse_endpoint(value)  # the port may stay open: --interface's port, at use
            return value.strip()
        if key == "dns":
            return ", ".join(parse_dns(value))
        if key == "client-allowed-ips":
            return ", ".join(str(n) for n in parse_allowed(value))
    except ConfigInputError as e:
        raise CLIError(str(e)) from None
    if key == "pool":
        return str(parse_pool(value))
    return str(_INT_OPTIONS[key](value))


def _config_plan(args: argparse.Namespace, *, have_private: bool) -> ConfigPlan:
    """Check every client-config option and read what the interface knows (its public key,
    and its listen port as the endpoint's default port); an error before anything is written."""
    if args.qr and not have_private:
        raise CLIError(
            "--qr needs the peer's private key, which wgjit does not have (it keeps none): omit"
            " --public-key to let wgjit generate the key pair, or use `wgjit peer rotate NAME`"
        )
    if args.output is not None:
        check_target(args.output, force=args.force)
    if args.qr and args.qr != "-":
        if not args.qr.lower().endswith(".png"):
            raise CLIError(f"--qr {args.qr!r}: give FILE.png, or --qr alone for the terminal")
        check_target(args.qr, force=args.force)
    gateway_key, port = _interface_key_port(args)
    options = ConfigOptions(
        endpoint=args.endpoint,
        dns=args.dns,
        mtu=args.mtu,
        persistent_keepalive=args.persistent_keepalive,
        client_allowed_ips=args.client_allowed_ips,
        gateway_key=gateway_key,
    )
    return plan_config(options, _stored_defaults(args), listen_port=port)


def _interface_key_port(args: argparse.Namespace) -> tuple[PublicKey | None, int | None]:
    """The gateway's public key (--gateway-public-key, else --interface's) and the listen port
    of --interface, where given."""
    gateway_key = None
    port = None
    if getattr(args, "gateway_public_key", None):
        gateway_key = PublicKey.from_b64(args.gateway_public_key)
    if getattr(args, "interface", None):
        dev = open_device(args.interface)
        try:
            state = dev.read(peers=False)  # only its key and port
        finally:
            dev.close()
        gateway_key = gateway_key or state.public_key
        port = state.listen_port or None
    return gateway_key, port


def _emit_config(
    args: argparse.Namespace, plan: ConfigPlan, peer: Peer, private: PrivateKey | None
) -> None:
    """The config to stdout or --output (0600); the QR code to stderr or --qr FILE.png."""
    conf = PeerService.client_config(peer, plan, private)
    text = conf.render()
    for gap in conf.missing():
        print(f"wgjit: note: the config lacks {gap}: fill it in", file=sys.stderr)
    head = f"# wg-quick config for peer {peer.name}"
    if private is not None:
        head += "; the private key is not stored anywhere else"
    if args.output is not None:
        with private_file(args.output, force=args.force) as out:
            out.write(f"{head}\n{text}")
        print(f"wrote the client config of peer {peer.name} to {args.output}", file=sys.stderr)
    else:
        print(head)
        print(text, end="")
        sys.stdout.flush()
    if args.qr:
        if args.qr == "-":
            import segno

            # stdout stays the config alone
            segno.make(text, error="l").terminal(out=sys.stderr, compact=True)
        else:
            write_private_bytes(args.qr, render_qr_png(text), force=args.force)
            print(f"wrote the QR code to {args.qr}", file=sys.stderr)


def cmd_peer_config(args: argparse.Namespace) -> int:
    plan = _config_plan(args, have_private=False)
    with _store(args) as store:
        peer = _service(store).get(args.name)
    why = peer.refusal(time.time())
    if why:
        print(f"wgjit: note: peer {peer.name} is {why}: gateways refuse it", file=sys.stderr)
    _emit_config(args, plan, peer, None)
    return 0


def cmd_peer_disable(args: argparse.Namespace) -> int:
    with _store(args) as store:
        p = _service(store).disable(args.name)
    print(f"disabled peer {p.name}; running gateways evict it and refuse it until enabled")
    return 0


def cmd_peer_enable(args: argparse.Namespace) -> int:
    with _store(args) as store:
        p = _service(store).enable(args.name)
    why = p.refusal(time.time())
    print(f"enabled peer {p.name}" + (f" (still refused: {why})" if why else ""))
    return 0


def cmd_peer_set(args: argparse.Namespace) -> int:
    auto = args.allowed_ips is not None and args.allowed_ips.strip().lower() == "auto"
    if auto and args.allow_overlap:
        raise CLIError("--allowed-ips auto takes a free address: drop --allow-overlap")
    if args.allowed_ips is None and args.rename is None and args.expires is KEEP:
        raise CLIError("nothing to change; give --allowed-ips, --rename or --expires")
    with _store(args) as store:
        p = _service(store).update(
            args.name,
            allowed_ips=args.allowed_ips,
            new_name=args.rename,
            expires_at=args.expires,
            allow_overlap=args.allow_overlap,
        )
    expiry = _iso(p.expires_at) or "never"
    print(
        f"peer {p.name}: allowed-ips {format_networks(p.allowed_ips)}, expires {expiry};"
        " running gateways apply it within seconds"
    )
    return 0


def cmd_peer_rotate(args: argparse.Namespace) -> int:
    public = PublicKey.from_b64(args.public_key) if args.public_key else None
    plan = _config_plan(args, have_private=public is None)
    with _store(args) as store:
        added = _service(store).rotate(args.name, public_key=public)
    peer, old = added.peer, added.previous
    assert old is not None
    if peer.handshake_hwm is not None:  # the new key was used before (a retired key)
        _note_kept_mark(peer)
    print(
        f"# rotated peer {peer.name}: {old.public_key.b64()} is refused from now on, "
        f"{peer.public_key.b64()} replaces it",
        file=sys.stderr,
    )
    _emit_config(args, plan, peer, added.private_key)
    return 0


def _listed(service: PeerService, prefix: str | None, state: str | None) -> Iterator[Peer]:
    """Every peer, or those with a name prefix / in a state, in name order, page by page."""
    if prefix is None and state is None:
        yield from service.iter_all()
        return
    cursor = None
    while True:
        page = service.list_page(cursor=cursor, limit=1000, prefix=prefix, state=state)
        yield from page.items
        if page.next_cursor is None:
            return
        cursor = page.next_cursor


def cmd_peer_list(args: argparse.Namespace) -> int:
    with _store(args) as store:
        peers = list(_listed(_service(store), args.prefix, args.state))
    if args.json:
        print(json.dumps([peer_dict(p) for p in peers], indent=2))
        return 0
    if not peers:
        print("no peers")
        return 0
    from wgjit.status import ago, human_bytes

    now = time.time()
    w = max(4, *(len(p.name) for p in peers))
    h = max(6, *(len(p.holder or "-") for p in peers))
    print(
        f"{'NAME':<{w}}  {'PUBLIC KEY':<44}  {'STATE':<8}  {'EXPIRES':<20}  {'HOLDER':<{h}}"
        f"  {'HANDSHAKE':<10}  {'RX':>10}  {'TX':>10}  ALLOWED IPS"
    )
    for p in peers:
        print(
            f"{p.name:<{w}}  {p.public_key.b64():<44}  {p.state:<8}"
            f"  {_iso(p.expires_at) or '-':<20}  {p.holder or '-':<{h}}"
            f"  {ago(p.last_handshake, now):<10}  {human_bytes(p.rx_bytes):>10}"
            f"  {human_bytes(p.tx_bytes):>10}  {format_networks(p.allowed_ips)}"
        )
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from wgjit.status import ago, gather, human_bytes

    if args.top < 0:
        raise CLIError(f"--top must be 0 or more, got {args.top}")
    with _store(args) as store:
        report = gather(store, args.top)
    if args.json:
        print(json.dumps({
            "peers": report.peers,
            "gateways": [
                {
                    "gateway_id": g.gateway_id,
                    "heartbeat_at": _iso(g.heartbeat_at),
                    "installed": g.installed,
                    "claimed": g.claimed,
                    "drops": dict(sorted(g.rejects.items())),
                }
                for g in report.gateways
            ],
            "busiest": [peer_dict(p) for p in report.busiest],
        }, indent=2))  # fmt: skip
        return 0
    now = report.at
    print(f"store {redact(args.store)}: {report.peers} peers, {len(report.gateways)} gateways")
    if report.gateways:
        w = max(7, *(len(g.gateway_id) for g in report.gateways))
        print(f"\n{'GATEWAY':<{w}}  {'HEARTBEAT':<9}  {'INSTALLED':>9}  {'HOLDS':>7}  DROPS")
        for g in report.gateways:
            installed = "?" if g.installed is None else str(g.installed)
            drops = sorted(g.rejects.items(), key=lambda kv: (-kv[1], kv[0]))
            print(
                f"{g.gateway_id:<{w}}  {ago(g.heartbeat_at, now):<9}  {installed:>9}"
                f"  {g.claimed:>7}  {' '.join(f'{r}={n}' for r, n in drops) or '-'}"
            )
    if report.busiest:
        w = max(4, *(len(p.name) for p in report.busiest))
        h = max(6, *(len(p.holder or "-") for p in report.busiest))
        print(
            f"\n{'BUSIEST':<{w}}  {'RX':>10}  {'TX':>10}  {'HANDSHAKE':<10}  {'HOLDER':<{h}}"
            "  ENDPOINT"
        )
        for p in report.busiest:
            print(
                f"{p.name:<{w}}  {human_bytes(p.rx_bytes):>10}  {human_bytes(p.tx_bytes):>10}"
                f"  {ago(p.last_handshake, now):<10}  {p.holder or '-':<{h}}  {p.endpoint or '-'}"
            )
    return 0


def cmd_peer_show(args: argparse.Namespace) -> int:
    with _store(args) as store:
        p = _service(store).get(args.name)
    d = peer_dict(p)
    if args.json:
        print(json.dumps(d, indent=2))
    else:
        for k, v in d.items():
            print(f"{k}: {', '.join(v) if isinstance(v, list) else v}")
    return 0


def cmd_peer_revoke(args: argparse.Namespace) -> int:
    with _store(args) as store:
        p = _service(store).revoke(args.name)
    print(f"revoked peer {p.name}; running gateways drop it within seconds")
    return 0


def cmd_peer_remove(args: argparse.Namespace) -> int:
    with _store(args) as store:
        p = _service(store).remove(args.name)
    print(f"removed peer {p.name}")
    return 0


def cmd_peer_reset_replay(args: argparse.Namespace) -> int:
    with _store(args) as store:
        service = _service(store)
        p = service.get(args.name)
        if p.handshake_hwm is None:
            print(f"peer {p.name} has no replay mark; nothing to reset")
            return 0
        if not args.yes:
            _confirm_reset(p)
        was = service.reset_replay(p.name)
    mark = _mark_time(was.handshake_hwm) if was.handshake_hwm else "none"
    held = f", installed on gateway {was.holder}" if was.holder else ""
    print(
        f"wgjit: reset-replay: cleared the replay mark of peer {was.name}"
        f" (key {was.public_key.short()}..., was {mark}{held})",
        file=sys.stderr,
    )
    if was.holder:
        print(
            f"gateway {was.holder} has the peer installed and, like its device, refuses"
            " timestamps up to the old mark until it evicts the idle peer; to apply the reset"
            f" there at once: wg set IFNAME peer {was.public_key.b64()} remove"
        )
    return 0


def _confirm_reset(p: Peer) -> None:
    if not sys.stdin.isatty():
        raise CLIError(
            f"refusing to reset the replay mark of peer {p.name} unconfirmed: standard input is"
            " not a terminal to ask on; pass --yes"
        )
    assert p.handshake_hwm is not None
    print(
        f"peer {p.name}: replay mark {_mark_time(p.handshake_hwm)}"
        + (f", installed on gateway {p.holder}" if p.holder else "")
        + ".\nClearing it lets any initiation of this key ever captured install the peer once"
        " more (with the sender's address). Do it only for a client locked out by a mark\n"
        "ahead of its clock.\ntype the peer name to confirm: ",
        end="",
        file=sys.stderr,
        flush=True,
    )
    if sys.stdin.readline().strip() != p.name:
        raise CLIError(f"not confirmed; the replay mark of peer {p.name} is unchanged")


def cmd_peer_import(args: argparse.Namespace) -> int:
    from wgjit.store.bulk import format_for, import_file

    fmt = format_for(args.file, args.format)
    # utf-8-sig: a UTF-8 byte order mark (spreadsheet exports write one) is skipped
    try:
        wrapper = None
        if args.file == "-":
            stream = sys.stdin
            if hasattr(sys.stdin, "buffer"):
                wrapper = io.TextIOWrapper(sys.stdin.buffer, encoding="utf-8-sig", newline="")
                stream = wrapper
        else:
            stream = open(args.file, encoding="utf-8-sig", newline="")  # noqa: SIM115
    except OSError as e:
        raise CLIError(f"cannot read {args.file}: {e.strerror}; check the path") from None
    total = os.fstat(stream.fileno()).st_size if args.file != "-" else 0
    progress = _progress("imported", total, stream) if sys.stderr.isatty() else None
    try:
        with _store(args, create=True) as store:
            report = import_file(
                store,
                stream,
                fmt,
                strict=args.strict,
                progress=progress,
                allow_overlap=args.allow_overlap,
            )
    except UnicodeDecodeError as e:
        raise CLIError(f"{args.file} is not UTF-8 text ({e.reason}); convert it first") from None
    finally:
        if args.file != "-":
            stream.close()
        elif wrapper is not None:
            wrapper.detach()  # leave sys.stdin's buffer open
    if progress:
        print(file=sys.stderr)
    for bad in report.bad[:100]:
        print(f"wgjit: {args.file}:{bad.line}: {bad.reason}", file=sys.stderr)
    if len(report.bad) > 100:
        print(f"wgjit: ... and {len(report.bad) - 100} more bad rows", file=sys.stderr)
    if report.reused_keys:
        print(
            f"wgjit: note: {report.reused_keys} added peers have keys used before; their replay"
            " marks are kept",
            file=sys.stderr,
        )
    if args.strict and report.bad and report.added + report.updated + report.unchanged == 0:
        raise CLIError(
            f"{len(report.bad)} bad rows in {args.file}; nothing imported (--strict); fix them"
            " or drop --strict to import the good rows"
        )
    print(
        f"{report.rows} rows: {report.added} added, {report.updated} updated,"
        f" {report.unchanged} unchanged, {len(report.bad)} skipped"
    )
    return 1 if report.bad else 0


def cmd_peer_export(args: argparse.Namespace) -> int:
    from wgjit.store.bulk import export_peers, format_for

    target = args.file or "-"
    fmt = format_for(target, args.format or (None if args.file else "jsonl"))
    if target == "-":
        with _store(args) as store:
            try:
                export_peers(store.iter_peers(), sys.stdout, fmt)
                sys.stdout.flush()
            except BrokenPipeError:  # `wgjit peer export | head`: the reader has seen enough
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    # it holds preshared keys: 0600, via a temporary file and a rename, never through a link,
    # an existing file replaced only with --force (checked before the store is read)
    check_target(target, force=args.force)
    progress = _progress("exported", 0, None) if sys.stderr.isatty() else None
    with _store(args) as store, private_file(target, force=args.force) as out:
        n = export_peers(store.iter_peers(), out, fmt, progress)
    if progress:
        print(file=sys.stderr)
    print(f"exported {n} peers to {target}")
    return 0


def _progress(verb: str, total: int, stream: Any) -> Any:
    import time

    start = time.monotonic()

    def show(rows: int) -> None:
        rate = rows / max(time.monotonic() - start, 1e-6)
        line = f"\r{verb} {rows} rows ({rate:,.0f}/s)"
        if total and stream is not None:
            with contextlib.suppress(OSError, ValueError):
                done = min(1.0, stream.buffer.tell() / total) if hasattr(stream, "buffer") else 0
                bar = "#" * int(done * 30)
                line = f"\r[{bar:<30}] {done:4.0%} {verb} {rows} rows ({rate:,.0f}/s)"
        print(line, end="", file=sys.stderr, flush=True)

    return show


def _schema_version(store: Store) -> int:
    version = getattr(store, "schema_version", None)
    if version is None:
        from wgjit.store.sqlite import MIGRATIONS

        version = len(MIGRATIONS)
    return int(version)


def cmd_store_init(args: argparse.Namespace) -> int:
    try:
        with _store(args) as store:
            print(
                f"store {redact(args.store)} already exists"
                f" (schema version {_schema_version(store)})"
            )
            return 0
    except StoreError:
        pass  # missing or empty: create it below (a store that is damaged fails again there)
    with _store(args, create=True) as store:
        print(f"created store {redact(args.store)} (schema version {_schema_version(store)})")
    return 0


def _print_defaults(defaults: dict[str, str], as_json: bool) -> None:
    if as_json:
        print(json.dumps(defaults, indent=2))
    elif not defaults:
        print("no defaults set (`wgjit store set-defaults --help`)")
    else:
        for key, value in defaults.items():
            print(f"{key} = {value}")


def cmd_store_set_defaults(args: argparse.Namespace) -> int:
    changes: dict[str, str | None] = {key: None for key in args.clear or ()}
    for key, attr in DEFAULT_OPTIONS.items():
        value = getattr(args, attr)
        if value is not None:
            if key in changes:
                raise CLIError(f"--{key} and --clear {key} contradict each other")
            changes[key] = _checked_default(key, str(value))
    if not changes:
        flags = ", ".join(f"--{k}" for k in DEFAULT_OPTIONS)
        raise CLIError(f"nothing to set; give {flags} or --clear NAME")
    with _store(args) as store:
        defaults = store.set_defaults(changes)
    _print_defaults(defaults, False)
    return 0


def cmd_store_show_defaults(args: argparse.Namespace) -> int:
    with _store(args) as store:
        defaults = store.get_defaults()
    _print_defaults(defaults, args.json)
    return 0


def cmd_store_migrate(args: argparse.Namespace) -> int:
    with _store(args, create=True) as store:
        version = _schema_version(store)
    print(f"store {redact(args.store)} is at schema version {version}")
    return 0


def _gateway_config(args: argparse.Namespace) -> GatewayConfig:
    """The gateway's settings, checked; a bad value from a config file is named by its key."""
    config = GatewayConfig(
        idle_timeout=args.idle_timeout,
        sweep_interval=args.sweep_interval,
        testing_short_timers=args.testing_short_timers,
        gateway_id=args.gateway_id,
        max_clock_skew=_clock_skew(args.max_clock_skew),
        adopt_empty_store=args.adopt_empty_store,
        testing_always_under_load=args.testing_always_under_load,
        load_delay=args.load_delay,
        release_rate=args.release_rate,
        global_rate=args.admission_rate,
        release_window=args.release_window,
        source_limit=args.source_limit,
        workers=args.workers,
    )
    try:
        config.validate()
    except ConfigError as e:
        file_config: FileConfig | None = getattr(args, "file_config", None)
        if file_config is None:
            raise
        raise ConfigError(file_config.blame(str(e), args)) from None
    return config


def cmd_gateway(args: argparse.Namespace) -> int:
    from wgjit.gateway.run import serve

    config = _gateway_config(args)  # fail before touching the device
    metrics_listen = None
    if args.metrics_listen:
        from wgjit.gateway.metrics import MetricsError, parse_listen

        try:
            metrics_listen = parse_listen(args.metrics_listen)
        except MetricsError as e:
            raise CLIError(str(e)) from None
    mode = "none" if args.testing_no_completion else args.mode
    with contextlib.ExitStack() as stack:
        # log lines never block the packet path: a slow reader costs dropped lines, counted
        log = EventLog(fmt=args.log_format, debug=args.debug, background=True)
        stack.callback(log.close)  # closed last: the other closes may still log
        store = stack.enter_context(contextlib.closing(_store(args)))
        device = stack.enter_context(contextlib.closing(open_device(args.interface, args.backend)))
        # one gateway per interface, taken before anything changes the device or iptables
        # (opening the device above only connects to it); released when this process ends
        stack.enter_context(acquire_lock(device.name))
        # a second handle for sweeps: reading a big device never delays an install
        sweep_device = stack.enter_context(
            contextlib.closing(open_device(args.interface, args.backend))
        )
        if not args.adopt_empty_store:
            _refuse_empty_store(store, device, args.store)
        more_stats = None
        if args.on_install or args.on_evict:
            from wgjit.gateway.hooks import HookRunner

            commands = {"install": args.on_install, "evict": args.on_evict}
            hooks = HookRunner(
                {event: argv for event, argv in commands.items() if argv},
                log,
                interface=device.name,
                gateway_id=args.gateway_id,
                timeout=args.hook_timeout,
                lookup=store.get_peer,  # on a hook thread, for events without the peer
            )
            log.subscribe(hooks)  # it only enqueues: never delays the packet path
            stack.callback(hooks.close, min(args.hook_timeout, 5.0))
            more_stats = hooks.stats
        return serve(
            device,
            store,
            config,
            log,
            capture_interface=args.capture_interface,
            mode=mode,
            queue_num=args.queue_num,
            sweep_device=sweep_device,
            metrics_listen=metrics_listen,
            more_stats=more_stats,
        )
    raise AssertionError("unreachable")


def _refuse_empty_store(store: Store, device: Any, url: str) -> None:
    """A gateway on a store with no peers would remove every peer on the device at start
    (reconcile): almost always the wrong store. Refuse unless --adopt-empty-store."""
    peers = store.iter_peers()
    try:
        empty = next(peers, None) is None
    finally:
        close = getattr(peers, "close", None)
        if close is not None:
            close()
    if not empty:
        return
    # handshakes(): one entry per peer, at a fraction of read()'s cost on a big device
    on_device = len(device.handshakes())
    if on_device:
        raise CLIError(
            f"store {redact(url)} has no peers but interface {device.name} has {on_device}:"
            " starting would remove them all; check --store / WGJIT_STORE, or pass"
            " --adopt-empty-store if the device's peers really must go"
        )


def cmd_check_config(args: argparse.Namespace) -> int:
    """Check a gateway config file as `wgjit gateway --config FILE` would, without starting."""
    gateway = _parse_args(build_parser(), ["gateway", "--config", args.file], need_interface=False)
    _gateway_config(gateway)
    fc: FileConfig = gateway.file_config
    print(f"{args.file}: ok ({len(fc.values)} settings: {', '.join(fc.keys.values()) or 'none'})")
    return 0


# a client's clock a little off must never lock it out: a minute at least
MIN_MAX_CLOCK_SKEW = 60.0


def _clock_skew(value: float) -> float:
    if not math.isfinite(value) or value < MIN_MAX_CLOCK_SKEW:
        raise ConfigError(
            f"--max-clock-skew {value:g} is out of range: give a finite number of seconds"
            f" >= {MIN_MAX_CLOCK_SKEW:g} (default {DEFAULT_MAX_CLOCK_SKEW:g})"
        )
    return value


def cmd_serve(args: argparse.Namespace) -> int:
    """The admin HTTP API (and web page): settings checked before the store is opened."""
    from wgjit.api import serve

    listen = serve.parse_listen(args.listen)
    serve.check_transport(listen, args.tls_cert, args.tls_key, args.insecure_http)
    token = serve.read_token(args.token_file)
    gateway_key, port = _interface_key_port(args)
    from wgjit.api.app import create_app

    with _store(args) as store:
        service = PeerService(store, gateway_key=gateway_key, listen_port=port)
        app = create_app(service, token, store_url=args.store)
        sock = serve.bind(listen)
        print(
            f"wgjit serve: {listen.url(args.tls_cert is not None)}/api/v1 (store"
            f" {redact(args.store)})",
            file=sys.stderr,
            flush=True,
        )
        serve.run(app, sock, tls_cert=args.tls_cert, tls_key=args.tls_key)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from wgjit.demo import run_demo

    return run_demo(connects=args.connects)


ALLOW_OVERLAP_HELP = (
    "accept allowed IPs that overlap another peer's, link-local ranges and 0.0.0.0/0 or ::/0"
    " (deliberate designs: exit nodes, site-to-site links; WireGuard routes a prefix to one"
    " installed peer at a time)"
)


def _config_options(p: argparse.ArgumentParser) -> None:
    """Options of the client configs that add, rotate and config print."""
    p.add_argument("--endpoint", metavar="HOST[:PORT]",
                   help="the gateway as clients reach it (port default: --interface's listen "
                        f"port, else {DEFAULT_PORT})")  # fmt: skip
    p.add_argument("--interface", help="read the gateway's public key and port from it")
    p.add_argument("--gateway-public-key", help="the gateway's public key (base64)")
    p.add_argument("--client-allowed-ips",
                   help="AllowedIPs: what the client routes through the tunnel (default:"
                        f" the store's, else {DEFAULT_CLIENT_ALLOWED_IPS})")  # fmt: skip
    p.add_argument("--dns", metavar="ADDR[,...]", help="DNS servers / search domains")
    p.add_argument("--mtu", type=_int_range("--mtu", 576, 65535), help="tunnel MTU")
    p.add_argument("--persistent-keepalive", type=_int_range("--persistent-keepalive", 1, 65535),
                   metavar="SECONDS", help="for clients behind NAT (25 is usual)")  # fmt: skip
    p.add_argument("--output", "-o", metavar="FILE", help="write the config to FILE (0600)")
    p.add_argument("--force", action="store_true", help="replace --output/--qr files")
    p.add_argument("--qr", nargs="?", const="-", metavar="FILE.png",
                   help="also a QR code: on the terminal (stderr), or into FILE.png")  # fmt: skip


def build_parser() -> _Parser:
    p = _Parser(
        prog="wgjit", description="Just-in-time WireGuard peers: install a peer when it knocks."
    )
    p.add_argument("--version", action="version", version=f"wgjit {__version__}")
    store_help = f"store URL (env WGJIT_STORE; default {DEFAULT_STORE_URL})"
    p.add_argument(
        "--store", default=os.environ.get("WGJIT_STORE", DEFAULT_STORE_URL), help=store_help
    )
    # --store after the command too (`wgjit peer list --store X`): SUPPRESS keeps the value
    # given before the command (or the default) when it is not repeated after it
    after = _Parser(add_help=False)
    after.add_argument("--store", default=argparse.SUPPRESS, help=store_help)

    def sub_parsers(parent: Any, dest: str, metavar: str) -> Any:
        return parent.add_subparsers(
            dest=dest, required=True, metavar=metavar, parser_class=_Parser
        )

    sub = sub_parsers(p, "command", "COMMAND")

    peer = sub.add_parser("peer", help="manage peers in the store")
    psub = sub_parsers(peer, "peer_command", "ACTION")
    add = psub.add_parser(
        "add", parents=[after], help="add a peer (generates a key and client config if none)"
    )
    add.add_argument("name")
    add.add_argument("--allowed-ips", required=True,
                     help="CIDR[,CIDR...] routed to this peer, or `auto`: the next free address"
                          " of the store's pool (`wgjit store set-defaults --pool`)")  # fmt: skip
    add.add_argument("--public-key", help="the peer's public key (base64); omit to generate")
    add.add_argument("--preshared-key", action="store_true", help="generate a preshared key")
    add.add_argument("--allow-overlap", action="store_true", help=ALLOW_OVERLAP_HELP)
    _config_options(add)
    add.add_argument("--expires", type=_when("--expires"), default=None, metavar="WHEN",
                     help="refuse the peer from then on: ISO 8601 or 30d, 12h, 90m")  # fmt: skip
    add.set_defaults(func=cmd_peer_add)
    ls = psub.add_parser("list", parents=[after], help="list peers")
    ls.add_argument("--json", action="store_true")
    ls.add_argument("--prefix", metavar="TEXT", help="only peers whose name starts with TEXT")
    ls.add_argument("--state", choices=PEER_STATES, help="only peers in this state")
    ls.set_defaults(func=cmd_peer_list)
    show = psub.add_parser("show", parents=[after], help="show one peer")
    show.add_argument("name")
    show.add_argument("--json", action="store_true")
    show.set_defaults(func=cmd_peer_show)
    rv = psub.add_parser("revoke", parents=[after], help="revoke a peer; gateways evict it")
    rv.add_argument("name")
    rv.set_defaults(func=cmd_peer_revoke)
    for verb, func, what in (
        ("disable", cmd_peer_disable, "refuse a peer (gateways evict it) until enabled again"),
        ("enable", cmd_peer_enable, "let a disabled peer connect again"),
    ):
        pp = psub.add_parser(verb, parents=[after], help=what)
        pp.add_argument("name")
        pp.set_defaults(func=func)
    st_ = psub.add_parser("set", parents=[after], help="change a peer's allowed IPs, name, expiry")
    st_.add_argument("name")
    st_.add_argument("--allowed-ips",
                     help="CIDR[,CIDR...]: replaces the peer's list; `auto`: the pool's next"
                          " free address")  # fmt: skip
    st_.add_argument("--rename", metavar="NEW", help="a new name")
    st_.add_argument("--expires", type=_when("--expires", never=True), default=KEEP,
                     metavar="WHEN", help="ISO 8601, 30d/12h/90m from now, or never")  # fmt: skip
    st_.add_argument("--allow-overlap", action="store_true", help=ALLOW_OVERLAP_HELP)
    st_.set_defaults(func=cmd_peer_set)
    ro = psub.add_parser(
        "rotate", parents=[after], help="give a peer a new key pair (the old key is refused)"
    )
    ro.add_argument("name")
    ro.add_argument("--public-key", help="the new public key (base64); omit to generate")
    _config_options(ro)
    ro.set_defaults(func=cmd_peer_rotate)
    cf = psub.add_parser("config", parents=[after], help="print a peer's wg-quick client config")
    cf.add_argument("name")
    _config_options(cf)
    cf.set_defaults(func=cmd_peer_config)
    rm = psub.add_parser("remove", parents=[after], help="delete a peer from the store")
    rm.add_argument("name")
    rm.set_defaults(func=cmd_peer_remove)
    rr = psub.add_parser("reset-replay", parents=[after],
                         help="clear a peer's anti-replay mark (a client locked out by a"
                              " timestamp ahead of its clock)")  # fmt: skip
    rr.add_argument("name")
    rr.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    rr.set_defaults(func=cmd_peer_reset_replay)
    im = psub.add_parser(
        "import", parents=[after], help="add or update peers from a CSV or JSON-lines file"
    )
    im.add_argument("file", help="FILE.csv or FILE.jsonl ('-': standard input, with --format)")
    im.add_argument("--format", choices=("csv", "jsonl"), help="default: from the extension")
    im.add_argument("--strict", action="store_true",
                    help="import nothing if any row is bad (default: skip bad rows)")  # fmt: skip
    im.add_argument("--allow-overlap", action="store_true", help=ALLOW_OVERLAP_HELP)
    im.set_defaults(func=cmd_peer_import)
    ex = psub.add_parser(
        "export", parents=[after], help="write all peers (with preshared keys) to a file"
    )
    ex.add_argument(
        "file", nargs="?", help="FILE.csv or FILE.jsonl (default: JSON lines to stdout)"
    )
    ex.add_argument("--format", choices=("csv", "jsonl"), help="default: from the extension")
    ex.add_argument("--force", action="store_true", help="replace FILE if it exists")
    ex.set_defaults(func=cmd_peer_export)

    stat = sub.add_parser(
        "status", parents=[after],
        help="live gateways (installed vs held peers, drops by reason) and the busiest peers",
    )  # fmt: skip
    stat.add_argument("--top", type=int, default=10, metavar="N",
                      help="show the N busiest peers by traffic (default 10; 0: none)")  # fmt: skip
    stat.add_argument("--json", action="store_true")
    stat.set_defaults(func=cmd_status)

    st = sub.add_parser("store", help="manage the store itself")
    ssub = sub_parsers(st, "store_command", "ACTION")
    mig = ssub.add_parser(
        "migrate", parents=[after], help="apply pending schema migrations (also done on start)"
    )
    mig.set_defaults(func=cmd_store_migrate)
    ini = ssub.add_parser(
        "init", parents=[after], help="create an empty store (nothing else creates one by chance)"
    )
    ini.set_defaults(func=cmd_store_init)
    sd = ssub.add_parser(
        "set-defaults", parents=[after],
        help="defaults for client configs (peer add/config/rotate) and the address pool",
    )  # fmt: skip
    sd.add_argument("--endpoint", metavar="HOST[:PORT]", help="the gateway as clients reach it")
    sd.add_argument("--dns", metavar="ADDR[,...]", help="DNS servers / search domains")
    sd.add_argument("--mtu", help="tunnel MTU (576-65535)")
    sd.add_argument("--persistent-keepalive", metavar="SECONDS", help="1-65535")
    sd.add_argument("--client-allowed-ips", metavar="CIDR[,...]", help="the clients' AllowedIPs")
    sd.add_argument("--pool", metavar="CIDR[,CIDR6]",
                    help="address pool of `peer add --allowed-ips auto` (its first address is"
                         " the gateway's)")  # fmt: skip
    sd.add_argument("--clear", action="append", choices=tuple(DEFAULT_OPTIONS), metavar="NAME",
                    help=f"remove a default ({', '.join(DEFAULT_OPTIONS)});"
                         " repeatable")  # fmt: skip
    sd.set_defaults(func=cmd_store_set_defaults)
    sh = ssub.add_parser("show-defaults", parents=[after], help="print the store's defaults")
    sh.add_argument("--json", action="store_true")
    sh.set_defaults(func=cmd_store_show_defaults)

    gw = sub.add_parser(
        "gateway", parents=[after], help="run the JIT gateway on a WireGuard interface"
    )
    # required, from the command line or the config file (checked in _parse_args)
    gw.add_argument("--interface", "-i", help="configured WireGuard interface (required)")
    gw.add_argument(
        "--config", metavar="FILE.toml",
        help="read settings from this TOML file: keys are these flags without the dashes "
             "(idle_timeout or idle-timeout); flags given here override it",
    )  # fmt: skip
    gw.add_argument("--gateway-id", default=socket.gethostname(),
                    help="this gateway's name in a shared store (default: host name)")  # fmt: skip
    gw.add_argument("--idle-timeout", type=_seconds("--idle-timeout"),
                    default=DEFAULT_IDLE_TIMEOUT,
                    help="evict peers with no handshake for this many seconds "
                         f"(default {DEFAULT_IDLE_TIMEOUT:g}, minimum 180)")  # fmt: skip
    gw.add_argument("--sweep-interval", type=_seconds("--sweep-interval"),
                    default=DEFAULT_SWEEP_INTERVAL,
                    help=f"seconds between idle sweeps (default {DEFAULT_SWEEP_INTERVAL:g})",
                    )  # fmt: skip
    gw.add_argument("--load-delay", type=_seconds("--load-delay"), default=0.25,
                    metavar="SECONDS",
                    help="a knock that waited longer than this in the kernel's queue puts the "
                         "gateway under load for a second: cookie replies and per-source "
                         "limits (default 0.25)")  # fmt: skip
    gw.add_argument("--release-window", type=_int_range("--release-window", 0, 4096),
                    default=DEFAULT_RELEASE_WINDOW, metavar="N",
                    help="hold mode: keep at most N released initiations that the device has "
                         "not answered yet (its responses and cookie replies are watched "
                         "leaving), so a herd stays below the device's own under-load mark "
                         "(wireguard-go 128, kernel 512); cookie replies from the device halve "
                         "the window for a while. 0: no window. If the answers cannot be "
                         "watched, the gateway warns and paces at --release-rate, or "
                         f"{FALLBACK_RELEASE_RATE:g}/s if that is 0 "
                         f"(default {DEFAULT_RELEASE_WINDOW})")  # fmt: skip
    gw.add_argument("--release-rate", type=_rate("--release-rate"), default=0.0,
                    metavar="PER_SECOND",
                    help="hold mode: also hand the device at most this many initiations a "
                         "second, in bursts of 64 (0: no cap, the default); the only pace with "
                         "--release-window 0")  # fmt: skip
    gw.add_argument("--source-limit", type=_int_range("--source-limit", 0, MAX_SOURCE_LIMIT),
                    default=DEFAULT_SOURCE_LIMIT, metavar="PER_SECOND",
                    help="hold mode: the kernel drops what one source (an IPv4 address, an "
                         "IPv6 /64) sends beyond this many initiations a second, before they "
                         "are queued, so a flood from one address costs the gateway nothing "
                         f"(0: no limit; default {DEFAULT_SOURCE_LIMIT})")  # fmt: skip
    gw.add_argument("--admission-rate", type=_rate("--admission-rate"), default=0.0,
                    metavar="PER_SECOND",
                    help="initiations a second that may cost an X25519 or a store look-up; "
                         "more are dropped and put the gateway under load (cookie replies, "
                         "per-source limits). 0 (default): measured at start, half the X25519 "
                         "rate of one core times --workers")  # fmt: skip
    gw.add_argument("--max-clock-skew", type=float, default=DEFAULT_MAX_CLOCK_SKEW,
                    metavar="SECONDS",
                    help="refuse initiations timestamped further ahead of this host's clock "
                         f"(logged: suspicious_timestamp; default {DEFAULT_MAX_CLOCK_SKEW:g}, "
                         f"minimum {MIN_MAX_CLOCK_SKEW:g})")  # fmt: skip
    gw.add_argument("--testing-short-timers", action="store_true",
                    help="TESTING ONLY: allow timers below production minimums")  # fmt: skip
    gw.add_argument("--mode", choices=("auto", "hold", "replay", "invert"), default="auto",
                    help="how the first handshake completes after an install: hold (NFQUEUE "
                         "holds the initiation until installed), replay (re-inject it), invert "
                         "(the gateway initiates back); auto: the first that works, in that "
                         "order (default)")  # fmt: skip
    gw.add_argument("--queue-num", type=_int_range("--queue-num", 0, 65535), default=None,
                    help="NFQUEUE number for --mode hold (default: the listen port)")  # fmt: skip
    gw.add_argument("--workers", type=_int_range("--workers", 0, MAX_WORKERS),
                    default=DEFAULT_WORKERS,
                    help="worker processes that verify initiations (the X25519 work); 0 or 1: "
                         f"in the gateway's own process (default: the number of cores, "
                         f"{DEFAULT_WORKERS})")  # fmt: skip
    gw.add_argument("--testing-no-completion", action="store_true",
                    help="TESTING ONLY: install peers but do nothing to complete the handshake "
                         "(the client's own 5 s retry does; for latency comparisons)")  # fmt: skip
    gw.add_argument("--adopt-empty-store", action="store_true",
                    help="start even if the store has no peers while the interface has some "
                         "(they are removed); without it the gateway refuses, since an empty "
                         "store is almost always a wrong --store")  # fmt: skip
    gw.add_argument(
        "--metrics-listen",
        metavar="HOST:PORT",
        help="serve Prometheus /metrics and /healthz there (e.g. 127.0.0.1:9586)",
    )
    gw.add_argument("--testing-always-under-load", action="store_true",
                    help="TESTING ONLY: answer every initiation without a valid mac2 with a "
                         "cookie reply, as under load")  # fmt: skip
    gw.add_argument("--backend", choices=BACKENDS, default="auto")
    gw.add_argument("--capture-interface", help="capture on this interface only (default all)")
    gw.add_argument("--log-format", choices=("text", "json"), default="text")
    gw.add_argument("--debug", action="store_true", help="also log malformed packets")
    gw.add_argument("--on-install", type=_hook("--on-install"), metavar="CMD",
                    help="run CMD (split like a shell would, but no shell) after a peer is "
                         "installed, with WGJIT_PEER, WGJIT_KEY, WGJIT_ALLOWED_IPS, "
                         "WGJIT_ENDPOINT, WGJIT_INTERFACE in its environment")  # fmt: skip
    gw.add_argument("--on-evict", type=_hook("--on-evict"), metavar="CMD",
                    help="run CMD after a peer is evicted (the same variables, and "
                         "WGJIT_REASON)")  # fmt: skip
    gw.add_argument(
        "--hook-timeout", type=_seconds("--hook-timeout"), default=10.0, metavar="SECONDS",
        help="kill a hook (its whole process group) after this long (default 10)",
    )  # fmt: skip
    gw.set_defaults(func=cmd_gateway)

    cc = sub.add_parser("check-config", help="check a gateway config file without starting")
    cc.add_argument("file", metavar="FILE.toml")
    cc.set_defaults(func=cmd_check_config)
    p.commands = {"gateway": gw}

    sv = sub.add_parser(
        "serve", parents=[after], help="serve the admin HTTP API and web page over the store"
    )
    sv.add_argument("--listen", default="127.0.0.1:8080", metavar="ADDR:PORT",
                    help="where to listen (default 127.0.0.1:8080); an address other than"
                         " loopback needs --tls-cert/--tls-key or --insecure-http")  # fmt: skip
    sv.add_argument("--token-file", required=True, metavar="FILE",
                    help="the bearer token clients send (one line, 16+ characters); the file"
                         " must be yours and mode 0600")  # fmt: skip
    sv.add_argument("--tls-cert", metavar="FILE", help="serve HTTPS with this certificate")
    sv.add_argument("--tls-key", metavar="FILE", help="... and this private key")
    sv.add_argument("--insecure-http", action="store_true",
                    help="allow plain HTTP on an address other than loopback (behind a TLS"
                         " proxy)")  # fmt: skip
    sv.add_argument("--interface", help="read the gateway's public key and port for client"
                    " configs from this WireGuard interface")  # fmt: skip
    sv.add_argument("--gateway-public-key", help="the gateway's public key for client configs")
    sv.set_defaults(func=cmd_serve)

    demo = sub.add_parser("demo", help="live demo in throwaway network namespaces")
    demo.add_argument("--connects", type=_int_range("--connects", 1, 100000), default=20,
                      help="connects per latency measurement (default 20)")  # fmt: skip
    demo.set_defaults(func=cmd_demo)
    return p


def _parse_args(
    parser: _Parser, argv: Sequence[str] | None, *, need_interface: bool = True
) -> argparse.Namespace:
    """Parse the command line; for `gateway --config FILE`, the file's values become the
    defaults and the command line is parsed again (so flags win, and every value passes its
    flag's check). The store's URL: --store, else WGJIT_STORE, else the file, else the default."""
    args = parser.parse_args(argv)
    if args.command != "gateway":
        return args
    gw = parser.commands["gateway"]
    file_config = None
    if args.config is not None:
        file_config = read_config_file(args.config, gw)
        values = dict(file_config.values)
        store = values.pop("store", None)
        if store is not None and "WGJIT_STORE" not in os.environ:
            parser.set_defaults(store=store)
        gw.set_defaults(**values)
        args = parser.parse_args(argv)
    args.file_config = file_config
    if need_interface and not args.interface:
        gw.error("the following arguments are required: --interface/-i (or interface in --config)")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = _parse_args(parser, argv)
    except WgjitError as e:
        print(f"wgjit: error: {e}", file=sys.stderr)
        return 1
    try:
        rc: int = args.func(args)
        return rc
    except WgjitError as e:
        # last line of defence: no message shows the store's password, whatever quoted it
        text = " ".join(scrub(str(e), args.store).split())
        print(f"wgjit: error: {text}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
