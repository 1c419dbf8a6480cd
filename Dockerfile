# syntax=docker/dockerfile:1
# Build: Rust with cmake (Pingora's zlib-ng needs it).
FROM rust:1-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends cmake \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY lua ./lua
COPY benches ./benches
RUN cargo build --release --locked --bin tollgate

# Run: slim Debian, non-root.
FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home-dir /nonexistent --shell /usr/sbin/nologin tollgate \
 && mkdir -p /etc/tollgate /run/tollgate \
 && chown tollgate:tollgate /run/tollgate
COPY --from=build /src/target/release/tollgate /usr/local/bin/tollgate
COPY conf/tollgate.yaml /etc/tollgate/tollgate.yaml
USER tollgate
ENV TOLLGATE_SERVER__PID_FILE=/run/tollgate/tollgate.pid \
    TOLLGATE_SERVER__UPGRADE_SOCK=/run/tollgate/upgrade.sock \
    TOLLGATE_ADMIN__LISTEN=0.0.0.0:9090
EXPOSE 8080 9090
HEALTHCHECK --interval=10s --timeout=2s --start-period=5s --retries=3 \
  CMD curl -fsS http://127.0.0.1:8080/health || exit 1
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/tollgate"]
CMD ["serve", "-c", "/etc/tollgate/tollgate.yaml"]
