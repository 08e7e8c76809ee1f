#!/bin/sh
# initContainer of the cxrgen Deployment: the server starts only when
#   1. the feedback store is at this image's schema revision: the cxrgen-migrate Job migrated it
#      (`cxrgen store stats` opens the store without migrating and refuses one at another revision), and
#   2. the generator checkpoint CXRGEN_MODEL names is on the models volume (the cxrgen-seed-models Job, or
#      an operator, put it there).
# Gives up after WAIT_TIMEOUT_S (default 30 min) so that a stuck migration shows as a failing pod.
set -u
deadline=$(( $(date +%s) + ${WAIT_TIMEOUT_S:-1800} ))
late() {
  if [ "$(date +%s)" -ge "$deadline" ]; then
    echo "gave up after ${WAIT_TIMEOUT_S:-1800} s: $1" >&2
    exit 1
  fi
}
until cxrgen store stats --store "$CXRGEN_STORE" --blobs /tmp/blobs >/dev/null 2>/tmp/store.err; do
  late "$(tail -n 1 /tmp/store.err)"
  echo "waiting for the feedback store schema (Job cxrgen-migrate): $(tail -n 1 /tmp/store.err)"
  sleep 5
done
until [ -f "$CXRGEN_MODEL/model_index.json" ]; do
  late "no checkpoint at $CXRGEN_MODEL"
  echo "waiting for the checkpoint $CXRGEN_MODEL (Job cxrgen-seed-models)"
  sleep 5
done
echo "store at the current schema; checkpoint $CXRGEN_MODEL present"
