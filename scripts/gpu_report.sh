#!/usr/bin/env bash
# Fill the README's GPU table in device calls of under 10 minutes each.
#
#   scripts/gpu_report.sh bench CAMVID_DIR [OUT_DIR]   # ~6 min: speed/memory tables + loader
#   scripts/gpu_report.sh train CAMVID_DIR [OUT_DIR]   # 9 min: U-Net R34 time-to-accuracy
#   scripts/gpu_report.sh --smoke CAMVID_DIR [OUT_DIR] # the same steps, tiny, on the CPU
#
# CAMVID_DIR: the CamVid SegNet layout (train/ trainannot/ val/ valannot/ test/ testannot/).
# A device machine gets a copy of the repository only, not ../shared/data: copy the dataset
# into an ignored folder of the checkout first and carry it, e.g.
#   cp -r ../shared/data/camvid data/camvid     # data/ is git-ignored; ~170 MB
#   run(command="scripts/gpu_report.sh bench data/camvid $OUT", carry=["data/camvid"])
# Each step's JSON/log lands in OUT_DIR (default: gpu_report/); the summary is printed last.
set -euo pipefail
mode=${1:?usage: gpu_report.sh bench|train|--smoke CAMVID_DIR [OUT_DIR]}
camvid=${2:?give the CamVid folder (see the header)}
out=${3:-gpu_report}
mkdir -p "$out"
export PYTHONPATH=${PYTHONPATH:-$PWD} WANDB_MODE=disabled
[ -d "$camvid/train" ] || { echo "gpu_report: no CamVid at $camvid (train/ missing)" >&2; exit 2; }
py=${PYTHON:-python}

if [ "$mode" = "--smoke" ]; then
  # every step of both modes at toy sizes on the CPU (checks the script end to end)
  dev="--device cpu --threads 1"
  size="64 64"; bs=2; rounds="--rounds 2 --steps 1 --warmup 1"; unet="--model.encoder resnet18"
  precisions="32"; layouts="--no-channels-last"; compiles=""; train_time="00:00:00:40"
  data_batches="--data-batches 2 --data-rounds 1"; fit_extra="--trainer.accelerator cpu
    --trainer.limit_train_batches 2 --trainer.limit_val_batches 2 --trainer.limit_test_batches 2
    --data.crop_size [64,64] --data.batch_size 2 --data.num_workers 0"
  steps="bench train"
else
  dev="--device cuda"
  size="360 480"; bs=8; rounds="--rounds 10 --steps 5 --warmup 5"; unet="--model.encoder resnet34"
  precisions="bf16-mixed 32"; layouts="--channels-last --no-channels-last"; compiles="--compile"
  train_time="00:00:09:00"; data_batches="--data-rounds 2"
  fit_extra="--data.gpu_resident true --data.batch_size 8 --trainer.check_val_every_n_epoch 5"
  steps=$mode
fi

for step in $steps; do
  if [ "$step" = "bench" ]; then
    # speed and memory vs the raw loop and smp: precision x memory format, eager; then compiled
    for p in $precisions; do
      for cl in $layouts; do
        tag="unet_${p}_${cl#--}"
        $py -m seglight bench --model UNet $unet --size $size --batch-size $bs --precision "$p" \
          $cl $dev $rounds --peers raw,smp --json "$out/$tag.json" | tee "$out/$tag.log"
      done
      tag="dlv3p_${p}"
      $py -m seglight bench --model DeepLabV3Plus --model.encoder resnet50 --model.separable true \
        --size $size --batch-size $bs --precision "$p" $dev $rounds --peers raw,smp \
        --json "$out/$tag.json" | tee "$out/$tag.log"
    done
    for c in $compiles; do
      $py -m seglight bench --model UNet $unet --size $size --batch-size $bs --precision bf16-mixed \
        $c $dev $rounds --peers raw --skip data --json "$out/unet_compile.json" | tee "$out/unet_compile.log"
    done
    # loader-bound vs GPU-resident epoch of the CamVid training split
    $py -m seglight bench --model UNet $unet --skip train,infer --data CamVid --data.root "$camvid" \
      $dev $data_batches --json "$out/data.json" | tee "$out/data.log"
  fi
  if [ "$step" = "train" ]; then
    # U-Net R34 on CamVid for a fixed wall budget: validation history (time to 50/60% mIoU is
    # read from metrics.json's history and the run's wall clock), then test on the best weights
    $py -m seglight fit --config experiments/unet.yaml --data.root "$camvid" \
      --trainer.max_time "$train_time" --trainer.max_epochs 1000 --trainer.logger false \
      --trainer.default_root_dir "$out/unet_run" $fit_extra 2>&1 | tail -20 | tee "$out/fit.log"
    ckpt=$(ls "$out"/unet_run/checkpoints/epoch*.ckpt 2>/dev/null | head -1 || true)
    if [ -n "$ckpt" ]; then
      $py -m seglight test --config experiments/unet.yaml --data.root "$camvid" --ckpt_path "$ckpt" \
        --trainer.logger false --trainer.default_root_dir "$out/unet_run" $fit_extra 2>&1 \
        | tail -25 | tee "$out/test.log"
    fi
    $py - "$out/unet_run/metrics.json" <<'EOF'
import json, sys
m = json.load(open(sys.argv[1]))
hist = m.get("history", [])
print("validations (epoch, val mIoU %, wall s):",
      [(h["epoch"], round(100 * (h["mIoU"] or 0), 2), h.get("wall_s")) for h in hist])
for target in (0.5, 0.6):
    hit = next((h for h in hist if (h["mIoU"] or 0) >= target), None)
    print(f"time to {target:.0%} val mIoU:",
          f"{hit['wall_s']} s (epoch {hit['epoch']})" if hit else "not reached")
tests = [e for e in m.get("evaluations", []) if e.get("stage") == "test"]
best = m.get("best_val") or {}
print("best val mIoU:", best.get("mIoU"), "epoch", best.get("epoch"),
      "| test mIoU:", tests[-1]["metrics"].get("mIoU") if tests else None,
      "| throughput:", m.get("throughput"))
EOF
  fi
done
echo "gpu_report: results in $out/"
