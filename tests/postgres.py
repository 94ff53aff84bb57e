"""A throwaway PostgreSQL cluster for tests and benchmarks: initdb into a temporary directory,
trust authentication, a free loopback port, the socket in the same directory.

PostgreSQL refuses to run as root, so under root the data directory belongs to the `postgres`
system user (which Debian's package creates) and initdb and pg_ctl run as that user.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import psycopg
from psycopg import sql

SERVER_USER = "postgres"
# Tests want speed, not durability: a crash of a throwaway cluster loses nothing of value.
FAST_SETTINGS = {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}


class PostgresNotFound(RuntimeError):
    """No PostgreSQL server binaries (initdb, pg_ctl) were found."""


def find_bindir() -> Path:
    """The directory holding initdb and pg_ctl: PATH first, then Debian's versioned dirs."""
    initdb = shutil.which("initdb")
    if initdb and shutil.which("pg_ctl"):
        return Path(initdb).resolve().parent
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: int(p.split("/")[4]) if p.split("/")[4].isdigit() else 0,
    )
    if candidates:
        return Path(candidates[-1]).parent
    raise PostgresNotFound(
        "no PostgreSQL server binaries (initdb, pg_ctl) on PATH or in /usr/lib/postgresql/*/bin"
    )


def find_client(name: str, bindir: Path | None = None) -> str:
    """A client program such as psql: beside the server binaries, else on PATH."""
    if bindir is not None and (bindir / name).exists():
        return str(bindir / name)
    found = shutil.which(name)
    if found is None:
        raise PostgresNotFound(f"{name} not found beside {bindir} or on PATH")
    return found


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Cluster:
    """One initialised cluster; `start()` is called by the constructor."""

    def __init__(
        self,
        settings: Mapping[str, str] | None = None,
        port: int | None = None,
        bindir: Path | None = None,
    ) -> None:
        self.bindir = bindir or find_bindir()
        self.settings = dict(FAST_SETTINGS if settings is None else settings)
        self.port = port or free_port()
        self.host = "127.0.0.1"
        self.dir = Path(tempfile.mkdtemp(prefix="polystream-pg-"))
        self.data = self.dir / "data"
        self.log = self.dir / "server.log"
        self._user: str | None = None
        if os.geteuid() == 0:
            self._user = SERVER_USER
            entry = pwd.getpwnam(SERVER_USER)
            os.chown(self.dir, entry.pw_uid, entry.pw_gid)
        self.running = False
        try:
            self._run(
                "initdb",
                "-D",
                str(self.data),
                "-A",
                "trust",
                "-U",
                "postgres",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            )
            self.start()
        except BaseException:
            shutil.rmtree(self.dir, ignore_errors=True)
            raise

    def _run(self, program: str, *args: str) -> None:
        kwargs: dict[str, Any] = {}
        if self._user:
            entry = pwd.getpwnam(self._user)
            kwargs = {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}
        done = subprocess.run(
            [str(self.bindir / program), *args],
            capture_output=True,
            text=True,
            cwd=self.dir,
            check=False,
            **kwargs,
        )
        if done.returncode != 0:
            log = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
            raise RuntimeError(
                f"{program} failed ({done.returncode}): {done.stderr.strip()}\n{log}".strip()
            )

    def start(self) -> None:
        """Start the server (again) on the same port and data directory."""
        options = [
            f"-p {self.port}",
            f"-k {self.dir}",
            f"-c listen_addresses={self.host}",
            *(f"-c {k}={v}" for k, v in self.settings.items()),
        ]
        self._run(
            "pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "30",
            "-o", " ".join(options), "start",
        )  # fmt: skip
        self.running = True

    def stop(self, mode: str = "fast") -> None:
        """Stop the server; `fast` ends open sessions as an administrator's shutdown does."""
        if self.running:
            self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "30", "stop")
            self.running = False

    def url(self, dbname: str = "postgres", password: str | None = None) -> str:
        auth = "postgres" if password is None else f"postgres:{password}"
        return f"postgresql://{auth}@{self.host}:{self.port}/{dbname}"

    def create_database(self, name: str) -> str:
        """Create database `name`; return its URL."""
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.url(name)

    def drop_database(self, name: str) -> None:
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )

    def close(self) -> None:
        """Stop the server and delete everything."""
        with contextlib.suppress(RuntimeError):
            self.stop("immediate")
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Cluster:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
