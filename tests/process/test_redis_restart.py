"""I2 across a Redis restart with AOF on: consumers ride it out and nothing is lost."""

from pathlib import Path

from stack.servers import RedisServer, wait_for
from tests.process.helpers import counter, graceful_stop, push_workload, wait_settled
from tests.support import Consumers, assert_all_acked_once_in_order


def test_redis_restart_with_aof_loses_nothing(tmp_path: Path) -> None:
    """Events queued before a Redis restart are all acked once, in order, after it."""
    server = RedisServer(tmp_path / "redis", appendonly=True)
    server.start()
    group = Consumers(server.url, tmp_path / "event.log")
    try:
        push_workload(server.url, 300, 30, seed=7)
        group.start(concurrency=10, process_seconds=0.02, lease_seconds=1)
        wait_for(lambda: counter(server.url, "acked") >= 30, 30, "work before the restart")
        server.stop()
        server.start()
        assert counter(server.url, "accepted") == 300
        wait_settled(server.url, 300, timeout=60)
        graceful_stop(group.procs)
        assert_all_acked_once_in_order(group.event_log, 300)
    finally:
        group.stop_all()
        server.stop()
