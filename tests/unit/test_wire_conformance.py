"""Our hand-written .proto subset is wire-compatible with Envoy 1.40.

Two independent references: the FileDescriptorProtos compiled into the envoy binary itself (exact
field numbers, types, labels, oneofs), and the `envoy-data-plane` package's classes (bytes encoded
by one side decode to the same values on the other).
"""

from __future__ import annotations

import datetime
import filecmp
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import descriptor_pb2, struct_pb2

from extproc import envoyconf
from extproc.wire import core_pb2, http_status_pb2, processing_mode_pb2
from extproc.wire import external_processor_pb2 as ep

ROOT = Path(__file__).resolve().parents[2]
OUR_FILES = [core_pb2, http_status_pb2, processing_mode_pb2, ep]
ENVOY_FILES = {
    "envoy.config.core.v3": "envoy/config/core/v3/base.proto",
    "envoy.type.v3": "envoy/type/v3/http_status.proto",
    "envoy.extensions.filters.http.ext_proc.v3": "envoy/extensions/filters/http/ext_proc/v3/processing_mode.proto",
    "envoy.service.ext_proc.v3": "envoy/service/ext_proc/v3/external_processor.proto",
}


def _varint(b: bytes, i: int) -> tuple[int, int]:
    r = s = 0
    while True:
        c = b[i]
        i += 1
        r |= (c & 0x7F) << s
        s += 7
        if c < 0x80:
            return r, i


@cache
def _binary() -> bytes:
    return Path(envoyconf.envoy_binary()).read_bytes()


@cache
def envoy_descriptor(name: str) -> descriptor_pb2.FileDescriptorProto:
    """Find the serialized FileDescriptorProto for `name` inside the envoy binary: it starts with
    field 1 (the file name); walk top-level fields until one is not a FileDescriptorProto field."""
    data = _binary()
    needle = b"\x0a" + bytes([len(name)]) + name.encode()
    start = data.find(needle)
    assert start >= 0, f"{name} not embedded in the envoy binary"
    i = start
    while i < len(data):
        tag, j = _varint(data, i)
        field, wire_type = tag >> 3, tag & 7
        if not 1 <= field <= 14 or wire_type not in (0, 2):
            break
        if wire_type == 0:
            _, j = _varint(data, j)
        else:
            length, j = _varint(data, j)
            j += length
        i = j
    fd = descriptor_pb2.FileDescriptorProto()
    fd.ParseFromString(data[start:i])
    assert fd.name == name
    return fd


def _messages(msgs: list[descriptor_pb2.DescriptorProto], prefix: str) -> dict[str, descriptor_pb2.DescriptorProto]:
    out: dict[str, descriptor_pb2.DescriptorProto] = {}
    for m in msgs:
        full = f"{prefix}.{m.name}"
        out[full] = m
        out.update(_messages(list(m.nested_type), full))
    return out


def _enums(fd: descriptor_pb2.FileDescriptorProto) -> dict[str, descriptor_pb2.EnumDescriptorProto]:
    out = {f"{fd.package}.{e.name}": e for e in fd.enum_type}
    for full, m in _messages(list(fd.message_type), fd.package).items():
        out.update({f"{full}.{e.name}": e for e in m.enum_type})
    return out


def _ours(module: object) -> descriptor_pb2.FileDescriptorProto:
    fd = descriptor_pb2.FileDescriptorProto()
    module.DESCRIPTOR.CopyToProto(fd)  # type: ignore[attr-defined]
    return fd


@pytest.mark.parametrize("module", OUR_FILES, ids=lambda m: m.__name__.rsplit(".", 1)[1])
def test_messages_match_envoy_binary(module: object) -> None:
    ours = _ours(module)
    theirs = envoy_descriptor(ENVOY_FILES[ours.package])
    their_msgs = _messages(list(theirs.message_type), theirs.package)
    checked = 0
    for full, msg in _messages(list(ours.message_type), ours.package).items():
        assert full in their_msgs, f"{full} does not exist in Envoy 1.40"
        ref = their_msgs[full]
        ref_fields = {f.name: f for f in ref.field}
        for f in msg.field:
            assert f.name in ref_fields, f"{full}.{f.name} does not exist in Envoy 1.40"
            r = ref_fields[f.name]
            assert (f.number, f.type, f.label, f.type_name) == (r.number, r.type, r.label, r.type_name), (
                f"{full}.{f.name}"
            )
            ours_oneof = msg.oneof_decl[f.oneof_index].name if f.HasField("oneof_index") else None
            ref_oneof = ref.oneof_decl[r.oneof_index].name if r.HasField("oneof_index") else None
            assert ours_oneof == ref_oneof, f"{full}.{f.name} oneof"
            checked += 1
    their_enums = _enums(theirs)
    for full, enum in _enums(ours).items():
        ref_values = {v.name: v.number for v in their_enums[full].value}
        for v in enum.value:
            assert ref_values.get(v.name) == v.number, f"{full}.{v.name}"
    assert checked > 0 or ours.enum_type


def test_service_path_matches_envoy() -> None:
    theirs = envoy_descriptor(ENVOY_FILES["envoy.service.ext_proc.v3"])
    [svc] = theirs.service
    [method] = svc.method
    assert (theirs.package, svc.name, method.name) == ("envoy.service.ext_proc.v3", "ExternalProcessor", "Process")
    [ours] = ep.DESCRIPTOR.services_by_name.values()
    assert ours.full_name == "envoy.service.ext_proc.v3.ExternalProcessor"
    assert ours.methods_by_name["Process"].input_type.full_name == "envoy.service.ext_proc.v3.ProcessingRequest"


def test_field_11_is_streamed_immediate_response() -> None:
    assert ep.ProcessingResponse.DESCRIPTOR.fields_by_number[11].name == "streamed_immediate_response"


def _dp() -> Any:
    from envoy_data_plane.envoy.service.ext_proc import v3 as dp

    return dp


def test_reply_decodes_in_envoy_data_plane() -> None:
    dp = _dp()
    resp = ep.ProcessingResponse()
    common = resp.request_body.response
    opt = common.header_mutation.set_headers.add()
    opt.header.key = "x-gateway-provider"
    opt.header.raw_value = b"openai"
    opt.append_action = core_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
    common.header_mutation.remove_headers.append("x-forged")
    common.body_mutation.body = b'{"model":"m"}'
    common.clear_route_cache = True
    resp.dynamic_metadata.fields["gateway"].struct_value.update({"provider": "openai"})
    resp.mode_override.response_body_mode = processing_mode_pb2.ProcessingMode.STREAMED
    resp.override_message_timeout.seconds = 5
    theirs = dp.ProcessingResponse.parse(resp.SerializeToString())
    c = theirs.request_body.response
    assert c.header_mutation.set_headers[0].header.key == "x-gateway-provider"
    assert c.header_mutation.set_headers[0].header.raw_value == b"openai"
    assert c.header_mutation.set_headers[0].append_action.name == "OVERWRITE_IF_EXISTS_OR_ADD"
    assert c.header_mutation.remove_headers == ["x-forged"]
    assert c.body_mutation.body == b'{"model":"m"}'
    assert c.clear_route_cache is True
    assert theirs.dynamic_metadata.fields["gateway"].struct_value.fields["provider"].string_value == "openai"
    assert theirs.mode_override.response_body_mode.name == "STREAMED"
    assert theirs.override_message_timeout == datetime.timedelta(seconds=5)


def test_immediate_response_decodes_in_envoy_data_plane() -> None:
    dp = _dp()
    resp = ep.ProcessingResponse()
    resp.immediate_response.status.code = 404  # type: ignore[assignment]
    resp.immediate_response.body = b"{}"
    resp.immediate_response.details = "extproc_model_not_found"
    theirs = dp.ProcessingResponse.parse(resp.SerializeToString())
    assert int(theirs.immediate_response.status.code) == 404
    assert (theirs.immediate_response.body, theirs.immediate_response.details) == (b"{}", "extproc_model_not_found")


def test_envoy_data_plane_request_decodes_here() -> None:
    dp = _dp()
    from envoy_data_plane.envoy.config.core import v3 as core

    hdrs = dp.HttpHeaders(
        headers=core.HeaderMap(headers=[core.HeaderValue(key=":path", raw_value=b"/v1/messages")]), end_of_stream=False
    )
    raw = bytes(dp.ProcessingRequest(request_headers=hdrs, observability_mode=False))
    ours = ep.ProcessingRequest.FromString(raw)
    assert ours.WhichOneof("request") == "request_headers"
    assert ours.request_headers.headers.headers[0].raw_value == b"/v1/messages"
    body = bytes(dp.ProcessingRequest(response_body=dp.HttpBody(body=b"data: x\n\n", end_of_stream=True)))
    parsed = ep.ProcessingRequest.FromString(body)
    assert (parsed.response_body.body, parsed.response_body.end_of_stream) == (b"data: x\n\n", True)


def test_struct_is_the_well_known_type() -> None:
    assert (
        ep.ProcessingResponse.DESCRIPTOR.fields_by_name["dynamic_metadata"].message_type is struct_pb2.Struct.DESCRIPTOR
    )


def test_generated_code_is_up_to_date(tmp_path: Path) -> None:
    subprocess.run([sys.executable, str(ROOT / "protos" / "generate.py"), "--out", str(tmp_path)], check=True)
    fresh = tmp_path / "extproc" / "wire"
    committed = ROOT / "extproc" / "wire"
    names = sorted(p.name for p in fresh.iterdir())
    assert names, "generator wrote nothing"
    _, mismatch, errors = filecmp.cmpfiles(fresh, committed, names, shallow=False)
    assert not mismatch and not errors, f"regenerate with `python protos/generate.py`: {mismatch + errors}"
