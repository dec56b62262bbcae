# The GPU demo size, chosen on one H200 (docs/results/demo_gpu_sizes_h200.log): the CPU size and a
# wider one, AdamW and Muon, as vmapped sweeps on the demo data. Usage: demo_gpu_sizes.sh DEVICE STEPS OUT
# (the demo at 7 passes is 1956 steps). The Muon sweeps of that log failed to trace (fixed since).
D=$(ls -d /tmp/t0/demo-*/data 2>/dev/null | head -1)
[ -n "$D" ] || { python3 -m fnlm demo --steps 1 --no-progress --out /tmp/t0 --device $1 > /dev/null; D=$(ls -d /tmp/t0/demo-*/data | head -1); }
common="--train-data $D/train.npy --val-data $D/valid.npy --vocab-size 2048 --batch-size 16 --steps $2 --lr 3e-3 --min-lr 3e-4 --warmup-steps $(( $2 / 20 )) --eval-every $(( $2 / 8 )) --eval-batches 20 --checkpoint-every 100000 --device $1 --no-progress"
tiny="--context-length 128 --d-model 128 --num-layers 3 --num-heads 4 --d-ff 352"
mid="--context-length 128 --d-model 256 --num-layers 4 --num-heads 4 --d-ff 688"
python3 -m fnlm train $common $tiny --out $3/tiny_adamw --sweep lr=0.003 &
python3 -m fnlm train $common $tiny --out $3/tiny_muon --optimizer muon --sweep muon_lr=0.005,0.01,0.02 &
python3 -m fnlm train $common $mid --out $3/mid_muon --optimizer muon --sweep muon_lr=0.005,0.01,0.02 &
python3 -m fnlm train $common $mid --out $3/mid_adamw --sweep lr=0.002,0.003 &
wait
python3 - $3 <<'PY'
import json, pathlib, sys
for log in sorted(pathlib.Path(sys.argv[1]).glob("*/*/log.jsonl")):
    vals = [json.loads(l) for l in log.read_text().splitlines()]
    v = [r["val_loss"] for r in vals if "val_loss" in r]
    print(log.parent.parent.name, log.parent.name, "best val %.4f last %.4f" % (min(v), v[-1]) if v else "no val", "train %.4f" % [r["train_loss"] for r in vals if "train_loss" in r][-1])
PY
