FROM busybox
COPY --chmod=0755 run.sh /usr/local/bin/
COPY --chmod=u+x,g=u,o-w --chown=app tools/ /opt/tools/
COPY --link --chmod=go=rX conf /etc/app/
