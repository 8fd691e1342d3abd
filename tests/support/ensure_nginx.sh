#!/bin/sh
# Install Debian's nginx, which `fedshop server` puts in front of the SuperLink (the
# deployment tests start it), if it is missing. Needs root and the Debian package mirror;
# safe to run repeatedly. fedshop runs nginx with its own configuration, never the service.
set -eu
if command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ]; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "ensure_nginx: nginx is missing; run as root: apt-get install -y nginx" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends nginx >/dev/null
test -x /usr/sbin/nginx
