"""The benchmark's load generator: open-loop arrivals are all accounted for, answered or not."""
from __future__ import annotations

import asyncio

import loadgen

async def _serve_then_load(fail_every: int, rate: float, seconds: float):
    """A keep-alive HTTP server on a loopback port that answers 500 to every fail_every-th request."""
    answered = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal answered
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(int(line[15:]) for line in head.split(b"\r\n") if line[:15].lower() == b"content-length:")
                await reader.readexactly(length)
                answered += 1
                status = b"500 Internal Server Error" if fail_every and answered % fail_every == 0 else b"200 OK"
                writer.write(b"HTTP/1.1 " + status + b"\r\nContent-Length: 2\r\n\r\n{}")
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    raw = loadgen.post_json("127.0.0.1", port, "/recommend", {"user_id": "u"})
    async with server:
        return await loadgen.open_loop("127.0.0.1", port, lambda i: raw, rate, seconds, seed=3)


def test_open_loop_counts_every_arrival() -> None:
    result = asyncio.run(_serve_then_load(fail_every=0, rate=200.0, seconds=0.5))
    assert result.sent is not None and result.sent > 50
    assert result.ok == result.sent
    assert result.summary()["sent"] == result.sent


def test_open_loop_failures_leave_ok_short_of_sent() -> None:
    result = asyncio.run(_serve_then_load(fail_every=4, rate=200.0, seconds=0.5))
    assert result.ok < result.sent
    assert result.ok + result.statuses.get(500, 0) == result.sent


def test_the_pool_retires_connections_idle_past_the_servers_keep_alive(monkeypatch) -> None:
    async def main() -> tuple[bool, int]:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.read()  # hold the connection until the client closes it
            writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server:
            pool = loadgen._Pool("127.0.0.1", port, limit=4)
            first = await pool.acquire()
            await pool.release(first)
            assert await pool.acquire() is first  # idle for less than MAX_IDLE_S: reused
            await pool.release(first)
            monkeypatch.setattr(loadgen, "MAX_IDLE_S", 0.0)
            second = await pool.acquire()
            opened = pool.opened
            second.close()
            pool.close()
            return second is not first, opened

    replaced, opened = asyncio.run(main())
    assert replaced
    assert opened == 1  # the stale one was closed and no longer counts against the limit
