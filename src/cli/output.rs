//! How `list` and `show` print resources, the way `az` does: JSON with the properties
//! flattened to the top level, a table, or tab-separated values, after an optional `--query`.

use serde_json::{Map, Value};

use crate::arm::ConnectedCluster;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    Json,
    Table,
    Tsv,
}

/// The resource as `az connectedk8s show` prints it: properties lifted to the top level,
/// plus `resourceGroup`, keys sorted.
pub fn flatten(cluster: &ConnectedCluster) -> Value {
    let mut out = Map::new();
    if let Ok(Value::Object(top)) = serde_json::to_value(cluster) {
        for (k, v) in top {
            match (k.as_str(), v) {
                ("properties", Value::Object(props)) => out.extend(props),
                ("type", Value::String(t)) => {
                    out.insert(k, Value::String(t.to_ascii_lowercase()));
                }
                (_, v) => {
                    out.insert(k, v);
                }
            }
        }
    }
    let group = cluster.id.split('/').nth(4).unwrap_or_default().to_string();
    out.insert("resourceGroup".into(), Value::String(group));
    Value::Object(out)
}

/// A JMESPath-style pick: `a.b`, `[0]`, `[].name` (a projection over a list), and
/// `[].{Name:name, Status:connectivityStatus}`-free simple paths are what scripts use.
pub fn query(value: &Value, path: &str) -> Result<Value, String> {
    let mut current = vec![value.clone()];
    let mut projected = false;
    let mut rest = path.trim();
    while !rest.is_empty() {
        rest = rest.strip_prefix('.').unwrap_or(rest);
        if let Some(after) = rest.strip_prefix("[]").or_else(|| rest.strip_prefix("[*]")) {
            current = current
                .into_iter()
                .flat_map(|v| match v {
                    Value::Array(items) => items,
                    _ => Vec::new(),
                })
                .collect();
            projected = true;
            rest = after;
            continue;
        }
        if let Some(after) = rest.strip_prefix('[') {
            let (index, after) = after
                .split_once(']')
                .ok_or_else(|| format!("--query {path:?}: unclosed '['"))?;
            let i: usize = index
                .trim()
                .parse()
                .map_err(|_| format!("--query {path:?}: [{index}] is not an index"))?;
            current = current
                .into_iter()
                .map(|v| v.get(i).cloned().unwrap_or(Value::Null))
                .collect();
            rest = after;
            continue;
        }
        let end = rest.find(['.', '[']).unwrap_or(rest.len());
        let (field, after) = rest.split_at(end);
        if field.is_empty() || !field.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(format!(
                "--query {path:?}: use field names, '.', [N] and [] (e.g. \"[].name\" or \"properties.connectivityStatus\")"
            ));
        }
        current = current
            .into_iter()
            .map(|v| v.get(field).cloned().unwrap_or(Value::Null))
            .collect();
        rest = after;
    }
    Ok(if projected {
        Value::Array(current)
    } else {
        current.into_iter().next().unwrap_or(Value::Null)
    })
}

/// Renders `value` (one resource or a list) in `format`.
pub fn render(value: &Value, format: Output) -> String {
    match format {
        Output::Json => serde_json::to_string_pretty(value).unwrap_or_default(),
        Output::Tsv => tsv(value),
        Output::Table => table(value),
    }
}

fn scalar(v: &Value) -> String {
    match v {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn tsv(value: &Value) -> String {
    let rows: Vec<&Value> = match value {
        Value::Array(items) => items.iter().collect(),
        other => vec![other],
    };
    rows.iter()
        .map(|row| match row {
            Value::Object(map) => map.values().map(scalar).collect::<Vec<_>>().join("\t"),
            other => scalar(other),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// `az connectedk8s list -o table`: Name, Location, ResourceGroup.
fn table(value: &Value) -> String {
    let rows: Vec<&Value> = match value {
        Value::Array(items) => items.iter().collect(),
        other => vec![other],
    };
    let columns = [
        ("Name", "name"),
        ("Location", "location"),
        ("ResourceGroup", "resourceGroup"),
    ];
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| columns.iter().map(|(_, f)| scalar(&r[*f])).collect())
        .collect();
    let widths: Vec<usize> = columns
        .iter()
        .enumerate()
        .map(|(i, (h, _))| {
            cells
                .iter()
                .map(|c| c[i].len())
                .chain([h.len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |parts: Vec<String>| {
        parts
            .iter()
            .enumerate()
            .map(|(i, p)| format!("{p:<w$}", w = widths[i]))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_string()
    };
    let mut out = vec![
        line(columns.iter().map(|(h, _)| h.to_string()).collect()),
        line(widths.iter().map(|w| "-".repeat(*w)).collect()),
    ];
    out.extend(cells.into_iter().map(line));
    out.join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn queries_pick_fields_indexes_and_projections() {
        let v =
            json!([{"name": "a", "p": {"s": "Connected"}}, {"name": "b", "p": {"s": "Offline"}}]);
        assert_eq!(query(&v, "[].name").unwrap(), json!(["a", "b"]));
        assert_eq!(query(&v, "[1].p.s").unwrap(), json!("Offline"));
        assert_eq!(query(&v, "[0].missing").unwrap(), Value::Null);
        assert!(query(&v, "[x]").is_err());
        assert_eq!(render(&json!(["a", "b"]), Output::Tsv), "a\nb");
    }

    #[test]
    fn tables_look_like_az() {
        let v = json!([{"name": "prod", "location": "eastus", "resourceGroup": "rg-1"}]);
        assert_eq!(
            render(&v, Output::Table),
            "Name  Location  ResourceGroup\n----  --------  -------------\nprod  eastus    rg-1"
        );
    }
}
