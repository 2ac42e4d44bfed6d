# fngate's container images, built from source:
#
#   docker build --target fngate -t fngate:dev .            # control plane, proxy and node agent
#   docker build --target runtime -t fngate/runtime:dev .   # base image of runtime pods
#
# Both final images are Debian slim with the binaries in /usr/local/bin, run as the non-root
# user 65532 and carry no build tools. The `*-prebuilt` targets take binaries built on the
# host from `dist/` in the build context instead of compiling them, for machines that cannot
# pull a Rust image (scripts/test-images.sh builds and runs them that way).

ARG RUST_IMAGE=docker.io/library/rust:1.85-bookworm
ARG BASE_IMAGE=docker.io/library/debian:bookworm-slim

# Compiles fngate and the runtime wrapper.
FROM ${RUST_IMAGE} AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin fngate --bin fngate-runtime \
    && mkdir -p /dist \
    && cp target/release/fngate target/release/fngate-runtime /dist/

# What every final image has: CA certificates, and a non-root user whose numeric id lets the
# kubelet check `runAsNonRoot`. A base that already has the packages (a local base made with
# debootstrap, where builds run without network) skips apt.
FROM ${BASE_IMAGE} AS base
RUN if ! [ -e /etc/ssl/certs/ca-certificates.crt ]; then \
        apt-get update \
        && apt-get install -y --no-install-recommends ca-certificates \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && echo 'fngate:x:65532:65532:fngate:/home/fngate:/usr/sbin/nologin' >> /etc/passwd \
    && echo 'fngate:x:65532:' >> /etc/group \
    && mkdir -p /home/fngate /var/lib/fngate \
    && chown 65532:65532 /home/fngate /var/lib/fngate

# Runtime pods also run the functions' bootstraps: a shell, curl for custom runtimes written
# in bash, and python3.
FROM base AS runtime-base
RUN if ! command -v python3 >/dev/null || ! command -v curl >/dev/null; then \
        apt-get update \
        && apt-get install -y --no-install-recommends python3 curl \
        && rm -rf /var/lib/apt/lists/*; \
    fi

# The runtime wrapper sits beside fngate for default-mode functions on the custom runtime.
FROM base AS fngate
COPY --from=build /dist/fngate /dist/fngate-runtime /usr/local/bin/
USER 65532:65532
WORKDIR /var/lib/fngate
EXPOSE 8080 8081 8082
ENTRYPOINT ["/usr/local/bin/fngate"]
CMD ["serve", "--listen", "0.0.0.0:8080", "--admin-listen", "0.0.0.0:8081", "--api-listen", "0.0.0.0:8082", "--function-dir", "/var/lib/fngate"]

FROM runtime-base AS runtime
COPY --from=build /dist/fngate-runtime /usr/local/bin/fngate-runtime
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/fngate-runtime"]

FROM base AS fngate-prebuilt
COPY dist/fngate dist/fngate-runtime /usr/local/bin/
USER 65532:65532
WORKDIR /var/lib/fngate
EXPOSE 8080 8081 8082
ENTRYPOINT ["/usr/local/bin/fngate"]
CMD ["serve", "--listen", "0.0.0.0:8080", "--admin-listen", "0.0.0.0:8081", "--api-listen", "0.0.0.0:8082", "--function-dir", "/var/lib/fngate"]

FROM runtime-base AS runtime-prebuilt
COPY dist/fngate-runtime /usr/local/bin/fngate-runtime
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/fngate-runtime"]
