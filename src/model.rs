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

use crate::onnx::ModelProto;

mod external;
mod signals;

/// How deep prost decodes nested messages (its `RECURSION_LIMIT`): a model whose subgraphs
/// (If/Loop/Scan bodies) nest deeper than about a third of this cannot be read.
pub const DECODE_DEPTH_LIMIT: u32 = 100;

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
    external::inline_all(&mut proto, path).with_context(|| format!("in {}", path.display()))?;
    Ok(Model { proto, path: path.to_path_buf(), sha256: sha256_hex(&bytes) })
}

/// Decodes ONNX bytes, rejecting what protobuf accepts but no ONNX writer produces.
pub fn decode(bytes: &[u8]) -> Result<ModelProto> {
    if bytes.is_empty() {
        bail!("the file is empty");
    }
    let proto = ModelProto::decode(bytes).map_err(|e| {
        if e.to_string().contains("recursion limit") {
            anyhow::anyhow!(
                "the model nests messages deeper than the decoder's limit of {DECODE_DEPTH_LIMIT} levels \
                 (about {} levels of If/Loop/Scan subgraphs inside each other); ghostsr cannot read it",
                DECODE_DEPTH_LIMIT / 3
            )
        } else {
            anyhow::anyhow!("protobuf decoding failed ({e}); the file is truncated, corrupt, or not ONNX")
        }
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
///
/// The temporary file is created exclusively (`O_EXCL`, a random name: a planted file or link
/// is never opened) and removed on every error path. Its name, `.NAME.ghostsr-tmp.PID.RANDOM`,
/// lets a later run recognise one left by a killed process and remove it.
pub fn write_atomic(out: &Path, bytes: &[u8], opts: WriteOptions<'_>) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
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
    remove_stale_temporaries(&dir, &file_name);
    let prefix = format!("{}{}.", temp_prefix(&file_name), std::process::id());
    // 0o666 before the umask, like any file the user creates (tempfile's default is 0o600).
    let mut tmp = tempfile::Builder::new()
        .prefix(&prefix)
        .permissions(fs::Permissions::from_mode(0o666))
        .tempfile_in(&dir)
        .with_context(|| format!("cannot create a temporary file in {}", dir.display()))?;
    // Until the rename, SIGINT/SIGTERM/SIGHUP remove the temporary file before ending the process.
    let _pending = signals::track(tmp.path());
    tmp.write_all(bytes).with_context(|| format!("cannot write {}", tmp.path().display()))?;
    tmp.as_file().sync_all().ok();
    #[cfg(test)]
    tests::before_rename(tmp.path());
    // Dropping `tmp` on an error removes the temporary file.
    tmp.persist(out).map_err(|e| {
        anyhow::anyhow!("cannot move {} to {}: {}", e.file.path().display(), out.display(), e.error)
    })?;
    Ok(())
}

/// The name prefix of the temporary files written for `file_name` (followed by the pid).
fn temp_prefix(file_name: &str) -> String {
    format!(".{file_name}.ghostsr-tmp.")
}

/// Removes temporary files for `file_name` in `dir` left by ghostsr processes that no longer
/// run (killed mid-write). Only files named by [`write_atomic`] with a dead pid are touched.
fn remove_stale_temporaries(dir: &Path, file_name: &str) {
    // Without /proc there is no cheap way to tell a live process: leave everything.
    if !Path::new("/proc/self").exists() {
        return;
    }
    let prefix = temp_prefix(file_name);
    let Ok(entries) = fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(&prefix) else { continue };
        let Some(pid) = rest.split('.').next().and_then(|p| p.parse::<u32>().ok()) else { continue };
        let alive = Path::new("/proc").join(pid.to_string()).exists();
        let regular = entry.file_type().is_ok_and(|t| t.is_file());
        if !alive && regular {
            let _ = fs::remove_file(entry.path());
        }
    }
}

/// Refuses an output path that is one of the protected inputs, that exists without `force`, or
/// that exists and is not a regular file (a device, a FIFO, a directory: renaming over it would
/// replace it, and writing into it is never what a model output means).
pub fn check_output_path(out: &Path, opts: WriteOptions<'_>) -> Result<()> {
    for p in opts.protect {
        if same_file(out, p) {
            bail!("refusing to write {}: it is the input file; choose another output path", out.display());
        }
    }
    if let Ok(meta) = fs::metadata(out)
        && !meta.is_file()
    {
        let kind = if meta.is_dir() { "a directory" } else { "not a regular file" };
        bail!("refusing to write {}: it exists and is {kind}", out.display());
    }
    if fs::symlink_metadata(out).is_ok() && !opts.force {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Test hook between writing the temporary file and the rename: in the child process of
    /// `a_signal_during_a_write_removes_the_temporary`, interrupt the write there.
    pub(super) fn before_rename(_tmp: &Path) {
        if std::env::var_os("GHOSTSR_TEST_RAISE_SIGTERM").is_some() {
            // SAFETY: raising a signal at ourselves.
            unsafe { libc::raise(libc::SIGTERM) };
        }
    }

    /// Issue 12 item 12: SIGTERM mid-write leaves no temporary file and still ends the process
    /// by that signal. Runs itself as a child (the signal ends that process).
    #[test]
    fn a_signal_during_a_write_removes_the_temporary() {
        use std::os::unix::process::ExitStatusExt;
        if let Some(dir) = std::env::var_os("GHOSTSR_TEST_RAISE_SIGTERM") {
            let out = Path::new(&dir).join("out.onnx");
            let _ = write_atomic(&out, &[1u8; 4096], WriteOptions { protect: &[], force: false });
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let status = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "model::tests::a_signal_during_a_write_removes_the_temporary",
                "--test-threads=1",
            ])
            .env("GHOSTSR_TEST_RAISE_SIGTERM", dir.path())
            .output()
            .unwrap()
            .status;
        assert_eq!(status.signal(), Some(libc::SIGTERM), "the child ends by the signal: {status:?}");
        let left: Vec<_> = fs::read_dir(dir.path()).unwrap().flatten().map(|e| e.file_name()).collect();
        assert!(left.is_empty(), "left behind: {left:?}");
    }

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
