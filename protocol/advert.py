"""The zeroconf record a node advertises on the LAN: `_hearth._tcp.local.` with these TXT keys.

    key     value                                         example
    id      node id (^[a-z0-9][a-z0-9-]{0,62}$)          gpu-box-1
    v       Hearth version                                0.2.0
    tier    club | community                              club
    fp      identity key fingerprint (20 hex chars)       3f9a0c...
    gpus    short summary                                 2x RTX 3090 | cpu
    free    free VRAM or memory budget, bytes             25486688256
    models  loaded models, comma-separated (truncated)    llama-3.1-8b,qwen-0.5b
    more    how many models did not fit in `models`       0
    load    jobs running and queued                       3

Anyone on the LAN can publish such a record, so it is a hint, never trust: the scheduler makes an unknown
node a pending enrollment, checks its keys against `fp`, and gives work only to nodes the operator approved.
Every value is bounded and checked on decode; a record that breaks a rule is refused whole.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from protocol.errors import ProtocolError

SERVICE_TYPE = "_hearth._tcp.local."
MAX_TXT_STRING = 255  # one TXT string holds "key=value" in at most 255 bytes
_NODE_ID = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
_FINGERPRINT = re.compile(r"[0-9a-f]{20}")
_TIERS = ("club", "community")
_MAX_INT = 2**62


@dataclass(frozen=True, slots=True)
class Advert:
    node_id: str
    version: str
    port: int
    tier: str
    fingerprint: str
    gpus: str
    free_bytes: int
    models: tuple[str, ...]
    load: int
    host: str = ""


def unknown_addresses(interfaces: list[str] | None) -> list[str]:
    """The configured zeroconf addresses that no interface of this machine has (zeroconf would fail on
    them, and leak its socket doing so)."""
    if not interfaces:
        return []
    import ifaddr  # zeroconf's own dependency

    present = {str(ip.ip) for adapter in ifaddr.get_adapters() for ip in adapter.ips if ip.is_IPv4}
    return [address for address in interfaces if address not in present]


def service_name(node_id: str) -> str:
    return f"{node_id}.{SERVICE_TYPE}"


def _fit(key: str, value: str) -> str:
    """``value`` cut so that ``key=value`` fits one TXT string (on a character boundary)."""
    room = MAX_TXT_STRING - len(key) - 1
    data = value.encode()[:room]
    return data.decode(errors="ignore")


def encode_txt(advert: Advert) -> dict[str, str]:
    room = MAX_TXT_STRING - len("models=")
    shown: list[str] = []
    used = 0
    for model in advert.models:
        cost = len(model.encode()) + (1 if shown else 0)
        if used + cost > room:
            break
        shown.append(model)
        used += cost
    return {
        "id": advert.node_id,
        "v": _fit("v", advert.version),
        "tier": advert.tier,
        "fp": advert.fingerprint,
        "gpus": _fit("gpus", advert.gpus),
        "free": str(advert.free_bytes),
        "models": ",".join(shown),
        "more": str(len(advert.models) - len(shown)),
        "load": str(advert.load),
    }


def _text(properties: Mapping[bytes, bytes | None], key: str) -> str:
    value = properties.get(key.encode())
    if value is None:
        raise ProtocolError(f"advert has no {key}")
    if len(value) > MAX_TXT_STRING:
        raise ProtocolError(f"advert {key} is too long")
    try:
        return value.decode()
    except UnicodeDecodeError:
        raise ProtocolError(f"advert {key} is not UTF-8") from None


def _count(properties: Mapping[bytes, bytes | None], key: str) -> int:
    text = _text(properties, key)
    if not text.isascii() or not text.isdigit() or len(text) > 19 or int(text) > _MAX_INT:
        raise ProtocolError(f"advert {key} is not a count")
    return int(text)


def decode_txt(properties: Mapping[bytes, bytes | None], *, host: str, port: int) -> Advert:
    node_id = _text(properties, "id")
    if not _NODE_ID.fullmatch(node_id):  # fullmatch: "$" would also pass a trailing newline
        raise ProtocolError("advert id is not a node id")
    tier = _text(properties, "tier")
    if tier not in _TIERS:
        raise ProtocolError("advert tier is unknown")
    fp = _text(properties, "fp")
    if not _FINGERPRINT.fullmatch(fp):
        raise ProtocolError("advert fp is not a fingerprint")
    if not 0 < port < 65536:
        raise ProtocolError("advert port is out of range")
    models_text = _text(properties, "models")
    models = tuple(m for m in models_text.split(",") if m)
    if any(not m.isprintable() for m in models):
        raise ProtocolError("advert models are malformed")
    return Advert(
        node_id=node_id,
        version=_text(properties, "v"),
        port=port,
        tier=tier,
        fingerprint=fp,
        gpus=_text(properties, "gpus"),
        free_bytes=_count(properties, "free"),
        models=models,
        load=_count(properties, "load"),
        host=host,
    )
