//! The `experiment` section of the config (our extension): the YAML as written and its
//! validation into `epp_core::experiment::ExperimentSpec`, with errors naming the field.

use serde::Deserialize;

use epp_core::experiment::{ExperimentSpec, Split, StickyKey, VariantSpec};

use super::{ConfigError, ProfileSpec, invalid};

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RawExperiment {
    split: Option<RawSplit>,
    response_header: Option<bool>,
    #[serde(default)]
    variants: Vec<RawVariant>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSplit {
    by: String,
    header: Option<String>,
    key: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVariant {
    name: Option<String>,
    profile: Option<String>,
    percent: Option<f64>,
    shadow: Option<bool>,
    sample: Option<f64>,
}

pub(super) fn parse_spec(raw: RawExperiment, profiles: &[ProfileSpec]) -> Result<ExperimentSpec, ConfigError> {
    let split = match raw.split {
        None => Split::Percent,
        Some(s) => match s.by.as_str() {
            "percent" => Split::Percent,
            "header" => Split::Header(
                s.header
                    .filter(|h| !h.is_empty())
                    .ok_or_else(|| invalid("experiment.split.header", "required with by: header"))?
                    .to_ascii_lowercase(),
            ),
            "sticky" => {
                let key = s.key.ok_or_else(|| invalid("experiment.split.key", "required with by: sticky"))?;
                match key.strip_prefix("header:") {
                    Some(h) if !h.is_empty() => Split::Sticky(StickyKey::Header(h.to_ascii_lowercase())),
                    _ if key == "user" => Split::Sticky(StickyKey::User),
                    _ => {
                        return Err(invalid("experiment.split.key", format!("`{key}`; use `header:<name>` or `user`")));
                    }
                }
            }
            other => return Err(invalid("experiment.split.by", format!("`{other}`; use percent, header or sticky"))),
        },
    };
    let mut variants: Vec<VariantSpec> = Vec::new();
    for (i, v) in raw.variants.into_iter().enumerate() {
        let field = |f: &str| format!("experiment.variants[{i}].{f}");
        let name = v.name.filter(|n| !n.is_empty()).ok_or_else(|| invalid(field("name"), "missing"))?;
        if variants.iter().any(|x| x.name == name) {
            return Err(invalid(field("name"), format!("duplicate variant `{name}`")));
        }
        let profile = v.profile.ok_or_else(|| invalid(field("profile"), "missing"))?;
        if !profiles.iter().any(|p| p.name == profile) {
            return Err(invalid(field("profile"), format!("no schedulingProfile named `{profile}`")));
        }
        let shadow = v.shadow.unwrap_or(false);
        let percent = v.percent.unwrap_or(0.0);
        if !(0.0..=100.0).contains(&percent) {
            return Err(invalid(field("percent"), format!("{percent} is outside 0–100")));
        }
        let sample = v.sample.unwrap_or(1.0);
        if !(0.0..=1.0).contains(&sample) {
            return Err(invalid(field("sample"), format!("{sample} is outside 0–1")));
        }
        variants.push(VariantSpec { name, profile, percent, shadow, sample });
    }
    let routing: Vec<&VariantSpec> = variants.iter().filter(|v| !v.shadow).collect();
    if routing.is_empty() {
        return Err(invalid("experiment.variants", "needs at least one variant that is not a shadow"));
    }
    let total: f64 = routing.iter().map(|v| v.percent).sum();
    if (total - 100.0).abs() > 1e-6 {
        return Err(invalid(
            "experiment.variants",
            format!("the percents of routing variants add up to {total}, not 100"),
        ));
    }
    Ok(ExperimentSpec { split, variants, response_header: raw.response_header.unwrap_or(false) })
}
