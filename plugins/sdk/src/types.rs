//! Plain Rust mirror of the WIT `types` interface. The guest bindings map the WIT types
//! onto these structs directly (wit-bindgen `with`), so field names and shapes must stay
//! exactly those of `wit/scheduler.wit`. Helpers here are pure and allocation-light.

/// Static data of one endpoint, pushed when the pool changes.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct EndpointInfo {
    pub id: u32,
    pub name: String,
    pub namespace: String,
    pub address: String,
    pub port: u16,
    pub labels: Vec<(String, String)>,
    pub max_lora: Option<u32>,
    pub running_adapters: Vec<String>,
    pub waiting_adapters: Vec<String>,
}

impl EndpointInfo {
    /// The value of label `key`, if set.
    pub fn label(&self, key: &str) -> Option<&str> {
        self.labels.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }
}

/// Per-candidate metrics of one cycle. Index i of every list belongs to `ids[i]`;
/// NaN in a float column means unknown (never scraped or stale).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Metrics {
    pub ids: Vec<u32>,
    pub waiting: Vec<f32>,
    pub running: Vec<f32>,
    pub kv_usage: Vec<f32>,
    pub age_ms: Vec<u32>,
}

impl Metrics {
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Keeps only the candidates at `positions` (ascending indices into the columns).
    pub fn select(&self, positions: &[usize]) -> Metrics {
        let pick_f = |col: &Vec<f32>| positions.iter().map(|&i| col.get(i).copied().unwrap_or(f32::NAN)).collect();
        Metrics {
            ids: positions.iter().filter_map(|&i| self.ids.get(i).copied()).collect(),
            waiting: pick_f(&self.waiting),
            running: pick_f(&self.running),
            kv_usage: pick_f(&self.kv_usage),
            age_ms: positions.iter().map(|&i| self.age_ms.get(i).copied().unwrap_or(u32::MAX)).collect(),
        }
    }
}

/// A named per-candidate column produced earlier in the cycle, aligned with `Metrics::ids`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Column {
    pub name: String,
    pub values: Vec<f32>,
}

impl Column {
    /// Keeps only the values at `positions`, as `Metrics::select` does for metrics.
    pub fn select(&self, positions: &[usize]) -> Column {
        Column {
            name: self.name.clone(),
            values: positions.iter().map(|&i| self.values.get(i).copied().unwrap_or(f32::NAN)).collect(),
        }
    }
}

/// Finds the column called `name` among those produced so far.
pub fn find_column<'a>(columns: &'a [Column], name: &str) -> Option<&'a Column> {
    columns.iter().find(|c| c.name == name)
}

/// The parts of an inference request a plugin may read.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Request {
    pub id: String,
    pub model: String,
    pub prompt: Vec<u8>,
    pub cache_salt: Option<String>,
    pub headers: Vec<(String, String)>,
    pub priority: i32,
    pub random_seed: u64,
}

impl Request {
    /// The value of header `name` (case-insensitive), if present.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

/// Token usage of a completed response.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: u32,
    pub cached_tokens: u32,
    pub completion_tokens: u32,
}
