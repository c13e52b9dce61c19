//! `AUTOPILOT_*` environment variables override any key of the file:
//! `AUTOPILOT_SERVER__LISTEN=0.0.0.0:8080`, `AUTOPILOT_QUEUE__WORKERS=8`,
//! `AUTOPILOT_RULES__0__CATCH_UP=1h` (`__` separates keys; a number indexes an array).
//! A value is read as TOML when it parses as one (`8`, `true`, `["a"]`), else as a string.

use toml_edit::{DocumentMut, Item, Table, Value};

pub const PREFIX: &str = "AUTOPILOT_";

/// Returns the text with overrides applied and the names of the variables used.
pub fn apply(text: &str, env: &[(String, String)]) -> Result<(String, Vec<String>), String> {
    if env.iter().any(|(k, _)| k == PREFIX) {
        return Err(format!("{PREFIX} names no key: write {PREFIX}SECTION__KEY"));
    }
    let mut vars: Vec<_> = env.iter().filter(|(k, _)| k.starts_with(PREFIX)).collect();
    if vars.is_empty() {
        return Ok((text.to_string(), Vec::new()));
    }
    vars.sort();
    let mut doc: DocumentMut = text
        .parse()
        .map_err(|e: toml_edit::TomlError| e.to_string())?;
    let mut applied = Vec::new();
    for (name, raw) in vars {
        let path: Vec<String> = name[PREFIX.len()..]
            .split("__")
            .map(|s| s.to_ascii_lowercase())
            .collect();
        if path.iter().any(String::is_empty) {
            return Err(format!("{name}: empty key segment (use `__` between keys)"));
        }
        let value = raw
            .parse::<Value>()
            .ok()
            .filter(|v| !matches!(v, Value::InlineTable(_)) || raw.trim_start().starts_with('{'))
            .unwrap_or_else(|| Value::from(raw.as_str()));
        set(doc.as_table_mut(), &path, value).map_err(|e| format!("{name}: {e}"))?;
        applied.push(name.clone());
    }
    Ok((doc.to_string(), applied))
}

fn set(table: &mut Table, path: &[String], value: Value) -> Result<(), String> {
    let (head, rest) = path.split_first().expect("path is not empty");
    if rest.is_empty() {
        table.insert(head, Item::Value(value));
        return Ok(());
    }
    let item = table
        .entry(head)
        .or_insert_with(|| Item::Table(Table::new()));
    set_item(item, rest, value)
}

fn set_item(item: &mut Item, path: &[String], value: Value) -> Result<(), String> {
    match item {
        Item::Table(t) => set(t, path, value),
        Item::ArrayOfTables(arr) => {
            let (idx, rest) = path.split_first().expect("path is not empty");
            let i: usize = idx
                .parse()
                .map_err(|_| format!("`{idx}` must be an index into the array"))?;
            let len = arr.len();
            let t = arr
                .get_mut(i)
                .ok_or_else(|| format!("index {i} is past the end ({len} entries)"))?;
            if rest.is_empty() {
                return Err("cannot replace a whole table; name a key inside it".into());
            }
            set(t, rest, value)
        }
        Item::Value(Value::InlineTable(t)) => {
            let (head, rest) = path.split_first().expect("path is not empty");
            if rest.is_empty() {
                t.insert(head, value);
                Ok(())
            } else {
                let inner = t
                    .get_mut(head)
                    .ok_or_else(|| format!("no key `{head}` to descend into"))?;
                let mut as_item = Item::Value(inner.clone());
                set_item(&mut as_item, rest, value)?;
                if let Item::Value(v) = as_item {
                    *inner = v;
                }
                Ok(())
            }
        }
        _ => Err("that key holds a plain value, not a table".into()),
    }
}
