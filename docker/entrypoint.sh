#!/bin/sh
# Owns var/ and the secrets for the evq user, makes an API token on first start when none is
# given, then runs supervisord as that user in the foreground (so `docker stop` sends it
# SIGTERM and the consumers drain their current events before exiting).
set -eu
mkdir -p "$EVQ_VAR/log" "$EVQ_VAR/run"
chown evq:evq "$EVQ_VAR"
chown -R evq:evq "$EVQ_VAR/log" "$EVQ_VAR/run"
if [ -z "${API_TOKEN:-}" ] && [ -n "${API_TOKEN_FILE:-}" ]; then
  if [ ! -s "$API_TOKEN_FILE" ]; then
    mkdir -p "$(dirname "$API_TOKEN_FILE")"
    (umask 077 && python -c 'import secrets; print(secrets.token_urlsafe(32))' >"$API_TOKEN_FILE")
    echo "evq: made an API token at first start; read it with: docker exec app evq token"
  else
    echo "evq: the API token is in $API_TOKEN_FILE; read it with: docker exec app evq token"
  fi
  chown evq:evq "$API_TOKEN_FILE"
fi
exec setpriv --reuid=evq --regid=evq --init-groups \
  supervisord --nodaemon --configuration /app/docker/supervisor/supervisord.conf
