//! Temporary driver for `epp replay` until main.rs wires it (deleted afterwards).
fn main() {
    let args = match epp::replay::ReplayArgs::parse_flags(std::env::args().skip(1)) {
        Ok(a) => a,
        Err(e) => e.exit(),
    };
    let mut out = std::io::stdout();
    match epp::replay::run_cli(args, &mut out) {
        Ok(ok) => std::process::exit(if ok { 0 } else { 1 }),
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(2)
        }
    }
}
