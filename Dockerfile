# syntax=docker/dockerfile:1
# Build: docker build -t autopilot .
# Run:   docker run -v autopilot-data:/var/lib/autopilot -p 8080:8080 \
#          -e CONVIRZA_TOKEN=... -e CONVIRZA_WEBHOOK_SECRET=... -e GATEWAY_SECRET=... autopilot

FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
# Dependencies first, in their own layer: rebuilt only when Cargo.toml/Cargo.lock change.
COPY Cargo.toml Cargo.lock ./
RUN mkdir -p src tests/it \
    && echo 'fn main() {}' > src/main.rs \
    && touch src/lib.rs tests/it/main.rs \
    && cargo build --release --locked \
    && rm -rf src tests
COPY . .
RUN touch src/main.rs src/lib.rs && cargo build --release --locked --bin autopilot

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /var/lib/autopilot --create-home autopilot
COPY --from=build /src/target/release/autopilot /usr/local/bin/autopilot
COPY config/autopilot.toml /etc/autopilot/autopilot.toml
USER autopilot
WORKDIR /var/lib/autopilot
VOLUME ["/var/lib/autopilot"]
ENV AUTOPILOT_SERVER__LISTEN=0.0.0.0:8080 \
    AUTOPILOT_DATABASE__PATH=/var/lib/autopilot/autopilot.db
EXPOSE 8080
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s \
    CMD ["autopilot", "healthcheck", "--config", "/etc/autopilot/autopilot.toml"]
ENTRYPOINT ["autopilot"]
CMD ["serve", "--config", "/etc/autopilot/autopilot.toml"]
