//! The ghost plan: the one description of a rewrite (format: `../shared/design/plan-format.md`).
//!
//! Owns the serialisable types, reading and writing them (sorted, deterministic JSON), and
//! validating a plan against a model with messages that name the offending entry. Planning
//! itself (k-means on the filters, shift by filter distance) lives in [`kmeans`]. Every
//! consumer — the emitters, reports, trainers — reads this type and nothing else.

pub mod kmeans;

use std::collections::HashSet;
use std::path::Path;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use crate::graph::analysis::{Analysis, Verdict};

pub const FORMAT: &str = "ghostsr-plan";
pub const VERSION: u32 = 1;
/// Largest `max_shift` a plan may declare (a 17x17 shift window is far past any real use).
pub const MAX_SHIFT_LIMIT: i64 = 8;

/// A whole-model plan.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Plan {
    pub format: String,
    pub version: u32,
    #[serde(default)]
    pub model_sha256: String,
    pub max_shift: i64,
    pub layers: Vec<LayerPlan>,
}

/// One ghosted Conv.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct LayerPlan {
    /// The Conv's output tensor in the ORIGINAL model (identifies the layer).
    pub conv_output: String,
    /// The Conv's node name (informative).
    #[serde(default)]
    pub node: String,
    pub out_channels: usize,
    /// Original output channels whose filters are kept, ascending.
    pub intrinsic: Vec<usize>,
    /// Every other channel, each made from an intrinsic one.
    pub ghosts: Vec<Ghost>,
}

/// One ghost channel: `scale * shift(source, dy, dx) + bias`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Ghost {
    pub channel: usize,
    pub source: usize,
    /// `[dy, dx]`: content moves by +dy rows and +dx columns, zero fill.
    pub shift: [i64; 2],
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bias: Option<f32>,
}

impl Ghost {
    pub fn scale(&self) -> f32 {
        self.scale.unwrap_or(1.0)
    }
    pub fn bias(&self) -> f32 {
        self.bias.unwrap_or(0.0)
    }
}

impl LayerPlan {
    /// Ghosts ordered by channel: the order the emitters lay them out after the intrinsic ones.
    pub fn ghosts_by_channel(&self) -> Vec<&Ghost> {
        let mut g: Vec<&Ghost> = self.ghosts.iter().collect();
        g.sort_by_key(|g| g.channel);
        g
    }

    /// The emitted channel order: position j of the rewritten output holds original channel
    /// `order[j]` (intrinsic channels first, then ghosts by channel).
    pub fn emitted_order(&self) -> Vec<usize> {
        self.intrinsic.iter().copied().chain(self.ghosts_by_channel().iter().map(|g| g.channel)).collect()
    }
}

impl Plan {
    pub fn new(model_sha256: &str, max_shift: i64, layers: Vec<LayerPlan>) -> Self {
        Self { format: FORMAT.into(), version: VERSION, model_sha256: model_sha256.into(), max_shift, layers }
    }

    pub fn to_json(&self) -> String {
        let mut s = serde_json::to_string_pretty(self).expect("plan serialises");
        s.push('\n');
        s
    }

    pub fn from_json(text: &str) -> Result<Self> {
        // Check the envelope first so an unrelated JSON file gets a message about what it is.
        let raw: serde_json::Value = serde_json::from_str(text).context("the plan is not valid JSON")?;
        match raw.get("format").and_then(|f| f.as_str()) {
            Some(FORMAT) => {}
            Some(other) => bail!("unknown plan format '{other}' (expected '{FORMAT}')"),
            None => bail!("no \"format\" key: this is not a ghostsr plan"),
        }
        match raw.get("version").and_then(|v| v.as_u64()) {
            Some(v) if v <= VERSION as u64 && v >= 1 => {}
            Some(v) => bail!("plan version {v} is newer than this ghostsr understands (up to {VERSION})"),
            None => bail!("no integer \"version\" key in the plan"),
        }
        if let Some(layers) = raw.get("layers").and_then(|l| l.as_array()) {
            for (i, layer) in layers.iter().enumerate() {
                serde_json::from_value::<LayerPlan>(layer.clone()).with_context(|| {
                    let name = layer.get("conv_output").and_then(|v| v.as_str()).unwrap_or("?");
                    format!("plan layers[{i}] (conv_output \"{name}\") is malformed")
                })?;
            }
        }
        serde_json::from_value(raw).context("the plan does not follow the ghostsr-plan format")
    }

    pub fn read(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("cannot read plan {}", path.display()))?;
        Self::from_json(&text).with_context(|| format!("invalid plan {}", path.display()))
    }

    /// Layers that actually change the model (at least one ghost).
    pub fn active_layers(&self) -> impl Iterator<Item = &LayerPlan> {
        self.layers.iter().filter(|l| !l.ghosts.is_empty())
    }

    /// Checks the plan against a model's analysis; the error names the offending entry.
    pub fn validate(&self, analysis: &Analysis) -> Result<()> {
        if self.format != FORMAT {
            bail!("unknown plan format '{}' (expected '{FORMAT}')", self.format);
        }
        if self.version > VERSION || self.version == 0 {
            bail!("plan version {} is not supported (this ghostsr reads version {VERSION})", self.version);
        }
        if !(0..=MAX_SHIFT_LIMIT).contains(&self.max_shift) {
            bail!("max_shift {} is outside 0..={MAX_SHIFT_LIMIT}", self.max_shift);
        }
        let mut seen = HashSet::new();
        for (i, layer) in self.layers.iter().enumerate() {
            let at = || format!("plan layers[{i}] (conv_output \"{}\")", layer.conv_output);
            if !seen.insert(layer.conv_output.as_str()) {
                bail!("{}: the layer is listed twice", at());
            }
            let Some(conv) = analysis.conv_by_output(&layer.conv_output) else {
                bail!("{}: unknown tensor: no Conv in the model writes it", at());
            };
            if let Verdict::Unsupported(why) = &conv.verdict {
                bail!("{}: this Conv cannot be ghosted: {why}", at());
            }
            layer.validate(conv.c_out, conv.group, self.max_shift).with_context(at)?;
        }
        Ok(())
    }
}

impl LayerPlan {
    /// Checks indices, coverage, sources, shifts and values for a Conv with `c_out` filters in
    /// `group` groups.
    pub fn validate(&self, c_out: usize, group: usize, max_shift: i64) -> Result<()> {
        if self.out_channels != c_out {
            bail!("out_channels is {} but the Conv has {c_out} filters", self.out_channels);
        }
        let mut role = vec![0u8; c_out]; // 0 unseen, 1 intrinsic, 2 ghost
        for (k, &c) in self.intrinsic.iter().enumerate() {
            if c >= c_out {
                bail!("intrinsic channel {c} is out of range (the Conv has {c_out})");
            }
            if k > 0 && self.intrinsic[k - 1] >= c {
                bail!("intrinsic channels must be ascending and unique (… {}, {c} …)", self.intrinsic[k - 1]);
            }
            role[c] = 1;
        }
        if self.intrinsic.is_empty() {
            bail!("no intrinsic channel: at least one filter must be kept");
        }
        for g in &self.ghosts {
            let c = g.channel;
            if c >= c_out {
                bail!("ghost channel {c} is out of range (the Conv has {c_out})");
            }
            match role[c] {
                1 => bail!("channel {c} is listed both as intrinsic and as a ghost"),
                2 => bail!("ghost channel {c} is listed twice"),
                _ => role[c] = 2,
            }
            if role.get(g.source) != Some(&1) {
                bail!("ghost channel {c}: source {} is not an intrinsic channel", g.source);
            }
            for d in g.shift {
                if d.unsigned_abs() > max_shift.unsigned_abs() {
                    bail!("ghost channel {c}: shift {:?} is beyond max_shift {max_shift}", g.shift);
                }
            }
            for (what, v) in [("scale", g.scale), ("bias", g.bias)] {
                if let Some(v) = v.filter(|v| !v.is_finite()) {
                    bail!("ghost channel {c}: {what} {v} is not a finite number");
                }
            }
        }
        if let Some(c) = role.iter().position(|&r| r == 0) {
            bail!("channel {c} is neither intrinsic nor a ghost: every channel must appear exactly once");
        }
        if group > 1 {
            // The reduced Conv keeps the grouping, so every group must keep as many filters.
            let per = c_out / group;
            let counts: Vec<usize> =
                (0..group).map(|g| self.intrinsic.iter().filter(|&&c| c / per == g).count()).collect();
            if counts.iter().any(|&n| n != counts[0]) {
                bail!(
                    "grouped Conv ({group} groups): each group must keep the same number of filters, got {counts:?}"
                );
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer() -> LayerPlan {
        LayerPlan {
            conv_output: "y".into(),
            node: String::new(),
            out_channels: 4,
            intrinsic: vec![0, 2],
            ghosts: vec![
                Ghost { channel: 1, source: 0, shift: [0, 1], scale: None, bias: None },
                Ghost { channel: 3, source: 2, shift: [-1, 0], scale: Some(0.5), bias: Some(0.1) },
            ],
        }
    }

    #[test]
    fn valid_layer_passes_and_order_is_intrinsic_then_ghosts() {
        layer().validate(4, 1, 1).unwrap();
        assert_eq!(layer().emitted_order(), vec![0, 2, 1, 3]);
    }

    #[test]
    fn invalid_layers_name_the_problem() {
        type Mutation = Box<dyn Fn(&mut LayerPlan)>;
        let cases: Vec<(Mutation, &str)> = vec![
            (Box::new(|l| l.ghosts[0].source = 1), "not an intrinsic"),
            (Box::new(|l| l.ghosts[0].shift = [0, 2]), "beyond max_shift"),
            (Box::new(|l| l.ghosts[1].channel = 1), "listed twice"),
            (Box::new(|l| l.intrinsic = vec![2, 0]), "ascending"),
            (Box::new(|l| l.intrinsic = vec![0, 9]), "out of range"),
            (Box::new(|l| l.ghosts.pop().map(|_| ()).unwrap_or(())), "neither intrinsic nor a ghost"),
            (Box::new(|l| l.ghosts[1].scale = Some(f32::NAN)), "not a finite"),
            (Box::new(|l| l.out_channels = 5), "out_channels"),
        ];
        for (mutate, expect) in cases {
            let mut l = layer();
            mutate(&mut l);
            let err = l.validate(4, 1, 1).unwrap_err().to_string();
            assert!(err.contains(expect), "expected '{expect}' in '{err}'");
        }
    }

    #[test]
    fn grouped_conv_needs_equal_kept_counts() {
        let mut l = layer();
        l.intrinsic = vec![0, 1];
        l.ghosts = vec![
            Ghost { channel: 2, source: 0, shift: [0, 0], scale: None, bias: None },
            Ghost { channel: 3, source: 1, shift: [0, 0], scale: None, bias: None },
        ];
        assert!(l.validate(4, 2, 1).unwrap_err().to_string().contains("same number"));
        l.validate(4, 1, 1).unwrap();
    }

    #[test]
    fn json_round_trip_and_envelope_errors() {
        let p = Plan::new("abc", 1, vec![layer()]);
        let back = Plan::from_json(&p.to_json()).unwrap();
        assert_eq!(p, back);
        // Unknown keys are ignored (room to grow).
        let extra = p.to_json().replacen("{", "{\n  \"trainer\": {\"epochs\": 3},", 1);
        assert_eq!(Plan::from_json(&extra).unwrap(), p);
        let bad = p.to_json().replace("ghostsr-plan", "other");
        assert!(Plan::from_json(&bad).unwrap_err().to_string().contains("unknown plan format"));
        let newer = p.to_json().replace("\"version\": 1", "\"version\": 2");
        assert!(Plan::from_json(&newer).unwrap_err().to_string().contains("newer"));
        assert!(Plan::from_json("[1,2]").is_err());
    }
}
