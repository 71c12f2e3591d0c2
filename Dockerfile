# The bob image: `bob` (controller, proxy, build, copy, run) and what `bob build` needs. The binary
# is built on the host (`cargo build --release`); scripts/build-image builds and smoke-tests this
# with buildah, from a debootstrapped base, without Docker.
FROM docker.io/library/debian:bookworm-slim

ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="bob" \
      org.opencontainers.image.description="Kubernetes-native builder of workspace images" \
      org.opencontainers.image.source="https://github.com/bob-dev/bob" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"

# buildah and its runtimes (runc for --isolation oci; crun for clusters where it works), git for
# git sources, CA certificates for TLS registries.
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      buildah runc crun ca-certificates git uidmap \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --uid 65532 --user-group --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin bob \
 && mkdir -p /var/lib/bob && chmod 1777 /var/lib/bob

COPY deploy/image/registries.conf /etc/containers/registries.conf
COPY deploy/image/storage.conf /etc/containers/storage.conf
ARG BOB_BINARY=target/release/bob
COPY ${BOB_BINARY} /usr/local/bin/bob

# The controller, proxy and clone containers run as this user; the build container's pod spec
# runs it as root (buildah), see docs/security.md.
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/bob"]
CMD ["--help"]
