"""`hostwall export`: the policy's live entries for nginx, PostgreSQL, the cloud firewalls
and Kong; `--check` compares a deployed copy. Reads the policy only; needs no root."""

from __future__ import annotations

import ipaddress
import re
import sys
from pathlib import Path

import click

from hostwall import clock
from hostwall.cli.common import EXIT_NEEDS_ATTENTION, Options, emit_json, json_option, pass_options, reports_errors
from hostwall.export import FORMATS

# What reaches a config file from an option is checked as strictly as the policy itself:
# these values are written between words of pg_hba.conf, JSON and YAML.
PG_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_$]{0,62}")
AWS_GROUP_ID = re.compile(r"sg-[0-9a-f]{8,17}")
NAME_PREFIX = re.compile(r"[a-z](?:[a-z0-9-]{0,28}[a-z0-9])?")
GCP_NETWORK = re.compile(r"[A-Za-z0-9_./:-]{1,1024}")
KONG_NAME = re.compile(r"[A-Za-z0-9._~-]{1,128}")
PG_AUTH_METHODS = ("scram-sha-256", "md5", "cert", "gss", "sspi", "peer", "ident")


def _matching(pattern: re.Pattern[str], what: str) -> click.types.FuncParamType[str, str]:
    def check(value: str) -> str:
        if not pattern.fullmatch(value):
            raise click.BadParameter(f"{value!r} is not {what}")
        return value

    return click.types.FuncParamType(check)


def _network(value: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    try:
        return ipaddress.ip_network(value, strict=True)
    except ValueError as exc:
        raise click.BadParameter(f"{value!r}: {exc} (write a CIDR such as 10.0.3.2/32)") from None


@click.command("export", epilog="Example: hostwall export --format nginx --trusted-proxy 10.0.3.2/32 "
                                  "--output /etc/nginx/allow.conf")
@click.option("--format", "target", type=click.Choice(FORMATS), required=True, help="What to write.")
@click.option("--service", metavar="NAME", help="Only this service (default: https for nginx and kong, postgres "
              "for pg_hba, every service for the cloud formats).")
@click.option("--output", type=click.Path(path_type=Path, dir_okay=False), metavar="FILE",
              help="Write FILE (replaced whole, through a rename) instead of standard output.")
@click.option("--check", "deployed", type=click.Path(path_type=Path, dir_okay=False), metavar="FILE",
              help="Compare FILE with what the policy exports now: exit 0 when equal, 10 and a diff when not.")
@click.option("--trusted-proxy", "trusted_proxies", multiple=True, metavar="CIDR", type=click.types.FuncParamType(
              _network), help="nginx: a proxy whose X-Forwarded-For is believed (repeatable).")
@click.option("--pg-connection", type=click.Choice(["hostssl", "host"]), default="hostssl", show_default=True,
              help="pg_hba: the connection type of the allow lines.")
@click.option("--pg-auth", type=click.Choice(PG_AUTH_METHODS), default="scram-sha-256", show_default=True,
              help="pg_hba: the authentication method of the allow lines.")
@click.option("--pg-database", metavar="NAME", default="all", show_default=True,
              type=_matching(PG_NAME, "a database name"),
              help="pg_hba: the database column.")
@click.option("--pg-user", metavar="ROLE", default="all", show_default=True, type=_matching(PG_NAME, "a role name"),
              help="pg_hba: the user column.")
@click.option("--aws-group-id", metavar="SG_ID", type=_matching(AWS_GROUP_ID, "a security group id (sg-...)"),
              help="aws-sg: the GroupId of the request (or give --group-id to the aws command).")
@click.option("--aws-rules-per-group", metavar="N", type=click.IntRange(min=1), default=60, show_default=True,
              help="aws-sg: the account's inbound rules per security group quota, per family.")
@click.option("--name-prefix", metavar="PREFIX", default="hostwall", show_default=True,
              type=_matching(NAME_PREFIX, "1-30 lowercase letters, digits and '-', starting with a letter"),
              help="azure-nsg, gcp-firewall: the start of every rule name.")
@click.option("--azure-first-priority", metavar="N", type=click.IntRange(100, 4096), default=100, show_default=True,
              help="azure-nsg: the priority of the first allow rule.")
@click.option("--azure-rules-per-nsg", metavar="N", type=click.IntRange(min=1), default=1000, show_default=True,
              help="azure-nsg: security rules per network security group.")
@click.option("--gcp-network", metavar="URL", type=_matching(GCP_NETWORK, "a network URL (global/networks/NAME)"),
              help="gcp-firewall: the network of the rules (default: the project's default network).")
@click.option("--gcp-priority", metavar="N", type=click.IntRange(0, 65534), default=1000, show_default=True,
              help="gcp-firewall: the priority of the allow rules; the deny rules take the next one.")
@click.option("--gcp-ranges-per-rule", metavar="N", type=click.IntRange(1, 5000), default=5000, show_default=True,
              help="gcp-firewall: source ranges per rule before a service's rule is split.")
@click.option("--kong-service", metavar="NAME", type=_matching(KONG_NAME, "a Kong service name"),
              help="kong: attach the plugin to this Kong service (default: global).")
@json_option
@pass_options
@reports_errors
def export(options: Options, target: str, service: str | None, output: Path | None, deployed: Path | None,
           trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...], pg_connection: str,
           pg_auth: str, pg_database: str, pg_user: str, aws_group_id: str | None, aws_rules_per_group: int,
           name_prefix: str, azure_first_priority: int, azure_rules_per_nsg: int, gcp_network: str | None,
           gcp_priority: int, gcp_ranges_per_rule: int, kong_service: str | None, as_json: bool) -> None:
    """Write the policy's live entries for another layer: nginx, pg_hba, aws-sg,
    azure-nsg, gcp-firewall or kong. Expired entries are left out; the same policy gives
    the same bytes. Exit 10 with --check when the deployed FILE differs.
"""
    from hostwall.export import files
    from hostwall.export.formats import FORMATS as RENDERERS
    from hostwall.export.model import TargetOptions, build_model

    if output is not None and deployed is not None:
        raise click.UsageError("--output writes the file and --check compares it: give one of them")
    chosen = RENDERERS[target]
    policy = options.policy()
    model = build_model(policy, clock.now_utc(), service or chosen.default_service)
    text = chosen.render(model, TargetOptions(
        trusted_proxies=trusted_proxies, pg_connection="host" if pg_connection == "host" else "hostssl",
        pg_auth=pg_auth, pg_database=pg_database, pg_user=pg_user, aws_group_id=aws_group_id,
        aws_rules_per_group=aws_rules_per_group, name_prefix=name_prefix,
        azure_first_priority=azure_first_priority, azure_rules_per_nsg=azure_rules_per_nsg,
        gcp_network=gcp_network, gcp_priority=gcp_priority, gcp_ranges_per_rule=gcp_ranges_per_rule,
        kong_service=kong_service))
    if not as_json:
        for warning in policy.warnings():
            options.out.warn(warning)
    summary = {"format": target, "services": [s.name for s in model.services], "entries": model.rule_count(),
               "expired_left_out": model.expired}
    if deployed is not None:
        diff = files.drift(deployed, text)
        if as_json:
            emit_json({**summary, "check": str(deployed), "matches": not diff, "diff": diff})
        else:
            for line in diff:
                click.echo(line)
            if diff:
                click.echo(f"hostwall: {deployed} differs from what the policy exports now", err=True)
            else:
                options.out.line(f"{deployed} matches the policy ({model.rule_count()} entries)")
        sys.exit(EXIT_NEEDS_ATTENTION if diff else 0)
    if output is not None:
        files.write(output, text)
        if as_json:
            emit_json({**summary, "output": str(output)})
        else:
            options.out.line(f"wrote {output}: {target}, {model.rule_count()} entries")
        return
    if as_json:
        emit_json({**summary, "content": text})
    else:
        click.echo(text, nl=False)
