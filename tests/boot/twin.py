"""`make lab`: the Vagrant lab's twin in systemd-nspawn machines, fast enough for CI.

The same hosts as vagrant/Vagrantfile (server, partner, outsider, and with LAB_SERVERS=N
the servers server2..serverN), each a machine booted with systemd as PID 1 from the boot
test's cached Debian rootfs, each with sshd, each in a network namespace of its own. The
machines' veth links meet on a bridge in one more namespace, the switch, which also
holds the controller's address: ansible-playbook runs there (``ip netns exec``) and
provisions the machines with vagrant/playbook.yml and vagrant/group_vars over real SSH,
as Vagrant's Ansible provisioner would.

Layers, all under /var/tmp (mounted as one overlay per machine):
- base: the boot test's cached rootfs (boot_support.ensure_base).
- lab layer: ``hostwall-labfs-<key>``, cached, above the base: sshd, what the playbook
  installs (nginx, PostgreSQL, the clients' tools), and a wheelhouse of hostwall's
  dependencies with /etc/pip.conf pointing at it. The machines have no route to a
  mirror or PyPI, so their apt sources are emptied: the playbook's apt tasks find
  everything installed, and its pip task installs from the wheelhouse.
- per machine: ``hostwall-lab-<name>/<host>/upper``, the machine's own writes (its SSH
  host keys, the controller's key, on the server the checkout at /opt/hostwall-src).

Nothing here touches the root network namespace: no interface, address or route is
added there, and the only firewall that changes is the server machines' own.

    python tests/boot/twin.py up [--servers N] [--name NAME]   # make lab
    python tests/boot/twin.py check [--name NAME]              # make lab-check
    python tests/boot/twin.py provision [--name NAME] -- ARGS  # make lab-provision
    python tests/boot/twin.py down [--name NAME]               # make lab-down
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

# Run as a script (make lab), its sibling boot_support is importable only with this.
sys.path.insert(0, str(Path(__file__).resolve().parent))

from boot_support import (
    CACHE_DIR,
    COMMAND_TIMEOUT,
    LOCK_TIMEOUT,
    MARKER,
    REPO,
    BaseRecipe,
    BootError,
    Machine,
    _children,
    _comm,
    _namespace_pid,
    ensure_base,
    locked,
    mount_overlay,
    nspawn_run,
    remove_tree,
    tail,
    unmount_under,
)

from hostwall import netns

LAB_RECIPE = 1  # bump when the way the lab layer is built changes
# What the playbook's apt tasks name (vagrant/playbook.yml), sshd, and what Ansible's
# modules need on a managed host (apt: python3-apt; pip: python3-packaging).
LAB_PACKAGES = ("openssh-server", "nginx", "ssl-cert", "postgresql", "curl", "postgresql-client",
                "python3-apt", "python3-packaging", "sudo")
WHEELHOUSE = "/var/cache/hostwall-lab/wheels"
PIP_CONF = f"""# The lab's machines cannot reach PyPI: pip installs from the wheelhouse built with the lab.
[global]
no-index = true
find-links = {WHEELHOUSE}
disable-pip-version-check = true
"""
OFFLINE_SOURCES = """# The lab's machines cannot reach a mirror: every package the playbook names is
# installed in the lab layer (tests/boot/twin.py), so apt has nothing to fetch.
"""

NETWORK = "192.0.2"  # TEST-NET-1, as in vagrant/Vagrantfile
CONTROLLER = f"{NETWORK}.1"
PREFIX_LENGTH = 24
MAX_SERVERS = 9  # server addresses .10 to .18; the clients are .20 and .30
DEFAULT_NAME = "hwlab"
STATE_ROOT = Path("/run/hostwall-lab")
VAGRANT_DIR = REPO / "vagrant"
# Like the Vagrantfile's rsync__exclude: what does not belong on the server.
SYNC_EXCLUDE = (".git", ".venv", "build", "*.egg-info", ".mypy_cache", ".pytest_cache", ".ruff_cache",
                ".hypothesis", ".vagrant", "__pycache__", "*.pyc", "bench-results.json")

LAYER_TIMEOUT = 20 * 60
PLAYBOOK_TIMEOUT = 20 * 60
SSH_TIMEOUT = 60
PROBE_TIMEOUT = 3.0


def log(message: str) -> None:
    print(f"lab: {message}", flush=True)


def run(command: list[str], timeout: float = COMMAND_TIMEOUT) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    if result.returncode != 0:
        raise BootError(f"{' '.join(command)} failed ({result.returncode}):\n{tail(result.stdout, 20)}\n"
                        f"{tail(result.stderr, 20)}")
    return result


# --- the lab layer -------------------------------------------------------------------------


def requirements() -> list[str]:
    """hostwall's runtime dependencies and its build requirements, from pyproject.toml."""
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    return [*project["project"]["dependencies"], *project["build-system"]["requires"]]


def layer_path(base: Path) -> Path:
    document = {"recipe": LAB_RECIPE, "base": base.name, "packages": LAB_PACKAGES, "requirements": requirements(),
                "pip_conf": PIP_CONF, "sources": OFFLINE_SOURCES}
    key = hashlib.sha256(json.dumps(document, sort_keys=True).encode()).hexdigest()[:16]
    return CACHE_DIR / f"hostwall-labfs-{key}"


def ensure_layer(base: Path) -> Path:
    """The cached lab layer above base, built first if it is not there yet."""
    final = layer_path(base)
    if (final / MARKER).is_file():
        return final
    with locked(final.with_name(final.name + ".lock"), LOCK_TIMEOUT):
        if (final / MARKER).is_file():
            return final
        building = final.with_name(f"{final.name}.build-{os.getpid()}")
        remove_tree(final)
        for stale in CACHE_DIR.glob(f"{final.name}.build-*"):
            remove_tree(stale)
        started = time.monotonic()
        try:
            _build_layer(base, building)
            (building / "upper" / MARKER).write_text(json.dumps(
                {"recipe": LAB_RECIPE, "base": base.name, "packages": LAB_PACKAGES,
                 "requirements": requirements(),
                 "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}, indent=1) + "\n")
            (building / "upper").rename(final)
        finally:
            remove_tree(building)
        log(f"built {final} in {time.monotonic() - started:.0f} s")
    return final


def _build_layer(base: Path, building: Path) -> None:
    upper, root = building / "upper", building / "root"
    mount_overlay([base], upper, building / "work", root)
    try:
        # No service starts while packages are installed (nothing is booted, but a
        # package's script must not try either).
        policy = root / "usr/sbin/policy-rc.d"
        policy.write_text("#!/bin/sh\nexit 101\n")
        policy.chmod(0o755)
        script = ("set -e; export DEBIAN_FRONTEND=noninteractive; apt-get update -qq; "
                  f"apt-get install -y -qq --no-install-recommends {' '.join(LAB_PACKAGES)}; apt-get clean")
        result = nspawn_run(root, f"hwlabfs{os.getpid()}", "sh", "-c", script, timeout=LAYER_TIMEOUT)
        if result.returncode != 0:
            raise BootError(f"installing {' '.join(LAB_PACKAGES)} in the lab layer failed:\n"
                            f"{tail(result.stdout)}\n{tail(result.stderr)}")
        policy.unlink()
        # Every machine gets host keys of its own (boot_machine).
        for key in (root / "etc/ssh").glob("ssh_host_*"):
            key.unlink()
        (root / "etc/apt/sources.list").write_text(OFFLINE_SOURCES)
        for source in (root / "etc/apt/sources.list.d").glob("*"):
            source.unlink()
        # apt's lists now match the (empty) sources: an update by the playbook is a no-op.
        result = nspawn_run(root, f"hwlabfs{os.getpid()}", "apt-get", "update", "-qq")
        if result.returncode != 0:
            raise BootError(f"apt-get update in the lab layer failed:\n{tail(result.stderr)}")
        wheels = root / WHEELHOUSE.lstrip("/")
        wheels.mkdir(parents=True)
        # Built here with this checkout's Python tools; the base is the same Debian release.
        run([sys.executable, "-m", "pip", "wheel", "-q", "--wheel-dir", str(wheels), *requirements()],
            timeout=LAYER_TIMEOUT)
        (root / "etc/pip.conf").write_text(PIP_CONF)
    finally:
        unmount_under(root)


# --- the lab's description and its state ---------------------------------------------------


@dataclass
class Host:
    name: str
    address: str
    namespace: str
    root: str = ""
    console: str = ""
    nspawn: int | None = None
    leader: int | None = None

    @property
    def is_server(self) -> bool:
        return self.name.startswith("server")


def server_names(count: int) -> list[str]:
    return ["server", *(f"server{index}" for index in range(2, count + 1))]


def plan(name: str, servers: int) -> list[Host]:
    if not 1 <= servers <= MAX_SERVERS:
        raise BootError(f"LAB_SERVERS must be between 1 and {MAX_SERVERS}, not {servers}")
    hosts = [Host(server, f"{NETWORK}.{10 + index}", f"{name}-{server}")
             for index, server in enumerate(server_names(servers))]
    hosts += [Host("partner", f"{NETWORK}.20", f"{name}-partner"),
              Host("outsider", f"{NETWORK}.30", f"{name}-outsider")]
    return hosts


@dataclass
class Lab:
    name: str
    hosts: list[Host]

    @property
    def switch(self) -> str:
        return f"{self.name}-switch"

    @property
    def state_dir(self) -> Path:
        return STATE_ROOT / self.name

    @property
    def work_dir(self) -> Path:
        return CACHE_DIR / f"hostwall-lab-{self.name}"

    @property
    def servers(self) -> list[Host]:
        return [host for host in self.hosts if host.is_server]

    def host(self, name: str) -> Host:
        return next(host for host in self.hosts if host.name == name)

    def save(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        document = {"name": self.name, "hosts": [asdict(host) for host in self.hosts]}
        (self.state_dir / "state.json").write_text(json.dumps(document, indent=1) + "\n")

    @classmethod
    def load(cls, name: str) -> Lab | None:
        path = STATE_ROOT / name / "state.json"
        if not path.is_file():
            return None
        document = json.loads(path.read_text())
        return cls(document["name"], [Host(**host) for host in document["hosts"]])

    def ssh_command(self, host: Host, *command: str) -> list[str]:
        """ssh from the switch namespace to host, as root, with the lab's key and host keys only."""
        return ["ip", "netns", "exec", self.switch, "ssh", "-F", "/dev/null", "-i", str(self.state_dir / "id_ed25519"),
                "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
                "-o", f"UserKnownHostsFile={self.state_dir / 'known_hosts'}", "-o", "ConnectTimeout=10",
                f"root@{host.address}", *command]


def valid_name(name: str) -> str:
    # Interface and namespace names derive from it; keep it short and plain.
    if not re.fullmatch(r"[a-z][a-z0-9]{0,11}", name):
        raise BootError(f"lab name {name!r}: use 1 to 12 lower-case letters and digits, starting with a letter")
    return name


# --- network -------------------------------------------------------------------------------


def ip(*args: str) -> None:
    run(["ip", *args])


def create_network(lab: Lab) -> None:
    """A bridge in the switch namespace with the controller's address, and per machine a
    namespace whose eth0 is a veth to the bridge."""
    ip("netns", "add", lab.switch)
    ip("-n", lab.switch, "link", "set", "lo", "up")
    ip("-n", lab.switch, "link", "add", "br0", "type", "bridge")
    ip("-n", lab.switch, "addr", "add", f"{CONTROLLER}/{PREFIX_LENGTH}", "dev", "br0")
    ip("-n", lab.switch, "link", "set", "br0", "up")
    for host in lab.hosts:
        ip("netns", "add", host.namespace)
        ip("-n", host.namespace, "link", "set", "lo", "up")
        port = f"v{host.name}"[:15]
        ip("-n", lab.switch, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", host.namespace)
        ip("-n", lab.switch, "link", "set", port, "master", "br0")
        ip("-n", lab.switch, "link", "set", port, "up")
        ip("-n", host.namespace, "addr", "add", f"{host.address}/{PREFIX_LENGTH}", "dev", "eth0")
        ip("-n", host.namespace, "link", "set", "eth0", "up")


def lab_namespaces(name: str) -> list[str]:
    listing = run(["ip", "netns", "list"]).stdout
    pattern = re.compile(rf"{re.escape(name)}-(switch|server\d*|partner|outsider)")
    return [line.split()[0] for line in listing.splitlines() if line.split() and pattern.fullmatch(line.split()[0])]


# --- machines ------------------------------------------------------------------------------


# nspawn outlives the command that started it; its Popen is kept here so that Python does
# not warn that it is still running, and so that `down` reaps it when it was started here.
_DETACHED: list[subprocess.Popen[bytes]] = []


class LabMachine(Machine):
    """A boot_support.Machine that outlives the command which started it: nspawn runs in a
    session of its own, so `make lab` can return and `make lab-down` stop it later."""

    def __init__(self, root: Path, name: str, hostname: str, namespace: str, console: Path) -> None:
        super().__init__(root, name, namespace, console)
        self.hostname = hostname

    def spawn(self) -> None:
        command = ["systemd-nspawn", "--boot", "-D", str(self.root), f"--machine={self.name}",
                   f"--hostname={self.hostname}", "--register=no", "--keep-unit",
                   # As in the boot test: the agent needs CAP_NET_ADMIN, which reaches only
                   # the machine's own namespace.
                   "--capability=CAP_NET_ADMIN", f"--network-namespace-path={netns.netns_path(self.server_netns)}"]
        with self.console.open("wb") as console:
            self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=console,
                                            stderr=subprocess.STDOUT, start_new_session=True)
        _DETACHED.append(self.process)

    def wait_booted(self) -> None:
        self.leader = self._find_leader()
        self._wait_for_boot()


def prepare_root(lab: Lab, host: Host, layer: Path, base: Path) -> Path:
    directory = lab.work_dir / host.name
    root = directory / "root"
    mount_overlay([layer, base], directory / "upper", directory / "work", root)
    run(["ssh-keygen", "-q", "-A", "-f", str(root)])
    public = (root / "etc/ssh/ssh_host_ed25519_key.pub").read_text().split()
    with (lab.state_dir / "known_hosts").open("a") as known:
        known.write(f"{host.address} {public[0]} {public[1]}\n")
    ssh = root / "root/.ssh"
    ssh.mkdir(mode=0o700, exist_ok=True)
    shutil.copy(lab.state_dir / "id_ed25519.pub", ssh / "authorized_keys")
    (ssh / "authorized_keys").chmod(0o600)
    (root / "etc/hostname").write_text(f"{host.name}\n")  # as node.vm.hostname in the Vagrantfile
    (root / "etc/hosts").write_text("127.0.0.1 localhost\n" + "".join(
        f"{other.address} {other.name}\n" for other in lab.hosts))
    if host.is_server:  # as the Vagrantfile's rsync synced folder
        shutil.copytree(REPO, root / "opt/hostwall-src", ignore=shutil.ignore_patterns(*SYNC_EXCLUDE), symlinks=True)
    return root


def machine_of(lab: Lab, host: Host) -> LabMachine:
    machine = LabMachine(Path(host.root), f"{lab.name}-{host.name}", host.name, host.namespace, Path(host.console))
    machine.leader = host.leader
    return machine


def boot_machines(lab: Lab, layer: Path, base: Path) -> None:
    machines = []
    for host in lab.hosts:
        root = prepare_root(lab, host, layer, base)
        host.root, host.console = str(root), str(lab.work_dir / host.name / "console.log")
        machine = machine_of(lab, host)
        machine.spawn()
        assert machine.process is not None
        host.nspawn = machine.process.pid
        lab.save()
        machines.append((host, machine))
    for host, machine in machines:
        machine.wait_booted()
        host.leader = machine.leader
        lab.save()


def wait_for_ssh(lab: Lab) -> None:
    deadline = time.monotonic() + SSH_TIMEOUT
    for host in lab.hosts:
        while True:
            result = subprocess.run(lab.ssh_command(host, "true"), capture_output=True, text=True,
                                    timeout=SSH_TIMEOUT, check=False)
            if result.returncode == 0:
                break
            if time.monotonic() > deadline:
                raise BootError(f"ssh to {host.name} ({host.address}) failed: {result.stderr.strip()}")
            time.sleep(0.2)


# --- provisioning --------------------------------------------------------------------------


def write_inventory(lab: Lab) -> tuple[Path, Path]:
    """An inventory with the Vagrantfile's groups, and its extra vars (lab_network, lab_ips)."""
    state = lab.state_dir
    common = (f"-F /dev/null -o IdentitiesOnly=yes -o StrictHostKeyChecking=yes "
              f"-o UserKnownHostsFile={state / 'known_hosts'}")
    lines = ["[all:vars]", "ansible_user=root", f"ansible_ssh_private_key_file={state / 'id_ed25519'}",
             f"ansible_ssh_common_args='{common}'", "ansible_python_interpreter=/usr/bin/python3", ""]
    lines += ["[all]", *(f"{host.name} ansible_host={host.address}" for host in lab.hosts), ""]
    servers = [host.name for host in lab.servers]
    lines += ["[hostwall]", *servers, "", "[lab_servers]", *servers, "", "[lab_clients]", "partner", "outsider", ""]
    inventory = state / "inventory"
    inventory.write_text("\n".join(lines))
    extra = state / "extra-vars.json"
    extra.write_text(json.dumps({"lab_network": f"{NETWORK}.0/{PREFIX_LENGTH}",
                                 "lab_ips": {host.name: host.address for host in lab.hosts}}, indent=1) + "\n")
    return inventory, extra


def install_collection(lab: Lab) -> Path:
    """The hostwall.firewall collection, built from this checkout (make collection) and
    installed into the lab's state; its collections path."""
    collections = lab.state_dir / "collections"
    environment = dict(os.environ, VENV=str(Path(sys.executable).parent.parent))
    dist = lab.state_dir / "dist"
    shutil.rmtree(dist, ignore_errors=True)
    subprocess.run([str(REPO / "scripts" / "build-collection.sh"), str(dist)], check=True, env=environment,
                   stdout=subprocess.DEVNULL, timeout=COMMAND_TIMEOUT)
    (tarball,) = dist.glob("hostwall-firewall-*.tar.gz")
    subprocess.run([str(Path(sys.executable).with_name("ansible-galaxy")), "collection", "install", "--force",
                    "-p", str(collections), str(tarball)], check=True, env=environment,
                   stdout=subprocess.DEVNULL, timeout=COMMAND_TIMEOUT)
    return collections


def run_playbook(lab: Lab, playbook: str, arguments: tuple[str, ...], log_name: str,
                 environment_update: dict[str, str] | None = None) -> int:
    """ansible-playbook from the switch namespace with the lab's inventory and extra vars
    and the collection installed; arguments go after them. Its exit code."""
    inventory, extra = write_inventory(lab)
    collections = install_collection(lab)
    command_path = Path(sys.executable).with_name("ansible-playbook")
    # Pipelining (one SSH round trip per task instead of several) halves the provisioning
    # time; the host keys are the ones the lab generated, checked strictly.
    environment = dict(os.environ, ANSIBLE_SSH_CONTROL_PATH_DIR=str(lab.state_dir / "cp"),
                       ANSIBLE_HOST_KEY_CHECKING="True", ANSIBLE_PIPELINING="True", ANSIBLE_NOCOWS="1",
                       ANSIBLE_RETRY_FILES_ENABLED="0", ANSIBLE_LOCAL_TEMP=str(lab.state_dir / "tmp"),
                       ANSIBLE_COLLECTIONS_PATH=str(collections), **(environment_update or {}))
    command = ["ip", "netns", "exec", lab.switch, str(command_path), "-i", str(inventory), "-e", f"@{extra}",
               *arguments, playbook]
    with (lab.state_dir / log_name).open("w") as output, subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env=environment, cwd=VAGRANT_DIR) as process:
        assert process.stdout is not None
        for line in process.stdout:
            output.write(line)
            sys.stdout.write(line)
        return process.wait(timeout=PLAYBOOK_TIMEOUT)


def provision(lab: Lab, arguments: tuple[str, ...] = ()) -> None:
    """ansible-playbook vagrant/playbook.yml from the switch namespace; arguments go after
    the inventory and extra vars (e.g. --check --diff)."""
    code = run_playbook(lab, str(VAGRANT_DIR / "playbook.yml"), arguments, "provision.log")
    if code != 0:
        raise BootError(f"ansible-playbook failed ({code}); its output is above")


# --- up, check, down -----------------------------------------------------------------------


# What the lab runs on this host, and the Debian package each comes from.
TOOLS = {"debootstrap": "debootstrap", "systemd-nspawn": "systemd-container", "nsenter": "util-linux",
         "ip": "iproute2", "ssh": "openssh-client", "ssh-keygen": "openssh-client"}


def missing_packages() -> list[str]:
    found = {tool: shutil.which(tool, path=f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin") for tool in TOOLS}
    return sorted({TOOLS[tool] for tool, path in found.items() if path is None})


def up(name: str, servers: int) -> Lab:
    lab = Lab(valid_name(name), plan(name, servers))
    if missing := missing_packages():
        raise BootError(f"the lab needs the packages {', '.join(missing)}: apt-get install {' '.join(missing)}")
    if lab.state_dir.exists() or lab_namespaces(name):
        raise BootError(f"lab {name} is already up (or left over): run `make lab-down` first")
    timings: list[str] = []
    started = time.monotonic()

    def step(what: str, since: float) -> float:
        now = time.monotonic()
        timings.append(f"{what} {now - since:.1f} s")
        log(f"{what}: {now - since:.1f} s")
        return now

    try:
        lab.save()
        recipe = BaseRecipe.for_this_host()
        base = ensure_base(recipe, log)
        layer = ensure_layer(base)
        mark = step("rootfs and lab layer", started)
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"hostwall lab {name}",
             "-f", str(lab.state_dir / "id_ed25519")])
        create_network(lab)
        boot_machines(lab, layer, base)
        wait_for_ssh(lab)
        mark = step(f"{len(lab.hosts)} machines booted, sshd answers", mark)
        provision(lab)
        step("provisioned by vagrant/playbook.yml", mark)
    except BaseException:
        log("setting up failed: removing the lab")
        down(name)
        raise
    log(f"up in {time.monotonic() - started:.0f} s ({'; '.join(timings)}); "
        f"hosts: {', '.join(f'{h.name} {h.address}' for h in lab.hosts)}")
    return lab


PROBE = """
import socket, sys
sock = socket.socket()
sock.settimeout(float(sys.argv[3]))
try:
    sock.connect((sys.argv[1], int(sys.argv[2])))
    print("open")
except TimeoutError:
    print("timeout")
except ConnectionRefusedError:
    print("refused")
except OSError as error:
    print(f"error {error.errno}")
"""


def probe(lab: Lab, client: Host, server: Host, port: int) -> str:
    """A TCP connect from inside client (over ssh) to server: open, timeout, refused, ..."""
    remote = shlex.join(["python3", "-c", PROBE, server.address, str(port), str(PROBE_TIMEOUT)])
    command = lab.ssh_command(client, remote)
    result = subprocess.run(command, capture_output=True, text=True, timeout=SSH_TIMEOUT, check=False)
    if result.returncode != 0:
        return f"ssh failed: {result.stderr.strip()}"
    return result.stdout.strip()


def reprovision(name: str, arguments: tuple[str, ...]) -> None:
    lab = Lab.load(valid_name(name))
    if lab is None or not all(host.leader for host in lab.hosts):
        raise BootError(f"lab {name} is not up: run `make lab` first")
    provision(lab, arguments)


def check(name: str) -> bool:
    """The probes the Vagrant lab's last play makes: partner reaches 443 and 5432 on every
    server, outsider's connections time out. True when all are as expected."""
    lab = Lab.load(valid_name(name))
    if lab is None:
        raise BootError(f"lab {name} is not up: run `make lab` first")
    expected = {"partner": "open", "outsider": "timeout"}
    cases = [(client, server, port) for client in ("partner", "outsider") for server in lab.servers
             for port in (443, 5432)]
    with ThreadPoolExecutor(len(cases)) as pool:
        outcomes = list(pool.map(lambda case: probe(lab, lab.host(case[0]), case[1], case[2]), cases))
    good = True
    print(f"{'from':9} {'to':22} {'result':8} expected")
    for (client, server, port), outcome in zip(cases, outcomes, strict=True):
        ok = outcome == expected[client]
        good &= ok
        print(f"{client:9} {f'{server.name} {server.address}:{port}':22} {outcome:8} {expected[client]}"
              f"{'' if ok else '   <-- unexpected'}")
    return good


def _nspawn_processes(work_dir: Path) -> list[int]:
    """The systemd-nspawn processes whose rootfs is under this lab's directory."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            arguments = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if arguments and arguments[0].endswith(b"systemd-nspawn") and any(
                argument.startswith(f"{work_dir}/".encode()) for argument in arguments):
            found.append(int(entry.name))
    return found


def _stop_all(lab: Lab) -> None:
    """SIGTERM to every nspawn of the lab (an orderly shutdown of its machine), SIGKILL
    after 30 s; then each machine's PID 1 by its PID, should it have outlived nspawn.
    nspawn is found by its rootfs path, so that a machine the state file missed goes too."""
    recorded = {host.nspawn: host.leader for host in lab.hosts}
    processes = _nspawn_processes(lab.work_dir)
    leaders = {child for pid in processes for child in _children(pid) if _namespace_pid(child) == "1"}
    leaders |= {leader for pid in processes if (leader := recorded.get(pid)) is not None
                and _namespace_pid(leader) == "1" and _comm(leader) == "systemd"}
    for pid in processes:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 30
    while _nspawn_processes(lab.work_dir) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in _nspawn_processes(lab.work_dir):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    for process in list(_DETACHED):
        if process.poll() is not None:
            _DETACHED.remove(process)
    for leader in leaders:
        if _namespace_pid(leader) == "1":
            with contextlib.suppress(ProcessLookupError):
                os.kill(leader, signal.SIGKILL)


def down(name: str) -> None:
    """Removes every machine, namespace, mount and file of the lab, whatever state it is in."""
    name = valid_name(name)
    lab = Lab.load(name) or Lab(name, [])
    _stop_all(lab)
    remove_tree(lab.work_dir)
    for namespace in lab_namespaces(name):
        subprocess.run(["ip", "netns", "delete", namespace], capture_output=True, check=False,
                       timeout=COMMAND_TIMEOUT)
    shutil.rmtree(lab.state_dir, ignore_errors=True)
    log(f"lab {name} removed")


def leftovers(name: str) -> list[str]:
    """What of the lab is still there (for the test and for lab-down's own check)."""
    lab = Lab(name, [])
    found = [f"namespace {ns}" for ns in lab_namespaces(name)]
    found += [f"process {pid}" for pid in _nspawn_processes(lab.work_dir)]
    found += [f"path {path}" for path in (lab.work_dir, lab.state_dir) if path.exists()]
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("action", choices=("up", "check", "provision", "down"))
    parser.add_argument("--name", default=os.environ.get("LAB_NAME", DEFAULT_NAME),
                        help=f"lab name, prefix of its namespaces (default {DEFAULT_NAME}, or $LAB_NAME)")
    parser.add_argument("--servers", type=int, default=int(os.environ.get("LAB_SERVERS") or 1),
                        help="number of servers (default 1, or $LAB_SERVERS)")
    parser.add_argument("playbook_arguments", nargs="*", metavar="ANSIBLE-PLAYBOOK-ARGUMENT",
                        help="provision: more arguments for ansible-playbook, after --")
    arguments = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("lab: needs root (namespaces, mounts, systemd-nspawn)", file=sys.stderr)
        return 2
    actions: dict[str, Callable[[], object]] = {
        "up": lambda: up(arguments.name, arguments.servers),
        "check": lambda: check(arguments.name),
        "provision": lambda: reprovision(arguments.name, tuple(arguments.playbook_arguments)),
        "down": lambda: down(arguments.name),
    }
    try:
        outcome = actions[arguments.action]()
    except BootError as error:
        print(f"lab: {error}", file=sys.stderr)
        return 1
    if arguments.action == "down" and (left := leftovers(arguments.name)):
        print(f"lab: left behind: {', '.join(left)}", file=sys.stderr)
        return 1
    return 1 if outcome is False else 0


if __name__ == "__main__":
    sys.exit(main())
