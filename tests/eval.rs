//! End-to-end evaluation of real pretrained models (from `../shared/models`, relative to the
//! repository root) on Set5 x2 by the reference protocol; the expected PSNRs are the table in
//! `../shared/models/README.md`, which `../shared/reference/sr_eval.py` reproduces. Needs
//! `ORT_DYLIB_PATH` (libonnxruntime.so.1.31.1); without it the tests fail, they never skip.

use std::path::PathBuf;

use ghostsr::runner::eval::evaluate;
use ghostsr::runner::session::{ORT_DYLIB_ENV, SessionConfig};
use ghostsr::runner::sr::Tiling;

fn shared() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared")
}

fn check(model: &str, want_psnr: f64) {
    assert!(
        std::env::var_os(ORT_DYLIB_ENV).is_some(),
        "{ORT_DYLIB_ENV} is not set: set it to libonnxruntime.so.1.31.1, e.g. from \
         `pip install onnxruntime==1.31.1` (site-packages/onnxruntime/capi/)"
    );
    let model_path = shared().join("models").join(model);
    let images = shared().join("images/Set5");
    assert!(model_path.is_file(), "missing test model {}", model_path.display());
    assert!(images.is_dir(), "missing test images {}", images.display());
    let cfg = SessionConfig { threads: 2, ..Default::default() };
    let r = evaluate(&model_path, &images, 2, &cfg, Tiling::NONE, 0, |_| {})
        .unwrap_or_else(|e| panic!("evaluating {model}: {e:#}"));
    assert_eq!(r.images, 5);
    assert_eq!(r.per_image.len(), 5);
    // Bicubic x2 on Set5: 33.67 dB in the README table.
    assert!((r.psnr_y_bicubic - 33.67).abs() <= 0.02, "bicubic PSNR {}", r.psnr_y_bicubic);
    assert!(
        (r.psnr_y - want_psnr).abs() <= 0.02,
        "{model}: PSNR-Y {:.3} dB, README says {want_psnr}",
        r.psnr_y
    );
    assert!(r.ssim_y > 0.9 && r.ssim_y < 1.0, "SSIM {}", r.ssim_y);
}

#[test]
fn carn_m_x2_set5() {
    check("carn_m_x2.onnx", 37.68);
}

#[test]
fn imdn_x2_set5() {
    check("imdn_x2.onnx", 38.00);
}

#[test]
fn fsrcnn_y_x2_set5() {
    check("fsrcnn_y_x2.onnx", 37.12);
}

#[test]
fn vdsr_y_x2_set5() {
    check("vdsr_y.onnx", 37.54);
}
