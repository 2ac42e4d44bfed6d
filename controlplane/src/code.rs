//! Resolves a function's code source to a directory on this machine.
//!
//! A directory source is used in place. A zip archive is unpacked once per content digest to
//! `<function_dir>/<namespace>/<function>/code/<first 16 hex digits of its SHA-256>/`: it is
//! unpacked into a staging directory beside that path and renamed into place, so readers never see
//! a partly unpacked version, and a repeated or concurrent resolve of the same archive reuses it.
//! The archive is unpacked as it is: a single top-level directory is not stripped.
//!
//! Left to others: fetching packages onto other nodes and removing versions no longer used (the
//! node agent), and running this blocking code off the async runtime (the caller).

use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use sha2::{Digest, Sha256};
use zip::read::ZipFile;
use zip::ZipArchive;

use crate::error::PlatformError;
use crate::model::CodeSource;

/// Largest total uncompressed size of an archive, a guard against zip bombs.
pub const MAX_UNPACKED_BYTES: u64 = 500 * 1024 * 1024;
/// Most entries in an archive, a guard against archives that exhaust inodes.
pub const MAX_ENTRIES: usize = 100_000;
/// Hex digits of the SHA-256 digest that name an unpacked version (64 bits).
const VERSION_HEX_LEN: usize = 16;
/// Longest symlink target read from an archive, Linux's PATH_MAX.
const MAX_SYMLINK_TARGET: u64 = 4096;
/// Root-level files the platform executes; they are made executable whatever the archive says.
const BOOTSTRAP_NAMES: [&str; 2] = ["scf_bootstrap", "bootstrap"];

/// Bounds on what one archive may unpack to; tests use smaller ones.
#[derive(Debug, Clone, Copy)]
struct Limits {
    max_bytes: u64,
    max_entries: usize,
}

const LIMITS: Limits = Limits {
    max_bytes: MAX_UNPACKED_BYTES,
    max_entries: MAX_ENTRIES,
};

/// Resolves `source` to the directory that holds the function's code. Blocking.
pub fn resolve(
    source: &CodeSource,
    function_dir: &Path,
    namespace: &str,
    function: &str,
) -> Result<PathBuf, PlatformError> {
    match source {
        CodeSource::Directory(dir) => resolve_directory(dir),
        CodeSource::ZipFile(archive) => {
            resolve_zip(archive, function_dir, namespace, function, LIMITS)
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
    limits: Limits,
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
        unpack(file, staging.path(), archive_path, limits)?;
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

/// Unpacks every entry of the archive under `root`. Symlinks are created last, so no file is
/// ever written through one.
fn unpack(
    file: File,
    root: &Path,
    archive_path: &Path,
    limits: Limits,
) -> Result<(), PlatformError> {
    let err = |message: String| code_error(archive_path, message);
    let mut archive = ZipArchive::new(file).map_err(|e| {
        err(format!(
            "is not a valid zip archive ({e}); rebuild it with `zip -r`"
        ))
    })?;
    check_archive_size(&archive, limits).map_err(err)?;

    let mut budget = limits.max_bytes;
    let mut symlinks = Vec::new();
    for index in 0..archive.len() {
        let mut entry = archive
            .by_index(index)
            .map_err(|e| err(format!("entry {index} cannot be read: {e}")))?;
        let Some(relative) = entry_path(&entry) else {
            return Err(err(format!(
                "entry {:?} points outside the archive root (an absolute path or too many \
                 '..'); rebuild the archive with relative paths",
                entry.name()
            )));
        };
        if relative.as_os_str().is_empty() {
            continue;
        }
        let out = root.join(&relative);
        if entry.is_dir() {
            fs::create_dir_all(&out).map_err(|e| err(entry_io_error(&entry, e)))?;
        } else if entry.is_symlink() {
            let mut target = String::new();
            (&mut entry)
                .take(MAX_SYMLINK_TARGET)
                .read_to_string(&mut target)
                .map_err(|e| err(entry_io_error(&entry, e)))?;
            symlinks.push((relative, target));
        } else {
            let written = write_file(&mut entry, &out, budget, limits).map_err(err)?;
            budget -= written;
            let mode = file_mode(entry.unix_mode(), &relative);
            fs::set_permissions(&out, fs::Permissions::from_mode(mode))
                .map_err(|e| err(entry_io_error(&entry, e)))?;
        }
    }
    create_symlinks(root, &symlinks).map_err(err)
}

fn check_archive_size<R: Read + Seek>(
    archive: &ZipArchive<R>,
    limits: Limits,
) -> Result<(), String> {
    if archive.len() > limits.max_entries {
        return Err(format!(
            "has {} entries, more than the limit of {}; package fewer files",
            archive.len(),
            limits.max_entries
        ));
    }
    // Declared sizes can lie or be absent (data descriptors), so `write_file` also counts the
    // bytes it really writes.
    match archive.decompressed_size() {
        Some(total) if total > u128::from(limits.max_bytes) => Err(format!(
            "unpacks to {total} bytes, more than the limit of {} bytes",
            limits.max_bytes
        )),
        _ => Ok(()),
    }
}

/// Returns the entry's path below the root with `.` and inner `..` removed, or None if it
/// would leave the root.
fn entry_path<R: Read>(entry: &ZipFile<'_, R>) -> Option<PathBuf> {
    let enclosed = entry.enclosed_name()?;
    let mut normal = PathBuf::new();
    for component in enclosed.components() {
        match component {
            Component::Normal(part) => normal.push(part),
            Component::ParentDir => {
                if !normal.pop() {
                    return None;
                }
            }
            Component::CurDir => {}
            Component::RootDir | Component::Prefix(_) => return None,
        }
    }
    Some(normal)
}

fn entry_io_error<R: Read>(entry: &ZipFile<'_, R>, error: io::Error) -> String {
    format!("entry {:?} cannot be unpacked: {error}", entry.name())
}

/// Writes one file entry, failing if it would take more than the `budget` bytes left of
/// `limits.max_bytes`. Returns the number of bytes written.
fn write_file<R: Read>(
    entry: &mut ZipFile<'_, R>,
    out: &Path,
    budget: u64,
    limits: Limits,
) -> Result<u64, String> {
    if let Some(parent) = out.parent() {
        fs::create_dir_all(parent).map_err(|e| entry_io_error(entry, e))?;
    }
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(out)
        .map_err(|e| match e.kind() {
            io::ErrorKind::AlreadyExists => {
                format!("entry {:?} appears twice in the archive", entry.name())
            }
            _ => entry_io_error(entry, e),
        })?;
    // A read error here is most often a corrupt archive: a bad deflate stream or CRC mismatch.
    let written = io::copy(&mut entry.take(budget + 1), &mut file).map_err(|e| {
        format!(
            "entry {:?} cannot be unpacked, the archive is corrupt: {e}",
            entry.name()
        )
    })?;
    if written > budget {
        return Err(format!(
            "unpacks to more than the limit of {} bytes (at entry {:?})",
            limits.max_bytes,
            entry.name()
        ));
    }
    Ok(written)
}

/// Returns the permission bits for an unpacked file: the archive's, without setuid, setgid
/// and sticky bits, and at least 0755 for a root-level bootstrap, because the platform executes
/// it and archives built on Windows carry no execute bit.
fn file_mode(archive_mode: Option<u32>, relative: &Path) -> u32 {
    let mode = archive_mode.map_or(0o644, |mode| mode & 0o777);
    let is_bootstrap = relative.parent() == Some(Path::new(""))
        && BOOTSTRAP_NAMES
            .iter()
            .any(|name| relative == Path::new(name));
    if is_bootstrap {
        mode | 0o755
    } else {
        mode
    }
}

/// Creates the archive's symlinks after all files are written, so no file is written through
/// one. Each must stay inside the root; see `check_symlink`.
fn create_symlinks(root: &Path, symlinks: &[(PathBuf, String)]) -> Result<(), String> {
    let links: HashSet<&Path> = symlinks.iter().map(|(path, _)| path.as_path()).collect();
    for (relative, target) in symlinks {
        check_symlink(&links, relative, target)?;
        let parent = relative.parent().unwrap_or(Path::new(""));
        fs::create_dir_all(root.join(parent))
            .and_then(|()| std::os::unix::fs::symlink(target, root.join(relative)))
            .map_err(|e| format!("symlink {} cannot be created: {e}", quoted(relative)))?;
    }
    Ok(())
}

/// Checks that a symlink's target, read from the link's directory, stays inside the root. The
/// check is lexical, which is exact only on real directories, so neither the link's own path nor
/// its target may pass through another of the archive's symlinks; a target may still name one.
fn check_symlink(links: &HashSet<&Path>, relative: &Path, target: &str) -> Result<(), String> {
    let link = quoted(relative);
    if target.is_empty() {
        return Err(format!("symlink {link} has an empty target"));
    }
    let nested = || {
        format!(
            "symlink {link} -> {target:?} passes through another symlink of the archive; \
             rebuild the archive so that symlinks name real paths"
        )
    };
    let outside = || {
        format!(
            "symlink {link} -> {target:?} points outside the archive root; use a relative \
             target inside the archive"
        )
    };
    let parent = relative.parent().unwrap_or(Path::new(""));
    if parent.ancestors().any(|ancestor| links.contains(ancestor)) {
        return Err(nested());
    }
    let mut resolved = parent.to_path_buf();
    for component in Path::new(target).components() {
        if links.contains(resolved.as_path()) {
            return Err(nested());
        }
        match component {
            Component::Normal(part) => resolved.push(part),
            Component::ParentDir => {
                if !resolved.pop() {
                    return Err(outside());
                }
            }
            Component::CurDir => {}
            Component::RootDir | Component::Prefix(_) => return Err(outside()),
        }
    }
    Ok(())
}

fn quoted(path: &Path) -> String {
    format!("{:?}", path.display().to_string())
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::time::{Duration, SystemTime};

    use zip::write::SimpleFileOptions;
    use zip::ZipWriter;

    use super::*;

    /// One archive entry for `write_zip`.
    enum Entry<'a> {
        File(&'a str, u32, &'a [u8]),
        Dir(&'a str),
        Symlink(&'a str, &'a str),
    }

    fn write_zip(path: &Path, entries: &[Entry<'_>]) {
        let mut zip = ZipWriter::new(File::create(path).unwrap());
        for entry in entries {
            match entry {
                Entry::File(name, mode, data) => {
                    let options = SimpleFileOptions::default().unix_permissions(*mode);
                    zip.start_file(*name, options).unwrap();
                    zip.write_all(data).unwrap();
                }
                Entry::Dir(name) => zip
                    .add_directory(*name, SimpleFileOptions::default())
                    .unwrap(),
                Entry::Symlink(name, target) => zip
                    .add_symlink(*name, *target, SimpleFileOptions::default())
                    .unwrap(),
            }
        }
        zip.finish().unwrap();
    }

    fn resolve_zip_file(archive: &Path, function_dir: &Path) -> Result<PathBuf, PlatformError> {
        let source = CodeSource::ZipFile(archive.to_path_buf());
        resolve(&source, function_dir, "default", "hello")
    }

    fn code_message(result: Result<PathBuf, PlatformError>) -> String {
        match result {
            Err(PlatformError::Code { message, .. }) => message,
            other => panic!("expected a Code error, got {other:?}"),
        }
    }

    /// Returns the permission bits in octal, as `ls` and `chmod` show them.
    fn mode_of(path: &Path) -> String {
        format!(
            "{:o}",
            fs::metadata(path).unwrap().permissions().mode() & 0o7777
        )
    }

    /// Lists the names in the function's `code` directory: the unpacked versions and any
    /// staging directory left behind.
    fn versions(function_dir: &Path) -> Vec<String> {
        let dir = function_dir.join("default/hello/code");
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn directory_source_canonicalized() {
        let tmp = tempfile::tempdir().unwrap();
        fs::create_dir(tmp.path().join("app")).unwrap();
        let source = CodeSource::Directory(tmp.path().join("./app/../app"));
        let dir = resolve(&source, tmp.path(), "default", "hello").unwrap();
        assert_eq!(dir, fs::canonicalize(tmp.path().join("app")).unwrap());
    }

    #[test]
    fn directory_source_missing_rejected() {
        let tmp = tempfile::tempdir().unwrap();
        let source = CodeSource::Directory(tmp.path().join("missing"));
        let message = code_message(resolve(&source, tmp.path(), "default", "hello"));
        assert!(message.contains("not found"), "{message}");
    }

    #[test]
    fn directory_source_file_rejected() {
        let tmp = tempfile::tempdir().unwrap();
        fs::write(tmp.path().join("app.zip"), b"x").unwrap();
        let source = CodeSource::Directory(tmp.path().join("app.zip"));
        let message = code_message(resolve(&source, tmp.path(), "default", "hello"));
        assert!(message.contains("not a directory"), "{message}");
    }

    #[test]
    fn zip_unpacked_with_modes() {
        let tmp = tempfile::tempdir().unwrap();
        let archive = tmp.path().join("app.zip");
        write_zip(
            &archive,
            &[
                Entry::File("scf_bootstrap", 0o755, b"#!/bin/sh\n"),
                Entry::Dir("lib/"),
                Entry::File("lib/data.txt", 0o640, b"data"),
                Entry::File("bootstrap", 0o644, b"#!/bin/sh\n"),
                Entry::File("sub/bootstrap", 0o644, b"not run"),
                Entry::File("setuid", 0o4755, b"x"),
            ],
        );
        let function_dir = tmp.path().join("functions");
        let dir = resolve_zip_file(&archive, &function_dir).unwrap();

        let version = versions(&function_dir);
        assert_eq!(version.len(), 1, "{version:?}");
        assert_eq!(version[0].len(), VERSION_HEX_LEN);
        let expected = function_dir.join("default/hello/code").join(&version[0]);
        assert_eq!(dir, fs::canonicalize(expected).unwrap());
        assert_eq!(fs::read(dir.join("lib/data.txt")).unwrap(), b"data");
        assert_eq!(mode_of(&dir.join("scf_bootstrap")), "755");
        assert_eq!(mode_of(&dir.join("lib/data.txt")), "640");
        assert_eq!(
            mode_of(&dir.join("bootstrap")),
            "755",
            "root bootstrap made executable"
        );
        assert_eq!(
            mode_of(&dir.join("sub/bootstrap")),
            "644",
            "only the root one"
        );
        assert_eq!(mode_of(&dir.join("setuid")), "755", "setuid bit dropped");
    }

    #[test]
    fn same_zip_reused() {
        let tmp = tempfile::tempdir().unwrap();
        let archive = tmp.path().join("app.zip");
        write_zip(&archive, &[Entry::File("scf_bootstrap", 0o755, b"v1")]);
        let function_dir = tmp.path().join("functions");
        let first = resolve_zip_file(&archive, &function_dir).unwrap();

        // Unpacking again would create and rename a staging directory in `code`, which moves
        // its mtime away from this past value.
        let code_dir = function_dir.join("default/hello/code");
        let past = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        File::open(&code_dir).unwrap().set_modified(past).unwrap();
        let second = resolve_zip_file(&archive, &function_dir).unwrap();
        assert_eq!(first, second);
        assert_eq!(fs::metadata(&code_dir).unwrap().modified().unwrap(), past);

        write_zip(&archive, &[Entry::File("scf_bootstrap", 0o755, b"v2")]);
        let third = resolve_zip_file(&archive, &function_dir).unwrap();
        assert_ne!(first, third, "new content gets a new version");
        assert_eq!(fs::read(third.join("scf_bootstrap")).unwrap(), b"v2");
        assert_eq!(fs::read(first.join("scf_bootstrap")).unwrap(), b"v1");
    }

    #[test]
    fn concurrent_resolves_share_version() {
        let tmp = tempfile::tempdir().unwrap();
        let archive = tmp.path().join("app.zip");
        let payload = vec![7u8; 256 * 1024];
        write_zip(&archive, &[Entry::File("data", 0o644, &payload)]);
        let function_dir = tmp.path().join("functions");
        let barrier = std::sync::Barrier::new(4);

        let dirs: Vec<PathBuf> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..4)
                .map(|_| {
                    scope.spawn(|| {
                        barrier.wait();
                        resolve_zip_file(&archive, &function_dir).unwrap()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(dirs.iter().all(|d| *d == dirs[0]), "{dirs:?}");
        assert_eq!(
            versions(&function_dir).len(),
            1,
            "no staging directory left behind"
        );
        assert_eq!(fs::read(dirs[0].join("data")).unwrap(), payload);
    }

    #[test]
    fn zip_slip_rejected() {
        let tmp = tempfile::tempdir().unwrap();
        let archive = tmp.path().join("app.zip");
        write_zip(
            &archive,
            &[
                Entry::File("ok.txt", 0o644, b"ok"),
                Entry::File("../evil", 0o644, b"evil"),
            ],
        );
        let function_dir = tmp.path().join("functions");
        let message = code_message(resolve_zip_file(&archive, &function_dir));
        assert!(message.contains("\"../evil\""), "{message}");
        assert!(message.contains("outside the archive root"), "{message}");
        assert!(
            versions(&function_dir).is_empty(),
            "staging directory removed"
        );
        let code_dir = function_dir.join("default/hello/code");
        assert!(!code_dir.join("../evil").exists());
        assert!(!code_dir.join("evil").exists());
    }

    #[test]
    fn inner_parent_dir_allowed() {
        let tmp = tempfile::tempdir().unwrap();
        let archive = tmp.path().join("app.zip");
        write_zip(&archive, &[Entry::File("a/../b.txt", 0o644, b"b")]);
        let dir = resolve_zip_file(&archive, &tmp.path().join("functions")).unwrap();
        assert_eq!(fs::read(dir.join("b.txt")).unwrap(), b"b");
    }

    #[test]
    fn symlinks_inside_root_kept() {
        let tmp = tempfile::tempdir().unwrap();
        let archive = tmp.path().join("app.zip");
        write_zip(
            &archive,
            &[
                Entry::File("pkg/bin/tool", 0o755, b"tool"),
                Entry::Symlink("bin/tool", "../pkg/bin/tool"),
            ],
        );
        let dir = resolve_zip_file(&archive, &tmp.path().join("functions")).unwrap();
        let link = dir.join("bin/tool");
        assert!(fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink());
        assert_eq!(fs::read(link).unwrap(), b"tool");
    }

    #[test]
    fn escaping_symlinks_rejected() {
        let cases: [&[Entry<'_>]; 4] = [
            &[Entry::Symlink("etc", "/etc")],
            &[Entry::Symlink("up", "../..")],
            &[Entry::Symlink("a/up", "../../x")],
            // `d` is the root itself, so `d/..` is the root's parent though it reads as the root.
            &[Entry::Symlink("d", "."), Entry::Symlink("l", "d/..")],
        ];
        for entries in cases {
            let tmp = tempfile::tempdir().unwrap();
            let archive = tmp.path().join("app.zip");
            write_zip(&archive, entries);
            let function_dir = tmp.path().join("functions");
            let message = code_message(resolve_zip_file(&archive, &function_dir));
            assert!(message.contains("symlink"), "{message}");
            assert!(
                versions(&function_dir).is_empty(),
                "staging directory removed"
            );
        }
    }

    #[test]
    fn file_below_symlink_rejected() {
        let tmp = tempfile::tempdir().unwrap();
        let archive = tmp.path().join("app.zip");
        write_zip(
            &archive,
            &[Entry::Symlink("d", "."), Entry::Symlink("d/l", "..")],
        );
        let message = code_message(resolve_zip_file(&archive, &tmp.path().join("functions")));
        assert!(
            message.contains("passes through another symlink"),
            "{message}"
        );
    }

    #[test]
    fn corrupt_zip_rejected() {
        let tmp = tempfile::tempdir().unwrap();
        let archive = tmp.path().join("app.zip");
        fs::write(&archive, b"this is not a zip archive").unwrap();
        let function_dir = tmp.path().join("functions");
        let message = code_message(resolve_zip_file(&archive, &function_dir));
        assert!(message.contains("not a valid zip archive"), "{message}");
    }

    #[test]
    fn corrupt_entry_data_rejected() {
        let tmp = tempfile::tempdir().unwrap();
        let archive = tmp.path().join("app.zip");
        let payload = b"0123456789".repeat(1000);
        write_zip(&archive, &[Entry::File("data", 0o644, &payload)]);
        // Flip bytes in the middle of the compressed data; the central directory at the end
        // stays intact, so the archive opens and reading the entry fails.
        let mut bytes = fs::read(&archive).unwrap();
        let middle = bytes.len() / 4;
        for byte in &mut bytes[middle..middle + 8] {
            *byte ^= 0xff;
        }
        fs::write(&archive, bytes).unwrap();
        let function_dir = tmp.path().join("functions");
        let message = code_message(resolve_zip_file(&archive, &function_dir));
        assert!(message.contains("\"data\""), "{message}");
        assert!(
            versions(&function_dir).is_empty(),
            "staging directory removed"
        );
    }

    #[test]
    fn archive_limits_enforced() {
        let tmp = tempfile::tempdir().unwrap();
        let archive = tmp.path().join("app.zip");
        write_zip(
            &archive,
            &[
                Entry::File("a", 0o644, &[0u8; 600]),
                Entry::File("b", 0o644, &[0u8; 600]),
            ],
        );
        let function_dir = tmp.path().join("functions");
        let resolve_with =
            |limits| resolve_zip(&archive, &function_dir, "default", "hello", limits);

        let small = Limits {
            max_bytes: 1_000,
            max_entries: 10,
        };
        let message = code_message(resolve_with(small));
        assert!(
            message.contains("more than the limit of 1000 bytes"),
            "{message}"
        );
        let few = Limits {
            max_bytes: 10_000,
            max_entries: 1,
        };
        let message = code_message(resolve_with(few));
        assert!(message.contains("more than the limit of 1"), "{message}");
        assert!(resolve_with(Limits {
            max_bytes: 1_200,
            max_entries: 2
        })
        .is_ok());
    }

    #[test]
    fn write_budget_counts_real_bytes() {
        let tmp = tempfile::tempdir().unwrap();
        let archive = tmp.path().join("app.zip");
        write_zip(&archive, &[Entry::File("a", 0o644, &[0u8; 600])]);
        let mut zip = ZipArchive::new(File::open(&archive).unwrap()).unwrap();
        let mut entry = zip.by_index(0).unwrap();
        let limits = Limits {
            max_bytes: 599,
            max_entries: 1,
        };
        let error = write_file(&mut entry, &tmp.path().join("out"), 599, limits).unwrap_err();
        assert!(
            error.contains("more than the limit of 599 bytes"),
            "{error}"
        );
    }

    #[test]
    fn bad_function_name_rejected() {
        let tmp = tempfile::tempdir().unwrap();
        let archive = tmp.path().join("app.zip");
        write_zip(&archive, &[Entry::File("a", 0o644, b"a")]);
        let source = CodeSource::ZipFile(archive);
        for name in ["..", "a/b", ""] {
            let result = resolve(&source, tmp.path(), "default", name);
            assert!(
                matches!(result, Err(PlatformError::Internal(_))),
                "{name:?}: {result:?}"
            );
        }
    }
}
