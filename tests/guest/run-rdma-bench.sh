#!/usr/bin/env bash
# Runs the RDMA benchmarks for real inside the Soft-RoCE guest (soft-roce.sh): criterion's
# transport_rdma group and `hetsync bench transport --transport rdma`, Het-Sync over RDMA against
# a bare verbs write ping-pong of the same bytes. rxe is a software device under TCG emulation:
# only the ratios mean anything. A missing device is a failure here (HETSYNC_REQUIRE_RDMA=1).
#
#   bash tests/guest/run-rdma-bench.sh [OUT.json]
#
# Environment: HETSYNC_GUEST_BENCH_SIZES (bytes, comma separated; default 4 KiB to 16 MiB: the
# guest has 1 GiB of memory), HETSYNC_GUEST_BENCH_SECONDS (per size, path and repetition).
set -euo pipefail
cd "$(dirname "$0")/../.."
out=${1:-}
sizes=${HETSYNC_GUEST_BENCH_SIZES:-4096,65536,1048576,16777216}
secs=${HETSYNC_GUEST_BENCH_SECONDS:-1}

bench=$({ cargo bench --locked -p hetsync-bench --bench transport --no-run --message-format=json ||
  true; } | { grep -o '"executable":"[^"]*"' || true; } | cut -d'"' -f4 | tail -n1)
[ -x "$bench" ] || { echo "run-rdma-bench: the criterion transport bench did not build" >&2; exit 1; }
cargo build --locked --release --bin hetsync 2>&1 | tail -n 1

script=$(mktemp)
trap 'rm -f "$script"' EXIT
cat >"$script" <<EOF
export HETSYNC_REQUIRE_RDMA=1 HETSYNC_BENCH_NO_TCP=1 HETSYNC_BENCH_SIZES=$sizes RUST_BACKTRACE=1
rc=0
echo "== hetsync bench transport --transport rdma (in the guest)"
./hetsync bench transport --transport rdma --sizes $sizes --seconds $secs --reps 2 --json /tmp/transport.json || rc=1
echo "BENCH-JSON-BEGIN"
cat /tmp/transport.json
echo "BENCH-JSON-END"
echo "== criterion transport_rdma (in the guest)"
./$(basename "$bench") --bench --warm-up-time 0.3 --measurement-time 1 transport_rdma || rc=1
exit \$rc
EOF
console=$(mktemp)
trap 'rm -f "$script" "$console"' EXIT
set +e
bash tests/guest/soft-roce.sh run target/guest-cache target/guest-work "$script" "$bench" \
  target/release/hetsync | tee "$console"
rc=${PIPESTATUS[0]}
set -e
if [ -n "$out" ]; then
  sed -n '/BENCH-JSON-BEGIN/,/BENCH-JSON-END/p' "$console" | sed 's/^guest| //' |
    grep -v 'BENCH-JSON-' >"$out" || true
fi
exit "$rc"
