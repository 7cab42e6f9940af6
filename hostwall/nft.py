"""The kernel adapter: full loads and listings through libnftables (the only importer of
the nftables binding) where nftload does not encode them; snapshots, element reads and
deltas through nftnl's netlink."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from msgspec.structs import replace

from hostwall import netns
from hostwall.errors import (
    HostwallError,
    KernelRejected,
    KernelUnavailable,
    PermissionDenied,
    TableNotFound,
)
from hostwall.kernel import Counter, KernelTable
from hostwall.nftelements import decode_contents, decode_counters
from hostwall.nftload import Message, encodable, full_load_messages
from hostwall.nftnl import NetlinkTable
from hostwall.ruleset import (
    Delta,
    Ruleset,
    TableObjects,
    render_clearing,
    render_full_load,
    render_replacement,
)


def _classify(message: str) -> HostwallError:
    text = message.strip().splitlines()[0] if message.strip() else "libnftables failed"
    lowered = message.lower()
    if "operation not permitted" in lowered:
        return PermissionDenied(f"the kernel refused: {text} (needs CAP_NET_ADMIN; run as root)")
    if "no such file or directory" in lowered and "table" in lowered:
        return TableNotFound(text)
    if "protocol not supported" in lowered or "not supported" in lowered:
        return KernelUnavailable(f"nf_tables is not available: {text}")
    return KernelRejected(f"the kernel rejected the transaction: {' '.join(message.split())[:500]}")


class NftBackend:
    def __init__(self, netns_name: str | None = None) -> None:
        self._netns = netns_name
        self._context: Any = None
        self._netlink = NetlinkTable(netns_name)

    def _nft(self) -> Any:
        """The libnftables context, created on first use: an element delta never needs it."""
        if self._context is None:
            # Imported here: an element delta or a netlink full load never needs it.
            try:
                import nftables
            except ImportError as exc:
                raise KernelUnavailable(
                    "the nftables Python binding is missing (pip install pip-nftables)"
                ) from exc
            # Its netlink socket belongs to the namespace it is created in.
            with netns.entered(self._netns):
                try:
                    context = nftables.Nftables()
                except OSError as exc:
                    raise KernelUnavailable(
                        f"libnftables cannot be loaded ({exc}); install libnftables1"
                    ) from exc
            context.set_handle_output(False)
            context.set_stateless_output(False)
            self._context = context
        return self._context

    def close(self) -> None:
        """Release the netlink sockets; a long-lived process (agent, tests) must call it."""
        self._netlink.close()

    def _run(self, command: str) -> str:
        context = self._nft()
        with netns.entered(self._netns):
            rc, output, error = context.cmd(command)
        if rc != 0:
            raise _classify(error or output)
        return str(output)

    def submit(self, transaction: str) -> None:
        """A full load: the table's contents are replaced in place (render_clearing says
        why), in one transaction with the text rendered for the generation."""
        if transaction.startswith(render_replacement()):
            self._run(transaction)  # removal, or a text that replaces the table by itself
            return
        snapshot = self._netlink.snapshot()
        existing = snapshot.objects if snapshot is not None else TableObjects()
        try:
            self._run(render_clearing(existing) + transaction)
        except KernelRejected as in_place:
            # The base chain was changed by hand (its hook or priority), or the table changed
            # between reading it and the commit: re-create the table in one transaction.
            try:
                self._run(render_replacement() + transaction)
            except KernelRejected as replaced:
                raise replaced from in_place

    def load(self, ruleset: Ruleset, generation: int, now: float,
             before_commit: Callable[[], None] = lambda: None) -> None:
        """A full load of ruleset as generation: the same transaction as submit() of
        render_full_load(), built as netlink messages without libnftables (nftload says
        why), or through libnftables for what nftload does not encode and whenever the
        kernel refuses the in-place replacement. before_commit runs once, before anything
        is sent."""
        if not encodable(ruleset):
            transaction = render_full_load(ruleset, generation, now)
            before_commit()
            self.submit(transaction)
            return
        snapshot = self._netlink.snapshot()
        existing = snapshot.objects if snapshot is not None else TableObjects()
        messages = full_load_messages(ruleset, generation, now, existing)
        before_commit()
        try:
            self._submit_messages(messages)
        except KernelRejected as in_place:
            # As in submit(): the base chain was changed by hand, or the table changed between
            # reading it and the commit.
            try:
                self.submit(render_replacement() + render_full_load(ruleset, generation, now))
            except KernelRejected as replaced:
                raise replaced from in_place

    def _submit_messages(self, messages: list[Message]) -> None:
        self._netlink.submit_messages([(m.kind, m.flags, m.payload) for m in messages])

    def apply_delta(self, delta: Delta, now: float) -> None:
        self._netlink.apply_delta(delta, now)

    def counters(self) -> dict[str, Counter]:
        """The table's named counters, without reading any set element."""
        contents = self._netlink.contents(elements=False)
        return decode_counters(contents) if contents is not None else {}

    def read_table(self, *, elements: bool) -> KernelTable | None:
        snapshot = self._netlink.snapshot()
        if snapshot is None:
            return None
        table = KernelTable(snapshot.comment, snapshot.structure, marker=snapshot.generation)
        if not elements:
            return table
        contents = self._netlink.contents()
        if contents is None:
            return None
        decoded = decode_contents(contents)
        return replace(table, counters=decoded.counters, sets=dict(decoded.sets),
                       element_packets=decoded.element_packets)

    def list_ruleset(self) -> str:
        """Every table of the namespace in nft's own syntax, as `nft list ruleset` prints
        it: what verify loads into its replica. Read-only."""
        return self._run("list ruleset")

    def load_text(self, text: str) -> None:
        """Run text as one transaction (verify's replica only: hostwall's own table is
        always loaded through submit)."""
        self._run(text)

