"""units/hostwall.catalog explains every MESSAGE_ID hostwall writes, journalctl accepts it,
and the fields it shows (@FIELD@) are ones the records carry."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from hostwall import drops
from hostwall.drops import Drop, DropReporter, FloodControl, Record, lost_record
from hostwall.packet import PacketSummary

CATALOG = Path(__file__).resolve().parents[2] / "units" / "hostwall.catalog"
MESSAGE_IDS = {name: value for name, value in vars(drops).items() if name.startswith("MESSAGE_ID_")}


def sections() -> dict[str, str]:
    """message id -> the section's text (header lines and body)."""
    found: dict[str, str] = {}
    current: str | None = None
    for line in CATALOG.read_text(encoding="utf-8").splitlines():
        header = re.fullmatch(r"-- ([0-9a-f]{32})(?: \S+)?", line)
        if header:
            current = header[1]
            assert current not in found, f"section {current} appears twice"
            found[current] = ""
        elif current is not None:
            found[current] += line + "\n"
    return found


def subject(text: str) -> str | None:
    match = re.search(r"^Subject: (.+)$", text, re.MULTILINE)
    return match[1].strip() if match else None


def journalctl() -> str:
    path = shutil.which("journalctl")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("journalctl is missing; the set-up installs it")
        pytest.skip("journalctl is not installed")
    return path


def test_message_ids_are_distinct_128_bit_ids() -> None:
    assert len(MESSAGE_IDS) >= 8
    assert all(re.fullmatch(r"[0-9a-f]{32}", value) for value in MESSAGE_IDS.values()), MESSAGE_IDS
    assert len(set(MESSAGE_IDS.values())) == len(MESSAGE_IDS)


def test_every_message_id_has_a_section_with_a_subject_and_text() -> None:
    found = sections()
    for name, message_id in MESSAGE_IDS.items():
        assert message_id in found, f"{name} ({message_id}) has no section in {CATALOG.name}"
        assert subject(found[message_id]), f"{name} has no Subject line"
        body = found[message_id].split("\n\n", 1)
        assert len(body) == 2 and body[1].strip(), f"{name} has no explanation"
    assert set(found) == set(MESSAGE_IDS.values()), "sections for ids hostwall does not write"


def _drop(service: str = "ssh") -> Drop:
    return Drop(service, PacketSummary(4, "198.51.100.7", "192.0.2.10", "tcp", 40000, 22), "eth0", 3)


def _records() -> dict[str, Record]:
    """One record of each kind the drop log writes, as the agent would."""
    clock = iter(float(t) for t in range(10_000))
    reporter = DropReporter(FloodControl(window_seconds=1e9, records_per_source_per_window=1,
                                         recon_drops_per_minute=2), lambda: next(clock))
    written = [r for _ in range(3) for r in reporter.observe(_drop())] + reporter.flush_all()
    written.append(lost_record(4, 9))
    return {record.message_id: record for record in written}


def test_fields_shown_by_the_catalog_are_in_the_records() -> None:
    found = sections()
    records = _records()
    assert set(records) == {drops.MESSAGE_ID_DROP, drops.MESSAGE_ID_DROP_SUMMARY, drops.MESSAGE_ID_RECON,
                            drops.MESSAGE_ID_LOST}
    for message_id, record in records.items():
        shown = set(re.findall(r"@([A-Z0-9_]+)@", found[message_id]))
        assert shown, message_id
        assert shown <= set(record.fields), (message_id, shown - set(record.fields))


def test_journalctl_builds_and_lists_the_catalog(tmp_path: Path) -> None:
    tool = journalctl()
    catalog_dir = tmp_path / "usr" / "lib" / "systemd" / "catalog"
    catalog_dir.mkdir(parents=True)
    shutil.copy(CATALOG, catalog_dir / CATALOG.name)
    update = subprocess.run([tool, f"--root={tmp_path}", "--update-catalog"], capture_output=True, text=True,
                            timeout=60, check=False)
    assert update.returncode == 0, update.stderr
    assert update.stderr.strip() == "", update.stderr  # journalctl warns about lines it cannot parse
    listed = subprocess.run([tool, f"--root={tmp_path}", "--list-catalog"], capture_output=True, text=True,
                            timeout=60, check=False)
    assert listed.returncode == 0, listed.stderr
    entries = dict(line.split(" ", 1) for line in listed.stdout.splitlines() if line.strip())
    found = sections()
    for name, message_id in MESSAGE_IDS.items():
        assert message_id in entries, f"{name} is not in journalctl's catalog"
        assert entries[message_id].endswith(f": {subject(found[message_id])}"), entries[message_id]
