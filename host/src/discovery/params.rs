//! The `file-discovery` plugin's `parameters`, validated into `FileDiscoveryParams`.
//!
//! It owns only the shape of the parameters and the resolution of a relative `path`; it
//! does not check that the file exists (starting discovery does, with a better message).

use std::path::{Path, PathBuf};

use super::DiscoveryError;

/// The plugin `type` these parameters belong to.
pub const PLUGIN_TYPE: &str = "file-discovery";

/// Validated `parameters` of a `file-discovery` plugin.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileDiscoveryParams {
    /// The endpoints file; absolute when a base directory was given.
    pub path: PathBuf,
    /// Reload the file when it changes (upstream's `watchFile`, default false).
    pub watch_file: bool,
}

impl FileDiscoveryParams {
    /// Validates `parameters`. A relative `path` resolves against `base_dir` (the config
    /// file's directory), so a config means the same thing whatever the working directory.
    pub fn from_json(params: &serde_json::Value, base_dir: Option<&Path>) -> Result<Self, DiscoveryError> {
        let serde_json::Value::Object(map) = params else {
            return Err(invalid("parameters", format!("must be a mapping with `path`, got {}", kind_of(params))));
        };
        // Unknown keys are errors, not warnings: a misspelt `watchfile` would otherwise
        // silently turn watching off.
        if let Some(key) = map.keys().find(|k| !matches!(k.as_str(), "path" | "watchFile")) {
            return Err(invalid(key, "unknown parameter (expected `path` and optionally `watchFile`)"));
        }
        let path = match map.get("path") {
            None | Some(serde_json::Value::Null) => return Err(invalid("path", "required")),
            Some(serde_json::Value::String(s)) if s.trim().is_empty() => return Err(invalid("path", "is empty")),
            Some(serde_json::Value::String(s)) => PathBuf::from(s),
            Some(other) => return Err(invalid("path", format!("must be a string, got {}", kind_of(other)))),
        };
        let path = match base_dir {
            Some(base) if path.is_relative() => base.join(path),
            _ => path,
        };
        let watch_file = match map.get("watchFile") {
            None | Some(serde_json::Value::Null) => false,
            Some(serde_json::Value::Bool(b)) => *b,
            Some(other) => return Err(invalid("watchFile", format!("must be true or false, got {}", kind_of(other)))),
        };
        Ok(Self { path, watch_file })
    }
}

fn invalid(field: impl Into<String>, message: impl Into<String>) -> DiscoveryError {
    DiscoveryError::Params { field: field.into(), message: message.into() }
}

fn kind_of(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::Null => "null".into(),
        serde_json::Value::Bool(b) => format!("the bool {b}"),
        serde_json::Value::Number(n) => format!("the number {n}"),
        serde_json::Value::String(s) => format!("the string {s:?}"),
        serde_json::Value::Array(_) => "a list".into(),
        serde_json::Value::Object(_) => "a mapping".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn params_table() {
        let base = Path::new("/etc/epp");
        // (parameters, base dir, Ok((path, watch)) or Err(field named in the error))
        type Case<'a> = (serde_json::Value, Option<&'a Path>, Result<(&'a str, bool), &'a str>);
        let cases: Vec<Case> = vec![
            (json!({"path": "endpoints.yaml"}), Some(base), Ok(("/etc/epp/endpoints.yaml", false))),
            (json!({"path": "endpoints.yaml"}), None, Ok(("endpoints.yaml", false))),
            (json!({"path": "/abs/e.yaml", "watchFile": true}), Some(base), Ok(("/abs/e.yaml", true))),
            (json!({"path": "e.yaml", "watchFile": false}), Some(base), Ok(("/etc/epp/e.yaml", false))),
            (json!({"path": "e.yaml", "watchFile": null}), None, Ok(("e.yaml", false))),
            (json!({}), None, Err("path")),
            (json!(null), None, Err("parameters")),
            (json!("e.yaml"), None, Err("parameters")),
            (json!({"path": ""}), None, Err("path")),
            (json!({"path": 3}), None, Err("path")),
            (json!({"path": "e.yaml", "watchFile": "true"}), None, Err("watchFile")),
            (json!({"path": "e.yaml", "watchfile": true}), None, Err("watchfile")),
        ];
        for (params, base_dir, want) in cases {
            let got = FileDiscoveryParams::from_json(&params, base_dir);
            match (got, want) {
                (Ok(p), Ok((path, watch))) => {
                    assert_eq!((p.path.as_path(), p.watch_file), (Path::new(path), watch), "{params}")
                }
                (Err(DiscoveryError::Params { field, message }), Err(want_field)) => {
                    assert_eq!(field, want_field, "{params}: {message}")
                }
                (got, want) => panic!("{params}: got {got:?}, want {want:?}"),
            }
        }
    }
}
