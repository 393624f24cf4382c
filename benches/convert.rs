//! Conversion time of an EDSR-size network (32 residual blocks x 256 channels, x2, 40.7M
//! params, generated): load, analyse, plan (k-means), emit, encode, with the time of each stage.
//! Target: <= 10 s on the 2-core development machine. Run: `cargo bench --bench convert`
//! (`-- --blocks N` for a smaller network, `--emit standard` for the other emitter).

use std::time::Instant;

use ghostsr::emit::{self, EmitMode};
use ghostsr::generate::{Arch, GenSpec, generate};
use ghostsr::graph::GraphIndex;
use ghostsr::graph::analysis::{self, Policy};
use ghostsr::model;
use ghostsr::plan::kmeans::{self, PlanOptions};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str| args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned();
    let blocks = arg("--blocks").map(|v| v.parse()).transpose()?.unwrap_or(32);
    let mode =
        if arg("--emit").as_deref() == Some("standard") { EmitMode::Standard } else { EmitMode::Plugin };
    let spec = GenSpec { blocks, ..GenSpec::preset(Arch::Edsr, 2) };
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("edsr_x2.onnx");
    std::fs::write(&path, model::encode(&generate(&spec)))?;
    println!(
        "EDSR x2, {blocks} blocks x 256 channels, {} threads, emit {mode:?}",
        rayon::current_num_threads()
    );

    let t0 = Instant::now();
    let mut lap = Instant::now();
    let mut stage = |name: &str| {
        println!("  {name:<8} {:>7.3} s", lap.elapsed().as_secs_f64());
        lap = Instant::now();
    };
    let m = model::load(&path)?;
    stage("load");
    let index = GraphIndex::new(m.graph())?;
    let analysis = analysis::analyze(&index, &Policy::default())?;
    stage("analyse");
    let plan = kmeans::plan_model(&index, &analysis, &m.sha256, &PlanOptions::default(), &|_, _, _| {})?;
    stage("plan");
    let (out, _) = emit::emit(&m.proto, &analysis, &plan, mode)?;
    stage("emit");
    let bytes = model::encode(&out);
    std::fs::write(dir.path().join("ghost.onnx"), &bytes)?;
    stage("save");
    println!(
        "  total    {:>7.3} s  ({} layers planned, {} params -> {})",
        t0.elapsed().as_secs_f64(),
        plan.layers.len(),
        ghostsr::report::params(m.graph()),
        ghostsr::report::params(out.graph.as_ref().expect("graph"))
    );
    Ok(())
}
