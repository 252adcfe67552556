"""The JSON codecs of user events: posts and interactions. Pure functions, no I/O.

    users/{user_id}/posts         {"text": "...", "reply_to": EVENT_ID?, "sponsor": ADVERTISER_ID?, "nonce": "..."?}
    users/{user_id}/interactions  {"type": "like" | "unlike" | "repost", "event_id": EVENT_ID}

The topic is the identity: nothing in a payload names its author, and a payload that tries (any field not listed
above) is rejected. `nonce` is an optional client idempotency key: a post sent twice with the same nonce is one post.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

from devices.telemetry import TelemetryError
INTERACTION_TYPES = ("like", "unlike", "repost")
EVENT_ID = re.compile(r"^[0-9a-f]{28}$")
ADVERTISER_ID = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
MAX_TEXT_CHARS = 5000
MAX_NONCE_CHARS = 64


class UserEventError(TelemetryError):
    """A user event that is not valid; same shape (`reason`, `message`) as the telemetry codec's errors."""


@dataclass(frozen=True, slots=True)
class Post:
    text: str
    reply_to: str | None = None
    sponsor: str | None = None
    nonce: str | None = None

    def as_payload(self) -> dict[str, Any]:
        out: dict[str, Any] = {"text": self.text}
        if self.reply_to is not None:
            out["reply_to"] = self.reply_to
        if self.sponsor is not None:
            out["sponsor"] = self.sponsor
        return out

    def dedup_key(self, raw: bytes) -> str:
        """The nonce when the client gave one, else a digest of the exact bytes: a redelivered message is the
        same bytes, while two posts a person writes differ at least in a nonce or a timestamp of the client's."""
        return f"n:{self.nonce}" if self.nonce is not None else "h:" + hashlib.sha256(raw).hexdigest()[:32]


@dataclass(frozen=True, slots=True)
class Interaction:
    type: str
    event_id: str

    def as_payload(self) -> dict[str, Any]:
        return {"type": self.type, "event_id": self.event_id}


def _object(payload: bytes, max_bytes: int) -> dict[str, Any]:
    if len(payload) > max_bytes:
        raise UserEventError("oversize", f"payload is {len(payload)} bytes, the limit is {max_bytes}")
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserEventError("invalid_utf8", f"payload is not UTF-8 (byte {exc.start})") from None
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise UserEventError("malformed_json", f"payload is not JSON: {str(exc)[:120]}") from None
    if not isinstance(doc, dict):
        raise UserEventError("not_an_object", f"expected a JSON object, got {type(doc).__name__}")
    return doc


def _only(doc: dict[str, Any], allowed: tuple[str, ...]) -> None:
    extra = sorted(set(doc) - set(allowed))
    if extra:
        raise UserEventError("unknown_field", f"unknown field(s) {', '.join(map(repr, extra[:5]))[:200]}")


def decode_post(payload: bytes, *, max_bytes: int = 16_384) -> Post:
    doc = _object(payload, max_bytes)
    _only(doc, ("text", "reply_to", "sponsor", "nonce"))
    text = doc.get("text")
    if not isinstance(text, str):
        raise UserEventError("wrong_type", f"text must be a string, got {type(text).__name__}")
    if not text.strip():
        raise UserEventError("empty_text", "text is empty")
    if len(text) > MAX_TEXT_CHARS:
        raise UserEventError("text_too_long", f"text is {len(text)} characters, the limit is {MAX_TEXT_CHARS}")
    reply_to = doc.get("reply_to")
    if reply_to is not None and (not isinstance(reply_to, str) or not EVENT_ID.fullmatch(reply_to)):
        raise UserEventError("bad_event_id", f"reply_to must be an event id, got {str(reply_to)[:80]!r}")
    sponsor = doc.get("sponsor")
    if sponsor is not None and (not isinstance(sponsor, str) or not ADVERTISER_ID.fullmatch(sponsor)):
        raise UserEventError("bad_sponsor", f"sponsor must be an advertiser id, got {str(sponsor)[:80]!r}")
    nonce = doc.get("nonce")
    if nonce is not None and (not isinstance(nonce, str) or not 0 < len(nonce) <= MAX_NONCE_CHARS
                              or not _encodable(nonce)):
        raise UserEventError("bad_nonce", f"nonce must be a string of 1-{MAX_NONCE_CHARS} characters")
    return Post(text, reply_to, sponsor, nonce)


def _encodable(text: str) -> bool:
    """JSON can carry lone surrogates (\\ud800) that no UTF-8 store can keep."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def decode_interaction(payload: bytes, *, max_bytes: int = 1024) -> Interaction:
    doc = _object(payload, max_bytes)
    _only(doc, ("type", "event_id"))
    kind = doc.get("type")
    if kind not in INTERACTION_TYPES:
        raise UserEventError("bad_interaction", f"type must be one of {', '.join(INTERACTION_TYPES)}, "
                             f"got {str(kind)[:40]!r}")
    event_id = doc.get("event_id")
    if not isinstance(event_id, str) or not EVENT_ID.fullmatch(event_id):
        raise UserEventError("bad_event_id", f"event_id must be an event id, got {str(event_id)[:80]!r}")
    return Interaction(kind, event_id)
