//! Resolving code sources: directories, zip archives and the archives that must be rejected.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, SystemTime};

use zip::write::SimpleFileOptions;
use zip::{ZipArchive, ZipWriter};

use super::unzip::{write_file, Limits};
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
    resolve(&source, function_dir, "default", "hello").map(|code| code.path)
}

fn code_message<T: std::fmt::Debug>(result: Result<T, PlatformError>) -> String {
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

/// Writes a zip with two stored entries named `name`, holding `first` and `second`.
/// `ZipWriter` rejects a repeated name, so the second entry is written under a placeholder name
/// of the same length, which is then replaced in the archive's bytes. No offset moves, and the
/// CRC covers only the data, so the archive stays valid.
fn write_zip_with_repeated_name(path: &Path, name: &str, first: &[u8], second: &[u8]) {
    let placeholder = format!("{}~", &name[..name.len() - 1]);
    assert_ne!(placeholder, name, "the name must not end with '~'");
    let options = SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Stored)
        .unix_permissions(0o755);
    let mut zip = ZipWriter::new(io::Cursor::new(Vec::new()));
    zip.start_file(name, options).unwrap();
    zip.write_all(first).unwrap();
    zip.start_file(placeholder.as_str(), options).unwrap();
    zip.write_all(second).unwrap();
    let mut bytes = zip.finish().unwrap().into_inner();

    let mut replaced = 0;
    let placeholder = placeholder.as_bytes();
    let mut at = 0;
    while let Some(found) = bytes[at..]
        .windows(placeholder.len())
        .position(|window| window == placeholder)
    {
        let start = at + found;
        bytes[start..start + placeholder.len()].copy_from_slice(name.as_bytes());
        replaced += 1;
        at = start + placeholder.len();
    }
    assert_eq!(
        replaced, 2,
        "the placeholder should appear in the local and the central header only"
    );
    fs::write(path, bytes).unwrap();
}

/// Lists the names in the function's `code` directory: the unpacked versions and any
/// staging directory left behind. A missing `code` directory counts as empty.
fn versions(function_dir: &Path) -> Vec<String> {
    let dir = function_dir.join("default/hello/code");
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Vec::new(),
        Err(e) => panic!("cannot list the code directory: {e}"),
    };
    let mut names: Vec<String> = entries
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
    let dir = resolve(&source, tmp.path(), "default", "hello")
        .unwrap()
        .path;
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
fn rejected_zip_leaves_no_directories() {
    let tmp = tempfile::tempdir().unwrap();
    let bad = tmp.path().join("bad.zip");
    write_zip(&bad, &[Entry::File("../evil", 0o644, b"evil")]);
    let function_dir = tmp.path().join("functions");
    code_message(resolve_zip_file(&bad, &function_dir));
    assert!(
        !function_dir.join("default").exists(),
        "namespace directory created for the rejected archive is removed"
    );
    let packages: Vec<_> = fs::read_dir(function_dir.join("packages"))
        .unwrap()
        .collect();
    assert!(packages.is_empty(), "rejected package kept: {packages:?}");

    // Directories that held a version before are kept.
    let good = tmp.path().join("good.zip");
    write_zip(&good, &[Entry::File("scf_bootstrap", 0o755, b"v1")]);
    resolve_zip_file(&good, &function_dir).unwrap();
    code_message(resolve_zip_file(&bad, &function_dir));
    assert_eq!(versions(&function_dir).len(), 1);
}

#[test]
fn discard_removes_only_new_version() {
    let tmp = tempfile::tempdir().unwrap();
    let archive = tmp.path().join("app.zip");
    write_zip(&archive, &[Entry::File("app.py", 0o644, b"print()")]);
    let function_dir = tmp.path().join("functions");
    let source = CodeSource::ZipFile(archive);

    let code = resolve(&source, &function_dir, "default", "hello").unwrap();
    code.discard();
    assert!(
        !function_dir.join("default").exists(),
        "the version and the directories created for it are removed"
    );

    let path = resolve(&source, &function_dir, "default", "hello")
        .unwrap()
        .path;
    let again = resolve(&source, &function_dir, "default", "hello").unwrap();
    assert_eq!(again.path, path);
    again.discard();
    assert!(
        path.join("app.py").is_file(),
        "a version unpacked by an earlier resolve is kept"
    );
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
fn symlink_below_symlink_rejected() {
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
fn repeated_entry_name_rejected() {
    let tmp = tempfile::tempdir().unwrap();
    let archive = tmp.path().join("app.zip");
    write_zip_with_repeated_name(
        &archive,
        "scf_bootstrap",
        b"#!/bin/sh\n",
        b"#!/bin/sh\nexit 1\n",
    );
    // The zip crate keeps one of the two, so it alone would unpack the archive without error.
    let zip = ZipArchive::new(File::open(&archive).unwrap()).unwrap();
    assert_eq!(zip.len(), 1);

    let function_dir = tmp.path().join("functions");
    let message = code_message(resolve_zip_file(&archive, &function_dir));
    assert!(message.contains("\"scf_bootstrap\""), "{message}");
    assert!(message.contains("appears twice"), "{message}");
    assert!(
        versions(&function_dir).is_empty(),
        "staging directory removed"
    );
}

#[test]
fn entries_with_same_path_rejected() {
    let cases: [(&[Entry<'_>], &str); 3] = [
        (
            &[
                Entry::File("app.py", 0o644, b"a"),
                Entry::File("./app.py", 0o644, b"b"),
            ],
            "\"app.py\" and \"./app.py\"",
        ),
        (
            &[
                Entry::File("lib/a", 0o644, b"a"),
                Entry::Symlink("lib/../lib/a", "b"),
            ],
            "\"lib/a\" and \"lib/../lib/a\"",
        ),
        (
            &[Entry::Dir("data/"), Entry::File("data", 0o644, b"d")],
            "\"data/\" and \"data\"",
        ),
    ];
    for (entries, names) in cases {
        let tmp = tempfile::tempdir().unwrap();
        let archive = tmp.path().join("app.zip");
        write_zip(&archive, entries);
        let function_dir = tmp.path().join("functions");
        let message = code_message(resolve_zip_file(&archive, &function_dir));
        assert!(message.contains(names), "{names}: {message}");
        assert!(message.contains("both unpack to"), "{names}: {message}");
        assert!(
            versions(&function_dir).is_empty(),
            "{names}: staging removed"
        );
    }
}

#[test]
fn repeated_directory_entries_allowed() {
    let tmp = tempfile::tempdir().unwrap();
    let archive = tmp.path().join("app.zip");
    write_zip(
        &archive,
        &[
            Entry::Dir("lib/"),
            Entry::Dir("./lib/"),
            Entry::File("lib/a", 0o644, b"a"),
        ],
    );
    let dir = resolve_zip_file(&archive, &tmp.path().join("functions")).unwrap();
    assert_eq!(fs::read(dir.join("lib/a")).unwrap(), b"a");
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
    // Flip bytes in the middle of the compressed data. The central directory at the end stays
    // intact, so the archive opens and only reading the entry fails.
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
    let resolve_with = |limits| resolve_zip(&archive, &function_dir, "default", "hello", limits);

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

fn layers(paths: &[&Path]) -> Vec<crate::model::Layer> {
    paths
        .iter()
        .map(|path| crate::model::Layer {
            zip_file: path.to_path_buf(),
        })
        .collect()
}

/// Layers merge in order: a later layer's file replaces an earlier one's, files of both stay,
/// modes and symlinks are kept, and the merged directory is reused for the same layers.
#[test]
fn layers_merged_in_order() {
    let tmp = tempfile::tempdir().unwrap();
    let (first, second) = (tmp.path().join("first.zip"), tmp.path().join("second.zip"));
    write_zip(
        &first,
        &[
            Entry::File("lib/shared.txt", 0o644, b"first"),
            Entry::File("lib/only-first.txt", 0o600, b"1"),
            Entry::File("bin/tool", 0o755, b"#!/bin/sh\n"),
        ],
    );
    write_zip(
        &second,
        &[
            Entry::File("lib/shared.txt", 0o644, b"second"),
            Entry::Symlink("lib/link", "shared.txt"),
        ],
    );
    let function_dir = tmp.path().join("data");
    let resolved = resolve_layers(
        &layers(&[&first, &second]),
        &function_dir,
        "default",
        "hello",
    )
    .unwrap()
    .expect("layers resolved");
    let dir = &resolved.path;
    assert_eq!(
        fs::read_to_string(dir.join("lib/shared.txt")).unwrap(),
        "second"
    );
    assert_eq!(
        fs::read_to_string(dir.join("lib/only-first.txt")).unwrap(),
        "1"
    );
    assert_eq!(mode_of(&dir.join("lib/only-first.txt")), "600");
    assert_eq!(mode_of(&dir.join("bin/tool")), "755");
    assert_eq!(fs::read_to_string(dir.join("lib/link")).unwrap(), "second");
    assert_eq!(resolved.digests.len(), 2);
    assert_eq!(
        dir,
        &fs::canonicalize(function_dir.join(layers_path("default", "hello", &resolved.digests)))
            .unwrap()
    );
    for digest in &resolved.digests {
        assert!(package_path(&function_dir, digest).is_file());
    }
    let staging: Vec<_> = fs::read_dir(dir.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|name| name.to_string_lossy().starts_with('.'))
        .collect();
    assert!(staging.is_empty(), "staging left behind: {staging:?}");

    let again = resolve_layers(
        &layers(&[&first, &second]),
        &function_dir,
        "default",
        "hello",
    )
    .unwrap()
    .unwrap();
    assert_eq!(again.path, resolved.path);
    let reversed = resolve_layers(
        &layers(&[&second, &first]),
        &function_dir,
        "default",
        "hello",
    )
    .unwrap()
    .unwrap();
    assert_ne!(reversed.path, resolved.path);
    assert_eq!(
        fs::read_to_string(reversed.path.join("lib/shared.txt")).unwrap(),
        "first"
    );
}

/// A directory in one layer where another has a file or a symlink is rejected, so no layer can
/// write through an earlier layer's symlink, and nothing is left behind.
#[test]
fn layer_type_conflicts_rejected() {
    let tmp = tempfile::tempdir().unwrap();
    let link = tmp.path().join("link.zip");
    write_zip(&link, &[Entry::Dir("etc/"), Entry::Symlink("lib", "etc")]);
    let into_link = tmp.path().join("into-link.zip");
    write_zip(&into_link, &[Entry::File("lib/passwd", 0o644, b"x")]);
    let file = tmp.path().join("file.zip");
    write_zip(&file, &[Entry::File("etc", 0o644, b"x")]);
    let function_dir = tmp.path().join("data");

    let message = code_message(resolve_layers(
        &layers(&[&link, &into_link]),
        &function_dir,
        "default",
        "hello",
    ));
    assert!(message.contains("\"lib\""), "{message}");
    assert!(message.contains("layers[1].zip_file"), "{message}");
    assert!(!function_dir.join("etc").exists());
    let message = code_message(resolve_layers(
        &layers(&[&link, &file]),
        &function_dir,
        "default",
        "hello",
    ));
    assert!(message.contains("\"etc\""), "{message}");
    let layer_dirs = function_dir.join("default/hello/layers");
    assert!(!layer_dirs.exists(), "left behind: {layer_dirs:?}");
    let packages: Vec<_> = fs::read_dir(function_dir.join("packages"))
        .unwrap()
        .collect();
    assert!(packages.is_empty(), "rejected packages kept: {packages:?}");
}

/// The agent's side: layer packages are unpacked only at the path their digests name, and
/// only when every package matches its digest.
#[test]
fn install_layers_checks_digests_and_path() {
    let tmp = tempfile::tempdir().unwrap();
    let (first, second) = (tmp.path().join("first.zip"), tmp.path().join("second.zip"));
    write_zip(&first, &[Entry::File("a.txt", 0o644, b"first")]);
    write_zip(&second, &[Entry::File("a.txt", 0o644, b"second")]);
    let digest = |path: &Path| sha256_hex(&mut File::open(path).unwrap()).unwrap();
    let digests = vec![digest(&first), digest(&second)];
    let open = || vec![File::open(&first).unwrap(), File::open(&second).unwrap()];
    let node = tmp.path().join("node");
    let version = layers_path("default", "hello", &digests);

    let wrong_path = version.parent().unwrap().join("0000000000000000");
    let error = install_layers(open(), &node, &wrong_path, &digests).unwrap_err();
    assert!(error.contains("invalid layers path"), "{error}");
    let swapped = vec![digests[1].clone(), digests[0].clone()];
    let error = install_layers(open(), &node, &version, &swapped).unwrap_err();
    assert!(error.contains("invalid layers path"), "{error}");
    let forged = vec![digests[0].clone(), digests[0].clone()];
    let forged_version = layers_path("default", "hello", &forged);
    let error = install_layers(open(), &node, &forged_version, &forged).unwrap_err();
    assert!(error.contains("layer 1 digest mismatch"), "{error}");
    assert!(!node.join(&forged_version).exists());

    assert!(install_layers(open(), &node, &version, &digests).unwrap());
    assert_eq!(
        fs::read_to_string(node.join(&version).join("a.txt")).unwrap(),
        "second"
    );
    assert!(!install_layers(open(), &node, &version, &digests).unwrap());
}

/// Symlinks of two layers that each stay inside their own layer cannot together lead out of
/// the merged directory.
#[test]
fn layer_symlinks_checked_together() {
    let tmp = tempfile::tempdir().unwrap();
    let first = tmp.path().join("first.zip");
    write_zip(
        &first,
        &[Entry::Dir("a/b/"), Entry::Symlink("a/b/up", "../..")],
    );
    let second = tmp.path().join("second.zip");
    write_zip(
        &second,
        &[Entry::Dir("a/"), Entry::Symlink("escape", "a/b/up/..")],
    );
    let function_dir = tmp.path().join("data");
    let message = match resolve_layers(
        &layers(&[&first, &second]),
        &function_dir,
        "default",
        "hello",
    ) {
        Err(PlatformError::Invalid { field, message }) => {
            assert_eq!(field, "layers");
            message
        }
        other => panic!("expected an Invalid error, got {other:?}"),
    };
    assert!(message.contains("\"escape\""), "{message}");
    assert!(message.contains("merged layers"), "{message}");
    assert!(!function_dir.join("default/hello/layers").exists());
}

/// A stored package whose bytes changed is replaced by the next resolve of its archive.
#[test]
fn corrupted_stored_package_repaired() {
    let tmp = tempfile::tempdir().unwrap();
    let archive = tmp.path().join("app.zip");
    write_zip(
        &archive,
        &[Entry::File("scf_bootstrap", 0o755, b"#!/bin/sh\n")],
    );
    let function_dir = tmp.path().join("functions");
    let source = CodeSource::ZipFile(archive.clone());
    let digest = resolve(&source, &function_dir, "default", "hello")
        .unwrap()
        .digest
        .unwrap();
    let stored = package_path(&function_dir, &digest);
    let original = fs::read(&stored).unwrap();
    let mut corrupt = original.clone();
    corrupt[10] ^= 0xff;
    fs::write(&stored, &corrupt).unwrap();

    let _ = resolve(&source, &function_dir, "default", "hello").unwrap();
    assert_eq!(fs::read(&stored).unwrap(), original);
}

/// A FIFO or a directory given as a zip file is rejected at once instead of blocking the read.
#[test]
fn zip_path_must_be_regular_file() {
    let tmp = tempfile::tempdir().unwrap();
    let fifo = tmp.path().join("fifo.zip");
    let c_path = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo only reads the NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o644) }, 0);
    let function_dir = tmp.path().join("functions");
    let message = code_message(resolve_zip_file(&fifo, &function_dir));
    assert!(message.contains("not a regular file"), "{message}");
    let message = code_message(resolve_layers(
        &layers(&[tmp.path()]),
        &function_dir,
        "default",
        "hello",
    ));
    assert!(message.contains("layers[0].zip_file"), "{message}");
}
