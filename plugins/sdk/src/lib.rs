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
pub mod rng;
pub mod types;

#[doc(hidden)]
pub mod __private {
    #[cfg(target_family = "wasm")]
    pub use wit_bindgen;
}

include!(concat!(env!("OUT_DIR"), "/bindings_macros.rs"));

pub use types::{Column, EndpointInfo, Metrics, Request, Usage};

/// The WIT package version this SDK (and every plugin built with it) speaks.
pub const WIT_VERSION: &str = "0.1.0";

/// Life-cycle calls every plugin receives, whatever its role. All have no-op defaults.
pub trait Plugin: Default {
    /// Receives the `parameters` of the plugin's config entry as JSON (`{}` when absent).
    fn configure(&mut self, _params_json: &str) -> Result<(), String> {
        Ok(())
    }
    /// The pool or an endpoint's static data changed; `endpoints` is the whole new pool.
    fn pool_changed(&mut self, _generation: u64, _endpoints: &[EndpointInfo]) {}
    /// The request `request_id` was sent to `chosen[0]` (fallbacks after it).
    fn pre_request(&mut self, _request_id: &str, _chosen: &[u32]) {}
    /// The response of `request_id` from `endpoint` completed with this usage.
    fn response_complete(&mut self, _request_id: &str, _endpoint: u32, _usage: Usage) {}
}

/// Runs first in a cycle; adds named per-endpoint columns later plugins can read.
pub trait Producer: Plugin {
    fn produce(&mut self, req: &Request, metrics: &Metrics) -> Vec<Column>;
}

/// Narrows the candidates; returns the ids to keep.
pub trait Filter: Plugin {
    fn filter(&mut self, req: &Request, metrics: &Metrics, columns: &[Column]) -> Vec<u32>;
}

/// Returns one score per candidate, index-aligned with `metrics.ids`, in [0, 1].
pub trait Scorer: Plugin {
    fn score(&mut self, req: &Request, metrics: &Metrics, columns: &[Column]) -> Vec<f32>;
}

/// Chooses among scored candidates; returns ids, primary first, then fallbacks.
pub trait Picker: Plugin {
    fn pick(&mut self, req: &Request, metrics: &Metrics, scores: &[f32]) -> Vec<u32>;
}

/// Implements the WIT exports shared by every role (`plugin` and `hooks`) for `$export`,
/// delegating to the plugin value in `$state`. Internal to the `export_*!` macros.
#[doc(hidden)]
#[macro_export]
macro_rules! __export_common {
    ($export:ident, $state:ident) => {
        impl exports::llmd::scheduler::plugin::Guest for $export {
            fn configure(params_json: ::std::string::String) -> ::std::result::Result<(), ::std::string::String> {
                $state.with(|s| $crate::Plugin::configure(&mut *s.borrow_mut(), &params_json))
            }
            fn pool_changed(generation: u64, endpoints: ::std::vec::Vec<$crate::EndpointInfo>) {
                $state.with(|s| $crate::Plugin::pool_changed(&mut *s.borrow_mut(), generation, &endpoints))
            }
        }
        impl exports::llmd::scheduler::hooks::Guest for $export {
            fn pre_request(request_id: ::std::string::String, chosen: ::std::vec::Vec<u32>) {
                $state.with(|s| $crate::Plugin::pre_request(&mut *s.borrow_mut(), &request_id, &chosen))
            }
            fn response_complete(request_id: ::std::string::String, endpoint: u32, usage: $crate::Usage) {
                $state.with(|s| $crate::Plugin::response_complete(&mut *s.borrow_mut(), &request_id, endpoint, usage))
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
                fn produce(req: $crate::Request, metrics: $crate::Metrics) -> ::std::vec::Vec<$crate::Column> {
                    STATE.with(|s| $crate::Producer::produce(&mut *s.borrow_mut(), &req, &metrics))
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
                fn filter(
                    req: $crate::Request,
                    metrics: $crate::Metrics,
                    columns: ::std::vec::Vec<$crate::Column>,
                ) -> ::std::vec::Vec<u32> {
                    STATE.with(|s| $crate::Filter::filter(&mut *s.borrow_mut(), &req, &metrics, &columns))
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
                fn score(
                    req: $crate::Request,
                    metrics: $crate::Metrics,
                    columns: ::std::vec::Vec<$crate::Column>,
                ) -> ::std::vec::Vec<f32> {
                    STATE.with(|s| $crate::Scorer::score(&mut *s.borrow_mut(), &req, &metrics, &columns))
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
                fn pick(
                    req: $crate::Request,
                    metrics: $crate::Metrics,
                    scores: ::std::vec::Vec<f32>,
                ) -> ::std::vec::Vec<u32> {
                    STATE.with(|s| $crate::Picker::pick(&mut *s.borrow_mut(), &req, &metrics, &scores))
                }
            }
            export!(Export);
        }
    };
}
