#!/usr/bin/env bash
# Set up, then run the main job: train the `small` MoE (16 experts, top-2, MQA) on the bundled
# Shakespeare corpus for about 10 minutes on 2 cores, print validation perplexity and a sample,
# and leave a Hugging Face model directory in runs/demo/final. Extra --section.key=value settings
# are passed through (e.g. --train.steps=20 for a quick look).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/moetron train configs/demo.toml --sample="ROMEO:" "$@"
out=runs/demo
for arg in "$@"; do case "$arg" in --train.out_dir=*) out=${arg#--train.out_dir=} ;; esac; done
cat <<EOM

Next:
  .venv/bin/moetron generate ${out}/final "JULIET:" --max-tokens 80      # sample again
  .venv/bin/moetron eval ${out}/final --data path/to/text.txt             # loss / perplexity on your text
  python -c "from transformers import AutoModelForCausalLM as M; M.from_pretrained('${out}/final')"
EOM
