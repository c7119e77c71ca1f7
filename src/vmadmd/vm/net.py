"""Taps: one per tap nic, named by us, made and removed over netlink.

A nic with a ``nic_tag`` gets a tap attached to the bridge the tag maps to
(``--nic-tag TAG=BRIDGE`` / ``VMADM_NIC_TAGS``, as SmartOS maps nic tags to
physical links); a nic with ``netdev: tap`` and no tag gets a tap of its
own, on no bridge.  The tap is made before qemu starts (an unprivileged qemu
cannot make one; the tap's owner is the uid its qemu runs as) and removed
when qemu exits: by the daemon as it records the exit, by ``vmadm stop -F``
and ``vmadm delete``, and by the next start if one was left behind.

**Names.**  A tap's name is never taken from a payload (``ifname`` in one is
refused): a chosen name could be a host's link, or another VM's live tap,
and root deletes a stale tap of its name at start.  It is derived from the
VM's ``zone_uid``, which the host-wide uid ledger never hands out twice
(``vm/uids.py``), and the nic's index::

    vmt<zone_uid in base 36>n<index>      e.g. vmtx2qxvkn0

at most 3 + 7 + 1 + 4 = 15 characters (IFNAMSIZ - 1) for any uid below 2^32
and up to 10,000 nics.  Two VMs' names therefore never collide, and the
name itself says whose tap it is.  A VM's record keeps the name (``ifname``,
for ``vmadm get`` and the statistics); it is computed again at every start,
so a VM whose record has an older name (``vm<8 hex of its uuid>n<i>``) gets
the derived one, and only a name of the derived form is ever removed.

**What may be deleted.**  Before a link of a tap's name is deleted (left
behind by a qemu nobody saw exit) or opened, it must be a tuntap
(``IFLA_INFO_KIND`` ``tun``) owned by the VM's uid (``IFLA_TUN_OWNER``),
read over netlink (``/sys/class/net`` shows the network namespace sysfs was
mounted in, not necessarily ours).  Anything else there (a veth, a bridge,
another uid's tap) makes the start fail with the link's description, and
nothing is deleted.  pyroute2 speaks netlink; it is imported only when a VM
has taps.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from vmadmd.errors import InvalidParameter, StartFailed

if TYPE_CHECKING:
    from pyroute2 import IPRoute

TAP_PREFIX = "vmt"
IFNAMSIZ = 16
_DIGITS = "0123456789abcdefghijklmnopqrstuvwxyz"


def _base36(n: int) -> str:
    out = ""
    while True:
        n, r = divmod(n, 36)
        out = _DIGITS[r] + out
        if not n:
            return out


def tap_name(uid: int, index: int) -> str:
    """The tap of nic ``index`` of the VM whose zone_uid is ``uid``."""
    name = f"{TAP_PREFIX}{_base36(uid)}n{index}"
    if uid <= 0 or index < 0 or len(name) >= IFNAMSIZ:
        raise InvalidParameter(f"nics[{index}]: no tap name fits uid {uid} and index {index}")
    return name


def uid_of_tap(name: str) -> int | None:
    """The uid a derived tap name was made for, or None for any other name."""
    if not name.startswith(TAP_PREFIX) or len(name) >= IFNAMSIZ:
        return None
    uid36, sep, index = name[len(TAP_PREFIX) :].rpartition("n")
    if not sep or not uid36 or not index.isdigit() or not index.isascii():
        return None
    if any(c not in _DIGITS for c in uid36) or uid36.startswith("0"):
        return None
    uid = int(uid36, 36)
    return uid if uid > 0 and tap_name(uid, int(index)) == name else None


def is_tap(nic: object) -> bool:
    """A nic that has a tap: on a bridge (``nic_tag``) or ``netdev: tap``."""
    return isinstance(nic, dict) and (bool(nic.get("nic_tag")) or nic.get("netdev") == "tap")


def name_taps(nics: Iterable[Any], uid: int) -> None:
    """Give every tap nic its derived name (and ``netdev: tap``), in place;
    a nic without a tap keeps no ``ifname``."""
    for i, nic in enumerate(nics):
        if not isinstance(nic, dict):
            continue
        if is_tap(nic):
            nic.update(netdev="tap", ifname=tap_name(uid, i))
        else:
            nic.pop("ifname", None)


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


def tap_names(nics: Iterable[Any]) -> list[str]:
    """The names of every tap nic's tap (on a bridge or not)."""
    return [str(nic["ifname"]) for nic in nics if is_tap(nic) and nic.get("ifname")]


def _tun_owner(ipr: IPRoute, index: int) -> tuple[str, int | None]:
    """(the link's kind, "" when it has none; its tuntap owner uid, or None)."""
    links = ipr.get_links(index)
    if not links:
        return "", None
    info = links[0].get_attr("IFLA_LINKINFO")
    kind = (info.get_attr("IFLA_INFO_KIND") if info is not None else None) or ""
    data = info.get_attr("IFLA_INFO_DATA") if info is not None and kind == "tun" else None
    owner = data.get_attr("IFLA_TUN_OWNER") if data is not None else None
    return str(kind), owner if isinstance(owner, int) else None


def _stale_taps(ipr: IPRoute, names: Iterable[str], owner: int) -> list[int]:
    """The indexes of the links that bear these names, every one a tuntap
    ``owner`` owns (left behind by its qemu); StartFailed, before anything is
    deleted, when any is something else."""
    stale: list[int] = []
    for name in names:
        if uid_of_tap(name) != owner:
            raise StartFailed(f"tap name {name} is not one of uid {owner}'s: refused")
        for index in ipr.link_lookup(ifname=name):
            kind, tun_owner = _tun_owner(ipr, index)
            if kind != "tun" or tun_owner != owner:
                what = (
                    f"a tuntap owned by {'no uid' if tun_owner is None else f'uid {tun_owner}'}"
                    if kind == "tun"
                    else f"a {kind or 'link'} link"
                )
                raise StartFailed(
                    f"a link named {name} exists and is not this VM's tap ({what}, not "
                    f"uid {owner}'s): nothing deleted, start refused"
                )
            stale.append(index)
    return stale


def create_taps(nics: Iterable[Any], tags: dict[str, str], owner: int) -> None:
    """Make (again) the tap of every tagged nic, owned by ``owner``, up, on its
    tag's bridge.  A link of a tap nic's name that is there already must be a
    tuntap ``owner`` owns (then it is deleted and made anew); anything else
    refuses the start, with nothing deleted."""
    nics = list(nics)
    names = tap_names(nics)
    if not names:
        return
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        bridges: list[tuple[str, int]] = []
        for name, tag in tagged_taps(nics):
            bridge = tags.get(tag)
            if bridge is None:
                raise StartFailed(
                    f"nic tag {tag!r} maps to no bridge (--nic-tag {tag}=BRIDGE, VMADM_NIC_TAGS)"
                )
            found = ipr.link_lookup(ifname=bridge)
            if not found:
                raise StartFailed(f"bridge {bridge} (nic tag {tag}) does not exist")
            bridges.append((name, found[0]))
        for index in _stale_taps(ipr, names, owner):
            ipr.link("del", index=index)  # left behind by a qemu nobody saw exit
        made: list[int] = []
        try:
            for name, bridge_index in bridges:
                ipr.link("add", ifname=name, kind="tuntap", mode="tap", uid=owner, gid=owner)
                index = ipr.link_lookup(ifname=name)[0]
                made.append(index)
                ipr.link("set", index=index, master=bridge_index, state="up")
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
    ``/dev/net/tun`` (root's only, on many hosts) and no capability.
    ``create_taps`` has checked the name first: whatever bears it is the
    VM's own tap (root could attach to anyone's)."""
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


def remove_taps(nics: Iterable[Any], owner: int | None = None) -> None:
    """Remove the taps of the tap nics that exist, and only those: a link is
    deleted when it is a tuntap owned by ``owner`` (by default the uid its
    derived name was made for; a name of no derived form is then left alone)."""
    names = tap_names(nics)
    if not names:
        return
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        for name in names:
            uid = uid_of_tap(name) if owner is None else owner
            if uid is None:
                continue
            for index in ipr.link_lookup(ifname=name):
                with contextlib.suppress(Exception):
                    if _tun_owner(ipr, index) == ("tun", uid):
                        ipr.link("del", index=index)
