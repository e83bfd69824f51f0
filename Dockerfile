# One image for every role: relay, agent, proxy.
#   docker build -t clusterconnect .
#   docker run --rm clusterconnect agent --help
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin clusterconnect

# distroless/cc has glibc and CA certificates, no shell, and runs as uid 65532.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/clusterconnect /usr/local/bin/clusterconnect
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/clusterconnect"]
