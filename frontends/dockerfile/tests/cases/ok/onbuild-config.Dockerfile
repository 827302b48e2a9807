FROM node:20 AS base
LABEL org.opencontainers.image.title="demo" maintainer=me
ONBUILD COPY . /app
ONBUILD RUN npm ci
HEALTHCHECK --interval=5s --timeout=3s --retries=3 CMD curl -f http://localhost/ || exit 1
STOPSIGNAL SIGTERM
VOLUME ["/data", "/cache"]
SHELL ["/bin/bash", "-c"]
RUN echo $0
ADD --link https://example.com/archive.tar.gz /opt/
ADD https://github.com/moby/buildkit.git#v0.32.0 /buildkit
ADD vendor.tar /vendor/
MAINTAINER someone
