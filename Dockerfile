# tiermq container image: an empty root with one statically linked binary.
#
# Build it with `scripts/docker-build` (compiles the static binary, then runs
# `docker build` on a context holding only the binary and this file). Nothing is pulled:
# `FROM scratch` works on machines without registry access.
#
# The binary is glibc linked with `-C target-feature=+crt-static`. It needs no files from
# the image: names (compose service names) are resolved by glibc's built-in DNS client from
# the /etc/resolv.conf and /etc/hosts that Docker mounts into every container.
#
# With a registry at hand, a multi-stage build works too (no local toolchain needed):
#
#   FROM rust:1.85 AS build
#   WORKDIR /src
#   COPY . .
#   RUN RUSTFLAGS="-C target-feature=+crt-static" \
#       cargo build --release --target x86_64-unknown-linux-gnu --bin tiermq
#   FROM scratch
#   COPY --from=build /src/target/x86_64-unknown-linux-gnu/release/tiermq /tiermq
#   (then the lines below from VOLUME on)
FROM scratch
COPY tiermq /tiermq
VOLUME ["/data"]
ENV TIERMQ_DATA_DIR=/data
# MQTT (frontend, standalone) and gRPC (backend).
EXPOSE 1883 7000
ENTRYPOINT ["/tiermq"]
CMD ["standalone"]
