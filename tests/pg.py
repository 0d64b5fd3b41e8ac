"""A real PostgreSQL server for the tests, from Debian's ``postgresql`` package: one cluster per
test session in a temporary directory, on 127.0.0.1 and a free port, with ``fsync`` on (the
durability tests mean it); each test gets a database of its own. Required in CI (``.ci/run``
installs it), skipped elsewhere when the binaries are missing.

Run as a script to keep one up for development: ``python -m tests.pg /tmp/pg`` prints its URL.
"""

from __future__ import annotations

import glob
import itertools
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

SUPERUSER = "sms"


def binaries() -> Path | None:
    """The newest installed server's bin directory (``/usr/lib/postgresql/N/bin``)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    return Path(found[-1]).parent if found else None


def _as_owner(cmd: list[str], **kw) -> subprocess.CompletedProcess[str]:
    """PostgreSQL refuses to run as root: as root, run it as the ``postgres`` user."""
    if os.geteuid() == 0:
        cmd = ["runuser", "-u", "postgres", "--", *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


@dataclass
class Server:
    """One running cluster; :meth:`database` hands out fresh databases."""

    dir: Path
    port: int
    bin: Path
    _n: itertools.count = field(default_factory=lambda: itertools.count(1))

    @property
    def data(self) -> Path:
        return self.dir / "data"

    def url(self, db: str = "postgres") -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{db}"

    def psql(self, sql: str, db: str = "postgres") -> str:
        r = subprocess.run(["psql", "-X", "-q", "-At", "-v", "ON_ERROR_STOP=1", self.url(db), "-c", sql],
                           capture_output=True, text=True, timeout=60)
        if r.returncode:
            raise RuntimeError(f"psql failed: {r.stderr}")
        return r.stdout.strip()

    def database(self, prefix: str = "t") -> str:
        """A new, empty database; its URL."""
        name = f"{prefix}_{os.getpid()}_{next(self._n)}"
        self.psql(f"CREATE DATABASE {name}")
        return self.url(name)

    def start(self) -> None:
        r = _as_owner([str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.dir / "log"),
                       "-w", "-t", "60", "-o", f"-p {self.port}", "start"], timeout=90)
        if r.returncode:
            log = (self.dir / "log").read_text(errors="replace")[-2000:] if (self.dir / "log").exists() else ""
            raise RuntimeError(f"postgres did not start: {r.stdout}{r.stderr}\n{log}")

    def stop(self, mode: str = "fast") -> None:
        _as_owner([str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop"],
                  timeout=90)

    def running(self) -> bool:
        return _as_owner([str(self.bin / "pg_ctl"), "-D", str(self.data), "status"], timeout=30).returncode == 0


def start(directory: Path | None = None, port: int | None = None) -> Server:
    """initdb and start a cluster (fails loudly if it cannot)."""
    from tests.tools import free_port

    bin_dir = binaries()
    if bin_dir is None:
        raise FileNotFoundError("PostgreSQL is not installed (apt-get install postgresql)")
    directory = Path(directory or tempfile.mkdtemp(prefix="sms-pg-"))
    directory.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        shutil.chown(directory, "postgres", "postgres")
    server = Server(directory, port or free_port(), bin_dir)
    if not (server.data / "PG_VERSION").exists():
        r = _as_owner([str(bin_dir / "initdb"), "-D", str(server.data), "-U", SUPERUSER, "-A", "trust",
                       "-E", "UTF8", "--no-locale"], timeout=120)
        if r.returncode:
            raise RuntimeError(f"initdb failed: {r.stdout}{r.stderr}")
        with open(server.data / "postgresql.conf", "a") as conf:
            conf.write(f"\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{directory}'\n"
                       "max_connections = 200\nfsync = on\nsynchronous_commit = on\n"
                       "shared_buffers = 64MB\nlog_min_messages = warning\n")
    server.start()
    return server


def main() -> None:
    directory = Path(sys.argv[1]) if len(sys.argv) > 1 else None
    port = int(sys.argv[2]) if len(sys.argv) > 2 else None
    server = start(directory, port)
    print(server.url(), flush=True)
    if "--wait" in sys.argv:
        try:
            while True:
                time.sleep(3600)
        finally:
            server.stop()


if __name__ == "__main__":
    main()
