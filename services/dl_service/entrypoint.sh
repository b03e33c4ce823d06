#!/bin/sh
# The replicas share one volume for their var folders, but a process id means something only
# inside its own container: each replica keeps its write-ahead log, spill files and metrics in a
# folder of its own, CVOPS_VAR_ROOT/<host name> (the container id), unless CVOPS_VAR_DIR is set.
# After a container is recreated, rows its predecessor left on disk (only after a crash or a
# database outage) are written with: CVOPS_VAR_DIR=CVOPS_VAR_ROOT/<old host name> cvops log replay
set -eu
if [ -z "${CVOPS_VAR_DIR:-}" ] && [ -n "${CVOPS_VAR_ROOT:-}" ]; then
  CVOPS_VAR_DIR="$CVOPS_VAR_ROOT/$(hostname)"
  export CVOPS_VAR_DIR
fi
exec "$@"
