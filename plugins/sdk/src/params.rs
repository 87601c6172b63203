//! Parsing a plugin's `parameters` JSON into its typed config, with errors that name the
//! offending field. `{}`, `null` and the empty string all mean "defaults".

use serde::de::DeserializeOwned;

/// Parses `params_json` into `T` (whose `Default` supplies missing fields when `T` uses
/// `#[serde(default)]`).
pub fn parse<T: DeserializeOwned + Default>(params_json: &str) -> Result<T, String> {
    let trimmed = params_json.trim();
    if trimmed.is_empty() || trimmed == "null" {
        return Ok(T::default());
    }
    let value: serde_json::Value = serde_json::from_str(trimmed).map_err(|e| format!("invalid parameters: {e}"))?;
    // serde would also fill a struct from a JSON array, by position; parameters are named.
    if !value.is_object() {
        return Err(format!("invalid parameters: expected an object of named parameters, got {value}"));
    }
    serde_json::from_value(value.clone()).map_err(|e| match culprit::<T>(&value) {
        Some(field) if !e.to_string().contains(&format!("`{field}`")) => format!("invalid parameters: {field}: {e}"),
        _ => format!("invalid parameters: {e}"),
    })
}

/// The parameter a failed parse stumbled on, found by parsing each one alone (serde's own
/// message names an unknown field but not one of the wrong type); `None` when `T` needs
/// more than one field at once.
fn culprit<T: DeserializeOwned>(value: &serde_json::Value) -> Option<String> {
    serde_json::from_value::<T>(serde_json::json!({})).ok()?;
    value.as_object()?.iter().find_map(|(k, v)| {
        let alone = serde_json::Value::Object(std::iter::once((k.clone(), v.clone())).collect());
        serde_json::from_value::<T>(alone).is_err().then(|| k.clone())
    })
}

/// A Go duration as upstream writes them (`2s`, `500ms`, `1m30s`, `1.5s`, `0s`, `0`; units
/// `h`, `m`, `s`, `ms`, `us`/`µs`, `ns`); `None` for anything else, negative included.
pub fn duration(s: &str) -> Option<std::time::Duration> {
    let s = s.trim();
    if s == "0" {
        return Some(std::time::Duration::ZERO);
    }
    if s.is_empty() {
        return None;
    }
    let mut total = 0.0f64;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(rest.len());
        if digits == 0 {
            return None;
        }
        let value: f64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let unit_len = rest.find(|c: char| c.is_ascii_digit() || c == '.').unwrap_or(rest.len());
        let scale = match &rest[..unit_len] {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 1e-3,
            "us" | "µs" => 1e-6,
            "ns" => 1e-9,
            _ => return None,
        };
        rest = &rest[unit_len..];
        total += value * scale;
    }
    std::time::Duration::try_from_secs_f64(total).ok()
}

/// Parameters every picker accepts: how many endpoints to return (primary + fallbacks).
#[derive(Debug, serde::Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct PickerParams {
    pub max_num_of_endpoints: usize,
}

impl Default for PickerParams {
    fn default() -> Self {
        PickerParams { max_num_of_endpoints: 1 }
    }
}

impl PickerParams {
    /// Parses and validates picker parameters.
    pub fn parse(params_json: &str) -> Result<Self, String> {
        let p: PickerParams = parse(params_json)?;
        if p.max_num_of_endpoints == 0 {
            return Err("maxNumOfEndpoints must be at least 1".into());
        }
        Ok(p)
    }
}

/// For plugins without parameters: `{}` (or nothing) is accepted, any named parameter is an
/// error naming it, as upstream's strict decoding does.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NoParams {}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::{duration, parse};

    #[derive(Debug, Default, serde::Deserialize)]
    #[serde(default, rename_all = "camelCase", deny_unknown_fields)]
    struct Knobs {
        enabled: bool,
        limit: u32,
    }

    #[test]
    fn a_parameter_of_the_wrong_type_is_named() {
        let err = parse::<Knobs>(r#"{"limit": 3, "enabled": "yes"}"#).unwrap_err();
        assert!(err.starts_with("invalid parameters: enabled: invalid type"), "{err}");
        let err = parse::<Knobs>(r#"{"limit": -1}"#).unwrap_err();
        assert!(err.starts_with("invalid parameters: limit: "), "{err}");
        // An unknown one is named by serde already, once.
        let err = parse::<Knobs>(r#"{"limti": 3}"#).unwrap_err();
        assert!(err.starts_with("invalid parameters: unknown field `limti`"), "{err}");
        let ok = parse::<Knobs>(r#"{"enabled": true}"#).unwrap();
        assert!(ok.enabled && ok.limit == 0);
    }

    #[test]
    fn go_durations() {
        for (text, want) in [
            ("60s", Duration::from_secs(60)),
            ("1m30s", Duration::from_secs(90)),
            ("250ms", Duration::from_millis(250)),
            ("1.5s", Duration::from_millis(1500)),
            ("2h", Duration::from_secs(7200)),
            ("100us", Duration::from_micros(100)),
            ("100µs", Duration::from_micros(100)),
            ("0s", Duration::ZERO),
            ("0", Duration::ZERO),
            (" 2s ", Duration::from_secs(2)),
        ] {
            assert_eq!(duration(text), Some(want), "{text}");
        }
        for bad in ["", "-5s", "soon", "5", "5 s", "s", "1.2.3s", "5d"] {
            assert_eq!(duration(bad), None, "{bad}");
        }
    }
}
