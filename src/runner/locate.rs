//! Finding ONNX Runtime and the GhostShift plugin without configuration.
//!
//! `pip install ghostsr` puts the `ghostsr` executable in `<prefix>/bin/` and the plugin in
//! `<prefix>/lib/python3.X/site-packages/ghostsr/`, beside the `onnxruntime` package it depends
//! on. So the executable's own location names its Python environment, and from there the
//! runtime (`onnxruntime/capi/libonnxruntime.so.*`) and the plugin. The ONNX Runtime search
//! order is: `ORT_DYLIB_PATH` (always wins; a wrong value is an error, never skipped), the
//! `onnxruntime` package of the executable's environment, the environment's own `lib/`
//! (conda), then system library directories (`LD_LIBRARY_PATH`, `/usr/local/lib`, `/usr/lib`,
//! ...). When nothing is found the error lists every place tried. The functions take the
//! executable path and the system directories as arguments so tests can lay out fake trees.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};

use anyhow::{Result, bail};

/// Environment variable naming the ONNX Runtime shared library.
pub const ORT_DYLIB_ENV: &str = "ORT_DYLIB_PATH";

/// The onnxruntime versions the CLI (ort 2.0.0-rc.15: C API 17) and the plugin (API 16+)
/// work with, as a pip requirement; pyproject.toml pins the same range (the CUDA wheel's
/// backend swaps in onnxruntime-gpu).
#[cfg(not(feature = "cuda"))]
pub const ORT_REQUIREMENT: &str = "onnxruntime>=1.17,<2";
/// The onnxruntime versions the CLI and the plugin work with: a CUDA build needs the GPU package.
#[cfg(feature = "cuda")]
pub const ORT_REQUIREMENT: &str = "onnxruntime-gpu>=1.17,<2";

/// Where an ONNX Runtime library was found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OrtSource {
    /// Named by `ORT_DYLIB_PATH`.
    Env,
    /// The `onnxruntime` Python package beside the executable.
    SitePackages,
    /// The executable's environment `lib/` or a system library directory.
    System,
}

impl std::fmt::Display for OrtSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            OrtSource::Env => "named by ORT_DYLIB_PATH",
            OrtSource::SitePackages => "the onnxruntime package beside ghostsr",
            OrtSource::System => "found in a library folder",
        })
    }
}

/// `site-packages` (and Debian's `dist-packages`) directories of the Python environment whose
/// `bin/` holds `exe`, e.g. `/venv/bin/ghostsr` -> `/venv/lib/python3.11/site-packages`.
/// Existing directories only, newest Python first.
pub fn site_packages_of(exe: &Path) -> Vec<PathBuf> {
    let Some(prefix) = env_prefix(exe) else { return Vec::new() };
    let (mut out, mut seen) = (Vec::new(), Vec::new());
    for lib in ["lib", "lib64"] {
        let Ok(entries) = std::fs::read_dir(prefix.join(lib)) else { continue };
        let mut pythons: Vec<PathBuf> = entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.file_name().and_then(OsStr::to_str).is_some_and(|n| n.starts_with("python3")))
            .collect();
        // python3.12 before python3.9: compare the minor version as a number.
        pythons.sort_by_key(|p| {
            let name = p.file_name().and_then(OsStr::to_str).unwrap_or_default();
            std::cmp::Reverse(name.trim_start_matches("python3.").parse::<u32>().unwrap_or(0))
        });
        for py in pythons {
            for sp in ["site-packages", "dist-packages"] {
                let dir = py.join(sp);
                // A venv's lib64 is a link to lib: list each real folder once.
                let real = dir.canonicalize().unwrap_or_else(|_| dir.clone());
                if dir.is_dir() && !seen.contains(&real) {
                    seen.push(real);
                    out.push(dir);
                }
            }
        }
    }
    out
}

/// The environment prefix of an executable in `<prefix>/bin/`.
fn env_prefix(exe: &Path) -> Option<&Path> {
    let bin = exe.parent()?;
    (bin.file_name()? == "bin").then(|| bin.parent()).flatten()
}

/// Files named `libonnxruntime.so`, `libonnxruntime.so.1` or `libonnxruntime.so.1.*` in `dir`,
/// the unversioned names first (they are what a system install links), then versioned ones.
fn ort_libraries_in(dir: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = ["libonnxruntime.so", "libonnxruntime.so.1"]
        .iter()
        .map(|n| dir.join(n))
        .filter(|p| p.is_file())
        .collect();
    if let Ok(entries) = std::fs::read_dir(dir) {
        let mut versioned: Vec<PathBuf> = entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.file_name().and_then(OsStr::to_str).is_some_and(|n| n.starts_with("libonnxruntime.so.1."))
                    && p.is_file()
            })
            .collect();
        versioned.sort();
        out.extend(versioned.into_iter().rev());
    }
    out
}

/// System library directories searched after the Python environment: `LD_LIBRARY_PATH`, then
/// the usual places a package or release tarball installs to.
pub fn system_lib_dirs() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("LD_LIBRARY_PATH")
        .map(|v| std::env::split_paths(&v).filter(|p| !p.as_os_str().is_empty()).collect())
        .unwrap_or_default();
    let multiarch = format!("{}-linux-gnu", std::env::consts::ARCH);
    for d in [
        "/usr/local/lib".to_string(),
        "/usr/local/lib64".to_string(),
        format!("/usr/lib/{multiarch}"),
        "/usr/lib64".to_string(),
        "/usr/lib".to_string(),
        format!("/lib/{multiarch}"),
        "/lib64".to_string(),
        "/lib".to_string(),
    ] {
        let d = PathBuf::from(d);
        if !dirs.contains(&d) {
            dirs.push(d);
        }
    }
    dirs
}

/// Finds the ONNX Runtime library: `env` (the value of `ORT_DYLIB_PATH`) wins when set; else
/// the `onnxruntime` package in the environment of `exe`; else `<prefix>/lib` of that
/// environment and `system_dirs`. The error lists every place tried and how to fix it.
pub fn find_ort(
    env: Option<&OsStr>,
    exe: Option<&Path>,
    system_dirs: &[PathBuf],
) -> Result<(PathBuf, OrtSource)> {
    let install = format!(
        "install ONNX Runtime into the environment ghostsr is installed in \
         (`pip install \"{ORT_REQUIREMENT}\"`) or set {ORT_DYLIB_ENV} to its libonnxruntime.so \
         (site-packages/onnxruntime/capi/ of a pip install)"
    );
    if let Some(value) = env.filter(|v| !v.is_empty()) {
        let path = PathBuf::from(value);
        if !path.is_file() {
            bail!("{ORT_DYLIB_ENV}={} does not exist: {install}", path.display());
        }
        return Ok((path, OrtSource::Env));
    }
    let mut tried = vec![format!("{ORT_DYLIB_ENV}: not set")];
    match exe {
        None => tried.push("the Python environment of this executable: its path is unknown".into()),
        Some(exe) => {
            let sites = site_packages_of(exe);
            if sites.is_empty() {
                let prefix = env_prefix(exe)
                    .map_or_else(|| "none: not in a bin/ folder".into(), |p| p.display().to_string());
                tried.push(format!(
                    "the Python environment of {} (prefix {prefix}): no lib/python3*/site-packages",
                    exe.display()
                ));
            }
            for sp in &sites {
                let capi = sp.join("onnxruntime").join("capi");
                if let Some(lib) = ort_libraries_in(&capi).into_iter().next() {
                    return Ok((lib, OrtSource::SitePackages));
                }
                tried.push(format!("{}/libonnxruntime.so*: no onnxruntime package", capi.display()));
            }
        }
    }
    let mut dirs: Vec<PathBuf> = exe.and_then(env_prefix).map(|p| p.join("lib")).into_iter().collect();
    dirs.extend(system_dirs.iter().cloned());
    for dir in &dirs {
        if let Some(lib) = ort_libraries_in(dir).into_iter().next() {
            return Ok((lib, OrtSource::System));
        }
    }
    if !dirs.is_empty() {
        let list: Vec<String> = dirs.iter().map(|d| d.display().to_string()).collect();
        tried.push(format!("libonnxruntime.so* in {}", list.join(", ")));
    }
    bail!("ONNX Runtime not found; tried:\n  - {}\n{install}", tried.join("\n  - "))
}

/// Plugin locations derived from the executable, in search order: `file_name` next to `exe`,
/// then in the `ghostsr` package of the executable's Python environment.
pub fn plugin_near_exe(exe: &Path, file_name: &str) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = exe.parent().map(|d| d.join(file_name)).into_iter().collect();
    out.extend(site_packages_of(exe).into_iter().map(|sp| sp.join("ghostsr").join(file_name)));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Creates `root/rel` (and its parents) as a small file.
    fn touch(root: &Path, rel: &str) -> PathBuf {
        let p = root.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, b"\x7fELF").unwrap();
        p
    }

    const CAPI: &str = "venv/lib/python3.11/site-packages/onnxruntime/capi";

    #[test]
    fn the_onnxruntime_package_beside_the_executable_is_found() {
        let t = tempfile::tempdir().unwrap();
        let exe = touch(t.path(), "venv/bin/ghostsr");
        let lib = touch(t.path(), &format!("{CAPI}/libonnxruntime.so.1.31.1"));
        touch(t.path(), &format!("{CAPI}/libonnxruntime_providers_shared.so"));
        let sys = touch(t.path(), "usr/lib/libonnxruntime.so");
        let dirs = [sys.parent().unwrap().to_path_buf()];
        assert_eq!(find_ort(None, Some(&exe), &dirs).unwrap(), (lib, OrtSource::SitePackages));
        // An empty ORT_DYLIB_PATH counts as unset.
        assert_eq!(find_ort(Some(OsStr::new("")), Some(&exe), &dirs).unwrap().1, OrtSource::SitePackages);
    }

    #[test]
    fn dist_packages_lib64_and_the_newest_python_are_searched() {
        let t = tempfile::tempdir().unwrap();
        let exe = touch(t.path(), "usr/local/bin/ghostsr");
        touch(t.path(), "usr/local/lib/python3.9/dist-packages/onnxruntime/capi/libonnxruntime.so.1.17.0");
        let new = touch(
            t.path(),
            "usr/local/lib/python3.12/dist-packages/onnxruntime/capi/libonnxruntime.so.1.31.1",
        );
        assert_eq!(find_ort(None, Some(&exe), &[]).unwrap().0, new);
        let t = tempfile::tempdir().unwrap();
        let exe = touch(t.path(), "env/bin/ghostsr");
        let lib =
            touch(t.path(), "env/lib64/python3.11/site-packages/onnxruntime/capi/libonnxruntime.so.1.20.1");
        assert_eq!(find_ort(None, Some(&exe), &[]).unwrap().0, lib);
    }

    #[test]
    fn the_environment_variable_wins_and_is_never_skipped() {
        let t = tempfile::tempdir().unwrap();
        let exe = touch(t.path(), "venv/bin/ghostsr");
        touch(t.path(), &format!("{CAPI}/libonnxruntime.so.1.31.1"));
        let mine = touch(t.path(), "elsewhere/libonnxruntime.so.1.20.0");
        let got = find_ort(Some(mine.as_os_str()), Some(&exe), &[]).unwrap();
        assert_eq!(got, (mine, OrtSource::Env));
        let missing = t.path().join("nope/libonnxruntime.so");
        let e = format!("{:#}", find_ort(Some(missing.as_os_str()), Some(&exe), &[]).unwrap_err());
        assert!(e.contains("ORT_DYLIB_PATH=") && e.contains("nope/libonnxruntime.so"), "{e}");
    }

    #[test]
    fn system_libraries_come_after_the_environment() {
        let t = tempfile::tempdir().unwrap();
        let exe = touch(t.path(), "venv/bin/ghostsr");
        std::fs::create_dir_all(t.path().join("venv/lib/python3.11/site-packages")).unwrap();
        let a = t.path().join("opt/a");
        std::fs::create_dir_all(&a).unwrap();
        let versioned = touch(t.path(), "opt/b/libonnxruntime.so.1.31.1");
        let plain = touch(t.path(), "opt/b/libonnxruntime.so");
        let dirs = [a, plain.parent().unwrap().to_path_buf()];
        assert_eq!(find_ort(None, Some(&exe), &dirs).unwrap(), (plain.clone(), OrtSource::System));
        std::fs::remove_file(&plain).unwrap();
        assert_eq!(find_ort(None, Some(&exe), &dirs).unwrap().0, versioned);
        // A conda environment keeps the library in <prefix>/lib, searched before the system.
        let conda = touch(t.path(), "venv/lib/libonnxruntime.so.1");
        assert_eq!(find_ort(None, Some(&exe), &dirs).unwrap(), (conda, OrtSource::System));
    }

    #[test]
    fn the_error_lists_every_place_tried() {
        let t = tempfile::tempdir().unwrap();
        let exe = touch(t.path(), "venv/bin/ghostsr");
        std::fs::create_dir_all(t.path().join("venv/lib/python3.11/site-packages")).unwrap();
        let sys = t.path().join("usr/lib");
        let e = format!("{:#}", find_ort(None, Some(&exe), std::slice::from_ref(&sys)).unwrap_err());
        for needle in [
            "ONNX Runtime not found",
            "ORT_DYLIB_PATH: not set",
            "python3.11/site-packages/onnxruntime/capi/libonnxruntime.so*: no onnxruntime package",
            &format!("{}/venv/lib, {}", t.path().display(), sys.display()),
            &format!("pip install \"{ORT_REQUIREMENT}\""),
        ] {
            assert!(e.contains(needle), "missing {needle:?} in:\n{e}");
        }
        // A venv's lib64 -> lib link is one folder, tried once.
        std::os::unix::fs::symlink("lib", t.path().join("venv/lib64")).unwrap();
        let e2 = format!("{:#}", find_ort(None, Some(&exe), std::slice::from_ref(&sys)).unwrap_err());
        assert_eq!(e2.matches("no onnxruntime package").count(), 1, "{e2}");
        // An executable outside any environment (e.g. target/release/ghostsr) says so.
        let loose = touch(t.path(), "target/release/ghostsr");
        let e = format!("{:#}", find_ort(None, Some(&loose), &[]).unwrap_err());
        assert!(e.contains("no lib/python3*/site-packages"), "{e}");
    }

    #[test]
    fn the_plugin_is_looked_for_next_to_the_executable_then_in_the_package() {
        let t = tempfile::tempdir().unwrap();
        let exe = touch(t.path(), "venv/bin/ghostsr");
        let in_pkg = touch(t.path(), "venv/lib/python3.11/site-packages/ghostsr/libghostsr.so");
        let c = plugin_near_exe(&exe, "libghostsr.so");
        assert_eq!(c, vec![t.path().join("venv/bin/libghostsr.so"), in_pkg]);
        let loose = touch(t.path(), "target/release/ghostsr");
        assert_eq!(
            plugin_near_exe(&loose, "libghostsr.so"),
            vec![t.path().join("target/release/libghostsr.so")]
        );
    }
}
