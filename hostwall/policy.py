"""Policy files: strict models, loading with file/line provenance, and merging."""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, date, datetime
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from hostwall import yamlsource
from hostwall.cidr import PERMANENT, CidrError, Interval, IPNetwork, parse_cidr, parse_interval
from hostwall.errors import PolicyError, Problem

SERVICE_NAME = re.compile(r"^[a-z][a-z0-9_]{0,23}$")
Protocol = Literal["tcp", "udp"]
MAX_POLICY_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True, order=True)
class PortRange:
    first: int
    last: int

    def __str__(self) -> str:
        return str(self.first) if self.first == self.last else f"{self.first}-{self.last}"

    def contains(self, port: int) -> bool:
        return self.first <= port <= self.last


@dataclass(frozen=True)
class BuiltinService:
    ports: tuple[PortRange, ...]
    protocols: tuple[Protocol, ...]


# HTTP/3 runs over UDP 443, so https protects both transports.
BUILTIN_SERVICES: dict[str, BuiltinService] = {
    "https": BuiltinService((PortRange(443, 443),), ("tcp", "udp")),
    "postgres": BuiltinService((PortRange(5432, 5432),), ("tcp",)),
}


def _parse_port(value: Any) -> PortRange:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"a port is a number (443) or a range string ('8000-8100'), not {value!r}")
    if isinstance(value, int):
        first = last = value
    else:
        match = re.fullmatch(r"(\d{1,5})-(\d{1,5})", value.strip())
        if not match:
            raise ValueError(
                f"port {value!r} is neither a number nor a range; write 443 or '8000-8100'"
            )
        first, last = int(match[1]), int(match[2])
        if first > last:
            raise ValueError(f"port range {value!r} is reversed; write '{last}-{first}'")
    for port in (first, last):
        if not 1 <= port <= 65535:
            raise ValueError(f"port {port} is outside 1-65535")
    return PortRange(first, last)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=False)


class AllowEntryModel(_Strict):
    cidr: str | None = None
    file: str | None = None
    owner: Annotated[str, Field(min_length=1)]
    reason: Annotated[str, Field(min_length=1)]
    review_by: date
    expires: datetime | None = None

    @field_validator("cidr")
    @classmethod
    def _cidr_is_strict(cls, value: str | None) -> str | None:
        if value is not None:
            parse_cidr(value)
        return value

    @field_validator("expires")
    @classmethod
    def _expires_has_zone(cls, value: datetime | None) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError(
                "expires needs a time zone so that every host agrees on the moment; "
                "add Z for UTC, e.g. 2027-01-01T00:00:00Z"
            )
        return value

    @model_validator(mode="after")
    def _one_source(self) -> AllowEntryModel:
        if (self.cidr is None) == (self.file is None):
            raise ValueError("an allow entry has exactly one of cidr: or file:")
        return self


class ServiceModel(_Strict):
    ports: list[Any] | None = None
    protocols: list[Protocol] | None = None
    action: Literal["drop", "reject"] | None = None
    allow: list[AllowEntryModel] = Field(default_factory=list)

    @field_validator("ports")
    @classmethod
    def _ports_valid(cls, value: list[Any] | None) -> list[Any] | None:
        if value is not None:
            if not value:
                raise ValueError("ports is empty; list at least one port")
            for port in value:
                _parse_port(port)
        return value

    @field_validator("protocols")
    @classmethod
    def _protocols_nonempty(cls, value: list[Protocol] | None) -> list[Protocol] | None:
        if value is not None and not value:
            raise ValueError("protocols is empty; write [tcp], [udp] or [tcp, udp]")
        return value


class SettingsModel(_Strict):
    log_group: Annotated[int, Field(ge=0, le=65535)] = 100
    log_rate: Annotated[int, Field(ge=1, le=100000)] = 10
    log_burst: Annotated[int, Field(ge=1, le=100000)] = 20


class PolicyFileModel(_Strict):
    services: dict[str, ServiceModel | None] = Field(default_factory=dict)
    settings: SettingsModel | None = None


@dataclass(frozen=True)
class Origin:
    """Where an entry came from: the policy file and line, and a list file's line if any."""

    file: str
    line: int | None
    entry: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}" if self.line is not None else self.file


@dataclass(frozen=True)
class Entry:
    interval: Interval
    owner: str
    reason: str
    review_by: date
    expires: datetime | None
    origin: Origin

    @cached_property
    def network(self) -> IPNetwork:
        network = self.interval.as_prefix()
        assert network is not None  # every entry is parsed from one CIDR
        return network


@dataclass(frozen=True)
class Service:
    name: str
    ports: tuple[PortRange, ...]
    protocols: tuple[Protocol, ...]
    action: Literal["drop", "reject"]
    entries: tuple[Entry, ...]
    defined_in: str


@dataclass(frozen=True)
class Settings:
    log_group: int = 100
    log_rate: int = 10
    log_burst: int = 20


@dataclass(frozen=True)
class Policy:
    services: tuple[Service, ...]
    settings: Settings
    files: tuple[Path, ...]
    expired: tuple[Entry, ...]

    def service(self, name: str) -> Service | None:
        return next((s for s in self.services if s.name == name), None)

    def warnings(self) -> list[str]:
        return [
            f"{entry.origin}: {entry.origin.entry}: {entry.network} expired at "
            f"{entry.expires.astimezone(UTC):%Y-%m-%dT%H:%M:%SZ}; not loaded (remove it from the file)"
            for entry in self.expired
            if entry.expires is not None
        ]


def policy_files(path: Path) -> list[Path]:
    """The files a policy path stands for: the file itself, or the directory's *.yaml."""
    if not path.exists():
        raise PolicyError([Problem(str(path), None, "", "no such file or directory")])
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file())
        if not files:
            raise PolicyError(
                [Problem(str(path), None, "", "no *.yaml policy files in this directory")]
            )
        return files
    return [path]


def _format_loc(loc: Iterable[str | int]) -> str:
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else part
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
            message = f"{message} (got {error.get('input')!r})"
        entry = _format_loc(loc)
        cidr = _cidr_at(located.data, loc)
        if cidr:
            entry += f" (cidr {cidr})"
        problems.append(Problem(filename, located.line_of(loc), entry, message))
    return problems


def _unknown_key_message(loc: tuple[str | int, ...]) -> str:
    key = str(loc[-1])
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
        return f"unknown key {key!r}; check the spelling"
    known = list(model.model_fields)
    close = difflib.get_close_matches(key, known, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return f"unknown key {key!r}; {hint}valid keys here: {', '.join(known)}"


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


@dataclass
class _ServiceDraft:
    name: str
    definition: ServiceModel | None
    defined_in: str | None
    entries: list[Entry]
    first_seen: str = "?"


def load_policy(path: Path, now: datetime | None = None) -> Policy:
    """Load, validate and merge the policy at path (a file or a directory of *.yaml)."""
    now = now or datetime.now(UTC)
    files = policy_files(path)
    problems: list[Problem] = []
    drafts: dict[str, _ServiceDraft] = {}
    settings: Settings | None = None
    settings_file: str | None = None
    expired: list[Entry] = []

    for file in files:
        name = str(file)
        parsed = _parse_file(file, problems)
        if parsed is None:
            continue
        model, located = parsed
        if model.settings is not None:
            if settings_file is not None:
                problems.append(
                    Problem(name, located.line_of(("settings",)), "settings",
                            f"settings are already given in {settings_file}; keep them in one file")
                )
            else:
                settings = Settings(**model.settings.model_dump())
                settings_file = name
        for service_name, declared in model.services.items():
            service_line = located.line_of(("services", service_name))
            if not SERVICE_NAME.match(service_name):
                problems.append(
                    Problem(name, service_line, f"services.{service_name}",
                            "service names are 1-24 characters of a-z, 0-9 and _, "
                            "starting with a letter")
                )
                continue
            service = declared or ServiceModel()
            draft = drafts.setdefault(
                service_name, _ServiceDraft(service_name, None, None, [], f"{name}:{service_line}")
            )
            defines = service.ports is not None or service.protocols is not None or service.action is not None
            if defines:
                if draft.defined_in is not None:
                    problems.append(
                        Problem(name, service_line, f"services.{service_name}",
                                f"service {service_name!r} is already defined in {draft.defined_in}; "
                                "define ports/protocols/action in one file and only add allow "
                                "entries elsewhere")
                    )
                else:
                    draft.definition = service
                    draft.defined_in = f"{name}:{service_line}"
            for index, allow in enumerate(service.allow):
                entry_path = ("services", service_name, "allow", index)
                origin = Origin(name, located.line_of(entry_path), f"services.{service_name}.allow[{index}]")
                for entry in _expand_entry(allow, origin, file, problems):
                    if entry.expires is not None and entry.expires <= now:
                        expired.append(entry)
                    else:
                        draft.entries.append(entry)

    services = _finish_services(drafts, problems)
    if problems:
        raise PolicyError(problems)
    return Policy(
        services=tuple(services),
        settings=settings or Settings(),
        files=tuple(files),
        expired=tuple(expired),
    )


def _parse_file(
    file: Path, problems: list[Problem]
) -> tuple[PolicyFileModel, yamlsource.LocatedData] | None:
    name = str(file)
    try:
        raw = file.read_bytes()
    except OSError as exc:
        problems.append(Problem(name, None, "", f"cannot read: {exc.strerror}"))
        return None
    if len(raw) > MAX_POLICY_BYTES:
        problems.append(Problem(name, None, "", f"larger than {MAX_POLICY_BYTES} bytes; "
                                "move long address lists into file: lists"))
        return None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        problems.append(Problem(name, line, "", "not UTF-8 text; save the file as UTF-8"))
        return None
    try:
        located = yamlsource.load(text)
    except yamlsource.YamlError as exc:
        problems.append(Problem(name, exc.line, "", str(exc)))
        return None
    if not isinstance(located.data, dict):
        problems.append(Problem(name, 1, "", "a policy file is a mapping with a services: key"))
        return None
    try:
        return PolicyFileModel.model_validate(located.data), located
    except ValidationError as exc:
        problems.extend(_pydantic_problems(exc, name, located))
        return None


def _expand_entry(
    allow: AllowEntryModel, origin: Origin, policy_file: Path, problems: list[Problem]
) -> list[Entry]:
    expires = allow.expires.timestamp() if allow.expires is not None else PERMANENT

    def make(text: str, where: Origin) -> Entry:
        return Entry(parse_interval(text, expires), allow.owner, allow.reason, allow.review_by,
                     allow.expires, where)

    if allow.cidr is not None:
        return [make(allow.cidr, origin)]
    assert allow.file is not None
    list_path = (policy_file.parent / allow.file)
    try:
        text = list_path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        problems.append(Problem(origin.file, origin.line,
                                origin.entry, f"cannot read list file {list_path}: {reason}"))
        return []
    entries = []
    list_name = str(list_path)
    label = f"{origin.entry} (file: {allow.file}, from {origin})"  # one string shared by every line
    for number, line in enumerate(text.splitlines(), start=1):
        content = line.split("#", 1)[0].strip()
        if not content:
            continue
        try:
            entries.append(make(content, Origin(list_name, number, label)))
        except CidrError as exc:
            problems.append(Problem(str(list_path), number, f"{origin.entry} file: {allow.file}", str(exc)))
    return entries


def _finish_services(drafts: dict[str, _ServiceDraft], problems: list[Problem]) -> list[Service]:
    services: list[Service] = []
    for name in sorted(set(drafts) | set(BUILTIN_SERVICES)):
        draft = drafts.get(name) or _ServiceDraft(name, None, None, [])
        builtin = BUILTIN_SERVICES.get(name)
        definition = draft.definition or ServiceModel()
        ports: tuple[PortRange, ...] | None = (
            tuple(sorted({_parse_port(p) for p in definition.ports})) if definition.ports else None
        )
        protocols = tuple(sorted(set(definition.protocols))) if definition.protocols else None
        if builtin is not None:
            ports = ports or builtin.ports
            protocols = protocols or builtin.protocols
        where = draft.defined_in or ("built-in" if builtin else draft.first_seen)
        if ports is None:
            problems.append(Problem(where, None, f"services.{name}",
                                    f"service {name!r} is not built-in, so it needs ports: [...] "
                                    "(built-in services: " + ", ".join(BUILTIN_SERVICES) + ")"))
            continue
        services.append(Service(
            name=name,
            ports=ports,
            protocols=protocols or ("tcp",),
            action=definition.action or "drop",
            entries=tuple(draft.entries),
            defined_in=where,
        ))
    _check_port_claims(services, problems)
    return services


def _check_port_claims(services: list[Service], problems: list[Problem]) -> None:
    claims: list[tuple[Protocol, PortRange, Service]] = []
    # Built-ins claim first, so a clash is reported at the custom service that the
    # operator can change, not at a built-in that has no file.
    for service in sorted(services, key=lambda s: s.name not in BUILTIN_SERVICES):
        for protocol in service.protocols:
            for ports in service.ports:
                for other_protocol, other_ports, other in claims:
                    overlap = ports.first <= other_ports.last and other_ports.first <= ports.last
                    if other is not service and other_protocol == protocol and overlap:
                        problems.append(Problem(
                            service.defined_in, None, f"services.{service.name}",
                            f"port {ports}/{protocol} is also claimed by service {other.name!r} "
                            f"({other.defined_in}); a port belongs to one service, so add the "
                            f"entries to {other.name!r} or pick another port",
                        ))
                claims.append((protocol, ports, service))
