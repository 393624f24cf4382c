//! Model I/O: read an ONNX file into the prost types and write one back, losslessly.
//!
//! Owns everything that touches the file system for models: decoding (with errors that say
//! whether the file is truncated or not ONNX at all), inlining external data so no weight is
//! ever dropped, and writing atomically (a temporary file beside the output, then a rename)
//! without ever overwriting the input. It knows nothing about graphs or ghosts. A load/save
//! round trip of a model without external data is byte-identical: the vendored `onnx.proto` is
//! proto2, so prost keeps explicit default values, and field order follows field numbers as in
//! the serialisers that wrote the models.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use prost::Message;
use sha2::{Digest, Sha256};

use crate::onnx::{ModelProto, TensorProto, tensor_proto::DataLocation};

/// A decoded model with where it came from.
#[derive(Clone, Debug)]
pub struct Model {
    pub proto: ModelProto,
    pub path: PathBuf,
    /// Lowercase hex sha256 of the file's bytes (the plan records it).
    pub sha256: String,
}

impl Model {
    pub fn graph(&self) -> &crate::onnx::GraphProto {
        // `load` refuses models without a graph.
        self.proto.graph.as_ref().expect("loaded model has a graph")
    }
}

/// Reads and decodes an ONNX model, inlining any external data.
pub fn load(path: &Path) -> Result<Model> {
    let bytes = fs::read(path).with_context(|| format!("cannot read model file {}", path.display()))?;
    let mut proto =
        decode(&bytes).with_context(|| format!("{} is not a valid ONNX model", path.display()))?;
    let dir = path.parent().unwrap_or(Path::new("."));
    if let Some(graph) = proto.graph.as_mut() {
        for t in graph.initializer.iter_mut() {
            inline_external(t, dir).with_context(|| format!("in {}", path.display()))?;
        }
    }
    Ok(Model { proto, path: path.to_path_buf(), sha256: sha256_hex(&bytes) })
}

/// Decodes ONNX bytes, rejecting what protobuf accepts but no ONNX writer produces.
pub fn decode(bytes: &[u8]) -> Result<ModelProto> {
    if bytes.is_empty() {
        bail!("the file is empty");
    }
    let proto = ModelProto::decode(bytes).map_err(|e| {
        anyhow::anyhow!("protobuf decoding failed ({e}); the file is truncated, corrupt, or not ONNX")
    })?;
    // Random bytes sometimes decode as a protobuf message with only unknown fields: a model
    // needs at least an IR version and a graph to be ONNX.
    if proto.ir_version.is_none() {
        bail!("no ir_version field: this does not look like an ONNX model");
    }
    let Some(graph) = proto.graph.as_ref() else {
        bail!("the model has no graph");
    };
    if graph.node.is_empty() {
        bail!("the model's graph has no nodes");
    }
    Ok(proto)
}

/// Encodes a model to bytes.
pub fn encode(model: &ModelProto) -> Vec<u8> {
    model.encode_to_vec()
}

/// Where to write an output and whether an existing file may be replaced.
#[derive(Clone, Copy, Debug)]
pub struct WriteOptions<'a> {
    /// Files that must never be overwritten (the inputs of the run).
    pub protect: &'a [&'a Path],
    /// Replace an existing output file.
    pub force: bool,
}

/// Writes `bytes` to `out` atomically: a temporary file in the same directory, then a rename,
/// so a crash never leaves a half-written model and readers never see one.
pub fn write_atomic(out: &Path, bytes: &[u8], opts: WriteOptions<'_>) -> Result<()> {
    check_output_path(out, opts)?;
    let dir = match out.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if !dir.is_dir() {
        fs::create_dir_all(&dir).with_context(|| {
            format!("cannot write {}: cannot create directory {}", out.display(), dir.display())
        })?;
    }
    let file_name = out.file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{file_name}.tmp{}", std::process::id()));
    let result = (|| -> Result<()> {
        let mut f = fs::File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
        f.write_all(bytes).with_context(|| format!("cannot write {}", tmp.display()))?;
        f.sync_all().ok();
        fs::rename(&tmp, out).with_context(|| format!("cannot move {} to {}", tmp.display(), out.display()))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Refuses an output path that is one of the protected inputs, or that exists without `force`.
pub fn check_output_path(out: &Path, opts: WriteOptions<'_>) -> Result<()> {
    for p in opts.protect {
        if same_file(out, p) {
            bail!("refusing to write {}: it is the input file; choose another output path", out.display());
        }
    }
    if out.exists() && !opts.force {
        bail!("{} already exists; pass --force to overwrite it", out.display());
    }
    Ok(())
}

/// Saves a model atomically (see [`write_atomic`]).
pub fn save(model: &ModelProto, out: &Path, opts: WriteOptions<'_>) -> Result<()> {
    write_atomic(out, &encode(model), opts)
}

fn same_file(a: &Path, b: &Path) -> bool {
    match (fs::canonicalize(a), fs::canonicalize(b)) {
        (Ok(x), Ok(y)) => x == y,
        // `a` does not exist yet: compare the canonical parent plus the file name.
        _ => match (a.parent().map(canon_dir), a.file_name(), fs::canonicalize(b)) {
            (Some(Some(pa)), Some(name), Ok(y)) => pa.join(name) == y,
            _ => false,
        },
    }
}

fn canon_dir(p: &Path) -> Option<PathBuf> {
    if p.as_os_str().is_empty() { fs::canonicalize(".").ok() } else { fs::canonicalize(p).ok() }
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// Reads an initializer's external data into `raw_data`, so the rewritten model carries every
/// weight inline (a model over protobuf's 2 GiB limit is refused by the encoder's caller).
fn inline_external(t: &mut TensorProto, dir: &Path) -> Result<()> {
    if t.data_location != Some(DataLocation::External as i32) {
        return Ok(());
    }
    let name = t.name.clone().unwrap_or_default();
    let mut location = None;
    let mut offset = 0u64;
    let mut length = None;
    for kv in &t.external_data {
        let v = kv.value.clone().unwrap_or_default();
        match kv.key.as_deref() {
            Some("location") => location = Some(v),
            Some("offset") => {
                offset = v.parse().with_context(|| format!("tensor '{name}': bad offset {v:?}"))?
            }
            Some("length") => {
                length = Some(v.parse::<u64>().with_context(|| format!("tensor '{name}': bad length {v:?}"))?)
            }
            _ => {}
        }
    }
    let Some(location) = location else {
        bail!("tensor '{name}' is stored externally but names no location");
    };
    let rel = Path::new(&location);
    if rel.is_absolute() || rel.components().any(|c| matches!(c, std::path::Component::ParentDir)) {
        bail!(
            "tensor '{name}': external data location {location:?} must be a relative path inside the model's directory"
        );
    }
    let file = dir.join(rel);
    let data = fs::read(&file)
        .with_context(|| format!("tensor '{name}': cannot read external data file {}", file.display()))?;
    let start = offset as usize;
    let end = match length {
        Some(l) => start.checked_add(l as usize),
        None => Some(data.len()),
    };
    let Some(end) = end.filter(|&e| e <= data.len() && start <= e) else {
        bail!(
            "tensor '{name}': external data range {start}..{end:?} is outside {} ({} bytes)",
            file.display(),
            data.len()
        );
    };
    t.raw_data = Some(data[start..end].to_vec());
    t.external_data.clear();
    t.data_location = None;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_empty_and_garbage() {
        assert!(decode(&[]).is_err());
        assert!(decode(b"\x89PNG\r\n\x1a\nthis is not a model").is_err());
    }

    #[test]
    fn refuses_to_overwrite_input_and_existing() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.onnx");
        fs::write(&a, b"x").unwrap();
        let opts = WriteOptions { protect: &[a.as_path()], force: true };
        let err = write_atomic(&a, b"y", opts).unwrap_err().to_string();
        assert!(err.contains("it is the input file"), "{err}");
        // Same file through another spelling of the path.
        let alias = dir.path().join(".").join("a.onnx");
        assert!(write_atomic(&alias, b"y", opts).is_err());
        let b = dir.path().join("b.onnx");
        fs::write(&b, b"old").unwrap();
        let opts = WriteOptions { protect: &[a.as_path()], force: false };
        assert!(write_atomic(&b, b"new", opts).unwrap_err().to_string().contains("--force"));
        let opts = WriteOptions { protect: &[a.as_path()], force: true };
        write_atomic(&b, b"new", opts).unwrap();
        assert_eq!(fs::read(&b).unwrap(), b"new");
        assert_eq!(fs::read(&a).unwrap(), b"x");
    }
}
