//! ONNX Runtime sessions: the runtime is loaded once (from `ORT_DYLIB_PATH`, else found beside
//! the executable or on the system: [`super::locate`]); every session gets
//! a thread count, flush-to-zero/denormals-as-zero, an execution provider, and the GhostShift
//! plugin (`libghostsr.so`) whenever the model's `opset_import` declares the `ai.ghostsr` domain.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use crate::ops::GHOST_SHIFT;
use anyhow::{Context, Result, anyhow, bail};
use ort::AsPointer;
use ort::environment::Environment;
use ort::session::Session;
use ort::session::builder::SessionBuilder;
use prost::Message;

use crate::onnx::ModelProto;

pub use super::locate::ORT_DYLIB_ENV;

/// File name of the GhostShift plugin (the crate's cdylib).
pub const PLUGIN_FILE: &str = "libghostsr.so";

/// Which execution provider runs the model.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Provider {
    /// ONNX Runtime's default CPU execution provider.
    #[default]
    Cpu,
    /// CUDAExecutionProvider (needs an onnxruntime-gpu build of the library).
    Cuda,
}

/// How to build a session.
#[derive(Clone, Debug, Default)]
pub struct SessionConfig {
    /// Intra-op threads; 0 leaves ONNX Runtime's default (one per physical core).
    pub threads: usize,
    /// Explicit GhostShift plugin path; loaded even when the model does not declare the domain.
    pub plugin: Option<PathBuf>,
    /// Execution provider.
    pub provider: Provider,
    /// CUDA only: TensorFloat-32 in Conv/MatMul (ORT's `use_tf32` option); None keeps ORT's
    /// default (on, for Ampere and newer GPUs).
    pub tf32: Option<bool>,
}

/// Turns an `ort` error (whose recovery payload may not be `Send`) into an anyhow error.
pub(crate) fn ort_err<R>(e: ort::Error<R>) -> anyhow::Error {
    anyhow!("ONNX Runtime: {}", e.message())
}

/// The process-wide ONNX Runtime environment, loading the library on the first call from
/// `ORT_DYLIB_PATH` or, when that is unset, from where [`super::locate::find_ort`] finds it.
pub fn environment() -> Result<&'static Environment> {
    static ENV: OnceLock<std::result::Result<Environment, String>> = OnceLock::new();
    ENV.get_or_init(|| init_environment().map_err(|e| format!("{e:#}"))).as_ref().map_err(|e| anyhow!("{e}"))
}

fn init_environment() -> Result<Environment> {
    let exe = std::env::current_exe().ok();
    let (path, source) = super::locate::find_ort(
        std::env::var_os(ORT_DYLIB_ENV).as_deref(),
        exe.as_deref(),
        &super::locate::system_lib_dirs(),
    )?;
    let builder = ort::init_from(&path).map_err(|e| {
        anyhow!(
            "loading ONNX Runtime from {} ({source}): {e} (ghostsr needs {})",
            path.display(),
            super::locate::ORT_REQUIREMENT
        )
    })?;
    builder
        .with_name("ghostsr")
        .build()
        .map_err(ort_err)
        .with_context(|| format!("creating the ONNX Runtime environment from {}", path.display()))
}

/// Whether the serialized model declares the GhostShift domain in its `opset_import`.
pub fn declares_ghost_domain(model_bytes: &[u8]) -> Result<bool> {
    let model = ModelProto::decode(model_bytes).context("decoding the ONNX ModelProto")?;
    Ok(model.opset_import.iter().any(|o| o.domain.as_deref() == Some(GHOST_SHIFT.domain_str())))
}

/// Candidate plugin paths, in search order: `explicit` alone when given, otherwise
/// `libghostsr.so` next to the running executable, in the `ghostsr` Python package of its
/// environment (a pip install), then `target/release/libghostsr.so`.
pub fn plugin_candidates(explicit: Option<&Path>) -> Vec<PathBuf> {
    if let Some(p) = explicit {
        return vec![p.to_path_buf()];
    }
    let mut out = Vec::new();
    if let Ok(exe) = std::env::current_exe()
        && let Some(dir) = exe.parent()
    {
        // Next to the executable, then in the `ghostsr` package of its Python environment.
        out.extend(super::locate::plugin_near_exe(&exe, PLUGIN_FILE));
        // Test and example binaries live in target/<profile>/deps/.
        if dir.file_name().is_some_and(|n| n == "deps")
            && let Some(up) = dir.parent()
        {
            out.push(up.join(PLUGIN_FILE));
        }
    }
    out.push(Path::new("target/release").join(PLUGIN_FILE));
    out
}

/// Finds the GhostShift plugin (see [`plugin_candidates`]); errors name every path tried.
pub fn find_plugin(explicit: Option<&Path>) -> Result<PathBuf> {
    let candidates = plugin_candidates(explicit);
    if let Some(p) = candidates.iter().find(|p| p.is_file()) {
        return Ok(p.clone());
    }
    let tried: Vec<String> = candidates.iter().map(|p| p.display().to_string()).collect();
    if explicit.is_some() {
        bail!("GhostShift plugin not found at {}", tried.join(", "));
    }
    bail!(
        "the model uses the {} domain but the GhostShift plugin {PLUGIN_FILE} was not \
         found (tried {}); build it with `cargo build --release` or pass --plugin PATH",
        GHOST_SHIFT.domain_str(),
        tried.join(", ")
    )
}

/// Whether this ONNX Runtime build offers the named execution provider.
pub fn provider_available(name: &str) -> Result<bool> {
    let api = ort::api();
    let mut list: *mut *mut std::ffi::c_char = std::ptr::null_mut();
    let mut n: std::ffi::c_int = 0;
    // SAFETY: GetAvailableProviders fills `list` with `n` C strings, released below.
    unsafe {
        ort::Error::result_from_status((api.GetAvailableProviders)(&mut list, &mut n)).map_err(ort_err)?;
    }
    if list.is_null() {
        return Ok(false);
    }
    let mut found = false;
    for i in 0..n.max(0) as usize {
        // SAFETY: i < n, each entry is a NUL-terminated string owned by ONNX Runtime.
        let s = unsafe { std::ffi::CStr::from_ptr(*list.add(i)) };
        found |= s.to_bytes() == name.as_bytes();
    }
    // SAFETY: releases exactly what GetAvailableProviders returned.
    unsafe {
        ort::Error::result_from_status((api.ReleaseAvailableProviders)(list, n)).map_err(ort_err)?;
    }
    Ok(found)
}

fn append_cuda(builder: &mut SessionBuilder, tf32: Option<bool>) -> Result<()> {
    if !provider_available("CUDAExecutionProvider")? {
        bail!(
            "--provider cuda: this ONNX Runtime library has no CUDAExecutionProvider \
             (point {ORT_DYLIB_ENV} at an onnxruntime-gpu build's libonnxruntime.so)"
        );
    }
    let api = ort::api();
    let mut opts: *mut ort_sys::OrtCUDAProviderOptionsV2 = std::ptr::null_mut();
    // SAFETY: standard create/append/release sequence of the ONNX Runtime C API; the options
    // are copied by SessionOptionsAppendExecutionProvider_CUDA_V2.
    unsafe {
        ort::Error::result_from_status((api.CreateCUDAProviderOptions)(&mut opts)).map_err(ort_err)?;
        if let Some(on) = tf32 {
            let (key, value) = (c"use_tf32", if on { c"1" } else { c"0" });
            let status = (api.UpdateCUDAProviderOptions)(opts, &key.as_ptr(), &value.as_ptr(), 1);
            if let Err(e) = ort::Error::result_from_status(status) {
                (api.ReleaseCUDAProviderOptions)(opts);
                return Err(ort_err(e)).context("setting the CUDA provider option use_tf32");
            }
        }
        let status = (api.SessionOptionsAppendExecutionProvider_CUDA_V2)(builder.ptr_mut(), opts);
        (api.ReleaseCUDAProviderOptions)(opts);
        ort::Error::result_from_status(status).map_err(ort_err).context("enabling CUDAExecutionProvider")?;
    }
    Ok(())
}

/// The settings every session of ghostsr shares: flush-to-zero (refit or calibrated weights
/// can produce denormals, which cost ~2.7x on CPU) and `threads` intra-op threads (0: ORT's
/// default).
pub fn base_builder(env: &Environment, threads: usize) -> Result<SessionBuilder> {
    let mut builder = Session::builder(env)
        .map_err(ort_err)?
        // session.set_denormal_as_zero = 1: flush-to-zero and denormals-are-zero on ORT's threads.
        .with_flush_to_zero()
        .map_err(ort_err)?;
    if threads > 0 {
        builder = builder.with_intra_threads(threads).map_err(ort_err)?;
    }
    Ok(builder)
}

/// Serialises creating sessions that register the GhostShift plugin within this process.
///
/// ONNX Runtime 1.31 adds a custom op domain to ONNX's process-wide domain/version table with
/// a check-then-insert that is not atomic: two sessions registering `ai.ghostsr` at the same
/// moment fail with "Trying to add a domain to DomainToVersion map, but the domain is already
/// exist". Running such sessions in parallel is fine; only their creation is serialised.
pub fn plugin_registration_lock() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    // A panic while holding the guard poisons it, but the () it guards cannot be left broken.
    LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Opens `model` as an ONNX Runtime session configured by `cfg`.
pub fn open_session(model: &Path, cfg: &SessionConfig) -> Result<Session> {
    let env = environment()?;
    let bytes = std::fs::read(model).with_context(|| format!("reading {}", model.display()))?;
    let needs_plugin = declares_ghost_domain(&bytes)
        .with_context(|| format!("{} is not a valid ONNX model", model.display()))?;
    let mut builder = base_builder(env, cfg.threads)?;
    if cfg.provider == Provider::Cuda {
        append_cuda(&mut builder, cfg.tf32)?;
    }
    // Held from registering the plugin until the session exists: see `plugin_registration_lock`.
    let mut _registering = None;
    if needs_plugin || cfg.plugin.is_some() {
        let plugin = if cfg.provider == Provider::Cuda && needs_plugin {
            // GhostShift must run on the GPU: a CUDA-capable plugin, and no CPU placement.
            builder =
                builder.with_config_entry(super::cuda_plugin::DISABLE_CPU_FALLBACK, "1").map_err(ort_err)?;
            super::cuda_plugin::find_cuda_plugin(cfg.plugin.as_deref())?
        } else {
            find_plugin(cfg.plugin.as_deref())?
        };
        _registering = Some(plugin_registration_lock());
        builder = builder
            .with_operator_library(&plugin)
            .map_err(ort_err)
            .with_context(|| format!("loading the GhostShift plugin {}", plugin.display()))?;
    }
    builder
        .commit_from_file(model)
        .map_err(ort_err)
        .with_context(|| format!("loading {} into ONNX Runtime", model.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::onnx::OperatorSetIdProto;
    use crate::ops::GHOST_SHIFT;

    fn model_with_domains(domains: &[&str]) -> Vec<u8> {
        ModelProto {
            ir_version: Some(8),
            opset_import: domains
                .iter()
                .map(|d| OperatorSetIdProto { domain: Some(d.to_string()), version: Some(1) })
                .collect(),
            ..Default::default()
        }
        .encode_to_vec()
    }

    #[test]
    fn detects_the_ghost_domain() {
        assert!(!declares_ghost_domain(&model_with_domains(&[""])).unwrap());
        assert!(declares_ghost_domain(&model_with_domains(&["", GHOST_SHIFT.domain_str()])).unwrap());
        assert!(declares_ghost_domain(b"\xff\xff\xff").is_err());
    }

    #[test]
    fn plugin_search_order_and_errors() {
        let explicit = Path::new("/nonexistent/libx.so");
        assert_eq!(plugin_candidates(Some(explicit)), vec![explicit.to_path_buf()]);
        let c = plugin_candidates(None);
        assert_eq!(c.last().unwrap(), &Path::new("target/release").join(PLUGIN_FILE));
        let exe_dir = std::env::current_exe().unwrap().parent().unwrap().to_path_buf();
        assert_eq!(c[0], exe_dir.join(PLUGIN_FILE));
        let e = format!("{:#}", find_plugin(Some(explicit)).unwrap_err());
        assert!(e.contains("/nonexistent/libx.so"), "{e}");
        if !c.iter().any(|p| p.is_file()) {
            let e = format!("{:#}", find_plugin(None).unwrap_err());
            assert!(e.contains("cargo build --release") && e.contains("--plugin"), "{e}");
        }
    }
}
