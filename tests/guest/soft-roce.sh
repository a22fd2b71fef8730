#!/usr/bin/env bash
# Runs programs inside a QEMU guest (software emulation) with real Soft-RoCE: Debian's own kernel,
# the rdma_rxe module, rxe0 on a dummy netdev, and the host's verbs userland. The host kernel here
# has no RDMA, so this is where the RDMA code is tested for real. See ../../shared notes or the
# README of tests/guest.
#
#   soft-roce.sh run CACHE WORK SCRIPT [FILE...]
#       boots a guest whose /init sets up rxe0, copies FILEs to /opt/hetsync (with their shared
#       libraries), runs the shell script SCRIPT there, and prints the guest's console. Exits 0
#       when SCRIPT exited 0 in the guest, 1 otherwise (2 when the guest did not even report).
#       CACHE keeps the downloaded kernel between runs; WORK is scratch.
#
# Needs: qemu-system-x86 rdma-core ibverbs-providers busybox-static iproute2 cpio kmod
# (.ci/install-deps.sh --tests). Under TCG a boot takes 10-20 s; keep guest work small.
set -euo pipefail

log() { echo "soft-roce: $*" >&2; }
die() { log "error: $*"; exit 2; }

cmd=${1:-}
[ "$cmd" = run ] || { echo "usage: soft-roce.sh run CACHE WORK SCRIPT [FILE...]" >&2; exit 2; }
cache=$(realpath -m "$2")
work=$(realpath -m "$3")
script=$(realpath "$4")
shift 4
files=("$@")
timeout_s=${HETSYNC_GUEST_TIMEOUT:-600}

for b in qemu-system-x86_64 busybox cpio gzip; do
  command -v "$b" >/dev/null || die "$b is missing: run .ci/install-deps.sh --tests"
done
[ -x /bin/busybox ] && file -L /bin/busybox 2>/dev/null | grep -q static || true

# --- The guest kernel: Debian's, unpacked from its package (never installed on the host). ---
mkdir -p "$cache"
if ! ls "$cache"/boot/vmlinuz-* >/dev/null 2>&1; then
  pkg=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ { print $2; exit }')
  [ -n "$pkg" ] || die "cannot find the kernel package linux-image-amd64 depends on (apt-get update?)"
  log "downloading $pkg"
  (cd "$cache" && apt-get download "$pkg" 2>&1 | grep -v '^W: Download is performed unsandboxed' || true)
  deb=$(ls "$cache"/"$pkg"_*.deb | head -n1)
  dpkg-deb --fsys-tarfile "$deb" | tar -x -C "$cache" --wildcards './boot/vmlinuz-*' './lib/modules/*'
  rm -f "$deb"
fi
vmlinuz=$(ls "$cache"/boot/vmlinuz-* | head -n1)
kver=${vmlinuz##*/vmlinuz-}
moddir="$cache/lib/modules/$kver/kernel"

# --- The initramfs. ---
rm -rf "$work/root" && mkdir -p "$work/root"
root="$work/root"
mkdir -p "$root"/{usr/bin,usr/sbin,usr/lib,usr/lib64,etc,proc,sys,dev,tmp,opt/hetsync,modules}
for d in bin sbin lib lib64; do ln -s "usr/$d" "$root/$d"; done
cp /bin/busybox "$root/usr/bin/busybox"
for applet in sh mount mkdir cat echo ls sleep poweroff insmod grep sed seq tr head tail \
  wc date env chmod ln sync dmesg hostname uname timeout kill ps; do
  ln -sf busybox "$root/usr/bin/$applet"
done
mknod -m 600 "$root/dev/console" c 5 1
mknod -m 666 "$root/dev/null" c 1 3

copy_with_libs() {
  local f=$1 dest=$2 lib
  cp -L "$f" "$dest"
  # Scripts and static binaries have no libraries: an empty list is fine.
  { ldd "$f" 2>/dev/null || true; } | { grep -o '/[^ ]*' || true; } | while read -r lib; do
    [ -e "$lib" ] || continue
    mkdir -p "$root$(dirname "$lib")"
    [ -e "$root$lib" ] || cp -L "$lib" "$root$lib"
  done
}
mkdir -p "$root/usr/lib64"
cp -L /lib64/ld-linux-x86-64.so.2 "$root/usr/lib64/"
# The verbs userland: rdma and ip from iproute2, the ibverbs utilities, and the rxe provider.
# Copied to the same paths as on the host; iproute2's ip is called by full path in the guest,
# because busybox's own ip applet would shadow it.
for b in rdma ip ibv_devices ibv_devinfo ibv_rc_pingpong; do
  path=$(command -v "$b") || die "$b is missing: run .ci/install-deps.sh --tests"
  copy_with_libs "$path" "$root$path"
done
provider=$(ls /usr/lib/x86_64-linux-gnu/libibverbs/librxe-rdmav*.so | head -n1)
mkdir -p "$root/usr/lib/x86_64-linux-gnu/libibverbs" "$root/etc/libibverbs.d"
copy_with_libs "$provider" "$root$provider"
cp /etc/libibverbs.d/rxe.driver "$root/etc/libibverbs.d/"
for f in "${files[@]}"; do copy_with_libs "$f" "$root/opt/hetsync/$(basename "$f")"; done
cp "$script" "$root/opt/hetsync/test.sh"

# Modules, in load order (crc32_generic is needed by rdma_rxe but missing from modules.dep).
mods=(crypto/crc32_generic.ko net/ipv4/udp_tunnel.ko net/ipv6/ip6_udp_tunnel.ko
  drivers/infiniband/core/ib_core.ko drivers/infiniband/core/ib_uverbs.ko
  drivers/infiniband/sw/rxe/rdma_rxe.ko drivers/net/dummy.ko)
for m in "${mods[@]}"; do
  [ -e "$moddir/$m" ] || die "module $m not in the guest kernel $kver"
  cp "$moddir/$m" "$root/modules/"
done

cat >"$root/init" <<'EOF'
#!/bin/sh
export PATH=/usr/sbin:/usr/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mkdir -p /dev/pts && mount -t devpts devpts /dev/pts
mount -t tmpfs tmp /tmp
ulimit -l unlimited
for m in crc32_generic udp_tunnel ip6_udp_tunnel ib_core ib_uverbs rdma_rxe dummy; do
  insmod /modules/$m.ko || echo "guest: insmod $m failed"
done
IP=$(command -v ip) RDMA=$(command -v rdma)
$IP link set lo up
$IP link set dummy0 up
$IP addr add 10.99.0.1/24 dev dummy0
$RDMA link add rxe0 type rxe netdev dummy0
# The IPv4-mapped RoCEv2 GID appears asynchronously.
for i in $(seq 1 100); do
  grep -q ffff:0a63:0001 /sys/class/infiniband/rxe0/ports/1/gids/* 2>/dev/null && break
  sleep 0.1
done
echo "guest: rxe0 is up on dummy0 (kernel $(uname -r))"
cd /opt/hetsync
sh ./test.sh
rc=$?
echo "HETSYNC-GUEST-RESULT rc=$rc"
sync
poweroff -f
EOF
chmod +x "$root/init"
(cd "$root" && find . | cpio -o -H newc --quiet | gzip -1) >"$work/initrd.gz"
log "booting kernel $kver with $(du -h "$work/initrd.gz" | cut -f1) of initramfs (TCG, ${timeout_s}s limit)"

console="$work/console.log"
set +e
timeout "$timeout_s" qemu-system-x86_64 -accel tcg,thread=multi -cpu max -smp 2 -m 1024 -M q35 \
  -nic none -nographic -no-reboot -kernel "$vmlinuz" -initrd "$work/initrd.gz" \
  -append "console=ttyS0 panic=-1 quiet" </dev/null >"$console" 2>&1
qemu_rc=$?
set -e
tr -d '\r' <"$console" | grep -v '^\s*$' | sed 's/^/guest| /'
rc=$(tr -d '\r' <"$console" | sed -n 's/.*HETSYNC-GUEST-RESULT rc=\([0-9]*\).*/\1/p' | tail -n1)
if [ -z "$rc" ]; then
  log "the guest never reported a result (qemu exit $qemu_rc; 124 means the ${timeout_s}s limit)"
  exit 2
fi
[ "$rc" -eq 0 ] && { log "guest tests passed"; exit 0; }
log "guest tests failed (exit $rc)"
exit 1
