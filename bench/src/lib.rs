//! The EPP's benchmarks, as a library the `epp-bench` binary and the smoke test drive:
//! scheduling cost of the embedded optimized baseline against its natively compiled twin
//! (`micro`), the end-to-end overhead of the EPP path through a real Envoy (`e2e`) and the
//! routing quality of the policies on a shared-prefix workload (`quality`). `report` turns
//! their results into the markdown of docs/benchmarks.md.
//!
//! It measures and reports; it asserts nothing about the numbers (targets are reported
//! against, never tested), so a slow machine cannot fail a build.

pub mod e2e;
pub mod latency;
pub mod load;
pub mod micro;
pub mod native;
pub mod null_ext_proc;
pub mod precise;
pub mod quality;
pub mod report;
pub mod workload;

/// The live stacks, shared with the integration tests.
pub use epp_stack as stack;
