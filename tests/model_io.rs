//! Model I/O against real files: lossless round trips of every model in ../shared/models,
//! external data inlined (never dropped), and the shipped fixture being exactly what the
//! project's generator makes.

use std::fs;
use std::path::{Path, PathBuf};

use ghostsr::generate::{Arch, GenSpec, generate};
use ghostsr::model::{self, WriteOptions};
use ghostsr::onnx::{StringStringEntryProto, tensor_proto::DataLocation};

fn shared_models() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/models");
    let mut models: Vec<PathBuf> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{} is needed beside the repository: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "onnx"))
        .collect();
    models.sort();
    assert!(models.len() >= 13, "expected the 13 shared models, found {}", models.len());
    models
}

#[test]
fn every_shared_model_round_trips_byte_for_byte() {
    for path in shared_models() {
        let original = fs::read(&path).unwrap();
        let m = model::load(&path).unwrap();
        let again = model::encode(&m.proto);
        assert!(again == original, "{}: re-encoded bytes differ", path.display());
        // And through a written file.
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("copy.onnx");
        model::save(&m.proto, &out, WriteOptions { protect: &[path.as_path()], force: false }).unwrap();
        assert_eq!(fs::read(&out).unwrap(), original, "{}", path.display());
    }
}

#[test]
fn external_data_is_read_and_written_back_inline() {
    let dir = tempfile::tempdir().unwrap();
    let spec = GenSpec { blocks: 1, channels: 16, ..GenSpec::preset(Arch::EdsrBaseline, 2) };
    let mut proto = generate(&spec);
    let graph = proto.graph.as_mut().unwrap();
    // Move two weights out to one side file, as onnx.save(..., save_as_external_data=True) does.
    let mut blob = Vec::new();
    let mut moved = Vec::new();
    for t in graph.initializer.iter_mut().take(2) {
        let raw = t.raw_data.take().unwrap();
        let entry = |k: &str, v: String| StringStringEntryProto { key: Some(k.into()), value: Some(v) };
        t.external_data = vec![
            entry("location", "weights.bin".into()),
            entry("offset", blob.len().to_string()),
            entry("length", raw.len().to_string()),
        ];
        t.data_location = Some(DataLocation::External as i32);
        blob.extend_from_slice(&raw);
        moved.push((t.name.clone().unwrap(), raw));
    }
    fs::write(dir.path().join("weights.bin"), &blob).unwrap();
    let path = dir.path().join("ext.onnx");
    fs::write(&path, model::encode(&proto)).unwrap();

    let m = model::load(&path).unwrap();
    for (name, raw) in &moved {
        let t = m.graph().initializer.iter().find(|t| t.name.as_ref() == Some(name)).unwrap();
        assert_eq!(t.raw_data.as_ref(), Some(raw), "{name} inlined with its bytes");
        assert!(t.external_data.is_empty() && t.data_location.is_none());
    }
    // A missing side file is a clear error, not a model without weights.
    fs::remove_file(dir.path().join("weights.bin")).unwrap();
    let err = format!("{:#}", model::load(&path).unwrap_err());
    assert!(err.contains("external data") && err.contains("weights.bin"), "{err}");
}

#[test]
fn shipped_fixture_is_the_generators_output() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/edsr_baseline_b4c32_x2.onnx");
    let spec =
        GenSpec { blocks: 4, channels: 32, planted_ghosts: 0.5, ..GenSpec::preset(Arch::EdsrBaseline, 2) };
    assert!(
        fs::read(&path).unwrap() == model::encode(&generate(&spec)),
        "fixture differs from `ghostsr generate edsr-baseline --blocks 4 --channels 32 --planted-ghosts 0.5`; regenerate it"
    );
}
