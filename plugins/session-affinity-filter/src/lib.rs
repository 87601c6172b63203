//! `session-affinity-filter`: pins a session to the endpoint that served it as a hard
//! constraint, as upstream: that endpoint alone when it is a candidate, every candidate when
//! there is no session or its endpoint is not one (the `session-affinity` library, shared
//! with `session-affinity-scorer`, says how sessions are recognised and bound).

pub use session_affinity::*;

llmd_plugin_sdk::export_filter!(SessionAffinityFilter);
