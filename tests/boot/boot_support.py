"""Machinery of the boot test: a cached Debian rootfs, hostwall installed into it with
`make install`, and systemd booted from it as PID 1 of a container in a lab namespace.

Layers, all under /var/tmp:
- base: ``hostwall-rootfs-<key>``, debootstrap --variant=minbase with systemd and the
  packages scripts/setup.sh installs. Built once; the key hashes everything that went
  into it (suite, mirror, components, keyring, architecture, package list, recipe).
- install: an overlay on the base in which ``make install`` runs, fresh for every test
  session, from a copy of this checkout (so the source, pyproject and units are always
  the ones under test).
- boot: an overlay on both, per boot, holding that boot's policy, enablement and
  drop-ins; systemd-nspawn --volatile=overlay adds a tmpfs on top, so a boot changes
  nothing below it.

Nothing here touches the root network namespace: the container's network is a lab
namespace (``--network-namespace-path``), and every nft call the test makes goes into
that namespace.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import count
from pathlib import Path

from hostwall import netns
from hostwall.lab import Lab, create_lab

REPO = Path(__file__).resolve().parents[2]
CACHE_DIR = Path("/var/tmp")
RECIPE = 1  # bump when the way the base rootfs is built changes
# Beside what scripts/setup.sh installs: an init, a bus, and ss for the listener check.
BOOT_PACKAGES = ("systemd", "systemd-sysv", "dbus", "nftables", "python3", "iproute2", "ca-certificates")
# What `make install` needs from the checkout: the files a user's clone has.
SOURCE_PATHS = ("hostwall", "pyproject.toml", "README.md", "Makefile", "scripts", "units", "policies")
CONTAINER_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

DEBOOTSTRAP_TIMEOUT = 30 * 60
INSTALL_TIMEOUT = 15 * 60
LOCK_TIMEOUT = 40 * 60  # another session may be building the same rootfs
BOOT_TIMEOUT = 90
STOP_TIMEOUT = 30
COMMAND_TIMEOUT = 60


class BootError(RuntimeError):
    """Setting up or booting the container failed; the message says where to look."""


def tail(text: str, lines: int = 60) -> str:
    return "\n".join(text.splitlines()[-lines:])


def strip_ansi(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def run_group(command: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    """subprocess.run in a process group of its own: on a timeout or an interrupt the whole
    group is killed (debootstrap's dpkg, nspawn's container), not just the first process."""
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.communicate(timeout=COMMAND_TIMEOUT)
        raise
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


# --- the apt source and the package list ---------------------------------------------------


@dataclass(frozen=True)
class AptSource:
    suite: str
    uri: str
    components: tuple[str, ...]
    keyring: str | None


def host_codename() -> str:
    for line in Path("/etc/os-release").read_text().splitlines():
        if line.startswith("VERSION_CODENAME="):
            return line.split("=", 1)[1].strip().strip('"')
    raise BootError("/etc/os-release names no VERSION_CODENAME: cannot tell which suite to bootstrap")


def _one_line_sources(text: str) -> Iterator[tuple[str, str, str, tuple[str, ...], str | None]]:
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        options = dict(re.findall(r"([\w-]+)=(\S+)", line[line.index("[") + 1:line.index("]")])) \
            if "[" in line and "]" in line else {}
        words = re.sub(r"\[[^]]*\]", " ", line).split()
        if len(words) >= 3:
            yield words[0], words[1], words[2], tuple(words[3:]), options.get("signed-by")


def _deb822_sources(text: str) -> Iterator[tuple[str, str, str, tuple[str, ...], str | None]]:
    for stanza in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        key = None
        for raw in stanza.splitlines():
            if raw.startswith("#"):
                continue
            if raw[:1] in (" ", "\t") and key is not None:
                fields[key] += "\n" + raw.strip()
            elif ":" in raw:
                key, _, value = raw.partition(":")
                key = key.strip().lower()
                fields[key] = value.strip()
        if fields.get("enabled", "yes").lower() == "no":
            continue
        signed_by = fields.get("signed-by")
        keyring = signed_by if signed_by and "\n" not in signed_by and signed_by.startswith("/") else None
        for kind in fields.get("types", "").split():
            for uri in fields.get("uris", "").split():
                for suite in fields.get("suites", "").split():
                    yield kind, uri, suite, tuple(fields.get("components", "").split()), keyring


def apt_source(codename: str | None = None) -> AptSource:
    """The mirror apt on this machine uses for its own release: debootstrap takes that."""
    codename = codename or host_codename()
    files = [Path("/etc/apt/sources.list")]
    files += sorted(Path(p) for p in glob.glob("/etc/apt/sources.list.d/*.list"))
    files += sorted(Path(p) for p in glob.glob("/etc/apt/sources.list.d/*.sources"))
    for path in files:
        if not path.is_file():
            continue
        text = path.read_text()
        entries = _deb822_sources(text) if path.suffix == ".sources" else _one_line_sources(text)
        for kind, uri, suite, components, keyring in entries:
            if kind == "deb" and suite == codename and uri.split(":", 1)[0] in ("http", "https", "file"):
                return AptSource(codename, uri, components or ("main",), keyring)
    raise BootError(f"no 'deb' source for {codename} in /etc/apt/sources.list or /etc/apt/sources.list.d")


def setup_packages() -> tuple[str, ...]:
    """The system packages scripts/setup.sh installs (its `packages=(...)` array)."""
    match = re.search(r"^packages=\(([^)]*)\)", (REPO / "scripts" / "setup.sh").read_text(), re.MULTILINE)
    if match is None:
        raise BootError("scripts/setup.sh has no packages=(...) array any more; update boot_support.py")
    return tuple(match[1].split())


def architecture() -> str:
    return subprocess.run(["dpkg", "--print-architecture"], capture_output=True, text=True, check=True,
                          timeout=COMMAND_TIMEOUT).stdout.strip()


@dataclass(frozen=True)
class BaseRecipe:
    source: AptSource
    packages: tuple[str, ...]
    arch: str

    @classmethod
    def for_this_host(cls) -> BaseRecipe:
        return cls(apt_source(), tuple(sorted(set(BOOT_PACKAGES) | set(setup_packages()))), architecture())

    def key(self) -> str:
        keyring = Path(self.source.keyring).read_bytes() if self.source.keyring else b""
        document = {"recipe": RECIPE, "suite": self.source.suite, "uri": self.source.uri,
                    "components": self.source.components, "keyring": hashlib.sha256(keyring).hexdigest(),
                    "packages": self.packages, "arch": self.arch, "variant": "minbase"}
        return hashlib.sha256(json.dumps(document, sort_keys=True).encode()).hexdigest()[:16]

    def path(self) -> Path:
        return CACHE_DIR / f"hostwall-rootfs-{self.key()}"


# --- mounts and removal --------------------------------------------------------------------


def mounts_under(path: Path) -> list[str]:
    prefix = str(path).rstrip("/") + "/"
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].replace("\\040", " ")
        if point == str(path) or point.startswith(prefix):
            found.append(point)
    return found


def unmount_under(path: Path) -> None:
    for point in sorted(mounts_under(path), key=len, reverse=True):
        result = subprocess.run(["umount", point], capture_output=True, text=True, timeout=COMMAND_TIMEOUT,
                                check=False)
        if result.returncode != 0:  # still busy: detach it, it goes when the last user does
            subprocess.run(["umount", "--lazy", point], capture_output=True, timeout=COMMAND_TIMEOUT, check=True)


def remove_tree(path: Path) -> None:
    """rm -rf that never crosses into a mount (a killed debootstrap leaves /proc, /sys
    mounted in its target): whatever is mounted below is unmounted first."""
    if not path.exists() and not path.is_symlink():
        return
    unmount_under(path)
    subprocess.run(["rm", "-rf", "--one-file-system", str(path)], check=True, timeout=10 * 60)


def mount_overlay(lower: list[Path], upper: Path, work: Path, target: Path) -> None:
    for directory in (upper, work, target):
        directory.mkdir(parents=True, exist_ok=True)
    options = f"lowerdir={':'.join(str(p) for p in lower)},upperdir={upper},workdir={work}"
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", options, str(target)], check=True,
                   capture_output=True, text=True, timeout=COMMAND_TIMEOUT)


@contextlib.contextmanager
def locked(path: Path, timeout: float) -> Iterator[None]:
    with path.open("a") as handle:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise BootError(f"{path} stayed locked for {timeout:.0f} s (another build?)") from None
                time.sleep(1)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# --- building the base ---------------------------------------------------------------------


MARKER = ".hostwall-boot-base.json"


def ensure_base(recipe: BaseRecipe, log: Callable[[str], None]) -> Path:
    """The cached base rootfs, debootstrapped first if it is not there yet."""
    final = recipe.path()
    if (final / MARKER).is_file():
        return final
    with locked(final.with_name(final.name + ".lock"), LOCK_TIMEOUT):
        if (final / MARKER).is_file():
            return final
        for stale in glob.glob(f"{final}.build-*"):  # a build that was killed
            remove_tree(Path(stale))
        remove_tree(final)  # incomplete (no marker)
        building = final.with_name(f"{final.name}.build-{os.getpid()}")
        started = time.monotonic()
        source = recipe.source
        command = ["debootstrap", "--variant=minbase", f"--include={','.join(recipe.packages)}",
                   f"--components={','.join(source.components)}", f"--arch={recipe.arch}"]
        if source.keyring:
            command.append(f"--keyring={source.keyring}")
        command += [source.suite, str(building), source.uri]
        try:
            result = run_group(command, DEBOOTSTRAP_TIMEOUT)
            if result.returncode != 0:
                detail = building / "debootstrap" / "debootstrap.log"
                raise BootError(f"{' '.join(command)} failed ({result.returncode}):\n{tail(result.stdout)}\n"
                                f"{tail(result.stderr)}\n"
                                + (tail(detail.read_text(errors='replace')) if detail.is_file() else ""))
            subprocess.run(["chroot", str(building), "apt-get", "clean"], capture_output=True,
                           timeout=COMMAND_TIMEOUT, check=True)
            (building / MARKER).write_text(json.dumps(
                {"recipe": RECIPE, "suite": source.suite, "uri": source.uri, "components": source.components,
                 "keyring": source.keyring, "packages": recipe.packages, "arch": recipe.arch,
                 "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}, indent=1) + "\n")
            unmount_under(building)
            building.rename(final)
        except BaseException:
            remove_tree(building)
            raise
        log(f"built {final} in {time.monotonic() - started:.0f} s")
    return final


# --- installing hostwall -------------------------------------------------------------------

PASSED_ENVIRONMENT = ("http_proxy", "https_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY",
                      "PIP_INDEX_URL", "PIP_TRUSTED_HOST", "PIP_DEFAULT_TIMEOUT")
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")


def copy_checkout(target: Path) -> None:
    target.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in SOURCE_PATHS:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, target / name, ignore=ignore, symlinks=True)
        else:
            shutil.copy2(source, target / name)


def nspawn_run(root: Path, machine: str, *command: str, chdir: str = "/", timeout: float = COMMAND_TIMEOUT,
               extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    """One command in the rootfs, without booting it: systemd-nspawn as a better chroot.
    The host's network is shared (pip reaches PyPI)."""
    return run_group(["systemd-nspawn", "--quiet", "-D", str(root), f"--machine={machine}", "--register=no",
                      "--keep-unit", f"--chdir={chdir}", *extra, *command], timeout)


def make_install(root: Path, machine: str) -> subprocess.CompletedProcess[str]:
    """`make install` from a fresh copy of this checkout, as the README tells a user.

    pip inside trusts what this host trusts: the host's CA bundle is bound in as PIP_CERT
    (a TLS-intercepting egress proxy is then still trusted), and proxy settings pass
    through. Nothing else of the host's pip configuration goes in."""
    copy_checkout(root / "usr" / "src" / "hostwall")
    extra: list[str] = []
    if HOST_CA_BUNDLE.is_file():
        extra += [f"--bind-ro={HOST_CA_BUNDLE}:/run/host-ca-certificates.crt",
                  "--setenv=PIP_CERT=/run/host-ca-certificates.crt"]
    extra += [f"--setenv={name}={os.environ[name]}" for name in PASSED_ENVIRONMENT if os.environ.get(name)]
    return nspawn_run(root, machine, "make", "install", chdir="/usr/src/hostwall", timeout=INSTALL_TIMEOUT,
                      extra=tuple(extra))


# --- booting -------------------------------------------------------------------------------


def _children(pid: int) -> list[int]:
    found: list[int] = []
    for path in glob.glob(f"/proc/{pid}/task/*/children"):
        with contextlib.suppress(OSError):
            found += [int(child) for child in Path(path).read_text().split()]
    return found


def _namespace_pid(pid: int) -> str | None:
    """The process's PID in its own PID namespace; None once it is gone (or a zombie)."""
    try:
        status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                      if ":" in line)
    except OSError:
        return None
    if status.get("State", "").strip().startswith(("Z", "X")) or "NSpid" not in status:
        return None
    return status["NSpid"].split()[-1]


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


class Machine:
    """systemd booted by systemd-nspawn from root, in the network namespace server_netns.

    Commands run inside with nsenter into every namespace of the container's PID 1
    (machinectl and systemd-run -M need systemd on the host)."""

    def __init__(self, root: Path, name: str, server_netns: str, console: Path) -> None:
        self.root = root
        self.name = name
        self.server_netns = server_netns
        self.console = console
        self.process: subprocess.Popen[bytes] | None = None
        self.leader: int | None = None

    def start(self) -> None:
        command = ["systemd-nspawn", "--boot", "-D", str(self.root), f"--machine={self.name}",
                   "--register=no", "--keep-unit", "--volatile=overlay",
                   # nspawn keeps CAP_NET_ADMIN only with --private-network, which cannot be
                   # combined with --network-namespace-path; the agent needs it (nf_tables,
                   # NFLOG), and it only reaches the lab namespace the container runs in.
                   "--capability=CAP_NET_ADMIN",
                   f"--network-namespace-path={netns.netns_path(self.server_netns)}"]
        with self.console.open("wb") as console:
            self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=console,
                                            stderr=subprocess.STDOUT)
        self.leader = self._find_leader()
        self._wait_for_boot()

    def _alive(self) -> None:
        if self.process is None or self.process.poll() is not None:
            code = None if self.process is None else self.process.returncode
            raise BootError(f"systemd-nspawn exited ({code}):\n{self.console_tail()}")

    def _find_leader(self) -> int:
        """The container's PID 1: nspawn's child whose pid in its own namespace is 1, once
        it runs systemd (before that its mount namespace may still be being set up)."""
        assert self.process is not None
        deadline = time.monotonic() + BOOT_TIMEOUT
        while time.monotonic() < deadline:
            self._alive()
            for child in _children(self.process.pid):
                if _namespace_pid(child) == "1" and _comm(child) == "systemd":
                    return child
            time.sleep(0.02)
        raise BootError(f"no systemd became PID 1 of the container within {BOOT_TIMEOUT} s:\n"
                        f"{self.console_tail()}")

    def _wait_for_boot(self) -> None:
        deadline = time.monotonic() + BOOT_TIMEOUT
        last = ""
        while time.monotonic() < deadline:
            self._alive()
            try:
                result = self.run("systemctl", "is-system-running", "--wait", check=False,
                                  timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                break
            last = (result.stdout + result.stderr).strip()
            if result.stdout.strip() in ("running", "degraded"):
                return
            time.sleep(0.05)  # systemd not listening yet
        raise BootError(f"the container did not finish booting within {BOOT_TIMEOUT} s ({last}):\n"
                        f"{self.console_tail()}")

    def command(self, *args: str) -> list[str]:
        assert self.leader is not None, "the container is not running"
        return ["nsenter", "-t", str(self.leader), "-a", "/usr/bin/env", "-i", f"PATH={CONTAINER_PATH}",
                "LANG=C.UTF-8", "SYSTEMD_COLORS=0", *args]

    def run(self, *args: str, check: bool = True, timeout: float = COMMAND_TIMEOUT,
            stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(self.command(*args), input=stdin, capture_output=True, text=True,
                                timeout=timeout, check=False)
        if check and result.returncode != 0:
            raise BootError(f"{' '.join(args)} in the container failed ({result.returncode}):\n"
                            f"{result.stdout}\n{result.stderr}")
        return result

    def show(self, unit: str, *properties: str) -> dict[str, str]:
        result = self.run("systemctl", "show", unit, *(f"--property={p}" for p in properties))
        return dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)

    def journal(self, *args: str) -> str:
        return self.run("journalctl", "--no-pager", *args).stdout

    def write(self, path: str, text: str) -> None:
        self.run("sh", "-c", 'cat > "$1"', "sh", path, stdin=text)

    def console_tail(self, lines: int = 80) -> str:
        try:
            return tail(strip_ansi(self.console.read_text(errors="replace")), lines)
        except OSError:
            return "(no console output)"

    def stop(self) -> None:
        """SIGTERM to nspawn (an orderly shutdown of the container), then SIGKILL."""
        process = self.process
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=STOP_TIMEOUT)
        # nspawn reaps the container's PID 1; should it have outlived nspawn (killed), it is
        # killed here, by its PID, and the kernel ends the rest of its PID namespace.
        if self.leader is not None and _namespace_pid(self.leader) == "1":
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.leader, signal.SIGKILL)
            deadline = time.monotonic() + STOP_TIMEOUT
            while _namespace_pid(self.leader) == "1":
                if time.monotonic() > deadline:
                    raise BootError(f"the container's PID 1 ({self.leader}) outlived systemd-nspawn")
                time.sleep(0.05)
        self.process = None
        self.leader = None


# --- talking to the container from the lab's clients --------------------------------------


def http_probe(namespace: str, address: str, port: int, timeout: float) -> str:
    """'open' (an HTTP answer came back), 'timeout' (dropped) or 'refused'."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with netns.entered(namespace):
        sock = socket.socket(family, socket.SOCK_STREAM)
    with sock:
        sock.settimeout(timeout)
        try:
            sock.connect((address, port))
            sock.sendall(b"GET / HTTP/1.0\r\nHost: boot-test\r\n\r\n")
            answer = sock.recv(64)
        except (ConnectionRefusedError, ConnectionResetError):
            return "refused"
        except TimeoutError:
            return "timeout"
    return "open" if answer.startswith(b"HTTP/1.0 200") else f"answered {answer!r}"


def nft_in(namespace: str, *args: str, timeout: float = COMMAND_TIMEOUT) -> subprocess.CompletedProcess[str]:
    """nft inside a lab namespace; never the root namespace."""
    return subprocess.run(["ip", "netns", "exec", namespace, "nft", *args], capture_output=True, text=True,
                          timeout=timeout, check=False)


# --- one boot, set up and torn down ------------------------------------------------------

TIMINGS: list[str] = []
_boots = count()


@dataclass(frozen=True)
class Installed:
    """The cached base rootfs and, above it, this session's `make install` layer."""

    base: Path
    layer: Path
    work: Path


@dataclass
class Booted:
    machine: Machine
    lab: Lab


# files(lab) -> {absolute path in the rootfs: content}; units to enable before boot.
Files = Callable[[Lab], dict[str, str]]
Boot = Callable[[Files, tuple[str, ...]], "contextlib.AbstractContextManager[Booted]"]


@contextlib.contextmanager
def booted(installed: Installed, files: Files, enable: tuple[str, ...],
           failures: Callable[[], int]) -> Iterator[Booted]:
    """A lab, a per-boot overlay with files written and units enabled, and systemd booted
    from it in the lab's server namespace. Everything is removed afterwards, whatever
    happened; on a failure the console and the journal are printed."""
    name = f"hwboot{os.getpid()}x{next(_boots)}"
    directory = installed.work / name
    root = directory / "root"
    failed_before = failures()
    failed = False
    lab = create_lab(name)
    try:
        mount_overlay([installed.layer, installed.base], directory / "upper", directory / "work", root)
        machine = Machine(root, name, lab.server, directory / "console.log")
        try:
            for path, text in files(lab).items():
                target = root / path.lstrip("/")
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(text)
                target.chmod(0o644)
            if enable:
                subprocess.run(["chroot", str(root), "systemctl", "enable", *enable], capture_output=True,
                               text=True, check=True, timeout=COMMAND_TIMEOUT)
            started = time.monotonic()
            machine.start()
            TIMINGS.append(f"{name}: booted in {time.monotonic() - started:.2f} s")
            yield Booted(machine, lab)
        except BaseException:
            failed = True
            raise
        finally:
            if failed or failures() > failed_before:
                if machine.leader is not None:
                    with contextlib.suppress(BootError, subprocess.SubprocessError, OSError):
                        print(f"--- journal of {name} ---\n{tail(machine.journal('-b'), 150)}")
                print(f"--- console of {name} ---\n{machine.console_tail()}")
            machine.stop()
            unmount_under(root)
    finally:
        lab.destroy()
        remove_tree(directory)


# --- package installs and file lists (the Debian package and make install/uninstall) ------

APT_TIMEOUT = 10 * 60
# Written by apt, dpkg, debconf and the shadow tools about their own work, whatever the
# package: their logs, caches and backups. Everything else must be as it was.
BOOKKEEPING = ("/var/log/", "/var/cache/apt/", "/var/lib/apt/", "/var/cache/debconf/", "/var/cache/man/",
               "/var/cache/ldconfig/", "/var/lib/dpkg/", "/etc/group-", "/etc/gshadow-", "/etc/passwd-",
               "/etc/shadow-", "/etc/subgid-", "/etc/subuid-")
NOT_FILES = ("/proc/", "/sys/", "/dev/", "/run/", "/tmp/", "/var/tmp/")


def file_list(root: Path) -> set[str]:
    """Every path in the rootfs (files, directories, links), as seen from inside."""
    found = set()
    for directory, subdirectories, files in os.walk(root):
        inside = "/" + os.path.relpath(directory, root).removeprefix(".").lstrip("/")
        for name in (*subdirectories, *files):
            found.add(os.path.join(inside, name) + ("/" if name in subdirectories else ""))
    return {p for p in found if not p.startswith(NOT_FILES + BOOKKEEPING)}


def host_trust() -> tuple[str, ...]:
    """nspawn arguments with which pip inside trusts what this host trusts (as in
    make_install): the host's CA bundle and its proxy settings."""
    extra: list[str] = []
    if HOST_CA_BUNDLE.is_file():
        extra += [f"--bind-ro={HOST_CA_BUNDLE}:/run/host-ca-certificates.crt",
                  "--setenv=PIP_CERT=/run/host-ca-certificates.crt"]
    extra += [f"--setenv={name}={os.environ[name]}" for name in PASSED_ENVIRONMENT if os.environ.get(name)]
    return tuple(extra)


class Rootfs:
    """An overlay of the cached base in which apt and make run (systemd-nspawn as a chroot)."""

    def __init__(self, base: Path, work: Path) -> None:
        self.base = base
        self.layer = work / "upper"
        self.root = work / "root"
        self.work = work
        self.name = f"hwdeb{os.getpid()}"

    @contextlib.contextmanager
    def mounted(self) -> Iterator[Path]:
        mount_overlay([self.base], self.layer, self.work / "overlay-work", self.root)
        try:
            yield self.root
        finally:
            unmount_under(self.root)

    def run(self, *command: str, timeout: float = APT_TIMEOUT, check: bool = True,
            chdir: str = "/") -> subprocess.CompletedProcess[str]:
        result = nspawn_run(self.root, self.name, "/usr/bin/env", "DEBIAN_FRONTEND=noninteractive", *command,
                            timeout=timeout, chdir=chdir, extra=host_trust())
        if check and result.returncode != 0:
            raise BootError(f"{' '.join(command)} failed ({result.returncode}):\n{tail(result.stdout)}\n"
                            f"{tail(result.stderr)}")
        return result
