FROM alpine AS a
RUN --mount=type=bind,from=a,target=/x true
