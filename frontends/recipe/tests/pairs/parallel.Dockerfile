FROM busybox AS a
RUN echo a > /a
FROM busybox AS b
RUN echo b > /b
FROM scratch AS out
COPY --from=a /a /
COPY --from=b /b /
