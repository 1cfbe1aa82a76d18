# The dkron-ha image: one static (musl) binary on distroless, run as non-root (uid 65532).
# The webhook injects this same image into Dkron pods, where `dkron-ha install` copies the
# binary into a shared emptyDir: being static, it then runs in any Dkron image.
#
#   docker build -t ghcr.io/dkron-ha/dkron-ha:0.1.0 --build-arg DKRON_HA_GIT_COMMIT="$(git rev-parse --short=12 HEAD)" .
#
# Not built by this repository's tests (they run without a container engine), so it is kept
# deliberately plain: one build stage, no cross-compilation; build it on each target platform.

ARG RUST_VERSION=1.95

FROM docker.io/library/rust:${RUST_VERSION}-alpine AS build
# ring and mimalloc compile C (and ring some assembly).
RUN apk add --no-cache musl-dev gcc
WORKDIR /src
# .git is not in the build context: build.rs reads the commit from here instead.
ARG DKRON_HA_GIT_COMMIT=unknown
ENV DKRON_HA_GIT_COMMIT=${DKRON_HA_GIT_COMMIT}
COPY . .
# On Alpine the host target is x86_64/aarch64-unknown-linux-musl, which links statically.
RUN cargo build --release --locked --bin dkron-ha \
    && mkdir -p /out && cp target/release/dkron-ha /out/dkron-ha

FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /out/dkron-ha /usr/local/bin/dkron-ha
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/dkron-ha"]
CMD ["serve"]
