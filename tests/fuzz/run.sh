#!/usr/bin/env bash
# A bounded coverage-guided fuzz run of the server's connection state machine (handshake and
# frames) with afl.rs on stable Rust:
#
#   bash tests/fuzz/run.sh [SECONDS]      (default 60, or $FUZZ_SECONDS)
#
# Installs cargo-afl (which builds its own AFL++) when it is missing, builds the target
# `connection` instrumented, fuzzes it for SECONDS from the seed corpus in/, then prints one line
# with the executions done and the crashes and hangs saved. Exits non-zero when afl-fuzz could
# not run or saved any crash or hang, listing each input (in hex) and how to replay it.
# Headless and bounded in time throughout: fit for CI (no TTY, no stdin).
set -euo pipefail
cd "$(dirname "$0")"

secs=${1:-${FUZZ_SECONDS:-60}}
case $secs in '' | *[!0-9]* | 0)
    echo "usage: $0 [SECONDS > 0]" >&2
    exit 2
    ;;
esac
# cargo-afl and the afl crate are released together; the one must match the other.
afl_version=0.18.2
out=out
target_dir=target/afl # apart from plain `cargo build`/`cargo test`, which must not overwrite it
bin=$target_dir/debug/connection

# Every step has a ceiling, so nothing here can hold CI up for long.
step() {
    local limit=$1
    shift
    timeout --kill-after=30 "$limit" "$@" </dev/null
}

echo "== fuzz: cargo-afl $afl_version and its AFL++"
start=$SECONDS
if ! cargo afl --version 2>/dev/null | grep -q "^cargo-afl $afl_version"; then
    # Installing builds AFL++ too (about 2.5 minutes on 2 cores).
    step 1200 cargo install cargo-afl --version "$afl_version" --locked --force
fi
if ! cargo afl --version 2>/dev/null | grep -q "AFL++ version"; then
    # AFL++ not built for this Rust toolchain yet.
    step 900 cargo afl config --build --force
fi
echo "   ready after $((SECONDS - start)) s: $(cargo afl --version)"

echo "== fuzz: building the instrumented target"
start=$SECONDS
CARGO_TARGET_DIR=$target_dir step 900 cargo afl build --bin connection
echo "   built in $((SECONDS - start)) s"

echo "== fuzz: $secs s of afl-fuzz on $bin (log: tests/fuzz/out.log)"
rm -rf "$out"
set +e
# AFL_NO_UI: no TTY in CI. AFL_SKIP_CPUFREQ / AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES: no tuning of
# the machine's CPU governor or core_pattern (a container cannot). AFL_NO_AFFINITY: do not pin a
# core on a shared 2-core machine. -V: stop after that many seconds of fuzzing.
AFL_NO_UI=1 AFL_SKIP_CPUFREQ=1 AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES=1 AFL_NO_AFFINITY=1 \
    step $((secs + 120)) cargo afl fuzz -i in -o "$out" -x hetsync.dict -V "$secs" "$bin" \
    >out.log 2>&1
rc=$?
set -e

stats=$out/default/fuzzer_stats
if [ ! -f "$stats" ]; then
    echo "fuzz: afl-fuzz did not run (exit $rc); the end of its log:"
    tail -n 30 out.log | sed 's/\x1b\[[0-9;?]*[a-zA-Z]//g'
    exit 1
fi
field() { awk -F' *: *' -v k="$1" '$1 == k { print $2 }' "$stats"; }
execs=$(field execs_done)
crashes=$(field saved_crashes)
hangs=$(field saved_hangs)
echo "fuzz: connection: $execs execs in $(field run_time) s ($(field execs_per_sec)/s)," \
    "corpus $(field corpus_count), edges $(field edges_found)/$(field total_edges);" \
    "crashes: $crashes, hangs: $hangs"

status=0
if [ "$rc" -ne 0 ]; then
    echo "fuzz: afl-fuzz exited $rc; the end of its log:"
    tail -n 30 out.log | sed 's/\x1b\[[0-9;?]*[a-zA-Z]//g'
    status=1
fi
for kind in crashes hangs; do
    shown=0
    for f in "$out/default/$kind"/id:*; do
        [ -f "$f" ] || continue
        status=1
        echo "fuzz: $kind input tests/fuzz/$f ($(wc -c <"$f") bytes): $(od -An -v -tx1 "$f" | tr -d ' \n')"
        shown=$((shown + 1))
        # The first few replayed here, with the panic message (a plain build, not instrumented).
        if [ "$shown" -le 3 ]; then
            step 300 cargo run -q --bin connection -- "$f" 2>&1 | tail -n 20 || true
        fi
    done
done
if [ "$status" -ne 0 ]; then
    echo "fuzz: FAILED. Replay an input with the message and a backtrace:"
    echo "  cd tests/fuzz && cargo run --bin connection -- out/default/crashes/id:..."
    echo "  (or feed it to the instrumented target: $bin < FILE)"
fi
exit "$status"
