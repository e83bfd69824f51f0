//! The patch formats the apiserver accepts, applied to JSON objects: JSON merge patch
//! (RFC 7386), an approximation of strategic merge patch, and JSON patch (RFC 6902).

use serde_json::{Map, Value};

/// RFC 7386: objects merge key by key, `null` removes, anything else replaces.
pub fn merge(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let target = target.as_object_mut().expect("made an object above");
    for (key, value) in patch {
        if value.is_null() {
            target.remove(key);
        } else {
            merge(target.entry(key.clone()).or_insert(Value::Null), value);
        }
    }
}

/// Strategic merge patch without the schema: like a merge patch, except that lists of objects
/// that all carry a `name` (containers, env, volumes, ports) merge element by element, which is
/// the merge key of nearly every such list, and the `$`-directives kubectl writes are honoured
/// (`$patch: delete`) or dropped (`$setElementOrder`, `$retainKeys`).
pub fn strategic(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if patch.get("$patch").and_then(Value::as_str) == Some("replace") {
        let mut replaced = patch.clone();
        replaced.remove("$patch");
        *target = Value::Object(replaced);
        return;
    }
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let target = target.as_object_mut().expect("made an object above");
    for (key, value) in patch {
        if key.starts_with('$') {
            continue;
        }
        match (target.get_mut(key), value) {
            (_, Value::Null) => {
                target.remove(key);
            }
            (Some(Value::Array(existing)), Value::Array(items)) if keyed_by_name(items) => {
                merge_named(existing, items)
            }
            (Some(existing), Value::Object(_)) => strategic(existing, value),
            _ => {
                let mut fresh = Value::Null;
                strategic(&mut fresh, value);
                target.insert(key.clone(), strip_directives(fresh));
            }
        }
    }
}

fn keyed_by_name(items: &[Value]) -> bool {
    !items.is_empty() && items.iter().all(|i| i.get("name").is_some())
}

fn merge_named(existing: &mut Vec<Value>, items: &[Value]) {
    for item in items {
        let position = existing
            .iter()
            .position(|e| e.get("name") == item.get("name"));
        let delete = item.get("$patch").and_then(Value::as_str) == Some("delete");
        match (position, delete) {
            (Some(i), true) => {
                existing.remove(i);
            }
            (None, true) => {}
            (Some(i), false) => strategic(&mut existing[i], item),
            (None, false) => existing.push(strip_directives(item.clone())),
        }
    }
}

fn strip_directives(value: Value) -> Value {
    match value {
        Value::Object(map) => Value::Object(
            map.into_iter()
                .filter(|(k, _)| !k.starts_with('$'))
                .map(|(k, v)| (k, strip_directives(v)))
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.into_iter().map(strip_directives).collect()),
        other => other,
    }
}

/// RFC 6902 operations; the error says which operation failed and why.
pub fn json_patch(target: &mut Value, operations: &Value) -> Result<(), String> {
    let operations = operations
        .as_array()
        .ok_or("a JSON patch must be a list of operations")?;
    for op in operations {
        let name = op["op"].as_str().unwrap_or_default();
        let path = op["path"].as_str().ok_or("operation without a path")?;
        match name {
            "add" | "replace" => {
                let value = op
                    .get("value")
                    .cloned()
                    .ok_or("operation without a value")?;
                set(target, path, value, name == "add")?
            }
            "remove" => {
                remove(target, path)?;
            }
            "test" => {
                if target.pointer(path) != op.get("value") {
                    return Err(format!("test at {path} failed"));
                }
            }
            "move" | "copy" => {
                let from = op["from"].as_str().ok_or("operation without from")?;
                let value = if name == "move" {
                    remove(target, from)?
                } else {
                    target.pointer(from).cloned().ok_or("from does not exist")?
                };
                set(target, path, value, true)?
            }
            other => return Err(format!("unknown operation {other:?}")),
        }
    }
    Ok(())
}

fn split(path: &str) -> Result<(&str, String), String> {
    let (parent, last) = path
        .rsplit_once('/')
        .ok_or_else(|| format!("invalid path {path:?}"))?;
    Ok((parent, last.replace("~1", "/").replace("~0", "~")))
}

fn set(target: &mut Value, path: &str, value: Value, add: bool) -> Result<(), String> {
    let (parent, key) = split(path)?;
    let parent = target
        .pointer_mut(parent)
        .ok_or_else(|| format!("missing parent of {path}"))?;
    match parent {
        Value::Object(map) => {
            if !add && !map.contains_key(&key) {
                return Err(format!("{path} does not exist"));
            }
            map.insert(key, value);
        }
        Value::Array(items) if key == "-" && add => items.push(value),
        Value::Array(items) => {
            let i: usize = key.parse().map_err(|_| format!("bad index in {path}"))?;
            match (add, i <= items.len(), i < items.len()) {
                (true, true, _) => items.insert(i, value),
                (false, _, true) => items[i] = value,
                _ => return Err(format!("index out of range in {path}")),
            }
        }
        _ => return Err(format!("{path} is inside a scalar")),
    }
    Ok(())
}

fn remove(target: &mut Value, path: &str) -> Result<Value, String> {
    let (parent, key) = split(path)?;
    let removed = match target.pointer_mut(parent) {
        Some(Value::Object(map)) => map.remove(&key),
        Some(Value::Array(items)) => key
            .parse::<usize>()
            .ok()
            .filter(|i| *i < items.len())
            .map(|i| items.remove(i)),
        _ => None,
    };
    removed.ok_or_else(|| format!("{path} does not exist"))
}
