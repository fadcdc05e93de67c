"""N simulated browsers polling like htmx, as a process of its own: prints one JSON line of results.

    python -m bench.pollers PORT PATH_TEMPLATE FIRST_ID COUNT --seconds 30 [--cookie C] [--expect TEXT]

Each poller keeps one keep-alive connection, starts at a random moment within the first second
(people do not open their pages in step), then asks, reads the whole answer, waits `--pause`
seconds (htmx's `load delay:1s`) and asks again. Only request-to-answer time is recorded.
wrk cannot stagger its connections' first requests, so its first round would be 50 requests
at once, which no real crowd of readers sends; wrk still measures the flat-out ceiling.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time


async def poller(args, index: int, deadline: float, latencies: list[float], bad: list[str]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", args.port)
    cookie = f"Cookie: {args.cookie}\r\n" if args.cookie else ""
    await asyncio.sleep(random.uniform(0, args.pause))
    n = index
    try:
        while time.monotonic() < deadline:
            path = args.path % (args.first + n % args.count)
            n += args.pollers
            request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nHX-Request: true\r\n{cookie}\r\n".encode()
            start = time.perf_counter()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            body = await reader.readexactly(length)
            latencies.append((time.perf_counter() - start) * 1000)
            status = head.split(b" ", 2)[1]
            if status != b"200" or args.expect.encode() not in body:
                bad.append(f"{path}: {status.decode()}")
            await asyncio.sleep(args.pause)
    finally:
        writer.close()


async def run(args) -> dict:
    latencies: list[float] = []
    bad: list[str] = []
    started = time.monotonic()
    deadline = started + args.seconds
    await asyncio.gather(*(poller(args, i, deadline, latencies, bad) for i in range(args.pollers)))
    cuts = statistics.quantiles(latencies, n=100, method="inclusive")
    return {
        "requests": len(latencies),
        "seconds": time.monotonic() - started,
        "p50_ms": statistics.median(latencies),
        "p90_ms": cuts[89],
        "p99_ms": cuts[98],
        "max_ms": max(latencies),
        "bad_answers": len(bad),
        "first_bad": bad[:3],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("port", type=int)
    parser.add_argument("path", help="a path with %%d for the id, e.g. /tasks/%%d/live")
    parser.add_argument("first", type=int)
    parser.add_argument("count", type=int)
    parser.add_argument("--pollers", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--pause", type=float, default=1.0)
    parser.add_argument("--cookie", default="")
    parser.add_argument("--expect", default="")
    print(json.dumps(asyncio.run(run(parser.parse_args()))))


if __name__ == "__main__":
    main()
