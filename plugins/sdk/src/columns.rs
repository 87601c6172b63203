//! Names of the per-endpoint columns: the built-in ones the host fills from each worker's
//! scraped metrics, and those the default producers write. Producers and the plugins that
//! read their columns share these constants so the two can never drift apart.

/// Built in: requests waiting in the worker's queue (`vllm:num_requests_waiting`).
pub const WAITING: &str = "waiting";
/// Built in: requests in the worker's running batch (`vllm:num_requests_running`).
pub const RUNNING: &str = "running";
/// Built in: fraction of the worker's KV cache in use, 0..1 (`vllm:kv_cache_usage_perc`).
pub const KV_USAGE: &str = "kv-usage";
/// Built in: milliseconds since the worker's metrics were last scraped.
pub const AGE_MS: &str = "age-ms";

/// Every built-in column, in the host's order.
pub const BUILT_IN: [&str; 4] = [WAITING, RUNNING, KV_USAGE, AGE_MS];

/// Columns named `attribute/<key>` hold an endpoint attribute: the value of the custom
/// metric that `core-metrics-extractor`'s `customMetrics` maps to `<key>` (NaN where an
/// endpoint has none). Any plugin may read one; the host fills it, no producer writes it.
pub const ATTRIBUTE_PREFIX: &str = "attribute/";

/// The column of endpoint attribute `key`.
pub fn attribute(key: &str) -> String {
    format!("{ATTRIBUTE_PREFIX}{key}")
}

/// The producer of every endpoint attribute here (its `customMetrics`).
pub const ATTRIBUTE_PRODUCER: &str = "core-metrics-extractor";

/// The column of an attribute a plugin's parameters name as upstream's do: `field` (the
/// parameter's name, for errors) holds `key`, and `producer`, when given, who publishes
/// it. As upstream, a key with `/` needs `producer` set (it may be the two spelt
/// together); a producer other than `core-metrics-extractor` (or `""`, any producer) is
/// refused, since no other publishes attributes here.
pub fn configured_attribute(field: &str, key: &str, producer: Option<&str>) -> Result<String, String> {
    if key.trim().is_empty() {
        return Err(format!("{field}: required (the endpoint attribute to read)"));
    }
    match producer {
        None if key.contains('/') => Err(format!(
            "{field}: `{key}` contains `/` and no producer is set; give the attribute and its producer as \
             two parameters (`producer`), or set `producer` if the name itself has a `/`"
        )),
        None | Some("") => Ok(attribute(key)),
        Some(p) if p == ATTRIBUTE_PRODUCER => Ok(attribute(key)),
        Some(p) => {
            Err(format!("producer: `{p}` publishes no attributes here; only {ATTRIBUTE_PRODUCER}'s customMetrics do"))
        }
    }
}

/// The column namespace of the approximate prefix index (`approx-prefix-cache-producer`).
pub const APPROX_PREFIX: &str = "prefix-cache";
/// The column namespace of the precise prefix index (`precise-prefix-cache-producer`).
pub const PRECISE_PREFIX: &str = "precise-prefix-cache";

/// Host-produced when `precise-prefix-cache-producer` is configured, from the engines' KV
/// events: per candidate, the request's blocks it holds (consecutively from the start)…
pub const KV_EVENTS_MATCHED: &str = "kv-events/matched-blocks";
/// …the request's full blocks at that engine's block size…
pub const KV_EVENTS_TOTAL: &str = "kv-events/total-blocks";
/// …that block size in tokens…
pub const KV_EVENTS_BLOCK_TOKENS: &str = "kv-events/block-tokens";
/// …and 1 when the engine's events are flowing (0: fall back to an estimate).
pub const KV_EVENTS_LIVE: &str = "kv-events/live";

/// The prefix columns of namespace `ns` (see `prefix_namespace`): how many of the
/// request's blocks each candidate holds, consecutively from the start…
pub fn prefix_matched(ns: &str) -> String {
    format!("{ns}/matched-blocks")
}
/// …how many blocks the request has (same for all candidates)…
pub fn prefix_total(ns: &str) -> String {
    format!("{ns}/total-blocks")
}
/// …and how many tokens one block holds.
pub fn prefix_block_tokens(ns: &str) -> String {
    format!("{ns}/block-tokens")
}

/// …and, per candidate, how often the prefix it holds is asked for: requests routed between
/// two requests reusing its deepest matched block, on average (infinite when it holds none
/// or the block was not seen lately). A prefix asked for every `m` requests brings `n / m`
/// workers' worth of traffic to a pool of `n`.
pub fn prefix_match_interval(ns: &str) -> String {
    format!("{ns}/match-interval")
}

/// The approximate prefix index's columns, for readers that name them directly.
pub const PREFIX_MATCHED_BLOCKS: &str = "prefix-cache/matched-blocks";
pub const PREFIX_TOTAL_BLOCKS: &str = "prefix-cache/total-blocks";
pub const PREFIX_BLOCK_TOKENS: &str = "prefix-cache/block-tokens";
/// Per candidate: how many blocks the index holds for it (its share of the index; the host
/// sums it into the indexer-size metric).
pub const PREFIX_INDEXED_BLOCKS: &str = "prefix-cache/indexed-blocks";
pub const PREFIX_MATCH_INTERVAL: &str = "prefix-cache/match-interval";

/// The namespace a prefix reader's `prefixMatchInfoProducerName` parameter selects:
/// empty or `approx-prefix-cache-producer` → `prefix-cache`, `precise-prefix-cache-producer`
/// → `precise-prefix-cache`, anything else is taken as the namespace itself.
pub fn prefix_namespace(producer_name: &str) -> &str {
    match producer_name {
        "" | "approx-prefix-cache-producer" => APPROX_PREFIX,
        "precise-prefix-cache-producer" => PRECISE_PREFIX,
        other => other,
    }
}

/// `inflight-load-producer`: uncached prompt tokens the EPP has sent to each candidate and
/// that have not started producing output yet (plus estimated output when configured).
pub const INFLIGHT_TOKENS: &str = "inflight/tokens";
/// `inflight-load-producer`: requests the EPP has sent to each candidate, not finished.
pub const INFLIGHT_REQUESTS: &str = "inflight/requests";
/// `inflight-load-producer`: the tokens this request would add to each candidate (its
/// prompt minus what the candidate likely has cached).
pub const REQUEST_UNCACHED_TOKENS: &str = "inflight/request-tokens";
