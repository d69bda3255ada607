#!/usr/bin/env bash
# The GPU rows of cmtdp_jax/benchmarks/README.md in one run of at most 9 minutes, the most
# important rows first; writes one JSON per row into OUT_DIR. Needs no TensorFlow (the input
# pipeline and the evaluation metrics are not timed here), no dataset and no network.
#
#   bash cmtdp_jax/benchmarks/gpu.sh OUT_DIR            # then:
#   python -m cmtdp_jax.benchmarks.gpu_table OUT_DIR    # the README's table rows
#   bash cmtdp_jax/benchmarks/gpu.sh --dry-run OUT_DIR  # the commands, none run
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 1
dry_run=0
if [[ "${1:-}" == "--dry-run" ]]; then dry_run=1; shift; fi
out="${1:?usage: gpu.sh [--dry-run] OUT_DIR}"
budget_s="${GPU_BENCH_BUDGET_S:-540}"  # 9 minutes in all
python="${PYTHON:-python3}"

# name config dtype extra-flags (separated by spaces, none containing one), in order of
# importance.
rows=(
  "nyud_hrnet18_baseline_bfloat16 nyud_hrnet18_baseline bfloat16"
  "nyud_hrnet18_baseline_float32 nyud_hrnet18_baseline float32"
  "nyud_hrnet48_baseline_bfloat16 nyud_hrnet48_baseline bfloat16"
  "nyud_vitb_mt_bfloat16 nyud_vitb_mt bfloat16 --config.data.eval_crop_size=(448,576)"
  "nyud_invpt_vitl_bfloat16 nyud_invpt_vitl bfloat16"
  "nyud_invpt_vitb_bfloat16 nyud_invpt_vitl bfloat16 --config.model.backbone=vit_b16 --config.model.backbone_kwargs_for=vit_b16"
  "nyud_hrnet48_baseline_float32 nyud_hrnet48_baseline float32"
  "nyud_vitb_mt_float32 nyud_vitb_mt float32 --config.data.eval_crop_size=(448,576)"
  "pascal_hrnet18_baseline_bfloat16 pascal_hrnet18_baseline bfloat16"
  "pascal_hrnet48_baseline_bfloat16 pascal_hrnet48_baseline bfloat16"
  "nyud_vitl_mt_bfloat16 nyud_vitl_mt bfloat16 --config.data.eval_crop_size=(448,576)"
)
mkdir -p "$out"
start=$(date +%s)
for row in "${rows[@]}"; do
  read -r name config dtype rest <<<"$row"
  read -r -a extra <<<"${rest:-}"
  left=$(( budget_s - ($(date +%s) - start) ))
  cmd=("$python" -m cmtdp_jax.benchmarks.benchmark --config "configs/$config.py"
       "--config.model.dtype=$dtype" --steps 20 --warmup 3 --nopipeline --noevaluation
       --json "$out/$name.json")
  (( ${#extra[@]} )) && cmd+=("${extra[@]}")
  if (( dry_run )); then
    printf -v line '%q ' "${cmd[@]}"  # quoted: each line runs as it is printed
    echo "+ ${line% }"
    continue
  fi
  if (( left < 60 )); then
    echo "skipped $name: ${left}s of the budget left" | tee -a "$out/skipped.txt"
    continue
  fi
  echo "== $name (${left}s left)"
  timeout "$left" "${cmd[@]}" >"$out/$name.log" 2>&1 || echo "$name failed or timed out: see $out/$name.log"
done
