//! Embeds the WIT contract into the SDK's `export_*!` macros, so each plugin crate
//! generates the bindings of exactly its own world (one wit-bindgen expansion per
//! component, no clash between worlds that share interfaces) without carrying a copy of
//! the WIT files itself.

use std::path::PathBuf;
use std::{env, fs};

const ROLES: [(&str, &str); 4] =
    [("producer", "produce"), ("filter", "filter"), ("scorer", "score"), ("picker", "pick")];

fn main() {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let wit_path = manifest.join("../../wit/scheduler.wit");
    println!("cargo:rerun-if-changed={}", wit_path.display());
    let wit = fs::read_to_string(&wit_path).unwrap_or_else(|e| panic!("reading {}: {e}", wit_path.display()));

    let mut out = String::new();
    for (role, _) in ROLES {
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
            with: {{ "llmd:scheduler/types@0.1.0": ::llmd_plugin_sdk::types }},
            runtime_path: "::llmd_plugin_sdk::__private::wit_bindgen::rt",
        }});
    }};
}}
"#
        ));
    }
    let dest = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join("bindings_macros.rs");
    fs::write(&dest, out).unwrap_or_else(|e| panic!("writing {}: {e}", dest.display()));
}
