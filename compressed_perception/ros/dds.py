"""ROS 2 over Cyclone DDS, without ROS: the wire conventions of rmw_cyclonedds_cpp.

- topic `/a/b` is DDS topic `rt/a/b`; type `pkg/msg/Name` is `pkg::msg::dds_::Name_`;
- samples are XCDR1 little-endian CDR, serialized by the project's typestore (rosbags),
  which copies `uint8[]` image data in one block: cyclonedds-python's own serializer
  packs such a field byte by byte (about 33 ms for a 640x480 frame);
- endpoints carry `typehash=RIHS01_...;` in USER_DATA, as ROS 2 Iron and later expect.

The DDS types registered with Cyclone are generated from the same definitions, so type
names, member names and XTypes type information match what ROS 2 nodes announce.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Callable
from functools import cache
from typing import Any

from cyclonedds import _clayer
from cyclonedds.core import Listener, Policy, Qos
from cyclonedds.domain import DomainParticipant
from cyclonedds.idl import IdlStruct
from cyclonedds.idl import types as idl
from cyclonedds.pub import DataWriter
from cyclonedds.sub import DataReader
from cyclonedds.topic import Topic
from cyclonedds.util import duration
from rosbags.typesys.store import Typestore

from compressed_perception.ros.messages import typestore

_BASE = {
    "bool": bool,
    "byte": idl.uint8,
    "char": idl.uint8,
    "int8": idl.int8,
    "uint8": idl.uint8,
    "int16": idl.int16,
    "uint16": idl.uint16,
    "int32": idl.int32,
    "uint32": idl.uint32,
    "int64": idl.int64,
    "uint64": idl.uint64,
    "float32": idl.float32,
    "float64": idl.float64,
    "string": str,
}
_SAMPLE_MASK = 0xFFFFFFFF  # any sample, view and instance state

# A Cyclone configuration for tests and benchmarks: loopback only, no multicast. Large
# datagrams and a large receive buffer (capped by the kernel's net.core.rmem_max) let a
# 6 MB 1920x1080 frame through best effort without losing one of its fragments.
LOOPBACK_CONFIG = """<CycloneDDS><Domain Id="any">
  <General><Interfaces><NetworkInterface address="127.0.0.1"/></Interfaces>
    <AllowMulticast>false</AllowMulticast><MaxMessageSize>65500B</MaxMessageSize>
    <FragmentSize>63000B</FragmentSize></General>
  <Internal><SocketReceiveBufferSize min="default" max="64MB"/></Internal>
  <Discovery><ParticipantIndex>auto</ParticipantIndex>
    <MaxAutoParticipantIndex>100</MaxAutoParticipantIndex>
    <Peers><Peer address="127.0.0.1"/></Peers></Discovery>
</Domain></CycloneDDS>
"""


def dds_topic(ros_topic: str) -> str:
    return "rt/" + ros_topic.lstrip("/")


def dds_type_name(msgtype: str) -> str:
    package, kind, name = msgtype.split("/")
    return f"{package}::{kind}::dds_::{name}_"


@cache
def idl_type(msgtype: str) -> type[IdlStruct]:
    """An IdlStruct with the ROS 2 DDS name and members of `msgtype` (for registration only)."""
    store = typestore()
    _, fields = store.fielddefs[msgtype]
    annotations = {name: _idl_field(store, desc) for name, desc in fields}

    def body(namespace: dict[str, Any]) -> None:
        namespace["__annotations__"] = annotations
        namespace["__module__"] = __name__

    cls = types.new_class(
        msgtype.replace("/", "_"), (IdlStruct,), {"typename": dds_type_name(msgtype)}, body
    )
    return dataclasses.dataclass(cls)


def _idl_field(store: Typestore, desc: Any) -> Any:
    """rosbags field descriptor (nodetype, details) -> cyclonedds type annotation."""
    kind, details = desc
    if kind == 1:  # BASE: (name, string bound)
        return _BASE[details[0]]
    if kind == 2:  # NAME: nested message
        return idl_type(details)
    inner, length = details
    if kind == 3:  # ARRAY
        return idl.array[_idl_field(store, inner), length]
    return idl.sequence[_idl_field(store, inner)]  # SEQUENCE


def qos(reliable: bool, depth: int, msgtype: str) -> Qos:
    reliability = (
        Policy.Reliability.Reliable(max_blocking_time=duration(milliseconds=100))
        if reliable
        else Policy.Reliability.BestEffort
    )
    typehash = typestore().hash_rihs01(msgtype)
    return Qos(
        reliability,
        Policy.History.KeepLast(depth),
        Policy.Durability.Volatile,
        Policy.DataRepresentation(use_cdrv0_representation=True),
        Policy.Userdata(data=f"typehash={typehash};".encode()),
    )


class Participant:
    """One DDS domain participant, the topics created on it (one per name) and its endpoints.

    Endpoints live as long as their participant: a reader with a listener that is garbage
    collected while samples arrive can crash cyclonedds-python (seen here in tests).
    """

    def __init__(self, domain_id: int) -> None:
        self.domain = DomainParticipant(domain_id)
        self._topics: dict[str, Topic] = {}
        self.endpoints: list[RawPublisher | RawSubscriber] = []

    def topic(self, ros_topic: str, msgtype: str) -> Topic:
        if ros_topic not in self._topics:
            self._topics[ros_topic] = Topic(self.domain, dds_topic(ros_topic), idl_type(msgtype))
        return self._topics[ros_topic]


class RawPublisher:
    """Publishes typestore messages as ROS 2 CDR, bypassing Python-side IDL serialization."""

    def __init__(
        self, participant: Participant, ros_topic: str, msgtype: str, reliable: bool, depth: int
    ) -> None:
        self.msgtype = msgtype
        self._store = typestore()
        profile = qos(reliable, depth, msgtype)
        self._writer = DataWriter(
            participant.domain, participant.topic(ros_topic, msgtype), profile
        )
        participant.endpoints.append(self)

    def publish(self, message: Any) -> None:
        data = self._store.serialize_cdr(message, self.msgtype)
        padding = -len(data) % 4  # Cyclone expects whole 4-byte units, as its own writer pads
        payload = bytes(data) + b"\0" * padding if padding else data
        result = _clayer.ddspy_write(self._writer._ref, payload)
        if result < 0:
            raise OSError(f"DDS write on {self.msgtype} failed with code {result}")

    def subscriber_count(self) -> int:
        return len(self._writer.get_matched_subscriptions())


class RawSubscriber:
    """Calls `callback(message)` from Cyclone's receive thread for each new sample."""

    def __init__(
        self,
        participant: Participant,
        ros_topic: str,
        msgtype: str,
        callback: Callable[[Any], None],
        reliable: bool,
        depth: int,
    ) -> None:
        self.msgtype = msgtype
        self._store = typestore()
        self._callback = callback
        profile = qos(reliable, depth, msgtype)
        listener = Listener(on_data_available=self._on_data)
        topic = participant.topic(ros_topic, msgtype)
        self._reader = DataReader(participant.domain, topic, profile, listener=listener)
        participant.endpoints.append(self)

    def _on_data(self, reader: DataReader) -> None:
        samples = _clayer.ddspy_take(reader._ref, _SAMPLE_MASK, 16)
        if isinstance(samples, int):
            return
        for data, info in samples:
            if info.valid_data:
                self._callback(self._store.deserialize_cdr(data, self.msgtype))

    def publisher_count(self) -> int:
        return len(self._reader.get_matched_publications())
