"""DynamoDB's JSON protocol 1.0 for the lean operations: request bodies and replies.

A request is ``POST`` of the operation's input as JSON, named by ``X-Amz-Target``. Binary
attribute values travel as base64 both ways: msgspec writes ``bytes`` as base64, and
:func:`decode_item` turns the ``B`` values of a reply back into bytes, as botocore's parser
does. Numbers stay strings. An error reply carries ``__type`` (``...#Code``) and a message;
a failed condition with ``ReturnValuesOnConditionCheckFailure`` also carries the ``Item``.
"""

from __future__ import annotations

import binascii
import zlib
from typing import Any

import msgspec

TARGET = "DynamoDB_20120810."
CONTENT_TYPE = "application/x-amz-json-1.0"
#: the store's names of the operations the lean path sends (the plans' ``Call.op``)
OPERATIONS = {
    "put_item": "PutItem",
    "update_item": "UpdateItem",
    "get_item": "GetItem",
    "delete_item": "DeleteItem",
}
# Members of a reply (or of an error reply) that hold one item.
_ITEMS = ("Item", "Attributes")

_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder().decode


class ServiceError(Exception):
    """An error reply of DynamoDB, shaped like botocore's ``ClientError``: ``response`` has
    ``Error`` (``Code``, ``Message``) and the reply's other members (``Item`` decoded)."""

    def __init__(
        self, operation: str, status: int, response: dict[str, Any], retries: int = 0
    ) -> None:
        error = response["Error"]
        self.operation = operation
        self.status = status
        self.code: str = error["Code"]
        self.response = response
        tried = f" (reached max retries: {retries})" if retries else ""
        super().__init__(
            f"An error occurred ({self.code}) when calling the {operation} operation{tried}: "
            f"{error['Message']}"
        )


class BadReply(ConnectionError):
    """A reply that is not DynamoDB's (cut, garbled, or failing its CRC32): retried as a
    broken connection is."""


def encode(kwargs: dict[str, Any]) -> bytes:
    return _encode(kwargs)


def _b64(value: Any) -> bytes:
    return binascii.a2b_base64(value)


def decode_value(value: dict[str, Any]) -> dict[str, Any]:
    """One attribute value with its binary parts as bytes (in place)."""
    if "B" in value:
        value["B"] = _b64(value["B"])
    elif "M" in value:
        decode_item(value["M"])
    elif "L" in value:
        for inner in value["L"]:
            decode_value(inner)
    elif "BS" in value:
        value["BS"] = [_b64(v) for v in value["BS"]]
    return value


def decode_item(item: dict[str, Any]) -> dict[str, Any]:
    for value in item.values():
        decode_value(value)
    return item


def _parsed(body: bytes) -> dict[str, Any]:
    try:
        parsed = _decode(body) if body else {}
    except msgspec.DecodeError as exc:
        raise BadReply(f"DynamoDB reply is not JSON: {body[:200]!r}") from exc
    if not isinstance(parsed, dict):
        raise BadReply(f"DynamoDB reply is not a JSON object: {body[:200]!r}")
    return parsed


def check_crc32(headers: dict[str, str], body: bytes) -> None:
    """DynamoDB sends the CRC32 of every reply body; botocore retries on a mismatch."""
    expected = headers.get("x-amz-crc32")
    if expected is not None and expected.isdigit() and zlib.crc32(body) != int(expected):
        raise BadReply(f"DynamoDB reply fails its CRC32 check ({expected})")


def reply(operation: str, status: int, headers: dict[str, str], body: bytes) -> dict[str, Any]:
    """The reply of a request as botocore returns it, or ``ServiceError``."""
    check_crc32(headers, body)
    if 200 <= status < 300:
        parsed = _parsed(body)
        for name in _ITEMS:
            item = parsed.get(name)
            if isinstance(item, dict):
                decode_item(item)
        return parsed
    try:
        parsed = _parsed(body)
    except BadReply:
        parsed = {"message": body[:200].decode(errors="replace")}
    kind = str(parsed.pop("__type", "") or headers.get("x-amzn-errortype", "")).split(":")[0]
    code = kind.rsplit("#", 1)[-1] or str(status)
    message = parsed.pop("message", None) or parsed.pop("Message", None) or ""
    for name in _ITEMS:
        item = parsed.get(name)
        if isinstance(item, dict):
            decode_item(item)
    parsed["Error"] = {"Code": code, "Message": str(message)}
    parsed["ResponseMetadata"] = {"HTTPStatusCode": status}
    raise ServiceError(operation, status, parsed)
