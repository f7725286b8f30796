"""What every peer's job does, with the standard library only (it runs in the peer's venv).

A job of the bench workload is (account, seq). It records when it started and finished as one
JSON line appended to $PEER_RECORDS (O_APPEND: lines from many processes never interleave),
after sleeping $PEER_SLEEP seconds (0: a no-op job). The harness reads the lines back and counts
order violations with evq's own report code.
"""

import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

SLEEP_S = float(os.environ.get("PEER_SLEEP", "0"))
RECORDS = os.environ.get("PEER_RECORDS", "records.jsonl")
REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")


def started() -> int:
    return time.time_ns()


def job(account: int, seq: int) -> None:
    """The job itself, for the peers that run plain functions."""
    began = started()
    if SLEEP_S:
        time.sleep(SLEEP_S)
    finish(account, seq, began)


def finish(account: int, seq: int, started_ns: int) -> None:
    """Append the job's record once its work is done."""
    line = {"account": account, "seq": seq, "started_ns": started_ns, "pid": os.getpid()}
    line["finished_ns"] = time.time_ns()
    fd = os.open(RECORDS, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json.dumps(line) + "\n").encode())
    finally:
        os.close(fd)


def jobs() -> Iterator[tuple[int, int]]:
    """(account, seq) in push order, from the workload file `enqueue` names."""
    if len(sys.argv) != 3 or sys.argv[1] != "enqueue":
        sys.exit(f"usage: {sys.argv[0]} enqueue WORKLOAD.json")
    seqs: dict[int, int] = {}
    for account in json.loads(Path(sys.argv[2]).read_text()):
        seqs[account] = seqs.get(account, 0) + 1
        yield account, seqs[account]
