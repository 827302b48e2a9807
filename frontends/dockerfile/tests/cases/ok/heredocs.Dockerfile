FROM alpine
ARG NAME=world
RUN <<EOF
echo hello $NAME
EOF
RUN <<-"SCRIPT" sh
	echo literal $NAME
	SCRIPT
COPY <<EOF /etc/greeting
hi ${NAME}
EOF
RUN cat <<A <<B > /out
first
A
second
B
