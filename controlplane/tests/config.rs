//! Loading the platform file: parsing, path resolution and whole-file checks.

use std::fs;
use std::path::{Path, PathBuf};

use fngate_controlplane::config::{load, ConfigError, PlatformFile};
use fngate_controlplane::error::PlatformError;
use fngate_controlplane::model::{CodeSource, FunctionKind, NamespaceSpec};

/// Writes `text` as `fngate.toml` in a new temporary directory and loads it.
fn load_text(text: &str) -> (tempfile::TempDir, Result<PlatformFile, ConfigError>) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fngate.toml");
    fs::write(&path, text).unwrap();
    let result = load(&path);
    (dir, result)
}

fn load_error(text: &str) -> ConfigError {
    match load_text(text).1 {
        Ok(file) => panic!("expected an error, loaded {file:?}"),
        Err(e) => e,
    }
}

const EXAMPLE: &str = r#"
# fngate.toml
[[namespace]]
name = "default"
memory_quota_mb = 2048

[[namespace]]
name = "batch"

[[function]]
namespace = "default"
name = "hello-web"
kind = "web"
code = { directory = "hello-web" }
concurrency = 4
max_instances = 3
env = { GREETING = "hi" }

[[function]]
namespace = "batch"
name = "resize"
kind = "event"
runtime = "image"
code = { zip_file = "/srv/packages/resize.zip" }
memory_mb = 512
concurrency = 8
"#;

#[test]
fn example_loads() {
    let (dir, result) = load_text(EXAMPLE);
    let file = result.unwrap();
    assert_eq!(
        file.namespaces,
        vec![
            NamespaceSpec {
                name: "default".into(),
                memory_quota_mb: 2048,
                kubernetes: None,
            },
            NamespaceSpec {
                name: "batch".into(),
                memory_quota_mb: 0,
                kubernetes: None,
            },
        ]
    );
    assert_eq!(file.functions.len(), 2);
    let web = &file.functions[0];
    assert_eq!(web.kind, FunctionKind::Web);
    assert_eq!(
        web.code,
        CodeSource::Directory(dir.path().join("hello-web"))
    );
    assert_eq!(web.concurrency, 4);
    assert_eq!(web.max_instances, 3);
    assert_eq!(web.memory_mb, 128, "default applies");
    assert_eq!(web.env.get("GREETING").map(String::as_str), Some("hi"));
    let event = &file.functions[1];
    assert_eq!(
        event.code,
        CodeSource::ZipFile(PathBuf::from("/srv/packages/resize.zip"))
    );
}

#[test]
fn default_namespace_implicit() {
    let (_dir, result) = load_text(
        r#"
[[function]]
namespace = "default"
name = "hello"
kind = "web"
code = { directory = "/srv/hello" }
"#,
    );
    let file = result.unwrap();
    assert_eq!(
        file.namespaces,
        vec![NamespaceSpec {
            name: "default".into(),
            memory_quota_mb: 0,
            kubernetes: None,
        }]
    );
}

#[test]
fn empty_file_loads() {
    let (_dir, result) = load_text("# nothing declared yet\n");
    let file = result.unwrap();
    assert!(file.namespaces.is_empty());
    assert!(file.functions.is_empty());
}

#[test]
fn relative_path_uses_file_dir() {
    let dir = tempfile::tempdir().unwrap();
    fs::create_dir(dir.path().join("conf")).unwrap();
    let path = dir.path().join("conf/fngate.toml");
    let text = r#"
[[function]]
namespace = "default"
name = "hello"
kind = "web"
code = { zip_file = "../packages/hello.zip" }
layers = [{ zip_file = "../packages/lib.zip" }, { zip_file = "/srv/layers/tools.zip" }]
"#;
    fs::write(&path, text).unwrap();
    let file = load(&path).unwrap();
    let expected = dir.path().join("conf/../packages/hello.zip");
    assert_eq!(file.functions[0].code, CodeSource::ZipFile(expected));
    let layers: Vec<_> = file.functions[0]
        .layers
        .iter()
        .map(|layer| layer.zip_file.clone())
        .collect();
    assert_eq!(
        layers,
        [
            dir.path().join("conf/../packages/lib.zip"),
            std::path::PathBuf::from("/srv/layers/tools.zip")
        ]
    );
}

#[test]
fn missing_file_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("absent.toml");
    let error = load(&path).unwrap_err();
    assert!(matches!(error, ConfigError::Read { .. }), "{error:?}");
    assert!(error.to_string().contains("absent.toml"), "{error}");
}

#[test]
fn syntax_error_has_line_and_column() {
    let error = load_error("[[namespace]]\nname = \"a\"\nmemory_quota_mb = = 3\n");
    let ConfigError::Parse { line, column, .. } = &error else {
        panic!("expected Parse, got {error:?}");
    };
    assert_eq!(*line, Some(3));
    assert!(column.is_some());
    assert!(error.to_string().contains("fngate.toml: line 3"), "{error}");
}

#[test]
fn unknown_fields_rejected() {
    let cases = [
        ("[[functions]]\nname = \"a\"\n", "functions", 1),
        ("[server]\nport = 1\n", "server", 1),
        ("[[namespace]]\nname = \"a\"\nquota = 1\n", "quota", 3),
        (
            "[[function]]\nname = \"a\"\nkind = \"web\"\ncode = { directory = \"/a\" }\nconcurency = 2\n",
            "concurency",
            5,
        ),
        (
            "[[function]]\nname = \"a\"\nkind = \"web\"\ncode = { dir = \"/a\" }\n",
            "dir",
            4,
        ),
    ];
    for (text, field, expected_line) in cases {
        let error = load_error(text);
        let ConfigError::Parse { line, .. } = &error else {
            panic!("{text:?}: expected Parse, got {error:?}");
        };
        assert!(error.to_string().contains(field), "{text:?}: {error}");
        assert_eq!(*line, Some(expected_line), "{text:?}: {error}");
    }
}

#[test]
fn invalid_function_names_position() {
    let error = load_error(
        r#"
[[function]]
namespace = "default"
name = "ok"
kind = "web"
code = { directory = "/srv/ok" }

[[function]]
namespace = "default"
name = "busy"
kind = "event"
code = { directory = "/srv/busy" }
concurrency = 5
"#,
    );
    let ConfigError::Invalid {
        line,
        section,
        position,
        name,
        cause: source,
        ..
    } = &error
    else {
        panic!("expected Invalid, got {error:?}");
    };
    assert_eq!(*section, "[[function]]");
    assert_eq!(*position, 2);
    assert_eq!(*line, 8);
    assert_eq!(name, "default/busy");
    assert!(
        matches!(source.as_ref(), PlatformError::Invalid { field, .. } if field == "concurrency"),
        "{source:?}"
    );
    let message = error.to_string();
    assert!(
        message.contains("fngate.toml: line 8: [[function]] number 2"),
        "{message}"
    );
}

#[test]
fn missing_name_rejected() {
    let error = load_error("[[function]]\nkind = \"web\"\ncode = { directory = \"/a\" }\n");
    let ConfigError::Invalid { cause: source, .. } = &error else {
        panic!("expected Invalid, got {error:?}");
    };
    assert!(
        matches!(source.as_ref(), PlatformError::Invalid { field, .. } if field == "namespace"),
        "{source:?}"
    );
    assert!(error.to_string().contains("missing"), "{error}");
}

#[test]
fn invalid_namespace_rejected() {
    let error = load_error("[[namespace]]\nname = \"9x\"\n");
    let ConfigError::Invalid {
        section, position, ..
    } = &error
    else {
        panic!("expected Invalid, got {error:?}");
    };
    assert_eq!(*section, "[[namespace]]");
    assert_eq!(*position, 1);
}

#[test]
fn duplicate_namespace_rejected() {
    let error = load_error("[[namespace]]\nname = \"a\"\n\n[[namespace]]\nname = \"a\"\n");
    let ConfigError::DuplicateNamespace {
        line,
        first_line,
        name,
        ..
    } = &error
    else {
        panic!("expected DuplicateNamespace, got {error:?}");
    };
    assert_eq!(name, "a");
    assert_eq!(*first_line, 1);
    assert_eq!(*line, 4);
}

#[test]
fn duplicate_function_rejected() {
    let table = "[[function]]\nnamespace = \"default\"\nname = \"f\"\nkind = \"web\"\ncode = { directory = \"/a\" }\n";
    let error = load_error(&format!("{table}\n{table}"));
    let ConfigError::DuplicateFunction {
        line, first_line, ..
    } = &error
    else {
        panic!("expected DuplicateFunction, got {error:?}");
    };
    assert_eq!(*first_line, 1);
    assert_eq!(*line, 7);
}

#[test]
fn same_name_in_two_namespaces_allowed() {
    let text = r#"
[[namespace]]
name = "other"

[[function]]
namespace = "default"
name = "f"
kind = "web"
code = { directory = "/a" }

[[function]]
namespace = "other"
name = "f"
kind = "web"
code = { directory = "/a" }
"#;
    let (_dir, result) = load_text(text);
    assert_eq!(result.unwrap().functions.len(), 2);
}

#[test]
fn undeclared_namespace_rejected() {
    let error = load_error(
        "[[function]]\nnamespace = \"batch\"\nname = \"f\"\nkind = \"web\"\ncode = { directory = \"/a\" }\n",
    );
    let ConfigError::UnknownNamespace {
        namespace,
        name,
        line,
        ..
    } = &error
    else {
        panic!("expected UnknownNamespace, got {error:?}");
    };
    assert_eq!(namespace, "batch");
    assert_eq!(name, "f");
    assert_eq!(*line, 1);
}

#[test]
fn error_names_file() {
    let (dir, result) = load_text("[[namespace]]\nname = 1\n");
    let error = result.unwrap_err();
    let expected = dir.path().join("fngate.toml");
    assert!(
        error
            .to_string()
            .starts_with(&expected.display().to_string()),
        "{error}"
    );
}

#[test]
fn shipped_example_loads() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/fngate.toml");
    let file = load(&path).unwrap();
    assert!(!file.functions.is_empty());
    for function in &file.functions {
        let CodeSource::Directory(dir) = &function.code else {
            panic!("{}: expected a directory source", function.name);
        };
        assert!(
            dir.is_dir(),
            "{}: {} is not a directory",
            function.name,
            dir.display()
        );
    }
}

#[test]
fn memory_above_quota_rejected() {
    let error = load_error(
        r#"
[[namespace]]
name = "batch"
memory_quota_mb = 256

[[function]]
namespace = "batch"
name = "resize"
kind = "web"
code = { directory = "/srv/resize" }
memory_mb = 512
"#,
    );
    let ConfigError::Invalid {
        line,
        section,
        name,
        cause: source,
        ..
    } = &error
    else {
        panic!("expected Invalid, got {error:?}");
    };
    assert_eq!(*line, 6);
    assert_eq!(*section, "[[function]]");
    assert_eq!(name, "batch/resize");
    let PlatformError::Invalid { field, message } = source.as_ref() else {
        panic!("expected Invalid, got {source:?}");
    };
    assert_eq!(field, "memory_mb");
    assert!(message.contains("512 MB"), "{message}");
    assert!(message.contains("quota of 256 MB"), "{message}");
}

#[test]
fn memory_within_quota_loads() {
    let (_dir, result) = load_text(
        r#"
[[namespace]]
name = "batch"
memory_quota_mb = 512

[[namespace]]
name = "open"

[[function]]
namespace = "batch"
name = "resize"
kind = "web"
code = { directory = "/srv/resize" }
memory_mb = 512

[[function]]
namespace = "open"
name = "big"
kind = "web"
code = { directory = "/srv/big" }
memory_mb = 4096

[[function]]
namespace = "default"
name = "implicit"
kind = "web"
code = { directory = "/srv/implicit" }
memory_mb = 4096
"#,
    );
    assert_eq!(result.unwrap().functions.len(), 3);
}

#[test]
fn code_needs_exactly_one_source() {
    let cases = [
        ("code = {}", "got neither"),
        (
            "code = { directory = \"/a\", zip_file = \"/b.zip\" }",
            "got more than one",
        ),
    ];
    for (code, problem) in cases {
        let text = format!("[[function]]\nname = \"a\"\nkind = \"web\"\n{code}\n");
        let error = load_error(&text);
        let ConfigError::Parse { line, .. } = &error else {
            panic!("{code}: expected Parse, got {error:?}");
        };
        assert_eq!(*line, Some(4), "{code}: {error}");
        let message = error.to_string();
        assert!(
            message.contains("`code` takes exactly one of `directory` or `zip_file`"),
            "{code}: {message}"
        );
        assert!(message.contains(problem), "{code}: {message}");
    }
}
