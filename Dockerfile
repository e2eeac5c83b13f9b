# syntax=docker/dockerfile:1
# wharf's container image: `docker build -t REGISTRY/wharf:TAG .` (multi-arch: `docker buildx build
# --platform linux/amd64,linux/arm64 ...`). The final image is distroless: wharf, glibc, CA certificates and
# nothing else, no shell, running as the non-root user 65532; the cache lives on a volume at /var/lib/wharf,
# so the root filesystem can be read-only. No HEALTHCHECK: Kubernetes probes /healthz and /readyz.
#
# Builder and runtime are both Debian 12 (bookworm), so the binary's glibc is the runtime's. glibc rather than a
# static musl build: glibc's resolver falls back to TCP and honours resolv.conf options as Kubernetes sets
# them, and its allocator scales across threads. tests/it/deploy.rs checks the binary's shared libraries
# against this runtime.

ARG RUST_VERSION=1.95

FROM docker.io/library/rust:${RUST_VERSION}-bookworm AS build
# protoc: the container runtime's gRPC bindings (CRI, containerd) are generated at build time.
RUN apt-get update \
    && apt-get install -y --no-install-recommends protobuf-compiler \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin wharf \
    && install -D -m 0755 target/release/wharf /out/usr/local/bin/wharf \
    && install -d -m 0750 /out/var/lib/wharf

FROM gcr.io/distroless/cc-debian12:nonroot
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG CREATED=unknown
LABEL org.opencontainers.image.title="wharf" \
      org.opencontainers.image.description="A pull-through caching OCI registry mirror" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.documentation="README.md, deploy/README.md"
COPY --from=build /out/usr/local/bin/wharf /usr/local/bin/wharf
COPY --from=build --chown=65532:65532 /out/var/lib/wharf /var/lib/wharf
USER 65532:65532
EXPOSE 5000
VOLUME ["/var/lib/wharf"]
ENTRYPOINT ["/usr/local/bin/wharf"]
CMD ["serve", "--data-dir", "/var/lib/wharf"]
