"""Cyclone DDS endpoint lifetime: a remote writer's lease running out never crashes a process.

When a remote participant vanishes without saying goodbye (killed, or unplugged), Cyclone's
garbage-collector thread unregisters its writers from every matching reader of this process
once its lease expires. With a Python listener on such a reader, that thread called into a
Python object that was being torn down and crashed the process (SIGSEGV, no traceback), one
full test run in two. The subscriber side runs in a child process here so that a crash is a
failed assertion, not a dead test session.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

pytest.importorskip("cyclonedds", reason="the DDS transport needs cyclonedds (pip install)")
pytest.importorskip("rosbags", reason="the DDS transport needs rosbags (python3-rosbags-pip)")

from compressed_perception.ros.dds import LOOPBACK_CONFIG, encapsulate

LEASE_S = 1
WRITER = textwrap.dedent(
    """
    import time
    from compressed_perception.ros.dds import Participant, RawPublisher
    from compressed_perception.ros.messages import make_header
    with Participant({domain}) as participant:
        publisher = RawPublisher(participant, "/lease/header", "std_msgs/msg/Header", True, 10)
        print("writing", flush=True)
        stamp = 0
        while True:  # until SIGKILL: no goodbye, only the lease tells the reader
            stamp += 1
            publisher.publish(make_header(stamp, "lease"))
            time.sleep(0.02)
    """
)
READER = textwrap.dedent(
    """
    import gc, sys, time
    from compressed_perception.ros.dds import Participant, RawSubscriber
    participant = Participant({domain})
    received = [[], [], []]
    subs = [
        RawSubscriber(participant, "/lease/header", "std_msgs/msg/Header", got.append, True, 10)
        for got in received
    ]
    deadline = time.monotonic() + 30
    while not all(received):
        assert time.monotonic() < deadline, "no samples from the writer"
        time.sleep(0.05)
    subs[0].close()  # closed before the writer's lease expires
    del subs[2]      # dropped without close: collected whenever Python likes
    gc.collect()
    print("ready", flush=True)
    time.sleep({lease} + 4)  # the writer is killed now; its lease runs out in here
    print("survived", flush=True)
    participant.close()       # subs[1] still open: closed by its participant
    print("closed", flush=True)
    """
)


def _config(folder, lease: bool) -> dict[str, str]:
    text = LOOPBACK_CONFIG
    if lease:
        text = text.replace("<Discovery>", f"<Discovery><LeaseDuration>{LEASE_S}s</LeaseDuration>")
    path = folder / ("lease.xml" if lease else "loopback.xml")
    path.write_text(text)
    return {**os.environ, "CYCLONEDDS_URI": path.as_uri()}


def _spawn(script: str, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, text=True
    )


def _expect(proc: subprocess.Popen, line: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = proc.stdout.readline().strip()
        if got == line:
            return
        assert proc.poll() is None, f"exited with {proc.returncode} before printing {line!r}"
    raise AssertionError(f"no {line!r} within {timeout} s")


@pytest.mark.parametrize("round_", range(3))
def test_writer_lease_expiry_after_subscribers_close_does_not_crash(tmp_path, round_):
    domain = 20 + (os.getpid() + round_) % 80
    writer = _spawn(WRITER.format(domain=domain), _config(tmp_path, lease=True))
    reader = None
    try:
        _expect(writer, "writing")
        reader = _spawn(READER.format(domain=domain, lease=LEASE_S), _config(tmp_path, False))
        _expect(reader, "ready")
        writer.send_signal(signal.SIGKILL)
        writer.wait(timeout=10)
        _expect(reader, "survived", timeout=LEASE_S + 20)
        _expect(reader, "closed", timeout=20)
        assert reader.wait(timeout=20) == 0
    finally:
        for proc in (writer, reader):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.mark.parametrize(("size", "options"), [(8, 0), (9, 3), (10, 2), (11, 1), (12, 0)])
def test_cdr_padding_is_declared_in_the_encapsulation_options(size, options):
    header = b"\x00\x01\x00\x00"
    data = encapsulate(header + bytes(range(size - 4)))
    assert len(data) % 4 == 0
    assert data[:3] == header[:3]
    assert data[3] & 0x03 == options
    assert data[size:] == b"\0" * options
