# tokenproxy as a container, usually a sidecar beside an application.
#
#   docker build -t tokenproxy .          (or: podman build -t tokenproxy .)
#   docker run --rm \
#     -v "$PWD/my-tokenproxy.toml:/etc/tokenproxy/tokenproxy.toml:ro" \
#     -v tokenproxy-ca:/var/lib/tokenproxy/ca -v tokenproxy-tokens:/var/lib/tokenproxy/tokens \
#     -e TOKENPROXY_PROXY__LISTEN=0.0.0.0:8080 -p 127.0.0.1:8080:8080 -p 127.0.0.1:9090:9090 \
#     tokenproxy
#
# Mount your config as the one file, with its ca_dir and token files under /var/lib/tokenproxy
# (the two writable volumes; see config/container.toml). Standalone, the container's loopback is not
# the host's: the proxy listens on all of the container's addresses and the host publishes it on
# its own loopback only. As a Kubernetes sidecar, keep the default 127.0.0.1 (the pod's loopback).
#
# The build stage runs the same release build as .ci/run (a test checks that they agree).

# Fully qualified names: podman and other engines without a default registry resolve them too.
FROM docker.io/library/rust:1.95-slim-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock build.rs ./
COPY src ./src
COPY templates ./templates
COPY presets ./presets
COPY benches ./benches
COPY examples ./examples
RUN cargo build --locked --release --bin tokenproxy

FROM docker.io/library/debian:bookworm-slim
# ca-certificates: the system roots that upstream and token-endpoint TLS is verified against.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 tokenproxy \
    && useradd --system --uid 10001 --gid tokenproxy --home-dir /var/lib/tokenproxy --shell /usr/sbin/nologin tokenproxy \
    && mkdir -p /etc/tokenproxy /var/lib/tokenproxy/ca /var/lib/tokenproxy/tokens \
    && chown -R tokenproxy:tokenproxy /var/lib/tokenproxy
COPY --from=build /src/target/release/tokenproxy /usr/local/bin/tokenproxy
COPY config/container.toml /etc/tokenproxy/tokenproxy.toml

# The CA (ca.pem is what applications trust) and the token files (refreshed tokens are written
# back here, so it must be writable and should outlive the container).
VOLUME ["/var/lib/tokenproxy/ca", "/var/lib/tokenproxy/tokens"]
ENV TOKENPROXY_CONFIG=/etc/tokenproxy/tokenproxy.toml
# 8080: the forward proxy; 9090: /healthz /readyz /metrics /tokens.
EXPOSE 8080 9090
USER 10001:10001
ENTRYPOINT ["/usr/local/bin/tokenproxy"]
CMD ["run"]
