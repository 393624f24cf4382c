//! `--provider cuda` with a GhostShift model needs the plugin built with the `cuda` feature:
//! the default plugin (`target/release`) has only CPU kernels, and ONNX Runtime would quietly
//! run GhostShift on the CPU with copies around it. This module picks a CUDA-capable plugin (it
//! carries [`crate::plugin::unmask_cuda_marker`]) from the candidates, the CUDA build's
//! `target/cuda/release/libghostsr.so` included, and says which files were CPU-only builds. The
//! session then also sets `session.disable_cpu_ep_fallback`, so any CPU placement is an error.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use super::session::{PLUGIN_FILE, plugin_candidates};

/// Where `cargo build --release --features cuda` puts the CUDA plugin (see scripts/test.sh).
pub const CUDA_PLUGIN_DIR: &str = "target/cuda/release";

/// The session option that turns a CPU placement into a session-creation error.
pub const DISABLE_CPU_FALLBACK: &str = "session.disable_cpu_ep_fallback";

/// Whether `bytes` (a plugin file) come from a build with the `cuda` feature.
pub fn has_cuda_kernels(bytes: &[u8]) -> bool {
    let marker = crate::plugin::unmask_cuda_marker();
    bytes.windows(marker.len()).any(|w| w == marker)
}

/// Candidates for a CUDA session: `explicit` alone when given, else [`plugin_candidates`]
/// followed by the CUDA build's plugin.
pub fn cuda_plugin_candidates(explicit: Option<&Path>) -> Vec<PathBuf> {
    let mut c = plugin_candidates(explicit);
    if explicit.is_none() {
        c.push(Path::new(CUDA_PLUGIN_DIR).join(PLUGIN_FILE));
    }
    c
}

/// The first candidate with CUDA kernels; errors name every file tried and why it was refused.
pub fn find_cuda_plugin(explicit: Option<&Path>) -> Result<PathBuf> {
    let mut refused = Vec::new();
    for p in cuda_plugin_candidates(explicit) {
        if !p.is_file() {
            refused.push(format!("{} (not found)", p.display()));
            continue;
        }
        let bytes =
            std::fs::read(&p).with_context(|| format!("reading the GhostShift plugin {}", p.display()))?;
        if has_cuda_kernels(&bytes) {
            return Ok(p);
        }
        refused.push(format!("{} (CPU-only build)", p.display()));
    }
    bail!(
        "--provider cuda: the model uses the ai.ghostsr domain, so it needs a GhostShift plugin with \
         CUDA kernels, else GhostShift would run on the CPU; tried {}. Build one with \
         `cargo build --release --features cuda` (GHOSTSR_CUDA_HOME=<CUDA toolkit>, \
         CARGO_TARGET_DIR=target/cuda: gives {CUDA_PLUGIN_DIR}/{PLUGIN_FILE}) or pass --plugin PATH",
        refused.join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_the_marker_in_a_file() {
        let marker = crate::plugin::unmask_cuda_marker();
        let mut bytes = vec![7u8; 1000];
        assert!(!has_cuda_kernels(&bytes));
        bytes[500..500 + marker.len()].copy_from_slice(&marker);
        assert!(has_cuda_kernels(&bytes));
        bytes[520] ^= 1;
        assert!(!has_cuda_kernels(&bytes));
    }

    #[test]
    fn a_cpu_only_plugin_is_refused_with_the_reason() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cpu = dir.path().join("cpu.so");
        std::fs::write(&cpu, b"\x7fELF no marker here").expect("write");
        let e = format!("{:#}", find_cuda_plugin(Some(&cpu)).unwrap_err());
        assert!(e.contains("cpu.so (CPU-only build)") && e.contains("--features cuda"), "{e}");
        let missing = dir.path().join("missing.so");
        let e = format!("{:#}", find_cuda_plugin(Some(&missing)).unwrap_err());
        assert!(e.contains("missing.so (not found)"), "{e}");

        let cuda = dir.path().join("cuda.so");
        let mut bytes = b"\x7fELF".to_vec();
        bytes.extend(crate::plugin::unmask_cuda_marker());
        std::fs::write(&cuda, bytes).expect("write");
        assert_eq!(find_cuda_plugin(Some(&cuda)).expect("CUDA plugin"), cuda);
        let c = cuda_plugin_candidates(None);
        assert_eq!(c.last().expect("candidates"), &Path::new(CUDA_PLUGIN_DIR).join(PLUGIN_FILE));
    }

    #[test]
    fn built_plugins_say_what_they_are() {
        // The plugin beside this test binary is this build's cdylib (scripts/test.sh builds it
        // before the tests): CUDA kernels exactly when the `cuda` feature is on.
        let exe = std::env::current_exe().expect("exe");
        let dir = exe.parent().and_then(Path::parent).expect("target/<profile>");
        let plugin = dir.join(PLUGIN_FILE);
        let bytes = std::fs::read(&plugin).unwrap_or_else(|e| {
            panic!("{}: {e}; build the plugin first (cargo build --release)", plugin.display())
        });
        assert_eq!(has_cuda_kernels(&bytes), cfg!(feature = "cuda"), "{}", plugin.display());
        // Release plugins ship without debug info (build.rs): 31 MB before, ~1-2 MB now.
        if !cfg!(debug_assertions) {
            assert!(bytes.len() <= 5 << 20, "{} is {} bytes, more than 5 MB", plugin.display(), bytes.len());
        }
    }
}
