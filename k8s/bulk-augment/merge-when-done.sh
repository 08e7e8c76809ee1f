#!/bin/sh
# Job cxrgen-augment-merge: wait for the SHARDS parts of REQUEST under /output, then merge them.
set -eu
dir="/output/$REQUEST"
if [ -f "$dir/merged/manifest.json" ]; then
  echo "$dir/merged is merged already"
  exit 0
fi
while :; do
  parts="" missing=0 i=0
  while [ "$i" -lt "$SHARDS" ]; do
    parts="$parts $dir/part-$i"
    [ -f "$dir/part-$i/manifest.json" ] || missing=$((missing + 1))
    i=$((i + 1))
  done
  [ "$missing" -eq 0 ] && break
  echo "$missing of $SHARDS shards of $REQUEST not finished yet"
  sleep 60
done
# A merge cut short leaves files without a manifest: start it again from nothing.
rm -rf "$dir/merged"
# shellcheck disable=SC2086  # one argument per part
exec cxrgen augment --merge $parts --out "$dir/merged"
