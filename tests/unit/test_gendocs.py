"""Man pages and completions generated from the click commands (scripts/gendocs.py), and
/etc/default/hostwall naming only settings that exist."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
from pathlib import Path
from types import ModuleType

import click
import pytest

from hostwall.cli import every_command, main

REPO = Path(__file__).resolve().parents[2]


def _gendocs() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gendocs", REPO / "scripts" / "gendocs.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gendocs = _gendocs()


def test_every_visible_command_has_a_page_naming_each_of_its_options() -> None:
    pages = gendocs.man_pages()
    visible = {name for name, command in every_command().items() if not command.hidden}
    assert set(pages) == {"hostwall.8"} | {f"hostwall-{name}.8" for name in visible}
    assert "disable" in visible and "revert-unconfirmed" not in visible
    for name in visible:
        page = pages[f"hostwall-{name}.8"].replace("\\-", "-")
        for param in every_command()[name].params:
            if isinstance(param, click.Option) and not param.hidden:
                for option in param.opts:
                    assert option in page, (name, option)
        assert f"hostwall-{name}" in pages["hostwall.8"].replace("\\-", "-")


def test_pages_say_what_help_says() -> None:
    help_text = every_command()["apply"].help or ""
    first = " ".join(help_text.split("\n\n")[0].split())
    assert first.replace("-", "\\-") in gendocs.man_pages()["hostwall-apply.8"]


def test_pages_are_reproducible_with_source_date_epoch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1767225600")
    first, second = gendocs.man_pages(), gendocs.man_pages()
    assert first == second
    assert first["hostwall.8"].startswith('.TH "HOSTWALL" "8" "2026-01-01" "hostwall ')


def test_roff_escapes_what_would_be_markup() -> None:
    assert gendocs.roff(".SH not a heading\n'also\\not") == "\\&.SH not a heading\n\\&'also\\enot"
    assert gendocs.roff("--json") == "\\-\\-json"


@pytest.mark.skipif(shutil.which("groff") is None, reason="groff is not installed")
def test_pages_format_without_warnings(tmp_path: Path) -> None:
    for name, text in gendocs.man_pages().items():
        path = tmp_path / name
        path.write_text(text)
        result = subprocess.run(["groff", "-man", "-ww", "-z", "-Tutf8", str(path)], capture_output=True,
                                text=True, timeout=60, check=False)
        assert result.returncode == 0 and result.stderr == "", (name, result.stderr)


def test_completions_for_three_shells() -> None:
    files = gendocs.completions()
    assert set(files) == {"hostwall", "_hostwall", "hostwall.fish"}
    assert "_HOSTWALL_COMPLETE=bash_complete" in files["hostwall"]
    assert files["_hostwall"].startswith("#compdef hostwall")
    assert "complete --no-files --command hostwall" in files["hostwall.fish"]


def test_default_file_names_only_settings_that_exist() -> None:
    text = (REPO / "units" / "hostwall.default").read_text()
    named = set(re.findall(r"^#?(HOSTWALL_[A-Z_]+)=", text, re.MULTILINE))
    known = {p.envvar for command in (main, every_command()["agent"]) for p in command.params
             if isinstance(p, click.Option) and isinstance(p.envvar, str)}
    assert named and named <= known, named - known
    # Every agent setting is there to be found.
    agent = {p.envvar for p in every_command()["agent"].params
             if isinstance(p, click.Option) and isinstance(p.envvar, str)}
    assert agent <= named, agent - named
