#!/usr/bin/env bash
# The test guest (tools/build-guest.sh) with a stand-in qemu-guest-agent, for
# the snapshot tests' file-system-freeze path.  Output: $OUT/initrd.img, the
# test guest's initramfs followed by a second archive (the kernel unpacks both,
# the later files replacing the earlier) that adds virtio_console.ko (the
# guest's virtio-serial ports) and an "agent": a busybox shell loop on the
# org.qemu.guest_agent.0 port answering guest-sync-delimited,
# guest-fsfreeze-freeze and guest-fsfreeze-thaw as qemu-ga does, and writing
# each freeze and thaw to /tmp/agent.log (no file system is frozen: the
# guest's disks hold none).  The kernel is the test guest's own vmlinuz.
# Usage: build-guest-agent.sh GUEST_DIR OUT.  Idempotent.
set -euo pipefail

GUEST=$(cd "$1" && pwd)
mkdir -p "$2"
OUT=$(cd "$2" && pwd)
SELF="$(cd "$(dirname "$0")" && pwd)/$(basename "$0")"
if [[ -s $OUT/initrd.img && $OUT/initrd.img -nt $SELF && $OUT/initrd.img -nt $GUEST/initrd.img ]]; then
    exit 0
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# The guest kernel's version, from its bzImage header (the string at
# 0x200 + the 16-bit offset at 0x20e).
kver=$(python3 - "$GUEST/vmlinuz" <<'PY'
import struct, sys
data = open(sys.argv[1], "rb").read(65536)
(off,) = struct.unpack_from("<H", data, 0x20E)
print(data[0x200 + off:].split(b" ", 1)[0].decode())
PY
)
(cd "$work" && apt-get download "linux-image-$kver" >/dev/null 2>&1) || {
    apt-get update -qq
    (cd "$work" && apt-get download "linux-image-$kver" >/dev/null)
}
dpkg-deb -x "$work"/linux-image-"$kver"_*.deb "$work/k"

root="$work/root"
mkdir -p "$root/lib/modules" "$root/bin"
cp "$work/k/lib/modules/$kver/kernel/drivers/char/virtio_console.ko" "$root/lib/modules/"
(cd "$work" && zcat "$GUEST/initrd.img" | cpio -i --quiet init)
# Started after the other modules, before the ready line.
awk '/^echo "VMTEST-READY"/ {
        print "insmod /lib/modules/virtio_console.ko"
        print "/bin/agent &"
     } { print }' "$work/init" >"$root/init"
chmod +x "$root/init"

cat >"$root/bin/agent" <<'AGENT'
#!/bin/busybox sh
# The port's device: /dev/vportNpM whose sysfs name is the agent's.
i=0
while [ $i -lt 100 ]; do
    for p in /sys/class/virtio-ports/*; do
        [ "$(cat "$p/name" 2>/dev/null)" = org.qemu.guest_agent.0 ] && dev=/dev/${p##*/}
    done
    [ -n "$dev" ] && [ -e "$dev" ] && break
    sleep 0.1; i=$((i+1))
done
exec <>"$dev" >&0
# A read sees end-of-file while no host client is connected: the port stays
# open (qemu then reports its front end open) and is read again.
while true; do
while read -r line; do
    case $line in
        *guest-sync-delimited*)
            id=$(echo "$line" | sed 's/.*"id": *\([0-9]*\).*/\1/')
            printf '\377{"return": %s}\n' "$id" ;;
        *guest-fsfreeze-freeze*)
            echo frozen >>/tmp/agent.log
            printf '{"return": 1}\n' ;;
        *guest-fsfreeze-thaw*)
            echo thawed >>/tmp/agent.log
            printf '{"return": 1}\n' ;;
        *)
            printf '{"error": {"class": "CommandNotFound", "desc": "no"}}\n' ;;
    esac
done
sleep 0.1
done
AGENT
chmod +x "$root/bin/agent"

(cd "$root" && find . | cpio -o -H newc --quiet | gzip -1) >"$work/overlay.img"
cat "$GUEST/initrd.img" "$work/overlay.img" >"$OUT/initrd.img.tmp"
mv "$OUT/initrd.img.tmp" "$OUT/initrd.img"
echo "build-guest-agent: $OUT (kernel $kver)"
