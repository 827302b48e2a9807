ARG MODE=u=rwZ
FROM scratch
ARG MODE
COPY --chmod=$MODE b /b
