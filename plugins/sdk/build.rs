//! Embeds the WIT contract into the SDK's `export_*!` macros, so each plugin crate
//! generates the bindings of exactly its own world (one wit-bindgen expansion per
//! component, no clash between worlds that share interfaces) without carrying a copy of
//! the WIT files itself. The contract is `wit/scheduler.wit` beside this crate (a copy
//! written by `epp plugin new`) or the workspace's `wit/` two folders up.

use std::path::PathBuf;
use std::{env, fs};

const ROLES: [&str; 4] = ["producer", "filter", "scorer", "picker"];

fn main() {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let wit_path = [manifest.join("wit/scheduler.wit"), manifest.join("../../wit/scheduler.wit")]
        .into_iter()
        .find(|p| p.exists())
        .unwrap_or_else(|| panic!("no wit/scheduler.wit beside {} nor in the workspace", manifest.display()));
    println!("cargo:rerun-if-changed={}", wit_path.display());
    let wit = fs::read_to_string(&wit_path).unwrap_or_else(|e| panic!("reading {}: {e}", wit_path.display()));

    let mut out = String::new();
    for role in ROLES {
        out.push_str(&format!(
            r#"
/// Generates the `{role}-plugin` world's bindings in the calling crate. Internal to
/// `export_{role}!`.
#[doc(hidden)]
#[macro_export]
macro_rules! __bindings_{role} {{
    () => {{
        ::llmd_plugin_sdk::__private::wit_bindgen::generate!({{
            inline: {wit:?},
            world: "{role}-plugin",
            runtime_path: "::llmd_plugin_sdk::__private::wit_bindgen::rt",
        }});
    }};
}}
"#
        ));
    }
    let out_dir = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let dest = out_dir.join("bindings_macros.rs");
    fs::write(&dest, out).unwrap_or_else(|e| panic!("writing {}: {e}", dest.display()));
    fs::write(out_dir.join("scheduler.wit"), &wit).unwrap_or_else(|e| panic!("writing the WIT copy: {e}"));
}
