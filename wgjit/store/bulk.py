"""Bulk peer files: read and write CSV or JSON lines, import in batches, export as a stream.

Formats (chosen by file extension `.csv` / `.jsonl` / `.ndjson`, or explicitly):
  CSV:  header `name,public_key,allowed_ips,preshared_key,revoked,disabled,expires_at,
        handshake_mark`; only the first three are required; allowed_ips separated by spaces or
        commas (quote the field); revoked and disabled are true/false/1/0/yes/no (empty:
        false); preshared_key base64 or empty; expires_at an ISO 8601 time with its offset
        (`2027-01-31T18:00:00Z`) or empty (never); handshake_mark the peer's anti-replay mark
        (the TAI64N timestamp of the newest initiation accepted from it) as 24 hex digits, or
        empty.
  JSON lines: one object per line with the same keys; allowed_ips a list or a string.
Export writes every field: a full backup. Importing is idempotent and updates peers by name;
it adds new peers as they are written, and never widens an existing peer's access: it can
revoke or disable a peer but never reinstates or enables one, moves an expiry only earlier and a
mark only forward (re-importing an old file must not bring back revoked or disabled peers, nor
let old captured initiations in again).
Row validation here; conflicts with stored peers are decided by the store. It prints nothing:
progress and reports go through the callbacks the CLI gives.
"""

from __future__ import annotations

import csv
import datetime
import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any, Final

from wgjit.addr import InvalidAddress, IPNetwork, parse_networks
from wgjit.errors import WgjitError
from wgjit.keys import InvalidKey, PresharedKey, PublicKey
from wgjit.store import InvalidPeerName, Peer, Store, validate_peer_name
from wgjit.store.prefixes import overlaps_within

FORMATS: Final = ("csv", "jsonl")
FIELDS: Final = (
    "name", "public_key", "allowed_ips", "preshared_key", "revoked", "disabled", "expires_at",
    "handshake_mark",
)  # fmt: skip
MARK_LEN: Final = 12  # TAI64N
REQUIRED: Final = ("name", "public_key", "allowed_ips")
BATCH_SIZE: Final = 10000


class BulkError(WgjitError, ValueError):
    """A file cannot be read or written as asked; the message says how to fix it."""


@dataclass(slots=True)
class BadRow:
    line: int
    reason: str


@dataclass(slots=True)
class ImportReport:
    rows: int = 0
    added: int = 0
    updated: int = 0
    unchanged: int = 0
    bad: list[BadRow] = field(default_factory=list)
    reused_keys: int = 0  # added with a key the store had before: its replay mark is kept


def format_for(path: str | None, explicit: str | None) -> str:
    """The format to use: `explicit`, else from the extension; BulkError if neither says."""
    if explicit:
        if explicit not in FORMATS:
            raise BulkError(f"--format {explicit!r} is not supported; use csv or jsonl")
        return explicit
    if path and path != "-":
        low = path.lower()
        if low.endswith(".csv"):
            return "csv"
        if low.endswith((".jsonl", ".ndjson", ".json")):
            return "jsonl"
    raise BulkError(
        f"cannot tell the format of {path or 'standard input/output'!r} from its name;"
        " use a .csv or .jsonl extension or --format csv|jsonl"
    )


_TRUE = {"true", "1", "yes", "y", "t"}
_FALSE = {"false", "0", "no", "n", "f", ""}


def _flag(field: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if value is None:
        return False
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise BulkError(f"field {field}: {value!r} is not a boolean; use true or false")


def _expiry(value: Any) -> float | None:
    """ISO 8601 with an offset (what export writes) to Unix seconds; empty: never."""
    if value in (None, ""):
        return None
    text = str(value).strip()
    try:
        when = datetime.datetime.fromisoformat(text)
    except ValueError:
        when = None
    if when is None or when.tzinfo is None:
        raise BulkError(
            f"field expires_at: {text[:40]!r} is not a time with its offset; give ISO 8601 like"
            " 2027-01-31T18:00:00Z (as `peer export` writes), or leave it empty for never"
        )
    return when.timestamp()


def _expiry_text(at: float) -> str:
    """Unix seconds as ISO 8601 UTC, exact for whole seconds (what `peer add --expires` sets)
    and to the microsecond otherwise."""
    when = datetime.datetime.fromtimestamp(at, datetime.UTC)
    return when.isoformat(timespec="seconds" if at == int(at) else "microseconds").replace(
        "+00:00", "Z"
    )


def row_to_peer(row: dict[str, Any]) -> Peer:
    """One record (already split into fields) to a Peer; BulkError naming the field if bad."""
    for name in REQUIRED:
        if row.get(name) in (None, ""):
            raise BulkError(f"field {name} is missing; every row needs {', '.join(REQUIRED)}")
    try:
        name = validate_peer_name(str(row["name"]).strip())
    except InvalidPeerName as e:
        raise BulkError(f"field name: {e}") from None
    try:
        key = PublicKey.from_b64(str(row["public_key"]).strip())
    except InvalidKey as e:
        raise BulkError(f"field public_key: {e}") from None
    ips = row["allowed_ips"]
    text = ",".join(str(x) for x in ips) if isinstance(ips, list) else str(ips)
    try:
        nets = parse_networks(text.replace(" ", ",").strip(","))
    except InvalidAddress as e:
        raise BulkError(f"field allowed_ips: {e}") from None
    psk = None
    if row.get("preshared_key") not in (None, ""):
        try:
            psk = PresharedKey.from_b64(str(row["preshared_key"]).strip())
        except InvalidKey as e:
            raise BulkError(f"field preshared_key: {e}") from None
    return Peer(
        name, key, nets, psk, _flag("revoked", row.get("revoked")),
        handshake_hwm=_mark(row.get("handshake_mark")),
        disabled=_flag("disabled", row.get("disabled")),
        expires_at=_expiry(row.get("expires_at")),
    )  # fmt: skip


def _mark(value: Any) -> bytes | None:
    if value in (None, ""):
        return None
    text = str(value).strip()
    try:
        mark = bytes.fromhex(text)
    except ValueError:
        mark = b""
    if len(mark) != MARK_LEN or len(text) != 2 * MARK_LEN:
        raise BulkError(
            f"field handshake_mark: {text[:40]!r} is not a mark; give the {2 * MARK_LEN} hex"
            " digits `peer export` writes (TAI64N), or leave it empty"
        )
    return mark


def read_rows(stream: IO[str], fmt: str) -> Iterator[tuple[int, Peer | BulkError]]:
    """(line number, peer or the error for that line) for every record in the file."""
    if fmt == "csv":
        reader = csv.DictReader(stream)
        header = list(reader.fieldnames or [])
        if header and header[0].startswith("\ufeff"):  # a byte order mark read as text
            header[0] = header[0][1:]
            reader.fieldnames = header
        missing = [f for f in REQUIRED if f not in header]
        if missing:
            raise BulkError(
                f"CSV header lacks {', '.join(missing)}; the first line must name the columns:"
                f" {','.join(FIELDS)}"
            )
        for rec in reader:
            line = reader.line_num
            if None in rec:
                yield line, BulkError("too many fields; quote allowed_ips if it has commas")
                continue
            try:
                yield line, row_to_peer(rec)
            except BulkError as e:
                yield line, e
        return
    for line, text in enumerate(stream, 1):
        if not text.strip():
            continue
        try:
            rec = json.loads(text)
            if not isinstance(rec, dict):
                raise BulkError('not a JSON object; each line must be {"name": ..., ...}')
            yield line, row_to_peer(rec)
        except json.JSONDecodeError as e:
            yield line, BulkError(f"not valid JSON ({e.msg} at column {e.colno})")
        except BulkError as e:
            yield line, e


def import_file(
    store: Store,
    stream: IO[str],
    fmt: str,
    *,
    strict: bool = False,
    progress: Callable[[int], None] | None = None,
    batch_size: int = BATCH_SIZE,
    allow_overlap: bool = False,
) -> ImportReport:
    """Import every good row in batches (each batch one transaction; re-running is harmless).
    Bad rows (format, duplicates within the file, conflicts with stored peers) are reported
    with their line numbers and skipped. `strict`: the file is checked first, against itself and
    against the store (each batch imported with dry_run: the same checks, nothing written),
    and nothing is written if any row is bad; a conflicting peer written by someone else
    between the check and the import is still only found while writing."""
    report = ImportReport()
    if strict:
        check = _validate(read_rows(stream, fmt), store, allow_overlap)
        if check.bad:
            return check
        stream.seek(0)
    names: set[str] = set()
    keys: set[bytes] = set()
    batch: list[Peer] = []
    lines: list[int] = []

    def flush() -> None:
        if not batch:
            return
        res = store.import_peers(batch, allow_overlap=allow_overlap)
        report.added += res.added
        report.updated += res.updated
        report.unchanged += res.unchanged
        report.reused_keys += res.reused_keys
        report.bad.extend(BadRow(lines[i], why) for i, why in res.rejected)
        batch.clear()
        lines.clear()
        if progress:
            progress(report.rows)

    for line, item in read_rows(stream, fmt):
        report.rows += 1
        if isinstance(item, BulkError):
            report.bad.append(BadRow(line, str(item)))
            continue
        dup = _duplicate(item, names, keys)
        if dup:
            report.bad.append(BadRow(line, dup))
            continue
        batch.append(item)
        lines.append(line)
        if len(batch) >= batch_size:
            flush()
    flush()
    report.bad.sort(key=lambda b: b.line)
    return report


def _duplicate(p: Peer, names: set[str], keys: set[bytes]) -> str | None:
    if p.name in names:
        return f"name {p.name!r} appears earlier in the file"
    if p.public_key.raw in keys:
        return "public key appears earlier in the file"
    names.add(p.name)
    keys.add(p.public_key.raw)
    return None


def _validate(
    rows: Iterable[tuple[int, Peer | BulkError]],
    store: Store,
    allow_overlap: bool,
    batch_size: int = BATCH_SIZE,
) -> ImportReport:
    report = ImportReport()
    names: set[str] = set()
    keys: set[bytes] = set()
    batch: list[Peer] = []
    lines: list[int] = []
    prefixes: list[tuple[int, str, tuple[IPNetwork, ...]]] = []  # the whole file's, for overlaps

    def check() -> None:
        res = store.import_peers(batch, allow_overlap=allow_overlap, dry_run=True)
        report.bad.extend(BadRow(lines[i], why) for i, why in res.rejected)
        batch.clear()
        lines.clear()

    for line, item in rows:
        report.rows += 1
        if isinstance(item, BulkError):
            report.bad.append(BadRow(line, str(item)))
            continue
        why = _duplicate(item, names, keys)
        if why:
            report.bad.append(BadRow(line, why))
            continue
        batch.append(item)
        lines.append(line)
        prefixes.append((line, item.name, item.allowed_ips))
        if len(batch) >= batch_size:
            check()
    if batch:
        check()
    if not allow_overlap:  # across batches (each dry run sees only its own batch)
        seen = {b.line for b in report.bad}
        for line, why in overlaps_within(prefixes).items():
            if line not in seen:
                report.bad.append(BadRow(line, why))
    report.bad.sort(key=lambda b: b.line)
    return report


def peer_record(p: Peer) -> dict[str, Any]:
    """What export writes for a peer (the preshared key included: it is a backup)."""
    return {
        "name": p.name,
        "public_key": p.public_key.b64(),
        "allowed_ips": [str(n) for n in p.allowed_ips],
        "preshared_key": p.preshared_key.b64() if p.preshared_key else None,
        "revoked": p.revoked,
        "disabled": p.disabled,
        "expires_at": _expiry_text(p.expires_at) if p.expires_at is not None else None,
        # without it, a restored backup would admit every initiation ever captured once more
        "handshake_mark": p.handshake_hwm.hex() if p.handshake_hwm else None,
    }


def export_peers(
    peers: Iterable[Peer], stream: IO[str], fmt: str, progress: Callable[[int], None] | None = None
) -> int:
    """Write every peer; returns how many. Import reads the result back unchanged."""
    n = 0
    writer = csv.writer(stream, lineterminator="\n") if fmt == "csv" else None
    if writer:
        writer.writerow(FIELDS)
    for p in peers:
        rec = peer_record(p)
        if writer:
            writer.writerow(
                [
                    rec["name"],
                    rec["public_key"],
                    " ".join(rec["allowed_ips"]),
                    rec["preshared_key"] or "",
                    "true" if p.revoked else "false",
                    "true" if p.disabled else "false",
                    rec["expires_at"] or "",
                    rec["handshake_mark"] or "",
                ]
            )
        else:
            stream.write(json.dumps(rec, separators=(",", ":")) + "\n")
        n += 1
        if progress and n % BATCH_SIZE == 0:
            progress(n)
    return n
