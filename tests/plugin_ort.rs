//! Loads the GhostShift plugin (`libghostsr.so`) into ONNX Runtime through the `ort` crate
//! (`SessionBuilder::with_operator_library`) and compares its output with the CPU kernel of
//! `ghostsr::ops`; one bad-attribute case checks the error names GhostShift.
//!
//! Needs the ONNX Runtime shared library: set `ORT_DYLIB_PATH`, e.g.
//! `ORT_DYLIB_PATH=/work/main/.venv/lib/python3.11/site-packages/onnxruntime/capi/libonnxruntime.so.1.31.1`.
//! The test fails (it does not skip) without it.
//!
//! The plugin is the cdylib cargo builds alongside the rlib for this test run:
//! `target/<profile>/libghostsr.so`, found from the test executable
//! (`target/<profile>/deps/plugin_ort-*`); `GHOSTSR_PLUGIN` overrides the path.

use std::path::PathBuf;
use std::sync::OnceLock;

use ghostsr::onnx::{
    AttributeProto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, TensorShapeProto, TypeProto,
    ValueInfoProto, attribute_proto::AttributeType, tensor_shape_proto, type_proto,
};
use ghostsr::ops::{GHOST_SHIFT, GhostShiftAttrs, ghost_shift::reference};
use ort::environment::Environment;
use ort::session::Session;
use ort::value::Tensor;
use prost::Message;

/// The ONNX Runtime environment, loaded once from `ORT_DYLIB_PATH`.
fn env() -> &'static Environment {
    static ENV: OnceLock<Environment> = OnceLock::new();
    ENV.get_or_init(load_ort)
}

fn load_ort() -> Environment {
    let path = std::env::var("ORT_DYLIB_PATH").unwrap_or_else(|_| {
        panic!(
            "ORT_DYLIB_PATH is not set: point it at ONNX Runtime's shared library, e.g. \
             ORT_DYLIB_PATH=/work/main/.venv/lib/python3.11/site-packages/onnxruntime/capi/libonnxruntime.so.1.31.1 cargo test --test plugin_ort"
        )
    });
    assert!(std::path::Path::new(&path).is_file(), "ORT_DYLIB_PATH={path} is not a file");
    ort::init_from(&path)
        .expect("loading ONNX Runtime from ORT_DYLIB_PATH")
        .build()
        .expect("creating the ONNX Runtime environment")
}

fn plugin_path() -> PathBuf {
    if let Some(p) = std::env::var_os("GHOSTSR_PLUGIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/plugin_ort-<hash> -> target/<profile>/libghostsr.so
    let profile_dir = exe.parent().and_then(|d| d.parent()).expect("target/<profile>");
    let p = profile_dir.join("libghostsr.so");
    assert!(
        p.is_file(),
        "{} not found: cargo builds it with the lib (crate-type cdylib); or set GHOSTSR_PLUGIN",
        p.display()
    );
    p
}

fn ints(name: &str, v: &[i64]) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(AttributeType::Ints as i32),
        ints: v.to_vec(),
        ..Default::default()
    }
}

fn floats(name: &str, v: &[f32]) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(AttributeType::Floats as i32),
        floats: v.to_vec(),
        ..Default::default()
    }
}

/// A tensor value info with symbolic dims and ONNX element type `elem_type` (1 float, 6 int32).
fn value_info_typed(name: &str, dims: &[&str], elem_type: i32) -> ValueInfoProto {
    let dim = dims
        .iter()
        .map(|d| tensor_shape_proto::Dimension {
            value: Some(tensor_shape_proto::dimension::Value::DimParam((*d).into())),
            ..Default::default()
        })
        .collect();
    ValueInfoProto {
        name: Some(name.into()),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: Some(elem_type),
                shape: Some(TensorShapeProto { dim }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// One GhostShift node `X -> Y` (float), as ONNX bytes.
fn model_bytes(attrs: &GhostShiftAttrs) -> Vec<u8> {
    let mut attribute = vec![ints("sources", &attrs.sources), ints("shifts", &attrs.flat_shifts())];
    if let Some(s) = &attrs.scales {
        attribute.push(floats("scales", s));
    }
    if let Some(b) = &attrs.biases {
        attribute.push(floats("biases", b));
    }
    raw_model_bytes(attribute, &["N", "C", "H", "W"], 1)
}

/// One GhostShift node with the given attributes, input dims and element type, as ONNX bytes.
fn raw_model_bytes(attribute: Vec<AttributeProto>, x_dims: &[&str], elem_type: i32) -> Vec<u8> {
    let node = NodeProto {
        input: vec!["X".into()],
        output: vec!["Y".into()],
        op_type: Some(GHOST_SHIFT.name_str().into()),
        domain: Some(GHOST_SHIFT.domain_str().into()),
        attribute,
        ..Default::default()
    };
    let graph = GraphProto {
        node: vec![node],
        name: Some("ghost_shift_test".into()),
        input: vec![value_info_typed("X", x_dims, elem_type)],
        output: vec![value_info_typed("Y", &["N", "G", "H", "W"], elem_type)],
        ..Default::default()
    };
    let opset =
        |domain: &str, version| OperatorSetIdProto { domain: Some(domain.into()), version: Some(version) };
    ModelProto {
        ir_version: Some(9),
        opset_import: vec![opset("", 17), opset(GHOST_SHIFT.domain_str(), GHOST_SHIFT.version)],
        graph: Some(graph),
        ..Default::default()
    }
    .encode_to_vec()
}

fn session(attrs: &GhostShiftAttrs) -> ort::Result<Session> {
    open(&model_bytes(attrs))
}

#[test]
fn plugin_matches_cpu_kernel() {
    let attrs = GhostShiftAttrs {
        sources: vec![0, 2, 2, 1, 0],
        shifts: vec![(1, 0), (0, -1), (-3, 3), (2, 2), (0, 0)],
        scales: Some(vec![1.0, 0.5, -1.25, 2.0, 1.0]),
        biases: Some(vec![0.0, 0.1, -0.3, 0.0, 0.25]),
    };
    let dims = [2usize, 3, 9, 11];
    let x: Vec<f32> =
        (0..dims.iter().product::<usize>()).map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0).collect();
    let want = reference(&attrs, &x, dims).expect("reference");
    let mut kernel = vec![0.0f32; want.len()];
    attrs.run(&x, dims, &mut kernel).expect("cpu kernel");
    assert_eq!(kernel, want);

    let mut sess = session(&attrs).expect("session with the plugin");
    let input = Tensor::from_array((dims.map(|d| d as i64), x)).expect("input tensor");
    let outputs = sess.run(ort::inputs!["X" => input]).expect("run");
    let (shape, y) = outputs["Y"].try_extract_tensor::<f32>().expect("f32 output");
    assert_eq!(&**shape, &[2, 5, 9, 11]);
    assert_eq!(y, &want[..]);
}

#[test]
fn bad_attributes_name_ghostshift() {
    let attrs = GhostShiftAttrs {
        sources: vec![0, 1],
        shifts: vec![(0, 0), (1, 1)],
        scales: Some(vec![1.0]),
        biases: None,
    };
    let err = match session(&attrs) {
        Err(e) => e.to_string(),
        Ok(mut sess) => {
            let input = Tensor::from_array(([1i64, 2, 3, 3], vec![0.0f32; 18])).expect("input tensor");
            match sess.run(ort::inputs!["X" => input]) {
                Err(e) => e.to_string(),
                Ok(_) => panic!("a 'scales' of the wrong length was accepted"),
            }
        }
    };
    assert!(err.contains("GhostShift") && err.contains("'scales'"), "{err}");
}

/// A session with the plugin for model `bytes`.
/// Tests run on parallel threads; registering the plugin's domain is serialised as ghostsr's
/// own runner does it (ONNX Runtime's domain table insert is not atomic).
fn open(bytes: &[u8]) -> ort::Result<Session> {
    let _registering = ghostsr::runner::session::plugin_registration_lock();
    Session::builder(env())?.with_operator_library(plugin_path())?.commit_from_memory(bytes)
}

/// The error of creating a session for `bytes` and, if that succeeds, running it on `x`.
fn first_error(bytes: &[u8], x_dims: &[i64]) -> String {
    let mut sess = match open(bytes) {
        Err(e) => return e.to_string(),
        Ok(s) => s,
    };
    let n: i64 = x_dims.iter().product();
    let input = Tensor::from_array((x_dims.to_vec(), vec![0.0f32; n as usize])).expect("input tensor");
    match sess.run(ort::inputs!["X" => input]) {
        Err(e) => e.to_string(),
        Ok(_) => panic!("the bad model ran"),
    }
}

#[test]
fn bad_attributes_rank_and_type_are_runtime_errors_naming_ghostshift() {
    let dims4 = ["N", "C", "H", "W"];
    // A source beyond the input's channels (known only at run time here).
    let err = first_error(
        &raw_model_bytes(vec![ints("sources", &[0, 5]), ints("shifts", &[0, 0, 1, 1])], &dims4, 1),
        &[1, 2, 3, 3],
    );
    assert!(err.contains("GhostShift") && err.contains("source"), "{err}");
    // An odd-length `shifts`.
    let err = first_error(
        &raw_model_bytes(vec![ints("sources", &[0, 1]), ints("shifts", &[0, 0, 1])], &dims4, 1),
        &[1, 2, 3, 3],
    );
    assert!(err.contains("GhostShift") && err.contains("shifts"), "{err}");
    // A rank-3 input.
    let err = first_error(
        &raw_model_bytes(vec![ints("sources", &[0]), ints("shifts", &[0, 0])], &["C", "H", "W"], 1),
        &[2, 3, 3],
    );
    assert!(err.contains("GhostShift") && err.to_lowercase().contains("rank"), "{err}");
    // An int32 input: no GhostShift kernel takes it; a clean error at session creation.
    let bytes = raw_model_bytes(vec![ints("sources", &[0]), ints("shifts", &[0, 0])], &dims4, 6);
    let err = match open(&bytes) {
        Err(e) => e.to_string(),
        Ok(_) => panic!("an int32 GhostShift must not load"),
    };
    assert!(err.contains("GhostShift"), "{err}");
}
