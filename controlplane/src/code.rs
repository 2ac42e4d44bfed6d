//! Resolves a function's code source to a directory on this machine.
//!
//! A directory source is used in place. A zip archive is unpacked once per content digest, to
//! `<function_dir>/<namespace>/<function>/code/<first 16 hex digits of its SHA-256>/`. It is
//! unpacked into a staging directory beside that path and renamed into place, so readers never
//! see a partly unpacked version. A repeated or concurrent resolve of the same archive reuses the
//! unpacked copy. The archive is unpacked as it is, so a single top-level directory is kept.
//!
//! Left to others: fetching packages onto other nodes and removing versions no longer used (the
//! node agent), and running this blocking code off the async runtime (the caller).

#[cfg(test)]
mod tests;
mod unzip;

use std::fs::{self, File};
use std::io::{self, Seek, SeekFrom};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use sha2::{Digest, Sha256};

use crate::error::PlatformError;
use crate::model::CodeSource;

/// Largest total uncompressed size of an archive, a guard against zip bombs.
pub const MAX_UNPACKED_BYTES: u64 = 500 * 1024 * 1024;
/// Maximum number of entries in an archive, a guard against archives that exhaust inodes.
pub const MAX_ENTRIES: usize = 100_000;
/// Hex digits of the SHA-256 digest that name an unpacked version (64 bits).
const VERSION_HEX_LEN: usize = 16;

/// Resolves `source` to the directory that contains the function's code. Blocking.
pub fn resolve(
    source: &CodeSource,
    function_dir: &Path,
    namespace: &str,
    function: &str,
) -> Result<PathBuf, PlatformError> {
    match source {
        CodeSource::Directory(dir) => resolve_directory(dir),
        CodeSource::ZipFile(archive) => {
            resolve_zip(archive, function_dir, namespace, function, unzip::LIMITS)
        }
    }
}

fn code_error(path: &Path, message: impl Into<String>) -> PlatformError {
    PlatformError::Code {
        path: path.display().to_string(),
        message: message.into(),
    }
}

fn resolve_directory(dir: &Path) -> Result<PathBuf, PlatformError> {
    let canonical = fs::canonicalize(dir).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => code_error(dir, "directory not found; check code.directory"),
        _ => code_error(dir, format!("cannot be read: {e}")),
    })?;
    if !canonical.is_dir() {
        return Err(code_error(
            dir,
            "is not a directory; point code.directory at a directory, or use code.zip_file for \
             an archive",
        ));
    }
    Ok(canonical)
}

fn resolve_zip(
    archive_path: &Path,
    function_dir: &Path,
    namespace: &str,
    function: &str,
    limits: unzip::Limits,
) -> Result<PathBuf, PlatformError> {
    check_path_component(namespace)?;
    check_path_component(function)?;
    let mut file = File::open(archive_path).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => {
            code_error(archive_path, "zip file not found; check code.zip_file")
        }
        _ => code_error(archive_path, format!("cannot be opened: {e}")),
    })?;
    let digest = sha256_hex(&mut file).map_err(|e| code_error(archive_path, e.to_string()))?;
    let versions = function_dir.join(namespace).join(function).join("code");
    let target = versions.join(&digest[..VERSION_HEX_LEN]);
    if !target.is_dir() {
        fs::create_dir_all(&versions).map_err(|e| {
            code_error(
                archive_path,
                format!("cannot create {}: {e}", versions.display()),
            )
        })?;
        let staging = StagingDir::create(&versions, &digest[..VERSION_HEX_LEN])
            .map_err(|e| code_error(archive_path, e.to_string()))?;
        file.seek(SeekFrom::Start(0))
            .map_err(|e| code_error(archive_path, format!("cannot be read: {e}")))?;
        unzip::unpack(file, staging.path(), limits).map_err(|e| code_error(archive_path, e))?;
        staging
            .commit(&target)
            .map_err(|e| code_error(archive_path, e))?;
    }
    fs::canonicalize(&target)
        .map_err(|e| code_error(archive_path, format!("{}: {e}", target.display())))
}

/// Rejects a namespace or function name that would not be one plain path component.
fn check_path_component(name: &str) -> Result<(), PlatformError> {
    let mut components = Path::new(name).components();
    match (components.next(), components.next()) {
        (Some(Component::Normal(_)), None) => Ok(()),
        _ => Err(PlatformError::Internal(format!(
            "name {name:?} cannot be used as a directory name; validate the spec before \
             resolving its code"
        ))),
    }
}

fn sha256_hex(file: &mut File) -> Result<String, String> {
    let mut hasher = Sha256::new();
    io::copy(file, &mut hasher).map_err(|e| format!("cannot be read: {e}"))?;
    let digest = hasher.finalize();
    Ok(digest.iter().map(|b| format!("{b:02x}")).collect())
}

/// A directory an archive is unpacked into; removed on drop unless renamed into place.
struct StagingDir {
    path: PathBuf,
    committed: bool,
}

impl StagingDir {
    fn create(parent: &Path, version: &str) -> Result<Self, String> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let unique = NEXT.fetch_add(1, Ordering::Relaxed);
        let name = format!(".{version}.unpacking-{}-{unique}", std::process::id());
        let path = parent.join(name);
        fs::create_dir(&path).map_err(|e| format!("cannot create {}: {e}", path.display()))?;
        Ok(StagingDir {
            path,
            committed: false,
        })
    }

    fn path(&self) -> &Path {
        &self.path
    }

    /// Renames the staging directory to `target`. If another resolve put the same version
    /// there first, that version is kept and this copy is removed on drop.
    fn commit(mut self, target: &Path) -> Result<(), String> {
        match fs::rename(&self.path, target) {
            Ok(()) => {
                self.committed = true;
                Ok(())
            }
            Err(_) if target.is_dir() => Ok(()),
            Err(e) => Err(format!(
                "cannot move the unpacked code to {}: {e}",
                target.display()
            )),
        }
    }
}

impl Drop for StagingDir {
    fn drop(&mut self) {
        if self.committed {
            return;
        }
        if let Err(e) = fs::remove_dir_all(&self.path) {
            tracing::warn!(path = %self.path.display(), error = %e, "failed to remove staging directory");
        }
    }
}
