# For docker users: the image `make image` writes (target/image/*.oci.tar), built by docker from
# the executables `make image` built. Prefer the archive itself (`docker load -i` it); this file
# exists so `docker buildx build` can tag and push the same thing:
#
#   make image
#   docker buildx build --platform linux/amd64,linux/arm64 -t ghcr.io/dkron-ha/dkron-ha:0.1.0 .
#
# The binary alone, as in `make image`: static (musl), no libc, no shell. The webhook injects
# this same image into Dkron pods, where `dkron-ha install` copies the binary into a shared
# emptyDir: being static, it runs in any Dkron image. tests/release.rs holds this file to
# xtask's image (path, user, entrypoint, command).
FROM scratch
ARG TARGETARCH
COPY --chmod=0755 target/image/linux-${TARGETARCH}/dkron-ha /usr/local/bin/dkron-ha
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/dkron-ha"]
CMD ["serve"]
LABEL org.opencontainers.image.title="dkron-ha" \
      org.opencontainers.image.source="https://github.com/dkron-ha/dkron-ha" \
      org.opencontainers.image.licenses="Apache-2.0"
