//! Checks that resolved code has the executable its function kind starts, so that a package
//! without one is rejected when the function is created, not at its first invocation.
//!
//! The choice of file matches the local backend's: web and image-style event functions run
//! `scf_bootstrap`, and custom-runtime event functions run `bootstrap`, or `scf_bootstrap` when
//! there is no `bootstrap`.

use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use super::code_error;
use crate::error::PlatformError;
use crate::model::{CodeSource, EventRuntime, FunctionKind};

/// Checks that `code_dir`, resolved from `source`, contains at its root the executable regular
/// file that a function of this kind and runtime starts. Symlinks are followed. The error names
/// the missing or unusable file and the fix. It also points at a top-level folder that
/// contains the file, the usual mistake when zipping a directory. Blocking.
pub fn check_entrypoint(
    code_dir: &Path,
    source: &CodeSource,
    kind: FunctionKind,
    runtime: EventRuntime,
) -> Result<(), PlatformError> {
    let (candidates, role): (&[&str], &str) = match (kind, runtime) {
        (FunctionKind::Web, _) => (
            &["scf_bootstrap"],
            "a web function runs `scf_bootstrap`, which starts its HTTP server on $PORT",
        ),
        (FunctionKind::Event, EventRuntime::Image) => (
            &["scf_bootstrap"],
            "an event function with runtime = \"image\" runs `scf_bootstrap`, which starts a \
             server that answers POST /event-invoke on $PORT",
        ),
        (FunctionKind::Event, EventRuntime::Custom) => (
            &["bootstrap", "scf_bootstrap"],
            "an event function with runtime = \"custom\" runs `bootstrap`, or `scf_bootstrap` \
             when there is no `bootstrap`, which speaks SCF's custom runtime API",
        ),
    };
    // The first candidate that exists is the one the backend runs, even if it is not
    // executable, so only that one is checked.
    let found = candidates
        .iter()
        .find(|name| code_dir.join(name).symlink_metadata().is_ok());
    match found {
        Some(name) => check_executable(code_dir, source, name, role),
        None => Err(missing_error(code_dir, source, candidates, role)),
    }
}

fn source_path(source: &CodeSource) -> &Path {
    match source {
        CodeSource::Directory(path) | CodeSource::ZipFile(path) => path,
    }
}

fn check_executable(
    code_dir: &Path,
    source: &CodeSource,
    name: &str,
    role: &str,
) -> Result<(), PlatformError> {
    let path = code_dir.join(name);
    let error = |message: String| Err(code_error(source_path(source), message));
    let metadata = match fs::metadata(&path) {
        Ok(metadata) => metadata,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return error(format!(
                "`{name}` is a symlink to a file that does not exist; point it at a file inside \
                 the code"
            ));
        }
        Err(e) => return error(format!("`{name}` cannot be read: {e}")),
    };
    if !metadata.is_file() {
        return error(format!(
            "`{name}` is not a regular file; {role}, so it must be an executable file"
        ));
    }
    if metadata.permissions().mode() & 0o111 == 0 {
        let fix = match source {
            CodeSource::Directory(_) => format!("run `chmod +x {}`", path.display()),
            // The unpacker makes a root-level bootstrap executable, so only a symlink's target
            // can lack the bit here.
            CodeSource::ZipFile(_) => "it links to a file without execute permission; run \
                                       `chmod +x` on that file and rebuild the archive"
                .to_owned(),
        };
        return error(format!("`{name}` is not executable; {fix}"));
    }
    Ok(())
}

fn missing_error(
    code_dir: &Path,
    source: &CodeSource,
    candidates: &[&str],
    role: &str,
) -> PlatformError {
    let problem = match candidates {
        [only] => format!("has no `{only}` at its root"),
        _ => format!(
            "has neither {} at its root",
            candidates
                .iter()
                .map(|name| format!("`{name}`"))
                .collect::<Vec<_>>()
                .join(" nor ")
        ),
    };
    let fix = match (nested_entrypoint(code_dir, candidates), source) {
        (Some((folder, name)), CodeSource::ZipFile(archive)) => {
            let archive_name = archive.file_name().unwrap_or_default().to_string_lossy();
            format!(
                "It has `{folder}/{name}`, inside the top-level folder `{folder}/`, but fngate \
                 looks at the archive's root: zip the folder's contents rather than the folder \
                 (`cd {folder} && zip -r ../{archive_name} .`)"
            )
        }
        (Some((folder, name)), CodeSource::Directory(dir)) => format!(
            "It has `{folder}/{name}`: set code.directory to {}",
            dir.join(&folder).display()
        ),
        (None, _) => format!(
            "Add an executable `{}` at the root of the code",
            candidates[0]
        ),
    };
    code_error(source_path(source), format!("{problem}; {role}. {fix}"))
}

/// Returns a top-level folder of `code_dir` that contains one of `candidates`, with that name.
/// Folders are visited in name order, so the result does not depend on the file system.
fn nested_entrypoint(code_dir: &Path, candidates: &[&str]) -> Option<(String, String)> {
    let mut folders: Vec<String> = fs::read_dir(code_dir)
        .ok()?
        .filter_map(Result::ok)
        .filter(|entry| entry.file_type().is_ok_and(|kind| kind.is_dir()))
        .filter_map(|entry| entry.file_name().into_string().ok())
        .collect();
    folders.sort();
    folders.into_iter().find_map(|folder| {
        candidates
            .iter()
            .find(|name| code_dir.join(&folder).join(name).is_file())
            .map(|name| (folder.clone(), name.to_string()))
    })
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;
    use std::path::PathBuf;

    use super::*;

    const WEB: (FunctionKind, EventRuntime) = (FunctionKind::Web, EventRuntime::Custom);
    const IMAGE: (FunctionKind, EventRuntime) = (FunctionKind::Event, EventRuntime::Image);
    const CUSTOM: (FunctionKind, EventRuntime) = (FunctionKind::Event, EventRuntime::Custom);

    fn write_file(dir: &Path, name: &str, mode: u32) -> PathBuf {
        let path = dir.join(name);
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).unwrap();
        }
        fs::write(&path, "#!/bin/sh\n").unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
        path
    }

    fn check(
        dir: &Path,
        (kind, runtime): (FunctionKind, EventRuntime),
    ) -> Result<(), PlatformError> {
        check_entrypoint(
            dir,
            &CodeSource::Directory(dir.to_path_buf()),
            kind,
            runtime,
        )
    }

    fn check_zip(
        dir: &Path,
        (kind, runtime): (FunctionKind, EventRuntime),
    ) -> Result<(), PlatformError> {
        let source = CodeSource::ZipFile(PathBuf::from("/srv/packages/hello.zip"));
        check_entrypoint(dir, &source, kind, runtime)
    }

    /// Returns the message of a `Code` error, checking that it names `expected_path`.
    fn message(result: Result<(), PlatformError>, expected_path: &Path) -> String {
        match result {
            Err(PlatformError::Code { path, message }) => {
                assert_eq!(path, expected_path.display().to_string(), "{message}");
                message
            }
            other => panic!("expected a Code error, got {other:?}"),
        }
    }

    #[test]
    fn executable_scf_bootstrap_accepted() {
        let dir = tempfile::tempdir().unwrap();
        write_file(dir.path(), "scf_bootstrap", 0o755);
        for kind in [WEB, IMAGE, CUSTOM] {
            assert!(check(dir.path(), kind).is_ok(), "{kind:?}");
        }
    }

    #[test]
    fn custom_runtime_accepts_bootstrap() {
        let dir = tempfile::tempdir().unwrap();
        write_file(dir.path(), "bootstrap", 0o700);
        assert!(check(dir.path(), CUSTOM).is_ok());
        let web = message(check(dir.path(), WEB), dir.path());
        assert!(web.contains("has no `scf_bootstrap`"), "{web}");
        let image = message(check(dir.path(), IMAGE), dir.path());
        assert!(image.contains("runtime = \"image\""), "{image}");
    }

    #[test]
    fn missing_bootstrap_named() {
        let dir = tempfile::tempdir().unwrap();
        write_file(dir.path(), "app.py", 0o644);
        let web = message(check(dir.path(), WEB), dir.path());
        assert!(web.contains("has no `scf_bootstrap` at its root"), "{web}");
        assert!(web.contains("a web function runs `scf_bootstrap`"), "{web}");
        assert!(
            web.contains("Add an executable `scf_bootstrap` at the root"),
            "{web}"
        );
        let custom = message(check(dir.path(), CUSTOM), dir.path());
        assert!(
            custom.contains("has neither `bootstrap` nor `scf_bootstrap`"),
            "{custom}"
        );
        assert!(
            custom.contains("Add an executable `bootstrap` at the root"),
            "{custom}"
        );
    }

    #[test]
    fn not_executable_rejected_with_chmod() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_file(dir.path(), "scf_bootstrap", 0o644);
        let message = message(check(dir.path(), WEB), dir.path());
        assert!(
            message.contains("`scf_bootstrap` is not executable"),
            "{message}"
        );
        assert!(
            message.contains(&format!("run `chmod +x {}`", path.display())),
            "{message}"
        );
    }

    #[test]
    fn custom_runtime_checks_bootstrap_first() {
        // The backend runs `bootstrap` whenever it exists, so an executable `scf_bootstrap`
        // does not make up for a `bootstrap` without the execute bit.
        let dir = tempfile::tempdir().unwrap();
        write_file(dir.path(), "bootstrap", 0o644);
        write_file(dir.path(), "scf_bootstrap", 0o755);
        let message = message(check(dir.path(), CUSTOM), dir.path());
        assert!(
            message.contains("`bootstrap` is not executable"),
            "{message}"
        );
    }

    #[test]
    fn directory_named_bootstrap_rejected() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join("scf_bootstrap")).unwrap();
        let message = message(check(dir.path(), WEB), dir.path());
        assert!(
            message.contains("`scf_bootstrap` is not a regular file"),
            "{message}"
        );
    }

    #[test]
    fn symlinks_followed() {
        let dir = tempfile::tempdir().unwrap();
        write_file(dir.path(), "bin/start", 0o755);
        symlink("bin/start", dir.path().join("scf_bootstrap")).unwrap();
        assert!(check(dir.path(), WEB).is_ok());

        let dangling = tempfile::tempdir().unwrap();
        symlink("missing", dangling.path().join("scf_bootstrap")).unwrap();
        let message = message(check(dangling.path(), WEB), dangling.path());
        assert!(message.contains("does not exist"), "{message}");

        let plain = tempfile::tempdir().unwrap();
        write_file(plain.path(), "bin/start", 0o644);
        symlink("bin/start", plain.path().join("scf_bootstrap")).unwrap();
        let message = check_zip(plain.path(), WEB).unwrap_err().to_string();
        assert!(message.contains("without execute permission"), "{message}");
    }

    #[test]
    fn top_level_folder_pointed_out_for_zip() {
        let dir = tempfile::tempdir().unwrap();
        write_file(dir.path(), "hello/scf_bootstrap", 0o755);
        let zip = Path::new("/srv/packages/hello.zip");
        let message = message(check_zip(dir.path(), WEB), zip);
        assert!(
            message.contains("has no `scf_bootstrap` at its root"),
            "{message}"
        );
        assert!(message.contains("`hello/scf_bootstrap`"), "{message}");
        assert!(
            message.contains("inside the top-level folder `hello/`"),
            "{message}"
        );
        assert!(
            message.contains("`cd hello && zip -r ../hello.zip .`"),
            "{message}"
        );
    }

    #[test]
    fn nested_folder_pointed_out_for_directory() {
        let dir = tempfile::tempdir().unwrap();
        write_file(dir.path(), "b/bootstrap", 0o755);
        write_file(dir.path(), "a/readme", 0o644);
        let message = message(check(dir.path(), CUSTOM), dir.path());
        assert!(message.contains("It has `b/bootstrap`"), "{message}");
        let expected = format!("set code.directory to {}", dir.path().join("b").display());
        assert!(message.contains(&expected), "{message}");
    }
}
