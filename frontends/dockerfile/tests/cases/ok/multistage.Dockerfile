# syntax=docker/dockerfile:1
ARG BASE=alpine:3.20
FROM ${BASE} AS build
ARG TARGETPLATFORM
ENV GOFLAGS=-mod=vendor CGO_ENABLED=0
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY . .
RUN go build -o /out/app ./cmd/app

FROM scratch AS final
COPY --from=build --chown=10:10 --chmod=0755 /out/app /app
USER 10
EXPOSE 8080
ENTRYPOINT ["/app"]
CMD ["serve"]
