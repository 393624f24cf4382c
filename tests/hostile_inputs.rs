//! Issue 12 reproducers: lose nothing, read nothing it should not, never panic. Each test is one
//! item of the issue (numbered as there); each failed on the code before the fix.

use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use ghostsr::emit::{self, EmitMode};
use ghostsr::generate::{Arch, GenSpec, generate};
use ghostsr::graph::GraphIndex;
use ghostsr::graph::analysis::{self, Policy};
use ghostsr::model::{self, WriteOptions};
use ghostsr::onnx::{self, ModelProto, StringStringEntryProto, TensorProto, tensor_proto::DataLocation};
use ghostsr::plan::Plan;
use ghostsr::plan::kmeans::{self, PlanOptions};

fn small() -> ModelProto {
    generate(&GenSpec { blocks: 1, channels: 16, ..GenSpec::preset(Arch::EdsrBaseline, 2) })
}

/// Plans (every eligible Conv) and emits `m` in `mode`.
fn convert(m: &ModelProto, mode: EmitMode) -> ModelProto {
    let index = GraphIndex::new(m.graph.as_ref().unwrap()).unwrap();
    let analysis = analysis::analyze(&index, &Policy::default()).unwrap();
    let opts = PlanOptions { max_iterations: 3, ..Default::default() };
    let plan = kmeans::plan_model(&index, &analysis, "", &opts, &|_, _, _| {}).unwrap();
    assert!(plan.active_layers().count() > 0, "the fixture has ghosted layers");
    emit::emit(m, &analysis, &plan, mode).unwrap().0
}

fn empty_plan(m: &ModelProto) -> ModelProto {
    let index = GraphIndex::new(m.graph.as_ref().unwrap()).unwrap();
    let analysis = analysis::analyze(&index, &Policy::default()).unwrap();
    emit::emit(m, &analysis, &Plan::new("", 1, vec![]), EmitMode::Plugin).unwrap().0
}

fn names(ts: &[TensorProto]) -> Vec<String> {
    ts.iter().map(|t| onnx::tensor_name(t).to_string()).collect()
}

// ---------------------------------------------------------------- 1-4: nothing lost

/// 1: an initializer no node reads (the default of an optional graph input) survives a rewrite,
/// and an empty plan gives back the same bytes.
#[test]
fn item1_unused_initializers_are_kept() {
    let mut m = small();
    let g = m.graph.as_mut().unwrap();
    g.initializer.push(onnx::f32_tensor("default_gain", &[1], &[0.5]));
    g.input.push(onnx::value_info_nchw("default_gain", [Some(1), None, None, None]));
    assert_eq!(model::encode(&empty_plan(&m)), model::encode(&m), "an empty plan changes nothing");
    for mode in [EmitMode::Plugin, EmitMode::Standard, EmitMode::Fused, EmitMode::Conv] {
        let out = convert(&m, mode);
        let g = out.graph.as_ref().unwrap();
        assert!(names(&g.initializer).contains(&"default_gain".to_string()), "{mode:?}");
        assert!(g.input.iter().any(|v| v.name.as_deref() == Some("default_gain")), "{mode:?}");
    }
}

/// 2 and 4: weights listed as graph inputs (IR 3, `keep_initializers_as_inputs=True`): the
/// replaced ones leave the inputs with them; under IR 3 the new initializers become inputs.
#[test]
fn item2_weights_listed_as_inputs_leave_with_their_initializers() {
    for ir in [3i64, 8] {
        let mut m = small();
        m.ir_version = Some(ir);
        let g = m.graph.as_mut().unwrap();
        let as_inputs: Vec<_> = g
            .initializer
            .iter()
            .map(|t| {
                let d: Vec<Option<i64>> = t.dims.iter().map(|&d| Some(d)).collect();
                let mut v = onnx::value_info_nchw(onnx::tensor_name(t), [None; 4]);
                if let Some(onnx::type_proto::Value::TensorType(tt)) =
                    v.r#type.as_mut().and_then(|t| t.value.as_mut())
                {
                    tt.shape.as_mut().unwrap().dim.truncate(d.len());
                }
                v
            })
            .collect();
        g.input.extend(as_inputs);
        for mode in [EmitMode::Plugin, EmitMode::Conv] {
            let out = convert(&m, mode);
            let g = out.graph.as_ref().unwrap();
            let inits: std::collections::HashSet<String> = names(&g.initializer).into_iter().collect();
            let inputs: Vec<&str> = g.input.iter().filter_map(|v| v.name.as_deref()).collect();
            // Every input is the real input or an initializer that still exists.
            for i in &inputs {
                assert!(*i == "input" || inits.contains(*i), "IR {ir} {mode:?}: stale graph input '{i}'");
            }
            if ir < 4 {
                // IR 3: every initializer must also be a graph input (onnx.checker).
                for t in &inits {
                    assert!(
                        inputs.contains(&t.as_str()),
                        "IR 3 {mode:?}: initializer '{t}' is not a graph input"
                    );
                }
            }
        }
    }
}

/// 3: an initializer read only inside an If branch is kept.
#[test]
fn item3_initializers_read_in_subgraphs_are_kept() {
    let mut m = small();
    let g = m.graph.as_mut().unwrap();
    let out_name = g.output[0].name.clone().unwrap();
    g.initializer.push(onnx::f32_tensor("branch_gain", &[1], &[2.0]));
    g.initializer.push(onnx::TensorProto {
        data_type: Some(9),
        raw_data: Some(vec![1]),
        ..onnx::f32_tensor("cond", &[], &[])
    });
    let branch = |name: &str| onnx::GraphProto {
        name: Some(name.into()),
        node: vec![onnx::node(
            "Mul",
            &format!("{name}_mul"),
            &[&out_name, "branch_gain"],
            &[&format!("{name}_y")],
            vec![],
        )],
        output: vec![onnx::value_info_nchw(&format!("{name}_y"), [None; 4])],
        ..Default::default()
    };
    let graph_attr = |n: &str, g| onnx::AttributeProto {
        name: Some(n.into()),
        r#type: Some(onnx::attribute_proto::AttributeType::Graph as i32),
        g: Some(g),
        ..Default::default()
    };
    g.node.push(onnx::node(
        "If",
        "gate",
        &["cond"],
        &["gated"],
        vec![graph_attr("then_branch", branch("then")), graph_attr("else_branch", branch("else"))],
    ));
    g.output.push(onnx::value_info_nchw("gated", [None; 4]));
    assert_eq!(model::encode(&empty_plan(&m)), model::encode(&m));
    for mode in [EmitMode::Plugin, EmitMode::Standard, EmitMode::Fused, EmitMode::Conv] {
        let out = convert(&m, mode);
        assert!(
            names(&out.graph.as_ref().unwrap().initializer).contains(&"branch_gain".to_string()),
            "{mode:?}"
        );
    }
}

/// 3: an If body that reads a ghosted Conv's output by name reads it in its original channel
/// order (the rewrite stores that tensor permuted under another name).
#[test]
fn item3_subgraphs_read_ghosted_tensors_in_the_original_order() {
    let mut m = small();
    let index = GraphIndex::new(m.graph.as_ref().unwrap()).unwrap();
    let analysis = analysis::analyze(&index, &Policy::default()).unwrap();
    let ghosted = analysis.eligible().next().unwrap().output.clone();
    drop(index);
    let g = m.graph.as_mut().unwrap();
    g.initializer.push(onnx::TensorProto {
        data_type: Some(9),
        raw_data: Some(vec![1]),
        ..onnx::f32_tensor("cond", &[], &[])
    });
    let branch = |name: &str| onnx::GraphProto {
        name: Some(name.into()),
        node: vec![onnx::node(
            "Identity",
            &format!("{name}_id"),
            &[&ghosted],
            &[&format!("{name}_y")],
            vec![],
        )],
        output: vec![onnx::value_info_nchw(&format!("{name}_y"), [None; 4])],
        ..Default::default()
    };
    let graph_attr = |n: &str, g| onnx::AttributeProto {
        name: Some(n.into()),
        r#type: Some(onnx::attribute_proto::AttributeType::Graph as i32),
        g: Some(g),
        ..Default::default()
    };
    g.node.push(onnx::node(
        "If",
        "peek",
        &["cond"],
        &["peeked"],
        vec![graph_attr("then_branch", branch("then")), graph_attr("else_branch", branch("else"))],
    ));
    g.output.push(onnx::value_info_nchw("peeked", [None; 4]));
    for mode in [EmitMode::Plugin, EmitMode::Standard] {
        let out = convert(&m, mode);
        let g = out.graph.as_ref().unwrap();
        let at = |name: &str| g.node.iter().position(|n| n.output.iter().any(|o| o == name));
        let producer =
            at(&ghosted).unwrap_or_else(|| panic!("{mode:?}: nothing writes '{ghosted}' any more"));
        let reader = g.node.iter().position(|n| n.op_type() == "If").unwrap();
        assert!(producer < reader, "{mode:?}");
        // Written in the original order: by a restoring Gather of the permuted tensor.
        assert_eq!(g.node[producer].op_type(), "Gather", "{mode:?}");
    }
}

// ---------------------------------------------------------------- 5-9: external data

fn external(t: &mut TensorProto, location: &str, offset: usize, length: usize) {
    let e = |k: &str, v: String| StringStringEntryProto { key: Some(k.into()), value: Some(v) };
    t.raw_data = None;
    t.external_data = vec![
        e("location", location.into()),
        e("offset", offset.to_string()),
        e("length", length.to_string()),
    ];
    t.data_location = Some(DataLocation::External as i32);
}

/// A model in `dir` whose first initializer is stored at `location` (the real bytes are
/// written to `dir/weights.bin`); returns the model path and the first initializer's bytes.
fn model_with_external(dir: &Path, location: &str) -> (PathBuf, Vec<u8>) {
    let mut m = small();
    let t = &mut m.graph.as_mut().unwrap().initializer[0];
    let raw = t.raw_data.clone().unwrap();
    external(t, location, 0, raw.len());
    fs::write(dir.join("weights.bin"), &raw).unwrap();
    let p = dir.join("m.onnx");
    fs::write(&p, model::encode(&m)).unwrap();
    (p, raw)
}

fn load_err(p: &Path) -> String {
    format!("{:#}", model::load(p).unwrap_err())
}

/// 5: symbolic links (to a file outside, or a directory link) are refused, as ONNX does.
#[test]
fn item5_symlinks_and_paths_outside_the_model_directory_are_refused() {
    let outside = tempfile::tempdir().unwrap();
    fs::write(outside.path().join("secret.bin"), vec![7u8; 1 << 16]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    symlink(outside.path().join("secret.bin"), dir.path().join("link.bin")).unwrap();
    let (p, _) = model_with_external(dir.path(), "link.bin");
    assert!(load_err(&p).contains("symbolic link"), "{}", load_err(&p));
    // A directory link: the file itself is regular, but it resolves outside.
    symlink(outside.path(), dir.path().join("sub")).unwrap();
    let (p, _) = model_with_external(dir.path(), "sub/secret.bin");
    assert!(load_err(&p).contains("outside the model directory"), "{}", load_err(&p));
    for bad in ["/etc/passwd", "../secret.bin", "/dev/zero"] {
        let (p, _) = model_with_external(dir.path(), bad);
        assert!(load_err(&p).contains("relative path inside"), "{bad}: {}", load_err(&p));
    }
    // The same model with a plain file loads.
    let (p, raw) = model_with_external(dir.path(), "weights.bin");
    assert_eq!(model::load(&p).unwrap().graph().initializer[0].raw_data.as_ref(), Some(&raw));
}

/// 6: a FIFO or a directory is not a regular file: refused at once (a FIFO used to hang).
#[test]
fn item6_non_regular_files_are_refused_without_blocking() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("pipe.bin");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let (p, _) = model_with_external(dir.path(), "pipe.bin");
    assert!(load_err(&p).contains("not a regular file"), "{}", load_err(&p));
    fs::create_dir(dir.path().join("d")).unwrap();
    let (p, _) = model_with_external(dir.path(), "d");
    assert!(load_err(&p).contains("not a regular file"), "{}", load_err(&p));
}

/// 7: many tensors in one file are read by ranges from one open file, each its own bytes.
#[test]
fn item7_many_tensors_share_one_file() {
    let dir = tempfile::tempdir().unwrap();
    let mut m = small();
    let g = m.graph.as_mut().unwrap();
    let mut blob = Vec::new();
    let mut want = Vec::new();
    for t in g.initializer.iter_mut() {
        let raw = t.raw_data.clone().unwrap();
        external(t, "all.bin", blob.len(), raw.len());
        blob.extend_from_slice(&raw);
        want.push(raw);
    }
    fs::write(dir.path().join("all.bin"), &blob).unwrap();
    let p = dir.path().join("m.onnx");
    fs::write(&p, model::encode(&m)).unwrap();
    let loaded = model::load(&p).unwrap();
    let got: Vec<Vec<u8>> = loaded.graph().initializer.iter().map(|t| t.raw_data.clone().unwrap()).collect();
    assert_eq!(got, want);
}

/// 8: a Constant node's tensor with external data is checked and inlined like an initializer.
#[test]
fn item8_constant_node_external_data_is_checked_and_inlined() {
    let dir = tempfile::tempdir().unwrap();
    let build = |location: &str| {
        let mut m = small();
        let g = m.graph.as_mut().unwrap();
        let mut t = onnx::f32_tensor("", &[2], &[1.5, -2.0]);
        external(&mut t, location, 0, 8);
        let value = onnx::AttributeProto {
            name: Some("value".into()),
            r#type: Some(onnx::attribute_proto::AttributeType::Tensor as i32),
            t: Some(t),
            ..Default::default()
        };
        g.node.insert(0, onnx::node("Constant", "k", &[], &["k_out"], vec![value]));
        let p = dir.path().join("c.onnx");
        fs::write(&p, model::encode(&m)).unwrap();
        p
    };
    fs::write(
        dir.path().join("k.bin"),
        [1.5f32, -2.0].iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<_>>(),
    )
    .unwrap();
    let m = model::load(&build("k.bin")).unwrap();
    let t = onnx::attr(&m.graph().node[0], "value").unwrap().t.as_ref().unwrap();
    assert_eq!(onnx::tensor_f32(t).unwrap(), vec![1.5, -2.0]);
    assert!(t.external_data.is_empty() && t.data_location.is_none());
    let err = load_err(&build("../../etc/passwd"));
    assert!(err.contains("relative path inside") && err.contains("Constant \"k\""), "{err}");
}

/// 9: the declared dims must match the bytes, for external data too.
#[test]
fn item9_external_data_sizes_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let mut m = small();
    let t = &mut m.graph.as_mut().unwrap().initializer[0];
    t.dims = vec![1_000_000];
    external(t, "w.bin", 0, 64);
    fs::write(dir.path().join("w.bin"), [0u8; 64]).unwrap();
    let p = dir.path().join("m.onnx");
    fs::write(&p, model::encode(&m)).unwrap();
    let err = load_err(&p);
    assert!(err.contains("does not match dims"), "{err}");
    // Without a declared length the file must still hold what the dims need.
    let t = &mut m.graph.as_mut().unwrap().initializer[0];
    t.external_data.retain(|e| e.key.as_deref() != Some("length"));
    fs::write(&p, model::encode(&m)).unwrap();
    let err = load_err(&p);
    assert!(err.contains("outside") && err.contains("w.bin"), "{err}");
}

// ---------------------------------------------------------------- 10-12: writing

/// 10: a planted symlink at the old predictable temporary name is never followed.
#[test]
fn item10_temporary_files_are_created_exclusively() {
    let dir = tempfile::tempdir().unwrap();
    let victim = dir.path().join("victim.txt");
    fs::write(&victim, b"precious").unwrap();
    let out = dir.path().join("out.onnx");
    for name in [
        format!(".out.onnx.tmp{}", std::process::id()),
        format!(".out.onnx.ghostsr-tmp.{}", std::process::id()),
    ] {
        symlink(&victim, dir.path().join(name)).unwrap();
    }
    model::write_atomic(&out, b"model bytes", WriteOptions { protect: &[], force: false }).unwrap();
    assert_eq!(fs::read(&victim).unwrap(), b"precious");
    assert_eq!(fs::read(&out).unwrap(), b"model bytes");
}

/// 11: an output that exists and is not a regular file is refused, even with --force.
#[test]
fn item11_non_regular_outputs_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("out.onnx");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let err =
        model::write_atomic(&fifo, b"x", WriteOptions { protect: &[], force: true }).unwrap_err().to_string();
    assert!(err.contains("not a regular file"), "{err}");
    assert!(fs::symlink_metadata(&fifo).unwrap().file_type().is_fifo_like());
    let err = model::write_atomic(Path::new("/dev/full"), b"x", WriteOptions { protect: &[], force: true })
        .unwrap_err()
        .to_string();
    assert!(err.contains("not a regular file"), "{err}");
    let err = model::write_atomic(dir.path(), b"x", WriteOptions { protect: &[], force: true })
        .unwrap_err()
        .to_string();
    assert!(err.contains("directory"), "{err}");
}

trait FifoLike {
    fn is_fifo_like(&self) -> bool;
}
impl FifoLike for fs::FileType {
    fn is_fifo_like(&self) -> bool {
        use std::os::unix::fs::FileTypeExt;
        self.is_fifo()
    }
}

/// 12: temporaries of a killed run (a pid that no longer exists) are removed by the next write;
/// those of live processes are left alone.
#[test]
fn item12_stale_temporaries_are_cleaned_up() {
    let dir = tempfile::tempdir().unwrap();
    let dead = (1u32 << 22) - 3; // above the default pid_max: no process has it
    assert!(!Path::new(&format!("/proc/{dead}")).exists());
    let stale = dir.path().join(format!(".out.onnx.ghostsr-tmp.{dead}.Ab12Cd"));
    let live = dir.path().join(format!(".out.onnx.ghostsr-tmp.{}.Zz99Yy", std::process::id()));
    let other = dir.path().join(format!(".other.onnx.ghostsr-tmp.{dead}.Ab12Cd"));
    for p in [&stale, &live, &other] {
        fs::write(p, vec![0u8; 1024]).unwrap();
    }
    let out = dir.path().join("out.onnx");
    model::write_atomic(&out, b"m", WriteOptions { protect: &[], force: false }).unwrap();
    assert!(!stale.exists(), "a dead run's temporary is removed");
    assert!(live.exists() && other.exists(), "a live run's, or another output's, is kept");
    let left: Vec<_> = fs::read_dir(dir.path()).unwrap().flatten().map(|e| e.file_name()).collect();
    assert_eq!(left.len(), 3, "no temporary of this write is left: {left:?}");
}

// ---------------------------------------------------------------- 13-15: no panics

/// 13 and 15: hostile Conv/pool attributes never panic; the Conv is left alone with a reason
/// naming the attribute.
#[test]
fn item13_15_hostile_conv_attributes_are_reasons_not_panics() {
    fn set(n: &mut onnx::NodeProto, a: onnx::AttributeProto) {
        n.attribute.retain(|x| x.name != a.name);
        n.attribute.push(a);
    }
    let set_ints = |n: &mut onnx::NodeProto, name: &str, v: Vec<i64>| set(n, onnx::attr_ints_of(name, v));
    type Edit = Box<dyn Fn(&mut onnx::NodeProto)>;
    let cases: Vec<(&str, Edit)> = vec![
        ("strides", Box::new(move |n| set_ints(n, "strides", vec![0, 0]))),
        ("group", Box::new(move |n| set(n, onnx::attr_int("group", 0)))),
        ("group", Box::new(move |n| set(n, onnx::attr_int("group", -4)))),
        ("divide", Box::new(move |n| set(n, onnx::attr_int("group", 3)))),
        ("kernel_shape", Box::new(move |n| set_ints(n, "kernel_shape", vec![-3, 3]))),
        ("kernel_shape", Box::new(move |n| set_ints(n, "kernel_shape", vec![3]))),
        ("pads", Box::new(move |n| set_ints(n, "pads", vec![1, 1]))),
        ("pads", Box::new(move |n| set_ints(n, "pads", vec![-1, 1, 1, 1]))),
        ("dilations", Box::new(move |n| set_ints(n, "dilations", vec![0, 1]))),
        ("auto_pad", Box::new(move |n| set(n, onnx::attr_string("auto_pad", "SIDEWAYS")))),
    ];
    for (expect, edit) in cases {
        let mut m = small();
        let g = m.graph.as_mut().unwrap();
        // The second Conv: eligible in the unedited model.
        let i = g.node.iter().enumerate().filter(|(_, n)| n.op_type() == "Conv").nth(1).unwrap().0;
        edit(&mut g.node[i]);
        let name = g.node[i].name.clone().unwrap();
        let index = GraphIndex::new(m.graph.as_ref().unwrap()).unwrap();
        let analysis = analysis::analyze(&index, &Policy::default()).unwrap();
        let conv = analysis.convs.iter().find(|c| c.node == name).unwrap();
        let why = conv.verdict.reason();
        assert!(!conv.verdict.is_eligible() && why.contains(expect), "{expect}: {why}");
        // Planning and emitting the rest still work.
        let plan = kmeans::plan_model(
            &index,
            &analysis,
            "",
            &PlanOptions { max_iterations: 2, ..Default::default() },
            &|_, _, _| {},
        )
        .unwrap();
        emit::emit(&m, &analysis, &plan, EmitMode::Standard).unwrap();
    }
    // Pools with zero strides: no division by zero in shape inference.
    for op in ["MaxPool", "AveragePool"] {
        let mut m = small();
        let g = m.graph.as_mut().unwrap();
        let first_out = g.node[0].output[0].clone();
        g.node.insert(
            1,
            onnx::node(
                op,
                "pool",
                &[&first_out],
                &["pooled"],
                vec![
                    onnx::attr_ints_of("kernel_shape", vec![2, 2]),
                    onnx::attr_ints_of("strides", vec![0, 0]),
                ],
            ),
        );
        g.output.push(onnx::value_info_nchw("pooled", [None; 4]));
        let index = GraphIndex::new(m.graph.as_ref().unwrap()).unwrap();
        analysis::analyze(&index, &Policy::default()).unwrap();
    }
}

/// 14: a shift of i64::MIN is refused by validation (it used to overflow the range check and
/// index out of bounds in the standard and conv emitters).
#[test]
fn item14_extreme_shifts_are_refused() {
    let m = small();
    let index = GraphIndex::new(m.graph.as_ref().unwrap()).unwrap();
    let analysis = analysis::analyze(&index, &Policy::default()).unwrap();
    let opts = PlanOptions { max_iterations: 2, ..Default::default() };
    let plan = kmeans::plan_model(&index, &analysis, "", &opts, &|_, _, _| {}).unwrap();
    for shift in [[i64::MIN, 0], [0, i64::MIN], [i64::MAX, 0]] {
        let mut bad = plan.clone();
        let l = bad.layers.iter_mut().find(|l| !l.ghosts.is_empty()).unwrap();
        l.ghosts[0].shift = shift;
        for mode in [EmitMode::Plugin, EmitMode::Standard, EmitMode::Fused, EmitMode::Conv] {
            let err = format!("{:#}", emit::emit(&m, &analysis, &bad, mode).unwrap_err());
            assert!(err.contains("beyond max_shift"), "{mode:?}: {err}");
        }
    }
}

// ---------------------------------------------------------------- 16, 19

fn ghostsr(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ghostsr")).args(args).output().expect("run ghostsr")
}

/// 16: a plan made for another model file is refused unless --force-plan.
#[test]
fn item16_a_plan_for_another_model_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = |n: &str| dir.path().join(n);
    let fx = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/edsr_baseline_b4c32_x2.onnx");
    let other = d("other.onnx");
    fs::write(&other, model::encode(&small())).unwrap();
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let (plan_p, out) = (d("plan.json"), d("out.onnx"));
    assert!(ghostsr(&["plan", &s(&other), "-o", &s(&plan_p)]).status.success());
    // The same plan on its own model: fine.
    assert!(ghostsr(&["convert", &s(&other), "--plan", &s(&plan_p), "-o", &s(&out)]).status.success());
    let mut plan = Plan::read(&plan_p).unwrap();
    plan.model_sha256 = "0".repeat(64);
    fs::write(&plan_p, plan.to_json()).unwrap();
    let r = ghostsr(&["convert", &s(&other), "--plan", &s(&plan_p), "-o", &s(&d("o2.onnx"))]);
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(!r.status.success() && err.contains(&"0".repeat(64)) && err.contains("--force-plan"), "{err}");
    assert!(!d("o2.onnx").exists());
    let r = ghostsr(&["convert", &s(&other), "--plan", &s(&plan_p), "--force-plan", "-o", &s(&d("o2.onnx"))]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    // A plan for the fixture applied to another model: refused by the hash first.
    let fx_plan = d("fx.json");
    assert!(ghostsr(&["plan", &s(&fx), "-o", &s(&fx_plan)]).status.success());
    let r = ghostsr(&["convert", &s(&other), "--plan", &s(&fx_plan), "-o", &s(&d("o3.onnx"))]);
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(!r.status.success() && err.contains("was made for"), "{err}");
    assert_ne!(r.status.code(), Some(101));
}

/// 19: If subgraphs nested past the decoder's limit get a message naming the limit.
#[test]
fn item19_deep_nesting_names_the_limit() {
    let nest = |depth: usize| {
        let mut m = small();
        let mut body = onnx::GraphProto {
            name: Some("leaf".into()),
            node: vec![onnx::node("Identity", "leaf", &["input"], &["leaf_y"], vec![])],
            ..Default::default()
        };
        for k in 0..depth {
            let a = onnx::AttributeProto {
                name: Some("then_branch".into()),
                r#type: Some(onnx::attribute_proto::AttributeType::Graph as i32),
                g: Some(body),
                ..Default::default()
            };
            body = onnx::GraphProto {
                name: Some(format!("level{k}")),
                node: vec![onnx::node("If", &format!("if{k}"), &["cond"], &[&format!("y{k}")], vec![a])],
                ..Default::default()
            };
        }
        m.graph.as_mut().unwrap().node.extend(body.node);
        model::encode(&m)
    };
    model::decode(&nest(20)).unwrap();
    let err = model::decode(&nest(40)).unwrap_err().to_string();
    assert!(err.contains("limit") && err.contains("subgraphs") && !err.contains("truncated"), "{err}");
}
