//! A thin, error-returning layer over the ONNX Runtime C function table (`OrtApi`).
//!
//! Every call into the runtime goes through here: statuses become `Result<_, String>` (the
//! status is read and released), and error strings become `OrtStatus` objects made by the
//! runtime itself (`CreateStatus`), which is the only way to hand an error back to it.

use std::ffi::{CStr, CString, c_char, c_void};
use std::ptr;

use ort_sys::{
    ONNXTensorElementDataType, OrtApi, OrtErrorCode, OrtKernelInfo, OrtOpAttr, OrtOpAttrType,
    OrtShapeInferContext, OrtStatusPtr, OrtTensorTypeAndShapeInfo,
};

use crate::ops::ElemType;

/// The runtime's function table, for the API version this plugin negotiated.
///
/// Only functions that exist in that version may be called: the ones added after version 16
/// (the shape inference ones) are reached only when [`Api::version`] is at least 17.
#[derive(Clone, Copy)]
pub(crate) struct Api {
    table: &'static OrtApi,
    version: u32,
}

// SAFETY: the OrtApi table is an immutable table of function pointers, valid for as long as the
// runtime library is loaded (which outlives any plugin object), and its functions are thread safe.
unsafe impl Send for Api {}
// SAFETY: as above; `Api` is only ever read.
unsafe impl Sync for Api {}

impl Api {
    /// Wraps a table returned by `OrtApiBase::GetApi(version)`; `None` if it is null.
    ///
    /// # Safety
    /// `table` must be null or point to the runtime's `OrtApi` for `version`, which stays valid
    /// while the runtime is loaded.
    pub(crate) unsafe fn new(table: *const OrtApi, version: u32) -> Option<Self> {
        // SAFETY: the caller guarantees the pointer is null or a live, 'static table.
        unsafe { table.as_ref() }.map(|table| Api { table, version })
    }

    /// The function table.
    pub(crate) fn t(&self) -> &'static OrtApi {
        self.table
    }

    /// The negotiated API version.
    pub(crate) fn version(&self) -> u32 {
        self.version
    }

    /// The address of the table (identifies the runtime instance).
    pub(crate) fn addr(&self) -> usize {
        self.table as *const OrtApi as usize
    }

    /// A new `ORT_INVALID_ARGUMENT` status carrying `msg` (interior NULs are replaced).
    pub(crate) fn error(&self, msg: &str) -> OrtStatusPtr {
        self.status(OrtErrorCode::ORT_INVALID_ARGUMENT, msg)
    }

    /// A new status with `code` carrying `msg` (interior NULs are replaced).
    pub(crate) fn status(&self, code: OrtErrorCode, msg: &str) -> OrtStatusPtr {
        let msg = CString::new(msg.replace('\0', " ")).unwrap_or_default();
        // SAFETY: CreateStatus copies the NUL-terminated message; the runtime owns the result.
        unsafe { (self.table.CreateStatus)(code, msg.as_ptr()) }
    }

    /// `Ok` for a null status; otherwise the status's message (the status is released).
    pub(crate) fn check(&self, status: OrtStatusPtr) -> Result<(), String> {
        if status.0.is_null() {
            return Ok(());
        }
        // SAFETY: a non-null status returned by the runtime is valid until we release it; the
        // message is copied out before ReleaseStatus.
        unsafe {
            let msg = (self.table.GetErrorMessage)(status.0);
            let text = if msg.is_null() {
                "unknown ONNX Runtime error".to_string()
            } else {
                CStr::from_ptr(msg).to_string_lossy().into_owned()
            };
            (self.table.ReleaseStatus)(status.0);
            Err(text)
        }
    }

    /// Reads an ints attribute from kernel info; `Ok(None)` when the node does not have it.
    ///
    /// # Safety
    /// `info` must be the live kernel info passed to `CreateKernelV2`.
    pub(crate) unsafe fn kernel_attr_i64s(
        &self,
        info: *const OrtKernelInfo,
        name: &CStr,
    ) -> Result<Option<Vec<i64>>, String> {
        let get = self.table.KernelInfoGetAttributeArray_int64;
        let mut len = 0usize;
        // SAFETY: a null output buffer asks for the length only.
        let st = unsafe { get(info, name.as_ptr(), ptr::null_mut(), &mut len) };
        if let Err(e) = self.check(st) {
            return missing_or(name, "ints", e);
        }
        let mut v = vec![0i64; len];
        // SAFETY: `v` has room for `len` values, the length the runtime just reported.
        let st = unsafe { get(info, name.as_ptr(), v.as_mut_ptr(), &mut len) };
        self.check(st).map_err(|e| attr_error(name, "ints", &e))?;
        v.truncate(len);
        Ok(Some(v))
    }

    /// Reads a floats attribute from kernel info; `Ok(None)` when the node does not have it.
    ///
    /// # Safety
    /// `info` must be the live kernel info passed to `CreateKernelV2`.
    pub(crate) unsafe fn kernel_attr_f32s(
        &self,
        info: *const OrtKernelInfo,
        name: &CStr,
    ) -> Result<Option<Vec<f32>>, String> {
        let get = self.table.KernelInfoGetAttributeArray_float;
        let mut len = 0usize;
        // SAFETY: a null output buffer asks for the length only.
        let st = unsafe { get(info, name.as_ptr(), ptr::null_mut(), &mut len) };
        if let Err(e) = self.check(st) {
            return missing_or(name, "floats", e);
        }
        let mut v = vec![0f32; len];
        // SAFETY: `v` has room for `len` values, the length the runtime just reported.
        let st = unsafe { get(info, name.as_ptr(), v.as_mut_ptr(), &mut len) };
        self.check(st).map_err(|e| attr_error(name, "floats", &e))?;
        v.truncate(len);
        Ok(Some(v))
    }

    /// Element type (as the ONNX enum value) and dims of a tensor type-and-shape info.
    ///
    /// # Safety
    /// `info` must be a live `OrtTensorTypeAndShapeInfo`.
    pub(crate) unsafe fn type_and_dims(
        &self,
        info: *const OrtTensorTypeAndShapeInfo,
    ) -> Result<(i32, Vec<i64>), String> {
        let t = self.table;
        let mut ty = ONNXTensorElementDataType::ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
        let mut rank = 0usize;
        // SAFETY: `info` is live (caller); the out pointers are valid locals and `dims` holds `rank` values.
        unsafe {
            self.check((t.GetTensorElementType)(info, &mut ty))?;
            self.check((t.GetDimensionsCount)(info, &mut rank))?;
            let mut dims = vec![0i64; rank];
            self.check((t.GetDimensions)(info, dims.as_mut_ptr(), rank))?;
            Ok((ty as i32, dims))
        }
    }

    /// The symbolic dimension names of a type-and-shape info (`""` for a dim without a name).
    ///
    /// # Safety
    /// `info` must be a live `OrtTensorTypeAndShapeInfo` of rank `rank`.
    pub(crate) unsafe fn symbolic_dims(
        &self,
        info: *const OrtTensorTypeAndShapeInfo,
        rank: usize,
    ) -> Result<Vec<String>, String> {
        let mut names: Vec<*const c_char> = vec![ptr::null(); rank];
        // SAFETY: `names` has room for `rank` pointers; the strings belong to `info` and are
        // copied out before it can go away.
        unsafe {
            self.check((self.table.GetSymbolicDimensions)(info, names.as_mut_ptr(), rank))?;
            Ok(names
                .iter()
                .map(|&p| {
                    if p.is_null() { String::new() } else { CStr::from_ptr(p).to_string_lossy().into_owned() }
                })
                .collect())
        }
    }

    /// Reads an ints (`floats` when `floats`) attribute in shape inference, as raw values;
    /// `Ok(None)` when the node does not have it. API version 17 or later.
    ///
    /// # Safety
    /// `ctx` must be the live shape inference context; `self.version() >= 17`.
    pub(crate) unsafe fn infer_attr<T: Copy + Default>(
        &self,
        ctx: *mut OrtShapeInferContext,
        name: &CStr,
        kind: OrtOpAttrType,
    ) -> Result<Option<Vec<T>>, String> {
        let t = self.table;
        let mut attr: *const OrtOpAttr = ptr::null();
        // SAFETY: ctx is live (caller); attr is an out pointer to a local.
        let st = unsafe { (t.ShapeInferContext_GetAttribute)(ctx, name.as_ptr(), &mut attr) };
        if self.check(st).is_err() || attr.is_null() {
            return Ok(None);
        }
        let mut bytes = 0usize;
        // SAFETY: a zero-length buffer asks for the size; a too-small buffer only yields an
        // error status (released by check), with the needed size in `bytes`.
        let _ = self.check(unsafe { (t.ReadOpAttr)(attr, kind, ptr::null_mut(), 0, &mut bytes) });
        let n = bytes / std::mem::size_of::<T>();
        let mut v = vec![T::default(); n];
        if n > 0 {
            let len = n * std::mem::size_of::<T>();
            // SAFETY: `v` holds exactly `len` bytes of plain values.
            let st = unsafe { (t.ReadOpAttr)(attr, kind, v.as_mut_ptr().cast::<c_void>(), len, &mut bytes) };
            self.check(st).map_err(|e| attr_error(name, "ints/floats", &e))?;
        }
        Ok(Some(v))
    }
}

/// An error for the runtime with its status code: bad input and attributes are
/// `ORT_INVALID_ARGUMENT` (what a plain `String` error becomes), failures of the device are
/// `ORT_EP_FAIL` and internal ones `ORT_FAIL`.
#[derive(Debug)]
pub(crate) struct Failure {
    pub(crate) code: OrtErrorCode,
    pub(crate) msg: String,
}

impl Failure {
    /// An execution provider (CUDA) failure.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub(crate) fn ep(msg: impl Into<String>) -> Self {
        Failure { code: OrtErrorCode::ORT_EP_FAIL, msg: msg.into() }
    }

    /// A failure that is neither the caller's input nor the device (e.g. no compute stream).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub(crate) fn fail(msg: impl Into<String>) -> Self {
        Failure { code: OrtErrorCode::ORT_FAIL, msg: msg.into() }
    }
}

impl From<String> for Failure {
    fn from(msg: String) -> Self {
        Failure { code: OrtErrorCode::ORT_INVALID_ARGUMENT, msg }
    }
}

impl From<&str> for Failure {
    fn from(msg: &str) -> Self {
        msg.to_string().into()
    }
}

/// The ONNX Runtime enum for one of our element types.
pub(crate) fn ort_elem(t: ElemType) -> ONNXTensorElementDataType {
    match t {
        ElemType::F32 => ONNXTensorElementDataType::ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT,
        ElemType::F16 => ONNXTensorElementDataType::ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16,
    }
}

/// The ONNX Runtime enum for a `TensorProto.DataType` value we produced from an `OrtApi` call.
pub(crate) fn ort_elem_raw(v: i32) -> Option<ONNXTensorElementDataType> {
    ElemType::from_onnx(v).map(ort_elem)
}

fn attr_error(name: &CStr, kind: &str, e: &str) -> String {
    format!("GhostShift: attribute '{}' could not be read as {kind}: {e}", name.to_string_lossy())
}

/// The runtime reports a missing attribute as "No attribute with name:'x'is defined."; anything
/// else (a wrongly typed attribute) is an error.
fn missing_or<T>(name: &CStr, kind: &str, e: String) -> Result<Option<T>, String> {
    if e.contains("No attribute") { Ok(None) } else { Err(attr_error(name, kind, &e)) }
}
