#!/usr/bin/python
# ruff: noqa: E402
# Copyright: the hostwall authors. Licensed under the Apache License, Version 2.0
# (the project's licence); original code, no GPL-licensed source was used.
"""Ansible module hostwall.firewall.hostwall: hand hostwall the whole desired allowlist and load it declaratively."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: hostwall
short_description: Manage a host's hostwall allowlist firewall declaratively
description:
  - Writes the FULL desired hostwall policy of this play into exactly one managed policy
    file, C(ansible.yaml) in O(policy_dir), and loads it with C(hostwall apply --json)
    into the C(inet hostwall) nftables table, in one atomic transaction.
  - Declarative. A service or allow entry that is no longer in O(services) is removed
    from the file and from the kernel on the next run.
  - Other files in O(policy_dir) are never written. hostwall merges them with the
    managed file, and they count in validation and in the plan.
  - The candidate policy is validated with C(hostwall validate) before anything is
    written. For validation and check mode, the candidate goes to a temporary directory
    that mirrors O(policy_dir). The other entries of the directory are copied there, so
    C(file:) lists still resolve (hostwall reads nothing outside the policy directory).
  - In check mode the managed file is not written and the kernel is not changed.
    C(hostwall apply --check) runs against the mirror, and the result says whether a
    real run would change something.
  - If C(hostwall apply) fails, the previous managed file is restored (or removed, if
    there was none) and the task fails with hostwall's one-line error and exit code.
  - With O(confirm=true), the module runs C(hostwall confirm) instead, to keep a change
    applied earlier with O(confirm_within).
version_added: "0.1.0"
author:
  - hostwall authors (!UNKNOWN)
requirements:
  - hostwall on the managed host (C(pip install) of the hostwall project)
  - root, or CAP_NET_ADMIN, on the managed host (use O(ignore:become=true))
options:
  services:
    description:
      - The whole desired policy, in hostwall's policy format. Maps a service name to
        C(ports), C(protocols), C(action) and C(allow), a list of entries with exactly one
        of C(cidr) or C(file), and C(owner), C(reason), C(review_by), and optionally
        C(expires).
      - The built-in services C(https) (443 tcp and udp) and C(postgres) (5432 tcp) need
        no C(ports). A built-in service that is not listed is closed to every source but
        loopback.
      - C(file:) paths are relative to O(policy_dir).
      - Required unless O(confirm=true).
    type: dict
  settings:
    description:
      - hostwall's optional C(settings) mapping. Only one policy file of O(policy_dir) may
        give settings. A setting that is not given keeps hostwall's default.
    type: dict
    suboptions:
      log_group:
        description: The NFLOG group the kernel logs drops to (0 to 65535). hostwall's default is 100.
        type: int
      log_rate:
        description: Drop log records per second that the kernel lets through (1 to 100000). hostwall's default is 10.
        type: int
      log_burst:
        description: The burst above O(settings.log_rate) (1 to 100000). hostwall's default is 20.
        type: int
      strict_source:
        description:
          - Drop packets to protected ports whose source the host would not route back out of
            the interface they came in on (a reverse-path check against an allowed address
            spoofed from another link).
          - Leave it off on hosts with asymmetric routing (several uplinks).
          - hostwall's default is V(false).
        type: bool
      owners:
        description:
          - The owners that allow entries may name. C(hostwall audit) reports an entry with
            any other owner as an error. Not given, any owner is accepted.
        type: list
        elements: str
  policy_dir:
    description:
      - hostwall's policy directory. The module writes only C(ansible.yaml) in it, and
        creates the directory if it is missing (not in check mode).
    type: path
    default: /etc/hostwall/policies
  state_dir:
    description:
      - hostwall's state directory (C(--state-dir)). Default is hostwall's own default,
        C(/var/lib/hostwall), or E(HOSTWALL_STATE_DIR).
    type: path
  netns:
    description:
      - Run every kernel call inside this network namespace (C(--netns NAME),
        C(/run/netns/NAME)). For labs and tests.
    type: str
  hostwall_bin:
    description:
      - The hostwall command. A name is looked up in E(PATH), C(/usr/local/bin) and
        C(/opt/hostwall/bin). A path is used as it is.
    type: str
    default: hostwall
  comment:
    description:
      - Why the change is made. It is recorded with the generation (C(apply --message)).
      - Named C(comment) because Ansible reserves C(message) for its own use.
    type: str
    default: applied by Ansible
  confirm_within:
    description:
      - Seconds. hostwall reverts the change unless it is confirmed within this time, for
        example by a later task with O(confirm=true) (C(apply --confirm-within)).
    type: float
  confirm:
    description:
      - Run C(hostwall confirm) to keep a change applied with O(confirm_within). O(services)
        and O(settings) are then not allowed.
    type: bool
    default: false
  wait:
    description:
      - Seconds to wait for another hostwall command, such as the agent, that holds the lock
        (C(--wait)).
    type: float
    default: 30
notes:
  - Supports check mode and diff mode. The diff shows the managed file and, per service,
    the kernel entries that are removed (before) and added (after).
  - C(changed) is true when hostwall changes the kernel (hostwall's own C(changed), which
    includes repairing drift) or when the managed file's text changes.
attributes:
  check_mode:
    description: Runs C(hostwall apply --check) against a temporary mirror of the policy directory.
    support: full
  diff_mode:
    description: Shows the managed file's change and the kernel entries removed and added per service.
    support: full
"""

EXAMPLES = r"""
- name: Load the fleet's allowlist
  hostwall.firewall.hostwall:
    services:
      https:
        allow:
          - cidr: 203.0.113.45/32
            owner: partner-b
            reason: inventory sync egress (ticket OPS-1234)
            review_by: "2027-03-01"
      postgres:
        allow:
          - cidr: 10.0.1.0/24
            owner: platform
            reason: application server subnet
            review_by: "2027-06-30"
      metrics:
        ports: [9100]
        protocols: [tcp]
        action: reject
        allow: []
    comment: "OPS-1234: partner-b migrated"
    confirm_within: 120
  become: true
  register: hostwall_result
  notify: hostwall applied

- name: Keep the change (in a handler, after a connectivity check)
  hostwall.firewall.hostwall:
    confirm: true
  become: true

- name: Lab use, inside a network namespace with its own directories
  hostwall.firewall.hostwall:
    services: "{{ hostwall_services }}"
    netns: lab-server
    policy_dir: /srv/lab/policies
    state_dir: /srv/lab/state
    hostwall_bin: /opt/hostwall/bin/hostwall
"""

RETURN = r"""
kernel_changed:
  description: hostwall's own C(changed) (a change of entries or services, or drift to repair).
  returned: always, except with O(confirm=true)
  type: bool
  sample: true
file_changed:
  description: Whether the managed file's text changes (or would change, in check mode).
  returned: always, except with O(confirm=true)
  type: bool
policy_file:
  description: The managed file.
  returned: always, except with O(confirm=true)
  type: str
  sample: /etc/hostwall/policies/ansible.yaml
applied:
  description: Whether a new generation was loaded into the kernel.
  returned: always, except with O(confirm=true)
  type: bool
generation:
  description: The generation that was loaded, or null when nothing was loaded.
  returned: always, except with O(confirm=true)
  type: int
  sample: 7
method:
  description: How it was loaded, C(delta) (element delta) or C(full) (full load), or null.
  returned: always, except with O(confirm=true)
  type: str
  sample: delta
pending:
  description:
    - The confirmation that is pending after this apply (C(generation), C(revert_to),
      C(deadline), C(seconds_left)), or null.
    - With O(confirm=true) in check mode, the confirmation that a real run would confirm.
  returned: always
  type: dict
  sample: {generation: 7, revert_to: 6, deadline: "2026-11-28T12:00:00+00:00", seconds_left: 119.8}
services:
  description: Per service, hostwall's plan, C(name), C(status), C(added), C(removed), C(details).
  returned: always, except with O(confirm=true)
  type: list
  elements: dict
  sample: [{name: postgres, status: entries, added: [], removed: ["10.77.1.2/32"], details: []}]
summary:
  description: hostwall's one-line summary of the plan.
  returned: always, except with O(confirm=true)
  type: str
drift:
  description: Ways the kernel differed from what hostwall last wrote (repaired by the apply).
  returned: always, except with O(confirm=true)
  type: list
  elements: str
warnings_hostwall:
  description: hostwall's policy warnings, such as expired entries that are not loaded.
  returned: always, except with O(confirm=true)
  type: list
  elements: str
confirmed:
  description: The generation that was confirmed, or null when nothing was pending.
  returned: with O(confirm=true)
  type: int
rc:
  description: hostwall's exit code (on failure, the documented hostwall exit code; 10 in check mode when the
    kernel would change).
  returned: always
  type: int
problems:
  description: Every problem of an invalid policy (exit code 3), one line each.
  returned: on failure
  type: list
  elements: str
dry_run:
  description: Whether hostwall only planned the change (check mode).
  returned: always, except with O(confirm=true)
  type: bool
kind:
  description: The class name of hostwall's error, such as C(PolicyError), or null.
  returned: on failure
  type: str
managed_file:
  description:
    - What became of the managed file after a failed C(hostwall apply). V(restored) (the
      previous text is back), V(removed) (there was none before) or V(unchanged).
  returned: when C(hostwall apply) fails
  type: str
  sample: restored
stderr:
  description: hostwall's standard error.
  returned: on failure
  type: str
cmd:
  description: The hostwall command that failed.
  returned: on failure
  type: list
  elements: str
"""

import json
import os
import re
import shutil
import tempfile

from ansible.module_utils.basic import AnsibleModule

MANAGED_NAME = "ansible.yaml"
HEADER = (
    "# Managed by Ansible (hostwall module): the whole policy of the play.\n"
    "# Local edits are overwritten; put local entries in another *.yaml file.\n"
)
_BARE_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_RESERVED = frozenset(("y", "n", "yes", "no", "on", "off", "true", "false", "null", "none", "tilde"))


# -- rendering: a small deterministic YAML emitter (block mappings, quoted strings) ------

def _scalar(value):
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)
    # A JSON string is a valid YAML double-quoted scalar: a date or a CIDR stays text.
    return json.dumps(str(value), ensure_ascii=False)


def _key(value):
    text = str(value)
    if _BARE_KEY.match(text) and text.lower() not in _RESERVED:
        return text
    return json.dumps(text, ensure_ascii=False)


def _is_scalar(value):
    return not isinstance(value, (dict, list, tuple))


def _emit(value, indent, lines):
    pad = " " * indent
    if isinstance(value, dict):
        for key, item in value.items():
            if _is_scalar(item) or not item:
                lines.append(f"{pad}{_key(key)}: {_inline(item)}")
            elif isinstance(item, dict):
                lines.append(f"{pad}{_key(key)}:")
                _emit(item, indent + 2, lines)
            elif all(_is_scalar(x) for x in item):
                lines.append(f"{pad}{_key(key)}: {_inline(item)}")
            else:
                lines.append(f"{pad}{_key(key)}:")
                _emit(item, indent + 2, lines)
    else:
        for item in value:
            if (isinstance(item, dict) and item) or (
                    isinstance(item, (list, tuple)) and item and not all(_is_scalar(x) for x in item)):
                nested = []
                _emit(item, indent + 2, nested)
                nested[0] = f"{pad}- {nested[0][indent + 2:]}"
                lines.extend(nested)
            else:
                lines.append(f"{pad}- {_inline(item)}")


def _inline(value):
    if isinstance(value, dict):
        if not value:
            return "{}"
        return "{" + ", ".join(f"{_key(k)}: {_inline(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_inline(v) for v in value) + "]"
    return _scalar(value)


def render_policy(services, settings):
    document = {"services": services if services is not None else {}}
    # Ansible fills every setting that the play leaves out with None: those keep hostwall's defaults.
    given = {key: value for key, value in (settings or {}).items() if value is not None}
    if given:
        document["settings"] = given
    lines = []
    _emit(document, 0, lines)
    return HEADER + "\n".join(lines) + "\n"


# -- files ---------------------------------------------------------------------------

def read_text(path):
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read()
    except FileNotFoundError:
        return None


def write_atomically(module, path, text):
    """Temp file in the same directory (not *.yaml, so hostwall never loads it), fsync,
    rename over the managed file, fsync the directory."""
    directory = os.path.dirname(path)
    fd, temporary = tempfile.mkstemp(dir=directory, prefix=".ansible.yaml.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        if not os.path.exists(path):
            os.chmod(temporary, 0o644)
        module.atomic_move(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
    _fsync_directory(directory)


def remove_file(path):
    try:
        os.unlink(path)
    except FileNotFoundError:
        return
    _fsync_directory(os.path.dirname(path))


def _fsync_directory(directory):
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_mirror(policy_dir, candidate):
    """A temporary directory that stands for policy_dir with the candidate as the managed
    file. Every other entry of policy_dir is copied, so merged files and file: lists
    resolve as they will in the real directory; hostwall refuses symlinks that leave the
    policy directory, so an entry that is not a plain file or directory inside it (a
    symlink out, a FIFO) is linked to as it is, and refused in the mirror as it will be
    in the real directory."""
    mirror = tempfile.mkdtemp(prefix="hostwall-ansible-")
    if os.path.isdir(policy_dir):
        root = os.path.realpath(policy_dir)
        for name in sorted(os.listdir(policy_dir)):
            if name == MANAGED_NAME or name.startswith(".ansible.yaml."):
                continue
            source, target = os.path.join(policy_dir, name), os.path.join(mirror, name)
            resolved = os.path.realpath(source)
            inside = os.path.commonpath([root, resolved]) == root
            if inside and os.path.isdir(resolved):
                shutil.copytree(resolved, target, symlinks=True)
            elif inside and os.path.isfile(resolved):
                shutil.copy2(resolved, target)
            else:
                os.symlink(source, target)
    with open(os.path.join(mirror, MANAGED_NAME), "w", encoding="utf-8") as handle:
        handle.write(candidate)
    return mirror


# -- running hostwall ------------------------------------------------------------------

class Hostwall:
    def __init__(self, module):
        self.module = module
        params = module.params
        binary = params["hostwall_bin"]
        if os.sep in binary:
            self.binary = binary if os.path.isfile(binary) and os.access(binary, os.X_OK) else None
        else:
            self.binary = module.get_bin_path(binary, required=False,
                                              opt_dirs=["/usr/local/bin", "/opt/hostwall/bin"])
        if self.binary is None and module.check_mode:
            # A check run on a fresh host: the role's install steps did not run either.
            module.warn(f"hostwall_bin {binary!r} is not installed yet; nothing was checked")
            module.exit_json(changed=not params["confirm"], rc=None,
                             msg="hostwall is not installed: a real run would install it and apply the policy")
        if self.binary is None:
            where = "is not an executable file" if os.sep in binary else \
                "was not found in PATH, /usr/local/bin or /opt/hostwall/bin"
            module.fail_json(msg=f"hostwall_bin {binary!r} {where}: install hostwall first", rc=127)
        self.netns = params["netns"]
        self.state_dir = params["state_dir"]
        self.wait = params["wait"]

    def run(self, policy_dir, *args, kernel=True):
        """Run hostwall with --json; (rc, document or None, stderr, command)."""
        command = [self.binary]
        if kernel and self.netns:
            command += ["--netns", self.netns]
        if policy_dir is not None:
            command += ["--policy-dir", policy_dir]
        if kernel and self.state_dir:
            command += ["--state-dir", self.state_dir]
        command += [*args, "--json"]
        rc, stdout, stderr = self.module.run_command(command, environ_update={"LC_ALL": "C.UTF-8"})
        try:
            document = json.loads(stdout) if stdout.strip() else None
        except ValueError:
            document = None
        return rc, document, stderr, command

    def fail(self, rc, document, stderr, command, replace=None, **extra):
        """Fail with hostwall's one-line error and exit code."""
        def tidy(text):
            for old, new in (replace or {}).items():
                text = text.replace(old, new)
            return text

        if isinstance(document, dict) and document.get("error"):
            msg = "hostwall: " + tidy(str(document["error"]))
            problems = [tidy(str(p)) for p in document.get("problems") or []]
            kind = document.get("kind")
        else:
            lines = [line for line in stderr.splitlines() if line.strip()]
            msg = tidy(lines[-1]) if lines else f"hostwall exited with code {rc} and said nothing"
            problems, kind = [], None
        msg = " ".join(part.strip() for part in msg.splitlines() if part.strip())
        self.module.fail_json(msg=msg, rc=rc, kind=kind, problems=problems, stderr=tidy(stderr),
                              cmd=command, **extra)


# -- diff ------------------------------------------------------------------------------

def kernel_diff(changes):
    """before: the entries hostwall removes, after: the entries it adds, per service."""
    before, after = [], []
    for change in changes:
        name = change.get("name", "?")
        status = change.get("status")
        details = "; ".join(change.get("details") or [])
        note = f"# service {name}: {status}" + (f" ({details})" if details else "")
        if status == "removed":
            before.append(note)
        elif status in ("added", "changed"):
            after.append(note)
        before.extend(f"{name}: {interval}" for interval in change.get("removed") or [])
        after.extend(f"{name}: {interval}" for interval in change.get("added") or [])
    return {
        "before_header": "hostwall kernel: entries removed",
        "after_header": "hostwall kernel: entries added",
        "before": "\n".join(before) + ("\n" if before else ""),
        "after": "\n".join(after) + ("\n" if after else ""),
    }


# -- the module -------------------------------------------------------------------------

def run_confirm(module, hostwall):
    if module.check_mode:
        rc, document, stderr, command = hostwall.run(None, "status")
        if rc not in (0, 10) or not isinstance(document, dict):
            hostwall.fail(rc, document, stderr, command)
        pending = document.get("pending")
        module.exit_json(changed=pending is not None, confirmed=None, pending=pending, rc=rc,
                         msg="would confirm generation {}".format(pending["generation"]) if pending
                         else "nothing to confirm")
    rc, document, stderr, command = hostwall.run(None, "confirm", "--wait", _seconds(hostwall.wait))
    if rc != 0 or not isinstance(document, dict):
        hostwall.fail(rc, document, stderr, command)
    confirmed = document.get("confirmed")
    module.exit_json(changed=confirmed is not None, confirmed=confirmed, pending=None, rc=rc,
                     msg=f"generation {confirmed} confirmed" if confirmed is not None else "nothing to confirm")


def _seconds(value):
    return f"{float(value):g}"


def run_apply(module, hostwall):
    params = module.params
    policy_dir = os.path.abspath(params["policy_dir"])
    managed = os.path.join(policy_dir, MANAGED_NAME)
    if os.path.exists(policy_dir) and not os.path.isdir(policy_dir):
        module.fail_json(msg=f"policy_dir {policy_dir} is not a directory", rc=3)
    if os.path.islink(managed) or (os.path.exists(managed) and not os.path.isfile(managed)):
        module.fail_json(msg=f"{managed} is not a regular file; the module manages it and will not follow it", rc=3)

    previous = read_text(managed)
    candidate = render_policy(params["services"], params["settings"])
    file_changed = previous != candidate

    mirror = make_mirror(policy_dir, candidate)
    try:
        # Validate first: an invalid candidate never reaches the real policy directory.
        rc, document, stderr, command = hostwall.run(mirror, "validate", kernel=False)
        if rc != 0:
            hostwall.fail(rc, document, stderr, command, replace={mirror: policy_dir}, file_changed=False)
        if module.check_mode:
            rc, document, stderr, command = hostwall.run(
                mirror, "apply", "--check", "--wait", _seconds(hostwall.wait))
            # 10: changes pending (apply --check exits like plan), which check mode reports.
            if rc not in (0, 10) or not isinstance(document, dict):
                hostwall.fail(rc, document, stderr, command, replace={mirror: policy_dir})
            finish(module, document, previous, candidate, file_changed, managed, rc)
    finally:
        shutil.rmtree(mirror, ignore_errors=True)

    if not os.path.isdir(policy_dir):
        os.makedirs(policy_dir, mode=0o755)
    if file_changed:
        write_atomically(module, managed, candidate)
    args = ["apply", "-m", params["comment"], "--wait", _seconds(hostwall.wait)]
    if params["confirm_within"] is not None:
        args += ["--confirm-within", _seconds(params["confirm_within"])]
    rc, document, stderr, command = hostwall.run(policy_dir, *args)
    if rc != 0 or not isinstance(document, dict):
        restored = "unchanged"
        if file_changed:
            if previous is None:
                remove_file(managed)
                restored = "removed"
            else:
                write_atomically(module, managed, previous)
                restored = "restored"
        hostwall.fail(rc, document, stderr, command, file_changed=False, policy_file=managed,
                      managed_file=restored)
    finish(module, document, previous, candidate, file_changed, managed, rc)


def finish(module, document, previous, candidate, file_changed, managed, rc):
    changes = document.get("services") or []
    kernel_changed = bool(document.get("changed"))
    result = {
        "changed": kernel_changed or file_changed,
        "kernel_changed": kernel_changed,
        "file_changed": file_changed,
        "policy_file": managed,
        "applied": bool(document.get("applied")),
        "generation": document.get("generation"),
        "method": document.get("method"),
        "pending": document.get("pending"),
        "services": changes,
        "summary": document.get("summary"),
        "drift": document.get("drift") or [],
        "warnings_hostwall": document.get("warnings") or [],
        "dry_run": bool(document.get("dry_run")),
        "rc": rc,
        # Said outright: Ansible takes a result's non-zero rc for a failure, and check mode's
        # apply --check exits 10 when the kernel would change.
        "failed": False,
    }
    if not kernel_changed:
        result["msg"] = "no changes: the kernel already holds this policy"
        if file_changed:
            result["msg"] += f" ({managed} {'would be' if module.check_mode else 'was'} rewritten)"
    elif module.check_mode:
        result["msg"] = f"would apply: {document.get('summary')}"
    else:
        result["msg"] = f"applied generation {document.get('generation')} ({document.get('method')}): " \
                        f"{document.get('summary')}"
    for warning in result["warnings_hostwall"]:
        module.warn(f"hostwall: {warning}")
    if module._diff:
        diffs = []
        if file_changed:
            diffs.append({"before_header": managed if previous is not None else f"{managed} (absent)",
                          "after_header": managed, "before": previous or "", "after": candidate})
        if kernel_changed and changes:
            diffs.append(kernel_diff(changes))
        result["diff"] = diffs
    module.exit_json(**result)


def main():
    module = AnsibleModule(
        argument_spec={
            "services": {"type": "dict"},
            "settings": {"type": "dict", "options": {
                "log_group": {"type": "int"},
                "log_rate": {"type": "int"},
                "log_burst": {"type": "int"},
                "strict_source": {"type": "bool"},
                "owners": {"type": "list", "elements": "str"},
            }},
            "policy_dir": {"type": "path", "default": "/etc/hostwall/policies"},
            "state_dir": {"type": "path"},
            "netns": {"type": "str"},
            "hostwall_bin": {"type": "str", "default": "hostwall"},
            "comment": {"type": "str", "default": "applied by Ansible"},
            "confirm_within": {"type": "float"},
            "confirm": {"type": "bool", "default": False},
            "wait": {"type": "float", "default": 30},
        },
        supports_check_mode=True,
    )
    params = module.params
    if params["confirm"]:
        given = [name for name in ("services", "settings", "confirm_within") if params[name] is not None]
        if given:
            module.fail_json(msg=f"confirm=true takes no {', '.join(given)}: it confirms the pending change")
    elif params["services"] is None:
        module.fail_json(msg="services is required (the whole desired policy), unless confirm=true")
    if params["confirm_within"] is not None and params["confirm_within"] < 1:
        module.fail_json(msg="confirm_within must be at least 1 second")
    if params["wait"] < 0:
        module.fail_json(msg="wait must not be negative")
    hostwall = Hostwall(module)
    if params["confirm"]:
        run_confirm(module, hostwall)
    else:
        run_apply(module, hostwall)


if __name__ == "__main__":
    main()
