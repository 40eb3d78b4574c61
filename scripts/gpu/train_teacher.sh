#!/usr/bin/env bash
# Train the tiny teacher on the GPU machine (the `device` tool), over as many calls as it takes.
#
# Here (no GPU needed), once per change of the code:
#   source ../shared/gpu/cuda-env.sh
#   CARGO_TARGET_DIR=target/cuda cargo build --release --features cuda --bin train_teacher
#   mkdir -p .gpu && cp scripts/gpu/train_teacher.sh ../shared/gpu/device-libpath.sh .gpu/
#   strip -o .gpu/train_teacher target/cuda/release/train_teacher && xz -f -T2 .gpu/train_teacher
# Then run on the device with carry [".gpu"]:
#   bash .gpu/train_teacher.sh SECONDS "name|train_teacher flags" ...
# Several configs run side by side on the one GPU. A config still training after SECONDS gets
# SIGINT, which makes train_teacher stop after the current step with a checkpoint; its run
# directory comes back as $OUT/NAME.run.tar.xz.aa, .ab, ... (pieces under the 16 MB a file may
# have). To go on, join them here into .gpu/NAME.run.tar.xz (`cat NAME.run.tar.xz.* >
# .gpu/NAME.run.tar.xz`) and call again with the same spec: the run resumes where it stopped.
# A finished config comes back as $OUT/NAME.tar.gz: the checkpoint in the TinyLLaVA layout with
# eval.json, the log, metrics.jsonl and the run's config.json. Generation on the whole test split
# is slow there (one sample at a time, launch-bound): pass --generate-limit 0 and complete it here
# with `train_teacher --eval-only --out DIR --run-dir RUN` (RUN: a folder with the metrics.jsonl
# and config.json that came back, so that eval.json records the training facts).
#
# The committed teacher: one config "b|--generate-limit 0" (the defaults), two calls of ~9 min.
set -u
limit=$1; shift
cd "$(dirname "$0")/.."
[ -x .gpu/train_teacher ] || { xz -dk .gpu/train_teacher.xz && chmod +x .gpu/train_teacher; }
export LD_LIBRARY_PATH=$(bash .gpu/device-libpath.sh)
for spec in "$@"; do
  name=${spec%%|*}; flags=${spec#*|}
  run=/tmp/run-$name; out=/tmp/out-$name
  mkdir -p $run $out
  ( [ -f .gpu/$name.run.tar.xz ] && xz -dc .gpu/$name.run.tar.xz | tar -xf - -C $run
    # --foreground: without it timeout signals the whole process group as well, and a second
    # SIGINT makes train_teacher quit without its checkpoint.
    timeout --foreground -s INT $limit .gpu/train_teacher --device cuda --lines \
      --world /tmp/world-$name --run-dir $run --out $out/teacher $flags >> $out/log.txt 2>&1
    echo "rc=$?" >> $out/log.txt
    if [ -f $out/teacher/model.safetensors ]; then
      cp $run/metrics.jsonl $run/config.json $out/
      tar -czf $OUT/$name.tar.gz -C $out .
    else
      cp $out/log.txt $OUT/$name.log
      cd $run && l=$(cat checkpoints/latest) &&
        tar -cf - config.json metrics.jsonl checkpoints/latest checkpoints/$l |
        xz -1 -T4 | split -b 15M - $OUT/$name.run.tar.xz.
    fi ) &
done
wait
for spec in "$@"; do
  name=${spec%%|*}; echo "== $spec"
  grep '^eval @' /tmp/out-$name/log.txt | cut -c1-300 | tail -4
  grep '^step' /tmp/out-$name/log.txt | tail -1
  grep -v '^step\|^eval @\|^\s*$\|^ *[0-9]*: ' /tmp/out-$name/log.txt | tail -6 | cut -c1-300
done
ls -la $OUT
