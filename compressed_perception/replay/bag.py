"""rosbag2 reading and writing (MCAP and sqlite3) without ROS, with clear errors.

A bag is a rosbag2 folder (metadata.yaml and its storage files) or a bare `.mcap` file,
as Foxglove exports them and Jazzy's `ros2 bag play` takes them: topics, types and message
definitions then come from the file's own channel and schema records.

Bags are written into a temporary folder beside the destination and renamed at the end,
so an interrupted run never leaves a bag that looks complete.
"""

from __future__ import annotations

import contextlib
import re
import struct
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from rosbags.interfaces import (
    Connection,
    MessageDefinitionFormat,
    Qos,
    QosDurability,
    QosHistory,
    QosLiveliness,
    QosReliability,
    QosTime,
)
from rosbags.rosbag2 import Reader, ReaderError, StoragePlugin, Writer, WriterError
from rosbags.typesys import (
    Stores,
    TypesysError,
    get_types_from_idl,
    get_types_from_msg,
    get_typestore,
)
from rosbags.typesys.store import Typestore

from compressed_perception.atomic import atomic_path
from compressed_perception.errors import PerceptionError
from compressed_perception.ros.messages import IMAGE_TYPES, typestore

STORAGES = {"mcap": StoragePlugin.MCAP, "sqlite3": StoragePlugin.SQLITE3}
BARE_SUFFIX = ".mcap"  # a storage file that carries its own topics and definitions
_IDL_SEPARATOR = "=" * 80 + "\n"
BAG_VERSION = 8  # read by Humble's and Jazzy's rosbag2 alike
_NO_TIME = QosTime(0, 0)
RELIABLE_QOS = Qos(
    QosHistory.KEEP_LAST,
    10,
    QosReliability.RELIABLE,
    QosDurability.VOLATILE,
    _NO_TIME,
    _NO_TIME,
    QosLiveliness.AUTOMATIC,
    _NO_TIME,
    False,
)


# what rosbags raises on damaged storage: its own errors, and Python's where a truncated
# file ends a parse early (an MCAP holding only its magic bytes raised TypeError)
_DAMAGE = (
    ReaderError,
    OSError,
    KeyError,
    ValueError,
    EOFError,
    TypeError,
    IndexError,
    struct.error,
)


class BagError(PerceptionError):
    """A bag is missing, unreadable, of unknown storage, or lacks a requested topic."""


@contextlib.contextmanager
def open_bag(path: Path) -> Iterator[Reader]:
    path = Path(path)
    storage_of(path)
    try:
        reader = Reader(path)
        reader.open()
    except _DAMAGE as exc:
        raise BagError(f"{path}: cannot open bag ({type(exc).__name__}: {exc})") from exc
    try:
        yield reader
    finally:
        reader.close()


def storage_of(path: Path) -> str:
    """The storage plugin of a bag: metadata.yaml's, or mcap for a bare `.mcap` file."""
    path = Path(path)
    if path.is_file() and path.suffix == BARE_SUFFIX:
        return "mcap"
    if not (path / "metadata.yaml").is_file():
        raise BagError(f"{path}: not a rosbag2 folder (no metadata.yaml) nor a .mcap file")
    found = re.search(r"storage_identifier:\s*(\S+)", (path / "metadata.yaml").read_text())
    storage = found.group(1) if found else ""
    if storage not in STORAGES:
        raise BagError(f"{path}: unknown storage {storage!r} (supported: {', '.join(STORAGES)})")
    return storage


def bag_typestore(reader: Reader) -> Typestore:
    """This package's definitions, plus every other type the bag's own definitions describe.

    A type both define keeps this package's (exactly ROS 2's) definition; a type only the
    bag knows, e.g. a vendor's copy of sensor_msgs/Image, becomes readable.
    """
    store = get_typestore(Stores.EMPTY)
    store.register(typestore().fielddefs)
    for connection in reader.connections:
        if connection.msgtype in store.fielddefs:
            continue
        with contextlib.suppress(TypesysError):  # unparsable: the topic stays unreadable
            types = _definition_types(connection)
            store.register({k: v for k, v in types.items() if k not in store.fielddefs})
    return store


def _definition_types(connection: Connection) -> dict[str, Any]:
    """The types in a connection's stored definition (ROS 2 .msg text or IDL)."""
    definition = connection.msgdef
    if definition.format == MessageDefinitionFormat.MSG:
        return get_types_from_msg(definition.data, connection.msgtype)
    if definition.format != MessageDefinitionFormat.IDL:
        return {}
    text = definition.data
    if text.startswith(f"{_IDL_SEPARATOR}IDL: "):  # several files: "IDL: <name>" each
        sources = [part.split("\n", 1)[1] for part in text.split(_IDL_SEPARATOR)[1:]]
    else:
        sources = [text]
    types: dict[str, Any] = {}
    for source in sources:
        types.update(get_types_from_idl(source))
    return types


def image_kind(store: Typestore, msgtype: str) -> str | None:
    """sensor_msgs/msg/Image or CompressedImage for a type that is one (or has its fields)."""
    ours = typestore()
    for kind in IMAGE_TYPES:
        if msgtype == kind or store.fielddefs.get(msgtype) == ours.fielddefs[kind]:
            return kind
    return None


def image_connections(
    reader: Reader, topics: Sequence[str] | None, path: Path, store: Typestore | None = None
) -> list[Connection]:
    """Connections of the named topics, or of every image topic (see `image_kind`)."""
    store = store or typestore()
    if topics:
        by_topic = {c.topic: c for c in reader.connections}
        missing = [t for t in topics if t not in by_topic]
        if missing:
            have = ", ".join(sorted(by_topic)) or "none"
            raise BagError(f"{path}: no topic {', '.join(missing)} in the bag (topics: {have})")
        chosen = [by_topic[t] for t in topics]
        wrong = [c for c in chosen if image_kind(store, c.msgtype) is None]
        if wrong:
            kinds = ", ".join(f"{c.topic} is {c.msgtype}" for c in wrong)
            raise BagError(f"{path}: not an image topic: {kinds}")
        return chosen
    chosen = [c for c in reader.connections if image_kind(store, c.msgtype) is not None]
    if not chosen:
        raise BagError(f"{path}: no sensor_msgs/Image or CompressedImage topic in the bag")
    return chosen


def messages(reader: Reader, connections: Sequence[Connection], path: Path) -> Iterator[Any]:
    """(connection, log time ns, raw CDR) in log order; storage damage becomes a BagError."""
    try:
        yield from reader.messages(connections=connections)
    except _DAMAGE as exc:
        raise BagError(f"{path}: corrupt or truncated bag ({type(exc).__name__}: {exc})") from exc


class BagWriter:
    """A rosbag2 writer on our typestore, so definitions and hashes are stored with the data."""

    def __init__(self, path: Path, storage: str) -> None:
        if storage not in STORAGES:
            raise BagError(f"{path}: unknown storage {storage!r} (choose {', '.join(STORAGES)})")
        self._writer = Writer(path, version=BAG_VERSION, storage_plugin=STORAGES[storage])
        self._connections: dict[str, Connection] = {}
        self._store = typestore()

    def __enter__(self) -> BagWriter:
        self._writer.open()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        if exc_type is None:
            self._writer.close()
        else:
            self._writer.abort()

    def add_topic(
        self, topic: str, msgtype: str, qos: Qos = RELIABLE_QOS, store: Typestore | None = None
    ) -> None:
        """`store` defines `msgtype` when this package does not (e.g. a bag's own types)."""
        self._connections[topic] = self._writer.add_connection(
            topic, msgtype, typestore=store or self._store, offered_qos_profiles=[qos]
        )

    def write(self, topic: str, log_time_ns: int, message: Any) -> None:
        connection = self._connections[topic]
        self.write_raw(topic, log_time_ns, self._store.serialize_cdr(message, connection.msgtype))

    def write_raw(self, topic: str, log_time_ns: int, data: bytes | memoryview) -> None:
        self._writer.write(self._connections[topic], log_time_ns, data)


@contextlib.contextmanager
def new_bag(path: Path, storage: str, overwrite: bool = False) -> Iterator[BagWriter]:
    """Write a bag at `path` atomically; an existing path is refused unless `overwrite`."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise BagError(f"{path}: output exists (pass --overwrite to replace it)")
    try:
        with atomic_path(path) as tmp, BagWriter(tmp, storage) as writer:
            yield writer
    except WriterError as exc:
        raise BagError(f"{path}: cannot write bag ({exc})") from exc
