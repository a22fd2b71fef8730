# shellcheck shell=sh
# Runs inside the Soft-RoCE guest (busybox sh), from /opt/hetsync: hetsync end to end over RDMA.
# 1. 4 workers, naive barrier, --transport rdma; 2. the same job over TCP: the two final models
# must be byte-identical; 3. --transport auto picks RDMA here; 4. the timeout barrier with a
# straggler over RDMA completes its rounds; 5. a job of three tensors in 64 KiB parts over RDMA
# ends byte-identical to the same job over TCP; 6. so does a tensor in 293 parts of 4 KiB, more
# than a queue pair keeps in flight (the backlog, and receives re-posted while pushing); 7. SSP
# (staleness 3) with a straggler over RDMA: from the trace, no read ran more than 3 clocks ahead
# of the slowest worker and some ran exactly 3.
fail() { echo "e2e-rdma: FAIL: $*"; for f in /tmp/*.log; do echo "--- $f"; cat "$f"; done; exit 1; }

MODEL="--dim 10007" ROUNDS=20 PARTS="" SERVER_EXTRA=""
run_job() { # name transport policy port extra-worker-args... (uses $MODEL, $ROUNDS, $PARTS, $SERVER_EXTRA)
  name=$1 transport=$2 policy=$3 port=$4
  shift 4
  # shellcheck disable=SC2086
  ./hetsync server --listen 127.0.0.1:$port --workers 4 $MODEL $PARTS --policy $policy \
    --timeout-ms 20 --lr 0.5 --rounds $ROUNDS --transport $transport --progress 0 \
    --save-model /tmp/$name.f32 $SERVER_EXTRA >/tmp/$name-server.log 2>&1 &
  spid=$!
  pids=""
  for r in 0 1 2 3; do
    extra=""
    [ "$r" = 3 ] && extra="$*"
    # shellcheck disable=SC2086
    ./hetsync worker --server 127.0.0.1:$port --rank $r $MODEL --compute-ms 0 \
      --transport $transport $extra >/tmp/$name-w$r.log 2>&1 &
    pids="$pids $!"
  done
  for p in $pids; do wait $p || fail "$name: a worker failed"; done
  wait $spid || fail "$name: the server failed"
  grep -q -e "finished: $ROUNDS rounds" -e "finished: slowest clock $ROUNDS" /tmp/$name-server.log ||
    fail "$name: the server did not finish $ROUNDS rounds"
  echo "e2e-rdma: $name: $(grep 'transport' /tmp/$name-server.log | head -1)"
  echo "e2e-rdma: $name: $(grep 'finished:' /tmp/$name-server.log)"
}

run_job rdma rdma naive 7701
for r in 0 1 2 3; do
  grep -q "transport rdma on rxe0" /tmp/rdma-w$r.log || fail "worker $r did not use RDMA"
done
run_job tcp tcp naive 7702
cmp /tmp/rdma.f32 /tmp/tcp.f32 || fail "the RDMA and TCP runs ended with different models"
echo "e2e-rdma: the final model over RDMA is byte-identical to the one over TCP"

run_job auto auto naive 7703
grep -q "transport rdma on rxe0" /tmp/auto-server.log || fail "--transport auto did not choose RDMA"
grep -q "transport rdma on rxe0" /tmp/auto-w0.log || fail "an auto worker did not choose RDMA"
cmp /tmp/rdma.f32 /tmp/auto.f32 || fail "the auto run ended with another model"
echo "e2e-rdma: --transport auto chose RDMA"

run_job straggler rdma timeout 7704 --straggle-ms 100
grep -q "stragglers left behind [1-9]" /tmp/straggler-server.log || fail "the timeout barrier left no straggler behind"
echo "e2e-rdma: the timeout barrier left the straggler behind over RDMA"
MODEL="--dims 1,1000,300000" ROUNDS=5 PARTS="--partition-kib 64"
run_job parts-rdma rdma naive 7705
grep -q "21 parts" /tmp/parts-rdma-server.log || fail "the job was not cut into 21 parts"
for r in 0 1 2 3; do
  grep -q "transport rdma on rxe0" /tmp/parts-rdma-w$r.log || fail "worker $r did not use RDMA"
done
run_job parts-tcp tcp naive 7706
cmp /tmp/parts-rdma.f32 /tmp/parts-tcp.f32 || fail "three tensors in parts: RDMA and TCP ended with different models"
[ "$(wc -c < /tmp/parts-rdma.f32)" -eq 1204004 ] || fail "the saved model is not 301,001 floats"
echo "e2e-rdma: three tensors in 21 parts over RDMA end byte-identical to TCP"
MODEL="--dim 300000" ROUNDS=3 PARTS="--partition-kib 4"
run_job many-rdma rdma naive 7707
grep -q "293 parts" /tmp/many-rdma-server.log || fail "the tensor was not cut into 293 parts"
run_job many-tcp tcp naive 7708
cmp /tmp/many-rdma.f32 /tmp/many-tcp.f32 || fail "293 parts: RDMA and TCP ended with different models"
echo "e2e-rdma: a tensor in 293 parts (more than a queue pair keeps in flight) over RDMA ends byte-identical to TCP"
MODEL="--dim 10007" ROUNDS=12 PARTS="" SERVER_EXTRA="--staleness 3 --trace /tmp/ssp-trace.jsonl"
run_job ssp rdma ssp 7709 --straggle-ms 60
grep -q "transport rdma on rxe0" /tmp/ssp-w0.log || fail "ssp: worker 0 did not use RDMA"
# The largest (clock - min_clock) of every pull_served; fails if one exceeds the staleness.
ahead=$(awk -F'[:,]' '/"pull_served"/ {
    for (i = 1; i < NF; i++) { if ($i == "\"clock\"") c = $(i + 1); if ($i == "\"min_clock\"") m = $(i + 1) }
    n++; if (c - m > max) max = c - m; if (c - m > 3) bad = 1
  } END { if (n == 0) bad = 1; print max + 0; exit bad }' /tmp/ssp-trace.jsonl) ||
  fail "ssp: a read ran more than 3 clocks ahead (or the trace has no reads): $ahead"
[ "$ahead" = 3 ] || fail "ssp: the fast workers ran at most $ahead clocks ahead, not 3"
echo "e2e-rdma: ssp over RDMA: reads ran at most, and exactly, 3 clocks ahead of the straggler"
echo "e2e-rdma: 7 passed, 0 failed"
