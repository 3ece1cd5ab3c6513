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

tool=build.sh
. "$here/lib.sh"
need busybox "apt-get install busybox-static"
need socat "apt-get install socat"
need cc "a C compiler (gcc)"
need gzip "apt-get install gzip"
kver=$(guest_kernel "$kpkg")

modules="virtio_pci_modern_dev virtio_pci_legacy_dev virtio_ring virtio virtio_pci vsock
    vmw_vsock_virtio_transport_common vmw_vsock_virtio_transport"
socat_bin=$(command -v socat)
busybox_bin=$(command -v busybox)

key=$({
    cat "$here/build.sh" "$here/lib.sh" "$here/init" "$here/vsockt.c" "$here"/vsockpair*
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
busybox_root "$root"
# socat and every library it loads, at the same paths.
cp "$socat_bin" "$root/bin/socat"
copy_libs "$root" "$socat_bin"

cc -O2 -Wall -Wextra -Werror -static -o "$root/bin/vsockt" "$here/vsockt.c"
cc -O2 -Wall -Wextra -Werror -static -o "$root/bin/vsockpair" "$here/vsockpair.c" \
    "$here/vsockpair_cases.c"

# shellcheck disable=SC2086 # a list of names
copy_modules "$root" "$kver" $modules

install -m 0755 "$here/init" "$root/init"
pack_image "$root" "$kver" "$out"
echo "$key" >"$out/inputs.sha256"
