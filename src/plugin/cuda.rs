//! The CUDA side of the plugin (feature `cuda`): launches of the kernels in
//! `cuda_ops/ghost_shift.cu` on the compute stream ONNX Runtime gives the kernel
//! (`KernelContext_GetGPUComputeStream`; a null stream is an error, never the legacy stream 0).
//!
//! Attributes ([`pack_attrs`]) are uploaded at the first compute on each device, on the device
//! that holds the input tensor (so a session with `device_id` 1 gets them on GPU 1), on the
//! compute stream, which is then synchronised once: a plain `cudaMemcpy` from pageable memory can
//! return before the copy lands, and nothing would order ORT's non-blocking stream after it.
//!
//! CUDA failures are `ORT_EP_FAIL` statuses. Kernel launches are asynchronous, so a fault inside
//! the kernel surfaces at a later CUDA call; with `GHOSTSR_CUDA_SYNC=1` in the environment every
//! launch is followed by a stream synchronisation and an error check (tests, debugging).

use std::ffi::{CStr, c_char, c_int, c_void};
use std::ptr;
use std::sync::{Mutex, OnceLock};

use super::api::Failure;
use super::cuda_attrs::pack_attrs;
use crate::ops::{ElemType, GhostShiftAttrs};

unsafe extern "C" {
    fn ghostsr_cuda_device_of(ptr: *const c_void, device: *mut c_int) -> c_int;
    fn ghostsr_cuda_upload(
        device: c_int,
        host: *const c_void,
        bytes: usize,
        dev: *mut *mut c_void,
        stream: *mut c_void,
    ) -> c_int;
    fn ghostsr_cuda_free(device: c_int, dev: *mut c_void) -> c_int;
    fn ghostsr_cuda_error_string(code: c_int) -> *const c_char;
    fn ghostsr_cuda_sync(stream: *mut c_void) -> c_int;
    fn ghostsr_ghost_shift_f32(
        device: c_int,
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
        device: c_int,
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

/// The environment variable that turns on sync-and-check after every launch.
pub(crate) const SYNC_ENV: &str = "GHOSTSR_CUDA_SYNC";

/// Whether [`SYNC_ENV`] asks for sync-and-check (read once per process).
fn sync_mode() -> bool {
    static SYNC: OnceLock<bool> = OnceLock::new();
    *SYNC.get_or_init(|| std::env::var(SYNC_ENV).is_ok_and(|v| !v.is_empty() && v != "0"))
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

/// A device buffer of packed attributes on one device.
struct Upload {
    device: c_int,
    ptr: *mut c_void,
}

/// The attributes in host memory (packed) and their copies on the devices used so far.
pub(crate) struct DeviceAttrs {
    words: Vec<u32>,
    c_g: usize,
    uploads: Mutex<Vec<Upload>>,
}

// SAFETY: the device pointers are written once under the mutex and only read by kernels.
unsafe impl Send for DeviceAttrs {}
// SAFETY: as above.
unsafe impl Sync for DeviceAttrs {}

impl DeviceAttrs {
    /// Packs validated attributes (nothing touches the GPU until the first launch).
    pub(crate) fn new(attrs: &GhostShiftAttrs) -> Result<Self, String> {
        Ok(DeviceAttrs { words: pack_attrs(attrs)?, c_g: attrs.c_g(), uploads: Mutex::new(Vec::new()) })
    }

    /// The device copy for `device`, uploading it on `stream` the first time.
    fn on(&self, device: c_int, stream: *mut c_void) -> Result<*const c_void, String> {
        let mut uploads = self.uploads.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(u) = uploads.iter().find(|u| u.device == device) {
            return Ok(u.ptr);
        }
        let mut dev = ptr::null_mut();
        // SAFETY: `words` is a live host buffer of the given size; `dev` is an out pointer;
        // `stream` is ORT's compute stream (non-null, checked by the caller).
        let code = unsafe {
            ghostsr_cuda_upload(device, self.words.as_ptr().cast(), self.words.len() * 4, &mut dev, stream)
        };
        if code != 0 {
            return Err(cuda_error(&format!("upload of the attributes to device {device}"), code));
        }
        uploads.push(Upload { device, ptr: dev });
        Ok(dev)
    }

    /// Launches the kernel for `elem` on `stream`, on the device that holds `x`.
    ///
    /// # Safety
    /// `x` and `y` must be device buffers of `elem` with `d = [N, C_i, H, W]` and
    /// `[N, C_g, H, W]` elements; the sources must have been validated against `C_i`; `stream`
    /// must be null or a CUDA stream of that device.
    pub(crate) unsafe fn launch(
        &self,
        elem: ElemType,
        x: *const c_void,
        y: *mut c_void,
        d: [usize; 4],
        stream: *mut c_void,
    ) -> Result<(), Failure> {
        if stream.is_null() {
            return Err(Failure::fail("GhostShift: ONNX Runtime gave the CUDA kernel no compute stream"));
        }
        let mut device: c_int = -1;
        // SAFETY: `x` is a tensor buffer; the out pointer is a local.
        let code = unsafe { ghostsr_cuda_device_of(x, &mut device) };
        if code != 0 {
            return Err(Failure::ep(cuda_error("lookup of the input's device", code)));
        }
        let attrs = if self.c_g == 0 { ptr::null() } else { self.on(device, stream).map_err(Failure::ep)? };
        let [n, c_in, h, w] = d.map(|v| v as i64);
        let c_g = self.c_g as i64;
        // SAFETY: forwarded from the caller; the attribute buffer holds C_g records on `device`.
        let code = unsafe {
            match elem {
                ElemType::F32 => {
                    ghostsr_ghost_shift_f32(device, x.cast(), y.cast(), attrs, n, c_in, c_g, h, w, stream)
                }
                ElemType::F16 => ghostsr_ghost_shift_f16(device, x, y, attrs, n, c_in, c_g, h, w, stream),
            }
        };
        if code != 0 {
            return Err(Failure::ep(cuda_error("kernel launch", code)));
        }
        if sync_mode() {
            // SAFETY: `stream` is a live CUDA stream (see above).
            let code = unsafe { ghostsr_cuda_sync(stream) };
            if code != 0 {
                return Err(Failure::ep(cuda_error("kernel (GHOSTSR_CUDA_SYNC check)", code)));
            }
        }
        Ok(())
    }
}

impl Drop for DeviceAttrs {
    fn drop(&mut self) {
        let uploads = self.uploads.get_mut().unwrap_or_else(|p| p.into_inner());
        for u in uploads.drain(..) {
            // SAFETY: each pointer came from ghostsr_cuda_upload on its device and is freed once;
            // cudaFree synchronizes with work still using it. Errors cannot be reported here.
            let _ = unsafe { ghostsr_cuda_free(u.device, u.ptr) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ort_sys::OrtErrorCode;

    fn attrs() -> GhostShiftAttrs {
        GhostShiftAttrs { sources: vec![0], shifts: vec![(1, 0)], ..Default::default() }
    }

    #[test]
    fn a_null_stream_is_an_error_not_a_launch_on_stream_0() {
        let dev = DeviceAttrs::new(&attrs()).expect("pack");
        let mut y = [0f32; 4];
        // SAFETY: the null stream is rejected before any CUDA call touches the buffers.
        let e = unsafe {
            dev.launch(
                ElemType::F32,
                [0f32; 4].as_ptr().cast(),
                y.as_mut_ptr().cast(),
                [1, 1, 2, 2],
                ptr::null_mut(),
            )
        }
        .expect_err("null stream");
        assert_eq!(e.code, OrtErrorCode::ORT_FAIL);
        assert!(e.msg.contains("no compute stream"), "{}", e.msg);
        assert!(dev.uploads.lock().expect("lock").is_empty(), "nothing was uploaded");
    }

    #[test]
    fn cuda_failures_are_ep_failures() {
        // Any CUDA call fails on a machine without a GPU (or on a host pointer): the status is
        // ORT_EP_FAIL with CUDA's own text, never ORT_INVALID_ARGUMENT.
        let dev = DeviceAttrs::new(&attrs()).expect("pack");
        let (x, mut y) = ([0f32; 4], [0f32; 4]);
        let fake_stream = std::ptr::NonNull::<u8>::dangling().as_ptr().cast::<c_void>();
        // SAFETY: the host pointer fails the device lookup before anything uses the stream.
        let e = unsafe {
            dev.launch(ElemType::F32, x.as_ptr().cast(), y.as_mut_ptr().cast(), [1, 1, 2, 2], fake_stream)
        }
        .expect_err("host pointer");
        assert_eq!(e.code, OrtErrorCode::ORT_EP_FAIL, "{}", e.msg);
        assert!(
            e.msg.starts_with("GhostShift: CUDA lookup of the input's device failed: error"),
            "{}",
            e.msg
        );
    }
}
