# syntax=docker/dockerfile:1
# bucketfs image: the release binary on a distroless base (glibc, CA certificates, no shell).
# Build: docker build -t bucketfs .   Run: see docker/compose.yaml and docs/OPERATIONS.md.

# ---- build: the release binary, without debug info ----
FROM rust:1.94-slim-bookworm AS build
WORKDIR /src
# The release profile without debug info, stripped, not incremental (a one-off build). Set
# before the first build: a profile change would rebuild every dependency in the second.
ENV CARGO_PROFILE_RELEASE_DEBUG=false \
    CARGO_PROFILE_RELEASE_STRIP=symbols \
    CARGO_PROFILE_RELEASE_INCREMENTAL=false
# Manifests first, so the dependency build is cached while only the sources change.
COPY Cargo.toml Cargo.lock ./
RUN mkdir src && echo 'fn main() {}' > src/main.rs && touch src/lib.rs \
    && cargo build --release --locked --bin bucketfs \
    && rm -rf src
COPY src ./src
# touch: the placeholder build left newer artifacts than the copied sources' mtimes.
RUN touch src/main.rs src/lib.rs \
    && cargo build --release --locked --bin bucketfs \
    && mkdir -p /out/usr/local/bin /out/mnt/uploads /out/var/cache/bucketfs \
    && cp target/release/bucketfs /out/usr/local/bin/bucketfs \
    && ln -s bucketfs /out/usr/local/bin/mount.fuse.bucketfs

# ---- runtime ----
# Distroless publishes rolling tags only; pin a digest (@sha256:…) for reproducible deployments.
# hadolint ignore=DL3007
FROM gcr.io/distroless/cc-debian12:latest AS runtime
COPY --from=build /out/ /
# Defaults for a sidecar mounting into a shared host directory; S3_* come from the .env.
ENV BUCKETFS_MOUNTPOINT=/mnt/uploads \
    BUCKETFS_CACHE_DIR=/var/cache/bucketfs \
    BUCKETFS_ALLOW_OTHER=true
# The cache holds the journal of data not yet in S3: keep it on a volume.
VOLUME ["/var/cache/bucketfs"]
# SIGTERM (docker stop) drains pending uploads, unmounts and exits 0. Give the container a
# stop timeout longer than BUCKETFS_DRAIN_TIMEOUT (5 min): compose's stop_grace_period.
STOPSIGNAL SIGTERM
# `bucketfs health` checks $BUCKETFS_MOUNTPOINT (health checks run with the container's
# environment), so it follows a mount point changed at run time. It gives up after 4s.
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["/usr/local/bin/bucketfs", "health"]
ENTRYPOINT ["/usr/local/bin/bucketfs", "mount"]
