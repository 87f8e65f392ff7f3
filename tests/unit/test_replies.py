"""replies.add_metadata sets scalars field by field: the message must be exactly what
Struct.update builds (Envoy's access log reads these values)."""

from __future__ import annotations

from typing import Any

import pytest

from extproc.replies import METADATA_NAMESPACE, add_metadata
from extproc.wire import external_processor_pb2 as ep


@pytest.mark.parametrize(
    "metadata",
    [
        {},
        {"request_id": "3f2a", "tenant": "", "key_id": "key_1"},
        {"input_tokens": 12, "output_tokens": 0, "cost_usd": "0.000123", "estimated": False},
        {"attempts": 2, "stream": True, "ratio": 0.25, "big": 10**20, "negative": -3},
        {"nothing": None, "list": [1, "a", None, True], "nested": {"x": 1, "y": {"z": "w"}}},
        {"a": "x", "b": 1, "a2": True, "b2": None, "c": 1.5},
    ],
)
def test_add_metadata_builds_what_struct_update_builds(metadata: dict[str, Any]) -> None:
    fast = ep.ProcessingResponse()
    add_metadata(fast, metadata)
    reference = ep.ProcessingResponse()
    if metadata:
        reference.dynamic_metadata.fields[METADATA_NAMESPACE].struct_value.update(metadata)
    assert fast == reference
    assert fast.SerializeToString(deterministic=True) == reference.SerializeToString(deterministic=True)


def test_add_metadata_adds_to_what_the_reply_holds() -> None:
    resp = ep.ProcessingResponse()
    add_metadata(resp, {"a": "1", "n": 1})
    add_metadata(resp, {"n": 2, "b": False})
    fields = resp.dynamic_metadata.fields[METADATA_NAMESPACE].struct_value.fields
    assert fields["a"].string_value == "1"
    assert fields["n"].number_value == 2
    assert fields["b"].HasField("bool_value") and fields["b"].bool_value is False
