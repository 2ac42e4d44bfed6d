//! Unpacks a zip archive into a directory, defending against archives that would write
//! outside it (absolute paths, `..`, symlinks), exhaust the disk (zip bombs), or contain two
//! entries for one path, of which only one could be unpacked.
//!
//! Naming, staging and renaming the unpacked version is left to the parent module.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Read, Seek};
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use zip::read::ZipFile;
use zip::ZipArchive;

use super::{MAX_ENTRIES, MAX_UNPACKED_BYTES};

/// Maximum length of a symlink target read from an archive, Linux's PATH_MAX.
const MAX_SYMLINK_TARGET: u64 = 4096;
/// Root-level files the platform executes, so they are made executable whatever mode the
/// archive sets.
const BOOTSTRAP_NAMES: [&str; 2] = ["scf_bootstrap", "bootstrap"];

/// Bounds on what one archive may unpack to; tests use smaller ones.
#[derive(Debug, Clone, Copy)]
pub(super) struct Limits {
    pub(super) max_bytes: u64,
    pub(super) max_entries: usize,
}

pub(super) const LIMITS: Limits = Limits {
    max_bytes: MAX_UNPACKED_BYTES,
    max_entries: MAX_ENTRIES,
};

/// Unpacks every entry of the archive under `root`. Symlinks are created last, so no file is
/// ever written through one. Errors are messages about the archive, for `PlatformError::Code`.
pub(super) fn unpack(file: File, root: &Path, limits: Limits) -> Result<(), String> {
    let mut archive = ZipArchive::new(&file)
        .map_err(|e| format!("is not a valid zip archive ({e}); rebuild it with `zip -r`"))?;
    check_archive_size(&archive, limits)?;
    check_duplicate_names(&file, &archive, limits)?;

    let mut budget = limits.max_bytes;
    let mut symlinks = Vec::new();
    // Name and whether it is a directory, of the first entry for each unpacked path.
    let mut claimed: HashMap<PathBuf, (String, bool)> = HashMap::new();
    for index in 0..archive.len() {
        let mut entry = archive
            .by_index(index)
            .map_err(|e| format!("entry {index} cannot be read: {e}"))?;
        let Some(relative) = entry_path(&entry) else {
            return Err(format!(
                "entry {:?} points outside the archive root (an absolute path or too many \
                 '..'); rebuild the archive with relative paths",
                entry.name()
            ));
        };
        if relative.as_os_str().is_empty() {
            continue;
        }
        let is_dir = entry.is_dir();
        match claimed.get(&relative) {
            // Repeated directory entries, such as `a/` and `./a/`, create the same directory.
            Some((_, true)) if is_dir => {}
            Some((first, _)) => {
                return Err(format!(
                    "entries {first:?} and {:?} both unpack to {}; keep one of them",
                    entry.name(),
                    quoted(&relative)
                ));
            }
            None => {
                claimed.insert(relative.clone(), (entry.name().to_owned(), is_dir));
            }
        }
        let out = root.join(&relative);
        if is_dir {
            fs::create_dir_all(&out).map_err(|e| entry_io_error(&entry, e))?;
        } else if entry.is_symlink() {
            let mut target = String::new();
            (&mut entry)
                .take(MAX_SYMLINK_TARGET)
                .read_to_string(&mut target)
                .map_err(|e| entry_io_error(&entry, e))?;
            symlinks.push((relative, target));
        } else {
            let written = write_file(&mut entry, &out, budget, limits)?;
            budget -= written;
            let mode = file_mode(entry.unix_mode(), &relative);
            fs::set_permissions(&out, fs::Permissions::from_mode(mode))
                .map_err(|e| entry_io_error(&entry, e))?;
        }
    }
    create_symlinks(root, &symlinks)
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

/// Rejects an archive whose central directory lists one entry name twice. The zip crate (2.6)
/// keys entries by name and keeps only the last of the repeats, so `ZipArchive` never shows
/// them. This function reads the central directory records itself.
fn check_duplicate_names(
    file: &File,
    archive: &ZipArchive<&File>,
    limits: Limits,
) -> Result<(), String> {
    let unreadable = |e: io::Error| format!("central directory cannot be read: {e}");
    let mut reader = BufReader::new(ReadAt {
        file,
        offset: archive.central_directory_start(),
    });
    let mut names: HashSet<Vec<u8>> = HashSet::new();
    let mut records = 0usize;
    while let Some(name) = next_central_name(&mut reader).map_err(unreadable)? {
        records += 1;
        if !names.insert(name.clone()) {
            return Err(format!(
                "entry {:?} appears twice in the archive; rebuild it so that each path appears \
                 once",
                String::from_utf8_lossy(&name)
            ));
        }
        // `check_archive_size` bounded the distinct names; this bounds the walk.
        if records > limits.max_entries {
            break;
        }
    }
    // The zip crate may decode two different byte strings to one name, for example through a
    // Unicode path extra field, so count the records too.
    if records > archive.len() {
        return Err(format!(
            "central directory has {records} entries but only {} distinct names, so some entry \
             name appears twice; rebuild the archive so that each path appears once",
            archive.len()
        ));
    }
    Ok(())
}

/// Signature of a central directory file header (APPNOTE.TXT 4.3.12), little-endian.
const CENTRAL_HEADER_SIGNATURE: u32 = 0x0201_4b50;
/// Length of a central directory file header before its variable-length fields.
const CENTRAL_HEADER_LEN: usize = 46;

/// Reads one central directory file header and returns its raw name, or None at the first
/// record of another kind (the end of central directory record follows the last header).
fn next_central_name(reader: &mut impl Read) -> io::Result<Option<Vec<u8>>> {
    let mut header = [0u8; CENTRAL_HEADER_LEN];
    if let Err(e) = reader.read_exact(&mut header) {
        return match e.kind() {
            io::ErrorKind::UnexpectedEof => Ok(None),
            _ => Err(e),
        };
    }
    let field = |at: usize| u16::from_le_bytes([header[at], header[at + 1]]);
    let signature = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    if signature != CENTRAL_HEADER_SIGNATURE {
        return Ok(None);
    }
    // Name, extra field and comment lengths sit at offsets 28, 30 and 32.
    let mut name = vec![0u8; usize::from(field(28))];
    reader.read_exact(&mut name)?;
    let skip = u64::from(field(30)) + u64::from(field(32));
    let skipped = io::copy(&mut reader.take(skip), &mut io::sink())?;
    if skipped < skip {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok(Some(name))
}

/// Reads a file from an offset with positioned reads, leaving the file's cursor to the
/// `ZipArchive` that shares it.
struct ReadAt<'a> {
    file: &'a File,
    offset: u64,
}

impl Read for ReadAt<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let read = self.file.read_at(buf, self.offset)?;
        self.offset += read as u64;
        Ok(read)
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
pub(super) fn write_file<R: Read>(
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
                format!(
                    "entry {:?} cannot be unpacked: an earlier entry already created its path",
                    entry.name()
                )
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
/// check is lexical, which is exact only on real directories. So neither the link's own path nor
/// its target may pass through another of the archive's symlinks, though a target may name one.
pub(super) fn check_symlink(
    links: &HashSet<&Path>,
    relative: &Path,
    target: &str,
) -> Result<(), String> {
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
