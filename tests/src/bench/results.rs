//! Every value the `bench` binary measured, keyed by scenario and daemon, and the rule that
//! withholds a ratio when the harness set the pace.

use std::collections::BTreeMap;
use std::time::Instant;

use super::opts::KINDS;
use super::rss::RssRun;
use super::stats::{median, Percentiles};
use super::threads::SATURATED_PCT;

/// A progress line on stderr, with the seconds since `t0`.
pub fn log(t0: Instant, msg: impl AsRef<str>) {
    eprintln!(
        "[bench {:7.1}s] {}",
        t0.elapsed().as_secs_f64(),
        msg.as_ref()
    );
}

/// Every measured value, keyed by scenario.
#[derive(Default)]
pub struct Results {
    /// (scenario key, daemon) -> values of each repetition.
    pub values: BTreeMap<(String, String), Vec<f64>>,
    /// (scenario key, daemon) -> why it failed.
    pub errors: BTreeMap<(String, String), String>,
    pub latency: BTreeMap<(String, String), Percentiles>,
    pub rss: BTreeMap<String, RssRun>,
    pub policy_enforced: Option<Result<bool, String>>,
}

impl Results {
    pub fn push(&mut self, key: &str, who: &str, v: f64) {
        self.values
            .entry((key.to_string(), who.to_string()))
            .or_default()
            .push(v);
    }

    pub fn fail(&mut self, t0: Instant, key: &str, who: &str, e: &anyhow::Error) {
        log(t0, format!("FAILED {key} on {who}: {e:#}"));
        self.errors
            .entry((key.to_string(), who.to_string()))
            .or_insert_with(|| format!("{e:#}"));
    }

    pub fn median(&self, key: &str, who: &str) -> Option<f64> {
        median(self.values.get(&(key.to_string(), who.to_string()))?)
    }

    pub fn error(&self, key: &str, who: &str) -> Option<&String> {
        self.errors.get(&(key.to_string(), who.to_string()))
    }
}

/// Why no throughput ratio is claimed for `key`: a harness thread was busy for nearly the
/// whole transfer (median over the repetitions) with either daemon.
pub fn harness_limited(res: &Results, key: &str) -> Option<String> {
    let busy: Vec<String> = KINDS
        .iter()
        .filter_map(|k| {
            let p = res.median(&format!("bpct-{key}"), k.name())?;
            (p >= SATURATED_PCT).then(|| format!("{} {p:.0}%", k.name()))
        })
        .collect();
    (!busy.is_empty()).then(|| {
        format!(
            "harness-limited: busiest harness thread at {} of a core, no ratio claimed",
            busy.join(", ")
        )
    })
}
