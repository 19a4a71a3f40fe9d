# cib in a container: `cib serve`, with its data directory on a volume.
#
#   docker build -t cib --build-arg CIB_BUILD_COMMIT="$(git rev-parse HEAD)" .
#   docker run -d --name cib -p 8080:8080 -v cib-data:/var/lib/cib \
#       -v /var/run/docker.sock:/var/run/docker.sock \
#       --group-add "$(stat -c %g /var/run/docker.sock)" cib
#
# Mounting the Docker socket gives the container, and so anyone who controls cib, the power
# of root on the host: see docs/operations.md ("cib in a container") for that risk and for
# the alternative, DOCKER_HOST over TLS.
#
# Only the classic builder's instructions are used, so it builds on any daemon. BUILDER and
# RUNTIME name the two bases; the defaults are the public images, and cib's own test suite,
# which cannot pull, passes its local stand-ins for the same Debian release.

ARG BUILDER=rust:1.95-bookworm
ARG RUNTIME=debian:bookworm-slim

FROM ${BUILDER} AS build
# A context has no .git, so the commit `cib --version` shows comes from the builder.
ARG CIB_BUILD_COMMIT=
# `release` for an image to run; the test suite may pick a cheaper profile to keep CI short.
ARG CARGO_PROFILE=release
WORKDIR /src
COPY . .
RUN cargo build --locked --profile "$CARGO_PROFILE" -p cib-server --bin cib \
    && dir=$(if [ "$CARGO_PROFILE" = dev ]; then echo debug; else echo "$CARGO_PROFILE"; fi) \
    && install -D "target/$dir/cib" /out/cib

FROM ${RUNTIME}
# Git fetches and inspects the repositories cib builds; the CA bundle lets it and cib reach
# forges over HTTPS.
RUN apt-get update \
    && apt-get install -y --no-install-recommends git ca-certificates \
    && rm -rf /var/lib/apt/lists/*
# cib runs as its own user, never root; it reaches Docker through the socket's group, given
# with `--group-add` at run time since its number differs between hosts.
RUN useradd --system --home-dir /var/lib/cib --create-home --shell /usr/sbin/nologin cib
COPY --from=build /out/cib /usr/local/bin/cib
ENV CIB_LISTEN=0.0.0.0:8080 \
    CIB_DATA_DIR=/var/lib/cib
USER cib
VOLUME /var/lib/cib
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/cib"]
CMD ["serve"]
