//! The results table (markdown) and the CSV the plot is drawn from.

use std::fmt::Write as _;

/// Which way a figure is better.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Better {
    Higher,
    Lower,
}

/// A goal for the ratio vhost-plug / peer (or vhost-plug / reference).
#[derive(Clone, Copy, Debug)]
pub struct Target {
    /// The ratio must be at least (Higher) or at most (Lower) this.
    pub ratio: f64,
    pub better: Better,
}

impl Target {
    pub fn at_least(ratio: f64) -> Option<Target> {
        Some(Target {
            ratio,
            better: Better::Higher,
        })
    }

    pub fn at_most(ratio: f64) -> Option<Target> {
        Some(Target {
            ratio,
            better: Better::Lower,
        })
    }

    fn met(&self, r: f64) -> bool {
        match self.better {
            Better::Higher => r >= self.ratio,
            Better::Lower => r <= self.ratio,
        }
    }

    fn text(&self) -> String {
        match self.better {
            Better::Higher => format!(">= {}", self.ratio),
            Better::Lower => format!("<= {}", self.ratio),
        }
    }
}

/// One table row. `ours` and `theirs` are absolute figures; a missing one prints as a dash
/// (with `note` saying why).
#[derive(Clone, Debug)]
pub struct Row {
    pub scenario: String,
    pub unit: &'static str,
    pub ours: Option<f64>,
    pub theirs: Option<f64>,
    /// Header of what `theirs` is when it is not the peer daemon (e.g. the reference).
    pub theirs_label: Option<&'static str>,
    pub target: Option<Target>,
    pub note: String,
    /// No ratio is claimed (e.g. the harness, not the daemon, set the pace); `note` says why.
    pub withheld: bool,
}

impl Row {
    pub fn new(scenario: impl Into<String>, unit: &'static str) -> Row {
        Row {
            scenario: scenario.into(),
            unit,
            ours: None,
            theirs: None,
            theirs_label: None,
            target: None,
            note: String::new(),
            withheld: false,
        }
    }

    pub fn values(mut self, ours: Option<f64>, theirs: Option<f64>) -> Row {
        self.ours = ours;
        self.theirs = theirs;
        self
    }

    pub fn target(mut self, t: Option<Target>) -> Row {
        self.target = t;
        self
    }

    pub fn against(mut self, label: &'static str) -> Row {
        self.theirs_label = Some(label);
        self
    }

    pub fn note(mut self, n: impl Into<String>) -> Row {
        self.note = n.into();
        self
    }

    /// Claims no ratio for this row, saying why.
    pub fn withhold(mut self, why: impl Into<String>) -> Row {
        self.withheld = true;
        let why = why.into();
        self.note = if self.note.is_empty() {
            why
        } else {
            format!("{}; {why}", self.note)
        };
        self
    }

    pub fn ratio(&self) -> Option<f64> {
        if self.withheld {
            return None;
        }
        match (self.ours, self.theirs) {
            (Some(a), Some(b)) if b != 0.0 => Some(a / b),
            _ => None,
        }
    }
}

fn fmt_value(v: Option<f64>) -> String {
    match v {
        None => "-".into(),
        Some(x) if x.abs() >= 100.0 => format!("{x:.0}"),
        Some(x) if x.abs() >= 10.0 => format!("{x:.1}"),
        Some(x) => format!("{x:.2}"),
    }
}

/// The markdown table.
pub fn markdown(rows: &[Row]) -> String {
    let mut s = String::new();
    s.push_str(
        "| scenario | unit | vhost-plug | vhost-device-vsock (or reference) | ratio plug/other \
         | target | met |\n",
    );
    s.push_str("|---|---|---:|---:|---:|---|---|\n");
    for r in rows {
        let theirs = match r.theirs_label {
            Some(l) => format!("{} ({l})", fmt_value(r.theirs)),
            None => fmt_value(r.theirs),
        };
        let ratio = r.ratio().map_or("-".into(), |x| format!("{x:.2}"));
        let (target, met) = match (r.target, r.ratio()) {
            (Some(t), Some(x)) => (t.text(), if t.met(x) { "yes" } else { "**no**" }),
            (Some(t), None) => (t.text(), "?"),
            (None, _) => (String::new(), ""),
        };
        let mut scenario = r.scenario.clone();
        if !r.note.is_empty() {
            let _ = write!(scenario, " ({})", r.note);
        }
        let _ = writeln!(
            s,
            "| {scenario} | {} | {} | {theirs} | {ratio} | {target} | {met} |",
            r.unit,
            fmt_value(r.ours)
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_marks_targets() {
        let rows = vec![
            Row::new("a", "MiB/s")
                .values(Some(300.0), Some(100.0))
                .target(Target::at_least(1.5)),
            Row::new("b", "us")
                .values(Some(20.0), Some(10.0))
                .target(Target::at_most(1.0)),
            Row::new("c", "KiB").values(None, Some(1.0)).note("n/a"),
            Row::new("d", "MiB/s")
                .values(Some(300.0), Some(100.0))
                .target(Target::at_least(1.5))
                .withhold("harness-limited"),
        ];
        let t = markdown(&rows);
        assert!(
            t.contains("| a | MiB/s | 300 | 100 | 3.00 | >= 1.5 | yes |"),
            "{t}"
        );
        assert!(
            t.contains("| b | us | 20.0 | 10.0 | 2.00 | <= 1 | **no** |"),
            "{t}"
        );
        assert!(t.contains("| c (n/a) | KiB | - | 1.00 | - |  |  |"), "{t}");
        assert!(
            t.contains("| d (harness-limited) | MiB/s | 300 | 100 | - | >= 1.5 | ? |"),
            "{t}"
        );
    }
}
