//! `make bench-dkron` / `make bench-system`: the end-to-end measurements as runs of their own.
//!
//! The e2e tests record each figure they measure (`tests/support/bench.rs`) as one JSON line,
//! `{"scenario", "metric", "unit", "value"}`, in the file `DKRON_HA_BENCH_OUT` names. A bench
//! runs a suite `BENCH_RUNS` times, one scenario at a time, and gathers the lines into
//! `target/bench/<suite>.json`: `{"suite", "commit", "dkron", "machine", "results": [{"scenario",
//! "metric", "unit", "runs": [numbers]}]}`, with a min / median / max table on stdout.

use std::fmt::Write as _;

use anyhow::{Context as _, Result};
use serde::{Deserialize, Serialize};

/// One figure one test measured once.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub scenario: String,
    pub metric: String,
    pub unit: String,
    pub value: f64,
}

/// Every run of one figure.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Measured {
    pub scenario: String,
    pub metric: String,
    pub unit: String,
    pub runs: Vec<f64>,
}

/// What `target/bench/<suite>.json` holds.
#[derive(Debug, Serialize, Deserialize)]
pub struct Report {
    pub suite: String,
    pub commit: String,
    /// `"real <version>"` or `"stand-in"`.
    pub dkron: String,
    pub machine: String,
    pub results: Vec<Measured>,
}

/// Reads the JSON lines of one run; a line that does not parse is an error naming it.
pub fn parse_records(text: &str) -> Result<Vec<Record>> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .enumerate()
        .map(|(i, line)| {
            serde_json::from_str(line).with_context(|| format!("line {}: {line}", i + 1))
        })
        .collect()
}

/// Gathers the records of every run by (scenario, metric, unit), in the order first seen.
pub fn gather(records: impl IntoIterator<Item = Record>) -> Vec<Measured> {
    let mut out: Vec<Measured> = Vec::new();
    for r in records {
        match out
            .iter_mut()
            .find(|m| m.scenario == r.scenario && m.metric == r.metric && m.unit == r.unit)
        {
            Some(m) => m.runs.push(r.value),
            None => out.push(Measured {
                scenario: r.scenario,
                metric: r.metric,
                unit: r.unit,
                runs: vec![r.value],
            }),
        }
    }
    out
}

/// (min, median, max) of `runs`; the median of an even count is the mean of the middle two.
pub fn spread(runs: &[f64]) -> Option<(f64, f64, f64)> {
    let mut sorted = runs.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    let median = match n {
        0 => return None,
        _ if n % 2 == 1 => sorted[n / 2],
        _ => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    };
    Some((sorted[0], median, sorted[n - 1]))
}

/// The table printed after a bench: one row per figure.
pub fn table(results: &[Measured]) -> String {
    let mut out = String::from(
        "| scenario | metric | runs | min | median | max |\n|---|---|---|---|---|---|\n",
    );
    for m in results {
        if let Some((min, median, max)) = spread(&m.runs) {
            let _ = writeln!(
                out,
                "| {} | {} ({}) | {} | {min:.2} | {median:.2} | {max:.2} |",
                m.scenario,
                m.metric,
                m.unit,
                m.runs.len()
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(scenario: &str, metric: &str, value: f64) -> Record {
        Record {
            scenario: scenario.into(),
            metric: metric.into(),
            unit: "s".into(),
            value,
        }
    }

    #[test]
    fn runs_of_one_figure_are_gathered_in_the_order_first_seen() {
        let gathered = gather([
            record("restart", "whole", 9.5),
            record("cold", "whole", 5.0),
            record("restart", "whole", 10.5),
            record("restart", "elected", 2.0),
        ]);
        let keys: Vec<(&str, &str, &[f64])> = gathered
            .iter()
            .map(|m| (m.scenario.as_str(), m.metric.as_str(), m.runs.as_slice()))
            .collect();
        assert_eq!(
            keys,
            [
                ("restart", "whole", &[9.5, 10.5][..]),
                ("cold", "whole", &[5.0][..]),
                ("restart", "elected", &[2.0][..]),
            ]
        );
    }

    #[test]
    fn spread_takes_the_middle_and_the_mean_of_the_two_middles() {
        assert_eq!(spread(&[3.0, 1.0, 2.0]), Some((1.0, 2.0, 3.0)));
        assert_eq!(spread(&[4.0, 1.0, 2.0, 3.0]), Some((1.0, 2.5, 4.0)));
        assert_eq!(spread(&[]), None);
    }

    #[test]
    fn a_line_that_is_not_a_record_is_named() {
        let good = r#"{"scenario":"a","metric":"b","unit":"s","value":1.5}"#;
        assert_eq!(
            parse_records(&format!("{good}\n\n{good}\n")).unwrap().len(),
            2
        );
        let error = parse_records(&format!("{good}\nnot json\n")).unwrap_err();
        assert!(
            format!("{error:#}").contains("line 2: not json"),
            "{error:#}"
        );
    }

    #[test]
    fn the_table_has_a_row_per_figure() {
        let table = table(&gather([
            record("roll", "done", 80.0),
            record("roll", "done", 100.0),
            record("roll", "done", 90.0),
        ]));
        assert!(
            table.contains("| roll | done (s) | 3 | 80.00 | 90.00 | 100.00 |"),
            "{table}"
        );
    }
}
