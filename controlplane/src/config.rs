//! Loads the platform file, the TOML file read at start that declares namespaces and functions.
//!
//! Loading parses the file, makes relative code paths absolute against the file's directory,
//! and validates each spec with `validate`. Then it checks the file as a whole: no duplicate
//! namespaces or functions, no function in an undeclared namespace other than `default`, and no
//! function whose memory exceeds its declared namespace's quota. Applying the result to the
//! platform, and reading or unpacking code packages, is left to the caller.

use std::collections::HashMap;
use std::fmt::Write;
use std::io;
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;

use crate::error::PlatformError;
use crate::model::{CodeSource, FunctionSpec, NamespaceSpec};
use crate::validate;

/// The namespace that functions may use without declaring it; it has no memory quota.
pub const DEFAULT_NAMESPACE: &str = "default";

/// The namespaces and functions a platform file declares, in file order.
#[derive(Debug, Clone, PartialEq)]
pub struct PlatformFile {
    /// Declared namespaces, preceded by an implicit `default` when a function uses it and the
    /// file does not declare it.
    pub namespaces: Vec<NamespaceSpec>,
    /// Declared functions, with absolute code paths.
    pub functions: Vec<FunctionSpec>,
}

/// Error from loading a platform file. Every variant carries the file's path, and `line` is the
/// 1-based line of the table at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// `cause` is part of the message and deliberately not the error's `source()`, so a
    /// printer that walks the chain (anyhow's `{:#}`) shows it once.
    #[error("cannot read {}: {cause}", path.display())]
    Read { path: PathBuf, cause: io::Error },
    /// The file is not valid TOML, or a table has an unknown field or a wrong type.
    #[error("{}: {}{message}", path.display(), location(*line, *column))]
    Parse {
        path: PathBuf,
        line: Option<usize>,
        column: Option<usize>,
        message: String,
    },
    /// A spec breaks a rule of `validate`; `position` counts the section's tables from 1.
    #[error("{}: line {line}: {section} number {position} ({name}): {cause}", path.display())]
    Invalid {
        path: PathBuf,
        line: usize,
        section: &'static str,
        position: usize,
        name: String,
        cause: Box<PlatformError>,
    },
    #[error(
        "{}: line {line}: namespace {name:?} is declared twice (first at line {first_line}); merge the \
         two [[namespace]] tables",
        path.display()
    )]
    DuplicateNamespace {
        path: PathBuf,
        line: usize,
        name: String,
        first_line: usize,
    },
    #[error(
        "{}: line {line}: function {namespace}/{name} is declared twice (first at line {first_line}); \
         merge the two [[function]] tables",
        path.display()
    )]
    DuplicateFunction {
        path: PathBuf,
        line: usize,
        namespace: String,
        name: String,
        first_line: usize,
    },
    #[error(
        "{}: line {line}: function {name} is in namespace {namespace:?}, which the file does not \
         declare; add a [[namespace]] table named {namespace:?}, or use \"default\"",
        path.display()
    )]
    UnknownNamespace {
        path: PathBuf,
        line: usize,
        namespace: String,
        name: String,
    },
}

fn location(line: Option<usize>, column: Option<usize>) -> String {
    let mut out = String::new();
    if let Some(line) = line {
        let _ = write!(out, "line {line}");
        if let Some(column) = column {
            let _ = write!(out, ", column {column}");
        }
        out.push_str(": ");
    }
    out
}

/// The file's top level: only `[[namespace]]` and `[[function]]` tables.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    namespace: Vec<Spanned<NamespaceSpec>>,
    #[serde(default)]
    function: Vec<Spanned<FunctionSpec>>,
}

/// Reads, parses and checks the platform file at `path`.
pub fn load(path: &Path) -> Result<PlatformFile, ConfigError> {
    let read_error = |cause| ConfigError::Read {
        path: path.to_path_buf(),
        cause,
    };
    let text = std::fs::read_to_string(path).map_err(read_error)?;
    let base_dir = std::path::absolute(path)
        .map_err(read_error)?
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    parse(&text, path, &base_dir)
}

/// Parses and checks platform file `text`; `path` is only for messages, and relative code
/// paths are resolved against `base_dir`.
fn parse(text: &str, path: &Path, base_dir: &Path) -> Result<PlatformFile, ConfigError> {
    let raw: RawFile = toml::from_str(text).map_err(|e| {
        let (line, column) = match e.span() {
            Some(span) => {
                let (line, column) = line_and_column(text, span.start);
                (Some(line), Some(column))
            }
            None => (None, None),
        };
        ConfigError::Parse {
            path: path.to_path_buf(),
            line,
            column,
            message: e.message().trim_end().replace('\n', "; "),
        }
    })?;
    let checker = Checker { text, path };
    let mut namespaces = checker.namespaces(raw.namespace)?;
    let functions = checker.functions(raw.function, base_dir, &namespaces)?;
    let uses_default = functions.iter().any(|f| f.namespace == DEFAULT_NAMESPACE);
    if uses_default && !namespaces.iter().any(|n| n.name == DEFAULT_NAMESPACE) {
        namespaces.insert(
            0,
            NamespaceSpec {
                name: DEFAULT_NAMESPACE.to_string(),
                memory_quota_mb: 0,
                kubernetes: None,
            },
        );
    }
    // A relative kubeconfig path is relative to the platform file, as code paths are.
    for binding in namespaces.iter_mut().filter_map(|n| n.kubernetes.as_mut()) {
        if let Some(kubeconfig) = binding.kubeconfig.as_mut() {
            if kubeconfig.is_relative() {
                *kubeconfig = base_dir.join(&*kubeconfig);
            }
        }
    }
    Ok(PlatformFile {
        namespaces,
        functions,
    })
}

/// Returns the 1-based line and column (in characters) of byte `offset` in `text`.
fn line_and_column(text: &str, offset: usize) -> (usize, usize) {
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before[line_start..].chars().count() + 1;
    (line, column)
}

/// The whole-file checks, with what they need to point at a line.
struct Checker<'a> {
    text: &'a str,
    path: &'a Path,
}

impl Checker<'_> {
    fn line(&self, span: Range<usize>) -> usize {
        line_and_column(self.text, span.start).0
    }

    fn namespaces(
        &self,
        tables: Vec<Spanned<NamespaceSpec>>,
    ) -> Result<Vec<NamespaceSpec>, ConfigError> {
        let mut first_lines: HashMap<String, usize> = HashMap::new();
        let mut namespaces = Vec::with_capacity(tables.len());
        for (index, table) in tables.into_iter().enumerate() {
            let line = self.line(table.span());
            let spec = table.into_inner();
            validate::namespace(&spec).map_err(|source| ConfigError::Invalid {
                path: self.path.to_path_buf(),
                line,
                section: "[[namespace]]",
                position: index + 1,
                name: spec.name.clone(),
                cause: Box::new(source),
            })?;
            if let Some(&first_line) = first_lines.get(&spec.name) {
                return Err(ConfigError::DuplicateNamespace {
                    path: self.path.to_path_buf(),
                    line,
                    name: spec.name,
                    first_line,
                });
            }
            first_lines.insert(spec.name.clone(), line);
            namespaces.push(spec);
        }
        Ok(namespaces)
    }

    fn functions(
        &self,
        tables: Vec<Spanned<FunctionSpec>>,
        base_dir: &Path,
        namespaces: &[NamespaceSpec],
    ) -> Result<Vec<FunctionSpec>, ConfigError> {
        let mut first_lines: HashMap<(String, String), usize> = HashMap::new();
        let mut functions = Vec::with_capacity(tables.len());
        for (index, table) in tables.into_iter().enumerate() {
            let line = self.line(table.span());
            let mut spec = table.into_inner();
            spec.code = absolute_code(spec.code, base_dir);
            for layer in &mut spec.layers {
                if layer.zip_file.is_relative() {
                    layer.zip_file = base_dir.join(&layer.zip_file);
                }
            }
            let invalid = |spec: &FunctionSpec, source| ConfigError::Invalid {
                path: self.path.to_path_buf(),
                line,
                section: "[[function]]",
                position: index + 1,
                name: qualified_name(spec),
                cause: Box::new(source),
            };
            validate::function(&spec).map_err(|source| invalid(&spec, source))?;
            let namespace = namespaces.iter().find(|n| n.name == spec.namespace);
            match namespace {
                Some(namespace) => validate::memory_within_quota(&spec, namespace)
                    .map_err(|source| invalid(&spec, source))?,
                // The implicit `default` namespace has no quota.
                None if spec.namespace == DEFAULT_NAMESPACE => {}
                None => {
                    return Err(ConfigError::UnknownNamespace {
                        path: self.path.to_path_buf(),
                        line,
                        namespace: spec.namespace,
                        name: spec.name,
                    });
                }
            }
            let key = (spec.namespace.clone(), spec.name.clone());
            if let Some(&first_line) = first_lines.get(&key) {
                return Err(ConfigError::DuplicateFunction {
                    path: self.path.to_path_buf(),
                    line,
                    namespace: spec.namespace,
                    name: spec.name,
                    first_line,
                });
            }
            first_lines.insert(key, line);
            functions.push(spec);
        }
        Ok(functions)
    }
}

/// Names a function as `namespace/name` in messages, or by its name alone if the namespace is
/// missing.
fn qualified_name(spec: &FunctionSpec) -> String {
    if spec.namespace.is_empty() {
        format!("{:?}", spec.name)
    } else {
        format!("{}/{}", spec.namespace, spec.name)
    }
}

fn absolute_code(code: CodeSource, base_dir: &Path) -> CodeSource {
    let absolute = |path: PathBuf| {
        if path.is_absolute() {
            path
        } else {
            base_dir.join(path)
        }
    };
    match code {
        CodeSource::Directory(path) => CodeSource::Directory(absolute(path)),
        CodeSource::ZipFile(path) => CodeSource::ZipFile(absolute(path)),
    }
}
