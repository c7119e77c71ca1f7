"""Nics on bridges: a tap per tagged nic, made by the VM layer, over netlink.

A nic with a ``nic_tag`` gets a tap named after its VM and its index
(``vm<8 hex of the uuid>n<index>``, within the 15-character limit), attached
to the bridge the tag maps to (``--nic-tag TAG=BRIDGE`` / ``VMADM_NIC_TAGS``,
as SmartOS maps nic tags to physical links).  The tap is made before qemu
starts (an unprivileged qemu cannot make one; the tap's owner is the uid its
qemu runs as) and removed when qemu exits: by the daemon as it records the
exit, by ``vmadm stop -F`` and ``vmadm delete``, and by the next start if
one was left behind.  pyroute2 speaks netlink; it is imported only when a
VM has tagged nics.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable
from typing import Any

from vmadmd.errors import InvalidParameter, StartFailed


def tap_name(uuid: str, index: int) -> str:
    return f"vm{uuid[:8]}n{index}"


def parse_nic_tags(text: str) -> dict[str, str]:
    """``admin=br0,external=br1`` -> {tag: bridge}."""
    tags: dict[str, str] = {}
    for pair in filter(None, (p.strip() for p in text.split(","))):
        tag, sep, bridge = pair.partition("=")
        if not sep or not tag or not bridge:
            raise InvalidParameter(f"a nic tag is TAG=BRIDGE, not {pair!r}")
        tags[tag] = bridge
    return tags


def tagged_taps(nics: Iterable[Any]) -> list[tuple[str, str]]:
    """(tap name, nic tag) of every nic on a bridge."""
    return [
        (str(nic["ifname"]), str(nic["nic_tag"]))
        for nic in nics
        if isinstance(nic, dict) and nic.get("nic_tag") and nic.get("ifname")
    ]


def create_taps(nics: Iterable[Any], tags: dict[str, str], owner: int | None = None) -> None:
    """Make (again) the tap of every tagged nic, up, on its tag's bridge."""
    wanted = tagged_taps(nics)
    if not wanted:
        return
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        made: list[int] = []
        try:
            for name, tag in wanted:
                bridge = tags.get(tag)
                if bridge is None:
                    raise StartFailed(
                        f"nic tag {tag!r} maps to no bridge (--nic-tag {tag}=BRIDGE, "
                        "VMADM_NIC_TAGS)"
                    )
                found = ipr.link_lookup(ifname=bridge)
                if not found:
                    raise StartFailed(f"bridge {bridge} (nic tag {tag}) does not exist")
                for stale in ipr.link_lookup(ifname=name):
                    ipr.link("del", index=stale)  # left behind by a qemu nobody saw exit
                options: dict[str, Any] = {"ifname": name, "kind": "tuntap", "mode": "tap"}
                if owner is not None:
                    options.update(uid=owner, gid=owner)
                ipr.link("add", **options)
                index = ipr.link_lookup(ifname=name)[0]
                made.append(index)
                ipr.link("set", index=index, master=found[0], state="up")
        except BaseException:
            for index in made:
                with contextlib.suppress(Exception):
                    ipr.link("del", index=index)
            raise


TUNSETIFF = 0x400454CA
IFF_TAP, IFF_NO_PI, IFF_VNET_HDR = 0x0002, 0x1000, 0x4000


def open_tap(name: str) -> int:
    """An fd on the tap ``name`` (made, transient, if it does not exist), for
    qemu's ``-netdev tap,fd=N``: the VM's user needs no access to
    ``/dev/net/tun`` (root's only, on many hosts) and no capability."""
    import fcntl
    import struct

    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    try:
        ifreq = struct.pack("16sH22x", name.encode(), IFF_TAP | IFF_NO_PI | IFF_VNET_HDR)
        fcntl.ioctl(fd, TUNSETIFF, ifreq)
    except OSError as err:
        os.close(fd)
        raise StartFailed(f"cannot open tap {name}: {err.strerror}") from None
    return fd


def remove_taps(nics: Iterable[Any]) -> None:
    """Remove the taps of the tagged nics (those that exist)."""
    names = [name for name, _ in tagged_taps(nics)]
    if not names:
        return
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        for name in names:
            for index in ipr.link_lookup(ifname=name):
                with contextlib.suppress(Exception):
                    ipr.link("del", index=index)
