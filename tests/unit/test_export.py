"""`hostwall export`: golden outputs, determinism, expiry, escaping, each provider's limits
and its own published request model, and `--check`.

Regenerate the golden files after an intended change with

    HOSTWALL_UPDATE_GOLDEN=1 python -m pytest tests/unit/test_export.py

and review the diff of tests/unit/golden/export/ before committing it.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import warnings
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import Result
from test_cli import invoke as invoke_cli

from hostwall import clock
from hostwall.errors import ExportError
from hostwall.export.formats import FORMATS
from hostwall.export.model import ExportModel, TargetOptions, build_model
from hostwall.policy import Policy, load_policy

GOLDEN = Path(__file__).parent / "golden" / "export"
SUFFIX = {"nginx": "conf", "pg_hba": "conf", "aws-sg": "json", "azure-nsg": "json", "gcp-firewall": "json",
          "kong": "yaml"}
GOLDEN_OPTIONS = {"nginx": ("--trusted-proxy", "10.0.3.2/32", "--trusted-proxy", "fd00:3::2/128")}
EXPIRED = "198.51.100.10"  # expired a month before the pinned clock
EXPIRING = "192.0.2.7"  # expires a month after it
META = "        owner: {owner}\n        reason: {reason}\n        review_by: 2099-01-01\n"


def invoke(policy: Path, *args: str) -> Result:
    return invoke_cli(policy, "export", *args)


@pytest.fixture
def golden_policy(tmp_path: Path, pinned_clock: clock.PinnedClock) -> Iterator[Path]:
    root = tmp_path / "policy"
    shutil.copytree(GOLDEN, root, ignore=shutil.ignore_patterns("export.*"))
    yield root


def exported(policy: Path, target: str, *options: str) -> str:
    result = invoke(policy, "--format", target, *options)
    assert result.exit_code == 0, result.output + result.stderr
    return result.stdout


def model_of(policy: Policy, service: str | None = None) -> ExportModel:
    return build_model(policy, clock.now_utc(), service)


def many_entries(count: int, family: int = 4, service: str = "https") -> str:
    entries = "".join(
        f"      - cidr: {f'10.0.{i}.0/24' if family == 4 else f'fd00:0:0:{i:x}::/64'}\n"
        + META.format(owner=f"owner-{i}", reason="bulk")
        for i in range(count)
    )
    return f"services:\n  {service}:\n    allow:\n{entries}"


def write_policy(root: Path, text: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "policy.yaml").write_text(text)
    return root


# --- golden outputs -------------------------------------------------------------------------


@pytest.mark.parametrize("target", list(FORMATS))
def test_each_format_matches_its_golden_file(golden_policy: Path, target: str) -> None:
    text = exported(golden_policy, target, *GOLDEN_OPTIONS.get(target, ()))
    golden = GOLDEN / f"export.{target}.{SUFFIX[target]}"
    if os.environ.get("HOSTWALL_UPDATE_GOLDEN") == "1":
        golden.write_text(text)
        pytest.skip(f"rewrote {golden}; review it with git diff")
    assert text == golden.read_text()


@pytest.mark.parametrize("target", list(FORMATS))
def test_expired_entries_are_never_exported_and_live_ones_are(golden_policy: Path, target: str) -> None:
    text = exported(golden_policy, target)
    assert EXPIRED not in text
    if target not in ("pg_hba",):  # pg_hba exports the postgres service
        assert EXPIRING in text


def test_an_entry_that_expires_after_the_policy_was_loaded_is_not_exported(
        golden_policy: Path, pinned_clock: clock.PinnedClock) -> None:
    policy = load_policy(golden_policy)
    before = model_of(policy, "https")
    pinned_clock.advance(timedelta(days=31).total_seconds())
    after = model_of(policy, "https")
    assert EXPIRING in {str(r.network.network_address) for r in before.services[0].rules}
    assert EXPIRING not in {str(r.network.network_address) for r in after.services[0].rules}
    assert after.expired == before.expired + 1
    assert EXPIRING not in FORMATS["nginx"].render(after, TargetOptions())


# --- determinism ----------------------------------------------------------------------------


@pytest.mark.parametrize("target", list(FORMATS))
def test_the_same_policy_gives_the_same_bytes_wherever_its_entries_are(
        golden_policy: Path, tmp_path: Path, target: str) -> None:
    """Entries reversed and split over two files in another directory: same output."""
    document = yaml.safe_load((golden_policy / "policy.yaml").read_text())
    first: dict[str, Any] = {"services": {}}
    second: dict[str, Any] = {"services": {}}
    for name, service in document["services"].items():
        entries = list(reversed(service.pop("allow")))
        first["services"][name] = {**service, "allow": entries[: len(entries) // 2]}
        second["services"][name] = {"allow": entries[len(entries) // 2:]}
    other = tmp_path / "elsewhere" / "policies"
    other.mkdir(parents=True)
    (other / "a.yaml").write_text(yaml.safe_dump(second))
    (other / "b.yaml").write_text(yaml.safe_dump(first))
    shutil.copy(golden_policy / "partner-c-ranges.txt", other)

    assert exported(other, target) == exported(golden_policy, target) == exported(golden_policy, target)


# --- escaping: operator text never becomes configuration -------------------------------------


def test_nginx_lines_are_comments_or_the_directives_it_writes(golden_policy: Path) -> None:
    text = exported(golden_policy, "nginx", "--trusted-proxy", "10.0.3.2/32")
    directive = re.compile(r"(allow [0-9a-f.:/]+;|deny all;|set_real_ip_from [0-9a-f.:/]+;|"
                           r"real_ip_header X-Forwarded-For;|real_ip_recursive on;)")
    lines = text.splitlines()
    assert all(line.startswith("# ") or directive.fullmatch(line) for line in lines), text
    assert lines[-1] == "deny all;"
    assert "allow 0.0.0.0/0;" not in lines
    assert all(ch.isprintable() for line in lines for ch in line)
    assert "# contractor\\nallow 0.0.0.0/0; #: audit window \\x1b[31mred\\x1b[0m, café & co \\u202e" in text


def test_pg_hba_lines_are_comments_allow_lines_and_two_final_rejects(golden_policy: Path) -> None:
    text = exported(golden_policy, "pg_hba", "--pg-connection", "host", "--pg-auth", "md5",
                    "--pg-database", "app", "--pg-user", "app_rw")
    rules = [line for line in text.splitlines() if not line.startswith("#")]
    assert rules == ["host app app_rw 10.0.1.0/24 md5", "host app app_rw fd00:1::/64 md5",
                     "host all all 0.0.0.0/0 reject", "host all all ::/0 reject"]


@pytest.mark.parametrize("option", [("--pg-database", "app db"), ("--pg-user", "x\nhost"), ("--pg-user", "a,b"),
                                    ("--trusted-proxy", "10.0.3.2/24"), ("--name-prefix", "Hostwall"),
                                    ("--aws-group-id", "sg-xyz"), ("--kong-service", "a b")])
def test_option_values_that_would_change_the_file_are_refused(golden_policy: Path, option: tuple[str, str]) -> None:
    result = invoke(golden_policy, "--format", "pg_hba", *option)
    assert result.exit_code == 2, result.output
    assert "Invalid value" in result.stderr


def test_kong_yaml_is_exactly_the_plugin_and_its_allow_list(golden_policy: Path) -> None:
    text = exported(golden_policy, "kong", "--kong-service", "shop")
    assert yaml.safe_load(text) == {
        "_format_version": "3.0",
        "plugins": [{"name": "ip-restriction", "service": "shop", "config": {"status": 403, "allow": [
            "192.0.2.7/32", "198.51.100.0/26", "198.51.100.64/27", "203.0.113.45/32",
            "2001:db8:11::/48", "2001:db8:c0::/48"]}}],
    }


# --- choosing the service ---------------------------------------------------------------------


def test_an_unknown_service_is_an_error_naming_the_services(golden_policy: Path) -> None:
    result = invoke(golden_policy, "--format", "nginx", "--service", "smtp")
    assert result.exit_code == 3
    assert result.stderr.endswith(
        "hostwall: the policy has no service 'smtp' (services: https, node_exporter, postgres); "
        "choose one with --service\n")


def test_cloud_formats_take_every_service_unless_one_is_chosen(golden_policy: Path) -> None:
    everything = json.loads(exported(golden_policy, "gcp-firewall"))
    only = json.loads(exported(golden_policy, "gcp-firewall", "--service", "postgres"))
    assert {r["name"] for r in everything} > {r["name"] for r in only}
    assert {r["name"] for r in only} == {"hostwall-postgres-ipv4", "hostwall-postgres-ipv6",
                                         "hostwall-postgres-deny-ipv4", "hostwall-postgres-deny-ipv6"}


# --- AWS: botocore's EC2 model and the rules quota --------------------------------------------


def aws_validate(request: dict[str, Any]) -> str:
    from botocore.session import get_session
    from botocore.validate import ParamValidator

    operation = get_session().get_service_model("ec2").operation_model("AuthorizeSecurityGroupIngress")
    return ParamValidator().validate(request, operation.input_shape).generate_report()


def test_the_aws_request_is_valid_for_botocores_ec2_model(golden_policy: Path) -> None:
    request = json.loads(exported(golden_policy, "aws-sg", "--aws-group-id", "sg-0123456789abcdef0"))
    assert aws_validate(request) == ""
    assert request["GroupId"] == "sg-0123456789abcdef0"
    ports = {(p["IpProtocol"], p["FromPort"], p["ToPort"]) for p in request["IpPermissions"]}
    assert ports == {("tcp", 443, 443), ("udp", 443, 443), ("tcp", 5432, 5432), ("tcp", 9100, 9100),
                     ("tcp", 9200, 9299)}


def test_botocores_validator_does_refuse_a_bad_request(golden_policy: Path) -> None:
    """The control for the test above: ports as strings, or a misspelt key, are reported."""
    request = json.loads(exported(golden_policy, "aws-sg"))
    request["IpPermissions"][0]["FromPort"] = "443"
    request["IpPermissions"][0]["IpRange"] = []
    report = aws_validate(request)
    assert "FromPort" in report
    assert "IpRange" in report


def test_aws_descriptions_keep_to_the_documented_characters_and_length(golden_policy: Path) -> None:
    request = json.loads(exported(golden_policy, "aws-sg"))
    descriptions = [r["Description"] for p in request["IpPermissions"]
                    for r in p.get("IpRanges", []) + p.get("Ipv6Ranges", [])]
    allowed = re.compile(r"[a-zA-Z0-9 ._\-:/()#,@\[\]+=&;{}!$*]{0,255}")
    assert descriptions and all(allowed.fullmatch(d) for d in descriptions), descriptions
    # One CIDR named by two entries is one range (AWS refuses duplicates), both owners said.
    assert "partner-b: inventory sync egress (ticket OPS-1234); partner-d: shares the egress of partner-b" \
        in descriptions


def test_aws_rules_beyond_the_quota_are_refused_per_family(tmp_path: Path) -> None:
    # postgres: one protocol and one port, so one rule per source range
    at_quota = write_policy(tmp_path / "sixty", many_entries(60, service="postgres"))
    over = write_policy(tmp_path / "over", many_entries(61, service="postgres"))
    v6 = write_policy(tmp_path / "v6", many_entries(60, family=6, service="postgres"))
    assert invoke(at_quota, "--format", "aws-sg").exit_code == 0
    assert invoke(v6, "--format", "aws-sg").exit_code == 0
    refused = invoke(over, "--format", "aws-sg")
    assert refused.exit_code == 3
    assert "61 inbound IPv4 rules" in refused.stderr
    assert invoke(over, "--format", "aws-sg", "--aws-rules-per-group", "61").exit_code == 0
    both = write_policy(tmp_path / "https", many_entries(30))
    assert "60 inbound IPv4 rules" not in invoke(both, "--format", "aws-sg").stderr
    refused = invoke(both, "--format", "aws-sg", "--aws-rules-per-group", "59")
    assert "60 inbound IPv4 rules" in refused.stderr  # 30 ranges on tcp/443 and on udp/443


# --- Azure: the SDK's model, priorities and the rules limit -----------------------------------


def azure_rest_fields(model: type) -> set[str]:
    model({})  # the SDK fills its field table on first use
    return {field._rest_name for field in model._attr_to_rest_field.values()}  # type: ignore[attr-defined]


def test_the_azure_rules_use_only_fields_and_values_of_the_sdks_model(golden_policy: Path) -> None:
    from azure.mgmt.network import models

    template = json.loads(exported(golden_policy, "azure-nsg"))
    rules = template["resources"][0]["properties"]["securityRules"]
    rule_fields = azure_rest_fields(models.SecurityRule)
    property_fields = azure_rest_fields(models.SecurityRulePropertiesFormat)
    priorities = []
    for rule in rules:
        assert set(rule) <= rule_fields
        assert set(rule["properties"]) <= property_fields, set(rule["properties"]) - property_fields
        parsed = models.SecurityRule(rule)
        props = parsed.properties
        assert props is not None
        assert props.protocol in {p.value for p in models.SecurityRuleProtocol}
        assert props.access in {a.value for a in models.SecurityRuleAccess}
        assert props.direction in {d.value for d in models.SecurityRuleDirection}
        assert 100 <= props.priority <= 4096
        assert len(props.description or "") <= 140
        assert re.fullmatch(r"\w[\w.-]{0,78}\w?", rule["name"]), rule["name"]
        priorities.append(props.priority)
    assert len(priorities) == len(set(priorities))
    allows = [r for r in rules if r["properties"]["access"] == "Allow"]
    denies = [r for r in rules if r["properties"]["access"] == "Deny"]
    assert max(r["properties"]["priority"] for r in allows) < min(r["properties"]["priority"] for r in denies)
    assert max(r["properties"]["priority"] for r in denies) == 4096
    # every service's every protocol ends in a deny
    assert {(r["name"].split("-")[1], r["properties"]["protocol"]) for r in denies} == {
        ("https", "Tcp"), ("https", "Udp"), ("postgres", "Tcp"), ("node_exporter", "Tcp")}


def test_the_azure_check_itself_notices_an_unknown_field() -> None:
    from azure.mgmt.network import models

    assert "sourceAddressPrefixs" not in azure_rest_fields(models.SecurityRulePropertiesFormat)
    assert "sourceAddressPrefixes" in azure_rest_fields(models.SecurityRulePropertiesFormat)


def test_azure_limits_are_refused_with_the_fix(tmp_path: Path) -> None:
    policy = write_policy(tmp_path / "p", many_entries(30))
    assert invoke(policy, "--format", "azure-nsg").exit_code == 0
    too_many = invoke(policy, "--format", "azure-nsg", "--azure-rules-per-nsg", "50")
    assert too_many.exit_code == 3
    # 30 owners on tcp and udp; deny rules for https tcp and udp and the built-in postgres
    assert "63 security rules (60 allow" in too_many.stderr
    late = invoke(policy, "--format", "azure-nsg", "--azure-first-priority", "4050")
    assert late.exit_code == 3
    assert "--azure-first-priority" in late.stderr


# --- Google Cloud: the SDK's Firewall message, families and the ranges limit -----------------


def compute_v1() -> Any:
    # google.api_core warns, by today's date, that this Python's support ends: a fact about
    # the test machine, not about the rules (and the clock-shifted runs move today).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        from google.cloud import compute_v1
    return compute_v1


def test_the_gcp_rules_parse_as_the_sdks_firewall_message(golden_policy: Path) -> None:
    firewall = compute_v1().Firewall

    rules = json.loads(exported(golden_policy, "gcp-firewall", "--gcp-network", "global/networks/prod"))
    for rule in rules:
        message = firewall.from_json(json.dumps(rule))  # unknown fields raise
        assert message.name == rule["name"]
        assert re.fullmatch(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?", rule["name"]), rule["name"]
        assert message.direction == "INGRESS"
        families = {ipaddress.ip_network(r).version for r in message.source_ranges}
        assert len(families) == 1  # a VPC firewall rule holds one family
    with pytest.raises(Exception, match="sourceRange"):
        firewall.from_json(json.dumps({**rules[0], "sourceRange": []}))


def test_gcp_rules_split_at_the_ranges_limit_and_keep_every_range(tmp_path: Path) -> None:
    policy = write_policy(tmp_path / "p", many_entries(7))
    rules = json.loads(exported(policy, "gcp-firewall", "--gcp-ranges-per-rule", "3"))
    allows = [r for r in rules if "allowed" in r]
    assert [r["name"] for r in allows] == ["hostwall-https-ipv4-1", "hostwall-https-ipv4-2", "hostwall-https-ipv4-3"]
    assert [len(r["sourceRanges"]) for r in allows] == [3, 3, 1]
    assert [r for ranges in allows for r in ranges["sourceRanges"]] == [f"10.0.{i}.0/24" for i in range(7)]
    denies = [r for r in rules if "denied" in r and "https" in r["name"]]
    assert [(r["sourceRanges"], r["priority"]) for r in denies] == [(["0.0.0.0/0"], 1001), (["::/0"], 1001)]


def test_a_kong_export_without_live_entries_is_refused(tmp_path: Path) -> None:
    policy = write_policy(tmp_path / "p", "services:\n  https:\n    allow: []\n")
    result = invoke(policy, "--format", "kong")
    assert result.exit_code == 3
    assert "no live entries" in result.stderr


# --- --output and --check ----------------------------------------------------------------------


def test_output_writes_the_file_and_check_finds_it_equal(golden_policy: Path, tmp_path: Path) -> None:
    deployed = tmp_path / "allow.conf"
    written = invoke(golden_policy, "--format", "nginx", "--output", str(deployed))
    assert written.exit_code == 0, written.stderr
    assert deployed.read_text() == exported(golden_policy, "nginx")
    checked = invoke(golden_policy, "--format", "nginx", "--check", str(deployed))
    assert checked.exit_code == 0
    assert checked.stdout == f"{deployed} matches the policy (7 entries)\n"


def test_check_exits_10_with_a_unified_diff_when_the_deployed_file_drifted(
        golden_policy: Path, tmp_path: Path) -> None:
    deployed = tmp_path / "allow.conf"
    deployed.write_text(exported(golden_policy, "nginx").replace("allow 203.0.113.45/32;", "allow 203.0.113.0/24;"))
    result = invoke(golden_policy, "--format", "nginx", "--check", str(deployed))
    assert result.exit_code == 10
    lines = result.stdout.splitlines()
    assert lines[0] == f"--- {deployed} (deployed)"
    assert lines[1] == f"+++ {deployed} (policy now)"
    assert "-allow 203.0.113.0/24;" in lines
    assert "+allow 203.0.113.45/32;" in lines
    assert result.stderr.endswith(f"hostwall: {deployed} differs from what the policy exports now\n")


def test_check_reports_a_missing_file_and_escapes_what_a_deployed_file_holds(
        golden_policy: Path, tmp_path: Path) -> None:
    missing = invoke(golden_policy, "--format", "pg_hba", "--check", str(tmp_path / "nothing.conf"))
    assert missing.exit_code == 10
    assert "(missing)" in missing.stdout
    hostile = tmp_path / "hostile.conf"
    hostile.write_text("\x1b]0;owned\x07allow all;\n")
    result = invoke(golden_policy, "--format", "pg_hba", "--check", str(hostile), "--json")
    assert result.exit_code == 10
    report = json.loads(result.stdout)
    assert report["matches"] is False
    assert "-\\x1b]0;owned\\x07allow all;" in report["diff"]


def test_check_notices_a_difference_in_line_endings_alone(golden_policy: Path, tmp_path: Path) -> None:
    deployed = tmp_path / "allow.conf"
    deployed.write_bytes(exported(golden_policy, "nginx").replace("\n", "\r\n").encode())
    assert invoke(golden_policy, "--format", "nginx", "--check", str(deployed)).exit_code == 10


def test_output_and_check_together_are_a_usage_error(golden_policy: Path, tmp_path: Path) -> None:
    result = invoke(golden_policy, "--format", "nginx", "--output", str(tmp_path / "a"), "--check",
                    str(tmp_path / "b"))
    assert result.exit_code == 2


def test_output_keeps_an_existing_files_mode_and_replaces_a_symlink_not_its_target(
        golden_policy: Path, tmp_path: Path) -> None:
    target = tmp_path / "elsewhere.conf"
    target.write_text("untouched\n")
    link = tmp_path / "allow.conf"
    link.symlink_to(target)
    assert invoke(golden_policy, "--format", "nginx", "--output", str(link)).exit_code == 0
    assert target.read_text() == "untouched\n"
    assert not link.is_symlink()
    link.chmod(0o640)
    assert invoke(golden_policy, "--format", "nginx", "--output", str(link)).exit_code == 0
    assert link.stat().st_mode & 0o777 == 0o640


def test_an_export_error_leaves_the_output_file_alone(tmp_path: Path) -> None:
    policy = write_policy(tmp_path / "p", many_entries(61))
    deployed = tmp_path / "sg.json"
    deployed.write_text("{}\n")
    assert invoke(policy, "--format", "aws-sg", "--output", str(deployed)).exit_code == 3
    assert deployed.read_text() == "{}\n"


def test_the_model_refuses_a_second_service_for_one_listener_formats(golden_policy: Path) -> None:
    model = model_of(load_policy(golden_policy))
    with pytest.raises(ExportError, match="choose one with --service"):
        FORMATS["nginx"].render(model, TargetOptions())


def test_a_file_that_cannot_be_written_is_one_line_and_exit_6(golden_policy: Path, tmp_path: Path) -> None:
    target = tmp_path / "no-such-directory" / "allow.conf"
    result = invoke(golden_policy, "--format", "nginx", "--output", str(target))
    assert result.exit_code == 6
    assert result.stderr.endswith(f"hostwall: cannot write {target}: No such file or directory\n")
    assert not target.parent.exists()


def test_an_owner_ending_in_a_backslash_cannot_continue_a_pg_hba_comment(tmp_path: Path) -> None:
    """PostgreSQL 16+ joins a line ending in a backslash with the next one."""
    policy = write_policy(tmp_path / "p", "services:\n  postgres:\n    allow:\n      - cidr: 10.0.1.0/24\n"
                          + META.format(owner="'ops\\'", reason="'ends in a backslash\\'"))
    text = exported(policy, "pg_hba")
    assert "# ops\\: ends in a backslash\\ (review by 2099-01-01)" in text
    assert not any(line.endswith("\\") for line in text.splitlines())
