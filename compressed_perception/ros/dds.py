"""ROS 2 over Cyclone DDS, without ROS: the wire conventions of rmw_cyclonedds_cpp.

- topic `/a/b` is DDS topic `rt/a/b`; type `pkg/msg/Name` is `pkg::msg::dds_::Name_`;
- samples are XCDR1 little-endian CDR, serialized by the project's typestore (rosbags),
  which copies `uint8[]` image data in one block: cyclonedds-python's own serializer
  packs such a field byte by byte (about 33 ms for a 640x480 frame);
- endpoints carry `typehash=RIHS01_...;` in USER_DATA, as Jazzy's rmw_cyclonedds_cpp
  writes and reads it (Humble's sends none and ignores it);
- a participant that hosts a node says so on `ros_discovery_info` as rmw_cyclonedds_cpp
  does (rmw_dds_common's graph), so `ros2 node list` and `ros2 node info` show the node.

The DDS types registered with Cyclone are generated from the same definitions, so type
names, member names and XTypes type information match what ROS 2 nodes announce.
"""

from __future__ import annotations

import dataclasses
import sys
import threading
import traceback
import types
from collections.abc import Callable
from functools import cache
from typing import Any

import numpy as np
from cyclonedds import _clayer
from cyclonedds.core import (
    Entity,
    InstanceState,
    Policy,
    Qos,
    ReadCondition,
    SampleState,
    ViewState,
    WaitSet,
)
from cyclonedds.domain import DomainParticipant
from cyclonedds.idl import IdlStruct
from cyclonedds.idl import types as idl
from cyclonedds.pub import DataWriter
from cyclonedds.sub import DataReader
from cyclonedds.topic import Topic
from cyclonedds.util import duration
from rosbags.typesys.store import Typestore

from compressed_perception.ros.messages import (
    DEFAULT_DISTRO,
    GID,
    GID_SIZE,
    NODE_ENTITIES_INFO,
    PARTICIPANT_ENTITIES_INFO,
    typestore,
)

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
_ANY_STATE = SampleState.Any | ViewState.Any | InstanceState.Any
_WAIT = duration(seconds=1)  # a waitset wait; close() wakes it at once anyway
# rmw_cyclonedds_cpp's graph topic: no `rt/` prefix, reliable, transient local, keep last 1
DISCOVERY_TOPIC = "ros_discovery_info"

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
def idl_type(msgtype: str, distro: str = DEFAULT_DISTRO) -> type[IdlStruct]:
    """An IdlStruct with the ROS 2 DDS name and members of `msgtype` (for registration only)."""
    store = typestore(distro)
    _, fields = store.fielddefs[msgtype]
    annotations = {name: _idl_field(desc, distro) for name, desc in fields}

    def body(namespace: dict[str, Any]) -> None:
        namespace["__annotations__"] = annotations
        namespace["__module__"] = __name__

    cls = types.new_class(
        msgtype.replace("/", "_"), (IdlStruct,), {"typename": dds_type_name(msgtype)}, body
    )
    return dataclasses.dataclass(cls)


def _idl_field(desc: Any, distro: str) -> Any:
    """rosbags field descriptor (nodetype, details) -> cyclonedds type annotation."""
    kind, details = desc
    if kind == 1:  # BASE: (name, string bound)
        name, bound = details
        return idl.bounded_str[bound] if name == "string" and bound else _BASE[name]
    if kind == 2:  # NAME: nested message
        return idl_type(details, distro)
    inner, length = details
    if kind == 3:  # ARRAY
        return idl.array[_idl_field(inner, distro), length]
    return idl.sequence[_idl_field(inner, distro)]  # SEQUENCE


def qos(
    reliable: bool, depth: int, msgtype: str, store: Typestore, transient_local: bool = False
) -> Qos:
    reliability = (
        Policy.Reliability.Reliable(max_blocking_time=duration(milliseconds=100))
        if reliable
        else Policy.Reliability.BestEffort
    )
    typehash = store.hash_rihs01(msgtype)
    return Qos(
        reliability,
        Policy.History.KeepLast(depth),
        Policy.Durability.TransientLocal if transient_local else Policy.Durability.Volatile,
        Policy.DataRepresentation(use_cdrv0_representation=True),
        Policy.Userdata(data=f"typehash={typehash};".encode()),
    )


@dataclasses.dataclass(frozen=True)
class NodeIdentity:
    """The ROS node a participant hosts, as ROS 2's graph tools will list it."""

    name: str
    namespace: str = "/"
    enclave: str = "/"


class Participant:
    """One DDS domain participant, the topics created on it (one per name) and its endpoints.

    No endpoint has a listener: Cyclone never calls into Python from its own threads. A
    listener invoked by Cyclone's garbage collector (a remote writer's lease running out)
    while its Python object was being torn down crashed the process. Each subscriber
    instead owns a waitset and a receive thread, and `close()` stops those threads
    before it deletes readers, writers, topics and the participant, in that order.

    With a `node`, the participant announces that node and its endpoints' GIDs on
    `ros_discovery_info` as rmw_cyclonedds_cpp does: at creation and whenever an endpoint
    is added or closed. `distro` picks the Gid layout of that message (humble or jazzy).
    """

    def __init__(
        self, domain_id: int, node: NodeIdentity | None = None, distro: str = DEFAULT_DISTRO
    ) -> None:
        self.distro = distro
        self.store = typestore(distro)
        self.node = node
        # rmw_cyclonedds_cpp's participant USER_DATA: Humble's and Jazzy's graph caches only
        # add participants that carry an enclave
        profile = Qos(Policy.Userdata(data=f"enclave={node.enclave};".encode())) if node else None
        self.domain = DomainParticipant(domain_id, qos=profile)
        self._topics: dict[str, Topic] = {}
        self._endpoints: list[RawPublisher | RawSubscriber] = []
        self._lock = threading.Lock()  # endpoints come and go from several threads
        self._announcing = threading.Lock()  # one graph message at a time, the latest last
        self._closed = False
        self._graph: RawPublisher | None = None
        if node:
            self._graph = RawPublisher(
                self, DISCOVERY_TOPIC, PARTICIPANT_ENTITIES_INFO, reliable=True, depth=1,
                transient_local=True, dds_name=DISCOVERY_TOPIC, on_graph=False,
            )  # fmt: skip
            self.announce()

    def __enter__(self) -> Participant:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    @property
    def gid(self) -> bytes:
        return self.domain.guid.bytes

    def topic(self, ros_topic: str, msgtype: str, dds_name: str | None = None) -> Topic:
        if self._closed:
            raise OSError(f"DDS participant closed: cannot create topic {ros_topic}")
        if ros_topic not in self._topics:
            name = dds_name or dds_topic(ros_topic)
            self._topics[ros_topic] = Topic(self.domain, name, idl_type(msgtype, self.distro))
        return self._topics[ros_topic]

    def add(self, endpoint: RawPublisher | RawSubscriber) -> None:
        with self._lock:
            self._endpoints.append(endpoint)
        if endpoint.on_graph:
            self.announce()

    def endpoint_closed(self, endpoint: RawPublisher | RawSubscriber) -> None:
        """Called by an endpoint's close(): the node's graph entry loses it."""
        with self._lock:
            if endpoint in self._endpoints:
                self._endpoints.remove(endpoint)
        if endpoint.on_graph:
            self.announce()

    def graph_entities(self) -> Any:
        """rmw_dds_common/ParticipantEntitiesInfo: this participant, its node, their GIDs."""
        types = self.store.types
        with self._lock:
            endpoints = [e for e in self._endpoints if e.on_graph]

        def gids(kind: str) -> list[Any]:
            return [types[GID](data=_gid(e.gid, self.distro)) for e in endpoints if e.kind == kind]

        nodes = []
        if self.node is not None:
            nodes.append(
                types[NODE_ENTITIES_INFO](
                    node_namespace=self.node.namespace,
                    node_name=self.node.name,
                    reader_gid_seq=gids("reader"),
                    writer_gid_seq=gids("writer"),
                )
            )
        return types[PARTICIPANT_ENTITIES_INFO](
            gid=types[GID](data=_gid(self.gid, self.distro)), node_entities_info_seq=nodes
        )

    def announce(self) -> None:
        """Republish the graph message (keep last 1, transient local: late joiners get it)."""
        with self._announcing:
            if self._graph is not None and not self._closed:
                self._graph.publish(self.graph_entities())

    def close(self) -> None:
        """Readers first (their threads joined), then writers, topics and the participant.

        Nothing is re-announced on the way: the participant's disposal removes it and its
        node from every peer's graph.
        """
        if self._closed:
            return
        self._closed = True
        with self._lock:
            endpoints = list(self._endpoints)
        subscribers = [e for e in endpoints if isinstance(e, RawSubscriber)]
        publishers = [e for e in endpoints if isinstance(e, RawPublisher)]
        for endpoint in [*subscribers, *publishers]:
            endpoint.close()
        for topic in self._topics.values():
            _delete(topic)
        _delete(self.domain)


def _gid(guid: bytes, distro: str) -> np.ndarray:
    """rmw_cyclonedds_cpp's GID: the 16-byte DDS GUID, zero-padded to the distro's size."""
    return np.frombuffer(guid.ljust(GID_SIZE[distro], b"\0"), np.uint8)


def _delete(entity: Entity) -> None:
    """dds_delete now rather than whenever Python collects the wrapper.

    cyclonedds-python deletes an entity in `__del__` only while it is still registered,
    so calling it here makes the wrapper's later collection a no-op.
    """
    entity.__del__()


class _Endpoint:
    """What a writer and a reader share: one ROS topic of one message type, on the graph
    of `participant` (or hidden from it, `on_graph` false)."""

    def __init__(
        self, participant: Participant, ros_topic: str, msgtype: str, on_graph: bool
    ) -> None:
        self.msgtype = msgtype
        self.topic = ros_topic
        self.on_graph = on_graph
        self._participant = participant
        self._store = participant.store


class RawPublisher(_Endpoint):
    """Publishes typestore messages as ROS 2 CDR, bypassing Python-side IDL serialization."""

    kind = "writer"

    def __init__(
        self,
        participant: Participant,
        ros_topic: str,
        msgtype: str,
        reliable: bool,
        depth: int,
        *,
        transient_local: bool = False,
        dds_name: str | None = None,
        on_graph: bool = True,
    ) -> None:
        """`dds_name` replaces the `rt/` topic name; `on_graph`: one of the node's writers."""
        super().__init__(participant, ros_topic, msgtype, on_graph)
        profile = qos(reliable, depth, msgtype, self._store, transient_local)
        self._writer = DataWriter(
            participant.domain, participant.topic(ros_topic, msgtype, dds_name), profile
        )
        self.gid = self._writer.guid.bytes
        self._lock = threading.Lock()  # publish and close from different threads
        self._closed = False
        participant.add(self)

    def publish(self, message: Any) -> None:
        """Write one message; after `close()` this does nothing (the node is shutting down)."""
        payload = encapsulate(self._store.serialize_cdr(message, self.msgtype))
        with self._lock:
            if self._closed:
                return
            result = _clayer.ddspy_write(self._writer._ref, payload)
        if result < 0:
            raise OSError(f"DDS write on {self.topic} ({self.msgtype}) failed with code {result}")

    def subscriber_count(self) -> int:
        return len(self._writer.get_matched_subscriptions())

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            _delete(self._writer)
        self._participant.endpoint_closed(self)


def encapsulate(data: bytes | memoryview) -> bytes:
    """Pad a CDR sample to whole 4-byte units and say so in the encapsulation options.

    Cyclone's own writer and Fast CDR put the number of padding bytes in the low two bits
    of the options (the header's last byte), so a strict reader knows where the data ends.
    """
    padding = -len(data) % 4
    if not padding:
        return bytes(data)
    payload = bytearray(data)
    payload[3] = (payload[3] & ~0x03) | padding
    payload.extend(b"\0" * padding)
    return bytes(payload)


class RawSubscriber(_Endpoint):
    """Calls `callback(message)` from this subscriber's own receive thread, per new sample.

    The thread sleeps in a Cyclone waitset until data arrives or `close()` wakes it.
    """

    kind = "reader"

    def __init__(
        self,
        participant: Participant,
        ros_topic: str,
        msgtype: str,
        callback: Callable[[Any], None],
        reliable: bool,
        depth: int,
        *,
        transient_local: bool = False,
        dds_name: str | None = None,
        on_graph: bool = True,
    ) -> None:
        """Keyword options as for RawPublisher."""
        super().__init__(participant, ros_topic, msgtype, on_graph)
        self._callback = callback
        profile = qos(reliable, depth, msgtype, self._store, transient_local)
        topic = participant.topic(ros_topic, msgtype, dds_name)
        self._reader = DataReader(participant.domain, topic, profile)
        self.gid = self._reader.guid.bytes
        self._condition = ReadCondition(self._reader, _ANY_STATE)
        self._waitset = WaitSet(participant.domain)
        self._waitset.attach(self._condition)
        self._closing = threading.Event()
        self._thread = threading.Thread(
            target=self._receive, name=f"dds-receive {ros_topic}", daemon=True
        )
        participant.add(self)
        self._thread.start()

    def _receive(self) -> None:
        while not self._closing.is_set():
            self._waitset.wait(_WAIT)
            if not self._closing.is_set():
                self._take_all()

    def _take_all(self) -> None:
        while True:
            samples = _clayer.ddspy_take(self._reader._ref, _ANY_STATE, 16)
            if isinstance(samples, int) or not samples:
                return
            for data, info in samples:
                if info.valid_data:
                    self._deliver(data)

    def _deliver(self, data: bytes) -> None:
        """A sample that cannot be decoded, or a failing callback, must not end the thread."""
        try:
            message = self._store.deserialize_cdr(data, self.msgtype)
        except Exception as exc:  # rosbags raises assorted errors on malformed CDR
            warning = f"[WARN] {self.topic}: undecodable {self.msgtype} sample ({exc})"
            print(warning, file=sys.stderr, flush=True)
            return
        try:
            self._callback(message)
        except Exception:
            traceback.print_exc()

    def publisher_count(self) -> int:
        return len(self._reader.get_matched_publications())

    def close(self) -> None:
        """Stop the receive thread, then delete waitset, condition and reader."""
        if self._closing.is_set():
            return
        self._closing.set()
        self._waitset.set_trigger(True)
        if self._thread is not threading.current_thread():
            self._thread.join()
        self._waitset.detach(self._condition)
        for entity in (self._waitset, self._condition, self._reader):
            _delete(entity)
        self._participant.endpoint_closed(self)
