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
