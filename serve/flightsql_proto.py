"""The few Flight SQL protobuf messages the server reads and writes, without generated code.

pyarrow ships Flight but not Flight SQL's messages (format/FlightSql.proto, package
`arrow.flight.protocol.sql`). A Flight SQL command travels as a `google.protobuf.Any`
(type_url + the message's bytes) in a FlightDescriptor's `cmd`, a Ticket or an Action body.
Every message used here is flat (strings, bytes, bools, varints, repeated scalars), so a small
codec of the protobuf wire format does: `decode` gives {field number: [values]}, `Message`
names the fields of each message, `pack`/`unpack` wrap them in Any.

Field numbers follow format/FlightSql.proto and format/Flight.proto of Apache Arrow.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from clipsql.errors import ClipsqlError

TYPE_PREFIX = "type.googleapis.com/arrow.flight.protocol.sql."


class ProtocolError(ClipsqlError, ValueError):
    """A request that is not a well-formed Flight SQL message."""


# -- wire format ----------------------------------------------------------------------------------

def _varint(value: int) -> bytes:
    if value < 0:                  # int64/int32 negatives are ten-byte two's complement varints
        value += 1 << 64
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise ProtocolError("malformed Flight SQL message (a truncated varint)")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def decode(buf: bytes) -> dict[int, list[Any]]:
    """{field number: [values in order]}: varints as int, length-delimited fields as bytes
    (a packed repeated varint field stays bytes: see `packed_varints`), fixed32/64 as int."""
    fields: dict[int, list[Any]] = {}
    pos, n = 0, len(buf)
    while pos < n:
        key, pos = _read_varint(buf, pos)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise ProtocolError("malformed Flight SQL message (field number 0)")
        if wire == 0:
            value, pos = _read_varint(buf, pos)
        elif wire == 2:
            size, pos = _read_varint(buf, pos)
            if pos + size > n:
                raise ProtocolError("malformed Flight SQL message (a field runs past its end)")
            value, pos = bytes(buf[pos:pos + size]), pos + size
        elif wire in (1, 5):
            width = 8 if wire == 1 else 4
            if pos + width > n:
                raise ProtocolError("malformed Flight SQL message (a truncated fixed-width field)")
            value, pos = int.from_bytes(buf[pos:pos + width], "little"), pos + width
        else:
            raise ProtocolError(f"malformed Flight SQL message (wire type {wire})")
        fields.setdefault(number, []).append(value)
    return fields


def packed_varints(values: list[Any]) -> list[int]:
    """A repeated varint field: each element either one varint or a packed run (bytes)."""
    out: list[int] = []
    for v in values:
        if isinstance(v, int):
            out.append(v)
            continue
        pos = 0
        while pos < len(v):
            x, pos = _read_varint(v, pos)
            out.append(x)
    return out


def encode_field(number: int, value: Any) -> bytes:
    if isinstance(value, bool) or isinstance(value, int):
        return _varint(number << 3) + _varint(int(value))
    if isinstance(value, str):
        value = value.encode()
    value = bytes(value)
    return _varint(number << 3 | 2) + _varint(len(value)) + value


# -- messages -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Message:
    """A flat message: its name and {field name: (number, kind)}; kind is one of
    str, bytes, bool, int, 'repeated str', 'repeated int'."""
    name: str
    fields: dict[str, tuple[int, str]] = field(default_factory=dict)

    @property
    def type_url(self) -> str:
        return TYPE_PREFIX + self.name

    def parse(self, buf: bytes) -> dict[str, Any]:
        raw = decode(buf)
        out: dict[str, Any] = {}
        for fname, (number, kind) in self.fields.items():
            values = raw.get(number)
            if kind == "repeated int":
                out[fname] = packed_varints(values or [])
                continue
            if kind == "repeated str":
                out[fname] = [_text(v, self.name, fname) for v in values or []]
                continue
            if not values:
                out[fname] = None           # absent (proto3 optional) or the default
                continue
            v = values[-1]
            if kind == "str":
                out[fname] = _text(v, self.name, fname)
            elif kind == "bytes":
                out[fname] = _blob(v, self.name, fname)
            elif kind == "bool":
                out[fname] = bool(_number(v, self.name, fname))
            else:
                out[fname] = _number(v, self.name, fname)
        return out

    def build(self, **values: Any) -> bytes:
        parts = []
        for fname, value in values.items():
            number, kind = self.fields[fname]
            if value is None:
                continue
            if kind.startswith("repeated"):
                parts += [encode_field(number, v) for v in value]
            else:
                parts.append(encode_field(number, value))
        return b"".join(parts)

    def pack(self, **values: Any) -> bytes:
        """The message wrapped in google.protobuf.Any."""
        return pack_any(self.type_url, self.build(**values))


def _text(v: Any, msg: str, fname: str) -> str:
    if not isinstance(v, bytes):
        raise ProtocolError(f"malformed {msg}: {fname} is not a string")
    try:
        return v.decode()
    except UnicodeDecodeError:
        raise ProtocolError(f"malformed {msg}: {fname} is not UTF-8") from None


def _blob(v: Any, msg: str, fname: str) -> bytes:
    if not isinstance(v, bytes):
        raise ProtocolError(f"malformed {msg}: {fname} is not bytes")
    return v


def _number(v: Any, msg: str, fname: str) -> int:
    if not isinstance(v, int):
        raise ProtocolError(f"malformed {msg}: {fname} is not a number")
    return v


def pack_any(type_url: str, value: bytes) -> bytes:
    return encode_field(1, type_url) + encode_field(2, value)


def unpack_any(buf: bytes) -> tuple[str, bytes]:
    """(message name, its bytes) of a google.protobuf.Any holding a Flight SQL message."""
    try:
        raw = decode(buf)
        url = raw.get(1, [b""])[-1]
        url = url.decode() if isinstance(url, bytes) else ""
    except (ProtocolError, UnicodeDecodeError):
        url = ""
    if not url.startswith(TYPE_PREFIX):
        raise ProtocolError("not a Flight SQL command (clipsql serve speaks Arrow Flight SQL: connect with a "
                            "Flight SQL client such as adbc_driver_flightsql or the Flight SQL JDBC driver)")
    value = raw.get(2, [b""])[-1]
    if not isinstance(value, bytes):
        raise ProtocolError("malformed Flight SQL command (its value is not bytes)")
    return url[len(TYPE_PREFIX):], value


def _msg(name: str, **fields: tuple[int, str]) -> Message:
    return Message(name, dict(fields))


CommandStatementQuery = _msg("CommandStatementQuery", query=(1, "str"), transaction_id=(2, "bytes"))
CommandStatementUpdate = _msg("CommandStatementUpdate", query=(1, "str"), transaction_id=(2, "bytes"))
CommandStatementSubstraitPlan = _msg("CommandStatementSubstraitPlan")
CommandPreparedStatementQuery = _msg("CommandPreparedStatementQuery", prepared_statement_handle=(1, "bytes"))
CommandPreparedStatementUpdate = _msg("CommandPreparedStatementUpdate", prepared_statement_handle=(1, "bytes"))
TicketStatementQuery = _msg("TicketStatementQuery", statement_handle=(1, "bytes"))
DoPutUpdateResult = _msg("DoPutUpdateResult", record_count=(1, "int"))

CommandGetSqlInfo = _msg("CommandGetSqlInfo", info=(1, "repeated int"))
CommandGetXdbcTypeInfo = _msg("CommandGetXdbcTypeInfo", data_type=(1, "int"))
CommandGetCatalogs = _msg("CommandGetCatalogs")
CommandGetDbSchemas = _msg("CommandGetDbSchemas", catalog=(1, "str"), db_schema_filter_pattern=(2, "str"))
CommandGetTables = _msg("CommandGetTables", catalog=(1, "str"), db_schema_filter_pattern=(2, "str"),
                        table_name_filter_pattern=(3, "str"), table_types=(4, "repeated str"),
                        include_schema=(5, "bool"))
CommandGetTableTypes = _msg("CommandGetTableTypes")
CommandGetPrimaryKeys = _msg("CommandGetPrimaryKeys", catalog=(1, "str"), db_schema=(2, "str"), table=(3, "str"))
CommandGetExportedKeys = _msg("CommandGetExportedKeys", catalog=(1, "str"), db_schema=(2, "str"), table=(3, "str"))
CommandGetImportedKeys = _msg("CommandGetImportedKeys", catalog=(1, "str"), db_schema=(2, "str"), table=(3, "str"))
CommandGetCrossReference = _msg("CommandGetCrossReference", pk_catalog=(1, "str"), pk_db_schema=(2, "str"),
                                pk_table=(3, "str"), fk_catalog=(4, "str"), fk_db_schema=(5, "str"),
                                fk_table=(6, "str"))

ActionCreatePreparedStatementRequest = _msg("ActionCreatePreparedStatementRequest", query=(1, "str"),
                                            transaction_id=(2, "bytes"))
ActionCreatePreparedStatementResult = _msg("ActionCreatePreparedStatementResult",
                                           prepared_statement_handle=(1, "bytes"), dataset_schema=(2, "bytes"),
                                           parameter_schema=(3, "bytes"))
ActionClosePreparedStatementRequest = _msg("ActionClosePreparedStatementRequest",
                                           prepared_statement_handle=(1, "bytes"))
ActionBeginTransactionRequest = _msg("ActionBeginTransactionRequest")
ActionBeginTransactionResult = _msg("ActionBeginTransactionResult", transaction_id=(1, "bytes"))
ActionEndTransactionRequest = _msg("ActionEndTransactionRequest", transaction_id=(1, "bytes"), action=(2, "int"))
ActionCancelQueryRequest = _msg("ActionCancelQueryRequest", info=(1, "bytes"))
ActionCancelQueryResult = _msg("ActionCancelQueryResult", result=(1, "int"))

END_TRANSACTION_COMMIT, END_TRANSACTION_ROLLBACK = 1, 2
CANCEL_RESULT_CANCELLED, CANCEL_RESULT_NOT_CANCELLABLE = 1, 3

MESSAGES = {m.name: m for m in (
    CommandStatementQuery, CommandStatementUpdate, CommandStatementSubstraitPlan, CommandPreparedStatementQuery,
    CommandPreparedStatementUpdate, TicketStatementQuery, CommandGetSqlInfo, CommandGetXdbcTypeInfo,
    CommandGetCatalogs, CommandGetDbSchemas, CommandGetTables, CommandGetTableTypes, CommandGetPrimaryKeys,
    CommandGetExportedKeys, CommandGetImportedKeys, CommandGetCrossReference,
    ActionCreatePreparedStatementRequest, ActionClosePreparedStatementRequest, ActionBeginTransactionRequest,
    ActionEndTransactionRequest, ActionCancelQueryRequest)}


def parse_command(buf: bytes) -> tuple[str, dict[str, Any]]:
    """A descriptor's `cmd` or a ticket → (message name, its fields)."""
    name, value = unpack_any(buf)
    msg = MESSAGES.get(name)
    if msg is None:
        raise ProtocolError(f"Flight SQL command {name} is not supported by clipsql serve")
    return name, msg.parse(value)


# -- Flight (not Flight SQL) messages pyarrow does not wrap, sent without Any ---------------------
# CancelFlightInfoRequest { FlightInfo info = 1; }, CancelFlightInfoResult { CancelStatus status = 1; }

CANCEL_STATUS_CANCELLED, CANCEL_STATUS_NOT_CANCELLABLE = 1, 3


def cancel_flight_info_request(buf: bytes) -> bytes:
    """The serialized FlightInfo inside a CancelFlightInfoRequest."""
    raw = decode(buf).get(1)
    if not raw or not isinstance(raw[-1], bytes):
        raise ProtocolError("malformed CancelFlightInfo request (no FlightInfo)")
    return raw[-1]


def cancel_flight_info_result(status: int) -> bytes:
    return encode_field(1, status)


# CloseSessionResult { Status status = 1; } (Flight's session management; ADBC sends CloseSession
# when it closes a connection)
CLOSE_SESSION_CLOSED = 1


def close_session_result(status: int) -> bytes:
    return encode_field(1, status)
