"""A throwaway PostgreSQL 15 cluster with pg_postback preloaded.

Used by the end-to-end tests (as a library) and by `make demo` (as a command:
`python3 tests/e2e/cluster.py start DIR PORT` / `stop DIR`). The cluster runs as
the `postgres` OS user because initdb refuses root.
"""

import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import psycopg

PG_BIN = "/usr/lib/postgresql/15/bin"
OS_USER = "postgres"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def as_postgres(args, **kwargs):
    """Runs a server binary as the postgres OS user (or directly when we are it)."""
    if os.geteuid() == 0:
        args = ["runuser", "-u", OS_USER, "--"] + args
    return subprocess.run(args, check=True, capture_output=True, text=True, **kwargs)


class Cluster:
    def __init__(self, datadir, port, settings=None):
        self.datadir = datadir
        self.port = port
        self.logfile = os.path.join(datadir, "server.log")
        self.settings = {
            "shared_preload_libraries": "'pg_postback'",
            "postback.allowed_targets": "'127.0.0.1/32'",
            "listen_addresses": "'127.0.0.1'",
            "unix_socket_directories": f"'{datadir}'",
            "port": str(port),
            "log_line_prefix": "'%m [%p] %b '",
            "fsync": "off",
            "max_connections": "50",
            # one worker per database unless a test asks for more (the default follows the cores)
            "postback.workers": "1",
        }
        self.settings.update(settings or {})

    @classmethod
    def create(cls, datadir=None, port=None, settings=None):
        datadir = datadir or tempfile.mkdtemp(prefix="pg_postback_e2e_")
        os.makedirs(datadir, exist_ok=True)
        pw = pwd.getpwnam(OS_USER)
        if os.geteuid() == 0:
            os.chown(datadir, pw.pw_uid, pw.pw_gid)
        os.chmod(datadir, 0o700)
        cluster = cls(datadir, port or free_port(), settings)
        as_postgres([f"{PG_BIN}/initdb", "-D", datadir, "-U", OS_USER, "-A", "trust",
                     "--no-sync", "-E", "UTF8", "--locale", "C.UTF-8"])
        with open(os.path.join(datadir, "postgresql.conf"), "a") as conf:
            conf.write("\n# pg_postback test/demo settings\n")
            for key, value in cluster.settings.items():
                conf.write(f"{key} = {value}\n")
        return cluster

    def start(self):
        as_postgres([f"{PG_BIN}/pg_ctl", "-D", self.datadir, "-l", self.logfile, "-w", "-t", "60", "start"])

    def stop(self, mode="fast", timeout=60):
        return as_postgres([f"{PG_BIN}/pg_ctl", "-D", self.datadir, "-m", mode, "-w", "-t", str(timeout), "stop"])

    def is_running(self):
        try:
            as_postgres([f"{PG_BIN}/pg_ctl", "-D", self.datadir, "status"])
            return True
        except subprocess.CalledProcessError:
            return False

    def destroy(self):
        if self.is_running():
            try:
                self.stop("immediate")
            except subprocess.CalledProcessError:
                pass
        shutil.rmtree(self.datadir, ignore_errors=True)

    def dsn(self, dbname="postgres"):
        return f"host=127.0.0.1 port={self.port} user={OS_USER} dbname={dbname}"

    def connect(self, dbname="postgres", autocommit=True):
        return psycopg.connect(self.dsn(dbname), autocommit=autocommit)

    def log(self):
        with open(self.logfile, errors="replace") as f:
            return f.read()

    def wait_for(self, predicate, timeout=20.0, interval=0.05, what="condition"):
        """Polls `predicate` until it returns a truthy value or the deadline passes."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout}s waiting for {what() if callable(what) else what}")
            time.sleep(interval)


def main(argv):
    if len(argv) >= 3 and argv[0] == "start":
        datadir, port = argv[1], int(argv[2])
        if os.path.exists(os.path.join(datadir, "PG_VERSION")):
            Cluster(datadir, port).destroy()
        cluster = Cluster.create(datadir, port)
        cluster.start()
        return 0
    if len(argv) == 2 and argv[0] == "stop":
        Cluster(argv[1], 0).destroy()
        return 0
    print("usage: cluster.py start DIR PORT | stop DIR", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
