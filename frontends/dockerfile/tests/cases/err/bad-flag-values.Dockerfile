FROM --platform=linux busybox AS base
COPY --chmod=9999 a /a
COPY --chown=app --chmod=u=rwX,go=rX b /b
