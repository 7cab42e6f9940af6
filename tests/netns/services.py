"""Real services and real clients for the security battery: nginx serving HTTPS on 443
and PostgreSQL on 5432 inside a lab's server namespace, reached with curl and psql from
client namespaces that carry the addresses an operator's policy names.

Every process is started inside a namespace the test created (``ip netns exec``) and
stopped by its PID; data and configuration live in a temporary directory.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from hostwall import netns

POSTGRES_PASSWORD = "correct horse battery staple"  # the attacker in these tests knows it
HTTPS_BODY = "hostwall lab: https\n"
START_TIMEOUT = 30.0


def _run(*command: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, check=True, timeout=timeout)


def _stop(process: subprocess.Popen[bytes], stop_signal: int = signal.SIGTERM) -> None:
    if process.poll() is None:
        process.send_signal(stop_signal)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def _listening(namespace: str, port: int) -> bool:
    """True once something accepts TCP on the namespace's loopback at port."""
    with netns.entered(namespace):
        probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    with probe:
        probe.settimeout(0.5)
        return probe.connect_ex(("127.0.0.1", port)) == 0


def _wait_listening(namespace: str, port: int, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while not _listening(namespace, port):
        if process.poll() is not None or time.monotonic() > deadline:
            _stop(process)
            raise RuntimeError(f"service on port {port} in {namespace} did not start: {log.read_text()[-2000:]}")
        time.sleep(0.1)


@dataclass
class ClientLink:
    """A client namespace on its own veth link to the server, with the given addresses."""

    namespace: str
    addresses: tuple[str, ...]  # "203.0.113.10/24", "2001:db8:b2b::10/64"
    server_addresses: tuple[str, ...]  # the server's side of the link

    def server(self, family: int = 4) -> str:
        return next(a.split("/")[0] for a in self.server_addresses if (":" in a) == (family == 6))

    def address(self, index: int = 0) -> str:
        return self.addresses[index].split("/")[0]


def add_client_link(server_namespace: str, namespace: str, server_device: str,
                    addresses: tuple[str, ...], server_addresses: tuple[str, ...]) -> ClientLink:
    """Creates namespace, links it to the server and addresses both sides (nodad: the tests
    start at once). The caller deletes the namespace by name."""
    ip = ("ip",)
    _run(*ip, "netns", "add", namespace)
    _run(*ip, "-n", namespace, "link", "set", "lo", "up")
    _run(*ip, "-n", server_namespace, "link", "add", server_device, "type", "veth",
         "peer", "name", "eth0", "netns", namespace)
    for address in server_addresses:
        _run(*ip, "-n", server_namespace, "addr", "add", address, "dev", server_device, "nodad")
    for address in addresses:
        _run(*ip, "-n", namespace, "addr", "add", address, "dev", "eth0", "nodad")
    _run(*ip, "-n", server_namespace, "link", "set", server_device, "up")
    _run(*ip, "-n", namespace, "link", "set", "eth0", "up")
    return ClientLink(namespace, addresses, server_addresses)


@dataclass
class Nginx:
    """nginx serving HTTPS on 443 (IPv4 and IPv6) with a certificate made for the test."""

    namespace: str
    directory: Path
    process: subprocess.Popen[bytes] | None = None
    server_extra: str = ""  # directives for the server block, e.g. an include of `hostwall export`

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        certificate, key = self.directory / "cert.pem", self.directory / "key.pem"
        _run("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-nodes", "-days", "2", "-subj", "/CN=hostwall-lab", "-keyout", str(key), "-out", str(certificate))
        temp = self.directory / "temp"
        temp.mkdir(exist_ok=True)
        config = self.directory / "nginx.conf"
        config.write_text(f"""
daemon off;
worker_processes 1;
pid {self.directory}/nginx.pid;
error_log {self.directory}/error.log notice;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {temp}/body;
    proxy_temp_path {temp}/proxy;
    fastcgi_temp_path {temp}/fastcgi;
    uwsgi_temp_path {temp}/uwsgi;
    scgi_temp_path {temp}/scgi;
    server {{
        listen 443 ssl;
        listen [::]:443 ssl;
        ssl_certificate {certificate};
        ssl_certificate_key {key};
        {self.server_extra}
        # `return` alone would answer in the rewrite phase, before allow/deny (the access
        # phase) is asked; try_files comes after it and hands over to the answer.
        location / {{ try_files /.none @answer; }}
        location @answer {{ default_type text/plain; return 200 "{HTTPS_BODY.strip()}\\n"; }}
    }}
}}
""")
        log = self.directory / "error.log"
        self.process = subprocess.Popen(
            ["ip", "netns", "exec", self.namespace, "nginx", "-e", str(log), "-p", str(self.directory),
             "-c", str(config)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_listening(self.namespace, 443, self.process, log)

    def stop(self) -> None:
        if self.process is not None:
            _stop(self.process, signal.SIGTERM)  # fast shutdown: open connections are closed
            self.process = None


@dataclass
class Postgres:
    """PostgreSQL on 5432 (IPv4 and IPv6), password authentication for every host.

    The cluster lives in a directory of its own, owned by the postgres system user
    (the server refuses to run as root)."""

    namespace: str
    process: subprocess.Popen[bytes] | None = None
    directory: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="hostwall-pg-")))
    hba: str | None = None  # host lines of pg_hba.conf instead of password auth for everyone
    ssl: bool = False  # a certificate made for the test, so that hostssl lines can match

    @staticmethod
    def binaries() -> Path:
        versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"), key=lambda p: int(p.parent.parent.name))
        if not versions:
            raise RuntimeError("no PostgreSQL server under /usr/lib/postgresql (apt install postgresql)")
        return versions[-1].parent

    def start(self) -> None:
        binaries = self.binaries()
        data = self.directory / "data"
        password_file = self.directory / "password"
        password_file.write_text(POSTGRES_PASSWORD + "\n")
        shutil.chown(self.directory, "postgres", "postgres")
        shutil.chown(password_file, "postgres", "postgres")
        self.directory.chmod(0o700)
        # setpriv executes the server in place (runuser would fork and not pass SIGINT on),
        # so the PID the test holds is the postmaster's and stopping it stops the cluster.
        as_postgres = ("setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups", "--")
        _run(*as_postgres, str(binaries / "initdb"), "-D", str(data), "-U", "postgres", "--no-sync",
             f"--pwfile={password_file}", "--auth-local=trust", "--auth-host=scram-sha-256", timeout=120)
        (data / "pg_hba.conf").write_text("local all all trust\n" + (self.hba if self.hba is not None else
            "host all all 0.0.0.0/0 scram-sha-256\n"
            "host all all ::/0 scram-sha-256\n"))
        settings = []
        if self.ssl:
            certificate, key = self.directory / "server.crt", self.directory / "server.key"
            _run("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                 "-days", "2", "-subj", "/CN=hostwall-lab", "-keyout", str(key), "-out", str(certificate))
            for path in (certificate, key):
                shutil.chown(path, "postgres", "postgres")
            key.chmod(0o600)  # the server refuses a key others can read
            settings = ["-c", "ssl=on", "-c", f"ssl_cert_file={certificate}", "-c", f"ssl_key_file={key}"]
        log = self.directory / "server.log"
        log.touch()
        shutil.chown(log, "postgres", "postgres")
        with log.open("ab") as output:
            self.process = subprocess.Popen(
                ["ip", "netns", "exec", self.namespace, *as_postgres, str(binaries / "postgres"), "-D", str(data),
                 "-c", "listen_addresses=*", "-c", "port=5432", "-c", f"unix_socket_directories={self.directory}",
                 "-c", "fsync=off", "-c", "full_page_writes=off", "-c", "logging_collector=off", *settings],
                stdin=subprocess.DEVNULL, stdout=output, stderr=output)
        _wait_listening(self.namespace, 5432, self.process, log)

    def stop(self) -> None:
        if self.process is not None:
            _stop(self.process, signal.SIGINT)  # fast shutdown: disconnects clients, no checkpoint wait
            self.process = None
        shutil.rmtree(self.directory, ignore_errors=True)


def _environment(**extra: str) -> dict[str, str]:
    keep = {k: v for k, v in os.environ.items() if k in ("PATH", "LANG", "LC_ALL", "HOME", "TERM")}
    return {**keep, **extra}


def curl(namespace: str, host: str, *, source: str | None = None, timeout: float = 2.0) -> str:
    """GET https://host/ from namespace: the body, or 'timeout' / 'refused' / 'error N'."""
    url_host = f"[{host}]" if ":" in host else host
    command = ["ip", "netns", "exec", namespace, "curl", "--silent", "--insecure", "--noproxy", "*",
               "--max-time", str(timeout), "--connect-timeout", str(timeout)]
    if source is not None:
        command += ["--interface", source]
    result = subprocess.run([*command, f"https://{url_host}/"], capture_output=True, text=True,
                            timeout=timeout + 10, check=False, env=_environment())
    if result.returncode == 0:
        return result.stdout
    return {28: "timeout", 7: "refused"}.get(result.returncode, f"error {result.returncode}")


def psql(namespace: str, host: str, query: str = "SELECT 'hostwall lab: postgres'",
         *, password: str = POSTGRES_PASSWORD, timeout: int = 2) -> str:
    """One query with the right password: its result, or 'timeout' / 'refused' / the error."""
    result = subprocess.run(
        ["ip", "netns", "exec", namespace, "psql", "--no-psqlrc", "-At", "-h", host, "-U", "postgres",
         "-d", "postgres", "-c", query],
        capture_output=True, text=True, timeout=timeout + 10, check=False,
        env=_environment(PGPASSWORD=password, PGCONNECT_TIMEOUT=str(timeout)))
    if result.returncode == 0:
        return result.stdout.strip()
    if "timeout expired" in result.stderr:
        return "timeout"
    if "Connection refused" in result.stderr:
        return "refused"
    return result.stderr.strip()


class PsqlSession:
    """An established psql session that runs a query every interval and records when each
    answer arrives, to see exactly when a revoked connection stops getting answers."""

    def __init__(self, namespace: str, host: str, interval: float = 0.1) -> None:
        self.answers: list[float] = []
        self.process = subprocess.Popen(
            ["ip", "netns", "exec", namespace, "stdbuf", "-oL", "psql", "--no-psqlrc", "-At", "-h", host,
             "-U", "postgres", "-d", "postgres"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            env=_environment(PGPASSWORD=POSTGRES_PASSWORD, PGCONNECT_TIMEOUT="3"))
        assert self.process.stdin is not None
        # \watch refuses an empty query buffer, which is what -c leaves it; from stdin it repeats.
        self.process.stdin.write(f"SELECT 'alive' \\watch {interval}\n".encode())
        self.process.stdin.close()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            if line.strip() == b"alive":
                self.answers.append(time.monotonic())

    def wait_for_answers(self, count: int, seconds: float = 10.0) -> bool:
        deadline = time.monotonic() + seconds
        while len(self.answers) < count and time.monotonic() < deadline and self.process.poll() is None:
            time.sleep(0.05)
        return len(self.answers) >= count

    def close(self) -> None:
        _stop(self.process, signal.SIGKILL)  # a client: nothing to shut down cleanly
        with contextlib.suppress(ValueError, OSError):
            assert self.process.stdout is not None
            self.process.stdout.close()
        self._reader.join(timeout=5)
