//! Stable-toolchain fuzz targets, one per input kind a user hands ghostsr (issue 12): model
//! bytes with external data (the loader's file-system path), plan JSON and a weights file
//! (safetensors). Each mutates a real seed made from the project's generator with proptest's
//! seeded RNG and runs every stage behind it; errors are fine, a panic fails the test (proptest
//! catches it and shrinks the case). `tests/fuzz_loader.rs` covers in-memory model bytes.
//!
//! Budget: `GHOSTSR_FUZZ_CASES` cases per target (default 400), fixed so CI time is fixed.
//! Cases and time on the shared 2-core machine are in BENCHMARKS.md ("Fuzzing").

use std::sync::OnceLock;

use ghostsr::emit::{self, EmitMode};
use ghostsr::generate::{Arch, GenSpec, generate};
use ghostsr::graph::GraphIndex;
use ghostsr::graph::analysis::{self, Analysis, Policy};
use ghostsr::model;
use ghostsr::onnx::{ModelProto, StringStringEntryProto, tensor_proto::DataLocation};
use ghostsr::plan::Plan;
use ghostsr::plan::kmeans::{self, PlanOptions};
use ghostsr::weights::WeightSet;
use proptest::prelude::*;

fn cases() -> u32 {
    std::env::var("GHOSTSR_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(400)
}

struct Seed {
    model: ModelProto,
    analysis: Analysis,
    plan: Plan,
    weights: Vec<u8>,
}

fn seed() -> &'static Seed {
    static SEED: OnceLock<Seed> = OnceLock::new();
    SEED.get_or_init(|| {
        let model = generate(&GenSpec { blocks: 1, channels: 16, ..GenSpec::preset(Arch::Rcan, 2) });
        let index = GraphIndex::new(model.graph.as_ref().unwrap()).unwrap();
        let analysis = analysis::analyze(&index, &Policy::default()).unwrap();
        let opts = PlanOptions { max_iterations: 3, ..Default::default() };
        let plan = kmeans::plan_model(&index, &analysis, "", &opts, &|_, _, _| {}).unwrap();
        let weights = WeightSet::export(&model, &plan).unwrap().to_bytes(&WeightSet::metadata(""));
        drop(index);
        Seed { model, analysis, plan, weights }
    })
}

/// Values that break naive arithmetic, spliced into numbers of the JSON.
const EXTREMES: &[&str] = &[
    "-9223372036854775808",
    "9223372036854775807",
    "18446744073709551615",
    "-1",
    "0",
    "1e308",
    "-0.0",
    "null",
    "\"x\"",
    "[]",
    "{}",
];

/// Applies byte edits, then replaces some JSON numbers by extreme values.
fn mutate_text(
    text: &str,
    edits: &[(prop::sample::Index, u8)],
    swaps: &[(prop::sample::Index, prop::sample::Index)],
) -> Vec<u8> {
    let mut s = text.to_string();
    for (at, pick) in swaps {
        let digits: Vec<usize> =
            s.char_indices().filter(|(_, c)| c.is_ascii_digit()).map(|(i, _)| i).collect();
        if digits.is_empty() {
            break;
        }
        let start = digits[at.index(digits.len())];
        let end = s[start..].find(|c: char| !c.is_ascii_digit() && c != '.').map_or(s.len(), |e| start + e);
        s.replace_range(start..end, EXTREMES[pick.index(EXTREMES.len())]);
    }
    let mut bytes = s.into_bytes();
    for (at, v) in edits {
        let i = at.index(bytes.len());
        bytes[i] = *v;
    }
    bytes
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), failure_persistence: None, ..ProptestConfig::default() })]

    /// Plan JSON: parse, validate, emit in every form.
    #[test]
    fn plan_json_never_panics(
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..4),
        swaps in prop::collection::vec((any::<prop::sample::Index>(), any::<prop::sample::Index>()), 0..6),
    ) {
        let s = seed();
        let bytes = mutate_text(&s.plan.to_json(), &edits, &swaps);
        let Ok(text) = std::str::from_utf8(&bytes) else { return Ok(()) };
        let Ok(plan) = Plan::from_json(text) else { return Ok(()) };
        for mode in [EmitMode::Plugin, EmitMode::Standard, EmitMode::Fused, EmitMode::Conv, EmitMode::Fold] {
            let _ = emit::emit(&s.model, &s.analysis, &plan, mode);
        }
    }

    /// Weights file: parse the safetensors bytes (header JSON and data), validate, apply.
    #[test]
    fn weights_file_never_panics(
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..6),
        swaps in prop::collection::vec((any::<prop::sample::Index>(), any::<prop::sample::Index>()), 0..4),
        cut in any::<prop::sample::Index>(),
    ) {
        let s = seed();
        // The 8-byte header length, then the JSON header, then the data.
        let w = &s.weights;
        let n = u64::from_le_bytes(w[..8].try_into().unwrap()) as usize;
        let header = std::str::from_utf8(&w[8..8 + n]).unwrap();
        let new_header = mutate_text(header, &[], &swaps);
        let mut bytes = (new_header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(&new_header);
        bytes.extend_from_slice(&w[8 + n..]);
        for (at, v) in &edits {
            let i = at.index(bytes.len());
            bytes[i] = *v;
        }
        if cut.index(8) == 0 {
            bytes.truncate(cut.index(bytes.len()));
        }
        if let Ok((set, _)) = WeightSet::from_bytes(&bytes) {
            let mut m = s.model.clone();
            if set.apply(&mut m).is_ok() {
                let index = GraphIndex::new(m.graph.as_ref().unwrap()).unwrap();
                if let Ok(a) = analysis::analyze(&index, &Policy::default()) {
                    let _ = emit::emit(&m, &a, &s.plan, EmitMode::Standard);
                }
            }
        }
    }

    /// Model graphs with hostile attribute values (strides, pads, group, axes, blocksize, ...)
    /// on every node: analysis, planning and every emitter.
    #[test]
    fn hostile_attributes_never_panic(
        picks in prop::collection::vec((any::<prop::sample::Index>(), 0usize..10, any::<prop::sample::Index>(), 0usize..4), 1..6),
    ) {
        const NAMES: &[&str] = &["strides", "pads", "dilations", "kernel_shape", "group", "axis", "perm", "blocksize", "auto_pad", "split"];
        const VALUES: &[i64] = &[i64::MIN, -3, -1, 0, 1, 2, 7, 1 << 40, i64::MAX];
        let s = seed();
        let mut m = s.model.clone();
        let g = m.graph.as_mut().unwrap();
        for (node, name, value, len) in &picks {
            let n = g.node.len();
            let node = &mut g.node[node.index(n)];
            let name = NAMES[*name];
            let v = VALUES[value.index(VALUES.len())];
            node.attribute.retain(|a| a.name.as_deref() != Some(name));
            node.attribute.push(match name {
                "group" | "axis" | "blocksize" => ghostsr::onnx::attr_int(name, v),
                "auto_pad" => ghostsr::onnx::attr_string(name, ["SAME_UPPER", "VALID", "", "X"][*len]),
                _ => ghostsr::onnx::attr_ints_of(name, vec![v; *len + 1]),
            });
        }
        let Ok(index) = GraphIndex::new(m.graph.as_ref().unwrap()) else { return Ok(()) };
        let Ok(a) = analysis::analyze(&index, &Policy::default()) else { return Ok(()) };
        let opts = PlanOptions { max_iterations: 2, ..Default::default() };
        let Ok(plan) = kmeans::plan_model(&index, &a, "", &opts, &|_, _, _| {}) else { return Ok(()) };
        for mode in [EmitMode::Plugin, EmitMode::Standard, EmitMode::Fused, EmitMode::Conv, EmitMode::Fold] {
            let _ = emit::emit(&m, &a, &plan, mode);
        }
        // Unshifted ghosts: the copies the folded form absorbs into the (hostile) Convs reading them.
        let opts = PlanOptions { max_shift: 0, ..opts };
        if let Ok(plan) = kmeans::plan_model(&index, &a, "", &opts, &|_, _, _| {}) {
            let _ = emit::emit(&m, &a, &plan, EmitMode::Fold);
        }
    }

    /// Model files with external data: hostile locations, offsets, lengths and dims, read from
    /// a real directory through `model::load`.
    #[test]
    fn external_data_never_panics(
        picks in prop::collection::vec((any::<prop::sample::Index>(), 0usize..6, any::<prop::sample::Index>()), 1..6),
    ) {
        let s = seed();
        let dir = tempfile::tempdir().unwrap();
        let mut m = s.model.clone();
        let g = m.graph.as_mut().unwrap();
        let mut blob = Vec::new();
        for t in g.initializer.iter_mut() {
            let raw = t.raw_data.take().unwrap_or_default();
            let e = |k: &str, v: String| StringStringEntryProto { key: Some(k.into()), value: Some(v) };
            t.external_data = vec![
                e("location", "w.bin".into()),
                e("offset", blob.len().to_string()),
                e("length", raw.len().to_string()),
            ];
            t.data_location = Some(DataLocation::External as i32);
            blob.extend_from_slice(&raw);
        }
        const LOCATIONS: &[&str] = &["w.bin", "", ".", "..", "../w.bin", "/dev/zero", "sub", "sub/../w.bin", "missing.bin", "w.bin/x"];
        for (which, field, value) in &picks {
            let n = g.initializer.len();
            let t = &mut g.initializer[which.index(n)];
            match field {
                0 => t.external_data[0].value = Some(LOCATIONS[value.index(LOCATIONS.len())].into()),
                1 => t.external_data[1].value = Some(EXTREMES[value.index(EXTREMES.len())].trim_matches('"').into()),
                2 => t.external_data[2].value = Some(EXTREMES[value.index(EXTREMES.len())].trim_matches('"').into()),
                3 => t.dims = vec![i64::MAX, 2],
                4 => t.dims = vec![-1],
                _ => t.data_type = Some(value.index(40) as i32),
            }
        }
        std::fs::write(dir.path().join("w.bin"), &blob).unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        let p = dir.path().join("m.onnx");
        std::fs::write(&p, model::encode(&m)).unwrap();
        if let Ok(loaded) = model::load(&p) {
            let index = GraphIndex::new(loaded.graph()).unwrap();
            let _ = analysis::analyze(&index, &Policy::default());
        }
    }
}
