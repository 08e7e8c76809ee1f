#!/bin/sh
# Job cxrgen-seed-models: put the embedded default generator and reward models (in the image, under
# $BENTO_PATH/src/models) on the models volume, unless something is there already: an operator's own
# checkpoints, or an earlier run, are kept. Each folder is copied into a hidden sibling and then renamed,
# so the service never sees half a checkpoint.
set -eu
src="${BENTO_PATH:-/home/bentoml/bento}/src/models"
dest="${MODELS_DIR:-/models}"  # the models volume
copy() {
  if [ -e "$2" ]; then
    echo "$2 exists: kept"
    return 0
  fi
  mkdir -p "$(dirname "$2")"
  tmp="$(dirname "$2")/.$(basename "$2").tmp"
  rm -rf "$tmp"
  cp -R "$1" "$tmp"
  mv "$tmp" "$2"
  echo "$2: copied from $1"
}
copy "$src/default" "$dest/generators/default"
copy "$src/rewards" "$dest/rewards"
