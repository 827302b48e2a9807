FROM busybox AS deps
RUN mkdir -p /seed && echo seed > /seed/x
FROM busybox AS main
RUN --mount=type=cache,target=/root/.cache,id=pkgs,sharing=locked --mount=type=secret,id=token,required=true --mount=type=bind,target=/mnt/deps,from=deps,source=/seed --mount=type=tmpfs,target=/tmp,size=64m --mount=type=ssh,id=default ls /root/.cache /run/secrets/token /mnt/deps /tmp && ssh-add -l
RUN <<EOF
echo one
echo two
EOF
