"""The only place key strings are built: namespace prefix plus the account's hash tag."""

from dataclasses import dataclass


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
        return f"{self.namespace}:user:{{{account}}}"

    def in_flight(self, account: int) -> str:
        return f"{self.namespace}:inflight:{{{account}}}"

    def account(self, account: int) -> list[str]:
        """KEYS of every account script, in the order `lua/_lib.lua` names them."""
        tag = f"{{{account}}}"
        ns = self.namespace
        return [
            f"{ns}:user:{tag}",
            f"{ns}:inflight:{tag}",
            f"{ns}:lock:{tag}",
            f"{ns}:fence:{tag}",
            f"{ns}:attempt:{tag}",
            f"{ns}:seq:{tag}",
            self.ready,
            self.stats,
            self.active,
            self.dead,
            self.totals(account),
        ]

    def totals(self, account: int) -> str:
        """The hash of an account's settled counts: acked, dead, last_acked_seq."""
        return f"{self.namespace}:totals:{{{account}}}"

    def push_prefixes(self) -> list[str]:
        """What push.lua completes with an account's tag: the pending list, lock and seq keys,
        and (with `:<time bucket>` after the tag) the hash of event ids accepted per bucket."""
        return [f"{self.namespace}:{kind}:" for kind in ("user", "lock", "seq", "dedupe")]
