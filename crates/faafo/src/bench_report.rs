//! What a `faafo bench` command prints: lines for people as it goes, or, with `--json`,
//! one JSON object of its figures at the end (for scripts and for comparing runs).

use std::fmt::Display;

use serde_json::{Map, Value};

#[derive(Debug)]
pub struct Report {
    json: bool,
    figures: Map<String, Value>,
}

impl Report {
    pub fn new(json: bool) -> Report {
        Report {
            json,
            figures: Map::new(),
        }
    }

    /// A line for people, printed at once (nothing with `--json`).
    pub fn say(&self, line: impl Display) {
        if !self.json {
            println!("{line}");
        }
    }

    /// A figure for the JSON object, at a dotted path (`"heavy.simd.mpixel_per_s"`).
    pub fn figure(&mut self, path: &str, value: impl Into<Value>) {
        let mut parts = path.split('.').peekable();
        let mut object = &mut self.figures;
        while let Some(part) = parts.next() {
            if parts.peek().is_none() {
                object.insert(part.to_owned(), value.into());
                return;
            }
            let child = object
                .entry(part.to_owned())
                .or_insert_with(|| Value::Object(Map::new()));
            if !child.is_object() {
                *child = Value::Object(Map::new());
            }
            object = child.as_object_mut().expect("just made an object");
        }
    }

    /// Prints the JSON object, with `--json`.
    pub fn finish(self) -> anyhow::Result<()> {
        if self.json {
            println!(
                "{}",
                serde_json::to_string_pretty(&Value::Object(self.figures))?
            );
        }
        Ok(())
    }
}

/// The middle value (the mean of the two middle ones for an even count); NaN for none.
pub fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figures_nest_by_their_dotted_paths() {
        let mut report = Report::new(true);
        report.figure("heavy.simd.mpixel_per_s", 12.5);
        report.figure("heavy.scalar.mpixel_per_s", 3.0);
        report.figure("ceiling", 1.75e9);
        assert_eq!(
            Value::Object(report.figures),
            serde_json::json!({
                "heavy": {"simd": {"mpixel_per_s": 12.5}, "scalar": {"mpixel_per_s": 3.0}},
                "ceiling": 1.75e9,
            })
        );
    }

    #[test]
    fn the_median_is_the_middle_value() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(median(&[0.9]), 0.9);
        assert!(median(&[]).is_nan());
    }
}
