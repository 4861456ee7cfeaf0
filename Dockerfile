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

# The workspace's toolchain, as rust-toolchain.toml pins it (xtask's
# setup::check_dockerfile holds the two together).
ARG RUST_IMAGE=docker.io/library/rust:1.99.1-bookworm
# Pin this by digest in a release pipeline (`static-debian12@sha256:...`);
# this repository's machines cannot resolve one.
ARG BASE_IMAGE=gcr.io/distroless/static-debian12

FROM ${RUST_IMAGE} AS builder
# musl-gcc compiles ring's C and assembly for the musl target.
RUN apt-get update \
 && apt-get install -y --no-install-recommends musl-tools=1.2.3-1 \
 && rm -rf /var/lib/apt/lists/*
# What `cargo xtask setup` installs: the daemon's build.rs builds the eBPF
# crate with the nightly that imdsguard-ebpf/rust-toolchain.toml names, and
# its rust-src (-Z build-std=core), and links it with bpf-linker, which
# loads that nightly's own LLVM (no system LLVM). BPF_LINKER_VERSION is
# xtask/src/setup.rs's.
ARG BPF_LINKER_VERSION=0.10.0
WORKDIR /src
COPY rust-toolchain.toml ./
COPY imdsguard-ebpf/rust-toolchain.toml imdsguard-ebpf/
# With no argument, `rustup toolchain install` installs the toolchain file's
# toolchain, components and profile.
RUN rustup toolchain install \
 && rustup target add x86_64-unknown-linux-musl \
 && cargo install "bpf-linker@${BPF_LINKER_VERSION}" --locked
WORKDIR /src/imdsguard-ebpf
RUN rustup toolchain install
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
