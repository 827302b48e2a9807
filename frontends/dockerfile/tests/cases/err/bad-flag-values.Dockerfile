FROM --platform=linux busybox AS base
COPY --chmod=9999 a /a
COPY --chown=app --chmod=u=rwX,go=rX b /b
RUN --mount=type=tmpfs,target=/t,size=lots --security=root true
RUN --mount=type=cache,target=/c,mode=999,ro=maybe true
