//! Endpoint discovery from a file: the `file-discovery` plugin of the upstream EPP.
//!
//! This module owns reading, validating and watching the endpoints file, and is the only
//! place in the host that touches `notify`. It hands whole, validated endpoint sets to a
//! callback and keeps no other state about endpoints: it must not know about metrics,
//! scheduling or the datastore, and it never lets a bad file replace the last good set.
//!
//! - `params`: the plugin's `parameters` (`path`, `watchFile`).
//! - `file`: the file format, parsed once into `EndpointSpec`s.
//! - `diff`: what changed between two sets (for logs, and for consumers applying changes).
//! - `watch`: `FileDiscovery`, the initial load plus the optional watcher thread.

mod diff;
mod file;
mod params;
mod watch;

use std::path::PathBuf;

pub use diff::{EndpointDiff, diff};
pub use file::{DEFAULT_NAMESPACE, EndpointSpec, MAX_FILE_BYTES, Parsed, load_file, parse_endpoints};
pub use params::{FileDiscoveryParams, PLUGIN_TYPE};
pub use watch::{DiscoveryStats, FileDiscovery};

/// Why discovery could not start, or why a file was rejected.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error("file-discovery parameter `{field}`: {message}")]
    Params { field: String, message: String },
    #[error("cannot read endpoints file {path}: {error}")]
    Read { path: PathBuf, error: std::io::Error },
    #[error("endpoints file {path} is {size} bytes, more than the {MAX_FILE_BYTES}-byte limit")]
    TooLarge { path: PathBuf, size: u64 },
    #[error("invalid endpoints file: {0}")]
    Parse(String),
    #[error("cannot watch the endpoints file: {0}")]
    Watch(String),
}
