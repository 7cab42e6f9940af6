"""A policy file validated without the models, when every value in it is plainly valid.

pydantic's import and model building cost about 0.15 s and 14 MB at every start that
validates a file, and validating 12.5k inline entries another 0.1 s. Nearly every
policy file holds values of exactly the types the models declare, within their
ranges: strings, ints, bools, dates and times written in their canonical forms. For
such a file the models' verdict is known without running them, and this module gives
the same FileSpec they give. Anything else, however harmless (a value the models
would coerce, such as 1 for true or "443" for a number; a timestamp in another
spelling), or anything wrong, gives None: the models then decide and word the errors
(hostwall.policyfile). tests/unit/test_policyplain.py holds the two to the same
FileSpec for every document this module accepts, and to the models' field names.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Mapping
from datetime import UTC, date, datetime
from typing import TYPE_CHECKING, Any, get_args

from hostwall.cidr import Interval, parse_interval
from hostwall.policyspec import (
    LOG_RATES,
    SETTINGS_BOUNDS,
    WIDEST_BOUNDS,
    Action,
    AllowSpec,
    Bounds,
    FileSpec,
    Protocol,
    ServiceSpec,
    parse_port,
)

if TYPE_CHECKING:  # importing yamlsource compiles its readers' expressions, which a cached start does without
    from hostwall.yamlsource import LocatedData

# The models' fields (hostwall.policyfile); their bounds and literals are policyspec's.
FILE_KEYS = frozenset({"services", "settings"})
SERVICE_KEYS = frozenset({"ports", "protocols", "action", "widest", "entry_counters", "log", "allow"})
ALLOW_KEYS = frozenset({"cidr", "file", "owner", "reason", "review_by", "expires", "broad_ok", "broad_reason"})
WIDEST_KEYS = frozenset(WIDEST_BOUNDS)
SETTINGS_KEYS = frozenset({*SETTINGS_BOUNDS, "strict_source", "owners"})
PROTOCOLS = frozenset(get_args(Protocol))
ACTIONS = frozenset(get_args(Action))

# The canonical spellings, which both the models and the standard library read the same
# way; ASCII digits only (\d would take other scripts' digits).
_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")
_MOMENT = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(?:\.[0-9]{1,6})?"
                     r"(?:Z|[+-][0-9]{2}:[0-9]{2})")


class _NotPlain(Exception):
    """A value the models would have to decide on: coerce it, or refuse it."""


def plain_file_spec(located: LocatedData, checked: dict[str, Interval] | None = None) -> FileSpec | None:
    """The FileSpec the models would give for the document, or None when they must decide.
    checked (when given) gets the interval of each CIDR checked, so that it is parsed once."""
    try:
        return _file_spec(located, {} if checked is None else checked)
    except _NotPlain:
        return None


def _file_spec(located: LocatedData, checked: dict[str, Interval]) -> FileSpec:
    document = _mapping(located.data, FILE_KEYS)
    services = document.get("services", {})
    if type(services) is not dict:
        raise _NotPlain
    settings = document.get("settings")
    # Each distinct text parsed once: a policy repeats its review dates thousands of times.
    dates, moments = functools.cache(_review_date), functools.cache(_expiry)
    return FileSpec(
        None if settings is None else _settings(settings),
        None if settings is None else located.line_of(("settings",)),
        tuple(_service(located, name, definition, dates, moments, checked) for name, definition in services.items()),
    )


def _mapping(value: Any, keys: frozenset[str]) -> dict[Any, Any]:
    if type(value) is not dict or not value.keys() <= keys:
        raise _NotPlain
    return value


def _review_date(text: str) -> date:
    if not _DATE.fullmatch(text):
        raise _NotPlain
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise _NotPlain from None


def _expiry(text: str) -> datetime:
    if not _MOMENT.fullmatch(text):
        raise _NotPlain
    try:
        moment = datetime.fromisoformat(text)
        moment.astimezone(UTC)  # every later step works in UTC
    except (ValueError, OverflowError):
        raise _NotPlain from None
    return moment


def _settings(value: Any) -> dict[str, Any]:
    settings = _mapping(value, SETTINGS_KEYS)
    # model_dump's order: the fields' order.
    dumped: dict[str, Any] = {name: _bounded(settings, name, bounds) for name, bounds in SETTINGS_BOUNDS.items()}
    dumped["strict_source"] = _flag(settings, "strict_source", False)
    owners = settings.get("owners")
    if owners is not None:
        if type(owners) is not list or not all(type(owner) is str and owner for owner in owners):
            raise _NotPlain
        owners = list(owners)
    dumped["owners"] = owners
    return dumped


def _bounded(mapping: Mapping[str, Any], name: str, bounds: Bounds) -> int:
    value = mapping.get(name, bounds.default)
    if type(value) is not int or not bounds.low <= value <= bounds.high:
        raise _NotPlain
    return value


def _flag(mapping: Mapping[str, Any], name: str, default: bool | None) -> bool | None:
    value = mapping.get(name, default)
    if value is not default and type(value) is not bool:
        raise _NotPlain
    return value


def _service(located: LocatedData, name: Any, definition: Any, dates: Callable[[str], date],
             moments: Callable[[str], datetime], checked: dict[str, Interval]) -> ServiceSpec:
    if type(name) is not str:
        raise _NotPlain
    service = {} if definition is None else _mapping(definition, SERVICE_KEYS)
    allow = service.get("allow", [])
    if type(allow) is not list:
        raise _NotPlain
    return ServiceSpec(
        name=name,
        line=located.line_of(("services", name)),
        ports=_ports(service.get("ports")),
        protocols=_choices(service.get("protocols"), PROTOCOLS),
        action=_choice(service.get("action"), ACTIONS),
        widest=_widest(service.get("widest")),
        entry_counters=_flag(service, "entry_counters", None),
        log=_log(service.get("log")),
        allow=_allow(allow, located.item_lines(("services", name, "allow"), len(allow)), dates, moments, checked),
    )


def _ports(value: Any) -> Any:
    if value is None:
        return None
    if type(value) is not list or not value:
        raise _NotPlain
    try:
        return tuple(parse_port(port) for port in value)
    except ValueError:
        raise _NotPlain from None


def _choice(value: Any, choices: frozenset[str]) -> Any:
    if value is not None and (type(value) is not str or value not in choices):
        raise _NotPlain
    return value


def _choices(value: Any, choices: frozenset[str]) -> Any:
    if value is None:
        return None
    if type(value) is not list or not value or not all(type(item) is str and item in choices for item in value):
        raise _NotPlain
    return tuple(value)


def _widest(value: Any) -> tuple[int, int] | None:
    if value is None:
        return None
    widest = _mapping(value, WIDEST_KEYS)
    return _bounded(widest, "ipv4", WIDEST_BOUNDS["ipv4"]), _bounded(widest, "ipv6", WIDEST_BOUNDS["ipv6"])


def _log(value: Any) -> Any:
    if value is False or (type(value) is str and value == "off"):
        return "off"
    if value is None or (type(value) is int and value in LOG_RATES):
        return value
    raise _NotPlain


def _allow(entries: list[Any], lines: list[int | None], dates: Callable[[str], date],
           moments: Callable[[str], datetime], checked: dict[str, Interval]) -> tuple[AllowSpec, ...]:
    specs = []
    for line, entry in zip(lines, entries, strict=True):
        if type(entry) is not dict or not entry.keys() <= ALLOW_KEYS:
            raise _NotPlain
        get = entry.get
        cidr, file, owner, reason = get("cidr"), get("file"), get("owner"), get("reason")
        if type(owner) is not str or not owner or type(reason) is not str or not reason:
            raise _NotPlain
        if cidr is not None:
            if file is not None or type(cidr) is not str:
                raise _NotPlain
            try:
                checked[cidr] = parse_interval(cidr)
            except ValueError:  # what the models' validator refuses
                raise _NotPlain from None
        elif type(file) is not str:
            raise _NotPlain
        broad_ok = get("broad_ok", False)
        broad_reason = get("broad_reason")
        if type(broad_ok) is not bool or broad_ok != (broad_reason is not None) or (
                broad_reason is not None and (type(broad_reason) is not str or not broad_reason)):
            raise _NotPlain
        review_by, expires = get("review_by"), get("expires")
        if type(review_by) is not str or (expires is not None and type(expires) is not str):
            raise _NotPlain
        specs.append(AllowSpec(line, cidr, file, owner, reason, dates(review_by),
                               None if expires is None else moments(expires), broad_ok))
    return tuple(specs)
