#!/usr/bin/env bash
# The mini world's Table 2, end to end, for one seed, from the shipped base ckpts/base.safetensors (as the paper's
# runs all start from SD3.5-M; --pretrain trains a base first):
#   four single-reward teachers -> GRPO-Mix -> merge and SFT cold starts -> Merge+GRPO-Mix,
#   SFT+GRPO-Mix -> Flow-OPD (Merge), Flow-OPD (SFT), Flow-OPD (Merge) w/o MAR -> eval.py on every row (Table 2,
#   and the analogues of Tables 3 and 4: compositions no stage sees, quality metrics no reward optimises), and the
#   curves of GRPO-Mix against Flow-OPD.
usage() {
  cat <<'EOF'
usage: bash reproduce.sh [--quick] [--seed S] [--pretrain]

  --seed S     the seed of every stage (default 0); seed S writes ckpts/seedS/, runs/seedS/ and results/seedS/
  --quick      a smoke run of the whole pipeline at a fraction of the steps (ckpts/quickS/, ..., results/quickS/)
  --pretrain   train the base again first (python flow_matching.py, its defaults), into ckpts/seedS/base.safetensors,
               instead of starting from the shipped ckpts/base.safetensors
  NPROC=2    (environment) train under torchrun with 2 processes (gloo on CPU, nccl on GPUs)

A stage whose output exists is skipped and an interrupted one resumes, so re-running a seed finishes it.
Tables 2, 3 and 4 go to results/<seed>/table.md (and table.json), the grids and variety.png (MAR's picture)
beside it, timings to results/<seed>/times.txt.
EOF
}
set -euo pipefail
cd "$(dirname "$(readlink -f "$0")")"
SEED=0; QUICK=""; OWN_BASE=""
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --quick) QUICK=1; shift ;;
    --pretrain) OWN_BASE=1; shift ;;
    --seed) [[ "${2:-}" =~ ^[0-9]{1,9}$ ]] || { echo "error: --seed needs an integer from 0 to 999999999; see --help" >&2; exit 2; }
            SEED=$((10#$2)); shift 2 ;;
    *) echo "error: unknown argument '$1'; see bash reproduce.sh --help" >&2; exit 2 ;;
  esac
done
NPROC=${NPROC:-1}
[[ "$NPROC" =~ ^[1-9][0-9]*$ ]] || { echo "error: NPROC must be a positive integer, got '$NPROC'" >&2; exit 2; }
if [ -n "$QUICK" ]; then
  TAG=quick$SEED
  PRETRAIN="--steps 800"; TEACHER="--steps 12"; STUDENT="--steps 12"; SFT="--sft_steps 50 --sft_samples 128"
  EVAL="--n 32"
else
  TAG=seed$SEED
  PRETRAIN=""; TEACHER=""; STUDENT=""; SFT=""; EVAL="--n 128"   # every script at its defaults
fi
CK=ckpts/$TAG; LOGS=runs/$TAG; OUT=results/$TAG
if [ -z "$OWN_BASE" ] && [ ! -f ckpts/base.safetensors ]; then
  echo "error: ckpts/base.safetensors (the shipped base) does not exist; restore it (git checkout ckpts/base.safetensors) or pass --pretrain" >&2
  exit 2
fi
mkdir -p "$CK/teachers" "$CK/baselines" "$CK/students" "$LOGS" "$OUT"

run() { if [ "$NPROC" -gt 1 ]; then torchrun --standalone --nproc_per_node="$NPROC" "$@"; else python "$@"; fi; }
# stage NAME OUTPUT COMMAND...: runs COMMAND --out OUTPUT once; a finished stage is skipped, an interrupted one
# resumes from its checkpoint (or, without one, is redone); its time goes to times.txt
stage() {
  local name=$1 out=$2; shift 2
  if [ -e "$LOGS/$name.done" ]; then echo "[done] $name: $out"; return; fi
  local again=""
  if [ -d "$(dirname "$out")/.$(basename "$out").resume" ]; then again="--resume"
  elif [ -e "$out" ] || [ -e "$LOGS/$name.jsonl" ]; then again="--overwrite"; fi
  local t0=$SECONDS
  "$@" --out "$out" $again
  if [ -n "$STOPPED" ]; then  # Ctrl-C / SIGTERM: the stage checkpointed and exited 0, but it is not done
    echo "stopped during $name; run the same command again to resume it" >&2; exit 130
  fi
  touch "$LOGS/$name.done"
  echo "[$(( SECONDS - t0 ))s] $name" | tee -a "$OUT/times.txt"
}
STOPPED=""
trap 'STOPPED=1' INT TERM  # the running stage gets the signal too, and checkpoints
BASE=ckpts/base.safetensors
if [ -n "$OWN_BASE" ]; then
  BASE=$CK/base.safetensors
  stage base "$BASE" python flow_matching.py --seed "$SEED" $PRETRAIN
fi
B=(--model "$BASE" --seed "$SEED")
MIX="geneval:0.4,ocr:0.3,pickscore:0.3"
ROUTED=("$CK/teachers/geneval.safetensors" "$CK/teachers/ocr.safetensors" "$CK/teachers/pickscore.safetensors")
TEACHER_LOGS=("$LOGS/geneval.jsonl" "$LOGS/ocr.jsonl" "$LOGS/pickscore.jsonl" "$LOGS/deqa.jsonl")  # Stage 1's time

for r in geneval ocr pickscore deqa; do
  stage "$r" "$CK/teachers/$r.safetensors" run grpo_teacher.py "${B[@]}" --reward $r $TEACHER --log_file "$LOGS/$r.jsonl"
done
stage grpo-mix "$CK/baselines/grpo-mix.safetensors" run grpo_teacher.py "${B[@]}" --reward $MIX $TEACHER \
  --log_file "$LOGS/grpo-mix.jsonl"
stage merge "$CK/baselines/merge.safetensors" python merge.py "${ROUTED[@]}"
stage sft "$CK/baselines/sft.safetensors" run opd_student.py "${B[@]}" --teachers "$CK/teachers" --init sft --steps 0 \
  $SFT --log_file "$LOGS/sft.jsonl"
stage merge+grpo-mix "$CK/baselines/merge+grpo-mix.safetensors" run grpo_teacher.py "${B[@]}" --reward $MIX $TEACHER \
  --init "$CK/baselines/merge.safetensors" --log_file "$LOGS/merge+grpo-mix.jsonl"
stage sft+grpo-mix "$CK/baselines/sft+grpo-mix.safetensors" run grpo_teacher.py "${B[@]}" --reward $MIX $TEACHER \
  --init "$CK/baselines/sft.safetensors" --log_file "$LOGS/sft+grpo-mix.jsonl"
S=("${B[@]}" --teachers "$CK/teachers" $STUDENT)
stage opd-merge "$CK/students/opd-merge.safetensors" run opd_student.py "${S[@]}" --init merge \
  --log_file "$LOGS/opd-merge.jsonl"
stage opd-sft "$CK/students/opd-sft.safetensors" run opd_student.py "${S[@]}" --init "$CK/baselines/sft.safetensors" \
  --log_file "$LOGS/opd-sft.jsonl"
stage opd-merge-no-mar "$CK/students/opd-merge-no-mar.safetensors" run opd_student.py "${S[@]}" --init merge \
  --anchor base --log_file "$LOGS/opd-merge-no-mar.jsonl"

t0=$SECONDS
python eval.py $EVAL --ood --quality --seed "$SEED" --overwrite --out "$OUT" \
  "Base=$BASE" \
  "GRPO-GenEval=$CK/teachers/geneval.safetensors" "GRPO-OCR=$CK/teachers/ocr.safetensors" \
  "GRPO-PickScore=$CK/teachers/pickscore.safetensors" "GRPO-DeQA=$CK/teachers/deqa.safetensors" \
  "GRPO-Mix=$CK/baselines/grpo-mix.safetensors" "SFT+GRPO-Mix=$CK/baselines/sft+grpo-mix.safetensors" \
  "Merge+GRPO-Mix=$CK/baselines/merge+grpo-mix.safetensors" "Merge=$CK/baselines/merge.safetensors" \
  "Flow-OPD (SFT)=$CK/students/opd-sft.safetensors" "Flow-OPD (Merge)=$CK/students/opd-merge.safetensors" \
  "Flow-OPD (Merge) w/o MAR=$CK/students/opd-merge-no-mar.safetensors"
python eval.py --curves "$LOGS/grpo-mix.jsonl" "$LOGS/opd-merge.jsonl" "${TEACHER_LOGS[@]}" --table "$OUT/table.json" \
  --out "$OUT/curves.png" --overwrite | tee "$OUT/time-to-mix.txt"
echo "[$(( SECONDS - t0 ))s] eval.py" | tee -a "$OUT/times.txt"
echo "Tables 2-4 in $OUT/table.md, the rows side by side in $OUT/compare.png and variety.png, curves in $OUT/curves.png, times in $OUT/times.txt"
