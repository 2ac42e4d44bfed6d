//! Label and field selectors as the `labelSelector` and `fieldSelector` query parameters
//! express them.

use serde_json::Value;

use crate::{Resource, Status};

#[derive(Debug, Clone, PartialEq)]
enum LabelRequirement {
    Equals(String, String),
    NotEquals(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    DoesNotExist(String),
}

/// A parsed `labelSelector`: every requirement must hold.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LabelSelector {
    requirements: Vec<LabelRequirement>,
}

/// Splits `text` at commas that are not inside parentheses.
fn split_terms(text: &str) -> Vec<String> {
    let mut terms = Vec::new();
    let mut depth = 0usize;
    let mut current = String::new();
    for c in text.chars() {
        match c {
            '(' => {
                depth += 1;
                current.push(c);
            }
            ')' => {
                depth = depth.saturating_sub(1);
                current.push(c);
            }
            ',' if depth == 0 => terms.push(std::mem::take(&mut current)),
            _ => current.push(c),
        }
    }
    terms.push(current);
    terms
        .into_iter()
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty())
        .collect()
}

fn parse_value_set(text: &str, selector: &str) -> Result<Vec<String>, Status> {
    let inner = text
        .trim()
        .strip_prefix('(')
        .and_then(|t| t.strip_suffix(')'))
        .ok_or_else(|| {
            Status::bad_request(format!(
                "unable to parse requirement: invalid label selector {selector:?}: expected a parenthesised value set"
            ))
        })?;
    Ok(inner
        .split(',')
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
        .collect())
}

impl LabelSelector {
    /// Parses a selector such as `app=web,tier in (a,b),!legacy`.
    pub fn parse(text: &str) -> Result<LabelSelector, Status> {
        let mut requirements = Vec::new();
        for term in split_terms(text) {
            requirements.push(LabelSelector::parse_term(&term, text)?);
        }
        Ok(LabelSelector { requirements })
    }

    fn parse_term(term: &str, selector: &str) -> Result<LabelRequirement, Status> {
        if let Some(key) = term.strip_prefix('!') {
            return Ok(LabelRequirement::DoesNotExist(key.trim().to_string()));
        }
        if let Some((key, value)) = term.split_once("!=") {
            return Ok(LabelRequirement::NotEquals(
                key.trim().to_string(),
                value.trim().to_string(),
            ));
        }
        if let Some((key, value)) = term.split_once("==") {
            return Ok(LabelRequirement::Equals(
                key.trim().to_string(),
                value.trim().to_string(),
            ));
        }
        if let Some((key, value)) = term.split_once('=') {
            return Ok(LabelRequirement::Equals(
                key.trim().to_string(),
                value.trim().to_string(),
            ));
        }
        if let Some((key, rest)) = term.split_once(" notin ") {
            return Ok(LabelRequirement::NotIn(
                key.trim().to_string(),
                parse_value_set(rest, selector)?,
            ));
        }
        if let Some((key, rest)) = term.split_once(" in ") {
            return Ok(LabelRequirement::In(
                key.trim().to_string(),
                parse_value_set(rest, selector)?,
            ));
        }
        let key = term.trim();
        if key.contains(char::is_whitespace) || key.contains(['(', ')', '<', '>']) {
            return Err(Status::bad_request(format!(
                "unable to parse requirement: invalid label selector {selector:?}: unsupported term {term:?}"
            )));
        }
        Ok(LabelRequirement::Exists(key.to_string()))
    }

    /// Reports whether an object's `metadata.labels` satisfy every requirement.
    pub fn matches(&self, object: &Value) -> bool {
        let labels = object.pointer("/metadata/labels");
        let label = |key: &str| labels.and_then(|l| l.get(key)).and_then(Value::as_str);
        self.requirements.iter().all(|r| match r {
            LabelRequirement::Equals(k, v) => label(k) == Some(v.as_str()),
            LabelRequirement::NotEquals(k, v) => label(k) != Some(v.as_str()),
            LabelRequirement::In(k, values) => {
                label(k).is_some_and(|l| values.iter().any(|v| v == l))
            }
            LabelRequirement::NotIn(k, values) => {
                !label(k).is_some_and(|l| values.iter().any(|v| v == l))
            }
            LabelRequirement::Exists(k) => label(k).is_some(),
            LabelRequirement::DoesNotExist(k) => label(k).is_none(),
        })
    }
}

#[derive(Debug, Clone, PartialEq)]
struct FieldRequirement {
    pointer: String,
    value: String,
    equal: bool,
}

/// A parsed `fieldSelector`: every `field=value` or `field!=value` term must hold.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FieldSelector {
    requirements: Vec<FieldRequirement>,
}

/// Fields a pod field selector may name, beyond `metadata.name` and `metadata.namespace`.
const POD_FIELDS: [&str; 7] = [
    "spec.nodeName",
    "spec.restartPolicy",
    "spec.schedulerName",
    "spec.serviceAccountName",
    "status.phase",
    "status.podIP",
    "status.nominatedNodeName",
];

impl FieldSelector {
    /// Parses a selector such as `metadata.name=web,status.phase!=Failed`. Fields the real
    /// server does not index for `resource` are rejected with 400, as it does.
    pub fn parse(text: &str, resource: &Resource) -> Result<FieldSelector, Status> {
        let mut requirements = Vec::new();
        for term in split_terms(text) {
            let (field, value, equal) = if let Some((f, v)) = term.split_once("!=") {
                (f, v, false)
            } else if let Some((f, v)) = term.split_once("==") {
                (f, v, true)
            } else if let Some((f, v)) = term.split_once('=') {
                (f, v, true)
            } else {
                return Err(Status::bad_request(format!(
                    "invalid field selector {text:?}: term {term:?} has no operator"
                )));
            };
            let field = field.trim();
            let supported = field == "metadata.name"
                || field == "metadata.namespace"
                || (*resource == Resource::PODS && POD_FIELDS.contains(&field))
                || (*resource == Resource::NAMESPACES && field == "status.phase");
            if !supported {
                return Err(Status::bad_request(format!(
                    "field label not supported: {field}"
                )));
            }
            requirements.push(FieldRequirement {
                pointer: format!("/{}", field.replace('.', "/")),
                value: value.trim().to_string(),
                equal,
            });
        }
        Ok(FieldSelector { requirements })
    }

    /// Reports whether an object satisfies every term. A missing field reads as `""`.
    pub fn matches(&self, object: &Value) -> bool {
        self.requirements.iter().all(|r| {
            let actual = object
                .pointer(&r.pointer)
                .and_then(Value::as_str)
                .unwrap_or("");
            (actual == r.value) == r.equal
        })
    }
}

/// A label selector and a field selector together, as a list or watch request gives them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Selectors {
    pub labels: LabelSelector,
    pub fields: FieldSelector,
}

impl Selectors {
    pub fn matches(&self, object: &Value) -> bool {
        self.labels.matches(object) && self.fields.matches(object)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(labels: Value) -> Value {
        json!({"metadata": {"name": "p", "labels": labels}, "status": {"phase": "Running"}})
    }

    #[test]
    fn label_selector_operators() {
        let object = pod(json!({"app": "web", "tier": "front"}));
        let cases = [
            ("app=web", true),
            ("app==web", true),
            ("app!=web", false),
            ("app=db", false),
            ("missing!=x", true),
            ("tier in (front, back)", true),
            ("tier notin (front)", false),
            ("missing notin (front)", true),
            ("app", true),
            ("!app", false),
            ("!missing", true),
            ("app=web,tier in (back)", false),
            ("", true),
        ];
        for (selector, expected) in cases {
            let parsed = LabelSelector::parse(selector).unwrap();
            assert_eq!(parsed.matches(&object), expected, "selector {selector:?}");
        }
    }

    #[test]
    fn field_selector_rejects_unknown_field() {
        let error = FieldSelector::parse("spec.foo=bar", &Resource::PODS).unwrap_err();
        assert_eq!(error.code, 400);
        let error = FieldSelector::parse("spec.nodeName=n", &Resource::CONFIGMAPS).unwrap_err();
        assert_eq!(error.code, 400);
    }

    #[test]
    fn field_selector_matches_paths() {
        let object = pod(json!({}));
        let running = FieldSelector::parse("status.phase=Running", &Resource::PODS).unwrap();
        assert!(running.matches(&object));
        let not_p = FieldSelector::parse("metadata.name!=p", &Resource::PODS).unwrap();
        assert!(!not_p.matches(&object));
        let unbound = FieldSelector::parse("spec.nodeName=", &Resource::PODS).unwrap();
        assert!(unbound.matches(&object));
    }
}
