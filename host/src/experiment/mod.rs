//! A/B experiments: the spec and the choice of a variant live in `epp_core::experiment`
//! (pure, shared with replay), the YAML in `config::experiment`; this module holds what
//! only the operator's tooling needs, `epp experiment report`.

pub mod report;

pub use epp_core::experiment::*;
