#!/usr/bin/env bash
# bench/train.py on one GPU (issue 11 §7): LLaMA-2-7B shapes with CLIP-L/14-336, random weights, bf16, a pretrain
# and a finetune step against transformers' LlavaForConditionalGeneration; samples/s per GPU and MFU. Prints
# two JSON lines. Sized to finish in under 8 minutes: fewer LLM layers (16 for pretrain, 8 for finetune, which
# also trains the LLM and so holds its fp32 master weights and Adam moments), one interleaved repeat.
# Without DeepSpeed on the machine both sides step with plain torch AdamW instead (the JSON says which).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
"$PYTHON" -c "import neva_core.llava, neva_core.train.config, neva_core.train.loop" \
    || { echo "neva_core does not import here: install its dependencies (wheels) first" >&2; exit 1; }
OPTIMIZER=deepspeed
"$PYTHON" -c "import deepspeed" 2>/dev/null || OPTIMIZER=torch
common=(--size 7b --device cuda --dtype bf16 --zero 1 --steps 3 --repeats 1 --optimizer "$OPTIMIZER")
timeout 230 "$PYTHON" bench/train.py "${common[@]}" --stage pretrain --llm-layers 16 --micro-batch 16
timeout 230 "$PYTHON" bench/train.py "${common[@]}" --stage finetune --llm-layers 8 --micro-batch 8
