//! Keeps the benchmark harness from rotting: the micro benchmark's smoke run (a few
//! decisions per cell, both builds, every plugin, parsing) must work and produce a report,
//! in a debug build, in seconds. It checks shapes, never speed.

use bench::micro::{self, MicroOptions};
use bench::report::{Machine, Report};

#[test]
fn micro_smoke_runs_both_builds_and_reports() {
    let opts = MicroOptions { endpoints: vec![8, 100], prompt_bytes: vec![1024, 16 * 1024], ..MicroOptions::smoke() };
    let results = micro::run(&opts, &mut |line| eprintln!("{line}")).expect("micro smoke run");
    assert_eq!(results.cells.len(), 4);
    for c in &results.cells {
        assert!(c.wasm.count > 0 && c.native.count > 0, "{c:?}");
        assert!(c.decisions_agree, "wasm and native builds chose differently: {c:?}");
    }
    // The default profile's nine plugins plus the hooks-and-glue row, per cell.
    assert_eq!(results.plugins.len(), 4 * 10);
    assert_eq!(results.parse.len(), 2);

    let machine = Machine::detect();
    let report = Report {
        machine: &machine,
        command: "test".into(),
        smoke: true,
        micro: Some(&results),
        e2e: None,
        quality: None,
    };
    let md = report.markdown();
    assert!(md.contains("## 1. Scheduling cost") && md.contains("| 100 | 16 KB |"), "{md}");
}
