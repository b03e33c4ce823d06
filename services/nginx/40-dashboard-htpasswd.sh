#!/bin/sh
# Run by the nginx image's entrypoint before nginx starts (/docker-entrypoint.d/): writes the
# basic-auth file of /dashboards/ from DASHBOARD_USER and DASHBOARD_PASSWORD (.env). It refuses
# an empty or sample password (change-me), so the dashboards are never open by mistake.
# {PLAIN} is a scheme that nginx's auth_basic_user_file reads; the file is readable by nginx only.
# DASHBOARD_HTPASSWD: where to write it (default /etc/nginx/htpasswd, the template's path).
set -eu
out="${DASHBOARD_HTPASSWD:-/etc/nginx/htpasswd}"
user="${DASHBOARD_USER:-}"
password="${DASHBOARD_PASSWORD:-}"
case "$user" in
  ""|*:*) echo "$0: DASHBOARD_USER must be set and hold no ':' (see .env)" >&2; exit 1;;
esac
if [ -z "$password" ] || printf '%s' "$password" | grep -Eiq 'change[-_ ]?me'; then
  echo "$0: DASHBOARD_PASSWORD is empty or still a sample value (change-me): set it in .env" >&2; exit 1
fi
umask 077
printf '%s:{PLAIN}%s\n' "$user" "$password" > "$out"
if id nginx >/dev/null 2>&1; then chown nginx "$out"; fi   # nginx's workers read it
echo "$0: basic auth for /dashboards/ written to $out (user $user)"
