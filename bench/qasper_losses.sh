#!/usr/bin/env bash
# Issue #15, item 5: the student losses from the literature, each trained once on runs/qasper's 213 labeled questions
# (same teacher, data, epochs and seed as configs/qasper.yaml's UAE student) and evaluated together on dev with paired
# intervals against base, the gold-only ablation and the shipped UAE default. Needs a finished runs/qasper.
# ~12 min per student on the 2-core CPU (5 students), then one evaluate (pool setting, no LLM re-rankers).
#   bash bench/qasper_losses.sh            # results: runs/qasper/eval_losses/report.{md,json}
set -euo pipefail
cd "$(dirname "$0")/.."
UAE=${UAE:-.venv/bin/uae-ray}
RUN=${RUN:-runs/qasper}
CFG=configs/qasper.yaml
export RAY_AUTH_MODE=disabled HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false RAY_USAGE_STATS_ENABLED=0

train() {  # train <output> <override>...
  local out=$1; shift
  $UAE train-encoder --config $CFG --run-dir $RUN --set output="$out" "$@"
}
train encoder_mix0 gold_mix=0.0                                  # the teacher's soft targets alone
train encoder_taut05 tau_t=0.5                                   # a sharper teacher
train encoder_multipos positives=gold_and_useful                 # multi-positive: gold + passages the teacher rates useful
train encoder_listwise loss=listwise in_batch_negatives=false    # Plackett-Luce: the teacher's ranking, positives first
train encoder_kl loss=kl in_batch_negatives=false                # the KL form over the group (no in-batch negatives)

$UAE evaluate --config $CFG --run-dir $RUN --set output=eval_losses --set 'systems=[base, infonce, uae]' \
  --set 'settings=[pool]' --set generate=false --set 'exp_util_ks=[1]' \
  --set students.mix0=run:encoder_mix0 --set students.taut05=run:encoder_taut05 \
  --set students.multipos=run:encoder_multipos --set students.listwise=run:encoder_listwise \
  --set students.kl=run:encoder_kl --set 'compare_to=[base, infonce, uae]'
