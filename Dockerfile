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

# The dependencies are built in a layer of their own, so that a change to cib's sources
# rebuilds only cib's crates (the classic builder has no cache mounts). `plan` reduces the
# context to a recipe: every manifest, the lock file, and each Rust source replaced by an empty
# `main`. The recipe changes only when a manifest does or a source file is added or removed,
# and `COPY --from` is cached by content, so `deps` is reused across builds otherwise.
FROM ${BUILDER} AS plan
WORKDIR /src
COPY . .
RUN mkdir /recipe \
    && find . -path ./target -prune -o \( -name Cargo.toml -o -name Cargo.lock \) -print \
       | while read -r f; do install -D -m 644 "$f" "/recipe/$f"; done \
    && find . -path ./target -prune -o -name '*.rs' -print \
       | while read -r f; do mkdir -p "/recipe/${f%/*}" && echo 'pub fn main() {}' > "/recipe/$f"; done

FROM ${BUILDER} AS deps
# `release` for an image to run; the test suite may pick a cheaper profile to keep CI short.
ARG CARGO_PROFILE=release
WORKDIR /src
COPY --from=plan /recipe .
RUN cargo build --locked --profile "$CARGO_PROFILE" -p cib-server --bin cib

FROM deps AS build
# A stage does not inherit its base stage's arguments, so the profile is declared again.
ARG CARGO_PROFILE=release
# A context has no .git, so the commit `cib --version` shows comes from the builder.
ARG CIB_BUILD_COMMIT=
COPY . .
# COPY keeps the context's modification times, which can be older than the recipe's build, so
# cargo would take cib's own crates for fresh: touching the sources makes it rebuild them.
RUN find . -path ./target -prune -o \( -name '*.rs' -o -name Cargo.toml \) -exec touch {} + \
    && cargo build --locked --profile "$CARGO_PROFILE" -p cib-server --bin cib \
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
