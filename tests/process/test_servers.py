"""The harness's own redis-server: a test only ever talks to the server it started."""

from pathlib import Path

import pytest

from stack.servers import RedisServer, free_block, running, serving_pid


def test_a_server_whose_port_was_taken_moves_to_another(tmp_path: Path) -> None:
    """Two test workers may be handed the same free port; the one that loses the bind starts
    on another port instead of answering with the winner's server (and flushing its data)."""
    with running(RedisServer(tmp_path / "first")) as first:
        second = RedisServer(tmp_path / "second")
        second.port = first.port
        with running(second):
            assert second.port != first.port
            assert second.process is not None and first.process is not None
            assert serving_pid(second.port) == second.process.pid
            assert serving_pid(first.port) == first.process.pid


def test_a_restart_keeps_its_port_or_fails(tmp_path: Path) -> None:
    """A restart must come back where its clients look; if another server took the port in
    between, it says so instead of moving."""
    server = RedisServer(tmp_path / "restarted")
    with running(server):
        port = server.port
        server.stop()
        squatter = RedisServer(tmp_path / "squatter")
        squatter.port = port
        with running(squatter):
            assert squatter.port == port
            with pytest.raises(RuntimeError, match=f"port {port} did not start"):
                server.start()


def test_a_cluster_port_block_is_handed_out_once() -> None:
    """Two looks for a free block of cluster ports, as two test workers make them at once, get
    two blocks: the first stays reserved while its cluster starts."""
    assert free_block() != free_block()
