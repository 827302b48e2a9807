FROM alpine AS builder
RUN make
FROM alpine
COPY --from=buidler /out /app
