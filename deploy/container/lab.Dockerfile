# The lab image of the compose cluster (compose.yaml): the unmodified app (Debian's nginx), the
# client (curl), BIRD 2 for the BGP variant, iproute2, and the ringlb binary for the one-shot
# `ringlb cert` service. Not for production: production runs the small ringlb image
# (Dockerfile) next to its own app and routing daemon.
#
#   podman build -f deploy/container/lab.Dockerfile --build-arg BASE=localhost/ringlb-base:bookworm \
#       -t localhost/ringlb-lab:bookworm target/container
#
# BASE: any Debian 12 image (apt installs what is missing, from Debian's package mirror).
ARG BASE=docker.io/library/debian:bookworm-slim
FROM ${BASE}
RUN set -eu; \
    missing=""; \
    for p in iproute2 nginx-light bird2 curl procps; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done; \
    if [ -n "$missing" ]; then \
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d; \
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null; \
        rm -rf /var/lib/apt/lists/* /usr/sbin/policy-rc.d; \
    fi; \
    rm -f /etc/nginx/sites-enabled/default; \
    mkdir -p /run/bird /var/www/html
# nginx: the stock package and its stock main config; one site that serves /var/www/html on
# port 80 of every address (the VIP is on lo once `ringlb setup` ran).
RUN printf 'server {\n    listen 80 default_server;\n    root /var/www/html;\n    index index.html;\n    access_log off;\n}\n' \
        > /etc/nginx/sites-enabled/lab
COPY ringlb /usr/local/bin/ringlb
LABEL org.opencontainers.image.title="ringlb-lab" \
      org.opencontainers.image.description="nginx, curl, BIRD 2 and ringlb for ringlb's compose lab"
