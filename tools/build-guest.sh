#!/usr/bin/env bash
# Build the test guest from Debian packages only: a cloud kernel and an
# initramfs made of busybox-static.  Output: $OUT/vmlinuz and $OUT/initrd.img.
#
# The guest's init loads the ACPI button and evdev drivers (and pvpanic, and
# virtio disks and nics), starts busybox acpid with a power-button action,
# waits until acpid has every input device open (a powerdown sent before that
# would be lost), prints the ready marker on the serial console, and runs a
# shell there.  Kernel command-line switches:
#   vmtest.ignore_acpi           the power button does nothing (forced-stop tests)
#   vmtest.poweroff_after=SECS   the guest powers itself off after SECS seconds
#   vmtest.shutdown_delay=SECS   the power button powers off only after SECS
# Idempotent: does nothing when the output is newer than this script.
set -euo pipefail

OUT=${1:-"$(cd "$(dirname "$0")/.." && pwd)/.cache/guest"}
SELF="$(cd "$(dirname "$0")" && pwd)/$(basename "$0")"
if [[ -s $OUT/vmlinuz && -s $OUT/initrd.img && $OUT/initrd.img -nt $SELF ]]; then
    exit 0
fi
mkdir -p "$OUT"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# The versioned kernel package behind the cloud-kernel metapackage.
resolve() {
    apt-cache depends linux-image-cloud-amd64 2>/dev/null |
        awk '/Depends: linux-image-[0-9]/ {print $2; exit}'
}
pkg=$(resolve)
if [[ -z $pkg ]]; then  # a fresh machine may have no package lists yet
    apt-get update -qq
    pkg=$(resolve)
fi
[[ -n $pkg ]] || { echo "build-guest: cannot resolve linux-image-cloud-amd64" >&2; exit 1; }
(cd "$work" && apt-get download "$pkg" >/dev/null 2>&1)
dpkg-deb -x "$work"/"$pkg"_*.deb "$work/k"
kver=${pkg#linux-image-}
moddir="$work/k/lib/modules/$kver/kernel"

root="$work/root"
mkdir -p "$root"/{bin,sbin,etc/acpi/PWRF,proc,sys,dev,tmp,lib/modules}
cp /bin/busybox "$root/bin/busybox"
# In load order (busybox insmod resolves no dependencies): ACPI button and
# evdev for acpid, pvpanic (a panic is reported to qemu), virtio disks and nics.
modules="drivers/acpi/button.ko drivers/input/evdev.ko
  drivers/misc/pvpanic/pvpanic.ko drivers/misc/pvpanic/pvpanic-mmio.ko
  drivers/virtio/virtio_ring.ko drivers/virtio/virtio.ko
  drivers/virtio/virtio_pci_modern_dev.ko drivers/virtio/virtio_pci_legacy_dev.ko
  drivers/virtio/virtio_pci.ko drivers/block/virtio_blk.ko
  net/core/failover.ko drivers/net/net_failover.ko drivers/net/virtio_net.ko"
for m in $modules; do
    cp "$moddir/$m" "$root/lib/modules/"
    basename "$m" >>"$root/lib/modules/order"
done

cat >"$root/etc/acpi/PWRF/00000080" <<'ACT'
#!/bin/busybox sh
echo "vmtest: power button pressed" >/dev/console
if grep -q vmtest.ignore_acpi /proc/cmdline; then
    echo "vmtest: ignoring the power button" >/dev/console
    exit 0
fi
for arg in $(cat /proc/cmdline); do
    case $arg in
        vmtest.shutdown_delay=*)  # a guest that takes its time (flushing, say)
            /bin/busybox sleep "${arg#vmtest.shutdown_delay=}" ;;
    esac
done
echo "vmtest: powering off" >/dev/console
/bin/busybox poweroff -f
ACT
chmod +x "$root/etc/acpi/PWRF/00000080"

cat >"$root/init" <<'INIT'
#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in $(cat /lib/modules/order); do
    insmod "/lib/modules/$m"
done
# Wait for the input devices to appear, then for acpid to hold them all.
i=0
while [ -z "$(ls /dev/input/ 2>/dev/null | grep event)" ] && [ $i -lt 100 ]; do
    sleep 0.05; i=$((i+1))
done
acpid -c /etc/acpi -l /tmp/acpid.log
i=0
while [ $i -lt 200 ]; do
    pid=$(pidof acpid)
    want=$(ls /dev/input/ | grep -c event)
    have=$(ls -l /proc/$pid/fd 2>/dev/null | grep -c /dev/input/event)
    [ -n "$pid" ] && [ "$have" -ge "$want" ] && break
    sleep 0.05; i=$((i+1))
done
for arg in $(cat /proc/cmdline); do
    case $arg in
        vmtest.poweroff_after=*)
            secs=${arg#vmtest.poweroff_after=}
            (sleep "$secs"; echo "vmtest: timer powering off" >/dev/console; poweroff -f) &
            ;;
    esac
done
echo "VMTEST-READY"
exec sh </dev/console >/dev/console 2>&1
INIT
chmod +x "$root/init"

(cd "$root" && find . | cpio -o -H newc --quiet | gzip -1) >"$work/initrd.img"
cp "$work/k/boot/vmlinuz-$kver" "$OUT/vmlinuz.tmp" && mv "$OUT/vmlinuz.tmp" "$OUT/vmlinuz"
mv "$work/initrd.img" "$OUT/initrd.img"
echo "build-guest: $OUT (kernel $kver)"
