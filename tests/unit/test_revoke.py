"""Offboarding: owners lists what an owner holds; revoke prints the exact edits and,
with --write, cuts them out of the files, keeping every other line as written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_cli import invoke
from unit_support import WriteFiles

from hostwall import revoke as revoke_module
from hostwall.errors import PolicyError
from hostwall.policy import load_policy
from hostwall.revoke import FileEdit, remove_owner

SITE = """\
# site policy: reviewed monthly
services:
  https:                      # built-in: 443
    allow:
      # partner-b's inventory sync host
      - cidr: 203.0.113.45/32
        owner: partner-b
        reason: inventory sync egress (ticket OPS-1234)
        review_by: 2027-03-01   # agreed with partner-b
      # office VPN
      - cidr: 2001:db8:10::/48
        owner: it-network
        reason: office VPN exit
        review_by: 2027-01-15

      - file: partner-b.txt
        owner: partner-b
        reason: published ranges
        review_by: 2027-02-01
  postgres:
    allow:
      - cidr: 10.0.1.0/24
        owner: partner-b
        reason: "reporting replica"
        review_by: 2027-06-30
    # postgres is reached from the app subnet only
settings:
  owners: [partner-b, it-network]
"""

AFTER = """\
# site policy: reviewed monthly
services:
  https:                      # built-in: 443
    allow:
      # office VPN
      - cidr: 2001:db8:10::/48
        owner: it-network
        reason: office VPN exit
        review_by: 2027-01-15

  postgres:
    allow: []
    # postgres is reached from the app subnet only
settings:
  owners: [partner-b, it-network]
"""


@pytest.fixture
def site(write_files: WriteFiles) -> Path:
    return write_files({"site.yaml": SITE, "partner-b.txt": "198.51.100.0/24\n",
                        "other.yaml": "services:\n  https:\n    allow:\n      - cidr: 192.0.2.1/32\n"
                                      "        owner: it-network\n        reason: monitor\n"
                                      "        review_by: 2027-01-01\n"})


def test_remove_owner_cuts_only_the_owners_items_and_the_comments_above_them() -> None:
    edit = remove_owner(SITE, "site.yaml", "partner-b")

    assert edit.new == AFTER
    assert [(r.service, r.entry, r.subject, r.line, r.first_line, r.last_line) for r in edit.removals] == [
        ("https", "services.https.allow[0]", "203.0.113.45/32", 6, 5, 9),
        ("https", "services.https.allow[2]", "file: partner-b.txt", 16, 16, 19),
        ("postgres", "services.postgres.allow[0]", "10.0.1.0/24", 22, 22, 25),
    ]
    assert edit.diff().startswith("--- site.yaml\n+++ site.yaml\n")


def test_remove_owner_of_nobody_changes_nothing() -> None:
    edit = remove_owner(SITE, "site.yaml", "nobody")

    assert (edit.new, edit.removals) == (SITE, ())


def test_remove_owner_with_a_dash_on_its_own_line_and_block_scalars() -> None:
    text = ("services:\n  https:\n    allow:\n    -\n      cidr: 192.0.2.1/32\n      owner: gone\n"
            "      reason: |\n        two\n        lines\n      review_by: 2027-01-01\n"
            "    - cidr: 192.0.2.2/32\n      owner: kept\n      reason: r\n      review_by: 2027-01-01\n")

    assert remove_owner(text, "p.yaml", "gone").new == (
        "services:\n  https:\n    allow:\n"
        "    - cidr: 192.0.2.2/32\n      owner: kept\n      reason: r\n      review_by: 2027-01-01\n")


def test_flow_style_lists_are_refused_with_the_fix() -> None:
    text = "services:\n  https:\n    allow: [{cidr: 192.0.2.1/32, owner: gone, reason: r, review_by: 2027-01-01}]\n"

    with pytest.raises(PolicyError) as raised:
        remove_owner(text, "p.yaml", "gone")
    assert "p.yaml:3" in str(raised.value)
    assert "write it as a block list" in str(raised.value)


def test_owners_command_lists_every_owner(site: Path) -> None:
    result = invoke(site, "owners")

    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["owner", "entries", "services", "next", "review"]
    assert lines[1].split() == ["it-network", "2", "https", "2027-01-01"]
    assert lines[2].split() == ["partner-b", "3", "https,postgres", "2027-02-01"]


def test_owners_command_json_for_one_owner(site: Path) -> None:
    result = invoke(site, "owners", "partner-b", "--json")

    report = json.loads(result.stdout)
    assert report["partner-b"]["entries"] == 3
    assert report["partner-b"]["services"] == ["https", "postgres"]
    assert [item["subject"].rsplit("/", 1)[-1] for item in report["partner-b"]["items"]] == [
        "32", "partner-b.txt", "24"]
    assert report["partner-b"]["items"][0]["where"].endswith("site.yaml:6")


def test_revoke_prints_the_exact_edits_and_changes_nothing(site: Path) -> None:
    result = invoke(site, "revoke", "--owner", "partner-b")

    assert result.exit_code == 0
    assert (site / "site.yaml").read_text() == SITE
    assert f"{site / 'site.yaml'}:5-9: remove services.https.allow[0] (203.0.113.45/32)" in result.stdout
    assert "-      - cidr: 203.0.113.45/32\n" in result.stdout
    assert "-    allow:\n" in result.stdout and "+    allow: []\n" in result.stdout
    assert "dry run: 3 entries of partner-b; --write applies these edits" in result.stdout
    assert "partner-b is still in settings.owners" in result.stdout


def test_revoke_write_keeps_comments_and_order_and_revalidates(site: Path) -> None:
    result = invoke(site, "revoke", "--owner", "partner-b", "--write")

    assert result.exit_code == 0, result.stderr
    assert (site / "site.yaml").read_text() == AFTER
    assert "the policy is valid" in result.stdout
    assert f"{site / 'partner-b.txt'} is no longer referenced" in result.stdout
    policy = load_policy(site)
    assert {e.owner for s in policy.services for e in s.entries} == {"it-network"}
    assert invoke(site, "validate").exit_code == 0
    assert invoke(site, "owners", "partner-b").stdout == "no entry is owned by 'partner-b'\n"


def test_revoke_write_json(site: Path) -> None:
    report = json.loads(invoke(site, "revoke", "--owner", "partner-b", "--write", "--json").stdout)

    assert report["written"] is True
    assert [r["subject"] for e in report["edits"] for r in e["removals"]] == [
        "203.0.113.45/32", "file: partner-b.txt", "10.0.1.0/24"]
    assert report["unreferenced_lists"] == [str(site / "partner-b.txt")]


def test_revoke_write_puts_the_files_back_when_the_result_is_invalid(site: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(text: str, path: str, owner: str) -> FileEdit:
        edit = remove_owner(text, path, owner)
        return FileEdit(edit.path, edit.old, edit.new.replace("review_by: 2027-01-15", "review_by: soon"),
                        edit.removals)

    monkeypatch.setattr(revoke_module, "remove_owner", broken)
    result = invoke(site, "revoke", "--owner", "partner-b", "--write")

    assert result.exit_code == 3
    assert "the files were put back" in result.stderr
    assert (site / "site.yaml").read_text() == SITE


def test_revoke_of_an_unknown_owner(site: Path) -> None:
    result = invoke(site, "revoke", "--owner", "nobody", "--write")

    assert result.exit_code == 0
    assert result.stdout == "no entry is owned by 'nobody': nothing to revoke\n"
