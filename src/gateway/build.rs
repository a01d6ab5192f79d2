//! Build script: compiles Envoy's rate limit service protos (vendored in
//! `src/gateway/proto/`) into Rust with protox, a protobuf compiler in Rust,
//! so a fresh machine needs nothing but cargo.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = "src/gateway/proto";
    println!("cargo:rerun-if-changed={root}");
    let fds = protox::compile([format!("{root}/envoy/service/ratelimit/v3/rls.proto")], [root])?;
    tonic_prost_build::configure()
        .build_server(true)
        // The client is for the tests (and anyone embedding the library).
        .build_client(true)
        .include_file("envoy_rls.rs")
        .compile_fds(fds)?;
    Ok(())
}
