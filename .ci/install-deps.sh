#!/usr/bin/env bash
# Installs what Het-Sync needs on a Debian/Ubuntu machine, then checks the Rust toolchain.
# Idempotent: packages already present are not touched, and apt is not called at all when nothing
# is missing. Needs root for apt-get (uses sudo when not root).
#
#   gcc, libc6-dev      the linker Rust uses
#   fonts-dejavu-core   the font the straggler graph (PNG) is drawn with
#   libibverbs-dev librdmacm-dev libclang-dev pkg-config   building the RDMA verbs crate (ffi/)
#   python3 python3-venv  the Python package (python/): a virtual environment to pip-install it into
# With --tests, also what the test suite runs for real:
#   slurmctld slurmd slurm-client munge   a three-node Slurm on this machine (tests/slurm/)
#   qemu-system-x86 rdma-core ibverbs-utils ibverbs-providers busybox-static iproute2 cpio kmod
#                                         a Soft-RoCE guest for the RDMA tests (tests/guest/)
set -euo pipefail

packages=(gcc libc6-dev fonts-dejavu-core libibverbs-dev librdmacm-dev libclang-dev pkg-config python3 python3-venv)
case "${1:-}" in
  --tests)
    packages+=(slurmctld slurmd slurm-client munge)
    packages+=(qemu-system-x86 rdma-core ibverbs-utils ibverbs-providers busybox-static iproute2 cpio kmod)
    ;;
  "") ;;
  *) echo "usage: install-deps.sh [--tests]" >&2; exit 2 ;;
esac

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  sudo=""
  if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null || { echo "install-deps: need root (or sudo) to install: ${missing[*]}" >&2; exit 1; }
    sudo=sudo
  fi
  echo "install-deps: installing ${missing[*]}"
  $sudo apt-get -o DPkg::Lock::Timeout=600 update -q
  DEBIAN_FRONTEND=noninteractive $sudo apt-get -o DPkg::Lock::Timeout=600 install -y -q \
    --no-install-recommends "${missing[@]}"
fi

if ! command -v cargo >/dev/null; then
  echo "install-deps: Rust is not installed. Install Rust 1.89 or newer with rustup (https://rustup.rs);" >&2
  echo "              the distribution's rustc package is too old on Debian 12 / Ubuntu 24.04." >&2
  exit 1
fi
version=$(cargo --version | awk '{print $2}')
if [ "$(printf '%s\n1.89.0\n' "$version" | sort -V | head -n1)" != "1.89.0" ]; then
  echo "install-deps: cargo $version is too old: Het-Sync needs Rust 1.89 or newer (rustup update)." >&2
  exit 1
fi
echo "install-deps: ready (cargo $version)"
