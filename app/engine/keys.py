"""The only place key strings are built: accounts spread over shards, one hash tag per shard.

An account's shard is crc32 of its decimal id mod S, the same in every process. Every key of a
shard, its accounts' keys included, carries the tag ``{<namespace>:<shard>}``, so each script
and each MULTI touches one Redis Cluster hash slot, and one Redis runs the same code.
"""

import zlib
from dataclasses import dataclass

from redis.crc import key_slot

# The per-account keys of `Keys.account`, in order, before the shard's own.
ACCOUNT_KINDS = ("user", "lock", "totals", "seq")


@dataclass(frozen=True, slots=True)
class Keys:
    """Key names of one namespace split over `shards` shards."""

    namespace: str
    shards: int = 1

    def shard_of(self, account: int) -> int:
        return zlib.crc32(b"%d" % account) % self.shards

    def hash_slot(self, shard: int) -> int:
        """The Redis Cluster hash slot of every key of `shard`."""
        return key_slot(self.tag(shard).encode())

    def tag(self, shard: int) -> str:
        return f"{{{self.namespace}:{shard}}}"

    def ready(self, shard: int) -> str:
        return f"{self.tag(shard)}:ready"

    def stats(self, shard: int) -> str:
        return f"{self.tag(shard)}:stats"

    def active(self, shard: int) -> str:
        return f"{self.tag(shard)}:active"

    def dead(self, shard: int) -> str:
        """The shard's dead letters: a hash of `<account>:<event_id>` -> the entry (JSON), so
        one is found, replayed or purged by its id whatever their number."""
        return f"{self.tag(shard)}:dead:entries"

    def dead_order(self, shard: int) -> str:
        """The same ids scored by when they died (the shard's dead count then): oldest first."""
        return f"{self.tag(shard)}:dead:order"

    def legacy_dead(self, shard: int) -> str:
        """The list the dead letters were kept in before they had ids; read once to move them."""
        return f"{self.tag(shard)}:dead"

    def paused(self, shard: int) -> str:
        """The hash of the shard's paused accounts: account -> 'operator' or 'parked'."""
        return f"{self.tag(shard)}:paused"

    @property
    def layout(self) -> str:
        """Where the number of shards of the namespace is recorded."""
        return f"{self.namespace}:shards"

    @property
    def reaper(self) -> str:
        return f"{self.namespace}:reaper"

    @property
    def consumers(self) -> str:
        """The consumers' heartbeats: `host:pid:slots` scored by the time of the last one.
        It, `busy` and `metrics` share a hash tag, so one pipeline writes all three."""
        return f"{{{self.namespace}}}:consumers"

    @property
    def busy(self) -> str:
        """The hash of each consumer's busy slots, `host:pid` -> count."""
        return f"{{{self.namespace}}}:busy"

    @property
    def metrics(self) -> str:
        """The hash the consumers fold their measurements into (`registry.FIELDS` names them)."""
        return f"{{{self.namespace}}}:metrics"

    @property
    def wake_channel(self) -> str:
        """Pub/sub channel on which a shard's ready index announces that it is no longer empty."""
        return f"{self.namespace}:wake"

    def pending(self, account: int) -> str:
        return self._account_key("user", account)

    def legacy_in_flight(self, account: int) -> str:
        """The list a batch in flight moved to in versions before it stayed at the head of the
        pending list; moved back to the head once (`upgrade.move_attempts`)."""
        return self._account_key("inflight", account)

    def lock(self, account: int) -> str:
        return self._account_key("lock", account)

    def legacy_fence(self, account: int) -> str:
        """The fencing counter that versions before the state hash kept apart; moved into the
        state hash once (`upgrade.move_attempts`)."""
        return self._account_key("fence", account)

    def legacy_attempt(self, account: int) -> str:
        """The hash of the head's attempts that versions before the state hash kept apart;
        moved into the state hash once (`upgrade.move_attempts`)."""
        return self._account_key("attempt", account)

    def seq(self, account: int) -> str:
        return self._account_key("seq", account)

    def state(self, account: int) -> str:
        """The account's state hash (lua/_lib.lua names its fields): the batch in flight and
        its attempts, the settled counts, the records of recent calls. The key kind keeps the
        name of the totals hash it grew from."""
        return self._account_key("totals", account)

    def ids(self, shard: int, bucket: int) -> str:
        """The hash of the event ids a shard accepted within one time bucket
        (`<account>:<event_id>` -> seq)."""
        return f"{self.tag(shard)}:ids:{bucket}"

    def legacy_ids(self, account: int, bucket: int) -> str:
        """The same for one account, as versions before the shard's hash kept them: read
        until they have expired (`Guard.check_layout` knows until when)."""
        return f"{self._account_key('dedupe', account)}:{bucket}"

    @property
    def state_since(self) -> str:
        """When (unix ms) the attempt hashes, fences and in-flight lists of older versions were
        moved into the state hashes and the pending lists (`upgrade.move_attempts`); absent
        until they have been. The name is new with the in-flight lists' move, so a namespace
        that had the state hash's move scans once more."""
        return f"{self.layout}:head_since"

    @property
    def ids_since(self) -> str:
        """When (unix ms) the shards' ids hashes took over from the per-account ones, or
        'new' for a namespace that never had the per-account ones."""
        return f"{self.layout}:ids_since"

    def account(self, account: int) -> list[str]:
        """KEYS of every account script, in the order `lua/_lib.lua` names them."""
        shard = self.shard_of(account)
        own = [self._account_key(kind, account) for kind in ACCOUNT_KINDS]
        return [*own, *self.shard_keys(shard), self.paused(shard), self.dead_order(shard)]

    def shard_keys(self, shard: int) -> list[str]:
        """The shard's own keys: ready index, counters, active set, dead letters (entries)."""
        return [self.ready(shard), self.stats(shard), self.active(shard), self.dead(shard)]

    def _account_key(self, kind: str, account: int) -> str:
        return f"{self.tag(self.shard_of(account))}:{kind}:{account}"
