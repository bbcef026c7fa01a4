#!/bin/sh
# FLARE24 container entry: every /workspace/inputs/*.nii.gz -> /workspace/outputs/CASE.nii.gz (+ efficiency.csv).
# The folders, the checkpoint and the config can be changed through the environment (the tests do).
set -eu
exec python -m lightning_flare.predict \
  --ckpt "${MODEL:-/workspace/model.ckpt}" \
  --input "${INPUTS:-/workspace/inputs}" \
  --output "${OUTPUTS:-/workspace/outputs}" \
  --config "${CONFIG:-/workspace/configs/flare24.yaml}" \
  "$@"
