"""`make vagrant-box`: a libvirt Vagrant box built here from Debian packages.

The box's disk is the lab's rootfs (the boot test's cached base plus the lab layer of
twin.py: sshd, nginx, PostgreSQL, the clients' tools, a wheelhouse of hostwall's
dependencies, apt sources emptied) with, above it, what a VM needs: a kernel, ifupdown
with DHCP on eth0 (Vagrant's Debian guest support writes the private network's static
address into /etc/network/interfaces), the `vagrant` user with Vagrant's insecure public
key and password-less sudo. It is written into one ext4 partition of a raw disk with
extlinux as the boot loader, converted to qcow2 and packed as a libvirt box.

    python tests/boot/vagrant_box.py build [--out DIR]     # the .box file
    python tests/boot/vagrant_box.py add                   # build, then vagrant box add
    python tests/boot/vagrant_box.py boot-check            # boot it under QEMU (TCG), ssh in
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import twin
from boot_support import (
    CACHE_DIR,
    BaseRecipe,
    BootError,
    apt_source,
    ensure_base,
    mount_overlay,
    nspawn_run,
    remove_tree,
    tail,
    unmount_under,
)

BOX_NAME = "hostwall/bookworm"  # the Vagrantfile's default when HOSTWALL_BOX is unset
BOX_PACKAGES = ("linux-image-amd64", "ifupdown", "isc-dhcp-client", "rsync")
DISK_SIZE = 6 * 1024**3
PARTITION_START = 1024 * 1024
MBR = Path("/usr/lib/syslinux/mbr/mbr.bin")
INSTALL_TIMEOUT = 20 * 60
BOOT_TIMEOUT = 10 * 60

INTERFACES = """# eth0: DHCP from the provider's management network. Vagrant adds the private network below.
source /etc/network/interfaces.d/*

auto lo
iface lo inet loopback

allow-hotplug eth0
iface eth0 inet dhcp
"""


def vagrant_key(name: str) -> Path:
    """One of Vagrant's well-known insecure keys (vagrant, vagrant.pub), from the vagrant package."""
    gems = sorted(Path("/usr/share/rubygems-integration/all/gems").glob(f"vagrant-*/keys/{name}"))
    for path in [*gems, Path("/usr/share/vagrant/keys") / name]:
        if path.is_file():
            return path
    raise BootError(f"Vagrant's insecure key keys/{name} is not installed: apt-get install vagrant")


def insecure_public_key() -> str:
    return vagrant_key("vagrant.pub").read_text().strip() + "\n"


def insecure_private_key() -> Path:
    return vagrant_key("vagrant")


def run(command: list[str], timeout: float = 600, **extra: str) -> str:
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False,
                            env=dict(os.environ, **extra) if extra else None)
    if result.returncode != 0:
        raise BootError(f"{' '.join(command)} failed ({result.returncode}):\n{tail(result.stdout, 20)}\n"
                        f"{tail(result.stderr, 20)}")
    return result.stdout


def _install_vm_layer(root: Path) -> None:
    """Kernel and network tools from the mirror (the lab layer's sources are empty, so a
    sources file is put in for this step only), then the vagrant user."""
    source = apt_source()
    sources = root / "etc/apt/sources.list.d/box-build.list"
    sources.write_text(f"deb {source.uri} {source.suite} {' '.join(source.components)}\n")
    policy = root / "usr/sbin/policy-rc.d"
    policy.write_text("#!/bin/sh\nexit 101\n")
    policy.chmod(0o755)
    script = ("set -e; export DEBIAN_FRONTEND=noninteractive; apt-get update -qq; "
              f"apt-get install -y -qq --no-install-recommends {' '.join(BOX_PACKAGES)}; apt-get clean; "
              "useradd --create-home --shell /bin/bash vagrant")
    result = nspawn_run(root, f"hwbox{os.getpid()}", "sh", "-c", script, timeout=INSTALL_TIMEOUT)
    if result.returncode != 0:
        raise BootError(f"installing {' '.join(BOX_PACKAGES)} failed:\n{tail(result.stdout)}\n{tail(result.stderr)}")
    sources.unlink()
    policy.unlink()
    nspawn_run(root, f"hwbox{os.getpid()}", "apt-get", "update", "-qq")
    ssh = root / "home/vagrant/.ssh"
    ssh.mkdir(mode=0o700)
    (ssh / "authorized_keys").write_text(insecure_public_key())
    (ssh / "authorized_keys").chmod(0o600)
    run(["chroot", str(root), "chown", "-R", "vagrant:vagrant", "/home/vagrant/.ssh"])
    (root / "etc/sudoers.d/vagrant").write_text("vagrant ALL=(ALL) NOPASSWD: ALL\n")
    (root / "etc/sudoers.d/vagrant").chmod(0o440)
    (root / "etc/network/interfaces").write_text(INTERFACES)
    (root / "etc/hostname").write_text("bookworm\n")
    (root / "etc/hosts").write_text("127.0.0.1 localhost\n127.0.1.1 bookworm\n")
    run(["ssh-keygen", "-q", "-A", "-f", str(root)])


@contextlib.contextmanager
def loop_device(image: Path, offset: int) -> Iterator[str]:
    device = run(["losetup", "--find", "--show", "--offset", str(offset), str(image)]).strip()
    try:
        yield device
    finally:
        subprocess.run(["losetup", "--detach", device], capture_output=True, check=False, timeout=60)


def _write_disk(root: Path, image: Path, mount_point: Path) -> None:
    """One bootable ext4 partition holding root, extlinux in its boot sector, syslinux's MBR."""
    with image.open("wb") as disk:
        disk.truncate(DISK_SIZE)
    subprocess.run(["sfdisk", "--quiet", str(image)], input=f"start={PARTITION_START // 512}, type=83, bootable\n",
                   text=True, capture_output=True, check=True, timeout=60)
    partition = image.with_suffix(".part")
    with partition.open("wb") as part:
        part.truncate(DISK_SIZE - PARTITION_START)
    # syslinux reads neither 64bit nor metadata_csum_seed ext4 features.
    run(["mkfs.ext4", "-q", "-O", "^64bit,^metadata_csum_seed", "-L", "root", "-d", str(root), str(partition)],
        timeout=1200)
    uuid = run(["blkid", "-s", "UUID", "-o", "value", str(partition)]).strip()
    with partition.open("rb") as source, image.open("r+b") as target:
        target.seek(PARTITION_START)
        shutil.copyfileobj(source, target, 16 * 1024 * 1024)
    partition.unlink()
    with loop_device(image, PARTITION_START) as device:
        mount_point.mkdir(parents=True, exist_ok=True)
        run(["mount", device, str(mount_point)])
        try:
            (mount_point / "etc/fstab").write_text(f"UUID={uuid} / ext4 errors=remount-ro 0 1\n")
            boot = mount_point / "boot/extlinux"
            boot.mkdir(parents=True, exist_ok=True)
            kernel = sorted((mount_point / "boot").glob("vmlinuz-*"))[-1].name
            initrd = sorted((mount_point / "boot").glob("initrd.img-*"))[-1].name
            (boot / "extlinux.conf").write_text(
                f"DEFAULT debian\nTIMEOUT 0\nLABEL debian\n  LINUX /boot/{kernel}\n  INITRD /boot/{initrd}\n"
                f"  APPEND root=UUID={uuid} ro net.ifnames=0 console=ttyS0 console=tty0\n")
            run(["extlinux", "--install", str(boot)])
        finally:
            run(["umount", str(mount_point)])
    with MBR.open("rb") as mbr, image.open("r+b") as target:
        target.write(mbr.read(440))


def build(out: Path) -> Path:
    """The box file, out/hostwall-bookworm.box."""
    started = time.monotonic()
    base = ensure_base(BaseRecipe.for_this_host(), twin.log)
    layer = twin.ensure_layer(base)
    work = Path(tempfile.mkdtemp(prefix="hostwall-box-", dir=CACHE_DIR))
    try:
        root = work / "root"
        mount_overlay([layer, base], work / "upper", work / "work", root)
        try:
            _install_vm_layer(root)
            twin.log(f"box rootfs: {time.monotonic() - started:.0f} s")
            image = work / "box.img"
            _write_disk(root, image, work / "mnt")
        finally:
            unmount_under(root)
        twin.log(f"raw disk: {time.monotonic() - started:.0f} s")
        qcow2 = work / "box.qcow2"
        run(["qemu-img", "convert", "-O", "qcow2", "-c", str(image), str(qcow2)], timeout=1800)
        image.unlink()
        (work / "metadata.json").write_text(json.dumps(
            {"provider": "libvirt", "format": "qcow2", "virtual_size": DISK_SIZE // 1024**3}) + "\n")
        (work / "Vagrantfile").write_text('Vagrant.configure("2") do |config|\n'
                                          '  config.vm.provider :libvirt do |libvirt|\n'
                                          '    libvirt.driver = "qemu"\n  end\nend\n')
        out.mkdir(parents=True, exist_ok=True)
        box = out / "hostwall-bookworm.box"
        with tarfile.open(box, "w:gz", compresslevel=1) as archive:
            archive.add(work / "metadata.json", "metadata.json")
            archive.add(work / "Vagrantfile", "Vagrantfile")
            archive.add(qcow2, "box.img")
        twin.log(f"box {box} ({box.stat().st_size // 1024**2} MiB) in {time.monotonic() - started:.0f} s")
        return box
    finally:
        remove_tree(work)


def boot_check(box: Path) -> float:
    """Boots the box's disk under QEMU's software emulation in a namespace of its own, with
    port 22 forwarded to that namespace's loopback, and logs in as vagrant with the insecure
    key. Returns the seconds from start to a working ssh login."""
    work = Path(tempfile.mkdtemp(prefix="hostwall-boxcheck-", dir=CACHE_DIR))
    namespace = f"hwboxcheck{os.getpid()}"
    process = None
    try:
        with tarfile.open(box) as archive:
            archive.extract("box.img", work, filter="data")
        run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(work / "box.img"), "-F", "qcow2",
             str(work / "overlay.qcow2")])
        run(["ip", "netns", "add", namespace])
        run(["ip", "-n", namespace, "link", "set", "lo", "up"])
        key = work / "key"
        shutil.copy(insecure_private_key(), key)
        key.chmod(0o600)
        started = time.monotonic()
        with (work / "console.log").open("wb") as console:
            process = subprocess.Popen(
                ["ip", "netns", "exec", namespace, "qemu-system-x86_64", "-machine", "pc,accel=tcg", "-m", "1024",
                 "-nographic", "-serial", "stdio", "-monitor", "none",
                 "-drive", f"file={work / 'overlay.qcow2'},if=virtio,format=qcow2",
                 "-netdev", "user,id=n0,hostfwd=tcp:127.0.0.1:2222-:22", "-device", "virtio-net-pci,netdev=n0"],
                stdin=subprocess.DEVNULL, stdout=console, stderr=subprocess.STDOUT)
        deadline = started + BOOT_TIMEOUT
        while True:
            if process.poll() is not None:
                raise BootError(f"qemu exited ({process.returncode}):\n"
                                f"{tail((work / 'console.log').read_text(errors='replace'))}")
            result = subprocess.run(
                ["ip", "netns", "exec", namespace, "ssh", "-F", "/dev/null", "-i", str(key), "-p", "2222",
                 "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes",
                 "-o", "ConnectTimeout=5", "vagrant@127.0.0.1",
                 "sudo -n true && systemctl is-active ssh nftables >/dev/null; ip -4 -o addr show eth0"],
                capture_output=True, text=True, timeout=60, check=False)
            if result.returncode == 0 and "inet " in result.stdout:
                elapsed = time.monotonic() - started
                twin.log(f"box booted under TCG, vagrant logged in with sudo after {elapsed:.0f} s: "
                         f"{result.stdout.strip()}")
                return elapsed
            if time.monotonic() > deadline:
                raise BootError(f"no ssh login within {BOOT_TIMEOUT} s ({result.stderr.strip()}):\n"
                                f"{tail((work / 'console.log').read_text(errors='replace'))}")
            time.sleep(5)
    finally:
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=30)
        subprocess.run(["ip", "netns", "delete", namespace], capture_output=True, check=False, timeout=60)
        shutil.rmtree(work, ignore_errors=True)


# What building and checking the box runs on this host, and the Debian package of each.
TOOLS = {"sfdisk": "fdisk", "mkfs.ext4": "e2fsprogs", "losetup": "mount", "extlinux": "extlinux",
         "qemu-img": "qemu-utils", "qemu-system-x86_64": "qemu-system-x86", "vagrant": "vagrant",
         "systemd-nspawn": "systemd-container", "debootstrap": "debootstrap", "ssh": "openssh-client"}


def missing_packages() -> list[str]:
    path = f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin"
    missing = {package for tool, package in TOOLS.items() if shutil.which(tool, path=path) is None}
    if not MBR.is_file():
        missing.add("syslinux-common")
    return sorted(missing)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("action", choices=("build", "add", "boot-check"))
    parser.add_argument("--out", type=Path, default=CACHE_DIR / "hostwall-vagrant-box")
    arguments = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("vagrant-box: needs root (mounts, systemd-nspawn, loop devices)", file=sys.stderr)
        return 2
    if missing := missing_packages():
        print(f"vagrant-box: needs the packages {', '.join(missing)}: apt-get install {' '.join(missing)}",
              file=sys.stderr)
        return 1
    try:
        box = arguments.out / "hostwall-bookworm.box"
        if arguments.action in ("build", "add") or not box.is_file():
            box = build(arguments.out)
        if arguments.action == "boot-check":
            boot_check(box)
        if arguments.action == "add":
            run(["vagrant", "box", "add", "--force", "--name", BOX_NAME, str(box)], timeout=1800)
            twin.log(f"vagrant box {BOX_NAME} added")
    except BootError as error:
        print(f"vagrant-box: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
