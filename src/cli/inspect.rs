//! `ghostsr inspect`: operators, parameters, multiply-adds, and every Conv with why it is or is
//! not eligible.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;

use super::args::PolicyArgs;
use crate::graph::GraphIndex;
use crate::graph::analysis;
use crate::model;
use crate::report;

#[derive(Args, Debug)]
pub struct InspectArgs {
    /// The ONNX model.
    pub model: PathBuf,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub policy: PolicyArgs,
}

pub fn run(a: &InspectArgs) -> Result<()> {
    let mut m = model::load(&a.model)?;
    // float16 weights are inspected as float32 (exact), like convert does.
    crate::emit::fp16::widen(&mut m)?;
    let index = GraphIndex::new(m.graph()).with_context(|| format!("in {}", a.model.display()))?;
    let analysis = analysis::analyze(&index, &a.policy.policy())?;
    let report = report::inspect(&a.model.display().to_string(), &m.proto, &index, &analysis);
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report::render(&report));
        if report.convs_eligible == 0 {
            println!("  no Conv is eligible: see the reasons above (--include NAME overrides the policy)");
        }
    }
    Ok(())
}
