"""Ansible's ``community.general.imgadm`` module runs unchanged against our ``imgadm``.

The module parses SmartOS's words (``Added "imgapi" image source``,
``Imported image``, ``is already installed, skipping``, ``Deleted image``,
``ImageNotInstalled`` on stderr, vacuum's empty stdout), so each state is run
twice: changed, then not.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import vmadmd
from harness.imgapi import ImgapiServer, make_disk

from .conftest import Env

PLAYBOOK = """
- hosts: localhost
  gather_facts: false
  tasks:
    - {{name: source, community.general.imgadm: {{source: "{url}", state: present}},
       register: source}}
    - {{name: source again, community.general.imgadm: {{source: "{url}", state: present}},
       register: source_again}}
    - {{name: import, community.general.imgadm: {{uuid: "{uuid}", state: imported}},
       register: imported}}
    - {{name: import again, community.general.imgadm: {{uuid: "{uuid}", state: imported}},
       register: imported_again}}
    - {{name: absent, community.general.imgadm: {{uuid: "{uuid}", state: absent}},
       register: absent}}
    - {{name: absent again, community.general.imgadm: {{uuid: "{uuid}", state: absent}},
       register: absent_again}}
    - {{name: present for vacuum, community.general.imgadm: {{uuid: "{uuid}", state: present}}}}
    - {{name: vacuum, community.general.imgadm: {{uuid: "*", state: vacuumed}},
       register: vacuumed}}
    - {{name: vacuum again, community.general.imgadm: {{uuid: "*", state: vacuumed}},
       register: vacuumed_again}}
    - {{name: update, community.general.imgadm: {{uuid: "*", state: updated}},
       register: updated}}
    - {{name: source absent, community.general.imgadm: {{source: "{url}", state: absent}},
       register: source_absent}}
    - {{name: source absent again,
       community.general.imgadm: {{source: "{url}", state: absent}},
       register: source_absent_again}}
    - name: record
      ansible.builtin.copy:
        dest: "{out}"
        content: "{{{{ dict(source=source.changed, source_again=source_again.changed,
                  imported=imported.changed, imported_again=imported_again.changed,
                  absent=absent.changed, absent_again=absent_again.changed,
                  vacuumed=vacuumed.changed, vacuumed_again=vacuumed_again.changed,
                  updated=updated.changed, source_absent=source_absent.changed,
                  source_absent_again=source_absent_again.changed) | to_json }}}}"
"""


def imgadm_on_path(bindir: Path) -> None:
    """An ``imgadm`` command running this checkout's source (CI's fresh install
    has the console script; the shared dev venv points elsewhere)."""
    src = Path(vmadmd.__file__).resolve().parents[1]
    bindir.mkdir()
    wrapper = bindir / "imgadm"
    wrapper.write_text(
        f'#!/bin/sh\nPYTHONPATH={src} exec {sys.executable} -m vmadmd.cli.imgadm "$@"\n'
    )
    wrapper.chmod(0o755)


def test_ansible_imgadm_module_runs_unchanged(env: Env) -> None:
    import subprocess

    playbook_bin = Path(sys.executable).parent / "ansible-playbook"
    assert playbook_bin.exists(), "ansible is a dev dependency: ./tools/setup.sh installs it"
    disk = env.tmp / "disk.qcow2"
    make_disk(disk, 16, b"ansible")
    bindir = env.tmp / "bin"
    imgadm_on_path(bindir)
    with ImgapiServer(env.tmp / "imgapi") as server:
        uuid = server.publish(disk, compression="gzip")["uuid"]
        out = env.tmp / "changed.json"
        book = env.tmp / "play.yml"
        book.write_text(PLAYBOOK.format(url=server.url, uuid=uuid, out=out))
        t0 = time.monotonic()
        res = subprocess.run(
            [str(playbook_bin), "-i", "localhost,", "-c", "local", str(book)],
            env={**env.environ,
                 "PATH": f"{bindir}:{Path(sys.executable).parent}:{os.environ['PATH']}",
                 "ANSIBLE_PYTHON_INTERPRETER": sys.executable, "ANSIBLE_NOCOLOR": "1",
                 "ANSIBLE_LOCAL_TEMP": str(env.tmp / "ansible-tmp"),
                 "ANSIBLE_HOME": str(env.tmp / "ansible-home")},
            capture_output=True, text=True, timeout=600, check=False,
        )  # fmt: skip
        took = time.monotonic() - t0
        assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
        changed = json.loads(out.read_text())
        assert changed == {
            "source": True, "source_again": False, "imported": True, "imported_again": False,
            "absent": True, "absent_again": False, "vacuumed": True, "vacuumed_again": False,
            "updated": True, "source_absent": True, "source_absent_again": False,
        }, changed  # fmt: skip
        assert server.requests.count(f"/images/{uuid}/file") == 2, "imported twice, no more"
    images = Path(env.zones) / "images"
    assert not (images / f"{uuid}.qcow2").exists(), "vacuumed"
    assert json.loads((images / "imgadm.conf").read_text()) == {"sources": []}
    print(f"ansible playbook: {took:.1f} s")
