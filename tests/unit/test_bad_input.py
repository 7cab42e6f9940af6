"""Bad policy input of every kind: one clear line naming file, line and entry, exit 3.

Each case runs `hostwall validate` (the same loader `apply` uses before it touches
anything) and load_policy. A fuzz run at the end feeds the loader random and mutated
documents and accepts nothing but success or PolicyError. That the kernel and the
state directory stay untouched is checked through `apply --netns` for a
representative subset in tests/netns/test_bad_input_kernel.py.
"""

from __future__ import annotations

import inspect
import os
import tempfile
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st
from reference import examples
from unit_support import PINNED_NOW

from hostwall import policy as policy_module
from hostwall.cidr import CidrError, parse_cidr, parse_interval
from hostwall.cli import main
from hostwall.compile import compile_policy
from hostwall.errors import PolicyError
from hostwall.policy import load_policy
from hostwall.ruleset import render_full_load

META = "    owner: t\n    reason: t\n    review_by: 2099-01-01\n"

def entry(cidr: str) -> str:
    return f"services:\n  https:\n    allow:\n    - cidr: {cidr}\n" + META.replace("    ", "      ")


GOOD = entry("192.0.2.1/32")
Invalid = Callable[..., str]


@pytest.fixture
def invalid(tmp_path: Path) -> Invalid:
    """invalid(path) -> the one stderr line of `hostwall validate path`, after checking exit 3."""

    def run(path: Path, *, lines: int = 1) -> str:
        with pytest.raises(PolicyError):
            load_policy(path)
        if "mix_stderr" in inspect.signature(CliRunner.__init__).parameters:
            runner = CliRunner(mix_stderr=False)  # type: ignore[call-arg]
        else:
            runner = CliRunner()
        result = runner.invoke(
            main, ["--state-dir", str(tmp_path / "state"), "validate", str(path)],
            env={"HOSTWALL_NETNS": None, "HOSTWALL_POLICY_DIR": None, "HOSTWALL_STATE_DIR": None},
        )
        assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
        assert result.exit_code == 3, (result.exit_code, result.stderr)
        assert result.stdout == ""
        output = result.stderr.splitlines()
        assert len(output) == lines, output
        assert all(len(line) < 1000 for line in output), "an error line must stay readable"
        assert output[0].startswith("hostwall: ")
        return output[0]

    return run


def write(directory: Path, name: str, content: str | bytes) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    if isinstance(content, str):
        content = content.encode()
    path.write_bytes(content)
    return path


# --- documents that are not a policy -------------------------------------------------------

BILLION_LAUGHS = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 10)}]\n" for i in range(8)
) + "services: {}\n"

DOCUMENTS: dict[str, tuple[bytes, int | None, str]] = {
    # name: (content, line, text in the message)
    "random-bytes": (bytes(range(256)) * 4, 2, "not UTF-8"),
    "nul-bytes": (GOOD.encode().replace(b"192", b"1\x0092"), 4, "control character U+0000"),
    "truncated": (GOOD.encode()[:60] + b'"192.0.2.', 5, "not valid YAML"),
    "billion-laughs": (BILLION_LAUGHS.encode(), None, "alias bomb"),
    "deep-flow-nesting": (b"services: " + b"[" * 200 + b"]" * 200 + b"\n", 1, "nesting"),
    "deep-block-nesting": ("".join(f"{'  ' * i}k{i}:\n" for i in range(100)).encode(), None, "nesting"),
    "top-level-list": (b"- services: {}\n", 1, "a policy file is a mapping"),
    "top-level-scalar": (b"hello\n", 1, "a policy file is a mapping"),
    "services-a-list": (b"services: [https]\n", 1, "services"),
    "allow-a-string": (b"services:\n  https:\n    allow: 192.0.2.1/32\n", 3, "allow"),
    "entry-a-string": (b"services:\n  https:\n    allow:\n    - 192.0.2.1/32\n", 4, "allow[0]"),
    "cidr-a-number": (entry("10").encode(), 4, "cidr"),
    "review-by-a-bool": (GOOD.replace("2099-01-01", "yes").encode(), 7, "review_by"),
    "review-by-impossible": (GOOD.replace("2099-01-01", "2099-02-30").encode(), 7, "review_by"),
    "ports-a-mapping": (b"services:\n  m:\n    ports: {a: 1}\n", 3, "ports"),
    "protocols-a-string": (b"services:\n  m:\n    ports: [9100]\n    protocols: tcp\n", 4, "protocols"),
    "action-a-number": (b"services:\n  m:\n    ports: [9100]\n    action: 1\n", 4, "action"),
    "log-group-a-string": (b"settings:\n  log_group: many\n", 2, "log_group"),
    "key-a-list": (b"services:\n  [a, b]: {}\n", 2, "mapping keys must be plain strings"),
    "tabs": (b"services:\n\thttps: {}\n", 2, "not valid YAML"),
    "name-with-newline": (b'services:\n  "metrics\\n":\n    ports: [9100]\n', 2, "service names"),
    "name-too-long": (b"services:\n  " + b"a" * 25 + b":\n    ports: [9100]\n", 2, "service names"),
    "huge-key": (b"services:\n  https:\n    " + b"k" * 1000 + b": 1\n", 3, "unknown key"),
    "huge-cidr": (entry("1" * 2_000_000).encode(), 4, "not an IPv4 or IPv6 address"),
    "crlf": (GOOD.replace("192.0.2.1/32", "192.0.2.1/24").replace("\n", "\r\n").encode(), 4, "host bits"),
    "bom": (b"\xef\xbb\xbf" + GOOD.replace("192.0.2.1/32", "192.0.2.1/24").encode(), 4, "host bits"),
    "latin-1": (GOOD.encode().replace(b"reason: t", b"reason: caf\xe9"), 6, "not UTF-8"),
    "utf-16": (GOOD.encode("utf-16"), 1, "not UTF-8"),
}


@pytest.mark.parametrize("name", sorted(DOCUMENTS))
def test_a_broken_document_is_one_clear_line(tmp_path: Path, invalid: Invalid, name: str) -> None:
    content, line, text = DOCUMENTS[name]
    path = write(tmp_path / "policy", "a.yaml", content)
    message = invalid(path.parent)
    where = f"hostwall: {path}:{line}:" if line is not None else f"hostwall: {path}"
    assert message.startswith(where), message
    assert text in message, message


def test_a_file_over_the_size_limit_is_refused_without_reading_it_whole(tmp_path: Path, invalid: Invalid) -> None:
    path = write(tmp_path / "policy", "a.yaml", GOOD)
    os.truncate(path, policy_module.MAX_POLICY_BYTES + 1)  # sparse: costs no disk
    message = invalid(path.parent)
    assert message.startswith(f"hostwall: {path}: cannot read: larger than"), message


# --- addresses ------------------------------------------------------------------------------

BAD_CIDRS = {
    "010.0.0.1": "leading zeros",
    "10.0.0.01/32": "leading zeros",
    "fe80::1%eth0": "zone id",
    "::ffff:10.0.0.1": "IPv4-mapped",
    "::ffff:10.0.0.0/120": "IPv4-mapped",
    "::10.0.0.1": "IPv4-compatible",
    "::/96": "IPv4-compatible",
    "0.0.0.0/0": "every address",
    "::/0": "every address",
    "10.0.0.0/33": "not an IPv4 or IPv6",
    "2001:db8::/129": "not an IPv4 or IPv6",
    "10.0.0.0/-1": "bad prefix length",
    "10.0.0.0/+8": "bad prefix length",
    "10.0.0.0/": "bad prefix length",
    "/24": "not an IPv4 or IPv6",
    "1.2.3": "not an IPv4 or IPv6",
    "10.0.0.0/08": "leading zero",
    "2001:db8::/032": "leading zero",
    "1.2.3.4/32/32": "bad prefix length",
    "example.com": "not an IPv4 or IPv6",
    "10.0.0.1 /32": "white space",
    '" 10.0.0.1"': "white space",
    '"10.0.0.1\\t"': "white space",
    '"10.0.0.0/\u0661\u0666"': "bad prefix length",
    '"1.2.3.4\\0"': "not an IPv4 or IPv6",
    "203.0.113.5/24": "host bits",
    '""': "not an IPv4 or IPv6",
    "10.0.0.0/" + "9" * 5000: "not an IPv4 or IPv6",  # more digits than int() reads
}


@pytest.mark.parametrize("cidr", sorted(BAD_CIDRS))
def test_a_bad_cidr_inline_is_located(tmp_path: Path, invalid: Invalid, cidr: str) -> None:
    path = write(tmp_path / "policy", "a.yaml", entry(cidr))
    message = invalid(path.parent)
    assert message.startswith(f"hostwall: {path}:4: services.https.allow[0].cidr"), message
    assert BAD_CIDRS[cidr] in message, message


def _unquoted(cidr: str) -> str:
    return yaml.safe_load(f"x: {cidr}")["x"] if cidr.startswith('"') else cidr


def _fits_a_list_line(cidr: str) -> bool:
    # A list line is stripped of white space, so those cases mean something else there;
    # NUL is covered by the parser test below, and an empty line is skipped by design.
    text = _unquoted(cidr)
    return bool(text) and text == text.strip() and "\0" not in text


@pytest.mark.parametrize("cidr", sorted(c for c in BAD_CIDRS if _fits_a_list_line(c)))
def test_a_bad_cidr_in_a_list_names_the_list_line(tmp_path: Path, invalid: Invalid, cidr: str) -> None:
    text = _unquoted(cidr)
    directory = tmp_path / "policy"
    write(directory, "list.txt", f"192.0.2.0/25\n# comment\n{text}\n192.0.2.128/25\n")
    write(directory, "a.yaml", GOOD.replace("cidr: 192.0.2.1/32", "file: list.txt"))
    message = invalid(directory)
    assert message.startswith(f"hostwall: {directory / 'list.txt'}:3: services.https.allow[0] file: list.txt"), (
        message)


@pytest.mark.parametrize("text", [_unquoted(c) for c in sorted(BAD_CIDRS)] + [
    "1.2.3.4\0", "::1\0", "1.2.3.4/\0", "::/" + "1" * 5000])
def test_the_fast_list_parser_agrees_with_the_strict_one(text: str) -> None:
    """parse_interval (lists) takes shortcuts; it must refuse exactly what parse_cidr
    refuses, with the same message."""
    with pytest.raises(CidrError) as strict:
        parse_cidr(text)
    with pytest.raises(CidrError) as fast:
        parse_interval(text)
    assert str(fast.value) == str(strict.value)


@examples(300)
@given(st.text(alphabet=st.sampled_from("0123456789abcdef.:/%x \t\0\u0661f"), max_size=45))
def test_parse_interval_and_parse_cidr_agree_on_anything(text: str) -> None:
    try:
        expected = parse_cidr(text)
    except CidrError:
        with pytest.raises(CidrError):
            parse_interval(text)
    else:
        interval = parse_interval(text)
        assert (interval.family, interval.first, interval.last) == (
            expected.version, int(expected.network_address), int(expected.broadcast_address))


# --- ports ----------------------------------------------------------------------------------

BAD_PORTS = {"0": "outside 1-65535", "65536": "outside 1-65535", "-1": "outside 1-65535",
             "'https'": "neither a number nor a range", "'100-50'": "reversed", "'1-65536'": "outside 1-65535",
             "443.5": "a port is a number", "true": "a port is a number", "''": "neither a number nor a range",
             "[443]": "a port is a number", "99999999999999999999999": "outside 1-65535"}


@pytest.mark.parametrize("port", sorted(BAD_PORTS))
def test_a_bad_port_is_located(tmp_path: Path, invalid: Invalid, port: str) -> None:
    path = write(tmp_path / "policy", "a.yaml", f"services:\n  metrics:\n    ports: [{port}]\n")
    message = invalid(path.parent)
    assert message.startswith(f"hostwall: {path}:3: services.metrics.ports"), message
    assert BAD_PORTS[port] in message, message


# --- files around the policy ------------------------------------------------------------------


def test_a_bad_line_among_100k_good_ones_is_named(tmp_path: Path, invalid: Invalid) -> None:
    directory = tmp_path / "policy"
    lines = [f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}/32" for i in range(100_000)]
    lines[54_320] = "10.0.0.300/32"
    write(directory, "big.txt", "\n".join(lines) + "\n")
    write(directory, "a.yaml", GOOD.replace("cidr: 192.0.2.1/32", "file: big.txt"))
    message = invalid(directory)
    assert message.startswith(f"hostwall: {directory / 'big.txt'}:54321: "), message
    assert "10.0.0.300/32" in message


def test_a_bad_line_is_named_when_the_list_was_cached_before(tmp_path: Path, invalid: Invalid) -> None:
    """A changed list is reparsed only where it changed; a bad line there is still named exactly."""
    from hostwall.state import StateDir

    directory = tmp_path / "policy"
    lines = [f"10.1.{i >> 8 & 255}.{i & 255}/32" for i in range(5000)]
    write(directory, "big.txt", "\n".join(lines) + "\n")
    write(directory, "a.yaml", GOOD.replace("cidr: 192.0.2.1/32", "file: big.txt"))
    cache = StateDir(tmp_path / "state").list_cache()
    load_policy(directory, cache=cache)
    lines[2500] = "10.1.9.1/24"
    write(directory, "big.txt", "\n".join(lines) + "\n")
    with pytest.raises(PolicyError) as refused:
        load_policy(directory, cache=cache)
    assert str(refused.value).startswith(f"{directory / 'big.txt'}:2501: "), refused.value
    assert invalid(directory).startswith(f"hostwall: {directory / 'big.txt'}:2501: ")


def test_symlinks_out_of_the_policy_directory_are_refused(tmp_path: Path, invalid: Invalid) -> None:
    outside = write(tmp_path / "elsewhere", "site.yaml", GOOD)
    write(tmp_path / "elsewhere", "list.txt", "192.0.2.0/24\n")
    directory = tmp_path / "policy"
    directory.mkdir()
    (directory / "site.yaml").symlink_to(outside)
    message = invalid(directory)
    assert message.startswith(f"hostwall: {directory / 'site.yaml'}: "), message
    assert "outside the policy directory" in message

    (directory / "site.yaml").unlink()
    write(directory, "a.yaml", GOOD.replace("cidr: 192.0.2.1/32", "file: list.txt"))
    (directory / "list.txt").symlink_to(tmp_path / "elsewhere" / "list.txt")
    message = invalid(directory)
    assert message.startswith(f"hostwall: {directory / 'a.yaml'}:4: services.https.allow[0]"), message
    assert "outside the policy directory" in message

    (directory / "list.txt").unlink()
    write(directory, "a.yaml", GOOD.replace("cidr: 192.0.2.1/32", "file: ../elsewhere/list.txt"))
    assert "outside the policy directory" in invalid(directory)
    write(directory, "a.yaml", GOOD.replace("cidr: 192.0.2.1/32", "file: /etc/hostname"))
    assert "outside the policy directory" in invalid(directory)


def test_a_symlink_inside_the_policy_directory_is_fine(tmp_path: Path) -> None:
    directory = tmp_path / "policy"
    write(directory / "lists", "list.txt", "192.0.2.0/24\n")
    write(directory, "a.yaml", GOOD.replace("cidr: 192.0.2.1/32", "file: current.txt"))
    (directory / "current.txt").symlink_to("lists/list.txt")
    assert len(load_policy(directory).service("https").entries) == 1  # type: ignore[union-attr]
    # The policy directory itself may be a symlink (to a checkout, say): its target is the directory.
    (tmp_path / "link").symlink_to(directory)
    assert len(load_policy(tmp_path / "link").service("https").entries) == 1  # type: ignore[union-attr]


def test_special_files_never_block_the_loader(tmp_path: Path, invalid: Invalid) -> None:
    directory = tmp_path / "policy"
    write(directory, "a.yaml", GOOD.replace("cidr: 192.0.2.1/32", "file: pipe.txt"))
    os.mkfifo(directory / "pipe.txt")  # reading it would wait for a writer forever
    message = invalid(directory)
    assert "not a regular file" in message, message
    (directory / "pipe.txt").unlink()
    write(directory, "a.yaml", GOOD)
    os.mkfifo(directory / "b.yaml")
    assert "not a regular file" in invalid(directory)
    (directory / "b.yaml").unlink()
    (directory / "b.yaml").symlink_to(directory / "missing.yaml")
    assert invalid(directory).startswith(f"hostwall: {directory / 'b.yaml'}: ")


def test_a_policy_path_that_is_a_device_is_refused(invalid: Invalid) -> None:
    assert "not a regular file" in invalid(Path("/dev/zero"))


def test_an_unreadable_file_is_named(invalid: Invalid) -> None:
    with tempfile.TemporaryDirectory() as top:
        os.chmod(top, 0o755)
        directory = Path(top) / "policy"
        write(directory, "a.yaml", GOOD)
        unreadable = write(directory, "b.yaml", GOOD)
        os.chmod(directory, 0o755)
        os.chmod(unreadable, 0o000)
        # Root reads anything: the check runs with nobody's effective uid, and gets root back.
        dropped = os.geteuid() == 0
        if dropped:
            os.seteuid(65534)
        try:
            message = invalid(directory)
        finally:
            if dropped:
                os.seteuid(0)
    assert message == f"hostwall: {unreadable}: cannot read: Permission denied"


def test_expiry_times_at_the_ends_of_the_calendar(tmp_path: Path, invalid: Invalid) -> None:
    """Usable when UTC can hold them; otherwise refused, never a crash in warnings or rendering."""
    directory = tmp_path / "policy"
    expiring = GOOD.replace("2099-01-01\n", "2099-01-01\n      expires: 9999-12-31T23:59:59Z\n")
    write(directory, "a.yaml", expiring + entry("192.0.2.2/32").split("allow:\n", 1)[1].replace(
        "2099-01-01\n", "2099-01-01\n      expires: 0001-01-01T00:30:00+00:00\n"))
    loaded = load_policy(directory)
    assert len(loaded.expired) == 1 and len(loaded.warnings()) == 1
    now = datetime(2026, 1, 1, tzinfo=UTC).timestamp()
    assert "timeout" in render_full_load(compile_policy(loaded), 1, now)

    for moment in ("0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-12:00"):
        path = write(directory, "a.yaml", GOOD.replace("2099-01-01\n", f"2099-01-01\n      expires: {moment}\n"))
        message = invalid(directory)
        assert message.startswith(f"hostwall: {path}:8: services.https.allow[0].expires"), message
        assert "outside the years 1-9999" in message


# --- fuzzing ------------------------------------------------------------------------------------

SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True),
                    st.text(max_size=30), st.sampled_from(["192.0.2.0/24", "2001:db8::/48", "10.0.0.1",
                                                           "2099-01-01", "2027-01-01T00:00:00Z", "tcp", "443",
                                                           "8000-8100", "https", "drop", "list.txt"]))
KEYS = st.sampled_from(["services", "settings", "https", "postgres", "metrics", "allow", "cidr", "file", "owner",
                        "reason", "review_by", "expires", "ports", "protocols", "action", "log_group",
                        "log_rate", "log_burst", "broad_ok", "broad_reason", "widest", "ipv4", "ipv6",
                        "entry_counters", "strict_source", "owners", "x"])

def _nested(depth: int) -> st.SearchStrategy[object]:
    # Built level by level rather than with st.recursive, whose argument check hypothesis
    # sometimes trips over with these strategies (a deprecation warning, an error here).
    if depth == 0:
        return SCALARS
    inner = _nested(depth - 1)
    return st.one_of(SCALARS, st.lists(inner, max_size=4), st.dictionaries(KEYS, inner, max_size=5))


DOCUMENT_VALUES = _nested(4)


def _accepts_or_policy_error(directory: Path) -> None:
    try:
        loaded = load_policy(directory, now=PINNED_NOW)
    except PolicyError as error:
        assert str(error) and "\n" not in str(error)
        return
    render_full_load(compile_policy(loaded), 1, PINNED_NOW.timestamp())


@examples(200)
@given(document=st.dictionaries(st.sampled_from(["services", "settings"]), DOCUMENT_VALUES, max_size=2))
def test_fuzz_structured_documents_only_ever_raise_policy_error(tmp_path: Path, document: object) -> None:
    directory = tmp_path / "fuzz-structured"
    write(directory, "list.txt", "192.0.2.0/24\n")
    write(directory, "a.yaml", yaml.safe_dump(document))
    _accepts_or_policy_error(directory)


@examples(200)
@given(data=st.binary(max_size=400) | st.text(max_size=200).map(str.encode))
def test_fuzz_random_bytes_only_ever_raise_policy_error(tmp_path: Path, data: bytes) -> None:
    directory = tmp_path / "fuzz-bytes"
    write(directory, "a.yaml", data)
    _accepts_or_policy_error(directory)


TEMPLATE = (GOOD + "  metrics:\n    ports: [9100, '9200-9300']\n    protocols: [tcp, udp]\n    action: reject\n"
            "    allow:\n    - file: list.txt\n" + META.replace("    ", "      ")
            + f"      expires: {PINNED_NOW + timedelta(days=200):%Y-%m-%dT%H:%M:%SZ}\n"
            + "settings:\n  log_group: 5\n")


def test_the_mutation_template_keeps_an_expiring_entry_in_play(tmp_path: Path) -> None:
    """The fuzzer below starts from TEMPLATE: unmutated, its list must load as an expiring
    set, or the fuzzing no longer covers expiry and nothing would say so."""
    write(tmp_path, "list.txt", "192.0.2.0/24\n")
    write(tmp_path, "a.yaml", TEMPLATE)
    ruleset = compile_policy(load_policy(tmp_path, now=PINNED_NOW))
    assert "timeout" in render_full_load(ruleset, 1, PINNED_NOW.timestamp())


@examples(300)
@given(cuts=st.lists(st.tuples(st.integers(0, len(TEMPLATE)), st.integers(0, 6), st.text(max_size=4)), max_size=4),
       list_text=st.text(alphabet="0123456789abcdef.:/# \n\r\t", max_size=60))
def test_fuzz_mutated_policies_only_ever_raise_policy_error(
    tmp_path: Path, cuts: list[tuple[int, int, str]], list_text: str
) -> None:
    text = TEMPLATE
    for at, length, insert in cuts:
        text = text[:at] + insert + text[at + length:]
    directory = tmp_path / "fuzz-mutated"
    write(directory, "list.txt", list_text)
    write(directory, "a.yaml", text)
    _accepts_or_policy_error(directory)


# --- what a generation records ------------------------------------------------------------------


def test_a_generation_records_the_text_that_was_parsed_not_a_later_edit(tmp_path: Path) -> None:
    """An editor may replace or delete a policy file between loading and recording."""
    from hostwall.engine import Engine
    from hostwall.fake import FakeBackend
    from hostwall.state import StateDir

    directory = tmp_path / "policy"
    write(directory, "list.txt", "192.0.2.0/25\n")
    parsed = write(directory, "a.yaml", GOOD.replace("cidr: 192.0.2.1/32", "file: list.txt"))
    original = parsed.read_bytes()
    loaded = load_policy(directory)
    write(directory, "a.yaml", GOOD.replace("192.0.2.1/32", "198.51.100.1/32"))
    (directory / "list.txt").unlink()

    state = StateDir(tmp_path / "state")
    result = Engine(FakeBackend(), state).apply(loaded, user="t", message="race")
    assert result.generation is not None
    recorded = state.generation(result.generation).path / "policy"
    assert (recorded / "a.yaml").read_bytes() == original
    assert (recorded / "list.txt").read_bytes() == b"192.0.2.0/25\n"
