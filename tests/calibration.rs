//! Calibration end to end on the shipped fixture (`fixtures/edsr_baseline_b4c32_x2.onnx`):
//! calibrated on BSD68 crops (`../shared/images/BSD68`), the ghost model's output must be far
//! closer to the original's than the k-means plan's, on held-out crops (Set14), and every plan
//! must validate; each stage switch must still give a valid plan. Needs `ORT_DYLIB_PATH`
//! (libonnxruntime.so.1.31.1); without it the test fails, it never skips.

use std::path::PathBuf;

use ghostsr::calib::{self, CalibOptions, capture};
use ghostsr::emit::{EmitMode, emit};
use ghostsr::graph::GraphIndex;
use ghostsr::graph::analysis::{Policy, analyze};
use ghostsr::model;
use ghostsr::onnx::ModelProto;
use ghostsr::plan::kmeans::{PlanOptions, plan_model};
use ghostsr::runner::session::ORT_DYLIB_ENV;
use ghostsr::runner::sr::{Channels, Chw};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Final outputs of `proto` on `crops`, concatenated.
fn outputs(proto: &ModelProto, crops: &[Chw]) -> Vec<f32> {
    let input = capture::input_name(proto).unwrap();
    let out = proto.graph.as_ref().unwrap().output[0].name.clone().unwrap();
    let mut s = capture::open(proto, 2).unwrap();
    capture::run(&mut s, &input, crops, &[out]).unwrap().remove(0).data
}

fn mse(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum::<f64>() / a.len() as f64
}

#[test]
fn calibrated_ghosts_track_the_original_far_better_than_kmeans() {
    assert!(
        std::env::var_os(ORT_DYLIB_ENV).is_some(),
        "{ORT_DYLIB_ENV} is not set: set it to libonnxruntime.so.1.31.1, e.g. from \
         `pip install onnxruntime==1.31.1` (site-packages/onnxruntime/capi/)"
    );
    let shared = root().join("../shared");
    let bsd68 = shared.join("images/BSD68");
    let set14 = shared.join("images/Set14");
    assert!(bsd68.is_dir() && set14.is_dir(), "missing images under {}", shared.display());
    let m = model::load(&root().join("fixtures/edsr_baseline_b4c32_x2.onnx")).unwrap();
    let index = GraphIndex::new(m.graph()).unwrap();
    let analysis = analyze(&index, &Policy::default()).unwrap();
    let popts = PlanOptions { ratio: 0.5, ..Default::default() };

    let held_out = calib::data::crops(
        &set14,
        &CalibOptions { count: 4, size: 40, ..Default::default() }.crop_spec(Channels::Rgb, 2, false),
    )
    .unwrap();
    let reference = outputs(&m.proto, &held_out);

    let kmeans = plan_model(&index, &analysis, &m.sha256, &popts, &|_, _, _| {}).unwrap();
    let (km_model, _) = emit(&m.proto, &analysis, &kmeans, EmitMode::Standard).unwrap();
    let err_kmeans = mse(&outputs(&km_model, &held_out), &reference);

    let run = |opts: &CalibOptions| {
        // The per-layer guard undoes layers of this random-weight fixture; its own test is in
        // tests/quality.rs. Here every stage switch must give a full plan.
        let opts = &CalibOptions { guard_db: 0.0, ..opts.clone() };
        let (plan, weights) =
            calib::calibrate(&m, &index, &analysis, &popts, opts, &bsd68, &|_, _, _| {}).unwrap();
        plan.validate(&analysis).unwrap();
        assert_eq!(plan.layers.len(), kmeans.layers.len());
        for name in weights.tensors.keys() {
            assert!(index.initializer(name).is_some(), "refit weight '{name}' is no initializer");
        }
        let proto = calib::apply_weights(&m.proto, &weights).unwrap();
        let (ghost, _) = emit(&proto, &analysis, &plan, EmitMode::Standard).unwrap();
        (mse(&outputs(&ghost, &held_out), &reference), plan, weights)
    };
    let base = CalibOptions { count: 8, size: 40, threads: 2, ..Default::default() };
    let (err_full, plan, weights) = run(&base);
    assert!(!weights.tensors.is_empty(), "the refit produced no weights");
    assert!(plan.layers.iter().any(|l| l.ghosts.iter().any(|g| g.scale.is_some())), "no affine terms");
    eprintln!("output MSE vs original: k-means {err_kmeans:.3e}, calibrated {err_full:.3e}");
    assert!(
        err_full < 0.2 * err_kmeans,
        "calibrated MSE {err_full:.3e} is not much smaller than k-means's {err_kmeans:.3e}"
    );

    // Every stage off: still a valid plan (no refit weights, no affine terms) and no worse
    // than k-means on the filters.
    let bare = CalibOptions {
        affine: false,
        layer_by_layer: false,
        data_intrinsic: false,
        refit: false,
        ..base.clone()
    };
    let (err_bare, plan, weights) = run(&bare);
    assert!(weights.tensors.is_empty());
    assert!(plan.layers.iter().all(|l| l.ghosts.iter().all(|g| g.scale.is_none() && g.bias.is_none())));
    // Same intrinsic sets as k-means without the data-chosen set.
    for (a, b) in plan.layers.iter().zip(&kmeans.layers) {
        assert_eq!(a.intrinsic, b.intrinsic, "{}", a.conv_output);
    }
    eprintln!("every stage off: {err_bare:.3e}");
    assert!(err_bare <= err_kmeans * 1.05, "source+shift by data {err_bare:.3e} vs k-means {err_kmeans:.3e}");
    assert!(err_full < err_bare, "all stages {err_full:.3e} vs none {err_bare:.3e}");
}

/// `plan --calib --export-weights` then `convert --plan --weights` rebuilds exactly the model
/// that `convert --calib` writes: the plan plus the weights file carry everything calibration
/// decided, refit weights included.
#[test]
fn calibrated_plan_and_weights_reproduce_convert_calib() {
    assert!(
        std::env::var_os(ORT_DYLIB_ENV).is_some(),
        "{ORT_DYLIB_ENV} is not set (libonnxruntime.so.1.31.1)"
    );
    let bin = env!("CARGO_BIN_EXE_ghostsr");
    let fixture = root().join("fixtures/edsr_baseline_b4c32_x2.onnx");
    let calib_dir = root().join("../shared/images/BSD68");
    let dir = tempfile::tempdir().unwrap();
    let p = |name: &str| dir.path().join(name);
    let run = |args: &[&std::ffi::OsStr]| {
        let out = std::process::Command::new(bin).args(args).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    };
    let os = |s: &'static str| std::ffi::OsStr::new(s);
    let direct = p("direct.onnx");
    run(&[
        os("convert"),
        fixture.as_os_str(),
        os("-o"),
        direct.as_os_str(),
        os("--calib"),
        calib_dir.as_os_str(),
    ]);
    let (plan, weights, rebuilt) = (p("plan.json"), p("w.safetensors"), p("rebuilt.onnx"));
    run(&[
        os("plan"),
        fixture.as_os_str(),
        os("-o"),
        plan.as_os_str(),
        os("--calib"),
        calib_dir.as_os_str(),
        os("--export-weights"),
        weights.as_os_str(),
    ]);
    run(&[
        os("convert"),
        fixture.as_os_str(),
        os("--plan"),
        plan.as_os_str(),
        os("--weights"),
        weights.as_os_str(),
        os("-o"),
        rebuilt.as_os_str(),
    ]);
    assert!(std::fs::read(&direct).unwrap() == std::fs::read(&rebuilt).unwrap(), "the two models differ");
    let m = model::load(&rebuilt).unwrap();
    assert!(m.graph().node.iter().any(|n| n.op_type() == "GhostShift"));
}

/// `ghostsr sweep` measures both methods at each ratio and writes the plot; calibrated ghosts
/// stay closer to the original's score than the paper's selection.
#[test]
fn sweep_reports_both_methods_and_plots_them() {
    assert!(
        std::env::var_os(ORT_DYLIB_ENV).is_some(),
        "{ORT_DYLIB_ENV} is not set (libonnxruntime.so.1.31.1)"
    );
    let dir = tempfile::tempdir().unwrap();
    let plot = dir.path().join("sweep.svg");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ghostsr"))
        .arg("sweep")
        .arg(root().join("fixtures/edsr_baseline_b4c32_x2.onnx"))
        .arg("--images")
        .arg(root().join("../shared/images/Set5"))
        .args([
            "--scale",
            "2",
            "--limit",
            "2",
            "--ratios",
            "0.25,0.5",
            "--calib-count",
            "4",
            "--json",
            "--plot",
        ])
        .arg(&plot)
        .arg("--calib")
        .arg(root().join("../shared/images/BSD68"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let points = report["points"].as_array().unwrap();
    assert_eq!(points.len(), 4);
    let psnr = |method: &str, ratio: f64| {
        points
            .iter()
            .find(|p| p["method"] == method && p["ratio"].as_f64() == Some(ratio))
            .and_then(|p| p["psnr_y"].as_f64())
            .unwrap()
    };
    let original_macs = report["original_macs_per_pixel"].as_f64().unwrap();
    for p in points {
        assert!(p["macs_per_pixel"].as_f64().unwrap() < original_macs);
    }
    // The fixture's weights are random, so its PSNR against HR images means little; what
    // calibration must do is track the original network: stay closer to its score.
    let original = report["original_psnr_y"].as_f64().unwrap();
    for ratio in [0.25, 0.5] {
        let (cal, paper) =
            ((psnr("calibrated", ratio) - original).abs(), (psnr("paper", ratio) - original).abs());
        assert!(
            cal < paper,
            "λ={ratio}: calibrated is {cal} dB from the original, paper {paper} dB: {report}"
        );
    }
    let svg = std::fs::read_to_string(&plot).unwrap();
    assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
    assert_eq!(svg.matches("<polyline").count(), 2);
}

/// Pooled MSE on Y (8-bit outputs, `shave` pixels shaved) of `proto` against the HR crops: an
/// independent re-measurement of what the budget reports.
fn mse_vs_hr(proto: &ModelProto, samples: &[calib::data::Sample], shave: usize) -> f64 {
    use ghostsr::runner::metrics::Plane;
    let crops: Vec<Chw> = samples.iter().map(|s| s.lr.clone()).collect();
    let out = outputs(proto, &crops);
    let per = out.len() / crops.len();
    let (mut se, mut n) = (0.0, 0usize);
    for (k, s) in samples.iter().enumerate() {
        let (h, w) = (s.hr.height, s.hr.width);
        let sr = Chw { channels: 3, height: h, width: w, data: out[k * per..(k + 1) * per].to_vec() };
        let a = Plane::y_shaved(&sr.to_rgb().unwrap(), shave).unwrap();
        let b = Plane::y_shaved(&s.hr, shave).unwrap();
        se += a.data.iter().zip(&b.data).map(|(x, y)| (x - y) * (x - y)).sum::<f64>();
        n += a.data.len();
    }
    se / n as f64
}

#[test]
fn quality_budget_meets_macs_targets_and_psnr_budgets_as_remeasured() {
    use calib::budget::{Budget, calibrate_to_budget};
    assert!(std::env::var_os(ORT_DYLIB_ENV).is_some(), "{ORT_DYLIB_ENV} is not set");
    let bsd68 = root().join("../shared/images/BSD68");
    let m = model::load(&root().join("fixtures/edsr_baseline_b4c32_x2.onnx")).unwrap();
    let index = GraphIndex::new(m.graph()).unwrap();
    let analysis = analyze(&index, &Policy::default()).unwrap();
    let popts = PlanOptions::default();
    let copts = CalibOptions { count: 6, size: 32, threads: 2, samples: 8192, ..Default::default() };
    let samples = calib::data::samples(&bsd68, &copts.crop_spec(Channels::Rgb, 2, false)).unwrap();
    let macs = |p: &ModelProto| {
        let i = GraphIndex::new(p.graph.as_ref().unwrap()).unwrap();
        let a = analyze(&i, &Policy::default()).unwrap();
        ghostsr::report::inspect("", p, &i, &a).macs_per_pixel
    };
    let orig_macs = macs(&m.proto);
    let orig_mse = mse_vs_hr(&m.proto, &samples, 2);

    for budget in [Budget::TargetMacs(0.7), Budget::MaxPsnrDrop(0.01)] {
        let (plan, weights, report) =
            calibrate_to_budget(&m, &index, &analysis, &popts, &copts, &bsd68, budget, &|_, _, _| {})
                .unwrap();
        plan.validate(&analysis).unwrap();
        assert!(report.met, "{budget}: {report:?}");
        let proto = calib::apply_weights(&m.proto, &weights).unwrap();
        let (ghost, _) = emit(&proto, &analysis, &plan, EmitMode::Standard).unwrap();
        // The reported MACs fraction is the emitted model's (plugin form: the standard form's
        // one-hot depthwise Convs count a few multiply-adds of their own).
        let (plugin, _) = emit(&proto, &analysis, &plan, EmitMode::Plugin).unwrap();
        let fraction = macs(&plugin) / orig_macs;
        assert!((fraction - report.macs_fraction).abs() < 0.01, "{fraction} vs {}", report.macs_fraction);
        assert!(fraction < 0.999, "{budget}: nothing was ghosted");
        // Each layer's λ is the one the plan applies.
        for choice in &report.layers {
            let conv = analysis.conv_by_output(&choice.conv_outputs[0]).unwrap();
            let ghosts =
                plan.layers.iter().find(|l| l.conv_output == conv.output).map_or(0, |l| l.ghosts.len());
            let keep = PlanOptions { ratio: choice.ratio, ..Default::default() }.keep_per_group(conv);
            assert_eq!(ghosts, conv.c_out - keep * conv.group, "{}", conv.output);
        }
        // The reported PSNRs are what the models give on the calibration crops.
        let psnr = |mse: f64| 10.0 * (255.0f64 * 255.0 / mse).log10();
        let drop = psnr(orig_mse) - psnr(mse_vs_hr(&ghost, &samples, 2));
        assert!((drop - report.drop_db).abs() < 1e-3, "{budget}: drop {drop} vs reported {}", report.drop_db);
        match budget {
            Budget::TargetMacs(f) => assert!(fraction <= f + 1e-9, "MACs {fraction} > {f}"),
            Budget::MaxPsnrDrop(d) => assert!(drop <= d, "drop {drop} > {d}"),
        }
    }
}
