//! The `OrtCustomOp` objects for GhostShift and their callbacks (one object per element type and
//! execution provider, all with the same name; the runtime picks the one matching the input).
//!
//! Every `extern "system"` callback catches panics and turns errors into `OrtStatus` values made
//! with the negotiated API; nothing unwinds into the runtime.

use std::ffi::{CStr, CString, c_char, c_int, c_void};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::ptr;
use std::sync::atomic::{AtomicU64, Ordering};

use half::f16;
use ort_sys::{
    ONNXTensorElementDataType, OrtApi, OrtCustomOp, OrtCustomOpInputOutputCharacteristic, OrtKernelContext,
    OrtKernelInfo, OrtMemType, OrtOpAttrType, OrtShapeInferContext, OrtStatusPtr, OrtTensorTypeAndShapeInfo,
    OrtTypeInfo, OrtValue,
};

use super::api::{Api, Failure, ort_elem, ort_elem_raw};
use crate::ops::{ElemType, GHOST_SHIFT, GhostShiftAttrs};

/// The execution provider an op object is registered for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Provider {
    /// The CPU execution provider (`GetExecutionProviderType` returns null).
    Cpu,
    /// `CUDAExecutionProvider` (only with the `cuda` feature).
    #[cfg(feature = "cuda")]
    Cuda,
}

impl Provider {
    fn ep_name(self) -> Option<&'static CStr> {
        match self {
            Provider::Cpu => None,
            #[cfg(feature = "cuda")]
            Provider::Cuda => Some(c"CUDAExecutionProvider"),
        }
    }
}

/// The first API version whose `OrtCustomOp` has `InferOutputShapeFn`, `GetStartVersion` and
/// `GetEndVersion`, and whose `OrtApi` has the `ShapeInferContext_*` functions.
pub(crate) const SHAPE_INFERENCE_API: u32 = 17;

/// An `OrtCustomOp` followed by our own data. `repr(C)` with `base` first, so the runtime's
/// `*const OrtCustomOp` is also a `*const GhostShiftOp`.
#[repr(C)]
pub(crate) struct GhostShiftOp {
    base: OrtCustomOp,
    api: Api,
    elem: ElemType,
    provider: Provider,
}

// SAFETY: the op object is immutable after construction (function pointers, a 'static API table,
// plain enums), so sharing it between the runtime's threads is fine.
unsafe impl Sync for GhostShiftOp {}
// SAFETY: as above.
unsafe impl Send for GhostShiftOp {}

impl GhostShiftOp {
    /// An op object for `elem` on `provider`, speaking `api.version()`.
    pub(crate) fn new(api: Api, elem: ElemType, provider: Provider) -> Self {
        let shape_inference = api.version() >= SHAPE_INFERENCE_API;
        GhostShiftOp {
            base: OrtCustomOp {
                // The runtime reads only the fields that exist in this version; ort-sys is built
                // for ORT_API_VERSION >= this version, so the struct has them all.
                version: api.version(),
                CreateKernel: None,
                GetName: Some(get_name),
                GetExecutionProviderType: Some(get_ep_type),
                GetInputType: Some(get_type),
                GetInputTypeCount: Some(get_one),
                GetOutputType: Some(get_type),
                GetOutputTypeCount: Some(get_one),
                KernelCompute: None,
                KernelDestroy: Some(kernel_destroy),
                GetInputCharacteristic: Some(get_characteristic),
                GetOutputCharacteristic: Some(get_characteristic),
                GetInputMemoryType: Some(get_memory_type),
                GetVariadicInputMinArity: Some(get_variadic_min_arity),
                GetVariadicInputHomogeneity: Some(get_variadic_homogeneity),
                GetVariadicOutputMinArity: Some(get_variadic_min_arity),
                GetVariadicOutputHomogeneity: Some(get_variadic_homogeneity),
                CreateKernelV2: Some(create_kernel_v2),
                KernelComputeV2: Some(kernel_compute_v2),
                InferOutputShapeFn: if shape_inference { Some(infer_output_shape) } else { None },
                GetStartVersion: Some(get_start_version),
                GetEndVersion: Some(get_end_version),
            },
            api,
            elem,
            provider,
        }
    }

    /// The pointer to hand to `CustomOpDomain_Add`.
    pub(crate) fn as_ort(&self) -> *const OrtCustomOp {
        &self.base
    }
}

/// Recovers our op object from the runtime's pointer.
///
/// # Safety
/// `op` must be a pointer this module handed to the runtime (via [`GhostShiftOp::as_ort`]).
unsafe fn this<'a>(op: *const OrtCustomOp) -> &'a GhostShiftOp {
    // SAFETY: GhostShiftOp is repr(C) with `base` first and outlives every session (see mod.rs).
    unsafe { &*op.cast::<GhostShiftOp>() }
}

/// Runs `f`, turning a panic into `fallback`.
fn guard<T>(fallback: T, f: impl FnOnce() -> T) -> T {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or(fallback)
}

/// Runs `f`, turning `Err` and panics into error statuses made with `api` (a `String` error is
/// `ORT_INVALID_ARGUMENT`; see [`Failure`]).
fn guard_status<E: Into<Failure>>(api: Api, f: impl FnOnce() -> Result<(), E>) -> OrtStatusPtr {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => OrtStatusPtr(ptr::null_mut()),
        Ok(Err(e)) => {
            let e = e.into();
            api.status(e.code, &e.msg)
        }
        Err(panic) => api.status(
            ort_sys::OrtErrorCode::ORT_FAIL,
            &format!("GhostShift: internal error (panic: {})", panic_text(&panic)),
        ),
    }
}

/// The message of a caught panic, when it is a string.
pub(crate) fn panic_text(panic: &Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string payload".to_string()
    }
}

unsafe extern "system" fn get_name(_op: *const OrtCustomOp) -> *const c_char {
    GHOST_SHIFT.name.as_ptr()
}

unsafe extern "system" fn get_ep_type(op: *const OrtCustomOp) -> *const c_char {
    // SAFETY: the runtime passes back our own op pointer.
    guard(ptr::null(), || unsafe { this(op) }.provider.ep_name().map_or(ptr::null(), CStr::as_ptr))
}

unsafe extern "system" fn get_type(op: *const OrtCustomOp, _index: usize) -> ONNXTensorElementDataType {
    guard(ONNXTensorElementDataType::ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED, || {
        // SAFETY: the runtime passes back our own op pointer.
        ort_elem(unsafe { this(op) }.elem)
    })
}

unsafe extern "system" fn get_one(_op: *const OrtCustomOp) -> usize {
    1
}

unsafe extern "system" fn get_characteristic(
    _op: *const OrtCustomOp,
    _index: usize,
) -> OrtCustomOpInputOutputCharacteristic {
    OrtCustomOpInputOutputCharacteristic::INPUT_OUTPUT_REQUIRED
}

unsafe extern "system" fn get_memory_type(_op: *const OrtCustomOp, _index: usize) -> OrtMemType {
    OrtMemType::OrtMemTypeDefault
}

unsafe extern "system" fn get_variadic_min_arity(_op: *const OrtCustomOp) -> c_int {
    1
}

unsafe extern "system" fn get_variadic_homogeneity(_op: *const OrtCustomOp) -> c_int {
    1
}

unsafe extern "system" fn get_start_version(_op: *const OrtCustomOp) -> c_int {
    GHOST_SHIFT.version as c_int
}

unsafe extern "system" fn get_end_version(_op: *const OrtCustomOp) -> c_int {
    c_int::MAX
}

/// A kernel instance: one per node, created with the node's attributes.
struct Kernel {
    api: Api,
    attrs: GhostShiftAttrs,
    elem: ElemType,
    provider: Provider,
    #[cfg(feature = "cuda")]
    device_attrs: Option<super::cuda::DeviceAttrs>,
}

unsafe extern "system" fn create_kernel_v2(
    op: *const OrtCustomOp,
    api: *const OrtApi,
    info: *const OrtKernelInfo,
    kernel: *mut *mut c_void,
) -> OrtStatusPtr {
    // SAFETY: the runtime passes back our own op pointer.
    let this = unsafe { this(op) };
    // The runtime passes GetApi(op.version); fall back on the table we negotiated.
    // SAFETY: `api` is null or the runtime's 'static table for `this.api.version()`.
    let api = unsafe { Api::new(api, this.api.version()) }.unwrap_or(this.api);
    guard_status(api, || {
        if kernel.is_null() || info.is_null() {
            return Err("GhostShift: CreateKernelV2 called with a null pointer".into());
        }
        // SAFETY: `info` is the live kernel info for this call.
        let attrs = unsafe { read_attrs(api, info) }?;
        // When the graph states X's rank and channel count, reject bad ones now, not at run time.
        // SAFETY: as above.
        if let Some(dims) = unsafe { static_input_dims(api, info) } {
            if dims.len() != 4 {
                return Err(format!(
                    "GhostShift: input X must have rank 4 [N, C_i, H, W], got rank {} (shape {dims:?})",
                    dims.len()
                ));
            }
            attrs.validate(usize::try_from(dims[1]).ok())?;
        }
        #[cfg(feature = "cuda")]
        let device_attrs = match this.provider {
            // Packed now, uploaded at the first compute on the input's device and stream.
            Provider::Cuda => Some(super::cuda::DeviceAttrs::new(&attrs)?),
            Provider::Cpu => None,
        };
        let k = Box::new(Kernel {
            api,
            attrs,
            elem: this.elem,
            provider: this.provider,
            #[cfg(feature = "cuda")]
            device_attrs,
        });
        // SAFETY: `kernel` is a valid out pointer (checked non-null); ownership passes to the
        // runtime, which hands it back to kernel_destroy.
        unsafe { *kernel = Box::into_raw(k).cast() };
        Ok(())
    })
}

/// Reads and validates the node's attributes (C_i is not known yet: sources are checked
/// against it at run time and, with shape inference, at session creation).
///
/// # Safety
/// `info` must be the live kernel info of the node.
unsafe fn read_attrs(api: Api, info: *const OrtKernelInfo) -> Result<GhostShiftAttrs, String> {
    let names = GHOST_SHIFT.attrs;
    // SAFETY: forwarded from the caller.
    let (sources, shifts, scales, biases) = unsafe {
        let ints = |n: &CStr| {
            let v = api.kernel_attr_i64s(info, n)?;
            let other = || api.kernel_attr_f32s(info, n).ok().flatten().map_or(0, |v| v.len());
            of_kind(n, "ints", v, other)
        };
        let floats = |n: &CStr| {
            let v = api.kernel_attr_f32s(info, n)?;
            let other = || api.kernel_attr_i64s(info, n).ok().flatten().map_or(0, |v| v.len());
            of_kind(n, "floats", v, other)
        };
        (ints(names.sources)?, ints(names.shifts)?, floats(names.scales)?, floats(names.biases)?)
    };
    let sources = non_empty(sources.ok_or("GhostShift: required attribute 'sources' (ints) is missing")?)?;
    let shifts = shifts.ok_or("GhostShift: required attribute 'shifts' (ints) is missing")?;
    GhostShiftAttrs::from_flat(sources, &shifts, scales, biases)
}

/// The runtime's typed attribute getters copy the list of the requested kind whatever the
/// attribute's type, so `sources` given as FLOATS reads as an empty ints list (and GhostShift
/// would output 0 channels). An empty list whose other kind (`other_len`) is not empty is a
/// wrongly typed attribute: an error naming it.
fn of_kind<T>(
    name: &CStr,
    want: &str,
    v: Option<Vec<T>>,
    other_len: impl FnOnce() -> usize,
) -> Result<Option<Vec<T>>, String> {
    if v.as_ref().is_some_and(Vec::is_empty) && other_len() > 0 {
        let got = if want == "ints" { "floats" } else { "ints" };
        return Err(format!(
            "GhostShift: attribute '{}' must be {want}, but the node gives {got}",
            name.to_string_lossy()
        ));
    }
    Ok(v)
}

/// An empty `sources` would make a GhostShift with no output channels; it is also how an
/// attribute of another type (a single INT, a STRING) reads through the typed getters.
fn non_empty(sources: Vec<i64>) -> Result<Vec<i64>, String> {
    if sources.is_empty() {
        return Err("GhostShift: attribute 'sources' is empty or not an ints attribute; it must list at least one channel".into());
    }
    Ok(sources)
}

/// The dims of input X as the graph declares them (-1 for unknown), when it declares a shape.
/// Best effort: any failure means "unknown".
///
/// # Safety
/// `info` must be the live kernel info of the node.
unsafe fn static_input_dims(api: Api, info: *const OrtKernelInfo) -> Option<Vec<i64>> {
    let t = api.t();
    let mut type_info: *mut OrtTypeInfo = ptr::null_mut();
    // SAFETY: info is live (caller); we release the type info we get; the tensor info obtained
    // from it belongs to it and is read before the release.
    unsafe {
        api.check((t.KernelInfo_GetInputTypeInfo)(info, 0, &mut type_info)).ok()?;
        if type_info.is_null() {
            return None;
        }
        let mut tensor_info: *const OrtTensorTypeAndShapeInfo = ptr::null();
        let dims = api
            .check((t.CastTypeInfoToTensorInfo)(type_info, &mut tensor_info))
            .ok()
            .filter(|_| !tensor_info.is_null())
            .and_then(|_| api.type_and_dims(tensor_info).ok())
            .map(|(_, dims)| dims);
        (t.ReleaseTypeInfo)(type_info);
        // Rank 0 is also what an input without a declared shape looks like.
        dims.filter(|d| !d.is_empty())
    }
}

unsafe extern "system" fn kernel_destroy(kernel: *mut c_void) {
    guard((), || {
        if !kernel.is_null() {
            // SAFETY: `kernel` came from Box::into_raw in create_kernel_v2 and is destroyed once.
            drop(unsafe { Box::from_raw(kernel.cast::<Kernel>()) });
        }
    })
}

unsafe extern "system" fn kernel_compute_v2(
    kernel: *mut c_void,
    context: *mut OrtKernelContext,
) -> OrtStatusPtr {
    // SAFETY: `kernel` is the pointer create_kernel_v2 produced; the runtime keeps it alive
    // during compute and may call compute concurrently (we only read it).
    let Some(k) = (unsafe { kernel.cast::<Kernel>().as_ref() }) else {
        // Without a kernel there is no API table to make a status with; the runtime never does this.
        return OrtStatusPtr(ptr::null_mut());
    };
    // SAFETY: `context` is the live kernel context of this call.
    guard_status(k.api, || unsafe { compute(k, context) })
}

/// The run-time part: checks the input, allocates the output, runs the kernel.
///
/// # Safety
/// `ctx` must be the live kernel context of the current call.
unsafe fn compute(k: &Kernel, ctx: *mut OrtKernelContext) -> Result<(), Failure> {
    let api = k.api;
    let t = api.t();
    let mut input: *const OrtValue = ptr::null();
    // SAFETY: ctx is live; the out pointer is a local.
    api.check(unsafe { (t.KernelContext_GetInput)(ctx, 0, &mut input) })?;
    if input.is_null() {
        return Err("GhostShift: input X is missing".into());
    }
    let mut info: *mut OrtTensorTypeAndShapeInfo = ptr::null_mut();
    // SAFETY: `input` is a live value of this context; `info` is released right after use.
    let (ty, dims) = unsafe {
        api.check((t.GetTensorTypeAndShape)(input, &mut info))?;
        let r = api.type_and_dims(info);
        (t.ReleaseTensorTypeAndShapeInfo)(info);
        r?
    };
    if ty != k.elem.onnx() {
        let got = ElemType::from_onnx(ty).map_or_else(|| format!("ONNX type {ty}"), |e| e.name().to_string());
        return Err(format!(
            "GhostShift: input X has element type {got}; this kernel is for {} (supported: float, float16)",
            k.elem.name()
        )
        .into());
    }
    if dims.len() != 4 {
        return Err(format!(
            "GhostShift: input X must have rank 4 [N, C_i, H, W], got rank {} (shape {dims:?})",
            dims.len()
        )
        .into());
    }
    let mut d = [0usize; 4];
    for (slot, &v) in d.iter_mut().zip(&dims) {
        *slot = usize::try_from(v)
            .map_err(|_| format!("GhostShift: input X has a negative dimension: {dims:?}"))?;
    }
    k.attrs.validate(Some(d[1]))?;
    let out_dims = k.attrs.output_dims(d).map(|v| v as i64);
    let mut output: *mut OrtValue = ptr::null_mut();
    // SAFETY: ctx is live; out_dims holds 4 values; the output value belongs to the context.
    api.check(unsafe { (t.KernelContext_GetOutput)(ctx, 0, out_dims.as_ptr(), 4, &mut output) })?;
    if output.is_null() {
        return Err("GhostShift: the runtime returned no output tensor".into());
    }
    let x_len: usize = d.iter().product();
    let y_len = d[0] * k.attrs.c_g() * d[2] * d[3];
    if y_len == 0 {
        return Ok(());
    }
    let (mut xp, mut yp): (*mut c_void, *mut c_void) = (ptr::null_mut(), ptr::null_mut());
    // SAFETY: both values are live tensors of this context. GetTensorMutableData on the input is
    // only used to read (the runtime's C API has no const accessor before version 23).
    unsafe {
        api.check((t.GetTensorMutableData)(input.cast_mut(), &mut xp))?;
        api.check((t.GetTensorMutableData)(output, &mut yp))?;
    }
    if xp.is_null() || yp.is_null() {
        return Err("GhostShift: the runtime returned a null tensor buffer".into());
    }
    match k.provider {
        Provider::Cpu => {
            // SAFETY: the runtime guarantees the buffers hold x_len / y_len elements of the
            // checked element type, properly aligned, and input and output do not overlap (no
            // in-place aliasing was declared).
            unsafe {
                match k.elem {
                    ElemType::F32 => k.attrs.run(
                        std::slice::from_raw_parts(xp.cast::<f32>(), x_len),
                        d,
                        std::slice::from_raw_parts_mut(yp.cast::<f32>(), y_len),
                    ),
                    ElemType::F16 => k.attrs.run(
                        std::slice::from_raw_parts(xp.cast::<f16>(), x_len),
                        d,
                        std::slice::from_raw_parts_mut(yp.cast::<f16>(), y_len),
                    ),
                }
            }
            .map_err(Failure::from)
        }
        #[cfg(feature = "cuda")]
        Provider::Cuda => {
            let dev = k
                .device_attrs
                .as_ref()
                .ok_or_else(|| Failure::fail("GhostShift: CUDA kernel without device attributes"))?;
            let mut stream: *mut c_void = ptr::null_mut();
            // SAFETY: ctx is live; the stream handle belongs to the runtime.
            api.check(unsafe { (t.KernelContext_GetGPUComputeStream)(ctx, &mut stream) })
                .map_err(Failure::fail)?;
            // SAFETY: xp / yp are device buffers of the checked type and sizes (CUDA EP, default
            // memory type); `dev` holds C_g records.
            unsafe { dev.launch(k.elem, xp, yp, d, stream) }
        }
    }
}

/// Counter for names of dims that are unknown and unnamed in the input (see infer()).
static UNNAMED_DIMS: AtomicU64 = AtomicU64::new(0);

unsafe extern "system" fn infer_output_shape(
    op: *const OrtCustomOp,
    ctx: *mut OrtShapeInferContext,
) -> OrtStatusPtr {
    // SAFETY: the runtime passes back our own op pointer.
    let this = unsafe { this(op) };
    // SAFETY: ctx is the live inference context; the op only registers this function when its
    // API version has the ShapeInferContext_* functions.
    guard_status(this.api, || unsafe { infer(this.api, ctx) })
}

/// Output type = input type, output shape = `[N, len(sources), H, W]` (symbolic names kept).
/// Also validates the attributes, against C_i when it is known.
///
/// # Safety
/// `ctx` must be live and `api.version() >= SHAPE_INFERENCE_API`.
unsafe fn infer(api: Api, ctx: *mut OrtShapeInferContext) -> Result<(), String> {
    let t = api.t();
    let names = GHOST_SHIFT.attrs;
    let mut count = 0usize;
    // SAFETY: ctx is live (caller); out pointers are locals. The input info belongs to ctx and
    // must not be released.
    let (ty, dims, sym, attrs) = unsafe {
        api.check((t.ShapeInferContext_GetInputCount)(ctx, &mut count))?;
        if count != 1 {
            return Err(format!("GhostShift: expected 1 input, got {count}"));
        }
        let mut info: *mut OrtTensorTypeAndShapeInfo = ptr::null_mut();
        api.check((t.ShapeInferContext_GetInputTypeShape)(ctx, 0, &mut info))?;
        if info.is_null() {
            return Err("GhostShift: no type information for input X".into());
        }
        let (ty, dims) = api.type_and_dims(info)?;
        let sym = api.symbolic_dims(info, dims.len())?;
        let ints = OrtOpAttrType::ORT_OP_ATTR_INTS;
        let floats = OrtOpAttrType::ORT_OP_ATTR_FLOATS;
        let read_ints = |n: &CStr| {
            let v = api.infer_attr::<i64>(ctx, n, ints)?;
            let other = || api.infer_attr::<f32>(ctx, n, floats).ok().flatten().map_or(0, |v| v.len());
            of_kind(n, "ints", v, other)
        };
        let read_floats = |n: &CStr| {
            let v = api.infer_attr::<f32>(ctx, n, floats)?;
            let other = || api.infer_attr::<i64>(ctx, n, ints).ok().flatten().map_or(0, |v| v.len());
            of_kind(n, "floats", v, other)
        };
        let sources = read_ints(names.sources)?;
        let shifts = read_ints(names.shifts)?;
        let scales = read_floats(names.scales)?;
        let biases = read_floats(names.biases)?;
        let sources =
            non_empty(sources.ok_or("GhostShift: required attribute 'sources' (ints) is missing")?)?;
        let shifts = shifts.ok_or("GhostShift: required attribute 'shifts' (ints) is missing")?;
        (ty, dims, sym, GhostShiftAttrs::from_flat(sources, &shifts, scales, biases)?)
    };
    let Some(out_ty) = ort_elem_raw(ty) else {
        return Err(format!(
            "GhostShift: input X has unsupported element type (ONNX type {ty}); supported: float, float16"
        ));
    };
    if dims.is_empty() {
        // Rank 0 is also how an input without a known shape looks here: leave the output
        // uninferred rather than fail; a real scalar is rejected at run time.
        return Ok(());
    }
    if dims.len() != 4 {
        return Err(format!(
            "GhostShift: input X must have rank 4 [N, C_i, H, W], got rank {} (shape {dims:?})",
            dims.len()
        ));
    }
    attrs.validate(usize::try_from(dims[1]).ok())?;
    let out_dims = [dims[0], attrs.c_g() as i64, dims[2], dims[3]];
    // A dim the runtime passes as -1 without a name would become dim_value -1: give it a fresh name.
    let out_sym: Vec<CString> = [0usize, 1, 2, 3]
        .iter()
        .map(|&i| {
            let name = if i == 1 {
                String::new()
            } else if sym[i].is_empty() && out_dims[i] < 0 {
                format!("ghostsr_unk_{}", UNNAMED_DIMS.fetch_add(1, Ordering::Relaxed))
            } else {
                sym[i].clone()
            };
            CString::new(name.replace('\0', " ")).unwrap_or_default()
        })
        .collect();
    let mut out_sym_ptrs: Vec<*const c_char> = out_sym.iter().map(|s| s.as_ptr()).collect();
    let mut info: *mut OrtTensorTypeAndShapeInfo = ptr::null_mut();
    // SAFETY: we create, fill, hand over (the runtime copies it) and release our own info; the
    // dim and name arrays have 4 entries and outlive the calls.
    unsafe {
        api.check((t.CreateTensorTypeAndShapeInfo)(&mut info))?;
        let r = (|| {
            api.check((t.SetTensorElementType)(info, out_ty))?;
            api.check((t.SetDimensions)(info, out_dims.as_ptr(), 4))?;
            api.check((t.SetSymbolicDimensions)(info, out_sym_ptrs.as_mut_ptr(), 4))?;
            api.check((t.ShapeInferContext_SetOutputTypeShape)(ctx, 0, info))
        })();
        (t.ReleaseTensorTypeAndShapeInfo)(info);
        r
    }
}
