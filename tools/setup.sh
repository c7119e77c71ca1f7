#!/usr/bin/env bash
# Install everything vmadmd needs on a fresh Debian machine, idempotently:
# Debian packages (qemu, qemu-img, busybox-static, socat, curl, cloud-init,
# mmdebstrap, genisoimage), a venv with the package and its dev tools in
# .venv, noVNC (npm) in .cache/novnc, the test guest in .cache/guest and the
# Debian cloud guest in .cache/debian.  --with-browser adds Debian's chromium and
# chromium-driver, for the browser-console test.
set -euo pipefail
cd "$(dirname "$0")/.."
with_browser=0
[[ ${1:-} == --with-browser ]] && with_browser=1

need=()
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
command -v qemu-img >/dev/null || need+=(qemu-utils)
[[ -x /bin/busybox ]] && dpkg -s busybox-static >/dev/null 2>&1 || need+=(busybox-static)
command -v socat >/dev/null || need+=(socat)
command -v cpio >/dev/null || need+=(cpio)
command -v npm >/dev/null || need+=(npm)
command -v curl >/dev/null || need+=(curl)  # bench_imgadm's floor
command -v cc >/dev/null || need+=(gcc libc6-dev)  # harness/holder.c (the stand-ins' "qemu")
command -v mmdebstrap >/dev/null || need+=(mmdebstrap)      # the Debian e2e guest
command -v genisoimage >/dev/null || need+=(genisoimage)    # its NoCloud seed (bench)
# The install-from-CD test's bootable ISOs (xorriso + isolinux's El Torito and
# hybrid-MBR images, syslinux's ldlinux.c32).
command -v xorriso >/dev/null || need+=(xorriso)
[[ -f /usr/lib/ISOLINUX/isolinux.bin ]] || need+=(isolinux)
[[ -f /usr/lib/syslinux/modules/bios/ldlinux.c32 ]] || need+=(syslinux-common)
command -v ssh >/dev/null || need+=(openssh-client)          # vmadm migrate's transport
[[ -x /usr/sbin/sshd ]] || need+=(openssh-server)            # the migration tests' target host
command -v ip >/dev/null || need+=(iproute2)                 # their network namespace
# cloud-init's own SmartOS client classes drive the metadata tests (Debian
# packages it; it is not on PyPI).  Installed, not run: see below.
new_cloud_init=0
if [[ ! -f /usr/lib/python3/dist-packages/cloudinit/sources/DataSourceSmartOS.py ]]; then
    need+=(cloud-init)
    new_cloud_init=1
fi
if ((with_browser)); then
    command -v chromium >/dev/null || need+=(chromium)
    command -v chromedriver >/dev/null || need+=(chromium-driver)
fi
if ((${#need[@]})); then
    echo "setup: installing ${need[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
    if ((new_cloud_init)); then
        # The tests import its modules; this host must not run it at boot.
        mkdir -p /etc/cloud && touch /etc/cloud/cloud-init.disabled
    fi
fi

if [[ ! -x .venv/bin/python ]]; then
    python3 -m venv .venv
fi
stamp=.venv/.installed
if [[ ! -f $stamp || pyproject.toml -nt $stamp ]]; then
    .venv/bin/pip install -q --upgrade pip >/dev/null
    .venv/bin/pip install -q -e '.[dev]'
    touch "$stamp"
fi

# noVNC, from the npm registry (served by vmadmd --console-listen).
NOVNC_VERSION=1.7.0
if [[ ! -f .cache/novnc/node_modules/@novnc/novnc/core/rfb.js ]]; then
    mkdir -p .cache/novnc
    npm install --silent --no-audit --no-fund --prefix .cache/novnc "@novnc/novnc@$NOVNC_VERSION" >&2
fi
# xterm.js, for the serial console beside the screen on that page.
XTERM_VERSION=5.5.0
if [[ ! -f .cache/xterm/node_modules/@xterm/xterm/lib/xterm.js ]]; then
    mkdir -p .cache/xterm
    npm install --silent --no-audit --no-fund --prefix .cache/xterm "@xterm/xterm@$XTERM_VERSION" >&2
fi

# Byte-compile our sources even where PYTHONDONTWRITEBYTECODE is set: vmadm
# start-up is measured in milliseconds.
.venv/bin/python -m compileall -q src >/dev/null

./tools/build-guest.sh .cache/guest >&2
# The Debian 12 cloud guest of the metadata end-to-end test (~1-2 min, once).
./tools/build-debian-guest.sh .cache/debian >&2

# Where systemd runs, install (not enable) the unit, pointing at this checkout.
if [[ -d /run/systemd/system ]] && command -v systemctl >/dev/null; then
    for unit in vmadmd.service vmadmd-guests.service; do
        sed "s|/opt/vmadmd|$PWD|g" "contrib/$unit" >"/etc/systemd/system/$unit"
    done
    systemctl daemon-reload || true
fi
