"""A one-entry change loads only what it uses: with the policy file unchanged since the last
apply, `hostwall apply` takes the validated file and the parsed list from the state
directory's cache, imports neither pydantic, a YAML reader nor the libnftables binding,
and still loads exactly the changed element; a changed policy file is validated again."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from netns_support import COMMAND_TIMEOUT, Cli, Nft

from hostwall.lab import Lab

HEAVY = ("pydantic", "yaml", "hostwall.yamlsource", "nftables", "hostwall.policyfile", "hostwall.cli.export",
         "hostwall.verify")
# The real CLI, reporting which of HEAVY it imported once the command has finished.
PROBE = f"""
import atexit, sys
atexit.register(lambda: sys.stderr.write("LOADED " + ",".join(m for m in {HEAVY!r} if m in sys.modules) + "\\n"))
from hostwall.cli import main
main(prog_name="hostwall")
"""
POLICY = """\
services:
  https:
    allow:
      - file: partners.txt
        owner: partner-c
        reason: their published list
        review_by: 2099-01-01
"""


def applied(lab: Lab, policy_dir: Path, state_dir: Path, message: str) -> tuple[dict[str, object], list[str]]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("HOSTWALL_")}
    result = subprocess.run([sys.executable, "-c", PROBE, "--netns", lab.server, "--policy-dir", str(policy_dir),
                             "--state-dir", str(state_dir), "apply", "--json", "-m", message],
                            capture_output=True, text=True, env=environment, timeout=COMMAND_TIMEOUT, check=False)
    assert result.returncode == 0, result.stderr
    loaded = result.stderr.rsplit("LOADED ", 1)[1].strip()
    return json.loads(result.stdout), [name for name in loaded.split(",") if name]


def test_a_list_line_change_imports_only_what_the_delta_needs(
    lab: Lab, policy_dir: Path, state_dir: Path, hostwall: Cli, nft: Nft
) -> None:
    lines = [f"10.{a}.{b}.0/24" for a in range(40, 44) for b in range(0, 250, 2)]
    (policy_dir / "policy.yaml").write_text(POLICY)
    (policy_dir / "partners.txt").write_text("\n".join(lines) + "\n")
    first, loaded = applied(lab, policy_dir, state_dir, "first")
    assert first["method"] == "full"
    # A cold cache reads and validates the file: it is in the block shape and its values are
    # plainly valid, so without PyYAML or the models.
    assert "hostwall.yamlsource" in loaded and not {"yaml", "pydantic", "hostwall.policyfile"} & set(loaded)

    lines[7] = "192.0.2.77/32"
    (policy_dir / "partners.txt").write_text("\n".join(lines) + "\n")
    changed, loaded = applied(lab, policy_dir, state_dir, "one line")
    assert changed["method"] == "delta"
    assert loaded == []
    listing = nft("list", "table", "inet", "hostwall").stdout
    assert "192.0.2.77" in listing and "10.40.14.0/24" not in listing
    assert hostwall("plan").returncode == 0  # the kernel holds exactly the policy

    (policy_dir / "policy.yaml").write_text(POLICY.replace("their published list", "their list, renewed"))
    lines[8] = "192.0.2.78/32"
    (policy_dir / "partners.txt").write_text("\n".join(lines) + "\n")
    again, loaded = applied(lab, policy_dir, state_dir, "policy file edited")
    assert again["method"] == "delta"
    assert "hostwall.yamlsource" in loaded and not {"yaml", "pydantic", "nftables"} & set(loaded)
    assert "192.0.2.78" in nft("list", "table", "inet", "hostwall").stdout
