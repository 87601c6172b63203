//! The plugin SDK: everything a scheduling plugin needs, so that a plugin is about one file.
//!
//! It owns the plain-Rust view of the WIT contract (`types`), the role traits a plugin
//! implements (`Producer`, `Filter`, `Scorer`, `Picker`, all on top of `Plugin`), and the
//! `export_*!` macros that turn such a type into a WebAssembly component export. The same
//! plugin crate compiles natively too — the bindings exist only on `target_family = "wasm"`
//! — so the host can run a plugin natively and as a component and compare the results.
//!
//! It must not hold scheduling policy: behaviour belongs to the plugin crates.

pub mod columns;
pub mod params;
pub mod pending;
pub mod rng;
pub mod score;
pub mod types;

#[doc(hidden)]
pub mod __private {
    #[cfg(target_family = "wasm")]
    pub use wit_bindgen;
}

include!(concat!(env!("OUT_DIR"), "/bindings_macros.rs"));

pub use types::{
    CacheInfo, Completion, Cycle, EndpointInfo, Manifest, Needs, OUTGROWN_QUEUE_RATIO, Outcome, Request, Usage,
    adapter_outgrown, listed_adapters,
};

/// The WIT package version this SDK (and every plugin built with it) speaks.
pub const WIT_VERSION: &str = "0.3.0";

/// The WIT contract this SDK was built from (`wit/scheduler.wit`), for tools that write it
/// out next to a plugin (`epp plugin new`) or build plugins in other languages.
pub const WIT_TEXT: &str = include_str!(concat!(env!("OUT_DIR"), "/scheduler.wit"));

/// Life-cycle calls every plugin receives, whatever its role. Hooks are called only when
/// the manifest asks for them (`Needs`); all have no-op defaults.
pub trait Plugin: Default {
    /// Receives the `parameters` of the plugin's config entry as JSON (`{}` when absent)
    /// and says what the plugin needs. An error rejects the config with its message.
    fn configure(&mut self, _params_json: &str) -> Result<Manifest, String> {
        Ok(Manifest::default())
    }
    /// The pool or an endpoint's static data changed; `endpoints` is the whole new pool.
    fn pool_changed(&mut self, _generation: u64, _endpoints: &[EndpointInfo]) {}
    /// The request of cycle `cycle` was sent to `endpoint`. Returned headers are added to
    /// the response the client gets.
    fn decided(&mut self, _cycle: u64, _endpoint: u32) -> Vec<(String, String)> {
        Vec::new()
    }
    /// The first response bytes of cycle `cycle` arrived from `endpoint` at `now_ms` (the
    /// clock of `Cycle::now_ms`). For a request that is not streamed (`Request::stream`)
    /// that is when the whole answer arrived.
    fn first_chunk(&mut self, _cycle: u64, _endpoint: u32, _now_ms: u64) {}
    /// The request of cycle `cycle` ended; called exactly once per decided cycle.
    fn finished(&mut self, _cycle: u64, _completion: &Completion) {}
}

/// Runs first in a cycle; returns the manifest's `writes` columns, one after the other,
/// each one value per candidate.
pub trait Producer: Plugin {
    fn produce(&mut self, cycle: &Cycle) -> Vec<f32>;
}

/// Narrows the candidates; returns the ids to keep.
pub trait Filter: Plugin {
    fn filter(&mut self, cycle: &Cycle) -> Vec<u32>;
}

/// Returns one score per candidate, index-aligned with `cycle.ids`, in [0, 1].
pub trait Scorer: Plugin {
    fn score(&mut self, cycle: &Cycle) -> Vec<f32>;
}

/// Chooses among scored candidates; returns ids, primary first, then fallbacks.
pub trait Picker: Plugin {
    fn pick(&mut self, cycle: &Cycle, scores: &[f32]) -> Vec<u32>;
}

/// Implements the WIT exports shared by every role (`plugin` and `hooks`) for `$export`,
/// delegating to the plugin value in `$state`, and the moves between the generated types
/// and the SDK's. Internal to the `export_*!` macros.
#[doc(hidden)]
#[macro_export]
macro_rules! __export_common {
    ($export:ident, $state:ident) => {
        use llmd::scheduler::types as __wit;

        fn __cycle(c: __wit::Cycle) -> $crate::Cycle {
            let r = c.request;
            $crate::Cycle {
                id: c.id,
                now_ms: c.now_ms,
                request: $crate::Request {
                    model: r.model,
                    cache_salt: r.cache_salt,
                    prompt: r.prompt,
                    headers: r.headers,
                    prompt_tokens: r.prompt_tokens,
                    max_tokens: r.max_tokens,
                    stream: r.streamed,
                    priority: r.priority,
                    random_seed: r.random_seed,
                },
                ids: c.ids,
                columns: c.columns,
            }
        }

        impl exports::llmd::scheduler::plugin::Guest for $export {
            fn configure(
                params_json: ::std::string::String,
            ) -> ::std::result::Result<__wit::Manifest, ::std::string::String> {
                let m = $state.with(|s| $crate::Plugin::configure(&mut *s.borrow_mut(), &params_json))?;
                let n = m.needs;
                Ok(__wit::Manifest {
                    needs: __wit::Needs {
                        model: n.model,
                        prompt: n.prompt,
                        headers: n.headers,
                        pool: n.pool,
                        decided: n.decided,
                        first_chunk: n.first_chunk,
                        finished: n.finished,
                    },
                    reads: m.reads,
                    writes: m.writes,
                    stateless: m.stateless,
                })
            }
            fn pool_changed(generation: u64, endpoints: ::std::vec::Vec<__wit::EndpointInfo>) {
                let endpoints: ::std::vec::Vec<$crate::EndpointInfo> = endpoints
                    .into_iter()
                    .map(|e| $crate::EndpointInfo {
                        id: e.id,
                        name: e.name,
                        namespace: e.namespace,
                        address: e.address,
                        port: e.port,
                        labels: e.labels,
                        max_lora: e.max_lora,
                        running_adapters: e.running_adapters,
                        waiting_adapters: e.waiting_adapters,
                        cache: e
                            .cache
                            .map(|c| $crate::CacheInfo { block_size: c.block_size, num_gpu_blocks: c.num_gpu_blocks }),
                    })
                    .collect();
                $state.with(|s| $crate::Plugin::pool_changed(&mut *s.borrow_mut(), generation, &endpoints))
            }
        }

        impl exports::llmd::scheduler::hooks::Guest for $export {
            fn decided(cycle: u64, endpoint: u32) -> ::std::vec::Vec<(::std::string::String, ::std::string::String)> {
                $state.with(|s| $crate::Plugin::decided(&mut *s.borrow_mut(), cycle, endpoint))
            }
            fn first_chunk(cycle: u64, endpoint: u32, now_ms: u64) {
                $state.with(|s| $crate::Plugin::first_chunk(&mut *s.borrow_mut(), cycle, endpoint, now_ms))
            }
            fn finished(cycle: u64, c: __wit::Completion) {
                let completion = $crate::Completion {
                    endpoint: c.endpoint,
                    outcome: match c.outcome {
                        __wit::Outcome::Completed => $crate::Outcome::Completed,
                        __wit::Outcome::Cancelled => $crate::Outcome::Cancelled,
                        __wit::Outcome::Failed => $crate::Outcome::Failed,
                    },
                    status: c.status,
                    usage: c.usage.map(|u| $crate::Usage {
                        prompt_tokens: u.prompt_tokens,
                        cached_tokens: u.cached_tokens,
                        completion_tokens: u.completion_tokens,
                    }),
                };
                $state.with(|s| $crate::Plugin::finished(&mut *s.borrow_mut(), cycle, &completion))
            }
        }
    };
}

/// Exports a `Producer` type as the component's `producer-plugin` world.
/// On native targets it expands to nothing.
#[macro_export]
macro_rules! export_producer {
    ($t:ty) => {
        #[cfg(target_family = "wasm")]
        mod __llmd_producer_export {
            #[allow(unused_imports)]
            use super::*;
            $crate::__bindings_producer!();
            struct Export;
            ::std::thread_local! {
                static STATE: ::std::cell::RefCell<$t> = ::std::cell::RefCell::new(<$t as ::std::default::Default>::default());
            }
            $crate::__export_common!(Export, STATE);
            impl exports::llmd::scheduler::producer::Guest for Export {
                fn produce(cycle: __wit::Cycle) -> ::std::vec::Vec<f32> {
                    let cycle = __cycle(cycle);
                    STATE.with(|s| $crate::Producer::produce(&mut *s.borrow_mut(), &cycle))
                }
            }
            export!(Export);
        }
    };
}

/// Exports a `Filter` type as the component's `filter-plugin` world.
#[macro_export]
macro_rules! export_filter {
    ($t:ty) => {
        #[cfg(target_family = "wasm")]
        mod __llmd_filter_export {
            #[allow(unused_imports)]
            use super::*;
            $crate::__bindings_filter!();
            struct Export;
            ::std::thread_local! {
                static STATE: ::std::cell::RefCell<$t> = ::std::cell::RefCell::new(<$t as ::std::default::Default>::default());
            }
            $crate::__export_common!(Export, STATE);
            impl exports::llmd::scheduler::filter::Guest for Export {
                fn filter(cycle: __wit::Cycle) -> ::std::vec::Vec<u32> {
                    let cycle = __cycle(cycle);
                    STATE.with(|s| $crate::Filter::filter(&mut *s.borrow_mut(), &cycle))
                }
            }
            export!(Export);
        }
    };
}

/// Exports a `Scorer` type as the component's `scorer-plugin` world.
#[macro_export]
macro_rules! export_scorer {
    ($t:ty) => {
        #[cfg(target_family = "wasm")]
        mod __llmd_scorer_export {
            #[allow(unused_imports)]
            use super::*;
            $crate::__bindings_scorer!();
            struct Export;
            ::std::thread_local! {
                static STATE: ::std::cell::RefCell<$t> = ::std::cell::RefCell::new(<$t as ::std::default::Default>::default());
            }
            $crate::__export_common!(Export, STATE);
            impl exports::llmd::scheduler::scorer::Guest for Export {
                fn score(cycle: __wit::Cycle) -> ::std::vec::Vec<f32> {
                    let cycle = __cycle(cycle);
                    STATE.with(|s| $crate::Scorer::score(&mut *s.borrow_mut(), &cycle))
                }
            }
            export!(Export);
        }
    };
}

/// Exports a `Picker` type as the component's `picker-plugin` world.
#[macro_export]
macro_rules! export_picker {
    ($t:ty) => {
        #[cfg(target_family = "wasm")]
        mod __llmd_picker_export {
            #[allow(unused_imports)]
            use super::*;
            $crate::__bindings_picker!();
            struct Export;
            ::std::thread_local! {
                static STATE: ::std::cell::RefCell<$t> = ::std::cell::RefCell::new(<$t as ::std::default::Default>::default());
            }
            $crate::__export_common!(Export, STATE);
            impl exports::llmd::scheduler::picker::Guest for Export {
                fn pick(cycle: __wit::Cycle, scores: ::std::vec::Vec<f32>) -> ::std::vec::Vec<u32> {
                    let cycle = __cycle(cycle);
                    STATE.with(|s| $crate::Picker::pick(&mut *s.borrow_mut(), &cycle, &scores))
                }
            }
            export!(Export);
        }
    };
}
