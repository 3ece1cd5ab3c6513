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

need() { command -v "$1" >/dev/null || { echo "build_forward.sh: $1 not found ($2)" >&2; exit 1; }; }
need busybox "apt-get install busybox-static"
need objcopy "apt-get install binutils"
need gzip "apt-get install gzip"

kver=$(dpkg-query -W -f='${Depends}' "$kpkg" 2>/dev/null |
    grep -o 'linux-image-[0-9][^ ,]*' | head -n 1 | sed 's/^linux-image-//' || true)
if [ "$kpkg" = linux-image-amd64 ] && { [ -z "$kver" ] || [ ! -e "/boot/vmlinuz-$kver" ]; }; then
    kver=$(ls /boot | sed -n 's/^vmlinuz-//p' | sort -V | head -n 1)
fi
[ -n "$kver" ] && [ -e "/boot/vmlinuz-$kver" ] ||
    { echo "build_forward.sh: no kernel of $kpkg in /boot (apt-get install $kpkg)" >&2; exit 1; }
moddir=/lib/modules/$kver
[ -d "$moddir" ] || { echo "build_forward.sh: $moddir missing" >&2; exit 1; }

exec 9>"$out/.lock"
flock 9
root=$(mktemp -d "$out/root.XXXXXX")
trap 'rm -rf "$root"' EXIT
mkdir -p "$root"/{bin,dev,proc,sys,tmp,lib/modules}
busybox_bin=$(command -v busybox)
cp "$busybox_bin" "$root/bin/busybox"
for applet in $("$root/bin/busybox" --list); do
    [ -e "$root/bin/$applet" ] || ln -s busybox "$root/bin/$applet"
done
for bin in "$@"; do
    objcopy --strip-debug "$bin" "$root/bin/$(basename "$bin")"
    ldd "$bin" | grep -o '/[^ ]*' | sort -u | while read -r lib; do
        [ -e "$root$lib" ] && continue
        mkdir -p "$root$(dirname "$lib")"
        cp -L "$lib" "$root$lib"
    done
done
if [ -e "$root/usr/lib64" ] && [ ! -e "$root/lib64" ]; then ln -s usr/lib64 "$root/lib64"; fi

for m in vsock vmw_vsock_virtio_transport_common vsock_loopback; do
    f=$(find "$moddir/kernel" -name "$m.ko" -o -name "$m.ko.xz" -o -name "$m.ko.zst" | head -n 1)
    if [ -z "$f" ]; then
        grep -q "/$m.ko" "$moddir/modules.builtin" ||
            { echo "build_forward.sh: module $m neither in $moddir nor built in" >&2; exit 1; }
        continue
    fi
    case $f in
    *.xz) xz -dc "$f" >"$root/lib/modules/$m.ko" ;;
    *.zst) zstd -dcq "$f" >"$root/lib/modules/$m.ko" ;;
    *) cp "$f" "$root/lib/modules/$m.ko" ;;
    esac
done
install -m 0755 "$here/init_forward" "$root/init"
if command -v cpio >/dev/null; then
    cpio_cmd="cpio --null -o -H newc --quiet -R 0:0"
else
    cpio_cmd="$busybox_bin cpio --null -o -H newc"
fi
(cd "$root" && find . -print0 | LC_ALL=C sort -z | $cpio_cmd | gzip -1) >"$out/initrd.img.tmp"
cp "/boot/vmlinuz-$kver" "$out/vmlinuz.tmp"
mv "$out/initrd.img.tmp" "$out/initrd.img"
mv "$out/vmlinuz.tmp" "$out/vmlinuz"
ls -l "$out/vmlinuz" "$out/initrd.img"
