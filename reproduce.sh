#!/usr/bin/env bash
# The mini world's Table 2, end to end:
#   pretrain the base -> four single-reward teachers -> GRPO-Mix -> merge -> Flow-OPD (Merge), Flow-OPD (SFT),
#   Flow-OPD without MAR -> eval.py with every row (markdown table + one grid per row) in eval_out/.
#
#   bash reproduce.sh            # default scale
#   bash reproduce.sh --quick    # a smoke run of the whole pipeline
#   NPROC=2 bash reproduce.sh    # training under torchrun with 2 processes (gloo on CPU, nccl on GPUs)
# An existing ckpts/base.safetensors is reused (delete it to pretrain again).
set -euo pipefail
cd "$(dirname "$0")"

if [ "${1:-}" = "--quick" ]; then
  PRETRAIN="--steps 800"; TEACHER="--steps 12"; STUDENT="--steps 12 --sft_steps 50 --sft_samples 128"; EVAL="--n 32"
else
  PRETRAIN=""; TEACHER=""; STUDENT=""; EVAL="--n 128"   # every script at its defaults
fi
NPROC=${NPROC:-1}
run() { if [ "$NPROC" -gt 1 ]; then torchrun --standalone --nproc_per_node="$NPROC" "$@"; else python "$@"; fi; }
timed() { local t0=$SECONDS; "$@"; echo "[$(( SECONDS - t0 ))s] $*" | tee -a runs/times.txt; }
mkdir -p runs ckpts/teachers ckpts/baselines ckpts/students
: > runs/times.txt

[ -f ckpts/base.safetensors ] || timed python flow_matching.py $PRETRAIN --out ckpts/base.safetensors
for r in geneval ocr pickscore deqa; do
  timed run grpo_teacher.py --reward $r $TEACHER --out ckpts/teachers/$r.safetensors
done
timed run grpo_teacher.py --reward geneval:0.4,ocr:0.3,pickscore:0.3 $TEACHER --out ckpts/baselines/grpo-mix.safetensors
timed python merge.py ckpts/teachers/* --out ckpts/baselines/merge.safetensors
timed run opd_student.py --teachers ckpts/teachers/* --init merge $STUDENT --out ckpts/students/opd-merge.safetensors
timed run opd_student.py --teachers ckpts/teachers/* --init sft $STUDENT --out ckpts/students/opd-sft.safetensors
timed run opd_student.py --teachers ckpts/teachers/* --init merge --anchor none $STUDENT --out ckpts/students/opd-merge-no-mar.safetensors

timed python eval.py $EVAL \
  "Base=ckpts/base.safetensors" \
  "GRPO-GenEval=ckpts/teachers/geneval.safetensors" "GRPO-OCR=ckpts/teachers/ocr.safetensors" \
  "GRPO-PickScore=ckpts/teachers/pickscore.safetensors" "GRPO-DeQA=ckpts/teachers/deqa.safetensors" \
  "GRPO-Mix=ckpts/baselines/grpo-mix.safetensors" "Merge=ckpts/baselines/merge.safetensors" \
  "Flow-OPD (SFT)=ckpts/students/opd-sft.safetensors" "Flow-OPD (Merge)=ckpts/students/opd-merge.safetensors" \
  "Flow-OPD (Merge) w/o MAR=ckpts/students/opd-merge-no-mar.safetensors" --out eval_out
echo "Table 2 in eval_out/table.md, grids in eval_out/*.png, timings in runs/times.txt"
