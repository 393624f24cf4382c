//! The CUDA side of the plugin (feature `cuda`): attributes copied to device memory once per
//! kernel instance, and launches of the kernels in `cuda_ops/ghost_shift.cu` on the compute
//! stream ONNX Runtime gives the kernel (`KernelContext_GetGPUComputeStream`).
//!
//! Limitation: the attribute buffer is allocated on the CUDA device current at kernel creation
//! (device 0 unless the application changed it); sessions on another device id are untested.

use std::ffi::{CStr, c_char, c_int, c_void};
use std::ptr;

use crate::ops::{ElemType, GhostShiftAttrs};

unsafe extern "C" {
    fn ghostsr_cuda_upload(host: *const c_void, bytes: usize, dev: *mut *mut c_void) -> c_int;
    fn ghostsr_cuda_free(dev: *mut c_void) -> c_int;
    fn ghostsr_cuda_error_string(code: c_int) -> *const c_char;
    fn ghostsr_ghost_shift_f32(
        x: *const f32,
        y: *mut f32,
        attrs: *const c_void,
        n: i64,
        c_in: i64,
        c_g: i64,
        h: i64,
        w: i64,
        stream: *mut c_void,
    ) -> c_int;
    fn ghostsr_ghost_shift_f16(
        x: *const c_void,
        y: *mut c_void,
        attrs: *const c_void,
        n: i64,
        c_in: i64,
        c_g: i64,
        h: i64,
        w: i64,
        stream: *mut c_void,
    ) -> c_int;
}

/// A CUDA error code as text.
fn cuda_error(what: &str, code: c_int) -> String {
    // SAFETY: cudaGetErrorString returns a static NUL-terminated string for any code.
    let text = unsafe { ghostsr_cuda_error_string(code) };
    let text = if text.is_null() {
        "unknown".into()
    } else {
        // SAFETY: non-null static C string (see above).
        unsafe { CStr::from_ptr(text) }.to_string_lossy()
    };
    format!("GhostShift: CUDA {what} failed: error {code} ({text})")
}

/// The attributes in device memory: `i32 sources[C_g], i32 dy[C_g], i32 dx[C_g],
/// f32 scales[C_g], f32 biases[C_g]`.
pub(crate) struct DeviceAttrs {
    ptr: *mut c_void,
    c_g: usize,
}

// SAFETY: the device buffer is written once at creation and only read by kernels afterwards.
unsafe impl Send for DeviceAttrs {}
// SAFETY: as above.
unsafe impl Sync for DeviceAttrs {}

impl DeviceAttrs {
    /// Packs and uploads validated attributes.
    pub(crate) fn upload(attrs: &GhostShiftAttrs) -> Result<Self, String> {
        let c_g = attrs.c_g();
        if c_g == 0 {
            return Ok(DeviceAttrs { ptr: ptr::null_mut(), c_g });
        }
        if attrs.sources.iter().any(|&s| s > i32::MAX as i64) {
            return Err("GhostShift: a source index does not fit in 32 bits".into());
        }
        // Shifts beyond +-2^30 behave like any shift of H or W or more (all border).
        let clamp = |v: i64| v.clamp(-(1 << 30), 1 << 30) as i32;
        let mut words: Vec<u32> = Vec::with_capacity(5 * c_g);
        words.extend(attrs.sources.iter().map(|&s| s as i32 as u32));
        words.extend(attrs.shifts.iter().map(|&(dy, _)| clamp(dy) as u32));
        words.extend(attrs.shifts.iter().map(|&(_, dx)| clamp(dx) as u32));
        words.extend((0..c_g).map(|g| attrs.scale(g).to_bits()));
        words.extend((0..c_g).map(|g| attrs.bias(g).to_bits()));
        let mut dev = ptr::null_mut();
        // SAFETY: `words` is a live host buffer of the given size; `dev` is an out pointer.
        let code = unsafe { ghostsr_cuda_upload(words.as_ptr().cast(), words.len() * 4, &mut dev) };
        if code != 0 {
            return Err(cuda_error("upload of the attributes", code));
        }
        Ok(DeviceAttrs { ptr: dev, c_g })
    }

    /// Launches the kernel for `elem` on `stream`.
    ///
    /// # Safety
    /// `x` and `y` must be device buffers of `elem` with `d = [N, C_i, H, W]` and
    /// `[N, C_g, H, W]` elements; the sources must have been validated against `C_i`.
    pub(crate) unsafe fn launch(
        &self,
        elem: ElemType,
        x: *const c_void,
        y: *mut c_void,
        d: [usize; 4],
        stream: *mut c_void,
    ) -> Result<(), String> {
        let [n, c_in, h, w] = d.map(|v| v as i64);
        let c_g = self.c_g as i64;
        // SAFETY: forwarded from the caller; the attribute buffer holds 5*C_g words.
        let code = unsafe {
            match elem {
                ElemType::F32 => {
                    ghostsr_ghost_shift_f32(x.cast(), y.cast(), self.ptr, n, c_in, c_g, h, w, stream)
                }
                ElemType::F16 => ghostsr_ghost_shift_f16(x, y, self.ptr, n, c_in, c_g, h, w, stream),
            }
        };
        if code != 0 { Err(cuda_error("kernel launch", code)) } else { Ok(()) }
    }
}

impl Drop for DeviceAttrs {
    fn drop(&mut self) {
        if !self.ptr.is_null() {
            // SAFETY: the pointer came from ghostsr_cuda_upload and is freed once; cudaFree
            // synchronizes with work still using it. Errors cannot be reported from a destructor.
            let _ = unsafe { ghostsr_cuda_free(self.ptr) };
        }
    }
}
