# Shared steps of the guest image builders (build.sh, build_forward.sh); sourced, not run.
# The caller sets `tool` (its name, for messages) and `set -euo pipefail`.

need() { command -v "$1" >/dev/null || { echo "$tool: $1 not found ($2)" >&2; exit 1; }; }

# Prints the kernel version KERNEL_PACKAGE points at. For linux-image-amd64 (Debian's base
# kernel, 6.1 on bookworm) whose target is not in /boot, the oldest kernel in /boot: newer
# ones are installed by their own packages (linux-image-6.12-amd64), so the oldest is the base.
guest_kernel() {
    local kpkg=$1 kver
    kver=$(dpkg-query -W -f='${Depends}' "$kpkg" 2>/dev/null |
        grep -o 'linux-image-[0-9][^ ,]*' | head -n 1 | sed 's/^linux-image-//' || true)
    if [ "$kpkg" = linux-image-amd64 ] && { [ -z "$kver" ] || [ ! -e "/boot/vmlinuz-$kver" ]; }; then
        kver=$(ls /boot | sed -n 's/^vmlinuz-//p' | sort -V | head -n 1)
    fi
    [ -n "$kver" ] && [ -e "/boot/vmlinuz-$kver" ] ||
        { echo "$tool: no kernel of $kpkg in /boot (apt-get install $kpkg)" >&2; exit 1; }
    [ -d "/lib/modules/$kver" ] || { echo "$tool: /lib/modules/$kver missing" >&2; exit 1; }
    echo "$kver"
}

# Makes ROOT's directories and busybox with a link per applet.
busybox_root() {
    local root=$1 applet
    mkdir -p "$root"/{bin,dev,proc,sys,tmp,lib/modules}
    cp "$(command -v busybox)" "$root/bin/busybox"
    for applet in $("$root/bin/busybox" --list); do
        [ -e "$root/bin/$applet" ] || ln -s busybox "$root/bin/$applet"
    done
}

# Copies every library BINARY loads (the dynamic loader included) into ROOT at the same path.
copy_libs() {
    local root=$1 bin=$2 lib
    ldd "$bin" | grep -o '/[^ ]*' | sort -u | while read -r lib; do
        [ -e "$root$lib" ] && continue
        mkdir -p "$root$(dirname "$lib")"
        cp -L "$lib" "$root$lib"
    done
    # /lib64 may be a symlink into /usr on the host; the loader path must resolve.
    if [ -e "$root/usr/lib64" ] && [ ! -e "$root/lib64" ]; then ln -s usr/lib64 "$root/lib64"; fi
}

# Copies kernel KVER's modules MODULE... into ROOT/lib/modules, decompressed; a module built
# into the kernel is skipped, a missing one is an error.
copy_modules() {
    local root=$1 kver=$2 m f moddir=/lib/modules/$2
    shift 2
    for m in "$@"; do
        f=$(find "$moddir/kernel" -name "$m.ko" -o -name "$m.ko.xz" -o -name "$m.ko.zst" | head -n 1)
        if [ -z "$f" ]; then
            grep -q "/$m.ko" "$moddir/modules.builtin" ||
                { echo "$tool: module $m neither in $moddir nor built in" >&2; exit 1; }
            continue
        fi
        case $f in
        *.xz) xz -dc "$f" >"$root/lib/modules/$m.ko" ;;
        *.zst) zstd -dcq "$f" >"$root/lib/modules/$m.ko" ;;
        *) cp "$f" "$root/lib/modules/$m.ko" ;;
        esac
    done
}

# Packs ROOT into OUT/initrd.img and copies kernel KVER to OUT/vmlinuz, each replaced whole.
pack_image() {
    local root=$1 kver=$2 out=$3 cpio_cmd
    if command -v cpio >/dev/null; then
        cpio_cmd="cpio --null -o -H newc --quiet -R 0:0"
    else
        cpio_cmd="$(command -v busybox) cpio --null -o -H newc"
    fi
    (cd "$root" && find . -print0 | LC_ALL=C sort -z | $cpio_cmd | gzip -1) >"$out/initrd.img.tmp"
    cp "/boot/vmlinuz-$kver" "$out/vmlinuz.tmp"
    mv "$out/initrd.img.tmp" "$out/initrd.img"
    mv "$out/vmlinuz.tmp" "$out/vmlinuz"
    ls -l "$out/vmlinuz" "$out/initrd.img"
}
