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
    serde_json::from_value(value).map_err(|e| format!("invalid parameters: {e}"))
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
