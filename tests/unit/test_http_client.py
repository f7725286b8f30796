"""The delivery's HTTP client against a real local server that answers as each test scripts it
(raw bytes on a socket): answers of every framing, keep-alive and its limits, and each way a
request can fail."""

import asyncio
import base64
import shutil
import ssl
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import pytest

from app.handlers.http_client import Broken, Client, Unreachable
from stack.servers import free_port

Answerer = Callable[[bytes, int], Awaitable[bytes | None]]  # request, its number -> bytes to send


class Server:
    """Reads each request whole, then writes what `answer` gives (None: close unanswered)."""

    def __init__(self, answer: Answerer, close_after: bool = False) -> None:
        self.answer, self.close_after = answer, close_after
        self.requests: list[bytes] = []
        self.connections = 0
        self.open_at_once = self.most_at_once = 0

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.open_at_once += 1
        self.most_at_once = max(self.most_at_once, self.open_at_once)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError:
                    return
                length = next(
                    int(line.split(b":")[1])
                    for line in head.lower().split(b"\r\n")
                    if line.startswith(b"content-length:")
                )
                request = head + await reader.readexactly(length)
                self.requests.append(request)
                answer = await self.answer(request, len(self.requests))
                if answer is None:
                    return
                writer.write(answer)
                await writer.drain()
                if self.close_after:
                    return
        finally:
            self.open_at_once -= 1
            writer.close()


@asynccontextmanager
async def serving(answer: Answerer, close_after: bool = False) -> AsyncIterator[tuple[Server, str]]:
    server = Server(answer, close_after)
    port = free_port()
    listening = await asyncio.start_server(server.serve, "127.0.0.1", port)
    try:
        yield server, f"http://127.0.0.1:{port}/hooks/7?x=1"
    finally:
        listening.close()
        await listening.wait_closed()


def constant(answer: bytes | None) -> Answerer:
    async def answering(_: bytes, __: int) -> bytes | None:
        return answer

    return answering


OK = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"


@pytest.fixture
async def client() -> AsyncIterator[Client]:
    made = Client(connections=4, timeout_s=2, keep_bytes=16)
    yield made
    made.close()


async def test_the_request_carries_the_target_the_host_the_headers_and_the_body(
    client: Client,
) -> None:
    async with serving(constant(OK)) as (server, url):
        answer = await client.post(url, {"webhook-id": "e1"}, b'{"a": 1}')
    assert (answer.status, answer.head, answer.retry_after) == (200, b"ok", None)
    head, _, body = server.requests[0].partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"POST /hooks/7?x=1 HTTP/1.1"
    assert {b"host: " + url.split("/")[2].encode(), b"webhook-id: e1", b"content-length: 8"} <= set(
        lines
    )
    assert body == b'{"a": 1}'


async def test_credentials_in_the_url_become_basic_authorization(client: Client) -> None:
    async with serving(constant(OK)) as (server, url):
        await client.post(url.replace("http://", "http://hook%40x:s3cret@"), {}, b"")
    expected = base64.b64encode(b"hook@x:s3cret")
    assert b"authorization: Basic " + expected + b"\r\n" in server.requests[0]
    assert b"s3cret@" not in server.requests[0]


async def test_a_chunked_answer_after_an_interim_one_is_read_and_the_connection_kept(
    client: Client,
) -> None:
    chunked = (
        b"HTTP/1.1 100 Continue\r\n\r\n"
        b"HTTP/1.1 503 Busy\r\nretry-after: 3\r\ntransfer-encoding: chunked\r\n\r\n"
        b"5\r\nbusy \r\n19\r\nthe rest is cut at 16 b\r\n\r\n0\r\n\r\n"
    )
    async with serving(constant(chunked)) as (server, url):
        first = await client.post(url, {}, b"1")
        second = await client.post(url, {}, b"2")
    assert first == second
    assert (first.status, first.head, first.retry_after) == (503, b"busy the rest is", "3")
    assert server.connections == 1


async def test_a_connection_the_server_closes_is_not_reused(client: Client) -> None:
    closing = b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 0\r\n\r\n"
    async with serving(constant(closing), close_after=True) as (server, url):
        for _ in range(3):
            assert (await client.post(url, {}, b"")).status == 200
    assert server.connections == 3


async def test_a_connection_idle_for_longer_than_keep_idle_s_is_closed_not_reused() -> None:
    client = Client(connections=4, timeout_s=2, keep_bytes=16, keep_idle_s=0.1)
    async with serving(constant(OK)) as (server, url):
        await client.post(url, {}, b"")
        await client.post(url, {}, b"")
        await asyncio.sleep(0.2)
        await client.post(url, {}, b"")
    client.close()
    assert server.connections == 2


async def test_an_answer_without_a_length_runs_until_the_connection_closes(
    client: Client,
) -> None:
    async with serving(constant(b"HTTP/1.0 202 OK\r\n\r\naccepted"), close_after=True) as (
        server,
        url,
    ):
        answer = await client.post(url, {}, b"")
        again = await client.post(url, {}, b"")
    assert (answer.status, answer.head) == (again.status, again.head) == (202, b"accepted")
    assert server.connections == 2


async def test_an_idle_connection_closed_by_the_server_is_replaced_once(client: Client) -> None:
    async def first_then_closed(_: bytes, number: int) -> bytes | None:
        return OK if number != 2 else None  # the 2nd request finds its connection closing

    async with serving(first_then_closed) as (server, url):
        assert (await client.post(url, {}, b"")).status == 200
        assert (await client.post(url, {}, b"")).status == 200
    assert server.connections == 2
    assert len(server.requests) == 3


async def test_a_new_connection_closed_unanswered_is_broken(client: Client) -> None:
    async with serving(constant(None)) as (server, url):
        with pytest.raises(Broken, match="closed before an answer"):
            await client.post(url, {}, b"")
    assert len(server.requests) == 1


async def test_an_answer_that_is_not_http_is_broken(client: Client) -> None:
    async with serving(constant(b"SSH-2.0-OpenSSH\r\n\r\n")) as (_, url):
        with pytest.raises(Broken, match="not an HTTP answer"):
            await client.post(url, {}, b"")


async def test_nothing_listening_is_unreachable_with_its_address(client: Client) -> None:
    port = free_port()
    with pytest.raises(Unreachable) as raised:
        await client.post(f"http://127.0.0.1:{port}/", {}, b"")
    assert (raised.value.host, raised.value.port) == ("127.0.0.1", port)


async def test_a_silent_server_times_out_and_its_connection_is_dropped() -> None:
    async def late(_: bytes, number: int) -> bytes:
        if number == 1:
            await asyncio.sleep(1)
        return OK

    client = Client(connections=1, timeout_s=0.2, keep_bytes=16)
    async with serving(late) as (server, url):
        with pytest.raises(TimeoutError):
            await client.post(url, {}, b"")
        assert (await client.post(url, {}, b"")).status == 200
    client.close()
    assert server.connections == 2


async def test_no_more_connections_than_the_limit_are_open_to_one_origin() -> None:
    async def slow(_: bytes, __: int) -> bytes:
        await asyncio.sleep(0.02)
        return OK

    client = Client(connections=3, timeout_s=5, keep_bytes=16)
    async with serving(slow) as (server, url):
        answers = await asyncio.gather(*(client.post(url, {}, b"") for _ in range(12)))
    client.close()
    assert [answer.status for answer in answers] == [200] * 12
    assert server.most_at_once == server.connections == 3


async def test_a_line_break_in_a_header_value_is_refused_before_anything_is_sent(
    client: Client,
) -> None:
    async with serving(constant(OK)) as (server, url):
        with pytest.raises(ValueError, match="line break"):
            await client.post(url, {"webhook-id": "a\r\nx-evil: 1"}, b"")
    assert server.requests == []


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """A self-signed certificate for 127.0.0.1 and its key (openssl's command line)."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not on PATH")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = str(folder / "cert.pem"), str(folder / "key.pem")
    new = ("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1")
    subject = ("-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1")
    subprocess.run(
        ["openssl", *new, *subject, "-keyout", key, "-out", cert],
        check=True,
        capture_output=True,
    )
    return cert, key


async def test_https_goes_to_a_trusted_receiver_and_never_to_an_untrusted_one(
    certificate: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    cert, key = certificate
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    server = Server(constant(OK))
    port = free_port()
    listening = await asyncio.start_server(server.serve, "127.0.0.1", port, ssl=context)
    url = f"https://127.0.0.1:{port}/hooks/1"
    try:
        untrusting = Client(connections=1, timeout_s=2, keep_bytes=16)
        with pytest.raises(Unreachable, match="CERTIFICATE_VERIFY_FAILED"):
            await untrusting.post(url, {}, b"secret")
        monkeypatch.setenv("SSL_CERT_FILE", cert)  # what ssl.create_default_context trusts
        trusting = Client(connections=1, timeout_s=2, keep_bytes=16)
        assert (await trusting.post(url, {}, b"secret")).status == 200
        trusting.close()
    finally:
        listening.close()
        await listening.wait_closed()
    assert len(server.requests) == 1 and server.requests[0].endswith(b"secret")
