//! The one wasmtime bindgen site: host-side bindings for each plugin world. The worlds
//! share the WIT `types` interface; every world after the first reuses the first one's
//! generated types, so a `Cycle` is one Rust type whatever the role. Parameters are
//! generated borrowing (`&str`, `&[T]`), so a call lowers the host's own buffers — the
//! prompt is never copied on the host side.

pub mod scorer {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "scorer-plugin",
        ownership: Borrowing { duplicate_if_necessary: true },
    });
}

pub mod producer {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "producer-plugin",
        ownership: Borrowing { duplicate_if_necessary: true },
        with: { "llmd:scheduler/types": super::scorer::llmd::scheduler::types },
    });
}

pub mod filter {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "filter-plugin",
        ownership: Borrowing { duplicate_if_necessary: true },
        with: { "llmd:scheduler/types": super::scorer::llmd::scheduler::types },
    });
}

pub mod picker {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "picker-plugin",
        ownership: Borrowing { duplicate_if_necessary: true },
        with: { "llmd:scheduler/types": super::scorer::llmd::scheduler::types },
    });
}

pub use scorer::llmd::scheduler::types;
