//! The one wasmtime bindgen site: host-side bindings for each plugin world. The worlds
//! share the WIT `types` interface; every world after the first reuses the first one's
//! generated types, so a `Request` is one Rust type whatever the role.

pub mod scorer {
    wasmtime::component::bindgen!({ path: "../wit", world: "scorer-plugin" });
}

pub mod producer {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "producer-plugin",
        with: { "llmd:scheduler/types": super::scorer::llmd::scheduler::types },
    });
}

pub mod filter {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "filter-plugin",
        with: { "llmd:scheduler/types": super::scorer::llmd::scheduler::types },
    });
}

pub mod picker {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "picker-plugin",
        with: { "llmd:scheduler/types": super::scorer::llmd::scheduler::types },
    });
}

pub use scorer::llmd::scheduler::types;
