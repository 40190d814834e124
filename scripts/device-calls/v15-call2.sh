# v15, call 2 (docs/perf.md v15): where the wgmma attention kernels' time goes. Nsight
# Compute on the 1 x 8192 launches of `qtrain doctor --only attention` (Mistral heads,
# causal, d128): the forward (attn_fwdwg8 and the pipelined attn_fwdwgp), the split
# backward's pair (attn_bwd_dkdvwg, attn_bwd_dqwg) and the one-pass backward
# (attn_bwd_fusedwg); then the row-by-row check of the head-dim-64 wgmma forward that the
# hardware rejects (scripts/hw/, v10, v14).
source "$(dirname "$0")/common.sh"
NCU=$(command -v ncu || ls /usr/local/cuda/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
echo "ncu: $NCU"
timeout 420 "$NCU" --clock-control none \
  -k regex:"attn_(fwdwg8|fwdwgp|bwd_dkdvwg|bwd_dqwg|bwd_fusedwg)_d128_bf16" \
  --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
  --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis --section SchedulerStats \
  --metrics sm__pipe_tensor_op_gmma_cycles_active.avg.pct_of_peak_sustained_active,sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active,l1tex__data_pipe_lsu_wavefronts_mem_shared.sum,smsp__inst_executed.sum,l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_ld.sum,l1tex__t_bytes_pipe_lsu_mem_local_op_ld.sum,sm__cycles_elapsed.avg \
  --csv --page details /tmp/qtrain doctor --only attention > /tmp/R/ncu.csv 2> /tmp/R/ncu.err
echo "ncu rc $? $(( $(date +%s) - T0 )) s"; tail -5 /tmp/R/ncu.err
grep -c . /tmp/R/ncu.csv
.carry/hw/fwd_check .carry/hw/attn.cubin > /tmp/R/fwd_check.txt 2>&1; tail -30 /tmp/R/fwd_check.txt
finish
