"""hostwall audit: every rule, severities, suggested actions, --json and --fail-on."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import pytest
from test_cli import invoke
from unit_support import PINNED_NOW, WriteFiles

from hostwall.audit import AuditOptions, Finding, audit, holdings
from hostwall.cidr import Interval
from hostwall.errors import PolicyError
from hostwall.policy import load_policy

# The library calls take this moment; the commands read it from the pinned clock.
NOW = PINNED_NOW
pytestmark = pytest.mark.usefixtures("pinned_clock")


def entry(cidr: str, owner: str = "platform", review_by: str = "2027-01-01", extra: str = "") -> str:
    text = (f"      - cidr: {cidr}\n        owner: {owner}\n        reason: test\n"
            f"        review_by: {review_by}\n")
    return text + "".join(f"        {line}\n" for line in extra.splitlines())


def policy(*entries: str, service: str = "https", head: str = "", tail: str = "") -> str:
    return f"services:\n  {service}:\n{head}    allow:\n" + "".join(entries) + tail


def run(write_files: WriteFiles, text: str, files: dict[str, str | bytes] | None = None,
        **options: object) -> list[Finding]:
    root = write_files({"policy.yaml": text, **(files or {})})
    return audit(load_policy(root, now=NOW), AuditOptions(now=NOW, **options))  # type: ignore[arg-type]


def rules(findings: list[Finding]) -> list[tuple[str, str, str]]:
    return [(f.rule, f.severity, f.subject) for f in findings]


def test_a_clean_policy_has_no_findings(write_files: WriteFiles) -> None:
    assert run(write_files, policy(entry("203.0.113.45/32"), entry("2001:db8:10::/48"))) == []


def test_review_date_in_the_past_is_an_error_with_the_owner_to_ask(write_files: WriteFiles) -> None:
    [finding] = run(write_files, policy(entry("203.0.113.45/32", owner="partner-b", review_by="2026-05-01")))

    assert (finding.rule, finding.severity, finding.owner) == ("review-overdue", "error", "partner-b")
    assert finding.where.endswith("policy.yaml:4")
    assert "passed 31 day(s) ago" in finding.message
    assert "ask partner-b" in finding.action


def test_review_due_within_the_window_is_a_warning(write_files: WriteFiles) -> None:
    text = policy(entry("203.0.113.45/32", review_by="2026-06-20"), entry("203.0.113.46/32", review_by="2026-08-01"))

    assert rules(run(write_files, text)) == [("review-due", "warning", "203.0.113.45/32")]
    assert rules(run(write_files, text, within=timedelta(days=90))) == [
        ("review-due", "warning", "203.0.113.45/32"), ("review-due", "warning", "203.0.113.46/32")]
    assert run(write_files, text, within=timedelta(days=7)) == []


def test_expired_entry_still_in_the_file_is_reported_once_per_entry(write_files: WriteFiles) -> None:
    text = policy(entry("203.0.113.45/32", extra="expires: 2026-05-01T00:00:00Z"),
                  "      - file: old.txt\n        owner: p\n        reason: r\n        review_by: 2027-01-01\n"
                  "        expires: 2026-01-01T00:00:00Z\n")
    findings = run(write_files, text, {"old.txt": "198.51.100.0/25\n198.51.100.128/25\n"})

    expired = [f for f in findings if f.rule == "expired"]
    assert [(f.rule, f.severity) for f in expired] == [("expired", "warning")] * 2
    assert {f.service for f in findings} == {"https"}
    assert "remove it from the file" in expired[0].action
    # With every entry expired, nobody may reach the service any more.
    assert [(f.rule, f.severity) for f in findings if f.rule != "expired"] == [("allows-nobody", "warning")]


def test_too_broad_by_default_thresholds(write_files: WriteFiles) -> None:
    text = policy(entry("10.0.0.0/23"), entry("10.1.0.0/24"), entry("2001:db8::/47"), entry("2001:db9::/48"))

    assert rules(run(write_files, text)) == [("too-broad", "warning", "10.0.0.0/23"),
                                             ("too-broad", "warning", "2001:db8::/47")]


def test_widest_is_configurable_per_service(write_files: WriteFiles) -> None:
    text = policy(entry("10.0.0.0/16"), entry("2001:db8::/40"), head="    widest: {ipv4: 16, ipv6: 32}\n",
                  service="metrics") .replace("  metrics:\n", "  metrics:\n    ports: [9100]\n")
    other = "  postgres:\n    allow:\n" + entry("10.9.0.0/16")

    assert rules(run(write_files, text + other)) == [("too-broad", "warning", "10.9.0.0/16")]


def test_broad_ok_with_a_reason_silences_too_broad(write_files: WriteFiles) -> None:
    text = policy(entry("10.0.0.0/8", extra="broad_ok: true\nbroad_reason: the whole office network"))

    assert run(write_files, text) == []


def test_broad_ok_on_a_list_applies_to_its_lines(write_files: WriteFiles) -> None:
    text = policy("      - file: wide.txt\n        owner: p\n        reason: r\n        review_by: 2027-01-01\n"
                  "        broad_ok: true\n        broad_reason: a provider's published ranges\n")

    assert run(write_files, text, {"wide.txt": "10.0.0.0/8\n"}) == []
    findings = run(write_files, text.replace("        broad_ok: true\n        broad_reason: a provider's "
                                             "published ranges\n", ""), {"wide.txt": "10.0.0.0/8\n"})
    assert [(f.rule, f.where.endswith("wide.txt:1")) for f in findings] == [("too-broad", True)]


@pytest.mark.parametrize(("extra", "message"), [
    ("broad_ok: true", "broad_ok: true needs broad_reason:"),
    ("broad_reason: because", "broad_reason: is only read with broad_ok: true"),
])
def test_broad_ok_needs_its_reason(write_files: WriteFiles, extra: str, message: str) -> None:
    root = write_files({"policy.yaml": policy(entry("10.0.0.0/8", extra=extra))})

    with pytest.raises(PolicyError) as raised:
        load_policy(root, now=NOW)
    assert message in str(raised.value)


def test_duplicates_and_containment(write_files: WriteFiles) -> None:
    text = policy(entry("203.0.113.0/24", owner="a"), entry("203.0.113.45/32", owner="a"),
                  entry("203.0.113.0/24", owner="c"), entry("2001:db8::/48", owner="d"),
                  entry("2001:db8::/64", owner="d"))
    findings = run(write_files, text)

    assert rules(findings) == [("contained", "warning", "203.0.113.45/32"),
                               ("contained", "warning", "2001:db8::/64"),
                               ("duplicate", "warning", "203.0.113.0/24")]
    contained = findings[0]
    assert "inside 203.0.113.0/24" in contained.message and "policy.yaml:4" in contained.message
    assert contained.where.endswith("policy.yaml:8")


def test_an_entry_inside_another_owners_entry_is_info(write_files: WriteFiles) -> None:
    text = policy(entry("203.0.113.0/24", owner="a"), entry("203.0.113.45/32", owner="b"))

    [finding] = run(write_files, text)
    assert (finding.rule, finding.severity, finding.owner) == ("nested", "info", "b")
    assert "check with a" in finding.action


def test_containment_among_list_lines(write_files: WriteFiles) -> None:
    text = policy("      - file: list.txt\n        owner: p\n        reason: r\n        review_by: 2027-01-01\n")
    findings = run(write_files, text, {"list.txt": "10.0.1.0/24\n10.0.0.0/24\n10.0.0.0/25\n"})

    assert [(f.rule, f.subject, f.where.rsplit("/", 1)[-1]) for f in findings] == [
        ("contained", "10.0.0.0/25", "list.txt:3")]


def test_entries_of_different_services_may_overlap(write_files: WriteFiles) -> None:
    text = policy(entry("10.0.1.0/24")) + "  postgres:\n    allow:\n" + entry("10.0.1.0/24")

    assert run(write_files, text) == []


def test_owner_not_in_the_owners_list(write_files: WriteFiles) -> None:
    text = policy(entry("10.0.1.0/24", owner="platform"), entry("10.0.2.0/24", owner="ghost"),
                  tail="settings:\n  owners: [platform]\n")

    assert [(f.rule, f.severity, f.owner) for f in run(write_files, text)] == [("unknown-owner", "error", "ghost")]
    assert run(write_files, text, owners=frozenset({"platform", "ghost"})) == []


class FakeUsage:
    def __init__(self, counts: dict[str, tuple[int, float]]) -> None:
        self.counts = counts

    def packets(self, service: str, interval: Interval) -> tuple[int, float] | None:
        return self.counts.get(str(interval.as_prefix()))


def test_entries_that_never_matched_within_the_window(write_files: WriteFiles) -> None:
    long_ago = (NOW - timedelta(days=100)).timestamp()
    recently = (NOW - timedelta(days=10)).timestamp()
    usage = FakeUsage({"10.0.1.0/24": (0, long_ago), "10.0.2.0/24": (5, long_ago), "10.0.3.0/24": (0, recently)})
    text = policy(entry("10.0.1.0/24"), entry("10.0.2.0/24"), entry("10.0.3.0/24"), entry("10.0.4.0/24"))

    findings = run(write_files, text, usage=usage, unused_days=90)
    assert rules(findings) == [("unused", "warning", "10.0.1.0/24")]
    assert "in the last 90 days" in findings[0].message
    # Counting that started 10 days ago proves a 7-day window.
    assert rules(run(write_files, text, usage=usage, unused_days=7)) == [
        ("unused", "warning", "10.0.1.0/24"), ("unused", "warning", "10.0.3.0/24")]


def test_findings_are_sorted_by_severity(write_files: WriteFiles) -> None:
    text = policy(entry("10.0.0.0/16", review_by="2026-06-10"), entry("10.0.1.0/24", owner="x",
                                                                       review_by="2026-01-01"))
    assert [f.severity for f in run(write_files, text)] == ["error", "warning", "warning", "info"]


def test_holdings_per_owner(write_files: WriteFiles) -> None:
    root = write_files({"policy.yaml": policy(
        entry("203.0.113.45/32", owner="partner-b"),
        "      - file: list.txt\n        owner: partner-b\n        reason: r\n        review_by: 2026-12-01\n",
    ) + "  postgres:\n    allow:\n" + entry("10.0.1.0/24", owner="platform"), "list.txt": "10.9.0.0/24\n10.8.0.0/24\n"})

    held = holdings(load_policy(root, now=NOW))
    assert list(held) == ["partner-b", "platform"]
    assert [(h.service, h.subject.split("/")[-1], h.entries) for h in held["partner-b"]] == [
        ("https", "32", 1), ("https", "list.txt", 2)]


# --- the command ------------------------------------------------------------------------------


def audit_json(root: Path, *args: str) -> tuple[int, dict[str, object]]:
    result = invoke(root, "audit", "--no-usage", "--json", *args)
    return result.exit_code, json.loads(result.stdout)


def test_command_json_and_fail_on(write_files: WriteFiles) -> None:
    due = (NOW + timedelta(days=5)).date()
    root = write_files({"policy.yaml": policy(entry("203.0.113.45/32", review_by=str(due)))})

    code, report = audit_json(root)
    assert code == 0
    assert report["counts"] == {"error": 0, "warning": 1, "info": 0}
    findings = report["findings"]
    assert isinstance(findings, list)
    assert findings[0]["rule"] == "review-due"
    assert set(findings[0]) == {"rule", "severity", "service", "subject", "owner", "where", "message", "action"}
    assert audit_json(root, "--fail-on", "warning")[0] == 10
    assert audit_json(root, "--within", "2d")[1]["counts"] == {"error": 0, "warning": 0, "info": 0}


def test_command_fails_on_errors_by_default_and_never_when_told(write_files: WriteFiles) -> None:
    root = write_files({"policy.yaml": policy(entry("203.0.113.45/32", review_by="2020-01-01"))})

    assert audit_json(root)[0] == 10
    assert audit_json(root, "--fail-on", "never")[0] == 0


def test_command_owners_file(write_files: WriteFiles, tmp_path: Path) -> None:
    root = write_files({"policy.yaml": policy(entry("203.0.113.45/32", owner="partner-b"))})
    owners = tmp_path / "owners.txt"
    owners.write_text("# who may hold entries\nplatform\n")

    code, report = audit_json(root, "--owners", str(owners))
    assert code == 10
    assert [f["rule"] for f in report["findings"]] == ["unknown-owner"]  # type: ignore[union-attr,index]


def test_command_plain_text_is_one_finding_a_line(write_files: WriteFiles) -> None:
    root = write_files({"policy.yaml": policy(entry("10.0.0.0/16"))})
    result = invoke(root, "audit", "--no-usage")

    lines = result.stdout.splitlines()
    assert lines[0].startswith("warning  too-broad  ")
    assert "do: narrow it" in lines[0]
    assert lines[-1] == "audit: 1 finding(s): 0 error, 1 warning, 0 info"
    assert "\x1b[" not in result.stdout


def test_command_rejects_a_bad_window(write_files: WriteFiles) -> None:
    root = write_files({"policy.yaml": policy(entry("10.0.0.0/24"))})
    result = invoke(root, "audit", "--within", "soon")

    assert result.exit_code == 2
    assert "use e.g. 30d" in result.stderr


def test_command_unreadable_owners_file_is_a_usage_error(write_files: WriteFiles, tmp_path: Path) -> None:
    root = write_files({"policy.yaml": policy(entry("10.0.0.0/24"))})
    result = invoke(root, "audit", "--no-usage", "--owners", str(tmp_path / "missing.txt"))

    assert result.exit_code == 2
    assert "cannot read the owners list" in result.stderr


def test_owners_shows_an_expired_entry_marked_expired(write_files: WriteFiles) -> None:
    """revoke --owner removes expired entries too, so owners must show them."""
    gone = f"expires: {NOW - timedelta(days=1):%Y-%m-%dT%H:%M:%SZ}"
    root = write_files({"policy.yaml": policy(entry("203.0.113.45/32", owner="alice"),
                                              entry("203.0.113.46/32", owner="alice", extra=gone))})

    result = invoke(root, "owners", "alice")
    assert result.exit_code == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if "203.0.113." in line]
    assert len(rows) == 2
    assert "203.0.113.46/32 (expired)" in rows[1] and "(expired)" not in rows[0]
    data = json.loads(invoke(root, "owners", "alice", "--json").stdout)
    assert [item["expired"] for item in data["alice"]["items"]] == [False, True]
    assert data["alice"]["entries"] == 2
