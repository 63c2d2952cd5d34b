"""`wgjit peer import/export` and `wgjit store migrate` on both stores: round trips, idempotent
re-runs, bad rows reported by line number, --strict."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from wgjit.addr import parse_networks
from wgjit.cli import main
from wgjit.keys import PresharedKey, PrivateKey, PublicKey
from wgjit.store import open_store


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    u = f"sqlite://{tmp_path}/peers.db" if request.param == "sqlite" else None
    if u is None:
        u = request.getfixturevalue("pg_url")
    monkeypatch.setenv("WGJIT_STORE", u)
    return u


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def key() -> str:
    return PrivateKey.generate().public_key().b64()


def test_import_export_round_trip(
    url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    psk = PresharedKey.generate().b64()
    k = [key() for _ in range(3)]
    src = tmp_path / "in.csv"
    src.write_text(
        "name,public_key,allowed_ips,preshared_key,revoked\n"
        f"a,{k[0]},100.65.0.2/32,,false\n"
        f'b,{k[1]},"100.65.0.3/32, fd65::3/128",{psk},true\n'
        f"c,{k[2]},100.65.0.4/32,,\n"
    )
    rc, out, err = run(capsys, "peer", "import", str(src))
    assert (rc, err) == (0, "") and out == "3 rows: 3 added, 0 updated, 0 unchanged, 0 skipped\n"
    rc, out, _ = run(capsys, "peer", "import", str(src))  # idempotent
    assert rc == 0 and "0 added, 0 updated, 3 unchanged" in out

    dst = tmp_path / "out.jsonl"
    rc, out, _ = run(capsys, "peer", "export", str(dst))
    assert rc == 0 and out == f"exported 3 peers to {dst}\n"
    assert stat.S_IMODE(dst.stat().st_mode) == 0o600  # it holds preshared keys
    recs = [json.loads(line) for line in dst.read_text().splitlines()]
    assert recs[1] == {
        "name": "b",
        "public_key": k[1],
        "allowed_ips": ["100.65.0.3/32", "fd65::3/128"],
        "preshared_key": psk,
        "revoked": True,
        "disabled": False,
        "expires_at": None,
        "handshake_mark": None,
    }
    # the export imports back unchanged; CSV export too
    rc, out, _ = run(capsys, "peer", "import", str(dst))
    assert rc == 0 and "3 unchanged" in out
    rc, out, _ = run(capsys, "peer", "export", "--format", "csv")
    assert out.splitlines()[0] == (
        "name,public_key,allowed_ips,preshared_key,revoked,disabled,expires_at,handshake_mark"
    )
    assert out.splitlines()[2] == f"b,{k[1]},100.65.0.3/32 fd65::3/128,{psk},true,false,,"


def test_a_backup_keeps_disabled_and_expiry(
    url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Export is a full backup: a disabled peer and an expiry come back as they were (in both
    formats), and re-importing the backup changes nothing."""
    k = [key() for _ in range(3)]
    assert run(capsys, "peer", "add", "a", "--allowed-ips", "100.65.0.2/32", "--public-key",
               k[0], "--expires", "30d")[0] == 0  # fmt: skip
    assert run(capsys, "peer", "add", "b", "--allowed-ips", "100.65.0.3/32", "--public-key",
               k[1])[0] == 0  # fmt: skip
    assert run(capsys, "peer", "disable", "b")[0] == 0
    with open_store(url) as s:  # an expiry set through the API, to the microsecond
        s.add_peer("c", PublicKey.from_b64(k[2]), parse_networks("100.65.0.4/32"),
                   expires_at=2_000_000_000.25)  # fmt: skip
        before = {p.name: p for p in s.list_peers()}
    for fmt in ("jsonl", "csv"):
        backup = tmp_path / f"backup.{fmt}"
        assert run(capsys, "peer", "export", str(backup))[0] == 0
        rc, out, _ = run(capsys, "peer", "import", str(backup))  # onto the same store
        assert rc == 0 and "3 unchanged" in out, fmt
        fresh = f"sqlite://{tmp_path}/fresh-{fmt}.db"
        rc, out, err = run(capsys, "--store", fresh, "peer", "import", str(backup))
        assert (rc, err) == (0, "") and "3 added" in out
        with open_store(fresh) as s:
            after = {p.name: p for p in s.list_peers()}
        for name, p in before.items():
            q = after[name]
            assert (q.disabled, q.expires_at, q.state) == (p.disabled, p.expires_at, p.state)
    rec = json.loads((tmp_path / "backup.jsonl").read_text().splitlines()[2])
    assert rec["expires_at"] == "2033-05-18T03:33:20.250000Z"
    # a time without its offset is ambiguous: a bad row
    src = tmp_path / "naive.csv"
    src.write_text(f"name,public_key,allowed_ips,expires_at\nd,{key()},100.65.0.9/32,2030-01-01\n")
    rc, out, err = run(capsys, "peer", "import", str(src))
    assert rc == 1 and f"{src}:2: field expires_at:" in err


def test_bad_rows_by_line_number_and_strict(
    url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = key()
    src = tmp_path / "in.jsonl"
    src.write_text(
        json.dumps({"name": "ok", "public_key": good, "allowed_ips": ["100.65.0.2/32"]}) + "\n"
        + "{not json\n"
        + json.dumps({"name": "bad name", "public_key": key(), "allowed_ips": "10.0.0.1/32"})
        + "\n\n"
        + json.dumps({"name": "nokey", "allowed_ips": "10.0.0.1/32"}) + "\n"
        + json.dumps({"name": "ips", "public_key": key(), "allowed_ips": "10.0.0.300/32"}) + "\n"
        + json.dumps({"name": "dup", "public_key": good, "allowed_ips": "10.0.0.1/32"}) + "\n"
    )  # fmt: skip
    rc, out, err = run(capsys, "peer", "import", "--strict", str(src))
    assert rc == 1 and "nothing imported (--strict)" in err
    assert open_store(url).list_peers() == []
    rc, out, err = run(capsys, "peer", "import", str(src))
    assert rc == 1 and out == "6 rows: 1 added, 0 updated, 0 unchanged, 5 skipped\n"
    lines = err.splitlines()
    assert lines[0].startswith(f"wgjit: {src}:2: not valid JSON")
    assert lines[1].startswith(f"wgjit: {src}:3: field name: invalid peer name 'bad name'")
    assert (
        lines[2] == f"wgjit: {src}:5: field public_key is missing; every row needs name,"
        " public_key, allowed_ips"
    )
    assert lines[3].startswith(f"wgjit: {src}:6: field allowed_ips:")
    assert lines[4] == f"wgjit: {src}:7: public key appears earlier in the file"
    # a key that the store already has under another name
    other = tmp_path / "other.csv"
    other.write_text(f"name,public_key,allowed_ips\nnew,{good},10.0.0.9/32\n")
    rc, out, err = run(capsys, "peer", "import", str(other))
    assert rc == 1 and err == f"wgjit: {other}:2: public key is already used by peer 'ok'\n"
    # --strict finds conflicts with stored peers before writing anything
    mixed = tmp_path / "mixed.csv"
    mixed.write_text(
        f"name,public_key,allowed_ips\nfresh,{key()},10.0.0.10/32\nnew,{good},10.0.0.9/32\n"
        f"ok,{key()},100.65.0.2/32\n"
    )
    rc, out, err = run(capsys, "peer", "import", "--strict", str(mixed))
    assert rc == 1 and "nothing imported (--strict)" in err
    assert f"{mixed}:3: public key is already used by peer 'ok'" in err
    assert f"{mixed}:4: a peer with this name exists with another public key" in err
    assert [p.name for p in open_store(url).list_peers()] == ["ok"]


def test_bad_files(url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = run(capsys, "peer", "import", str(tmp_path / "peers.txt"))
    assert rc == 1 and err.startswith("wgjit: error: cannot tell the format of")
    rc, _, err = run(capsys, "peer", "import", str(tmp_path / "missing.csv"))
    assert rc == 1 and err.startswith("wgjit: error: cannot read") and err[-1] == "\n"
    hdr = tmp_path / "h.csv"
    hdr.write_text("nom,cle\nx,y\n")
    rc, _, err = run(capsys, "peer", "import", str(hdr))
    assert rc == 1 and "CSV header lacks name, public_key, allowed_ips" in err


def test_store_migrate(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(capsys, "store", "migrate")
    assert rc == 0 and out.startswith("store ") and "is at schema version" in out
    rc, out2, _ = run(capsys, "store", "migrate")  # again: nothing to do
    assert rc == 0 and out2 == out


def test_import_from_stdin_needs_a_format(
    url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import io

    line = json.dumps({"name": "a", "public_key": key(), "allowed_ips": "100.65.0.2/32"})
    monkeypatch.setattr("sys.stdin", io.StringIO(line + "\n"))
    rc, _, err = run(capsys, "peer", "import", "-")
    assert rc == 1 and "--format csv|jsonl" in err
    rc, out, _ = run(capsys, "peer", "import", "-", "--format", "jsonl")
    assert rc == 0 and out.startswith("1 rows: 1 added")


@pytest.mark.parametrize(
    ("raw_url", "shown"),
    [
        ("postgresql://u:secret@db:5432/wgjit", "postgresql://u:***@db:5432/wgjit"),
        (
            "postgres:///wgjit?host=/run/pg&password=secret",
            "postgres:///wgjit?host=/run/pg&password=***",
        ),
        ("postgresql:///wgjit?host=/run/pg", "postgresql:///wgjit?host=/run/pg"),
    ],
)
def test_redact(raw_url: str, shown: str) -> None:
    from wgjit.store.postgres import redact

    assert redact(raw_url) == shown


def test_export_is_private_atomic_and_never_overwrites_by_chance(
    url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    psk = PresharedKey.generate().b64()
    src = tmp_path / "in.csv"
    src.write_text(f"name,public_key,allowed_ips,preshared_key\na,{key()},100.65.0.2/32,{psk}\n")
    assert run(capsys, "peer", "import", str(src))[0] == 0

    old = tmp_path / "old.jsonl"
    old.write_text("previous backup\n")
    old.chmod(0o644)
    rc, out, err = run(capsys, "peer", "export", str(old))
    assert rc == 1 and err == f"wgjit: error: {old} exists; pass --force to replace it\n"
    assert old.read_text() == "previous backup\n"
    rc, out, err = run(capsys, "peer", "export", str(old), "--force")
    assert rc == 0 and psk in old.read_text()
    assert stat.S_IMODE(old.stat().st_mode) == 0o600  # a 0644 file does not stay 0644

    precious = tmp_path / "precious"
    precious.write_text("keep")
    link = tmp_path / "link.jsonl"
    link.symlink_to(precious)
    for extra in ([], ["--force"]):
        rc, _, err = run(capsys, "peer", "export", str(link), *extra)
        assert rc == 1 and "is a symbolic link" in err and err.count("\n") == 1
    assert precious.read_text() == "keep" and link.is_symlink()

    rc, _, err = run(capsys, "peer", "export", str(tmp_path / "no" / "dir.jsonl"))
    assert rc == 1 and err.startswith("wgjit: error: cannot write") and err.count("\n") == 1
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert leftovers == []
