# Shared by the benchmarks/run_*.sh scripts of issue 7's GPU runs (sourced, not run). Each script sets
# OUT (default .) and calls these; S is the run's start time, deadlines are seconds after it (a run script must not
# assign S: run 243's trace paths named S moved every later deadline).
set -u
OUT=${OUT:-.}
S=$(date +%s)

# step_table DIR SECONDS train_step.py-args…: benchmarks/train_step.py into $OUT/DIR (DIR "." = $OUT itself),
# no new configuration after S + SECONDS; prints the per-configuration lines and the wall time so far.
step_table() {
  local dir=$1 secs=$2
  shift 2
  mkdir -p "$OUT/$dir"
  python3 benchmarks/train_step.py "$@" --deadline $((S + secs)) --out "$OUT/$dir" > "$OUT/$dir/train_step.log" 2>&1
  grep "^\[sd" "$OUT/$dir/train_step.log" | cut -c1-175
  echo "$dir: wall $(( $(date +%s) - S )) s"
}

# experiment SECONDS NAME [args…]: benchmarks/experiments/NAME.py --out $OUT/NAME.json into $OUT/NAME.log within
# SECONDS; prints its exit status, the wall time so far and its summary lines (those with "summed_ms").
experiment() {
  local secs=$1 name=$2
  shift 2
  timeout "$secs" python3 "benchmarks/experiments/$name.py" --out "$OUT/$name.json" "$@" > "$OUT/$name.log" 2>&1
  echo "$name rc=$? wall $(( $(date +%s) - S )) s"
  grep '"summed_ms' "$OUT/$name.log"
}

# step_records DIR…: one line per configuration of each $OUT/DIR/train_step.json — model, batch, algo, variant, the
# eager median and p10, the graph median (0 without --graph), the eager and graph peaks (GiB) and the status.
step_records() {
  local d
  for d in "$@"; do
    python3 -c "import json; r=json.load(open('$OUT/$d/train_step.json')); [print('$d', x['model'], x['batch'], x['algo'], x['variant'], 'eager', round(x.get('median_ms') or 0, 2), 'p10', round(x.get('p10_ms') or 0, 2), 'graph', round(x.get('graph_median_ms') or 0, 2), 'peak', round(x.get('peak_gib') or 0, 3), 'graph_peak', round(x.get('graph_peak_gib') or 0, 3), x.get('status')) for x in r['records']]" 2>/dev/null
  done
}

# graph_check SECONDS CASES: the trainer's CUDA graphs against eager training (benchmarks/check_cuda_graph.py,
# 8 steps) into $OUT/ccg, within SECONDS; prints "case true|false" per case and the summary line.
graph_check() {
  mkdir -p "$OUT/ccg"
  timeout "$1" python3 benchmarks/check_cuda_graph.py --out "$OUT/ccg" --cases "$2" --steps 8 \
    > "$OUT/check_cuda_graph.log" 2>&1
  echo "check_cuda_graph rc=$?"
  grep -E '"ok"' "$OUT/check_cuda_graph.log" | sed -E 's/.*"case": "([^"]+)".*"ok": (true|false).*/\1 \2/' | tr '\n' ' '
  echo
  grep "cases ok" "$OUT/check_cuda_graph.log"
}

# regen_check SECONDS ALGOS [regen_check.py-args…]: benchmarks/regen_check.py on the SD1.5 config (batch 2, 32×32
# latents) into $OUT/regen, within SECONDS; prints its rc, its JSON rows (cut at 700 characters) and its verdict.
regen_check() {
  local secs=$1 algos=$2
  shift 2
  timeout "$secs" python3 benchmarks/regen_check.py --model sd15 --batch 2 --latent 32 --algos "$algos" "$@" \
    --out "$OUT/regen" > "$OUT/regen_check.log" 2>&1
  echo "regen_check rc=$?"; grep -E '^\{|regen_check' "$OUT/regen_check.log" | cut -c1-700
}

# aba VAR T_ON T_OFF T_ON2 train_step.py-args…: an A/B/A of one switch — the step table with it as set (the floor
# alongside) into $OUT/on, with VAR=0 into $OUT/off, as set again into $OUT/on2; T_* are step_table's deadlines.
aba() {
  local var=$1 t1=$2 t2=$3 t3=$4
  shift 4
  step_table on "$t1" "$@" --baselines floor
  (export "$var=0"; step_table off "$t2" "$@" --no-baselines)
  step_table on2 "$t3" "$@" --no-baselines
}

# layer_table SECONDS bypass_op_layers.py-args…: every layer alone (benchmarks/experiments/bypass_op_layers.py) into
# $OUT/layers within SECONDS; prints its rc, the wall time so far and its summary lines.
layer_table() {
  local secs=$1
  shift
  mkdir -p "$OUT/layers"
  timeout "$secs" python3 benchmarks/experiments/bypass_op_layers.py "$@" --out "$OUT/layers" > "$OUT/layers/log.txt" 2>&1
  echo "layers rc=$? wall $(( $(date +%s) - S )) s"; grep -v "layers, " "$OUT/layers/log.txt" | grep -v Warn | tail -4
}

# pack_out: everything under $OUT but summary.txt into $OUT/results.tgz (the device tool brings back few files)
pack_out() {
  (cd "$OUT" && tar czf /tmp/results.tgz --exclude=summary.txt . && find . -type f ! -name summary.txt -delete \
    && mv /tmp/results.tgz results.tgz)
}

# trainer_env: the carried wheels (.whl: diffusers, peft, lycoris) into /tmp/site and the environment that
# benchmarks/train_graph.py runs in; prints the card.
trainer_env() {
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>/dev/null
  export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
}

# trainer_row LEG SECONDS SCRIPT train_graph.py-args…: one train_graph.py run into $OUT/LEG, cut at SECONDS — SCRIPT is
# this tree's benchmarks/train_graph.py or a carried older tree's copy (whose src/ it imports); prints its rc, the
# wall time so far and its graph lines.
trainer_row() {
  local leg=$1 secs=$2 py=$3
  shift 3
  mkdir -p "$OUT/$leg"
  timeout "$secs" python3 "$py" --out "$OUT/$leg" "$@" > "$OUT/$leg/log.txt" 2>&1
  echo "$leg rc=$? wall $(( $(date +%s) - S )) s"; grep -E "^  [^ ]+ graph:" "$OUT/$leg/log.txt" | cut -c1-110
}

# op_check SECONDS PATTERN: benchmarks/experiments/op_fp32_grads.py (the low-rank op under mixed precision on the GPU
# against float64) into $OUT/op_fp32_grads.txt; prints its rc and the lines matching PATTERN.
op_check() {
  timeout "$1" python3 benchmarks/experiments/op_fp32_grads.py > "$OUT/op_fp32_grads.txt" 2>&1
  echo "op_fp32_grads rc=$?"; grep -v Warn "$OUT/op_fp32_grads.txt" | grep -E "$2" | cut -c1-210
}
