#!/bin/sh
# CronJob cxrgen-alignment-round: one more round of the feedback loop (cxrgen loop, issue 8) on the experts'
# feedback in the production store; if the gate promotes the candidate, the service switches to it.
#   1. Round K = finished rounds + 1. A round cut short last time is resumed first (the loop skips finished
#      steps and rounds, and the loop folder lives on the cxrgen-runs volume).
#   2. cxrgen loop: import the store's new feedback -> retrain the rewards -> align -> evaluate the current model
#      and the candidate on held-out prompts -> gate. A promoted checkpoint is copied to
#      /models/generators/round-K (--promote-to: a temporary sibling, then a rename).
#   3. POST /models/reload (admin key) through the Service: the replica that answers loads the checkpoint beside
#      the serving one and switches, then writes active-model.json on the shared data volume; every other
#      replica polls that file and follows (service/engine.py), and replicas started later begin with it.
set -eu
out="${LOOP_OUT:-/runs/loop}"
mkdir -p "$out"
finished=$(ls "$out"/round-*/steps/done.json 2>/dev/null | wc -l)
k=$((finished + 1))
dest="/models/generators/round-$k"
echo "alignment round $k ($finished finished before)"
cxrgen loop --out "$out" --rounds "$k" --model "$LOOP_START_MODEL" --feedback "$CXRGEN_STORE" \
  --feedback-blobs "$CXRGEN_DATA/feedback/images" --method "$LOOP_METHOD" --iterations "$LOOP_ITERATIONS" \
  --steps "$LOOP_STEPS" --device "$LOOP_DEVICE" --reward-dir /models/rewards --promote-to "$dest"
if [ ! -f "$dest/model_index.json" ]; then
  echo "round $k: the gate kept the current model (why: $out/round-$k/report.md); nothing to reload"
  exit 0
fi
python - "$dest" <<'PY'
import json, os, sys, urllib.request

req = urllib.request.Request(
    os.environ["CXRGEN_URL"].rstrip("/") + "/models/reload", method="POST",
    data=json.dumps({"source": sys.argv[1]}).encode(),
    headers={"Content-Type": "application/json", "Authorization": "Bearer " + os.environ["CXRGEN_API_KEY"]})
with urllib.request.urlopen(req, timeout=900) as r:  # an HTTP error raises: the Job fails and is retried
    print("reloaded:", r.read().decode())
PY
