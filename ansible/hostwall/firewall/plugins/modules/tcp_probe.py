#!/usr/bin/python
# ruff: noqa: E402
# Copyright: the hostwall authors. Licensed under the Apache License, Version 2.0
# (the project's licence); original code.
"""Ansible module hostwall.firewall.tcp_probe: one TCP connection attempt, and what became of it."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: tcp_probe
short_description: Try one TCP connection and tell whether it connected, was refused or timed out
description:
  - Makes one TCP connection attempt from the host it runs on (usually a client of the
    firewalled host, with C(delegate_to)) to O(host) and O(port), and closes it at once.
  - The attempt ends in one of three ways. V(open) is a completed handshake, V(refused)
    is a reset or an ICMP error (a C(reject) service, or no listener), and V(timeout) is
    no answer within O(timeout) seconds (a hostwall C(drop) service).
  - The task fails when the result is not O(expect). A rolling change uses this to prove
    that a client on the allowlist still connects and that one off it still times out,
    before it confirms the change.
version_added: "0.1.0"
author:
  - hostwall authors (!UNKNOWN)
options:
  host:
    description: The address or name to connect to.
    type: str
    required: true
  port:
    description: The TCP port.
    type: int
    required: true
  timeout:
    description: Seconds to wait for the handshake.
    type: float
    default: 5
  expect:
    description:
      - The result the task requires. V(closed) accepts V(refused) and V(timeout). V(any)
        only reports.
    type: str
    choices: [open, refused, timeout, closed, any]
    default: open
notes:
  - Check mode runs the probe too, since it changes nothing.
attributes:
  check_mode:
    description: The probe runs, since it changes nothing.
    support: full
  diff_mode:
    description: There is nothing to show.
    support: none
"""

EXAMPLES = r"""
- name: The partner still reaches HTTPS on the host
  hostwall.firewall.tcp_probe:
    host: "{{ ansible_host }}"
    port: 443
    expect: open
  delegate_to: partner

- name: The outsider's connection still times out
  hostwall.firewall.tcp_probe:
    host: "{{ ansible_host }}"
    port: 443
    timeout: 3
    expect: timeout
  delegate_to: outsider
"""

RETURN = r"""
result:
  description: How the attempt ended, V(open), V(refused) or V(timeout).
  returned: always
  type: str
  sample: timeout
elapsed:
  description: Seconds the attempt took.
  returned: always
  type: float
  sample: 0.002
error:
  description: The operating system's error, when the attempt did not connect.
  returned: when the result is not V(open)
  type: str
  sample: "[Errno 111] Connection refused"
"""

import socket
import time

from ansible.module_utils.basic import AnsibleModule


def attempt(host, port, timeout):
    """(result, error text or None)."""
    try:
        connection = socket.create_connection((host, port), timeout=timeout)
    # socket.timeout: before Python 3.10 (managed hosts may run it) it is not TimeoutError.
    except socket.timeout as error:  # noqa: UP041
        return "timeout", str(error) or "timed out"
    except OSError as error:
        return "refused", str(error)
    connection.close()
    return "open", None


def main():
    module = AnsibleModule(
        argument_spec={
            "host": {"type": "str", "required": True},
            "port": {"type": "int", "required": True},
            "timeout": {"type": "float", "default": 5},
            "expect": {"type": "str", "default": "open",
                       "choices": ["open", "refused", "timeout", "closed", "any"]},
        },
        supports_check_mode=True,
    )
    params = module.params
    if not 0 < params["port"] < 65536:
        module.fail_json(msg=f"port {params['port']} is not a TCP port (1 to 65535)")
    if params["timeout"] <= 0:
        module.fail_json(msg="timeout must be more than 0 seconds")
    started = time.monotonic()
    result, error = attempt(params["host"], params["port"], params["timeout"])
    elapsed = round(time.monotonic() - started, 3)
    expect = params["expect"]
    accepted = {"closed": ("refused", "timeout"), "any": ("open", "refused", "timeout")}.get(expect, (expect,))
    report = {"changed": False, "result": result, "elapsed": elapsed}
    if error is not None:
        report["error"] = error
    where = f"{params['host']} port {params['port']}"
    if result not in accepted:
        module.fail_json(msg=f"{where}: {result}, expected {expect}", **report)
    module.exit_json(msg=f"{where}: {result}", **report)


if __name__ == "__main__":
    main()
