#!/usr/bin/env bash
# Build a Debian 12 (bookworm) cloud guest from Debian packages only, for the
# guest-metadata end-to-end test: a systemd system with cloud-init and
# openssh-server, configured by nothing but what its datasource says.
#
# Output in $OUT: root.qcow2 (an ext4 file system, no partition table: the
# root disk, installed as an image with imgadm; qcow2, so only what the file
# system uses is stored), vmlinuz and initrd.img (direct kernel boot:
# root=/dev/vda).  cloud-init looks for SmartOS (SMBIOS product "SmartDC"),
# then NoCloud (a "cidata" seed), then gives up: nothing else is probed, so a
# boot under TCG spends no time on network datasources.  cloud-init says on
# the serial console when it has finished ("Cloud-init v. ... finished at").
# Idempotent: does nothing when $OUT was built by this very script
# (the stamp holds its hash).  Needs root and mmdebstrap; ~1 min here.
set -euo pipefail

OUT=${1:-"$(cd "$(dirname "$0")/.." && pwd)/.cache/debian"}
SELF="$(cd "$(dirname "$0")" && pwd)/$(basename "$0")"
hash=$(sha256sum "$SELF" | cut -c1-16)
if [[ -s $OUT/root.qcow2 && -s $OUT/vmlinuz && -s $OUT/initrd.img && \
      $(cat "$OUT/.stamp" 2>/dev/null) == "$hash" ]]; then
    exit 0
fi
command -v mmdebstrap >/dev/null || {
    echo "build-debian-guest: mmdebstrap is missing (tools/setup.sh installs it)" >&2
    exit 1
}
mkdir -p "$OUT"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
root="$work/root"

# cloud-init's SmartOS client needs pyserial (a Recommends); ifupdown renders
# the static address from sdc:nics; ping answers the test's network.
mmdebstrap --quiet --variant=apt --mode=root \
    --include=systemd-sysv,udev,kmod,linux-image-cloud-amd64,initramfs-tools,cloud-init \
    --include=python3-serial,openssh-server,ifupdown,iproute2,netbase,iputils-ping \
    --customize-hook='rm -f "$1"/etc/hostname "$1"/etc/ssh/ssh_host_*' \
    bookworm "$root" >&2

cat >"$root/etc/fstab" <<'FSTAB'
/dev/vda / ext4 rw,errors=remount-ro 0 1
FSTAB
cat >"$root/etc/cloud/cloud.cfg.d/90-vmadmd-test.cfg" <<'CFG'
# vmadmd's test guest: SmartOS's metadata service, or a NoCloud seed; nothing else.
datasource_list: [ SmartOS, NoCloud, None ]
# The root disk is a bare file system, as large as the image: nothing to grow.
growpart: {mode: "off"}
resize_rootfs: false
CFG
# No login prompt on the console, no time lost on units a test VM does not need.
ln -sf /dev/null "$root/etc/systemd/system/serial-getty@ttyS0.service"
ln -sf /dev/null "$root/etc/systemd/system/apt-daily.timer"
ln -sf /dev/null "$root/etc/systemd/system/apt-daily-upgrade.timer"
ln -sf /dev/null "$root/etc/systemd/system/e2scrub_reap.service"

kver=$(ls "$root/lib/modules" | head -n1)
cp "$root/boot/vmlinuz-$kver" "$work/vmlinuz"
cp "$root/boot/initrd.img-$kver" "$work/initrd.img"
rm -rf "$root/var/cache/apt/archives"/*.deb "$root/var/lib/apt/lists"/*
truncate -s 2G "$work/root.raw"
mkfs.ext4 -q -F -L root -d "$root" "$work/root.raw"
qemu-img convert -O qcow2 "$work/root.raw" "$work/root.qcow2"
rm -f "$OUT/root.raw"
mv "$work/vmlinuz" "$work/initrd.img" "$work/root.qcow2" "$OUT/"
echo "$hash" >"$OUT/.stamp"
echo "build-debian-guest: $OUT (kernel $kver)" >&2
