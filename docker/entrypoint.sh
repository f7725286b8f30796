#!/bin/sh
# Runs supervisord in the foreground (PID 1's child stays supervisord, so `docker stop`
# sends it SIGTERM and the consumers drain their current events before exiting).
set -eu
mkdir -p "$EVQ_VAR/log" "$EVQ_VAR/run"
exec supervisord --nodaemon --configuration /app/docker/supervisor/supervisord.conf
