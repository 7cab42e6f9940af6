"""Operator text (owner, reason) made safe for a line of someone else's config file."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime

from hostwall.export.model import ExportedRule


def printable(text: str) -> str:
    """text on one line with every non-printable character escaped (\\n, \\x1b, \\u202e).

    A line break would end a comment and start a directive of the operator's choosing in
    nginx or pg_hba; control and bidirectional-format characters would rewrite what a
    terminal or an editor shows. str.isprintable() is false for all of them.
    """
    return "".join(ch if ch.isprintable() else _escaped(ch) for ch in text)


def _escaped(ch: str) -> str:
    escaped = ch.encode("unicode_escape").decode("ascii")
    return escaped if escaped != ch else f"\\u{ord(ch):04x}"


def restricted(text: str, allowed: re.Pattern[str], limit: int, filler: str = "_") -> str:
    """text with each character outside allowed replaced by filler, cut to limit characters
    (ending in '...' when cut), for providers that refuse other characters or lengths."""
    kept = "".join(ch if allowed.fullmatch(ch) else filler for ch in text)
    return kept if len(kept) <= limit else kept[: limit - 3] + "..."


def about(rule: ExportedRule) -> str:
    """Owner, reason, review date and expiry of an entry, for one comment line. It ends
    in ')', never in an owner's backslash, which PostgreSQL (16 and later) would read as
    a continuation that pulls the next line, an allow line, into the comment."""
    text = f"{printable(rule.owner)}: {printable(rule.reason)} (review by {rule.review_by:%Y-%m-%d}"
    if rule.expires is not None:
        text += f", expires {utc(rule.expires)}"
    return text + ")"


def utc(moment: datetime) -> str:
    return f"{moment.astimezone(UTC):%Y-%m-%dT%H:%M:%SZ}"


def header(target: str, service: str, rules: int) -> str:
    """The first comment line of a text target: what made it and from what. No date and
    no path: the same policy gives the same bytes, wherever and whenever it is exported."""
    entries = "1 entry" if rules == 1 else f"{rules} entries"
    return f"hostwall export --format {target}: service {service}, {entries}. Edit the policy, not this file."


def as_json(document: object) -> str:
    """Sorted keys, two-space indent, ASCII only: the same document, the same bytes."""
    return json.dumps(document, indent=2, sort_keys=True, ensure_ascii=True) + "\n"
