"""The benchmark: meterproxy against a direct call and a bare aiohttp pass-through, on loopback only.

Run `python -m bench` (or `python -m bench --quick`). Every process it starts listens on 127.0.0.1 and
every load it sends is bounded in count and time. It must never send traffic anywhere but loopback,
never import the proxy into the process it measures, and never change the proxy's code or data.
"""
