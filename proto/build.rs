//! Generates the gRPC and storage types into OUT_DIR with a vendored protoc,
//! plus a file descriptor set for gRPC reflection.
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: build scripts are single-threaded; nothing reads the environment concurrently.
    unsafe { std::env::set_var("PROTOC", protoc) };
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("geokv_descriptor.bin"))
        .compile_protos(
            &["v1/geokv.proto", "v1/storage.proto", "v1/consensus.proto", "v1/control.proto"],
            &["v1"],
        )?;
    println!("cargo:rerun-if-changed=v1");
    Ok(())
}
