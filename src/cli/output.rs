//! How `list` and `show` print resources, the way `az` does: JSON with the properties
//! flattened to the top level, a table, or tab-separated values, after an optional `--query`.

use serde_json::{Map, Value};

use crate::arm::ConnectedCluster;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    Json,
    Table,
    Tsv,
    Yaml,
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

#[cfg(test)]
fn query(value: &Value, expression: &str) -> Result<Value, String> {
    queried(value, expression).map(|(value, _)| value)
}

/// `--query`, a JMESPath expression as `az` evaluates it (the same language and library
/// family): `[].name`, `[?connectivityStatus=='Connected'].{Name:name, Rg:resourceGroup}`,
/// `length(@)`; fields are the flattened ones `show -o json` prints. With it, the keys its
/// final `{Key: field, ...}` names, in the order written (the columns of a table or tsv;
/// JMESPath's objects, like serde_json's, keep keys sorted).
fn queried(value: &Value, expression: &str) -> Result<(Value, Option<Vec<String>>), String> {
    let compiled = jmespath::compile(expression).map_err(|e| {
        format!(
            "--query {expression:?} is not a JMESPath expression: {e}; for example \"[].name\" or \"connectivityStatus\""
        )
    })?;
    let found = compiled
        .search(value.clone())
        .map_err(|e| format!("--query {expression:?} failed: {e}"))?;
    let value =
        serde_json::to_value(&*found).map_err(|e| format!("--query {expression:?}: {e}"))?;
    Ok((value, projected_keys(compiled.as_ast())))
}

fn projected_keys(ast: &jmespath::ast::Ast) -> Option<Vec<String>> {
    use jmespath::ast::Ast;
    match ast {
        Ast::MultiHash { elements, .. } => Some(elements.iter().map(|e| e.key.clone()).collect()),
        Ast::Projection { rhs, .. } | Ast::Subexpr { rhs, .. } => projected_keys(rhs),
        // A filter (`[?...]`) projects through its condition.
        Ast::Condition { then, .. } => projected_keys(then),
        _ => None,
    }
}

/// `value` after `--query` (when given) in `format`. A table or tsv of a query's result shows
/// what the query picked, as `az` does: the keys it named as columns, in its order, or the
/// objects' own keys, or a single `Result` column for plain values; without a query, the
/// table's usual `columns`.
pub fn render_queried(
    value: &Value,
    expression: Option<&str>,
    format: Output,
    columns: &[(&str, &str)],
) -> Result<String, String> {
    let Some(expression) = expression else {
        return Ok(render_with(value, format, columns));
    };
    let (value, keys) = queried(value, expression)?;
    if !matches!(format, Output::Table | Output::Tsv) {
        return Ok(render_with(&value, format, columns));
    }
    let rows: Vec<&Value> = match &value {
        Value::Array(items) => items.iter().collect(),
        other => vec![other],
    };
    let keys = keys.unwrap_or_else(|| {
        let mut seen: Vec<String> = Vec::new();
        for key in rows
            .iter()
            .filter_map(|r| r.as_object())
            .flat_map(|o| o.keys())
        {
            if !seen.contains(key) {
                seen.push(key.clone());
            }
        }
        seen
    });
    if keys.is_empty() {
        // Plain values: one column.
        let wrapped: Vec<Value> = rows
            .iter()
            .map(|r| serde_json::json!({ "Result": r }))
            .collect();
        return Ok(render_with(
            &Value::Array(wrapped),
            format,
            &[("Result", "Result")],
        ));
    }
    let picked: Vec<(&str, &str)> = keys.iter().map(|k| (k.as_str(), k.as_str())).collect();
    Ok(match format {
        Output::Tsv => rows
            .iter()
            .map(|r| {
                picked
                    .iter()
                    .map(|(_, k)| scalar(&r[*k]))
                    .collect::<Vec<_>>()
                    .join("\t")
            })
            .collect::<Vec<_>>()
            .join("\n"),
        _ => table(&value, &picked),
    })
}

/// `az connectedk8s list -o table`: Name, Location, ResourceGroup.
const CLUSTER_COLUMNS: &[(&str, &str)] = &[
    ("Name", "name"),
    ("Location", "location"),
    ("ResourceGroup", "resourceGroup"),
];

/// Renders `value` (one resource or a list) in `format`, after `--query` when given.
pub fn render(value: &Value, expression: Option<&str>, format: Output) -> Result<String, String> {
    render_queried(value, expression, format, CLUSTER_COLUMNS)
}

/// Renders with the table's (heading, field) columns.
pub fn render_with(value: &Value, format: Output, columns: &[(&str, &str)]) -> String {
    match format {
        Output::Json => serde_json::to_string_pretty(value).unwrap_or_default(),
        Output::Yaml => serde_norway::to_string(value)
            .unwrap_or_default()
            .trim_end()
            .to_string(),
        Output::Tsv => tsv(value),
        Output::Table => table(value, columns),
    }
}

/// A resource as `az` prints it: properties lifted to the top level, plus `resourceGroup`.
pub fn flatten_value(resource: Value) -> Value {
    let mut out = Map::new();
    let group = resource["id"]
        .as_str()
        .and_then(|id| id.split('/').nth(4))
        .unwrap_or_default()
        .to_string();
    if let Value::Object(top) = resource {
        for (k, v) in top {
            match (k.as_str(), v) {
                ("properties", Value::Object(props)) => out.extend(props),
                (_, v) => {
                    out.insert(k, v);
                }
            }
        }
    }
    out.insert("resourceGroup".into(), Value::String(group));
    Value::Object(out)
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

fn table(value: &Value, columns: &[(&str, &str)]) -> String {
    let rows: Vec<&Value> = match value {
        Value::Array(items) => items.iter().collect(),
        other => vec![other],
    };
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
        assert_eq!(
            query(&v, "[?p.s=='Offline'].name | [0]").unwrap(),
            json!("b")
        );
        assert_eq!(
            query(&v, "[].{N:name, S:p.s}").unwrap(),
            json!([{"N": "a", "S": "Connected"}, {"N": "b", "S": "Offline"}])
        );
        assert_eq!(query(&v, "length(@)").unwrap(), json!(2));
        let err = query(&v, "[x").unwrap_err();
        assert!(err.contains("not a JMESPath expression"), "{err}");
        assert_eq!(
            render(&json!(["a", "b"]), None, Output::Tsv).unwrap(),
            "a\nb"
        );
    }

    #[test]
    fn a_query_picks_the_columns_of_a_table_and_their_order() {
        let v = json!([
            {"name": "prod", "location": "eastus", "resourceGroup": "rg-1", "connectivityStatus": "Connected"},
            {"name": "lab", "location": "westus", "resourceGroup": "rg-2", "connectivityStatus": "Offline"},
        ]);
        let q = "[?connectivityStatus=='Connected'].{Name:name, Status:connectivityStatus, Group:resourceGroup}";
        assert_eq!(
            render(&v, Some(q), Output::Table).unwrap(),
            "Name  Status     Group\n----  ---------  -----\nprod  Connected  rg-1"
        );
        assert_eq!(
            render(&v, Some(q), Output::Tsv).unwrap(),
            "prod\tConnected\trg-1"
        );
        assert_eq!(
            render(&v, Some("[].name"), Output::Table).unwrap(),
            "Result\n------\nprod\nlab"
        );
        // Objects the query did not build: their own keys.
        assert_eq!(
            render(&v, Some("[?name=='lab'] | [0]"), Output::Tsv).unwrap(),
            "Offline\twestus\tlab\trg-2"
        );
    }

    #[test]
    fn tables_look_like_az() {
        let v = json!([{"name": "prod", "location": "eastus", "resourceGroup": "rg-1"}]);
        assert_eq!(
            render(&v, None, Output::Table).unwrap(),
            "Name  Location  ResourceGroup\n----  --------  -------------\nprod  eastus    rg-1"
        );
    }
}
