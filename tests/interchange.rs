//! The fine-tune interchange, through the built binary on the shipped fixture: a plan plus a
//! weights file (safetensors keyed by the original initializer names) is what a trainer reads
//! and writes. `plan --export-weights` then `convert --plan --weights` gives exactly the model
//! `convert --plan` gives; an edited weight shows up in the emitted reduced Conv; bad weights
//! and bad plans fail with a message naming the entry and leave no output file.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use ghostsr::model;
use ghostsr::onnx::{self, ModelProto};
use ghostsr::plan::Plan;
use ghostsr::weights::{WeightSet, WeightTensor};

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/edsr_baseline_b4c32_x2.onnx")
}

fn ghostsr(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ghostsr")).args(args).output().expect("run ghostsr")
}

fn ok(args: &[&str]) {
    let out = ghostsr(args);
    assert!(out.status.success(), "ghostsr {args:?} failed:\n{}", String::from_utf8_lossy(&out.stderr));
}

/// Runs a command that must fail, and returns its stderr.
fn fails(args: &[&str]) -> String {
    let out = ghostsr(args);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "ghostsr {args:?} should fail; stderr:\n{err}");
    err
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The emitted initializer of the reduced Conv for `conv_output` (`<out>/ghostsr_weight...`).
fn emitted(m: &ModelProto, prefix: &str) -> (Vec<i64>, Vec<f32>) {
    let g = m.graph.as_ref().unwrap();
    let hits: Vec<_> = g.initializer.iter().filter(|t| onnx::tensor_name(t).starts_with(prefix)).collect();
    assert_eq!(hits.len(), 1, "one initializer named {prefix}*");
    (hits[0].dims.clone(), onnx::tensor_f32(hits[0]).unwrap())
}

#[test]
fn export_then_apply_is_identical_and_edits_reach_the_model() {
    let dir = tempfile::tempdir().unwrap();
    let d = |name: &str| dir.path().join(name);
    let fx = fixture();
    let (plan_p, w_p) = (d("plan.json"), d("w.safetensors"));
    ok(&["plan", s(&fx), "-o", s(&plan_p), "--export-weights", s(&w_p)]);

    // The file holds each planned Conv's weight and bias, as in the model, with the metadata.
    let original = model::load(&fx).unwrap();
    let plan = Plan::read(&plan_p).unwrap();
    assert!(!plan.layers.is_empty());
    let (set, meta) = WeightSet::read_with_metadata(&w_p).unwrap();
    assert_eq!(meta.get("format").map(String::as_str), Some("ghostsr-weights"));
    assert_eq!(meta.get("version").map(String::as_str), Some("1"));
    assert_eq!(meta.get("model_sha256"), Some(&original.sha256));
    let g = original.graph();
    let mut expected = 0;
    for layer in &plan.layers {
        let node = g.node.iter().find(|n| n.output.first() == Some(&layer.conv_output)).unwrap();
        for name in &node.input[1..] {
            let init = g.initializer.iter().find(|t| onnx::tensor_name(t) == name).unwrap();
            let t = &set.tensors[name];
            assert_eq!(t.dims, init.dims, "{name}");
            assert_eq!(t.data, onnx::tensor_f32(init).unwrap(), "{name}");
            expected += 1;
        }
    }
    assert_eq!(set.tensors.len(), expected, "exactly the planned Convs' weights and biases");

    // Export then apply: byte-identical to the plan alone, in every emitted form.
    for emit in ["plugin", "standard", "fused", "conv"] {
        let (a, b) = (d(&format!("a.{emit}.onnx")), d(&format!("b.{emit}.onnx")));
        ok(&["convert", s(&fx), "--plan", s(&plan_p), "--emit", emit, "-o", s(&a)]);
        ok(&["convert", s(&fx), "--plan", s(&plan_p), "--weights", s(&w_p), "--emit", emit, "-o", s(&b)]);
        assert!(
            fs::read(&a).unwrap() == fs::read(&b).unwrap(),
            "{emit}: export then apply changed the model"
        );
    }
    // Without --plan the weights apply before planning: same weights, same plan, same model.
    let (a, b) = (d("a.auto.onnx"), d("b.auto.onnx"));
    ok(&["convert", s(&fx), "--kmeans", "-o", s(&a)]);
    ok(&["convert", s(&fx), "--kmeans", "--weights", s(&w_p), "-o", s(&b)]);
    assert!(fs::read(&a).unwrap() == fs::read(&b).unwrap());

    // A trainer's edit: scale one intrinsic filter by 2 and shift its bias by 1; change a ghost's
    // filter too (dropped by the rewrite, so it must not show up anywhere).
    let layer = plan.layers.iter().find(|l| l.intrinsic.len() >= 2 && !l.ghosts.is_empty()).unwrap();
    let node = g.node.iter().find(|n| n.output.first() == Some(&layer.conv_output)).unwrap();
    let (w_name, b_name) = (node.input[1].clone(), node.input[2].clone());
    let (j, c) = (1, layer.intrinsic[1]);
    let ghost = layer.ghosts[0].channel;
    let mut tuned = set.clone();
    let w = tuned.tensors.get_mut(&w_name).unwrap();
    let per = w.data.len() / layer.out_channels;
    w.data[c * per..(c + 1) * per].iter_mut().for_each(|v| *v *= 2.0);
    w.data[ghost * per..(ghost + 1) * per].iter_mut().for_each(|v| *v = 9.0);
    tuned.tensors.get_mut(&b_name).unwrap().data[c] += 1.0;
    let tuned_p = d("tuned.safetensors");
    fs::write(&tuned_p, tuned.to_bytes(&meta)).unwrap();
    let t_out = d("tuned.onnx");
    ok(&["convert", s(&fx), "--plan", s(&plan_p), "--weights", s(&tuned_p), "-o", s(&t_out)]);
    let before = model::load(&d("a.plugin.onnx")).unwrap().proto;
    let after = model::load(&t_out).unwrap().proto;
    let (dims_a, wa) = emitted(&before, &format!("{}/ghostsr_weight", layer.conv_output));
    let (dims_b, wb) = emitted(&after, &format!("{}/ghostsr_weight", layer.conv_output));
    assert_eq!(dims_a, dims_b);
    assert_eq!(dims_a[0] as usize, layer.intrinsic.len());
    for (k, (ra, rb)) in wa.chunks(per).zip(wb.chunks(per)).enumerate() {
        let want: Vec<f32> = ra.iter().map(|v| if k == j { v * 2.0 } else { *v }).collect();
        assert_eq!(rb, want.as_slice(), "reduced filter {k} (original channel {})", layer.intrinsic[k]);
        assert!(!rb.contains(&9.0), "the ghost's filter must not be in the reduced Conv");
    }
    let (_, ba) = emitted(&before, &format!("{}/ghostsr_bias", layer.conv_output));
    let (_, bb) = emitted(&after, &format!("{}/ghostsr_bias", layer.conv_output));
    for k in 0..ba.len() {
        assert_eq!(bb[k], if k == j { ba[k] + 1.0 } else { ba[k] }, "reduced bias {k}");
    }
    // Everything else in the model is untouched.
    let names = |m: &ModelProto| -> Vec<String> {
        m.graph.as_ref().unwrap().initializer.iter().map(|t| onnx::tensor_name(t).to_string()).collect()
    };
    assert_eq!(names(&before), names(&after));
    let (ga, gb) = (before.graph.as_ref().unwrap(), after.graph.as_ref().unwrap());
    let changed: Vec<&str> = ga
        .initializer
        .iter()
        .zip(&gb.initializer)
        .filter(|(x, y)| x != y)
        .map(|(x, _)| onnx::tensor_name(x))
        .collect();
    assert_eq!(changed.len(), 2, "only the reduced weight and bias change: {changed:?}");
    assert_eq!(ga.node, gb.node);
}

#[test]
fn bad_weights_and_plans_fail_naming_the_entry_and_write_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let d = |name: &str| dir.path().join(name);
    let fx = fixture();
    let (plan_p, w_p) = (d("plan.json"), d("w.safetensors"));
    ok(&["plan", s(&fx), "-o", s(&plan_p), "--export-weights", s(&w_p)]);
    let (set, meta) = WeightSet::read_with_metadata(&w_p).unwrap();
    let weight = set.tensors.keys().find(|k| set.tensors[*k].dims.len() == 4).unwrap().clone();
    let out = d("out.onnx");

    type Edit = Box<dyn Fn(&mut WeightSet)>;
    let w = weight.clone();
    let cases: Vec<(&str, Edit, Vec<String>)> = vec![
        (
            "unknown",
            Box::new(|s| {
                s.tensors.insert("not_in_model".into(), WeightTensor { dims: vec![1], data: vec![0.0] });
            }),
            vec!["'not_in_model'".into(), "is not an initializer of the model".into()],
        ),
        (
            "shape",
            Box::new(move |s| {
                let t = s.tensors.get_mut(&w).unwrap();
                t.dims = vec![t.dims[0], t.dims[1], t.dims[2] * t.dims[3]];
            }),
            vec![format!("'{weight}'"), "shape".into()],
        ),
        (
            "nan",
            Box::new({
                let w = weight.clone();
                move |s| s.tensors.get_mut(&w).unwrap().data[5] = f32::NAN
            }),
            vec![format!("'{weight}'"), "element 5".into(), "not a finite number".into()],
        ),
    ];
    for (what, edit, expect) in cases {
        let mut bad = set.clone();
        edit(&mut bad);
        let p = d(&format!("{what}.safetensors"));
        fs::write(&p, bad.to_bytes(&meta)).unwrap();
        for with_plan in [true, false] {
            let mut args = vec!["convert", s(&fx), "--weights", s(&p), "-o", s(&out)];
            if with_plan {
                args.extend(["--plan", s(&plan_p)]);
            }
            let err = fails(&args);
            for e in &expect {
                assert!(err.contains(e.as_str()), "{what}: expected {e:?} in:\n{err}");
            }
            assert!(err.contains("w.safetensors") || err.contains(&format!("{what}.safetensors")), "{err}");
            assert!(!out.exists(), "{what}: a failed convert must not write the output");
        }
    }

    // A damaged file: a clean error naming the file.
    let bytes = fs::read(&w_p).unwrap();
    let cut = d("cut.safetensors");
    fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let err = fails(&["convert", s(&fx), "--plan", s(&plan_p), "--weights", s(&cut), "-o", s(&out)]);
    assert!(err.contains("invalid weights file") && err.contains("cut.safetensors"), "{err}");
    assert!(!out.exists());

    // A trainer's plan with a shift beyond max_shift, or a max_shift beyond the limit.
    let plan = Plan::read(&plan_p).unwrap();
    let (i, _) = plan.layers.iter().enumerate().find(|(_, l)| !l.ghosts.is_empty()).unwrap();
    let mut far = plan.clone();
    far.layers[i].ghosts[0].shift = [0, plan.max_shift + 1];
    let far_p = d("far.json");
    fs::write(&far_p, far.to_json()).unwrap();
    let err = fails(&["convert", s(&fx), "--plan", s(&far_p), "--weights", s(&w_p), "-o", s(&out)]);
    let entry = format!("plan layers[{i}] (conv_output \"{}\")", plan.layers[i].conv_output);
    assert!(err.contains(&entry) && err.contains("beyond max_shift"), "{err}");
    let mut huge = plan.clone();
    huge.max_shift = 9;
    fs::write(&far_p, huge.to_json()).unwrap();
    let err = fails(&["convert", s(&fx), "--plan", s(&far_p), "-o", s(&out)]);
    assert!(err.contains("max_shift 9"), "{err}");
    assert!(!out.exists());

    // The exported weights are never overwritten without --force, nor the input by accident.
    let plan2 = d("plan2.json");
    let err = fails(&["plan", s(&fx), "-o", s(&plan2), "--export-weights", s(&w_p)]);
    assert!(err.contains("--force"), "{err}");
    assert!(!plan2.exists(), "nothing is written when an output is refused");
    assert_eq!(fs::read(&w_p).unwrap(), bytes);
    let err = fails(&["plan", s(&fx), "-o", s(&plan2), "--export-weights", s(&fx), "--force"]);
    assert!(err.contains("input file"), "{err}");
    ok(&["plan", s(&fx), "-o", s(&plan2), "--export-weights", s(&w_p), "--force"]);
    assert_eq!(fs::read(&w_p).unwrap(), bytes, "same model, same plan: same file");
}
