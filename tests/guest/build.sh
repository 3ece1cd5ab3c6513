#!/usr/bin/env bash
# Builds the test guest for tests/tests/guest_qemu.rs, tests/tests/guest_pair.rs and the QEMU
# section of the benchmark (tests/src/qemu.rs) from the host's Debian packages:
#   build.sh [OUT [KERNEL_PACKAGE]]
#   OUT/vmlinuz      the kernel KERNEL_PACKAGE points at (default linux-image-amd64, Debian's
#                    6.1; linux-image-6.12-amd64 is the 6.12 one)
#   OUT/initrd.img   busybox-static, socat with its shared libraries, the virtio-vsock modules
#                    of that kernel, vsockt and vsockpair (linked statically) and ./init as /init
# OUT defaults to target/guest. The build is skipped when OUT/inputs.sha256 matches the inputs
# (these files, the kernel version, the package versions, the socat library list).
#
# Needs: the kernel package, busybox-static, socat (tests/run.sh installs them), cc, gzip, and
# cpio (else busybox cpio).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-$here/../../target/guest}
kpkg=${2:-linux-image-amd64}
mkdir -p "$out"
out=$(cd "$out" && pwd)

need() { command -v "$1" >/dev/null || { echo "build.sh: $1 not found ($2)" >&2; exit 1; }; }
need busybox "apt-get install busybox-static"
need socat "apt-get install socat"
need cc "a C compiler (gcc)"
need gzip "apt-get install gzip"

# The kernel the meta-package $kpkg points at; for the default package, else the newest one
# installed.
kver=$(dpkg-query -W -f='${Depends}' "$kpkg" 2>/dev/null |
    grep -o 'linux-image-[0-9][^ ,]*' | head -n 1 | sed 's/^linux-image-//' || true)
if [ "$kpkg" = linux-image-amd64 ] && { [ -z "$kver" ] || [ ! -e "/boot/vmlinuz-$kver" ]; }; then
    kver=$(ls /boot | sed -n 's/^vmlinuz-//p' | sort -V | tail -n 1)
fi
[ -n "$kver" ] && [ -e "/boot/vmlinuz-$kver" ] ||
    { echo "build.sh: no kernel of $kpkg in /boot (apt-get install $kpkg)" >&2; exit 1; }
moddir=/lib/modules/$kver
[ -d "$moddir" ] || { echo "build.sh: $moddir missing" >&2; exit 1; }

modules="virtio_pci_modern_dev virtio_pci_legacy_dev virtio_ring virtio virtio_pci vsock
    vmw_vsock_virtio_transport_common vmw_vsock_virtio_transport"
socat_bin=$(command -v socat)
busybox_bin=$(command -v busybox)

key=$({
    cat "$here/build.sh" "$here/init" "$here/vsockt.c" "$here"/vsockpair*
    echo "$kver"
    stat -c '%s %Y' "/boot/vmlinuz-$kver"
    dpkg-query -W busybox-static socat "linux-image-$kver" 2>/dev/null || true
    stat -c '%s %Y' "$busybox_bin" "$socat_bin"
    ldd "$socat_bin" | sed "s/ (0x[0-9a-f]*)//"
    cc --version | head -n 1
} | sha256sum | cut -d' ' -f1)

exec 9>"$out/.lock"
flock 9
if [ -f "$out/inputs.sha256" ] && [ "$(cat "$out/inputs.sha256")" = "$key" ] &&
    [ -s "$out/vmlinuz" ] && [ -s "$out/initrd.img" ]; then
    echo "guest image up to date in $out"
    exit 0
fi
echo "building the guest image in $out (kernel $kver)"
rm -f "$out/inputs.sha256"

root=$(mktemp -d "$out/root.XXXXXX")
trap 'rm -rf "$root"' EXIT
mkdir -p "$root"/{bin,dev,proc,sys,tmp,lib/modules}

cp "$busybox_bin" "$root/bin/busybox"
for applet in $("$root/bin/busybox" --list); do
    [ -e "$root/bin/$applet" ] || ln -s busybox "$root/bin/$applet"
done

# socat and every library it loads, at the same paths (the dynamic loader included).
cp "$socat_bin" "$root/bin/socat"
ldd "$socat_bin" | grep -o '/[^ ]*' | sort -u | while read -r lib; do
    mkdir -p "$root$(dirname "$lib")"
    cp -L "$lib" "$root$lib"
done
# /lib64 and /lib may be symlinks into /usr on the host; the loader path must resolve.
if [ -e "$root/usr/lib64" ] && [ ! -e "$root/lib64" ]; then ln -s usr/lib64 "$root/lib64"; fi

cc -O2 -Wall -Wextra -Werror -static -o "$root/bin/vsockt" "$here/vsockt.c"
cc -O2 -Wall -Wextra -Werror -static -o "$root/bin/vsockpair" "$here/vsockpair.c" \
    "$here/vsockpair_cases.c"

for m in $modules; do
    f=$(find "$moddir/kernel" -name "$m.ko" -o -name "$m.ko.xz" -o -name "$m.ko.zst" | head -n 1)
    if [ -z "$f" ]; then
        grep -q "/$m.ko" "$moddir/modules.builtin" ||
            { echo "build.sh: module $m neither in $moddir nor built in" >&2; exit 1; }
        continue
    fi
    case $f in
    *.xz) xz -dc "$f" >"$root/lib/modules/$m.ko" ;;
    *.zst) zstd -dcq "$f" >"$root/lib/modules/$m.ko" ;;
    *) cp "$f" "$root/lib/modules/$m.ko" ;;
    esac
done

install -m 0755 "$here/init" "$root/init"
if command -v cpio >/dev/null; then
    cpio_cmd="cpio --null -o -H newc --quiet -R 0:0"
else
    cpio_cmd="$busybox_bin cpio --null -o -H newc"
fi
(cd "$root" && find . -print0 | LC_ALL=C sort -z |
    $cpio_cmd | gzip -1) >"$out/initrd.img.tmp"
cp "/boot/vmlinuz-$kver" "$out/vmlinuz.tmp"
mv "$out/initrd.img.tmp" "$out/initrd.img"
mv "$out/vmlinuz.tmp" "$out/vmlinuz"
echo "$key" >"$out/inputs.sha256"
ls -l "$out/vmlinuz" "$out/initrd.img"
