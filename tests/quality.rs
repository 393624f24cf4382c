//! `convert` is never silently broken: without `--calib` it calibrates on the built-in image set
//! (compiled into the binary, so an installed binary copied away from the source tree works) and
//! always reports the quality it measured on held-out crops; `--kmeans` (the paper's
//! filter-distance selection) is measured too, and its damage shows. Needs `ORT_DYLIB_PATH`
//! (libonnxruntime.so.1.31.1); without it the tests fail, they never skip.

use std::path::{Path, PathBuf};
use std::process::Command;

use ghostsr::runner::session::ORT_DYLIB_ENV;

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/edsr_baseline_b4c32_x2.onnx")
}

/// Calibrates the fixture at λ = 0.5 on the built-in images once per option set, in process;
/// returns its analysis and each run's plan, refit weights and report.
fn calibrate_fixture(
    options: &[ghostsr::calib::CalibOptions],
) -> (
    ghostsr::graph::analysis::Analysis,
    Vec<(ghostsr::plan::Plan, ghostsr::weights::WeightSet, ghostsr::calib::CalibReport)>,
) {
    use ghostsr::calib::{calibrate_with_report, data::ImageSource};
    use ghostsr::graph::GraphIndex;
    use ghostsr::graph::analysis::{Policy, analyze};
    use ghostsr::plan::kmeans::PlanOptions;

    assert!(
        std::env::var_os(ORT_DYLIB_ENV).is_some(),
        "{ORT_DYLIB_ENV} is not set (libonnxruntime.so.1.31.1)"
    );
    let m = ghostsr::model::load(&fixture()).unwrap();
    let index = GraphIndex::new(m.graph()).unwrap();
    let analysis = analyze(&index, &Policy::default()).unwrap();
    let popts = PlanOptions { ratio: 0.5, ..Default::default() };
    let runs = options
        .iter()
        .map(|c| {
            calibrate_with_report(&m, &index, &analysis, &popts, c, ImageSource::Builtin, &|_, _, _| {})
                .unwrap()
        })
        .collect();
    (analysis, runs)
}

/// Runs `bin convert ...` in `cwd`, returns the parsed `--json` summary and stderr.
fn convert(bin: &Path, cwd: &Path, args: &[&str]) -> (serde_json::Value, String) {
    let out = Command::new(bin).current_dir(cwd).arg("convert").args(args).arg("--json").output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "convert {args:?} failed:\n{err}");
    (serde_json::from_slice(&out.stdout).expect("convert --json prints JSON"), err)
}

#[test]
fn convert_calibrates_on_the_builtin_set_from_an_installed_binary_and_reports_quality() {
    assert!(
        std::env::var_os(ORT_DYLIB_ENV).is_some(),
        "{ORT_DYLIB_ENV} is not set (libonnxruntime.so.1.31.1)"
    );
    // "Install" the binary: a copy in a folder of its own, run from another folder, with the
    // model copied too, so nothing under the source tree is reachable by a relative path.
    let dir = tempfile::tempdir().unwrap();
    let (bin_dir, work) = (dir.path().join("bin"), dir.path().join("work"));
    std::fs::create_dir_all(&bin_dir).unwrap();
    std::fs::create_dir_all(&work).unwrap();
    let bin = bin_dir.join("ghostsr");
    std::fs::copy(env!("CARGO_BIN_EXE_ghostsr"), &bin).unwrap();
    std::fs::copy(fixture(), work.join("m.onnx")).unwrap();

    let common = ["m.onnx", "--emit", "standard", "--ratio", "0.5"];
    let (cal, _) = convert(&bin, &work, &[&common[..], &["-o", "cal.onnx"]].concat());
    let q = &cal["quality"];
    assert!(q["images"].as_str().unwrap().contains("built-in"), "{cal}");
    assert_eq!(q["crops"], 16);
    let (drop, fid) = (q["drop_db"].as_f64().unwrap(), q["fidelity_db"].as_f64().unwrap());
    assert!(drop.is_finite());
    let psnr = |k: &str| q[k].as_f64().unwrap();
    assert!((psnr("original_psnr") - psnr("ghost_psnr") - drop).abs() < 1e-9);
    assert!(psnr("original_psnr").is_finite() && fid.is_finite(), "{q}");
    assert!(work.join("cal.onnx").is_file());

    // The paper's selection: measured the same way, and far worse.
    let (km, err) = convert(&bin, &work, &[&common[..], &["-o", "km.onnx", "--kmeans"]].concat());
    let (km_drop, km_fid) =
        (km["quality"]["drop_db"].as_f64().unwrap(), km["quality"]["fidelity_db"].as_f64().unwrap());
    assert!(km_fid < fid - 3.0, "k-means fidelity {km_fid} vs calibrated {fid}");
    // (The generated fixture's random weights make its PSNR against HR meaningless, so the drop
    // may have either sign; the fidelity above is what separates the two.)
    // A drop over the threshold is said loudly (on stderr, next to --json).
    assert_eq!(err.contains("WARNING"), km_drop > 1.5, "{err}");
}

#[test]
fn a_missing_onnx_runtime_is_a_clear_error_for_the_default_convert() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_ghostsr"))
        .env(ORT_DYLIB_ENV, dir.path().join("no-such-libonnxruntime.so"))
        .args(["convert", fixture().to_str().unwrap(), "-o"])
        .arg(dir.path().join("out.onnx"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains(ORT_DYLIB_ENV) && err.contains("no-such-libonnxruntime.so"), "{err}");
    assert!(!dir.path().join("out.onnx").exists());
}

/// The per-layer guard undoes a ghosted layer whose own damage to the output, on validation
/// crops, is over the limit: at 1 dB every layer passes (and its damage is measured); at 300 dB
/// (no layer can be that harmless) every layer that changes the output is undone, the plan
/// keeps none of them and the weights stay the original's.
#[test]
fn the_layer_guard_keeps_harmless_layers_and_undoes_harmful_ones() {
    use ghostsr::calib::CalibOptions;
    let opts =
        |guard_db: f64| CalibOptions { count: 4, size: 32, samples: 4096, guard_db, ..Default::default() };
    let (analysis, mut runs) = calibrate_fixture(&[opts(1.0), opts(300.0)]);
    let (strict, weights, report) = runs.pop().unwrap();
    let (lax, _, lax_report) = runs.pop().unwrap();
    assert!(!lax.layers.is_empty());
    let ghost_steps = |r: &ghostsr::calib::CalibReport| -> Vec<ghostsr::calib::LayerDecision> {
        r.layers.iter().filter(|l| l.step == ghostsr::calib::Step::Ghost).cloned().collect()
    };
    assert_eq!(ghost_steps(&lax_report).len(), lax.layers.len());
    assert!(ghost_steps(&lax_report).iter().all(|l| l.kept));
    assert!(lax_report.layers.iter().any(|l| l.damage_fidelity_db.is_some()), "no damage was measured");

    let steps = ghost_steps(&report);
    let harmful: Vec<_> = steps.iter().filter(|l| l.damage_fidelity_db.is_some()).collect();
    assert!(!harmful.is_empty());
    assert!(harmful.iter().all(|l| !l.kept), "{report:?}");
    let kept: Vec<_> = steps.iter().filter(|l| l.kept).map(|l| &l.conv_output).collect();
    let planned: Vec<_> = strict.layers.iter().map(|l| &l.conv_output).collect();
    assert_eq!(kept.len(), planned.len());
    assert!(kept.iter().all(|k| planned.contains(k)));
    // Undone layers leave no refit weights behind (only Convs that stay, refit after a kept
    // ghosted layer, may carry some).
    for l in steps.iter().filter(|l| !l.kept) {
        let conv = analysis.conv_by_output(&l.conv_output).unwrap();
        assert!(
            !weights.tensors.contains_key(&conv.weight)
                || kept
                    .iter()
                    .any(|k| { analysis.conv_by_output(k).is_some_and(|c| c.weight == conv.weight) })
        );
    }
}

/// With `view_choice`, every ghosted Conv is fit on all views and on the first view of each
/// crop, and the report says which fit the guard kept; without it, nothing is reported.
#[test]
fn view_choice_reports_the_fit_the_guard_kept_for_every_ghosted_conv() {
    use ghostsr::calib::{CalibOptions, Step};
    let opts = |view_choice: bool| CalibOptions {
        count: 4,
        size: 32,
        samples: 2048,
        guard_db: 1.0,
        view_choice,
        ..Default::default()
    };
    let (analysis, mut runs) = calibrate_fixture(&[opts(true), opts(false)]);
    let (_, _, plain) = runs.pop().unwrap();
    let (plan, _, report) = runs.pop().unwrap();
    plan.validate(&analysis).unwrap();
    let ghosts: Vec<_> = report.layers.iter().filter(|l| l.step == Step::Ghost).collect();
    assert!(!ghosts.is_empty());
    assert!(ghosts.iter().all(|l| l.first_view_only.is_some()), "{report:?}");
    assert!(report.layers.iter().filter(|l| l.step == Step::Refit).all(|l| l.first_view_only.is_none()));
    assert!(plain.layers.iter().all(|l| l.first_view_only.is_none()));
}

/// A refit that overfits is rejected: with one 12x12 crop (144 pixels, fewer equations than a
/// 3x3 Conv's 289 unknowns per filter) and little ridge, refitting the Convs that stay fits
/// the crop and not the validation crop; the guard undoes each such refit, and an undone refit
/// leaves the Conv's original weights.
#[test]
fn an_overfitting_refit_is_rejected_on_the_validation_crops() {
    use ghostsr::calib::{CalibOptions, Step};
    // One crop, one view, almost no ridge: refits that fit the crop and not the validation crops.
    let c = CalibOptions { count: 1, size: 12, ridge: 1e-4, guard_db: 1.0, augment: 1, ..Default::default() };
    let (analysis, mut runs) = calibrate_fixture(&[c]);
    let (_, weights, report) = runs.pop().unwrap();
    let refits: Vec<_> = report.layers.iter().filter(|l| l.step == Step::Refit).collect();
    assert!(refits.iter().any(|l| !l.kept), "no refit was rejected: {report:?}");
    for l in refits.iter().filter(|l| !l.kept) {
        let conv = analysis.conv_by_output(&l.conv_output).unwrap();
        assert!(!weights.tensors.contains_key(&conv.weight), "rejected refit of {} left weights", l.node);
    }
}
