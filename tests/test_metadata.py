"""SmartOS's guest metadata service: the protocol, the agent, cloud-init's clients.

The protocol functions are tested on bytes; the agent in process against
the stand-in (a real holder process standing for qemu, real unix sockets),
with cloud-init's own client classes (Debian's cloud-init package, as
``tools/setup.sh`` installs it) playing the guest: they are the judge of
every answer's framing, checksum and encoding.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from harness.standin import ServedVm
from vmadmd.daemon import metadata as md
from vmadmd.daemon.mdagent import Bucket, LineReader, MetadataAgent
from vmadmd.errors import InvalidParameter
from vmadmd.vm import qemu
from vmadmd.vm.sockets import Peer, bind_unix
from vmadmd.vm.store import Store, VmPaths

from .conftest import Env, RunVm, bios_payload, guest_payload

UUID = "7e3c1c7a-5a8e-4c0e-9f0a-2d6b1f3e4a01"
OTHER = "7e3c1c7a-5a8e-4c0e-9f0a-2d6b1f3e4a02"
CLOUD_INIT = "/usr/lib/python3/dist-packages"

RECORD: dict[str, Any] = {
    "uuid": UUID,
    "alias": "web",
    "hostname": "web01",
    "dns_domain": "example.org",
    "resolvers": ["192.0.2.53"],
    "routes": {"10.9.0.0/16": "192.0.2.254", "10.8.0.0/16": "nics[0]"},
    "nics": [
        {"mac": "52:54:00:12:34:56", "ip": "192.0.2.10", "netmask": "255.255.255.0",
         "gateway": "192.0.2.1", "nic_tag": "admin", "netdev": "tap", "ifname": "vm5tap0"},
        {"mac": "52:54:00:12:34:57", "ip": "dhcp"},
    ],
    "customer_metadata": {
        "user-script": "#!/bin/sh\necho hi\n",
        "cloud-init:user-data": "#cloud-config\nhostname: x\n",
        "root_authorized_keys": "ssh-ed25519 AAAA test",
        "looks_pw": "customer copy (never served)",
        "acme:key": "customer copy (never served)",
        "dotted": ".first\nsecond\n.third",
    },
    "internal_metadata": {"root_pw": "s3cret", "acme:key": "internal", "other": "hidden",
                          "operator-script": "#!/bin/sh\necho operator\n"},
    "internal_metadata_namespaces": ["acme"],
    "tags": {"role": "web", "weight": 3, "nested": {"a": 1}},
}  # fmt: skip


def v2(reqid: str, cmd: str, arg: str | None = None) -> bytes:
    body = f"{reqid} {cmd}" + (f" {base64.b64encode(arg.encode()).decode()}" if arg else "")
    return f"V2 {len(body)} {md.crc32_hex(body)} {body}".encode()


def reply(raw: bytes) -> tuple[str, str, str | None]:
    """(reqid, code, decoded payload) of a V2 reply, its framing checked."""
    assert raw.endswith(b"\n")
    _, length, crc, body = raw.decode().rstrip("\n").split(" ", 3)
    assert int(length) == len(body)
    assert crc == md.crc32_hex(body)
    assert len(crc) == 8
    parts = body.split(" ")
    payload = base64.b64decode(parts[2]).decode() if len(parts) > 2 else None
    return parts[0], parts[1], payload


def ask(line: bytes, record: dict[str, Any] | None = None) -> bytes | md.Change | None:
    parsed = md.parse_line(line)
    if parsed is None or isinstance(parsed, bytes):
        return parsed
    return md.answer(parsed, record if record is not None else RECORD)


# -- the protocol, on bytes -------------------------------------------------------


def test_bare_lines_and_negotiation() -> None:
    for line in (b"", b"   ", b"\r", b" GET user-script", b"GET", b"GET  ", b"NEGOTIATE"):
        assert ask(line) == b"invalid command\n", line
    assert ask(b"NEGOTIATE V2") == b"V2_OK\n"
    assert ask(b"NEGOTIATE V2\r") == b"V2_OK\n"
    assert ask(b"NEGOTIATE V3") == b"FAILURE\n"
    assert ask(b"BOGUS x") == b"FAILURE\n"
    assert ask(b"PUT a b") == b"FAILURE\n", "V1 cannot write"


def test_v1_get_escapes_leading_dots_and_lists_keys() -> None:
    assert ask(b"GET dotted") == b"SUCCESS\n..first\nsecond\n..third\n.\n"
    assert ask(b"GET nope") == b"NOTFOUND\n"
    assert ask(b"GET sdc:hostname") == b"SUCCESS\nweb01\n.\n"
    listed = ask(b"KEYS")
    assert isinstance(listed, bytes)
    assert listed.startswith(b"SUCCESS\nuser-script\n")


def test_v2_frames_with_a_wrong_length_or_checksum_are_dropped() -> None:
    good = v2("0a1b2c3d", "GET", "user-script")
    assert reply(ask(good))[:2] == ("0a1b2c3d", "SUCCESS")  # type: ignore[arg-type]
    _, length, crc, body = good.decode().split(" ", 3)
    assert ask(f"V2 {int(length) + 1} {crc} {body}".encode()) is None
    assert ask(f"V2 {length} {int(crc, 16) ^ 1:08x} {body}".encode()) is None
    assert ask(f"V2 {length} {crc.upper()} {body}".encode()) is None
    assert ask(f"V2 0 {md.crc32_hex('')} ".encode()) is None
    assert ask(b"V2") is None
    assert ask(b"V2 garbage") is None


def test_v2_get_routes_keys_as_smartos_does() -> None:
    def get(key: str) -> tuple[str, str | None]:
        out = ask(v2("00000001", "GET", key))
        assert isinstance(out, bytes)
        rid, code, payload = reply(out)
        assert rid == "00000001"
        return code, payload

    assert get("user-script") == ("SUCCESS", "#!/bin/sh\necho hi\n")
    assert get("cloud-init:user-data") == ("SUCCESS", "#cloud-config\nhostname: x\n")
    assert get("root_pw") == ("SUCCESS", "s3cret")  # *_pw: internal
    assert get("looks_pw") == ("NOTFOUND", None)  # never the customer's copy
    assert get("acme:key") == ("SUCCESS", "internal")  # an internal namespace
    assert get("other") == ("NOTFOUND", None)  # internal, not served as plain
    assert get("sdc:uuid") == ("SUCCESS", UUID)
    assert get("sdc:alias") == ("SUCCESS", "web")
    assert get("sdc:dns_domain") == ("SUCCESS", "example.org")
    assert get("sdc:tags.role") == ("SUCCESS", "web")
    assert get("sdc:tags.weight") == ("SUCCESS", "3")
    assert get("sdc:tags.nested") == ("FAILURE", None)  # an object: SmartOS fails it
    assert get("sdc:tags.nope") == ("NOTFOUND", None)
    assert get("sdc:zonepath") == ("NOTFOUND", None)  # nothing of the host's layout
    assert get("sdc:operator-script") == ("SUCCESS", "#!/bin/sh\necho operator\n")
    assert get("sdc:resolvers") == ("SUCCESS", '["192.0.2.53"]')
    code, routes = get("sdc:routes")
    assert code == "SUCCESS"
    assert json.loads(routes or "") == [
        {"linklocal": False, "dst": "10.9.0.0/16", "gateway": "192.0.2.254"},
        {"linklocal": True, "dst": "10.8.0.0/16", "gateway": "192.0.2.10"},
    ]
    code, nics = get("sdc:nics")
    assert code == "SUCCESS"
    first, second = json.loads(nics or "")
    assert first["interface"] == "net0"
    assert first["mac"] == "52:54:00:12:34:56"
    assert first["ips"] == ["192.0.2.10/24"]
    assert first["gateways"] == ["192.0.2.1"]
    assert first["primary"] is True
    assert first["mtu"] == 1500
    assert "ifname" not in first
    assert "netdev" not in first
    assert second["interface"] == "net1"
    assert second["ips"] == ["dhcp"]
    assert second["primary"] is False
    out = ask(v2("00000002", "GET"))
    assert isinstance(out, bytes)
    assert reply(out)[1:] == ("FAILURE", "Invalid GET Request")
    out = ask(v2("00000003", "FROB"))
    assert isinstance(out, bytes)
    assert reply(out)[1:] == ("FAILURE", "Unknown command FROB")


def test_keys_lists_customer_keys_then_internal_ones() -> None:
    out = ask(v2("00000004", "KEYS"))
    assert isinstance(out, bytes)
    assert reply(out)[2] == "\n".join(
        ["user-script", "cloud-init:user-data", "root_authorized_keys", "dotted",
         "root_pw", "acme:key"]
    )  # fmt: skip


def put(key: str, value: str) -> bytes:
    arg = f"{base64.b64encode(key.encode()).decode()} {base64.b64encode(value.encode()).decode()}"
    return v2("0000000a", "PUT", arg)


def test_writes_land_where_smartos_puts_them() -> None:
    for line, why in (
        (put("sdc:hostname", "x"), 'Cannot update the "sdc" Namespace.'),
        (put("acme:key", "x"), 'Cannot update the "acme" Namespace.'),
        (v2("0000000a", "DELETE", "sdc:uuid"), 'Cannot update the "sdc" Namespace.'),
        (v2("0000000a", "DELETE", "acme:key"), 'Cannot update the "acme" Namespace.'),
        (v2("0000000a", "PUT", "onlyone"), "Invalid PUT Request"),
        (v2("0000000a", "DELETE"), "Invalid DELETE Request"),
    ):
        out = ask(line)
        assert isinstance(out, bytes)
        assert reply(out)[1:] == ("FAILURE", why)
    change = ask(put("new", "value"))
    assert isinstance(change, md.Change)
    assert (change.which, change.key, change.value) == ("customer_metadata", "new", "value")
    for key in ("db_pw", "operator-script"):
        change = ask(put(key, "v"))
        assert isinstance(change, md.Change)
        assert change.which == "internal_metadata"
    out = ask(put("new", ""))  # no value at all: a malformed PUT, as in SmartOS
    assert isinstance(out, bytes)
    assert reply(out)[1:] == ("FAILURE", "Invalid PUT Request")
    record = json.loads(json.dumps(RECORD))
    md.apply_change(record, md.Change(change.request, "customer_metadata", "k", "v"))
    md.apply_change(record, md.Change(change.request, "internal_metadata", "db_pw", "p"))
    md.apply_change(record, md.Change(change.request, "customer_metadata", "user-script", None))
    assert record["customer_metadata"]["k"] == "v"
    assert "user-script" not in record["customer_metadata"]
    assert record["internal_metadata"]["db_pw"] == "p"
    # Within the metadata bounds, the record untouched beyond them.
    before = json.dumps(record)
    with pytest.raises(InvalidParameter, match="256 KiB"):
        md.apply_change(record, md.Change(change.request, "customer_metadata", "big",
                                          "x" * (300 << 10)))  # fmt: skip
    with pytest.raises(InvalidParameter, match="keys must be"):
        md.apply_change(record, md.Change(change.request, "customer_metadata", "k" * 200, "v"))
    assert json.dumps(record) == before


def test_lines_are_bounded_and_requests_rate_limited() -> None:
    reader = LineReader(limit=16)
    assert reader.feed(b"GET a\nGET ") == [b"GET a"]
    assert reader.feed(b"b\n" + b"x" * 40) == [b"GET b"]
    assert reader.feed(b"y" * 40 + b"\nKEYS\n") == [b"KEYS"]  # the long one dropped whole
    assert reader.overlong == 1
    assert reader.feed(b"z" * 17 + b"\n") == []
    assert reader.overlong == 2
    bucket = Bucket(rate=100.0, burst=5)
    waits = [bucket.take() for _ in range(10)]
    assert waits[:5] == [0.0] * 5
    assert 0 < waits[5] < waits[9] <= 0.06


def test_logged_guest_text_is_escaped() -> None:
    assert md.printable("a\x1b[2J\nb" + "c" * 100) == "a\\x1b[2J\\nb" + "c" * 73 + "..."


def test_qemu_gets_the_port_and_smartos_identity() -> None:
    vm = {"uuid": UUID, "ram": 128, "vcpus": 1, "alias": "a"}
    argv = qemu.build_argv(vm, VmPaths("/z"), "qemu", "tcg", disk_fds=[])
    assert "socket,id=ttyb,path=vm.ttyb,server=on,wait=off" in argv
    assert argv[argv.index("socket,id=ttyb,path=vm.ttyb,server=on,wait=off") + 2] == (
        "chardev:ttyb"
    )
    # ttyS0 stays the console: the first -serial.
    serials = [argv[i + 1] for i, a in enumerate(argv) if a == "-serial"]
    assert serials == ["chardev:serial0", "chardev:ttyb"]
    smbios = argv[argv.index("-smbios") + 1]
    assert smbios == (f"type=1,manufacturer=Joyent,product=SmartDC HVM,serial={UUID},uuid={UUID}")


# -- the agent, in process, with cloud-init's clients ----------------------------------


def cloudinit() -> Any:
    """cloud-init's SmartOS datasource module (Debian's package)."""
    if CLOUD_INIT not in sys.path:
        sys.path.append(CLOUD_INIT)
    try:
        from cloudinit.sources import DataSourceSmartOS  # type: ignore[import-not-found]
    except ImportError:
        pytest.skip("cloud-init is not installed (tools/setup.sh installs it)")
    return DataSourceSmartOS


class SerialFile:
    """A guest's serial device over a socket, as cloud-init's serial client
    uses pyserial's: ``read(1)`` with a ``timeout`` (b"" when it passes)."""

    def __init__(self, sock: socket.socket, timeout: float = 5.0) -> None:
        self.sock = sock
        self.sock.setblocking(True)
        self.timeout = timeout

    def read(self, n: int) -> bytes:
        self.sock.settimeout(self.timeout)
        try:
            return self.sock.recv(n)
        except TimeoutError:
            return b""

    def write(self, data: bytes) -> int:
        self.sock.sendall(data)
        return len(data)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.sock.close()


def serial_client(sock: socket.socket, legacy: bool = False) -> Any:
    """cloud-init's KVM client on ``sock``, opened as cloud-init opens it (a
    bare newline until ``invalid command``, then ``NEGOTIATE V2``)."""
    ds = cloudinit()
    cls = ds.JoyentMetadataLegacySerialClient if legacy else ds.JoyentMetadataSerialClient
    client = cls("/dev/ttyS1", timeout=5)
    client.fp = SerialFile(sock)
    client.open_transport()
    return client


class Guest:
    """A zones root with VMs, each served by the stand-in, each with its agent."""

    def __init__(self, root: Path) -> None:
        self.store = Store(str(root / "zones"))
        self.served: list[ServedVm] = []
        self.agents: list[MetadataAgent] = []

    async def boot(self, uuid: str, record: dict[str, Any]) -> tuple[MetadataAgent, socket.socket]:
        """The VM's stand-in, its agent, and the guest's end of its ttyS1."""
        paths = self.store.create(uuid, {**record, "uuid": uuid})
        served = await ServedVm.start(paths.runtime_dir, uuid)
        self.served.append(served)
        agent = MetadataAgent(uuid, self.store, Peer.of(served.holder.pid))
        self.agents.append(agent)
        agent.start()
        sock = await asyncio.wait_for(served.ttyb.get(), 5)
        return agent, sock

    async def close(self) -> None:
        for agent in self.agents:
            await agent.close()
        for served in self.served:
            await served.close()


@pytest.fixture
async def guest_rig(tmp_path: Path) -> AsyncIterator[Guest]:
    rig = Guest(tmp_path)
    try:
        yield rig
    finally:
        await rig.close()


async def in_thread(fn: Callable[[], Any]) -> Any:
    return await asyncio.wait_for(asyncio.to_thread(fn), 30)


async def test_cloud_init_reads_and_writes_through_the_agent(guest_rig: Guest) -> None:
    ds = cloudinit()
    _, sock = await guest_rig.boot(UUID, json.loads(json.dumps(RECORD)))
    client = await in_thread(lambda: serial_client(sock, legacy=True))
    assert await in_thread(lambda: client.get("sdc:uuid", strip=True)) == UUID
    assert await in_thread(lambda: client.get("user-script")) == "#!/bin/sh\necho hi\n"
    assert await in_thread(lambda: client.get("root_pw")) == "s3cret"
    assert await in_thread(lambda: client.get("nope")) is None
    nics = await in_thread(lambda: client.get_json("sdc:nics"))
    routes = await in_thread(lambda: client.get_json("sdc:routes"))
    # cloud-init's own conversion takes our sdc:nics as SmartOS's.
    config = ds.convert_smartos_network_data(
        network_data=nics, dns_servers=["192.0.2.53"], dns_domain="example.org", routes=routes
    )
    net0 = config["config"][0]
    assert (net0["name"], net0["mac_address"], net0["mtu"]) == (
        "net0", "52:54:00:12:34:56", 1500)  # fmt: skip
    assert net0["subnets"][0]["address"] == "192.0.2.10/24"
    assert net0["subnets"][0]["gateway"] == "192.0.2.1"
    assert config["config"][1]["subnets"] == [{"type": "dhcp4"}]
    # Customer keys, then internal ones (vm.json keeps each map's keys sorted).
    assert await in_thread(client.list) == [
        "cloud-init:user-data", "dotted", "root_authorized_keys", "user-script", "acme:key",
        "root_pw",
    ]  # fmt: skip
    # Writes: to vm.json, read back by the next request.
    assert await in_thread(lambda: client.put("from-guest", "hello")) == "OK"
    assert await in_thread(lambda: client.put("db_pw", "pw")) == "OK"
    record = guest_rig.store.load(UUID)
    assert record["customer_metadata"]["from-guest"] == "hello"
    assert record["internal_metadata"]["db_pw"] == "pw"
    assert await in_thread(lambda: client.get("from-guest")) == "hello"
    assert await in_thread(lambda: client.delete("from-guest")) == "OK"
    assert "from-guest" not in guest_rig.store.load(UUID)["customer_metadata"]
    # Refused writes: SmartOS's words, vm.json unchanged.
    before = guest_rig.store.load(UUID)
    assert await in_thread(lambda: client.put("sdc:hostname", "evil")) is None
    assert await in_thread(lambda: client.put("acme:key", "evil")) is None
    assert await in_thread(lambda: client.delete("acme:key")) is None
    assert guest_rig.store.load(UUID) == before
    # An operator's change is seen by the very next request (no restart).
    guest_rig.store.update(
        UUID, lambda vm: vm["customer_metadata"].update({"user-script": "#!/bin/sh\nnew\n"})
    )
    assert await in_thread(lambda: client.get("user-script")) == "#!/bin/sh\nnew\n"
    sock.close()


async def test_a_refusal_carries_smartos_words(guest_rig: Guest) -> None:
    _, sock = await guest_rig.boot(UUID, json.loads(json.dumps(RECORD)))
    await in_thread(lambda: serial_client(sock))

    def exchange(line: bytes) -> tuple[str, str, str | None]:
        sock.settimeout(5)
        sock.sendall(line + b"\n")
        return reply(recv_until(sock, b"\n"))

    answer = await in_thread(lambda: exchange(put("sdc:hostname", "evil")))
    assert answer[1:] == ("FAILURE", 'Cannot update the "sdc" Namespace.')
    answer = await in_thread(lambda: exchange(v2("0000000b", "DELETE", "acme:key")))
    assert answer[1:] == ("FAILURE", 'Cannot update the "acme" Namespace.')
    sock.close()


def recv_until(sock: socket.socket, marker: bytes, timeout: float = 10) -> bytes:
    sock.settimeout(timeout)
    got = b""
    while marker not in got:
        chunk = sock.recv(65536)
        assert chunk, f"closed before {marker!r}: {got[-200:]!r}"
        got += chunk
    return got


async def test_bad_frames_are_dropped_and_the_next_answered(guest_rig: Guest) -> None:
    _, sock = await guest_rig.boot(UUID, json.loads(json.dumps(RECORD)))
    good = v2("0c0c0c0c", "GET", "sdc:hostname")
    _, length, crc, body = good.decode().split(" ", 3)
    bad_crc = f"V2 {length} {int(crc, 16) ^ 0xFF:08x} {body}\n".encode()
    bad_len = f"V2 {int(length) - 1} {crc} {body}\n".encode()

    def scenario() -> bytes:
        sock.setblocking(True)
        sock.sendall(bad_crc + bad_len + b"\n" + good + b"\n")
        return recv_until(sock, b"0c0c0c0c")

    got = await in_thread(scenario)
    # One "invalid command" for the bare line, nothing for the bad frames.
    first, second = got.split(b"\n", 1)
    assert first == b"invalid command"
    assert reply(second)[1:] == ("SUCCESS", "web01")
    sock.close()


async def test_a_flood_costs_bounded_memory_and_spares_other_vms(guest_rig: Guest) -> None:
    flooded, flood_sock = await guest_rig.boot(UUID, {"alias": "flood"})
    _, sock = await guest_rig.boot(OTHER, json.loads(json.dumps(RECORD)))
    stop = False

    def flood() -> int:
        """Megabytes with no newline, then a storm of bare lines; never reads."""
        flood_sock.setblocking(True)
        flood_sock.settimeout(0.5)
        sent = 0
        junk = b"\x1b[2J" + os.urandom(65532).replace(b"\n", b"x")
        lines = b"\n" * 65536
        while not stop:
            try:
                sent += flood_sock.send(junk if sent < (8 << 20) else lines)
            except TimeoutError:
                continue  # the agent stopped reading: the guest's port is full
            except OSError:
                break
        return sent

    flooding = asyncio.ensure_future(asyncio.to_thread(flood))
    await asyncio.sleep(1.0)
    client = await in_thread(lambda: serial_client(sock))
    t_start = time.monotonic()
    took = []
    for _ in range(20):
        t0 = time.perf_counter()
        assert await in_thread(lambda: client.get("sdc:hostname")) == "web01"
        took.append(time.perf_counter() - t0)
    stop = True
    sent = await flooding
    elapsed = time.monotonic() - t_start + 1.0
    took.sort()
    assert took[len(took) // 2] < 0.05, took  # the other VM's answers stay quick
    assert sent >= 8 << 20
    # The flooded VM was served at its rate, not more.
    assert flooded.lines <= 50 + 200 * (elapsed + 0.5), (flooded.lines, elapsed)
    assert flooded.lines >= 100, "the bare lines were answered, at the rate"
    flood_sock.close()
    sock.close()


async def test_writes_are_rate_bounded(guest_rig: Guest) -> None:
    """A guest's PUTs (each a vm.json rewrite) come at most WRITE_RATE a
    second past a burst, whatever the guest sends; reads are not held up."""
    _, sock = await guest_rig.boot(UUID, {"alias": "writer"})
    guest_rig.agents[-1]._writes = Bucket(50.0, 5)  # 50 a second, for a quick test
    lines = b"".join(put(f"k{i}", "v") + b"\n" for i in range(30))

    def scenario() -> float:
        sock.setblocking(True)
        t0 = time.monotonic()
        sock.sendall(lines)
        got = b""
        while got.count(b"\n") < 30:
            got += recv_until(sock, b"\n")
        return time.monotonic() - t0

    took = await in_thread(scenario)
    assert took >= (30 - 5) / 50 * 0.9, took
    assert len(guest_rig.store.load(UUID)["customer_metadata"]) == 30
    sock.close()


async def test_long_lines_are_parsed_at_a_bounded_byte_rate(guest_rig: Guest) -> None:
    """Lines as long as allowed, as fast as a socket takes them (a guest that
    took over its qemu writes faster than any UART): parsed at BYTE_RATE."""
    from vmadmd.daemon import mdagent

    _, sock = await guest_rig.boot(UUID, {"alias": "long"})
    line = b"GET " + b"k" * (md.MAX_LINE - 8) + b"\n"
    count = 8

    def scenario() -> float:
        sock.setblocking(True)
        t0 = time.monotonic()
        sock.sendall(line * count)
        got = b""
        while got.count(b"\n") < count:
            got += recv_until(sock, b"\n", timeout=30)
        assert got == b"NOTFOUND\n" * count
        return time.monotonic() - t0

    took = await in_thread(scenario)
    floor = (count * len(line) - mdagent.BYTE_BURST) / mdagent.BYTE_RATE
    assert took >= floor * 0.9, (took, floor)
    sock.close()


async def test_a_planted_ttyb_is_refused(tmp_path: Path) -> None:
    """A socket at vm.ttyb that the VM's qemu does not serve gets no byte."""
    store = Store(str(tmp_path / "zones"))
    paths = store.create(UUID, {"uuid": UUID, "customer_metadata": {"k": "v"}})
    os.makedirs(paths.runtime_dir, exist_ok=True)
    planted = bind_unix(os.path.join(paths.runtime_dir, qemu.TTYB_NAME))
    planted.settimeout(3)
    holder = await asyncio.create_subprocess_exec("sleep", "30")
    agent = MetadataAgent(UUID, store, Peer.of(holder.pid))
    agent.start()
    try:
        conn, _ = await asyncio.to_thread(planted.accept)
        with contextlib.suppress(BrokenPipeError):  # closed already, as it should be
            conn.sendall(b"GET k\n")
        conn.settimeout(3)
        try:
            said = await asyncio.to_thread(conn.recv, 100)
        except ConnectionResetError:
            said = b""
        assert said == b"", "closed, nothing said"
        assert agent.served == 0
        conn.close()
    finally:
        await agent.close()
        holder.kill()
        await holder.wait()
        planted.close()


async def test_the_supervisor_runs_the_agent_for_its_vm(tmp_path: Path) -> None:
    """Hooked into VmSupervisor: started with the VM, closed when it ends."""
    from tests.test_inprocess import Rig

    rig = Rig(tmp_path)
    try:
        rig.store.update(rig_uuid(rig), lambda vm: vm.update(customer_metadata={"k": "v"}))
        served = await rig.serve()
        sup, settled = rig.supervisor()
        sock = await asyncio.wait_for(served.ttyb.get(), 5)
        client = await in_thread(lambda: serial_client(sock))
        assert await in_thread(lambda: client.get("k")) == "v"
        served.kill()
        await asyncio.wait_for(settled, 10)
        assert sup.metadata._closed
        sock.close()
    finally:
        await rig.close()


def rig_uuid(rig: Any) -> str:
    from tests.test_inprocess import UUID as RIG_UUID

    return RIG_UUID


# -- vmadm update: SmartOS's set_/remove_ for every map the guest reads ----------------


def test_vmadm_update_sets_and_removes_internal_metadata_and_tags(env: Env) -> None:
    uuid = env.create(bios_payload(tags={"keep": 1, "old": "x"}))
    payload = {
        "set_internal_metadata": {"root_pw": "a", "acme:k": "v"},
        "set_tags": {"role": "db"},
        "remove_tags": ["old"],
        "set_customer_metadata": {"user-script": "#!/bin/sh\n"},
    }
    res = env.vmadm("update", uuid, "-f", "-", input=json.dumps(payload))
    assert res.returncode == 0, res.stderr
    vm = env.get(uuid)
    assert vm["internal_metadata"] == {"root_pw": "a", "acme:k": "v"}
    assert vm["tags"] == {"keep": 1, "role": "db"}
    assert vm["customer_metadata"] == {"user-script": "#!/bin/sh\n"}
    res = env.vmadm("update", uuid, "-f", "-",
                    input=json.dumps({"remove_internal_metadata": ["root_pw"]}))  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert env.get(uuid)["internal_metadata"] == {"acme:k": "v"}
    for bad in ({"set_tags": ["x"]}, {"remove_internal_metadata": "root_pw"},
                {"set_internal_metadata": {"k": "x" * (300 << 10)}}):  # fmt: skip
        res = env.vmadm("update", uuid, "-f", "-", input=json.dumps(bad))
        assert res.returncode == 1, bad
        assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert env.get(uuid)["internal_metadata"] == {"acme:k": "v"}


# -- a real qemu: the guest's own ttyS1 ---------------------------------------------------

RELAY = "relay.sock"


def test_cloud_init_through_a_real_guests_ttyS1(
    env: Env, running_vm: RunVm, guest: dict[str, str]
) -> None:
    """The busybox test guest relays its ttyS1 (the metadata port) to a
    third serial port the test holds; cloud-init's client, on that port,
    talks to the daemon's agent through the guest's real UART.  The guest's
    DMI says SmartOS's identity."""
    from .test_operator import SerialClient

    payload = guest_payload(guest, customer_metadata={"user-script": "#!/bin/sh\nid\n"},
                            hostname="meta01")  # fmt: skip
    payload["qemu_extra_opts"] += (
        f" -chardev socket,id=relay,path={RELAY},server=on,wait=off -serial chardev:relay"
    )
    uuid = running_vm(payload, ready=True)

    async def relay() -> None:
        async with SerialClient(env, uuid) as console:
            await console.until(b"VMTEST-READY")
            await console.type(
                b"D=/sys/class/dmi/id; echo dmi=$(cat $D/product_name)/$(cat $D/sys_vendor)"
                b"/$(cat $D/product_serial)\n"
                b"stty -F /dev/ttyS1 raw -echo; stty -F /dev/ttyS2 raw -echo; "
                b"cat /dev/ttyS2 >/dev/ttyS1 & cat /dev/ttyS1 >/dev/ttyS2 & echo relay-$((6*7))\n"
            )
            await console.until(b"relay-42")
            assert f"dmi=SmartDC HVM/Joyent/{uuid}".encode() in console.seen, console.seen

    asyncio.run(relay())
    from vmadmd.vm.sockets import connect_unix

    sock = connect_unix(str(env.runtime(uuid)), RELAY)
    try:
        client = serial_client(sock, legacy=True)
        assert client.get("sdc:uuid", strip=True) == uuid
        assert client.get("sdc:hostname") == "meta01"
        assert client.get("user-script") == "#!/bin/sh\nid\n"
        assert client.list() == ["user-script"]
        nics = client.get_json("sdc:nics")
        assert nics == []
        # A vmadm update is seen by the guest's next request; its PUT by vmadm get.
        res = env.vmadm("update", uuid, "-f", "-",
                        input=json.dumps({"set_customer_metadata": {"k": "v1"}}))  # fmt: skip
        assert res.returncode == 0, res.stderr
        assert client.get("k") == "v1"
        assert client.put("from-guest", "hello") == "OK"
        assert env.get(uuid)["customer_metadata"]["from-guest"] == "hello"
        # A daemon restarted while the VM runs serves it again (found at start-up).
        # (What the guest sends while no daemon holds the port, qemu drops:
        # once the new daemon holds it, the client resynchronises as cloud-init
        # does on opening the port.)
        env.stop_daemon()
        env.start_daemon()
        second = env.tmp / f"vmadmd.{len(env.daemons) - 1}.log"
        env.wait_for(lambda: "metadata port connected" in second.read_text(), 15,
                     "the new daemon's agent on vm.ttyb")  # fmt: skip
        client.open_transport()
        assert client.get("from-guest") == "hello"
    finally:
        sock.close()
