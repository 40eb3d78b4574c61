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
# The teacher world holds compositions out of training (teacher_world_config); every eval line
# and eval.json report seen and unseen apart, and only val is looked at during training.
#
# The committed teacher: one config with the defaults and "--generate-limit 0", two calls: 9000
# steps of batch 256 are ~823 s of steps on an H200, and each call also generates the world and
# decodes its images (well under a minute before the first step). Give SECONDS <= 540, so that
# the checkpoint written on SIGINT and its upload fit in the 600-s call. Name the config after
# its world ("h", the held-out one), so that a .gpu/NAME.run.tar.xz left by an earlier retrain
# on another world is never resumed:
#   call 1: bash .gpu/train_teacher.sh 540 "h|--generate-limit 0"   (about step 5000)
#   here:   cat FILES_AT/h.run.tar.xz.* > .gpu/h.run.tar.xz
#   call 2: the same command; it resumes and finishes, h.tar.gz comes back.
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
  # Overall, seen and unseen val accuracy of the last evaluations (the per-type values are in
  # metrics.jsonl).
  awk '/^eval @/ { o = $1 " " $2 " " $3
    for (i = 4; i < NF; i += 2) if ($i ~ /^val_acc(_seen|_unseen)?$/) o = o " " $i " " $(i + 1)
    print o }' /tmp/out-$name/log.txt | tail -4
  grep '^step' /tmp/out-$name/log.txt | tail -1
  grep -v '^step\|^eval @\|^\s*$\|^ *[0-9]*: ' /tmp/out-$name/log.txt | tail -6 | cut -c1-300
done
ls -la $OUT
