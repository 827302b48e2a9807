ARG VERSION="1.2"
FROM busybox AS build
ARG VERSION
WORKDIR /src
COPY src/ Makefile ./
ENV CFLAGS=-O2 VERSION=$VERSION
RUN make all VERSION=$VERSION
FROM build AS test
RUN --network=none ["make", "test"]
FROM scratch AS final
COPY --from=build --chown=1000:1000 --chmod=0755 /src/out /app/
USER 1000
ENV PATH=/app
LABEL org.opencontainers.image.version="1.2"
EXPOSE 8080 53/udp
VOLUME ["/data"]
ENTRYPOINT ["/app/tool"]
CMD ["--help"]
