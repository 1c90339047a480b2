"""A small, cheap HTTP/1.1 load generator for loopback benchmarks (asyncio streams, keep-alive).

A load generator on the same 2 cores as the service must cost little per request, so this one
writes pre-encoded requests on persistent connections and parses only the status line and
Content-Length (tens of microseconds per request, against hundreds for a full client library).

- open loop: Poisson arrivals at a fixed rate; latency counts from the scheduled arrival, so a slow
  server is not hidden by a client that waits (no coordinated omission);
- closed loop: N workers, each sends its next request as soon as the previous answer arrives.
"""
from __future__ import annotations

import asyncio
import gc
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

RequestFactory = Callable[[int], bytes]  # request number -> full HTTP request bytes


def post_json(host: str, port: int, path: str, payload: dict) -> bytes:
    body = json.dumps(payload, separators=(",", ":")).encode()
    head = (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: keep-alive\r\n\r\n")
    return head.encode() + body


# uvicorn closes a keep-alive connection after 5 s idle; reusing one that old races that close and
# fails a request the server never saw, so the pool retires connections idle for longer than this.
MAX_IDLE_S = 4.0


class Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.idle_since = time.perf_counter()

    @classmethod
    async def open(cls, host: str, port: int) -> Connection:
        reader, writer = await asyncio.open_connection(host, port)
        return cls(reader, writer)

    async def request(self, raw: bytes) -> tuple[int, bytes]:
        self.writer.write(raw)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = 0
        for line in head.split(b"\r\n")[1:]:
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
                break
        body = await self.reader.readexactly(length) if length else b""
        return status, body

    def close(self) -> None:
        self.writer.close()


@dataclass
class LoadResult:
    mode: str
    offered_rps: float | None
    duration_s: float
    latencies_s: list[float] = field(default_factory=list)  # successful requests
    statuses: dict[int, int] = field(default_factory=dict)
    errors: int = 0
    late_starts: int = 0  # open loop: arrivals the client itself could not send on time (>5 ms)
    sent: int | None = None  # open loop: arrivals sent (each one answered or counted as an error)

    @property
    def ok(self) -> int:
        return len(self.latencies_s)

    @property
    def achieved_rps(self) -> float:
        return self.ok / self.duration_s if self.duration_s > 0 else 0.0

    def percentile_ms(self, q: float) -> float:
        return float(np.percentile(self.latencies_s, q) * 1e3) if self.latencies_s else float("nan")

    def summary(self) -> dict:
        lat = np.asarray(self.latencies_s) if self.latencies_s else np.asarray([np.nan])
        return {
            "mode": self.mode,
            "offered_rps": None if self.offered_rps is None else round(self.offered_rps, 1),
            "achieved_rps": round(self.achieved_rps, 1),
            "p50_ms": round(self.percentile_ms(50), 2),
            "p90_ms": round(self.percentile_ms(90), 2),
            "p99_ms": round(self.percentile_ms(99), 2),
            "mean_ms": round(float(lat.mean() * 1e3), 2),
            "ok": self.ok,
            "non_200": sum(n for s, n in self.statuses.items() if s != 200),
            "errors": self.errors,
            "late_starts": self.late_starts,
            "sent": self.sent,
        }


class _Pool:
    def __init__(self, host: str, port: int, limit: int) -> None:
        self.host, self.port, self.limit = host, port, limit
        self.idle: list[Connection] = []
        self.opened = 0
        self._available = asyncio.Condition()

    async def acquire(self) -> Connection:
        async with self._available:
            while not self.idle and self.opened >= self.limit:
                await self._available.wait()
            while self.idle:
                conn = self.idle.pop()
                if time.perf_counter() - conn.idle_since < MAX_IDLE_S:
                    return conn
                conn.close()  # a fresh connection replaces it below
                self.opened -= 1
            self.opened += 1
        try:
            return await Connection.open(self.host, self.port)
        except BaseException:
            async with self._available:
                self.opened -= 1
                self._available.notify()
            raise

    async def release(self, conn: Connection | None) -> None:
        async with self._available:
            if conn is None:
                self.opened -= 1
            else:
                conn.idle_since = time.perf_counter()
                self.idle.append(conn)
            self._available.notify()

    def close(self) -> None:
        for conn in self.idle:
            conn.close()


async def send(pool: _Pool, raw: bytes) -> tuple[int, bytes]:
    """One request on a pooled connection -> (status, body); status 0 for a broken connection."""
    conn = await pool.acquire()
    try:
        status, body = await conn.request(raw)
    except (OSError, asyncio.IncompleteReadError, ValueError):
        conn.close()
        await pool.release(None)
        return 0, b""
    await pool.release(conn)
    return status, body


async def _one(pool: _Pool, raw: bytes, started: float, result: LoadResult, on_body=None) -> None:
    status, body = await send(pool, raw)
    if status == 0:
        result.errors += 1
        return
    result.statuses[status] = result.statuses.get(status, 0) + 1
    if status == 200:
        result.latencies_s.append(time.perf_counter() - started)
        if on_body is not None:
            on_body(body)


async def open_loop(host: str, port: int, make_request: RequestFactory, rate: float, duration_s: float,
                    seed: int = 0, max_connections: int = 512) -> LoadResult:
    """Poisson arrivals at `rate` per second for `duration_s`; waits for the stragglers."""
    rng = np.random.default_rng(seed)
    arrivals = np.cumsum(rng.exponential(1.0 / rate, size=int(rate * duration_s * 1.2) + 10))
    arrivals = arrivals[arrivals < duration_s]
    result = LoadResult("open", rate, duration_s, sent=len(arrivals))
    pool = _Pool(host, port, max_connections)
    tasks: list[asyncio.Task] = []
    start = time.perf_counter()
    for i, at in enumerate(arrivals):
        delay = start + at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        elif delay < -0.005:
            result.late_starts += 1
        tasks.append(asyncio.create_task(_one(pool, make_request(i), start + at, result)))
    await asyncio.gather(*tasks)
    result.duration_s = time.perf_counter() - start  # until the last answer: a lagging server shows
    pool.close()
    return result


async def closed_loop(host: str, port: int, make_request: RequestFactory, workers: int, duration_s: float,
                      warmup_s: float = 0.5) -> LoadResult:
    """`workers` back-to-back clients for warmup_s + duration_s; only the last duration_s counts."""
    result = LoadResult("closed", None, duration_s)
    pool = _Pool(host, port, workers)
    start = time.perf_counter()
    measure_from = start + warmup_s
    stop_at = measure_from + duration_s
    counter = iter(range(1 << 62))
    warm = LoadResult("warmup", None, warmup_s)

    async def worker() -> None:
        while True:
            now = time.perf_counter()
            if now >= stop_at:
                return
            await _one(pool, make_request(next(counter)), now, result if now >= measure_from else warm)

    await asyncio.gather(*(worker() for _ in range(workers)))
    pool.close()
    return result


def run(coro):
    """asyncio.run with uvloop when installed (less client CPU on the shared cores), with the cyclic
    garbage collector off: a full collection in the client would pause every request in flight and
    show up as the server's tail latency. A window makes little cyclic garbage; it is collected after."""
    gc.disable()
    try:
        try:
            import uvloop

            return uvloop.run(coro)
        except ImportError:  # pragma: no cover
            return asyncio.run(coro)
    finally:
        gc.enable()
        gc.collect()
