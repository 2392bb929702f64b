#!/usr/bin/env bash
# More seeds for the QA fidelity benchmark at each method's chosen lr (from the 20261129-1930 grids), int4
# momentum on the play task, and the Shakespeare qft lr below the old grid's edge: one H200 call, 9
# processes sharing the GPU. Run on the GPU machine after bench/device_setup.sh; results under $OUT.
set -u
C=$(cat .snap/commit 2>/dev/null || git rev-parse --short HEAD)
M=$(python3 -c "from qft_ds import hub; print(hub.prepare_default_model())" | tail -1) || exit 1
LIM=${LIM:-530}
PLAY="qft:5e-05:2 qft:5e-05:3 qft:5e-05:4 qft:5e-05:5 fp32_lion:0.0001:2 fp32_lion:0.0001:3 fp32_lion:0.0001:4
 fp32_lion:0.0001:5 qft_m4:5e-05:0 qft_m4:5e-05:1 qft_m4:0.0001:0 qft_m4:0.0001:1"
SPK="qft:0.0001:2 qft:0.0001:3 fp32_lion:0.0001:2 fp32_lion:0.0001:3"
run() {  # DIR PORT ARGS...
  local d=$OUT/$1 port=$2; shift 2; mkdir -p "$d"
  MASTER_PORT=$port OMP_NUM_THREADS=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True timeout -s INT -k 20 $LIM \
    python3 "$@" --commit "$C" --gpu_shared_by 9 --out "$d" > "$d/log.txt" 2>&1 &
}
for i in 0 1 2 3 4; do run play$i $((29700 + i)) bench/qa_fidelity.py --task play --model "$M" --runs $PLAY --part $i/5; done
for i in 0 1; do run spk$i $((29710 + i)) bench/qa_fidelity.py --task speaker --model "$M" --runs $SPK --part $i/2; done
for s in 0 1; do run shk$s $((29720 + s)) bench/fidelity.py --lrs qft=2e-5 --seeds $s --steps 300; done
wait
cd "$OUT" && tar -czf seeds.tar.gz play* spk* shk* && for d in play* spk* shk*; do echo "== $d"; tail -4 $d/log.txt; done
