//! Injected faults, for reliability tests of whatever sits in front of the worker.
//!
//! It owns the fault modes and the switchable runtime state (set by flags at start, by
//! `POST /admin/fault` or by [`crate::SimHandle`] later). It decides nothing about how a
//! fault looks on the wire; the server does that.

use std::fmt;
use std::sync::atomic::{AtomicU8, Ordering};

use serde::{Deserialize, Serialize};

/// How an endpoint (`/metrics`, or the inference endpoints) behaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum FaultMode {
    /// Normal service.
    #[default]
    Ok,
    /// 200 with a body that does not parse.
    Garbage,
    /// 500 with an error body.
    Error,
    /// Never answers (until the worker shuts down).
    Hang,
}

impl FaultMode {
    fn from_u8(v: u8) -> Self {
        match v {
            1 => FaultMode::Garbage,
            2 => FaultMode::Error,
            3 => FaultMode::Hang,
            _ => FaultMode::Ok,
        }
    }

    fn to_u8(self) -> u8 {
        match self {
            FaultMode::Ok => 0,
            FaultMode::Garbage => 1,
            FaultMode::Error => 2,
            FaultMode::Hang => 3,
        }
    }
}

impl fmt::Display for FaultMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FaultMode::Ok => "ok",
            FaultMode::Garbage => "garbage",
            FaultMode::Error => "error",
            FaultMode::Hang => "hang",
        })
    }
}

/// The current fault of each endpoint family; cheap to read on every request.
#[derive(Debug, Default)]
pub struct Faults {
    metrics: AtomicU8,
    requests: AtomicU8,
}

/// A change (or a report) of faults: absent fields are left as they are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultUpdate {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<FaultMode>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests: Option<FaultMode>,
}

impl Faults {
    pub fn new(metrics: FaultMode, requests: FaultMode) -> Self {
        Faults { metrics: AtomicU8::new(metrics.to_u8()), requests: AtomicU8::new(requests.to_u8()) }
    }

    pub fn metrics(&self) -> FaultMode {
        FaultMode::from_u8(self.metrics.load(Ordering::Relaxed))
    }

    pub fn requests(&self) -> FaultMode {
        FaultMode::from_u8(self.requests.load(Ordering::Relaxed))
    }

    /// Applies `update` and returns the resulting state.
    pub fn apply(&self, update: FaultUpdate) -> FaultUpdate {
        if let Some(m) = update.metrics {
            self.metrics.store(m.to_u8(), Ordering::Relaxed);
        }
        if let Some(m) = update.requests {
            self.requests.store(m.to_u8(), Ordering::Relaxed);
        }
        FaultUpdate { metrics: Some(self.metrics()), requests: Some(self.requests()) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn updates_touch_only_named_fields() {
        let f = Faults::new(FaultMode::Ok, FaultMode::Error);
        let update: FaultUpdate = serde_json::from_str(r#"{"metrics":"hang"}"#).expect("valid");
        let state = f.apply(update);
        assert_eq!(state, FaultUpdate { metrics: Some(FaultMode::Hang), requests: Some(FaultMode::Error) });
        assert!(serde_json::from_str::<FaultUpdate>(r#"{"metrics":"slow"}"#).is_err());
        assert!(serde_json::from_str::<FaultUpdate>(r#"{"health":"ok"}"#).is_err());
    }
}
