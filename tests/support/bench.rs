//! The figures the e2e tests measure, for `make bench-dkron` / `make bench-system`
//! (`xtask/src/bench.rs`): each is printed, and with `DKRON_HA_BENCH_OUT` set also appended to
//! that file as one JSON line. The tests assert only sanity bounds on them; the benches run
//! them several times and keep every value.

use std::io::Write as _;
use std::time::Duration;

/// Records `value` (in `unit`) of `metric` in `scenario`.
pub fn record(scenario: &str, metric: &str, unit: &str, value: f64) {
    eprintln!("bench: {scenario}: {metric} = {value:.2} {unit}");
    let Some(path) = std::env::var_os("DKRON_HA_BENCH_OUT") else {
        return;
    };
    let line = serde_json::json!({
        "scenario": scenario, "metric": metric, "unit": unit, "value": value,
    });
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .unwrap_or_else(|error| panic!("open {}: {error}", path.to_string_lossy()));
    writeln!(file, "{line}")
        .unwrap_or_else(|error| panic!("write {}: {error}", path.to_string_lossy()));
}

/// [`record`] of a duration, in seconds.
pub fn seconds(scenario: &str, metric: &str, value: Duration) {
    record(scenario, metric, "s", value.as_secs_f64());
}
