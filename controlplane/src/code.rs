//! Resolves a function's code source to a directory on this machine, and checks that the
//! directory has the executable the function's kind starts.
//!
//! A directory source is used in place. A zip archive is unpacked once per content digest, to
//! `<function_dir>/<namespace>/<function>/code/<first 16 hex digits of its SHA-256>/`. It is
//! unpacked into a staging directory beside that path and renamed into place, so readers never
//! see a partly unpacked version. A repeated or concurrent resolve of the same archive reuses the
//! unpacked copy. The archive is unpacked as it is, so a single top-level directory is kept.
//!
//! Each archive is also kept, content-addressed, at `<function_dir>/packages/<SHA-256>.zip`, from
//! where the control-plane API serves it to node agents; [`install_package`] is the agent's side.
//!
//! Left to others: removing versions no longer used (the node agent), and running this blocking
//! code off the async runtime (the caller).

mod entrypoint;
#[cfg(test)]
mod tests;
mod unzip;

pub use entrypoint::check_entrypoint;

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

/// A resolved code directory, with what resolving it created on disk.
#[derive(Debug)]
#[must_use = "a code directory that is not used should be discarded"]
pub struct CodeDir {
    /// Canonical directory that contains the function's code.
    pub path: PathBuf,
    /// SHA-256 of the zip archive, as 64 hex digits; `None` for a directory source.
    pub digest: Option<String>,
    /// Directories this resolve created to hold the unpacked version, outermost first.
    created: Vec<PathBuf>,
    /// Whether this resolve unpacked `path` itself, rather than reusing an unpacked version.
    unpacked: bool,
    /// The package this resolve stored, if it was not stored before.
    package: Option<PathBuf>,
}

impl CodeDir {
    /// Removes the version this resolve unpacked, and the directories it created for it if they
    /// are empty. For code rejected after it was resolved. A version that an earlier resolve
    /// unpacked is kept, because a running function may use it.
    pub fn discard(self) {
        remove_rejected(
            &self.path,
            self.unpacked,
            &self.created,
            self.package.as_slice(),
        );
    }
}

/// Removes what a rejected resolve created: the directory at `path` if it unpacked it, the
/// directories it created if they are empty, and the packages it stored.
fn remove_rejected(path: &Path, unpacked: bool, created: &[PathBuf], packages: &[PathBuf]) {
    if unpacked {
        if let Err(e) = fs::remove_dir_all(path) {
            tracing::warn!(path = %path.display(), error = %e, "failed to remove a rejected version");
        }
    }
    remove_empty_dirs(created);
    remove_packages(packages);
}

/// Rejects a zip path that names something other than a regular file (after symlinks), such
/// as a FIFO, whose open or read could block the request forever. A missing path is left to
/// the open, which names it.
fn check_regular_file(path: &Path, field: &str) -> Result<(), PlatformError> {
    match fs::metadata(path) {
        Ok(meta) if !meta.is_file() => Err(code_error(
            path,
            format!("is not a regular file; check {field}"),
        )),
        _ => Ok(()),
    }
}

/// Removes packages that a rejected resolve stored, so they are not served.
fn remove_packages(packages: &[PathBuf]) {
    for package in packages {
        if let Err(e) = fs::remove_file(package) {
            tracing::warn!(path = %package.display(), error = %e, "failed to remove a rejected package");
        }
    }
}

/// Resolves `source` to the directory that contains the function's code. Blocking.
pub fn resolve(
    source: &CodeSource,
    function_dir: &Path,
    namespace: &str,
    function: &str,
) -> Result<CodeDir, PlatformError> {
    match source {
        CodeSource::Directory(dir) => Ok(CodeDir {
            path: resolve_directory(dir)?,
            digest: None,
            created: Vec::new(),
            unpacked: false,
            package: None,
        }),
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
) -> Result<CodeDir, PlatformError> {
    check_path_component(namespace)?;
    check_path_component(function)?;
    check_regular_file(archive_path, "code.zip_file")?;
    let mut file = File::open(archive_path).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => {
            code_error(archive_path, "zip file not found; check code.zip_file")
        }
        _ => code_error(archive_path, format!("cannot be opened: {e}")),
    })?;
    let digest = sha256_hex(&mut file).map_err(|e| code_error(archive_path, e.to_string()))?;
    let package = store_package(&mut file, function_dir, &digest)
        .map_err(|message| code_error(archive_path, message))?;

    let namespace_dir = function_dir.join(namespace);
    let versions = namespace_dir.join(function).join("code");
    let target = versions.join(&digest[..VERSION_HEX_LEN]);
    let mut created = Vec::new();
    let mut unpacked = false;
    if !target.is_dir() {
        created = missing_dirs(&namespace_dir, &versions);
        let result = fs::create_dir_all(&versions)
            .map_err(|e| format!("cannot create {}: {e}", versions.display()))
            .and_then(|()| unpack_version(file, &versions, &target, limits));
        match result {
            Ok(renamed) => unpacked = renamed,
            Err(message) => {
                remove_empty_dirs(&created);
                remove_packages(package.as_slice());
                return Err(code_error(archive_path, message));
            }
        }
    }

    let path = fs::canonicalize(&target)
        .map_err(|e| code_error(archive_path, format!("{}: {e}", target.display())))?;
    Ok(CodeDir {
        path,
        digest: Some(digest),
        created,
        unpacked,
        package,
    })
}

/// A function's layers merged into one directory, with what resolving it created on disk.
#[derive(Debug)]
#[must_use = "a layer directory that is not used should be discarded"]
pub struct LayerDir {
    /// Canonical directory with the merged layers.
    pub path: PathBuf,
    /// SHA-256 of each layer's zip archive, in the function's order.
    pub digests: Vec<String>,
    created: Vec<PathBuf>,
    unpacked: bool,
    /// The packages this resolve stored, which were not stored before.
    packages: Vec<PathBuf>,
}

impl LayerDir {
    /// Removes the merged directory this resolve created, as [`CodeDir::discard`] does.
    pub fn discard(self) {
        remove_rejected(&self.path, self.unpacked, &self.created, &self.packages);
    }
}

/// Path of a function's merged layers relative to a function directory:
/// `<namespace>/<function>/layers/<16 hex digits>`, named by the SHA-256 of the layers'
/// digests in order, so the same layers in another order are another directory.
pub fn layers_path(namespace: &str, function: &str, digests: &[String]) -> PathBuf {
    let set = Sha256::digest(digests.join("\n").as_bytes());
    let name: String = set.iter().map(|b| format!("{b:02x}")).collect();
    Path::new(namespace)
        .join(function)
        .join("layers")
        .join(&name[..VERSION_HEX_LEN])
}

/// Resolves a function's layers (zip archives) to one directory: each is stored as a package,
/// as code is, and unpacked in order into a staging directory, a later layer's files replacing
/// an earlier one's, which is then renamed into place. `None` without layers. Blocking.
pub fn resolve_layers(
    layers: &[crate::model::Layer],
    function_dir: &Path,
    namespace: &str,
    function: &str,
) -> Result<Option<LayerDir>, PlatformError> {
    if layers.is_empty() {
        return Ok(None);
    }
    check_path_component(namespace)?;
    check_path_component(function)?;
    let mut files = Vec::with_capacity(layers.len());
    let mut digests = Vec::with_capacity(layers.len());
    let mut packages = Vec::new();
    for (index, layer) in layers.iter().enumerate() {
        let path = &layer.zip_file;
        let opened =
            check_regular_file(path, &format!("layers[{index}].zip_file")).and_then(|()| {
                File::open(path).map_err(|e| match e.kind() {
                    io::ErrorKind::NotFound => code_error(
                        path,
                        format!("zip file not found; check layers[{index}].zip_file"),
                    ),
                    _ => code_error(path, format!("cannot be opened: {e}")),
                })
            });
        let stored = opened.and_then(|mut file| {
            let digest = sha256_hex(&mut file).map_err(|e| code_error(path, e))?;
            let package =
                store_package(&mut file, function_dir, &digest).map_err(|e| code_error(path, e))?;
            Ok((file, digest, package))
        });
        match stored {
            Ok((file, digest, package)) => {
                files.push(file);
                digests.push(digest);
                packages.extend(package);
            }
            Err(error) => {
                remove_packages(&packages);
                return Err(error);
            }
        }
    }

    let version = layers_path(namespace, function, &digests);
    let target = function_dir.join(&version);
    let parent = target.parent().expect("a layers path has a parent");
    let mut created = Vec::new();
    let mut unpacked = false;
    if !target.is_dir() {
        created = missing_dirs(&function_dir.join(namespace), parent);
        let result = fs::create_dir_all(parent)
            .map_err(|e| (None, format!("cannot create {}: {e}", parent.display())))
            .and_then(|()| unpack_layers(files, parent, &target, unzip::LIMITS));
        match result {
            Ok(renamed) => unpacked = renamed,
            Err((index, message)) => {
                remove_empty_dirs(&created);
                remove_packages(&packages);
                return Err(match index {
                    Some(index) => code_error(
                        &layers[index].zip_file,
                        format!("layers[{index}].zip_file: {message}"),
                    ),
                    None => PlatformError::invalid("layers", message),
                });
            }
        }
    }
    let path = fs::canonicalize(&target)
        .map_err(|e| PlatformError::Internal(format!("{}: {e}", target.display())))?;
    Ok(Some(LayerDir {
        path,
        digests,
        created,
        unpacked,
        packages,
    }))
}

/// Unpacks each layer into a staging directory of its own and merges them, in order, into one
/// staging directory, which is renamed to `target`. Returns false if a concurrent resolve put
/// the same layers there first. An error carries the index of the layer at fault, if one is.
fn unpack_layers(
    files: Vec<File>,
    parent: &Path,
    target: &Path,
    limits: unzip::Limits,
) -> Result<bool, (Option<usize>, String)> {
    let name = target.file_name().unwrap_or_default().to_string_lossy();
    let merged = StagingDir::create(parent, &name).map_err(|e| (None, e))?;
    for (index, mut file) in files.into_iter().enumerate() {
        let at = |message: String| (Some(index), message);
        let layer = StagingDir::create(parent, &format!("{name}.layer{index}")).map_err(at)?;
        file.seek(SeekFrom::Start(0))
            .map_err(|e| at(format!("cannot be read: {e}")))?;
        unzip::unpack(file, layer.path(), limits).map_err(at)?;
        merge_tree(layer.path(), merged.path(), Path::new("")).map_err(at)?;
    }
    // Each layer's symlinks stay inside that layer, but a symlink of one layer may lead through
    // another layer's symlink out of the merged tree, so they are checked again together.
    let mut links = Vec::new();
    collect_symlinks(merged.path(), Path::new(""), &mut links).map_err(|e| (None, e))?;
    let paths: std::collections::HashSet<&Path> =
        links.iter().map(|(path, _)| path.as_path()).collect();
    for (path, target) in &links {
        unzip::check_symlink(&paths, path, target)
            .map_err(|e| (None, format!("merged layers: {e}")))?;
    }
    merged.commit(target).map_err(|e| (None, e))
}

/// Lists the symlinks under `root` at `relative`, with their targets, relative to `root`.
fn collect_symlinks(
    root: &Path,
    relative: &Path,
    links: &mut Vec<(PathBuf, String)>,
) -> Result<(), String> {
    let read = |e: io::Error| format!("{} cannot be read: {e}", quoted(relative));
    for entry in fs::read_dir(root.join(relative)).map_err(read)? {
        let entry = entry.map_err(read)?;
        let path = relative.join(entry.file_name());
        let kind = entry.file_type().map_err(read)?;
        if kind.is_symlink() {
            let target = fs::read_link(root.join(&path)).map_err(read)?;
            links.push((path, target.to_string_lossy().into_owned()));
        } else if kind.is_dir() {
            collect_symlinks(root, &path, links)?;
        }
    }
    Ok(())
}

/// Copies the tree under `from` into `into` at `relative`, replacing files and symlinks of the
/// same path. A directory where the other tree has a file or a symlink, or the reverse, is an
/// error: replacing it would drop files, and writing through a symlink could leave the tree.
fn merge_tree(from: &Path, into: &Path, relative: &Path) -> Result<(), String> {
    let read = |e: io::Error, path: &Path| format!("{} cannot be read: {e}", quoted(path));
    let entries = fs::read_dir(from.join(relative)).map_err(|e| read(e, relative))?;
    for entry in entries {
        let entry = entry.map_err(|e| read(e, relative))?;
        let path = relative.join(entry.file_name());
        let source = from.join(&path);
        let dest = into.join(&path);
        let kind = fs::symlink_metadata(&source)
            .map_err(|e| read(e, &path))?
            .file_type();
        let existing = fs::symlink_metadata(&dest)
            .ok()
            .map(|meta| meta.file_type());
        let conflict = || {
            format!(
                "{} is a directory in one layer and a file or symlink in another; layers may \
                 replace files, not directories",
                quoted(&path)
            )
        };
        let write = |e: io::Error| format!("{} cannot be written: {e}", quoted(&path));
        if kind.is_dir() {
            match existing {
                None => fs::create_dir(&dest).map_err(write)?,
                Some(existing) if existing.is_dir() => {}
                Some(_) => return Err(conflict()),
            }
            merge_tree(from, into, &path)?;
            continue;
        }
        match existing {
            Some(existing) if existing.is_dir() => return Err(conflict()),
            Some(_) => fs::remove_file(&dest).map_err(write)?,
            None => {}
        }
        if kind.is_symlink() {
            let link = fs::read_link(&source).map_err(|e| read(e, &path))?;
            std::os::unix::fs::symlink(link, &dest).map_err(write)?;
        } else {
            fs::copy(&source, &dest).map_err(write)?;
        }
    }
    Ok(())
}

fn quoted(path: &Path) -> String {
    format!("{:?}", path.display().to_string())
}

/// Path of the stored package with SHA-256 `digest` (64 hex digits).
pub fn package_path(function_dir: &Path, digest: &str) -> PathBuf {
    function_dir.join("packages").join(format!("{digest}.zip"))
}

/// Returns whether `value` is a SHA-256 digest written as 64 lowercase hex digits.
pub fn is_sha256_hex(value: &str) -> bool {
    value.len() == 64
        && value
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Path of an unpacked version relative to a function directory:
/// `<namespace>/<function>/code/<first 16 hex digits of the digest>`.
pub fn version_path(namespace: &str, function: &str, digest: &str) -> PathBuf {
    Path::new(namespace)
        .join(function)
        .join("code")
        .join(&digest[..VERSION_HEX_LEN])
}

/// Copies the archive to its content-addressed place unless an intact copy is there already.
/// A stored copy whose content no longer matches its name is replaced, so deploying the
/// archive again repairs it. Written to a temporary name and renamed, so a reader never sees a
/// partial package.
/// Returns the path of the package when this call stored it and no intact copy was there.
fn store_package(
    file: &mut File,
    function_dir: &Path,
    digest: &str,
) -> Result<Option<PathBuf>, String> {
    let path = package_path(function_dir, digest);
    if path.is_file() {
        let stored = File::open(&path)
            .map_err(|e| e.to_string())
            .and_then(|mut stored| sha256_hex(&mut stored));
        if stored.as_deref() == Ok(digest) {
            return Ok(None);
        }
        tracing::warn!(path = %path.display(), "stored package does not match its digest; replacing it");
    }
    let dir = path.parent().expect("a package path has a parent");
    fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let partial = dir.join(format!(
        ".{digest}.{}.{}.partial",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let result = (|| {
        file.seek(SeekFrom::Start(0))?;
        let mut out = File::create(&partial)?;
        io::copy(file, &mut out)?;
        out.sync_all()?;
        fs::rename(&partial, &path)
    })();
    if let Err(e) = result {
        let _ = fs::remove_file(&partial);
        return Err(format!(
            "cannot store the package at {}: {e}",
            path.display()
        ));
    }
    Ok(Some(path))
}

/// Unpacks a fetched package into `<function_dir>/<version>`, checking its SHA-256 against
/// `digest` first and refusing a `version` that is not [`version_path`] of it. The archive is
/// unpacked beside the target and renamed into place. Returns false if the version was present.
/// Blocking; for the node agent.
pub fn install_package(
    mut archive: File,
    function_dir: &Path,
    version: &Path,
    digest: &str,
) -> Result<bool, String> {
    if !is_sha256_hex(digest) {
        return Err(format!(
            "invalid digest {digest:?}: expected 64 lowercase hex digits"
        ));
    }
    let components: Vec<&str> = version
        .components()
        .map(|c| match c {
            Component::Normal(part) => part.to_str().unwrap_or(""),
            _ => "",
        })
        .collect();
    let valid = matches!(components.as_slice(),
        [namespace, function, "code", name]
            if !namespace.is_empty() && !function.is_empty() && *name == &digest[..VERSION_HEX_LEN]);
    if !valid {
        return Err(format!(
            "invalid version path {}: expected <namespace>/<function>/code/{}",
            version.display(),
            &digest[..VERSION_HEX_LEN]
        ));
    }
    let actual = sha256_hex(&mut archive)?;
    if actual != digest {
        return Err(format!(
            "package digest mismatch: expected sha256 {digest}, got {actual}; the package is \
             corrupt or was replaced, so it is not unpacked"
        ));
    }
    let target = function_dir.join(version);
    if target.is_dir() {
        return Ok(false);
    }
    let versions = target.parent().expect("a version path has a parent");
    fs::create_dir_all(versions)
        .map_err(|e| format!("cannot create {}: {e}", versions.display()))?;
    unpack_version(archive, versions, &target, unzip::LIMITS)
}

/// Unpacks fetched layer packages into `<function_dir>/<version>`, as [`resolve_layers`] does,
/// after checking each archive's SHA-256 against `digests` and that `version` is
/// [`layers_path`] of them. Returns false if the layers were present. Blocking; for the node
/// agent.
pub fn install_layers(
    mut archives: Vec<File>,
    function_dir: &Path,
    version: &Path,
    digests: &[String],
) -> Result<bool, String> {
    if digests.is_empty() || archives.len() != digests.len() {
        return Err(format!(
            "{} layer packages for {} digests",
            archives.len(),
            digests.len()
        ));
    }
    if let Some(digest) = digests.iter().find(|digest| !is_sha256_hex(digest)) {
        return Err(format!(
            "invalid digest {digest:?}: expected 64 lowercase hex digits"
        ));
    }
    let components: Vec<&str> = version
        .components()
        .map(|c| match c {
            Component::Normal(part) => part.to_str().unwrap_or(""),
            _ => "",
        })
        .collect();
    let valid = match components.as_slice() {
        [namespace, function, "layers", _] if !namespace.is_empty() && !function.is_empty() => {
            layers_path(namespace, function, digests) == version
        }
        _ => false,
    };
    if !valid {
        return Err(format!(
            "invalid layers path {}: expected <namespace>/<function>/layers/<16 hex digits of \
             the layers' digests>",
            version.display()
        ));
    }
    for (index, (archive, digest)) in archives.iter_mut().zip(digests).enumerate() {
        let actual = sha256_hex(archive)?;
        if actual != *digest {
            return Err(format!(
                "layer {index} digest mismatch: expected sha256 {digest}, got {actual}; the \
                 package is corrupt or was replaced, so it is not unpacked"
            ));
        }
    }
    let target = function_dir.join(version);
    if target.is_dir() {
        return Ok(false);
    }
    let parent = target.parent().expect("a layers path has a parent");
    fs::create_dir_all(parent).map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
    unpack_layers(archives, parent, &target, unzip::LIMITS).map_err(
        |(index, message)| match index {
            Some(index) => format!("layer {index}: {message}"),
            None => message,
        },
    )
}

/// Unpacks the archive into a staging directory in `versions` and renames it to `target`.
/// Returns false if a concurrent resolve put the same version there first.
fn unpack_version(
    mut file: File,
    versions: &Path,
    target: &Path,
    limits: unzip::Limits,
) -> Result<bool, String> {
    let version = target.file_name().unwrap_or_default().to_string_lossy();
    let staging = StagingDir::create(versions, &version)?;
    file.seek(SeekFrom::Start(0))
        .map_err(|e| format!("cannot be read: {e}"))?;
    unzip::unpack(file, staging.path(), limits)?;
    staging.commit(target)
}

/// Returns `leaf` and those of its ancestors up to `top` that do not exist, outermost first.
fn missing_dirs(top: &Path, leaf: &Path) -> Vec<PathBuf> {
    let mut missing: Vec<PathBuf> = leaf
        .ancestors()
        .take_while(|dir| dir.starts_with(top))
        .filter(|dir| !dir.exists())
        .map(Path::to_path_buf)
        .collect();
    missing.reverse();
    missing
}

/// Removes `dirs` innermost first, each only if it is empty. A directory that something else
/// filled in the meantime is kept.
fn remove_empty_dirs(dirs: &[PathBuf]) {
    for dir in dirs.iter().rev() {
        match fs::remove_dir(dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) if e.kind() == io::ErrorKind::DirectoryNotEmpty => return,
            Err(e) => {
                tracing::warn!(path = %dir.display(), error = %e, "failed to remove empty code directory");
                return;
            }
        }
    }
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

    /// Renames the staging directory to `target` and returns true. If another resolve put the
    /// same version there first, returns false: that version is kept and this copy is removed
    /// on drop.
    fn commit(mut self, target: &Path) -> Result<bool, String> {
        match fs::rename(&self.path, target) {
            Ok(()) => {
                self.committed = true;
                Ok(true)
            }
            Err(_) if target.is_dir() => Ok(false),
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
