//! The ONNX Runtime plugin: `libghostsr.so` exports one symbol, [`RegisterCustomOps`], which
//! ONNX Runtime calls from `SessionOptions.register_custom_ops_library(path)` (Python) or
//! `RegisterCustomOpsLibrary` (C API). It adds the custom op domain `ai.ghostsr` with
//! `GhostShift` for float and float16 on the CPU execution provider (and, with the `cuda`
//! feature, on `CUDAExecutionProvider`).
//!
//! Written directly on the C API types of `ort-sys` (no linking: every call goes through the
//! `OrtApi` function table the runtime hands us).
//!
//! # Building
//! `cargo build --release` gives `target/release/libghostsr.so` (CPU kernels only). With CUDA:
//! `GHOSTSR_CUDA_HOME=<toolkit> cargo build --release --features cuda`, where the toolkit may be
//! the pip wheels (`pip install nvidia-cuda-nvcc==13.0.* nvidia-cuda-runtime==13.0.*
//! nvidia-cuda-crt==13.0.* nvidia-nvvm==13.0.*` into `.venv-cuda`, then
//! `GHOSTSR_CUDA_HOME=.venv-cuda/lib/python3.11/site-packages/nvidia/cu13`); see `build.rs`.
//!
//! # API version
//! The plugin asks `OrtApiBase::GetApi` for the newest version it was compiled against
//! ([`MAX_API_VERSION`], `ort_sys::ORT_API_VERSION`) and walks down to [`MIN_API_VERSION`]
//! (16: `CreateKernelV2`/`KernelComputeV2`, which return statuses); the runtime returns null
//! for versions it does not know. The chosen version is written into every `OrtCustomOp`, so the
//! runtime reads only the fields that version has. At 17 and later, output type and shape
//! inference (`InferOutputShapeFn`) is registered; at 16 it is not, and a model must then
//! declare GhostShift outputs' types in `value_info`.
//!
//! If the runtime offers none of those versions (ONNX Runtime 1.15 and older), registration
//! fails loudly: `RegisterCustomOps` prints why and returns an error status made with the
//! newest older API the runtime has (`CreateStatus` is the first entry of every version's
//! table), so `register_custom_ops_library` raises instead of a later "not a registered op".
//! Only a runtime with no API at all (or a null `api_base`) gets null back, as nothing can make
//! a status then. Null `options` give an error status.
//!
//! # Lifetime
//! The op objects and the custom op domain must outlive every session that uses them. They are
//! created once per runtime (keyed by the address of its `OrtApi` table), kept in a process-wide
//! registry and never freed; later registrations reuse the same domain.

mod api;
#[cfg(feature = "cuda")]
mod cuda;
#[cfg(any(test, feature = "cuda"))]
mod cuda_attrs;
#[cfg(test)]
mod cuda_host;
mod op;

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::ptr;
use std::sync::Mutex;

use ort_sys::{OrtApiBase, OrtCustomOpDomain, OrtSessionOptions, OrtStatus};

use self::api::Api;
use self::op::{GhostShiftOp, Provider, panic_text};
use crate::ops::GHOST_SHIFT;

/// The oldest ONNX Runtime API version the plugin works with (ONNX Runtime 1.16).
pub const MIN_API_VERSION: u32 = 16;
/// The newest API version the plugin was compiled against (the `OrtCustomOp` layout it knows).
pub const MAX_API_VERSION: u32 = ort_sys::ORT_API_VERSION;

// The compiled-against version must cover the minimum and the shape inference fields.
const _: () = assert!(MIN_API_VERSION <= MAX_API_VERSION && op::SHAPE_INFERENCE_API <= MAX_API_VERSION);

/// Bytes that only a plugin built with the `cuda` feature contains: `--provider cuda` checks the
/// plugin file for them ([`crate::runner::cuda_plugin`]) so a CPU-only build is an error, not a
/// silent CPU placement. Kept here in masked form only, so that no other binary holds the plain
/// marker by accident; [`CUDA_MARKER_LEN`] bytes, unmasked with [`unmask_cuda_marker`].
pub const CUDA_MARKER_MASKED: [u8; CUDA_MARKER_LEN] = mask(*b"\0ghostsr-plugin-ep=CUDAExecutionProvider\0");
/// Length of the CUDA marker.
pub const CUDA_MARKER_LEN: usize = 41;
const MARKER_MASK: u8 = 0x5a;

const fn mask<const N: usize>(mut b: [u8; N]) -> [u8; N] {
    let mut i = 0;
    while i < N {
        b[i] ^= MARKER_MASK;
        i += 1;
    }
    b
}

/// The plain CUDA marker (computed at run time, see [`CUDA_MARKER_MASKED`]).
pub fn unmask_cuda_marker() -> [u8; CUDA_MARKER_LEN] {
    let mut b = CUDA_MARKER_MASKED;
    for v in &mut b {
        *v ^= std::hint::black_box(MARKER_MASK);
    }
    b
}

/// The marker itself, in the CUDA build's read-only data.
#[cfg(feature = "cuda")]
static CUDA_MARKER: [u8; CUDA_MARKER_LEN] = mask(CUDA_MARKER_MASKED);

/// One runtime's registration: its API, op objects and domain, kept for the process lifetime.
struct Registered {
    api_addr: usize,
    domain: *mut OrtCustomOpDomain,
}

// SAFETY: the domain pointer is only handed to the runtime's AddCustomOpDomain (thread safe);
// we never dereference it.
unsafe impl Send for Registered {}

static REGISTRY: Mutex<Vec<Registered>> = Mutex::new(Vec::new());

/// Entry point called by ONNX Runtime when the library is registered with session options.
///
/// Returns null on success, or an error status made with the runtime's API. Never unwinds.
///
/// # Safety
/// `options` and `api_base` must be what ONNX Runtime passes: live session options and its
/// `OrtApiBase`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn RegisterCustomOps(
    options: *mut OrtSessionOptions,
    api_base: *const OrtApiBase,
) -> *mut OrtStatus {
    // SAFETY: forwarded from the caller.
    let api = match catch_unwind(|| unsafe { negotiate(api_base) }) {
        Ok(Some(api)) => api,
        Ok(None) | Err(_) => {
            let msg = format!(
                "ghostsr: libghostsr needs ONNX Runtime 1.16 or newer (C API version {MIN_API_VERSION} to {MAX_API_VERSION}); this runtime offers none of those, so GhostShift was not registered"
            );
            eprintln!("{msg}");
            // SAFETY: forwarded from the caller.
            return match catch_unwind(|| unsafe { older_api(api_base) }) {
                Ok(Some(old)) => old.error(&msg).0,
                // No API at all (or a null base): nothing can make a status.
                _ => ptr::null_mut(),
            };
        }
    };
    // SAFETY: forwarded from the caller.
    match catch_unwind(AssertUnwindSafe(|| unsafe { register(api, options) })) {
        Ok(Ok(())) => ptr::null_mut(),
        Ok(Err(msg)) => api.error(&msg).0,
        Err(panic) => {
            api.error(&format!(
                "GhostShift: internal error while registering (panic: {})",
                panic_text(&panic)
            ))
            .0
        }
    }
}

/// The newest API version in `[MIN_API_VERSION, MAX_API_VERSION]` the runtime offers.
///
/// # Safety
/// `api_base` must be null or the runtime's `OrtApiBase`.
unsafe fn negotiate(api_base: *const OrtApiBase) -> Option<Api> {
    // SAFETY: caller guarantees null or a valid OrtApiBase.
    let base = unsafe { api_base.as_ref() }?;
    (MIN_API_VERSION..=MAX_API_VERSION).rev().find_map(|v| {
        // SAFETY: GetApi accepts any version and returns null for unknown ones; a non-null
        // result is the runtime's static table.
        unsafe { Api::new((base.GetApi)(v), v) }
    })
}

/// Any API version below [`MIN_API_VERSION`] the runtime offers (ONNX Runtime 1.15 and older),
/// newest first: only to make the error status with `CreateStatus`, the first entry of every
/// version's table.
///
/// # Safety
/// `api_base` must be null or the runtime's `OrtApiBase`.
unsafe fn older_api(api_base: *const OrtApiBase) -> Option<Api> {
    // SAFETY: caller guarantees null or a valid OrtApiBase.
    let base = unsafe { api_base.as_ref() }?;
    (1..MIN_API_VERSION).rev().find_map(|v| {
        // SAFETY: as in `negotiate`; `Api::error` calls only `CreateStatus`, which every version has.
        unsafe { Api::new((base.GetApi)(v), v) }
    })
}

/// Adds the (cached) `ai.ghostsr` domain to `options`, creating it on first use.
///
/// # Safety
/// `options` must be null or live session options of the runtime that `api` belongs to.
unsafe fn register(api: Api, options: *mut OrtSessionOptions) -> Result<(), String> {
    if options.is_null() {
        return Err("GhostShift: RegisterCustomOps called with null session options".into());
    }
    let t = api.t();
    let mut registry = REGISTRY.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let domain = match registry.iter().find(|r| r.api_addr == api.addr()) {
        Some(r) => r.domain,
        None => {
            // The op objects live for the rest of the process (the runtime keeps pointers).
            let ops: &'static [GhostShiftOp] = Box::leak(ops_for(api).into_boxed_slice());
            let mut domain: *mut OrtCustomOpDomain = ptr::null_mut();
            // SAFETY: the domain name is a NUL-terminated 'static string; `domain` is an out pointer.
            api.check(unsafe { (t.CreateCustomOpDomain)(GHOST_SHIFT.domain.as_ptr(), &mut domain) })?;
            for op in ops {
                // SAFETY: `domain` was just created; `op` is 'static.
                let st = unsafe { (t.CustomOpDomain_Add)(domain, op.as_ort()) };
                if let Err(e) = api.check(st) {
                    // SAFETY: the domain is ours and not attached to any session options yet.
                    unsafe { (t.ReleaseCustomOpDomain)(domain) };
                    return Err(format!("GhostShift: adding the op to domain ai.ghostsr failed: {e}"));
                }
            }
            registry.push(Registered { api_addr: api.addr(), domain });
            domain
        }
    };
    // SAFETY: options is live (caller); the domain lives for the rest of the process.
    api.check(unsafe { (t.AddCustomOpDomain)(options, domain) })
        .map_err(|e| format!("GhostShift: adding domain ai.ghostsr to the session options failed: {e}"))
}

/// One op object per (element type, execution provider).
fn ops_for(api: Api) -> Vec<GhostShiftOp> {
    // Keeps the marker in the shared object (reachable from RegisterCustomOps, so the linker
    // cannot drop it).
    #[cfg(feature = "cuda")]
    std::hint::black_box(&CUDA_MARKER);
    let providers = [
        Provider::Cpu,
        #[cfg(feature = "cuda")]
        Provider::Cuda,
    ];
    providers
        .into_iter()
        .flat_map(|p| GHOST_SHIFT.elem_types.iter().map(move |&e| GhostShiftOp::new(api, e, p)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    unsafe extern "system" fn no_api(_version: u32) -> *const ort_sys::OrtApi {
        ptr::null()
    }

    unsafe extern "system" fn version_string() -> *const std::ffi::c_char {
        c"0.0.0".as_ptr()
    }

    #[test]
    fn the_cuda_marker_unmasks() {
        assert_eq!(&unmask_cuda_marker(), b"\0ghostsr-plugin-ep=CUDAExecutionProvider\0");
        #[cfg(feature = "cuda")]
        assert_eq!(CUDA_MARKER, unmask_cuda_marker());
    }

    #[test]
    fn no_runtime_api_means_null_status_not_a_crash() {
        let base = OrtApiBase { GetApi: no_api, GetVersionString: version_string };
        // SAFETY: the fake base's GetApi returns null for every version; options are never touched.
        let st = unsafe { RegisterCustomOps(ptr::null_mut(), &base) };
        assert!(st.is_null());
        // SAFETY: null api base is documented to be handled.
        let st = unsafe { RegisterCustomOps(ptr::null_mut(), ptr::null()) };
        assert!(st.is_null());
    }
}
