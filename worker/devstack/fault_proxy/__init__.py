"""The fault proxy: between an Ably SDK and the local server, latency, drops, black holes,
and Ably's rate-limit arithmetic.

It forwards plain HTTP (the REST API, any method, path, query, headers and body) and
WebSocket upgrades (the realtime protocol, query string passed through unchanged), so an
SDK pointed at it behaves as if it talked to the server, with these faults on request:

- latency: a round trip added to every WebSocket frame (half each way, order kept) and
  every HTTP request;
- drop: every open WebSocket cut at the TCP level on both sides (no Ably CLOSE, no
  WebSocket close): the SDK sees its transport fail and reconnects, through the proxy;
- black hole for N seconds: frames both ways are discarded (not delayed), new
  connections and HTTP requests hang until it ends;
- counting: each client connection's MESSAGE protocol messages and the messages in
  them, per connection and per channel, with Ably's rollup of appends (`counting`), the
  peak per one-second window and totals;
- `enforce_rate_limits`: a publish that would take its connection or its channel over
  50 counted messages a second is not forwarded; the client gets a NACK with code 42911
  for that msgSerial (`serials` keeps both sides' serials consistent).

Python:

    async with FaultProxy("http://127.0.0.1:8080", latency_ms=100) as proxy:
        client = realtime_client(key, proxy.endpoint)
        proxy.set_latency(200); proxy.blackhole(2.0); await proxy.drop_connections()
        proxy.stats().connections[1].channels["ch"].peak_counted_per_s; proxy.reset_stats()

Command line (prints its endpoint when ready; exits 0 on SIGTERM or SIGINT):

    python -m worker.devstack.fault_proxy --upstream http://127.0.0.1:8080 --port 8081 \\
        [--latency-ms N] [--enforce-rate-limits]

Control API, on the proxy's own port, answered at once whatever the faults:

    curl -X POST 'http://127.0.0.1:8081/_proxy/drop'               # {"dropped": n}
    curl -X POST 'http://127.0.0.1:8081/_proxy/blackhole?seconds=5'
    curl -X POST 'http://127.0.0.1:8081/_proxy/latency?ms=200'     # round trip
    curl 'http://127.0.0.1:8081/_proxy/stats'                      # ProxyStats as JSON
    curl -X POST 'http://127.0.0.1:8081/_proxy/stats/reset'
"""

from worker.devstack.fault_proxy.counting import (
    ConnectionStats,
    Counts,
    ProxyStats,
    RateLimits,
)
from worker.devstack.fault_proxy.proxy import FaultProxy

__all__ = ["ConnectionStats", "Counts", "FaultProxy", "ProxyStats", "RateLimits"]
