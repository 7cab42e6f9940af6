"""yamlcore resolves plain scalars as PyYAML's safe loader does, without importing
PyYAML: its table is PyYAML's, and a policy in the block shape is read with no PyYAML."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml
from hypothesis import given
from hypothesis import strategies as st
from reference import examples
from test_yamlblock import EDGY_KEYS, EDGY_VALUES

from hostwall import yamlcore

TAGGABLE_TEXT = st.text(yamlcore.TAGGABLE_CHARACTERS + "xXoObBeE/é#", max_size=24)


def test_the_implicit_resolvers_are_pyyamls_by_first_character_in_its_order() -> None:
    def described(table: dict[str | None, list[tuple[str, object]]]) -> dict[str | None, list[tuple[str, str, int]]]:
        return {first: [(tag, e.pattern, e.flags) for tag, e in resolvers]  # type: ignore[attr-defined]
                for first, resolvers in table.items()}

    theirs = described(yaml.resolver.Resolver.yaml_implicit_resolvers)
    assert described(yamlcore.IMPLICIT_RESOLVERS) == theirs  # type: ignore[arg-type]
    # Both loaders resolve with that table: none adds or replaces a resolver.
    for loader in (yaml.SafeLoader, yaml.CSafeLoader):
        assert described(loader.yaml_implicit_resolvers) == theirs


@examples(500)
@given(st.sampled_from(EDGY_VALUES + EDGY_KEYS) | TAGGABLE_TEXT)
def test_a_plain_scalar_gets_the_safe_loaders_tag(text: str) -> None:
    expected = yaml.CSafeLoader("").resolve(yaml.ScalarNode, text, (True, False))
    assert yamlcore.resolve(text) == expected


POLICY = """services:
  https:
    allow:
      - cidr: 192.0.2.0/24
        owner: ops
        reason: office
        review_by: 2099-01-01
    ports: [443, 8443]
"""


def loaded(policy: Path) -> str:
    probe = ("import sys\n"
             "from hostwall.yamlsource import load\n"
             f"data = load(open({str(policy)!r}).read()).data\n"
             "print(sorted(m for m in ('yaml', 'hostwall.yamlnodes') if m in sys.modules),\n"
             "      data['services']['https']['ports'])\n")
    return subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                          timeout=60).stdout.strip()


def test_a_policy_in_the_block_shape_is_read_without_pyyaml(tmp_path: Path) -> None:
    policy = tmp_path / "p.yaml"
    policy.write_text(POLICY)
    assert loaded(policy) == "[] [443, 8443]"
    # Outside the block shape (a quoted scalar), PyYAML reads it.
    policy.write_text(POLICY.replace("owner: ops", 'owner: "ops"'))
    assert loaded(policy) == "['hostwall.yamlnodes', 'yaml'] [443, 8443]"
