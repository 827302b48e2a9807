FROM alpine
RUN --mount=type=cache,target=/c,sharing=sometimes true
RUN --network=bridge true
