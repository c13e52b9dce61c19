# syntax=docker/dockerfile:1
# Build: docker build -t autopilot .
# Run:   docker run -d --name autopilot --stop-timeout 30 \
#          -v autopilot-data:/var/lib/autopilot -p 8080:8080 \
#          --env-file autopilot.env autopilot
#        (autopilot.env holds CONVIRZA_TOKEN=…, CONVIRZA_WEBHOOK_SECRET=…, GATEWAY_SECRET=…;
#        mount your own config over /etc/autopilot/autopilot.toml.)

FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
# Dependencies first, in their own layer: rebuilt only when Cargo.toml/Cargo.lock change.
# Cargo reads every target the manifest declares (bin, lib, test, benches): each gets a stub.
COPY Cargo.toml Cargo.lock ./
RUN mkdir -p src tests/it benches \
    && echo 'fn main() {}' > src/main.rs \
    && touch src/lib.rs tests/it/main.rs benches/dispatch.rs benches/schedule.rs \
    && cargo build --release --locked \
    && rm -rf src tests benches
COPY . .
# touch: the copied sources may be older than the stubs' build.
RUN touch src/main.rs src/lib.rs && cargo build --release --locked --bin autopilot

FROM debian:bookworm-slim
# CA roots for TLS to the platform: the bundle of the build stage (the rust image installs
# Debian's ca-certificates), so the runtime needs no apt layer and no version pin.
COPY --from=build /etc/ssl/certs/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
RUN groupadd --system --gid 10001 autopilot \
    && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/autopilot \
       --shell /usr/sbin/nologin autopilot \
    && install -d -o 10001 -g 10001 -m 0700 /var/lib/autopilot
COPY --from=build /src/target/release/autopilot /usr/local/bin/autopilot
COPY config/autopilot.toml /etc/autopilot/autopilot.toml
# Numeric, so that the runtime (e.g. Kubernetes' runAsNonRoot) can tell it is not root.
USER 10001:10001
WORKDIR /var/lib/autopilot
# The SQLite database (+ -wal, -shm, .lock). A bind-mounted host directory must be
# writable by uid 10001.
VOLUME ["/var/lib/autopilot"]
ENV AUTOPILOT_SERVER__LISTEN=0.0.0.0:8080 \
    AUTOPILOT_DATABASE__PATH=/var/lib/autopilot/autopilot.db
EXPOSE 8080
# Needs no secrets: asks this config's daemon for /readyz on loopback.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s \
    CMD ["autopilot", "healthcheck", "--config", "/etc/autopilot/autopilot.toml"]
# SIGTERM drains in-flight PATCHes for [queue] shutdown_grace (default 15s): give
# `docker stop`/`docker run` a --stop-timeout above it (Docker's default is 10s).
STOPSIGNAL SIGTERM
ENTRYPOINT ["autopilot"]
CMD ["serve", "--config", "/etc/autopilot/autopilot.toml"]
