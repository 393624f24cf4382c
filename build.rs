//! Build script: compiles the vendored `proto/onnx.proto` (proto2, ONNX 1.23) with prost-build,
//! using the protoc binary from `protoc-bin-vendored` so no system protoc is needed; and, with the `cuda` feature, compiles
//! `cuda_ops/` with nvcc through the `cc` crate.

use std::env;

fn main() {
    println!("cargo:rerun-if-changed=proto/onnx.proto");
    let protoc =
        protoc_bin_vendored::protoc_bin_path().expect("protoc-bin-vendored has no protoc for this host");
    // SAFETY: build scripts are single-threaded; prost-build reads PROTOC from the environment.
    unsafe { env::set_var("PROTOC", protoc) };
    let mut config = prost_build::Config::new();
    // Keep raw bytes as `Vec<u8>` (default): byte-identical round trips rely on it.
    config.compile_protos(&["proto/onnx.proto"], &["proto/"]).expect("compiling proto/onnx.proto");

    // No linker version script is needed for the plugin: rustc already exports only the
    // `#[no_mangle] extern "C"` items of a cdylib (RegisterCustomOps); a test checks with nm.
    // The release plugin is shipped without debug info (31 MB -> ~1.5 MB); the ghostsr binary
    // keeps its line tables for profiling (Cargo.toml's release profile).
    if env::var("PROFILE").is_ok_and(|p| p == "release") {
        println!("cargo:rustc-cdylib-link-arg=-Wl,--strip-debug");
    }

    build_host_kernel();

    if env::var_os("CARGO_FEATURE_CUDA").is_some() {
        build_cuda();
    }
}

/// CUDA toolkit location: `GHOSTSR_CUDA_HOME` (a directory with `bin/nvcc`, `include/`, `lib/`
/// or `lib64/`, e.g. the pip wheels' `.venv-cuda/lib/python3.11/site-packages/nvidia/cu13`), else
/// `CUDA_HOME`/`CUDA_PATH`; without any, `nvcc` from `PATH` (or `NVCC`) and the linker's defaults.
fn build_cuda() {
    println!("cargo:rerun-if-changed=cuda_ops");
    for var in ["NVCC", "GHOSTSR_CUDA_HOME", "CUDA_HOME", "CUDA_PATH"] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    let mut build = cc::Build::new();
    // No `-G` (device debug info disables device optimisation); line info is enough.
    build.cuda(true).cudart("static").debug(false).flag("-lineinfo");
    let home = ["GHOSTSR_CUDA_HOME", "CUDA_HOME", "CUDA_PATH"]
        .iter()
        .find_map(env::var_os)
        .map(std::path::PathBuf::from);
    if let Some(home) = home {
        if env::var_os("NVCC").is_none() {
            // cc picks the CUDA compiler from NVCC (and then wraps host flags for it).
            // SAFETY: build scripts are single-threaded.
            unsafe { env::set_var("NVCC", home.join("bin").join("nvcc")) };
        }
        build.include(home.join("include"));
        for lib in ["lib64", "lib"] {
            let dir = home.join(lib);
            if dir.is_dir() {
                println!("cargo:rustc-link-search=native={}", dir.display());
            }
        }
    }
    // The static CUDA runtime needs these system libraries.
    for lib in ["rt", "dl", "pthread"] {
        println!("cargo:rustc-link-lib=dylib={lib}");
    }
    for arch in ["80", "90"] {
        build.flag("-gencode").flag(format!("arch=compute_{arch},code=sm_{arch}"));
    }
    // PTX for newer GPUs (JIT-compiled by the driver), beside the SASS above.
    build.flag("-gencode").flag("arch=compute_90,code=compute_90");
    if let Ok(entries) = std::fs::read_dir("cuda_ops") {
        for e in entries.flatten() {
            let p = e.path();
            if p.extension().is_some_and(|x| x == "cu") {
                println!("cargo:rerun-if-changed={}", p.display());
                build.file(p);
            }
        }
    }
    build.compile("ghostsr_cuda_ops");
}

/// The host build of the CUDA kernel's per-element logic (`cuda_ops/ghost_shift_core.h` through
/// `cuda_ops/host_shim.cpp`), compiled by the system C++ compiler for the tests in
/// `src/plugin/cuda_host.rs`; only those tests link it, so it never reaches the plugin.
fn build_host_kernel() {
    for f in ["cuda_ops/ghost_shift_core.h", "cuda_ops/host_shim.cpp"] {
        println!("cargo:rerun-if-changed={f}");
    }
    cc::Build::new()
        .cpp(true)
        .std("c++17")
        .file("cuda_ops/host_shim.cpp")
        // The CPU kernel rounds the multiply and the add separately.
        .flag_if_supported("-ffp-contract=off")
        .warnings(true)
        .compile("ghostsr_cuda_host");
}
