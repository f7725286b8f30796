"""`python -m stack.receiver`: a local webhook receiver for the delivery tests, the benchmark
and a demo of `HANDLER=app.handlers:http`.

It does what docs/delivery.md asks of a receiver: it verifies the Standard Webhooks signature
when given the secret (401 when it does not verify) and keeps the highest fencing token seen
per account, refusing a delivery with a lower one (409: a stale owner's). Every request is
recorded as one JSON line (account, seq, event id, attempt, token, the webhook headers, the
raw body, what it answered), so a test can check order and signatures from the receiver's own
record. `POST /control` with a JSON rule makes it misbehave on purpose:

    {"status": 500, "seconds": 3}              answer 500 for the next 3 s
    {"status": 429, "retry_after": 2, "times": 1}
    {"status": 410, "account": 7}              for account 7 only
    {"hang": 60, "status": 503, "times": 1}    hold one request 60 s, then answer 503
    {"delay": 0.1}                             take 0.1 s per request (replaces the last delay)
    {"clear": true}                            forget every rule

`GET /record` answers how many requests it recorded and their statuses.
"""

import argparse
import asyncio
import hmac
import json
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import httpx
import uvicorn

from app.handlers.delivery import sign
from app.settings import webhook_key
from stack.servers import answers, free_port, wait_for

Scope = dict[str, Any]
Receive = Any
Send = Any


@dataclass
class Rule:
    """A way to answer: a status (with Retry-After), or a hang, for some time, some requests or
    one account."""

    status: int = 200
    retry_after: float | None = None
    hang_s: float = 0.0
    account: int | None = None
    until: float = float("inf")  # monotonic
    times: int | None = None

    def applies(self, account: int | None) -> bool:
        live = time.monotonic() < self.until and (self.times is None or self.times > 0)
        return live and (self.account is None or self.account == account)


@dataclass
class Receiver:
    """The receiver's state: its record file, the secrets, the tokens seen, the rules."""

    record: BinaryIO
    secrets: list[bytes]
    delay_s: float = 0.0
    rules: list[Rule] = field(default_factory=list)
    tokens: dict[int, int] = field(default_factory=dict)
    answered: Counter[int] = field(default_factory=Counter)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        body = await _body(receive)
        if scope["path"] == "/control":
            await _answer(send, 200, self.control(json.loads(body)))
            return
        if scope["path"] == "/record":
            counts = {str(k): v for k, v in self.answered.items()}
            await _answer(send, 200, json.dumps({"statuses": counts}).encode())
            return
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        status, retry_after, hang_s = self.judge(headers, body)
        if hang_s:
            await asyncio.sleep(hang_s)
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        self.write(headers, body, status)
        extra = [(b"retry-after", b"%g" % retry_after)] if retry_after is not None else []
        await _answer(send, status, b"ok" if status < 300 else b"refused", extra)

    def judge(self, headers: dict[str, str], body: bytes) -> tuple[int, float | None, float]:
        """What to answer: a rule's status, 401 for a bad signature, 409 for a stale token."""
        account = _int(headers.get("evq-account"))
        for rule in self.rules:
            if rule.applies(account):
                if rule.times is not None:
                    rule.times -= 1
                return rule.status, rule.retry_after, rule.hang_s
        if self.secrets and not verifies(self.secrets, headers, body):
            return 401, None, 0.0
        token = _int(headers.get("evq-token"))
        if account is not None and token is not None:
            if token < self.tokens.get(account, 0):
                return 409, None, 0.0
            self.tokens[account] = token
        return 200, None, 0.0

    def write(self, headers: dict[str, str], body: bytes, status: int) -> None:
        self.answered[status] += 1
        line = {
            "at_ns": time.time_ns(),
            "status": status,
            "account": _int(headers.get("evq-account")),
            "seq": _int(headers.get("evq-seq")),
            "attempt": _int(headers.get("evq-attempt")),
            "token": _int(headers.get("evq-token")),
            "headers": {k: v for k, v in headers.items() if k.startswith("webhook-")},
            "body": body.decode(),
        }
        self.record.write(json.dumps(line).encode() + b"\n")
        self.record.flush()

    def control(self, rule: dict[str, Any]) -> bytes:
        if rule.get("clear"):
            self.rules.clear()
            self.delay_s = 0.0
        elif "delay" in rule:
            self.delay_s = float(rule["delay"])
        else:
            seconds = rule.get("seconds")
            self.rules.append(
                Rule(
                    status=int(rule.get("status", 200)),
                    retry_after=rule.get("retry_after"),
                    hang_s=float(rule.get("hang", 0)),
                    account=rule.get("account"),
                    until=time.monotonic() + seconds if seconds else float("inf"),
                    times=rule.get("times"),
                )
            )
        return b"ok"


def verifies(keys: list[bytes], headers: dict[str, str], body: bytes) -> bool:
    """Whether one of the `v1,` signatures is what evq's own `sign` makes with one of the
    keys (the tests check evq's signatures against an independent implementation)."""
    message_id, timestamp = headers.get("webhook-id", ""), headers.get("webhook-timestamp", "")
    given = headers.get("webhook-signature", "").split()
    return any(
        hmac.compare_digest(sign([key], message_id, timestamp, body), signature)
        for key in keys
        for signature in given
    )


def _int(text: str | None) -> int | None:
    return int(text) if text and text.lstrip("-").isdigit() else None


async def _body(receive: Receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(chunks)


async def _answer(
    send: Send, status: int, body: bytes, extra: list[tuple[bytes, bytes]] | None = None
) -> None:
    headers = [(b"content-type", b"text/plain"), *(extra or [])]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


@dataclass
class ReceiverProcess:
    """`python -m stack.receiver` as a real process on `port`, recording into `record`."""

    record: Path
    port: int = field(default_factory=free_port)
    secrets: list[str] = field(default_factory=list)
    delay_s: float = 0.0
    proc: "subprocess.Popen[bytes] | None" = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "ReceiverProcess":
        args = [sys.executable, "-m", "stack.receiver", "--port", str(self.port)]
        args += ["--record", str(self.record), "--delay", str(self.delay_s)]
        for secret in self.secrets:
            args += ["--secret", secret]
        self.proc = subprocess.Popen(args, cwd=Path(__file__).parent.parent)
        wait_for(lambda: answers(f"{self.url}/record"), 20, "the receiver to answer")
        return self

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)

    def control(self, **rule: object) -> None:
        """Add a rule (see the module's doc)."""
        httpx.post(f"{self.url}/control", json=rule, timeout=5).raise_for_status()

    def lines(self) -> list[dict[str, Any]]:
        """Every request recorded so far, in the order answered."""
        if not self.record.exists():
            return []
        return [json.loads(line) for line in self.record.read_bytes().splitlines() if line]


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m stack.receiver", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1", help="0.0.0.0 for a container")
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument("--record", type=Path, default=Path("var/receiver.jsonl"))
    parser.add_argument("--delay", type=float, default=0.0, help="seconds per request")
    parser.add_argument("--secret", action="append", default=[], help="whsec_... (repeatable)")
    args = parser.parse_args()
    args.record.parent.mkdir(parents=True, exist_ok=True)
    with args.record.open("ab") as record:
        receiver = Receiver(record, [webhook_key(s) for s in args.secret], args.delay)
        uvicorn.run(
            receiver,
            host=args.host,
            port=args.port,
            log_level="warning",
            access_log=False,
            backlog=4096,
            timeout_keep_alive=60,
        )


if __name__ == "__main__":
    main()
