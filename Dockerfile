# syntax=docker/dockerfile:1
#
# The imdsguard node agent image: one static (musl) binary on
# distroless/static. No shell, no package manager, no libc.
#
#   docker build -t ghcr.io/imdsguard/imdsguard:0.1.0 .
#
# `cargo xtask deploy` builds the same binary with the same cargo command
# (no Docker engine needed), checks that it runs and is static, and runs it
# in a runc container with the DaemonSet's capabilities and seccomp profile.
# deploy/README.md, "The image", says more.

# The workspace's toolchain (edition 2024).
ARG RUST_IMAGE=docker.io/library/rust:1.95.0-bookworm
# Pin this by digest in a release pipeline (`static-debian12@sha256:...`);
# this repository's machines cannot resolve one.
ARG BASE_IMAGE=gcr.io/distroless/static-debian12

FROM ${RUST_IMAGE} AS builder
# musl-gcc compiles ring's C and assembly for the musl target.
RUN apt-get update \
 && apt-get install -y --no-install-recommends musl-tools=1.2.3-1 \
 && rm -rf /var/lib/apt/lists/*
# What `cargo xtask setup` installs: the daemon's build.rs builds the eBPF
# crate with nightly's rust-src (-Z build-std=core) and links it with
# bpf-linker 0.10.0, which uses rustc's own LLVM (no system LLVM).
RUN rustup target add x86_64-unknown-linux-musl \
 && rustup toolchain install nightly --profile minimal --component rust-src \
 && cargo install bpf-linker@0.10.0 --locked
WORKDIR /src
COPY . .
# Static by default on musl: the binary runs on distroless/static. The same
# command as xtask/src/deploy.rs (BUILD_ARGS).
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --target x86_64-unknown-linux-musl \
        -p imdsguard-daemon --bin imdsguard \
 && install -D target/x86_64-unknown-linux-musl/release/imdsguard /out/imdsguard \
 && /out/imdsguard --version

FROM ${BASE_IMAGE}
COPY --from=builder /out/imdsguard /usr/local/bin/imdsguard
# Root, on purpose: Kubernetes puts the added capabilities (BPF, NET_ADMIN,
# PERFMON) into the effective set only for uid 0, and the agent creates its
# pin directory in the host's bpffs, which is usually 0700 root:root. The
# DaemonSet drops every other capability and keeps the root filesystem
# read-only.
# hadolint ignore=DL3002
USER 0:0
ENTRYPOINT ["/usr/local/bin/imdsguard"]
CMD ["--help"]
