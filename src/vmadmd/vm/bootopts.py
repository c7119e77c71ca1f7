"""Boot options for one boot: SmartOS's ``vmadm start <uuid> [order=X[,once=Y]]
[cdrom=PATH,MODEL ...] [disk=PATH,MODEL ...]``.

``order``/``once`` become qemu's ``-boot order=X,once=Y``: qemu itself puts
the order back to X at the first reset, so a reboot from inside the guest
(which never leaves qemu) goes back to the normal order, and a new qemu (a
``vmadm reboot``, a later start) gets none of these options anyway.

The CDs and disks are files in the VM's zone root (``cdrom=/install.iso,ide``
is ``<zonepath>/root/install.iso``), and the zone root belongs to the VM's
user, who may have put anything there.  So each is reached the way
``zonefs`` reaches things (one component at a time from a descriptor, no
link followed), looked at through an ``O_PATH`` descriptor before anything
opens it for reading (a FIFO or a device is never opened at all), must be a
regular file with a single link (a hard link to a file its user could not
read is refused), and only then is opened for real, read-only for a CD,
through ``/proc/self/fd`` (the same inode, no path walked again).  qemu gets
the descriptor, never the path.

Standard library only: ``vmadm start`` runs this.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Mapping, Sequence
from typing import Any, Literal, NamedTuple

from vmadmd.errors import InvalidParameter
from vmadmd.vm import props, zonefs

MediaKind = Literal["cdrom", "disk"]
MEDIA_KINDS: tuple[MediaKind, ...] = ("cdrom", "disk")
MAX_MEDIA = 8  # of each kind: qemu's IDE has 4 places, and a boot needs few
PATH_MAX = 1024


class BootMedium(NamedTuple):
    """A CD or a disk for one boot: its path in the zone root and its model."""

    kind: MediaKind
    path: str
    model: str


class BootOptions(NamedTuple):
    """What one boot is given beyond the VM's own properties."""

    order: str | None = None
    once: str | None = None
    media: tuple[BootMedium, ...] = ()

    @property
    def boot(self) -> str | None:
        """The order as the ``boot`` property spells it, if one is given."""
        if self.order is None:
            return None
        return f"order={self.order}" + (f",once={self.once}" if self.once else "")

    @classmethod
    def from_args(cls, args: Sequence[str]) -> BootOptions:
        """SmartOS's ``key=value`` arguments of ``vmadm start``."""
        order: tuple[str, str | None] | None = None
        media: list[BootMedium] = []
        for arg in args:
            key, sep, value = arg.partition("=")
            if not sep:
                raise InvalidParameter(f"start options are key=value, not {arg[:60]!r}")
            if key == "order":
                if order is not None:
                    raise InvalidParameter("order can be given only once")
                order = props.parse_boot(f"order={value}", "order")
            elif key in MEDIA_KINDS:
                path, comma, model = value.rpartition(",")
                if not comma or not path or not model:
                    raise InvalidParameter(f"{key} must be PATH,MODEL (e.g. {key}=/image.iso,ide)")
                media.append(_medium(key, path, model))
            else:
                raise InvalidParameter(
                    f"unknown start option {key[:40]!r}: order=X[,once=Y], cdrom=PATH,MODEL "
                    "or disk=PATH,MODEL"
                )
        return _checked(order, media)

    @classmethod
    def from_json(cls, data: object) -> BootOptions:
        """The API's form: ``{"order": "cd,once=d", "cdrom": [{"path", "model"}],
        "disk": [...]}``, every member optional."""
        if not isinstance(data, Mapping):
            raise InvalidParameter("start options must be a JSON object")
        unknown = set(data) - {"order", "cdrom", "disk", "action"}
        if unknown:
            raise InvalidParameter(f"unknown start option {sorted(unknown)[0][:40]!r}")
        order = None
        if data.get("order") is not None:
            if not isinstance(data["order"], str):
                raise InvalidParameter('order must be a string, e.g. "cd,once=d"')
            order = props.parse_boot(f"order={data['order']}", "order")
        media: list[BootMedium] = []
        for kind in MEDIA_KINDS:
            given = data.get(kind, [])
            if not isinstance(given, list):
                raise InvalidParameter(f'{kind} must be a list of {{"path", "model"}}')
            for item in given:
                if not isinstance(item, Mapping) or set(item) != {"path", "model"}:
                    raise InvalidParameter(f'each {kind} is {{"path": PATH, "model": MODEL}}')
                media.append(_medium(kind, item["path"], item["model"]))
        return _checked(order, media)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.order is not None:
            out["order"] = self.order + (f",once={self.once}" if self.once else "")
        for kind in MEDIA_KINDS:
            items = [{"path": m.path, "model": m.model} for m in self.media if m.kind == kind]
            if items:
                out[kind] = items
        return out


def _medium(kind: MediaKind, path: object, model: object) -> BootMedium:
    if model not in props.DISK_MODELS:
        raise InvalidParameter(f"{kind} model must be one of {', '.join(props.DISK_MODELS)}")
    if not isinstance(path, str) or not path.startswith("/") or "\0" in path:
        raise InvalidParameter(
            f"{kind} path must be absolute, within the VM's zone root (/image.iso)"
        )
    if len(path) > PATH_MAX:
        raise InvalidParameter(f"{kind} path is longer than {PATH_MAX} characters")
    if ".." in path.split("/"):
        raise InvalidParameter(f"{kind} path {path[:80]!r} leaves the zone root (..)")
    if not _names(path):
        raise InvalidParameter(f"{kind} path {path[:80]!r} names no file")
    return BootMedium(kind, path, str(model))


def _checked(order: tuple[str, str | None] | None, media: list[BootMedium]) -> BootOptions:
    for kind in MEDIA_KINDS:
        if sum(1 for m in media if m.kind == kind) > MAX_MEDIA:
            raise InvalidParameter(f"at most {MAX_MEDIA} {kind} options")
    return BootOptions(order[0] if order else None, order[1] if order else None, tuple(media))


def _names(path: str) -> list[str]:
    return [n for n in path.split("/") if n not in ("", ".")]


def open_media(zonepath: str, media: Sequence[BootMedium]) -> list[int]:
    """Each medium opened in ``<zonepath>/root`` (a CD read-only, a disk
    read-write); the caller closes the fds.  InvalidParameter says which and
    why when one cannot be used."""
    fds: list[int] = []
    try:
        for m in media:  # one at a time: those opened are closed on a refusal
            fd = open_in_zone_root(zonepath, m.path, writable=m.kind == "disk", what=m.kind)
            fds.append(fd)
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return fds


def open_in_zone_root(zonepath: str, path: str, *, writable: bool, what: str) -> int:
    """``path`` within ``<zonepath>/root``, opened as described above."""
    *dirs, name = _names(path)
    shown = f"{what} {path}"
    try:
        dfd = zonefs.open_dir(zonepath, "root", *dirs)
    except FileNotFoundError:
        raise InvalidParameter(f"{shown} does not exist in the VM's zone root") from None
    except OSError as err:
        if err.errno in (errno.ELOOP, errno.ENOTDIR):
            raise InvalidParameter(
                f"{shown}: a directory on its way is a symbolic link or no directory "
                "(links in the zone root are not followed)"
            ) from None
        raise InvalidParameter(f"{shown}: {err.strerror}") from None
    try:
        try:
            pfd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
        except FileNotFoundError:
            raise InvalidParameter(f"{shown} does not exist in the VM's zone root") from None
        except OSError as err:
            raise InvalidParameter(f"{shown}: {err.strerror}") from None
    finally:
        os.close(dfd)
    try:
        st = os.fstat(pfd)
        if stat.S_ISLNK(st.st_mode):
            raise InvalidParameter(f"{shown} is a symbolic link (links in the zone root are "
                                   "not followed)")  # fmt: skip
        if not stat.S_ISREG(st.st_mode):
            raise InvalidParameter(f"{shown} is not a regular file (not opened)")
        if st.st_nlink != 1:
            raise InvalidParameter(
                f"{shown} has {st.st_nlink} hard links: refused (it must be a file of its own)"
            )
        mode = os.O_RDWR if writable else os.O_RDONLY
        try:
            # The very inode looked at, not the path walked again.
            return os.open(f"/proc/self/fd/{pfd}", mode | os.O_NOCTTY | os.O_CLOEXEC)
        except OSError as err:
            raise InvalidParameter(f"{shown}: {err.strerror}") from None
    finally:
        os.close(pfd)
