#!/usr/bin/env bash
# lyco's real trainer on 1 and N GPUs (N = all GPUs of the machine), eager (DDP buckets) and with
# [train] cuda_graph (flat all-reduce): benchmarks/ddp_trainer.py, then OUT/ddp_trainer.md.
# usage (repository root, .whl carried for diffusers): benchmarks/run_ddp_trainer.sh OUT [extra ddp_trainer.py args]
set -uo pipefail
out=${1:-${OUT:-ddp_trainer_out}}; shift || true
py=${PYTHON:-python3}
$py -c 'import diffusers' 2>/dev/null || { $py -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site; } || exit 1
export PYTHONPATH=$PWD/src:${PYTHONPATH:-} PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
mkdir -p "$out"; work=$(mktemp -d)
$py benchmarks/ddp_trainer.py --work "$work" --prepare || exit 1
ngpu=$($py -c 'import torch; print(torch.cuda.device_count())')
for n in 1 "$ngpu"; do
  for g in --cuda-graph ""; do
    timeout 240 $py -m torch.distributed.run --standalone --nproc_per_node "$n" benchmarks/ddp_trainer.py \
      --work "$work" --out "$out" $g "$@" 2>&1 | grep --line-buffered '^{\|cuda_graph\|Error'
  done
  [ "$ngpu" = 1 ] && break
done
$py - "$out" <<'PY'
import glob, json, os, sys
out = sys.argv[1]
rows = [json.load(open(f)) for f in sorted(glob.glob(os.path.join(out, "trainer_*gpu_*.json")))]
one = {r["mode"]: r for r in rows if r["processes"] == 1}
lines = [f"# lyco train on several GPUs — {rows[0]['device'] if rows else '?'}", "",
         "World base (4 M params, 32 px), star concept, LoRA r8 attn-mlp + text encoder, bf16, per-GPU batch "
         f"{rows[0]['per_gpu_batch'] if rows else '?'}; `benchmarks/ddp_trainer.py` (the real Trainer under torchrun).", "",
         "| GPUs | mode | strategy | ms/step | images/s | efficiency vs 1 GPU, same mode | graph |", "|---|---|---|---|---|---|---|"]
for r in sorted(rows, key=lambda r: (r["mode"], r["processes"])):
    ref = one.get(r["mode"])
    eff = r["images_per_s"] / (r["processes"] * ref["images_per_s"]) if ref else None
    g = r["graph"]
    gtxt = "" if g is None else ("fell back: " + g["disabled_reason"]) if g["disabled_reason"] else "%d replays" % g["replays"]
    etxt = "" if eff is None else "%.2f" % eff
    lines.append("| %d | %s | %s | %.1f | %.0f | %s | %s |" % (r["processes"], r["mode"], r["strategy"], r["ms_per_step"],
                                                          r["images_per_s"], etxt, gtxt))
open(os.path.join(out, "ddp_trainer.md"), "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
PY
