//! The quality report `convert` always prints: the ghost model against the original on
//! calibration crops the fits did not see (other windows of the same images, drawn from
//! [`data::HELD_OUT_SEED`]), as the evaluation protocol measures (output rounded to 8 bits, Y,
//! `scale` pixels shaved): the PSNR-Y drop against the HR crops, and the *fidelity*, the PSNR-Y
//! of the ghost's output against the original's (the part of the drop ghosting alone causes,
//! whatever the original's own error). A drop over [`WARN_DROP_DB`] is a model the user should
//! not ship as it is; `convert` says so.

use anyhow::{Context, Result, ensure};
use serde::Serialize;

use super::budget::{mse, y_planes};
use super::data::{self, ImageSource};
use super::{CalibOptions, capture, data_channels, output_planes, probe_factor};
use crate::graph::analysis::Analysis;
use crate::model::Model;
use crate::plan::Plan;
use crate::weights::WeightSet;

/// A drop (dB) above which `convert` warns that the model is not fit to ship as it is.
pub const WARN_DROP_DB: f64 = 1.5;

/// What [`measure`] found.
#[derive(Clone, Debug, Serialize)]
pub struct Quality {
    /// Where the crops came from.
    pub images: String,
    /// Held-out crops measured, and their side in model-input pixels.
    pub crops: usize,
    pub crop_size: usize,
    /// PSNR-Y (dB) against the HR crops: the original model and the ghost model.
    pub original_psnr: f64,
    pub ghost_psnr: f64,
    /// `original_psnr - ghost_psnr`.
    pub drop_db: f64,
    /// PSNR-Y (dB) of the ghost model's output against the original model's (infinite, JSON
    /// null, when they are identical).
    pub fidelity_db: f64,
}

impl Quality {
    /// Whether the drop is over [`WARN_DROP_DB`].
    pub fn is_bad(&self) -> bool {
        self.drop_db > WARN_DROP_DB
    }
}

fn psnr(mse: f64) -> f64 {
    10.0 * (255.0f64 * 255.0 / mse).log10()
}

/// Measures `plan` (with calibration's refit `weights`, if any, applied to the original's
/// initializers) against the original model on held-out crops of `images` (`calib.count` crops
/// of `calib.size` pixels). Needs ONNX Runtime.
pub fn measure(
    model: &Model,
    analysis: &Analysis,
    plan: &Plan,
    weights: Option<&WeightSet>,
    calib: &CalibOptions,
    images: &ImageSource,
) -> Result<Quality> {
    let proto = &model.proto;
    let input = capture::input_name(proto)?;
    let (channels, c_in) = data_channels(proto, &input)?;
    let output = model.graph().output.first().and_then(|o| o.name.clone()).context("no graph output")?;
    let want = [output.clone()];
    let mut session = capture::open(&capture::prune_to(proto, &want)?, calib.threads)?;
    let factor = probe_factor(&mut session, &input, c_in, &output)?;
    let scale = if factor == 1 { calib.scale.unwrap_or(2) } else { factor };
    let spec = calib.crop_spec(channels, scale, factor == 1);
    let samples = data::samples_seeded(images, &spec, data::HELD_OUT_SEED)?;
    let crops: Vec<_> = samples.iter().map(|s| s.lr.clone()).collect();
    let hr = samples
        .iter()
        .map(|s| crate::runner::metrics::Plane::y_shaved(&s.hr, scale))
        .collect::<Result<Vec<_>>>()?;
    let orig = y_planes(&capture::run(&mut session, &input, &crops, &want)?[0], scale)?;
    drop(session);

    let no_weights = WeightSet::default();
    let weights = weights.unwrap_or(&no_weights);
    let ghost = output_planes(proto, analysis, plan, weights, &input, &output, &crops, calib.threads, scale)
        .context("running the ghost model to measure it")?;

    let mse_orig = mse(&orig, &hr)?;
    ensure!(mse_orig > 0.0, "the original model reproduces the held-out crops exactly");
    let (original_psnr, ghost_psnr) = (psnr(mse_orig), psnr(mse(&ghost, &hr)?));
    Ok(Quality {
        images: images.describe(),
        crops: crops.len(),
        crop_size: calib.size,
        original_psnr,
        ghost_psnr,
        drop_db: original_psnr - ghost_psnr,
        fidelity_db: psnr(mse(&ghost, &orig)?),
    })
}

/// The summary lines, and the warning when the drop is over [`WARN_DROP_DB`].
pub fn render(q: &Quality) -> String {
    let mut s = format!(
        "  quality:        PSNR-Y {:.2} -> {:.2} dB (drop {:.2} dB), fidelity {:.2} dB, on {} held-out {}px crops of {}\n",
        q.original_psnr, q.ghost_psnr, q.drop_db, q.fidelity_db, q.crops, q.crop_size, q.images
    );
    if q.is_bad() {
        s.push_str(&warning(q));
    }
    s
}

/// The loud warning for a drop over [`WARN_DROP_DB`].
pub fn warning(q: &Quality) -> String {
    format!(
        "ghostsr: WARNING: this ghost model loses {:.2} dB PSNR-Y on held-out calibration crops \
         (more than {WARN_DROP_DB} dB): it is not fit to ship as it is. Use --max-psnr-drop D to \
         choose λ per layer within a budget, or a lower --ratio{}.\n",
        q.drop_db,
        if q.images.starts_with("the built-in") { ", or --calib DIR with images like yours" } else { "" }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_drop_over_the_threshold_warns_and_names_the_remedies() {
        let q = |drop_db: f64| Quality {
            images: "x".into(),
            crops: 1,
            crop_size: 8,
            original_psnr: 30.0,
            ghost_psnr: 30.0 - drop_db,
            drop_db,
            fidelity_db: 40.0,
        };
        assert!(!render(&q(1.0)).contains("WARNING"));
        let bad = render(&q(2.0));
        assert!(
            bad.contains("WARNING") && bad.contains("--max-psnr-drop") && bad.contains("--ratio"),
            "{bad}"
        );
    }
}
