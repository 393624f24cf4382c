//! The plugin against hostile nodes and an old runtime (issue 12, items 17 and 18): `sources` or
//! `shifts` given as FLOATS (and `scales` as INTS) are errors naming the attribute, not a
//! GhostShift that silently outputs 0 channels; a runtime that offers no C API version the
//! plugin can use (ONNX Runtime 1.15) gets an error status from `RegisterCustomOps`.
//!
//! Needs `ORT_DYLIB_PATH` (see tests/plugin_ort.rs); fails without it. The plugin is
//! `target/<profile>/libghostsr.so` next to the test executable (`GHOSTSR_PLUGIN` overrides).

use std::ffi::CStr;
use std::path::PathBuf;
use std::sync::OnceLock;

use ghostsr::onnx::{self, GraphProto, ModelProto, OperatorSetIdProto};
use ghostsr::ops::GHOST_SHIFT;
use ort::environment::Environment;
use ort::session::Session;
use ort::value::Tensor;
use prost::Message;

fn env() -> &'static Environment {
    static ENV: OnceLock<Environment> = OnceLock::new();
    ENV.get_or_init(|| {
        let path = std::env::var("ORT_DYLIB_PATH").expect("ORT_DYLIB_PATH must point at libonnxruntime.so");
        ort::init_from(&path).expect("load ONNX Runtime").build().expect("ONNX Runtime environment")
    })
}

fn plugin_path() -> PathBuf {
    if let Some(p) = std::env::var_os("GHOSTSR_PLUGIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("test executable path");
    exe.parent().and_then(|d| d.parent()).expect("target/<profile>").join("libghostsr.so")
}

/// One GhostShift node `X -> Y` with `attrs`, as ONNX bytes.
fn model_bytes(attrs: Vec<onnx::AttributeProto>) -> Vec<u8> {
    let mut node = onnx::node(GHOST_SHIFT.name_str(), "gs", &["X"], &["Y"], attrs);
    node.domain = Some(GHOST_SHIFT.domain_str().into());
    let opset = |d: &str, v| OperatorSetIdProto { domain: Some(d.into()), version: Some(v) };
    ModelProto {
        ir_version: Some(9),
        opset_import: vec![opset("", 17), opset(GHOST_SHIFT.domain_str(), GHOST_SHIFT.version)],
        graph: Some(GraphProto {
            name: Some("g".into()),
            node: vec![node],
            input: vec![onnx::value_info_nchw("X", [None, Some(2), None, None])],
            output: vec![onnx::value_info_nchw("Y", [None, None, None, None])],
            ..Default::default()
        }),
        ..Default::default()
    }
    .encode_to_vec()
}

/// The first error from creating a session for `bytes` or running it; `None` if both work.
fn error_of(bytes: &[u8]) -> Option<String> {
    let open = || -> ort::Result<Session> {
        let _lock = ghostsr::runner::session::plugin_registration_lock();
        Session::builder(env())?.with_operator_library(plugin_path())?.commit_from_memory(bytes)
    };
    let mut sess = match open() {
        Ok(s) => s,
        Err(e) => return Some(e.to_string()),
    };
    let x = Tensor::from_array(([1i64, 2, 3, 3], vec![1.0f32; 18])).expect("input");
    sess.run(ort::inputs!["X" => x]).err().map(|e| e.to_string())
}

#[test]
fn wrongly_typed_attributes_are_errors_naming_the_attribute() {
    let good = model_bytes(vec![
        onnx::attr_ints_of("sources", vec![0, 1]),
        onnx::attr_ints_of("shifts", vec![0, 1, 1, 0]),
    ]);
    assert_eq!(error_of(&good), None, "the well-typed node runs");
    let cases = [
        (
            "sources",
            vec![
                onnx::attr_floats_of("sources", vec![0.0, 1.0]),
                onnx::attr_ints_of("shifts", vec![0, 1, 1, 0]),
            ],
        ),
        (
            "shifts",
            vec![
                onnx::attr_ints_of("sources", vec![0, 1]),
                onnx::attr_floats_of("shifts", vec![0.0, 1.0, 1.0, 0.0]),
            ],
        ),
        ("sources", vec![onnx::attr_int("sources", 1), onnx::attr_ints_of("shifts", vec![0, 1])]),
        ("sources", vec![onnx::attr_ints_of("sources", vec![]), onnx::attr_ints_of("shifts", vec![])]),
        (
            "scales",
            vec![
                onnx::attr_ints_of("sources", vec![0, 1]),
                onnx::attr_ints_of("shifts", vec![0, 1, 1, 0]),
                onnx::attr_ints_of("scales", vec![2, 3]),
            ],
        ),
    ];
    for (name, attrs) in cases {
        let err = error_of(&model_bytes(attrs))
            .unwrap_or_else(|| panic!("'{name}' of the wrong type was accepted"));
        assert!(err.contains("GhostShift") && err.contains(&format!("'{name}'")), "{name}: {err}");
    }
}

/// The real runtime's API table, handed out only for versions up to 15 (as ONNX Runtime 1.15).
unsafe extern "system" fn get_api_up_to_15(version: u32) -> *const ort_sys::OrtApi {
    if version <= 15 { ort::api() as *const ort_sys::OrtApi } else { std::ptr::null() }
}

unsafe extern "system" fn version_1_15() -> *const std::ffi::c_char {
    c"1.15.1".as_ptr()
}

#[test]
fn a_runtime_without_a_usable_api_gets_an_error_status() {
    env();
    let base = ort_sys::OrtApiBase { GetApi: get_api_up_to_15, GetVersionString: version_1_15 };
    let mut options: *mut ort_sys::OrtSessionOptions = std::ptr::null_mut();
    let api = ort::api();
    // SAFETY: the real runtime's API; options are released below.
    unsafe {
        assert!((api.CreateSessionOptions)(&mut options).0.is_null());
        let status = ghostsr::plugin::RegisterCustomOps(options, &base);
        assert!(!status.is_null(), "registration on a 1.15-like runtime must fail, not return success");
        let msg = CStr::from_ptr((api.GetErrorMessage)(status)).to_string_lossy().into_owned();
        (api.ReleaseStatus)(status);
        (api.ReleaseSessionOptions)(options);
        assert!(msg.contains("1.16") && msg.contains("not registered"), "{msg}");
    }
}
