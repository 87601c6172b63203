//! `session-affinity-scorer`: keeps a session on the endpoint that served it, as upstream,
//! by scoring that endpoint 1.0 and the others 0 (the `session-affinity` library, shared
//! with `session-affinity-filter`, says how sessions are recognised and bound).

pub use session_affinity::*;

llmd_plugin_sdk::export_scorer!(SessionAffinityScorer);
