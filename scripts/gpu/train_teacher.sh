#!/usr/bin/env bash
# Train the tiny teacher on the GPU machine (the `device` tool), several configs at once on one GPU.
#
# Here (no GPU needed), once per change of the code:
#   source ../shared/gpu/cuda-env.sh
#   CARGO_TARGET_DIR=target/cuda cargo build --release --features cuda --bin train_teacher
#   mkdir -p .gpu && cp scripts/gpu/train_teacher.sh ../shared/gpu/device-libpath.sh .gpu/
#   strip -o .gpu/train_teacher target/cuda/release/train_teacher && xz -f -T2 .gpu/train_teacher
# Then run on the device with carry [".gpu"]:
#   bash .gpu/train_teacher.sh SECONDS "name|train_teacher flags" ...
# Each config comes back as $OUT/NAME.tar.gz (its checkpoint in the TinyLLaVA layout with eval.json,
# log, metrics.jsonl). A config still training after SECONDS is killed and finished from its latest
# checkpoint (the same command with --steps = that checkpoint's step: no more training, just
# evaluation and saving). Generation on the whole test split is slow there (one sample at a time,
# launch-bound): pass --generate-limit and complete it here with `train_teacher --eval-only`.
set -u
limit=$1; shift
cd "$(dirname "$0")/.."
[ -x .gpu/train_teacher ] || { xz -dk .gpu/train_teacher.xz && chmod +x .gpu/train_teacher; }
export LD_LIBRARY_PATH=$(bash .gpu/device-libpath.sh)
for spec in "$@"; do
  name=${spec%%|*}; flags=${spec#*|}
  d=/tmp/out-$name; mkdir -p $d
  ( common="--device cuda --lines --world /tmp/world-$name --run-dir /tmp/run-$name --out $d/teacher"
    timeout -s KILL $limit .gpu/train_teacher $common $flags > $d/log.txt 2>&1
    echo "rc=$?" >> $d/log.txt
    if [ ! -f $d/teacher/eval.json ]; then
      step=$(sed 's/step-0*//' /tmp/run-$name/checkpoints/latest)
      echo "finishing from checkpoint step $step" >> $d/log.txt
      .gpu/train_teacher $common $flags --steps $step >> $d/log.txt 2>&1
      echo "rc=$?" >> $d/log.txt
    fi
    cp /tmp/run-$name/metrics.jsonl /tmp/run-$name/config.json $d/ 2>/dev/null
    tar -czf $OUT/$name.tar.gz -C $d . ) &
done
wait
for spec in "$@"; do name=${spec%%|*}; d=/tmp/out-$name; echo "== $name $spec"; grep '^eval @' $d/log.txt | cut -c1-330 | tail -3; grep '^step' $d/log.txt | tail -1; grep -v '^step\|^eval @\|^\s*$' $d/log.txt | tail -9 | cut -c1-400; done
