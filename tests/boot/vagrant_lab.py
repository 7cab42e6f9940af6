"""`make vagrant-up`, `vagrant-check`, `vagrant-down`, `vagrant-test`: the Vagrant lab for
real, on libvirt with QEMU's software emulation, without touching the host's network.

libvirtd and virtlogd run inside a network namespace of their own, so the libvirt
networks Vagrant creates (the management network and the lab's 192.0.2.0/24), their
bridges, dnsmasq and firewall rules all live in that namespace. There is no system bus
there, so libvirt runs without firewalld. `vagrant up` runs in the same namespace, with
the libvirt provider, the qemu driver (HOSTWALL_LIBVIRT_DRIVER=qemu) and the box of
`make vagrant-box`; the Vagrantfile's Ansible provisioner runs vagrant/playbook.yml.

    python tests/boot/vagrant_lab.py up|check|down|test
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import twin
from boot_support import REPO, BootError, tail

NAMESPACE = "hwvagrant"
VAGRANT_DIR = REPO / "vagrant"
BOX = "hostwall/bookworm"
HOSTS = {"server": "192.0.2.10", "partner": "192.0.2.20", "outsider": "192.0.2.30"}
DAEMONS = {"virtlogd": Path("/run/virtlogd.pid"), "libvirtd": Path("/run/libvirtd.pid")}
VIRSH = ("virsh", "-c", "qemu:///system")
# The libvirt networks defined before `vagrant up`: down removes only the others.
NETWORKS_BEFORE = Path("/run/hostwall-vagrant-lab.networks")
BOX_VOLUME_PREFIX = BOX.replace("/", "-VAGRANTSLASH-") + "_vagrant_box_image"
IMAGES = Path("/var/lib/libvirt/images")  # vagrant-libvirt's default storage pool
UP_TIMEOUT = 90 * 60
STOP_TIMEOUT = 30


def log(message: str) -> None:
    print(f"vagrant-lab: {message}", flush=True)


def environment() -> dict[str, str]:
    venv_bin = str(Path(sys.executable).parent)  # ansible-playbook for the provisioner
    return dict(os.environ, PATH=f"{venv_bin}:{os.environ.get('PATH', '/usr/bin:/bin')}",
                VAGRANT_DEFAULT_PROVIDER="libvirt", LIBVIRT_DEFAULT_URI="qemu:///system",
                HOSTWALL_LIBVIRT_DRIVER="qemu", HOSTWALL_BOX=BOX)


def in_namespace(*command: str) -> list[str]:
    return ["ip", "netns", "exec", NAMESPACE, *command]


def vagrant(*arguments: str, timeout: float = 600, check: bool = True,
            stream: bool = False) -> subprocess.CompletedProcess[str]:
    command = in_namespace("vagrant", *arguments)
    if stream:
        result = subprocess.run(command, cwd=VAGRANT_DIR, env=environment(), text=True, timeout=timeout, check=False)
    else:
        result = subprocess.run(command, cwd=VAGRANT_DIR, env=environment(), capture_output=True, text=True,
                                timeout=timeout, check=False)
    if check and result.returncode != 0:
        raise BootError(f"vagrant {' '.join(arguments)} failed ({result.returncode})"
                        + (f":\n{tail(result.stdout or '', 20)}\n{tail(result.stderr or '', 20)}"
                           if not stream else ""))
    return result


def _daemon_pid(name: str) -> int | None:
    try:
        pid = int(DAEMONS[name].read_text().strip())
    except (OSError, ValueError):
        return None
    try:
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None
    return pid if comm == name and state not in ("Z", "X") else None  # an exited daemon is not running


def _namespace_of(pid: int) -> str:
    try:
        return os.readlink(f"/proc/{pid}/ns/net")
    except OSError:
        return ""


def up() -> None:
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True, timeout=60)
    if NAMESPACE in listing.stdout.split():
        raise BootError(f"namespace {NAMESPACE} exists: run `make vagrant-down` first")
    running = [name for name in DAEMONS if _daemon_pid(name) is not None]
    if running:
        raise BootError(f"{', '.join(running)} already run on this host; `make vagrant-up` starts its own")
    boxes = subprocess.run(["vagrant", "box", "list"], capture_output=True, text=True, timeout=120, check=False)
    if BOX not in boxes.stdout:
        raise BootError(f"no box {BOX}: run `make vagrant-box` first")
    started = time.monotonic()
    twin.run(["ip", "netns", "add", NAMESPACE])
    twin.run(["ip", "-n", NAMESPACE, "link", "set", "lo", "up"])
    for name in DAEMONS:
        twin.run(in_namespace(name, "--daemon"))
    deadline = time.monotonic() + 30
    while subprocess.run(["virsh", "-c", "qemu:///system", "version"], capture_output=True, timeout=30,
                         check=False).returncode != 0:
        if time.monotonic() > deadline:
            raise BootError("libvirtd did not answer within 30 s")
        time.sleep(0.5)
    before = networks()
    NETWORKS_BEFORE.write_text("\n".join(before) + "\n")
    for network in before:  # defined on this host, started with the daemon: not in the lab
        subprocess.run([*VIRSH, "net-destroy", network], capture_output=True, timeout=60, check=False)
    log(f"libvirtd and virtlogd in namespace {NAMESPACE}: {time.monotonic() - started:.0f} s")
    vagrant("up", "--provider=libvirt", "--no-parallel", timeout=UP_TIMEOUT, stream=True)
    log(f"vagrant up, provisioned: {time.monotonic() - started:.0f} s")


def networks() -> list[str]:
    return subprocess.run([*VIRSH, "net-list", "--all", "--name"], capture_output=True, text=True, timeout=60,
                          check=False).stdout.split()


def check() -> bool:
    """partner reaches 443 and 5432 on the server, outsider's attempts time out; each probe
    runs inside the client VM over `vagrant ssh`."""
    expected = {"partner": "open", "outsider": "timeout"}
    good = True
    print(f"{'from':9} {'to':22} {'result':8} expected")
    for client, want in expected.items():
        for port in (443, 5432):
            remote = shlex.join(["python3", "-c", twin.PROBE, HOSTS["server"], str(port), str(twin.PROBE_TIMEOUT)])
            result = vagrant("ssh", client, "-c", remote, check=False, timeout=120)
            outcome = result.stdout.strip() if result.returncode == 0 else f"ssh failed ({result.returncode})"
            ok = outcome == want
            good &= ok
            print(f"{client:9} {'server ' + HOSTS['server'] + ':' + str(port):22} {outcome:8} {want}"
                  f"{'' if ok else '   <-- unexpected'}")
    return good


def down() -> None:
    """vagrant destroy, then the box volume, the libvirt networks, the daemons and the
    namespace; each step runs even if an earlier one failed."""
    libvirtd = _daemon_pid("libvirtd")
    mine = libvirtd is not None and _namespace_of(libvirtd) == _namespace_of_netns()
    if mine:
        vagrant("destroy", "-f", check=False, timeout=600)
        volumes = subprocess.run([*VIRSH, "vol-list", "default", "--name"], capture_output=True, text=True,
                                 timeout=60, check=False).stdout.split()
        for volume in volumes:
            if volume.startswith(BOX_VOLUME_PREFIX):
                subprocess.run([*VIRSH, "vol-delete", volume, "--pool", "default"], capture_output=True,
                               timeout=60, check=False)
        before = NETWORKS_BEFORE.read_text().split() if NETWORKS_BEFORE.is_file() else []
        for network in networks():
            if network not in before:
                subprocess.run([*VIRSH, "net-destroy", network], capture_output=True, timeout=60, check=False)
                subprocess.run([*VIRSH, "net-undefine", network], capture_output=True, timeout=60, check=False)
    for name in ("libvirtd", "virtlogd"):
        pid = _daemon_pid(name)
        if pid is None or _namespace_of(pid) != _namespace_of_netns():
            continue
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        while _daemon_pid(name) == pid and time.monotonic() < deadline:
            time.sleep(0.2)
        if _daemon_pid(name) == pid:
            os.kill(pid, signal.SIGKILL)
    # The box's volume, should libvirt not have listed it (an inactive pool): by its file.
    for image in IMAGES.glob(f"{BOX_VOLUME_PREFIX}*"):
        image.unlink(missing_ok=True)
    subprocess.run(["ip", "netns", "delete", NAMESPACE], capture_output=True, timeout=60, check=False)
    NETWORKS_BEFORE.unlink(missing_ok=True)
    log("removed")


def _namespace_of_netns() -> str:
    """The namespace's identity as /proc/PID/ns/net shows it (net:[inode])."""
    try:
        return f"net:[{os.stat(f'/run/netns/{NAMESPACE}').st_ino}]"
    except OSError:
        return "none"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("action", choices=("up", "check", "down", "test"))
    arguments = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("vagrant-lab: needs root (a network namespace, libvirtd)", file=sys.stderr)
        return 2
    try:
        if arguments.action == "up":
            up()
        elif arguments.action == "check":
            return 0 if check() else 1
        elif arguments.action == "down":
            down()
        else:
            started = time.monotonic()
            try:
                up()
                checked = time.monotonic()
                good = check()
                log(f"check: {time.monotonic() - checked:.0f} s")
            finally:
                stopping = time.monotonic()
                down()
                log(f"down: {time.monotonic() - stopping:.0f} s; in all {time.monotonic() - started:.0f} s")
            return 0 if good else 1
    except BootError as error:
        print(f"vagrant-lab: {error}", file=sys.stderr)
        if arguments.action == "up":
            down()
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
