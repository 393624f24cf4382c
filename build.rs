//! Build script: compiles the vendored `proto/onnx.proto` (proto2, ONNX 1.23) with prost-build,
//! using the protoc binary from `protoc-bin-vendored` so no system protoc is needed; and, with the `cuda` feature, compiles
//! `cuda_ops/` with nvcc through the `cc` crate.

use std::env;

fn main() {
    println!("cargo:rerun-if-changed=proto/onnx.proto");
    let protoc = protoc_bin_vendored::protoc_bin_path().expect("protoc-bin-vendored has no protoc for this host");
    // SAFETY: build scripts are single-threaded; prost-build reads PROTOC from the environment.
    unsafe { env::set_var("PROTOC", protoc) };
    let mut config = prost_build::Config::new();
    // Keep raw bytes as `Vec<u8>` (default): byte-identical round trips rely on it.
    config
        .compile_protos(&["proto/onnx.proto"], &["proto/"])
        .expect("compiling proto/onnx.proto");

    // No linker version script is needed for the plugin: rustc already exports only the
    // `#[no_mangle] extern "C"` items of a cdylib (RegisterCustomOps); a test checks with nm.

    if env::var_os("CARGO_FEATURE_CUDA").is_some() {
        build_cuda();
    }
}

fn build_cuda() {
    println!("cargo:rerun-if-changed=cuda_ops");
    println!("cargo:rerun-if-env-changed=NVCC");
    let mut build = cc::Build::new();
    build.cuda(true).cudart("static");
    for arch in ["80", "90"] {
        build.flag("-gencode").flag(format!("arch=compute_{arch},code=sm_{arch}"));
    }
    if let Ok(entries) = std::fs::read_dir("cuda_ops") {
        for e in entries.flatten() {
            let p = e.path();
            if p.extension().is_some_and(|x| x == "cu") {
                build.file(p);
            }
        }
    }
    build.compile("ghostsr_cuda_ops");
}
