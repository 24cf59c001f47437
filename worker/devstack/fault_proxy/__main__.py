"""`python -m worker.devstack.fault_proxy`: the proxy as a process (see the package docs)."""

from __future__ import annotations

import argparse
import sys

from worker import eventloop, gc_tuning
from worker.devstack.fault_proxy import FaultProxy
from worker.devstack.processes import stop_on_signals


async def _serve(proxy: FaultProxy) -> None:
    stop = stop_on_signals()
    async with proxy:
        gc_tuning.tune()  # every frame of every connection goes through here
        print(
            f"fault proxy ready: ABLY_ENDPOINT={proxy.endpoint} -> {proxy.upstream} "
            f"(control: {proxy.endpoint}/_proxy/)",
            flush=True,
        )
        await stop.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m worker.devstack.fault_proxy",
        description="Latency, drops, black holes and rate counting between an Ably SDK and "
        "the server. Control API: POST /_proxy/drop, /_proxy/blackhole?seconds=N, "
        "/_proxy/latency?ms=N, /_proxy/stats/reset; GET /_proxy/stats.",
    )
    parser.add_argument("--upstream", default="http://127.0.0.1:8080", help="the server")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8081)
    parser.add_argument("--latency-ms", type=float, default=0.0, help="round trip")
    parser.add_argument(
        "--enforce-rate-limits",
        action="store_true",
        help="refuse with NACK 42911 what would exceed 50 messages/s per connection or channel",
    )
    eventloop.add_argument(parser)
    args = parser.parse_args(argv)
    proxy = FaultProxy(
        args.upstream,
        host=args.host,
        port=args.port,
        latency_ms=args.latency_ms,
        enforce_rate_limits=args.enforce_rate_limits,
    )
    eventloop.run(_serve(proxy), args.event_loop)
    return 0


if __name__ == "__main__":
    sys.exit(main())
