"""The few bytes of Dagster's gRPC API the appliance speaks itself, without importing dagster.

Dagster's proto is thin (`api.proto`): Ping takes PingRequest{string echo = 1} and answers
PingReply{string echo = 1}. Everything else is relayed as opaque bytes.
"""

from __future__ import annotations

import json

SERVICE = "api.DagsterApi"
PING = f"/{SERVICE}/Ping"
LIST_REPOSITORIES = f"/{SERVICE}/ListRepositories"  # reply: string serialized_..._or_error = 1
DEFAULT_PORT = 4000
MAX_MESSAGE_BYTES = 100 * 1024 * 1024  # Dagster's own limit


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def encode_echo(echo: str) -> bytes:
    """Encode a message whose only field is `string echo = 1` (PingRequest and PingReply)."""
    data = echo.encode()
    return b"\x0a" + _varint(len(data)) + data if data else b""


def load_error_reply(message: str, *, cls_name: str = "AirlockLocationError") -> bytes:
    """A ListRepositoriesReply whose payload is a serialized SerializableErrorInfo: Dagster raises it as the
    location's load error (DagsterUserCodeProcessError), so the UI shows `message` where a code error would be.
    The JSON is serdes's own shape for that type; a contract test reads it back with Dagster."""
    info = {"__class__": "SerializableErrorInfo", "cause": None, "cls_name": cls_name, "context": None,
            "message": message, "stack": []}
    return encode_echo(json.dumps(info))  # string serialized_list_repositories_response_or_error = 1


def decode_echo(message: bytes) -> str:
    """Decode `string echo = 1`, skipping unknown fields (forward compatible)."""
    pos, echo = 0, ""
    while pos < len(message):
        key, pos = _read_varint(message, pos)
        field, wire = key >> 3, key & 7
        if wire == 2:
            length, pos = _read_varint(message, pos)
            if field == 1:
                echo = message[pos : pos + length].decode()
            pos += length
        elif wire == 0:
            _, pos = _read_varint(message, pos)
        else:
            raise ValueError(f"unexpected protobuf wire type {wire} in Dagster ping reply")
    return echo


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        if pos >= len(data):
            raise ValueError("truncated protobuf varint")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
