"""Command line: parses arguments, calls the store/device/gateway layers, prints results.

No policy lives here. Every expected failure becomes one line `wgjit: error: ...` on stderr and
exit status 1 (2 for usage errors), with the store unchanged.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import socket
import sys
from collections.abc import Sequence
from typing import Any

from wgjit import __version__
from wgjit.addr import InvalidAddress, format_networks, parse_networks
from wgjit.capture.afpacket import CaptureError
from wgjit.device import BACKENDS, DeviceError, open_device
from wgjit.events import EventLog
from wgjit.gateway.core import (
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_MAX_CLOCK_SKEW,
    DEFAULT_SWEEP_INTERVAL,
    ConfigError,
    GatewayConfig,
)
from wgjit.gateway.run import GatewayError
from wgjit.keys import InvalidKey, PresharedKey, PrivateKey, PublicKey
from wgjit.store import DEFAULT_STORE_URL, Peer, Store, StoreError, open_store
from wgjit.store.bulk import BulkError


class CLIError(Exception):
    pass


def _store(args: argparse.Namespace) -> Store:
    return open_store(args.store)


def _peer_dict(p: Peer) -> dict[str, Any]:
    return {
        "name": p.name,
        "public_key": p.public_key.b64(),
        "allowed_ips": [str(n) for n in p.allowed_ips],
        "preshared_key": p.preshared_key is not None,
        "revoked": p.revoked,
        "created_at": p.created_at,
        "updated_at": p.updated_at,
        "last_seen": p.last_seen,
        # the newest initiation accepted from the peer (anti-replay), by the client's clock
        "handshake_mark": _mark_time(p.handshake_hwm) if p.handshake_hwm else None,
        "holder": p.holder,  # the gateway that has it installed, if any
    }


def _mark_time(mark: bytes) -> str:
    """A TAI64N mark as ISO 8601 UTC (`2026-11-24T07:30:01.204Z`); hex if out of range."""
    from datetime import UTC, datetime

    from wgjit.handshake import Timestamp

    try:
        t = datetime.fromtimestamp(Timestamp(mark).to_unix(), UTC)
    except (ValueError, OverflowError, OSError):
        return f"TAI64N {mark.hex()} (out of range)"
    return t.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _client_config(
    private: PrivateKey,
    peer: Peer,
    gateway_key: str,
    endpoint: str,
    client_allowed_ips: str,
) -> str:
    lines = [
        "[Interface]",
        f"PrivateKey = {private.b64()}",
        f"Address = {format_networks(peer.allowed_ips).replace(',', ', ')}",
        "",
        "[Peer]",
        f"PublicKey = {gateway_key}",
    ]
    if peer.preshared_key is not None:
        lines.append(f"PresharedKey = {peer.preshared_key.b64()}")
    lines += [f"Endpoint = {endpoint}", f"AllowedIPs = {client_allowed_ips}"]
    return "\n".join(lines) + "\n"


def cmd_peer_add(args: argparse.Namespace) -> int:
    nets = parse_networks(args.allowed_ips)
    private = None
    if args.public_key:
        public = PublicKey.from_b64(args.public_key)
    else:
        private = PrivateKey.generate()
        public = private.public_key()
    gateway_key = None
    if private is not None:
        # resolve everything the client config needs before writing to the store
        if args.gateway_public_key:
            gateway_key = PublicKey.from_b64(args.gateway_public_key).b64()
        elif args.interface:
            dev = open_device(args.interface)
            try:
                gateway_key = str(dev.read().public_key)
            finally:
                dev.close()
    psk = PresharedKey.generate() if args.preshared_key else None
    with _store(args) as store:
        peer = store.add_peer(args.name, public, nets, psk)
    if peer.handshake_hwm is not None:
        print(
            f"wgjit: note: key was used before; its replay mark from"
            f" {_mark_time(peer.handshake_hwm)} is kept (initiations up to then stay refused;"
            " `wgjit peer reset-replay` clears it)",
            file=sys.stderr,
        )
    if private is None:
        print(f"added peer {peer.name} ({public.b64()}) allowed-ips {format_networks(nets)}")
        return 0
    if gateway_key is None:
        print(
            "wgjit: note: gateway public key unknown; pass --interface IFNAME or "
            "--gateway-public-key KEY to fill it in",
            file=sys.stderr,
        )
        gateway_key = "<gateway public key: wg show IFNAME public-key>"
    conf = _client_config(private, peer, gateway_key, args.endpoint, args.client_allowed_ips)
    print(f"# wg-quick config for peer {peer.name}; the private key is not stored anywhere else")
    print(conf, end="")
    if args.qr:
        import segno

        segno.make(conf, error="l").terminal(compact=True)
    return 0


def cmd_peer_list(args: argparse.Namespace) -> int:
    with _store(args) as store:
        peers = store.list_peers()
    if args.json:
        print(json.dumps([_peer_dict(p) for p in peers], indent=2))
        return 0
    if not peers:
        print("no peers")
        return 0
    w = max(4, *(len(p.name) for p in peers))
    print(f"{'NAME':<{w}}  {'PUBLIC KEY':<44}  {'STATE':<7}  ALLOWED IPS")
    for p in peers:
        state = "revoked" if p.revoked else "active"
        print(
            f"{p.name:<{w}}  {p.public_key.b64():<44}  {state:<7}  {format_networks(p.allowed_ips)}"
        )
    return 0


def _get(store: Store, name: str) -> Peer:
    p = store.get_peer(name)
    if p is None:
        raise CLIError(f"no peer named {name!r} (see `wgjit peer list`)")
    return p


def cmd_peer_show(args: argparse.Namespace) -> int:
    with _store(args) as store:
        p = _get(store, args.name)
    d = _peer_dict(p)
    if args.json:
        print(json.dumps(d, indent=2))
    else:
        for k, v in d.items():
            print(f"{k}: {', '.join(v) if isinstance(v, list) else v}")
    return 0


def cmd_peer_revoke(args: argparse.Namespace) -> int:
    with _store(args) as store:
        p = store.revoke(args.name)
    print(f"revoked peer {p.name}; running gateways drop it within seconds")
    return 0


def cmd_peer_remove(args: argparse.Namespace) -> int:
    with _store(args) as store:
        p = store.remove(args.name)
    print(f"removed peer {p.name}")
    return 0


def cmd_peer_reset_replay(args: argparse.Namespace) -> int:
    with _store(args) as store:
        p = _get(store, args.name)
        if p.handshake_hwm is None:
            print(f"peer {p.name} has no replay mark; nothing to reset")
            return 0
        if not args.yes:
            _confirm_reset(p)
        was = store.reset_handshake_mark(p.name)
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
    try:
        stream = sys.stdin if args.file == "-" else open(args.file, encoding="utf-8", newline="")  # noqa: SIM115
    except OSError as e:
        raise CLIError(f"cannot read {args.file}: {e.strerror}; check the path") from None
    total = os.fstat(stream.fileno()).st_size if args.file != "-" else 0
    progress = _progress("imported", total, stream) if sys.stderr.isatty() else None
    try:
        with _store(args) as store:
            report = import_file(store, stream, fmt, strict=args.strict, progress=progress)
    except UnicodeDecodeError as e:
        raise CLIError(f"{args.file} is not UTF-8 text ({e.reason}); convert it first") from None
    finally:
        if stream is not sys.stdin:
            stream.close()
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
    try:
        # 0600: the export holds preshared keys
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600) if target != "-" else -1
        out = sys.stdout if fd < 0 else open(fd, "w", encoding="utf-8", newline="")  # noqa: SIM115
    except OSError as e:
        raise CLIError(f"cannot write {target}: {e.strerror}; check the path") from None
    progress = _progress("exported", 0, None) if target != "-" and sys.stderr.isatty() else None
    try:
        with _store(args) as store:
            n = export_peers(store.iter_peers(), out, fmt, progress)
    except BrokenPipeError:  # `wgjit peer export | head`: the reader has seen enough
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    finally:
        if out is not sys.stdout:
            out.close()
    if target != "-":
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


def cmd_store_migrate(args: argparse.Namespace) -> int:
    with _store(args) as store:
        version = getattr(store, "schema_version", None)
        if version is None:
            from wgjit.store.sqlite import MIGRATIONS

            version = len(MIGRATIONS)
    print(f"store {_redact(args.store)} is at schema version {version}")
    return 0


def _redact(url: str) -> str:
    from wgjit.store.postgres import redact

    return redact(url)


def cmd_gateway(args: argparse.Namespace) -> int:
    from wgjit.gateway.run import serve

    config = GatewayConfig(
        idle_timeout=args.idle_timeout,
        sweep_interval=args.sweep_interval,
        testing_short_timers=args.testing_short_timers,
        gateway_id=args.gateway_id,
        max_clock_skew=_clock_skew(args.max_clock_skew),
    )
    config.validate()  # fail before touching the device
    # log lines never block the packet path: a slow reader costs dropped lines, counted
    log = EventLog(fmt=args.log_format, debug=args.debug, background=True)
    store = _store(args)
    device = open_device(args.interface, args.backend)
    mode = "none" if args.testing_no_completion else args.mode
    try:
        return serve(
            device,
            store,
            config,
            log,
            capture_interface=args.capture_interface,
            mode=mode,
            queue_num=args.queue_num,
        )
    finally:
        device.close()
        store.close()
        log.close()


# a client's clock a little off must never lock it out: a minute at least
MIN_MAX_CLOCK_SKEW = 60.0


def _clock_skew(value: float) -> float:
    if not math.isfinite(value) or value < MIN_MAX_CLOCK_SKEW:
        raise ConfigError(
            f"--max-clock-skew {value:g} is out of range: give a finite number of seconds"
            f" >= {MIN_MAX_CLOCK_SKEW:g} (default {DEFAULT_MAX_CLOCK_SKEW:g})"
        )
    return value


def cmd_demo(args: argparse.Namespace) -> int:
    from wgjit.demo import run_demo

    return run_demo(connects=args.connects)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="wgjit", description="Just-in-time WireGuard peers: install a peer when it knocks."
    )
    p.add_argument("--version", action="version", version=f"wgjit {__version__}")
    p.add_argument(
        "--store",
        default=os.environ.get("WGJIT_STORE", DEFAULT_STORE_URL),
        help=f"store URL (env WGJIT_STORE; default {DEFAULT_STORE_URL})",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    peer = sub.add_parser("peer", help="manage peers in the store")
    psub = peer.add_subparsers(dest="peer_command", required=True, metavar="ACTION")
    add = psub.add_parser("add", help="add a peer (generates a key and client config if none)")
    add.add_argument("name")
    add.add_argument("--allowed-ips", required=True, help="CIDR[,CIDR...] routed to this peer")
    add.add_argument("--public-key", help="the peer's public key (base64); omit to generate")
    add.add_argument("--preshared-key", action="store_true", help="generate a preshared key")
    add.add_argument("--endpoint", default="<gateway address>:51820",
                     help="gateway HOST:PORT for the generated client config")  # fmt: skip
    add.add_argument("--interface", help="read the gateway public key from this interface")
    add.add_argument("--gateway-public-key", help="gateway public key for the client config")
    add.add_argument("--client-allowed-ips", default="0.0.0.0/0, ::/0",
                     help="AllowedIPs in the generated client config")  # fmt: skip
    add.add_argument("--qr", action="store_true", help="also print the config as a QR code")
    add.set_defaults(func=cmd_peer_add)
    ls = psub.add_parser("list", help="list peers")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=cmd_peer_list)
    show = psub.add_parser("show", help="show one peer")
    show.add_argument("name")
    show.add_argument("--json", action="store_true")
    show.set_defaults(func=cmd_peer_show)
    rv = psub.add_parser("revoke", help="revoke a peer; gateways evict it")
    rv.add_argument("name")
    rv.set_defaults(func=cmd_peer_revoke)
    rm = psub.add_parser("remove", help="delete a peer from the store")
    rm.add_argument("name")
    rm.set_defaults(func=cmd_peer_remove)
    rr = psub.add_parser("reset-replay", help="clear a peer's anti-replay mark (a client locked"
                         " out by a timestamp ahead of its clock)")  # fmt: skip
    rr.add_argument("name")
    rr.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    rr.set_defaults(func=cmd_peer_reset_replay)
    im = psub.add_parser("import", help="add or update peers from a CSV or JSON-lines file")
    im.add_argument("file", help="FILE.csv or FILE.jsonl ('-': standard input, with --format)")
    im.add_argument("--format", choices=("csv", "jsonl"), help="default: from the extension")
    im.add_argument("--strict", action="store_true",
                    help="import nothing if any row is bad (default: skip bad rows)")  # fmt: skip
    im.set_defaults(func=cmd_peer_import)
    ex = psub.add_parser("export", help="write all peers (with preshared keys) to a file")
    ex.add_argument(
        "file", nargs="?", help="FILE.csv or FILE.jsonl (default: JSON lines to stdout)"
    )
    ex.add_argument("--format", choices=("csv", "jsonl"), help="default: from the extension")
    ex.set_defaults(func=cmd_peer_export)

    st = sub.add_parser("store", help="manage the store itself")
    ssub = st.add_subparsers(dest="store_command", required=True, metavar="ACTION")
    mig = ssub.add_parser("migrate", help="apply pending schema migrations (also done on start)")
    mig.set_defaults(func=cmd_store_migrate)

    gw = sub.add_parser("gateway", help="run the JIT gateway on a WireGuard interface")
    gw.add_argument("--interface", "-i", required=True, help="configured WireGuard interface")
    gw.add_argument("--gateway-id", default=socket.gethostname(),
                    help="this gateway's name in a shared store (default: host name)")  # fmt: skip
    gw.add_argument("--idle-timeout", type=float, default=DEFAULT_IDLE_TIMEOUT,
                    help="evict peers with no handshake for this many seconds "
                         f"(default {DEFAULT_IDLE_TIMEOUT:g}, minimum 180)")  # fmt: skip
    gw.add_argument("--sweep-interval", type=float, default=DEFAULT_SWEEP_INTERVAL,
                    help=f"seconds between idle sweeps (default {DEFAULT_SWEEP_INTERVAL:g})",
                    )  # fmt: skip
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
    gw.add_argument("--queue-num", type=int, default=None,
                    help="NFQUEUE number for --mode hold (default: the listen port)")  # fmt: skip
    gw.add_argument("--testing-no-completion", action="store_true",
                    help="TESTING ONLY: install peers but do nothing to complete the handshake "
                         "(the client's own 5 s retry does; for latency comparisons)")  # fmt: skip
    gw.add_argument("--backend", choices=BACKENDS, default="auto")
    gw.add_argument("--capture-interface", help="capture on this interface only (default all)")
    gw.add_argument("--log-format", choices=("text", "json"), default="text")
    gw.add_argument("--debug", action="store_true", help="also log malformed packets")
    gw.set_defaults(func=cmd_gateway)

    demo = sub.add_parser("demo", help="live demo in throwaway network namespaces")
    demo.add_argument("--connects", type=int, default=20,
                      help="connects per latency measurement (default 20)")  # fmt: skip
    demo.set_defaults(func=cmd_demo)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        rc: int = args.func(args)
        return rc
    except (
        CLIError,
        StoreError,
        DeviceError,
        ConfigError,
        InvalidKey,
        InvalidAddress,
        GatewayError,
        CaptureError,
        BulkError,
    ) as e:
        print(f"wgjit: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
