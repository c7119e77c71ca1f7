"""``imgadm``: the images VMs are made from, as SmartOS's ``imgadm`` manages them.

Sources (IMGAPI servers) in the imgadm conf; images imported from them or
installed from local files into the images dir (``vm/images.py``: the
layout, the checks, the atomic install); listing, deleting, vacuuming; and
``create``, which makes an image of a stopped VM's first disk.

Success messages are SmartOS's, on stdout, since automation (Ansible's
``community.general.imgadm``) matches them there.  A failure is one line on
stderr in SmartOS's form, ``imgadm: error (Code): message``, and exit 1;
exit 3 when the image is not installed (``ImageNotInstalled``), as SmartOS.
Pools (``-P``) are accepted and ignored: one images dir serves the host.

Standard library only; what a command needs is imported when it runs.
"""

from __future__ import annotations

import sys

from vmadmd.errors import InvalidParameter, VmadmError

TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse
    from collections.abc import Callable, Sequence
    from typing import Any, NoReturn

    from vmadmd.vm.config import VmSettings
    from vmadmd.vm.images import ImageStore, Manifest
    from vmadmd.vm.imgapi import Conf

DEFAULT_COLUMNS = "uuid,name,version,os,type,pub"
DEFAULT_SORT = "published_at,name"
STRING_FIELDS = ("name", "version", "description", "os", "homepage")


class UsageError(VmadmError):
    code = "Usage"
    status = 400


class NoSources(VmadmError):
    code = "NoSources"
    status = 409


class Context:
    def __init__(self, conf_override: str | None) -> None:
        from vmadmd.vm.config import VmSettings

        self.settings: VmSettings = VmSettings.from_env()
        self._conf_override = conf_override

    @property
    def store(self) -> ImageStore:
        from vmadmd.vm.images import ImageStore

        return ImageStore(self.settings.images, self.settings.zones_root)

    @property
    def conf(self) -> Conf:
        from vmadmd.vm.imgapi import Conf, conf_path

        return Conf(self._conf_override or conf_path(self.settings.images))


def _out(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _print_json(data: Any) -> None:
    import json

    sys.stdout.write(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _uuid(value: str) -> str:
    from vmadmd.vm.ids import is_uuid

    if not is_uuid(value):
        raise UsageError(f'"{value}" is not a UUID (lower-case canonical form)')
    return value


def _label(manifest: Manifest | None) -> str:
    from vmadmd.vm.images import label

    return label(manifest)


# -- sources ---------------------------------------------------------------------------


def cmd_sources(ctx: Context, args: argparse.Namespace) -> None:
    from vmadmd.vm import imgapi

    conf = ctx.conf
    if args.add and args.delete:
        raise UsageError("give -a or -d, not both")
    if args.add:
        url = imgapi.check_url(args.add)
        if args.type not in imgapi.SOURCE_TYPES:
            raise UsageError(f'"{args.type}" image sources are not supported here (imgapi only)')
        with conf.editing() as data:
            if any(imgapi.same_url(s["url"], url) for s in data["sources"]):
                _out(f'Already have "{args.type}" image source "{url}", no change')
                return
            if not args.force:
                imgapi.ping(url)
            data["sources"].append({"url": url, "type": args.type})
        _out(f'Added "{args.type}" image source "{url}"')
        return
    if args.delete:
        url = args.delete
        with conf.editing() as data:
            gone = [s for s in data["sources"] if imgapi.same_url(s["url"], url)]
            if not gone:
                _out(f'Do not have image source "{url}", no change')
                return
            data["sources"] = [s for s in data["sources"] if s not in gone]
        _out(f'Deleted "{gone[0].get("type", "imgapi")}" image source "{url}"')
        return
    sources = conf.sources()
    if args.json:
        _print_json([{"url": s["url"], "type": s.get("type", "imgapi")} for s in sources])
        return
    for s in sources:
        _out(f"{s['url']}  {s.get('type', 'imgapi')}" if args.list else s["url"])


def _sources_shim(argv: list[str]) -> list[str]:
    """Ansible's imgadm module removes a source with ``cmd += ' -d %s' % source``
    on an argv list, which passes ``-d URL`` as one argument per character.
    ``sources`` takes no positional arguments, so single characters after it
    can only be that: they are joined and split again on spaces."""
    if not argv or argv[0] != "sources":
        return argv
    rest = [a for a in argv[1:] if a != "-f"]
    if len(rest) >= 4 and all(len(a) == 1 for a in rest):
        joined = "".join(rest).split()
        return ["sources", *(["-f"] if "-f" in argv[1:] else []), *joined]
    return argv


# -- listing ---------------------------------------------------------------------------


def _row(manifest: Manifest, **extra: Any) -> dict[str, Any]:
    row = dict(manifest)
    published = manifest.get("published_at")
    if isinstance(published, str):
        row["published_date"] = row["pub"] = published[:10]
        row["published"] = published.split(".")[0].rstrip("Z") + "Z"
    row.update(extra)
    return row


def _table(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    from vmadmd.cli import select

    rows = [r for r in rows if select.matches(r, select.parse_filters(args.filters))]
    rows = select.sort(rows, select.field_list(args.s or DEFAULT_SORT, ()))
    columns = select.field_list(args.o or DEFAULT_COLUMNS, ())
    cells = [[select.text(r.get(c)) for c in columns] for r in rows]
    table = cells if args.H else [[c.upper() for c in columns], *cells]
    if not cells:
        return
    widths = [max(len(r[i]) for r in table) for i in range(len(columns))]
    for line in table:
        _out("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip())


def cmd_list(ctx: Context, args: argparse.Namespace) -> None:
    store = ctx.store
    infos = [i for i in (store.info(u) for u in store.installed()) if i is not None]
    needs_clones = args.o is not None and "clones" in args.o.split(",")
    users = store.users() if needs_clones or args.j else {}
    for info in infos:
        info["clones"] = len(users.get(info["manifest"]["uuid"], []))
    if args.j:
        from vmadmd.cli import select

        filters = select.parse_filters(args.filters)
        _print_json([i for i in infos if select.matches(_row(i["manifest"]), filters)])
        return
    rows = [_row(i["manifest"], zpool=i["zpool"], clones=i["clones"]) for i in infos]
    _table(rows, args)


def _avail(ctx: Context) -> list[dict[str, Any]]:
    from vmadmd.vm import imgapi

    sources = ctx.conf.sources()
    if not sources:
        raise NoSources("imgadm has no image sources: add one with `imgadm sources -a URL`")
    seen: set[str] = set()
    out = []
    for source in sources:
        for manifest in imgapi.list_images(source["url"]):
            if manifest["uuid"] not in seen:
                seen.add(manifest["uuid"])
                out.append({"manifest": manifest, "source": source["url"]})
    return out


def cmd_avail(ctx: Context, args: argparse.Namespace) -> None:
    found = _avail(ctx)
    if args.j:
        _print_json(found)
        return
    _table([_row(i["manifest"], source=i["source"]) for i in found], args)


def cmd_show(ctx: Context, args: argparse.Namespace) -> None:
    uuid = _uuid(args.uuid)
    found = _find(ctx, uuid)
    _print_json(found[0])


def cmd_get(ctx: Context, args: argparse.Namespace) -> None:
    from vmadmd.vm.images import ImageNotInstalled

    uuid = _uuid(args.uuid)
    info = ctx.store.info(uuid)
    if info is None:
        raise ImageNotInstalled(f'image "{uuid}" was not found on zpool "{args.P}"')
    _print_json(info)


# -- import / install ------------------------------------------------------------------


def _find(ctx: Context, uuid: str) -> tuple[Manifest, str]:
    """The manifest of an active ``uuid`` from the first source that has it."""
    from vmadmd.vm import imgapi
    from vmadmd.vm.images import ActiveImageNotFound, SourceError

    sources = ctx.conf.sources()
    if not sources:
        raise NoSources("imgadm has no image sources: add one with `imgadm sources -a URL`")
    failures: list[SourceError] = []
    for source in sources:
        try:
            manifest = imgapi.get_manifest(source["url"], uuid)
        except SourceError as err:
            failures.append(err)
            continue
        if manifest is None or manifest.get("state", "active") != "active":
            continue
        if manifest.get("disabled") is True:
            continue
        return manifest, source["url"]
    if failures:
        raise failures[0]
    raise ActiveImageNotFound(f'an active image "{uuid}" was not found in image sources')


def _already(ctx: Context, uuid: str) -> bool:
    if ctx.store.data_file(uuid) is None:
        return False
    _out(f"Image {uuid} ({_label(ctx.store.manifest(uuid))}) is already installed, skipping")
    return True


def _progress(args: argparse.Namespace, manifest: Manifest) -> Callable[[int], None] | None:
    from vmadmd.vm.images import progress_bar

    if args.quiet:
        return None
    return progress_bar(manifest["files"][0]["size"], _label(manifest))


def cmd_import(ctx: Context, args: argparse.Namespace) -> None:
    from vmadmd.vm import imgapi

    uuid = _uuid(args.uuid)
    store = ctx.store
    if _already(ctx, uuid):
        return
    manifest, url = _find(ctx, uuid)
    _out(f'Importing {uuid} ({_label(manifest)}) from "{url}"')
    with store.lock(uuid):
        # Another import of it may have finished while this one waited.
        if _already(ctx, uuid):
            return
        with imgapi.open_file(url, uuid) as response:
            store.install(manifest, response, _progress(args, manifest))
    _out(f"Imported image {uuid} ({_label(manifest)})")


def cmd_install(ctx: Context, args: argparse.Namespace) -> None:
    from vmadmd.vm.images import read_manifest_file

    manifest = read_manifest_file(args.manifest)
    uuid = manifest["uuid"]
    store = ctx.store
    with store.lock(uuid):
        if _already(ctx, uuid):
            return
        try:
            f = open(args.file, "rb")  # noqa: SIM115 - closed below, after the install
        except OSError as err:
            raise InvalidParameter(f"cannot read image file {args.file}: {err.strerror}") from None
        with f:
            store.install(manifest, f, _progress(args, manifest))
    _out(f"Installed image {uuid} ({_label(manifest)})")


# -- delete / vacuum / update ----------------------------------------------------------


def _in_use(uuid: str, vms: list[str]) -> VmadmError:
    from vmadmd.vm.images import ImageInUse

    return ImageInUse(
        f'image "{uuid}" has dependent clones: VM(s) {", ".join(vms)} use it (delete them first)'
    )


def cmd_delete(ctx: Context, args: argparse.Namespace) -> None:
    from vmadmd.vm.images import ImageNotInstalled

    uuid = _uuid(args.uuid)
    store = ctx.store
    if store.data_file(uuid) is None:
        raise ImageNotInstalled(f'image "{uuid}" was not found on zpool "{args.P}"')
    with store.lock(uuid):
        if store.data_file(uuid) is None:
            raise ImageNotInstalled(f'image "{uuid}" was not found on zpool "{args.P}"')
        users = store.users([uuid]).get(uuid)
        if users:
            raise _in_use(uuid, users)
        store.remove(uuid)
    _out(f"Deleted image {uuid}")


def cmd_vacuum(ctx: Context, args: argparse.Namespace) -> None:
    store = ctx.store
    installed = store.installed()
    used = store.users(installed)
    unused = [u for u in installed if u not in used]
    if unused and not args.force:
        if not sys.stdin.isatty():
            raise UsageError("vacuum asks before deleting: answer on a terminal, or give -f")
        for uuid in unused:
            _out(f"{uuid} ({_label(store.manifest(uuid))})")
        sys.stdout.write(f"Delete {len(unused)} unused images? [y/N] ")
        sys.stdout.flush()
        if sys.stdin.readline().strip().lower() not in ("y", "yes"):
            return
    for uuid in unused:
        with store.lock(uuid):
            if store.data_file(uuid) is None or store.users([uuid]):
                continue  # deleted, or put to use, meanwhile
            name = _label(store.manifest(uuid))
            store.remove(uuid)
        _out(f"Deleted image {uuid} ({name})")
    for uuid in store.leftovers():  # remains of interrupted installs: not images
        with store.lock(uuid):
            store.sweep(uuid)


def cmd_update(ctx: Context, args: argparse.Namespace) -> None:
    from vmadmd.vm import imgapi
    from vmadmd.vm.images import ImageNotInstalled, SourceError

    store = ctx.store
    wanted = [_uuid(u) for u in args.uuids] or store.installed()
    for uuid in wanted:
        if store.data_file(uuid) is None:
            raise ImageNotInstalled(f'image "{uuid}" was not found on zpool "zones"')
    sources = ctx.conf.sources()
    for uuid in wanted:
        local = store.manifest(uuid)
        for source in sources:
            try:
                remote = imgapi.get_manifest(source["url"], uuid)
            except SourceError as err:
                sys.stderr.write(f"imgadm: warning: {err}\n")
                continue
            if remote is None:
                continue
            if local is not None and _sha1(local) != _sha1(remote):
                sys.stderr.write(
                    f"imgadm: warning: {source['url']} has other bits for image {uuid}: kept\n"
                )
                break
            if remote != local:
                with store.lock(uuid):
                    if store.data_file(uuid) is not None:
                        store.replace_manifest(uuid, remote)
                _out(f'Updated image {uuid} ({_label(remote)}) from "{source["url"]}"')
            break


def _sha1(manifest: Manifest) -> object:
    files = manifest.get("files")
    return files[0].get("sha1") if isinstance(files, list) and files else None


# -- create ----------------------------------------------------------------------------


def cmd_create(ctx: Context, args: argparse.Namespace) -> None:
    from vmadmd.vm.imgcreate import create_image

    vm_uuid = _uuid(args.vm_uuid)
    fields: dict[str, Any] = {}
    import json

    for pair in args.fields:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"expected manifest-field=value, not {pair!r}")
        if key in STRING_FIELDS:  # `version=2` is the string "2"
            fields[key] = value
            continue
        try:  # else SmartOS's rule: JSON when it parses, a string otherwise
            fields[key] = json.loads(value)
        except ValueError:
            fields[key] = value
    manifest, manifest_path, file_path = create_image(
        ctx.settings, vm_uuid, fields, args.compression, args.output
    )
    _out(f"Created image {manifest['uuid']} ({_label(manifest)})")
    _out(f"Manifest: {manifest_path}")
    _out(f"Image file: {file_path}")


# -- the parser ------------------------------------------------------------------------


def _pool(c: argparse.ArgumentParser) -> None:
    c.add_argument("-P", default="zones", metavar="POOL", help="accepted and ignored")


def _table_args(c: argparse.ArgumentParser) -> None:
    c.add_argument("-j", "--json", dest="j", action="store_true", help="JSON output")
    c.add_argument("-H", action="store_true", help="no header row")
    c.add_argument("-o", metavar="FIELDS", help=f"columns (default {DEFAULT_COLUMNS})")
    c.add_argument("-s", metavar="FIELDS", help=f"sort (default {DEFAULT_SORT})")
    c.add_argument("filters", nargs="*", metavar="field=value|field=~regex")


def _sources_args(c: argparse.ArgumentParser) -> None:
    c.add_argument("-a", dest="add", metavar="URL", help="add a source")
    c.add_argument("-d", dest="delete", metavar="URL", help="delete a source")
    c.add_argument("-t", dest="type", default="imgapi", help="source type (imgapi)")
    c.add_argument("-l", dest="list", action="store_true", help="list with types")
    c.add_argument("-j", "--json", dest="json", action="store_true", help="list as JSON")
    c.add_argument("-f", dest="force", action="store_true", help="no ping check of a new source")


def _import_args(c: argparse.ArgumentParser) -> None:
    _pool(c)
    c.add_argument("-q", "--quiet", dest="quiet", action="store_true", help="no progress bar")
    c.add_argument("uuid")


def _install_args(c: argparse.ArgumentParser) -> None:
    _pool(c)
    c.add_argument("-q", "--quiet", dest="quiet", action="store_true", help="no progress bar")
    c.add_argument("-m", dest="manifest", required=True, metavar="MANIFEST")
    c.add_argument("-f", dest="file", required=True, metavar="FILE")


def _uuid_pool_args(c: argparse.ArgumentParser) -> None:
    _pool(c)
    c.add_argument("uuid")


def _show_args(c: argparse.ArgumentParser) -> None:
    c.add_argument("uuid")


def _vacuum_args(c: argparse.ArgumentParser) -> None:
    c.add_argument("-f", "--force", dest="force", action="store_true", help="do not ask")


def _update_args(c: argparse.ArgumentParser) -> None:
    _pool(c)
    c.add_argument("uuids", nargs="*", metavar="UUID")


def _create_args(c: argparse.ArgumentParser) -> None:
    c.add_argument("-c", dest="compression", default="none", choices=("none", "gzip", "gz", "xz"),
                   help="compress the image file")  # fmt: skip
    c.add_argument("-o", dest="output", default=".", metavar="DIR|PREFIX",
                   help="where the manifest and file go (default: here)")  # fmt: skip
    c.add_argument("vm_uuid", metavar="VM_UUID")
    c.add_argument("fields", nargs="*", metavar="field=value", help="name=, version=, ...")


if TYPE_CHECKING:
    Command = tuple[str, str, Callable[[Context, argparse.Namespace], None],
                    Callable[[argparse.ArgumentParser], None]]  # fmt: skip
COMMANDS: tuple[Command, ...] = (
    ("sources", "list and edit image sources", cmd_sources, _sources_args),
    ("avail", "images the sources offer", cmd_avail, _table_args),
    ("show", "the manifest of an image a source offers", cmd_show, _show_args),
    ("import", "import an image from the sources", cmd_import, _import_args),
    ("install", "install an image from a manifest and a file", cmd_install, _install_args),
    ("list", "installed images", cmd_list, _table_args),
    ("get", "an installed image, as JSON", cmd_get, _uuid_pool_args),
    ("delete", "remove an installed image no VM uses", cmd_delete, _uuid_pool_args),
    ("vacuum", "remove every image no VM uses", cmd_vacuum, _vacuum_args),
    ("update", "re-read installed images' manifests from the sources", cmd_update,
     _update_args),
    ("create", "an image (manifest and file) from a stopped VM's first disk", cmd_create,
     _create_args),
)  # fmt: skip
ALIASES = {"available": "avail", "info": "get", "destroy": "delete"}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    import argparse

    class _Parser(argparse.ArgumentParser):
        def error(self, message: str) -> NoReturn:
            sys.stderr.write(f"imgadm: error (Usage): {message}\n")
            raise SystemExit(1)

    p = _Parser(prog="imgadm", description="Manage the images VMs are made from.")
    p.add_argument("--imgadm-conf", metavar="FILE", help="the sources file")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for name, helptext, func, setup in COMMANDS:
        if only is not None and name != only:
            continue
        aliases = [a for a, n in ALIASES.items() if n == name]
        c = sub.add_parser(name, help=helptext, description=helptext, aliases=aliases)
        setup(c)
        c.set_defaults(func=func)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args_list = _sources_shim(list(sys.argv[1:] if argv is None else argv))
    known = {c[0] for c in COMMANDS}
    first = next((a for a in args_list if not a.startswith("-")), None)
    if first is not None and first in ALIASES:
        first = ALIASES[first]
    if args_list[:1] == ["--imgadm-conf"] and len(args_list) > 2:
        first = args_list[2]
    args = build_parser(first if first in known else None).parse_args(args_list)
    try:
        args.func(Context(args.imgadm_conf), args)
    except VmadmError as err:
        sys.stderr.write(f"imgadm: error ({err.code}): {err}\n")
        return int(getattr(err, "exit_code", 1))
    except ValueError as err:  # bad settings in the environment
        sys.stderr.write(f"imgadm: error: {err}\n")
        return 1
    except OSError as err:  # the images dir or conf cannot be made or written
        where = f" {err.filename}" if err.filename else ""
        sys.stderr.write(f"imgadm: error:{where}: {err.strerror or err}\n")
        return 1
    except KeyboardInterrupt:
        sys.stderr.write("imgadm: interrupted\n")
        return 1
    except BrokenPipeError:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
