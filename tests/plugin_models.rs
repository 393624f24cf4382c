//! From Rust `ort`: the `--emit plugin` form of every model in ../shared/models, run with the
//! GhostShift plugin, equals its `--emit standard` form (same plan) within 1e-5 of the output
//! range, on a real image crop, and the `--emit fused` form equals the `--emit conv` form (the
//! pairs share a channel layout, so consumers sum in the same order). The conversion runs in
//! process through the library API.
//!
//! Needs `ORT_DYLIB_PATH` (libonnxruntime.so.1.31.1) and the plugin built by
//! `cargo build --release` / `cargo test` (target/<profile>/libghostsr.so); fails, never skips.

use std::fs;
use std::path::{Path, PathBuf};

use ghostsr::emit::{self, EmitMode};
use ghostsr::graph::GraphIndex;
use ghostsr::graph::analysis::{self, Policy};
use ghostsr::model;
use ghostsr::plan::kmeans::{self, PlanOptions};
use ghostsr::runner::image_io::load_rgb;
use ghostsr::runner::session::{SessionConfig, find_plugin};
use ghostsr::runner::sr::{Chw, SrModel};

fn shared() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared")
}

/// FSRCNN has no eligible Conv by default; these cover its PRelu and ConvTranspose.
fn policy(name: &str) -> Policy {
    let mut p = Policy::default();
    if name.starts_with("fsrcnn") {
        p.include = vec!["/first_part/first_part.0/Conv".into(), "/mid_part/mid_part.10/Conv".into()];
    }
    p
}

/// A 40x48 crop of a Set5 image in the model's input format (RGB, or Y for 1-channel models).
fn crop(channels: usize) -> Chw {
    let img = load_rgb(&shared().join("images/Set5/butterfly.png")).expect("Set5 image");
    let rgb = Chw::from_rgb(&img).crop(60, 100, 80, 128);
    if channels == 3 {
        return rgb;
    }
    let px = rgb.height * rgb.width;
    let y: Vec<f64> = (0..px)
        .map(|i| {
            let (r, g, b) = (rgb.data[i] as f64, rgb.data[px + i] as f64, rgb.data[2 * px + i] as f64);
            16.0 + 65.481 * r + 128.553 * g + 24.966 * b
        })
        .collect();
    Chw::from_y(rgb.height, rgb.width, &y)
}

#[test]
fn plugin_form_equals_standard_form_for_every_shared_model() {
    assert!(
        std::env::var_os("ORT_DYLIB_PATH").is_some(),
        "set ORT_DYLIB_PATH to libonnxruntime.so.1.31.1 (pip install onnxruntime==1.31.1)"
    );
    let plugin = find_plugin(std::env::var_os("GHOSTSR_PLUGIN").map(PathBuf::from).as_deref())
        .expect("the GhostShift plugin (cargo build --release)");
    let dir = tempfile::tempdir().unwrap();
    let mut models: Vec<PathBuf> = fs::read_dir(shared().join("models"))
        .expect("../shared/models beside the repository")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "onnx"))
        .collect();
    models.sort();
    assert!(!models.is_empty());
    for path in models {
        let name = path.file_stem().unwrap().to_string_lossy().into_owned();
        let m = model::load(&path).unwrap();
        let index = GraphIndex::new(m.graph()).unwrap();
        let analysis = analysis::analyze(&index, &policy(&name)).unwrap();
        let plan =
            kmeans::plan_model(&index, &analysis, &m.sha256, &PlanOptions::default(), &|_, _, _| {}).unwrap();
        let mut outputs = Vec::new();
        // Pairs with the same channel layout: Concat forms, then original-order forms.
        for mode in [EmitMode::Plugin, EmitMode::Standard, EmitMode::Fused, EmitMode::Conv] {
            let (out, _) = emit::emit(&m.proto, &analysis, &plan, mode).unwrap();
            let file = dir.path().join(format!("{name}.{mode:?}.onnx"));
            fs::write(&file, model::encode(&out)).unwrap();
            let cfg = SessionConfig { threads: 2, plugin: Some(plugin.clone()), ..Default::default() };
            let mut sr = SrModel::open(&file, &cfg).unwrap_or_else(|e| panic!("{name} {mode:?}: {e:#}"));
            let channels = if sr.kind().channels == ghostsr::runner::sr::Channels::Rgb { 3 } else { 1 };
            let input = crop(channels);
            outputs.push(sr.infer(&input).unwrap_or_else(|e| panic!("{name} {mode:?}: {e:#}")));
        }
        for (pair, what) in outputs.chunks(2).zip(["plugin vs standard", "fused vs conv"]) {
            let (p, s) = (&pair[0], &pair[1]);
            assert_eq!((p.channels, p.height, p.width), (s.channels, s.height, s.width), "{name}");
            let (lo, hi) = s.data.iter().fold((f32::MAX, f32::MIN), |(l, h), &v| (l.min(v), h.max(v)));
            let tol = 1e-5 * (hi - lo).max(1e-12);
            let worst = p.data.iter().zip(&s.data).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
            assert!(worst <= tol, "{name}: {what} max|diff| {worst} > {tol}");
        }
    }
}
