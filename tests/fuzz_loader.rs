//! Fuzzing the loader and the pipeline behind it with proptest: mutated, truncated and spliced
//! bytes of a real model must give `Ok` or a clean error at every stage (decode, index,
//! analyse, plan, emit), never a panic.

use ghostsr::emit::{self, EmitMode};
use ghostsr::graph::GraphIndex;
use ghostsr::graph::analysis::{self, Policy};
use ghostsr::model;
use ghostsr::plan::kmeans::{self, PlanOptions};
use proptest::prelude::*;

fn fixture() -> Vec<u8> {
    use ghostsr::generate::{Arch, GenSpec, generate};
    // Small on purpose: every case runs the whole pipeline.
    let spec = GenSpec { blocks: 1, channels: 16, ..GenSpec::preset(Arch::Rcan, 2) };
    model::encode(&generate(&spec))
}

/// Runs every stage that a `convert` runs on `bytes`; errors are fine, panics are not.
fn pipeline(bytes: &[u8]) {
    let Ok(m) = model::decode(bytes) else { return };
    let Some(graph) = m.graph.as_ref() else { return };
    let Ok(index) = GraphIndex::new(graph) else { return };
    let Ok(analysis) = analysis::analyze(&index, &Policy::default()) else { return };
    let opts = PlanOptions { max_iterations: 3, ..Default::default() };
    let Ok(plan) = kmeans::plan_model(&index, &analysis, "", &opts, &|_, _, _| {}) else { return };
    let _ = emit::emit(&m, &analysis, &plan, EmitMode::Standard);
    let _ = emit::emit(&m, &analysis, &plan, EmitMode::Plugin);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn mutated_bytes_never_panic(edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..16)) {
        let mut bytes = fixture();
        for (at, v) in edits {
            let i = at.index(bytes.len());
            bytes[i] = v;
        }
        pipeline(&bytes);
    }

    #[test]
    fn truncated_bytes_never_panic(cut in any::<prop::sample::Index>()) {
        let bytes = fixture();
        let n = cut.index(bytes.len());
        pipeline(&bytes[..n]);
        prop_assert!(model::decode(&bytes[..n]).is_err() || n > bytes.len() / 2);
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..4096)) {
        pipeline(&bytes);
    }
}
