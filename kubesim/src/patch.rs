//! PATCH bodies: JSON merge patch (RFC 7386), JSON patch (RFC 6902), a simplified strategic
//! merge patch, and server-side apply.

use serde_json::{json, Map, Value};

use crate::store::now_rfc3339;
use crate::Status;

/// The patch types the server accepts, by `Content-Type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PatchType {
    Merge,
    Json,
    Strategic,
    Apply,
}

impl PatchType {
    pub fn from_content_type(content_type: &str) -> Result<PatchType, Status> {
        let media = content_type.split(';').next().unwrap_or("").trim();
        match media {
            "application/merge-patch+json" => Ok(PatchType::Merge),
            "application/json-patch+json" => Ok(PatchType::Json),
            "application/strategic-merge-patch+json" => Ok(PatchType::Strategic),
            "application/apply-patch+yaml" | "application/apply-patch+json" => Ok(PatchType::Apply),
            _ => Err(Status::unsupported_media_type(content_type)),
        }
    }
}

/// Parses a PATCH body. Apply bodies must be JSON, which is a subset of YAML and what kube-rs
/// sends.
pub fn parse_body(patch_type: PatchType, body: &[u8]) -> Result<Value, Status> {
    serde_json::from_slice(body).map_err(|error| {
        let hint = if patch_type == PatchType::Apply {
            " (this test server reads apply bodies as JSON only)"
        } else {
            ""
        };
        Status::bad_request(format!("invalid patch body{hint}: {error}"))
    })
}

/// Applies a JSON patch, reporting a failed operation as 422 as the real server does.
pub fn json_patch(current: &Value, patch: &Value) -> Result<Value, Status> {
    let operations: json_patch::Patch = serde_json::from_value(patch.clone())
        .map_err(|error| Status::bad_request(format!("invalid JSON patch: {error}")))?;
    let mut document = current.clone();
    json_patch::patch(&mut document, &operations).map_err(|error| {
        Status::new(
            422,
            "Invalid",
            format!("the JSON patch could not be applied: {error}"),
        )
    })?;
    Ok(document)
}

/// Applies an RFC 7386 merge patch.
pub fn merge_patch(current: &Value, patch: &Value) -> Value {
    let mut document = current.clone();
    json_patch::merge(&mut document, patch);
    document
}

/// Returns the key that identifies the items of a list field in a strategic merge, if the list
/// is merged by key.
fn merge_key(field: &str, items: &[Value]) -> Option<&'static str> {
    match field {
        "containers" | "initContainers" | "env" | "volumes" | "volumeMounts"
        | "imagePullSecrets" => Some("name"),
        "ports" => {
            if items.iter().all(|item| item.get("containerPort").is_some()) {
                Some("containerPort")
            } else {
                Some("port")
            }
        }
        _ => None,
    }
}

fn merge_keyed_list(
    current: &[Value],
    patch: &[Value],
    key: &str,
    delete_nulls: bool,
) -> Result<Vec<Value>, Status> {
    let mut result = current.to_vec();
    for item in patch {
        let Some(id) = item.get(key) else {
            return Err(Status::bad_request(format!(
                "list item {item} has no merge key {key:?}"
            )));
        };
        let position = result
            .iter()
            .position(|existing| existing.get(key) == Some(id));
        let directive = item.get("$patch").and_then(Value::as_str);
        match (position, directive) {
            (Some(index), Some("delete")) => {
                result.remove(index);
            }
            (None, Some("delete")) => {}
            (Some(index), _) => {
                result[index] = merge_objects(&result[index], item, delete_nulls)?;
            }
            (None, _) => result.push(merge_objects(&Value::Null, item, delete_nulls)?),
        }
    }
    Ok(result)
}

/// Merges `patch` into `current`: objects recursively, lists of objects with a merge key by
/// that key, anything else replaced. With `delete_nulls`, a `null` removes the field, as in
/// merge patches.
fn merge_objects(current: &Value, patch: &Value, delete_nulls: bool) -> Result<Value, Status> {
    let Some(patch_map) = patch.as_object() else {
        return Ok(patch.clone());
    };
    if patch_map.get("$patch").and_then(Value::as_str) == Some("replace") {
        let mut replaced = patch_map.clone();
        replaced.remove("$patch");
        return Ok(Value::Object(replaced));
    }
    let mut result: Map<String, Value> = current.as_object().cloned().unwrap_or_default();
    for (field, value) in patch_map {
        if field == "$patch" {
            continue;
        }
        if value.is_null() && delete_nulls {
            result.remove(field);
            continue;
        }
        let existing = result.get(field).cloned().unwrap_or(Value::Null);
        let merged = match (existing.as_array(), value.as_array()) {
            (Some(old), Some(new)) if new.iter().all(Value::is_object) => {
                match merge_key(field, new) {
                    Some(key) => Value::Array(merge_keyed_list(old, new, key, delete_nulls)?),
                    None => value.clone(),
                }
            }
            _ if value.is_object() => merge_objects(&existing, value, delete_nulls)?,
            _ => value.clone(),
        };
        result.insert(field.clone(), merged);
    }
    Ok(Value::Object(result))
}

/// Applies a strategic merge patch, with the simplifications described in the crate docs.
pub fn strategic_merge_patch(current: &Value, patch: &Value) -> Result<Value, Status> {
    merge_objects(current, patch, true)
}

/// Builds the `fieldsV1` set of an applied configuration: `f:` for each field, `k:` for list
/// items merged by key.
fn fields_v1(config: &Value) -> Value {
    let mut fields = Map::new();
    if let Some(map) = config.as_object() {
        for (field, value) in map {
            let entry = match value {
                Value::Object(_) => fields_v1(value),
                Value::Array(items) if items.iter().all(Value::is_object) && !items.is_empty() => {
                    let mut keyed = Map::new();
                    if let Some(key) = merge_key(field, items) {
                        for item in items {
                            let id = json!({key: item.get(key).cloned().unwrap_or(Value::Null)});
                            let mut item_fields = fields_v1(item);
                            item_fields["."] = json!({});
                            keyed.insert(format!("k:{id}"), item_fields);
                        }
                        Value::Object(keyed)
                    } else {
                        json!({})
                    }
                }
                _ => json!({}),
            };
            fields.insert(format!("f:{field}"), entry);
        }
    }
    Value::Object(fields)
}

fn managed_fields_config(config: &Value) -> Value {
    let mut trimmed = config.clone();
    if let Some(map) = trimmed.as_object_mut() {
        map.remove("apiVersion");
        map.remove("kind");
        if let Some(meta) = map.get_mut("metadata").and_then(Value::as_object_mut) {
            for field in [
                "name",
                "namespace",
                "resourceVersion",
                "managedFields",
                "uid",
            ] {
                meta.remove(field);
            }
            if meta.is_empty() {
                map.remove("metadata");
            }
        }
    }
    fields_v1(&trimmed)
}

/// Computes the result of a server-side apply of `config` by `manager` onto `current` (or onto
/// nothing, which creates the object), recording the manager in `metadata.managedFields`.
///
/// The entry's `time` changes only when the object or the manager's field set changes, so an
/// apply of what is already there leaves the object identical and the store skips the write.
pub fn apply(
    current: Option<&Value>,
    config: &Value,
    manager: &str,
    api_version: &str,
    subresource: Option<&str>,
) -> Result<Value, Status> {
    if !config.is_object() {
        return Err(Status::bad_request("an apply body must be a JSON object"));
    }
    let base = current.cloned().unwrap_or_else(|| json!({}));
    let mut result = merge_objects(&base, config, false)?;
    let fields = managed_fields_config(config);

    let mut managed: Vec<Value> = base
        .pointer("/metadata/managedFields")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let is_ours = |entry: &Value| {
        entry.get("manager").and_then(Value::as_str) == Some(manager)
            && entry.get("operation").and_then(Value::as_str) == Some("Apply")
            && entry.get("subresource").and_then(Value::as_str) == subresource
    };
    let position = managed.iter().position(is_ours);
    let without_managed = |object: &Value| {
        let mut copy = object.clone();
        if let Some(meta) = copy.get_mut("metadata").and_then(Value::as_object_mut) {
            meta.remove("managedFields");
        }
        copy
    };
    let object_changed = without_managed(&result) != without_managed(&base);
    let fields_changed = position
        .map(|index| managed[index].get("fieldsV1") != Some(&fields))
        .unwrap_or(true);
    if object_changed || fields_changed {
        let mut entry = json!({
            "manager": manager,
            "operation": "Apply",
            "apiVersion": api_version,
            "time": now_rfc3339(),
            "fieldsType": "FieldsV1",
            "fieldsV1": fields,
        });
        if let Some(subresource) = subresource {
            entry["subresource"] = json!(subresource);
        }
        match position {
            Some(index) => managed[index] = entry,
            None => managed.push(entry),
        }
    }
    if !result.get("metadata").is_some_and(Value::is_object) {
        result["metadata"] = json!({});
    }
    result["metadata"]["managedFields"] = Value::Array(managed);
    Ok(result)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strategic_merge_by_name() {
        let current = json!({"spec": {"containers": [
            {"name": "a", "image": "one", "env": [{"name": "X", "value": "1"}]},
            {"name": "b", "image": "two"}
        ]}});
        let patch = json!({"spec": {"containers": [
            {"name": "a", "env": [{"name": "Y", "value": "2"}]},
            {"name": "b", "$patch": "delete"}
        ]}});
        let result = strategic_merge_patch(&current, &patch).unwrap();
        let containers = result["spec"]["containers"].as_array().unwrap();
        assert_eq!(containers.len(), 1);
        assert_eq!(containers[0]["image"], "one");
        assert_eq!(containers[0]["env"].as_array().unwrap().len(), 2);
    }

    #[test]
    fn merge_patch_null_removes() {
        let current = json!({"data": {"a": "1", "b": "2"}});
        let result = merge_patch(&current, &json!({"data": {"a": null, "c": "3"}}));
        assert_eq!(result, json!({"data": {"b": "2", "c": "3"}}));
    }

    #[test]
    fn repeated_apply_keeps_object() {
        let config = json!({"metadata": {"name": "x"}, "data": {"k": "v"}});
        let first = apply(None, &config, "me", "v1", None).unwrap();
        let second = apply(Some(&first), &config, "me", "v1", None).unwrap();
        assert_eq!(first, second);
        let changed = json!({"metadata": {"name": "x"}, "data": {"k": "w"}});
        let third = apply(Some(&second), &changed, "me", "v1", None).unwrap();
        assert_eq!(third["data"]["k"], "w");
        assert_eq!(
            third["metadata"]["managedFields"].as_array().unwrap().len(),
            1
        );
    }
}
