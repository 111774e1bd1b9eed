# tokenproxy as a container, usually a sidecar beside an application.
#
#   docker build -t tokenproxy .
#   docker run --rm -v "$PWD/config:/etc/tokenproxy:ro" -v tokenproxy-data:/var/lib/tokenproxy tokenproxy
#
# The build stage runs the same release build as .ci/run (a test checks that they agree).

FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY benches ./benches
COPY examples ./examples
RUN cargo build --locked --release --bin tokenproxy

FROM debian:bookworm-slim
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
