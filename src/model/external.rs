//! External data: every tensor a model stores outside its file (initializers, `Constant` and
//! other tensor attributes, sparse tensors, in the main graph, in If/Loop/Scan bodies and in
//! functions) is read into `raw_data`, so the written model carries every weight inline.
//!
//! The policy is ONNX's own loader's (`onnx/checker.cc`, `onnx/external_data_helper.py`): a
//! `location` is a relative path inside the model's directory, a symbolic link is refused ("is a
//! symbolic link"), and so is a path that resolves outside that directory. On top of that only
//! regular files are read (a device or a FIFO would read without end or block), each tensor reads
//! exactly the bytes its `data_type` and `dims` need (checked against a declared `length` and
//! the file's size), and a file shared by many tensors is opened once and read by ranges.

use std::collections::HashMap;
use std::fs::{self, File};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};

use anyhow::{Context, Result, bail};

use crate::onnx::{
    GraphProto, ModelProto, NodeProto, SparseTensorProto, TensorProto, tensor_proto::DataLocation,
};

/// Inlines every externally stored tensor of `proto`, a model read from `model_path`.
pub(super) fn inline_all(proto: &mut ModelProto, model_path: &Path) -> Result<()> {
    let dir = match model_path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let mut reader = Reader { dir, canonical_dir: None, files: HashMap::new() };
    if let Some(g) = proto.graph.as_mut() {
        reader.graph(g, "the graph")?;
    }
    for f in proto.functions.iter_mut() {
        let at = format!("function '{}'", f.name.as_deref().unwrap_or(""));
        for n in f.node.iter_mut() {
            reader.node(n, &at)?;
        }
    }
    Ok(())
}

/// Bytes one tensor of `data_type` with `numel` elements occupies in `raw_data`; `None` for
/// types that have no fixed-size raw form (strings) or that this reader does not know.
pub fn raw_size(data_type: i32, numel: u64) -> Option<u64> {
    let bits: u64 = match data_type {
        2 | 3 | 9 | 17..=20 | 24 => 8, // (u)int8, bool, float8 variants, float8e8m0
        4 | 5 | 10 | 16 => 16,         // (u)int16, float16, bfloat16
        1 | 6 | 12 => 32,              // float, int32, uint32
        7 | 11 | 13 | 14 => 64,        // int64, double, uint64, complex64
        15 => 128,                     // complex128
        21..=23 => 4,                  // uint4, int4, float4e2m1 (two per byte)
        _ => return None,
    };
    numel.checked_mul(bits).map(|b| b.div_ceil(8))
}

/// The number of elements `dims` declares, or an error for a negative dim or an overflow.
pub fn checked_numel(dims: &[i64]) -> Option<u64> {
    dims.iter().try_fold(1u64, |acc, &d| u64::try_from(d).ok().and_then(|d| acc.checked_mul(d)))
}

struct Reader {
    dir: PathBuf,
    /// The model directory, canonicalised on first use (models without external data never
    /// touch the file system here).
    canonical_dir: Option<PathBuf>,
    /// Open data files by canonical path, with their size.
    files: HashMap<PathBuf, (File, u64)>,
}

impl Reader {
    fn graph(&mut self, g: &mut GraphProto, at: &str) -> Result<()> {
        for t in g.initializer.iter_mut() {
            self.tensor(t).with_context(|| format!("initializer of {at}"))?;
        }
        for s in g.sparse_initializer.iter_mut() {
            self.sparse(s).with_context(|| format!("sparse initializer of {at}"))?;
        }
        for n in g.node.iter_mut() {
            self.node(n, at)?;
        }
        Ok(())
    }

    fn node(&mut self, n: &mut NodeProto, at: &str) -> Result<()> {
        let who = format!("{} in {at}", crate::graph::describe(n));
        for a in n.attribute.iter_mut() {
            let attr = format!("attribute '{}' of {who}", a.name.as_deref().unwrap_or(""));
            if let Some(t) = a.t.as_mut() {
                self.tensor(t).with_context(|| attr.clone())?;
            }
            for t in a.tensors.iter_mut() {
                self.tensor(t).with_context(|| attr.clone())?;
            }
            if let Some(s) = a.sparse_tensor.as_mut() {
                self.sparse(s).with_context(|| attr.clone())?;
            }
            for s in a.sparse_tensors.iter_mut() {
                self.sparse(s).with_context(|| attr.clone())?;
            }
            let body = format!("the body in {attr}");
            if let Some(g) = a.g.as_mut() {
                self.graph(g, &body)?;
            }
            for g in a.graphs.iter_mut() {
                self.graph(g, &body)?;
            }
        }
        Ok(())
    }

    fn sparse(&mut self, s: &mut SparseTensorProto) -> Result<()> {
        if let Some(t) = s.values.as_mut() {
            self.tensor(t)?;
        }
        if let Some(t) = s.indices.as_mut() {
            self.tensor(t)?;
        }
        Ok(())
    }

    /// Reads one tensor's external data into `raw_data` (nothing to do for inline tensors).
    fn tensor(&mut self, t: &mut TensorProto) -> Result<()> {
        if t.data_location != Some(DataLocation::External as i32) {
            return Ok(());
        }
        let name = t.name.clone().unwrap_or_default();
        let (mut location, mut offset, mut length) = (None, 0u64, None);
        for kv in &t.external_data {
            let v = kv.value.clone().unwrap_or_default();
            match kv.key.as_deref() {
                Some("location") => location = Some(v),
                Some("offset") => {
                    offset = v
                        .parse()
                        .with_context(|| format!("tensor '{name}': bad external data offset {v:?}"))?
                }
                Some("length") => {
                    length = Some(
                        v.parse::<u64>()
                            .with_context(|| format!("tensor '{name}': bad external data length {v:?}"))?,
                    )
                }
                _ => {}
            }
        }
        let Some(location) = location.filter(|l| !l.is_empty()) else {
            bail!("tensor '{name}' is stored externally but names no location");
        };
        let dtype = t.data_type.unwrap_or(0);
        let numel = checked_numel(&t.dims)
            .with_context(|| format!("tensor '{name}': dims {:?} are negative or too large", t.dims))?;
        let Some(need) = raw_size(dtype, numel) else {
            bail!(
                "tensor '{name}': external data of data type {dtype} is not supported (strings have no raw form)"
            );
        };
        if let Some(l) = length.filter(|&l| l != need) {
            bail!(
                "tensor '{name}': external data length {l} does not match dims {:?} ({need} bytes)",
                t.dims
            );
        }
        let (file, size, path) = self.open(&location).with_context(|| format!("tensor '{name}'"))?;
        let end = offset.checked_add(need).filter(|&e| e <= size);
        if end.is_none() {
            bail!(
                "tensor '{name}': external data range {offset}..{} is outside {} ({size} bytes)",
                offset as u128 + need as u128,
                path.display()
            );
        }
        let mut buf = vec![0u8; need as usize];
        file.read_exact_at(&mut buf, offset)
            .with_context(|| format!("tensor '{name}': cannot read external data file {}", path.display()))?;
        t.raw_data = Some(buf);
        t.external_data.clear();
        t.data_location = None;
        Ok(())
    }

    /// Opens (once) the data file `location` names, after the containment checks.
    fn open(&mut self, location: &str) -> Result<(&File, u64, PathBuf)> {
        let rel = Path::new(location);
        if !rel.components().all(|c| matches!(c, Component::Normal(_) | Component::CurDir)) {
            bail!("external data location {location:?} must be a relative path inside the model's directory");
        }
        let path = self.dir.join(rel);
        let meta = fs::symlink_metadata(&path)
            .with_context(|| format!("cannot read external data file {}", path.display()))?;
        if meta.file_type().is_symlink() {
            bail!(
                "external data file {} is a symbolic link; ONNX refuses those, and so does ghostsr",
                path.display()
            );
        }
        if self.canonical_dir.is_none() {
            let c = fs::canonicalize(&self.dir)
                .with_context(|| format!("cannot resolve the model directory {}", self.dir.display()))?;
            self.canonical_dir = Some(c);
        }
        let canonical_dir = self.canonical_dir.as_ref().expect("set above");
        let canonical = fs::canonicalize(&path)
            .with_context(|| format!("cannot resolve external data file {}", path.display()))?;
        if !canonical.starts_with(canonical_dir) {
            bail!(
                "external data file {} resolves outside the model directory ({}); ONNX refuses that, and so does ghostsr",
                path.display(),
                canonical.display()
            );
        }
        if !self.files.contains_key(&canonical) {
            // O_NOFOLLOW: the last component cannot have become a link since the check above;
            // O_NONBLOCK: opening a FIFO must not wait for a writer (it is refused just below).
            let file = fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
                .open(&canonical)
                .with_context(|| format!("cannot open external data file {}", path.display()))?;
            let meta = file.metadata().with_context(|| format!("cannot stat {}", path.display()))?;
            if !meta.is_file() {
                bail!("external data file {} is not a regular file", path.display());
            }
            self.files.insert(canonical.clone(), (file, meta.len()));
        }
        let (file, size) = &self.files[&canonical];
        Ok((file, *size, path))
    }
}
