FROM alpine
RUNN echo one
COPY --form=build /a /b
CMD ["a", 1]
