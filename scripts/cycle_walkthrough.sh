#!/usr/bin/env bash
# docs/cycle.md's walkthrough on Iris, command by command, each timed; run from the repository root.
#   bash scripts/cycle_walkthrough.sh                                  # as written: p champion, "p -> w -> p" challenger
#   CHAMPION=zero-shot CHALLENGER=p NAME=iris0 PORT=8001 bash scripts/cycle_walkthrough.sh
# Writes runs/, deploy/$NAME, logs/$NAME, data/$NAME-log.jsonl; the server's output goes to logs/$NAME-server.log.
set -uo pipefail
CHAMPION="${CHAMPION:-p}"
CHALLENGER="${CHALLENGER:-p -> w -> p}"
NAME="${NAME:-iris}"
PORT="${PORT:-8000}"
URL="http://127.0.0.1:$PORT"
t() { local s; s=$(date +%s); "$@"; local rc=$?; echo "== rc=$rc wall=$(( $(date +%s) - s ))s: $*"; return $rc; }
echo "== start $(date -u)"
t .venv/bin/tandem optimize iris --strategy "$CHAMPION" --seed 0 --run-dir "runs/$NAME-champion"
t .venv/bin/tandem promote "runs/$NAME-champion" --init "deploy/$NAME"
mkdir -p logs
.venv/bin/tandem serve "deploy/$NAME" --log "logs/$NAME" --port "$PORT" > "logs/$NAME-server.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null' EXIT
for _ in $(seq 1 150); do curl -sf "$URL/health" >/dev/null && break; sleep 2; done
s=$(date +%s)
URL="$URL" .venv/bin/python - <<'PY'
import os
import random

import httpx

from tandem.tasks.iris import load_iris

rows = load_iris()  # the 150 flowers
random.Random(1).shuffle(rows)
right = 0
with httpx.Client(base_url=os.environ["URL"], timeout=300) as http:
    for ex in rows:
        reply = http.post("/v1/predict", json={"inputs": ex.inputs()}).json()
        served = (reply.get("outputs") or {}).get("species")
        if served == ex["species"]:
            feedback = {"request_id": reply["request_id"], "score": 1}
            right += 1
        else:  # wrong, or no answer (a parse error): give the right one
            feedback = {"request_id": reply["request_id"], "label": ex["species"]}
        http.post("/v1/feedback", json=feedback).raise_for_status()
print(f"served {len(rows)}, right {right}")
PY
echo "== traffic wall=$(( $(date +%s) - s ))s"
t .venv/bin/tandem data from-log "logs/$NAME" --out "data/$NAME-log.jsonl" --split 0.6,0.2,0.2
t .venv/bin/tandem optimize iris --from "deploy/$NAME" --data "data/$NAME-log.jsonl" \
    --strategy "$CHALLENGER" --seed 0 --run-dir "runs/$NAME-challenger"
t .venv/bin/tandem promote "runs/$NAME-challenger" --over "deploy/$NAME" \
    --data "data/$NAME-log.jsonl" --guard failures --notify "$URL"
promoted=$?
ask() { curl -s -X POST "$URL/v1/predict" -H 'content-type: application/json' \
    -d '{"inputs": {"sepal_length": 6.3, "sepal_width": 3.3, "petal_length": 6.0, "petal_width": 2.5}}'; echo; }
ask
if [ "$promoted" = 0 ]; then
    t .venv/bin/tandem promote --rollback "deploy/$NAME" --notify "$URL"
    ask
fi
echo "== end $(date -u)"
