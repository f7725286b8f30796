"""The local Redis Cluster: make cluster-up forms 3 masters + 3 replicas, cluster-down stops
them, and cluster-up again brings them back from their own state, data included."""

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis as sync_redis
from redis.cluster import RedisCluster

from stack import REPO
from stack.servers import free_block


def make(target: str, var: Path, base: int) -> str:
    """Run a cluster target of the Makefile on VAR and CLUSTER_PORT, as a user would; its
    output."""
    done = subprocess.run(
        ["make", "-s", "-C", str(REPO), target, f"VAR={var}", f"CLUSTER_PORT={base}"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[tuple[Path, int]]:
    """A base port and VAR for the cluster; every node is stopped at the end."""
    base = free_block()
    yield tmp_path, base
    make("cluster-down", tmp_path, base)


def roles(base: int) -> list[str]:
    """'master' or 'slave' per node, as the first node sees them."""
    client = sync_redis.Redis(port=base)
    nodes = client.execute_command("CLUSTER NODES")  # type: ignore[no-untyped-call]
    client.close()
    return sorted("master" if "master" in n["flags"] else "slave" for n in nodes.values())


def test_cluster_up_down_up_keeps_its_data(cluster: tuple[Path, int]) -> None:
    """Three masters share all 16,384 slots with a replica each; data survives a restart."""
    var, base = cluster
    assert "3 masters + 3 replicas" in make("cluster-up", var, base)
    assert roles(base) == ["master"] * 3 + ["slave"] * 3
    client = RedisCluster(host="127.0.0.1", port=base)
    assert int(client.cluster_info()["cluster_slots_ok"]) == 16_384
    client.mset_nonatomic({f"key{i}": i for i in range(100)})
    client.close()
    assert "cluster: stopped" in make("cluster-down", var, base)
    with pytest.raises(sync_redis.ConnectionError):
        sync_redis.Redis(port=base).ping()
    make("cluster-up", var, base)
    client = RedisCluster(host="127.0.0.1", port=base)
    assert client.mget_nonatomic([f"key{i}" for i in range(100)]) == [
        str(i).encode() for i in range(100)
    ]
    client.close()
