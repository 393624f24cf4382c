//! Weights that travel beside a plan: fine-tuned (by a trainer) or refit (by calibration)
//! values for the original model's initializers, keyed by the original initializer names and in
//! their original shapes.
//!
//! On disk a [`WeightSet`] is a [safetensors](https://github.com/huggingface/safetensors) file,
//! so any trainer can write one (`safetensors.torch.save_file`, `safetensors.numpy.save_file`):
//! an 8-byte little-endian header length `N`, `N` bytes of UTF-8 JSON
//! `{"<initializer name>": {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}, ..,
//! "__metadata__": {"format": "ghostsr-weights", "version": "1", "model_sha256": ".."}}`
//! (padded with spaces so the data starts 8-byte aligned), then the tensors' raw little-endian
//! bytes, offsets relative to the start of that data, contiguous and without holes. Tensor names
//! are the ORIGINAL model's initializer names, shapes their full original shapes. ghostsr writes
//! `F32`; it reads `F32`, `F64`, `F16` and `BF16` (converted to f32). `__metadata__` is optional:
//! `model_sha256` (the original model file's sha256, as in the plan) is informative. Reading
//! checks the layout (a clean error, never a panic, for any bytes); [`WeightSet::validate`]
//! checks the tensors against a model (every name an existing float32 initializer, same shape,
//! every value finite); [`WeightSet::apply`] replaces the initializers' values.

use std::collections::BTreeMap;
use std::collections::HashMap;
use std::fmt;
use std::path::Path;

use anyhow::{Context, Result, bail};
use serde::de::{self, Deserializer, MapAccess, Visitor};

use crate::onnx::{self, ModelProto, tensor_proto::DataType};
use crate::plan::Plan;

/// `__metadata__` `format` value ghostsr writes.
pub const FORMAT: &str = "ghostsr-weights";
/// `__metadata__` `version` value ghostsr writes (and the newest it reads).
pub const VERSION: &str = "1";
/// Largest JSON header accepted (the official reader's limit).
const MAX_HEADER: u64 = 100_000_000;

/// One float32 tensor in the original initializer's shape.
#[derive(Clone, Debug, PartialEq)]
pub struct WeightTensor {
    pub dims: Vec<i64>,
    pub data: Vec<f32>,
}

/// Replacement values for initializers of the original model, by initializer name.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct WeightSet {
    pub tensors: BTreeMap<String, WeightTensor>,
}

/// Element types a weights file may hold, with their size in bytes.
fn dtype_size(dtype: &str) -> Result<usize> {
    Ok(match dtype {
        "F32" => 4,
        "F64" => 8,
        "F16" | "BF16" => 2,
        "BOOL" | "U8" | "I8" | "F8_E4M3" | "F8_E5M2" | "I16" | "U16" | "I32" | "U32" | "I64" | "U64" => {
            bail!("dtype {dtype} is not a floating-point type: weights must be F32 (or F64, F16, BF16)")
        }
        other => bail!("unknown dtype {other:?} (expected F32, F64, F16 or BF16)"),
    })
}

fn decode_values(dtype: &str, bytes: &[u8]) -> Vec<f32> {
    match dtype {
        "F64" => {
            bytes.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().unwrap_or([0; 8])) as f32).collect()
        }
        "F16" => bytes.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        "BF16" => bytes.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        _ => bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
    }
}

/// The JSON header as written, entries in file order, so a repeated key is an error rather than
/// silently replaced.
struct RawHeader(Vec<(String, serde_json::Value)>);

impl<'de> serde::Deserialize<'de> for RawHeader {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RawHeader;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object of tensor entries")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> std::result::Result<RawHeader, A::Error> {
                let mut entries: Vec<(String, serde_json::Value)> = Vec::new();
                let mut seen = std::collections::HashSet::new();
                while let Some((k, v)) = map.next_entry::<String, serde_json::Value>()? {
                    if !seen.insert(k.clone()) {
                        return Err(de::Error::custom(format!("key {k:?} appears twice")));
                    }
                    entries.push((k, v));
                }
                Ok(RawHeader(entries))
            }
        }
        d.deserialize_map(V)
    }
}

/// One tensor entry of the header, checked.
struct Entry {
    name: String,
    dtype: String,
    dims: Vec<i64>,
    begin: usize,
    end: usize,
}

fn parse_entry(name: &str, v: &serde_json::Value, data_len: usize) -> Result<Entry> {
    let obj = v.as_object().context("the entry is not a JSON object")?;
    let dtype = obj.get("dtype").and_then(|d| d.as_str()).context("no string \"dtype\"")?;
    let size = dtype_size(dtype)?;
    let shape = obj.get("shape").and_then(|s| s.as_array()).context("no array \"shape\"")?;
    let mut dims = Vec::with_capacity(shape.len());
    let mut numel: usize = 1;
    for d in shape {
        let Some(d) = d.as_u64().filter(|&d| d <= i64::MAX as u64) else {
            bail!(
                "shape {} holds something other than non-negative integers",
                serde_json::Value::from(shape.clone())
            );
        };
        dims.push(d as i64);
        numel =
            usize::try_from(d).ok().and_then(|d| numel.checked_mul(d)).context("the shape is too large")?;
    }
    let offsets = obj.get("data_offsets").and_then(|o| o.as_array()).context("no array \"data_offsets\"")?;
    let (begin, end) = match offsets.as_slice() {
        [b, e] => match (b.as_u64(), e.as_u64()) {
            (Some(b), Some(e)) => (b, e),
            _ => bail!("data_offsets must be two non-negative integers"),
        },
        _ => bail!("data_offsets must be [begin, end], got {} values", offsets.len()),
    };
    if begin > end {
        bail!("data_offsets [{begin}, {end}]: begin is after end");
    }
    if end > data_len as u64 {
        bail!("data_offsets [{begin}, {end}] reach beyond the data ({data_len} bytes after the header)");
    }
    let (begin, end) = (begin as usize, end as usize);
    let need = numel.checked_mul(size).context("the shape is too large")?;
    if end - begin != need {
        bail!(
            "data_offsets [{begin}, {end}] hold {} bytes but shape {dims:?} of {dtype} needs {need}",
            end - begin
        );
    }
    Ok(Entry { name: name.to_string(), dtype: dtype.to_string(), dims, begin, end })
}

/// `[i, j, ..]` of flat element `flat` in a tensor of shape `dims` (row-major).
fn multi_index(dims: &[i64], mut flat: usize) -> Vec<usize> {
    let mut idx = vec![0; dims.len()];
    for (k, &d) in dims.iter().enumerate().rev() {
        let d = d.max(1) as usize;
        idx[k] = flat % d;
        flat /= d;
    }
    idx
}

impl WeightSet {
    /// The `__metadata__` ghostsr writes for weights of the model file with this sha256.
    pub fn metadata(model_sha256: &str) -> BTreeMap<String, String> {
        BTreeMap::from([
            ("format".to_string(), FORMAT.to_string()),
            ("version".to_string(), VERSION.to_string()),
            ("model_sha256".to_string(), model_sha256.to_string()),
        ])
    }

    /// Reads a weights file (safetensors), checking its layout; see [`WeightSet::from_bytes`].
    pub fn read(path: &Path) -> Result<Self> {
        Ok(Self::read_with_metadata(path)?.0)
    }

    /// [`WeightSet::read`], also returning the file's `__metadata__`.
    pub fn read_with_metadata(path: &Path) -> Result<(Self, BTreeMap<String, String>)> {
        let bytes =
            std::fs::read(path).with_context(|| format!("cannot read weights file {}", path.display()))?;
        Self::from_bytes(&bytes).with_context(|| format!("invalid weights file {}", path.display()))
    }

    /// The safetensors bytes of this set: every tensor as F32, in name order, header padded with
    /// spaces to 8-byte alignment. `metadata` becomes `__metadata__` (omitted when empty). A
    /// tensor named `__metadata__` cannot be stored (the name is reserved by the format).
    pub fn to_bytes(&self, metadata: &BTreeMap<String, String>) -> Vec<u8> {
        let mut header = serde_json::Map::new();
        let mut offset = 0usize;
        for (name, t) in &self.tensors {
            let len = t.data.len() * 4;
            header.insert(
                name.clone(),
                serde_json::json!({"dtype": "F32", "shape": t.dims, "data_offsets": [offset, offset + len]}),
            );
            offset += len;
        }
        if !metadata.is_empty() {
            header.insert("__metadata__".into(), serde_json::json!(metadata));
        }
        let mut json = serde_json::to_string(&header).expect("header serialises").into_bytes();
        while !(8 + json.len()).is_multiple_of(8) {
            json.push(b' ');
        }
        let mut out = Vec::with_capacity(8 + json.len() + offset);
        out.extend_from_slice(&(json.len() as u64).to_le_bytes());
        out.extend_from_slice(&json);
        for t in self.tensors.values() {
            for v in &t.data {
                out.extend_from_slice(&v.to_le_bytes());
            }
        }
        out
    }

    /// Parses safetensors bytes: the header length, the JSON header (no repeated keys, known
    /// float dtypes, shapes matching the byte ranges, ranges inside the data, contiguous, not
    /// overlapping, covering it all) and the values (converted to f32). Any malformed input is
    /// a clean error. Returns the tensors and the `__metadata__` (empty when absent).
    pub fn from_bytes(bytes: &[u8]) -> Result<(Self, BTreeMap<String, String>)> {
        let Some(len_bytes) = bytes.get(..8) else {
            bail!(
                "the file is {} bytes: too short for a safetensors file (it starts with an 8-byte header length)",
                bytes.len()
            );
        };
        let n = u64::from_le_bytes(len_bytes.try_into().expect("8 bytes"));
        let after = (bytes.len() - 8) as u64;
        if n > after {
            bail!(
                "the header length {n} is beyond the end of the file ({after} bytes follow it): truncated, or not safetensors"
            );
        }
        if n > MAX_HEADER {
            bail!("the header length {n} is over the {MAX_HEADER}-byte limit");
        }
        let (header, data) = bytes[8..].split_at(n as usize);
        let text = std::str::from_utf8(header).context("the header is not UTF-8: not a safetensors file")?;
        if !text.starts_with('{') {
            bail!("the header does not start with '{{': not a safetensors file");
        }
        let RawHeader(raw) = serde_json::from_str(text).context("the header is not a valid JSON object")?;

        let mut metadata = BTreeMap::new();
        let mut entries = Vec::new();
        for (name, v) in &raw {
            if name == "__metadata__" {
                let obj = v.as_object().context("__metadata__ is not a JSON object")?;
                for (k, v) in obj {
                    let s = v.as_str().with_context(|| format!("__metadata__ key {k:?} is not a string"))?;
                    metadata.insert(k.clone(), s.to_string());
                }
                continue;
            }
            entries.push(parse_entry(name, v, data.len()).with_context(|| format!("tensor '{name}'"))?);
        }
        if metadata.get("format").map(String::as_str) == Some(FORMAT) {
            let v = metadata.get("version").map(String::as_str).unwrap_or(VERSION);
            match v.parse::<u64>() {
                Ok(1) => {}
                Ok(v) if v > 1 => {
                    bail!("weights format version {v} is newer than this ghostsr reads ({VERSION})")
                }
                _ => bail!("__metadata__ version {v:?} is not a supported version (expected \"{VERSION}\")"),
            }
        }

        // The ranges tile the data: sorted, each starts where the previous ends, no bytes left.
        let mut order: Vec<&Entry> = entries.iter().collect();
        order.sort_by_key(|e| (e.begin, e.end));
        let mut pos = 0usize;
        let mut prev: Option<&Entry> = None;
        for e in &order {
            if e.begin < pos {
                let p = prev.expect("pos > 0 only after an entry");
                bail!(
                    "tensor '{}': data_offsets [{}, {}] overlap tensor '{}' [{}, {}]",
                    e.name,
                    e.begin,
                    e.end,
                    p.name,
                    p.begin,
                    p.end
                );
            }
            if e.begin > pos {
                bail!(
                    "tensor '{}': data_offsets [{}, {}] leave bytes {pos}..{} unused",
                    e.name,
                    e.begin,
                    e.end,
                    e.begin
                );
            }
            pos = e.end;
            prev = Some(e);
        }
        if pos != data.len() {
            bail!("the tensors use {pos} bytes of data but {} follow the header", data.len());
        }

        let mut tensors = BTreeMap::new();
        for e in entries {
            let data = decode_values(&e.dtype, &data[e.begin..e.end]);
            tensors.insert(e.name, WeightTensor { dims: e.dims, data });
        }
        Ok((Self { tensors }, metadata))
    }

    /// Checks the set against `model`: every name is a float32 initializer of the model, with
    /// the same dims, and every value is finite. The error names the tensor.
    pub fn validate(&self, model: &ModelProto) -> Result<()> {
        let graph = model.graph.as_ref().context("the model has no graph")?;
        let inits: HashMap<&str, &onnx::TensorProto> =
            graph.initializer.iter().map(|t| (onnx::tensor_name(t), t)).collect();
        for (name, t) in &self.tensors {
            let Some(init) = inits.get(name.as_str()) else {
                bail!("weights file: tensor '{name}' is not an initializer of the model");
            };
            if init.data_type != Some(DataType::Float as i32) {
                let ty = init.data_type.and_then(|d| DataType::try_from(d).ok());
                bail!(
                    "weights file: tensor '{name}': the model's initializer is {ty:?}, not float32; only float32 initializers can be replaced"
                );
            }
            if t.dims != init.dims {
                bail!(
                    "weights file: tensor '{name}' has shape {:?} but the model's initializer has shape {:?}",
                    t.dims,
                    init.dims
                );
            }
            if t.dims.iter().any(|&d| d < 0) || t.data.len() != onnx::numel(&t.dims) {
                bail!("weights file: tensor '{name}' holds {} values but shape {:?}", t.data.len(), t.dims);
            }
            if let Some(i) = t.data.iter().position(|v| !v.is_finite()) {
                bail!(
                    "weights file: tensor '{name}': element {i} (index {:?}) is {}, not a finite number",
                    multi_index(&t.dims, i),
                    t.data[i]
                );
            }
        }
        Ok(())
    }

    /// Validates (see [`WeightSet::validate`]), then replaces the values of the named
    /// initializers of `model`. An initializer keeps its storage (`raw_data`, little-endian, or
    /// `float_data`), so values equal to the model's give a byte-identical model; external data
    /// is replaced by inline `raw_data`. Returns how many tensors were applied.
    pub fn apply(&self, model: &mut ModelProto) -> Result<usize> {
        self.validate(model)?;
        let graph = model.graph.as_mut().context("the model has no graph")?;
        for init in graph.initializer.iter_mut() {
            let Some(t) = self.tensors.get(onnx::tensor_name(init)) else { continue };
            let external = init.data_location == Some(onnx::tensor_proto::DataLocation::External as i32);
            if init.raw_data.is_none() && !external && !t.data.is_empty() {
                init.float_data = t.data.clone();
            } else {
                init.raw_data = Some(t.data.iter().flat_map(|v| v.to_le_bytes()).collect());
                init.float_data.clear();
                if external {
                    init.external_data.clear();
                    init.data_location = None;
                }
            }
        }
        Ok(self.tensors.len())
    }

    /// The current weights and biases of every Conv the plan lists (found by `conv_output`),
    /// keyed by their initializer names, in their original shapes.
    pub fn export(model: &ModelProto, plan: &Plan) -> Result<Self> {
        let graph = model.graph.as_ref().context("the model has no graph")?;
        let inits: HashMap<&str, &onnx::TensorProto> =
            graph.initializer.iter().map(|t| (onnx::tensor_name(t), t)).collect();
        let index = crate::graph::GraphIndex::new(graph)?;
        let mut set = Self::default();
        for (i, layer) in plan.layers.iter().enumerate() {
            let at = || format!("plan layers[{i}] (conv_output \"{}\")", layer.conv_output);
            let Some(node) =
                index.producer(&layer.conv_output).map(|i| index.node(i)).filter(|n| n.op_type() == "Conv")
            else {
                bail!("{}: unknown tensor: no Conv in the model writes it", at());
            };
            for name in node.input.iter().skip(1).take(2).filter(|s| !s.is_empty()) {
                let Some(t) = inits.get(name.as_str()) else {
                    bail!(
                        "{}: the Conv's input '{name}' is not an initializer; weights files can only carry initializers",
                        at()
                    );
                };
                if name == "__metadata__" {
                    bail!("{}: initializer name '__metadata__' is reserved by the safetensors format", at());
                }
                let data = onnx::tensor_f32(t).with_context(at)?;
                set.tensors.insert(name.clone(), WeightTensor { dims: t.dims.clone(), data });
            }
        }
        Ok(set)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn set() -> WeightSet {
        let mut s = WeightSet::default();
        s.tensors.insert(
            "conv.weight".into(),
            WeightTensor { dims: vec![2, 1, 3], data: vec![1.0, -2.5, 3.0, 0.0, 1e-30, -0.0] },
        );
        s.tensors
            .insert("conv.bias".into(), WeightTensor { dims: vec![2], data: vec![0.5, f32::MIN_POSITIVE] });
        s.tensors.insert("scalar".into(), WeightTensor { dims: vec![], data: vec![7.0] });
        s.tensors.insert("empty".into(), WeightTensor { dims: vec![0, 4], data: vec![] });
        s
    }

    /// A safetensors file from a header written by hand and raw data.
    fn file(header: &str, data: &[u8]) -> Vec<u8> {
        let mut b = (header.len() as u64).to_le_bytes().to_vec();
        b.extend_from_slice(header.as_bytes());
        b.extend_from_slice(data);
        b
    }

    fn err(bytes: &[u8]) -> String {
        format!("{:#}", WeightSet::from_bytes(bytes).unwrap_err())
    }

    #[test]
    fn round_trip_is_exact_and_aligned() {
        let s = set();
        let meta = WeightSet::metadata("abc");
        let bytes = s.to_bytes(&meta);
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        assert_eq!((8 + n) % 8, 0, "data must start 8-byte aligned");
        let (back, meta_back) = WeightSet::from_bytes(&bytes).unwrap();
        assert_eq!(meta_back, meta);
        assert_eq!(back.tensors.len(), s.tensors.len());
        for (name, t) in &s.tensors {
            let b = &back.tensors[name];
            assert_eq!(b.dims, t.dims, "{name}");
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&b.data), bits(&t.data), "{name}: values must round-trip bit for bit");
        }
        // Deterministic: the same set writes the same bytes.
        assert_eq!(back.to_bytes(&meta_back), bytes);
        // No metadata: no __metadata__ key, and it reads back empty.
        let plain = s.to_bytes(&BTreeMap::new());
        assert!(!String::from_utf8_lossy(&plain).contains("__metadata__"));
        assert!(WeightSet::from_bytes(&plain).unwrap().1.is_empty());
    }

    #[test]
    fn reads_other_float_dtypes_as_f32() {
        let mut data = Vec::new();
        data.extend_from_slice(&1.5f64.to_le_bytes());
        data.extend_from_slice(&half::f16::from_f32(-0.25).to_le_bytes());
        data.extend_from_slice(&half::bf16::from_f32(3.0).to_le_bytes());
        let h = r#"{"a":{"dtype":"F64","shape":[1],"data_offsets":[0,8]},"b":{"dtype":"F16","shape":[1],"data_offsets":[8,10]},"c":{"dtype":"BF16","shape":[1],"data_offsets":[10,12]}}"#;
        let (s, meta) = WeightSet::from_bytes(&file(h, &data)).unwrap();
        assert!(meta.is_empty());
        assert_eq!(s.tensors["a"].data, vec![1.5]);
        assert_eq!(s.tensors["b"].data, vec![-0.25]);
        assert_eq!(s.tensors["c"].data, vec![3.0]);
    }

    #[test]
    fn malformed_files_are_clean_errors() {
        let good = set().to_bytes(&WeightSet::metadata("x"));
        let f4 = 1.0f32.to_le_bytes();
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (vec![], "too short"),
            (good[..5].to_vec(), "too short"),
            (good[..20].to_vec(), "beyond the end of the file"),
            ((u64::MAX).to_le_bytes().to_vec(), "beyond the end of the file"),
            (good[..good.len() - 3].to_vec(), "reach beyond"),
            ([good.as_slice(), &[0u8; 4]].concat(), "tensors use"),
            (file("[1, 2]", &[]), "does not start with '{'"),
            (file("{\"a\": ", &[]), "not a valid JSON object"),
            (file("\u{feff}{}", &[]), "does not start"),
            (file(r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#, &f4[..2]), "reach beyond"),
            (file(r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,8]}}"#, &[0; 8]), "needs 4"),
            (
                file(r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[4,0]}}"#, &[0; 8]),
                "begin is after end",
            ),
            (file(r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0]}}"#, &f4), "[begin, end]"),
            (file(r#"{"a":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}}"#, &f4), "non-negative"),
            (
                file(r#"{"a":{"dtype":"F32","shape":[4611686018427387904,4],"data_offsets":[0,4]}}"#, &f4),
                "too large",
            ),
            (
                file(
                    r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#,
                    &[0; 8],
                ),
                "overlap",
            ),
            (file(r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#, &[0; 8]), "unused"),
            (file(r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#, &[0; 8]), "tensors use 4"),
            (file(r#"{"a":{"dtype":"Q4","shape":[1],"data_offsets":[0,4]}}"#, &f4), "unknown dtype"),
            (file(r#"{"a":{"dtype":"I32","shape":[1],"data_offsets":[0,4]}}"#, &f4), "not a floating-point"),
            (file(r#"{"a":{"shape":[1],"data_offsets":[0,4]}}"#, &f4), "dtype"),
            (
                file(
                    r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#,
                    &f4,
                ),
                "appears twice",
            ),
            (file(r#"{"__metadata__":{"k":1}}"#, &[]), "not a string"),
            (file(r#"{"__metadata__":{"format":"ghostsr-weights","version":"2"}}"#, &[]), "newer"),
        ];
        for (bytes, expect) in cases {
            let e = err(&bytes);
            assert!(e.contains(expect), "expected '{expect}' in '{e}'");
        }
        // Errors name the tensor concerned.
        let e = err(&file(r#"{"w.0":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}}"#, &f4));
        assert!(e.contains("tensor 'w.0'"), "{e}");
    }

    fn model() -> ModelProto {
        use crate::onnx::{GraphProto, f32_tensor, i64_tensor};
        let graph = GraphProto {
            initializer: vec![
                f32_tensor("conv.weight", &[2, 1, 3], &[0.0; 6]),
                f32_tensor("conv.bias", &[2], &[0.0; 2]),
                i64_tensor("shape", &[1], &[4]),
                onnx::TensorProto {
                    name: Some("typed".into()),
                    dims: vec![2],
                    data_type: Some(DataType::Float as i32),
                    float_data: vec![1.0, 2.0],
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        ModelProto { graph: Some(graph), ..Default::default() }
    }

    fn only(names: &[&str]) -> WeightSet {
        let mut s = set();
        s.tensors.retain(|k, _| names.contains(&k.as_str()));
        s
    }

    #[test]
    fn validate_names_the_tensor() {
        let m = model();
        only(&["conv.weight", "conv.bias"]).validate(&m).unwrap();
        let e = set().validate(&m).unwrap_err().to_string();
        assert!(e.contains("tensor 'empty' is not an initializer of the model"), "{e}");

        let mut s = only(&["conv.weight"]);
        s.tensors.get_mut("conv.weight").unwrap().dims = vec![1, 2, 3];
        let e = s.validate(&m).unwrap_err().to_string();
        assert!(e.contains("'conv.weight'") && e.contains("[1, 2, 3]") && e.contains("[2, 1, 3]"), "{e}");

        let mut s = only(&["conv.weight"]);
        s.tensors.get_mut("conv.weight").unwrap().data[4] = f32::NAN;
        let e = s.validate(&m).unwrap_err().to_string();
        assert!(e.contains("'conv.weight'") && e.contains("element 4") && e.contains("[1, 0, 1]"), "{e}");
        s.tensors.get_mut("conv.weight").unwrap().data[4] = f32::INFINITY;
        assert!(s.validate(&m).unwrap_err().to_string().contains("not a finite"));

        let mut s = only(&["conv.bias"]);
        s.tensors.get_mut("conv.bias").unwrap().data.push(1.0);
        assert!(s.validate(&m).unwrap_err().to_string().contains("holds 3 values"));

        let mut s = WeightSet::default();
        s.tensors.insert("shape".into(), WeightTensor { dims: vec![1], data: vec![4.0] });
        assert!(s.validate(&m).unwrap_err().to_string().contains("not float32"));
    }

    #[test]
    fn apply_replaces_values_and_keeps_storage() {
        let mut m = model();
        let mut s = only(&["conv.weight"]);
        s.tensors.insert("typed".into(), WeightTensor { dims: vec![2], data: vec![5.0, 6.0] });
        assert_eq!(s.apply(&mut m).unwrap(), 2);
        let g = m.graph.as_ref().unwrap();
        assert_eq!(onnx::tensor_f32(&g.initializer[0]).unwrap(), s.tensors["conv.weight"].data);
        assert!(g.initializer[0].float_data.is_empty());
        assert_eq!(g.initializer[3].float_data, vec![5.0, 6.0]);
        assert!(g.initializer[3].raw_data.is_none());
        // Invalid sets change nothing.
        let before = m.clone();
        assert!(set().apply(&mut m).is_err());
        assert_eq!(m, before);
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

        #[test]
        fn mutated_bytes_never_panic(
            edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
            cut in any::<prop::sample::Index>(),
            truncate in any::<bool>(),
        ) {
            let mut bytes = set().to_bytes(&WeightSet::metadata("abc"));
            for (at, v) in edits {
                let i = at.index(bytes.len());
                bytes[i] = v;
            }
            if truncate {
                bytes.truncate(cut.index(bytes.len()));
            }
            if let Ok((s, _)) = WeightSet::from_bytes(&bytes) {
                // Whatever parses is consistent: each tensor's values fill its shape.
                for t in s.tensors.values() {
                    prop_assert_eq!(t.data.len(), onnx::numel(&t.dims));
                }
            }
        }
    }
}
