"""Which headers cross the proxy: the client's request headers as the upstream sees them, and the
upstream's response headers as the client sees them (hop-by-hop and our own X-Meter-* dropped).
"""

from __future__ import annotations

from multidict import CIMultiDict, CIMultiDictProxy

from proxy.core.attribution import METER_PREFIX
from proxy.core.credentials import CREDENTIAL_HEADERS, forwardable

__all__ = ["HOP_BY_HOP", "client_headers", "upstream_headers"]

# RFC 9110 hop-by-hop headers, plus those aiohttp computes itself for the new message (Host, Content-Length).
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection", "te",
    "trailer", "trailers", "transfer-encoding", "upgrade",
})
_RECOMPUTED = frozenset({"host", "content-length"})
_NOTHING: frozenset[str] = frozenset()


def _filtered(headers: CIMultiDictProxy[str], drop: frozenset[str], drop_meter: bool,
              once: frozenset[str] = frozenset()) -> CIMultiDict[str]:
    connection = headers.getall("Connection", ())
    connection_named = {
        token.strip().lower() for value in connection for token in value.split(",")
    } if connection else _NOTHING
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        lower = name.lower()
        if lower in drop or lower in connection_named or (drop_meter and lower.startswith(METER_PREFIX)):
            continue
        if lower in once and lower in out:
            continue
        out.add(name, forwardable(value))
    return out


def upstream_headers(headers: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    """The client's headers as the upstream should see them: minus hop-by-hop and our own X-Meter-*.

    Only the first Authorization and api-key go on: the one attributed is the one the upstream bills.
    """
    return _filtered(headers, HOP_BY_HOP | _RECOMPUTED, drop_meter=True, once=CREDENTIAL_HEADERS)


def client_headers(headers: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    """The upstream's response headers as the client should see them: minus hop-by-hop."""
    return _filtered(headers, HOP_BY_HOP, drop_meter=False)
