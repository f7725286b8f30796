"""The only place key strings are built: namespace prefix plus the account's hash tag."""

from dataclasses import dataclass

# The per-account keys of `Keys.account`, in order, before the shared ones.
ACCOUNT_KINDS = ("user", "inflight", "lock", "fence", "attempt", "seq")


@dataclass(frozen=True, slots=True)
class Keys:
    """Key names of one namespace; per-account keys share the tag ``{<account>}``."""

    namespace: str

    @property
    def ready(self) -> str:
        return f"{self.namespace}:ready"

    @property
    def stats(self) -> str:
        return f"{self.namespace}:stats"

    @property
    def active(self) -> str:
        return f"{self.namespace}:active"

    @property
    def dead(self) -> str:
        return f"{self.namespace}:dead"

    @property
    def reaper(self) -> str:
        return f"{self.namespace}:reaper"

    @property
    def consumers(self) -> str:
        return f"{self.namespace}:consumers"

    def pending(self, account: int) -> str:
        return self._tagged("user", account)

    def in_flight(self, account: int) -> str:
        return self._tagged("inflight", account)

    def account(self, account: int) -> list[str]:
        """KEYS of every account script, in the order `lua/_lib.lua` names them."""
        tagged = [self._tagged(kind, account) for kind in ACCOUNT_KINDS]
        return [*tagged, self.ready, self.stats, self.active, self.dead, self.totals(account)]

    def totals(self, account: int) -> str:
        """The hash of an account's settled counts: acked, dead, last_acked_seq."""
        return self._tagged("totals", account)

    def push_prefixes(self) -> list[str]:
        """What push.lua completes with an account's tag: the pending list, lock and seq keys,
        and (with `:<time bucket>` after the tag) the hash of event ids accepted per bucket."""
        return [self._prefix(kind) for kind in ("user", "lock", "seq", "dedupe")]

    def _prefix(self, kind: str) -> str:
        return f"{self.namespace}:{kind}:"

    def _tagged(self, kind: str, account: int) -> str:
        return f"{self._prefix(kind)}{{{account}}}"
