"""The policy file's models (pydantic): validation of one file, its errors in an
operator's words, and the FileSpec that loading merges (hostwall.policyspec).

Only a policy file that the cache of validated files does not hold, and that holds a
value hostwall.policyplain cannot judge without the models (one they would coerce, or
an error to word), is validated here: an apply whose files are unchanged never imports
YAML, and one whose values are all plainly valid never imports pydantic.
"""

from __future__ import annotations

import difflib
import os
import sys
import types
from collections.abc import Iterable
from datetime import UTC, date, datetime
from typing import Annotated, Any, Literal

# pydantic imports every plugin that an installed distribution's metadata names, at the
# first model: code that runs as root would be chosen by what lies on sys.path, and the
# scan of all distributions costs about 15 ms. hostwall uses no plugin; this is set
# whatever the caller's environment says, before any model exists.
os.environ["PYDANTIC_DISABLE_PLUGINS"] = "__all__"
# Even so, pydantic's plugin loader imports importlib.metadata (and with it the email and
# zipfile packages, 10-30 ms) when the first model is built; a loader that knows no
# plugin stands in for it (tests/unit/test_pydantic_plugins.py holds pydantic to using
# nothing else of that module).
if "pydantic.plugin._loader" not in sys.modules:
    _no_plugins = types.ModuleType("pydantic.plugin._loader")
    _no_plugins.get_plugins = lambda: ()  # type: ignore[attr-defined]
    sys.modules["pydantic.plugin._loader"] = _no_plugins

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from hostwall import yamlsource
from hostwall.cidr import parse_interval
from hostwall.errors import Problem
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
    shown,
)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=False)


class AllowEntryModel(_Strict):
    cidr: str | None = None
    file: str | None = None
    owner: Annotated[str, Field(min_length=1)]
    reason: Annotated[str, Field(min_length=1)]
    review_by: date
    expires: datetime | None = None
    broad_ok: bool = False
    broad_reason: Annotated[str, Field(min_length=1)] | None = None

    @field_validator("cidr")
    @classmethod
    def _cidr_is_strict(cls, value: str | None) -> str | None:
        if value is not None:
            # parse_interval refuses what parse_cidr refuses, with its message, and reads
            # the common well-formed CIDR without ipaddress (a tenth of the time).
            parse_interval(value)
        return value

    @field_validator("expires")
    @classmethod
    def _expires_has_zone(cls, value: datetime | None) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError(
                "expires needs a time zone so that every host agrees on the moment; "
                "add Z for UTC, e.g. 2027-01-01T00:00:00Z"
            )
        if value is not None:
            try:
                value.astimezone(UTC)
            except OverflowError:
                # Every later step (expiry, warnings, kernel timeouts) works in UTC.
                raise ValueError("expires is outside the years 1-9999 once converted to UTC") from None
        return value

    @model_validator(mode="after")
    def _one_source(self) -> AllowEntryModel:
        if (self.cidr is None) == (self.file is None):
            raise ValueError("an allow entry has exactly one of cidr: or file:")
        # A wide range waved through without a written reason is how /16s creep in.
        if self.broad_ok and self.broad_reason is None:
            raise ValueError("broad_ok: true needs broad_reason: saying why so wide a range is meant")
        if self.broad_reason is not None and not self.broad_ok:
            raise ValueError("broad_reason: is only read with broad_ok: true; add it or remove broad_reason")
        return self


def _bounded(bounds: Bounds) -> Any:
    return Field(default=bounds.default, ge=bounds.low, le=bounds.high)


class WidestModel(_Strict):
    ipv4: int = _bounded(WIDEST_BOUNDS["ipv4"])
    ipv6: int = _bounded(WIDEST_BOUNDS["ipv6"])


class ServiceModel(_Strict):
    ports: list[Any] | None = None
    protocols: list[Protocol] | None = None
    action: Action | None = None
    widest: WidestModel | None = None
    entry_counters: bool | None = None
    # Drop logging of this service: "off", or records per second (the burst stays
    # settings.log_burst). YAML 1.1 reads a bare `off` as false, so false means off too.
    log: Literal["off"] | int | None = None
    allow: list[AllowEntryModel] = Field(default_factory=list)

    @field_validator("log", mode="before")
    @classmethod
    def _log_off_or_rate(cls, value: Any) -> Any:
        if value is False or value == "off":
            return "off"
        if value is None or (type(value) is int and value in LOG_RATES):
            return value
        raise ValueError(f"log is off or a rate in records per second ({LOG_RATES.start}-{LOG_RATES.stop - 1}), "
                         f"not {value!r}")

    @field_validator("ports")
    @classmethod
    def _ports_valid(cls, value: list[Any] | None) -> list[Any] | None:
        if value is not None:
            if not value:
                raise ValueError("ports is empty; list at least one port")
            for port in value:
                parse_port(port)
        return value

    @field_validator("protocols")
    @classmethod
    def _protocols_nonempty(cls, value: list[Protocol] | None) -> list[Protocol] | None:
        if value is not None and not value:
            raise ValueError("protocols is empty; write [tcp], [udp] or [tcp, udp]")
        return value


class SettingsModel(_Strict):
    log_group: int = _bounded(SETTINGS_BOUNDS["log_group"])
    log_rate: int = _bounded(SETTINGS_BOUNDS["log_rate"])
    log_burst: int = _bounded(SETTINGS_BOUNDS["log_burst"])
    # Drop packets to protected ports whose source the host would not route back out of
    # the interface they came in on (reverse-path check): an allowed address spoofed from
    # another link. Off by default: asymmetric routing (several uplinks) breaks it.
    strict_source: bool = False
    owners: list[Annotated[str, Field(min_length=1)]] | None = None


class PolicyFileModel(_Strict):
    services: dict[str, ServiceModel | None] = Field(default_factory=dict)
    settings: SettingsModel | None = None


def _format_loc(loc: Iterable[str | int]) -> str:
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            name = part if len(part) <= 40 else f"{part[:40]}..."
            text += f".{name}" if text else name
    return text


def _pydantic_problems(
    exc: ValidationError, filename: str, located: yamlsource.LocatedData
) -> list[Problem]:
    problems = []
    for error in exc.errors():
        loc = tuple(error["loc"])
        # Unions put the chosen branch name into loc; it means nothing to an operator.
        loc = tuple(part for part in loc if part not in ("ServiceModel", "none"))
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            message = _unknown_key_message(loc)
        elif error["type"] == "missing":
            message = f"required key {loc[-1]!r} is missing"
        elif error["type"] == "literal_error":
            message = f"{message} (got {shown(error.get('input'))})"
        entry = _format_loc(loc)
        cidr = _cidr_at(located.data, loc)
        if cidr:
            entry += f" (cidr {cidr if len(cidr) <= 60 else shown(cidr)})"
        problems.append(Problem(filename, located.line_of(loc), entry, message))
    return problems


def _unknown_key_message(loc: tuple[str | int, ...]) -> str:
    key = shown(str(loc[-1]))
    parent = loc[:-1]
    model: type[BaseModel] | None = None
    if not parent:
        model = PolicyFileModel
    elif parent == ("settings",):
        model = SettingsModel
    elif len(parent) == 2 and parent[0] == "services":
        model = ServiceModel
    elif len(parent) == 4 and parent[0] == "services" and parent[2] == "allow":
        model = AllowEntryModel
    if model is None:
        return f"unknown key {key}; check the spelling"
    known = list(model.model_fields)
    close = difflib.get_close_matches(str(loc[-1])[:100], known, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return f"unknown key {key}; {hint}valid keys here: {', '.join(known)}"


def _cidr_at(data: Any, loc: tuple[str | int, ...]) -> str | None:
    """The cidr of the allow entry that loc points into, to name the entry in errors."""
    node = data
    for index, part in enumerate(loc):
        try:
            node = node[part]
        except (KeyError, IndexError, TypeError):
            return None
        if index >= 3 and loc[2] == "allow" and isinstance(node, dict):
            value = node.get("cidr")
            return value if isinstance(value, str) else None
    return None


def validate_file(name: str, text: str) -> FileSpec | list[Problem]:
    """The FileSpec of one policy file's text, or what is wrong with it (name: its path)."""
    located = yamlsource.document(name, text)
    return [located] if isinstance(located, Problem) else validate_document(name, located)


def validate_document(name: str, located: yamlsource.LocatedData) -> FileSpec | list[Problem]:
    """validate_file of a document already loaded."""
    if not isinstance(located.data, dict):
        return [Problem(name, 1, "", "a policy file is a mapping with a services: key")]
    try:
        model = PolicyFileModel.model_validate(located.data)
    except ValidationError as exc:
        return _pydantic_problems(exc, name, located)
    return _file_spec(model, located)


def _file_spec(model: PolicyFileModel, located: yamlsource.LocatedData) -> FileSpec:
    services = []
    for service_name, declared in model.services.items():
        service = declared or ServiceModel()
        allow_lines = located.item_lines(("services", service_name, "allow"), len(service.allow))
        services.append(ServiceSpec(
            name=service_name,
            line=located.line_of(("services", service_name)),
            ports=tuple(parse_port(p) for p in service.ports) if service.ports is not None else None,
            protocols=tuple(service.protocols) if service.protocols is not None else None,
            action=service.action,
            widest=(service.widest.ipv4, service.widest.ipv6) if service.widest is not None else None,
            entry_counters=service.entry_counters,
            log=service.log,
            allow=tuple(AllowSpec(line, a.cidr, a.file, a.owner, a.reason, a.review_by, a.expires, a.broad_ok)
                        for line, a in zip(allow_lines, service.allow, strict=True)),
        ))
    settings = model.settings.model_dump() if model.settings is not None else None
    return FileSpec(settings, located.line_of(("settings",)) if settings is not None else None, tuple(services))
