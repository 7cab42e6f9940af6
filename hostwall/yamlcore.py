"""What every YAML reader here shares, without PyYAML: the limits, the error, the line
maps, and the tag and value of a plain scalar as PyYAML's safe loader resolves it.

A policy file in the block shape (hostwall.yamlblock) is read with no PyYAML at all:
importing it costs about 10 ms of each start, most of it compiling its reader's
expressions. The implicit tags below are PyYAML's own (YAML 1.1), expression by
expression and in its order; tests/unit/test_yamlcore.py holds them to PyYAML's table.
"""

from __future__ import annotations

import re
from typing import Any

# Every reader reads them as yamlcore.MAX_NODES and yamlcore.MAX_DEPTH, so that one value
# holds for all of them.
MAX_NODES = 2_000_000
MAX_DEPTH = 64


class YamlError(ValueError):
    def __init__(self, message: str, line: int | None) -> None:
        super().__init__(message)
        self.line = line


# The lines of a mapping's keys or a sequence's items, by key or index.
Lines = dict[Any, int]
# An item of a run of one shape (hostwall.yamlblock): its first line, and each key's
# offset from it, which every item of the run shares.
ItemLines = tuple[int, dict[Any, int]]
ChildLines = Lines | ItemLines

STR = "tag:yaml.org,2002:str"

# (tag, expression, the first characters it is tried for), as yaml.resolver.Resolver
# adds them; "" stands for the empty scalar.
_IMPLICIT: tuple[tuple[str, re.Pattern[str], str | list[str]], ...] = (
    ("tag:yaml.org,2002:bool", re.compile(r'''^(?:yes|Yes|YES|no|No|NO
                    |true|True|TRUE|false|False|FALSE
                    |on|On|ON|off|Off|OFF)$''', re.X), "yYnNtTfFoO"),
    ("tag:yaml.org,2002:float", re.compile(r'''^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+][0-9]+)?
                    |\.[0-9][0-9_]*(?:[eE][-+][0-9]+)?
                    |[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+\.[0-9_]*
                    |[-+]?\.(?:inf|Inf|INF)
                    |\.(?:nan|NaN|NAN))$''', re.X), "-+0123456789."),
    ("tag:yaml.org,2002:int", re.compile(r'''^(?:[-+]?0b[0-1_]+
                    |[-+]?0[0-7_]+
                    |[-+]?(?:0|[1-9][0-9_]*)
                    |[-+]?0x[0-9a-fA-F_]+
                    |[-+]?[1-9][0-9_]*(?::[0-5]?[0-9])+)$''', re.X), "-+0123456789"),
    ("tag:yaml.org,2002:merge", re.compile(r'^(?:<<)$'), "<"),
    ("tag:yaml.org,2002:null", re.compile(r'''^(?: ~
                    |null|Null|NULL
                    | )$''', re.X), ["~", "n", "N", ""]),
    ("tag:yaml.org,2002:timestamp", re.compile(r'''^(?:[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]
                    |[0-9][0-9][0-9][0-9] -[0-9][0-9]? -[0-9][0-9]?
                     (?:[Tt]|[ \t]+)[0-9][0-9]?
                     :[0-9][0-9] :[0-9][0-9] (?:\.[0-9]*)?
                     (?:[ \t]*(?:Z|[-+][0-9][0-9]?(?::[0-9][0-9])?))?)$''', re.X), "0123456789"),
    ("tag:yaml.org,2002:value", re.compile(r'^(?:=)$'), "="),
    ("tag:yaml.org,2002:yaml", re.compile(r'^(?:!|&|\*)$'), "!&*"),
)


def _by_first_character() -> dict[str, list[tuple[str, re.Pattern[str]]]]:
    table: dict[str, list[tuple[str, re.Pattern[str]]]] = {}
    for tag, expression, firsts in _IMPLICIT:
        for first in firsts:
            table.setdefault(first, []).append((tag, expression))
    return table


# The same dict as PyYAML's Resolver.yaml_implicit_resolvers.
IMPLICIT_RESOLVERS = _by_first_character()

# Every character that the implicit tags' expressions can match (the test reads them off
# the expressions): a text with any other, such as the "/" of every CIDR or most
# letters, is a string.
TAGGABLE_CHARACTERS = "\t !&*+-.0123456789:<=ABCDEFILNORSTUYZ_abcdefilnorstuxy~"
_ONLY_TAGGABLE = re.compile(f"^[{re.escape(TAGGABLE_CHARACTERS)}]*$", re.MULTILINE)


def resolve(text: str) -> str:
    """The tag of a plain scalar's text, as the safe loader's resolver gives it."""
    for tag, expression in IMPLICIT_RESOLVERS.get(text[:1], ()):
        if expression.match(text):
            return tag
    return STR


_SCALAR_TAGS = {
    "tag:yaml.org,2002:int": int,
    "tag:yaml.org,2002:float": float,
}


def scalar(tag: str, value: str) -> Any:
    """The value of a scalar that resolved to tag, as the readers build it."""
    if tag == "tag:yaml.org,2002:null":
        return None
    if tag == "tag:yaml.org,2002:bool":
        return value.lower() in ("true", "yes", "on")
    converter = _SCALAR_TAGS.get(tag)
    if converter is not None:
        try:
            return converter(value.replace("_", ""))
        except ValueError:
            return value
    # Timestamps stay strings: the policy's loader parses them with explicit rules about
    # time zones.
    return value


def plain_scalar(text: str) -> Any:
    """The value of a plain scalar's text, by its implicit tag."""
    tag = resolve(text)
    return text if tag == STR else scalar(tag, text)


def all_strings(texts: list[str]) -> bool:
    """Whether each of texts (of one line each) is its own value, a str: a timestamp stays
    one, and so does every text no implicit tag matches. A column of 10k addresses is one
    scan for lines an expression could match at all, instead of 10k tries of them."""
    if not texts:
        return True
    return all(type(own := plain_scalar(text)) is str and own == text
               for text in set(_ONLY_TAGGABLE.findall("\n".join(texts))))

