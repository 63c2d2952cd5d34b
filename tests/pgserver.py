"""A throwaway PostgreSQL server for tests and benchmarks: initdb in a temporary directory,
listening only on a unix socket in that directory (reachable from every network namespace),
run as an unprivileged user when started as root, stopped and deleted on close.

It never touches a system cluster: everything lives under its own directory.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import psycopg

INSTALL_HINT = "install postgresql: apt-get install -y postgresql (needs initdb, pg_ctl, postgres)"
SUPERUSER = "wgjit"
# the server refuses to run as root; this user owns the cluster directory when we are root
RUN_AS = "nobody"


class PostgresUnavailable(RuntimeError):
    pass


def find_bindir() -> Path:
    """Directory with initdb/pg_ctl/postgres: PATH first, then Debian's versioned dirs."""
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return Path(os.path.realpath(found)).parent
    for d in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if (Path(d) / "initdb").exists() and (Path(d) / "pg_ctl").exists():
            return Path(d)
    raise PostgresUnavailable(f"PostgreSQL server binaries not found; {INSTALL_HINT}")


class PostgresServer:
    """One cluster. `url(db)` gives a store URL; `create_database()` a fresh database."""

    def __init__(self, settings: dict[str, str] | None = None) -> None:
        self.bindir = find_bindir()
        self.base = Path(tempfile.mkdtemp(prefix="wgjit-pg-"))
        self.data = self.base / "data"
        self.log = self.base / "server.log"
        self.settings = {
            "listen_addresses": "''",
            "unix_socket_directories": f"'{self.base}'",
            "fsync": "off",  # throwaway: speed over durability
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "max_connections": "200",
            **(settings or {}),
        }
        self._user: dict[str, Any] = {}
        if os.geteuid() == 0:
            pw = pwd.getpwnam(RUN_AS)
            self._user = {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}
            os.chown(self.base, pw.pw_uid, pw.pw_gid)
        os.chmod(self.base, 0o755)
        self._seq = 0
        self.started = False

    def _run(self, *argv: str) -> None:
        p = subprocess.run(
            [str(self.bindir / argv[0]), *argv[1:]],
            capture_output=True,
            text=True,
            cwd=self.base,
            **self._user,
        )
        if p.returncode != 0:
            log = self.log.read_text()[-2000:] if self.log.exists() else ""
            raise PostgresUnavailable(
                f"{argv[0]} failed ({p.returncode}): {p.stderr.strip()}\n{log}"
            )

    def start(self) -> PostgresServer:
        if not self.data.exists():
            self._run(
                "initdb", "-D", str(self.data), "-U", SUPERUSER, "--auth=trust",
                "--no-sync", "-E", "UTF8", "--locale=C",
            )  # fmt: skip
            with (self.data / "postgresql.conf").open("a") as f:
                for k, v in self.settings.items():
                    f.write(f"{k} = {v}\n")
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60", "start")
        self.started = True
        return self

    def stop(self, mode: str = "fast") -> None:
        if self.started:
            self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")
            self.started = False

    def restart(self) -> None:
        self.stop()
        self.start()

    def postmaster_pid(self) -> int | None:
        try:
            return int((self.data / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def children(self, postmaster: int) -> list[int]:
        """The postmaster's child processes (backends, background workers)."""
        out = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
            except OSError:  # exited meanwhile
                continue
            # after the command name (which may hold spaces and parentheses): state, ppid
            if int(stat.rsplit(")", 1)[1].split()[1]) == postmaster:
                out.append(int(entry.name))
        return sorted(out)

    def freeze(self) -> list[int]:
        """SIGSTOP the whole server: connections stay open and nothing answers (a hung or
        black-holed database). Returns the pids stopped, for `thaw()`."""
        postmaster = self.postmaster_pid()
        if postmaster is None:
            raise PostgresUnavailable("the server is not running (no postmaster.pid)")
        os.kill(postmaster, signal.SIGSTOP)  # first: a stopped postmaster forks nothing new
        pids = [postmaster]
        for pid in self.children(postmaster):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)
                pids.append(pid)
        return pids

    def thaw(self, pids: list[int]) -> None:
        """SIGCONT what `freeze()` stopped, children first."""
        for pid in reversed(pids):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)

    def close(self) -> None:
        with contextlib.suppress(PostgresUnavailable):
            self.stop("immediate")
        shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> PostgresServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql:///{dbname}?host={self.base}&user={SUPERUSER}"

    def create_database(self, name: str | None = None) -> str:
        """A new empty database; returns its store URL."""
        if name is None:
            self._seq += 1
            name = f"t{os.getpid()}_{self._seq}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')  # type: ignore[arg-type]
        return self.url(name)

    def drop_database(self, url: str) -> None:
        name = url.split("?")[0].rsplit("/", 1)[1]
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')  # type: ignore[arg-type]
