//! Copies between the SDK's plain types (what the scheduler holds) and the bindgen types
//! that wasmtime lowers into a component. Field-for-field; no policy here.

use llmd_plugin_sdk as sdk;

use super::bindings::types as wit;

pub fn request(r: &sdk::Request) -> wit::Request {
    wit::Request {
        id: r.id.clone(),
        model: r.model.clone(),
        prompt: r.prompt.clone(),
        cache_salt: r.cache_salt.clone(),
        headers: r.headers.clone(),
        priority: r.priority,
        random_seed: r.random_seed,
    }
}

pub fn metrics(m: &sdk::Metrics) -> wit::Metrics {
    wit::Metrics {
        ids: m.ids.clone(),
        waiting: m.waiting.clone(),
        running: m.running.clone(),
        kv_usage: m.kv_usage.clone(),
        age_ms: m.age_ms.clone(),
    }
}

pub fn columns_in(cols: &[sdk::Column]) -> Vec<wit::Column> {
    cols.iter().map(|c| wit::Column { name: c.name.clone(), values: c.values.clone() }).collect()
}

pub fn columns_out(cols: Vec<wit::Column>) -> Vec<sdk::Column> {
    cols.into_iter().map(|c| sdk::Column { name: c.name, values: c.values }).collect()
}

pub fn endpoint(e: &sdk::EndpointInfo) -> wit::EndpointInfo {
    wit::EndpointInfo {
        id: e.id,
        name: e.name.clone(),
        namespace: e.namespace.clone(),
        address: e.address.clone(),
        port: e.port,
        labels: e.labels.clone(),
        max_lora: e.max_lora,
        running_adapters: e.running_adapters.clone(),
        waiting_adapters: e.waiting_adapters.clone(),
    }
}

pub fn usage(u: sdk::Usage) -> wit::Usage {
    wit::Usage {
        prompt_tokens: u.prompt_tokens,
        cached_tokens: u.cached_tokens,
        completion_tokens: u.completion_tokens,
    }
}
