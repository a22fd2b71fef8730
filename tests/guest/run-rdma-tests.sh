#!/usr/bin/env bash
# Builds the RDMA test binaries on the host and runs them for real inside the Soft-RoCE guest
# (soft-roce.sh), where a missing device is a failure (HETSYNC_REQUIRE_RDMA=1).
set -euo pipefail
cd "$(dirname "$0")/../.."

# The test executables cargo builds for the ffi crate, and the end-to-end tests of misbehaving
# RDMA workers and of a low locked-memory limit (they run the hetsync binary HETSYNC_BIN names).
mapfile -t bins < <(
  {
    cargo test --locked -p hetsync-ffi --no-run --message-format=json
    cargo test --locked -p hetsync --test rdma_slots_are_lent_per_push --test rdma_low_memlock_falls_back \
      --no-run --message-format=json
  } 2>/dev/null | grep -o '"executable":"[^"]*/deps/[^"]*"' | cut -d'"' -f4)
[ ${#bins[@]} -gt 0 ] || { echo "run-rdma-tests: no test binaries built" >&2; exit 1; }

# The hetsync binary for the end-to-end run.
cargo build --locked --bin hetsync 2>&1 | tail -n 1
hetsync=target/debug/hetsync

script=$(mktemp)
trap 'rm -f "$script"' EXIT
{
  echo 'export HETSYNC_REQUIRE_RDMA=1 RUST_BACKTRACE=1 HETSYNC_BIN=./hetsync'
  echo 'rc=0'
  for b in "${bins[@]}"; do
    name=$(basename "$b")
    echo "echo \"== $name (in the guest)\""
    echo "./$name --test-threads=1 || rc=1"
  done
  echo 'echo "== hetsync end to end over RDMA (in the guest)"'
  echo 'sh ./e2e-rdma.sh || rc=1'
  echo 'exit $rc'
} >"$script"

bash tests/guest/soft-roce.sh run target/guest-cache target/guest-work "$script" "${bins[@]}" \
  "$hetsync" tests/guest/e2e-rdma.sh
