# syntax=docker/dockerfile:1
# The redirector image: one static (musl) binary on distroless/static, run as root with the
# capabilities deploy/daemonset.yaml adds. Not built on the development machine (it has no
# container registry access); see the README, "On a cluster".
#
#   docker build -t redirector:0.1.0 .

FROM rust:1.95-trixie AS build
# musl-gcc compiles ring's C and assembly for the static target.
RUN apt-get update \
    && apt-get install -y --no-install-recommends musl-tools \
    && rm -rf /var/lib/apt/lists/*
# redirector-user/build.rs builds the kernel programs with aya-build, which compiles `core` for
# the BPF target (rust-src) and links with bpf-linker built against this toolchain's own
# libLLVM: the steps of `cargo xtask setup` (xtask/src/setup.rs). bpf-linker keeps an rpath to
# /opt/llvm/lib, so the links stay.
RUN rustup component add rust-src \
    && rustup target add "$(uname -m)-unknown-linux-musl" \
    && libllvm="$(ls "$(rustc --print sysroot)"/lib/libLLVM.so.* | head -n 1)" \
    && mkdir -p /opt/llvm/lib \
    && ln -s "$libllvm" /opt/llvm/lib/libLLVM.so \
    && ln -s "$libllvm" /opt/llvm/lib/ \
    && llvm="$(rustc -vV | sed -n 's/^LLVM version: \([0-9]*\).*/\1/p')" \
    && LLVM_PREFIX=/opt/llvm cargo install bpf-linker --locked --version 0.13.0 \
        --no-default-features --features "llvm-$llvm"
WORKDIR /src
COPY . .
RUN target="$(uname -m)-unknown-linux-musl" \
    && export "CC_$(echo "$target" | tr - _)=musl-gcc" \
    && cargo build --release --locked --package redirector-user --bin redirector \
        --target "$target" \
    && cp "target/$target/release/redirector" /redirector

FROM gcr.io/distroless/static-debian13
COPY --from=build /redirector /usr/local/bin/redirector
ENTRYPOINT ["/usr/local/bin/redirector"]
