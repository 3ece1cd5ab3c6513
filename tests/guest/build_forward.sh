#!/usr/bin/env bash
# Builds the guest of the forwarding-backend tests and benchmark (tests/src/qemu_forward.rs):
#   build_forward.sh OUT KERNEL_PACKAGE BINARY...
#   OUT/vmlinuz     the kernel KERNEL_PACKAGE points at (linux-image-amd64: Debian's 6.1)
#   OUT/initrd.img  busybox-static, BINARY... (debug info stripped) with every library ldd
#                   lists, the vsock modules with the loopback transport, ./init_forward as
#                   /init
# The binaries change with every build, so the image is rebuilt every time (a few seconds).
# Needs: the kernel package, busybox-static, binutils (objcopy), gzip, cpio (else busybox's).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=$1
kpkg=$2
shift 2
mkdir -p "$out"
out=$(cd "$out" && pwd)

tool=build_forward.sh
. "$here/lib.sh"
need busybox "apt-get install busybox-static"
need objcopy "apt-get install binutils"
need gzip "apt-get install gzip"
kver=$(guest_kernel "$kpkg")

exec 9>"$out/.lock"
flock 9
root=$(mktemp -d "$out/root.XXXXXX")
trap 'rm -rf "$root"' EXIT
busybox_root "$root"
for bin in "$@"; do
    objcopy --strip-debug "$bin" "$root/bin/$(basename "$bin")"
    copy_libs "$root" "$bin"
done

copy_modules "$root" "$kver" vsock vmw_vsock_virtio_transport_common vsock_loopback
install -m 0755 "$here/init_forward" "$root/init"
pack_image "$root" "$kver" "$out"
