"""`python -m stack COMMAND`: the Makefile's stack targets. Settings come from the
environment: VAR, REDIS_PORT, CLUSTER, CLUSTER_PORT, CLUSTER_NODE_TIMEOUT, NUMPROCS, API_PORT,
and every evq setting for the consumers and gen."""

import argparse
import dataclasses
import os

from stack import cluster, local

COMMANDS = {
    "up": "start Redis (or use the cluster with CLUSTER=1) and the supervised consumers and API",
    "down": "stop the consumers (they finish their current events), the API and our Redis",
    "ps": "what runs, and the queue's counters",
    "demo": "up, then 10,000 events for 1,000 accounts, the drain and the report",
    "cluster-up": "start the local Redis Cluster (3 masters, 3 replicas)",
    "cluster-down": "stop a stack running on the cluster, then the cluster's nodes",
}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m stack", description=__doc__)
    parser.add_argument(
        "command", choices=COMMANDS, help="; ".join(f"{k}: {v}" for k, v in COMMANDS.items())
    )
    command = parser.parse_args().command
    stack = local.Stack.from_env()
    if command == "cluster-up":
        timeout_ms = int(os.environ.get("CLUSTER_NODE_TIMEOUT", cluster.NODE_TIMEOUT_MS))
        cluster.up(stack.var, stack.cluster_port, timeout_ms)
    elif command == "cluster-down":
        if local.on_cluster(stack):
            local.down(dataclasses.replace(stack, cluster=True))
        cluster.down(stack.var, stack.cluster_port)
    else:
        {"up": local.up, "down": local.down, "ps": local.ps, "demo": local.demo}[command](stack)


main()
