#!/usr/bin/env bash
# A tour of the resolver over the sample tree in environments/: validate the whole
# tree, render one tenant's production config, explain where a value comes from, and
# show what a broken edit looks like (on a scratch copy; environments/ is untouched).
set -euo pipefail
cd "$(dirname "$0")/.."
export CONFIGBUS_ROOT=environments

step() { printf '\n\033[1m$ %s\033[0m\n' "$*"; }

step configbus validate
configbus validate

step "configbus render aurora-records prod | head -n 25"
configbus render aurora-records prod | head -n 25

step configbus explain aurora-records prod database.postgresql.connection_pool.max_size
configbus explain aurora-records prod database.postgresql.connection_pool.max_size

step configbus explain nimbus-fm dev alerting.channels.pagerduty
configbus explain nimbus-fm dev alerting.channels.pagerduty

scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
cp -r environments "$scratch/environments"
sed -i 's/^\(\s*max_size:\s*\).*/\1"lots"/' "$scratch/environments/prod/prod.yml"
printf 'cache:\n  redis: [unclosed\n' >> "$scratch/environments/dev/overrides/local.yml"

step "configbus validate   # on a scratch copy with two broken edits"
if CONFIGBUS_ROOT="$scratch/environments" configbus validate; then
  echo "expected the broken copy to fail validation" >&2
  exit 1
else
  echo "(exit $?)"
fi
