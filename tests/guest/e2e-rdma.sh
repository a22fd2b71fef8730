# shellcheck shell=sh
# Runs inside the Soft-RoCE guest (busybox sh), from /opt/hetsync: hetsync end to end over RDMA.
# 1. 4 workers, naive barrier, --transport rdma; 2. the same job over TCP: the two final models
# must be byte-identical; 3. --transport auto picks RDMA here; 4. the timeout barrier with a
# straggler over RDMA completes its rounds.
fail() { echo "e2e-rdma: FAIL: $*"; for f in /tmp/*.log; do echo "--- $f"; cat "$f"; done; exit 1; }

run_job() { # name transport policy port extra-worker-args...
  name=$1 transport=$2 policy=$3 port=$4
  shift 4
  ./hetsync server --listen 127.0.0.1:$port --workers 4 --dim 10007 --policy $policy \
    --timeout-ms 20 --lr 0.5 --rounds 20 --transport $transport --progress 0 \
    --save-model /tmp/$name.f32 >/tmp/$name-server.log 2>&1 &
  spid=$!
  pids=""
  for r in 0 1 2 3; do
    extra=""
    [ "$r" = 3 ] && extra="$*"
    ./hetsync worker --server 127.0.0.1:$port --rank $r --dim 10007 --compute-ms 0 \
      --transport $transport $extra >/tmp/$name-w$r.log 2>&1 &
    pids="$pids $!"
  done
  for p in $pids; do wait $p || fail "$name: a worker failed"; done
  wait $spid || fail "$name: the server failed"
  grep -q "finished: 20 rounds" /tmp/$name-server.log || fail "$name: the server did not finish 20 rounds"
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
grep -q "stragglers dropped [1-9]" /tmp/straggler-server.log || fail "the timeout barrier left no straggler behind"
echo "e2e-rdma: the timeout barrier left the straggler behind over RDMA"
echo "e2e-rdma: 4 passed, 0 failed"
