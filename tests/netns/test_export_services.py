"""`hostwall export` against the real services: nginx with the exported include, behind
a real proxy hop, and PostgreSQL with the exported pg_hba lines, in namespaces of their
own, with clients at addresses the policy allows and denies.

Topology (every namespace made here and deleted by name):

    direct (203.0.113.10, 198.51.100.77)  ──┐
    app (10.0.1.10)  outsider (10.0.2.10) ──┼── server: nginx 443, PostgreSQL 5432
    behind (192.0.2.50, 192.0.2.60) ── proxy (10.0.3.2, nginx on 80) ──┘
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from services import POSTGRES_PASSWORD, ClientLink, Nginx, Postgres, _stop, _wait_listening, add_client_link

pytestmark = pytest.mark.root

PROXY = "10.0.3.2"
SERVER_BEHIND_PROXY = "10.0.3.1"
TIMEOUT = 3


def _policy(now: datetime) -> str:
    review = (now + timedelta(days=60)).date().isoformat()
    meta = f"        owner: {{owner}}\n        reason: {{reason}}\n        review_by: {review}\n"
    expired = (now - timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    return (
        "services:\n  https:\n    allow:\n"
        "      - cidr: 203.0.113.10/32\n" + meta.format(owner="partner-b", reason="direct client")
        + "      - cidr: 192.0.2.50/32\n" + meta.format(owner="partner-e", reason="client behind the proxy")
        + "      - cidr: 198.51.100.77/32\n" + meta.format(owner="contractor", reason="expired an hour ago")
        + f"        expires: {expired}\n"
        "  postgres:\n    allow:\n"
        "      - cidr: 10.0.1.0/24\n" + meta.format(owner="platform", reason="application servers")
    )


@dataclass
class Site:
    server: str
    direct: ClientLink
    behind: ClientLink
    app: ClientLink
    outsider: ClientLink
    nginx: Nginx
    include: Path
    export: Callable[..., subprocess.CompletedProcess[str]]


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], capture_output=True, text=True, check=True, timeout=30)


def _proxy_nginx(namespace: str, directory: Path) -> subprocess.Popen[bytes]:
    """A plain reverse proxy that appends the connecting address to X-Forwarded-For, as
    a load balancer does; it keeps whatever the client wrote to the left of it."""
    directory.mkdir(parents=True, exist_ok=True)
    temp = directory / "temp"
    temp.mkdir(exist_ok=True)
    config = directory / "nginx.conf"
    config.write_text(f"""
daemon off;
worker_processes 1;
pid {directory}/nginx.pid;
error_log {directory}/error.log notice;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {temp}/body;
    proxy_temp_path {temp}/proxy;
    fastcgi_temp_path {temp}/fastcgi;
    uwsgi_temp_path {temp}/uwsgi;
    scgi_temp_path {temp}/scgi;
    server {{
        listen 80;
        location / {{
            proxy_pass https://{SERVER_BEHIND_PROXY};
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
        }}
    }}
}}
""")
    log = directory / "error.log"
    process = subprocess.Popen(["ip", "netns", "exec", namespace, "nginx", "-e", str(log), "-p", str(directory),
                                "-c", str(config)],
                               stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_listening(namespace, 80, process, log)
    return process


@pytest.fixture(scope="module")
def site(privileges: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    prefix = f"hw{os.getpid()}xe"
    server = f"{prefix}-srv"
    namespaces = [server]
    started: list[Callable[[], None]] = []
    directory = tmp_path_factory.mktemp("export")
    policy_dir = directory / "policies"
    policy_dir.mkdir()
    (policy_dir / "policy.yaml").write_text(_policy(datetime.now(UTC)))
    environment = {k: v for k, v in os.environ.items() if not k.startswith("HOSTWALL_")}

    def export(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "hostwall", "--policy-dir", str(policy_dir), "--state-dir",
                               str(directory / "state"), "export", *args],
                              capture_output=True, text=True, env=environment, timeout=60, check=False)

    try:
        _ip("netns", "add", server)
        _ip("-n", server, "link", "set", "lo", "up")
        namespaces.append(f"{prefix}-dir")
        direct = add_client_link(server, f"{prefix}-dir", "hwdir", ("203.0.113.10/24", "198.51.100.77/24"),
                                 ("203.0.113.1/24", "198.51.100.1/24"))
        namespaces.append(f"{prefix}-pxy")
        proxy = add_client_link(server, f"{prefix}-pxy", "hwpxy", (f"{PROXY}/24",), (f"{SERVER_BEHIND_PROXY}/24",))
        namespaces.append(f"{prefix}-bhd")
        behind = add_client_link(proxy.namespace, f"{prefix}-bhd", "hwbhd", ("192.0.2.50/24", "192.0.2.60/24"),
                                 ("192.0.2.1/24",))
        namespaces.append(f"{prefix}-app")
        app = add_client_link(server, f"{prefix}-app", "hwapp", ("10.0.1.10/24",), ("10.0.1.1/24",))
        namespaces.append(f"{prefix}-out")
        outsider = add_client_link(server, f"{prefix}-out", "hwout", ("10.0.2.10/24", "fd00:2::10/64"),
                                   ("10.0.2.1/24", "fd00:2::1/64"))

        include = directory / "allow.conf"
        written = export("--format", "nginx", "--trusted-proxy", f"{PROXY}/32", "--output", str(include))
        assert written.returncode == 0, written.stderr
        nginx = Nginx(server, directory / "nginx", server_extra=f"include {include};")
        started.append(nginx.stop)
        nginx.start()
        proxy_process = _proxy_nginx(proxy.namespace, directory / "proxy")
        started.append(lambda: _stop(proxy_process))

        hba = export("--format", "pg_hba")
        assert hba.returncode == 0, hba.stderr
        postgres = Postgres(server, hba=hba.stdout, ssl=True)
        started.append(postgres.stop)
        postgres.start()
        yield Site(server, direct, behind, app, outsider, nginx, include, export)
    finally:
        for stop in reversed(started):
            stop()
        for namespace in reversed(namespaces):
            subprocess.run(["ip", "netns", "delete", namespace], capture_output=True, check=False, timeout=30)


def status(namespace: str, url: str, *, source: str | None = None, forwarded_for: str | None = None) -> str:
    """The HTTP status of GET url from namespace, or curl's failure."""
    command = ["ip", "netns", "exec", namespace, "curl", "--silent", "--insecure", "--noproxy", "*",
               "--output", "/dev/null", "--write-out", "%{http_code}", "--max-time", str(TIMEOUT)]
    if source is not None:
        command += ["--interface", source]
    if forwarded_for is not None:
        command += ["--header", f"X-Forwarded-For: {forwarded_for}"]
    result = subprocess.run([*command, url], capture_output=True, text=True, timeout=TIMEOUT + 10, check=False)
    return result.stdout if result.returncode == 0 else f"curl error {result.returncode}"


def via_proxy(site: Site, source: str, forwarded_for: str | None = None) -> str:
    return status(site.behind.namespace, "http://192.0.2.1/", source=source, forwarded_for=forwarded_for)


def direct(site: Site, source: str, forwarded_for: str | None = None) -> str:
    server = "203.0.113.1" if source.startswith("203.") else "198.51.100.1"
    return status(site.direct.namespace, f"https://{server}/", source=source, forwarded_for=forwarded_for)


def eventually(probe: Callable[[], str], expected: str, seconds: float = 20.0) -> str:
    """Wait for an nginx reload to take effect (workers are replaced asynchronously)."""
    deadline = time.monotonic() + seconds
    seen = probe()
    while seen != expected and time.monotonic() < deadline:
        time.sleep(0.2)
        seen = probe()
    return seen


# --- nginx ------------------------------------------------------------------------------------


def test_nginx_answers_allowed_sources_and_refuses_the_rest(site: Site) -> None:
    assert direct(site, "203.0.113.10") == "200"
    # In the policy, but expired: not exported, so refused.
    assert direct(site, "198.51.100.77") == "403"


def test_a_client_cannot_talk_its_way_in_with_x_forwarded_for(site: Site) -> None:
    """Not from a trusted proxy: the header is ignored, whatever it says."""
    assert direct(site, "198.51.100.77", forwarded_for="203.0.113.10") == "403"
    assert direct(site, "198.51.100.77", forwarded_for="203.0.113.10, 192.0.2.50") == "403"


def test_behind_the_trusted_proxy_the_real_client_address_decides(site: Site) -> None:
    assert via_proxy(site, "192.0.2.50") == "200"
    assert via_proxy(site, "192.0.2.60") == "403"
    # A spoofed leftmost address: the proxy appends the real one, and that one wins.
    assert via_proxy(site, "192.0.2.60", forwarded_for="192.0.2.50") == "403"
    assert via_proxy(site, "192.0.2.60", forwarded_for="203.0.113.10, 192.0.2.50") == "403"
    # An allowed client that adds junk to the left is still itself.
    assert via_proxy(site, "192.0.2.50", forwarded_for="198.51.100.77") == "200"


def test_without_trusted_proxies_the_proxy_is_the_client(site: Site) -> None:
    """The control for the test above: the realip lines are what let 192.0.2.50 in."""
    without = site.export("--format", "nginx", "--output", str(site.include))
    assert without.returncode == 0, without.stderr
    assert site.nginx.process is not None
    try:
        site.nginx.process.send_signal(signal.SIGHUP)
        assert eventually(lambda: via_proxy(site, "192.0.2.50"), "403") == "403"
        assert direct(site, "203.0.113.10") == "200"
    finally:
        restored = site.export("--format", "nginx", "--trusted-proxy", f"{PROXY}/32", "--output", str(site.include))
        assert restored.returncode == 0, restored.stderr
        site.nginx.process.send_signal(signal.SIGHUP)
        assert eventually(lambda: via_proxy(site, "192.0.2.50"), "200") == "200"


def test_check_finds_the_deployed_include_current_and_then_drifted(site: Site) -> None:
    current = site.export("--format", "nginx", "--trusted-proxy", f"{PROXY}/32", "--check", str(site.include))
    assert current.returncode == 0, current.stdout + current.stderr
    drifted = site.export("--format", "nginx", "--check", str(site.include))  # the proxy lines are gone
    assert drifted.returncode == 10
    assert f"-set_real_ip_from {PROXY}/32;" in drifted.stdout.splitlines()


# --- PostgreSQL -------------------------------------------------------------------------------


def connect(client: ClientLink, host: str, sslmode: str = "prefer") -> str:
    result = subprocess.run(
        ["ip", "netns", "exec", client.namespace, "psql", "--no-psqlrc", "-At", "-h", host, "-U", "postgres",
         "-d", "postgres", "-c", "SELECT 'in over ' || CASE WHEN ssl THEN 'ssl' ELSE 'plain' END "
         "FROM pg_stat_ssl WHERE pid = pg_backend_pid()"],
        capture_output=True, text=True, timeout=TIMEOUT + 10, check=False,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PGPASSWORD": POSTGRES_PASSWORD,
             "PGCONNECT_TIMEOUT": str(TIMEOUT), "PGSSLMODE": sslmode})
    return result.stdout.strip() if result.returncode == 0 else result.stderr.strip()


def test_postgres_lets_the_allowed_subnet_in_over_ssl(site: Site) -> None:
    assert connect(site.app, site.app.server()) == "in over ssl"


def test_postgres_refuses_the_allowed_subnet_without_ssl(site: Site) -> None:
    """hostssl: the same client over a plain connection meets the final reject line."""
    assert "pg_hba.conf rejects connection" in connect(site.app, site.app.server(), sslmode="disable")


@pytest.mark.parametrize("family", [4, 6])
def test_postgres_rejects_a_source_outside_the_policy_even_with_the_password(site: Site, family: int) -> None:
    answer = connect(site.outsider, site.outsider.server(family))
    assert "pg_hba.conf rejects connection" in answer, answer
