# Sourced by the device-call scripts beside it, run from the repository root on a lent
# GPU machine (no Rust, no network). Expects what travels with the call:
#   .carry/qtrain.xz   the stripped CUDA build, xz-compressed (~11 MB)
#   .whl/              the peers' wheels (scripts/peer-wheels.sh)
# Unpacks qtrain to /tmp/qtrain, installs the wheels into /tmp/site, and samples the
# SM clock, power and clock-limit reasons every 100 ms for the whole call (the power
# cap is what bounds a long training step on an H100/H200: docs/perf.md v12). Results go
# under /tmp/R and come back as one archive, $OUT/results.tgz (the device tool returns
# at most 8 files), refreshed every 30 s while the call runs.
set -u
export LD_LIBRARY_PATH=/usr/local/cuda/targets/x86_64-linux/lib:/usr/local/nvidia/lib64
T0=$(date +%s)
unpack() {  # $1: an xz-compressed binary, $2: where it goes (executable)
  python3 -c "import lzma,sys;open(sys.argv[2],'wb').write(lzma.open(sys.argv[1]).read())" "$1" "$2"
  chmod +x "$2"
}
unpack .carry/qtrain.xz /tmp/qtrain
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl > /tmp/pip.log 2>&1 || tail -3 /tmp/pip.log
export PYTHONPATH=/tmp/site HF_HUB_OFFLINE=1
mkdir -p /tmp/R
nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,power.limit,temperature.gpu,utilization.gpu,clocks_event_reasons.active \
  --format=csv,noheader,nounits -lms 100 > /tmp/R/clocks.csv &
CLK=$!
# A snapshot of /tmp/R every 30 s, so that a call cut short by its time limit (or by the
# session's device budget running out) still returns what it measured so far.
pack() {  # /tmp/R into $OUT/results.tgz, replaced whole (never a half-written archive)
  tar czf "$OUT/results.tgz.part" -C /tmp R && mv "$OUT/results.tgz.part" "$OUT/results.tgz"
}
( while sleep 30; do pack 2>/dev/null; done ) &
SNAP=$!
echo "setup $(( $(date +%s) - T0 )) s"
finish() {
  pkill -P $SNAP 2>/dev/null; kill $CLK $SNAP 2>/dev/null
  wait $SNAP 2>/dev/null
  pack
  echo "total $(( $(date +%s) - T0 )) s"
}
