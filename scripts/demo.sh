#!/usr/bin/env bash
# Set up, then run the main job: train the demo MoE (16 experts, top-2, MQA; configs/demo.toml) on the bundled
# Shakespeare corpus for about 10 minutes on 2 cores, print validation loss, bits per byte and a sample,
# leave a Hugging Face model directory in runs/demo/final, then serve it and query it over HTTP.
# Extra --section.key=value settings are passed through (e.g. --train.steps=20 for a quick look).
# Each run trains afresh, replacing the previous demo run in runs/demo (--train.overwrite=true), so
# its numbers never mix with an earlier run's; pass --train.overwrite=false to continue that run.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/moetron train configs/demo.toml --sample="ROMEO:" --train.overwrite=true "$@"
out=runs/demo
for arg in "$@"; do case "$arg" in --train.out_dir=*) out=${arg#--train.out_dir=} ;; esac; done
# Then serve it: the OpenAI-compatible server on loopback, queried with curl and the openai client.
port=${MOETRON_DEMO_PORT:-8765}
.venv/bin/moetron serve "${out}/final" --port "$port" --served-model-name demo --log-level warning &
server=$!
trap 'kill "$server" 2>/dev/null || true' EXIT
for _ in $(seq 120); do curl -sf "http://127.0.0.1:${port}/health" >/dev/null && break; sleep 1; done
echo
echo "[serve] moetron serve ${out}/final --port ${port} --served-model-name demo"
echo "[serve] curl http://127.0.0.1:${port}/v1/completions -d '{\"model\": \"demo\", \"prompt\": \"ROMEO:\", ...}'"
curl -sS "http://127.0.0.1:${port}/v1/completions" -H "Content-Type: application/json" \
    -d '{"model": "demo", "prompt": "ROMEO:", "max_tokens": 40, "temperature": 0}'
echo
echo "[serve] openai client, chat, streamed:"
.venv/bin/python - "$port" <<'PY'
import sys

from openai import OpenAI

client = OpenAI(base_url=f"http://127.0.0.1:{sys.argv[1]}/v1", api_key="none")
stream = client.chat.completions.create(
    model="demo", messages=[{"role": "user", "content": "Speak, JULIET."}], max_tokens=40, seed=1, stream=True
)
for chunk in stream:
    if chunk.choices:
        print(chunk.choices[0].delta.content or "", end="", flush=True)
print()
PY
kill -TERM "$server" && wait "$server" || true
trap - EXIT
cat <<EOM

Next:
  .venv/bin/moetron serve ${out}/final --port 8000                       # OpenAI-compatible API (docs/serving.md)
  .venv/bin/moetron generate ${out}/final "JULIET:" --max-tokens 80      # sample again
  .venv/bin/moetron eval ${out}/final --data path/to/text.txt             # loss / perplexity on your text
  .venv/bin/moetron eval ${out}/final --tasks moetron_next_line           # lm-eval through the server
  python -c "from transformers import AutoModelForCausalLM as M; M.from_pretrained('${out}/final')"
EOM
